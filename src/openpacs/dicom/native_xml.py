"""The Native DICOM Model (PS3.19 Annex A, ``application/dicom+xml``) read into DICOM JSON (PS3.18
F.2), so that STOW-RS XML metadata takes the same path as JSON metadata (seed 002 T3.22 accepts
both).

Owns: mapping ``NativeDicomModel`` documents — ``DicomAttribute`` with ``tag``/``vr``/
``privateCreator``, ``Value``, ``PersonName`` (Alphabetic/Ideographic/Phonetic name components),
``Item`` of sequences, ``BulkData uri``, ``InlineBinary`` — to the equivalent JSON object
(numbers for the binary numeric VRs and IS/DS, ``null`` for empty values, in the order of their
``number`` attribute); refusing documents with a DOCTYPE (no entity expansion at all) or that
are not the model. Written here because neither pydicom nor highdicom reads PS3.19 XML; the
XML parsing itself is the standard library's expat (external entities are never fetched).
Must not: build data sets or files (``dicom/json_instance.py`` does), or know HTTP.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

from pydicom.datadict import dictionary_VR

MAX_DOCUMENT = 64 << 20
TAG_RE = re.compile(r"[0-9A-Fa-f]{8}")
VR_RE = re.compile(r"[A-Z]{2}( or [A-Z]{2})*")  # "OB or OW": ambiguous, resolved downstream
INTEGER_VRS = frozenset({"SS", "US", "SL", "UL", "SV", "UV", "IS"})
FLOAT_VRS = frozenset({"FL", "FD", "DS"})
NAME_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
NAME_PARTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")


class NativeXmlError(ValueError):
    """The document is not a Native DICOM Model instance; the message says why."""


def _local(tag: str) -> str:
    """An element's name without its namespace (PS3.19 documents may or may not use one)."""
    return tag.rsplit("}", 1)[-1]


def _numbered(children: list[ET.Element], name: str) -> list[ET.Element]:
    found = [c for c in children if _local(c.tag) == name]
    try:
        return sorted(found, key=lambda c: int(c.get("number", "0")))
    except ValueError:
        raise NativeXmlError(f"{name} with a non-numeric number attribute") from None


def _value(text: str | None, vr: str, tag: str) -> Any:
    text = (text or "").strip() if vr not in ("ST", "LT", "UT", "UC") else (text or "")
    if text == "":
        return None
    try:
        if vr in INTEGER_VRS:
            return int(text)
        if vr in FLOAT_VRS:
            number = float(text)
            return int(number) if vr == "DS" and number.is_integer() and "." not in text else number
    except ValueError:
        raise NativeXmlError(f"({tag}) {vr} value {text[:40]!r} is not a number") from None
    return text


def _person_name(element: ET.Element) -> dict[str, str]:
    """A PersonName element as the JSON object of its component groups (^-separated)."""
    out = {}
    for group in NAME_GROUPS:
        node = next((c for c in element if _local(c.tag) == group), None)
        if node is None:
            continue
        parts = [(next((c for c in node if _local(c.tag) == p), None)) for p in NAME_PARTS]
        values = ["" if p is None else (p.text or "") for p in parts]
        while values and values[-1] == "":
            values.pop()
        out[group] = "^".join(values)
    return out


def _attributes(parent: ET.Element) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for node in parent:
        if _local(node.tag) != "DicomAttribute":
            continue
        tag = node.get("tag", "")
        vr = node.get("vr", "")
        if not TAG_RE.fullmatch(tag):
            raise NativeXmlError(f"DicomAttribute with tag {tag[:20]!r} (expected 8 hex digits)")
        tag = tag.upper()
        if not vr:  # PS3.19 requires it; take the dictionary's when a sender leaves it out
            try:
                vr = dictionary_VR(int(tag, 16))
            except KeyError:
                raise NativeXmlError(f"DicomAttribute {tag} without a vr attribute") from None
        if not VR_RE.fullmatch(vr):
            raise NativeXmlError(f"DicomAttribute {tag} with an invalid vr {vr[:20]!r}")
        children = list(node)
        element: dict[str, Any] = {"vr": vr}
        bulk = next((c for c in children if _local(c.tag) == "BulkData"), None)
        inline = next((c for c in children if _local(c.tag) == "InlineBinary"), None)
        if vr == "SQ":
            items = [_attributes(item) for item in _numbered(children, "Item")]
            if items:
                element["Value"] = items
        elif bulk is not None:
            uri = bulk.get("uri") or bulk.get("uuid")
            if not uri:
                raise NativeXmlError(f"BulkData of {tag} without a uri")
            element["BulkDataURI"] = uri
        elif inline is not None:
            element["InlineBinary"] = "".join((inline.text or "").split())
        elif vr == "PN":
            names = [_person_name(n) for n in _numbered(children, "PersonName")]
            if names:
                element["Value"] = [n or None for n in names]
        else:
            values = [_value(v.text, vr, tag) for v in _numbered(children, "Value")]
            if values:
                element["Value"] = values
        out[tag] = element
    return out


def to_json(document: bytes) -> dict[str, Any]:
    """One Native DICOM Model document (one instance) as a DICOM JSON object."""
    if len(document) > MAX_DOCUMENT:
        raise NativeXmlError(f"XML document larger than {MAX_DOCUMENT} bytes")
    if b"<!DOCTYPE" in document or b"<!ENTITY" in document:
        raise NativeXmlError("XML with a DOCTYPE or entity declarations is not accepted")
    try:
        root = ET.fromstring(document)
    except ET.ParseError as exc:
        raise NativeXmlError(f"not well-formed XML: {exc}") from None
    if _local(root.tag) != "NativeDicomModel":
        raise NativeXmlError(f"root element is {_local(root.tag)}, not NativeDicomModel")
    return _attributes(root)
