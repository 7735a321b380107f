"""openpacs.dicom.header against pydicom as the oracle, on real data.

pydicom's own test files (every Part 10 file pydicom can read) are scanned and
each INDEX_TAGS element pydicom sees at the top level is compared; truncated
and randomly mutated files must give DatasetFormatError and nothing else;
hand-built edge cases (nested undefined lengths, UN sequences, odd lengths,
private tags, big endian, deep nesting) are written with pydicom and checked
against what pydicom reads back.
"""

from __future__ import annotations

import io
import mmap
import random
import struct
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from functools import cache, partial
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.data import get_charset_files, get_testdata_file, get_testdata_files
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator, read_dataset
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from openpacs.dicom import header as H
from openpacs.dicom.header import (
    INDEX_TAGS,
    DatasetFormatError,
    FileMeta,
    ScannedHeader,
    scan_dataset,
    scan_part10,
)

DATA_ROOT = Path(pydicom.__file__).parent / "data"
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # in the header's order of preference
NON_TEXT_STRING_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"}
TEXT_VRS = {"SH", "LO", "ST", "LT", "UC", "UT", "PN"}
INT_VRS = {"IS", "US", "SS", "UL", "SL"}
# pydicom reads whatever is there of these; a scanner that validates must not.
KNOWN_TRUNCATED = {"test_files/MR_truncated.dcm", "test_files/rtplan_truncated.dcm"}
# Scanned by the truncation and mutation tests (varied encodings and structures).
STRUCTURE_FILES = (
    "CT_small.dcm",  # explicit LE, defined-length SQ, many private tags
    "MR_small_implicit.dcm",  # implicit LE
    "MR_small_bigendian.dcm",  # explicit BE
    "JPEG2000.dcm",  # encapsulated pixel data
    "rtplan.dcm",  # implicit LE, nested sequences
    "UN_sequence.dcm",  # UN with undefined length
    "DICOMDIR",  # many undefined-length sequences and items
    "SC_rgb_rle.dcm",  # RLE fragments
)


def _name(path: Path) -> str:
    return path.relative_to(DATA_ROOT).as_posix()


def _quiet_dcmread(src: Any, **kwargs: Any) -> pydicom.FileDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(src, **kwargs)


def _collect_corpus() -> tuple[list[Path], dict[str, str]]:
    """Every Part 10 file in pydicom's test data that pydicom can read."""
    corpus: list[Path] = []
    excluded: dict[str, str] = {}
    for entry in sorted({*get_testdata_files(), *get_charset_files()}):
        path = Path(entry)
        if not path.is_file():
            continue
        try:
            ds = _quiet_dcmread(path)
        except Exception as exc:  # the oracle cannot read it: nothing to compare with
            excluded[_name(path)] = f"pydicom cannot read it ({type(exc).__name__})"
            continue
        if "TransferSyntaxUID" not in ds.file_meta:
            excluded[_name(path)] = "not Part 10: no Transfer Syntax UID in the file meta"
            continue
        corpus.append(path)
    return corpus, excluded


CORPUS, EXCLUDED = _collect_corpus()


@cache
def _file_bytes(path: Path) -> bytes:
    return path.read_bytes()


def _testfile(name: str) -> Path:
    found = next(iter(get_charset_files(name)), None) or get_testdata_file(name, download=False)
    assert found is not None, name
    return Path(found)


def _codec_of(hdr: ScannedHeader) -> Any:
    if hdr.implicit_vr:
        return H._IMPLICIT_LE
    return H._EXPLICIT_BE if hdr.big_endian else H._EXPLICIT_LE


def _dataset_start(meta: FileMeta, hdr: ScannedHeader) -> int:
    return 0 if meta.transfer_syntax == DeflatedExplicitVRLittleEndian else meta.dataset_offset


def _values_of(elem: DataElement) -> list[Any]:
    value = elem.value
    if value is None or value == "" or value == b"":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def _expected_parts(elem: DataElement) -> list[str]:
    """pydicom's decoded values, normalised as documented for ScannedHeader.text()."""
    out = []
    for value in _values_of(elem):
        if elem.VR in NON_TEXT_STRING_VRS:
            out.append(str(value).strip(" \0"))
        elif elem.VR in TEXT_VRS:
            out.append(str(value).rstrip(" \0"))
        else:
            out.append(str(value))
    return out


def _expected_int(elem: DataElement) -> int | None:
    values = _values_of(elem)
    try:
        return int(values[0]) if values else None
    except ValueError:  # e.g. IS "1A" in badVR.dcm: unparseable
        return None


def _exercise(hdr: ScannedHeader) -> None:
    """Every accessor on everything recorded: must not raise, whatever the data."""
    hdr.charset()
    for tag in hdr.recorded_tags():
        assert hdr.has(tag)
        assert hdr.vr(tag)
        hdr.text(tag)
        hdr.values(tag)
        hdr.int_value(tag)
        raw = hdr.raw_value(tag)
        element = hdr.raw_element(tag)
        assert raw is not None and element is not None
        assert len(element) >= len(raw) + 8
    if hdr.pixel_data is not None:
        off, length = hdr.pixel_data
        assert 0 <= off < hdr.dataset_end
        assert length is None or length >= 0


# ---------------------------------------------------------------------------
# pydicom's test files
# ---------------------------------------------------------------------------


def test_corpus_is_broad() -> None:
    names = {_name(p) for p in CORPUS}
    for required in (
        "test_files/CT_small.dcm",
        "test_files/MR_small_bigendian.dcm",
        "test_files/image_dfl.dcm",
        "test_files/MR_small_implicit.dcm",
        "test_files/JPEG2000.dcm",
        "test_files/JPEG-lossy.dcm",
        "test_files/MR_small_jpeg_ls_lossless.dcm",
        "test_files/MR_small_RLE.dcm",
        "test_files/SC_rgb_small_odd_big_endian.dcm",
        "test_files/SC_rgb_jpeg_dcmtk.dcm",
        "test_files/SC_rgb_rle_16bit.dcm",
        "test_files/SC_rgb_jls_lossy_line.dcm",
        "test_files/JPEGLSNearLossless_08.dcm",
        "test_files/JPEG2000-embedded-sequence-delimiter.dcm",
        "test_files/UN_sequence.dcm",
        "test_files/dicomdirtests/DICOMDIR-bigEnd",
        "charset_files/chrH31.dcm",
        "charset_files/chrJapMulti.dcm",
        "charset_files/chrRuss.dcm",
        "charset_files/chrArab.dcm",
        "charset_files/chrX1.dcm",
        "charset_files/chrX2.dcm",
        "charset_files/chrSQEncoding.dcm",
        "charset_files/chrFrenMulti.dcm",
        "charset_files/chrI2.dcm",
    ):
        assert required in names, required
    assert len(CORPUS) > 150
    # What is left out is left out because the oracle cannot read it as Part 10.
    assert "test_files/meta_missing_tsyntax.dcm" in EXCLUDED
    assert "test_files/no_meta.dcm" in EXCLUDED


@pytest.mark.parametrize("path", CORPUS, ids=_name)
def test_matches_pydicom(path: Path) -> None:
    buf = _file_bytes(path)
    if _name(path) in KNOWN_TRUNCATED:
        with pytest.raises(DatasetFormatError, match="runs past the end"):
            scan_part10(buf)
        return
    ds = _quiet_dcmread(path)
    raw_ds = _quiet_dcmread(path)  # elements left unconverted: raw bytes as stored
    meta, hdr = scan_part10(buf)

    assert meta.transfer_syntax == ds.file_meta.TransferSyntaxUID
    assert meta.sop_class_uid == (ds.file_meta.get("MediaStorageSOPClassUID") or None)
    assert meta.sop_instance_uid == (ds.file_meta.get("MediaStorageSOPInstanceUID") or None)
    assert hdr.transfer_syntax == meta.transfer_syntax
    assert hdr.dataset_end == len(hdr.buffer)
    if meta.transfer_syntax == DeflatedExplicitVRLittleEndian:
        assert hdr.buffer is not buf  # offsets refer to the inflated data set
    else:
        assert hdr.buffer is buf
    assert hdr.big_endian == (meta.transfer_syntax == ExplicitVRBigEndian)

    # The data set starts where the meta says: the first tag there is one pydicom read.
    start = _dataset_start(meta, hdr)
    if start < len(hdr.buffer):
        group, elem = struct.unpack_from(">HH" if hdr.big_endian else "<HH", hdr.buffer, start)
        assert (group << 16 | elem) in ds

    for tag in INDEX_TAGS:
        assert hdr.has(tag) == (tag in ds), f"{tag:08X}"

    for elem in ds:
        tag = int(elem.tag)
        if tag not in INDEX_TAGS:
            continue
        assert hdr.vr(tag) == elem.VR, f"{elem.tag}"
        if elem.VR == "SQ":
            _check_sequence(hdr, tag, elem)
            continue
        raw_elem = raw_ds.get_item(tag)
        if isinstance(raw_elem, RawDataElement):  # (0008,0005) is converted on read
            assert hdr.raw_value(tag) == raw_elem.value, f"{elem.tag}"
        elif tag != 0x00080005:  # pydicom keeps only empty values unconverted
            assert raw_elem is not None and raw_elem.value in (None, "")
            assert hdr.raw_value(tag) == b"", f"{elem.tag}"
        parts = _expected_parts(elem)
        assert hdr.text(tag) == "\\".join(parts), f"{elem.tag}"
        assert hdr.values(tag) == ([] if parts in ([], [""]) else parts), f"{elem.tag}"
        if elem.VR in INT_VRS:
            assert hdr.int_value(tag) == _expected_int(elem), f"{elem.tag}"

    _check_pixel_data(hdr, ds)


def _check_sequence(hdr: ScannedHeader, tag: int, elem: DataElement) -> None:
    """raw_element re-parses with pydicom into the same sequence structure."""
    element = hdr.raw_element(tag)
    assert element is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parsed = read_dataset(io.BytesIO(element), hdr.implicit_vr, not hdr.big_endian)
    assert [int(e.tag) for e in parsed] == [tag]
    assert [sorted(item.keys()) for item in parsed[tag].value] == [
        sorted(item.keys()) for item in elem.value
    ]
    if elem.is_undefined_length:
        delimiter = b"\xff\xfe\xe0\xdd" if hdr.big_endian else b"\xfe\xff\xdd\xe0"
        assert element.endswith(delimiter + b"\0\0\0\0")


def _check_pixel_data(hdr: ScannedHeader, ds: Dataset) -> None:
    present = [t for t in PIXEL_TAGS if t in ds]
    if not present:
        assert hdr.pixel_data is None
        return
    assert hdr.pixel_data is not None
    off, length = hdr.pixel_data
    bo = ">" if hdr.big_endian else "<"
    group, elem = struct.unpack_from(bo + "HH", hdr.buffer, off)
    assert (group << 16 | elem) == present[0]
    pixel = ds[present[0]]
    header_len = 8 if hdr.implicit_vr else 12
    if pixel.is_undefined_length:
        assert length is None
        assert struct.unpack_from(bo + "HH", hdr.buffer, off + header_len) == (0xFFFE, 0xE000)
    else:
        assert length == len(pixel.value)
        assert hdr.buffer[off + header_len : off + header_len + length] == pixel.value


@pytest.mark.parametrize("path", CORPUS, ids=_name)
def test_fast_and_checked_walks_agree(path: Path) -> None:
    """The hot loop and the fully checked walker record exactly the same."""
    if _name(path) in KNOWN_TRUNCATED:
        return
    meta, hdr = scan_part10(_file_bytes(path))
    _assert_walks_agree(hdr.buffer, _dataset_start(meta, hdr), _codec_of(hdr))


def test_known_truncated_files_are_rejected() -> None:
    with pytest.raises(DatasetFormatError) as info:
        scan_part10(_file_bytes(_testfile("MR_truncated.dcm")))
    assert "(7FE0,0010)" in str(info.value)
    assert info.value.offset is not None and "byte offset" in str(info.value)


def test_missing_or_unusable_meta_is_rejected() -> None:
    with pytest.raises(DatasetFormatError, match="Transfer Syntax UID"):
        scan_part10(_file_bytes(_testfile("meta_missing_tsyntax.dcm")))
    with pytest.raises(DatasetFormatError, match="no file meta"):
        scan_part10(_file_bytes(_testfile("no_meta.dcm")))
    with pytest.raises(DatasetFormatError, match="no file meta"):
        scan_part10(b"")
    with pytest.raises(DatasetFormatError, match="no file meta"):
        scan_part10(b"\0" * 128 + b"DICM")


def test_explicit_ts_with_implicit_data_set_is_read_like_pydicom() -> None:
    # A real writer bug: the TS says explicit VR, the data set is implicit VR.
    path = _testfile("SC_rgb_jpeg.dcm")
    meta, hdr = scan_part10(_file_bytes(path))
    assert meta.transfer_syntax != ImplicitVRLittleEndian
    assert hdr.implicit_vr
    ds = _quiet_dcmread(path)
    assert hdr.text(0x00080008) == "\\".join(ds.ImageType)
    assert hdr.int_value(0x00280010) == ds.Rows


def test_charset_files_decode_to_known_names() -> None:
    expected = {
        "chrArab.dcm": "قباني^لنزار",
        "chrFrenMulti.dcm": "Buc^Jérôme",
        "chrGerm.dcm": "Äneas^Rüdiger",
        "chrGreek.dcm": "Διονυσιος",
        "chrH31.dcm": "Yamada^Tarou=山田^太郎=やまだ^たろう",
        "chrH32.dcm": "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう",
        "chrHbrw.dcm": "שרון^דבורה",
        "chrI2.dcm": "Hong^Gildong=洪^吉洞=홍^길동",
        "chrJapMulti.dcm": "やまだ^たろう",
        "chrKoreanMulti.dcm": "김희중",
        "chrRuss.dcm": "Люкceмбypг",
        "chrX1.dcm": "Wang^XiaoDong=王^小東",
        "chrX2.dcm": "Wang^XiaoDong=王^小东",
    }
    for name, patient_name in expected.items():
        path = next(Path(p) for p in get_charset_files(name))
        _, hdr = scan_part10(_file_bytes(path))
        assert hdr.text(0x00100010) == patient_name, name
    _, hdr = scan_part10(_file_bytes(next(Path(p) for p in get_charset_files("chrH31.dcm"))))
    assert hdr.charset() == ["", "ISO 2022 IR 87"]
    _, hdr = scan_part10(_file_bytes(_testfile("MR_small.dcm")))
    assert hdr.charset() == ["ISO_IR 6"]  # absent: default repertoire


# ---------------------------------------------------------------------------
# Truncation
# ---------------------------------------------------------------------------


def _top_level_ends(buf: bytes, start: int, implicit: bool, little: bool) -> set[int]:
    """Offsets where top-level elements end, according to pydicom's reader."""
    fp = io.BytesIO(buf)
    fp.seek(start)
    ends = {start}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in data_element_generator(fp, implicit, little):
            ends.add(fp.tell())
    return ends


def _timed(fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    try:
        return fn()
    finally:
        assert time.perf_counter() - t0 < 2.0, "scan took too long"


@pytest.mark.parametrize("name", STRUCTURE_FILES)
def test_truncation_always_detected(name: str) -> None:
    buf = _file_bytes(_testfile(name))
    meta, full = scan_part10(buf)
    start = meta.dataset_offset
    ends = _top_level_ends(buf, start, full.implicit_vr, not full.big_endian)
    assert max(ends) == len(buf)

    cuts = set(range(start, min(start + 600, len(buf))))
    cuts.update(range(start, len(buf), 61))
    for end in ends:
        cuts.update(end + d for d in range(-13, 14))
    cuts = {c for c in cuts if start <= c <= len(buf)}
    full_tags = set(full.recorded_tags())
    clean = 0
    for cut in sorted(cuts):
        piece = buf[:cut]
        if cut in ends:
            _, hdr = _timed(partial(scan_part10, piece))
            assert hdr.dataset_end == cut
            assert set(hdr.recorded_tags()) <= full_tags
            clean += 1
        else:
            with pytest.raises(DatasetFormatError):
                _timed(partial(scan_part10, piece))
    assert clean == len(ends)


def test_truncated_meta_is_detected() -> None:
    buf = _file_bytes(_testfile("CT_small.dcm"))
    meta = scan_part10(buf)[0]
    fp = io.BytesIO(buf)
    fp.seek(132)
    meta_ends = set()
    ts_end = None
    for elem in data_element_generator(fp, False, True, stop_when=lambda t, *_: t.group != 2):
        meta_ends.add(fp.tell())
        if elem.tag == 0x00020010:
            ts_end = fp.tell()
    assert ts_end is not None and max(meta_ends) == meta.dataset_offset
    for cut in range(meta.dataset_offset):
        piece = buf[:cut]
        if cut in meta_ends and cut >= ts_end:
            cut_meta, hdr = scan_part10(piece)  # meta ends early: valid, empty data set
            assert cut_meta.dataset_offset == cut and hdr.recorded_tags() == []
        else:
            with pytest.raises(DatasetFormatError):
                scan_part10(piece)


def test_truncated_deflated_data_set_is_detected() -> None:
    buf = _file_bytes(_testfile("image_dfl.dcm"))
    meta, full = scan_part10(buf)
    assert full.dataset_end == len(full.buffer) > len(buf)  # inflated
    decomp = zlib.decompressobj(-15)
    decomp.decompress(buf[meta.dataset_offset :])
    stream_end = len(buf) - len(decomp.unused_data)  # 8 trailing bytes, ignored like pydicom
    assert decomp.eof and stream_end > len(buf) - 16
    for cut in range(meta.dataset_offset, len(buf) + 1, 3):
        if cut >= stream_end:
            assert scan_part10(buf[:cut])[1].dataset_end == full.dataset_end
        else:
            with pytest.raises(DatasetFormatError, match="deflate"):
                scan_part10(buf[:cut])
    # The inflated data set truncated is caught like any other.
    inflated = bytes(full.buffer)
    with pytest.raises(DatasetFormatError, match="runs past the end"):
        scan_dataset(inflated[:-1], ExplicitVRLittleEndian, INDEX_TAGS)


# ---------------------------------------------------------------------------
# Random mutations
# ---------------------------------------------------------------------------

MUTATION_FILES = (*STRUCTURE_FILES, "image_dfl.dcm", "chrSQEncoding.dcm")
ITEM_TAG_BYTES = (b"\xfe\xff\x00\xe0", b"\xfe\xff\x0d\xe0", b"\xfe\xff\xdd\xe0")


def _mutations(buf: bytes, ends: list[int], rng: random.Random, count: int) -> Iterator[bytes]:
    n = len(buf)
    for _ in range(count):
        data = bytearray(buf)
        kind = rng.randrange(5)
        if kind == 0:  # random bytes anywhere after the preamble
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(128, n)] = rng.randrange(256)
        elif kind == 1:  # an element header's VR / length field
            at = rng.choice(ends) + rng.choice((4, 5, 6, 7, 8, 10))
            for i in range(rng.choice((1, 2, 4))):
                if at + i < n:
                    data[at + i] = rng.choice((0x00, 0xFF, rng.randrange(256)))
        elif kind == 2:  # undefined length where there was none
            at = rng.choice(ends) + rng.choice((4, 6, 8))
            data[at : at + 4] = b"\xff\xff\xff\xff"
        elif kind == 3:  # an item / delimiter tag somewhere
            at = rng.choice((rng.choice(ends), rng.randrange(128, n)))
            data[at : at + 4] = rng.choice(ITEM_TAG_BYTES)
        else:  # mutate then cut
            data[rng.randrange(128, n)] = rng.randrange(256)
            del data[rng.randrange(128, n) :]
        yield bytes(data)


def _assert_walks_agree(buf: Any, start: int, codec: Any) -> None:
    """Differential check: the hot loop and the checked walker agree, on
    success (same records) and on failure."""
    native = H._native_wanted(INDEX_TAGS, codec)
    fast_walk = H._fast_explicit if codec.explicit else H._fast_implicit
    try:
        fast = fast_walk(buf, start, len(buf), codec, native)
    except DatasetFormatError:
        fast = None  # nested structure error, raised directly by the hot loop
    checked: dict[int, Any] | None = {}
    try:
        H._walk_elements(buf, start, len(buf), codec, 0, checked, native)
    except DatasetFormatError:
        checked = None
    if fast is not None and any(k in fast for k in codec.item_key_tuple):
        fast = None  # the caller rejects top-level item tags after the hot loop
    assert fast == checked


@pytest.mark.parametrize("name", MUTATION_FILES)
def test_random_mutations_raise_only_dataset_format_error(name: str) -> None:
    buf = _file_bytes(_testfile(name))
    meta, full = scan_part10(buf)
    if full.buffer is buf:
        ends = sorted(_top_level_ends(buf, meta.dataset_offset, full.implicit_vr, True))
    else:
        ends = [meta.dataset_offset]
    ends = [e for e in ends if e < len(buf) - 12] or [meta.dataset_offset]
    rng = random.Random(f"openpacs-header-{name}")
    results = {"ok": 0, "error": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about undecodable garbage
        for mutated in _mutations(buf, ends, rng, 400):
            try:
                mut_meta, hdr = _timed(partial(scan_part10, mutated))
            except DatasetFormatError as exc:
                assert "offset" in str(exc)
                results["error"] += 1
                continue
            results["ok"] += 1
            _exercise(hdr)
            _assert_walks_agree(hdr.buffer, _dataset_start(mut_meta, hdr), _codec_of(hdr))
    assert results["error"] > 0


def test_mutated_charset_and_undecodable_text_never_raise() -> None:
    ds = _dataset(PatientName="Müller^Jürgen", StudyDescription="résumé")
    ds.SpecificCharacterSet = "ISO_IR 100"
    buf = bytearray(_part10(ds, ExplicitVRLittleEndian))
    at = buf.index(b"ISO_IR 100")
    buf[at : at + 10] = b"ISO_IR 999"
    old = pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.RAISE
    try:
        _, hdr = scan_part10(bytes(buf))
        assert hdr.charset() == ["ISO_IR 999"]
        assert hdr.text(0x00100010) == "Müller^Jürgen"  # unknown charset: default (latin-1)
        ds2 = _dataset(PatientName="Z", StudyDescription="x")
        ds2.SpecificCharacterSet = "ISO_IR 192"
        buf2 = bytearray(_part10(ds2, ExplicitVRLittleEndian))
        at = buf2.index(b"Z ")
        buf2[at : at + 2] = b"\xff\xfe"  # not UTF-8
        _, hdr2 = scan_part10(bytes(buf2))
        assert hdr2.text(0x00100010) == "\ufffd\ufffd"
        _exercise(hdr2)
    finally:
        pydicom_config.settings.reading_validation_mode = old


# ---------------------------------------------------------------------------
# Hand-built data sets
# ---------------------------------------------------------------------------


def _dataset(**attrs: Any) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def _part10(ds: Dataset, ts: str) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(ts)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    fp = io.BytesIO()
    ds.save_as(fp, enforce_file_format=True)
    return fp.getvalue()


def _meta_bytes(ts: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    meta.MediaStorageSOPInstanceUID = UID("1.2.3.4")
    meta.TransferSyntaxUID = UID(ts)
    fp = DicomBytesIO()
    write_file_meta_info(fp, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + fp.getvalue()


def _element(
    tag: int, vr: bytes, value: bytes, *, big: bool = False, length: int | None = None
) -> bytes:
    """One explicit VR element, exactly as given (no padding)."""
    bo = ">" if big else "<"
    n = len(value) if length is None else length
    head = struct.pack(bo + "HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in H._LONG_VRS:
        return head + b"\0\0" + struct.pack(bo + "I", n) + value
    return head + struct.pack(bo + "H", n) + value


def _implicit_bytes(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    write_dataset(fp, ds)
    return fp.getvalue()


def _nested_sr(depth: int) -> Sequence:
    """ContentSequence nested ``depth`` deep, all undefined lengths but one item."""
    inner: Sequence | None = None
    for level in range(depth, 0, -1):
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "TEXT"
        item.TextValue = f"level {level}"
        if inner is not None:
            item.ContentSequence = inner
            item["ContentSequence"].is_undefined_length = True
        item.is_undefined_length_sequence_item = level != 2  # one defined-length item
        inner = Sequence([item, Dataset()]) if level == 1 else Sequence([item])
    assert inner is not None
    return inner


@pytest.mark.parametrize(
    "ts",
    [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    ],
)
def test_undefined_length_sequences_nested_three_deep(ts: str) -> None:
    ds = _dataset(
        PatientName="Nested^Three",
        StudyInstanceUID="1.2.3.4.5",
        CompletionFlag="COMPLETE",
        VerificationFlag="UNVERIFIED",
        ContentLabel="AFTER",
    )
    ds.ConceptNameCodeSequence = _nested_sr(3)
    ds["ConceptNameCodeSequence"].is_undefined_length = True
    ds.PixelData = b"\x01\x02" * 8
    ds.Rows, ds.Columns, ds.BitsAllocated = 4, 2, 16
    buf = _part10(ds, ts)
    _, hdr = scan_part10(buf)
    if ts != DeflatedExplicitVRLittleEndian:
        # make sure the test exercises what it claims: 3 undefined-length
        # sequences and 2 undefined-length items
        assert buf.count(b"\xff\xff\xff\xff") >= 5

    # elements after the sequence were found: the skip landed right
    assert hdr.text(0x0040A491) == "COMPLETE"
    assert hdr.text(0x0040A493) == "UNVERIFIED"
    assert hdr.text(0x00700080) == "AFTER"
    assert hdr.text(0x00100010) == "Nested^Three"
    assert hdr.int_value(0x00280010) == 4
    assert hdr.vr(0x0040A043) == "SQ"
    assert hdr.text(0x0040A043) is None
    assert hdr.pixel_data is not None and hdr.pixel_data[1] == 16
    off = hdr.pixel_data[0]
    header_len = 8 if hdr.implicit_vr else 12
    assert hdr.buffer[off + header_len : off + header_len + 16] == ds.PixelData

    element = hdr.raw_element(0x0040A043)
    value = hdr.raw_value(0x0040A043)
    assert element is not None and value is not None
    assert element.endswith(
        value + (b"\xff\xfe\xe0\xdd" if hdr.big_endian else b"\xfe\xff\xdd\xe0") + b"\0" * 4
    )
    parsed = read_dataset(io.BytesIO(element), hdr.implicit_vr, not hdr.big_endian)
    level = parsed.ConceptNameCodeSequence
    for depth in (1, 2, 3):
        assert level[0].TextValue == f"level {depth}"
        level = level[0].get("ContentSequence")
    assert level is None


def test_un_with_undefined_length_holds_implicit_le_items() -> None:
    item = Dataset()
    item.SeriesInstanceUID = "1.2.3.4.5.6"
    item.add_new(0x00081150, "UI", "1.2.840.10008.5.1.4.1.1.2")
    item.is_undefined_length_sequence_item = True
    nested = _implicit_bytes(item)
    items = (
        b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + nested + b"\xfe\xff\x0d\xe0\0\0\0\0"
        + b"\xfe\xff\x00\xe0" + struct.pack("<I", len(nested)) + nested
    )  # fmt: skip
    for big in (False, True):
        dataset = b"".join(
            (
                _element(0x00080005, b"CS", b"ISO_IR 100", big=big),
                _element(0x00080018, b"UI", b"1.2.3.4\0", big=big),
                _element(
                    0x00081115,
                    b"UN",
                    items + b"\xfe\xff\xdd\xe0\0\0\0\0",
                    big=big,
                    length=0xFFFFFFFF,
                ),
                _element(0x0020000E, b"UI", b"9.8.7.6\0", big=big),
            )
        )
        ts = ExplicitVRBigEndian if big else ExplicitVRLittleEndian
        hdr = scan_dataset(dataset, ts, INDEX_TAGS)
        assert hdr.text(0x0020000E) == "9.8.7.6"
        assert hdr.dataset_end == len(dataset)
        assert hdr.vr(0x00081115) == "SQ"  # UN of a known tag: dictionary VR
        # the sequence must be delimited: no delimiter, no data set
        with pytest.raises(DatasetFormatError, match="without a sequence delimiter"):
            scan_dataset(dataset[: dataset.index(b"\xfe\xff\xdd\xe0")], ts, INDEX_TAGS)
        if big:
            continue  # pydicom 3 reads the items of such a UN in big endian, contrary to 6.2.2
        # pydicom reads it the same way (and so must whoever re-parses raw_element)
        ds = _quiet_dcmread(io.BytesIO(_meta_bytes(ts) + dataset))
        assert hdr.vr(0x00081115) == ds[0x00081115].VR == "SQ"
        assert len(ds.ReferencedSeriesSequence) == 2
        assert ds.ReferencedSeriesSequence[1].SeriesInstanceUID == "1.2.3.4.5.6"
        assert hdr.text(0x0020000E) == ds.SeriesInstanceUID


def test_odd_length_values_are_tolerated() -> None:
    dataset = b"".join(
        (
            _element(0x00080018, b"UI", b"1.2.3"),  # 5 bytes, no NUL padding
            _element(0x00100020, b"LO", b"ODD"),
            _element(0x00200010, b"SH", b"X"),
            _element(0x00280010, b"US", b"\x40\x00"),
            _element(0x7FE00010, b"OB", b"\x01\x02\x03"),
        )
    )
    hdr = scan_dataset(dataset, ExplicitVRLittleEndian, INDEX_TAGS)
    ds = _quiet_dcmread(io.BytesIO(_meta_bytes(ExplicitVRLittleEndian) + dataset))
    assert hdr.text(0x00080018) == ds.SOPInstanceUID == "1.2.3"
    assert hdr.text(0x00100020) == ds.PatientID == "ODD"
    assert hdr.text(0x00200010) == ds.StudyID == "X"
    assert hdr.int_value(0x00280010) == ds.Rows == 64
    assert hdr.pixel_data == (dataset.index(b"\xe0\x7f\x10\x00"), 3)
    assert hdr.dataset_end == len(dataset)


@pytest.mark.parametrize(
    "ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
)
def test_private_tags_are_walked_and_can_be_wanted(ts: str) -> None:
    ds = _dataset(PatientID="PRIV-1", StudyInstanceUID="1.2.3")
    block = ds.private_block(0x0011, "OPENPACS TEST", create=True)
    block.add_new(0x01, "LO", "private value")
    private_item = Dataset()
    private_item.add_new(0x00100020, "LO", "inside")
    block.add_new(0x02, "SQ", Sequence([private_item]))
    ds[block.get_tag(0x02)].is_undefined_length = True
    block.add_new(0x03, "OB", b"\x00\x01\x02")
    buf = _part10(ds, ts)
    wanted = INDEX_TAGS | {0x00110010, 0x00111001, 0x00111002}
    _, hdr = scan_part10(buf, wanted)
    read = _quiet_dcmread(io.BytesIO(buf))
    raw = _quiet_dcmread(io.BytesIO(buf))
    for tag in (0x00110010, 0x00111001):
        assert hdr.vr(tag) == read[tag].VR
        assert hdr.raw_value(tag) == raw.get_item(tag).value
    assert hdr.text(0x00110010) == "OPENPACS TEST"
    if ts == ImplicitVRLittleEndian:
        assert hdr.vr(0x00111001) == "UN" and hdr.text(0x00111001) is None
    else:
        assert hdr.text(0x00111001) == "private value"
    assert hdr.has(0x00111002) and hdr.text(0x00111002) is None
    assert not hdr.has(0x00111003)  # present, but not wanted
    assert hdr.text(0x0020000D) == "1.2.3"  # after the private block


def test_explicit_big_endian_binary_values() -> None:
    path = _testfile("MR_small_bigendian.dcm")
    _, hdr = scan_part10(_file_bytes(path))
    ds = _quiet_dcmread(path)
    assert hdr.big_endian and not hdr.implicit_vr
    assert hdr.raw_value(0x00280010) == b"\x00\x40"
    assert hdr.int_value(0x00280010) == ds.Rows == 64
    assert hdr.int_value(0x00280100) == ds.BitsAllocated == 16
    assert hdr.text(0x00280011) == "64"
    assert hdr.text(0x0020000D) == ds.StudyInstanceUID
    assert hdr.pixel_data is not None
    assert hdr.buffer[hdr.pixel_data[0] : hdr.pixel_data[0] + 6] == b"\x7f\xe0\x00\x10OW"


def _nested_undefined(depth: int) -> bytes:
    """``depth`` undefined-length ContentSequences nested inside each other."""
    body = b""
    for _ in range(depth):
        body = (
            _element(0x0040A730, b"SQ", b"", length=0xFFFFFFFF)
            + b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + body + b"\xfe\xff\x0d\xe0\0\0\0\0"
            + b"\xfe\xff\xdd\xe0\0\0\0\0"
        )  # fmt: skip
    return body


def test_nesting_depth_is_limited() -> None:
    tail = _element(0x00700080, b"CS", b"END ")
    hdr = scan_dataset(_nested_undefined(H.MAX_DEPTH) + tail, ExplicitVRLittleEndian, INDEX_TAGS)
    assert hdr.text(0x00700080) == "END"
    with pytest.raises(DatasetFormatError, match="nested deeper"):
        scan_dataset(_nested_undefined(H.MAX_DEPTH + 1) + tail, ExplicitVRLittleEndian, INDEX_TAGS)


def test_malformed_structures_are_reported_with_offsets() -> None:
    good = _element(0x00080018, b"UI", b"1.2.3\0")
    at = len(good)

    def fails(data: bytes, match: str, offset: int, ts: str = ExplicitVRLittleEndian) -> None:
        with pytest.raises(DatasetFormatError, match=match) as info:
            scan_dataset(data, ts, INDEX_TAGS)
        assert info.value.offset == offset, str(info.value)

    fails(good + b"\x10\x00\x10\x00ZZ\x02\x00AB", "invalid VR", at)
    fails(good + _element(0x00100010, b"PN", b"AB", length=40), "runs past the end", at)
    fails(good + b"\x10\x00\x10\x00PN", "truncated element header", at)
    fails(good + b"\xfe\xff\x00\xe0\x00\x00\x00\x00", "at the top level", at)
    implicit_good = b"\x08\x00\x18\x00\x06\x00\x00\x001.2.3\0"
    fails(
        implicit_good + b"\xfe\xff\x00\xe0\x00\x00\x00\x00",
        "at the top level",
        14,
        ImplicitVRLittleEndian,
    )
    fails(
        good + _element(0x00104000, b"UT", b"", length=0xFFFFFFFF),
        "undefined length not allowed",
        at,
    )
    seq_head = _element(0x0040A730, b"SQ", b"", length=0xFFFFFFFF)
    fails(good + seq_head + b"\x08\x00\x18\x00UI\x02\x00", "expected an item", at + len(seq_head))
    fails(
        good + seq_head + b"\xfe\xff\x00\xe0\x00\x01\x00\x00", "item length 256 runs past", at + 12
    )
    item_body = b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + _element(0x00100020, b"LO", b"AB")
    fails(
        good + seq_head + item_body,
        "item ends without an item delimiter",
        len(good + seq_head + item_body),
    )
    pixel = (
        _element(0x7FE00010, b"OB", b"", length=0xFFFFFFFF) + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    )
    fails(good + pixel, "fragment with undefined length", at + 12)


def test_valid_oddities_are_accepted() -> None:
    padding = _element(0xFFFCFFFC, b"OB", b"\0" * 10)
    out_of_order = b"".join(
        (
            _element(0x0020000D, b"UI", b"2.2\0"),
            _element(0x00080018, b"UI", b"1.1\0"),  # before (0020,000D) in tag order
            _element(0x00080000, b"UL", b"\x08\x00\x00\x00"),  # group length
            _element(0x00080060, b"CS", b" MR "),
            padding,
        )
    )
    hdr = scan_dataset(out_of_order, ExplicitVRLittleEndian, INDEX_TAGS)
    assert hdr.text(0x0020000D) == "2.2" and hdr.text(0x00080018) == "1.1"
    assert hdr.text(0x00080060) == "MR"
    assert hdr.dataset_end == len(out_of_order) and hdr.pixel_data is None
    empty = scan_dataset(b"", ImplicitVRLittleEndian, INDEX_TAGS)
    assert empty.recorded_tags() == [] and empty.dataset_end == 0
    assert empty.charset() == ["ISO_IR 6"]


def test_text_values_and_int_value_semantics() -> None:
    dataset = b"".join(
        (
            _element(0x00080008, b"CS", b" ORIGINAL\\PRIMARY "),
            _element(0x00080018, b"UI", b"1.2.3\0"),
            _element(0x00081030, b"LO", b"  leading kept  "),
            _element(0x00104000, b"LT", b"a\\b  "),
            _element(0x00200011, b"IS", b""),
            _element(0x00200013, b"IS", b" 12 "),
            _element(0x00280008, b"IS", b"abc "),
            _element(0x00280010, b"US", b"\x40\x00\x20\x00"),
            _element(0x00101030, b"DS", b" 70.5"),
        )
    )
    hdr = scan_dataset(dataset, ExplicitVRLittleEndian, INDEX_TAGS)
    assert hdr.values(0x00080008) == ["ORIGINAL", "PRIMARY"]
    assert hdr.text(0x00080008) == "ORIGINAL\\PRIMARY"
    assert hdr.text(0x00080018) == "1.2.3"
    assert hdr.text(0x00081030) == "  leading kept"
    assert hdr.values(0x00104000) == ["a\\b"]  # LT is single-valued
    assert hdr.text(0x00200011) == "" and hdr.values(0x00200011) == []
    assert hdr.int_value(0x00200011) is None
    assert hdr.int_value(0x00200013) == 12
    assert hdr.int_value(0x00280008) is None  # unparseable
    assert hdr.int_value(0x00280010) == 64 and hdr.text(0x00280010) == "64\\32"
    assert hdr.text(0x00101030) == "70.5"
    assert hdr.text(0x00100010) is None and hdr.values(0x00100010) == []
    assert hdr.int_value(0x00100010) is None and hdr.vr(0x00100010) is None
    assert hdr.raw_value(0x00100010) is None and hdr.raw_element(0x00100010) is None


def test_multibyte_delimiter_bytes_inside_characters() -> None:
    # JIS X 0208 encodes 十 as b"==" and 表 as b"I=" (PN group delimiter bytes);
    # 俑 contains 0x5C (the value delimiter); GB18030 乗 has 0x5C as trail byte.
    jis = _dataset(
        PatientName="Yamada^Juu=山田^十表=やまだ^じゅう", OtherPatientNames=["俑^太郎", "十^表"]
    )
    jis.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    gb = _dataset(PatientName="乗^俓=Cheng", AdmittingDiagnosesDescription=["乗乗", "僜"])
    gb.SpecificCharacterSet = "GB18030"
    for ds in (jis, gb):
        buf = _part10(ds, ExplicitVRLittleEndian)
        _, hdr = scan_part10(buf)
        read = _quiet_dcmread(io.BytesIO(buf))
        for elem in read:
            if elem.VR in ("PN", "LO") and int(elem.tag) in INDEX_TAGS:
                assert hdr.values(int(elem.tag)) == _expected_parts(elem), elem.keyword
    _, hdr = scan_part10(_part10(jis, ExplicitVRLittleEndian))
    assert hdr.text(0x00100010) == "Yamada^Juu=山田^十表=やまだ^じゅう"
    assert hdr.values(0x00101001) == ["俑^太郎", "十^表"]
    _, hdr = scan_part10(_part10(gb, ExplicitVRLittleEndian))
    assert hdr.values(0x00081080) == ["乗乗", "僜"]
    assert hdr.text(0x00100010) == "乗^俓=Cheng"


# ---------------------------------------------------------------------------
# Buffers, entry points, offsets
# ---------------------------------------------------------------------------


def _summary(meta: FileMeta, hdr: ScannedHeader) -> tuple[Any, ...]:
    return (
        meta,
        hdr.dataset_end,
        hdr.pixel_data,
        [(t, hdr.vr(t), hdr.text(t), hdr.raw_element(t)) for t in hdr.recorded_tags()],
    )


def test_buffer_types_give_the_same_result(tmp_path: Path) -> None:
    for name in ("CT_small.dcm", "MR_small_implicit.dcm", "image_dfl.dcm"):
        buf = _file_bytes(_testfile(name))
        expected = _summary(*scan_part10(buf))
        assert _summary(*scan_part10(bytearray(buf))) == expected
        assert _summary(*scan_part10(memoryview(buf))) == expected
        path = tmp_path / name
        path.write_bytes(buf)
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            assert _summary(*scan_part10(mm)) == expected


@pytest.mark.parametrize(
    "name", ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm"]
)
def test_scan_dataset_offsets_are_relative_to_its_buffer(name: str) -> None:
    buf = _file_bytes(_testfile(name))
    meta, from_file = scan_part10(buf)
    dataset = buf[meta.dataset_offset :]
    hdr = scan_dataset(dataset, meta.transfer_syntax, INDEX_TAGS)
    assert hdr.dataset_end == len(dataset)
    assert from_file.pixel_data is not None and hdr.pixel_data is not None
    assert hdr.pixel_data == (
        from_file.pixel_data[0] - meta.dataset_offset,
        from_file.pixel_data[1],
    )
    assert [hdr.text(t) for t in sorted(INDEX_TAGS)] == [
        from_file.text(t) for t in sorted(INDEX_TAGS)
    ]


def test_deflated_offsets_refer_to_inflated_bytes() -> None:
    buf = _file_bytes(_testfile("image_dfl.dcm"))
    meta, hdr = scan_part10(buf)
    inflated = zlib.decompressobj(-15).decompress(buf[meta.dataset_offset :])
    assert hdr.buffer == inflated and hdr.pixel_data is not None
    assert inflated[hdr.pixel_data[0] : hdr.pixel_data[0] + 6] == b"\xe0\x7f\x10\x00OB"
    direct = scan_dataset(buf[meta.dataset_offset :], DeflatedExplicitVRLittleEndian, INDEX_TAGS)
    assert direct.pixel_data == hdr.pixel_data
    with pytest.raises(DatasetFormatError, match="deflate"):
        scan_dataset(b"\xff" * 64, DeflatedExplicitVRLittleEndian, INDEX_TAGS)


def test_inflated_size_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = _file_bytes(_testfile("image_dfl.dcm"))
    _, full = scan_part10(buf)
    monkeypatch.setattr(H, "MAX_INFLATED_SIZE", len(full.buffer) - 1)
    with pytest.raises(DatasetFormatError, match="inflates to more than"):
        scan_part10(buf)
    monkeypatch.setattr(H, "MAX_INFLATED_SIZE", len(full.buffer))
    assert scan_part10(buf)[1].dataset_end == len(full.buffer)


def test_part10_without_preamble_and_custom_wanted() -> None:
    buf = _file_bytes(_testfile("CT_small.dcm"))
    meta, full = scan_part10(buf)
    for variant, shift in ((buf[128:], 128), (buf[132:], 132)):
        m, hdr = scan_part10(variant)
        assert m.dataset_offset == meta.dataset_offset - shift
        assert hdr.text(0x0020000D) == full.text(0x0020000D)
    _, only = scan_part10(buf, frozenset({0x00100020}))
    assert only.has(0x00100020) and not only.has(0x00100010)
    assert only.charset() == full.charset()  # always recorded
    assert only.pixel_data == full.pixel_data  # always recorded
    _, from_set = scan_part10(buf, {0x00100020})
    assert from_set.recorded_tags() == only.recorded_tags()


def test_index_tags_cover_the_index_attributes() -> None:
    assert len(INDEX_TAGS) == len(H.INDEX_KEYWORDS)
    for keyword in ("PatientName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                    "SOPClassUID", "Modality", "SpecificCharacterSet", "InstanceAvailability",
                    "TimezoneOffsetFromUTC", "ContentCreatorName", "SegmentSequence",
                    "RequestAttributesSequence", "OtherPatientIDsSequence"):  # fmt: skip
        assert pydicom.datadict.tag_for_keyword(keyword) in INDEX_TAGS, keyword


# ---------------------------------------------------------------------------
# Performance (printed, not asserted)
# ---------------------------------------------------------------------------


def _us_per_call(fn: Callable[[], Any], number: int) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best * 1e6


def test_performance_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    lines = []
    for name in ("CT_small.dcm", "MR_small.dcm"):
        buf = _file_bytes(_testfile(name))
        meta = scan_part10(buf)[0]
        dataset = buf[meta.dataset_offset :]
        ts = meta.transfer_syntax
        scan_us = _us_per_call(partial(scan_part10, buf), 2000)
        ds_us = _us_per_call(partial(scan_dataset, dataset, ts, INDEX_TAGS), 2000)

        def index_fields(buf: bytes = buf) -> None:
            _, h = scan_part10(buf)
            for tag in (0x00100010, 0x00100020, 0x0020000D, 0x0020000E, 0x00080018,
                        0x00080016, 0x00080060, 0x00080020, 0x00200011, 0x00200013):  # fmt: skip
                h.text(tag)

        fields_us = _us_per_call(index_fields, 1000)

        def with_pydicom(buf: bytes = buf) -> None:
            _quiet_dcmread(io.BytesIO(buf), stop_before_pixels=True).PatientID  # noqa: B018

        pyd_us = _us_per_call(with_pydicom, 200)
        lines.append(
            f"{name}: scan_part10 {scan_us:.1f} us, scan_dataset {ds_us:.1f} us, "
            f"scan+10 text() {fields_us:.1f} us, pydicom dcmread {pyd_us:.0f} us "
            f"({len(_quiet_dcmread(io.BytesIO(buf)))} top-level elements)"
        )
    with capsys.disabled():
        print("\n[header perf] " + "\n[header perf] ".join(lines))
