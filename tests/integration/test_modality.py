"""`openpacs modality` end to end, every peer a real process or socket on loopback: an HL7 order
into openpacs, the virtual modality's worklist → MPPS → images + dose SR → store → commitment,
then the study found by C-FIND with the worklist's data (seed 004 T7-38 checked attribute by
attribute); the same run against DCMTK peers (wlmscpfs, storescp); and the failure paths (MWL
SCP down, store refused, commitment with failures, commitment that never comes, a report on a
new association)."""

from __future__ import annotations

import datetime as dt
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from print_support import Dcmprscp
from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ModalityWorklistInformationFind,
    StorageCommitmentPushModel,
    XRayRadiationDoseSRStorage,
)
from support import (
    ServerProcess,
    free_port,
    index_rows,
    require_tool,
    stored_instance_files,
    tool_env,
)

SB, EB = b"\x0b", b"\x1c\r"


def hl7_order(accession: str, station: str = "MOD1", modality: str = "DX") -> bytes:
    """An ORM^O01 new order for today (UTF-8, MSH-18), station AE in OBR-21."""
    today = dt.date.today().strftime("%Y%m%d")
    segments = [
        "MSH|^~\\&|RIS|RADIOLOGY|OPENPACS|HOSPITAL|20260101083000||ORM^O01|MSG-"
        f"{accession}|P|2.3.1||||||UNICODE UTF-8",
        "PID|1||PAT-7781^^^HOSP^MR||Müller^Jürgen^Karl||19700214|M|||Hauptstr. 1^^Köln",
        "PV1|1|O|RAD^XR1||||1234^Welby^Marcus^^^Dr||||||||||||V7781^^^HOSP",
        f"ORC|NW|PLC-{accession}^RIS|FIL-{accession}^RIS||SC||^^^{today}0900^^R||"
        f"{today}0830|||9012^House^Gregory^^^Dr",
        f"OBR|1|PLC-{accession}^RIS|FIL-{accession}^RIS|CXR2^Chest 2 views^LOCAL^XCHPA^Chest PA"
        f" and lateral^LOCAL|||||||||Cough|||9012^House^Gregory^^^Dr||{accession}|RP-{accession}"
        f"|SPS-{accession}|{station}|||{modality}|||^^^{today}0900^^S||||R05^Cough^I10|||"
        "4321&Tech&Tina&M",
    ]
    return "\r".join(segments).encode("utf-8") + b"\r"


def send_hl7(srv: ServerProcess, message: bytes) -> str:
    with socket.create_connection(("127.0.0.1", srv.hl7_port), timeout=20) as sock:
        sock.sendall(SB + message + EB)
        answer = b""
        while not answer.endswith(EB):
            chunk = sock.recv(65536)
            assert chunk, "connection closed"
            answer += chunk
    ack = answer[1:-2].decode("utf-8")
    msa = next(line for line in ack.split("\r") if line.startswith("MSA"))
    return msa.split("|")[1]


def modality_config(path: Path, port: int, **peers: Any) -> Path:
    """A modality TOML file: [modality] on *port*; peers as (ae, port) for worklist/mpps, a list
    of (ae, port, commit) for store."""
    lines = [
        "[modality]",
        'ae_title = "MOD1"',
        'host = "127.0.0.1"',
        f"port = {port}",
        'station_name = "DXROOM1"',
        "network_timeout = 10",
        "acse_timeout = 5",
    ]
    for name in ("worklist", "mpps"):
        if name in peers:
            ae, p = peers[name]
            lines += [f"[{name}]", f'ae_title = "{ae}"', 'host = "127.0.0.1"', f"port = {p}"]
    for ae, p in peers.get("printer", []):
        lines += ["[[printer]]", f'ae_title = "{ae}"', 'host = "127.0.0.1"', f"port = {p}"]
    for ae, p, commit in peers.get("store", []):
        lines += [
            "[[store]]",
            f'ae_title = "{ae}"',
            'host = "127.0.0.1"',
            f"port = {p}",
            f"commit = {'true' if commit else 'false'}",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def modality(config: Path, *args: str, timeout: float = 120) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "openpacs", "modality", *args, "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=tool_env(),
    )
    assert done.stdout.strip(), done.stderr
    return done.returncode, json.loads(done.stdout)


def step(report: dict[str, Any], name: str) -> dict[str, Any]:
    found = [s for s in report["steps"] if s["step"] == name]
    assert found, f"no step {name} in {[s['step'] for s in report['steps']]}"
    return found[-1]


def mwl_item(port: int, accession: str) -> Dataset:
    """The worklist item as a modality receives it (universal return keys)."""
    ae = AE(ae_title="CHECK")
    ae.add_requested_context(ModalityWorklistInformationFind)
    query = Dataset()
    query.AccessionNumber = accession
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "ReferringPhysicianName",
        "RequestedProcedureID",
        "RequestedProcedureDescription",
        "SpecificCharacterSet",
    ):
        setattr(query, keyword, "")
    sps = Dataset()
    for keyword in (
        "ScheduledProcedureStepID",
        "ScheduledProcedureStepDescription",
        "ScheduledPerformingPhysicianName",
        "Modality",
        "ScheduledStationAETitle",
    ):
        setattr(sps, keyword, "")
    sps.ScheduledProtocolCodeSequence = []
    query.ScheduledProcedureStepSequence = [sps]
    query.RequestedProcedureCodeSequence = []
    assoc = ae.associate("127.0.0.1", port, ae_title="OPENPACS")
    assert assoc.is_established
    try:
        items = [
            i
            for s, i in assoc.send_c_find(query, ModalityWorklistInformationFind)
            if i is not None and s.Status in (0xFF00, 0xFF01)
        ]
    finally:
        assoc.release()
    assert len(items) == 1
    return items[0]


def dciodvfy_errors(path: Path) -> list[str]:
    tool = require_tool("dciodvfy")
    done = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[tuple[ServerProcess, int]]:
    mod_port = free_port()
    server = ServerProcess(
        tmp_path / "pacs",
        '[hl7]\norm_station_ae_field = "OBR-21"\n'
        f'[[remote]]\nname = "mod"\nae_title = "MOD1"\nhost = "127.0.0.1"\nport = {mod_port}\n',
    ).start()
    yield server, mod_port
    server.stop()


def test_hl7_order_to_committed_study(srv: tuple[ServerProcess, int], tmp_path: Path) -> None:
    pacs, mod_port = srv
    assert send_hl7(pacs, hl7_order("ACC-E2E-1")) == "AA"
    config = modality_config(
        tmp_path / "mod.toml",
        mod_port,
        worklist=("OPENPACS", pacs.port),
        mpps=("OPENPACS", pacs.port),
        store=[("OPENPACS", pacs.port, True)],
    )

    code, listing = modality(config, "worklist")
    assert code == 0, listing
    assert [i["accession_number"] for i in listing["items"]] == ["ACC-E2E-1"]
    assert listing["items"][0]["patient_name"] == "Müller^Jürgen^Karl"

    item = mwl_item(pacs.port, "ACC-E2E-1")
    code, report = modality(config, "run", "--accession", "ACC-E2E-1", "--images", "2")
    assert code == 0, json.dumps(report, indent=1)
    names = [s["step"] for s in report["steps"]]
    assert names == [
        "worklist",
        "select",
        "mpps-create",
        "acquire",
        "mpps-completed",
        "store",
        "commitment-request",
        "commitment-report",
    ]
    assert step(report, "mpps-create")["status"] == "0x0000"
    assert step(report, "store")["stored"] == 3
    commitment = step(report, "commitment-report")
    assert commitment["event_type"] == 1 and commitment["failed"] == []
    created = {i["sop_instance_uid"] for i in report["instances"]}
    assert set(commitment["committed"]) == created and len(created) == 3
    assert commitment["via"] == "same association"

    # the MPPS in openpacs: COMPLETED, with the series of the images and of the dose report
    shown = pacs.run_cli("mpps", "show", report["mpps_uid"], "--json")
    assert shown.returncode == 0, shown.stderr
    mpps = Dataset.from_json(shown.stdout)
    assert mpps.PerformedProcedureStepStatus == "COMPLETED"
    referenced = {
        str(r.ReferencedSOPInstanceUID)
        for series in mpps.PerformedSeriesSequence
        for r in [
            *series.get("ReferencedImageSequence", []),
            *series.get("ReferencedNonImageCompositeSOPInstanceSequence", []),
        ]
    }
    assert referenced == created
    assert int(mpps.TotalNumberOfExposures) == 2

    # the study, found by C-FIND with the worklist's accession number and demographics
    code, found = modality(config, "query", "--accession", "ACC-E2E-1")
    assert code == 0, found
    (study,) = found["studies"]
    assert study["patient_id"] == "PAT-7781" and study["patient_name"] == "Müller^Jürgen^Karl"
    assert study["study_instance_uid"] == str(item.StudyInstanceUID)
    assert study["instances"] == "3"

    # seed 004 Table 7-38, attribute by attribute: worklist → image, worklist → MPPS
    sps = item.ScheduledProcedureStepSequence[0]
    images = [i for i in report["instances"] if i["kind"] == "image"]
    for image in images:
        (path,) = stored_instance_files(pacs.data_dir, image["sop_instance_uid"])
        assert dciodvfy_errors(path) == [], path
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == DigitalXRayImageStorageForPresentation
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "ReferringPhysicianName",
            "StudyInstanceUID",
            "AccessionNumber",
        ):
            assert ds[keyword].value == item[keyword].value, keyword
        (request,) = ds.RequestAttributesSequence
        assert request.RequestedProcedureID == item.RequestedProcedureID
        assert request.ScheduledProcedureStepID == sps.ScheduledProcedureStepID
        assert request.ScheduledProcedureStepDescription == sps.ScheduledProcedureStepDescription
        assert [c.CodeValue for c in request.ScheduledProtocolCodeSequence] == [
            c.CodeValue for c in sps.ScheduledProtocolCodeSequence
        ]
        assert ds.PerformedProcedureStepID == mpps.PerformedProcedureStepID
        assert ds.PerformingPhysicianName == sps.ScheduledPerformingPhysicianName
        assert ds.StationName == "DXROOM1"
    (dose,) = [i for i in report["instances"] if i["kind"] == "dose-report"]
    (path,) = stored_instance_files(pacs.data_dir, dose["sop_instance_uid"])
    assert pydicom.dcmread(path).SOPClassUID == XRayRadiationDoseSRStorage
    assert dciodvfy_errors(path) == []
    (scheduled,) = mpps.ScheduledStepAttributesSequence
    assert scheduled.StudyInstanceUID == item.StudyInstanceUID
    assert scheduled.AccessionNumber == "ACC-E2E-1"
    assert scheduled.RequestedProcedureID == item.RequestedProcedureID
    assert scheduled.ScheduledProcedureStepID == sps.ScheduledProcedureStepID
    assert mpps.PatientName == item.PatientName and mpps.PatientID == item.PatientID
    assert [c.CodeValue for c in mpps.ProcedureCodeSequence] == [
        c.CodeValue for c in item.RequestedProcedureCodeSequence
    ]
    # the worklist step is done
    rows = index_rows(pacs.data_dir, "worklist_items", accession_number="ACC-E2E-1")
    assert [r["status"] for r in rows] == ["COMPLETED"]


def test_unscheduled_and_discontinued(srv: tuple[ServerProcess, int], tmp_path: Path) -> None:
    pacs, mod_port = srv
    config = modality_config(
        tmp_path / "mod.toml",
        mod_port,
        mpps=("OPENPACS", pacs.port),
        store=[("OPENPACS", pacs.port, False)],
    )
    code, report = modality(
        config,
        "run",
        "--unscheduled",
        "--patient-id",
        "WALKIN-1",
        "--patient-name",
        "Walk^In",
        "--birth-date",
        "19900101",
        "--sex",
        "F",
        "--images",
        "1",
    )
    assert code == 0, json.dumps(report, indent=1)
    assert report["procedure"]["scheduled"] is False
    shown = pacs.run_cli("mpps", "show", report["mpps_uid"], "--json")
    assert Dataset.from_json(shown.stdout).PerformedProcedureStepStatus == "COMPLETED"
    (image,) = [i for i in report["instances"] if i["kind"] == "image"]
    (path,) = stored_instance_files(pacs.data_dir, image["sop_instance_uid"])
    assert pydicom.dcmread(path).PatientID == "WALKIN-1"

    # a step ended DISCONTINUED before any exposure, with a CID 9300 reason
    assert send_hl7(pacs, hl7_order("ACC-DISC-1")) == "AA"
    config = modality_config(
        tmp_path / "mod2.toml",
        mod_port,
        worklist=("OPENPACS", pacs.port),
        mpps=("OPENPACS", pacs.port),
        store=[("OPENPACS", pacs.port, False)],
    )
    code, report = modality(
        config, "run", "--first", "--images", "0", "--discontinue", "patient-refused"
    )
    assert code == 0, json.dumps(report, indent=1)
    assert step(report, "mpps-discontinued")["status"] == "0x0000"
    assert report["instances"] == []
    mpps = Dataset.from_json(pacs.run_cli("mpps", "show", report["mpps_uid"], "--json").stdout)
    assert mpps.PerformedProcedureStepStatus == "DISCONTINUED"
    reason = mpps.PerformedProcedureStepDiscontinuationReasonCodeSequence[0]
    assert (reason.CodeValue, reason.CodingSchemeDesignator) == ("110505", "DCM")


def test_against_dcmtk_peers(tmp_path: Path) -> None:
    """A PACS that is not ours: DCMTK's wlmscpfs (worklist files) and storescp; and film on
    DCMTK's print SCP (dcmprscp)."""
    wlmscpfs = require_tool("wlmscpfs")
    dump2dcm = require_tool("dump2dcm")
    storescp = require_tool("storescp")
    wl_dir = tmp_path / "wl"
    (wl_dir / "WLM").mkdir(parents=True)
    (wl_dir / "WLM" / "lockfile").touch()
    today = dt.date.today().strftime("%Y%m%d")
    dump = tmp_path / "item.dump"
    dump.write_text(
        "(0008,0005) CS [ISO_IR 100]\n"
        "(0008,0050) SH [DCMTK-ACC-1]\n"
        "(0008,0090) PN [Referring^Rita]\n"
        "(0010,0010) PN [Dcmtk^Dora]\n"
        "(0010,0020) LO [DCMTK-P1]\n"
        "(0010,0030) DA [19800505]\n"
        "(0010,0040) CS [F]\n"
        "(0020,000d) UI [1.2.826.0.1.3680043.8.498.99887766]\n"
        "(0032,1060) LO [Chest PA]\n"
        "(0040,0100) SQ (Sequence with undefined length #=1)\n"
        "  (fffe,e000) na (Item with undefined length #=1)\n"
        "    (0008,0060) CS [DX]\n"
        "    (0040,0001) AE [MOD1]\n"
        f"    (0040,0002) DA [{today}]\n"
        "    (0040,0003) TM [0900]\n"
        "    (0040,0007) LO [Chest PA]\n"
        "    (0040,0009) SH [SPS-D1]\n"
        "  (fffe,e00d) na (ItemDelimitationItem)\n"
        "(fffe,e0dd) na (SequenceDelimitationItem)\n"
        "(0040,1001) SH [RP-D1]\n"
    )
    subprocess.run([dump2dcm, str(dump), str(wl_dir / "WLM" / "item.wl")], check=True, timeout=30)
    wl_port, store_port, mod_port = free_port(), free_port(), free_port()
    received = tmp_path / "received"
    received.mkdir()
    peers = [
        subprocess.Popen([wlmscpfs, "-dfp", str(wl_dir), str(wl_port)], env=tool_env()),
        subprocess.Popen(
            [storescp, "-aet", "STORESCP", "-od", str(received), str(store_port)], env=tool_env()
        ),
    ]
    printer = Dcmprscp(tmp_path / "print").start()
    try:
        for port in (wl_port, store_port):
            _wait_listening(port)
        config = modality_config(
            tmp_path / "mod.toml",
            mod_port,
            worklist=("WLM", wl_port),
            store=[("STORESCP", store_port, False)],
            printer=[(printer.ae_title, printer.port)],
        )
        films_before = printer.files("HG")
        code, report = modality(config, "run", "--first", "--images", "2", "--print")
        assert code == 0, json.dumps(report, indent=1)
        assert step(report, "select")["item"]["accession_number"] == "DCMTK-ACC-1"
        files = sorted(received.iterdir())
        assert len(files) == 3
        for path in files:
            ds = pydicom.dcmread(path)
            assert (ds.PatientID, ds.AccessionNumber) == ("DCMTK-P1", "DCMTK-ACC-1")
            assert ds.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.99887766"
            assert dciodvfy_errors(path) == [], path
        printed = [s for s in report["steps"] if s["step"].startswith("print-")]
        assert printed and all(s["ok"] for s in printed)
        assert len(printer.files("HG") - films_before) == 2  # one image box per image
    finally:
        printer.stop()
        for p in peers:
            p.terminate()
            p.wait(10)


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def test_mwl_down_and_store_refused(srv: tuple[ServerProcess, int], tmp_path: Path) -> None:
    pacs, mod_port = srv
    closed = free_port()
    config = modality_config(tmp_path / "a.toml", mod_port, worklist=("OPENPACS", closed))
    code, report = modality(config, "run", "--first")
    assert code == 1
    wl = step(report, "worklist")
    assert wl["ok"] is False and wl["meaning"] == "no association"
    code, report = modality(config, "worklist")
    assert code == 1 and report["ok"] is False

    # a PACS that refuses the association (called AE title it does not answer to)
    config = modality_config(tmp_path / "b.toml", mod_port, store=[("NOTPACS", pacs.port, True)])
    code, report = modality(
        config, "run", "--unscheduled", "--patient-id", "R1", "--patient-name", "Refused^Rolf"
    )
    assert code == 1
    store = step(report, "store")
    assert store["ok"] is False and store["meaning"] == "association rejected"
    assert (
        "called AE title not recognised" in store["detail"].lower()
        or "rj" in store["detail"].lower()
    )
    assert not any(s["step"].startswith("commitment") for s in report["steps"])
    assert "refused" in pacs.log().lower() or "reject" in pacs.log().lower()

    # echo names every peer's outcome
    code, report = modality(
        modality_config(
            tmp_path / "c.toml",
            mod_port,
            worklist=("OPENPACS", pacs.port),
            store=[("OPENPACS", pacs.port, False)],
        ),
        "echo",
    )
    assert code == 0 and [s["status"] for s in report["steps"]] == ["0x0000", "0x0000"]


class CommitmentPeer:
    """A Storage + Storage Commitment SCP (pynetdicom) whose report is scripted: event 2 on the
    same association, event 1 on a new association to the modality, or none at all."""

    def __init__(self, mode: str, modality_port: int) -> None:
        self.mode = mode
        self.modality_port = modality_port
        self.port = free_port()
        self.stored: list[str] = []
        self.replies: list[int] = []
        ae = AE(ae_title="COMMITSCP")
        for cls in (
            DigitalXRayImageStorageForPresentation,
            ComputedRadiographyImageStorage,
            XRayRadiationDoseSRStorage,
        ):
            ae.add_supported_context(cls)
        ae.add_supported_context(StorageCommitmentPushModel)
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self.on_store), (evt.EVT_N_ACTION, self.on_action)],
        )

    def on_store(self, event: Any) -> int:
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def on_action(self, event: Any) -> tuple[int, None]:
        request = event.action_information
        refs = [
            (str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
            for i in request.ReferencedSOPSequence
        ]
        if self.mode == "failures":
            threading.Thread(
                target=self.report_same, args=(event.assoc, request.TransactionUID, refs)
            ).start()
        elif self.mode == "new-association":
            threading.Thread(target=self.report_new, args=(request.TransactionUID, refs)).start()
        return 0x0000, None

    @staticmethod
    def event_info(transaction: str, refs: list[tuple[str, str]], failed: int) -> Dataset:
        info = Dataset()
        info.TransactionUID = transaction
        info.RetrieveAETitle = "COMMITSCP"
        info.ReferencedSOPSequence = []
        info.FailedSOPSequence = []
        for n, (cls, uid) in enumerate(refs):
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = cls, uid
            if n < failed:
                item.FailureReason = 0x0112  # No such object instance
                info.FailedSOPSequence.append(item)
            else:
                info.ReferencedSOPSequence.append(item)
        if not info.FailedSOPSequence:
            del info.FailedSOPSequence
        return info

    def report_same(self, assoc: Any, transaction: str, refs: list[tuple[str, str]]) -> None:
        time.sleep(0.2)  # after the N-ACTION response
        info = self.event_info(transaction, refs, failed=1)
        rsp, _ = assoc.send_n_event_report(
            info, 2, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1"
        )
        self.replies.append(int(rsp.Status) if rsp is not None else -1)

    def report_new(self, transaction: str, refs: list[tuple[str, str]]) -> None:
        time.sleep(0.5)
        ae = AE(ae_title="COMMITSCP")
        ae.add_requested_context(StorageCommitmentPushModel)
        from pynetdicom import build_role

        role = build_role(StorageCommitmentPushModel, scp_role=True)
        assoc = ae.associate("127.0.0.1", self.modality_port, ae_title="MOD1", ext_neg=[role])
        if not assoc.is_established:
            self.replies.append(-2)
            return
        # first an unknown transaction (T3-32: 0x0211), then the real report
        bogus = self.event_info("1.2.3.4.5.6.7", refs, failed=0)
        rsp, _ = assoc.send_n_event_report(
            bogus, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1"
        )
        self.replies.append(int(rsp.Status))
        info = self.event_info(transaction, refs, failed=0)
        rsp, _ = assoc.send_n_event_report(
            info, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1"
        )
        self.replies.append(int(rsp.Status))
        assoc.release()

    def stop(self) -> None:
        self.server.shutdown()


@pytest.mark.parametrize("mode", ["failures", "silent", "new-association"])
def test_commitment_outcomes(mode: str, tmp_path: Path) -> None:
    mod_port = free_port()
    peer = CommitmentPeer(mode, mod_port)
    try:
        config = modality_config(
            tmp_path / "m.toml", mod_port, store=[("COMMITSCP", peer.port, True)]
        )
        code, report = modality(
            config,
            "run",
            "--unscheduled",
            "--patient-id",
            "C1",
            "--patient-name",
            "Commit^Carl",
            "--images",
            "2",
            "--commit-timeout",
            "1",
            "--commit-wait",
            "4",
        )
        created = [i["sop_instance_uid"] for i in report["instances"]]
        assert sorted(peer.stored) == sorted(created)
        result = step(report, "commitment-report")
        if mode == "failures":
            assert code == 1
            assert result["event_type"] == 2 and result["via"] == "same association"
            assert [f["reason"] for f in result["failed"]] == ["0x0112"]
            assert len(result["committed"]) == len(created) - 1
            assert peer.replies == [0x0000]
        elif mode == "silent":
            assert code == 1
            assert result["ok"] is False and result["meaning"] == "no report"
            assert "within 4 s" in result["detail"]
        else:
            assert code == 0, json.dumps(report, indent=1)
            assert result["event_type"] == 1 and result["via"] == "new association"
            assert sorted(result["committed"]) == sorted(created)
            assert peer.replies == [0x0211, 0x0000]
    finally:
        peer.stop()


def test_listener_answers_echo_and_keeps_images(tmp_path: Path) -> None:
    """`openpacs modality listen`: DCMTK's echoscu and storescu against the modality (seed 004
    T3-16/T3-22: CR, DX and SC accepted; other classes refused)."""
    echoscu, storescu = require_tool("echoscu"), require_tool("storescu")
    port = free_port()
    config = modality_config(tmp_path / "m.toml", port)
    received = tmp_path / "in"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "openpacs",
            "modality",
            "listen",
            "--config",
            str(config),
            "--json",
            "--received-dir",
            str(received),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_listening(port)
        done = subprocess.run(
            [echoscu, "-aec", "MOD1", "127.0.0.1", str(port)],
            env=tool_env(),
            capture_output=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        dx = tmp_path / "dx.dcm"
        from openpacs.modality import objects
        from openpacs.modality.config import ModalityConfig

        conf = ModalityConfig()
        proc_ = objects.unscheduled_procedure("L1", "Listen^Lena")
        (image,) = objects.make_images(
            proc_, objects.new_performed(proc_, conf), conf, 1, rows=64, columns=64
        )
        image.save_as(dx, enforce_file_format=True)
        done = subprocess.run(
            [storescu, "-aec", "MOD1", "127.0.0.1", str(port), str(dx)],
            env=tool_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        ct = tmp_path / "ct.dcm"
        from support import make_image

        make_image().save_as(ct, enforce_file_format=True)
        done = subprocess.run(
            [storescu, "-aec", "MOD1", "127.0.0.1", str(port), str(ct)],
            env=tool_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode != 0  # CT Image Storage is not a class the modality accepts
        stored = list(received.iterdir())
        assert [p.name for p in stored] == [f"{image.SOPInstanceUID}.dcm"]
        assert pydicom.dcmread(stored[0]).PatientID == "L1"
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert json.loads(out)["received"] == [str(image.SOPInstanceUID)]
