"""The virtual modality's objects (``openpacs.modality.objects``): built from worklist answers as
our MWL SCP encodes them, checked with dciodvfy, and mapped worklist → image → MPPS attribute by
attribute (seed 004 Table 7-38), the MPPS against seed 004 Table 3-14."""

from __future__ import annotations

import datetime as dt
import io
import subprocess
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sr.codedict import codes
from support import require_tool

from openpacs.dicom.uids import IMPLEMENTATION_CLASS_UID
from openpacs.modality.config import ModalityConfig
from openpacs.modality.objects import (
    ANATOMY,
    CR_IMAGE,
    DISCONTINUATION_REASONS,
    DX_FOR_PRESENTATION,
    MPPS_SOP_CLASS,
    XRAY_DOSE_SR,
    Code,
    Performed,
    Procedure,
    dose_totals,
    make_dose_sr,
    make_images,
    mpps_create,
    mpps_set,
    new_performed,
    procedure_from_worklist,
    unscheduled_procedure,
)
from openpacs.services.mpps import CREATE_REQUIRED, FINAL_REQUIRED
from openpacs.services.orders import Code as OrderCode
from openpacs.services.orders import Patient, WorklistItem
from openpacs.services.worklist import item_dataset

TODAY = dt.date(2026, 11, 25)
START = dt.datetime(2026, 11, 25, 9, 30, 5)
END = dt.datetime(2026, 11, 25, 9, 41, 50)
DETACHED_STUDY = "1.2.840.10008.3.1.2.3.1"


# ----------------------------------------------------------------------------- worklist answers
def _order(name: str, referring: str, description: str) -> WorklistItem:
    return WorklistItem(
        patient=Patient(
            patient_id="PID-4711",
            issuer="HOSP",
            name=name,
            birth_date="19580301",
            sex="F",
            admission_id="V-2026-99",
            weight="64.5",
            size="1.63",
        ),
        accession_number="ACC-0815",
        requested_procedure_id="RP-0815",
        sps_id="SPS-0815-1",
        study_uid="1.2.826.0.1.3680043.8.498.41",
        modality="DX",
        sps_start_date="20261125",
        sps_start_time="093000",
        station_ae="MOD1",
        station_name="DXROOM1",
        sps_description=description,
        performing_physician="Röntgen^Wilhelm^Conrad",
        protocol_codes=(OrderCode("CHEST2V", "99RIS", "Chest PA and lateral", "1.0"),),
        requested_procedure_description="Thorax in zwei Ebenen",
        requested_procedure_codes=(OrderCode("36643-5", "LN", "XR Chest 2 Views"),),
        referring_physician=referring,
    )


def _as_received(ds: Dataset) -> Dataset:
    """*ds* encoded (Explicit VR LE, as the MWL SCP sends it) and read back, values undecoded."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return read_dataset(io.BytesIO(buf.getvalue()), False, True)


def worklist_answer(charset: str) -> Dataset:
    if charset == "ISO_IR 192":
        order = _order(
            "Yamada^Hanako=山田^花子=やまだ^はなこ", "Dvořák^Antonín", "Hrudník PA a bočně"
        )
    else:
        order = _order("Müller^Jürgen^^Dr.", "Ørsted^Søren", "Thorax p.a. und seitlich")
    ds = item_dataset(order, TODAY)
    ds.SpecificCharacterSet = charset
    return _as_received(ds)


def dicom_text(ds: Dataset) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


# ----------------------------------------------------------------------------- dciodvfy
def dciodvfy(ds: Dataset, path: Path) -> list[str]:
    """The dciodvfy report of *ds* written as a Part 10 file: its Error and Warning lines."""
    tool = require_tool("dciodvfy")
    ds.save_as(path, enforce_file_format=True)
    out = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith(("Error", "Warn"))]


def errors(report: list[str]) -> list[str]:
    return [ln for ln in report if ln.startswith("Error")]


# ----------------------------------------------------------------------------- a whole exam
def exam(
    charset_in: str | None = "ISO_IR 192",
    modality: str = "DX",
    charset_out: str = "ISO_IR 192",
    count: int = 2,
) -> tuple[Procedure, Performed, ModalityConfig, list[Dataset], Dataset]:
    config = ModalityConfig(modality=modality, character_set=charset_out)
    if charset_in is None:
        proc = unscheduled_procedure("EMERG-1", "Nowak^Zoë", "19900704", "O")
    else:
        proc = procedure_from_worklist(worklist_answer(charset_in))
    performed = new_performed(proc, config, now=START, operator="Curie^Marie")
    images = make_images(proc, performed, config, count, seed=7, rows=256, columns=210)
    return proc, performed, config, images, make_dose_sr(proc, performed, config, images)


# ----------------------------------------------------------------------------- tests
def test_procedure_from_a_worklist_answer() -> None:
    """Seed 004 Table 3-7 return keys, decoded with the answer's character set."""
    proc = procedure_from_worklist(worklist_answer("ISO_IR 192"))
    assert proc.scheduled and proc.character_set == "ISO_IR 192"
    assert proc.patient_name == "Yamada^Hanako=山田^花子=やまだ^はなこ"
    assert (proc.patient_id, proc.issuer_of_patient_id) == ("PID-4711", "HOSP")
    assert (proc.patient_birth_date, proc.patient_sex) == ("19580301", "F")
    assert proc.patient_weight == 64.5 and proc.patient_size == 1.63
    assert proc.referring_physician == "Dvořák^Antonín"
    assert proc.study_uid == "1.2.826.0.1.3680043.8.498.41"
    assert proc.referenced_study == ((DETACHED_STUDY, proc.study_uid),)
    assert proc.accession_number == "ACC-0815"
    assert proc.requested_procedure_id == "RP-0815"
    assert proc.requested_procedure_description == "Thorax in zwei Ebenen"
    assert proc.requested_procedure_codes == (Code("36643-5", "LN", "XR Chest 2 Views"),)
    assert (proc.sps_id, proc.sps_description) == ("SPS-0815-1", "Hrudník PA a bočně")
    assert proc.protocol_codes == (Code("CHEST2V", "99RIS", "Chest PA and lateral", "1.0"),)
    assert proc.scheduled_performing_physician == "Röntgen^Wilhelm^Conrad"
    assert proc.admission_id == "V-2026-99"
    assert procedure_from_worklist(worklist_answer("ISO_IR 100")).patient_name == (
        "Müller^Jürgen^^Dr."
    )


@pytest.mark.parametrize(
    ("charset_in", "modality", "charset_out"),
    [
        ("ISO_IR 192", "DX", "ISO_IR 192"),
        ("ISO_IR 100", "DX", "ISO_IR 100"),
        ("ISO_IR 192", "CR", "ISO_IR 192"),
        ("ISO_IR 100", "CR", "ISO_IR 192"),
        (None, "DX", "ISO_IR 100"),
        (None, "CR", "ISO_IR 192"),
    ],
)
def test_every_object_passes_dciodvfy(
    tmp_path: Path, charset_in: str | None, modality: str, charset_out: str
) -> None:
    proc, performed, config, images, sr = exam(charset_in, modality, charset_out)
    sop_class = DX_FOR_PRESENTATION if modality == "DX" else CR_IMAGE
    for n, image in enumerate(images):
        assert image.SOPClassUID == sop_class and image.Modality == modality
        report = dciodvfy(image, tmp_path / f"image{n}.dcm")
        assert not errors(report), report
        # warnings: only those explained in the module (private protocol scheme, FILTER
        # TYPE "FLAT" newer than dicom3tools 2022, the dose attributes a CR image carries)
        for line in report:
            assert any(
                known in line
                for known in (
                    "<99OPENPACS>",
                    "<99RIS>",
                    "<FLAT>",
                    "Dose Product",
                    "Entrance Dose in mGy",
                    "Distance Source to Entrance",
                    "Standard Extended SOP Class",
                )
            ), line
    report = dciodvfy(sr, tmp_path / "sr.dcm")
    assert not errors(report), report
    assert sr.SOPClassUID == XRAY_DOSE_SR
    final = mpps_set(proc, performed, config, images, sr, end=END)
    assert [float(e.XRayTubeCurrentInuA) for e in final.ExposureDoseSequence] == [
        float(i.XRayTubeCurrent) * 1000 for i in images
    ]
    dicom_text(final)
    # what was written is what was built: the patient's name survives the character set
    back = dcmread(tmp_path / "image0.dcm")
    assert back.SpecificCharacterSet == charset_out
    assert str(back.PatientName) == str(images[0].PatientName)


def test_dx_image_modules_of_seed_004() -> None:
    """Tables 7-5 .. 7-20: the values the modules must carry for a DX For Presentation image."""
    _, performed, config, images, _ = exam()
    first, second = images
    assert [i.InstanceNumber for i in images] == [1, 2]
    assert first.PresentationIntentType == "FOR PRESENTATION"
    assert first.SeriesInstanceUID == second.SeriesInstanceUID == performed.series_uid
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.IrradiationEventUID != second.IrradiationEventUID
    assert (first.ViewPosition, second.ViewPosition) == ("PA", "LL")
    assert first.BodyPartExamined == "CHEST"
    region = first.AnatomicRegionSequence[0]
    assert (region.CodeValue, region.CodingSchemeDesignator) == ("816094009", "SCT")
    assert first.PixelIntensityRelationship == "LIN"
    assert first.PresentationLUTShape == "IDENTITY"
    assert (first.BitsAllocated, first.BitsStored, first.HighBit) == (16, 12, 11)
    assert len(first.PixelData) == 256 * 210 * 2
    assert int(first.pixel_array.max()) <= 4095
    assert float(first.WindowWidth) > 0
    for image in images:
        assert float(image.KVP) > 0 and int(image.Exposure) >= 1
        assert int(image.ExposureInuAs) == round(
            float(image.XRayTubeCurrentInuA) * float(image.ExposureTimeInuS) / 1e6
        )
        assert float(image.ImageAndFluoroscopyAreaDoseProduct) > 0
        assert float(image.EntranceDoseInmGy) > 0
        assert float(image.DistanceSourceToDetector) > float(image.DistanceSourceToPatient)
    assert first.Manufacturer == config.manufacturer
    assert first.StationName == config.station_name
    assert first.DeviceSerialNumber == config.device_serial_number
    assert first.InstanceCreatorUID == IMPLEMENTATION_CLASS_UID
    assert first.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert first.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    mpps = first.ReferencedPerformedProcedureStepSequence[0]
    assert (mpps.ReferencedSOPClassUID, mpps.ReferencedSOPInstanceUID) == (
        MPPS_SOP_CLASS,
        performed.mpps_uid,
    )


def test_table_7_38_worklist_to_image() -> None:
    item = worklist_answer("ISO_IR 192")
    item.decode()
    sps = item.ScheduledProcedureStepSequence[0]
    _, performed, _, images, _ = exam()
    for image in images:
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "ReferringPhysicianName",
            "StudyInstanceUID",
            "AccessionNumber",
        ):
            assert str(image[keyword].value) == str(item[keyword].value), keyword
        assert float(image.PatientWeight) == float(item.PatientWeight)
        ref = image.ReferencedStudySequence[0]
        wl_ref = item.ReferencedStudySequence[0]
        assert ref.ReferencedSOPClassUID == wl_ref.ReferencedSOPClassUID
        assert ref.ReferencedSOPInstanceUID == wl_ref.ReferencedSOPInstanceUID
        request = image.RequestAttributesSequence
        assert len(request) == 1
        assert request[0].RequestedProcedureID == item.RequestedProcedureID
        assert request[0].ScheduledProcedureStepID == sps.ScheduledProcedureStepID
        assert request[0].ScheduledProcedureStepDescription == sps.ScheduledProcedureStepDescription
        protocol = request[0].ScheduledProtocolCodeSequence[0]
        wl_protocol = sps.ScheduledProtocolCodeSequence[0]
        for keyword in (
            "CodeValue",
            "CodingSchemeDesignator",
            "CodingSchemeVersion",
            "CodeMeaning",
        ):
            assert protocol[keyword].value == wl_protocol[keyword].value
        # Performing Physician's Name ← Scheduled Performing Physician's Name
        assert str(image.PerformingPhysicianName) == str(sps.ScheduledPerformingPhysicianName)
        # the step's attributes: the same as in the MPPS
        assert image.StudyID == item.RequestedProcedureID == performed.study_id
        assert image.PerformedProcedureStepID == sps.ScheduledProcedureStepID
        assert image.PerformedProcedureStepStartDate == "20261125"
        assert image.PerformedProcedureStepStartTime == "093005"
        assert (image.StudyDate, image.StudyTime) == ("20261125", "093005")
        assert image.PerformedProcedureStepDescription == performed.description
        assert image.PerformedProcedureStepDescription == item.RequestedProcedureDescription
        performed_protocol = image.PerformedProtocolCodeSequence[0]
        assert performed_protocol.CodeValue == wl_protocol.CodeValue
        assert image.ProtocolName == "Chest PA and lateral"
        assert image.PatientAge == "068Y"


def test_table_7_38_and_3_14_worklist_to_mpps() -> None:
    item = worklist_answer("ISO_IR 192")
    item.decode()
    sps = item.ScheduledProcedureStepSequence[0]
    proc, performed, config, images, sr = exam()
    create = mpps_create(proc, performed, config)
    # every attribute our own MPPS SCP requires of an N-CREATE (seed 001 T4.2)
    for keyword in CREATE_REQUIRED.values():
        assert create.get(keyword) not in (None, ""), keyword
    assert create.SpecificCharacterSet == "ISO_IR 192"
    step = create.ScheduledStepAttributesSequence
    assert len(step) == 1
    step = step[0]
    assert step.StudyInstanceUID == item.StudyInstanceUID
    assert step.ReferencedStudySequence[0].ReferencedSOPInstanceUID == (
        item.ReferencedStudySequence[0].ReferencedSOPInstanceUID
    )
    assert step.AccessionNumber == item.AccessionNumber
    assert step.RequestedProcedureID == item.RequestedProcedureID
    assert step.RequestedProcedureDescription == item.RequestedProcedureDescription
    assert step.ScheduledProcedureStepID == sps.ScheduledProcedureStepID
    assert step.ScheduledProcedureStepDescription == sps.ScheduledProcedureStepDescription
    assert step.ScheduledProtocolCodeSequence[0].CodeValue == "CHEST2V"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        assert str(create[keyword].value) == str(item[keyword].value), keyword
    assert create.ProcedureCodeSequence[0].CodeValue == (
        item.RequestedProcedureCodeSequence[0].CodeValue
    )
    # Table 3-14, N-CREATE column
    assert create.PerformedProcedureStepID == sps.ScheduledProcedureStepID
    assert create.PerformedStationAETitle == config.ae_title
    assert create.PerformedStationName == config.station_name
    assert create.PerformedProcedureStepStatus == "IN PROGRESS"
    assert create.PerformedProcedureStepDescription == images[0].StudyDescription
    assert create.PerformedProcedureStepStartDate == images[0].StudyDate
    assert create.PerformedProcedureStepStartTime == images[0].StudyTime
    assert create.Modality == "DX"
    assert create.StudyID == images[0].StudyID
    for keyword in (
        "PerformedLocation",
        "PerformedProcedureStepEndDate",
        "PerformedProcedureStepEndTime",
        "PerformedProcedureTypeDescription",
        "TotalTimeOfFluoroscopy",
        "TotalNumberOfExposures",
        "DistanceSourceToDetector",
        "DistanceSourceToEntrance",
        "ImageAndFluoroscopyAreaDoseProduct",
        "CommentsOnRadiationDose",
    ):
        assert keyword in create and create[keyword].value in (None, ""), keyword
    for keyword in (
        "PerformedProcedureStepDiscontinuationReasonCodeSequence",
        "PerformedProtocolCodeSequence",
        "PerformedSeriesSequence",
        "ExposureDoseSequence",
        "BillingProcedureStepSequence",
        "FilmConsumptionSequence",
        "ReferencedPatientSequence",
    ):
        assert keyword in create and len(create[keyword].value) == 0, keyword
    assert "SOPInstanceUID" not in create  # it is the Affected SOP Instance UID of the command
    dicom_text(create)  # encodable in its character set

    final = mpps_set(proc, performed, config, images, sr, end=END)
    for keyword in FINAL_REQUIRED.values():
        assert final.get(keyword), keyword
    assert final.PerformedProcedureStepStatus == "COMPLETED"
    assert (final.PerformedProcedureStepEndDate, final.PerformedProcedureStepEndTime) == (
        "20261125",
        "094150",
    )
    assert len(final.PerformedProcedureStepDiscontinuationReasonCodeSequence) == 0
    assert final.PerformedProtocolCodeSequence[0].CodeValue == "CHEST2V"
    image_series, dose_series = final.PerformedSeriesSequence
    assert image_series.SeriesInstanceUID == images[0].SeriesInstanceUID
    assert str(image_series.PerformingPhysicianName) == str(sps.ScheduledPerformingPhysicianName)
    assert image_series.ProtocolName == images[0].ProtocolName
    assert str(image_series.OperatorsName) == "Curie^Marie" == str(images[0].OperatorsName)
    assert image_series.SeriesDescription == images[0].SeriesDescription
    assert "RetrieveAETitle" in image_series
    assert [(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID)
            for r in image_series.ReferencedImageSequence] == [
        (i.SOPClassUID, i.SOPInstanceUID) for i in images
    ]  # fmt: skip
    assert len(image_series.ReferencedNonImageCompositeSOPInstanceSequence) == 0
    assert dose_series.SeriesInstanceUID == sr.SeriesInstanceUID != image_series.SeriesInstanceUID
    assert len(dose_series.ReferencedImageSequence) == 0
    (dose_ref,) = dose_series.ReferencedNonImageCompositeSOPInstanceSequence
    assert (dose_ref.ReferencedSOPClassUID, dose_ref.ReferencedSOPInstanceUID) == (
        XRAY_DOSE_SR,
        sr.SOPInstanceUID,
    )
    dicom_text(final)


def test_dose_totals_mpps_and_dose_report_agree() -> None:
    proc, performed, config, images, sr = exam(count=3)
    totals = dose_totals(images)
    dap = sum(float(i.ImageAndFluoroscopyAreaDoseProduct) for i in images)
    entrance = sum(float(i.EntranceDoseInmGy) for i in images)
    assert totals.exposures == 3
    assert totals.dap_dgy_cm2 == pytest.approx(dap)
    assert totals.dap_gy_m2 == pytest.approx(dap * 1e-5)
    assert totals.entrance_dose_mgy == pytest.approx(entrance)
    assert totals.min_sid_mm == min(float(i.DistanceSourceToDetector) for i in images)
    # the N-SET's Radiation Dose module (Table 3-14, N-SET column)
    final = mpps_set(proc, performed, config, images, sr, end=END)
    assert final.TotalNumberOfExposures == 3
    assert float(final.ImageAndFluoroscopyAreaDoseProduct) == pytest.approx(dap, abs=1e-4)
    assert float(final.EntranceDoseInmGy) == pytest.approx(entrance, abs=1e-4)
    assert float(final.DistanceSourceToDetector) == totals.min_sid_mm
    assert float(final.DistanceSourceToEntrance) == totals.min_source_entrance_mm
    assert [float(e.KVP) for e in final.ExposureDoseSequence] == [float(i.KVP) for i in images]
    # the dose report: one TID 10003 event per image, TID 10002 totals = the sums
    root = sr.ContentSequence
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "10001"
    assert sr.ConceptNameCodeSequence[0].CodeValue == "113701"

    def named(items: object, value: str) -> list[Dataset]:
        return [i for i in items if i.ConceptNameCodeSequence[0].CodeValue == value]  # type: ignore[attr-defined]

    def number(item: Dataset, value: str) -> float:
        (found,) = named(item.ContentSequence, value)
        return float(found.MeasuredValueSequence[0].NumericValue)

    events = named(root, "113706")
    assert len(events) == 3
    assert [named(e.ContentSequence, "113769")[0].UID for e in events] == [
        i.IrradiationEventUID for i in images
    ]
    assert [named(e.ContentSequence, "113795")[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for e in events] == [i.SOPInstanceUID for i in images]  # fmt: skip
    for event, image in zip(events, images, strict=True):
        assert number(event, "113733") == float(image.KVP)
        assert number(event, "122130") == pytest.approx(
            float(image.ImageAndFluoroscopyAreaDoseProduct) * 1e-5
        )
        assert number(event, "113736") == float(image.ExposureInuAs)
    (accumulated,) = named(root, "113702")
    assert number(accumulated, "113722") == pytest.approx(totals.dap_gy_m2)
    assert number(accumulated, "113722") == pytest.approx(sum(number(e, "122130") for e in events))
    assert number(accumulated, "113725") == pytest.approx(entrance / 1000)
    assert number(accumulated, "113731") == 3
    scope = named(root, "113705")[0]
    assert proc.study_uid == scope.ContentSequence[0].UID
    # same patient and study as the images, a series of its own, the step referenced
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber", "StudyID"):
        assert str(sr[keyword].value) == str(images[0][keyword].value), keyword
    assert sr.Modality == "SR" and sr.SeriesInstanceUID == performed.dose_series_uid
    assert sr.ReferencedPerformedProcedureStepSequence[0].ReferencedSOPInstanceUID == (
        performed.mpps_uid
    )
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert len(evidence.ReferencedSOPSequence) == 3


def test_discontinued_step() -> None:
    proc, performed, config, images, sr = exam(count=1)
    reason = DISCONTINUATION_REASONS["patient-refused"]
    final = mpps_set(proc, performed, config, images, sr, discontinue=reason, end=END)
    assert final.PerformedProcedureStepStatus == "DISCONTINUED"
    (code,) = final.PerformedProcedureStepDiscontinuationReasonCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
        "110505",
        "DCM",
        "Patient refused to continue procedure",
    )
    assert len(final.PerformedSeriesSequence) == 2
    # discontinued before any exposure: no series, no dose
    nothing = mpps_set(
        proc, performed, config, [], None, discontinue=DISCONTINUATION_REASONS["equipment-failure"]
    )
    assert len(nothing.PerformedSeriesSequence) == 0
    assert nothing.TotalNumberOfExposures == 0
    with pytest.raises(ValueError, match="COMPLETED"):
        mpps_set(proc, performed, config, [], None)


def test_unscheduled_procedure() -> None:
    """PS3.4 F.7.2 / IHE RAD TF unscheduled case: a new study, the request attributes empty."""
    proc, performed, config, images, sr = exam(None, charset_out="ISO_IR 100")
    assert not proc.scheduled
    assert str(proc.patient_name) == "Nowak^Zoë^^^"  # seed 004 T7-2: all 5 components
    assert performed.pps_id.startswith("PPS") and len(performed.pps_id) <= 16
    assert performed.protocol_codes[0].scheme == "99OPENPACS"
    create = mpps_create(proc, performed, config)
    (step,) = create.ScheduledStepAttributesSequence
    assert step.StudyInstanceUID == proc.study_uid == images[0].StudyInstanceUID
    for keyword in (
        "AccessionNumber",
        "RequestedProcedureID",
        "RequestedProcedureDescription",
        "ScheduledProcedureStepID",
        "ScheduledProcedureStepDescription",
    ):
        assert keyword in step and step[keyword].value in (None, ""), keyword
    assert len(step.ReferencedStudySequence) == 0
    assert len(step.ScheduledProtocolCodeSequence) == 0
    for keyword in CREATE_REQUIRED.values():
        assert create.get(keyword) not in (None, ""), keyword
    assert "RequestAttributesSequence" not in images[0]
    assert "ReferencedStudySequence" not in images[0]
    final = mpps_set(proc, performed, config, images, sr, end=END)
    assert final.PerformedProtocolCodeSequence[0].CodeValue == (
        images[0].PerformedProtocolCodeSequence[0].CodeValue
    )
    dicom_text(create)
    dicom_text(final)


def test_values_converted_to_the_configured_character_set(tmp_path: Path) -> None:
    """A UTF-8 worklist answer written as ISO_IR 100: the name's alphabetic group alone,
    letters outside Latin-1 without their diacritics."""
    proc, performed, config, images, sr = exam("ISO_IR 192", charset_out="ISO_IR 100")
    assert str(images[0].PatientName) == "Yamada^Hanako"
    assert str(images[0].ReferringPhysicianName) == "Dvorak^Antonin"
    assert images[0].RequestAttributesSequence[0].ScheduledProcedureStepDescription == (
        "Hrudnik PA a bocne"
    )
    assert str(images[0].PerformingPhysicianName) == "Röntgen^Wilhelm^Conrad"  # in Latin-1
    images[0].save_as(tmp_path / "latin1.dcm", enforce_file_format=True)
    raw = (tmp_path / "latin1.dcm").read_bytes()
    assert "Röntgen".encode("latin-1") in raw
    create = mpps_create(proc, performed, config)
    assert str(create.PatientName) == "Yamada^Hanako"
    assert create.SpecificCharacterSet == "ISO_IR 100"
    assert str(sr.PatientName) == "Yamada^Hanako" and sr.SpecificCharacterSet == "ISO_IR 100"


def test_pixel_data_is_deterministic_and_small() -> None:
    proc = unscheduled_procedure("P1", "Doe^Jane")
    config = ModalityConfig()
    performed = new_performed(proc, config, now=START)
    a = make_images(proc, performed, config, 1, seed=3)
    b = make_images(proc, performed, config, 1, seed=3)
    c = make_images(proc, performed, config, 1, seed=4)
    assert a[0].PixelData == b[0].PixelData != c[0].PixelData
    assert (a[0].Rows, a[0].Columns) == (512, 420)
    assert len(a[0].PixelData) <= 1024 * 1024
    with pytest.raises(ValueError):
        make_images(proc, performed, config, 0)


def test_coded_terminology_is_that_of_ps3_16() -> None:
    """DISCONTINUATION_REASONS ⊂ CID 9300, ANATOMY ⊂ CID 4009 (pydicom's PS3.16 tables)."""
    cid9300 = {
        (c.value, c.meaning)
        for c in (getattr(codes.cid9300, n) for n in codes.cid9300.dir())
        if c.scheme_designator == "DCM"
    }
    assert {(c.value, c.meaning) for c in DISCONTINUATION_REASONS.values()} == cid9300
    cid4009 = {
        (c.value, c.scheme_designator, c.meaning)
        for c in (getattr(codes.cid4009, n) for n in codes.cid4009.dir())
    }
    assert {(c.value, c.scheme, c.meaning) for c in ANATOMY.values()} <= cid4009
    assert {"chest", "patient-refused", "equipment-failure"} <= set(ANATOMY) | set(
        DISCONTINUATION_REASONS
    )


def test_procedure_validates() -> None:
    with pytest.raises(ValueError, match="Sex"):
        unscheduled_procedure("P1", "Doe^Jane", sex="X")
    with pytest.raises(ValueError, match="Birth Date"):
        unscheduled_procedure("P1", "Doe^Jane", birth_date="1990-01-01")
    with pytest.raises(ValueError, match="Patient ID"):
        unscheduled_procedure(" ", "Doe^Jane")
    with pytest.raises(ValueError, match="anatomy"):
        new_performed(unscheduled_procedure("P1", "Doe^Jane"), ModalityConfig(), anatomy="tail")
