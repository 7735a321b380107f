"""dicom.frames: locating pixel data and frames in Part 10 files, checked against pydicom (which
reads the whole pixel data and splits it itself) as the oracle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.pixels import pack_bits
from pydicom.uid import ExplicitVRLittleEndian, RLELossless
from support import make_image, shipped

from openpacs.dicom import frames
from openpacs.dicom.frames import FrameError, FrameReader


def _save(tmp_path: Path, ds, name: str = "x.dcm") -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _multiframe(tmp_path: Path, n: int = 3):  # type: ignore[no-untyped-def]
    arr = np.random.default_rng(1).integers(0, 4096, size=(n, 6, 5)).astype(np.uint16)
    ds = make_image(rows=6, columns=5)
    ds.NumberOfFrames = n
    ds.PixelData = arr.tobytes()
    return _save(tmp_path, ds), arr


def test_native_multiframe_spans_and_frames(tmp_path: Path) -> None:
    path, arr = _multiframe(tmp_path)
    pixels = frames.locate(path)
    assert pixels is not None
    assert (pixels.rows, pixels.columns, pixels.number_of_frames) == (6, 5, 3)
    assert not pixels.encapsulated and pixels.vr == "OW"
    data = path.read_bytes()
    assert data[pixels.value.offset : pixels.value.offset + pixels.value.length] == arr.tobytes()
    with FrameReader(path, pixels) as reader:
        for i in range(3):
            assert reader.stored_frame(i) == arr[i].tobytes()
            assert reader.native_frame(i) == arr[i].tobytes()
            decoded, photometric = reader.decode(i)
            assert np.array_equal(decoded, arr[i]) and photometric == "MONOCHROME2"
        assert b"".join(reader.chunks(pixels.value, 7)) == arr.tobytes()
    with pytest.raises(IndexError):
        pixels.check_frame(4)


def test_no_pixel_data_is_none(tmp_path: Path) -> None:
    ds = make_image()
    del ds.PixelData
    assert frames.locate(_save(tmp_path, ds)) is None


def _encapsulated(tmp_path: Path, fragments, n: int, extended: bool = False, **kw):  # type: ignore[no-untyped-def]
    ds = make_image(rows=4, columns=4, transfer_syntax=RLELossless)
    ds.NumberOfFrames = n
    if extended:
        ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(
            fragments
        )
    else:
        ds.PixelData = encapsulate(fragments, **kw)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return _save(tmp_path, ds)


# frames that look like JPEG codestreams (SOI first), of odd lengths
CODESTREAMS = [b"\xff\xd8" + bytes([i]) * (9 + 4 * i) + b"\xff\xd9" for i in range(3)]


@pytest.mark.parametrize(
    "how",
    [
        {"fragments_per_frame": 1, "has_bot": True},
        {"fragments_per_frame": 1, "has_bot": False},
        {"fragments_per_frame": 2, "has_bot": True},
        {"fragments_per_frame": 2, "has_bot": False},  # split by the SOI markers
        {"extended": True},
    ],
)
def test_encapsulated_frames(tmp_path: Path, how: dict) -> None:
    path = _encapsulated(tmp_path, CODESTREAMS, 3, **how)
    pixels = frames.locate(path)
    assert pixels is not None and pixels.encapsulated and len(pixels.frames) == 3
    with FrameReader(path, pixels) as reader:
        got = [reader.stored_frame(i) for i in range(3)]
    # pydicom pads each fragment to an even length; the frame is its fragments joined
    assert [g.rstrip(b"\0") for g in got] == [c.rstrip(b"\0") for c in CODESTREAMS]
    assert all(g.startswith(c) for g, c in zip(got, CODESTREAMS, strict=True))


def test_encapsulated_ambiguous_frames_refused(tmp_path: Path) -> None:
    """No offset table, more fragments than frames and no codestream markers: cannot split."""
    blobs = [b"ab" * 5, b"cd" * 6, b"ef" * 7]
    path = _encapsulated(tmp_path, blobs, 3, fragments_per_frame=2, has_bot=False)
    with pytest.raises(FrameError, match="cannot tell where"):
        frames.locate(path)
    assert frames.locate(path, split_frames=False) is not None  # metadata needs no frames


def test_shipped_rle_two_frames_match_pydicom(tmp_path: Path) -> None:
    path = shipped("SC_rgb_rle_2frame.dcm")
    ds = dcmread(path)
    pixels = frames.locate(path)
    assert pixels is not None and pixels.transfer_syntax == RLELossless
    with FrameReader(path, pixels) as reader:
        for i in range(2):
            arr, photometric = reader.decode(i)
            assert np.array_equal(arr, ds.pixel_array[i]) and photometric == "RGB"
            assert reader.native_frame(i) == ds.pixel_array[i].tobytes()


def test_big_endian_and_deflated() -> None:
    for name in ("MR_small_bigendian.dcm", "image_dfl.dcm"):
        path = shipped(name)
        ds = dcmread(path)
        pixels = frames.locate(path)
        assert pixels is not None and not pixels.encapsulated
        expected = ds.pixel_array
        with FrameReader(path, pixels) as reader:
            native = reader.native_frame(0)
        assert native == expected.astype(expected.dtype.newbyteorder("<")).tobytes(), name


def test_one_bit_frames_not_on_byte_boundaries(tmp_path: Path) -> None:
    """3×3 1-bit frames: 9 bits each, packed back to back (PS3.5 8.1.1)."""
    arr = np.random.default_rng(3).integers(0, 2, size=(4, 3, 3)).astype(np.uint8)
    ds = make_image(rows=3, columns=3)
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = 0
    ds.NumberOfFrames = 4
    ds.PixelData = pack_bits(arr)
    ds["PixelData"].VR = "OB"
    path = _save(tmp_path, ds)
    pixels = frames.locate(path)
    assert pixels is not None and pixels.native_frame_bits == 9
    with FrameReader(path, pixels) as reader:
        for i in range(4):
            assert reader.native_frame(i) == pack_bits(arr[i], pad=False)
            assert np.array_equal(reader.decode(i)[0], arr[i])


def test_truncated_native_frame(tmp_path: Path) -> None:
    path, _ = _multiframe(tmp_path)
    ds = dcmread(path)
    ds.NumberOfFrames = 5  # more frames than the value holds
    path = _save(tmp_path, ds, "short.dcm")
    pixels = frames.locate(path)
    assert pixels is not None
    with pytest.raises(FrameError, match="past the end"):
        pixels.stored_spans(4)


def test_not_dicom(tmp_path: Path) -> None:
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(FrameError):
        frames.locate(empty)
    assert ExplicitVRLittleEndian in frames.NATIVE_SYNTAXES
