"""Fast, validating, read-only scanning of the top level of a DICOM data set.

Why this module exists
----------------------
The C-STORE hot path has to index every received instance in well under
100 µs of CPU.  ``pydicom.dcmread(..., stop_before_pixels=True)`` followed by
attribute access costs roughly 600-830 µs for pydicom's ``CT_small.dcm`` on our
machines, so instead we walk the received data set bytes ourselves and pull
out only the handful of attributes the index needs.

What it owns
------------
* Walking **every** top-level element of an encoded data set (Implicit VR
  Little Endian, Explicit VR Little/Big Endian, Deflated Explicit VR Little
  Endian; every other transfer syntax UID is Explicit VR Little Endian on the
  wire) and validating its structure: bad VRs, lengths that run past the end
  of the buffer, missing sequence/item delimiters, top-level item tags and
  runaway nesting raise :class:`DatasetFormatError` with the byte offset.  A
  truncated data set therefore never scans cleanly (unless it was cut exactly
  on a top-level element boundary, which is indistinguishable from a shorter
  valid data set).
* Tolerating what real data does and pydicom accepts: odd value lengths,
  out-of-order elements, group length and private elements, trailing
  (FFFC,FFFC) padding, and a little-endian data set whose VR style (explicit
  or implicit) contradicts its transfer syntax from the first element on
  (walked in the VR style it really has; see ``ScannedHeader.implicit_vr``,
  which whoever re-parses ``raw_element`` bytes must use instead of the TS).
* Recording where the *wanted* top-level elements are (offsets only; no
  per-element objects for anything else), plus (0008,0005) Specific Character
  Set and the (7FE0,0008/0009/0010) pixel data elements, which are always
  recorded.
* Turning a recorded element into text / ints on demand, with pydicom doing
  everything that is not the hot loop: the data dictionary for implicit VR
  (``pydicom.datadict.dictionary_VR``) and character set decoding
  (``pydicom.charset.convert_encodings``/``decode_bytes`` and
  ``pydicom.valuerep.PersonName``), so ISO_IR 100/192/138/144, GB18030 and
  ISO 2022 IR 87/IR 149 with escape sequences and PN component groups come
  out as pydicom would decode them.

What it must not do
-------------------
* Decode pixel data, or recurse into sequences for values: sequences and
  encapsulated pixel data are skipped structurally.  Defined-length sequences
  and items are jumped over by their length; undefined-length ones are walked
  only as far as needed to find their delimiters (elements inside
  undefined-length items are checked structurally, nothing is recorded).
* Modify the bytes.  A :class:`ScannedHeader` keeps a reference to the buffer
  it scanned and slices it lazily in its accessors, so the caller must not
  mutate or close that buffer (e.g. an ``mmap``) while still using the header.

Offsets
-------
All offsets (``dataset_end``, ``pixel_data``) are positions in
:attr:`ScannedHeader.buffer`.  For :func:`scan_dataset` that is the ``buf``
passed in; for :func:`scan_part10` it is the whole file buffer (so offsets are
file offsets).  For Deflated Explicit VR Little Endian (1.2.840.10008.1.2.1.99)
the data set is inflated first and ``buffer`` is the *inflated* data set, so
offsets refer to the inflated bytes (starting at 0), not to the file.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, TypeAlias

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.valuerep import TEXT_VR_DELIMS, PersonName

__all__ = [
    "DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN",
    "EXPLICIT_VR_BIG_ENDIAN",
    "IMPLICIT_VR_LITTLE_ENDIAN",
    "INDEX_KEYWORDS",
    "INDEX_TAGS",
    "MAX_DEPTH",
    "MAX_INFLATED_SIZE",
    "DatasetFormatError",
    "FileMeta",
    "ScannedHeader",
    "scan_dataset",
    "scan_part10",
]

Buffer: TypeAlias = bytes | bytearray | memoryview | mmap.mmap

IMPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN: Final = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2.1.99"

#: Maximum nesting of undefined-length sequences (and encapsulated pixel
#: data) before a data set is rejected.
MAX_DEPTH: Final = 64

#: A deflated data set that inflates to more than this is rejected (guards
#: against decompression bombs).
MAX_INFLATED_SIZE: Final = 1 << 30

# ---------------------------------------------------------------------------
# Index attributes
# ---------------------------------------------------------------------------

#: Keywords of the top-level attributes the archive index needs, grouped by
#: information entity.  Sequences are recorded as a whole (raw_element) for
#: re-parsing with pydicom when the index needs their content.
INDEX_KEYWORDS: Final[tuple[str, ...]] = (
    # character set
    "SpecificCharacterSet",
    # patient
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "EthnicGroup",
    "PatientComments",
    # study
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "AdmittingDiagnosesDescription",
    "InstitutionName",
    "TimezoneOffsetFromUTC",
    "RequestAttributesSequence",
    # series
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDate",
    "SeriesTime",
    "SeriesDescription",
    "SeriesDescriptionCodeSequence",
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "StationName",
    "OperatorsName",
    "PerformingPhysicianName",
    "ProtocolName",
    "BodyPartExamined",
    "Laterality",
    "AnatomicRegionSequence",
    "PrimaryAnatomicStructureSequence",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "PerformedProcedureStepDescription",
    "ReferencedSeriesSequence",
    "ContributingEquipmentSequence",
    # instance
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "InstanceAvailability",
    "ImageType",
    "ImageLaterality",
    "ContentDate",
    "ContentTime",
    "AcquisitionDateTime",
    "IrradiationEventUID",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    # structured reports
    "ObservationDateTime",
    "ConceptNameCodeSequence",
    "VerifyingObserverSequence",
    "ReferencedRequestSequence",
    "CompletionFlag",
    "VerificationFlag",
    "ContentTemplateSequence",
    "QuantityDefinitionSequence",
    # segmentations, presentation states and other content
    "SegmentSequence",
    "ContentLabel",
    "ContentDescription",
    "ContentCreatorName",
    "PresentationCreationDate",
    "PresentationCreationTime",
)


def _tags_for(keywords: Iterable[str]) -> frozenset[int]:
    tags = set()
    for keyword in keywords:
        tag = tag_for_keyword(keyword)
        if tag is None:  # pragma: no cover - guards against dictionary changes
            raise RuntimeError(f"unknown DICOM keyword {keyword!r}")
        tags.add(tag)
    return frozenset(tags)


#: Default ``wanted`` set of :func:`scan_part10`.
INDEX_TAGS: Final[frozenset[int]] = _tags_for(INDEX_KEYWORDS)

# ---------------------------------------------------------------------------
# Constants of the encoding
# ---------------------------------------------------------------------------

_UNDEFINED: Final = 0xFFFFFFFF
_SPECIFIC_CHARACTER_SET: Final = 0x00080005
_PIXEL_DATA: Final = 0x7FE00010
_FLOAT_PIXEL_DATA: Final = 0x7FE00008
_DOUBLE_FLOAT_PIXEL_DATA: Final = 0x7FE00009
_PIXEL_TAGS: Final = (_PIXEL_DATA, _FLOAT_PIXEL_DATA, _DOUBLE_FLOAT_PIXEL_DATA)
_ITEM: Final = 0xFFFEE000
_ITEM_DELIMITER: Final = 0xFFFEE00D
_SEQUENCE_DELIMITER: Final = 0xFFFEE0DD
_ITEM_TAGS: Final = (_ITEM, _ITEM_DELIMITER, _SEQUENCE_DELIMITER)
_ALWAYS_RECORDED: Final = frozenset((_SPECIFIC_CHARACTER_SET, *_PIXEL_TAGS))

# PS3.5 7.1.2: VRs with 2 reserved bytes and a 4-byte length ...
_LONG_VRS: Final = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)
# ... and VRs with a 2-byte length.
_SHORT_VRS: Final = frozenset(
    (
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO",
        b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    )
)  # fmt: skip
_VR_NAMES: Final = {vr: vr.decode("ascii") for vr in _LONG_VRS | _SHORT_VRS}

# Value representations as seen by the accessors.
_TEXT_VRS: Final = frozenset(("SH", "LO", "ST", "LT", "UC", "UT", "PN"))  # charset applies
_SINGLE_VALUED: Final = frozenset(("LT", "ST", "UT", "UR"))
_STRING_VRS: Final = (
    frozenset(("AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR")) | _TEXT_VRS
)
_BINARY_FORMATS: Final = {
    "US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "SV": "q", "UV": "Q",
}  # fmt: skip
_INT_BINARY_VRS: Final = frozenset(("US", "SS", "UL", "SL", "SV", "UV"))
# Explicit VRs whose text is latin-1 with insignificant leading/trailing spaces.
_PLAIN_STRING_VRS: Final = frozenset(
    vr.encode("ascii") for vr in _STRING_VRS - _TEXT_VRS - _SINGLE_VALUED
)
# String VRs with a 2-byte length (value right after an 8-byte header).
_SHORT_STRING_VRS: Final = frozenset(
    vr.encode("ascii") for vr in _STRING_VRS if vr.encode("ascii") in _SHORT_VRS
)

_U32_LE = struct.Struct("<I").unpack_from


def _swap(tag: int) -> int:
    """Tag as read by ``<I`` from little-endian bytes (element << 16 | group)."""
    return ((tag & 0xFFFF) << 16) | (tag >> 16)


class DatasetFormatError(ValueError):
    """The bytes are not a structurally valid DICOM data set.

    The message says what is wrong and at which byte offset (also available as
    :attr:`offset`, relative to the scanned buffer).
    """

    def __init__(self, message: str, offset: int | None = None) -> None:
        if offset is not None:
            message = f"{message} (at byte offset {offset})"
        super().__init__(message)
        self.offset = offset


class _Codec:
    """Byte-level layout of one of the three data set encodings."""

    __slots__ = (
        "big_endian",
        "charset_key",
        "explicit",
        "header",
        "item_header",
        "item_key_tuple",
        "item_keys",
        "key",
        "name",
        "pixel_key",
        "pixel_keys",
        "tag_hh",
        "u16",
        "u32",
    )

    def __init__(self, name: str, explicit: bool, big_endian: bool) -> None:
        bo = ">" if big_endian else "<"
        self.name = name
        self.explicit = explicit
        self.big_endian = big_endian
        # The hot loop reads tags as one 32-bit int in the data set's byte
        # order; for little endian that is (element << 16 | group).  Records
        # are keyed by that "native key"; key() maps a tag to it.
        self.key = (lambda tag: tag) if big_endian else _swap
        self.header = struct.Struct(f"{bo}I2sH" if explicit else f"{bo}II").unpack_from
        self.item_header = struct.Struct(f"{bo}HHI").unpack_from
        self.tag_hh = struct.Struct(f"{bo}HH").unpack_from
        self.u16 = struct.Struct(f"{bo}H").unpack_from
        self.u32 = struct.Struct(f"{bo}I").unpack_from
        self.pixel_key = self.key(_PIXEL_DATA)
        self.pixel_keys = tuple(self.key(t) for t in _PIXEL_TAGS)
        self.item_key_tuple = tuple(self.key(t) for t in _ITEM_TAGS)
        self.item_keys = frozenset(self.item_key_tuple)
        self.charset_key = self.key(_SPECIFIC_CHARACTER_SET)


_EXPLICIT_LE: Final = _Codec("Explicit VR Little Endian", explicit=True, big_endian=False)
_EXPLICIT_BE: Final = _Codec("Explicit VR Big Endian", explicit=True, big_endian=True)
_IMPLICIT_LE: Final = _Codec("Implicit VR Little Endian", explicit=False, big_endian=False)

# Record of one wanted element: (explicit VR bytes or None for implicit VR,
# offset of the element's tag, offset just past the element).
_Record: TypeAlias = tuple[bytes | None, int, int]

# ---------------------------------------------------------------------------
# Checked (slow) walkers: nested structures, diagnostics, reference walk
# ---------------------------------------------------------------------------


def _walk_items(
    buf: Buffer, off: int, end: int, codec: _Codec, depth: int, encapsulated: bool
) -> int:
    """Walk the items of an undefined-length sequence (or encapsulated pixel
    data) starting at ``off``; return the offset just past its sequence
    delimiter."""
    if depth > MAX_DEPTH:
        raise DatasetFormatError(f"sequences nested deeper than {MAX_DEPTH} levels", off)
    item_header = codec.item_header
    what = "encapsulated pixel data" if encapsulated else "undefined-length sequence"
    while True:
        if end - off < 8:
            raise DatasetFormatError(f"{what} ends without a sequence delimiter", off)
        group, elem, length = item_header(buf, off)
        if group != 0xFFFE or elem not in (0xE000, 0xE0DD):
            raise DatasetFormatError(
                f"expected an item or sequence delimiter in {what}, "
                f"found tag ({group:04X},{elem:04X})",
                off,
            )
        if elem == 0xE0DD:
            return off + 8
        if length == _UNDEFINED:
            if encapsulated:
                raise DatasetFormatError("pixel data fragment with undefined length", off)
            off = _walk_elements(buf, off + 8, end, codec, depth, None, None)
        else:
            nxt = off + 8 + length
            if nxt > end:
                raise DatasetFormatError(
                    f"item length {length} runs past the end of the data ({end})", off
                )
            off = nxt


def _skip_undefined(
    buf: Buffer, off: int, voff: int, end: int, codec: _Codec, vr: bytes | None, depth: int
) -> int:
    """Element at ``off`` (value at ``voff``) has undefined length: walk to its
    sequence delimiter and return the offset just past it."""
    if vr is None or vr == b"SQ":
        return _walk_items(buf, voff, end, codec, depth, encapsulated=False)
    if vr == b"UN":
        # PS3.5 6.2.2: UN with undefined length holds an Implicit VR Little
        # Endian encoded sequence, whatever the transfer syntax.
        return _walk_items(buf, voff, end, _IMPLICIT_LE, depth, encapsulated=False)
    if vr in (b"OB", b"OW") and codec.tag_hh(buf, off) == (0x7FE0, 0x0010):
        return _walk_items(buf, voff, end, codec, depth, encapsulated=True)
    group, elem = codec.tag_hh(buf, off)
    raise DatasetFormatError(
        f"undefined length not allowed for VR {vr.decode('latin-1')!r} "
        f"in element ({group:04X},{elem:04X})",
        off,
    )


def _walk_elements(
    buf: Buffer,
    off: int,
    end: int,
    codec: _Codec,
    depth: int,
    rec: dict[int, _Record] | None,
    wanted: frozenset[int] | None,
) -> int:
    """Walk elements with every check.

    ``rec is None``: the elements of an undefined-length item; stops after the
    item delimiter and returns the offset past it.  Otherwise: the top level
    of a data set; walks to ``end`` exactly, recording elements whose native
    key is in ``wanted`` into ``rec``, and raises on the first problem.
    """
    top = rec is not None
    tag_hh = codec.tag_hh
    u16 = codec.u16
    u32 = codec.u32
    explicit = codec.explicit
    key = codec.key
    while True:
        if off >= end:
            if top and off == end:
                return off
            raise DatasetFormatError("item ends without an item delimiter", off)
        if end - off < 8:
            raise DatasetFormatError(
                f"truncated element header: {end - off} bytes left, need at least 8", off
            )
        group, elem = tag_hh(buf, off)
        if group == 0xFFFE:
            if not top and elem == 0xE00D:
                return off + 8
            where = "at the top level of the data set" if top else "inside an item"
            raise DatasetFormatError(f"unexpected item tag ({group:04X},{elem:04X}) {where}", off)
        vr: bytes | None
        if explicit:
            vr = bytes(buf[off + 4 : off + 6])
            if vr in _SHORT_VRS:
                length = u16(buf, off + 6)[0]
                voff = off + 8
            elif vr in _LONG_VRS:
                if end - off < 12:
                    raise DatasetFormatError(
                        f"truncated element header: {end - off} bytes left, need 12", off
                    )
                length = u32(buf, off + 8)[0]
                voff = off + 12
            else:
                raise DatasetFormatError(
                    f"invalid VR {vr!r} in element ({group:04X},{elem:04X})", off
                )
        else:
            vr = None
            length = u32(buf, off + 4)[0]
            voff = off + 8
        if length == _UNDEFINED:
            nxt = _skip_undefined(buf, off, voff, end, codec, vr, depth + 1)
        else:
            nxt = voff + length
            if nxt > end:
                raise DatasetFormatError(
                    f"value length {length} of element ({group:04X},{elem:04X}) runs past "
                    f"the end of the data ({end})",
                    off,
                )
        if rec is not None and wanted is not None:
            native = key((group << 16) | elem)
            if native in wanted:
                rec[native] = (vr, off, nxt)
        off = nxt


# ---------------------------------------------------------------------------
# Hot loops
# ---------------------------------------------------------------------------


def _fast_explicit(
    buf: Buffer, off: int, end: int, codec: _Codec, wanted: frozenset[int]
) -> dict[int, _Record] | None:
    """Explicit VR top-level walk; returns None on any anomaly (the caller
    re-walks with :func:`_walk_elements` to raise a precise error)."""
    header = codec.header
    u32 = codec.u32
    short_vrs = _SHORT_VRS
    long_vrs = _LONG_VRS
    rec: dict[int, _Record] = {}
    try:
        while off < end:
            tag, vr, length = header(buf, off)
            if vr in short_vrs:
                nxt = off + 8 + length
            elif vr in long_vrs:
                length = u32(buf, off + 8)[0]
                if length == 0xFFFFFFFF:
                    nxt = _skip_undefined(buf, off, off + 12, end, codec, vr, 1)
                else:
                    nxt = off + 12 + length
            else:
                return None
            if tag in wanted:
                rec[tag] = (vr, off, nxt)
            off = nxt
    except struct.error:
        return None
    if off != end:
        return None
    return rec


def _fast_implicit(
    buf: Buffer, off: int, end: int, codec: _Codec, wanted: frozenset[int]
) -> dict[int, _Record] | None:
    header = codec.header
    rec: dict[int, _Record] = {}
    try:
        while off < end:
            tag, length = header(buf, off)
            if length == 0xFFFFFFFF:
                nxt = _skip_undefined(buf, off, off + 8, end, codec, None, 1)
            else:
                nxt = off + 8 + length
            if tag in wanted:
                rec[tag] = (None, off, nxt)
            off = nxt
    except struct.error:
        return None
    if off != end:
        return None
    return rec


_WANTED_CACHE: dict[tuple[frozenset[int], bool], frozenset[int]] = {}


def _native_wanted(wanted: frozenset[int] | set[int], codec: _Codec) -> frozenset[int]:
    """``wanted`` + always-recorded tags + item tags, as native keys (cached)."""
    fz = wanted if isinstance(wanted, frozenset) else frozenset(wanted)
    cache_key = (fz, codec.big_endian)
    native = _WANTED_CACHE.get(cache_key)
    if native is None:
        key = codec.key
        native = frozenset(key(t) for t in fz | _ALWAYS_RECORDED) | codec.item_keys
        if len(_WANTED_CACHE) >= 64:
            _WANTED_CACHE.clear()
        _WANTED_CACHE[cache_key] = native
    return native


def _codec_for(transfer_syntax: str) -> _Codec:
    if transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN:
        return _IMPLICIT_LE
    if transfer_syntax == EXPLICIT_VR_BIG_ENDIAN:
        return _EXPLICIT_BE
    return _EXPLICIT_LE


def _as_buffer(buf: Buffer) -> Buffer:
    if isinstance(buf, memoryview) and (buf.format != "B" or buf.ndim != 1):
        return buf.cast("B")
    return buf


def _inflate(data: Buffer, base: int) -> bytes:
    """Raw-deflate ``data`` (PS3.5 A.5); trailing bytes after the deflate
    stream are ignored, as pydicom does."""
    decomp = zlib.decompressobj(-15)
    try:
        out = decomp.decompress(data, MAX_INFLATED_SIZE + 1)
    except zlib.error as exc:
        raise DatasetFormatError(f"corrupt deflated data set: {exc}", base) from None
    if len(out) > MAX_INFLATED_SIZE:
        raise DatasetFormatError(
            f"deflated data set inflates to more than {MAX_INFLATED_SIZE} bytes", base
        )
    if not decomp.eof:
        raise DatasetFormatError(
            "deflated data set is truncated (deflate stream has no end)", base + len(data)
        )
    return out


def _walk_top(
    buf: Buffer, start: int, end: int, codec: _Codec, wanted: frozenset[int] | set[int]
) -> dict[int, _Record]:
    native = _native_wanted(wanted, codec)
    if codec.explicit:
        rec = _fast_explicit(buf, start, end, codec, native)
    else:
        rec = _fast_implicit(buf, start, end, codec, native)
    k1, k2, k3 = codec.item_key_tuple
    if rec is None or k1 in rec or k2 in rec or k3 in rec:
        # Something is wrong: re-walk with every check to say exactly what.
        rec = {}
        _walk_elements(buf, start, end, codec, 0, rec, native)
        if k1 in rec or k2 in rec or k3 in rec:  # pragma: no cover - walker raises first
            raise DatasetFormatError("item tag at the top level of the data set", start)
    return rec


def _other_vr_codec(buf: Buffer, start: int, end: int, codec: _Codec) -> _Codec | None:
    """The little-endian encoding with the other VR style, if the data set's
    first element suggests the writer used it despite the transfer syntax (a
    known writer bug that pydicom also tolerates), else None."""
    if codec.big_endian or end - start < 8:
        return None
    first_vr_valid = bytes(buf[start + 4 : start + 6]) in _VR_NAMES
    if codec.explicit and not first_vr_valid:
        return _IMPLICIT_LE
    if not codec.explicit and first_vr_valid:
        return _EXPLICIT_LE
    return None


def _scan(
    buf: Buffer, start: int, transfer_syntax: str, wanted: frozenset[int] | set[int]
) -> ScannedHeader:
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        with memoryview(buf) as view, view[start:] as tail:
            buf = _inflate(tail, start)
        start = 0
    codec = _codec_for(transfer_syntax)
    end = len(buf)
    try:
        rec = _walk_top(buf, start, end, codec, wanted)
    except DatasetFormatError as exc:
        other = _other_vr_codec(buf, start, end, codec)
        if other is None:
            raise
        try:
            rec = _walk_top(buf, start, end, other, wanted)
        except DatasetFormatError:
            raise exc from None
        codec = other
    return ScannedHeader(buf, transfer_syntax, codec, rec, end)


def scan_dataset(
    buf: Buffer, transfer_syntax: str, wanted: frozenset[int] | set[int]
) -> ScannedHeader:
    """Walk a data set and record the wanted top-level elements.

    ``buf`` (bytes, bytearray, memoryview or mmap) holds a data set WITHOUT
    preamble/file meta, encoded in ``transfer_syntax`` (a UID string).  Every
    top-level element is walked to the end of ``buf`` (validating structure, so
    a truncated data set raises :class:`DatasetFormatError`), recording the
    ``wanted`` top-level tags (ints like ``0x0020000D``).  Sequences and
    encapsulated pixel data are skipped structurally (never recursed for
    values), including undefined lengths.

    For the deflated transfer syntax, ``buf`` is inflated first and all
    offsets refer to the inflated bytes (see :attr:`ScannedHeader.buffer`).
    """
    return _scan(_as_buffer(buf), 0, str(transfer_syntax), wanted)


# ---------------------------------------------------------------------------
# Part 10 files
# ---------------------------------------------------------------------------


@dataclass
class FileMeta:
    """What :func:`scan_part10` read from the File Meta Information (group 2)."""

    transfer_syntax: str
    sop_class_uid: str | None
    sop_instance_uid: str | None
    dataset_offset: int  # offset of the data set's first byte in the file buffer


def _uid(raw: Buffer) -> str:
    if type(raw) is not bytes:
        raw = bytes(raw)
    return raw.decode("latin-1").strip(" \0")


def _read_meta(buf: Buffer) -> FileMeta:
    end = len(buf)
    if end >= 132 and buf[128:132] == b"DICM":
        off = 132
    elif buf[:4] == b"DICM":
        off = 4
    else:
        off = 0  # no preamble: the meta information must start right away
    first = off
    header = _EXPLICIT_LE.header
    transfer_syntax = sop_class_uid = sop_instance_uid = None
    while end - off >= 8:
        tag, vr, length = header(buf, off)
        if tag & 0xFFFF != 0x0002:
            break
        elem = tag >> 16
        if vr in _SHORT_VRS:
            voff = off + 8
        elif vr in _LONG_VRS:
            if end - off < 12:
                raise DatasetFormatError("truncated file meta element header", off)
            length = _U32_LE(buf, off + 8)[0]
            if length == _UNDEFINED:
                raise DatasetFormatError(
                    f"undefined length in file meta element (0002,{elem:04X})", off
                )
            voff = off + 12
        else:
            raise DatasetFormatError(
                f"invalid VR {vr!r} in file meta element (0002,{elem:04X}) "
                "(file meta information is always Explicit VR Little Endian)",
                off,
            )
        nxt = voff + length
        if nxt > end:
            raise DatasetFormatError(
                f"value length {length} of file meta element (0002,{elem:04X}) runs past "
                f"the end of the data ({end})",
                off,
            )
        if elem == 0x0010:
            transfer_syntax = _uid(buf[voff:nxt])
        elif elem == 0x0002:
            sop_class_uid = _uid(buf[voff:nxt])
        elif elem == 0x0003:
            sop_instance_uid = _uid(buf[voff:nxt])
        off = nxt
    if off == first:
        raise DatasetFormatError("no file meta information (group 0002) found", first)
    if not transfer_syntax:
        raise DatasetFormatError(
            "file meta information has no Transfer Syntax UID (0002,0010)", first
        )
    return FileMeta(
        transfer_syntax=transfer_syntax,
        sop_class_uid=sop_class_uid or None,
        sop_instance_uid=sop_instance_uid or None,
        dataset_offset=off,
    )


def file_meta(buf: Buffer) -> FileMeta:
    """Only the File Meta Information of a Part 10 file (e.g. to find where its data set
    starts); raises DatasetFormatError when there is none."""
    return _read_meta(_as_buffer(buf))


def scan_part10(
    buf: Buffer, wanted: frozenset[int] | set[int] = INDEX_TAGS
) -> tuple[FileMeta, ScannedHeader]:
    """Scan a DICOM Part 10 file held in ``buf``.

    Optional 128-byte preamble + ``DICM``, then the group 2 File Meta
    Information (always Explicit VR Little Endian), then the data set in the
    meta's Transfer Syntax UID.  Raises :class:`DatasetFormatError` when there
    is no usable meta (no group 2 elements, or no Transfer Syntax UID) or the
    data set is malformed.  Offsets in the returned header are offsets in
    ``buf`` (except for the deflated transfer syntax, see the module doc).
    """
    buf = _as_buffer(buf)
    meta = _read_meta(buf)
    return meta, _scan(buf, meta.dataset_offset, meta.transfer_syntax, wanted)


# ---------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------

_IMPLICIT_VR_CACHE: dict[int, str] = {}


def _dictionary_vr(tag: int) -> str | None:
    """VR from the data dictionary, ambiguous VRs resolved like implicit VR
    readers do; None when the dictionary does not know the tag."""
    vr = _IMPLICIT_VR_CACHE.get(tag)
    if vr is None:
        group, elem = tag >> 16, tag & 0xFFFF
        if elem == 0:
            vr = "UL"  # group length
        elif group & 1 and 0x0010 <= elem <= 0x00FF:
            vr = "LO"  # private creator
        else:
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                vr = ""
            if " or " in vr:
                options = vr.split(" or ")
                vr = "OW" if "OW" in options else options[0]
        _IMPLICIT_VR_CACHE[tag] = vr
    return vr or None


class ScannedHeader:
    """Where the wanted top-level elements of a scanned data set are.

    Only tags that were in ``wanted`` (plus Specific Character Set and the
    pixel data elements, which are always recorded) are known: :meth:`has`
    is False for anything else, present or not.
    """

    __slots__ = (
        "_codec",
        "_encodings",
        "_rec",
        "_swapped",
        "buffer",
        "dataset_end",
        "pixel_data",
        "transfer_syntax",
    )

    transfer_syntax: str
    dataset_end: int
    pixel_data: tuple[int, int | None] | None
    #: The bytes that were scanned (the inflated data set for the deflated TS).
    buffer: Buffer

    def __init__(
        self,
        buf: Buffer,
        transfer_syntax: str,
        codec: _Codec,
        rec: dict[int, _Record],
        end: int,
    ) -> None:
        self.buffer = buf
        self.transfer_syntax = transfer_syntax
        self.dataset_end = end
        self._codec = codec
        self._rec = rec
        self._swapped = not codec.big_endian  # records keyed (element << 16 | group)
        self._encodings: list[str] | None = None
        self.pixel_data = None
        for key in codec.pixel_keys:
            r = rec.get(key)
            if r is not None:
                span = self._value_span(r)
                self.pixel_data = (r[1], None if span[2] else span[1] - span[0])
                break

    def __repr__(self) -> str:
        return (
            f"<ScannedHeader {self.transfer_syntax} {len(self._rec)} recorded elements, "
            f"pixel_data={self.pixel_data}>"
        )

    @property
    def implicit_vr(self) -> bool:
        """True when the data set was walked as Implicit VR Little Endian: for
        the Implicit VR TS, and for a little-endian explicit-VR TS whose data
        set turned out to be implicit VR from its first element on (a writer
        bug pydicom also tolerates; the reverse case sets this False)."""
        return not self._codec.explicit

    @property
    def big_endian(self) -> bool:
        """True for Explicit VR Big Endian (tags, lengths, binary values)."""
        return self._codec.big_endian

    # -- structure ---------------------------------------------------------

    def _value_span(self, r: _Record) -> tuple[int, int, bool]:
        """(value offset, value end, undefined length) of a record."""
        vr, off, nxt = r
        if vr is None:
            voff = off + 8
            length = _U32_LE(self.buffer, off + 4)[0]
        elif vr in _LONG_VRS:
            voff = off + 12
            length = self._codec.u32(self.buffer, off + 8)[0]
        else:
            return off + 8, nxt, False
        if length == _UNDEFINED:
            return voff, nxt - 8, True  # value ends before the sequence delimiter
        return voff, nxt, False

    def _get(self, tag: int) -> _Record | None:
        if self._swapped:
            return self._rec.get(((tag & 0xFFFF) << 16) | (tag >> 16))
        return self._rec.get(tag)

    def recorded_tags(self) -> list[int]:
        """Tags recorded by the scan (wanted ones present, and always-recorded ones)."""
        key = self._codec.key
        return sorted(key(k) for k in self._rec)  # key() is its own inverse

    def has(self, tag: int) -> bool:
        return self._get(tag) is not None

    def vr(self, tag: int) -> str | None:
        """The element's VR as pydicom would report it: the explicit VR, except
        that UN is replaced by the dictionary VR when the tag is known; for
        implicit VR the dictionary VR ('UN' for unknown/private tags)."""
        r = self._get(tag)
        if r is None:
            return None
        return self._vr_of(tag, r[0])

    @staticmethod
    def _vr_of(tag: int, raw_vr: bytes | None) -> str:
        if raw_vr is None or raw_vr == b"UN":
            return _dictionary_vr(tag) or "UN"
        return _VR_NAMES[raw_vr]

    def _slice(self, start: int, stop: int) -> bytes:
        chunk = self.buffer[start:stop]
        return chunk if type(chunk) is bytes else bytes(chunk)

    def raw_value(self, tag: int) -> bytes | None:
        """Value bytes as stored (byte order of the transfer syntax).  For an
        undefined-length element: everything between the header and the
        sequence delimiter."""
        r = self._get(tag)
        if r is None:
            return None
        voff, vend, _ = self._value_span(r)
        return self._slice(voff, vend)

    def raw_element(self, tag: int) -> bytes | None:
        """The full encoded element (tag, VR, length, value) - through the
        sequence delimiter for undefined lengths - for re-parsing with pydicom."""
        r = self._get(tag)
        if r is None:
            return None
        return self._slice(r[1], r[2])

    # -- decoded values ----------------------------------------------------

    def charset(self) -> list[str]:
        """Specific Character Set values as given (spaces stripped);
        ``['ISO_IR 6']`` (default repertoire) when absent or empty."""
        raw = self.raw_value(_SPECIFIC_CHARACTER_SET)
        if raw is None:
            return ["ISO_IR 6"]
        values = [v.strip(" \0") for v in raw.decode("latin-1").split("\\")]
        if not any(values):
            return ["ISO_IR 6"]
        return values

    def _python_encodings(self) -> list[str]:
        encodings = self._encodings
        if encodings is None:
            try:
                encodings = convert_encodings(self.charset())
            except (LookupError, ValueError):
                encodings = ["iso8859"]
            self._encodings = encodings
        return encodings

    def _decode(self, raw: bytes) -> str:
        encodings = self._python_encodings()
        if b"\x1b" not in raw:
            try:
                return raw.decode(encodings[0])
            except (UnicodeError, LookupError):
                pass
        try:
            return decode_bytes(raw, encodings, TEXT_VR_DELIMS)
        except (UnicodeError, LookupError, ValueError):
            # pydicom raises here only in its RAISE validation mode; do what
            # it does otherwise: first encoding with replacement characters.
            try:
                return raw.decode(encodings[0], errors="replace")
            except LookupError:
                return raw.decode("latin-1", errors="replace")

    def _person_names(self, raw: bytes) -> list[str]:
        # Decode the whole value first, then split: in ISO 2022 IR 87 (JIS X
        # 0208) a kanji's two bytes may be 0x5C ('\\') or 0x3D ('='), and in
        # GB18030 0x5C may be a trail byte, so the raw bytes must not be split
        # on delimiters.  This is what pydicom's own PN conversion does.
        encodings = self._python_encodings()
        names = []
        for value in self._decode(raw.rstrip(b"\0 ")).split("\\"):
            if "=" in value:  # PersonName drops empty trailing component groups
                with contextlib.suppress(UnicodeError, LookupError, ValueError):
                    value = str(PersonName(value, encodings))
            names.append(value.rstrip("\0 "))
        return names

    def _parts(self, tag: int) -> list[str] | None:
        """Decoded values, or None when absent / there is no text form."""
        r = self._get(tag)
        if r is None:
            return None
        vr = self._vr_of(tag, r[0])
        voff, vend, undefined = self._value_span(r)
        if undefined:
            return None
        raw = self._slice(voff, vend)
        if vr in _STRING_VRS:
            if vr == "PN":
                return self._person_names(raw)
            if vr in _TEXT_VRS:
                text = self._decode(raw)
                if vr in _SINGLE_VALUED:
                    return [text.rstrip("\0 ")]
                return [v.rstrip("\0 ") for v in text.split("\\")]
            text = raw.decode("latin-1")
            if vr in _SINGLE_VALUED:
                return [text.strip("\0 ")]
            return [v.strip("\0 ") for v in text.split("\\")]
        fmt = _BINARY_FORMATS.get(vr)
        bo = ">" if self._codec.big_endian else "<"
        if fmt is not None:
            size = struct.calcsize(fmt)
            usable = len(raw) - len(raw) % size
            return [str(v) for (v,) in struct.iter_unpack(bo + fmt, raw[:usable])]
        if vr == "AT":
            usable = len(raw) - len(raw) % 4
            return [f"{g:04X}{e:04X}" for g, e in struct.iter_unpack(bo + "HH", raw[:usable])]
        return None

    def text(self, tag: int) -> str | None:
        """The value as text, values joined by ``\\`` as in DICOM.

        Text VRs (SH, LO, ST, LT, UC, UT, PN) are decoded with the data set's
        Specific Character Set and lose trailing spaces/NULs; other string VRs
        (AE, AS, CS, DA, DS, DT, IS, TM, UI, UR) also lose leading spaces.
        Binary numbers (US, SS, UL, SL, FL, FD, SV, UV) are rendered with
        ``str``, AT as ``ggggeeee``.  None if absent (or not recorded), or for
        VRs without a text form (SQ, OB, OW, OD, OF, OL, OV, unknown UN);
        ``''`` if present but empty.
        """
        r = self._get(tag)
        if r is None:
            return None
        raw_vr = r[0]
        if raw_vr is not None and raw_vr in _SHORT_STRING_VRS:
            # fast paths for the common explicit-VR strings (2-byte length)
            chunk = self.buffer[r[1] + 8 : r[2]]
            if type(chunk) is not bytes:
                chunk = bytes(chunk)
            if raw_vr == b"PN":
                return "\\".join(self._person_names(chunk))
            if raw_vr in _PLAIN_STRING_VRS:
                text = chunk.decode("latin-1")
                if "\\" not in text:
                    return text.strip(" \0")
                return "\\".join([v.strip(" \0") for v in text.split("\\")])
            text = self._decode(chunk)
            if raw_vr == b"ST" or raw_vr == b"LT" or "\\" not in text:
                return text.rstrip("\0 ")
            return "\\".join([v.rstrip("\0 ") for v in text.split("\\")])
        parts = self._parts(tag)
        if parts is None:
            return None
        return "\\".join(parts)

    def values(self, tag: int) -> list[str]:
        """:meth:`text` split into its values (LT/ST/UT/UR are single-valued);
        ``[]`` when absent or empty."""
        parts = self._parts(tag)
        if not parts or parts == [""]:
            return []
        return parts

    def int_value(self, tag: int) -> int | None:
        """First value as int for IS (or any string VR holding an integer) and
        US, SS, UL, SL, SV, UV (binary, in the transfer syntax's byte order);
        None if absent, empty or unparseable."""
        r = self._get(tag)
        if r is None:
            return None
        vr = self._vr_of(tag, r[0])
        if vr in _INT_BINARY_VRS:
            voff, vend, undefined = self._value_span(r)
            fmt = (">" if self._codec.big_endian else "<") + _BINARY_FORMATS[vr]
            if undefined or vend - voff < struct.calcsize(fmt):
                return None
            return int(struct.unpack_from(fmt, self.buffer, voff)[0])
        if vr not in _STRING_VRS:
            return None
        text = self.text(tag)
        if not text:
            return None
        first = text.split("\\", 1)[0].strip()
        try:
            return int(first)
        except ValueError:
            pass
        try:
            number = float(first)
        except ValueError:
            return None
        return int(number) if number.is_integer() else None
