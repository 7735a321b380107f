"""dicom.transcode: what can be produced (``refusal``), frames encoded losslessly at any size
(decoded again with pydicom's decoders as the oracle), and Part 10 streams read back by pydicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from support import make_image, shipped

from openpacs.dicom import frames, transcode
from openpacs.dicom.frames import Span, StoredPixels

EXPLICIT = "1.2.840.10008.1.2.1"

CASES = [  # name, bits allocated, bits stored, pixel representation, samples
    ("u8", 8, 8, 0, 1),
    ("u12", 16, 12, 0, 1),
    ("u16", 16, 16, 0, 1),
    ("s12", 16, 12, 1, 1),
    ("s16", 16, 16, 1, 1),
    ("rgb", 8, 8, 0, 3),
]


def _pixels(target: str, rows: int, cols: int, ba: int, bs: int, pr: int, spp: int) -> StoredPixels:
    pi = "RGB" if spp == 3 else "MONOCHROME2"
    return StoredPixels(target, frames.PIXEL_DATA, "OW", rows, cols, spp, ba, bs, pr, 0, pi, 1,
                        Span(0, 0), False)  # fmt: skip


@pytest.mark.parametrize("target", transcode.COMPRESSED_TARGETS)
@pytest.mark.parametrize("size", [(1, 1), (1, 7), (3, 2), (5, 9), (16, 16), (31, 40), (40, 33)])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_encode_frame_any_size_is_lossless(target: str, size: tuple[int, int], case: tuple) -> None:
    """No minimum image size: tiny images are encoded too (JPEG 2000 with fewer resolution
    levels, JPEG-LS with room for its markers), and decode to the same values."""
    _, ba, bs, pr, spp = case
    rows, cols = size
    low, high = (-(1 << (bs - 1)), 1 << (bs - 1)) if pr else (0, 1 << bs)
    shape = (rows, cols, 3) if spp == 3 else (rows, cols)
    rng = np.random.default_rng(rows * 100 + cols)
    arr = rng.integers(low, high, size=shape).astype(f"{'i' if pr else 'u'}{ba // 8}")
    arr.flat[0], arr.flat[-1] = low, high - 1  # the extremes of the range
    pixels = _pixels(target, rows, cols, ba, bs, pr, spp)
    assert transcode.refusal(pixels, EXPLICIT, target) is None
    photometric = pixels.photometric
    data = transcode.encode_frame(arr, pixels, photometric, target)
    decoded, _ = get_decoder(target).as_array(
        encapsulate([data]),
        rows=rows,
        columns=cols,
        samples_per_pixel=spp,
        bits_allocated=ba,
        bits_stored=bs,
        pixel_representation=pr,
        photometric_interpretation=photometric,
        number_of_frames=1,
        planar_configuration=0,
    )
    assert np.array_equal(decoded.reshape(shape), arr)
    if target == transcode.JPEG_2000_LOSSLESS:  # SIZ: precision and sign as stored
        ssiz = data[42]
        assert (ssiz & 0x7F) + 1 == bs and bool(ssiz & 0x80) == bool(pr)


def test_refusals() -> None:
    mono = _pixels(EXPLICIT, 64, 64, 16, 12, 0, 1)
    assert transcode.refusal(mono, EXPLICIT, "1.2.840.10008.1.2.4.50")  # lossy: never produced
    assert "cannot encode" in (transcode.refusal(mono, EXPLICIT, "1.2.3.4") or "")
    assert transcode.refusal(None, EXPLICIT, transcode.JPEG_2000_LOSSLESS)
    assert transcode.refusal(None, EXPLICIT, "1.2.840.10008.1.2") is None
    deep = _pixels(EXPLICIT, 64, 64, 32, 32, 0, 1)
    assert "24 bits" in (transcode.refusal(deep, EXPLICIT, transcode.JPEG_2000_LOSSLESS) or "")
    tiny_rgb16 = _pixels(EXPLICIT, 4, 4, 16, 16, 0, 3)
    assert transcode.refusal(tiny_rgb16, EXPLICIT, transcode.JPEG_2000_LOSSLESS)


@pytest.mark.parametrize("target", [*transcode.UNCOMPRESSED, *transcode.COMPRESSED_TARGETS])
def test_stream_part10_reads_back(tmp_path: Path, target: str) -> None:
    ds = make_image(rows=7, columns=5)
    ds.NumberOfFrames = 3
    arr = np.random.default_rng(5).integers(0, 4096, size=(3, 7, 5)).astype(np.uint16)
    ds.PixelData = arr.tobytes()
    path = tmp_path / "in.dcm"
    ds.save_as(path, enforce_file_format=True)
    pixels = frames.locate(path)
    out = tmp_path / "out.dcm"
    out.write_bytes(
        b"".join(transcode.stream_part10(path, pixels, target, ds.SOPClassUID, ds.SOPInstanceUID))
    )
    back = dcmread(out)
    assert str(back.file_meta.TransferSyntaxUID) == target
    assert back.SOPInstanceUID == ds.SOPInstanceUID and back.PatientName == ds.PatientName
    assert np.array_equal(back.pixel_array, arr)


def test_stream_part10_from_compressed(tmp_path: Path) -> None:
    path = shipped("SC_rgb_rle_2frame.dcm")
    original = dcmread(path)
    out = tmp_path / "out.dcm"
    body = transcode.stream_part10(
        path, frames.locate(path), transcode.JPEG_2000_LOSSLESS, original.SOPClassUID, "1.2.3"
    )
    out.write_bytes(b"".join(body))
    back = dcmread(out)
    assert back.PhotometricInterpretation == "RGB" and back.PlanarConfiguration == 0
    assert np.array_equal(back.pixel_array, original.pixel_array)
