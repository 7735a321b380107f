"""The virtual modality's config and its commitment-report rules (seed 004 T3-31/T3-32)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from pydicom import Dataset

from openpacs.config import ConfigError
from openpacs.modality.config import ModalityConfig, parse_modality_config
from openpacs.modality.scu import Commitment, _Registry


def test_config_defaults_and_peers() -> None:
    config = parse_modality_config(
        {
            "modality": {"ae_title": "MOD1", "port": 11113, "modality": "cr"},
            "worklist": {"ae_title": "RIS", "host": "10.0.0.5", "port": 104},
            "store": [{"ae_title": "PACS", "host": "pacs.local", "port": 11112, "commit": True}],
            "printer": [{"ae_title": "PRT", "host": "127.0.0.1", "port": 10400}],
        }
    )
    assert config.modality == "CR" and config.commitment_timeout == 120.0  # seed 004 T3-66
    assert config.worklist is not None and config.worklist.ae_title == "RIS"
    assert config.mpps is None
    assert config.store[0].commit is True and config.printer[0].port == 10400
    assert ModalityConfig().ae_title == "MOD1"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"modality": {"modality": "CT"}}, "modality.modality"),
        ({"modality": {"colour": 1}}, "modality.colour: unknown key"),
        ({"worklist": {"ae_title": "RIS", "host": "h"}}, "worklist.port: missing"),
        (
            {"store": [{"ae_title": "A", "host": "h", "port": 1, "commit": "yes"}]},
            "store[0].commit",
        ),
        ({"mpps": {"ae_title": "X" * 17, "host": "h", "port": 1}}, "mpps.ae_title"),
        ({"modality": {"commitment_timeout": -1}}, "modality.commitment_timeout"),
        ({"modality": {"character_set": "ISO_IR 6"}}, "modality.character_set"),
        ({"stores": []}, "config.stores: unknown key"),
    ],
)
def test_config_errors_name_the_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_modality_config(raw)


@dataclass
class Event:
    event_type: int
    event_information: Dataset


def report_info(transaction: str, committed: list[str], failed: list[str] = ()) -> Dataset:
    info = Dataset()
    info.TransactionUID = transaction
    info.ReferencedSOPSequence = []
    for uid in committed:
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        item.ReferencedSOPInstanceUID = uid
        info.ReferencedSOPSequence.append(item)
    if failed:
        info.FailedSOPSequence = []
        for uid in failed:
            item = Dataset()
            item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
            item.ReferencedSOPInstanceUID = uid
            item.FailureReason = 0x0110
            info.FailedSOPSequence.append(item)
    return info


def test_report_statuses_of_table_3_32() -> None:
    registry = _Registry()
    commitment = Commitment("1.2.3", "PACS@h:1", ("1.1", "1.2"))
    registry.expect(commitment)

    status, _ = registry.report(Event(1, report_info("9.9.9", ["1.1"])), "test")
    assert status.Status == 0x0211  # never requested
    status, _ = registry.report(Event(3, report_info("1.2.3", ["1.1"])), "test")
    assert status.Status == 0x0113  # no such event type
    status, reply = registry.report(Event(1, report_info("1.2.3", ["1.1", "7.7"])), "test")
    assert status.Status == 0x0115  # an instance that was not in the request
    assert [i.ReferencedSOPInstanceUID for i in reply.ReferencedSOPSequence] == ["7.7"]
    assert not commitment.done.is_set()

    status, _ = registry.report(Event(2, report_info("1.2.3", ["1.1"], ["1.2"])), "test")
    assert status.Status == 0x0000
    assert commitment.done.is_set() and commitment.event_type == 2
    step = commitment.step(10)
    assert not step.ok and step.data["failed"][0]["reason"] == "0x0110"

    status, _ = registry.report(Event(1, report_info("1.2.3", ["1.1"])), "test")
    assert status.Status == 0x0213  # the transaction is over (expired)

    late = Commitment("4.5.6", "PACS@h:1", ("2.1",))
    registry.expect(late)
    late.forget()  # the wait ended without a report
    status, _ = registry.report(Event(1, report_info("4.5.6", ["2.1"])), "test")
    assert status.Status == 0x0213
    assert late.step(5).meaning == "no report"


def test_association_failures_are_classified() -> None:
    """One classifier for the modality's steps and its print job: nobody listening, a peer that
    accepts the connection but never answers (ACSE timeout), and an A-ASSOCIATE-RJ."""
    import socket

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from openpacs.modality.scu import associate

    ae = AE(ae_title="MOD1")
    ae.acse_timeout = ae.connection_timeout = 0.5
    ae.add_requested_context(Verification)

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    assoc, failure = associate(ae, "127.0.0.1", port, "ANY")
    assert assoc is None and failure is not None and failure.kind == "unreachable"

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        assoc, failure = associate(ae, "127.0.0.1", silent.getsockname()[1], "ANY")
        assert assoc is None and failure is not None and failure.kind == "no-answer"
    finally:
        silent.close()

    scp = AE(ae_title="SCP")
    scp.add_supported_context(Verification)
    scp.require_called_aet = True  # an unknown called AE title: A-ASSOCIATE-RJ
    server = scp.start_server(("127.0.0.1", 0), block=False)
    try:
        assoc, failure = associate(ae, "127.0.0.1", server.server_address[1], "WRONG")
        assert assoc is None and failure is not None and failure.kind == "rejected"
        assert "A-ASSOCIATE-RJ result" in failure.detail
        assoc, failure = associate(ae, "127.0.0.1", server.server_address[1], "SCP")
        assert failure is None and assoc is not None and assoc.is_established
        assoc.release()
    finally:
        server.shutdown()
