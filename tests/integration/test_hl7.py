"""The HL7 v2 order feed over real MLLP (seed 000 §2, IHE RAD-2/4/12/13): orders become worklist
items a modality finds with C-FIND, updates/cancels/merges change them, bad input gets AE/AR
with an ERR segment, and the listener survives idle and broken peers."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind
from support import ServerProcess

DATA = Path(__file__).parent.parent / "data" / "hl7"
SB, EB = b"\x0b", b"\x1c\r"


def sample(name: str) -> bytes:
    return (DATA / name).read_bytes()


def exchange(sock: socket.socket, message: bytes) -> bytes:
    """One MLLP round trip: the framed message out, the framed answer back (unframed)."""
    sock.sendall(SB + message + EB)
    answer = b""
    while not answer.endswith(EB):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed by the server after {answer!r}")
        answer += chunk
    assert answer.startswith(SB)
    return answer[1:-2]


def segments(ack: bytes, encoding: str = "latin-1") -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in ack.decode(encoding).split("\r"):
        if line:
            fields = line.split("|")
            out[fields[0]] = fields
    return out


def send(srv: ServerProcess, message: bytes) -> dict[str, list[str]]:
    with socket.create_connection(("127.0.0.1", srv.hl7_port), timeout=20) as sock:
        return segments(exchange(sock, message))


def mwl(srv: ServerProcess, **keys: str) -> list[Dataset]:
    """C-FIND on the worklist (pynetdicom) returning the main keys of each answer."""
    q = Dataset()
    q.SpecificCharacterSet = ""
    q.PatientName = ""
    q.PatientID = ""
    q.IssuerOfPatientID = ""
    q.PatientBirthDate = ""
    q.PatientSex = ""
    q.OtherPatientIDsSequence = []
    q.AccessionNumber = ""
    q.StudyInstanceUID = ""
    q.RequestedProcedureID = ""
    q.RequestedProcedureDescription = ""
    q.RequestedProcedureCodeSequence = []
    q.RequestedProcedurePriority = ""
    q.ReferringPhysicianName = ""
    q.AdmissionID = ""
    q.CurrentPatientLocation = ""
    sps = Dataset()
    sps.ScheduledProcedureStepID = ""
    sps.Modality = ""
    sps.ScheduledStationAETitle = ""
    sps.ScheduledProcedureStepStartDate = ""
    sps.ScheduledProcedureStepStartTime = ""
    sps.ScheduledProtocolCodeSequence = []
    sps.ScheduledProcedureStepStatus = ""
    q.ScheduledProcedureStepSequence = [sps]
    for key, value in keys.items():
        setattr(q, key, value)
    if any(not v.isascii() for v in keys.values()):
        q.SpecificCharacterSet = "ISO_IR 192"
    ae = AE(ae_title="MOD1")
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", srv.port, ae_title="OPENPACS")
    assert assoc.is_established
    try:
        answers = [
            ds
            for status, ds in assoc.send_c_find(q, ModalityWorklistInformationFind)
            if ds is not None
        ]
    finally:
        assoc.release()
    return answers


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path / "srv").start()
    yield server
    server.stop()


def test_orm_new_change_cancel(srv: ServerProcess) -> None:
    ack = send(srv, sample("orm_o01_nw.hl7"))
    assert ack["MSA"][1:3] == ["AA", "MSG00001"], ack
    assert (
        ack["MSH"][8].startswith("ACK") and ack["MSH"][2] == "OPENPACS"
    )  # sender/receiver swapped
    (item,) = mwl(srv, AccessionNumber="ACC0001")
    assert str(item.PatientName) == "Doe^John^Quincy^Dr^Jr"
    assert item.PatientID == "PAT001"  # the MR identifier of PID-3 (no [hl7] primary_issuer set)
    assert item.IssuerOfPatientID == "HOSP"
    assert item.StudyInstanceUID == "1.2.826.0.1.3680043.2.1125.1001"  # from ZDS-1
    assert item.RequestedProcedureID == "RP0001"
    assert item.PatientSex == "M" and item.PatientBirthDate == "19650412"
    assert item.AdmissionID == "V0001"  # PV1-19
    assert item.CurrentPatientLocation == "CTSUITE"  # PV1-3.1
    step = item.ScheduledProcedureStepSequence[0]
    assert step.Modality == "CT" and step.ScheduledProcedureStepID == "SPS0001"
    assert step.ScheduledProcedureStepStartDate == "20240320"
    assert step.ScheduledProcedureStepStartTime.startswith("0930")
    assert step.ScheduledProcedureStepStatus == "SCHEDULED"
    # IHE RAD-4: Requested Procedure Code from OBR-44 when sent (else OBR-4)
    assert item.RequestedProcedureCodeSequence[0].CodeValue == "CTHEAD"
    assert step.ScheduledProtocolCodeSequence[0].CodeValue == "CTH-P1"
    others = {o.PatientID for o in item.OtherPatientIDsSequence}
    assert others and item.PatientID not in others

    # XO: rescheduled and made ASAP
    ack = send(srv, sample("orm_o01_xo.hl7"))
    assert ack["MSA"][1] == "AA", ack
    (item,) = mwl(srv, AccessionNumber="ACC0001")
    step = item.ScheduledProcedureStepSequence[0]
    assert step.ScheduledProcedureStepStartDate == "20240321"
    assert step.ScheduledProcedureStepStartTime.startswith("1015")
    assert item.RequestedProcedurePriority == "HIGH"

    # CA: gone from the worklist
    ack = send(srv, sample("orm_o01_ca.hl7"))
    assert ack["MSA"][1] == "AA", ack
    assert mwl(srv, AccessionNumber="ACC0001") == []
    # the same cancel again names the unknown order: AE with an ERR segment
    ack = send(srv, sample("orm_o01_ca.hl7"))
    assert ack["MSA"][1] == "AE" and ack["MSA"][3] == "ORC-2: no such order", ack
    assert ack["ERR"][1] == "ORC^1^2^204&Unknown key identifier&HL70357"


def test_omi_utf8_several_steps_and_latin1(srv: ServerProcess) -> None:
    ack = send(srv, sample("omi_o23_nw.hl7"))
    assert ack["MSA"][1] == "AA", ack
    items = mwl(srv, AccessionNumber="ACC1001")
    assert sorted(i.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID for i in items) == [
        "SPS1001A",
        "SPS1001B",
    ]
    for item in items:
        # Polish letters are outside ISO_IR 100: the answer falls back to ISO_IR 192
        assert item.SpecificCharacterSet == "ISO_IR 192"
        assert str(item.PatientName) == "Żółkiewska^Łucja^Ewa"
        assert item.StudyInstanceUID == "1.2.826.0.1.3680043.2.1125.10001"
        assert item.ScheduledProcedureStepSequence[0].Modality == "CT"
    codes = {
        i.ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence[0].CodeValue
        for i in items
    }
    assert {"CTAP-ART", "CTAP-DEL"} <= codes
    # matching on the decoded name works in the stored character set
    assert len(mwl(srv, PatientName="Żółk*")) == 2

    ack = send(srv, sample("orm_o01_latin1.hl7"))
    assert ack["MSA"][1] == "AA", ack
    (item,) = mwl(srv, AccessionNumber="ACC0005")
    assert str(item.PatientName) == "Ångström^Björn^Åke"
    assert item.SpecificCharacterSet == "ISO_IR 100"


def test_two_procedures_and_omi_cancel(srv: ServerProcess) -> None:
    ack = send(srv, sample("omi_o23_two_procedures.hl7"))
    assert ack["MSA"][1] == "AA", ack
    assert len(mwl(srv, PatientID="PAT011")) == 2
    assert send(srv, sample("omi_o23_ca.hl7"))["MSA"][1] == "AA"
    left = mwl(srv, PatientID="PAT011")
    assert [i.AccessionNumber for i in left] == ["ACC1102"]
    # ORM DC (discontinue) withdraws the order like a cancel
    assert send(srv, sample("orm_o01_nw.hl7"))["MSA"][1] == "AA"
    assert send(srv, sample("orm_o01_dc.hl7"))["MSA"][1] == "AA"
    assert mwl(srv, AccessionNumber="ACC0001") == []
    assert "discontinued 1 step(s)" in srv.log()


def test_patient_update_and_merge(srv: ServerProcess) -> None:
    assert send(srv, sample("orm_o01_nw.hl7"))["MSA"][1] == "AA"
    (before,) = mwl(srv, AccessionNumber="ACC0001")
    assert before.PatientID == "PAT001"
    # A08 renames the patient on every open item
    update = sample("adt_a08.hl7")
    ack = send(srv, update)
    assert ack["MSA"][1] == "AA", ack
    (after,) = mwl(srv, AccessionNumber="ACC0001")
    assert str(after.PatientName) == "Doe^Jonathan^Q"
    # an order for the old patient PAT999, then A40 merges PAT999 into PAT001
    order = (
        sample("orm_o01_multi_obr.hl7")
        .replace(b"PAT002^^^HOSP^MR", b"PAT999^^^HOSP^MR")
        .replace(b"MSG00002", b"MSG00902")
    )
    assert send(srv, order)["MSA"][1] == "AA"
    moved = mwl(srv, PatientID="PAT999")
    assert len(moved) == 2
    # no OBR-44 here: the Requested Procedure Code comes from OBR-4 (the mapping)
    codes = {i.AccessionNumber: i.RequestedProcedureCodeSequence[0].CodeValue for i in moved}
    assert codes == {"ACC0002": "CTCHEST", "ACC0003": "CRCHEST"}
    # ... and its modality, sent lower-case ("cr"), is upper-cased
    assert {i.ScheduledProcedureStepSequence[0].Modality for i in moved} == {"CT", "CR"}
    ack = send(srv, sample("adt_a40.hl7"))
    assert ack["MSA"][1] == "AA", ack
    assert mwl(srv, PatientID="PAT999") == []
    merged = mwl(srv, PatientID="PAT001")
    assert {"ACC0002", "ACC0003"} <= {i.AccessionNumber for i in merged}
    assert all(str(i.PatientName).startswith("Doe^Jo") for i in merged), [
        str(i.PatientName) for i in merged
    ]


def test_bad_messages_get_an_error_ack_and_the_connection_stays(srv: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", srv.hl7_port), timeout=20) as sock:
        # not HL7 at all: AR
        ack = segments(exchange(sock, b"hello, is this the lab?"))
        assert ack["MSA"][1] == "AR", ack
        # unsupported message type: AR, ERR code 200
        oru = sample("orm_o01_nw.hl7").replace(b"ORM^O01", b"ORU^R01")
        ack = segments(exchange(sock, oru))
        assert ack["MSA"][1] == "AR" and ack["MSA"][2] == "MSG00001", ack
        assert "200" in "|".join(ack["ERR"])
        # a required field missing: OBR-4 (procedure) empty → AE naming it
        broken = sample("orm_o01_no_zds.hl7").replace(b"MRBRAIN^MR brain^99RIS||", b"||", 1)
        ack = segments(exchange(sock, broken))
        assert ack["MSA"][1] == "AE", ack
        err = "|".join(ack["ERR"])
        assert "OBR" in err and "4" in err
        # nothing of the broken order was applied (one transaction per message)
        assert mwl(srv, AccessionNumber="ACC0004") == []
        # the same connection still takes a good message
        ack = segments(exchange(sock, sample("orm_o01_no_zds.hl7")))
        assert ack["MSA"][1] == "AA", ack
    assert len(mwl(srv, AccessionNumber="ACC0004")) == 2
    assert "refused" in srv.log() and "127.0.0.1" in srv.log()


def test_idle_and_half_open_peers_do_not_block_the_feed(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "srv", "[dicom]\nnetwork_timeout = 2\n").start()
    try:
        idle = [
            socket.create_connection(("127.0.0.1", srv.hl7_port), timeout=20) for _ in range(20)
        ]
        half = socket.create_connection(("127.0.0.1", srv.hl7_port), timeout=20)
        half.sendall(SB + sample("orm_o01_nw.hl7")[:60])  # a message that never ends
        assert send(srv, sample("orm_o01_nw.hl7"))["MSA"][1] == "AA"
        time.sleep(3.5)
        for sock in [*idle, half]:
            assert sock.recv(10) == b""  # the server closed them after network_timeout
            sock.close()
        assert "idle" in srv.log()
        assert send(srv, sample("orm_o01_xo.hl7"))["MSA"][1] == "AA"
    finally:
        srv.stop()
