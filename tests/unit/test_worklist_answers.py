"""MWL answers: the fast element-tree path (item_tree → project → encode_elements) against
pydicom as the oracle (the same item as a Dataset, projected the PS3.4 C.2.2.1 way and written
by pydicom's write_dataset), in every transfer syntax and character set case."""

from __future__ import annotations

import datetime as dt
import io

import pytest
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence as DicomSequence

from openpacs.dicom.transfer_syntaxes import EXPLICIT_VR_BIG_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN
from openpacs.dimse.worklist_scp import encode_answer
from openpacs.services.orders import Code, OtherId, Patient, WorklistItem
from openpacs.services.worklist import (
    compile_template,
    item_dataset,
    item_tree,
    patient_age,
    project,
)

EXPLICIT_LE = "1.2.840.10008.1.2.1"
TODAY = dt.date(2026, 11, 25)


def reference_project(request: Dataset, full: Dataset) -> Dataset:
    """PS3.4 C.2.2.1 with pydicom objects: what the answer must contain."""
    out = Dataset()
    for elem in request:
        tag = elem.tag
        if tag == 0x00080005 or tag.group in (0, 2):
            continue
        stored = full.get(tag)
        if elem.VR == "SQ":
            template = elem.value[0] if elem.value else None
            if stored is None or stored.VR != "SQ":
                out.add(DataElement(tag, "SQ", DicomSequence([])))
            elif template is None or len(template) == 0:
                out.add(DataElement(tag, "SQ", DicomSequence(list(stored.value))))
            else:
                out.add(
                    DataElement(
                        tag,
                        "SQ",
                        DicomSequence([reference_project(template, i) for i in stored.value]),
                    )
                )
        elif stored is not None:
            out.add(stored)
        else:
            out.add(DataElement(tag, elem.VR, None))
    return out


def read(data: bytes, ts: str) -> Dataset:
    ds = read_dataset(
        io.BytesIO(data), ts == IMPLICIT_VR_LITTLE_ENDIAN, ts != EXPLICIT_VR_BIG_ENDIAN
    )
    ds.decode()
    return ds


def items() -> list[WorklistItem]:
    plain = WorklistItem(
        patient=Patient(
            patient_id="P1", issuer="HOSP", name="Doe^John", birth_date="19800229", sex="M"
        ),
        accession_number="A1",
        requested_procedure_id="RP1",
        sps_id="SPS1",
        study_uid="1.2.3.4",
        modality="CT",
        sps_start_date="20261125",
        sps_start_time="0930",
    )
    rich = WorklistItem(
        patient=Patient(
            patient_id="P2",
            issuer="HOSP",
            name="Müller^Jürgen^^Dr.",
            birth_date="20260901",
            sex="F",
            pregnancy_status=3,
            other_ids=(OtherId("X-9", "CITY"), OtherId("N1", "NATIONAL")),
            admission_id="V7",
            location="WARD3",
            weight="71.5",
            size="1.68",
            allergies="latex",
        ),
        accession_number="A2",
        requested_procedure_id="RP2",
        sps_id="SPS2",
        study_uid="1.2.826.0.1.3680043.8.498.1",
        modality="MR",
        sps_start_date="20261126",
        sps_start_time="231500",
        station_ae="MR01",
        station_name="MRROOM",
        performing_physician="Rad^Ray",
        requested_procedure_description="MR brain",
        requested_procedure_codes=(Code("MRB", "99RIS", "MR brain", "1.0"),),
        protocol_codes=(Code("P1", "L", "Routine"), Code("P2", "L", "DWI")),
        priority="STAT",
        referring_physician="Ref^Erring",
        placer_order_number="PL1",
    )
    polish = WorklistItem(
        patient=Patient(patient_id="P3", issuer="", name="Żółkiewska^Łucja", sex=None),
        accession_number="A3",
        requested_procedure_id="RP3",
        sps_id="SPS3",
        study_uid="1.2.3.5",
        modality="CR",
        sps_start_date="20261125",
        sps_start_time="000000",
    )
    return [plain, rich, polish]


def requests() -> list[Dataset]:
    modality = Dataset()  # what a modality sends (seed 004 T3-7)
    for kw in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "PatientAge",
        "AccessionNumber",
        "StudyInstanceUID",
        "RequestedProcedureID",
        "PregnancyStatus",
        "PatientWeight",
    ):
        setattr(modality, kw, "" if kw != "PregnancyStatus" else None)
    sps = Dataset()
    sps.ScheduledStationAETitle = "MR01"
    sps.ScheduledProcedureStepStartDate = ""
    sps.Modality = ""
    sps.ScheduledProtocolCodeSequence = []  # whole items
    sps.ScheduledProcedureStepID = ""
    modality.ScheduledProcedureStepSequence = [sps]
    modality.RequestedProcedureCodeSequence = [Dataset()]  # an empty item: whole items too
    modality.OtherPatientIDsSequence = []
    modality.ReferencedStudySequence = []

    picky = Dataset()  # sub-attributes of sequences, an unknown private tag, a retired key
    code = Dataset()
    code.CodeValue = ""
    picky.RequestedProcedureCodeSequence = [code]
    other = Dataset()
    other.IssuerOfPatientID = ""
    picky.OtherPatientIDsSequence = [other]
    picky.add_new(0x00091010, "LO", "")
    picky.add_new(0x00101000, "LO", "")  # Other Patient IDs (retired): asked, empty
    picky.StudyDescription = ""  # not a worklist attribute: empty
    picky.SpecificCharacterSet = "ISO_IR 100"

    everything = Dataset()  # a sequence asked for as if it were a plain attribute
    everything.AdmissionID = ""
    everything.CurrentPatientLocation = ""
    everything.ReferencedPatientSequence = []
    everything.PlacerOrderNumberImagingServiceRequest = ""
    everything.ScheduledProcedureStepSequence = []
    return [modality, picky, everything]


@pytest.mark.parametrize("ts", [EXPLICIT_LE, IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN])
@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192", "ISO_IR 6"])
def test_fast_answers_equal_pydicom(ts: str, charset: str) -> None:
    for item in items():
        full = item_dataset(item, TODAY)
        for request in requests():
            answer = project(compile_template(request), item_tree(item, TODAY))
            fast_bytes = encode_answer(answer, ts, charset)
            fast = read(fast_bytes, ts)
            expected = reference_project(request, full)
            # the character set the answer must carry: the configured one when every value fits
            wanted = charset
            try:
                for elem in expected.iterall():
                    if isinstance(elem.value, str) or elem.VR == "PN":
                        str(elem.value or "").encode(
                            {"ISO_IR 100": "latin-1", "ISO_IR 6": "ascii"}.get(charset, "utf-8")
                        )
            except UnicodeEncodeError:
                wanted = "ISO_IR 192"
            if wanted != "ISO_IR 6":
                expected.SpecificCharacterSet = wanted
            buf = DicomBytesIO()
            buf.is_little_endian = ts != EXPLICIT_VR_BIG_ENDIAN
            buf.is_implicit_VR = ts == IMPLICIT_VR_LITTLE_ENDIAN
            write_dataset(buf, expected)
            oracle = read(buf.getvalue(), ts)
            assert fast == oracle, (item.accession_number, charset, ts, fast, oracle)
            assert list(fast.keys()) == sorted(fast.keys())  # read in stream order
            assert fast_bytes == buf.getvalue()  # byte for byte what pydicom writes
            assert fast.get("SpecificCharacterSet") == (None if wanted == "ISO_IR 6" else wanted)


def test_latin1_stays_latin1_and_polish_goes_utf8() -> None:
    request = Dataset()
    request.PatientName = ""
    german, polish = items()[1], items()[2]
    data = encode_answer(
        project(compile_template(request), item_tree(german, TODAY)), EXPLICIT_LE, "ISO_IR 100"
    )
    assert (
        "Müller".encode("latin-1") in data
        and read(data, EXPLICIT_LE).SpecificCharacterSet == "ISO_IR 100"
    )
    data = encode_answer(
        project(compile_template(request), item_tree(polish, TODAY)), EXPLICIT_LE, "ISO_IR 100"
    )
    assert (
        "Żółkiewska".encode() in data
        and read(data, EXPLICIT_LE).SpecificCharacterSet == "ISO_IR 192"
    )
    assert str(read(data, EXPLICIT_LE).PatientName) == "Żółkiewska^Łucja"


def test_patient_age_and_pregnancy_rule() -> None:
    assert patient_age("19800229", TODAY) == "046Y"
    assert patient_age("20260901", TODAY) == "002M"
    assert patient_age("20261120", TODAY) == "005D"
    assert patient_age("20270101", TODAY) is None
    plain, rich, polish = (item_dataset(i, TODAY) for i in items())
    assert plain.PregnancyStatus == 1  # male, none given: not pregnant (seed 000)
    assert rich.PregnancyStatus == 3  # the order's value
    assert polish.PregnancyStatus == 4  # unknown sex: unknown
    assert rich.ReferencedStudySequence[0].ReferencedSOPClassUID == "1.2.840.10008.3.1.2.3.1"
    assert [o.PatientID for o in rich.OtherPatientIDsSequence] == ["X-9", "N1"]
    assert rich.RequestedProcedureCodeSequence[0].CodingSchemeVersion == "1.0"
