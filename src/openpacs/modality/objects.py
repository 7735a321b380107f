"""The data sets the virtual modality creates — pure functions, no network.

Owns: what the modality knows about the procedure it performs (`Procedure`, from a worklist
answer per seed 004 Table 3-7, or registered locally), the performed step decided at exam start
(`Performed`), and the objects built from them:

* DX "For Presentation" / CR images with the modules of seed 004 Tables 7-1..7-24;
* the X-Ray Radiation Dose SR (TID 10001, seed 004 Tables 7-25..7-37), built with highdicom;
* the MPPS N-CREATE and N-SET data sets (seed 004 Table 3-14);

all mapped from the worklist as seed 004 Table 7-38 says, and the coded terminology of seed 004
§7.2 (CID 4009 anatomy, CID 9300 discontinuation reasons).
Must not: open sockets, read configuration files or write files (callers do).
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import math
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from pydicom import Dataset
from pydicom.charset import convert_encodings
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import PersonName

from openpacs.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, generate_uid
from openpacs.modality.config import ModalityConfig

if TYPE_CHECKING:  # highdicom is imported where the dose report is built
    from highdicom.sr import ContainerContentItem, ContentItem, RelationshipTypeValues
    from pydicom.sr.coding import Code as SrCode

log = logging.getLogger(__name__)

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
XRAY_DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
SOFTWARE_VERSION = "openpacs 0.1"
LOCAL_SCHEME = "99OPENPACS"  # the modality's own protocol codes (seed 004 §7.2: site mapping)


@dataclass(frozen=True)
class Code:
    """A coded entry (PS3.3 Code Sequence Macro)."""

    value: str
    scheme: str
    meaning: str
    scheme_version: str = ""

    def __post_init__(self) -> None:
        if not self.value or not self.scheme:
            raise ValueError(f"a code needs a value and a coding scheme: {self!r}")

    def dataset(self) -> Dataset:
        item = Dataset()
        item.CodeValue = self.value
        item.CodingSchemeDesignator = self.scheme
        if self.scheme_version:
            item.CodingSchemeVersion = self.scheme_version
        item.CodeMeaning = self.meaning
        return item


def _codes(codes: Iterable[Code]) -> DicomSequence:
    return DicomSequence([c.dataset() for c in codes])


# PS3.16 CID 9300 "Procedure Discontinuation Reasons" (the DCM codes; seed 004 §7.2 — the
# modality's fixed list). Its SCT members (adverse reactions to radiopharmaceuticals, via
# included context groups) do not apply to a radiography room and are left out.
DISCONTINUATION_REASONS: dict[str, Code] = {
    "doctor-canceled": Code("110500", "DCM", "Doctor canceled procedure"),
    "equipment-failure": Code("110501", "DCM", "Equipment failure"),
    "incorrect-procedure": Code("110502", "DCM", "Incorrect procedure ordered"),
    "contrast-allergy": Code("110503", "DCM", "Patient allergic to media/contrast"),
    "patient-died": Code("110504", "DCM", "Patient died"),
    "patient-refused": Code("110505", "DCM", "Patient refused to continue procedure"),
    "patient-taken": Code("110506", "DCM", "Patient taken for treatment or surgery"),
    "patient-did-not-arrive": Code("110507", "DCM", "Patient did not arrive"),
    "patient-pregnant": Code("110508", "DCM", "Patient pregnant"),
    "change-for-charging": Code("110509", "DCM", "Change of procedure for correct charging"),
    "duplicate-order": Code("110510", "DCM", "Duplicate order"),
    "nursing-unit-cancel": Code("110511", "DCM", "Nursing unit cancel"),
    "incorrect-side": Code("110512", "DCM", "Incorrect side ordered"),
    "unspecified": Code("110513", "DCM", "Discontinued for unspecified reason"),
    "incorrect-worklist-entry": Code("110514", "DCM", "Incorrect worklist entry selected"),
    "patient-condition": Code("110515", "DCM", "Patient condition prevented continuing"),
    "equipment-change": Code("110516", "DCM", "Equipment change"),
    "objects-incorrectly-formatted": Code("110521", "DCM", "Objects incorrectly formatted"),
    "object-types-not-supported": Code("110522", "DCM", "Object Types not supported"),
    "object-set-incomplete": Code("110523", "DCM", "Object Set incomplete"),
    "media-failure": Code("110524", "DCM", "Media Failure"),
    "resource-pre-empted": Code("110526", "DCM", "Resource pre-empted"),
    "resource-inadequate": Code("110527", "DCM", "Resource inadequate"),
    "rescheduled": Code("110528", "DCM", "Discontinued Procedure Step rescheduled"),
    "rescheduling-recommended": Code(
        "110529", "DCM", "Discontinued Procedure Step rescheduling recommended"
    ),
    "assignment-rejected": Code(
        "110530", "DCM", "Workitem assignment rejected by assigned resource"
    ),
    "workitem-expired": Code("110533", "DCM", "Workitem expired"),
    "extravasation": Code("113568", "DCM", "Extravasation visible in image"),
}

# PS3.16 CID 4009 "DX Anatomy Imaged" (a subset), with the Body Part Examined defined term of
# PS3.16 Annex L for each (seed 004 Table 7-5 / 7-17 / 7-23).
ANATOMY: dict[str, Code] = {
    "chest": Code("816094009", "SCT", "Chest"),
    "abdomen": Code("818981001", "SCT", "Abdomen"),
    "pelvis": Code("816092008", "SCT", "Pelvis"),
    "skull": Code("89546000", "SCT", "Skull"),
    "cervical-spine": Code("122494005", "SCT", "Cervical spine"),
    "thoracic-spine": Code("122495006", "SCT", "Thoracic spine"),
    "lumbar-spine": Code("122496007", "SCT", "Lumbar spine"),
    "shoulder": Code("16982005", "SCT", "Shoulder"),
    "humerus": Code("85050009", "SCT", "Humerus"),
    "elbow": Code("16953009", "SCT", "Elbow joint"),
    "wrist": Code("74670003", "SCT", "Wrist joint"),
    "hand": Code("85562004", "SCT", "Hand"),
    "hip": Code("29836001", "SCT", "Hip"),
    "femur": Code("71341001", "SCT", "Femur"),
    "knee": Code("72696002", "SCT", "Knee"),
    "lower-leg": Code("30021000", "SCT", "Lower leg"),
    "ankle": Code("70258002", "SCT", "Ankle joint"),
    "foot": Code("56459004", "SCT", "Foot"),
    "rib": Code("113197003", "SCT", "Rib"),
    "clavicle": Code("51299004", "SCT", "Clavicle"),
}
BODY_PART: dict[str, str] = {
    "chest": "CHEST",
    "abdomen": "ABDOMEN",
    "pelvis": "PELVIS",
    "skull": "SKULL",
    "cervical-spine": "CSPINE",
    "thoracic-spine": "TSPINE",
    "lumbar-spine": "LSPINE",
    "shoulder": "SHOULDER",
    "humerus": "HUMERUS",
    "elbow": "ELBOW",
    "wrist": "WRIST",
    "hand": "HAND",
    "hip": "HIP",
    "femur": "FEMUR",
    "knee": "KNEE",
    "lower-leg": "LEG",
    "ankle": "ANKLE",
    "foot": "FOOT",
    "rib": "RIB",
    "clavicle": "CLAVICLE",
}
_PAIRED = {"shoulder", "humerus", "elbow", "wrist", "hand", "hip", "femur", "knee",
           "lower-leg", "ankle", "foot", "rib", "clavicle"}  # fmt: skip
# A plausible technique per region: (kV, mAs of the first view, patient thickness mm).
_TECHNIQUE: dict[str, tuple[float, float, float]] = {
    "chest": (125.0, 2.0, 220.0),
    "abdomen": (80.0, 20.0, 220.0),
    "pelvis": (80.0, 20.0, 200.0),
    "skull": (75.0, 16.0, 180.0),
    "cervical-spine": (70.0, 10.0, 120.0),
    "thoracic-spine": (80.0, 16.0, 220.0),
    "lumbar-spine": (85.0, 25.0, 220.0),
}
_EXTREMITY = (57.0, 2.5, 80.0)
# PS3.16 CID 4010 "DX View" for the View Position (0018,5101) the modality uses (T7-15)
_VIEW_CODES: dict[str, Code] = {
    "PA": Code("272479007", "SCT", "postero-anterior"),
    "AP": Code("399348003", "SCT", "antero-posterior"),
    "LL": Code("399173006", "SCT", "left lateral"),
}


# ----------------------------------------------------------------------------- the procedure
@dataclass(frozen=True)
class Procedure:
    """What the modality knows about the procedure it performs: a worklist item's attributes
    (seed 004 Table 3-7, decoded to str) or a locally registered patient (``scheduled=False``).
    """

    patient_name: str
    patient_id: str
    issuer_of_patient_id: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    patient_weight: float | None = None
    referring_physician: str = ""
    study_uid: str = field(default_factory=generate_uid)
    accession_number: str = ""
    referenced_study: tuple[tuple[str, str], ...] = ()  # (SOP Class UID, SOP Instance UID)
    requested_procedure_id: str = ""
    requested_procedure_description: str = ""
    requested_procedure_codes: tuple[Code, ...] = ()
    sps_id: str = ""
    sps_description: str = ""
    protocol_codes: tuple[Code, ...] = ()
    scheduled_performing_physician: str = ""
    admission_id: str = ""
    scheduled: bool = False  # False for an unscheduled (locally registered) patient
    character_set: str | None = None  # of the worklist answer, if any
    patient_size: float | None = None  # m
    referenced_patient: tuple[tuple[str, str], ...] = ()
    other_patient_ids: str = ""
    admitting_diagnosis: str = ""
    requesting_physician: str = ""
    scheduled_modality: str = ""
    scheduled_station_ae: str = ""

    def __post_init__(self) -> None:
        if self.patient_sex not in ("", "M", "F", "O"):
            raise ValueError(f"Patient's Sex: not M, F or O: {self.patient_sex!r}")
        if self.patient_birth_date and not _DATE.fullmatch(self.patient_birth_date):
            raise ValueError(f"Patient's Birth Date: not YYYYMMDD: {self.patient_birth_date!r}")
        if not _UID.fullmatch(self.study_uid):
            raise ValueError(f"Study Instance UID: not a UID: {self.study_uid!r}")
        for keyword, value, limit in (
            ("Patient ID", self.patient_id, 64),
            ("Accession Number", self.accession_number, 16),
            ("Requested Procedure ID", self.requested_procedure_id, 16),
            ("Scheduled Procedure Step ID", self.sps_id, 16),
        ):
            if len(value) > limit:
                raise ValueError(f"{keyword}: longer than {limit} characters: {value!r}")


_DATE = re.compile(r"\d{8}")
_UID = re.compile(r"(0|[1-9]\d*)(\.(0|[1-9]\d*))*")
_MAX = {"SH": 16, "LO": 64, "PN": 64 * 5, "CS": 16, "AE": 16}


def _str(ds: Dataset | None, keyword: str, vr: str = "LO") -> str:
    """A worklist value as str; over-long values truncated (seed 004 §7.1.4)."""
    if ds is None:
        return ""
    value = ds.get(keyword)
    if value is None or value == "":
        return ""
    text = str(value).strip()
    if vr == "PN":
        return text
    return text[: _MAX.get(vr, 64)]


def _code_items(seq: Iterable[Dataset] | None) -> tuple[Code, ...]:
    out = []
    for item in seq or ():
        value = _str(item, "CodeValue", "SH") or _str(item, "LongCodeValue", "UC")
        scheme = _str(item, "CodingSchemeDesignator", "SH")
        if value and scheme:
            out.append(
                Code(
                    value,
                    scheme,
                    _str(item, "CodeMeaning"),
                    _str(item, "CodingSchemeVersion", "SH"),
                )
            )
    return tuple(out)


def _refs(seq: Iterable[Dataset] | None) -> tuple[tuple[str, str], ...]:
    return tuple(
        (_str(i, "ReferencedSOPClassUID", "UI"), _str(i, "ReferencedSOPInstanceUID", "UI"))
        for i in seq or ()
        if i.get("ReferencedSOPClassUID") and i.get("ReferencedSOPInstanceUID")
    )


def _number(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _date(value: str) -> str:
    """YYYYMMDD, also from the retired YYYY.MM.DD form (seed 004 Table 3-7 note)."""
    value = value.strip().replace(".", "")
    return value if _DATE.fullmatch(value) else ""


def procedure_from_worklist(item: Dataset) -> Procedure:
    """The procedure of one Modality Worklist C-FIND answer (seed 004 Table 3-7 return keys)."""
    item = copy.deepcopy(item)
    item.decode()  # values as str, decoded with the answer's Specific Character Set
    sps_seq = item.get("ScheduledProcedureStepSequence") or []
    sps = sps_seq[0] if len(sps_seq) else Dataset()
    sex = _str(item, "PatientSex", "CS").upper()
    charset = item.get("SpecificCharacterSet")
    if isinstance(charset, str):
        charset_text: str | None = charset
    elif charset:
        charset_text = "\\".join(str(c) for c in charset)
    else:
        charset_text = None
    study_uid = _str(item, "StudyInstanceUID", "UI")
    return Procedure(
        patient_name=_str(item, "PatientName", "PN"),
        patient_id=_str(item, "PatientID"),
        issuer_of_patient_id=_str(item, "IssuerOfPatientID"),
        patient_birth_date=_date(_str(item, "PatientBirthDate", "DA")),
        patient_sex=sex if sex in ("M", "F", "O") else "",
        patient_weight=_number(item, "PatientWeight"),
        patient_size=_number(item, "PatientSize"),
        referring_physician=_str(item, "ReferringPhysicianName", "PN"),
        # seed 004 §3.2.1.3: the worklist's Study Instance UID, else one generated locally
        study_uid=study_uid if _UID.fullmatch(study_uid) else generate_uid(),
        accession_number=_str(item, "AccessionNumber", "SH"),
        referenced_study=_refs(item.get("ReferencedStudySequence")),
        referenced_patient=_refs(item.get("ReferencedPatientSequence")),
        requested_procedure_id=_str(item, "RequestedProcedureID", "SH"),
        requested_procedure_description=_str(item, "RequestedProcedureDescription"),
        requested_procedure_codes=_code_items(item.get("RequestedProcedureCodeSequence")),
        sps_id=_str(sps, "ScheduledProcedureStepID", "SH"),
        sps_description=_str(sps, "ScheduledProcedureStepDescription"),
        protocol_codes=_code_items(sps.get("ScheduledProtocolCodeSequence")),
        scheduled_performing_physician=_str(sps, "ScheduledPerformingPhysicianName", "PN"),
        scheduled_modality=_str(sps, "Modality", "CS"),
        scheduled_station_ae=_str(sps, "ScheduledStationAETitle", "AE"),
        admission_id=_str(item, "AdmissionID"),
        admitting_diagnosis=_str(item, "AdmittingDiagnosesDescription"),
        other_patient_ids=_str(item, "OtherPatientIDs"),
        requesting_physician=_str(item, "RequestingPhysician", "PN"),
        scheduled=True,
        character_set=charset_text,
    )


def unscheduled_procedure(
    patient_id: str,
    patient_name: str,
    birth_date: str = "",
    sex: str = "",
    *,
    accession_number: str = "",
    study_uid: str | None = None,
    referring_physician: str = "",
    issuer_of_patient_id: str = "",
) -> Procedure:
    """A locally registered patient (IHE RAD TF-1 "unscheduled" case): a new study UID."""
    if not patient_id.strip():
        raise ValueError("Patient ID: required for an unscheduled procedure")
    return Procedure(
        patient_name=_user_pn(patient_name),
        patient_id=patient_id.strip(),
        issuer_of_patient_id=issuer_of_patient_id,
        patient_birth_date=birth_date,
        patient_sex=sex.upper(),
        referring_physician=referring_physician,
        study_uid=study_uid or generate_uid(),
        accession_number=accession_number,
        scheduled=False,
    )


def _user_pn(name: str) -> str:
    """seed 004 Table 7-2: a name entered by the user has all 5 components (some empty)."""
    groups = name.strip().split("=")
    first = groups[0].split("^")
    groups[0] = "^".join((first + [""] * 5)[:5]) if any(first) else ""
    return "=".join(groups)


# ----------------------------------------------------------------------------- the performed step
@dataclass(frozen=True)
class Performed:
    """One performed procedure step, decided when the exam starts."""

    mpps_uid: str
    pps_id: str
    study_id: str
    start: dt.datetime
    series_uid: str
    dose_series_uid: str
    description: str
    protocol_name: str
    operator: str = ""
    anatomy: Code = field(default_factory=lambda: ANATOMY["chest"])
    body_part: str = "CHEST"
    protocol_codes: tuple[Code, ...] = ()  # Performed Protocol Code Sequence
    series_number: int = 1
    dose_series_number: int = 999
    laterality: str = "U"  # Image Laterality: R, L, U (unpaired) or B

    def __post_init__(self) -> None:
        for keyword, value in (("Performed Procedure Step ID", self.pps_id),
                               ("Study ID", self.study_id)):  # fmt: skip
            if not value or len(value) > 16:
                raise ValueError(f"{keyword}: 1 to 16 characters (SH): {value!r}")
        if self.laterality not in ("R", "L", "U", "B"):
            raise ValueError(f"Image Laterality: R, L, U or B: {self.laterality!r}")


def new_performed(
    proc: Procedure,
    config: ModalityConfig,
    *,
    anatomy: str = "chest",
    now: dt.datetime | None = None,
    operator: str = "",
    laterality: str | None = None,
) -> Performed:
    """The step the modality starts for *proc*: Table 7-3 / 7-5 / 3-14 values decided now."""
    if anatomy not in ANATOMY:
        raise ValueError(f"anatomy: {anatomy!r} is not one of {', '.join(ANATOMY)}")
    start = (now or dt.datetime.now()).replace(microsecond=0)
    stamp = start.strftime("%Y%m%d%H%M%S")
    # seed 004 Table 3-14: PPS ID copied from the SPS ID if received, an internal value otherwise
    pps_id = proc.sps_id or f"PPS{stamp[2:]}"
    # Table 7-3: Study ID is the Requested Procedure ID from the worklist, or made locally
    study_id = proc.requested_procedure_id or stamp[2:14]
    region = ANATOMY[anatomy].meaning
    description = (
        proc.requested_procedure_description
        or proc.sps_description
        or f"{config.modality} {region}"
    )[:64]
    protocol_name = (
        proc.protocol_codes[0].meaning if proc.protocol_codes and proc.protocol_codes[0].meaning
        else proc.sps_description or region
    )[:64]  # fmt: skip
    protocol_codes = proc.protocol_codes or (
        Code(f"OPX-{BODY_PART[anatomy]}", LOCAL_SCHEME, protocol_name),
    )
    return Performed(
        mpps_uid=generate_uid(),
        pps_id=pps_id,
        study_id=study_id,
        start=start,
        series_uid=generate_uid(),
        dose_series_uid=generate_uid(),
        description=description,
        protocol_name=protocol_name,
        operator=operator,
        anatomy=ANATOMY[anatomy],
        body_part=BODY_PART[anatomy],
        protocol_codes=protocol_codes,
        laterality=laterality or ("R" if anatomy in _PAIRED else "U"),
    )


def _views(anatomy: str) -> tuple[str, str]:
    return ("PA", "LL") if anatomy == "chest" else ("AP", "LL")


def _anatomy_key(performed: Performed) -> str:
    for key, code in ANATOMY.items():
        if code == performed.anatomy:
            return key
    return "chest"


# ----------------------------------------------------------------------------- character sets
def _fit(text: str, charset: str, person_name: bool = False) -> str:
    """*text* representable in *charset*: unchanged when it is; else (a person name) its
    alphabetic group alone, then letters without their diacritics, then '?' for the rest."""
    encodings = convert_encodings([charset])
    codec = encodings[0]
    try:
        text.encode(codec)
        return text
    except UnicodeEncodeError:
        pass
    if person_name and "=" in text:
        text = text.split("=")[0]
        try:
            text.encode(codec)
            return text
        except UnicodeEncodeError:
            pass
    plain = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    out = plain.encode(codec, errors="replace").decode(codec)
    log.warning("%r is not representable in %s: written as %r", text, charset, out)
    return out


_TEXT_VRS = ("SH", "LO", "ST", "LT", "UC", "UT", "PN")


def _conform(ds: Dataset, charset: str) -> None:
    """Every text value of *ds* (sequences included) representable in *charset*."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _conform(item, charset)
        elif elem.VR in _TEXT_VRS and elem.value not in (None, ""):
            if elem.VM > 1:
                elem.value = [_fit(str(v), charset, elem.VR == "PN") for v in elem.value]
            elif elem.VR == "PN":
                elem.value = PersonName(_fit(str(elem.value), charset, True))
            else:
                elem.value = _fit(str(elem.value), charset)


# ----------------------------------------------------------------------------- common modules
def _da(moment: dt.datetime) -> str:
    return moment.strftime("%Y%m%d")


def _tm(moment: dt.datetime) -> str:
    return moment.strftime("%H%M%S")


def _ds(value: float, digits: int = 6) -> str:
    """A DS value: at most *digits* decimals, no trailing zeros, within 16 characters."""
    text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def _age(birth: str, on: dt.date) -> str:
    """Patient's Age (AS) on *on* (seed 004 Table 7-4: calculated from the birth date)."""
    try:
        born = dt.date(int(birth[:4]), int(birth[4:6]), int(birth[6:8]))
    except (ValueError, IndexError):
        return ""
    days = (on - born).days
    if days < 0:
        return ""
    years = on.year - born.year - ((on.month, on.day) < (born.month, born.day))
    if years >= 1:
        return f"{min(years, 999):03d}Y"
    months = (on.year - born.year) * 12 + on.month - born.month - (on.day < born.day)
    if months >= 1:
        return f"{months:03d}M"
    return f"{days:03d}D"


def _ref_items(refs: Iterable[tuple[str, str]]) -> DicomSequence:
    out = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        out.append(item)
    return DicomSequence(out)


def _patient_study(ds: Dataset, proc: Procedure, performed: Performed) -> None:
    """Patient (T7-2), General Study (T7-3) and Patient Study (T7-4) modules."""
    ds.PatientName = proc.patient_name
    ds.PatientID = proc.patient_id
    if proc.issuer_of_patient_id:
        ds.IssuerOfPatientID = proc.issuer_of_patient_id
    ds.PatientBirthDate = proc.patient_birth_date
    ds.PatientSex = proc.patient_sex
    if proc.referenced_patient:
        ds.ReferencedPatientSequence = _ref_items(proc.referenced_patient)
    if proc.other_patient_ids:
        ds.OtherPatientIDs = proc.other_patient_ids
    ds.StudyInstanceUID = proc.study_uid
    # seed 004 Table 3-14 (IHE-8): the study's date and time are the step's start
    ds.StudyDate = _da(performed.start)
    ds.StudyTime = _tm(performed.start)
    ds.ReferringPhysicianName = proc.referring_physician
    ds.StudyID = performed.study_id
    ds.AccessionNumber = proc.accession_number
    ds.StudyDescription = performed.description
    if proc.referenced_study:
        ds.ReferencedStudySequence = _ref_items(proc.referenced_study)
    if proc.requested_procedure_codes:
        ds.ProcedureCodeSequence = _codes(proc.requested_procedure_codes)
    age = _age(proc.patient_birth_date, performed.start.date())
    if age:
        ds.PatientAge = age
    if proc.patient_size is not None:
        ds.PatientSize = _ds(proc.patient_size, 3)
    if proc.patient_weight is not None:
        ds.PatientWeight = _ds(proc.patient_weight, 2)
    if proc.admitting_diagnosis:
        ds.AdmittingDiagnosesDescription = proc.admitting_diagnosis
    if proc.admission_id:
        ds.AdmissionID = proc.admission_id


def _equipment(ds: Dataset, config: ModalityConfig) -> None:
    """General Equipment (T7-6) — and Enhanced General Equipment's type 1 attributes."""
    ds.Manufacturer = config.manufacturer
    ds.InstitutionName = config.institution_name
    ds.InstitutionalDepartmentName = config.institution_department
    ds.StationName = config.station_name
    ds.ManufacturerModelName = config.model_name
    ds.DeviceSerialNumber = config.device_serial_number
    ds.SoftwareVersions = SOFTWARE_VERSION


def _request_attributes(proc: Procedure) -> DicomSequence:
    """Request Attributes Sequence (T7-5, T7-38): zero or one item."""
    if not proc.scheduled:
        return DicomSequence([])
    item = Dataset()
    item.RequestedProcedureID = proc.requested_procedure_id
    item.RequestedProcedureDescription = proc.requested_procedure_description
    if proc.requested_procedure_codes:
        item.RequestedProcedureCodeSequence = _codes(proc.requested_procedure_codes)
    item.ScheduledProcedureStepID = proc.sps_id
    item.ScheduledProcedureStepDescription = proc.sps_description
    if proc.protocol_codes:  # type 3: absent, not empty, when the worklist sent none
        item.ScheduledProtocolCodeSequence = _codes(proc.protocol_codes)
    item.AccessionNumber = proc.accession_number
    item.StudyInstanceUID = proc.study_uid
    return DicomSequence([item])


def _sop_common(ds: Dataset, sop_class: str, sop_uid: str, charset: str, when: dt.datetime,
                config: ModalityConfig) -> None:  # fmt: skip
    ds.SpecificCharacterSet = charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = _da(when)
    ds.InstanceCreationTime = _tm(when)
    ds.InstanceCreatorUID = IMPLEMENTATION_CLASS_UID
    offset = when.astimezone().strftime("%z") if when.tzinfo is None else when.strftime("%z")
    if offset:
        ds.TimezoneOffsetFromUTC = offset
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    meta.SourceApplicationEntityTitle = config.ae_title
    ds.file_meta = meta


def _mpps_reference(performed: Performed) -> DicomSequence:
    item = Dataset()
    item.ReferencedSOPClassUID = MPPS_SOP_CLASS
    item.ReferencedSOPInstanceUID = performed.mpps_uid
    return DicomSequence([item])


# ----------------------------------------------------------------------------- images
@dataclass(frozen=True)
class _Exposure:
    """One exposure's technique and dose, rounded as it is encoded."""

    view: str
    kvp: float
    tube_current_ua: int  # µA
    exposure_time_us: int  # µs
    sid_mm: float
    source_patient_mm: float
    source_entrance_mm: float
    thickness_mm: float
    entrance_dose_mgy: float
    dap_dgy_cm2: float
    exposure_index: float
    field_mm: tuple[float, float]  # collimated field (height, width) at the detector

    @property
    def exposure_uas(self) -> int:
        return round(self.tube_current_ua * self.exposure_time_us / 1_000_000)


def _exposure(anatomy: str, view: str, rng: np.random.Generator,
              field_mm: tuple[float, float]) -> _Exposure:  # fmt: skip
    kv, mas, thickness = _TECHNIQUE.get(anatomy, _EXTREMITY)
    if view == "LL":
        mas, thickness = mas * 2.5, thickness * 1.4
    # automatic exposure control: the dose varies a little from one patient/view to the next
    mas *= float(rng.uniform(0.8, 1.25))
    tube_ma = 400 if mas >= 4 else 250
    time_us = max(1000, round(mas / tube_ma * 1e6 / 100) * 100)
    tube_ua = tube_ma * 1000
    mas = tube_ua * time_us / 1e12 * 1000  # as encoded
    sid = 1800.0 if anatomy == "chest" else 1150.0
    entrance = sid - 30.0 - thickness  # 30 mm from the table/bucky surface to the detector
    patient = entrance + thickness / 2
    # tube output at 1 m: ~0.08 mGy/mAs at 100 kV, growing with kV²; backscatter factor 1.35
    output = 0.08 * (kv / 100.0) ** 2
    esak = output * mas * (1000.0 / entrance) ** 2
    entrance_dose = round(esak * 1.35, 4)
    area_cm2 = field_mm[0] * field_mm[1] / 100.0
    dap = round(output * mas * (1000.0 / sid) ** 2 * 1e-3 * area_cm2 * 10.0, 4)  # dGy·cm²
    target = 250.0
    exposure_index = round(target * float(rng.uniform(0.8, 1.25)), 1)
    return _Exposure(
        view=view,
        kvp=kv,
        tube_current_ua=tube_ua,
        exposure_time_us=time_us,
        sid_mm=sid,
        source_patient_mm=patient,
        source_entrance_mm=entrance,
        thickness_mm=thickness,
        entrance_dose_mgy=max(entrance_dose, 0.0001),
        dap_dgy_cm2=max(dap, 0.0001),
        exposure_index=exposure_index,
        field_mm=field_mm,
    )


TARGET_EXPOSURE_INDEX = 250.0


def _pixels(rows: int, columns: int, view: str, rng: np.random.Generator) -> np.ndarray:
    """A synthetic chest-like radiograph, 12 bits, MONOCHROME2 (dense = bright)."""
    y, x = np.mgrid[-1.0 : 1.0 : rows * 1j, -1.0 : 1.0 : columns * 1j]
    body = np.exp(-((x / 0.82) ** 8)) * np.clip(1.2 - 0.15 * y, 0.0, None)
    if view == "LL":
        lungs = np.exp(-(((x - 0.05) / 0.42) ** 2 + ((y + 0.1) / 0.55) ** 4))
        spine = np.exp(-(((x - 0.55) / 0.08) ** 2))
    else:
        lungs = sum(
            np.exp(-(((x - cx) / 0.25) ** 2 + ((y + 0.1) / 0.55) ** 4)) for cx in (-0.4, 0.4)
        )
        spine = np.exp(-((x / 0.09) ** 2))
    diaphragm = 1.0 / (1.0 + np.exp(-(y - 0.45) * 12.0))
    image = (
        300.0
        + 1900.0 * body
        - 1200.0 * lungs * (1.0 - diaphragm)
        + 900.0 * spine * body
        + 500.0 * diaphragm * body
        + 150.0 * y
    )
    image += rng.normal(0.0, 40.0, size=image.shape)
    return np.clip(image, 0, 4095).astype(np.uint16)


def make_images(
    proc: Procedure,
    performed: Performed,
    config: ModalityConfig,
    count: int,
    *,
    seed: int = 0,
    rows: int = 512,
    columns: int = 420,
) -> list[Dataset]:
    """*count* images of the step: DX For Presentation (seed 004 Table 7-1) when the modality
    is DX, CR (Table 7-22) when CR; deterministic pixel data and technique for *seed*."""
    if count < 1:
        raise ValueError("count: at least one image")
    if not (64 <= rows <= 1024 and 64 <= columns <= 1024):
        raise ValueError("rows, columns: 64 to 1024 (an image stays under ~2 MB)")
    dx = config.modality == "DX"
    anatomy = _anatomy_key(performed)
    views = _views(anatomy)
    rng = np.random.default_rng(seed)
    detector_mm = 430.0  # the detector's long side; pixel spacing follows from the matrix
    spacing = round(detector_mm / rows, 4)
    field_mm = (round(spacing * rows, 1), round(spacing * columns, 1))
    out = []
    for n in range(count):
        view = views[n % 2]
        when = performed.start + dt.timedelta(seconds=40 * n + 20)
        exp = _exposure(anatomy, view, rng, field_mm)
        pixels = _pixels(rows, columns, view, rng)
        ds = Dataset()
        _patient_study(ds, proc, performed)
        # General Series (T7-5) + DX Series (T7-16) / CR Series (T7-23)
        ds.Modality = config.modality
        ds.SeriesInstanceUID = performed.series_uid
        ds.SeriesNumber = performed.series_number
        ds.SeriesDate = _da(performed.start)
        ds.SeriesTime = _tm(performed.start)
        ds.SeriesDescription = performed.description
        ds.PerformingPhysicianName = proc.scheduled_performing_physician
        ds.ProtocolName = performed.protocol_name
        ds.OperatorsName = performed.operator
        ds.ReferencedPerformedProcedureStepSequence = _mpps_reference(performed)
        ds.BodyPartExamined = performed.body_part
        ds.ViewPosition = view
        if proc.scheduled:  # type 3: absent, not empty, for an unscheduled step
            ds.RequestAttributesSequence = _request_attributes(proc)
        ds.PerformedProcedureStepID = performed.pps_id
        ds.PerformedProcedureStepStartDate = _da(performed.start)
        ds.PerformedProcedureStepStartTime = _tm(performed.start)
        ds.PerformedProcedureStepDescription = performed.description
        if performed.protocol_codes:  # type 3: absent rather than empty
            ds.PerformedProtocolCodeSequence = _codes(performed.protocol_codes)
        if dx:
            ds.PresentationIntentType = "FOR PRESENTATION"
        _equipment(ds, config)
        # General Acquisition / General Image (T7-7)
        ds.AcquisitionNumber = n + 1
        ds.AcquisitionDate = _da(when)
        ds.AcquisitionTime = _tm(when)
        ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
        ds.InstanceNumber = n + 1
        ds.ContentDate = _da(when)
        ds.ContentTime = _tm(when)
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PatientOrientation = ["P", "F"] if view == "LL" else ["L", "F"]
        ds.ImageLaterality = performed.laterality
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        ds.PresentationLUTShape = "IDENTITY"
        ds.IrradiationEventUID = generate_uid()
        ds.AnatomicRegionSequence = _codes([performed.anatomy])
        # Image Pixel (T7-8)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.tobytes()
        # DX Image (T7-13) / Modality LUT: linear, identity rescale
        if dx:
            ds.PixelIntensityRelationship = "LIN"
            ds.PixelIntensityRelationshipSign = 1
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"
        ds.AcquisitionDeviceProcessingDescription = f"{performed.anatomy.meaning} {view}"[:64]
        ds.AcquisitionDeviceProcessingCode = f"{performed.body_part}_{view}"[:64]
        # VOI LUT: the window the synthetic image is meant to be seen with
        low, high = (float(v) for v in np.percentile(pixels, (1, 99)))
        ds.WindowCenter = _ds((low + high) / 2, 1)
        ds.WindowWidth = _ds(max(high - low, 1.0), 1)
        ds.WindowCenterWidthExplanation = "NORMAL"
        ds.VOILUTFunction = "LINEAR"
        # Detector (T7-12, T7-14)
        ds.ImagerPixelSpacing = [_ds(spacing, 4), _ds(spacing, 4)]
        ds.Sensitivity = "400"
        if dx:
            ds.EstimatedRadiographicMagnificationFactor = _ds(exp.sid_mm / exp.source_patient_mm, 4)
            ds.DetectorType = "SCINTILLATOR"
            ds.DetectorConfiguration = "AREA"
            ds.DetectorDescription = "Virtual flat panel detector"
            ds.DetectorID = f"{config.device_serial_number}-D1"[:16]
            ds.DateOfLastDetectorCalibration = _da(performed.start - dt.timedelta(days=7))
            ds.TimeOfLastDetectorCalibration = "070000"
            ds.DetectorConditionsNominalFlag = "YES"
            ds.DetectorTemperature = "30.5"
            ds.DetectorBinning = ["1", "1"]
            ds.DetectorElementPhysicalSize = ds.ImagerPixelSpacing
            ds.DetectorElementSpacing = ds.ImagerPixelSpacing
            ds.DetectorActiveShape = "RECTANGLE"
            ds.DetectorActiveDimensions = [_ds(field_mm[0], 1), _ds(field_mm[1], 1)]
            ds.FieldOfViewShape = "RECTANGLE"
            ds.FieldOfViewDimensions = [round(field_mm[0]), round(field_mm[1])]
            ds.FieldOfViewOrigin = ["0", "0"]
            ds.FieldOfViewRotation = "0"
            ds.FieldOfViewHorizontalFlip = "NO"
            # DX Positioning (T7-15)
            ds.PositionerType = "COLUMN"
            ds.ColumnAngulation = "0"
            ds.TableType = "FIXED"
            ds.TableAngle = "0"
            ds.ViewCodeSequence = _codes([_VIEW_CODES[view]])
            ds.AcquisitionContextSequence = DicomSequence([])
        else:  # CR Image module (T7-24)
            ds.PlateID = f"PLATE{n + 1:03d}"
            ds.CassetteOrientation = "PORTRAIT"
            ds.CassetteSize = "35CMX43CM"
            ds.ExposuresOnPlate = 1
        # X-Ray Acquisition / X-Ray Dose (T7-11, T7-18) — CR Image module (T7-24) for CR
        ds.KVP = _ds(exp.kvp, 1)
        ds.XRayTubeCurrent = exp.tube_current_ua // 1000
        ds.ExposureTime = max(1, round(exp.exposure_time_us / 1000))
        if dx:
            ds.XRayTubeCurrentInuA = _ds(exp.tube_current_ua, 1)
            ds.ExposureTimeInuS = _ds(exp.exposure_time_us, 1)
        ds.Exposure = max(1, round(exp.exposure_uas / 1000))
        ds.ExposureInuAs = exp.exposure_uas
        ds.DistanceSourceToDetector = _ds(exp.sid_mm, 1)
        ds.DistanceSourceToPatient = _ds(exp.source_patient_mm, 1)
        # X-Ray Acquisition Dose: in a CR image too (Standard Extended) — the dose report and
        # the MPPS are computed from the images
        ds.ImageAndFluoroscopyAreaDoseProduct = _ds(exp.dap_dgy_cm2, 4)
        ds.EntranceDoseInmGy = _ds(exp.entrance_dose_mgy, 4)
        ds.DistanceSourceToEntrance = _ds(exp.source_entrance_mm, 1)
        ds.RelativeXRayExposure = round(exp.exposure_index)
        ds.ExposureIndex = _ds(exp.exposure_index, 1)
        ds.TargetExposureIndex = _ds(TARGET_EXPOSURE_INDEX, 1)
        ds.DeviationIndex = _ds(10 * math.log10(exp.exposure_index / TARGET_EXPOSURE_INDEX), 2)
        ds.FocalSpots = "1.2" if exp.kvp >= 100 else "0.6"
        if dx:
            ds.BodyPartThickness = _ds(exp.thickness_mm, 1)
            ds.AnodeTargetMaterial = "TUNGSTEN"
            ds.RectificationType = "CONST POTENTIAL"  # a high-frequency generator
            ds.ExposureControlMode = "AUTOMATIC"
            ds.CollimatorShape = "RECTANGULAR"
            # X-Ray Collimator: the field is the whole detector, edges in pixel coordinates
            ds.CollimatorLeftVerticalEdge = 0
            ds.CollimatorRightVerticalEdge = columns - 1
            ds.CollimatorUpperHorizontalEdge = 0
            ds.CollimatorLowerHorizontalEdge = rows - 1
            # X-Ray Filtration (T7-19) and X-Ray Grid (T7-20)
            ds.FilterType = "FLAT"
            ds.FilterMaterial = ["ALUMINUM", "COPPER"]
            ds.FilterThicknessMinimum = ["1.0", "0.1"]
            ds.FilterThicknessMaximum = ["1.0", "0.1"]
            ds.Grid = ["FIXED", "FOCUSED"] if anatomy != "chest" or view != "PA" else "NONE"
            if anatomy != "chest" or view != "PA":
                ds.GridAbsorbingMaterial = "LEAD"
                ds.GridSpacingMaterial = "ALUMINUM"
                ds.GridPitch = "0.2"
                ds.GridAspectRatio = ["13", "1"]
                ds.GridFocalDistance = _ds(exp.sid_mm, 1)
        _sop_common(ds, DX_FOR_PRESENTATION if dx else CR_IMAGE, generate_uid(),
                    config.character_set, when, config)  # fmt: skip
        _conform(ds, config.character_set)
        out.append(ds)
    return out


# ----------------------------------------------------------------------------- dose
@dataclass(frozen=True)
class DoseTotals:
    """The step's dose, summed over its images (seed 004 Table 3-14 N-SET dose attributes)."""

    exposures: int
    dap_gy_m2: float  # Dose Area Product Total (TID 10007)
    entrance_dose_mgy: float  # Entrance Dose in mGy (0040,8302): the events' sum
    dap_dgy_cm2: float  # Image and Fluoroscopy Area Dose Product (0018,115E)
    dose_rp_gy: float  # Dose (RP) Total (TID 10007), at the patient's surface
    min_sid_mm: float | None  # Distance Source to Detector: minimum value
    min_source_entrance_mm: float | None  # Distance Source to Entrance: minimum value
    total_exposure_mas: float


def _float(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return float(value)


def dose_totals(images: Sequence[Dataset]) -> DoseTotals:
    """The sums (and minimum distances) over *images*, from their encoded dose attributes."""
    dap = sum(_float(i, "ImageAndFluoroscopyAreaDoseProduct") or 0.0 for i in images)
    entrance = sum(_float(i, "EntranceDoseInmGy") or 0.0 for i in images)
    sids = [v for i in images if (v := _float(i, "DistanceSourceToDetector")) is not None]
    entrances = [v for i in images if (v := _float(i, "DistanceSourceToEntrance")) is not None]
    mas = sum((_float(i, "ExposureInuAs") or 0.0) / 1000.0 for i in images)
    return DoseTotals(
        exposures=len(images),
        dap_gy_m2=round(dap * 1e-5, 12),  # 1 dGy·cm² = 0.1 Gy × 1e-4 m²
        entrance_dose_mgy=round(entrance, 6),
        dap_dgy_cm2=round(dap, 6),
        dose_rp_gy=round(entrance / 1000.0, 9),
        min_sid_mm=min(sids) if sids else None,
        min_source_entrance_mm=min(entrances) if entrances else None,
        total_exposure_mas=round(mas, 6),
    )


def make_dose_sr(
    proc: Procedure,
    performed: Performed,
    config: ModalityConfig,
    images: list[Dataset],
    *,
    when: dt.datetime | None = None,
) -> Dataset:
    """The X-Ray Radiation Dose SR of the step (seed 004 Tables 7-25..7-37): TID 10001 with
    one TID 10003 irradiation event per image and the TID 10002/10007 accumulated dose."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if not images:
        raise ValueError("a dose report needs at least one irradiation event (image)")
    dcm = codes.DCM
    rel = hd.sr.RelationshipTypeValues

    def num(name: SrCode, value: float, unit: str, meaning: str | None = None) -> ContentItem:
        return hd.sr.NumContentItem(
            name=name,
            value=value,
            unit=hd.sr.CodedConcept(unit, "UCUM", meaning or unit),
            relationship_type=rel.CONTAINS,
        )

    def container(
        name: SrCode,
        items: list[ContentItem],
        relationship: RelationshipTypeValues | None,
        template: str | None = None,
    ) -> ContainerContentItem:
        box = hd.sr.ContainerContentItem(
            name=name, template_id=template, relationship_type=relationship
        )
        box.ContentSequence = hd.sr.ContentSequence(items)
        return box

    single_plane = codes.cid10003.SinglePlane
    plane = hd.sr.CodeContentItem(dcm.AcquisitionPlane, single_plane, rel.HAS_CONCEPT_MOD)
    totals = dose_totals(images)
    when = when or max(
        dt.datetime.strptime(str(i.AcquisitionDateTime)[:14], "%Y%m%d%H%M%S") for i in images
    ) + dt.timedelta(seconds=5)

    # TID 10002 Accumulated X-Ray Dose with TID 10007 Accumulated Total Projection
    # Radiography Dose (seed 004 Tables 7-30, 7-31)
    accumulated = container(
        dcm.AccumulatedXRayDoseData,
        [
            plane,
            num(dcm.DoseAreaProductTotal, totals.dap_gy_m2, "Gy.m2"),
            num(dcm.DoseRPTotal, totals.dose_rp_gy, "Gy"),
            num(dcm.TotalNumberOfRadiographicFrames, totals.exposures, "1", "no units"),
            hd.sr.CodeContentItem(
                dcm.ReferencePointDefinition, codes.cid10025.AtSurfaceOfPatient, rel.CONTAINS
            ),
        ],
        rel.CONTAINS,
        "10002",
    )
    events = []
    for image in images:
        kvp = float(image.KVP)
        exposure_uas = float(image.ExposureInuAs)
        if "XRayTubeCurrentInuA" in image:
            tube_ma = float(image.XRayTubeCurrentInuA) / 1000.0
        else:
            tube_ma = float(image.XRayTubeCurrent)
        if "ExposureTimeInuS" in image:
            time_ms = float(image.ExposureTimeInuS) / 1000.0
        else:  # the CR Image module has whole milliseconds only; µAs / mA is exact
            time_ms = exposure_uas / tube_ma  # µA·s / mA = ms
        rows, columns = int(image.Rows), int(image.Columns)
        spacing = float(image.ImagerPixelSpacing[0])
        height_mm, width_mm = rows * spacing, columns * spacing
        started = dt.datetime.strptime(str(image.AcquisitionDateTime)[:14], "%Y%m%d%H%M%S")
        ei = float(image.ExposureIndex)
        # TID 10003 Irradiation Event X-Ray Data (seed 004 Table 7-33) with its detector
        # (10003A, T7-34), source (10003B, T7-35) and mechanical (10003C, T7-36) data
        items: list[ContentItem] = [
            plane,
            hd.sr.UIDRefContentItem(dcm.IrradiationEventUID, str(image.IrradiationEventUID),
                                    rel.CONTAINS),
            hd.sr.DateTimeContentItem(dcm.DatetimeStarted, started, rel.CONTAINS),
            hd.sr.CodeContentItem(dcm.IrradiationEventType,
                                  codes.cid10002.StationaryAcquisition, rel.CONTAINS),
            hd.sr.TextContentItem(dcm.AcquisitionProtocol,
                                  f"{performed.protocol_name} {image.ViewPosition}"[:64],
                                  rel.CONTAINS),
            hd.sr.CodeContentItem(dcm.TargetRegion,
                                  hd.sr.CodedConcept(performed.anatomy.value,
                                                     performed.anatomy.scheme,
                                                     performed.anatomy.meaning),
                                  rel.CONTAINS),
            num(dcm.DoseAreaProduct, float(image.ImageAndFluoroscopyAreaDoseProduct) * 1e-5,
                "Gy.m2"),
            num(dcm.ExposureIndex, ei, "1", "no units"),
            num(dcm.TargetExposureIndex, float(image.TargetExposureIndex), "1", "no units"),
            num(dcm.DeviationIndex, float(image.DeviationIndex), "1", "no units"),
            hd.sr.ImageContentItem(dcm.AcquiredImage, str(image.SOPClassUID),
                                   str(image.SOPInstanceUID), relationship_type=rel.CONTAINS),
            num(dcm.DoseRP, float(image.EntranceDoseInmGy) / 1000.0, "Gy"),
            hd.sr.CodeContentItem(dcm.ReferencePointDefinition,
                                  codes.cid10025.AtSurfaceOfPatient, rel.CONTAINS),
            num(dcm.IrradiationDuration, time_ms / 1000.0, "s"),
            num(dcm.KVP, kvp, "kV"),
            num(dcm.XRayTubeCurrent, tube_ma, "mA"),
            num(dcm.ExposureTime, time_ms, "ms"),
            num(dcm.Exposure, exposure_uas, "uA.s"),
            num(dcm.FocalSpotSize, float(image.FocalSpots), "mm"),
            container(dcm.XRayFilters, [
                hd.sr.CodeContentItem(dcm.XRayFilterType, codes.cid10007.FlatFilter,
                                      rel.CONTAINS),
                hd.sr.CodeContentItem(dcm.XRayFilterMaterial, codes.cid10006.Copper,
                                      rel.CONTAINS),
                num(dcm.XRayFilterThicknessMinimum, 0.1, "mm"),
                num(dcm.XRayFilterThicknessMaximum, 0.1, "mm"),
            ], rel.CONTAINS),
            num(dcm.CollimatedFieldArea, round(height_mm * width_mm * 1e-6, 6), "m2"),
            num(dcm.CollimatedFieldHeight, round(height_mm, 1), "mm"),
            num(dcm.CollimatedFieldWidth, round(width_mm, 1), "mm"),
            num(dcm.ColumnAngulation, 0.0, "deg"),
            num(dcm.DistanceSourceToDetector, float(image.DistanceSourceToDetector), "mm"),
        ]  # fmt: skip
        events.append(container(dcm.IrradiationEventXRayData, items, rel.CONTAINS, "10003"))

    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=IMPLEMENTATION_CLASS_UID,
            name=config.station_name,
            manufacturer_name=config.manufacturer,
            model_name=config.model_name,
            serial_number=config.device_serial_number,
        ),
    )
    yes = codes.cid230.Yes
    scope = hd.sr.CodeContentItem(dcm.ScopeOfAccumulation, codes.DCM.Study, rel.HAS_OBS_CONTEXT)
    scope.ContentSequence = hd.sr.ContentSequence(
        [hd.sr.UIDRefContentItem(dcm.StudyInstanceUID, proc.study_uid, rel.HAS_PROPERTIES)]
    )
    reported = hd.sr.CodeContentItem(dcm.ProcedureReported, dcm.ProjectionXRay,
                                     rel.HAS_CONCEPT_MOD)  # fmt: skip
    reported.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.CodeContentItem(
                codes.SCT.HasIntent, codes.SCT.DiagnosticIntent, rel.HAS_CONCEPT_MOD
            )
        ]
    )
    root = container(
        dcm.XRayRadiationDoseReport,
        [
            reported,
            *observer,
            scope,
            hd.sr.CodeContentItem(dcm.XRayDetectorDataAvailable, yes, rel.CONTAINS),
            hd.sr.CodeContentItem(dcm.XRaySourceDataAvailable, yes, rel.CONTAINS),
            hd.sr.CodeContentItem(dcm.XRayMechanicalDataAvailable, yes, rel.CONTAINS),
            accumulated,
            *events,
            hd.sr.CodeContentItem(
                dcm.SourceOfDoseInformation, codes.cid10020.SystemCalculated, rel.CONTAINS
            ),
        ],
        None,
        "10001",
    )
    sop_uid = generate_uid()
    sr = hd.sr.ComprehensiveSR(
        evidence=images,
        content=root,
        series_instance_uid=performed.dose_series_uid,
        series_number=performed.dose_series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=config.manufacturer,
        is_complete=True,
        is_final=True,
        institution_name=config.institution_name,
        institutional_department_name=config.institution_department,
        requested_procedures=[_referenced_request(proc)] if proc.scheduled else None,
        series_description="Dose Report",
        manufacturer_model_name=config.model_name,
        software_versions=SOFTWARE_VERSION,
        device_serial_number=config.device_serial_number,
        content_date=when.date(),
        content_time=when.time(),
        series_date=performed.start.date(),
        series_time=performed.start.time(),
        specific_character_set=config.character_set,
    )
    # highdicom has no X-Ray Radiation Dose SR class: the document is a Comprehensive SR
    # content tree (PS3.3 A.35.8 allows the same value types, without SCOORD), re-labelled.
    ds = Dataset(sr)
    ds.SOPClassUID = XRAY_DOSE_SR
    ds.ReferencedPerformedProcedureStepSequence = _mpps_reference(performed)
    ds.PerformedProcedureCodeSequence = _codes(proc.requested_procedure_codes)
    ds.StationName = config.station_name
    ds.StudyDescription = performed.description
    _sop_common(ds, XRAY_DOSE_SR, sop_uid, config.character_set, when, config)
    _conform(ds, config.character_set)
    return ds


def _referenced_request(proc: Procedure) -> Dataset:
    """An item of the SR's Referenced Request Sequence (PS3.3 C.17.2, the request fulfilled)."""
    item = Dataset()
    item.StudyInstanceUID = proc.study_uid
    item.ReferencedStudySequence = _ref_items(proc.referenced_study)
    item.AccessionNumber = proc.accession_number
    item.PlacerOrderNumberImagingServiceRequest = ""
    item.FillerOrderNumberImagingServiceRequest = ""
    item.RequestedProcedureID = proc.requested_procedure_id
    item.RequestedProcedureDescription = proc.requested_procedure_description
    item.RequestedProcedureCodeSequence = _codes(proc.requested_procedure_codes)
    return item


# ----------------------------------------------------------------------------- MPPS
def _scheduled_step(proc: Procedure) -> DicomSequence:
    """Scheduled Step Attributes Sequence (seed 004 Table 3-14, Table 7-38). Unscheduled
    (PS3.4 F.7.2.1, IHE RAD TF-2 4.6.4.1.2.4): one item with the locally made Study Instance
    UID and the other attributes zero length."""
    item = Dataset()
    item.StudyInstanceUID = proc.study_uid
    item.ReferencedStudySequence = _ref_items(proc.referenced_study)
    item.AccessionNumber = proc.accession_number
    item.RequestedProcedureID = proc.requested_procedure_id
    item.RequestedProcedureDescription = proc.requested_procedure_description
    item.ScheduledProcedureStepID = proc.sps_id
    item.ScheduledProcedureStepDescription = proc.sps_description
    item.ScheduledProtocolCodeSequence = _codes(proc.protocol_codes)
    return DicomSequence([item])


def mpps_create(proc: Procedure, performed: Performed, config: ModalityConfig) -> Dataset:
    """The N-CREATE attribute list (seed 004 Table 3-14): status IN PROGRESS, the final
    attributes zero length."""
    ds = Dataset()
    ds.SpecificCharacterSet = config.character_set
    ds.ScheduledStepAttributesSequence = _scheduled_step(proc)
    ds.PatientName = proc.patient_name
    ds.PatientID = proc.patient_id
    if proc.issuer_of_patient_id:
        ds.IssuerOfPatientID = proc.issuer_of_patient_id
    ds.PatientBirthDate = proc.patient_birth_date
    ds.PatientSex = proc.patient_sex
    ds.ReferencedPatientSequence = _ref_items(proc.referenced_patient)
    ds.PerformedProcedureStepID = performed.pps_id
    ds.PerformedStationAETitle = config.ae_title
    ds.PerformedStationName = config.station_name
    ds.PerformedLocation = ""
    ds.PerformedProcedureStepStartDate = _da(performed.start)
    ds.PerformedProcedureStepStartTime = _tm(performed.start)
    ds.PerformedProcedureStepEndDate = ""
    ds.PerformedProcedureStepEndTime = ""
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepDescription = performed.description
    ds.PerformedProcedureTypeDescription = ""
    ds.PerformedProcedureStepDiscontinuationReasonCodeSequence = DicomSequence([])
    ds.ProcedureCodeSequence = _codes(proc.requested_procedure_codes)
    ds.Modality = config.modality
    ds.StudyID = performed.study_id
    ds.PerformedProtocolCodeSequence = DicomSequence([])
    ds.PerformedSeriesSequence = DicomSequence([])
    # Radiation Dose module: zero length until the final N-SET
    ds.TotalTimeOfFluoroscopy = None
    ds.TotalNumberOfExposures = None
    ds.DistanceSourceToDetector = None
    ds.DistanceSourceToEntrance = None
    ds.ImageAndFluoroscopyAreaDoseProduct = None
    ds.ExposureDoseSequence = DicomSequence([])
    ds.CommentsOnRadiationDose = ""
    # Billing and Material Code module
    ds.BillingProcedureStepSequence = DicomSequence([])
    ds.FilmConsumptionSequence = DicomSequence([])
    _conform(ds, config.character_set)
    return ds


def _series_item(
    proc: Procedure,
    performed: Performed,
    config: ModalityConfig,
    series_uid: str,
    description: str,
) -> Dataset:
    item = Dataset()
    item.PerformingPhysicianName = proc.scheduled_performing_physician
    item.ProtocolName = performed.protocol_name
    item.OperatorsName = performed.operator
    item.SeriesInstanceUID = series_uid
    item.SeriesDescription = description
    item.RetrieveAETitle = ""
    item.ReferencedImageSequence = DicomSequence([])
    item.ReferencedNonImageCompositeSOPInstanceSequence = DicomSequence([])
    return item


def mpps_set(
    proc: Procedure,
    performed: Performed,
    config: ModalityConfig,
    images: Sequence[Dataset],
    dose_sr: Dataset | None,
    *,
    discontinue: Code | None = None,
    end: dt.datetime | None = None,
) -> Dataset:
    """The final N-SET (seed 004 Table 3-14): COMPLETED, or DISCONTINUED with a CID 9300
    reason; the Performed Series Sequence lists the image series (Referenced Image Sequence)
    and, in an item of its own, the dose report (Referenced Non-Image Composite SOP Instance
    Sequence); the Radiation Dose module holds the totals over the images."""
    if discontinue is None and not images:
        raise ValueError("a COMPLETED step needs at least one image")
    end = (end or dt.datetime.now()).replace(microsecond=0)
    if end < performed.start:
        raise ValueError("end: before the step's start")
    ds = Dataset()
    ds.SpecificCharacterSet = config.character_set
    ds.PerformedLocation = ""
    ds.PerformedProcedureStepEndDate = _da(end)
    ds.PerformedProcedureStepEndTime = _tm(end)
    ds.PerformedProcedureStepStatus = "DISCONTINUED" if discontinue else "COMPLETED"
    ds.PerformedProcedureStepDescription = performed.description
    ds.PerformedProcedureStepDiscontinuationReasonCodeSequence = _codes(
        [discontinue] if discontinue else []
    )
    ds.ProcedureCodeSequence = _codes(proc.requested_procedure_codes)
    ds.PerformedProtocolCodeSequence = _codes(performed.protocol_codes if images else ())
    series = []
    if images:
        item = _series_item(proc, performed, config, performed.series_uid, performed.description)
        item.ReferencedImageSequence = _ref_items(
            (str(i.SOPClassUID), str(i.SOPInstanceUID)) for i in images
        )
        series.append(item)
    if dose_sr is not None:
        item = _series_item(proc, performed, config, str(dose_sr.SeriesInstanceUID),
                            str(dose_sr.get("SeriesDescription", "")))  # fmt: skip
        item.ReferencedNonImageCompositeSOPInstanceSequence = _ref_items(
            [(str(dose_sr.SOPClassUID), str(dose_sr.SOPInstanceUID))]
        )
        series.append(item)
    ds.PerformedSeriesSequence = DicomSequence(series)
    # Radiation Dose module (PS3.3 C.4.16)
    totals = dose_totals(images)
    ds.TotalTimeOfFluoroscopy = 0
    ds.TotalNumberOfExposures = totals.exposures
    ds.DistanceSourceToDetector = (
        _ds(totals.min_sid_mm, 1) if totals.min_sid_mm is not None else None
    )
    ds.DistanceSourceToEntrance = (
        _ds(totals.min_source_entrance_mm, 1) if totals.min_source_entrance_mm is not None
        else None
    )  # fmt: skip
    ds.ImageAndFluoroscopyAreaDoseProduct = _ds(totals.dap_dgy_cm2, 4)
    ds.EntranceDoseInmGy = _ds(totals.entrance_dose_mgy, 4)
    exposures = []
    for image in images:
        item = Dataset()
        item.RadiationMode = "PULSED"  # a radiographic exposure is one pulse
        item.KVP = image.KVP
        item.XRayTubeCurrentInuA = image.get(
            "XRayTubeCurrentInuA", _ds(int(image.XRayTubeCurrent) * 1000, 1)
        )
        item.ExposureTime = image.ExposureTime
        item.FilterType = image.get("FilterType", "")
        item.FilterMaterial = image.get("FilterMaterial", "")
        exposures.append(item)
    ds.ExposureDoseSequence = DicomSequence(exposures)
    ds.CommentsOnRadiationDose = (
        f"DAP total {_ds(totals.dap_dgy_cm2, 4)} dGy*cm2 over {totals.exposures} exposure(s)"
    )
    ds.BillingProcedureStepSequence = DicomSequence([])
    _conform(ds, config.character_set)
    return ds


__all__ = [
    "ANATOMY",
    "BODY_PART",
    "CR_IMAGE",
    "DISCONTINUATION_REASONS",
    "DX_FOR_PRESENTATION",
    "MPPS_SOP_CLASS",
    "XRAY_DOSE_SR",
    "Code",
    "DoseTotals",
    "Performed",
    "Procedure",
    "dose_totals",
    "make_dose_sr",
    "make_images",
    "mpps_create",
    "mpps_set",
    "new_performed",
    "procedure_from_worklist",
    "unscheduled_procedure",
]
