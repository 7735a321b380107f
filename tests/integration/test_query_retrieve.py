"""Q/R SCP against DCMTK findscu/movescu/getscu and pynetdicom (seed 002 §3.2.11)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from support import (
    CT_IMAGE,
    MR_IMAGE,
    ServerProcess,
    dataset_bytes_of_file,
    free_port,
    make_image,
    require_tool,
    shipped,
    store_datasets,
    stored_instance_files,
    tool_env,
)

# A small archive: 3 patients, 5 studies, with the attributes the query tables of seed 002 use.
PATIENTS = [
    ("SMITH-1", "Smith^John", "19500101", "M"),
    ("SMITH-2", "SMITHERS^Anna", "19800202", "F"),
    ("DOE-1", "Doe^Jane", "19700303", "F"),
]


def _archive_datasets() -> list[Dataset]:
    out: list[Dataset] = []
    plan = [
        # patient, study date, time, accession, modality, description, n series, n instances
        (0, "20250110", "083000", "ACC-100", "CT", "CT THORAX", 2, 3),
        (0, "20250315", "141500", "ACC-101", "MR", "MR KNEE", 1, 2),
        (1, "20250315", "090000", "acc-102", "CT", "CT HEAD", 1, 1),
        (1, "20251201", "235959", "ACC-103", "MR", "MR BRAIN", 1, 2),
        (2, "20260101", "000001", "ACC-104", "CT", "CT ABDOMEN", 1, 4),
    ]
    for p, date, time_, acc, mod, desc, n_series, n_inst in plan:
        pid, name, birth, sex = PATIENTS[p]
        study = generate_uid()
        for s in range(n_series):
            series_uid = generate_uid()
            item = Dataset()
            item.RequestedProcedureID = f"RP-{acc}"
            item.ScheduledProcedureStepID = f"SPS-{acc}-{s}"
            for i in range(n_inst):
                ds = make_image(
                    sop_class=CT_IMAGE if mod == "CT" else MR_IMAGE,
                    modality=mod,
                    study_uid=study,
                    series_uid=series_uid,
                    patient_id=pid,
                    patient_name=name,
                    instance_number=i + 1,
                    seed=len(out),
                    StudyDate=date,
                    StudyTime=time_,
                    AccessionNumber=acc,
                    StudyDescription=desc,
                    PatientBirthDate=birth,
                    PatientSex=sex,
                    SeriesNumber=s + 1,
                    RequestAttributesSequence=[item],
                )
                out.append(ds)
    return out


REFUSER_PORT = free_port()


@pytest.fixture(scope="module")
def archive(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProcess, list[Dataset], int]]:
    """One server with the small archive and two move destinations: DEST and REFUSER."""
    dest_port = free_port()
    srv = ServerProcess(
        tmp_path_factory.mktemp("qr"),
        f'[[remote]]\nname = "dest"\nae_title = "DEST"\nhost = "127.0.0.1"\nport = {dest_port}\n'
        f'[[remote]]\nname = "refuser"\nae_title = "REFUSER"\nhost = "127.0.0.1"\nport = {REFUSER_PORT}\n',
    ).start()
    datasets = _archive_datasets()
    assert store_datasets(srv.port, datasets) == [(0, None)] * len(datasets)
    yield srv, datasets, dest_port
    srv.stop()


def findscu(
    port: int, out: Path, model: str, *keys: str
) -> tuple[subprocess.CompletedProcess[str], list[Dataset]]:
    tool = require_tool("findscu")
    out.mkdir(parents=True, exist_ok=True)
    args = [tool, model, "-aec", "OPENPACS", "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    r = subprocess.run(
        [*args, "127.0.0.1", str(port)], capture_output=True, text=True, env=tool_env(), timeout=60
    )
    answers = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    return r, answers


def test_findscu_study_root_wildcard_case_insensitive(archive, tmp_path: Path) -> None:
    srv, _, _ = archive
    r, answers = findscu(
        srv.port,
        tmp_path / "a",
        "-S",
        "QueryRetrieveLevel=STUDY",
        "PatientName=smith*",
        "StudyInstanceUID",
        "AccessionNumber",
        "NumberOfStudyRelatedInstances",
        "NumberOfStudyRelatedSeries",
        "ModalitiesInStudy",
        "PatientID",
        "RetrieveAETitle",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # Smith^John (2 studies) and SMITHERS^Anna (2 studies): Patient's Name is case-insensitive
    assert sorted(a.AccessionNumber for a in answers) == [
        "ACC-100",
        "ACC-101",
        "ACC-103",
        "acc-102",
    ]
    by_acc = {a.AccessionNumber: a for a in answers}
    assert by_acc["ACC-100"].NumberOfStudyRelatedInstances == 6
    assert by_acc["ACC-100"].NumberOfStudyRelatedSeries == 2
    assert by_acc["ACC-100"].ModalitiesInStudy == "CT"
    assert all(a.RetrieveAETitle == "OPENPACS" for a in answers)
    assert all(a.QueryRetrieveLevel == "STUDY" for a in answers)


def test_findscu_other_attributes_are_case_sensitive(archive, tmp_path: Path) -> None:
    srv, _, _ = archive
    _, answers = findscu(
        srv.port, tmp_path / "a", "-S", "QueryRetrieveLevel=STUDY", "AccessionNumber=ACC-10?"
    )
    assert sorted(a.AccessionNumber for a in answers) == [
        "ACC-100",
        "ACC-101",
        "ACC-103",
        "ACC-104",
    ]


def test_findscu_date_range_and_combined_date_time(archive, tmp_path: Path) -> None:
    srv, _, _ = archive
    _, answers = findscu(
        srv.port,
        tmp_path / "a",
        "-S",
        "QueryRetrieveLevel=STUDY",
        "StudyDate=20250301-20251231",
        "AccessionNumber",
    )
    assert sorted(a.AccessionNumber for a in answers) == ["ACC-101", "ACC-103", "acc-102"]
    _, answers = findscu(
        srv.port,
        tmp_path / "b",
        "-S",
        "QueryRetrieveLevel=STUDY",
        "StudyDate=-20250315",
        "AccessionNumber",
    )
    assert sorted(a.AccessionNumber for a in answers) == ["ACC-100", "ACC-101", "acc-102"]
    # seed 002: date1-date2 with time1-time2 means date1.time1 .. date2.time2
    _, answers = findscu(
        srv.port,
        tmp_path / "c",
        "-S",
        "QueryRetrieveLevel=STUDY",
        "StudyDate=20250315-20251201",
        "StudyTime=120000-235959",
        "AccessionNumber",
    )
    assert sorted(a.AccessionNumber for a in answers) == ["ACC-101", "ACC-103"]


def test_findscu_patient_root_levels(archive, tmp_path: Path) -> None:
    srv, datasets, _ = archive
    _, patients = findscu(
        srv.port,
        tmp_path / "p",
        "-P",
        "QueryRetrieveLevel=PATIENT",
        "PatientID=SMITH*",
        "PatientName",
        "PatientBirthDate",
        "NumberOfPatientRelatedStudies",
    )
    assert sorted(str(p.PatientName) for p in patients) == ["SMITHERS^Anna", "Smith^John"]
    assert {p.PatientID: p.NumberOfPatientRelatedStudies for p in patients} == {
        "SMITH-1": 2,
        "SMITH-2": 2,
    }
    _, studies = findscu(
        srv.port,
        tmp_path / "s",
        "-P",
        "QueryRetrieveLevel=STUDY",
        "PatientID=DOE-1",
        "StudyInstanceUID",
        "StudyDescription",
    )
    assert [s.StudyDescription for s in studies] == ["CT ABDOMEN"]
    study_uid = studies[0].StudyInstanceUID
    _, series = findscu(
        srv.port,
        tmp_path / "se",
        "-P",
        "QueryRetrieveLevel=SERIES",
        "PatientID=DOE-1",
        f"StudyInstanceUID={study_uid}",
        "SeriesInstanceUID",
        "Modality",
        "NumberOfSeriesRelatedInstances",
    )
    assert [(s.Modality, s.NumberOfSeriesRelatedInstances) for s in series] == [("CT", 4)]
    _, images = findscu(
        srv.port,
        tmp_path / "i",
        "-P",
        "QueryRetrieveLevel=IMAGE",
        "PatientID=DOE-1",
        f"StudyInstanceUID={study_uid}",
        f"SeriesInstanceUID={series[0].SeriesInstanceUID}",
        "SOPInstanceUID",
        "InstanceNumber",
        "Rows",
        "SOPClassUID",
    )
    expected = {d.SOPInstanceUID for d in datasets if d.StudyInstanceUID == study_uid}
    assert {i.SOPInstanceUID for i in images} == expected
    assert all(i.Rows == 16 and i.SOPClassUID == CT_IMAGE for i in images)


def test_findscu_patient_study_only_model(archive, tmp_path: Path) -> None:
    srv, _, _ = archive
    _, studies = findscu(
        srv.port,
        tmp_path / "o",
        "-O",
        "QueryRetrieveLevel=STUDY",
        "PatientID=SMITH-2",
        "AccessionNumber",
    )
    assert sorted(s.AccessionNumber for s in studies) == ["ACC-103", "acc-102"]


def test_findscu_sequence_matching_on_request_attributes(archive, tmp_path: Path) -> None:
    srv, datasets, _ = archive
    study_uid = next(d.StudyInstanceUID for d in datasets if d.AccessionNumber == "ACC-100")
    _, series = findscu(
        srv.port,
        tmp_path / "q",
        "-S",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={study_uid}",
        "RequestAttributesSequence[0].ScheduledProcedureStepID=SPS-ACC-100-1",
        "SeriesNumber",
    )
    assert [s.SeriesNumber for s in series] == [2]
    assert series[0].RequestAttributesSequence[0].ScheduledProcedureStepID == "SPS-ACC-100-1"


def test_relational_query_refused(archive, tmp_path: Path) -> None:
    srv, _, _ = archive
    ae = AE(ae_title="RELSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", srv.port, ae_title="OPENPACS")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.Modality = "CT"  # no Study Instance UID: a relational query
    identifier.SeriesInstanceUID = ""
    statuses = [
        (int(s.Status), s.get("ErrorComment"))
        for s, _ in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
    ]
    assoc.release()
    assert len(statuses) == 1 and statuses[0][0] == 0xA900
    assert "Relational" in statuses[0][1]


def test_too_many_matches_is_an_explicit_failure(tmp_path: Path) -> None:
    """Never silently empty or truncated (unlike seed 002's hit limit): a failure naming it."""
    srv = ServerProcess(tmp_path / "srv", "[query]\nmax_results = 3\n").start()
    try:
        assert set(store_datasets(srv.port, [make_image(seed=i) for i in range(5)])) == {(0, None)}
        ae = AE(ae_title="BIGSCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", srv.port, ae_title="OPENPACS")
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = ""
        responses = list(assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind))
        assoc.release()
        assert len(responses) == 1
        status = responses[0][0]
        assert int(status.Status) == 0xA700
        assert "More than 3 matches" in status.ErrorComment
    finally:
        srv.stop()


def test_c_cancel_stops_a_find(tmp_path: Path) -> None:
    """C-CANCEL-RQ sent right behind the C-FIND-RQ (both encoded by pynetdicom): the SCP sees it
    before its first pending response and ends with FE00 (PS3.7 9.1.2.1.5)."""
    import io

    from pynetdicom.dimse_messages import C_CANCEL_RQ, C_FIND_RQ
    from pynetdicom.dimse_primitives import C_CANCEL, C_FIND
    from pynetdicom.pdu import P_DATA_TF
    from support import RawScu, encode_dataset

    srv = ServerProcess(tmp_path / "srv").start()
    try:
        datasets = [
            make_image(seed=i, patient_id=f"P{i:04d}", patient_name=f"Many^P{i:04d}")
            for i in range(50)
        ]
        assert set(store_datasets(srv.port, datasets)) == {(0, None)}
        scu = RawScu(
            srv.port, [(StudyRootQueryRetrieveInformationModelFind, ["1.2.840.10008.1.2"])]
        )
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.PatientName = "Many*"
        identifier.StudyInstanceUID = ""
        find = C_FIND()
        find.MessageID = 7
        find.AffectedSOPClassUID = StudyRootQueryRetrieveInformationModelFind
        find.Priority = 2
        find.Identifier = io.BytesIO(encode_dataset(identifier, implicit=True))
        cancel = C_CANCEL()
        cancel.MessageIDBeingRespondedTo = 7
        raw = b""
        for primitive, message_cls in ((find, C_FIND_RQ), (cancel, C_CANCEL_RQ)):
            message = message_cls()
            message.primitive_to_message(primitive)
            for p_data in message.encode_msg(1, 16384):
                pdu = P_DATA_TF()
                pdu.from_primitive(p_data)
                raw += pdu.encode()
        scu.sock.sendall(raw)  # both in one write
        statuses = []
        while True:
            rsp = scu.read_response()
            statuses.append(int(rsp.Status))
            if rsp.Status not in (0xFF00, 0xFF01):
                break
        scu.release()
        assert statuses[-1] == 0xFE00, statuses
        assert len(statuses) < 51
        assert "cancelled" in srv.log()
    finally:
        srv.stop()


def test_iso2022_ir87_values_returned(tmp_path: Path) -> None:
    storescu = require_tool("storescu")
    srv = ServerProcess(tmp_path / "srv").start()
    try:
        src = shipped("chrH31.dcm")
        r = subprocess.run(
            [storescu, "-xe", "-aec", "OPENPACS", "127.0.0.1", str(srv.port), str(src)],
            capture_output=True,
            text=True,
            env=tool_env(),
            timeout=60,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        expected = pydicom.dcmread(src)
        _, answers = findscu(
            srv.port,
            tmp_path / "j",
            "-S",
            "QueryRetrieveLevel=STUDY",
            "PatientName=Yamada*",
            "StudyInstanceUID",
        )
        assert len(answers) == 1
        assert "ISO 2022 IR 87" in answers[0].SpecificCharacterSet
        assert str(answers[0].PatientName) == str(expected.PatientName)
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------- C-MOVE
def _storescp(
    port: int, out: Path, aet: str = "DEST", accept_all: bool = True
) -> subprocess.Popen[bytes]:
    tool = require_tool("storescp")
    out.mkdir(parents=True, exist_ok=True)
    args = [tool, "+B", "-od", str(out), "-aet", aet]
    if accept_all:
        args.append("+xa")
    proc = subprocess.Popen([*args, str(port)], env=tool_env())
    import socket

    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc


def _movescu(port: int, *keys: str, dest: str = "DEST") -> subprocess.CompletedProcess[str]:
    tool = require_tool("movescu")
    args = [tool, "-S", "-aec", "OPENPACS", "-aem", dest]
    for key in keys:
        args += ["-k", key]
    return subprocess.run(
        [*args, "127.0.0.1", str(port)], capture_output=True, text=True, env=tool_env(), timeout=120
    )


def test_movescu_to_storescp_byte_identical(archive, tmp_path: Path) -> None:
    srv, datasets, dest_port = archive
    study_uid = next(d.StudyInstanceUID for d in datasets if d.AccessionNumber == "ACC-100")
    out = tmp_path / "dest"
    proc = _storescp(dest_port, out)
    try:
        r = _movescu(srv.port, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}")
    finally:
        proc.terminate()
        proc.wait(10)
    assert r.returncode == 0, r.stdout + r.stderr
    received = sorted(out.iterdir())
    wanted = [d for d in datasets if d.StudyInstanceUID == study_uid]
    assert len(received) == len(wanted) == 6
    for path in received:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        (stored,) = stored_instance_files(srv.data_dir, ds.SOPInstanceUID)
        assert dataset_bytes_of_file(path) == dataset_bytes_of_file(stored)
    assert "C-MOVE from MOVESCU to DEST: 6 completed, 0 failed" in srv.log()


def test_move_unknown_destination_a801(archive) -> None:
    srv, datasets, _ = archive
    r = _movescu(
        srv.port,
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={datasets[0].StudyInstanceUID}",
        dest="NOWHERE",
    )
    assert r.returncode != 0 and "MoveDestinationUnknown" in r.stdout + r.stderr


def test_move_destination_refusing_c001_and_down(archive, tmp_path: Path) -> None:
    srv, datasets, _ = archive
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = datasets[0].StudyInstanceUID

    def move() -> Dataset:
        ae = AE(ae_title="MOVER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", srv.port, ae_title="OPENPACS")
        statuses = [
            s
            for s, _ in assoc.send_c_move(
                identifier, "REFUSER", StudyRootQueryRetrieveInformationModelMove
            )
        ]
        assoc.release()
        return statuses[-1]

    # nothing listens at REFUSER's address
    final = move()
    assert int(final.Status) == 0xC001 and "unreachable" in final.ErrorComment
    # a destination that answers A-ASSOCIATE-RJ
    refuser = AE(ae_title="REFUSER")
    refuser.add_supported_context(CT_IMAGE)
    refuser.require_calling_aet = ["SOMEBODY_ELSE"]
    server = refuser.start_server(("127.0.0.1", REFUSER_PORT), block=False)
    try:
        final = move()
    finally:
        server.shutdown()
    assert int(final.Status) == 0xC001 and "refused" in final.ErrorComment


def test_move_transcodes_for_a_destination_without_the_stored_syntax(tmp_path: Path) -> None:
    dest_port = free_port()
    srv = ServerProcess(
        tmp_path / "srv",
        f'[[remote]]\nname="d"\nae_title="DEST"\nhost="127.0.0.1"\nport={dest_port}\n',
    ).start()
    storescu = require_tool("storescu")
    try:
        src = shipped("MR_small_jpeg_ls_lossless.dcm")
        r = subprocess.run(
            [storescu, "-xt", "-aec", "OPENPACS", "127.0.0.1", str(srv.port), str(src)],
            capture_output=True,
            text=True,
            env=tool_env(),
            timeout=60,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        original = pydicom.dcmread(src)
        out = tmp_path / "dest"
        proc = _storescp(dest_port, out, accept_all=False)  # uncompressed only
        try:
            r = _movescu(
                srv.port,
                "QueryRetrieveLevel=STUDY",
                f"StudyInstanceUID={original.StudyInstanceUID}",
            )
        finally:
            proc.terminate()
            proc.wait(10)
        assert r.returncode == 0, r.stdout + r.stderr
        (received,) = list(out.iterdir())
        got = pydicom.dcmread(received)
        assert got.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
        assert (got.pixel_array == original.pixel_array).all()
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------- C-GET
def test_getscu_byte_identical(archive, tmp_path: Path) -> None:
    srv, datasets, _ = archive
    getscu = require_tool("getscu")
    study_uid = next(d.StudyInstanceUID for d in datasets if d.AccessionNumber == "ACC-104")
    out = tmp_path / "got"
    out.mkdir()
    r = subprocess.run(
        [
            getscu,
            "-S",
            "+B",
            "-aec",
            "OPENPACS",
            "-od",
            str(out),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study_uid}",
            "127.0.0.1",
            str(srv.port),
        ],
        capture_output=True,
        text=True,
        env=tool_env(),
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    received = sorted(out.iterdir())
    assert len(received) == 4
    for path in received:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        (stored,) = stored_instance_files(srv.data_dir, ds.SOPInstanceUID)
        assert dataset_bytes_of_file(path) == dataset_bytes_of_file(stored)


def test_pynetdicom_c_get_with_role_selection(archive) -> None:
    from pynetdicom import build_role

    srv, datasets, _ = archive
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.dataset.SOPInstanceUID)
        return 0x0000

    ae = AE(ae_title="GETTER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CT_IMAGE)
    ae.add_requested_context(MR_IMAGE)
    roles = [build_role(CT_IMAGE, scp_role=True), build_role(MR_IMAGE, scp_role=True)]
    assoc = ae.associate(
        "127.0.0.1",
        srv.port,
        ae_title="OPENPACS",
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    study_uid = next(d.StudyInstanceUID for d in datasets if d.AccessionNumber == "ACC-101")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    statuses = [
        s for s, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)
    ]
    assoc.release()
    final = statuses[-1]
    assert int(final.Status) == 0
    assert final.NumberOfCompletedSuboperations == 2
    assert sorted(received) == sorted(
        d.SOPInstanceUID for d in datasets if d.StudyInstanceUID == study_uid
    )


def _move_statuses(port: int, study_uid: str, dest: str = "DEST") -> list[Dataset]:
    ae = AE(ae_title="MOVER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", port, ae_title="OPENPACS")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    out = [
        s
        for s, _ in assoc.send_c_move(identifier, dest, StudyRootQueryRetrieveInformationModelMove)
    ]
    assoc.release()
    return out


def test_move_partial_failure_b000_and_nothing_generated_c000(tmp_path: Path) -> None:
    """A stored object that cannot be read: B000 with the Failed SOP Instance UID List when
    others went, C000 (seed 002 T3.76: objects failed to be generated) when none could."""
    dest_port = free_port()
    srv = ServerProcess(
        tmp_path / "srv",
        f'[[remote]]\nname="d"\nae_title="DEST"\nhost="127.0.0.1"\nport={dest_port}\n',
    ).start()
    proc = _storescp(dest_port, tmp_path / "dest")
    try:
        study = generate_uid()
        series = generate_uid()
        datasets = [
            make_image(study_uid=study, series_uid=series, instance_number=i, seed=i)
            for i in range(3)
        ]
        assert store_datasets(srv.port, datasets) == [(0, None)] * 3
        stored_instance_files(srv.data_dir, datasets[1].SOPInstanceUID)[0].unlink()
        final = _move_statuses(srv.port, study)[-1]
        assert int(final.Status) == 0xB000
        assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (2, 1)
        for ds in datasets[::2]:
            stored_instance_files(srv.data_dir, ds.SOPInstanceUID)[0].unlink()
        final = _move_statuses(srv.port, study)[-1]
        assert int(final.Status) == 0xC000
        assert final.NumberOfFailedSuboperations == 3
    finally:
        proc.terminate()
        proc.wait(10)
        srv.stop()


def test_c_cancel_stops_a_move(archive, tmp_path: Path) -> None:
    """C-CANCEL-RQ right behind the C-MOVE-RQ: no sub-operation is started, final FE00."""
    import io

    from pynetdicom.dimse_messages import C_CANCEL_RQ, C_MOVE_RQ
    from pynetdicom.dimse_primitives import C_CANCEL, C_MOVE
    from pynetdicom.pdu import P_DATA_TF
    from support import RawScu, encode_dataset

    srv, datasets, dest_port = archive
    proc = _storescp(dest_port, tmp_path / "dest")
    try:
        scu = RawScu(
            srv.port, [(StudyRootQueryRetrieveInformationModelMove, ["1.2.840.10008.1.2"])]
        )
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = datasets[0].StudyInstanceUID
        move = C_MOVE()
        move.MessageID = 9
        move.AffectedSOPClassUID = StudyRootQueryRetrieveInformationModelMove
        move.Priority = 2
        move.MoveDestination = "DEST"
        move.Identifier = io.BytesIO(encode_dataset(identifier, implicit=True))
        cancel = C_CANCEL()
        cancel.MessageIDBeingRespondedTo = 9
        raw = b""
        for primitive, message_cls in ((move, C_MOVE_RQ), (cancel, C_CANCEL_RQ)):
            message = message_cls()
            message.primitive_to_message(primitive)
            for p_data in message.encode_msg(1, 16384):
                pdu = P_DATA_TF()
                pdu.from_primitive(p_data)
                raw += pdu.encode()
        scu.sock.sendall(raw)
        rsp = scu.read_response()
        scu.release()
        assert rsp.Status == 0xFE00
        assert rsp.NumberOfCompletedSuboperations == 0
        assert rsp.NumberOfRemainingSuboperations == 6
        assert list((tmp_path / "dest").iterdir()) == []
    finally:
        proc.terminate()
        proc.wait(10)
