"""Modality Worklist SCP (seed 000 T3.7, seed 001 T3.2) against DCMTK findscu -W and pynetdicom;
worklist items come from the REST API and the command line."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind
from support import ServerProcess, require_tool, tool_env

TODAY = dt.date.today().strftime("%Y%m%d")
TOMORROW = (dt.date.today() + dt.timedelta(days=1)).strftime("%Y%m%d")


def post(srv: ServerProcess, body: object) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{srv.http_port}/api/worklist",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as rsp:
            return rsp.status, json.loads(rsp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def item(accession: str, **kw: object) -> dict:
    base: dict = {
        "patient": {
            "patient_id": kw.pop("pid", "P-" + accession),
            "name": kw.pop("name", "Doe^John"),
            "birth_date": kw.pop("birth", "19800101"),
            "sex": kw.pop("sex", "M"),
        },
        "accession_number": accession,
        "modality": "DX",
        "sps_start_date": TODAY,
        "sps_start_time": "090000",
        "station_ae": "MOD1",
        "station_name": "DXROOM1",
        "performing_physician": "Rad^Ray",
        "requested_procedure_description": "XR CHEST PA",
        "requested_procedure_codes": [{"value": "XR01", "scheme": "L", "meaning": "XR chest PA"}],
        "protocol_codes": [{"value": "P-CH", "scheme": "L", "meaning": "Chest protocol"}],
        "priority": "ROUTINE",
    }
    patient_extra = kw.pop("patient", {})
    base["patient"].update(patient_extra)
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def ris(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path_factory.mktemp("mwl"), "[query]\nmax_results = 20\n").start()
    items = [
        item("A100", name="Smith^John", sps_start_time="083000"),
        item(
            "A101",
            name="SMITHERS^Anna",
            sex="F",
            sps_start_time="101500",
            modality="CR",
            station_ae="MOD2",
        ),
        item(
            "A102",
            name="Doe^Jane",
            sex="F",
            sps_start_date=TOMORROW,
            patient={"pregnancy_status": 3},
        ),
        item(
            "A103",
            name="Müller^Jürgen",
            station_ae="MOD2",
            station_name="CRROOM",
            patient={
                "other_ids": [{"patient_id": "OTHER-1", "issuer": "HOSP-B"}],
                "issuer": "HOSP-A",
            },
        ),
        item(
            "A104",
            name="山田^太郎",
            sps_start_time="231500",
            study_uid="1.2.826.0.1.3680043.8.498.42",
        ),
    ]
    for body in items:
        status, answer = post(srv, body)
        assert status == 201, answer
    yield srv
    srv.stop()


def findscu_w(
    srv: ServerProcess, out: Path, *keys: str
) -> tuple[subprocess.CompletedProcess[str], list[Dataset]]:
    tool = require_tool("findscu")
    out.mkdir(parents=True, exist_ok=True)
    args = [tool, "-W", "-aec", "OPENPACS", "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    r = subprocess.run(
        [*args, "127.0.0.1", str(srv.port)],
        capture_output=True,
        text=True,
        errors="replace",
        env=tool_env(),
        timeout=60,
    )
    return r, [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


SPS = "ScheduledProcedureStepSequence[0]"


def test_todays_modality_query_as_a_modality_sends_it(ris, tmp_path: Path) -> None:
    """seed 004 T3-7: today, modality, station AE title."""
    r, answers = findscu_w(
        ris,
        tmp_path,
        f"{SPS}.ScheduledStationAETitle=MOD1",
        f"{SPS}.ScheduledProcedureStepStartDate={TODAY}",
        f"{SPS}.Modality=DX",
        f"{SPS}.ScheduledProcedureStepID",
        f"{SPS}.ScheduledProtocolCodeSequence",
        "PatientName",
        "PatientID",
        "AccessionNumber",
        "StudyInstanceUID",
        "ReferencedStudySequence",
        "RequestedProcedureCodeSequence",
        "RequestedProcedureID",
        "PatientAge",
        "PregnancyStatus",
        "PatientSex",
        "PatientBirthDate",
        "RequestedProcedurePriority",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(a.AccessionNumber for a in answers) == ["A100", "A104"]
    a = next(x for x in answers if x.AccessionNumber == "A100")
    assert str(a.PatientName) == "Smith^John" and a.PatientID == "P-A100"
    assert a.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID == "A100-1"
    code = a.ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
        "P-CH",
        "L",
        "Chest protocol",
    )
    assert a.RequestedProcedureCodeSequence[0].CodeValue == "XR01"
    assert a.ReferencedStudySequence[0].ReferencedSOPInstanceUID == a.StudyInstanceUID
    assert a.ReferencedStudySequence[0].ReferencedSOPClassUID == "1.2.840.10008.3.1.2.3.1"
    assert a.RequestedProcedureID == "A100"
    years = dt.date.today().year - 1980 - ((dt.date.today().month, dt.date.today().day) < (1, 1))
    assert a.PatientAge == f"{years:03d}Y"
    assert a.PregnancyStatus == 1  # male: not pregnant (seed 000 T3.7)
    assert a.RequestedProcedurePriority == "ROUTINE"


def test_station_ae_multiple_values_and_wildcard(ris, tmp_path: Path) -> None:
    _, both = findscu_w(
        ris,
        tmp_path / "m",
        f"{SPS}.ScheduledStationAETitle=MOD1\\MOD2",
        "AccessionNumber",
        f"{SPS}.ScheduledProcedureStepStartDate",
    )
    assert sorted(a.AccessionNumber for a in both) == ["A100", "A101", "A102", "A103", "A104"]
    _, wild = findscu_w(
        ris, tmp_path / "w", f"{SPS}.ScheduledStationAETitle=MOD*", "AccessionNumber"
    )
    assert len(wild) == 5
    _, two = findscu_w(
        ris, tmp_path / "2", f"{SPS}.ScheduledStationAETitle=MOD2", "AccessionNumber"
    )
    assert sorted(a.AccessionNumber for a in two) == ["A101", "A103"]


def test_start_date_time_ranges(ris, tmp_path: Path) -> None:
    _, morning = findscu_w(
        ris,
        tmp_path / "a",
        f"{SPS}.ScheduledProcedureStepStartDate={TODAY}",
        f"{SPS}.ScheduledProcedureStepStartTime=0800-1000",
        "AccessionNumber",
    )
    assert sorted(a.AccessionNumber for a in morning) == ["A100", "A103"]
    _, days = findscu_w(
        ris,
        tmp_path / "b",
        f"{SPS}.ScheduledProcedureStepStartDate={TODAY}-{TOMORROW}",
        "AccessionNumber",
    )
    assert len(days) == 5
    # seed 002 rule: date1-date2 with time1-time2 = date1.time1 .. date2.time2
    _, span = findscu_w(
        ris,
        tmp_path / "c",
        f"{SPS}.ScheduledProcedureStepStartDate={TODAY}-{TOMORROW}",
        f"{SPS}.ScheduledProcedureStepStartTime=2300-0930",
        "AccessionNumber",
    )
    assert sorted(a.AccessionNumber for a in span) == ["A102", "A104"]


def test_patient_name_case_insensitive_and_other_keys(ris, tmp_path: Path) -> None:
    _, names = findscu_w(ris, tmp_path / "n", "PatientName=smith*", "AccessionNumber")
    assert sorted(a.AccessionNumber for a in names) == ["A100", "A101"]
    _, acc = findscu_w(ris, tmp_path / "a", "AccessionNumber=A101", f"{SPS}.Modality")
    assert [a.ScheduledProcedureStepSequence[0].Modality for a in acc] == ["CR"]
    _, rp = findscu_w(ris, tmp_path / "r", "RequestedProcedureID=A10?", "AccessionNumber")
    assert len(rp) == 5
    _, station = findscu_w(
        ris, tmp_path / "s", f"{SPS}.ScheduledStationName=CRROOM", "AccessionNumber"
    )
    assert [a.AccessionNumber for a in station] == ["A103"]
    _, phys = findscu_w(
        ris, tmp_path / "p", f"{SPS}.ScheduledPerformingPhysicianName=RAD*", "AccessionNumber"
    )
    assert len(phys) == 5
    _, study = findscu_w(
        ris, tmp_path / "u", "StudyInstanceUID=1.2.826.0.1.3680043.8.498.42", "AccessionNumber"
    )
    assert [a.AccessionNumber for a in study] == ["A104"]
    _, none = findscu_w(ris, tmp_path / "0", "PatientID=NOBODY", "AccessionNumber")
    assert none == []


def test_other_patient_ids_and_charsets(ris, tmp_path: Path) -> None:
    _, answers = findscu_w(
        ris,
        tmp_path / "o",
        "AccessionNumber=A103",
        "PatientName",
        "OtherPatientIDsSequence",
        "IssuerOfPatientID",
    )
    (a,) = answers
    assert a.SpecificCharacterSet == "ISO_IR 100"  # Müller fits Latin-1 ([worklist] character_set)
    assert str(a.PatientName) == "Müller^Jürgen"
    assert a.IssuerOfPatientID == "HOSP-A"
    assert (
        a.OtherPatientIDsSequence[0].PatientID,
        a.OtherPatientIDsSequence[0].IssuerOfPatientID,
    ) == ("OTHER-1", "HOSP-B")
    _, answers = findscu_w(ris, tmp_path / "j", "AccessionNumber=A104", "PatientName")
    (a,) = answers
    assert a.SpecificCharacterSet == "ISO_IR 192"  # does not fit Latin-1
    assert str(a.PatientName) == "山田^太郎"
    _, answers = findscu_w(ris, tmp_path / "p", "AccessionNumber=A102", "PregnancyStatus")
    assert answers[0].PregnancyStatus == 3


def test_unsupported_matching_key_gives_ff01(ris) -> None:
    ae = AE(ae_title="MOD1")
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", ris.port, ae_title="OPENPACS")
    identifier = Dataset()
    identifier.AccessionNumber = "A100"
    identifier.MedicalAlerts = "latex"  # a value on a key the SCP does not match on
    statuses = [
        int(s.Status) for s, _ in assoc.send_c_find(identifier, ModalityWorklistInformationFind)
    ]
    identifier.MedicalAlerts = ""
    plain = [
        int(s.Status) for s, _ in assoc.send_c_find(identifier, ModalityWorklistInformationFind)
    ]
    assoc.release()
    assert statuses == [0xFF01, 0x0000]
    assert "not matched on: (0010,2000)" in ris.log()
    assert plain == [0xFF00, 0x0000]


def test_result_limit_is_an_explicit_failure(tmp_path: Path) -> None:
    """[query] max_results applies to the worklist too: A700 with a reason, never a cut list."""
    srv = ServerProcess(tmp_path / "lim", "[query]\nmax_results = 3\n").start()
    try:
        for n in range(4):
            status, answer = post(srv, item(f"L{n}"))
            assert status == 201, answer
        ae = AE(ae_title="MOD1")
        ae.add_requested_context(ModalityWorklistInformationFind)
        assoc = ae.associate("127.0.0.1", srv.port, ae_title="OPENPACS")
        query = Dataset()
        query.AccessionNumber = "L*"
        over = [
            (int(st.Status), st.get("ErrorComment", ""))
            for st, _ in assoc.send_c_find(query, ModalityWorklistInformationFind)
        ]
        query.AccessionNumber = "L[0-2]"  # not a DICOM wildcard: matches nothing
        none = [
            int(st.Status) for st, _ in assoc.send_c_find(query, ModalityWorklistInformationFind)
        ]
        query.AccessionNumber = "L1"
        one = [
            int(st.Status) for st, _ in assoc.send_c_find(query, ModalityWorklistInformationFind)
        ]
        assoc.release()
        assert over == [(0xA700, "More than 3 matches ([query] max_results); narrow the query")]
        assert "worklist query from MOD1 (127.0.0.1:" in srv.log()
        assert none == [0x0000]  # no match: success with no items
        assert one == [0xFF00, 0x0000]
    finally:
        srv.stop()


def test_dcmtk_example_queries(ris, tmp_path: Path) -> None:
    """Every worklist query of DCMTK's examples (wlistqry*.dump) is answered without failure."""
    dump2dcm = require_tool("dump2dcm")
    findscu = require_tool("findscu")
    examples = sorted(Path("/usr/share/doc/dcmtk/examples/wlistqry").glob("wlistqry*.dump"))
    if not examples:
        pytest.fail("DCMTK's example worklist queries are not installed (package dcmtk)")
    for dump in examples:
        query = tmp_path / (dump.stem + ".dcm")
        r = subprocess.run(
            [dump2dcm, str(dump), str(query)], capture_output=True, text=True, timeout=30
        )
        assert r.returncode == 0, r.stderr
        r = subprocess.run(
            [findscu, "-W", "-aec", "OPENPACS", "127.0.0.1", str(ris.port), str(query)],
            capture_output=True,
            text=True,
            errors="replace",
            env=tool_env(),
            timeout=60,
        )
        assert r.returncode == 0, f"{dump.name}: {r.stdout}{r.stderr}"
        assert "Failed" not in r.stdout + r.stderr and "Error" not in r.stdout + r.stderr, (
            f"{dump.name}: {r.stderr}"
        )


def test_rest_api_validation_and_cancel(ris, tmp_path: Path) -> None:
    status, answer = post(ris, item("BAD1", sps_start_date="2026-01-01"))
    assert status == 400 and "SPS Start Date" in answer["error"]
    status, answer = post(ris, {"accession_number": "X"})
    assert status == 400 and answer["field"] == "patient"
    status, _ = post(ris, item("C200"))
    assert status == 201
    _, found = findscu_w(ris, tmp_path / "c1", "AccessionNumber=C200")
    assert len(found) == 1
    req = urllib.request.Request(
        f"http://127.0.0.1:{ris.http_port}/api/worklist/C200", method="DELETE"
    )
    with urllib.request.urlopen(req, timeout=10) as rsp:
        assert rsp.status == 200
    _, found = findscu_w(ris, tmp_path / "c2", "AccessionNumber=C200")
    assert found == []  # cancelled items leave the worklist
    listing = ris.run_cli("worklist", "list", "--all")
    assert "C200" in listing.stdout and "CANCELLED" in listing.stdout


def test_cli_add_and_http_binds_loopback(ris) -> None:
    r = ris.run_cli(
        "worklist",
        "add",
        "--patient-id",
        "CLI-1",
        "--patient-name",
        "Cli^Ent",
        "--accession",
        "CLI100",
        "--modality",
        "CR",
        "--station-ae",
        "MOD9",
        "--procedure",
        "CR1^CR hand^L",
    )
    assert r.returncode == 0, r.stderr
    r = ris.run_cli("worklist", "list")
    assert "CLI100" in r.stdout and "MOD9" in r.stdout
    r = ris.run_cli(
        "worklist", "add", "--patient-id", "X", "--accession", "CLI101", "--modality", "cr"
    )
    assert r.returncode == 2 and "Modality" in r.stderr
    assert f"HTTP listener on 127.0.0.1:{ris.http_port}" in ris.log()
