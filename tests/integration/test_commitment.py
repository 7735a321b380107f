"""Storage Commitment Push Model SCP (PS3.4 J, seed 002 §3.2.9) with pynetdicom as the SCU."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel
from support import (
    SC_IMAGE,
    RawScu,
    ServerProcess,
    free_port,
    index_rows,
    make_image,
    store_datasets,
)

WELL_KNOWN = "1.2.840.10008.1.20.1.1"


def _action_dataset(transaction_uid: str, refs: list[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for cls, uid in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = cls
        item.ReferencedSOPInstanceUID = uid
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def _stored(srv: ServerProcess) -> list[Dataset]:
    datasets = [make_image(seed=i) for i in range(2)]
    assert store_datasets(srv.port, datasets) == [(0, None)] * 2
    return datasets


def test_report_on_the_same_association(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "srv").start()
    try:
        stored = _stored(srv)
        reports: list[tuple[int, Dataset]] = []
        got = threading.Event()

        def on_report(event: evt.Event) -> tuple[int, None]:
            reports.append((event.event_type, event.event_information))
            got.set()
            return 0x0000, None  # pynetdicom: (status, event reply)

        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate(
            "127.0.0.1",
            srv.port,
            ae_title="OPENPACS",
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
        )
        missing = generate_uid()
        refs = [(d.SOPClassUID, d.SOPInstanceUID) for d in stored] + [
            (stored[0].SOPClassUID, missing),  # not stored → 0112
            (SC_IMAGE, stored[1].SOPInstanceUID),  # stored as CT → 0119
        ]
        transaction = generate_uid()
        status, _ = assoc.send_n_action(
            _action_dataset(transaction, refs), 1, StorageCommitmentPushModel, WELL_KNOWN
        )
        assert int(status.Status) == 0
        assert got.wait(10), "no N-EVENT-REPORT on the same association"
        time.sleep(0.3)  # pynetdicom sends its N-EVENT-REPORT-RSP after the handler returns
        assoc.release()
        event_type, info = reports[0]
        assert event_type == 2  # failures exist
        assert info.TransactionUID == transaction
        assert info.RetrieveAETitle == "OPENPACS"
        assert sorted(i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence) == sorted(
            d.SOPInstanceUID for d in stored
        )
        failed = {
            i.ReferencedSOPInstanceUID + "/" + i.ReferencedSOPClassUID: int(i.FailureReason)
            for i in info.FailedSOPSequence
        }
        assert failed == {
            f"{missing}/{stored[0].SOPClassUID}": 0x0112,
            f"{stored[1].SOPInstanceUID}/{SC_IMAGE}": 0x0119,
        }
        time.sleep(0.5)
        (job,) = index_rows(srv.data_dir, "jobs")
        assert job["state"] == "done"
    finally:
        srv.stop()


def test_report_on_a_new_association_with_role_selection(tmp_path: Path) -> None:
    scu_port = free_port()
    srv = ServerProcess(
        tmp_path / "srv",
        "[storage_commitment]\nsame_association = false\n"
        f'[[remote]]\nname = "mod"\nae_title = "MODALITY"\nhost = "127.0.0.1"\nport = {scu_port}\n',
    ).start()
    listener = None
    try:
        stored = _stored(srv)
        reports: list[tuple[int, Dataset]] = []
        got = threading.Event()

        def on_report(event: evt.Event) -> tuple[int, None]:
            reports.append((event.event_type, event.event_information))
            got.set()
            return 0x0000, None  # pynetdicom: (status, event reply)

        # the modality listens for the report, accepting the SCP role for openpacs
        ae = AE(ae_title="MODALITY")
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        listener = ae.start_server(
            ("127.0.0.1", scu_port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)]
        )
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate("127.0.0.1", srv.port, ae_title="OPENPACS")
        transaction = generate_uid()
        refs = [(d.SOPClassUID, d.SOPInstanceUID) for d in stored]
        status, _ = assoc.send_n_action(
            _action_dataset(transaction, refs), 1, StorageCommitmentPushModel, WELL_KNOWN
        )
        assoc.release()
        assert int(status.Status) == 0
        assert got.wait(15), "no N-EVENT-REPORT on a new association"
        event_type, info = reports[0]
        assert event_type == 1 and info.TransactionUID == transaction
        assert "FailedSOPSequence" not in info
        time.sleep(0.5)
        (job,) = index_rows(srv.data_dir, "jobs")
        assert job["state"] == "done"
    finally:
        if listener is not None:
            listener.shutdown()
        srv.stop()


def test_report_survives_a_restart(tmp_path: Path) -> None:
    """The requester is down when the report is due: the job waits, is retried, and is delivered
    after openpacs restarted."""
    scu_port = free_port()
    config = (
        "[storage_commitment]\nsame_association = false\n"
        f'[[remote]]\nname = "mod"\nae_title = "MODALITY"\nhost = "127.0.0.1"\nport = {scu_port}\n'
    )
    srv = ServerProcess(tmp_path / "srv", config).start()
    listener = None
    try:
        stored = _stored(srv)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate("127.0.0.1", srv.port, ae_title="OPENPACS")
        transaction = generate_uid()
        status, _ = assoc.send_n_action(
            _action_dataset(transaction, [(d.SOPClassUID, d.SOPInstanceUID) for d in stored]),
            1,
            StorageCommitmentPushModel,
            WELL_KNOWN,
        )
        assoc.release()
        assert int(status.Status) == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            jobs = index_rows(srv.data_dir, "jobs")
            if jobs and jobs[0]["attempts"] >= 1:
                break
            time.sleep(0.2)
        assert jobs[0]["state"] == "pending" and jobs[0]["last_error"]
        srv.stop()
        got = threading.Event()
        reports: list[Dataset] = []

        def on_report(event: evt.Event) -> tuple[int, None]:
            reports.append(event.event_information)
            got.set()
            return 0x0000, None

        listener_ae = AE(ae_title="MODALITY")
        listener_ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        listener = listener_ae.start_server(
            ("127.0.0.1", scu_port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)]
        )
        srv.start()
        assert got.wait(30), "the report was not delivered after the restart"
        assert reports[0].TransactionUID == transaction
    finally:
        if listener is not None:
            listener.shutdown()
        srv.stop()


def test_n_action_errors(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "srv").start()
    try:
        ae = AE(ae_title="BADSCU")
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate("127.0.0.1", srv.port, ae_title="OPENPACS")
        no_uid = Dataset()
        item = Dataset()
        item.ReferencedSOPClassUID = SC_IMAGE
        item.ReferencedSOPInstanceUID = generate_uid()
        no_uid.ReferencedSOPSequence = [item]
        status, _ = assoc.send_n_action(no_uid, 1, StorageCommitmentPushModel, WELL_KNOWN)
        assert int(status.Status) == 0x0115
        incomplete = _action_dataset(generate_uid(), [(SC_IMAGE, generate_uid())])
        del incomplete.ReferencedSOPSequence[0].ReferencedSOPClassUID
        status, _ = assoc.send_n_action(incomplete, 1, StorageCommitmentPushModel, WELL_KNOWN)
        assert int(status.Status) == 0x0115
        status, _ = assoc.send_n_action(
            _action_dataset(generate_uid(), [(SC_IMAGE, generate_uid())]),
            2,
            StorageCommitmentPushModel,
            WELL_KNOWN,
        )
        assert int(status.Status) == 0x0123
        assoc.release()
        # an empty data set (pynetdicom will not send one): seed 002 T3.56 → 0211
        import struct

        from openpacs.dimse import commands as cmd

        scu = RawScu(srv.port, [(StorageCommitmentPushModel, ["1.2.840.10008.1.2"])])
        command = cmd.encode_command(
            [
                (cmd.COMMAND_FIELD, cmd.N_ACTION_RQ),
                (cmd.MESSAGE_ID, 5),
                (cmd.REQUESTED_SOP_CLASS_UID, StorageCommitmentPushModel),
                (cmd.REQUESTED_SOP_INSTANCE_UID, WELL_KNOWN),
                (cmd.ACTION_TYPE_ID, 1),
                (cmd.COMMAND_DATA_SET_TYPE, 0x0000),
            ]
        )
        for control, data in ((0x03, command), (0x02, b"")):
            pdv = struct.pack(">IBB", len(data) + 2, 1, control) + data
            scu.sock.sendall(struct.pack(">BxI", 0x04, len(pdv)) + pdv)
        rsp = scu.read_response()
        assert rsp.Status == 0x0211 and "empty" in rsp.ErrorComment
        scu.release()
    finally:
        srv.stop()
