"""DICOM JSON + bulk data → Part 10 (dicom/json_instance.py): the Transfer Syntax read from real
JPEG / JPEG-LS streams (Pillow's, and those inside pydicom's test files) and from MP4 sample
descriptions, and the encoded file read back by pydicom as the data set that was described."""

from __future__ import annotations

import io
import tempfile

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import Dataset
from pydicom.encaps import generate_fragments, generate_frames
from pydicom.uid import generate_uid
from stow_support import make_mp4
from support import make_image, shipped

from openpacs.dicom import json_instance as ji
from openpacs.dicom.uids import IMPLEMENTATION_CLASS_UID


def part(data: bytes, media: str = "application/octet-stream", **params: str) -> ji.BulkPart:
    fh = tempfile.TemporaryFile()  # noqa: SIM115 - the part owns it
    fh.write(data)
    fh.flush()
    return ji.BulkPart(media, fh, len(data), params)


def pillow_jpeg(mode: str = "L", **options: object) -> bytes:
    rng = np.random.default_rng(3)
    shape = (48, 80) if mode == "L" else (48, 80, 3)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(out, "JPEG", **options)
    return out.getvalue()


def first_frame(name: str) -> bytes:
    ds = pydicom.dcmread(shipped(name))
    return next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1))))


# ------------------------------------------------------------------ JPEG / JPEG-LS
@pytest.mark.parametrize(
    ("data", "media", "ts", "photometric", "precision"),
    [
        (pillow_jpeg("L"), "image/jpeg", "1.2.840.10008.1.2.4.50", "MONOCHROME2", 8),
        (pillow_jpeg("RGB"), "image/jpeg", "1.2.840.10008.1.2.4.50", "YBR_FULL_422", 8),
        (pillow_jpeg("RGB", subsampling=0), "image/jpeg", "1.2.840.10008.1.2.4.50", "YBR_FULL", 8),
        (pillow_jpeg("L", progressive=True), "image/jpeg", "1.2.840.10008.1.2.4.55", None, 8),
        (first_frame("SC_rgb_jpeg_gdcm.dcm"), "image/jpeg", "1.2.840.10008.1.2.4.70", "RGB", 8),
        (first_frame("JPGExtended.dcm"), "image/jpeg", "1.2.840.10008.1.2.4.51", None, 12),
        (
            first_frame("MR_small_jpeg_ls_lossless.dcm"),
            "image/jls",
            "1.2.840.10008.1.2.4.80",
            None,
            16,
        ),
        (first_frame("JPEGLSNearLossless_08.dcm"), "image/jls", "1.2.840.10008.1.2.4.81", None, 8),
    ],
)
def test_jpeg_process_gives_the_transfer_syntax(
    data: bytes, media: str, ts: str, photometric: str | None, precision: int
) -> None:
    info = ji.stream_info(part(data, media))
    assert info.transfer_syntax == ts
    assert info.precision == precision
    if photometric:
        assert info.photometric == photometric
    if ts in (ji.JPEG_BASELINE, ji.JPEG_PROGRESSIVE):  # Pillow reads these
        with Image.open(io.BytesIO(data)) as img:
            assert (info.columns, info.rows) == img.size


def test_jpeg_refusals() -> None:
    with pytest.raises(ji.InstanceError) as raised:
        ji.stream_info(part(first_frame("MR_small_jpeg_ls_lossless.dcm"), "image/jpeg"))
    assert raised.value.reason == ji.TRANSFER_SYNTAX_NOT_SUPPORTED
    with pytest.raises(ji.InstanceError) as raised:
        ji.stream_info(part(pillow_jpeg(), "image/jls"))
    assert raised.value.reason == ji.TRANSFER_SYNTAX_NOT_SUPPORTED
    for garbage in (b"", b"GIF89a", b"\xff\xd8\xff\xe0\x00", b"\xff\xd8\x00\x00"):
        with pytest.raises(ji.InstanceError) as raised:
            ji.stream_info(part(garbage, "image/jpeg"))
        assert raised.value.reason == ji.CANNOT_UNDERSTAND


def test_declared_transfer_syntax_and_media_types() -> None:
    jpeg = pillow_jpeg()
    declared = ji.stream_info(part(jpeg, "image/jpeg", **{"transfer-syntax": ji.JPEG_EXTENDED}))
    assert declared.transfer_syntax == ji.JPEG_EXTENDED and declared.rows == 48
    with pytest.raises(ji.InstanceError) as raised:
        ji.stream_info(part(jpeg, "image/jpeg", **{"transfer-syntax": "1.2.840.10008.1.2.4.90"}))
    assert raised.value.reason == ji.TRANSFER_SYNTAX_NOT_SUPPORTED
    assert ji.stream_info(part(b"x", "image/jp2")).transfer_syntax == "1.2.840.10008.1.2.4.91"
    assert ji.stream_info(part(b"x", "image/dicom-rle")).transfer_syntax == ji.RLE_LOSSLESS
    assert ji.stream_info(part(b"x")).transfer_syntax == "1.2.840.10008.1.2.1"
    with pytest.raises(ji.InstanceError) as raised:
        ji.stream_info(part(b"x", "image/png"))
    assert raised.value.reason == ji.TRANSFER_SYNTAX_NOT_SUPPORTED


# ------------------------------------------------------------------ MP4
@pytest.mark.parametrize(
    ("options", "ts"),
    [
        ({"profile": 100, "level": 41}, ji.H264_HP_41),
        ({"profile": 77, "level": 30}, ji.H264_HP_41),
        ({"profile": 100, "level": 42}, ji.H264_HP_42_2D),
        ({"profile": 128, "level": 42}, ji.H264_STEREO_HP_42),
        ({"codec": b"hvc1", "profile": 1, "level": 120}, ji.HEVC_MAIN_51),
        ({"codec": b"hev1", "profile": 2, "level": 153}, ji.HEVC_MAIN10_51),
    ],
)
def test_mp4_codec_profile_level(options: dict, ts: str) -> None:
    info = ji.stream_info(part(make_mp4(width=1280, height=720, frames=30, **options), "video/mp4"))
    assert info.transfer_syntax == ts
    assert (info.rows, info.columns, info.samples, info.frames) == (720, 1280, 3, 30)
    assert info.frame_time_ms == pytest.approx(1000 / 30)


@pytest.mark.parametrize(
    "data",
    [
        make_mp4(profile=100, level=51),
        make_mp4(profile=110, level=41),
        make_mp4(codec=b"hvc1", profile=1, level=156),
        make_mp4(codec=b"mp4v"),
    ],
)
def test_mp4_without_a_dicom_transfer_syntax(data: bytes) -> None:
    with pytest.raises(ji.InstanceError) as raised:
        ji.stream_info(part(data, "video/mp4"))
    assert raised.value.reason == ji.TRANSFER_SYNTAX_NOT_SUPPORTED


def test_mp4_without_movie_box() -> None:
    with pytest.raises(ji.InstanceError) as raised:
        ji.stream_info(part(b"\x00\x00\x00\x10ftypisom\x00\x00\x00\x00", "video/mp4"))
    assert raised.value.reason == ji.CANNOT_UNDERSTAND


# ------------------------------------------------------------------ encoding
def build(metadata: dict, parts: dict[str, ji.BulkPart]) -> tuple[ji.BuiltInstance, Dataset, bytes]:
    out = io.BytesIO()
    built = ji.build_part10(metadata, parts, out)
    data = out.getvalue()
    return built, pydicom.dcmread(io.BytesIO(data)), data


def rich_dataset() -> Dataset:
    """ISO 2022 Japanese names, a sequence with a nested bulk value, private elements."""
    ds = pydicom.dcmread(shipped("chrH31.dcm"))
    del ds.file_meta
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "1", "99X", "山田"
    item.add_new(0x00091010, "OB", bytes(range(256)) * 8)  # nested bulk (2 KiB)
    ds.add_new(0x00090010, "LO", "OPENPACS")
    ds.ReferencedImageSequence = [item]
    ds.add_new(0x00091001, "LT", "x" * 3000)  # top-level text bulk value
    ds.EncapsulatedDocument = b"%PDF-1.4 odd length"  # top-level OB bulk, odd
    return ds


def test_round_trip_of_a_rich_dataset() -> None:
    ds = rich_dataset()
    parts: dict[str, ji.BulkPart] = {}

    def bulk(element: pydicom.DataElement) -> str:
        uri = f"urn:test:{element.tag:08X}:{len(parts)}"
        value = element.value
        raw = value if isinstance(value, bytes) else value.encode("ascii")
        parts[uri] = part(raw)
        return uri

    metadata = ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=bulk)
    # pydicom keeps text values inline: make the long LT a bulk value as a server's would be.
    parts["urn:test:lt"] = part(b"x" * 3000)
    metadata["00091001"] = {"vr": "LT", "BulkDataURI": "urn:test:lt"}
    assert len(parts) == 3
    built, stored, data = build(metadata, parts)
    assert built.transfer_syntax == "1.2.840.10008.1.2.1"
    assert stored.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert stored.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert data[128:132] == b"DICM"
    assert stored.PatientName == ds.PatientName
    assert stored.ReferencedImageSequence[0].CodeMeaning == "山田"
    assert stored.ReferencedImageSequence[0][0x00091010].value == bytes(range(256)) * 8
    assert stored[0x00091001].value == "x" * 3000
    assert stored.EncapsulatedDocument == b"%PDF-1.4 odd length\x00"  # padded to even
    for element in ds:
        assert stored[element.tag].value == element.value or element.tag == 0x00420011, element


def test_encapsulated_jpeg_and_completed_pixel_description() -> None:
    jpeg = pillow_jpeg("RGB")
    ds = make_image(sop_class="1.2.840.10008.5.1.4.1.1.7")
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit"):
        delattr(ds, keyword)
    del ds.SamplesPerPixel, ds.PhotometricInterpretation
    metadata = ds.to_json_dict(bulk_data_threshold=1, bulk_data_element_handler=lambda _e: "u")
    built, stored, _data = build(metadata, {"u": part(jpeg, "image/jpeg")})
    assert built.transfer_syntax == ji.JPEG_BASELINE
    assert (stored.Rows, stored.Columns, stored.SamplesPerPixel) == (48, 80, 3)
    assert stored.PhotometricInterpretation == "YBR_FULL_422"
    assert (stored.BitsAllocated, stored.BitsStored, stored.HighBit) == (8, 8, 7)
    assert stored.PlanarConfiguration == 0
    (frame,) = generate_frames(stored.PixelData, number_of_frames=1)
    assert frame[: len(jpeg)] == jpeg and len(frame) % 2 == 0


def test_video_is_split_into_fragments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ji, "MAX_FRAGMENT", 100)
    mp4 = make_mp4()
    ds = make_image(sop_class="1.2.840.10008.5.1.4.1.1.77.1.4.1")
    del ds.Rows, ds.Columns, ds.BitsStored, ds.SamplesPerPixel, ds.PhotometricInterpretation
    metadata = ds.to_json_dict(bulk_data_threshold=1, bulk_data_element_handler=lambda _e: "v")
    built, stored, _data = build(metadata, {"v": part(mp4, "video/mp4")})
    assert built.transfer_syntax == ji.H264_HP_41
    bot, *fragments = generate_fragments(stored.PixelData)
    assert bot == b""  # an empty Basic Offset Table
    assert len(fragments) == (len(mp4) + 99) // 100
    assert b"".join(fragments)[: len(mp4)] == mp4
    assert int(stored.NumberOfFrames) == 25 and stored.FrameIncrementPointer == 0x00181063


def _metadata_with_pixels(**changes: object) -> dict:
    ds = make_image(sop_class="1.2.840.10008.5.1.4.1.1.7", sop_uid=generate_uid())
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds.to_json_dict(bulk_data_threshold=1, bulk_data_element_handler=lambda _e: "p")


UIDS = {
    "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.7"]},
    "00080018": {"vr": "UI", "Value": ["1.2.3.4"]},
}


@pytest.mark.parametrize(
    ("metadata", "parts", "reason"),
    [
        (_metadata_with_pixels(), {}, ji.CANNOT_UNDERSTAND),  # BulkDataURI names no part
        (
            _metadata_with_pixels(Rows=99),
            {"p": part(pillow_jpeg(), "image/jpeg")},
            ji.DATASET_MISMATCH,
        ),
        (
            _metadata_with_pixels(NumberOfFrames=2),
            {"p": part(pillow_jpeg(), "image/jpeg")},
            ji.DATASET_MISMATCH,
        ),
        (
            {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "A"}]}},
            {},
            ji.REQUIRED_ELEMENT_MISSING,
        ),
        ({"not a tag": {"vr": "PN"}}, {}, ji.CANNOT_UNDERSTAND),
        ({**UIDS, "00100010": {"vr": "XX", "Value": ["a"]}}, {}, ji.CANNOT_UNDERSTAND),
        (
            {**UIDS, "00091001": {"vr": "ZZ", "BulkDataURI": "p"}},
            {"p": part(b"ab")},
            ji.CANNOT_UNDERSTAND,
        ),
    ],
)
def test_refused_metadata(metadata: dict, parts: dict, reason: int) -> None:
    with pytest.raises(ji.InstanceError) as raised:
        build(metadata, parts)
    assert raised.value.reason == reason, raised.value.message


def test_native_pixel_data_with_ambiguous_vr() -> None:
    metadata = _metadata_with_pixels()
    metadata["7FE00010"]["vr"] = "OB or OW"
    pixels = bytes(range(256)) * 2
    _built, stored, _data = build(metadata, {"p": part(pixels)})
    assert stored["PixelData"].VR == "OW" and stored.PixelData == pixels
