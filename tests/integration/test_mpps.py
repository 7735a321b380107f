"""MPPS SCP (seed 001 §4, PS3.4 F.7) with pynetdicom, worklist status, relay (seed 001 §5)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import ModalityPerformedProcedureStep, ModalityWorklistInformationFind
from support import ServerProcess, free_port, make_image, store_datasets

TODAY = dt.date.today().strftime("%Y%m%d")
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


def schedule(srv: ServerProcess, accession: str) -> str:
    """A worklist item via the CLI; returns its Study Instance UID."""
    r = srv.run_cli(
        "worklist",
        "add",
        "--patient-id",
        "MP-1",
        "--patient-name",
        "Perf^Pat",
        "--accession",
        accession,
        "--modality",
        "DX",
        "--station-ae",
        "MOD1",
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.split("Study Instance UID ")[1].strip(" )\n")


def in_progress(study_uid: str, accession: str, **extra: object) -> Dataset:
    ds = Dataset()
    ssa = Dataset()
    ssa.StudyInstanceUID = study_uid
    ssa.AccessionNumber = accession
    ssa.ScheduledProcedureStepID = f"{accession}-1"
    ssa.RequestedProcedureID = accession
    ds.ScheduledStepAttributesSequence = [ssa]
    ds.PatientName = "Perf^Pat"
    ds.PatientID = "MP-1"
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = "MOD1"
    ds.PerformedProcedureStepStartDate = TODAY
    ds.PerformedProcedureStepStartTime = "101010"
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.Modality = "DX"
    for key, value in extra.items():
        setattr(ds, key, value)
    return ds


def completed(series_uid: str, refs: list[tuple[str, str]], status: str = "COMPLETED") -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = TODAY
    ds.PerformedProcedureStepEndTime = "102020"
    ds.TotalTimeOfFluoroscopy = 0
    ds.TotalNumberOfExposures = len(refs)
    ds.ImageAndFluoroscopyAreaDoseProduct = 1.25
    ds.EntranceDoseInmGy = 0.3
    series = Dataset()
    series.SeriesInstanceUID = series_uid
    series.PerformingPhysicianName = "Rad^Ray"
    series.ProtocolName = "CHEST PA"
    series.OperatorsName = "Op^Erator"
    series.SeriesDescription = "Chest"
    series.RetrieveAETitle = "OPENPACS"
    images = []
    for cls, uid in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = cls
        item.ReferencedSOPInstanceUID = uid
        images.append(item)
    series.ReferencedImageSequence = images
    series.ReferencedNonImageCompositeSOPInstanceSequence = []
    ds.PerformedSeriesSequence = [series]
    if status == "DISCONTINUED":
        reason = Dataset()
        reason.CodeValue = "110514"
        reason.CodingSchemeDesignator = "DCM"
        reason.CodeMeaning = "Incorrect worklist entry selected"
        ds.PerformedProcedureStepDiscontinuationReasonCodeSequence = [reason]
    return ds


def mpps_assoc(port: int) -> object:
    """An MPPS association; `assoc.responses` collects every response's command set, since pynetdicom's
    send_n_create() does not return the Affected SOP Instance UID the SCP assigned."""
    ae = AE(ae_title="MOD1")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    responses: list[Dataset] = []

    def on_receive(event: evt.Event) -> None:
        responses.append(event.message.command_set)

    assoc = ae.associate(
        "127.0.0.1", port, ae_title="OPENPACS", evt_handlers=[(evt.EVT_DIMSE_RECV, on_receive)]
    )
    assert assoc.is_established
    assoc.responses = responses  # type: ignore[attr-defined]
    return assoc


def sps_status(srv: ServerProcess, accession: str) -> str:
    ae = AE(ae_title="MOD1")
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", srv.port, ae_title="OPENPACS")
    q = Dataset()
    q.AccessionNumber = accession
    sps = Dataset()
    sps.ScheduledProcedureStepStatus = ""
    q.ScheduledProcedureStepSequence = [sps]
    statuses = [
        x
        for x in (ds for s, ds in assoc.send_c_find(q, ModalityWorklistInformationFind))
        if x is not None
    ]
    assoc.release()
    return (
        statuses[0].ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus
        if statuses
        else "(not listed)"
    )


def test_full_cycle_updates_the_worklist_and_records_references(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "srv").start()
    try:
        study = schedule(srv, "MP100")
        assert sps_status(srv, "MP100") == "SCHEDULED"
        assoc = mpps_assoc(srv.port)
        status, _ = assoc.send_n_create(
            in_progress(study, "MP100"), ModalityPerformedProcedureStep, None
        )
        assert int(status.Status) == 0
        uid = assoc.responses[-1].AffectedSOPInstanceUID  # created by the SCP: the SCU gave none
        assert uid
        assert sps_status(srv, "MP100") == "STARTED"
        series = generate_uid()
        images = [
            make_image(study_uid=study, series_uid=series, seed=i, patient_id="MP-1")
            for i in range(2)
        ]
        refs = [(d.SOPClassUID, d.SOPInstanceUID) for d in images] + [
            (images[0].SOPClassUID, generate_uid())
        ]
        status, _ = assoc.send_n_set(completed(series, refs), ModalityPerformedProcedureStep, uid)
        assert int(status.Status) == 0
        # final states are immutable
        status, _ = assoc.send_n_set(
            completed(series, refs, "DISCONTINUED"), ModalityPerformedProcedureStep, uid
        )
        assert int(status.Status) == 0x0110 and "COMPLETED" in status.ErrorComment
        assoc.release()
        assert sps_status(srv, "MP100") == "(not listed)"  # completed steps leave the worklist
        assert store_datasets(srv.port, images) == [(0, None)] * 2
        listing = srv.run_cli("mpps", "list")
        assert "COMPLETED" in listing.stdout and "2/3 missing" in listing.stdout, listing.stdout
        # every attribute is kept, the dose attributes of seed 001 T4.2 included
        shown = srv.run_cli("mpps", "show", uid, "--json")
        assert shown.returncode == 0, shown.stderr
        kept = Dataset.from_json(shown.stdout)
        assert kept.ImageAndFluoroscopyAreaDoseProduct == 1.25 and kept.EntranceDoseInmGy == 0.3
        assert kept.TotalNumberOfExposures == 3 and kept.TotalTimeOfFluoroscopy == 0
        assert kept.PerformedProcedureStepStatus == "COMPLETED"
        assert kept.PerformedStationAETitle == "MOD1"  # from the N-CREATE
        assert kept.PerformedSeriesSequence[0].ProtocolName == "CHEST PA"
    finally:
        srv.stop()


def test_error_statuses(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "srv").start()
    try:
        assoc = mpps_assoc(srv.port)
        uid = generate_uid()
        # missing type 1 attributes → 0120 naming them
        partial = in_progress(generate_uid(), "X1")
        del partial.PerformedStationAETitle
        del partial.PerformedProcedureStepStartTime
        status, _ = assoc.send_n_create(partial, ModalityPerformedProcedureStep, uid)
        assert int(status.Status) == 0x0120
        assert "PerformedStationAETitle" in status.ErrorComment
        assert set(assoc.responses[-1].AttributeIdentifierList) == {0x00400241, 0x00400245}
        # N-CREATE must be IN PROGRESS → 0106
        status, _ = assoc.send_n_create(
            in_progress(generate_uid(), "X2", PerformedProcedureStepStatus="COMPLETED"),
            ModalityPerformedProcedureStep,
            generate_uid(),
        )
        assert int(status.Status) == 0x0106
        # unscheduled is accepted and recorded; the same UID again → 0111
        status, _ = assoc.send_n_create(
            in_progress(generate_uid(), "UNSCHED"), ModalityPerformedProcedureStep, uid
        )
        assert int(status.Status) == 0 and assoc.responses[-1].AffectedSOPInstanceUID == uid
        status, _ = assoc.send_n_create(
            in_progress(generate_uid(), "UNSCHED"), ModalityPerformedProcedureStep, uid
        )
        assert int(status.Status) == 0x0111
        # N-SET on an unknown instance → 0112; a bad status value → 0106
        status, _ = assoc.send_n_set(
            completed(generate_uid(), []), ModalityPerformedProcedureStep, generate_uid()
        )
        assert int(status.Status) == 0x0112
        bad = Dataset()
        bad.PerformedProcedureStepStatus = "FINISHED"
        status, _ = assoc.send_n_set(bad, ModalityPerformedProcedureStep, uid)
        assert int(status.Status) == 0x0106
        # leaving IN PROGRESS needs the end date/time → 0120
        done = Dataset()
        done.PerformedProcedureStepStatus = "COMPLETED"
        status, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, uid)
        assert int(status.Status) == 0x0120 and "EndDate" in status.ErrorComment
        # discontinued with a CID 9300 reason
        status, _ = assoc.send_n_set(
            completed(generate_uid(), [], "DISCONTINUED"), ModalityPerformedProcedureStep, uid
        )
        assert int(status.Status) == 0
        assoc.release()
        listing = srv.run_cli("mpps", "list")
        assert "DISCONTINUED" in listing.stdout and "(unscheduled)" in listing.stdout
        # every refusal is logged with the peer's AE title and address
        assert "MPPS N-CREATE-RQ from MOD1 (127.0.0.1:" in srv.log()
        assert "refused: 0x0111" in srv.log()
    finally:
        srv.stop()


def test_study_verification(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "srv", '[mpps]\nverify_study = "accession_number"\n').start()
    try:
        study = schedule(srv, "VER1")
        assoc = mpps_assoc(srv.port)
        status, _ = assoc.send_n_create(
            in_progress(study, "NOT-SCHEDULED"), ModalityPerformedProcedureStep, generate_uid()
        )
        assert int(status.Status) == 0x0110 and "verification" in status.ErrorComment
        status, _ = assoc.send_n_create(
            in_progress(study, "VER1"), ModalityPerformedProcedureStep, generate_uid()
        )
        assert int(status.Status) == 0
        assoc.release()
    finally:
        srv.stop()


def test_relay_in_order_to_a_forward_destination(tmp_path: Path) -> None:
    port = free_port()
    received: list[tuple[str, str, str]] = []
    got_set = threading.Event()
    stored: dict[str, Dataset] = {}

    def on_create(event: evt.Event) -> tuple[int, Dataset]:
        ds = event.attribute_list
        stored[event.request.AffectedSOPInstanceUID] = ds
        received.append(
            ("create", event.request.AffectedSOPInstanceUID, str(ds.PerformedProcedureStepStatus))
        )
        return 0x0000, ds

    def on_set(event: evt.Event) -> tuple[int, Dataset]:
        ds = event.attribute_list
        stored["set"] = ds
        received.append(
            ("set", event.request.RequestedSOPInstanceUID, str(ds.PerformedProcedureStepStatus))
        )
        got_set.set()
        return 0x0000, ds

    forward_ae = AE(ae_title="RIS2")
    forward_ae.add_supported_context(ModalityPerformedProcedureStep)
    forward_server = forward_ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_N_CREATE, on_create), (evt.EVT_N_SET, on_set)],
    )
    srv = ServerProcess(
        tmp_path / "srv",
        f'[[mpps_forward]]\nname = "ris2"\nae_title = "RIS2"\nhost = "127.0.0.1"\nport = {port}\n',
    ).start()
    try:
        study = generate_uid()
        assoc = mpps_assoc(srv.port)
        uid = generate_uid()
        create = in_progress(study, "REL1", TotalNumberOfExposures=0)
        status, _ = assoc.send_n_create(create, ModalityPerformedProcedureStep, uid)
        assert int(status.Status) == 0
        final = completed(generate_uid(), [(MR_IMAGE, generate_uid())])
        status, _ = assoc.send_n_set(final, ModalityPerformedProcedureStep, uid)
        assert int(status.Status) == 0
        assoc.release()
        assert got_set.wait(20), "the N-SET was not relayed"
        # relayed unchanged: the same attributes, element for element
        assert stored[uid] == create and stored["set"] == final
        assert received == [("create", uid, "IN PROGRESS"), ("set", uid, "COMPLETED")]
        assert stored[uid].ScheduledStepAttributesSequence[0].AccessionNumber == "REL1"
        assert stored[uid].PerformedStationAETitle == "MOD1"
    finally:
        forward_server.shutdown()
        srv.stop()


def test_relay_waits_for_a_destination_that_is_down(tmp_path: Path) -> None:
    """Relay jobs are durable: a destination down at first gets both messages, in order, later,
    even across a kill -9 of the server."""
    port = free_port()
    srv = ServerProcess(
        tmp_path / "srv",
        f'[[mpps_forward]]\nname = "ris2"\nae_title = "RIS2"\nhost = "127.0.0.1"\nport = {port}\n',
    ).start()
    forward_server = None
    try:
        assoc = mpps_assoc(srv.port)
        uid = generate_uid()
        assert (
            int(
                assoc.send_n_create(
                    in_progress(generate_uid(), "DOWN1"), ModalityPerformedProcedureStep, uid
                )[0].Status
            )
            == 0
        )
        assert (
            int(
                assoc.send_n_set(
                    completed(generate_uid(), []), ModalityPerformedProcedureStep, uid
                )[0].Status
            )
            == 0
        )
        assoc.release()
        time.sleep(2)  # the first delivery attempt fails
        # the queued relay jobs survive a crash of the server
        srv.kill()
        srv.start()
        received: list[str] = []
        done = threading.Event()

        def on_create(event: evt.Event) -> tuple[int, Dataset]:
            received.append("create")
            return 0, event.attribute_list

        def on_set(event: evt.Event) -> tuple[int, Dataset]:
            received.append("set")
            done.set()
            return 0, event.attribute_list

        ae = AE(ae_title="RIS2")
        ae.add_supported_context(ModalityPerformedProcedureStep)
        forward_server = ae.start_server(
            ("127.0.0.1", port),
            block=False,
            evt_handlers=[(evt.EVT_N_CREATE, on_create), (evt.EVT_N_SET, on_set)],
        )
        assert done.wait(40), "not relayed after the destination came up"
        assert received == ["create", "set"]
    finally:
        if forward_server is not None:
            forward_server.shutdown()
        srv.stop()
