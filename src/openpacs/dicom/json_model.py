"""The DICOM JSON model (PS3.18 Annex F) of a stored Part 10 file, encoded from its bytes.

Owns: walking the raw elements of a data set in Explicit or Implicit VR Little Endian up to the
top-level pixel data (7FE0,0010 / 0008 / 0009) — defined and undefined length sequences and
items, UN of undefined length as an Implicit VR LE sequence (PS3.5 6.2.2) — and turning each
element into its PS3.18 F.2 JSON object: strings split on backslash with empty values as null
(F.2.5), padding stripped as pydicom strips it per VR; IS/DS as JSON numbers (the string kept
when it is not a valid number); binary numbers; AT as ``ggggeeee``; PN as Alphabetic /
Ideographic / Phonetic objects; text decoded with the Specific Character Set of its data set
(inherited by sequence items that have none; ISO 2022 code extensions through pydicom's
``decode_bytes``); binary VRs as BulkDataURI above the threshold, else InlineBinary; group
lengths left out. Where the pixel data starts (tag, VR, encapsulated or not) is returned so the
caller needs no second parse. VRs of implicit VR data come from pydicom's data dictionaries,
with pydicom's rules for private tags (LO creators, the private dictionary, else UN) and for
the ambiguous VRs it resolves (US or SS by Pixel Representation, LUT Data, overlay and
waveform data), so the output equals the pydicom path's (``web.dicomweb.wado.dataset_json``)
except where that path fails or breaks PS3.18 (listed in ``tests/unit/test_json_model.py``).
Anything else it does not mirror — Explicit VR Big Endian, Deflated, a data set whose VR style
contradicts its transfer syntax, ambiguous VRs pydicom leaves unresolved, UN values standing
for a known sequence, malformed structure — raises ``Unsupported`` and the caller uses pydicom.
Written by hand because pydicom's Dataset path (``dcmread``, ``ds[tag]`` conversion,
``to_json_dict``) costs about 3.6 ms of CPU per CT header, and no library encodes DICOM JSON
from raw bytes; this walk is one pass of ``struct.unpack_from`` over the header bytes with no
object per element but the output's.
Must not: read pixel data, know HTTP or the blob store, or change what a value means.
"""

from __future__ import annotations

import base64
import math
import mmap
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, private_dictionary_VR
from pydicom.valuerep import TEXT_VR_DELIMS

from openpacs.dicom import header

__all__ = ["Encoded", "PixelElement", "Unsupported", "encode", "encode_file"]

IMPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2"
UNSUPPORTED_SYNTAXES: Final = frozenset(
    ("1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99")  # Explicit VR Big Endian, Deflated
)
PIXEL_TAGS: Final = frozenset((0x7FE00010, 0x7FE00008, 0x7FE00009))
BULK_VRS: Final = frozenset(("OB", "OD", "OF", "OL", "OV", "OW", "UN"))

_UNDEFINED: Final = 0xFFFFFFFF
_CHARSET: Final = 0x00080005
_BITS_ALLOCATED: Final = 0x00280100
_PIXEL_REPRESENTATION: Final = 0x00280103
_LUT_DESCRIPTOR: Final = 0x00283002
_LUT_DATA: Final = 0x00283006
_ITEM: Final = 0xFFFEE000
_ITEM_END: Final = 0xFFFEE00D
_SEQUENCE_END: Final = 0xFFFEE0DD
_DEFAULT_ENCODINGS: Final = ["iso8859"]  # pydicom's default_encoding (ISO_IR 6 read as latin-1)

# pydicom's ambiguous-VR corrections (filewriter._correct_ambiguous_vr_element) and the LUT
# Descriptor fix of its reader (hooks.raw_element_value), mirrored here.
_US_OR_SS_TAGS: Final = frozenset(
    (
        0x00189810, 0x00221452, 0x00280104, 0x00280105, 0x00280106, 0x00280107, 0x00280108,
        0x00280109, 0x00280110, 0x00280111, 0x00280120, 0x00280121, 0x00281101, 0x00281102,
        0x00281103, 0x00283002, 0x00409211, 0x00409216, 0x00603004, 0x00603006,
    )
)  # fmt: skip
_WAVEFORM_OB_OW_TAGS: Final = frozenset((0x54000110, 0x54000112, 0x5400100A, 0x54001010))
_LUT_DESCRIPTOR_TAGS: Final = frozenset((0x00281101, 0x00281102, 0x00281103, 0x00283002))

# Value kinds (how a VR's bytes become JSON values).
_K_STR, _K_AE, _K_UI, _K_UR, _K_TEXT, _K_LONGTEXT, _K_PN = 1, 2, 3, 4, 5, 6, 7
_K_IS, _K_DS, _K_NUM, _K_AT, _K_BIN, _K_SQ = 8, 9, 10, 11, 12, 13

_KIND: Final[dict[str, int]] = {
    "AS": _K_STR, "CS": _K_STR, "DA": _K_STR, "DT": _K_STR, "TM": _K_STR,
    "AE": _K_AE, "UI": _K_UI, "UR": _K_UR,
    "SH": _K_TEXT, "LO": _K_TEXT, "UC": _K_TEXT,
    "ST": _K_LONGTEXT, "LT": _K_LONGTEXT, "UT": _K_LONGTEXT,
    "PN": _K_PN, "IS": _K_IS, "DS": _K_DS,
    "US": _K_NUM, "SS": _K_NUM, "UL": _K_NUM, "SL": _K_NUM,
    "FL": _K_NUM, "FD": _K_NUM, "SV": _K_NUM, "UV": _K_NUM,
    "AT": _K_AT,
    "OB": _K_BIN, "OD": _K_BIN, "OF": _K_BIN, "OL": _K_BIN, "OV": _K_BIN, "OW": _K_BIN,
    "UN": _K_BIN, "SQ": _K_SQ,
}  # fmt: skip
_NUMBER_FORMAT: Final = {
    "US": ("H", 2), "SS": ("h", 2), "UL": ("L", 4), "SL": ("l", 4),
    "FL": ("f", 4), "FD": ("d", 8), "SV": ("q", 8), "UV": ("Q", 8),
}  # fmt: skip
_NUMBER_SIZE: Final = {vr: size for vr, (_, size) in _NUMBER_FORMAT.items()}
_NUMBER_STRUCT: Final = {
    vr: struct.Struct("<" + fmt).unpack_from for vr, (fmt, _) in _NUMBER_FORMAT.items()
}
_NOTED: Final = frozenset((_CHARSET, _PIXEL_REPRESENTATION, _LUT_DESCRIPTOR, _BITS_ALLOCATED))
# PS3.5 7.1.2: explicit VRs with 2 reserved bytes and a 4-byte length.
_LONG: Final = frozenset(
    ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV")
)
# explicit VR bytes -> (VR, kind, header size)
_EXPLICIT: Final[dict[bytes, tuple[str, int, int]]] = {
    vr.encode(): (vr, kind, 12 if vr in _LONG else 8) for vr, kind in _KIND.items()
}

_IMPLICIT_HEADER = struct.Struct("<HHI").unpack_from
_EXPLICIT_HEADER = struct.Struct("<HH2sH").unpack_from
_U32 = struct.Struct("<I").unpack_from
_U16 = struct.Struct("<H").unpack_from

_KEYS: dict[int, str] = {}  # tag -> "GGGGEEEE"
_DICT_VR: dict[int, str] = {}  # tag -> dictionary VR ("" when unknown)
_PRIVATE_VR: dict[tuple[str, int], str] = {}  # (creator, tag) -> VR
_ENCODINGS: dict[bytes, list[str]] = {}  # raw Specific Character Set -> Python encodings
_CACHE_LIMIT = 65536


class Unsupported(Exception):
    """The data set uses something this encoder does not mirror: use pydicom's path."""


class _Short(Exception):
    """The walk needs bytes past the end of a partial buffer."""


@dataclass(frozen=True, slots=True)
class PixelElement:
    """The top-level pixel data element the walk stopped at."""

    tag: int
    vr: str  # as stored; implicit (or UN) VR: OF/OD for float pixels, else OW/OB by Bits Allocated
    encapsulated: bool  # undefined length (PS3.5 A.4)
    offset: int  # of its tag in the file


@dataclass(slots=True)
class Encoded:
    dataset: dict[str, Any]  # tag key -> PS3.18 F.2 attribute object, keys sorted
    pixels: PixelElement | None
    transfer_syntax: str  # from the File Meta Information


def _key(tag: int) -> str:
    key = _KEYS.get(tag)
    if key is None:
        if len(_KEYS) > _CACHE_LIMIT:
            _KEYS.clear()
        key = _KEYS[tag] = f"{tag:08X}"
    return key


def _dictionary_vr(tag: int) -> str:
    vr = _DICT_VR.get(tag)
    if vr is None:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = ""
        if len(_DICT_VR) > _CACHE_LIMIT:
            _DICT_VR.clear()
        _DICT_VR[tag] = vr
    return vr


def _encodings(raw: bytes) -> list[str]:
    """Python encodings of a Specific Character Set value, as pydicom's reader makes them."""
    encodings = _ENCODINGS.get(raw)
    if encodings is None:
        values = raw.decode("latin-1").rstrip(" \x00").split("\\")
        try:
            encodings = convert_encodings(values[0] if len(values) == 1 else values)
        except (LookupError, ValueError) as exc:
            raise Unsupported(f"Specific Character Set {raw!r}: {exc}") from exc
        if len(_ENCODINGS) > 256:
            _ENCODINGS.clear()
        _ENCODINGS[raw] = encodings
    return encodings


class _Level:
    """What one data set (the top level or an item) knows while it is walked."""

    __slots__ = ("creators", "encodings", "lut_descriptor", "parent", "pixel_data", "pixel_rep")

    def __init__(self, encodings: list[str], parent: _Level | None) -> None:
        self.encodings = encodings
        self.parent = parent
        self.creators: dict[int, str] | None = None  # (group << 8 | block) -> private creator
        self.pixel_rep: bytes | None = None  # raw (0028,0103) value
        self.lut_descriptor: bytes | None = None  # raw (0028,3002) value
        self.pixel_data = False  # a nested (7FE0,0010) is present


class _Walker:
    __slots__ = (
        "bits_allocated",
        "buf",
        "bulk",
        "complete",
        "end",
        "nonascii",
        "pending",
        "pixels",
        "threshold",
    )

    def __init__(self, buf: Any, complete: bool, threshold: int) -> None:
        self.buf = buf
        self.end = len(buf)
        self.complete = complete
        self.threshold = threshold
        self.bulk: list[tuple[dict[str, Any], list[str]]] = []
        self.pending: list[tuple[dict[str, Any], int, bytes, _Level, list[str]]] = []
        self.nonascii = 0  # non-ASCII text values decoded so far
        self.pixels: PixelElement | None = None
        self.bits_allocated = 8

    def short(self, what: str, off: int) -> Exception:
        if self.complete:
            return Unsupported(f"{what} runs past the end of the data (at byte offset {off})")
        return _Short()

    # --------------------------------------------------------------------- text
    def text(self, raw: bytes, level: _Level) -> str:
        """Decode like pydicom's ``decode_bytes`` (its fast path when there is no ESC)."""
        if raw.isascii() and b"\x1b" not in raw:
            return raw.decode("ascii")
        self.nonascii += 1
        encodings = level.encodings
        if b"\x1b" not in raw:
            try:
                return raw.decode(encodings[0])
            except UnicodeError:
                return raw.decode(encodings[0], errors="replace")
            except LookupError as exc:
                raise Unsupported(str(exc)) from exc
        try:
            return decode_bytes(raw, encodings, TEXT_VR_DELIMS)
        except (UnicodeError, LookupError, ValueError) as exc:
            raise Unsupported(str(exc)) from exc

    # --------------------------------------------------------------------- values
    def values(self, vr: str, kind: int, raw: bytes, tag: int, level: _Level) -> list[Any] | None:
        """The JSON "Value" of a non-empty, non-binary, non-sequence element (None: no value)."""
        if kind in (_K_STR, _K_UI):
            text = raw.decode("latin-1").rstrip(" \x00")
            if "\\" not in text:
                return [text] if text else None
            return [v if v else None for v in text.split("\\")]
        if kind == _K_NUM:
            fmt, size = _NUMBER_FORMAT[vr]
            n = len(raw) // size
            if n == 0:
                return None
            if n == 1:
                return [struct.unpack_from("<" + fmt, raw)[0]]
            numbers = list(struct.unpack_from(f"<{n}{fmt}", raw))
            if vr == "SS" and tag in _LUT_DESCRIPTOR_TAGS and numbers[0] < 0:
                numbers[0] += 65536
            return numbers
        if kind == _K_DS:
            text = raw.decode("latin-1").strip().rstrip(" \x00")
            if "\\" not in text:
                return [_ds(text)] if text.strip() else None
            return [_ds(v) if v.strip() else None for v in text.split("\\")]
        if kind == _K_IS:
            text = raw.decode("latin-1").rstrip(" \x00")
            if "\\" not in text:
                return [_is(text)] if text.strip() else None
            return [_is(v) if v.strip() else None for v in text.split("\\")]
        if kind == _K_TEXT:
            text = self.text(raw, level)
            if "\\" not in text:
                text = text.rstrip("\x00 ")
                return [text] if text else None
            return [v.rstrip("\x00 ") or None for v in text.split("\\")]
        if kind == _K_PN:
            text = self.text(raw.rstrip(b"\x00 "), level)
            if "\\" not in text:
                name = _person_name(text)
                return [name] if name is not None else None
            return [_person_name(v) for v in text.split("\\")]
        if kind == _K_LONGTEXT:
            text = self.text(raw, level).rstrip("\x00 ")
            return [text] if text else None
        if kind == _K_AE:
            parts = raw.decode("latin-1").split("\\")
            if len(parts) == 1:
                text = parts[0].strip()
                return [text] if text else None
            return [v.strip() or None for v in parts]
        if kind == _K_UR:
            text = raw.decode("latin-1").rstrip()
            return [text] if text else None
        if kind == _K_AT:
            n = len(raw) // 4
            if n == 0:
                return None
            pairs = struct.unpack_from(f"<{2 * n}H", raw)
            return [f"{pairs[i]:04X}{pairs[i + 1]:04X}" for i in range(0, 2 * n, 2)]
        raise Unsupported(f"no JSON form for VR {vr}")

    def binary(self, vr: str, raw: bytes, length: int, here: list[str]) -> dict[str, Any]:
        """A binary value: BulkDataURI above the threshold (filled in after the walk), else
        InlineBinary (*raw* is read only then)."""
        if length == 0:
            return {"vr": vr}
        if length > self.threshold:
            obj = {"vr": vr, "BulkDataURI": ""}
            self.bulk.append((obj, here))
            return obj
        return {"vr": vr, "InlineBinary": base64.b64encode(raw).decode("ascii")}

    # --------------------------------------------------------------------- VRs
    def private_vr(self, tag: int, level: _Level) -> str:
        """pydicom's VR of a private tag it has no explicit VR for (hooks._private_vr_for_tag)."""
        elem = tag & 0xFFFF
        if 0x0010 <= elem <= 0x00FF:
            return "LO"
        if not elem & 0xFF00 or level.creators is None:
            return "UN"
        creator = level.creators.get(((tag >> 16) << 8) | (elem >> 8))
        if not creator:
            return "UN"
        key = (creator, tag)
        vr = _PRIVATE_VR.get(key)
        if vr is None:
            try:
                vr = private_dictionary_VR(tag, creator)
            except KeyError:
                vr = "UN"
            if len(_PRIVATE_VR) > _CACHE_LIMIT:
                _PRIVATE_VR.clear()
            _PRIVATE_VR[key] = vr
        return vr

    # --------------------------------------------------------------------- structure
    def dataset(
        self, off: int, stop: int | None, implicit: bool, path: list[str], level: _Level, top: bool
    ) -> tuple[dict[str, Any], int]:
        """Walk one data set from *off* to *stop* (None: to its item delimiter, or for the top
        level to the pixel data or the end); return its JSON object and where it ended."""
        buf = self.buf
        end = self.end if stop is None else stop
        if end > self.end:
            raise self.short("item", off)
        threshold = self.threshold
        short = self.short
        keys = _KEYS
        out: dict[str, Any] = {}
        last = -1
        ordered = True
        nonascii_at_start = self.nonascii
        if top and implicit and off + 6 <= end and _looks_explicit(buf, off):
            raise Unsupported("an Implicit VR data set that looks explicit")
        while True:
            if off + 8 > end:
                if off == end and (stop is not None or (top and self.complete)):
                    break
                raise short("data set", off)
            if implicit:
                group, elem, length = _IMPLICIT_HEADER(buf, off)
                vr = ""
                kind = 0
                voff = off + 8
            else:
                group, elem, raw_vr, length = _EXPLICIT_HEADER(buf, off)
                info = _EXPLICIT.get(raw_vr)
                if info is None:
                    if group != 0xFFFE:
                        raise Unsupported(f"VR {raw_vr!r} at byte offset {off}")
                    info = ("", 0, 8)
                    length = _U32(buf, off + 4)[0]
                vr, kind, size = info
                if size == 12:
                    if off + 12 > end:
                        raise short("element header", off)
                    length = _U32(buf, off + 8)[0]
                voff = off + size
            tag = (group << 16) | elem
            if group == 0xFFFE:
                if tag == _ITEM_END and stop is None and not top:
                    return self.finish(out, ordered), off + 8
                raise Unsupported(f"item tag ({group:04X},{elem:04X}) in a data set at {off}")
            if top and tag in PIXEL_TAGS:
                self.pixels = self.pixel_element(tag, vr, length, off)
                break
            if tag <= last:
                ordered = False
            last = tag
            key = keys.get(tag) or _key(tag)

            if length == _UNDEFINED:
                if not (implicit or vr == "UN" or vr == "SQ"):
                    raise Unsupported(f"undefined length for VR {vr} ({key})")
                # pydicom: a tag it does not know, followed by an item, is a sequence
                if (
                    implicit
                    and _dictionary_vr(tag) != "SQ"
                    and (_dictionary_vr(tag) or voff + 4 > end or _U32(buf, voff)[0] != 0xE000FFFE)
                ):
                    raise Unsupported(f"undefined length of {key}")
                # PS3.5 6.2.2: UN of undefined length holds an Implicit VR LE sequence
                items, off = self.sequence(voff, None, implicit or vr == "UN", [*path, key], level)
                out[key] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
                continue

            vend = voff + length
            if vend > end:
                raise short(f"value of {key}", off)
            off = vend
            if elem == 0:
                continue  # group lengths are not in the JSON model (PS3.18 F.2)

            if top and length > threshold and tag != _CHARSET:
                # the pydicom path defers these and types them by stored/dictionary VR alone
                deferred_vr = vr
                if implicit:
                    deferred_vr = _dictionary_vr(tag) or "UN"
                    if " or " in deferred_vr:
                        deferred_vr = "OW"
                if deferred_vr in BULK_VRS:
                    obj = {"vr": deferred_vr, "BulkDataURI": ""}
                    self.bulk.append((obj, [key]))
                    out[key] = obj
                    continue
            if group & 1 and 0x0010 <= elem <= 0x00FF:
                creators = level.creators
                if creators is None:
                    creators = level.creators = {}
                creators[(group << 8) | elem] = self.text(buf[voff:vend], level).rstrip("\x00 ")
            if implicit or vr == "UN":
                vr = self.implicit_vr(tag, vr, length, level)
                kind = _KIND.get(vr, 0)
                if not kind:  # US or SS, US or OW: resolved once the whole data set is read
                    obj = {"vr": vr}
                    raw = buf[voff:vend]
                    self.pending.append((obj, tag, raw, level, [*path, key]))
                    if tag == _LUT_DESCRIPTOR:
                        level.lut_descriptor = raw
                    out[key] = obj
                    continue

            if kind == _K_BIN:
                if tag == 0x7FE00010:
                    level.pixel_data = True
                out[key] = self.binary(
                    vr, buf[voff:vend] if length <= threshold else b"", length, [*path, key]
                )
            elif kind == _K_SQ:
                items, _ = self.sequence(voff, vend, implicit, [*path, key], level)
                out[key] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
            else:
                raw = buf[voff:vend]
                if tag in _NOTED:
                    self.note(tag, vr, raw, level, top, nonascii_at_start)
                if not length:
                    out[key] = {"vr": vr}
                    continue
                # the commonest cases inline; values() has them all
                if kind in (_K_STR, _K_UI):
                    text = raw.decode("latin-1").rstrip(" \x00")
                    if "\\" not in text:
                        out[key] = {"vr": vr, "Value": [text]} if text else {"vr": vr}
                        continue
                elif kind == _K_NUM and length == _NUMBER_SIZE[vr]:
                    out[key] = {"vr": vr, "Value": [_NUMBER_STRUCT[vr](raw)[0]]}
                    continue
                value = self.values(vr, kind, raw, tag, level)
                out[key] = {"vr": vr, "Value": value} if value is not None else {"vr": vr}
        return self.finish(out, ordered), off

    def note(
        self, tag: int, vr: str, raw: bytes, level: _Level, top: bool, nonascii_at_start: int
    ) -> None:
        """Remember what later elements are read by (charset, Pixel Representation, ...)."""
        if tag == _CHARSET:
            if self.nonascii != nonascii_at_start:
                raise Unsupported("Specific Character Set after non-ASCII text")
            level.encodings = _encodings(raw)
        elif tag == _PIXEL_REPRESENTATION:
            level.pixel_rep = raw
        elif tag == _LUT_DESCRIPTOR:
            level.lut_descriptor = raw
        elif top and tag == _BITS_ALLOCATED and vr == "US" and len(raw) >= 2:
            self.bits_allocated = _U16(raw)[0]

    def implicit_vr(self, tag: int, vr: str, length: int, level: _Level) -> str:
        """pydicom's VR of an element read without one (implicit VR), or stored as UN
        (replaced by the known VR, hooks.raw_element_vr); ambiguous VRs resolved where
        pydicom resolves them without the rest of the data set."""
        if tag >> 16 & 1:
            new = self.private_vr(tag, level)
        elif vr == "UN" and length >= 0xFFFF:
            return "UN"
        else:
            new = _dictionary_vr(tag) or ("UL" if not tag & 0xFFFF else "UN")
        if vr == "UN" and (new == "SQ" or " or " in new):
            raise Unsupported(f"UN standing for {new} ({tag:08X})")
        if " or " in new:
            if (
                tag == 0x7FE00010  # nested pixel data (icon images): implicit VR is OW
                or tag in _WAVEFORM_OB_OW_TAGS
                or ((tag >> 16) in range(0x6000, 0x601F, 2) and tag & 0xFFFF == 0x3000)
            ):
                return "OW"
            if tag not in _US_OR_SS_TAGS and tag != _LUT_DATA:
                raise Unsupported(f"ambiguous VR {new} of {tag:08X}")
        return new

    def resolve_pending(self) -> None:
        """US or SS by the nearest Pixel Representation; LUT Data US or OW by its descriptor
        (pydicom's ``correct_ambiguous_vr_element``)."""
        for obj, tag, raw, level, here in self.pending:
            if tag == _LUT_DATA:
                descriptor = level.lut_descriptor
                if descriptor is None or len(descriptor) < 2:
                    raise Unsupported("LUT Data without a LUT Descriptor")
                if descriptor[:2] != b"\x01\x00":
                    obj.clear()
                    obj.update(self.binary("OW", raw, len(raw), here))
                    continue
                vr = "US"
            else:
                pixel_rep: int | None = None
                at: _Level | None = level
                while at is not None:
                    if at.pixel_rep is not None:
                        if not at.pixel_rep:
                            raise Unsupported("empty Pixel Representation")
                        pixel_rep = int(b"\x01" in at.pixel_rep)
                        break
                    at = at.parent
                if pixel_rep is None:
                    if level.pixel_data:
                        raise Unsupported("US or SS beside pixel data without Pixel Representation")
                    pixel_rep = 0
                vr = "US" if pixel_rep == 0 else "SS"
            obj["vr"] = vr
            value = self.values(vr, _K_NUM, raw, -1, level) if raw else None
            if value is not None:
                obj["Value"] = value

    @staticmethod
    def finish(out: dict[str, Any], ordered: bool) -> dict[str, Any]:
        return out if ordered else dict(sorted(out.items()))

    def sequence(
        self, off: int, stop: int | None, implicit: bool, here: list[str], level: _Level
    ) -> tuple[list[dict[str, Any]], int]:
        buf = self.buf
        items: list[dict[str, Any]] = []
        while True:
            if stop is not None and off >= stop:
                if off > stop:
                    raise Unsupported(f"an item runs past its sequence (at byte offset {off})")
                return items, off
            if off + 8 > self.end:
                raise self.short("item header", off)
            group, elem, length = _IMPLICIT_HEADER(buf, off)
            tag = (group << 16) | elem
            if tag == _SEQUENCE_END and stop is None:
                return items, off + 8
            if tag != _ITEM:
                raise Unsupported(f"expected an item, found ({group:04X},{elem:04X}) at {off}")
            child = _Level(level.encodings, level)
            path = [*here, str(len(items))]
            if length == _UNDEFINED:
                item, off = self.dataset(off + 8, None, implicit, path, child, False)
            else:
                item, off = self.dataset(off + 8, off + 8 + length, implicit, path, child, False)
            items.append(item)

    def pixel_element(self, tag: int, vr: str, length: int, off: int) -> PixelElement:
        """frames.locate's view of the pixel data element."""
        if not vr or vr == "UN":
            vr = {0x7FE00008: "OF", 0x7FE00009: "OD"}.get(
                tag, "OW" if self.bits_allocated > 8 else "OB"
            )
        return PixelElement(tag, vr, length == _UNDEFINED, off)


def _looks_explicit(buf: Any, off: int) -> bool:
    """pydicom reads a top-level data set whose first element has VR-like bytes (two capital
    letters) after its tag as explicit VR, whatever the transfer syntax says."""
    return 0x40 < buf[off + 4] < 0x5B and 0x40 < buf[off + 5] < 0x5B


def _ds(text: str) -> float | str:
    """A DS value as a JSON number; kept as a string when it is not a finite number."""
    try:
        number = float(text)
    except ValueError:
        return text.strip()
    return number if math.isfinite(number) else text.strip()


def _is(text: str) -> int | str:
    """An IS value as a JSON number (pydicom also reads "1.0" as 1); kept as a string when it
    is not an integer."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text.strip()
    if math.isfinite(number) and number.is_integer():
        return int(number)
    return text.strip()


def _person_name(value: str) -> dict[str, str] | None:
    groups = value.split("=")
    while groups and not groups[-1]:
        groups.pop()
    if not groups:
        return None
    name = {"Alphabetic": groups[0]}
    if len(groups) > 1:
        name["Ideographic"] = groups[1]
        if len(groups) > 2:
            name["Phonetic"] = groups[2]
    return name


def encode(
    buf: Any,
    bulk_uri: Callable[[Mapping[str, Any], list[str]], str],
    threshold: int,
    complete: bool = True,
) -> Encoded:
    """The DICOM JSON of the Part 10 file in *buf* (bytes or an mmap) up to its pixel data.

    Binary values longer than *threshold* bytes get ``bulk_uri(dataset, tag_path)``, called
    once the whole data set is encoded (so the URI may use e.g. its Study Instance UID), with
    the element's path such as ``["00880200", "0", "7FE00010"]``. With *complete* False, *buf*
    may be the start of the file and ``_Short`` is raised when the header runs past it.
    Raises Unsupported when the pydicom path must be used instead."""
    try:
        meta = header.file_meta(buf)
    except header.DatasetFormatError as exc:
        raise Unsupported(str(exc)) from exc
    ts = meta.transfer_syntax
    if ts in UNSUPPORTED_SYNTAXES:
        raise Unsupported(f"transfer syntax {ts}")
    walker = _Walker(buf, complete, threshold)
    top = _Level(_DEFAULT_ENCODINGS, None)
    implicit = ts == IMPLICIT_VR_LITTLE_ENDIAN
    dataset, _ = walker.dataset(meta.dataset_offset, None, implicit, [], top, True)
    if walker.pending:
        walker.resolve_pending()
    for obj, here in walker.bulk:
        obj["BulkDataURI"] = bulk_uri(dataset, here)
    return Encoded(dataset, walker.pixels, ts)


HEAD = 1 << 16


def encode_file(
    path: Path, bulk_uri: Callable[[Mapping[str, Any], list[str]], str], threshold: int
) -> Encoded:
    """:func:`encode` of the file at *path*, reading its first 64 KiB and mapping the whole
    file only when the header is longer. Raises OSError, or Unsupported."""
    with open(path, "rb") as fh:
        head = fh.read(HEAD)
        if len(head) < HEAD:
            return encode(head, bulk_uri, threshold)
        try:
            return encode(head, bulk_uri, threshold, complete=False)
        except _Short:
            pass
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return encode(mm, bulk_uri, threshold)
