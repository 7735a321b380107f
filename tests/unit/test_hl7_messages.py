"""HL7 v2 → order events and ACKs (openpacs.hl7.messages) against hand-written IHE samples.

The samples in tests/data/hl7/ follow IHE RAD TF-2 RAD-4/RAD-12/RAD-13 (ORM^O01 v2.3.1 with
ZDS, OMI^O23 v2.5.1 with IPC, ADT^A08/A40). ACKs are read back with python-hl7 itself as the
oracle, and with our own ``parse``. A seeded fuzz checks that no input gives anything but
events or an HL7MappingError, and that every ACK parses.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import hl7
import pytest

from openpacs.hl7 import messages as m
from openpacs.services.orders import (
    CancelOrder,
    ChangeOrder,
    Code,
    NewOrder,
    OtherId,
    Patient,
    PatientMerge,
    PatientUpdate,
    WorklistItem,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "hl7"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "hl7.md"
TODAY = date(2024, 3, 15)
NOW = datetime(2024, 3, 15, 8, 30, 1, tzinfo=timezone(timedelta(hours=1)))


def load(name: str) -> bytes:
    return (DATA / name).read_bytes()


def uid_source() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"2.25.{next(counter)}"


def events(raw: bytes | str, options: m.MappingOptions | None = None) -> list[m.OrderEvent]:
    return m.to_events(m.parse(raw), today=TODAY, new_uid=uid_source(), options=options)


def mapping_error(raw: bytes | str) -> m.HL7MappingError:
    with pytest.raises(m.HL7MappingError) as info:
        events(raw)
    return info.value


def edit(name: str, old: str, new: str, count: int = 1) -> bytes:
    """A sample with one textual change (the samples are ASCII except where noted)."""
    text = load(name).decode("latin-1")
    assert old in text, old
    return text.replace(old, new, count).encode("latin-1")


def items(evs: list[m.OrderEvent]) -> list[WorklistItem]:
    out = []
    for e in evs:
        assert isinstance(e, NewOrder | ChangeOrder)
        out.append(e.item)
    return out


def read_ack(raw: bytes, encoding: str = "latin-1") -> hl7.Message:
    """The ACK as python-hl7 reads it (the independent oracle)."""
    return hl7.parse(raw.decode(encoding))


def field(msg: hl7.Message, segment: str, n: int) -> str:
    seg = msg.segment(segment)
    return str(seg[n]) if n < len(seg) else ""


# ------------------------------------------------------------------------------- parsing


def test_parse_reads_the_header() -> None:
    msg = m.parse(load("orm_o01_nw.hl7"))
    assert msg.type == "ORM^O01"
    assert msg.control_id == "MSG00001"
    assert msg.version == "2.3.1"
    assert msg.structure == ""
    assert msg.charset == ""
    assert msg.encoding == "iso8859-1"
    assert msg.sending_application == "RIS^1.2.826.0.1.3680043.2.1125.1^ISO"
    assert msg.sending_facility == "RADIOLOGY"
    assert msg.receiving_application == "OPENPACS"
    assert msg.receiving_facility == "HOSPITAL"
    assert msg.processing_id == "P"
    assert msg.segment_ids() == ["MSH", "PID", "PV1", "ORC", "OBR", "NTE", "NTE", "ZDS"]
    assert isinstance(msg.message, hl7.Message)
    assert str(msg.message.segment("PID")[8]) == "M"
    assert m.parse(load("omi_o23_nw.hl7")).structure == "OMI_O23"


@pytest.mark.parametrize(
    "transform",
    [
        lambda b: b.replace(b"\n", b"\r"),
        lambda b: b.replace(b"\n", b"\r\n"),
        lambda b: b,
        lambda b: b"\x0b" + b.replace(b"\n", b"\r") + b"\x1c\r",  # MLLP framing left on
        lambda b: b"\xef\xbb\xbf" + b.replace(b"\n", b"\r\n\r\n"),  # BOM, blank lines
    ],
    ids=["cr", "crlf", "lf", "mllp", "bom-blank-lines"],
)
def test_any_segment_terminator(transform: Callable[[bytes], bytes]) -> None:
    raw = load("orm_o01_nw.hl7")
    assert events(transform(raw)) == events(raw.replace(b"\n", b"\r"))


def test_str_and_bytes_give_the_same_events() -> None:
    raw = load("omi_o23_nw.hl7")
    assert events(raw.decode("utf-8")) == events(raw)


def test_hl7_null_and_escape_sequences() -> None:
    raw = edit("orm_o01_nw.hl7", "|R51^Headache^I10|", '|""|')
    raw = raw.replace(b"Patient is claustrophobic", b"A\\F\\B\\S\\C\\E\\D\\X4F4B\\\\.br\\end")
    (item,) = items(events(raw))
    assert item.reason == "Headache for 3 days"  # OBR-31 null -> falls back to OBR-13
    assert item.comments is not None
    assert item.comments.split("\n")[:2] == ["A|B^C\\DOK", "end"]
    assert item.comments.split("\n")[2] == "Contrast allergy: none known & fasting"


def test_hex_escape_is_decoded_in_the_message_charset() -> None:
    text = load("omi_o23_nw.hl7").decode("utf-8").replace("Łucja", "\\XC581\\ucja")
    (first, _) = items(events(text.encode("utf-8")))
    assert first.patient.name == "Żółkiewska^Łucja^Ewa"


# ------------------------------------------------------------------------------- ORM^O01


def test_orm_new_order_patient() -> None:
    (event,) = events(load("orm_o01_nw.hl7"))
    assert isinstance(event, NewOrder)
    p = event.item.patient
    # PID-3: the MR repetition is the primary one although it is not first (seed 000 T3.7).
    assert p.patient_id == "PAT001"
    assert p.issuer == "HOSP"  # PID-3.4.1 namespace, not the universal ID 1.2.3.4
    assert p.other_ids == (OtherId("1234567890", "NATIONAL", "TEXT"), OtherId("A-77", "OLDHIS"))
    # XPN Doe^John^Quincy^Jr^Dr (suffix Jr, prefix Dr) -> PN family^given^middle^prefix^suffix
    assert p.name == "Doe^John^Quincy^Dr^Jr"
    assert p.birth_date == "19650412"
    assert p.sex == "M"
    assert p.admission_id == "V0001"
    assert p.location == "CTSUITE"
    assert p.pregnancy_status is None
    assert p.effective_pregnancy_status() == 1  # the seed rule, left to the domain object


def test_orm_new_order_item() -> None:
    (event,) = events(load("orm_o01_nw.hl7"))
    item = event.item  # type: ignore[union-attr]
    assert item.accession_number == "ACC0001"  # OBR-18
    assert item.requested_procedure_id == "RP0001"  # OBR-19
    assert item.sps_id == "SPS0001"  # OBR-20
    assert item.study_uid == "1.2.826.0.1.3680043.2.1125.1001"  # ZDS-1.1
    assert item.modality == "CT"  # OBR-24
    assert (item.sps_start_date, item.sps_start_time) == ("20240320", "093000")  # OBR-27.4
    assert item.priority == "STAT"  # OBR-27.6 S wins over ORC-7.6 R
    assert item.station_ae is None  # not in RAD-4 v2.3.1 unless configured
    assert item.station_name is None
    # OBR-44 procedure code -> Requested Procedure; OBR-4.4-6 -> Scheduled Protocol.
    assert item.requested_procedure_codes == (Code("CTHEAD", "99RIS", "CT Head"),)
    assert item.requested_procedure_description == "CT Head"
    assert item.protocol_codes == (Code("CTH-P1", "LOCAL", "CT head routine protocol"),)
    assert item.sps_description == "CT head routine protocol"
    assert item.performing_physician == "Tech^Tina^M"  # OBR-34.1 subcomponents
    assert item.requesting_physician == "House^Gregory^^Dr"  # OBR-16
    assert item.referring_physician == "Kildare^James^^Dr^III"  # PV1-8, first repetition
    assert item.requesting_service == "Neurology Department"  # ORC-17.2
    assert item.placer_order_number == "PLC1001"
    assert item.filler_order_number == "FIL2001"
    assert item.reason == "Headache"  # OBR-31.2
    assert item.comments == "Patient is claustrophobic\nContrast allergy: none known & fasting"
    assert item.status == "SCHEDULED"


def test_orm_options_primary_issuer_and_station_ae() -> None:
    options = m.MappingOptions(primary_issuer="NATIONAL", orm_station_ae_field="OBR-21")
    (item,) = items(events(load("orm_o01_nw.hl7"), options))
    assert (item.patient.patient_id, item.patient.issuer) == ("1234567890", "NATIONAL")
    assert item.patient.other_ids == (OtherId("PAT001", "HOSP"), OtherId("A-77", "OLDHIS"))
    assert item.station_ae == "CT01"
    options = m.MappingOptions(primary_issuer="1.2.3.4", orm_station_ae_field="ORC-18")
    (item,) = items(events(load("orm_o01_nw.hl7"), options))
    assert item.patient.patient_id == "PAT001"  # matched on the universal ID
    assert item.station_ae is None  # ORC-18 empty


def test_orm_first_repetition_without_mr() -> None:
    raw = edit("orm_o01_nw.hl7", "HOSP&1.2.3.4&ISO^MR", "HOSP&1.2.3.4&ISO^PI")
    (item,) = items(events(raw))
    assert item.patient.patient_id == "1234567890"


def test_orm_two_orders() -> None:
    first, second = items(events(load("orm_o01_multi_obr.hl7")))
    assert [first.accession_number, second.accession_number] == ["ACC0002", "ACC0003"]
    assert first.study_uid == "1.2.826.0.1.3680043.2.1125.2002"
    assert second.study_uid == "1.2.826.0.1.3680043.2.1125.2003"
    assert (first.sps_start_date, first.sps_start_time, first.priority) == (
        "20240320",
        "140000",
        "STAT",
    )
    assert (second.sps_start_date, second.sps_start_time, second.priority) == (
        "20240321",
        "000000",
        "ROUTINE",
    )
    assert second.modality == "CR"  # upper-cased
    assert first.patient == second.patient
    assert first.patient.birth_date == "19800229"
    assert first.patient.sex == "F"
    assert first.placer_order_number == "PLC2001"
    assert second.placer_order_number == "PLC2002"
    assert first.protocol_codes == first.requested_procedure_codes  # OBR-4.1-3 for both


def test_orm_without_zds_generates_one_uid_per_requested_procedure() -> None:
    calls = []

    def new_uid() -> str:
        calls.append(1)
        return "2.25.4242"

    evs = m.to_events(m.parse(load("orm_o01_no_zds.hl7")), today=TODAY, new_uid=new_uid)
    first, second = items(evs)
    assert first.study_uid == second.study_uid == "2.25.4242"
    assert len(calls) == 1
    assert (first.sps_id, second.sps_id) == ("SPS0004A", "SPS0004B")
    assert (first.sps_start_date, first.sps_start_time) == ("20240315", "000000")  # today
    assert first.priority == "HIGH"  # ORC-7.6 A
    assert first.protocol_codes == (Code("MRBRAIN", "99RIS", "MR brain"),)
    assert second.protocol_codes == (Code("MRB-DWI", "99RIS", "Diffusion"),)
    assert second.sps_description == "Diffusion"
    assert first.patient.sex is None  # U -> empty (unknown)
    assert first.patient.effective_pregnancy_status() == 4
    # both OBRs share the one ORC
    assert first.placer_order_number == second.placer_order_number == "PLC4001"


def test_orm_change_order() -> None:
    (event,) = events(load("orm_o01_xo.hl7"))
    assert isinstance(event, ChangeOrder)
    assert event.item.accession_number == "ACC0001"
    assert (event.item.sps_start_date, event.item.sps_start_time) == ("20240321", "101500")
    assert event.item.priority == "HIGH"
    assert event.item.requested_procedure_codes == (Code("70450", "C4", "CT head w/o contrast"),)


@pytest.mark.parametrize(
    ("name", "reason"), [("orm_o01_ca.hl7", "cancelled"), ("orm_o01_dc.hl7", "discontinued")]
)
def test_orm_cancel_and_discontinue(name: str, reason: str) -> None:
    assert events(load(name)) == [CancelOrder("PLC1001", "FIL2001", "ACC0001", reason)]  # type: ignore[arg-type]


def test_cancel_needs_no_valid_patient_but_an_order_number() -> None:
    raw = edit("orm_o01_ca.hl7", "PAT001^^^HOSP&1.2.3.4&ISO^MR", "")
    raw = raw.replace(b"1234567890^^^NATIONAL^NI~", b"").replace(b"~A-77^^^OLDHIS^PI", b"")
    assert events(raw) == [CancelOrder("PLC1001", "FIL2001", "ACC0001")]
    bare = b"\r".join(
        [
            b"MSH|^~\\&|RIS|R|PACS|H|20240101||ORM^O01|C1|P|2.3.1",
            b"PID|1||P1^^^H^MR",
            b"ORC|CA",
        ]
    )
    error = mapping_error(bare)
    assert (error.field, error.code) == ("ORC-2", "101")


@pytest.mark.parametrize("control", ["SC", "sc"])
def test_status_change_is_accepted_without_events(control: str) -> None:
    assert events(edit("orm_o01_ca.hl7", "ORC|CA|", f"ORC|{control}|")) == []


def test_unknown_order_control() -> None:
    error = mapping_error(edit("orm_o01_nw.hl7", "ORC|NW|", "ORC|RP|"))
    assert (error.field, error.code, error.ack_code) == ("ORC-1", "103", "AE")
    error = mapping_error(edit("orm_o01_nw.hl7", "ORC|NW|", "ORC||"))
    assert (error.field, error.code) == ("ORC-1", "101")


# ------------------------------------------------------------------------------- charsets


def test_latin1_names() -> None:
    raw = load("orm_o01_latin1.hl7")
    assert "Ångström".encode("latin-1") in raw
    msg = m.parse(raw)
    assert (msg.charset, msg.encoding) == ("8859/1", "iso8859-1")
    (item,) = items(m.to_events(msg, today=TODAY, new_uid=uid_source()))
    assert item.patient.name == "Ångström^Björn^Åke"
    assert item.patient.location == "Röntgen"
    assert item.referring_physician == "Müller^Jürgen^^Prof. Dr."
    answer = m.ack(msg, raw, "AA", control_id="A1", now=NOW)
    assert field(read_ack(answer), "MSH", 18) == "8859/1"


def test_utf8_names() -> None:
    raw = load("omi_o23_nw.hl7")
    assert "Żółkiewska".encode() in raw
    msg = m.parse(raw)
    assert (msg.charset, msg.encoding) == ("UNICODE UTF-8", "utf-8")
    first, _ = items(m.to_events(msg, today=TODAY, new_uid=uid_source()))
    assert first.patient.name == "Żółkiewska^Łucja^Ewa"
    assert first.referring_physician == "Dvořák^Antonín"
    assert first.requesting_physician == "Šimek^Jan"
    assert first.reason == "Trauma — suspected spleen injury"


def test_bytes_that_do_not_match_msh18_are_refused() -> None:
    raw = load("orm_o01_latin1.hl7").replace(b"|8859/1", b"|UNICODE UTF-8")
    with pytest.raises(m.HL7MappingError) as info:
        m.parse(raw)
    assert (info.value.field, info.value.code, info.value.ack_code) == ("MSH-18", "102", "AR")
    answer = m.ack(None, raw, "AR", info.value)
    assert field(read_ack(answer), "MSA", 2) == "MSG00007"


def test_unknown_charset_is_refused() -> None:
    raw = load("orm_o01_latin1.hl7").replace(b"|8859/1", b"|EBCDIC")
    with pytest.raises(m.HL7MappingError) as info:
        m.parse(raw)
    assert (info.value.field, info.value.code) == ("MSH-18", "103")


def test_undeclared_charset_uses_the_default() -> None:
    raw = load("omi_o23_nw.hl7").replace(b"|UNICODE UTF-8", b"")
    assert m.parse(raw).encoding == "iso8859-1"
    utf8 = m.parse(raw, default_charset="UNICODE UTF-8")
    first, _ = items(m.to_events(utf8, today=TODAY, new_uid=uid_source()))
    assert first.patient.name == "Żółkiewska^Łucja^Ewa"


# ------------------------------------------------------------------------------- OMI^O23


def test_omi_one_item_per_ipc() -> None:
    evs = events(load("omi_o23_nw.hl7"))
    assert all(isinstance(e, NewOrder) for e in evs)
    first, second = items(evs)
    assert first.accession_number == second.accession_number == "ACC1001"  # IPC-1.1
    assert first.requested_procedure_id == "RP1001"  # IPC-2
    assert first.study_uid == second.study_uid == "1.2.826.0.1.3680043.2.1125.10001"  # IPC-3
    assert (first.sps_id, second.sps_id) == ("SPS1001A", "SPS1001B")  # IPC-4
    assert first.modality == "CT"  # IPC-5
    assert first.protocol_codes == (  # IPC-6, every repetition
        Code("CTAP-ART", "99RIS", "Arterial phase"),
        Code("CTAP-VEN", "99RIS", "Venous phase"),
    )
    assert second.protocol_codes == (Code("CTAP-DEL", "99RIS", "Delayed phase"),)
    assert first.sps_description == "Arterial phase"
    assert first.station_name == "CTSCANNER1"  # IPC-7
    assert (first.sps_location, second.sps_location) == ("CTSUITE", None)  # IPC-8
    assert first.station_ae == "CT01"  # IPC-9 first repetition
    assert (first.sps_start_date, first.sps_start_time) == ("20240325", "101500")  # TQ1-7
    assert first.priority == "STAT"  # TQ1-9
    assert first.requested_procedure_codes == (Code("74176", "C4", "CT abd & pelvis"),)
    assert first.requested_procedure_description == "CT abd & pelvis"
    assert first.requesting_service == "Intensive Care"
    assert (first.placer_order_number, first.filler_order_number) == ("PLC10001", "FIL10001")
    assert first.patient.other_ids == (OtherId("ZX-99", "CITY"),)
    assert first.patient.admission_id == "V0010"


def test_omi_two_procedures() -> None:
    first, second = items(events(load("omi_o23_two_procedures.hl7")))
    assert (first.study_uid, second.study_uid) == ("2.25.1", "2.25.2")  # no IPC-3
    assert (first.priority, second.priority) == ("HIGH", "ROUTINE")
    assert (first.sps_start_date, first.sps_start_time) == ("20240326", "103000")
    assert (second.sps_start_date, second.sps_start_time) == ("20240326", "000000")
    assert (first.modality, second.modality) == ("MG", "US")
    assert (first.station_ae, second.station_ae) == ("MAMMO1", "US02")
    assert first.protocol_codes == (Code("MGSCR", "99RIS", "Screening mammography"),)
    assert first.patient.birth_date is None  # PID-7 "2001": not a whole date


def test_omi_cancel() -> None:
    assert events(load("omi_o23_ca.hl7")) == [CancelOrder("PLC11001", "FIL11001", "ACC1101")]


# ------------------------------------------------------------------------------- ADT


def test_adt_a08_patient_update() -> None:
    (event,) = events(load("adt_a08.hl7"))
    assert event == PatientUpdate(
        Patient(
            patient_id="PAT001",
            issuer="HOSP",
            name="Doe^Jonathan^Q",
            birth_date="19650412",  # from 196504120000
            sex="M",
            other_ids=(OtherId("1234567890", "NATIONAL"),),
            admission_id="V0003",
            location="WARD3",
        )
    )


def test_adt_a31_is_handled_as_a08() -> None:
    raw = load("adt_a08.hl7").replace(b"ADT^A08^ADT_A01", b"ADT^A31^ADT_A05")
    assert events(raw) == events(load("adt_a08.hl7"))


def test_adt_a40_merge() -> None:
    (event,) = events(load("adt_a40.hl7"))
    assert isinstance(event, PatientMerge)
    assert (event.merged_id, event.merged_issuer) == ("PAT999", "HOSP")
    assert event.surviving.patient_id == "PAT001"
    assert event.surviving.name == "Doe^John^Quincy"


def test_adt_a40_errors() -> None:
    no_mrg = load("adt_a40.hl7").replace(b"MRG|PAT999^^^HOSP^MR||||||Doe^J\n", b"")
    error = mapping_error(no_mrg)
    assert (error.field, error.code) == ("MRG", "100")
    error = mapping_error(edit("adt_a40.hl7", "MRG|PAT999^^^HOSP^MR|", "MRG||"))
    assert (error.field, error.code) == ("MRG-1", "101")
    error = mapping_error(edit("adt_a40.hl7", "MRG|PAT999^", "MRG|PAT001^"))
    assert (error.field, error.code) == ("MRG-1", "102")


# ------------------------------------------------------------------------------- broken


NO_MSH = b"\n".join(load("orm_o01_nw.hl7").split(b"\n")[1:])
BROKEN: list[tuple[str, bytes, str, str, str, str]] = [
    # (id, raw, field, code, MSA-1, MSA-2)
    ("no-msh", NO_MSH, "MSH", "100", "AR", ""),
    ("garbage", bytes(range(256)) * 3, "MSH", "100", "AR", ""),
    ("empty", b"", "MSH", "100", "AR", ""),
    ("only-msh-word", b"MSH", "MSH-2", "102", "AR", ""),
    ("bad-separators", edit("orm_o01_nw.hl7", "MSH|^~\\&|", "MSH|^^\\&|"), "MSH-2", "102", "AR", "MSG00001"),
    ("no-control-id", edit("orm_o01_nw.hl7", "|MSG00001|", "||"), "MSH-10", "101", "AR", ""),
    ("no-type", edit("orm_o01_nw.hl7", "|ORM^O01|", "||"), "MSH-9", "101", "AR", "MSG00001"),
    ("no-version", edit("orm_o01_nw.hl7", "|P|2.3.1", "|P|"), "MSH-12", "101", "AR", "MSG00001"),
    ("second-msh", load("adt_a08.hl7") + load("adt_a40.hl7"), "MSH", "100", "AR", "MSG20001"),
    ("bad-segment-id", edit("orm_o01_nw.hl7", "\nPV1|", "\npv1|"), "", "100", "AR", "MSG00001"),
    ("unknown-type", edit("orm_o01_nw.hl7", "|ORM^O01|", "|ORU^R01|"), "MSH-9", "200", "AR", "MSG00001"),
    ("unknown-event", edit("adt_a08.hl7", "ADT^A08^ADT_A01", "ADT^A01"), "MSH-9", "201", "AR", "MSG20001"),
    ("version-3", edit("orm_o01_nw.hl7", "|P|2.3.1", "|P|3.0"), "MSH-12", "203", "AR", "MSG00001"),
    ("no-pid", edit("orm_o01_nw.hl7", "\nPID|", "\nZZZ|"), "PID", "100", "AE", "MSG00001"),
    ("missing-pid-3", re.sub(rb"PID\|1\|\|[^|]*\|", b"PID|1|||", load("orm_o01_nw.hl7")), "PID-3", "101", "AE", "MSG00001"),
    ("short-pid", re.sub(rb"\nPID\|[^\n]*", b"\nPID|1", load("orm_o01_nw.hl7")), "PID-3", "101", "AE", "MSG00001"),
    ("invalid-birth-date", edit("orm_o01_nw.hl7", "|19650412|", "|19651345|"), "PID-7", "102", "AE", "MSG00001"),
    ("text-birth-date", edit("orm_o01_nw.hl7", "|19650412|", "|12.04.1965|"), "PID-7", "102", "AE", "MSG00001"),
    ("unknown-sex", edit("orm_o01_nw.hl7", "|19650412|M|", "|19650412|Q|"), "PID-8", "103", "AE", "MSG00001"),
    ("long-patient-id", edit("orm_o01_nw.hl7", "PAT001^", "P" * 65 + "^"), "PID-3", "102", "AE", "MSG00001"),
    ("no-orc", re.sub(rb"\nORC\|[^\n]*", b"", load("orm_o01_nw.hl7")), "ORC", "100", "AE", "MSG00001"),
    ("no-obr", re.sub(rb"\nOBR\|[^\n]*", b"", load("orm_o01_nw.hl7")), "OBR", "100", "AE", "MSG00001"),
    ("short-obr", re.sub(rb"\nOBR\|[^\n]*", b"\nOBR|1|P|F|X^Y^L", load("orm_o01_nw.hl7")), "OBR-18", "101", "AE", "MSG00001"),
    ("no-obr-4", edit("orm_o01_nw.hl7", "|70450^CT head w/o contrast^C4^CTH-P1^CT head routine protocol^LOCAL|", "||"), "OBR-4", "101", "AE", "MSG00001"),
    ("no-obr-24", edit("orm_o01_nw.hl7", "|CT01|||CT|", "|CT01||||"), "OBR-24", "101", "AE", "MSG00001"),
    ("bad-modality", edit("orm_o01_nw.hl7", "|CT01|||CT|", "|CT01|||C T|"), "OBR-24", "102", "AE", "MSG00001"),
    ("long-accession", edit("orm_o01_nw.hl7", "|ACC0001|", "|ACC00000000000001|"), "OBR-18", "102", "AE", "MSG00001"),
    ("bad-start", edit("orm_o01_nw.hl7", "^^^20240320093000^^S", "^^^2024-03-20^^S"), "OBR-27", "102", "AE", "MSG00001"),
    ("unknown-priority", edit("orm_o01_nw.hl7", "^^^20240320093000^^S", "^^^20240320093000^^Z"), "OBR-27", "103", "AE", "MSG00001"),
    ("bad-study-uid", edit("orm_o01_nw.hl7", "ZDS|1.2.826", "ZDS|01.2.826"), "ZDS-1", "102", "AE", "MSG00001"),
    ("long-code", edit("orm_o01_nw.hl7", "^CTH-P1^", "^CTH-P1-TOO-LONG-CODE^"), "OBR-4", "102", "AE", "MSG00001"),
    ("zds-before-obr", edit("orm_o01_nw.hl7", "\nOBR|", "\nZDS|1.2.3\nOBR|"), "OBR", "100", "AE", "MSG00001"),
    ("no-ipc", re.sub(rb"\nIPC\|[^\n]*", b"", load("omi_o23_two_procedures.hl7")), "IPC", "100", "AE", "MSG10002"),
    ("no-ipc-1", edit("omi_o23_two_procedures.hl7", "IPC|ACC1101|", "IPC||"), "IPC-1", "101", "AE", "MSG10002"),
    ("no-ipc-5", edit("omi_o23_two_procedures.hl7", "|SPS1101|MG|", "|SPS1101||"), "IPC-5", "101", "AE", "MSG10002"),
    ("bad-tq1", edit("omi_o23_two_procedures.hl7", "|202403261030||A", "|20241326||A"), "TQ1-7", "102", "AE", "MSG10002"),
    ("bad-station-ae", edit("omi_o23_two_procedures.hl7", "|MAMMO1", "|MAMMO1-WITH-A-LONG-NAME"), "IPC-9", "102", "AE", "MSG10002"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "field_name", "code", "msa1", "msa2"),
    [case[1:] for case in BROKEN],
    ids=[case[0] for case in BROKEN],
)
def test_broken_message(raw: bytes, field_name: str, code: str, msa1: str, msa2: str) -> None:
    parsed = None
    with pytest.raises(m.HL7MappingError) as info:
        parsed = m.parse(raw)
        m.to_events(parsed, today=TODAY, new_uid=uid_source())
    error = info.value
    assert (error.field, error.code, error.ack_code) == (field_name, code, msa1)
    answer = read_ack(m.ack(parsed, raw, error.ack_code, error, control_id="ACK1", now=NOW))
    assert field(answer, "MSA", 1) == msa1
    assert field(answer, "MSA", 2) == msa2
    err = answer.segment("ERR")
    text = str(err)
    assert code in text
    if field_name:
        seg, _, number = field_name.partition("-")
        assert f"{seg}^{error.occurrence}" + (f"^{number}" if number else "") in text
    ours = m.parse(m.ack(parsed, raw, error.ack_code, error))
    assert ours.type == "ACK^" + (ours.type.split("^")[1] if "^" in ours.type else "")


def test_error_in_the_second_obr_names_its_occurrence() -> None:
    raw = edit("orm_o01_multi_obr.hl7", "|SPS0003|", "||")
    error = mapping_error(raw)
    assert (error.field, error.occurrence, error.code) == ("OBR-20", 2, "101")
    answer = read_ack(m.ack(m.parse(raw), raw, "AE", error))
    assert str(answer.segment("ERR")).startswith("ERR|OBR^2^20^101&Required field missing&HL70357")


def test_errors_from_the_domain_objects_name_the_hl7_field() -> None:
    # orders.py refuses an AE title it cannot use; the error still names IPC-9.
    raw = edit("omi_o23_two_procedures.hl7", "|MAMMO1", "|MAMMO\\E\\1")
    error = mapping_error(raw)
    assert (error.field, error.code) == ("IPC-9", "102")


# ------------------------------------------------------------------------------- ACK


def test_ack_aa_v231() -> None:
    raw = load("orm_o01_nw.hl7")
    answer = m.ack(m.parse(raw), raw, "AA", control_id="ACK00001", now=NOW)
    assert answer == (
        b"MSH|^~\\&|OPENPACS|HOSPITAL|RIS^1.2.826.0.1.3680043.2.1125.1^ISO|RADIOLOGY|"
        b"20240315083001+0100||ACK^O01^ACK|ACK00001|P|2.3.1\r"
        b"MSA|AA|MSG00001\r"
    )
    back = m.parse(answer)
    assert (back.type, back.control_id, back.version) == ("ACK^O01", "ACK00001", "2.3.1")


def test_ack_ae_v231_layout() -> None:
    raw = edit(
        "orm_o01_nw.hl7",
        "|70450^CT head w/o contrast^C4^CTH-P1^CT head routine protocol^LOCAL|",
        "||",
    )
    msg = m.parse(raw)
    error = mapping_error(raw)
    answer = m.ack(msg, raw, "AE", error, control_id="ACK2", now=NOW).decode().split("\r")
    assert answer[1] == (
        "MSA|AE|MSG00001|OBR-4: no universal service ID|||101^Required field missing^HL70357"
    )
    assert answer[2] == "ERR|OBR^1^4^101&Required field missing&HL70357"
    assert answer[3] == ""


def test_ack_ae_v25_layout() -> None:
    raw = edit("omi_o23_two_procedures.hl7", "IPC|ACC1101|", "IPC||")
    msg = m.parse(raw)
    error = mapping_error(raw)
    lines = m.ack(msg, raw, "AE", error, control_id="ACK3", now=NOW).decode().split("\r")
    assert lines[0].startswith("MSH|^~\\&|OPENPACS|HOSPITAL|RIS^")
    assert lines[0].endswith("||ACK^O23^ACK|ACK3|P|2.5.1")
    assert lines[1] == "MSA|AE|MSG10002|IPC-1: no Accession Number"
    assert lines[2] == (
        "ERR||IPC^1^1|101^Required field missing^HL70357|E||||IPC-1: no Accession Number"
    )


def test_ack_for_bytes_that_are_not_hl7() -> None:
    error = m.HL7MappingError("the message cannot be read", "MSH", "100", ack_code="AR")
    for raw in (b"", b"\x00\xff" * 50, "nothing here", b"MSH", b"MSH|^~"):
        answer = m.ack(None, raw, "AR", error, control_id="A", now=NOW)
        back = read_ack(answer)
        assert field(back, "MSA", 1) == "AR"
        assert field(back, "MSA", 2) == ""
        assert field(back, "MSH", 12) == "2.5.1"
        assert m.parse(answer).type == "ACK^"


def test_ack_recovers_the_header_of_an_unparsable_message() -> None:
    raw = b"garbage first\rMSH|^~\\&|HIS|WARD|PACS|HOSP|2024||ADT^A08|CTRL-9|T|2.3.1\rPID|x"
    with pytest.raises(m.HL7MappingError) as info:
        m.parse(raw)
    answer = m.ack(None, raw, "AR", info.value, control_id="A", now=NOW)
    back = read_ack(answer)
    assert field(back, "MSA", 2) == "CTRL-9"
    assert field(back, "MSH", 3) == "PACS"
    assert field(back, "MSH", 5) == "HIS"
    assert field(back, "MSH", 9) == "ACK^A08^ACK"
    assert field(back, "MSH", 11) == "T"
    assert str(back.segment("ERR")) == "ERR|MSH^1^^100&Segment sequence error&HL70357"


def test_ack_escapes_the_error_text() -> None:
    error = m.HL7MappingError("bad value 'a|b^c~d&e\\f'\r\nnext", "PID-5", "102")
    raw = load("omi_o23_nw.hl7")
    answer = m.ack(m.parse(raw), raw, "AE", error)
    back = m.parse(answer)
    assert back.segment_ids() == ["MSH", "MSA", "ERR"]
    text = answer.decode("utf-8").split("\r")[2]
    assert text.endswith("|PID-5: bad value 'a\\F\\b\\S\\c\\R\\d\\T\\e\\E\\f'\\.br\\next")


def test_ack_for_an_error_without_an_hl7_field() -> None:
    # What the listener builds from an OrderError raised while applying the events.
    error = m.HL7MappingError("no such order", field="Accession Number", code="207")
    raw = load("orm_o01_ca.hl7")
    lines = m.ack(m.parse(raw), raw, "AE", error).decode().split("\r")
    assert lines[2] == "ERR|^^^207&Application internal error&HL70357"


def test_ack_keeps_the_sender_separators_and_charset() -> None:
    raw = load("omi_o23_nw.hl7").decode("utf-8").replace("|", "#")  # '#' as field separator
    msg = m.parse(raw.encode("utf-8"))
    answer = m.ack(msg, raw, "AA", control_id="Z", now=NOW)
    assert answer.startswith(b"MSH#^~\\&#OPENPACS#HOSPITAL#")
    assert m.parse(answer).charset == "UNICODE UTF-8"


# ------------------------------------------------------------------------------- tables/docs


ALL_MAPS = {
    "PATIENT_MAP": m.PATIENT_MAP,
    "MERGE_MAP": m.MERGE_MAP,
    "ORM_MAP": m.ORM_MAP,
    "OMI_MAP": m.OMI_MAP,
}


def test_maps_name_real_fields_and_attributes() -> None:
    targets = {
        "PATIENT_MAP": {f.name for f in dataclasses.fields(Patient)},
        "MERGE_MAP": {f.name for f in dataclasses.fields(PatientMerge)},
        "ORM_MAP": {f.name for f in dataclasses.fields(WorklistItem)},
        "OMI_MAP": {f.name for f in dataclasses.fields(WorklistItem)},
    }
    reference = re.compile(r"^[A-Z][A-Z0-9]{2}-\d+(\.\d+){0,2}$")
    for name, rules in ALL_MAPS.items():
        for attribute, rule in rules.items():
            assert attribute in targets[name], (name, attribute)
            assert re.fullmatch(r"\([0-9A-F]{4},[0-9A-F]{4}\)", rule.tag), rule
            assert rule.ref, rule
            for source in rule.sources:
                assert reference.match(source), (name, attribute, source)


def _doc_lines() -> list[str]:
    return DOCS.read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("map_name", list(ALL_MAPS))
def test_docs_list_every_field_map_entry(map_name: str) -> None:
    rows = [line for line in _doc_lines() if line.startswith("|")]
    for attribute, rule in ALL_MAPS[map_name].items():
        matching = [
            row
            for row in rows
            if f"`{attribute}`" in row
            and rule.tag in row
            and all(re.search(rf"(?<![\w.-]){re.escape(s)}(?![\w.])", row) for s in rule.sources)
        ]
        assert matching, f"docs/hl7.md has no row for {map_name}[{attribute!r}] ({rule})"


@pytest.mark.parametrize(
    ("table", "values"),
    [
        ("MESSAGE_TYPES", m.MESSAGE_TYPES),
        ("ORDER_CONTROL", m.ORDER_CONTROL),
        ("PRIORITY_MAP", m.PRIORITY_MAP),
        ("SEX_MAP", m.SEX_MAP),
        ("CHARSETS", m.CHARSETS),
        ("ERROR_CODES", {k: v[0] for k, v in m.ERROR_CODES.items()}),
    ],
)
def test_docs_list_every_table_entry(table: str, values: dict[str, object]) -> None:
    rows = [line for line in _doc_lines() if line.startswith("| `")]
    for key, value in values.items():
        shown = "(empty)" if value is None else str(value)
        assert any(row.startswith(f"| `{key}` |") and shown in row for row in rows), (
            f"docs/hl7.md has no row for {table}[{key!r}] = {value!r}"
        )


# ------------------------------------------------------------------------------- fuzz

SAMPLES = sorted(p.name for p in DATA.iterdir())
POOL = [
    b"|", b"^", b"~", b"\\", b"&", b"\r", b"\n", b"\r\n", b'""', b"\x00", b"\xff", b"\xc3",
    b"\x1c", b"\x0b", "é".encode(), b"MSH|^~\\&|", b"\\X41\\", b"\\XZZ\\", b"\\.sp5x\\",
    b"\\E", b"9", b"A", b" ", b"-", b".", b"20241301", b"ZDS|", b"IPC|", b"OBR|", b"ORC|NW|",
    b"ORC|CA|", b"TQ1|", b"MRG|", b"PID|", b"9" * 70, b"2.5.1", b"UNICODE UTF-8", b"8859/1",
]  # fmt: skip


def _mutate(rng: random.Random, data: bytes) -> bytes:
    """A few random edits; the MSH line is spared half of the time so content gets fuzzed."""
    head, _, body = data.partition(b"\n")
    keep_head = rng.random() < 0.5
    buf = bytearray(body if keep_head else data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(7)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            del buf[pos : pos + rng.randint(1, 12)]
        elif op == 1:
            buf[pos:pos] = rng.choice(POOL)
        elif op == 2 and buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op == 5:
            del buf[pos:]
        else:
            segs = bytes(buf).split(b"\n")
            i = rng.randrange(len(segs))
            if op == 3:
                segs.insert(rng.randrange(len(segs) + 1), segs[i])
            elif op == 4:
                del segs[i]
            else:
                fields = segs[i].split(b"|")
                j = rng.randrange(len(fields))
                fields[j] = rng.choice(POOL) * rng.randint(0, 20)
                segs[i] = b"|".join(fields)
            buf = bytearray(b"\n".join(segs))
    return head + b"\n" + bytes(buf) if keep_head else bytes(buf)


EVENT_TYPES = (NewOrder, ChangeOrder, CancelOrder, PatientUpdate, PatientMerge)


@pytest.mark.slow
def test_fuzz_only_events_or_mapping_errors_and_always_an_ack() -> None:
    rng = random.Random(20240315)
    originals = {name: load(name) for name in SAMPLES}
    outcomes = {"events": 0, "refused": 0}
    for _ in range(3000):
        raw = _mutate(rng, originals[rng.choice(SAMPLES)])
        as_text = rng.random() < 0.2
        data: bytes | str = raw.decode("latin-1") if as_text else raw
        parsed = None
        error = None
        try:
            parsed = m.parse(data)
            result = m.to_events(parsed, today=TODAY, new_uid=uid_source())
        except m.HL7MappingError as exc:
            error = exc
            assert exc.code in m.ERROR_CODES and exc.code != "207", (exc, raw)
            outcomes["refused"] += 1
        else:
            assert isinstance(result, list)
            assert all(isinstance(e, EVENT_TYPES) for e in result), result
            outcomes["events"] += 1
        code = error.ack_code if error else "AA"
        answer = m.ack(parsed, data, code, error)
        assert isinstance(answer, bytes)
        back = m.parse(answer)
        assert back.type.startswith("ACK^"), answer
        msa = back.message.segment("MSA")
        assert str(msa[1]) == code
        if parsed is not None:
            # MSA-2 echoes MSH-10 as sent (same separators, so the raw text is equal), less
            # control characters (an 0x1C in an ACK would end its MLLP frame early); python-hl7
            # strips trailing whitespace off a whole message, so compare stripped
            sent = re.sub(r"[\x00-\x1f\x7f]", "", str(parsed.message.segment("MSH")[10]))
            assert str(msa[2]).strip() == sent.strip(), (raw, answer)
        if error is not None:
            assert b"ERR" in answer
    # the fuzz reaches both outcomes, not just the parser's front door
    assert outcomes["events"] > 300 and outcomes["refused"] > 300, outcomes
