"""HL7 v2 order and patient messages → openpacs order events, and the ACK for any input.

Owns: reading one HL7 v2 message (segment ends ``\\r``, ``\\n`` or ``\\r\\n``; bytes decoded with
the MSH-18 character set), mapping it onto the domain events of
:mod:`openpacs.services.orders` and writing the original-mode acknowledgement:

* ``ORM^O01`` (HL7 v2.3.1, IHE RAD-2/RAD-4/RAD-13 with the ZDS segment),
* ``OMI^O23`` (HL7 v2.5.1, IHE RAD-4/RAD-13 v2.5.1 option with IPC segments),
* ``ADT^A08``/``ADT^A31`` (patient update) and ``ADT^A40`` (merge, IHE RAD-12).

Every field map, code table and error code is data below, with the seed table or standard it
comes from beside it; ``docs/hl7.md`` shows the same tables (a test keeps the two in step).
Anything wrong with a message becomes :class:`HL7MappingError` naming the HL7 field
(``OBR-4``) and the HL7 table 0357 error code, never another exception, and :func:`ack`
answers even bytes that are not HL7 at all. Pure functions: no sockets (MLLP is
``hl7.mllp``), no database (the worklist service applies the events).

Why python-hl7: it is the small, dependency-free parser the MLLP listener already uses; it
reads the separators from MSH-1/MSH-2 and splits segments and fields into the ``hl7.Message``
tree kept on :class:`ParsedMessage`. hl7apy's validating parser would refuse the loose
real-world feeds this module must instead answer with a precise ERR. Written by hand, because
no library does it: the IHE HL7→DICOM worklist mapping itself; picking the MSH-18 character
set before the bytes are decoded; HL7 escape sequences (python-hl7's ``unescape`` raises on a
malformed ``\\.sp..\\`` and decodes ``\\X..\\`` as Latin-1 whatever MSH-18 says); component
access from the raw field text (python-hl7's tree changes shape with the separators present);
and the ACK writer (python-hl7's ``create_ack`` needs a parsed message and writes no ERR).
"""

from __future__ import annotations

import contextlib
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Literal

import hl7

from openpacs.services.orders import (
    CancelOrder,
    ChangeOrder,
    Code,
    NewOrder,
    OrderError,
    OrderEvent,
    OtherId,
    Patient,
    PatientMerge,
    PatientUpdate,
    WorklistItem,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CHARSETS",
    "ERROR_CODES",
    "MERGE_MAP",
    "MESSAGE_TYPES",
    "OMI_MAP",
    "ORDER_CONTROL",
    "ORM_MAP",
    "PATIENT_MAP",
    "PRIORITY_MAP",
    "SEX_MAP",
    "FieldRule",
    "HL7MappingError",
    "MappingOptions",
    "ParsedMessage",
    "ack",
    "parse",
    "to_events",
]

AckCode = Literal["AA", "AE", "AR"]

# --------------------------------------------------------------------------------------------
# Tables (data). Each cites where it comes from; docs/hl7.md shows every entry.
# --------------------------------------------------------------------------------------------

# HL7 v2.5 Table 0357 "Message error condition codes": code -> (text, MSA-1 when it is raised).
# AR (reject) where the message itself cannot be handled (HL7 v2.5 2.9.2: unsupported type,
# event, processing id or version, or unreadable); AE (error) where its content is wrong.
ERROR_CODES: dict[str, tuple[str, AckCode]] = {
    "100": ("Segment sequence error", "AE"),
    "101": ("Required field missing", "AE"),
    "102": ("Data type error", "AE"),
    "103": ("Table value not found", "AE"),
    "200": ("Unsupported message type", "AR"),
    "201": ("Unsupported event code", "AR"),
    "202": ("Unsupported processing id", "AR"),
    "203": ("Unsupported version id", "AR"),
    "204": ("Unknown key identifier", "AE"),
    "205": ("Duplicate key identifier", "AE"),
    "206": ("Application record locked", "AR"),
    "207": ("Application internal error", "AE"),
}

# MSH-9 message type^trigger event handled, and the transaction it implements.
MESSAGE_TYPES: dict[str, str] = {
    "ORM^O01": "IHE RAD-2/RAD-4/RAD-13, HL7 v2.3.1 (ZDS carries the Study Instance UID)",
    "OMI^O23": "IHE RAD-4/RAD-13 HL7 v2.5.1 option (one IPC per Scheduled Procedure Step)",
    "ADT^A08": "IHE RAD-12 Patient Update: update patient information",
    "ADT^A31": "Update person information (handled as ADT^A08)",
    "ADT^A40": "IHE RAD-12 Patient Update: merge patient - patient identifier list",
}

# MSH-18 (HL7 v2.5 Table 0211 "Alternate character sets") -> Python codec. The first
# repetition of MSH-18 is the message's character set; an empty MSH-18 means the
# ``default_charset`` of :func:`parse`. In-line switching (\C..\, \M..\) is not supported.
CHARSETS: dict[str, str] = {
    "ASCII": "iso8859-1",  # declared ASCII; read as Latin-1 so stray 8-bit bytes survive
    "8859/1": "iso8859-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",  # ambiguous in Table 0211; UTF-8 is what senders mean in practice
    "ISO IR6": "iso8859-1",
    "ISO IR100": "iso8859-1",  # DICOM's name for Latin-1, seen in MSH-18 in the wild
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "BIG-5": "big5",
}

# ORC-1 order control (HL7 v2.5 Table 0119) -> what openpacs does with the order group.
# IHE RAD TF-2 4.4 (RAD-4) sends NW; 4.13 (RAD-13 Procedure Updated) sends XO, CA, DC (and
# SC for status). Step status is owned by MPPS here, so SC is accepted without an event.
ORDER_CONTROL: dict[str, Literal["new", "change", "cancel", "discontinue", "ignore"]] = {
    "NW": "new",  # new order
    "XO": "change",  # change order/service request
    "XX": "change",  # order changed, unsolicited
    "CA": "cancel",  # cancel order request
    "OC": "cancel",  # order cancelled
    "CR": "cancel",  # cancelled as requested
    "DC": "discontinue",  # discontinue order request
    "OD": "discontinue",  # order discontinued
    "DR": "discontinue",  # discontinued as requested
    "SC": "ignore",  # status changed: accepted (AA), no event
}

# Priority (ORC-7.6 / OBR-27.6 TQ component 6; TQ1-9 in v2.5; HL7 Table 0027) -> Requested
# Procedure Priority (0040,1003), whose Defined Terms are STAT, HIGH, ROUTINE, MEDIUM, LOW
# (PS3.3 C.4.11). Follows dcm4chee-arc hl7-order2dcm.xsl; PRN -> LOW is ours. Empty -> ROUTINE.
PRIORITY_MAP: dict[str, str] = {
    "S": "STAT",  # stat
    "A": "HIGH",  # ASAP
    "P": "HIGH",  # preoperative
    "C": "HIGH",  # callback
    "T": "MEDIUM",  # timing critical
    "R": "ROUTINE",  # routine
    "PRN": "LOW",  # as needed
}

# PID-8 administrative sex (HL7 v2.5 Table 0001) -> Patient's Sex (0010,0040) M/F/O
# (seed 000 T3.7 "Dicom Sex code mapped from HL7-PID.8"). U (unknown) becomes an empty value,
# which is what DICOM means by unknown; O is reserved for a known "other".
SEX_MAP: dict[str, str | None] = {
    "M": "M",
    "F": "F",
    "O": "O",
    "A": "O",  # ambiguous
    "N": "O",  # not applicable
    "X": "O",  # non-binary (v2.9)
    "U": None,  # unknown -> empty
}


@dataclass(frozen=True)
class FieldRule:
    """One row of a field map: where an attribute comes from and why.

    ``sources`` are tried in order; the first non-empty one wins. A source is ``SEG-n`` (field,
    first component), ``SEG-n.c`` (component; for a coded field the CE triplet starting there)
    or ``SEG-n.c.s`` (subcomponent).
    """

    tag: str
    name: str
    sources: tuple[str, ...]
    ref: str
    note: str = ""


# Patient (seed 000 Table 3.7, the rows "from HL7-PID..." / "from HL7-PV1...").
PATIENT_MAP: dict[str, FieldRule] = {
    "patient_id": FieldRule(
        "(0010,0020)",
        "Patient ID",
        ("PID-3.1",),
        "seed 000 T3.7",
        "the primary repetition of PID-3: MappingOptions.primary_issuer if given, else the first "
        "with identifier type (PID-3.5) MR, else the first; required",
    ),
    "issuer": FieldRule(
        "(0010,0021)",
        "Issuer of Patient ID",
        ("PID-3.4.1", "PID-3.4.2"),
        "seed 000 T3.7",
        "assigning authority of the primary repetition: namespace ID, else universal ID",
    ),
    "other_ids": FieldRule(
        "(0010,1002)",
        "Other Patient IDs Sequence",
        ("PID-3",),
        "seed 000 T3.7",
        "every other repetition: Patient ID = .1, Issuer = .4, Type of Patient ID = TEXT",
    ),
    "name": FieldRule(
        "(0010,0010)",
        "Patient's Name",
        ("PID-5",),
        "seed 000 T3.7",
        "first repetition; XPN family^given^middle^suffix^prefix reordered to DICOM "
        "family^given^middle^prefix^suffix",
    ),
    "birth_date": FieldRule(
        "(0010,0030)",
        "Patient's Birth Date",
        ("PID-7",),
        "seed 000 T3.7",
        "YYYYMMDD of the TS (time dropped); YYYY or YYYYMM -> empty; invalid -> 102",
    ),
    "sex": FieldRule(
        "(0010,0040)",
        "Patient's Sex",
        ("PID-8",),
        "seed 000 T3.7",
        "SEX_MAP; unknown code -> 103",
    ),
    "admission_id": FieldRule(
        "(0038,0010)",
        "Admission ID",
        ("PV1-19.1",),
        "seed 000 T3.7",
        "visit number",
    ),
    "location": FieldRule(
        "(0038,0300)",
        "Current Patient Location",
        ("PV1-3.1",),
        "seed 000 T3.7",
        "point of care",
    ),
}

# ADT^A40 merge (IHE RAD TF-2 4.12 RAD-12; HL7 v2.5 3.3.40): the surviving patient is PID.
MERGE_MAP: dict[str, FieldRule] = {
    "merged_id": FieldRule(
        "(0010,0020)",
        "Patient ID (merged)",
        ("MRG-1.1",),
        "IHE RAD TF-2 4.12",
        "prior patient identifier list; repetition chosen as for PID-3; required",
    ),
    "merged_issuer": FieldRule(
        "(0010,0021)",
        "Issuer of Patient ID (merged)",
        ("MRG-1.4.1", "MRG-1.4.2"),
        "IHE RAD TF-2 4.12",
        "assigning authority of the chosen repetition",
    ),
}

_IHE_B = "IHE RAD TF-2 Table B-1"
_IHE_44 = "IHE RAD TF-2 4.4 (RAD-4)"

# Order attributes the two order messages share (IHE RAD TF-2 Appendix B "HL7 order mapping
# to DICOM MWL", seed 000 T3.7 and seed 001 T3.2 for what the worklist returns).
_ORDER_COMMON: dict[str, FieldRule] = {
    "requested_procedure_codes": FieldRule(
        "(0032,1064)",
        "Requested Procedure Code Sequence",
        ("OBR-44.1", "OBR-4.1"),
        _IHE_B,
        "CE code^text^coding system; OBR-44 procedure code, else the universal service ID; "
        "empty coding system -> MappingOptions.default_coding_scheme",
    ),
    "requested_procedure_description": FieldRule(
        "(0032,1060)",
        "Requested Procedure Description",
        ("OBR-44.2", "OBR-4.2"),
        _IHE_B,
        "text of the procedure code (LO, cut at 64)",
    ),
    "requesting_physician": FieldRule(
        "(0032,1032)",
        "Requesting Physician",
        ("OBR-16", "ORC-12"),
        "seed 000 T3.7 (SR.OrderingProvider)",
        "XCN id^family^given^middle^suffix^prefix -> PN",
    ),
    "referring_physician": FieldRule(
        "(0008,0090)",
        "Referring Physician's Name",
        ("PV1-8",),
        "seed 000 T3.7 (SR.Referrer)",
        "XCN -> PN, first repetition",
    ),
    "requesting_service": FieldRule(
        "(0032,1033)",
        "Requesting Service",
        ("ORC-17.2", "ORC-17.1"),
        "seed 000 T3.7 (SR.EnteringOrganisation)",
        "entering organization: text, else code (LO, cut at 64)",
    ),
    "placer_order_number": FieldRule(
        "(0040,2016)",
        "Placer Order Number / Imaging Service Request",
        ("ORC-2.1", "OBR-2.1"),
        _IHE_B,
        "how RAD-13 updates and cancels find the order",
    ),
    "filler_order_number": FieldRule(
        "(0040,2017)",
        "Filler Order Number / Imaging Service Request",
        ("ORC-3.1", "OBR-3.1"),
        _IHE_B,
        "",
    ),
    "reason": FieldRule(
        "(0040,1002)",
        "Reason for the Requested Procedure",
        ("OBR-31.2", "OBR-31.1", "OBR-13"),
        _IHE_B,
        "reason for study text, else its code, else relevant clinical info (LO, cut at 64)",
    ),
    "comments": FieldRule(
        "(0040,1400)",
        "Requested Procedure Comments",
        ("NTE-3",),
        _IHE_B,
        "the NTE segments after the OBR, one line each",
    ),
    "performing_physician": FieldRule(
        "(0040,0006)",
        "Scheduled Performing Physician's Name",
        ("OBR-34.1",),
        _IHE_B,
        "technician: subcomponents id&family&given&middle&suffix&prefix -> PN",
    ),
}

# ORM^O01, HL7 v2.3.1 (IHE RAD TF-2 4.4.4.1 and Table B-1): one ORC/OBR group per Requested
# Procedure and its Scheduled Procedure Step; the ZDS after the OBR carries the Study UID.
ORM_MAP: dict[str, FieldRule] = {
    "accession_number": FieldRule(
        "(0008,0050)", "Accession Number", ("OBR-18",), _IHE_B, "placer field 1; required"
    ),
    "requested_procedure_id": FieldRule(
        "(0040,1001)", "Requested Procedure ID", ("OBR-19",), _IHE_B, "placer field 2; required"
    ),
    "sps_id": FieldRule(
        "(0040,0009)",
        "Scheduled Procedure Step ID",
        ("OBR-20",),
        _IHE_B,
        "filler field 1; required",
    ),
    "study_uid": FieldRule(
        "(0020,000D)",
        "Study Instance UID",
        ("ZDS-1.1",),
        _IHE_44,
        "ZDS after the OBR; missing -> new_uid(), one per Requested Procedure",
    ),
    "modality": FieldRule(
        "(0008,0060)",
        "Modality",
        ("OBR-24",),
        _IHE_B,
        "diagnostic service section ID; upper-cased; required",
    ),
    "sps_start_date": FieldRule(
        "(0040,0002)",
        "Scheduled Procedure Step Start Date",
        ("OBR-27.4", "ORC-7.4"),
        _IHE_B,
        "quantity/timing start date/time; none -> today",
    ),
    "sps_start_time": FieldRule(
        "(0040,0003)",
        "Scheduled Procedure Step Start Time",
        ("OBR-27.4", "ORC-7.4"),
        _IHE_B,
        "HHMMSS of the same TS (missing minutes/seconds -> 00; no time -> 000000)",
    ),
    "priority": FieldRule(
        "(0040,1003)",
        "Requested Procedure Priority",
        ("OBR-27.6", "ORC-7.6"),
        _IHE_B,
        "PRIORITY_MAP; unknown code -> 103",
    ),
    "protocol_codes": FieldRule(
        "(0040,0008)",
        "Scheduled Protocol Code Sequence",
        ("OBR-4.4", "OBR-4.1"),
        _IHE_B,
        "universal service ID alternate triplet (components 4-6) where IHE puts the protocol, "
        "else components 1-3",
    ),
    "sps_description": FieldRule(
        "(0040,0007)",
        "Scheduled Procedure Step Description",
        ("OBR-4.5", "OBR-4.2"),
        _IHE_B,
        "text of the protocol code (LO, cut at 64)",
    ),
    "station_ae": FieldRule(
        "(0040,0001)",
        "Scheduled Station AE Title",
        (),
        _IHE_B,
        "not carried by RAD-4 v2.3.1; MappingOptions.orm_station_ae_field names a field "
        "(e.g. OBR-21 or ORC-18) for feeds that send it",
    ),
    **_ORDER_COMMON,
}

# OMI^O23, HL7 v2.5.1 (IHE RAD TF-2 4.4.4.2, IPC segment): ORC, TQ1, OBR, then one IPC per
# Scheduled Procedure Step.
OMI_MAP: dict[str, FieldRule] = {
    "accession_number": FieldRule(
        "(0008,0050)", "Accession Number", ("IPC-1.1",), _IHE_44, "required"
    ),
    "requested_procedure_id": FieldRule(
        "(0040,1001)", "Requested Procedure ID", ("IPC-2.1",), _IHE_44, "required"
    ),
    "study_uid": FieldRule(
        "(0020,000D)",
        "Study Instance UID",
        ("IPC-3.1",),
        _IHE_44,
        "missing -> new_uid(), one per Requested Procedure",
    ),
    "sps_id": FieldRule(
        "(0040,0009)", "Scheduled Procedure Step ID", ("IPC-4.1",), _IHE_44, "required"
    ),
    "modality": FieldRule(
        "(0008,0060)", "Modality", ("IPC-5.1",), _IHE_44, "upper-cased; required"
    ),
    "protocol_codes": FieldRule(
        "(0040,0008)",
        "Scheduled Protocol Code Sequence",
        ("IPC-6.1", "OBR-4.4", "OBR-4.1"),
        _IHE_44,
        "every repetition of IPC-6; none -> as ORM^O01 from OBR-4",
    ),
    "sps_description": FieldRule(
        "(0040,0007)",
        "Scheduled Procedure Step Description",
        ("IPC-6.2", "OBR-4.5", "OBR-4.2"),
        _IHE_44,
        "text of the first protocol code (LO, cut at 64)",
    ),
    "station_name": FieldRule("(0040,0010)", "Scheduled Station Name", ("IPC-7.1",), _IHE_44, "SH"),
    "sps_location": FieldRule(
        "(0040,0011)",
        "Scheduled Procedure Step Location",
        ("IPC-8.1",),
        _IHE_44,
        "first repetition (SH)",
    ),
    "station_ae": FieldRule(
        "(0040,0001)",
        "Scheduled Station AE Title",
        ("IPC-9",),
        _IHE_44,
        "first repetition (WorklistItem holds one AE title)",
    ),
    "sps_start_date": FieldRule(
        "(0040,0002)",
        "Scheduled Procedure Step Start Date",
        ("TQ1-7.1", "ORC-7.4"),
        _IHE_44,
        "TQ1 start date/time; none -> today",
    ),
    "sps_start_time": FieldRule(
        "(0040,0003)",
        "Scheduled Procedure Step Start Time",
        ("TQ1-7.1", "ORC-7.4"),
        _IHE_44,
        "HHMMSS of the same TS",
    ),
    "priority": FieldRule(
        "(0040,1003)",
        "Requested Procedure Priority",
        ("TQ1-9.1", "ORC-7.6"),
        _IHE_44,
        "PRIORITY_MAP; unknown code -> 103",
    ),
    **_ORDER_COMMON,
}

# DICOM value length limits (PS3.5 Table 6.2-1) of what is mapped. Identifiers that are too
# long are refused (102: cutting an ID would make it another ID); text is cut.
_ID_LIMITS = {"SH": 16, "LO": 64}
_TEXT_LIMIT = 64  # LO
_LT_LIMIT = 10240  # LT (Requested Procedure Comments)

# OrderError.field labels of services/orders.py -> the attribute of the maps above, so an
# error raised while building a domain object still names the HL7 field.
_ORDER_ERROR_ATTRIBUTES = {
    "PID-3": "patient_id",
    "Patient ID": "patient_id",
    "Issuer of Patient ID": "issuer",
    "Patient's Birth Date": "birth_date",
    "Patient's Sex": "sex",
    "Accession Number": "accession_number",
    "Requested Procedure ID": "requested_procedure_id",
    "Scheduled Procedure Step ID": "sps_id",
    "Study Instance UID": "study_uid",
    "Modality": "modality",
    "SPS Start Date": "sps_start_date",
    "SPS Start Time": "sps_start_time",
    "Scheduled Station AE Title": "station_ae",
    "Priority": "priority",
    "Scheduled Station Name": "station_name",
    "SPS Description": "sps_description",
    "Requested Procedure Description": "requested_procedure_description",
}

# How a person name field is laid out: XPN starts with the family name, XCN/CNN with an ID.
_XPN_FIELDS = {"PID-5"}

_DEFAULT_VERSION = "2.5.1"  # ACK version when the incoming one cannot be read
_SEGMENT_ID = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_REF = re.compile(r"^([A-Z][A-Z0-9]{2})(?:-(\d+)(?:\.(\d+)(?:\.(\d+))?)?)?$")
_TS = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d{1,4})?(?:[+-]\d{4})?$")
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_MODALITY = re.compile(r"^[A-Z0-9_]{1,16}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_VERSION = re.compile(r"^2\.\d+(\.\d+)?$")


# --------------------------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------------------------


class HL7MappingError(ValueError):
    """A message that cannot be used, naming the HL7 field and the Table 0357 error code.

    ``field`` is ``SEG-n`` (``'OBR-4'``), ``SEG`` for a missing segment, or empty when no field
    can be named; ``occurrence`` is which segment of that name (``OBR`` 2 = the second OBR);
    ``ack_code`` is the MSA-1 this error calls for (ERROR_CODES unless the raiser says).
    """

    def __init__(
        self,
        message: str,
        field: str = "",
        code: str = "207",
        *,
        occurrence: int = 1,
        ack_code: AckCode | None = None,
    ) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.text = message
        self.field = field
        self.code = code
        self.occurrence = occurrence
        self.ack_code: AckCode = ack_code or (ERROR_CODES[code][1] if code in ERROR_CODES else "AE")

    @property
    def location(self) -> tuple[str, int | None] | None:
        """(segment ID, field number or None) when ``field`` is an HL7 reference."""
        match = _REF.match(self.field)
        if not match:
            return None
        return match.group(1), int(match.group(2)) if match.group(2) else None


@dataclass(frozen=True)
class MappingOptions:
    """Site choices where HL7 feeds differ.

    ``primary_issuer``: the assigning authority (PID-3.4 namespace or universal ID) whose
    identifier becomes Patient ID; the others become Other Patient IDs. ``orm_station_ae_field``:
    the ORC/OBR field (``'OBR-21'``, ``'ORC-18'``) holding the Scheduled Station AE Title in
    ORM^O01, which IHE RAD-4 v2.3.1 does not carry. ``default_coding_scheme``: for a CE without
    a coding system ('L' is reserved for local codes in PS3.16 and HL7 Table 0396).
    """

    primary_issuer: str | None = None
    orm_station_ae_field: str | None = None
    default_coding_scheme: str = "L"


@dataclass(frozen=True)
class _Seps:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    msh2: str = "^~\\&"


_DEFAULT_SEPS = _Seps()


@dataclass(frozen=True)
class _Segment:
    name: str
    occurrence: int  # 1-based among the segments with this name
    fields: tuple[str, ...]  # raw, escaped text; fields[n] is SEG-n (MSH-1 included)

    def raw(self, n: int) -> str:
        return self.fields[n] if 0 < n < len(self.fields) else ""


@dataclass(frozen=True)
class ParsedMessage:
    """One HL7 v2 message, read but not yet mapped."""

    message: Any  # hl7.Message (python-hl7)
    type: str  # MSH-9.1^MSH-9.2, e.g. 'ORM^O01'
    control_id: str  # MSH-10
    version: str  # MSH-12.1
    structure: str  # MSH-9.3 (may be empty)
    charset: str  # MSH-18 as sent ('' when absent)
    encoding: str  # the Python codec the text was decoded with
    sending_application: str  # MSH-3, raw
    sending_facility: str  # MSH-4, raw
    receiving_application: str  # MSH-5, raw
    receiving_facility: str  # MSH-6, raw
    processing_id: str  # MSH-11.1
    text: str  # the decoded message, segments ended by '\r'
    _seps: _Seps = field(default=_DEFAULT_SEPS, repr=False, compare=False)
    _segments: tuple[_Segment, ...] = field(default=(), repr=False, compare=False)

    def segment_ids(self) -> list[str]:
        return [s.name for s in self._segments]


# --------------------------------------------------------------------------------------------
# parse
# --------------------------------------------------------------------------------------------


def parse(raw: str | bytes, *, default_charset: str = "8859/1") -> ParsedMessage:
    """Read one HL7 v2 message. Raises :class:`HL7MappingError` (MSA AR) when it cannot.

    Bytes are decoded with the MSH-18 character set (:data:`CHARSETS`), or ``default_charset``
    when MSH-18 is empty; a ``str`` is taken as already decoded. Segment ends may be ``\\r``,
    ``\\n`` or ``\\r\\n``; MLLP framing bytes, a BOM and blank lines are dropped.
    """
    if default_charset not in CHARSETS:  # the caller's mistake, not the sender's
        raise ValueError(f"default_charset must be one of {', '.join(CHARSETS)}")
    try:
        return _parse(raw, default_charset)
    except HL7MappingError:
        raise
    except Exception as exc:  # python-hl7 or a slip of ours: still an HL7 answer
        logger.debug("unreadable HL7 message", exc_info=True)
        raise HL7MappingError(
            f"the message cannot be read ({type(exc).__name__})", "MSH", "100", ack_code="AR"
        ) from exc


def _parse(raw: str | bytes, default_charset: str) -> ParsedMessage:
    if isinstance(raw, bytes | bytearray):
        raw = bytes(raw).lstrip(b"\x0b")
        if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
            raw = raw[3:]
        charset, codec = _charset_of(_lines(raw.decode("latin-1")), default_charset, strict=True)
        try:
            text = raw.decode(codec)
        except UnicodeDecodeError as exc:
            raise HL7MappingError(
                f"the message is not valid {charset or default_charset} ({exc.reason} at byte "
                f"{exc.start})",
                "MSH-18",
                "102",
                ack_code="AR",
            ) from None
    else:
        text = raw
        charset, codec = _charset_of(_lines(text), default_charset, strict=False)
    lines = _lines(text)
    if not lines or not lines[0].startswith("MSH"):
        raise HL7MappingError(
            "the message does not start with an MSH segment", "MSH", "100", ack_code="AR"
        )
    seps = _separators(lines[0])
    for i, line in enumerate(lines):
        name = line.split(seps.field, 1)[0]
        if not _SEGMENT_ID.match(name):
            raise HL7MappingError(
                f"segment {i + 1} has no valid segment ID: {line[:20]!r}", "", "100", ack_code="AR"
            )
        if i and name in ("MSH", "BHS", "FHS"):
            raise HL7MappingError(
                "more than one message in one block (batches are not supported)",
                "MSH",
                "100",
                occurrence=2,
                ack_code="AR",
            )
    joined = "\r".join(lines)
    message = hl7.parse(joined)
    segments = _segments_of(message, seps)
    reader = _Reader(seps, codec)
    msh = segments[0]
    msg_type = reader.get(msh, 9)
    if not msg_type:
        raise HL7MappingError("no message type", "MSH-9", "101", ack_code="AR")
    control_id = reader.get(msh, 10, sub=None)
    if not control_id:
        raise HL7MappingError("no message control ID", "MSH-10", "101", ack_code="AR")
    version = reader.get(msh, 12)
    if not version:
        raise HL7MappingError("no version ID", "MSH-12", "101", ack_code="AR")
    return ParsedMessage(
        message=message,
        type=f"{msg_type}^{reader.get(msh, 9, 2)}",
        control_id=control_id,
        version=version,
        structure=reader.get(msh, 9, 3),
        charset=charset,
        encoding=codec,
        sending_application=_clean_raw(msh.raw(3)),
        sending_facility=_clean_raw(msh.raw(4)),
        receiving_application=_clean_raw(msh.raw(5)),
        receiving_facility=_clean_raw(msh.raw(6)),
        processing_id=reader.get(msh, 11),
        text=joined + "\r",
        _seps=seps,
        _segments=segments,
    )


def _lines(text: str) -> list[str]:
    """Segments of a message: any line end, MLLP framing/BOM/blank lines dropped."""
    text = text.strip("\ufeff\x0b\x1c \t\r\n")
    text = text.replace("\r\n", "\r").replace("\n", "\r")
    return [line for line in text.split("\r") if line.strip()]


def _separators(msh: str) -> _Seps:
    """MSH-1 and MSH-2: five distinct printable, non-alphanumeric characters."""
    if len(msh) < 8 or not msh.startswith("MSH"):
        raise HL7MappingError(
            "MSH is too short to hold its separators", "MSH-2", "102", ack_code="AR"
        )
    fs = msh[3]
    end = msh.find(fs, 4)
    enc = msh[4:] if end == -1 else msh[4:end]
    chars = fs + enc
    if (
        not 4 <= len(enc) <= 5
        or len(set(chars)) != len(chars)
        or any(c.isalnum() or c.isspace() or not c.isprintable() for c in chars)
    ):
        raise HL7MappingError(
            f"invalid separators {chars!r}: MSH-1 and MSH-2 need 5 distinct punctuation characters",
            "MSH-2",
            "102",
            ack_code="AR",
        )
    return _Seps(fs, enc[0], enc[1], enc[2], enc[3], enc)


def _msh18(lines: Sequence[str]) -> str:
    """MSH-18 (first repetition) read before decoding; '' when there is none."""
    if not lines or not lines[0].startswith("MSH") or len(lines[0]) < 8:
        return ""
    fs = lines[0][3]
    parts = lines[0].split(fs)
    if len(parts) < 18:
        return ""
    value, enc = parts[17], parts[1]
    for sep in enc[1:2] + enc[:1]:  # repetition, then component
        value = value.split(sep)[0]
    return value.strip()


def _charset_of(lines: Sequence[str], default: str, *, strict: bool) -> tuple[str, str]:
    name = _msh18(lines)
    if not name:
        return "", CHARSETS[default]
    codec = CHARSETS.get(name.upper())
    if codec is None:
        if strict:
            raise HL7MappingError(
                f"unsupported character set {name[:40]!r}", "MSH-18", "103", ack_code="AR"
            )
        return name, CHARSETS[default]
    return name, codec


def _segments_of(message: Any, seps: _Seps) -> tuple[_Segment, ...]:
    """python-hl7's segments as raw field lists (str() of a python-hl7 segment is its text)."""
    counts: dict[str, int] = {}
    out = []
    for seg in message:
        parts = str(seg).split(seps.field)
        name = parts[0]
        if name == "MSH":
            parts = ["MSH", seps.field, *parts[1:]]
        counts[name] = counts.get(name, 0) + 1
        out.append(_Segment(name, counts[name], tuple(parts)))
    return tuple(out)


def _clean_raw(value: str) -> str:
    return _CONTROL.sub("", value)


# --------------------------------------------------------------------------------------------
# Field access
# --------------------------------------------------------------------------------------------


def _ref(source: str) -> tuple[str, int, int | None, int | None]:
    match = _REF.match(source)
    if not match or not match.group(2):
        raise ValueError(f"not a field reference: {source!r}")
    seg, n, c, s = match.groups()
    return seg, int(n), int(c) if c else None, int(s) if s else None


class _Reader:
    """Values out of raw field text, split and unescaped with the message's separators."""

    def __init__(self, seps: _Seps, codec: str) -> None:
        self.seps = seps
        self.codec = codec

    def reps(self, seg: _Segment | None, n: int) -> list[str]:
        if seg is None:
            return []
        raw = seg.raw(n)
        if seg.name == "MSH" and n in (1, 2):
            return [raw]
        return raw.split(self.seps.repetition) if raw else []

    def component(self, rep: str, c: int, sub: int | None = 1) -> str:
        comps = rep.split(self.seps.component)
        if c > len(comps):
            return ""
        value = comps[c - 1]
        if sub is not None:
            subs = value.split(self.seps.subcomponent)
            if sub > len(subs):
                return ""
            value = subs[sub - 1]
        if value.strip() == '""':  # HL7 null: "delete the value"; to us, no value
            return ""
        return self.unescape(value).strip()

    def get(
        self, seg: _Segment | None, n: int, c: int = 1, sub: int | None = 1, rep: int = 1
    ) -> str:
        reps = self.reps(seg, n)
        return self.component(reps[rep - 1], c, sub) if rep <= len(reps) else ""

    def unescape(self, value: str) -> str:
        """HL7 v2.5 2.7 escape sequences: \\F\\ \\S\\ \\T\\ \\R\\ \\E\\, \\Xhh..\\ (bytes in the
        message's character set), \\.br\\ and \\.sp\\ as line ends; highlighting and character
        set switches are dropped; an unterminated escape is kept as text."""
        esc = self.seps.escape
        if esc not in value:
            return value
        simple = {
            "F": self.seps.field,
            "S": self.seps.component,
            "T": self.seps.subcomponent,
            "R": self.seps.repetition,
            "E": esc,
        }
        out: list[str] = []
        i = 0
        while i < len(value):
            ch = value[i]
            if ch != esc:
                out.append(ch)
                i += 1
                continue
            end = value.find(esc, i + 1)
            if end == -1:
                out.append(value[i:])
                break
            seq = value[i + 1 : end]
            i = end + 1
            if seq in simple:
                out.append(simple[seq])
            elif seq.startswith("X") and len(seq) % 2 == 1:
                with contextlib.suppress(ValueError):
                    out.append(bytes.fromhex(seq[1:]).decode(self.codec, errors="replace"))
            elif seq in (".br", ".ce") or seq.startswith(".sp"):
                out.append("\n")
        return "".join(out)


def _line(value: str) -> str:
    """One line of text: control characters become spaces."""
    return " ".join(_CONTROL.sub(" ", value).split())


class _Group:
    """One order: ORC, its TQ1, its OBR and what follows the OBR."""

    def __init__(self, orc: _Segment, tq1: _Segment | None = None) -> None:
        self.orc = orc
        self.tq1 = tq1
        self.obr: _Segment | None = None
        self.zds: _Segment | None = None
        self.ipcs: list[_Segment] = []
        self.ntes: list[_Segment] = []


class _Mapper:
    """The mapping of one message (the state: its reader, options and generated UIDs)."""

    def __init__(
        self,
        msg: ParsedMessage,
        today: date,
        new_uid: Callable[[], str],
        options: MappingOptions,
    ) -> None:
        self.msg = msg
        self.r = _Reader(msg._seps, msg.encoding)
        self.today = today
        self.new_uid = new_uid
        self.options = options
        self.uids: dict[tuple[str, str], str] = {}

    # -- generic readers driven by the maps ------------------------------------------------
    def value(self, ctx: dict[str, _Segment | None], source: str, *, text: bool = False) -> str:
        seg, n, c, s = _ref(source)
        sub = s if s is not None else (None if text else 1)
        return self.r.get(ctx.get(seg), n, c or 1, sub)

    def first(
        self, ctx: dict[str, _Segment | None], rule: FieldRule, *, text: bool = False
    ) -> tuple[str, str]:
        """(value, source) of the first source with a value; ('', first source) if none."""
        for source in rule.sources:
            value = self.value(ctx, source, text=text)
            if value:
                return value, source
        return "", rule.sources[0] if rule.sources else ""

    def fail(
        self, ctx: dict[str, _Segment | None], source: str, message: str, code: str
    ) -> HL7MappingError:
        seg_name, _, _ = source.partition("-")
        number = source.split(".")[0]
        seg = ctx.get(seg_name)
        return HL7MappingError(message, number, code, occurrence=seg.occurrence if seg else 1)

    def identifier(
        self,
        ctx: dict[str, _Segment | None],
        rule: FieldRule,
        vr: str,
        *,
        required: bool = False,
    ) -> str | None:
        value, source = self.first(ctx, rule)
        value = _line(value)
        if not value:
            if required:
                raise self.fail(ctx, source, f"no {rule.name}", "101")
            return None
        limit = _ID_LIMITS[vr]
        if len(value) > limit or "\\" in value:
            raise self.fail(
                ctx, source, f"not a {vr} {rule.name} (max {limit} characters): {value!r}", "102"
            )
        return value

    def text(self, ctx: dict[str, _Segment | None], rule: FieldRule) -> str | None:
        value, _ = self.first(ctx, rule, text=True)
        value = _line(value).replace("\\", "/")[:_TEXT_LIMIT].strip()
        return value or None

    def person(self, ctx: dict[str, _Segment | None], rule: FieldRule) -> str | None:
        for source in rule.sources:
            name = self.person_name(ctx, source)
            if name:
                return name
        return None

    def person_name(self, ctx: dict[str, _Segment | None], source: str) -> str:
        """XPN/XCN/CNN -> DICOM PN family^given^middle^prefix^suffix (PS3.5 6.2.1)."""
        seg_name, n, c, _ = _ref(source)
        reps = self.r.reps(ctx.get(seg_name), n)
        if not reps:
            return ""
        if c is not None:  # CNN inside one component: id&family&given&middle&suffix&prefix
            comp = reps[0].split(self.r.seps.component)
            raw_parts = comp[c - 1].split(self.r.seps.subcomponent) if c <= len(comp) else []
            parts = [self.r.unescape(p) for p in raw_parts][1:]
        else:
            parts = [self.r.component(reps[0], i) for i in range(1, 8)]
            if f"{seg_name}-{n}" not in _XPN_FIELDS:
                parts = parts[1:]  # XCN: component 1 is the person's ID
        parts = (parts + [""] * 5)[:5]  # family, given, middle, suffix, prefix
        family, given, middle, suffix, prefix = (_pn_component(p) for p in parts)
        pn = "^".join((family, given, middle, prefix, suffix)).rstrip("^")
        return pn[:64].rstrip("^")

    def codes(
        self, ctx: dict[str, _Segment | None], rule: FieldRule, *, all_reps: bool = False
    ) -> tuple[Code, ...]:
        """The CE triplets of the first source that has a code (every repetition if asked)."""
        for source in rule.sources:
            seg_name, n, c, _ = _ref(source)
            seg = ctx.get(seg_name)
            reps = self.r.reps(seg, n)
            found = []
            for rep in reps if all_reps else reps[:1]:
                code = self.code(ctx, rep, source, c or 1)
                if code is not None:
                    found.append(code)
            if found:
                return tuple(found)
        return ()

    def code(self, ctx: dict[str, _Segment | None], rep: str, source: str, c: int) -> Code | None:
        value = _line(self.r.component(rep, c))
        if not value:
            return None
        meaning = _line(self.r.component(rep, c + 1, sub=None)).replace("\\", "/")
        scheme = _line(self.r.component(rep, c + 2)) or self.options.default_coding_scheme
        if len(value) > 16 or "\\" in value:
            raise self.fail(ctx, source, f"code value longer than 16 characters: {value!r}", "102")
        if len(scheme) > 16 or "\\" in scheme:
            raise self.fail(
                ctx, source, f"coding system longer than 16 characters: {scheme!r}", "102"
            )
        try:
            return Code(value, scheme, meaning[:_TEXT_LIMIT].strip())
        except OrderError as exc:
            raise self.fail(ctx, source, str(exc), "102") from None

    def timestamp(self, ctx: dict[str, _Segment | None], rule: FieldRule) -> tuple[str, str]:
        """SPS start date and time (DA, TM) from the first TS given; none -> today, 000000."""
        value, source = self.first(ctx, rule)
        if not value:
            return self.today.strftime("%Y%m%d"), "000000"
        parts = _ts_parts(value)
        if parts is None or len(parts) < 3:
            raise self.fail(ctx, source, f"not a date/time (YYYYMMDD[HHMM[SS]]): {value!r}", "102")
        time = "".join([*parts[3:6], "00", "00", "00"][:3]) if len(parts) > 3 else "000000"
        return "".join(parts[:3]), time

    def priority(self, ctx: dict[str, _Segment | None], rule: FieldRule) -> str:
        value, source = self.first(ctx, rule)
        if not value:
            return "ROUTINE"
        mapped = PRIORITY_MAP.get(value.upper())
        if mapped is None:
            raise self.fail(ctx, source, f"unknown priority {value!r} (HL7 table 0027)", "103")
        return mapped

    def study_uid(
        self, ctx: dict[str, _Segment | None], rule: FieldRule, accession: str, rp_id: str
    ) -> str:
        value, source = self.first(ctx, rule)
        if value:
            if len(value) > 64 or not _UID.match(value):
                raise self.fail(ctx, source, f"not a UID: {value!r}", "102")
            return value
        key = (accession, rp_id)
        if key not in self.uids:
            self.uids[key] = self.new_uid()
        return self.uids[key]

    def modality(self, ctx: dict[str, _Segment | None], rule: FieldRule) -> str:
        value, source = self.first(ctx, rule)
        value = value.upper()
        if not value:
            raise self.fail(ctx, source, "no modality", "101")
        if not _MODALITY.match(value):
            raise self.fail(ctx, source, f"not a DICOM modality code: {value!r}", "102")
        return value

    def station_ae(self, ctx: dict[str, _Segment | None], source: str) -> str | None:
        seg_name, n, c, s = _ref(source)
        value = _line(self.r.get(ctx.get(seg_name), n, c or 1, s or 1))
        if not value:
            return None
        if len(value) > 16 or "\\" in value:
            raise self.fail(ctx, source, f"not an AE title: {value!r}", "102")
        return value

    def from_order_error(
        self, exc: OrderError, rules: dict[str, FieldRule], ctx: dict[str, _Segment | None]
    ) -> HL7MappingError:
        attribute = _ORDER_ERROR_ATTRIBUTES.get(exc.field, "")
        rule = rules.get(attribute) or PATIENT_MAP.get(attribute)
        if rule is None or not rule.sources:
            return HL7MappingError(str(exc), "", "102")
        return self.fail(ctx, rule.sources[0], str(exc), "102")

    # -- patient -----------------------------------------------------------------------------
    def identifiers(
        self, ctx: dict[str, _Segment | None], source: str
    ) -> list[tuple[str, str, str]]:
        """(id, issuer, identifier type) of each repetition of a CX list with an ID."""
        seg_name, n, _, _ = _ref(source)
        out = []
        for rep in self.r.reps(ctx.get(seg_name), n):
            pid = _line(self.r.component(rep, 1))
            if not pid:
                continue
            issuer = _line(self.r.component(rep, 4, 1) or self.r.component(rep, 4, 2))
            out.append((pid, issuer, self.r.component(rep, 5).upper()))
        return out

    def primary(self, ids: list[tuple[str, str, str]]) -> int:
        """Which repetition is the Patient ID: the configured issuer, else type MR, else 1st."""
        wanted = self.options.primary_issuer
        if wanted:
            for i, (_, issuer, _) in enumerate(ids):
                if issuer == wanted:
                    return i
        for i, (_, _, kind) in enumerate(ids):
            if kind == "MR":
                return i
        return 0

    def patient(self, pid: _Segment, pv1: _Segment | None) -> Patient:
        ctx: dict[str, _Segment | None] = {"PID": pid, "PV1": pv1}
        ids = self.identifiers(ctx, "PID-3")
        if not ids:
            raise self.fail(ctx, "PID-3", "no patient identifier", "101")
        chosen = self.primary(ids)
        patient_id, issuer, _ = ids[chosen]
        for value in (patient_id, issuer):
            if len(value) > 64 or "\\" in value:
                raise self.fail(ctx, "PID-3", f"not a LO identifier: {value!r}", "102")
        others = []
        for i, (other, other_issuer, _) in enumerate(ids):
            if i == chosen or (other, other_issuer) == (patient_id, issuer):
                continue
            if len(other) > 64 or len(other_issuer) > 64 or "\\" in other + other_issuer:
                raise self.fail(ctx, "PID-3", f"not a LO identifier: {other!r}", "102")
            others.append(OtherId(other, other_issuer, "TEXT"))
        birth = self.r.get(pid, 7)
        birth_date = None
        if birth:
            parts = _ts_parts(birth)
            if parts is None:
                raise self.fail(ctx, "PID-7", f"not a date: {birth!r}", "102")
            birth_date = "".join(parts[:3]) if len(parts) >= 3 else None
        sex_code = self.r.get(pid, 8).upper()
        if sex_code and sex_code not in SEX_MAP:
            raise self.fail(ctx, "PID-8", f"unknown sex {sex_code!r} (HL7 table 0001)", "103")
        admission = self.identifier(ctx, PATIENT_MAP["admission_id"], "LO")
        location = self.text(ctx, PATIENT_MAP["location"])
        try:
            return Patient(
                patient_id=patient_id,
                issuer=issuer,
                name=self.person_name(ctx, "PID-5"),
                birth_date=birth_date,
                sex=SEX_MAP.get(sex_code) if sex_code else None,
                other_ids=tuple(others),
                admission_id=admission,
                location=location,
            )
        except OrderError as exc:
            raise self.from_order_error(exc, PATIENT_MAP, ctx) from None


def _pn_component(value: str) -> str:
    """A PN component: no '^', '=' or '\\' (PN delimiters), one line."""
    return _line(re.sub(r"[\^=\\]", " ", value))


def _ts_parts(value: str) -> list[str] | None:
    """HL7 TS/DTM YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ] -> its digit groups; None if invalid.
    The time zone is dropped: worklist times are local (PS3.4 K.6)."""
    match = _TS.match(value.strip())
    if not match:
        return None
    parts = [g for g in match.groups() if g is not None]
    n = [int(p) for p in parts] + [1, 1, 0, 0, 0][len(parts) - 1 :]
    try:
        datetime(n[0], n[1], n[2], n[3], n[4], n[5])
    except ValueError:
        return None
    return parts


# --------------------------------------------------------------------------------------------
# to_events
# --------------------------------------------------------------------------------------------


def to_events(
    msg: ParsedMessage,
    *,
    today: date,
    new_uid: Callable[[], str],
    options: MappingOptions | None = None,
) -> list[OrderEvent]:
    """The order events one message asks for (empty: accept, nothing to do).

    ``today`` dates a step whose order has no timing; ``new_uid`` makes the Study Instance UID
    of a Requested Procedure sent without one. Raises :class:`HL7MappingError` only.
    """
    try:
        return _to_events(_Mapper(msg, today, new_uid, options or MappingOptions()))
    except HL7MappingError:
        raise
    except Exception as exc:  # a slip of ours must still become an HL7 answer
        logger.exception("HL7 %s %s could not be mapped", msg.type, msg.control_id)
        raise HL7MappingError(f"internal error ({type(exc).__name__})", "", "207") from exc


def _to_events(m: _Mapper) -> list[OrderEvent]:
    msg = m.msg
    if not _VERSION.match(msg.version):
        raise HL7MappingError(f"unsupported HL7 version {msg.version!r} (2.x)", "MSH-12", "203")
    if msg.type not in MESSAGE_TYPES:
        known = {t.split("^")[0] for t in MESSAGE_TYPES}
        code = "201" if msg.type.split("^")[0] in known else "200"
        raise HL7MappingError(f"unsupported message type {msg.type!r}", "MSH-9", code)
    segments = msg._segments
    if msg.type == "ORM^O01":
        return _orders(m, segments, ORM_MAP, omi=False)
    if msg.type == "OMI^O23":
        return _orders(m, segments, OMI_MAP, omi=True)
    if msg.type == "ADT^A40":
        return _merges(m, segments)
    pid = _find(segments, "PID")
    if pid is None:
        raise HL7MappingError("no PID segment", "PID", "100")
    return [PatientUpdate(m.patient(pid, _find(segments, "PV1")))]


def _find(segments: Iterable[_Segment], name: str) -> _Segment | None:
    return next((s for s in segments if s.name == name), None)


def _groups(segments: Sequence[_Segment]) -> list[_Group]:
    """Order groups: each ORC starts one; an OBR after an OBR without its own ORC shares the
    previous ORC (and TQ1). ZDS, IPC and NTE after an OBR belong to it."""
    groups: list[_Group] = []
    current: _Group | None = None
    for seg in segments:
        if seg.name == "ORC":
            current = _Group(seg)
            groups.append(current)
            continue
        if seg.name not in ("OBR", "TQ1", "ZDS", "IPC", "NTE"):
            continue
        if current is None:
            if seg.name == "NTE":
                continue  # notes on the patient
            raise HL7MappingError(f"{seg.name} before any ORC", "ORC", "100", occurrence=1)
        if seg.name == "OBR":
            if current.obr is not None:
                current = _Group(current.orc, current.tq1)
                groups.append(current)
            current.obr = seg
        elif seg.name == "TQ1":
            current.tq1 = current.tq1 or seg
        elif current.obr is None:
            if seg.name != "NTE":
                raise HL7MappingError(
                    f"{seg.name} before its OBR", "OBR", "100", occurrence=seg.occurrence
                )
        elif seg.name == "ZDS":
            current.zds = current.zds or seg
        elif seg.name == "IPC":
            current.ipcs.append(seg)
        else:
            current.ntes.append(seg)
    return groups


def _orders(
    m: _Mapper, segments: Sequence[_Segment], rules: dict[str, FieldRule], *, omi: bool
) -> list[OrderEvent]:
    pid = _find(segments, "PID")
    if pid is None:
        raise HL7MappingError("no PID segment", "PID", "100")
    pv1 = _find(segments, "PV1")
    groups = _groups(segments)
    if not groups:
        raise HL7MappingError("no ORC segment", "ORC", "100")
    patient: Patient | None = None
    events: list[OrderEvent] = []
    for group in groups:
        ctx: dict[str, _Segment | None] = {
            "PID": pid,
            "PV1": pv1,
            "ORC": group.orc,
            "OBR": group.obr,
            "TQ1": group.tq1,
            "ZDS": group.zds,
        }
        control = m.r.get(group.orc, 1).upper()
        if not control:
            raise m.fail(ctx, "ORC-1", "no order control code", "101")
        action = ORDER_CONTROL.get(control)
        if action is None:
            raise m.fail(ctx, "ORC-1", f"unsupported order control {control!r}", "103")
        if action == "ignore":
            continue
        if action in ("cancel", "discontinue"):
            events.extend(_cancels(m, ctx, group, rules, action, omi=omi))
            continue
        if group.obr is None:
            raise HL7MappingError(
                "no OBR for the order", "OBR", "100", occurrence=group.orc.occurrence
            )
        if omi and not group.ipcs:
            raise HL7MappingError(
                "no IPC segment for the OBR", "IPC", "100", occurrence=group.obr.occurrence
            )
        if patient is None:
            patient = m.patient(pid, pv1)
        for ipc in group.ipcs if omi else [None]:
            item = _item(m, {**ctx, "IPC": ipc}, group, rules, patient, omi=omi)
            events.append(NewOrder(item) if action == "new" else ChangeOrder(item))
    return _unique(events)


def _cancels(
    m: _Mapper,
    ctx: dict[str, _Segment | None],
    group: _Group,
    rules: dict[str, FieldRule],
    action: str,
    *,
    omi: bool,
) -> list[OrderEvent]:
    placer = m.identifier(ctx, rules["placer_order_number"], "LO")
    filler = m.identifier(ctx, rules["filler_order_number"], "LO")
    accessions: list[str | None] = []
    for ipc in group.ipcs if omi else [None]:
        accessions.append(m.identifier({**ctx, "IPC": ipc}, rules["accession_number"], "SH"))
    accessions = list(dict.fromkeys(a for a in accessions if a)) or [None]
    if not (placer or filler or accessions[0]):
        raise m.fail(ctx, "ORC-2", "no placer/filler order number or accession number", "101")
    reason: Literal["cancelled", "discontinued"] = (
        "discontinued" if action == "discontinue" else "cancelled"
    )
    return [CancelOrder(placer, filler, accession, reason) for accession in accessions]


def _item(
    m: _Mapper,
    ctx: dict[str, _Segment | None],
    group: _Group,
    rules: dict[str, FieldRule],
    patient: Patient,
    *,
    omi: bool,
) -> WorklistItem:
    accession = m.identifier(ctx, rules["accession_number"], "SH", required=True) or ""
    rp_id = m.identifier(ctx, rules["requested_procedure_id"], "SH", required=True) or ""
    sps_id = m.identifier(ctx, rules["sps_id"], "SH", required=True) or ""
    universal = ctx["OBR"]
    if not m.r.get(universal, 4) and not m.r.get(universal, 4, 4):
        raise m.fail(ctx, "OBR-4", "no universal service ID", "101")
    start_date, start_time = m.timestamp(ctx, rules["sps_start_date"])
    protocol = m.codes(ctx, rules["protocol_codes"], all_reps=omi)
    if omi:
        station_ae = m.station_ae(ctx, rules["station_ae"].sources[0])
    elif m.options.orm_station_ae_field:
        station_ae = m.station_ae(ctx, m.options.orm_station_ae_field)
    else:
        station_ae = None
    comments = "\n".join(c for c in (m.r.get(nte, 3, sub=None) for nte in group.ntes) if c)
    try:
        return WorklistItem(
            patient=patient,
            accession_number=accession,
            requested_procedure_id=rp_id,
            sps_id=sps_id,
            study_uid=m.study_uid(ctx, rules["study_uid"], accession, rp_id),
            modality=m.modality(ctx, rules["modality"]),
            sps_start_date=start_date,
            sps_start_time=start_time,
            station_ae=station_ae,
            station_name=m.identifier(ctx, rules["station_name"], "SH")
            if "station_name" in rules
            else None,
            sps_description=m.text(ctx, rules["sps_description"]),
            sps_location=m.identifier(ctx, rules["sps_location"], "SH")
            if "sps_location" in rules
            else None,
            performing_physician=m.person(ctx, rules["performing_physician"]),
            protocol_codes=protocol,
            requested_procedure_description=m.text(ctx, rules["requested_procedure_description"]),
            requested_procedure_codes=m.codes(ctx, rules["requested_procedure_codes"]),
            priority=m.priority(ctx, rules["priority"]),
            referring_physician=m.person(ctx, rules["referring_physician"]),
            requesting_physician=m.person(ctx, rules["requesting_physician"]),
            requesting_service=m.text(ctx, rules["requesting_service"]),
            placer_order_number=m.identifier(ctx, rules["placer_order_number"], "LO"),
            filler_order_number=m.identifier(ctx, rules["filler_order_number"], "LO"),
            reason=m.text(ctx, rules["reason"]),
            comments=comments[:_LT_LIMIT] or None,
        )
    except OrderError as exc:
        raise m.from_order_error(exc, rules, ctx) from None


def _merges(m: _Mapper, segments: Sequence[_Segment]) -> list[OrderEvent]:
    """ADT^A40: each PID (surviving patient) with the MRG that follows it."""
    pairs: list[tuple[_Segment, _Segment | None, _Segment | None]] = []
    for seg in segments:
        if seg.name == "PID":
            pairs.append((seg, None, None))
        elif seg.name in ("MRG", "PV1") and pairs:
            pid, mrg, pv1 = pairs[-1]
            if seg.name == "MRG" and mrg is None:
                pairs[-1] = (pid, seg, pv1)
            elif seg.name == "PV1" and pv1 is None:
                pairs[-1] = (pid, mrg, seg)
        elif seg.name == "MRG":
            raise HL7MappingError("MRG before its PID", "PID", "100")
    if not pairs:
        raise HL7MappingError("no PID segment", "PID", "100")
    events: list[OrderEvent] = []
    for pid, mrg, pv1 in pairs:
        if mrg is None:
            raise HL7MappingError(
                "no MRG segment after the PID", "MRG", "100", occurrence=pid.occurrence
            )
        surviving = m.patient(pid, pv1)
        ctx: dict[str, _Segment | None] = {"MRG": mrg}
        ids = m.identifiers(ctx, "MRG-1")
        if not ids:
            raise m.fail(ctx, "MRG-1", "no prior patient identifier", "101")
        merged_id, merged_issuer, _ = ids[m.primary(ids)]
        if len(merged_id) > 64 or len(merged_issuer) > 64:
            raise m.fail(ctx, "MRG-1", f"not a LO identifier: {merged_id!r}", "102")
        if (merged_id, merged_issuer) == (surviving.patient_id, surviving.issuer):
            raise m.fail(ctx, "MRG-1", "the prior identifier is the surviving one", "102")
        events.append(PatientMerge(surviving, merged_id, merged_issuer))
    return events


def _unique(events: list[OrderEvent]) -> list[OrderEvent]:
    out: list[OrderEvent] = []
    for event in events:
        if event not in out:
            out.append(event)
    return out


# --------------------------------------------------------------------------------------------
# ack
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _AckHeader:
    seps: _Seps = _DEFAULT_SEPS
    msh: tuple[str, ...] = ()  # raw MSH fields, msh[n] = MSH-n
    charset: str = ""  # MSH-18 to echo (a known character set only)
    codec: str = "iso8859-1"

    def raw(self, n: int) -> str:
        return _clean_raw(self.msh[n]) if n < len(self.msh) else ""

    def component(self, n: int, c: int) -> str:
        comps = self.raw(n).split(self.seps.component)
        return comps[c - 1].strip() if c <= len(comps) else ""


def _header_of(msg: ParsedMessage | None, raw: str | bytes) -> _AckHeader:
    if msg is not None:
        msh = msg._segments[0].fields if msg._segments else ()
        charset = msg.charset if msg.charset.upper() in CHARSETS else ""
        return _AckHeader(msg._seps, msh, charset, msg.encoding)
    # Nothing parsed: recover what can be read from the first MSH line.
    text = bytes(raw).decode("latin-1") if isinstance(raw, bytes | bytearray) else str(raw)
    lines = _lines(text)
    start = next((i for i, line in enumerate(lines) if line.startswith("MSH")), None)
    if start is None:
        lines = _lines(text[text.find("MSH") :]) if "MSH" in text else []
        start = 0 if lines else None
    if start is None:
        return _AckHeader()
    line = lines[start]
    try:
        seps = _separators(line)
    except HL7MappingError:
        if "|" not in line:
            return _AckHeader()
        seps = _DEFAULT_SEPS
    parts = line.split(seps.field)
    msh = ("MSH", seps.field, *parts[1:])
    charset, codec = "", "iso8859-1"
    name = _msh18([line])
    if name.upper() in CHARSETS and isinstance(raw, bytes | bytearray):
        try:  # re-read the header in its own character set
            decoded = _lines(bytes(raw).decode(CHARSETS[name.upper()]))
            again = next(x for x in decoded if x.startswith("MSH"))
            msh = ("MSH", seps.field, *again.split(seps.field)[1:])
            charset, codec = name, CHARSETS[name.upper()]
        except (UnicodeDecodeError, StopIteration):
            pass
    elif name.upper() in CHARSETS:
        charset, codec = name, CHARSETS[name.upper()]
    return _AckHeader(seps, msh, charset, codec)


def _escape(text: str, seps: _Seps) -> str:
    """Text into a field: separators as escape sequences, line ends as \\.br\\."""
    e = seps.escape
    table = {
        seps.escape: f"{e}E{e}",
        seps.field: f"{e}F{e}",
        seps.component: f"{e}S{e}",
        seps.subcomponent: f"{e}T{e}",
        seps.repetition: f"{e}R{e}",
        "\n": f"{e}.br{e}",
    }
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    out = []
    for ch in text:
        if ch in table:
            out.append(table[ch])
        elif ch.isprintable():
            out.append(ch)
    return "".join(out)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")) if _VERSION.match(version) else (2, 5, 1)


def ack(
    msg: ParsedMessage | None,
    raw: str | bytes,
    code: AckCode,
    error: HL7MappingError | None = None,
    *,
    control_id: str | None = None,
    now: datetime | None = None,
) -> bytes:
    """The original-mode ACK (HL7 v2.5 2.9.2) for a message, as bytes without MLLP framing.

    MSH swaps sender and receiver of the incoming MSH, echoes its version, processing ID and
    (known) MSH-18, and is encoded in that character set. MSA-1 is ``code``, MSA-2 the incoming
    control ID, MSA-3 the error text. With ``error``, an ERR segment names the field and the
    Table 0357 code: ERR-2 location SEG^occurrence^field, ERR-3 code, ERR-4 severity E and
    ERR-8 text for v2.5 and later; ERR-1 SEG^occurrence^field^code&text&HL70357 (plus MSA-6)
    before v2.5. Works when ``msg`` is None (nothing could be parsed): what can be read from
    ``raw``'s MSH line is used, defaults otherwise. Never raises for any ``raw``.
    """
    try:
        header = _header_of(msg, raw)
    except Exception:  # recovering is best effort; an answer must still go out
        logger.debug("no header recovered for the ACK", exc_info=True)
        header = _AckHeader()
    seps = header.seps
    fs, c, s = seps.field, seps.component, seps.subcomponent
    version = header.component(12, 1)
    if not _VERSION.match(version):
        version = _DEFAULT_VERSION
    event = header.component(9, 2)
    msh9 = f"ACK{c}{event}{c}ACK" if re.fullmatch(r"[A-Z0-9]{3}", event) else "ACK"
    processing = header.component(11, 1)
    if processing not in ("P", "D", "T"):
        processing = "P"
    stamp = (now or datetime.now().astimezone()).strftime("%Y%m%d%H%M%S%z")
    own_id = control_id or uuid.uuid4().hex[:20].upper()
    msh = [
        "MSH",
        seps.msh2,
        header.raw(5),
        header.raw(6),
        header.raw(3),
        header.raw(4),
        stamp,
        "",
        msh9,
        _escape(own_id, seps),
        processing,
        version,
    ]
    if header.charset:
        msh += ["", "", "", "", "", header.charset]
    old_style = _version_tuple(version) < (2, 5)
    msa = ["MSA", code, header.raw(10)]
    lines = []
    if error is not None:
        label = ERROR_CODES[error.code][0] if error.code in ERROR_CODES else ""
        number = _escape(error.code, seps)
        msa.append(_escape(str(error)[:80], seps))
        seg_name, field_no = error.location or ("", None)
        where = [seg_name, str(error.occurrence) if seg_name else "", str(field_no or "")]
        if old_style:  # v2.3.1 ERR-1 (ELD) and MSA-6 (CE)
            msa += ["", "", c.join((number, _escape(label, seps), "HL70357"))]
            cause = s.join((number, _escape(label, seps), "HL70357"))
            lines.append(fs.join(["ERR", c.join([*where, cause])]))
        else:  # v2.5 ERR-2 (ERL), ERR-3 (CWE), ERR-4 severity, ERR-8 user message
            cwe = c.join((number, _escape(label, seps), "HL70357"))
            text = _escape(str(error)[:1000], seps)
            erl = c.join(where).rstrip(c)
            lines.append(fs.join(["ERR", "", erl, cwe, "E", "", "", "", text]))
    out = [fs.join(msh), fs.join(msa), *lines]
    return ("\r".join(out) + "\r").encode(header.codec, errors="replace")
