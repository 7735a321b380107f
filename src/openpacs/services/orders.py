"""Orders and the worklist items they become: the domain objects of the RIS side.

Owns: :class:`Patient`, :class:`Code`, :class:`WorklistItem` and the order events an HL7 feed,
the REST API or the command line produce (:class:`NewOrder`, :class:`ChangeOrder`,
:class:`CancelOrder`, :class:`PatientUpdate`, :class:`PatientMerge`). They validate at
construction (DICOM value lengths and forms, seed 000 T3.7 / seed 001 T3.2), so an invalid item
cannot exist; protocol adapters convert into them, the worklist service stores them.
Must not: parse HL7 or DICOM, or touch the database.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

SPS_STATUSES = (
    "SCHEDULED",
    "ARRIVED",
    "READY",
    "STARTED",
    "COMPLETED",
    "DISCONTINUED",
    "CANCELLED",
)
PRIORITIES = (
    "STAT",
    "HIGH",
    "ROUTINE",
    "MEDIUM",
    "LOW",
)  # (0040,1003) Requested Procedure Priority
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2})?)?$")


class OrderError(ValueError):
    """An order value that cannot be used; ``field`` names where it came from (e.g. 'PID-7'),
    ``code`` the HL7 table 0357 error it is (204 unknown key, 102 data type; else 207)."""

    def __init__(self, message: str, field: str = "", code: str = "207") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.message = message
        self.field = field
        self.code = code


def _check_len(value: str | None, limit: int, name: str) -> str | None:
    if value is not None and len(value) > limit:
        raise OrderError(f"longer than {limit} characters: {value!r}", name)
    return value


@dataclass(frozen=True)
class Code:
    """A coded entry: Code Value, Coding Scheme Designator, Code Meaning (+ version)."""

    value: str
    scheme: str
    meaning: str = ""
    version: str = ""

    def __post_init__(self) -> None:
        if not self.value or not self.scheme:
            raise OrderError(f"a code needs a value and a coding scheme: {self!r}")
        _check_len(self.value, 16, "Code Value")
        _check_len(self.scheme, 16, "Coding Scheme Designator")
        _check_len(self.meaning, 64, "Code Meaning")


@dataclass(frozen=True)
class OtherId:
    patient_id: str
    issuer: str = ""
    type: str = "TEXT"


@dataclass(frozen=True)
class Patient:
    patient_id: str
    issuer: str = ""
    name: str = ""  # DICOM PN form: Family^Given^Middle^Prefix^Suffix (component groups with '=')
    birth_date: str | None = None  # YYYYMMDD
    sex: str | None = None  # M, F, O
    other_ids: tuple[OtherId, ...] = ()
    admission_id: str | None = None  # PV1-19
    location: str | None = None  # PV1-3.1 Current Patient Location
    weight: str | None = None  # DS, kg
    size: str | None = None  # DS, m
    medical_alerts: str | None = None
    allergies: str | None = None
    pregnancy_status: int | None = (
        None  # (0010,21C0): 1 not pregnant, 2 possibly, 3 definitely, 4 unknown
    )

    def __post_init__(self) -> None:
        if not self.patient_id.strip():
            raise OrderError("the patient has no ID", "PID-3")
        _check_len(self.patient_id, 64, "Patient ID")
        _check_len(self.issuer, 64, "Issuer of Patient ID")
        if self.birth_date is not None and not _DATE.match(self.birth_date):
            raise OrderError(f"not a date: {self.birth_date!r}", "Patient's Birth Date")
        if self.sex is not None and self.sex not in ("M", "F", "O"):
            raise OrderError(f"not M, F or O: {self.sex!r}", "Patient's Sex")
        if self.pregnancy_status is not None and self.pregnancy_status not in (1, 2, 3, 4):
            raise OrderError(f"not 1-4: {self.pregnancy_status}", "Pregnancy Status")

    def effective_pregnancy_status(self) -> int:
        """seed 000 T3.7: the order's status when given; else 1 (not pregnant) for a male
        patient, 4 (unknown) otherwise."""
        if self.pregnancy_status is not None:
            return self.pregnancy_status
        return 1 if self.sex == "M" else 4


@dataclass(frozen=True)
class WorklistItem:
    """One Scheduled Procedure Step of a Requested Procedure, with its patient."""

    patient: Patient
    accession_number: str
    requested_procedure_id: str
    sps_id: str
    study_uid: str
    modality: str
    sps_start_date: str  # YYYYMMDD
    sps_start_time: str = "000000"  # HHMMSS
    station_ae: str | None = None
    station_name: str | None = None
    sps_description: str | None = None
    sps_location: str | None = None
    performing_physician: str | None = None  # PN
    protocol_codes: tuple[Code, ...] = ()
    requested_procedure_description: str | None = None
    requested_procedure_codes: tuple[Code, ...] = ()
    priority: str = "ROUTINE"
    referring_physician: str | None = None  # PN
    requesting_physician: str | None = None  # PN
    requesting_service: str | None = None
    placer_order_number: str | None = None  # ORC-2: how HL7 updates find the order
    filler_order_number: str | None = None  # ORC-3
    reason: str | None = None  # Reason for the Requested Procedure
    comments: str | None = None  # Requested Procedure Comments
    contrast_agent: str | None = None
    status: str = "SCHEDULED"
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_len(self.accession_number, 16, "Accession Number")
        _check_len(self.requested_procedure_id, 16, "Requested Procedure ID")
        _check_len(self.sps_id, 16, "Scheduled Procedure Step ID")
        if not self.accession_number:
            raise OrderError("no accession number", "Accession Number")
        if not _UID.match(self.study_uid) or len(self.study_uid) > 64:
            raise OrderError(f"not a UID: {self.study_uid!r}", "Study Instance UID")
        if not self.modality or len(self.modality) > 16 or not self.modality.isupper():
            raise OrderError(f"not a modality code: {self.modality!r}", "Modality")
        if not _DATE.match(self.sps_start_date):
            raise OrderError(f"not a date: {self.sps_start_date!r}", "SPS Start Date")
        if not _TIME.match(self.sps_start_time):
            raise OrderError(f"not a time: {self.sps_start_time!r}", "SPS Start Time")
        if self.station_ae is not None and not 0 < len(self.station_ae.strip()) <= 16:
            raise OrderError(f"not an AE title: {self.station_ae!r}", "Scheduled Station AE Title")
        if self.priority not in PRIORITIES:
            raise OrderError(f"not one of {', '.join(PRIORITIES)}: {self.priority!r}", "Priority")
        if self.status not in SPS_STATUSES:
            raise OrderError(f"not an SPS status: {self.status!r}", "SPS Status")
        _check_len(self.station_name, 16, "Scheduled Station Name")
        _check_len(self.sps_description, 64, "SPS Description")
        _check_len(self.requested_procedure_description, 64, "Requested Procedure Description")


@dataclass(frozen=True)
class NewOrder:
    item: WorklistItem


@dataclass(frozen=True)
class ChangeOrder:
    """Replaces the scheduled item found by placer/filler order number (or accession)."""

    item: WorklistItem


@dataclass(frozen=True)
class CancelOrder:
    placer_order_number: str | None
    filler_order_number: str | None
    accession_number: str | None = None
    reason: Literal["cancelled", "discontinued"] = "cancelled"


@dataclass(frozen=True)
class PatientUpdate:
    """New demographics for the patient's open worklist items (ADT^A08)."""

    patient: Patient


@dataclass(frozen=True)
class PatientMerge:
    """The old patient identity is merged into the surviving one (ADT^A40)."""

    surviving: Patient
    merged_id: str
    merged_issuer: str = ""


OrderEvent = NewOrder | ChangeOrder | CancelOrder | PatientUpdate | PatientMerge
