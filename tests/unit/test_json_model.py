"""openpacs.dicom.json_model against the pydicom path it replaces, on real and made-up data.

The oracle is ``web.dicomweb.wado.dataset_json`` over ``dcmread(stop_before_pixels=True,
defer_size=BULK_DATA_THRESHOLD)`` — what WADO-RS metadata was made of before — on every file
pydicom ships (its test files and its character set files) that both can read, and on
hand-built files (charsets incl. ISO 2022 IR 87, empty values, multi-values with empty
components, odd lengths, private tags in implicit and explicit VR, undefined lengths, nested
sequences with their own charset, binary numbers, malformed IS/DS, the bulk data threshold).

Intentional differences from the pydicom path (each asserted below):
* An empty value of a multi-valued attribute is ``null``, not ``""`` (PS3.18 F.2.5: "If a
  multi-valued attribute has one or more empty values these are represented as "null" array
  elements"). pydicom writes ``""`` for strings and fails on IS, DS and PN.
* IS/DS values that are not valid numbers are kept as strings (as QIDO's ``_number`` does):
  pydicom fails on them (``int('12a')``), writes NaN/Infinity for "NaN"/"1e400" (not JSON,
  RFC 8259 §6), and truncates an IS "1.5" to 1.
* Binary numbers whose length is not a multiple of their size keep the whole values
  (pydicom raises BytesLengthException).
* An instance with pixel data but no Rows/Columns gets its metadata (the pydicom path went
  through ``frames.locate``, which refuses such pixel data, and answered 500).
"""

from __future__ import annotations

import base64
import json
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_charset_files, get_testdata_files

from openpacs.dicom import frames, json_model
from openpacs.dicom.frames import FrameError
from openpacs.web.dicomweb.common import BULK_DATA_THRESHOLD
from openpacs.web.dicomweb.wado import dataset_json

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def uri(here: list[str]) -> str:
    return "bulk/" + "/".join(here)


def reference(path: Path) -> dict[str, Any]:
    ds = dcmread(path, stop_before_pixels=True, defer_size=BULK_DATA_THRESHOLD)
    return dataset_json(ds, uri, [])


def ours(path: Path) -> json_model.Encoded:
    return json_model.encode_file(path, lambda ds, here: uri(here), BULK_DATA_THRESHOLD)


def null_empty_values(obj: Any) -> Any:
    """The pydicom output with PS3.18 F.2.5 applied: empty values of multi-valued strings null."""
    if isinstance(obj, dict):
        out = {k: null_empty_values(v) for k, v in obj.items()}
        value = out.get("Value")
        if out.get("vr") not in (None, "SQ") and isinstance(value, list) and len(value) > 1:
            out["Value"] = [None if v == "" else v for v in value]
        return out
    if isinstance(obj, list):
        return [null_empty_values(v) for v in obj]
    return obj


def canonical(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


# ------------------------------------------------------------------ every file pydicom ships
SHIPPED = sorted(
    {Path(f) for f in [*get_testdata_files(), *get_charset_files()] if Path(f).is_file()}
)
compared: list[str] = []


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_equals_pydicom_path_on_shipped_file(path: Path) -> None:
    try:
        expected = reference(path)
    except Exception as exc:
        pytest.skip(f"pydicom path fails: {type(exc).__name__}: {exc}")
    try:
        encoded = ours(path)
    except json_model.Unsupported as exc:
        pytest.skip(f"declined (the pydicom path is used): {exc}")
    # the keys are sorted at every level, like the pydicom path's, and the text is the same
    assert canonical(encoded.dataset) == canonical(null_empty_values(expected))
    compared.append(path.name)
    try:
        pixels = frames.locate(path, split_frames=False)
    except FrameError:
        return
    if pixels is None:
        assert encoded.pixels is None
    else:
        assert encoded.pixels is not None
        assert (encoded.pixels.tag, encoded.pixels.encapsulated) == (
            pixels.tag,
            pixels.encapsulated,
        )
        assert encoded.pixels.vr == pixels.vr


def test_most_shipped_files_are_compared() -> None:
    """Guards the parametrised test above against skipping its way to green."""
    for path in SHIPPED:
        if path.name in compared:
            continue
        try:
            expected = reference(path)
            encoded = ours(path)
        except Exception:
            continue
        assert canonical(encoded.dataset) == canonical(null_empty_values(expected))
        compared.append(path.name)
    assert len(set(compared)) >= 150


def test_declines_big_endian_and_deflated() -> None:
    for name in ("MR_small_bigendian.dcm", "image_dfl.dcm"):
        path = next(p for p in SHIPPED if p.name == name)
        with pytest.raises(json_model.Unsupported):
            ours(path)


# ------------------------------------------------------------------ hand-built files
def el(tag: int, vr: str, value: bytes, implicit: bool = False, length: int | None = None) -> bytes:
    """One encoded element (*length* overrides the value length, e.g. 0xFFFFFFFF)."""
    n = len(value) if length is None else length
    group, elem = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack("<HHI", group, elem, n) + value
    if vr in LONG_VRS:
        return struct.pack("<HH2sHI", group, elem, vr.encode(), 0, n) + value
    return struct.pack("<HH2sH", group, elem, vr.encode(), n) + value


def item(body: bytes, undefined: bool = False) -> bytes:
    if undefined:
        return struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + body + b"\xfe\xff\x0d\xe0\0\0\0\0"
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body


def seq(tag: int, items: list[bytes], implicit: bool = False, undefined: bool = False) -> bytes:
    body = b"".join(items)
    if undefined:
        end = b"\xfe\xff\xdd\xe0\0\0\0\0"
        return el(tag, "SQ", body + end, implicit, length=0xFFFFFFFF)
    return el(tag, "SQ", body, implicit)


def part10(tmp_path: Path, body: bytes, ts: str = EXPLICIT, name: str = "x.dcm") -> Path:
    uid = ts.encode() + (b"\0" if len(ts) % 2 else b"")
    meta = el(0x00020010, "UI", uid)
    group_length = el(0x00020000, "UL", struct.pack("<I", len(meta)))
    path = tmp_path / name
    path.write_bytes(b"\0" * 128 + b"DICM" + group_length + meta + body)
    return path


def both(tmp_path: Path, body: bytes, ts: str = EXPLICIT) -> tuple[dict[str, Any], Any]:
    """(ours, the pydicom path's or the exception it raised) for one data set."""
    path = part10(tmp_path, body, ts)
    try:
        expected: Any = null_empty_values(reference(path))
    except Exception as exc:
        expected = exc
    return ours(path).dataset, expected


def same(tmp_path: Path, body: bytes, ts: str = EXPLICIT) -> dict[str, Any]:
    got, expected = both(tmp_path, body, ts)
    assert not isinstance(expected, Exception), expected
    assert canonical(got) == canonical(expected)
    return got


@pytest.mark.parametrize("ts", [EXPLICIT, IMPLICIT])
def test_latin1_and_utf8(tmp_path: Path, ts: str) -> None:
    imp = ts == IMPLICIT
    latin = el(0x00080005, "CS", b"ISO_IR 100", imp) + el(
        0x00100010, "PN", "Müller^Jürgen".encode("latin-1") + b" ", imp
    )
    got = same(tmp_path, latin + el(0x00081030, "LO", "Étude\\Über ".encode("latin-1"), imp), ts)
    assert got["00100010"]["Value"] == [{"Alphabetic": "Müller^Jürgen"}]
    assert got["00081030"]["Value"] == ["Étude", "Über"]
    utf8 = el(0x00080005, "CS", b"ISO_IR 192", imp) + el(
        0x00100010, "PN", "Wang^XiaoDong=王^小東=".encode(), imp
    )
    got = same(tmp_path, utf8, ts)
    assert got["00100010"]["Value"] == [{"Alphabetic": "Wang^XiaoDong", "Ideographic": "王^小東"}]


def test_iso2022_ir87_person_name(tmp_path: Path) -> None:
    # PS3.5 H.3.1: Yamada^Tarou=山田^太郎=やまだ^たろう
    name = b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B"
    body = el(0x00080005, "CS", b"\\ISO 2022 IR 87") + el(0x00100010, "PN", name)
    got = same(tmp_path, body)
    assert got["00100010"]["Value"] == [
        {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}
    ]


@pytest.mark.parametrize("ts", [EXPLICIT, IMPLICIT])
def test_empty_values(tmp_path: Path, ts: str) -> None:
    imp = ts == IMPLICIT
    body = b"".join(
        el(tag, vr, b"", imp)
        for tag, vr in (
            (0x00080016, "UI"),
            (0x00080060, "CS"),
            (0x00100010, "PN"),
            (0x00181310, "US"),
            (0x00200013, "IS"),
            (0x00280030, "DS"),
            (0x00209165, "AT"),
            (0x00420011, "OB"),
        )
    )
    body += seq(0x00081140, [], imp) + el(0x00081030, "LO", b"  ", imp)
    got = same(tmp_path, body, ts)
    assert all(set(v) == {"vr"} for v in got.values())


def test_multi_values_with_empty_components(tmp_path: Path) -> None:
    """PS3.18 F.2.5: empty values of a multi-valued attribute are null (pydicom: "")."""
    body = (
        el(0x00080008, "CS", b"ORIGINAL\\\\AXIAL ")
        + el(0x00081030, "LO", b"A\\ ")
        + el(0x00100010, "PN", b"A^B\\\\C^D ")
        + el(0x00200013, "IS", b"1\\\\3 ")
        + el(0x00280030, "DS", b"0.5\\\\1 ")
    )
    got, expected = both(tmp_path, body)
    assert isinstance(expected, Exception)  # pydicom fails on the PN, IS and DS ones
    assert got["00080008"]["Value"] == ["ORIGINAL", None, "AXIAL"]
    assert got["00081030"]["Value"] == ["A", None]
    assert got["00100010"]["Value"] == [{"Alphabetic": "A^B"}, None, {"Alphabetic": "C^D"}]
    assert got["00200013"]["Value"] == [1, None, 3]
    assert got["00280030"]["Value"] == [0.5, None, 1.0]
    strings = el(0x00080008, "CS", b"ORIGINAL\\\\AXIAL ") + el(0x00081030, "LO", b"A\\ ")
    same(tmp_path, strings)  # the oracle with "" -> null applied


@pytest.mark.parametrize("ts", [EXPLICIT, IMPLICIT])
def test_odd_lengths_and_padding(tmp_path: Path, ts: str) -> None:
    imp = ts == IMPLICIT
    body = (
        el(0x00080018, "UI", b"1.2.3", imp)
        + el(0x00080020, "DA", b"20200101\0", imp)
        + el(0x00080060, "CS", b" CT ", imp)
        + el(0x00081030, "LO", b" lead\0", imp)
        + el(0x00204000, "LT", b" a\\b  \0", imp)
        + el(0x00081190, "UR", b"http://x/y ", imp)
        + el(0x00400241, "AE", b" AE1 \\AE2", imp)
    )
    got = same(tmp_path, body, ts)
    assert got["00080018"]["Value"] == ["1.2.3"]
    assert got["00204000"]["Value"] == [" a\\b"]
    assert got["00400241"]["Value"] == ["AE1", "AE2"]


def test_binary_numbers_of_wrong_length_keep_whole_values(tmp_path: Path) -> None:
    got, expected = both(tmp_path, el(0x00280010, "US", b"\x01\x00\x02"))
    assert isinstance(expected, Exception)  # BytesLengthException
    assert got["00280010"] == {"vr": "US", "Value": [1]}


@pytest.mark.parametrize("ts", [EXPLICIT, IMPLICIT])
def test_binary_numbers(tmp_path: Path, ts: str) -> None:
    imp = ts == IMPLICIT
    body = (
        el(0x00180088, "DS", b"1.25", imp)
        + el(0x00189219, "SS", struct.pack("<h", -5), imp)  # Tag Angle Second Axis
        + el(0x00209165, "AT", struct.pack("<HHHH", 0x0010, 0x0020, 0x7FE0, 0x0010), imp)
        + el(0x00280010, "US", struct.pack("<H", 512), imp)
        + el(0x00283002, "US", struct.pack("<3H", 4096, 0, 16), imp)
        + el(0x00189305, "FD", struct.pack("<d", 0.5), imp)
        + el(0x00189306, "FD", struct.pack("<2d", 0.1, 1e300), imp)
        + el(0x0008040C, "UV", struct.pack("<Q", 2**64 - 1), imp)
        + el(0x00720082, "SV", b"", imp)
    )
    got = same(tmp_path, body, ts)
    assert got["00209165"]["Value"] == ["00100020", "7FE00010"]
    assert got["00280010"]["Value"] == [512]
    assert got["00189306"]["Value"] == [0.1, 1e300]


@pytest.mark.parametrize(
    ("vr", "raw", "value"),
    [
        ("IS", b"12a ", "12a"),  # pydicom: int('12a') fails
        ("IS", b"1.5 ", "1.5"),  # pydicom: truncated to 1
        ("IS", b" 12 ", 12),
        ("IS", b"1.0 ", 1),  # as pydicom reads it
        ("IS", b"+7", 7),
        ("DS", b"abc ", "abc"),  # pydicom: float('abc') fails
        ("DS", b"NaN ", "NaN"),  # pydicom: NaN, which is not JSON
        ("DS", b"1e400 ", "1e400"),  # pydicom: Infinity, which is not JSON
        ("DS", b" 1.60", 1.6),
        ("DS", b"-0 ", -0.0),
    ],
)
def test_number_strings(tmp_path: Path, vr: str, raw: bytes, value: Any) -> None:
    tag = 0x00200013 if vr == "IS" else 0x00101020
    got, expected = both(tmp_path, el(tag, vr, raw))
    assert got[f"{tag:08X}"]["Value"] == [value]
    assert type(got[f"{tag:08X}"]["Value"][0]) is type(value)
    if isinstance(value, int | float) and raw not in (b"1.5 ",):
        assert not isinstance(expected, Exception)
        assert canonical(got) == canonical(expected)


def test_private_tags_implicit(tmp_path: Path) -> None:
    body = (
        el(0x00090010, "LO", b"ACME 1.0", True)
        + el(0x00091010, "LO", b"unknown", True)  # creator unknown to pydicom: UN
        + el(0x00091110, "LO", b"no creator", True)  # no creator at all: UN
        + el(0x00290010, "LO", b"SIEMENS CSA HEADER", True)
        + el(0x00291008, "CS", b"IMAGE NUM 4 ", True)  # the private dictionary knows it: CS
        + el(0x00291010, "OB", b"\x01\x02", True)
    )
    got = same(tmp_path, body, IMPLICIT)
    assert got["00090010"] == {"vr": "LO", "Value": ["ACME 1.0"]}
    assert got["00091010"] == {"vr": "UN", "InlineBinary": base64.b64encode(b"unknown").decode()}
    assert got["00091110"]["vr"] == "UN"
    assert got["00291008"] == {"vr": "CS", "Value": ["IMAGE NUM 4"]}
    assert got["00291010"]["vr"] == "OB"


def test_private_tags_explicit(tmp_path: Path) -> None:
    body = (
        el(0x00090010, "LO", b"ACME 1.0")
        + el(0x00091010, "DS", b"2.5")
        + el(0x00091011, "UN", b"\x01\x02\x03\x04")
        + el(0x00290010, "LO", b"SIEMENS CSA HEADER")
        + el(0x00291008, "UN", b"IMAGE NUM 4 ")  # UN replaced by the private dictionary's CS
    )
    got = same(tmp_path, body)
    assert got["00091010"] == {"vr": "DS", "Value": [2.5]}
    assert got["00091011"]["vr"] == "UN"
    assert got["00291008"] == {"vr": "CS", "Value": ["IMAGE NUM 4"]}


@pytest.mark.parametrize("ts", [EXPLICIT, IMPLICIT])
@pytest.mark.parametrize("undefined", [False, True])
def test_nested_sequences_with_their_own_charset(tmp_path: Path, ts: str, undefined: bool) -> None:
    imp = ts == IMPLICIT
    inner = item(
        el(0x00080005, "CS", b"ISO_IR 192", imp) + el(0x00100010, "PN", "Ŝ^ŝ".encode(), imp),
        undefined,
    )
    inherit = item(el(0x00100010, "PN", "Ä^ö".encode("latin-1"), imp), undefined)
    nested = item(
        el(0x00080100, "SH", b"T-D1100", imp) + seq(0x00400260, [inner], imp, undefined),
        undefined,
    )
    body = (
        el(0x00080005, "CS", b"ISO_IR 100", imp)
        + seq(0x00081110, [inherit, item(b"", undefined)], imp, undefined)
        + seq(0x00081111, [nested], imp, undefined)
        + el(0x00100010, "PN", "Ä".encode("latin-1"), imp)
    )
    got = same(tmp_path, body, ts)
    assert got["00081110"]["Value"][0]["00100010"]["Value"] == [{"Alphabetic": "Ä^ö"}]
    assert got["00081110"]["Value"][1] == {}
    deep = got["00081111"]["Value"][0]["00400260"]["Value"][0]
    assert deep["00100010"]["Value"] == [{"Alphabetic": "Ŝ^ŝ"}]


def test_un_of_undefined_length_is_an_implicit_sequence(tmp_path: Path) -> None:
    inner = item(el(0x00100020, "LO", b"ID1", True), undefined=True)
    body = el(0x00081111, "UN", inner + b"\xfe\xff\xdd\xe0\0\0\0\0", length=0xFFFFFFFF)
    got = same(tmp_path, body)
    assert got["00081111"] == {"vr": "SQ", "Value": [{"00100020": {"vr": "LO", "Value": ["ID1"]}}]}


@pytest.mark.parametrize("ts", [EXPLICIT, IMPLICIT])
def test_bulk_data_threshold(tmp_path: Path, ts: str) -> None:
    imp = ts == IMPLICIT
    at, above = b"\x07" * BULK_DATA_THRESHOLD, b"\x07" * (BULK_DATA_THRESHOLD + 2)
    icon = item(
        el(0x00280100, "US", struct.pack("<H", 8), imp)
        + el(0x7FE00010, "OB", above, imp)
        + el(0x00660023, "OW", at, imp)  # Triangle Point Index List
    )
    body = (
        el(0x00281201, "OW", at, imp)  # Red Palette Color LUT Data
        + el(0x00281202, "OW", above, imp)
        + seq(0x00880200, [icon], imp)
        + el(0x00280100, "US", struct.pack("<H", 16), imp)
        + el(0x7FE00010, "OW", b"\0" * 8, imp)
    )
    got = same(tmp_path, body, ts)
    assert got["00281201"] == {"vr": "OW", "InlineBinary": base64.b64encode(at).decode()}
    assert got["00281202"] == {"vr": "OW", "BulkDataURI": "bulk/00281202"}
    assert got["00880200"]["Value"][0]["7FE00010"]["BulkDataURI"] == "bulk/00880200/0/7FE00010"
    pixels = ours(part10(tmp_path, body, ts)).pixels
    assert pixels is not None
    assert (pixels.tag, pixels.vr, pixels.encapsulated) == (0x7FE00010, "OW", False)


def test_ambiguous_vrs_in_implicit_vr(tmp_path: Path) -> None:
    for rep, vr, value in ((1, "SS", -2000), (0, "US", 63536)):
        body = el(0x00280103, "US", struct.pack("<H", rep), True) + el(
            0x00280120, "", struct.pack("<h", -2000), True
        )
        got = same(tmp_path, body, IMPLICIT)
        assert got["00280120"] == {"vr": vr, "Value": [value]}


def test_group_lengths_are_left_out_and_pixel_data_ends_the_walk(tmp_path: Path) -> None:
    body = (
        el(0x00080000, "UL", struct.pack("<I", 18))
        + el(0x00080060, "CS", b"CT")
        + el(0x7FE00010, "OB", b"", length=0xFFFFFFFF)
        + item(b"")
        + b"\xfe\xff\xdd\xe0\0\0\0\0"
        + el(0xFFFCFFFC, "OB", b"\0\0")
    )
    path = part10(tmp_path, body)
    encoded = ours(path)
    assert encoded.dataset == {"00080060": {"vr": "CS", "Value": ["CT"]}}
    assert encoded.pixels is not None and encoded.pixels.encapsulated
    assert canonical(encoded.dataset) == canonical(reference(path))


def test_header_longer_than_the_first_read(tmp_path: Path) -> None:
    body = el(0x00080060, "CS", b"CT") + el(0x00081030, "UT", b"y" * 100000)
    got = same(tmp_path, body)
    assert got["00081030"]["Value"] == ["y" * 100000]


def test_truncated_file_is_declined(tmp_path: Path) -> None:
    path = part10(tmp_path, el(0x00081030, "UT", b"y" * 100)[:-10])
    with pytest.raises(json_model.Unsupported):
        ours(path)


def test_bulk_uri_sees_the_whole_data_set(tmp_path: Path) -> None:
    """The URI callback runs after the walk: it may use attributes after the bulk element."""
    body = el(0x00191010, "OB", b"\0" * 2000) + el(0x0020000D, "UI", b"1.2.3\0")
    path = part10(tmp_path, body)
    seen = json_model.encode_file(
        path,
        lambda ds, here: f"{ds['0020000D']['Value'][0]}/{'/'.join(here)}",
        BULK_DATA_THRESHOLD,
    ).dataset
    assert seen["00191010"]["BulkDataURI"] == "1.2.3/00191010"
