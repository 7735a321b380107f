"""Storage Commitment Push Model SCP: N-ACTION in, N-EVENT-REPORT out (PS3.4 J.3, seed 002 §3.2.9).

Owns: checking the N-ACTION request (seed 002 T3.56: 0110 the data set cannot be read, 0115 no
Transaction UID or unreadable references, 0211 empty data set; PS3.7: 0123 no such action,
0117 wrong SOP Instance), answering only after the commitment result is kept as a durable job,
then reporting on the same association when it is still open (seed 002's default; configurable),
and — from the job runner — on a new association to the requester found in [[remote]], with the
SCP role proposed by role selection (PS3.4 J.3.3).
Must not: decide what is committed (``services.commitment`` does).
"""

from __future__ import annotations

import io
import logging

from pydicom.filereader import read_dataset

from openpacs.config import Config
from openpacs.dicom.sopclasses import STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_PUSH_INSTANCE
from openpacs.dicom.transfer_syntaxes import (
    COMMAND_TRANSFER_SYNTAXES,
    EXPLICIT_VR_BIG_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)
from openpacs.dimse import commands as cmd
from openpacs.dimse import requestor
from openpacs.dimse.association import (
    Association,
    DatasetSink,
    MemorySink,
    Message,
    PresentationContext,
)
from openpacs.dimse.qr_scp import encode_identifier
from openpacs.dimse.status import is_failure
from openpacs.services.commitment import CommitmentResult, CommitmentService, Reference
from openpacs.services.jobs import Job, JobGaveUp, JobQueue

log = logging.getLogger(__name__)

REQUEST_COMMIT = 1  # Action Type ID (PS3.4 J.3.2.1.1)
SAME_ASSOCIATION_GRACE = 60.0  # seconds the job waits while we report on the same association


class CommitmentScp:
    def __init__(self, config: Config, service: CommitmentService, jobs: JobQueue) -> None:
        self.config = config
        self.service = service
        self.jobs = jobs

    def open_dataset(
        self, assoc: Association, context: PresentationContext, command: cmd.Command
    ) -> DatasetSink:
        return MemorySink(limit=64 << 20)

    def handle(self, assoc: Association, message: Message) -> None:
        command = message.command
        action = command.get(cmd.ACTION_TYPE_ID)
        extra = [(cmd.ACTION_TYPE_ID, action)] if action is not None else []
        if message.context.abstract_syntax != STORAGE_COMMITMENT_PUSH:
            assoc.send_response(message, 0x0211, "N-ACTION is only for Storage Commitment")
            return
        if command.get(cmd.REQUESTED_SOP_INSTANCE_UID) != STORAGE_COMMITMENT_PUSH_INSTANCE:
            assoc.send_response(
                message, 0x0117, "Requested SOP Instance must be 1.2.840.10008.1.20.1.1"
            )
            return
        if action != REQUEST_COMMIT:
            assoc.send_response(message, 0x0123, f"No such action type {action}")
            return
        sink = message.dataset
        data = bytes(sink.data) if isinstance(sink, MemorySink) else b""
        if not data:
            assoc.send_response(message, 0x0211, "The N-ACTION data set is empty")  # seed 002 T3.56
            return
        ts = message.context.transfer_syntax
        try:
            ds = read_dataset(
                io.BytesIO(data), ts == IMPLICIT_VR_LITTLE_ENDIAN, ts != EXPLICIT_VR_BIG_ENDIAN
            )
            transaction_uid = str(ds.get("TransactionUID", "") or "").strip()
            items = ds.get("ReferencedSOPSequence")
        except Exception as exc:
            log.warning("N-ACTION from %s: unreadable data set: %s", assoc.calling_ae, exc)
            assoc.send_response(message, 0x0110, "Cannot read the N-ACTION data set", extra)
            return
        if not transaction_uid:
            assoc.send_response(message, 0x0115, "No Transaction UID (0008,1195)", extra)
            return
        references: list[Reference] = []
        for item in items or []:
            sop_class = str(item.get("ReferencedSOPClassUID", "") or "").strip()
            sop_uid = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
            if not sop_class or not sop_uid:
                assoc.send_response(
                    message, 0x0115, "A reference lacks its SOP Class/Instance UID", extra
                )
                return
            references.append(Reference(sop_class, sop_uid))
        if not references:
            assoc.send_response(
                message, 0x0115, "Referenced SOP Sequence (0008,1199) is empty", extra
            )
            return
        result = self.service.evaluate(transaction_uid, assoc.calling_ae, references)
        same = self.config.storage_commitment.same_association
        try:
            # When we report on this association, the job waits so that the runner does not
            # deliver the same report at the same time; it becomes due at once if we cannot.
            job = self.service.keep(result, delay=SAME_ASSOCIATION_GRACE if same else 0.0)
        except Exception:
            log.exception("could not keep the commitment result of %s", transaction_uid)
            assoc.send_response(message, 0x0110, "Out of resources: cannot keep the request", extra)
            return
        assoc.send_response(message, 0x0000, None, extra)
        log.info(
            "storage commitment %s from %s: %d committed, %d failed",
            transaction_uid,
            assoc.calling_ae,
            len(result.committed),
            len(result.failed),
        )
        if same:
            self._report_here(assoc, message.context, result, job)

    def _report_here(
        self, assoc: Association, context: PresentationContext, result: CommitmentResult, job: int
    ) -> None:
        """Report on the requesting association while it is open (seed 002 §3.2.9.4)."""
        fields = _event_fields(result)
        dataset = result.event_dataset(self.config.dicom.ae_title)
        delivered = False
        try:
            response = assoc.request(
                context.id, fields, encode_identifier(dataset, context.transfer_syntax)
            )
            status = int(response.command.get(cmd.STATUS, 0xC000))
            if is_failure(status):
                log.warning(
                    "commitment %s: the requester answered the report with 0x%04X",
                    result.transaction_uid,
                    status,
                )
            else:
                delivered = True
        finally:
            # (also when the requester released or the connection broke while we waited)
            if delivered:
                self.jobs.finish(job)
            else:
                log.info(
                    "commitment %s: not reported on the same association; the job "
                    "will open a new one",
                    result.transaction_uid,
                )
                self.jobs.make_due(job)


def _event_fields(result: CommitmentResult) -> list[tuple[int, object]]:
    return [
        (cmd.COMMAND_FIELD, cmd.N_EVENT_REPORT_RQ),
        (cmd.AFFECTED_SOP_CLASS_UID, STORAGE_COMMITMENT_PUSH),
        (cmd.AFFECTED_SOP_INSTANCE_UID, STORAGE_COMMITMENT_PUSH_INSTANCE),
        (cmd.EVENT_TYPE_ID, result.event_type),
    ]


def deliver_report(config: Config, job: Job) -> None:
    """Job handler: the report on a new association, openpacs proposing the SCP role."""
    result = CommitmentResult.from_payload(job.payload)
    remote = config.remote_by_ae(result.requester)
    if remote is None:
        raise JobGaveUp(
            f"the requester {result.requester!r} is not in [[remote]]: no address to report to"
        )
    try:
        assoc = requestor.associate(
            config.dicom,
            host=remote.host,
            port=remote.port,
            called_ae=remote.ae_title,
            contexts=[(STORAGE_COMMITMENT_PUSH, list(COMMAND_TRANSFER_SYNTAXES))],
            roles={STORAGE_COMMITMENT_PUSH: (False, True)},
        )
    except requestor.AssociationFailed as exc:
        raise ConnectionError(str(exc)) from exc
    try:
        context = next(
            (c for c in assoc.contexts.values() if c.abstract_syntax == STORAGE_COMMITMENT_PUSH),
            None,
        )
        if context is None:
            raise ConnectionError(f"{remote.ae_title} accepted no Storage Commitment context")
        data = encode_identifier(
            result.event_dataset(config.dicom.ae_title), context.transfer_syntax
        )
        response = assoc.request(context.id, _event_fields(result), data)
        status = int(response.command.get(cmd.STATUS, 0xC000))
        if is_failure(status):
            raise ConnectionError(f"{remote.ae_title} answered the report with 0x{status:04X}")
    finally:
        requestor.release(assoc)
    log.info(
        "commitment %s reported to %s on a new association", result.transaction_uid, remote.ae_title
    )
