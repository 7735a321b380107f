"""Query/Retrieve SCP: C-FIND, C-MOVE and C-GET (seed 002 §3.2.11, PS3.4 Annex C).

Owns: the DIMSE side of Q/R — decoding identifiers, pending/final responses and their status
codes (seed 002 T3.76, PS3.4 C.4.1.1.4/C.4.2.1.5/C.4.3.1.5), C-CANCEL checks between responses
and sub-operations, the C-MOVE sub-association to the destination (resolved from [[remote]])
and the C-GET sub-operations on the requesting association (SCP/SCU role selection), sending
each instance exactly as stored when the peer accepts its transfer syntax and transcoded to
Explicit/Implicit VR Little Endian otherwise.
Must not: build SQL or match attributes (``services.query`` does).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from openpacs.config import Config
from openpacs.dicom.header import DatasetFormatError, file_meta
from openpacs.dicom.transcode import UNCOMPRESSED, TranscodeError, transcode_file
from openpacs.dicom.transfer_syntaxes import EXPLICIT_VR_BIG_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN
from openpacs.dimse import commands as cmd
from openpacs.dimse import requestor
from openpacs.dimse.association import (
    Association,
    DatasetSink,
    DatasetSource,
    MemorySink,
    Message,
    PresentationContext,
)
from openpacs.dimse.status import is_failure
from openpacs.services.archive import Archive
from openpacs.services.query import (
    MODEL_BY_SOP_CLASS,
    Model,
    QueryRefused,
    QueryService,
    RetrieveItem,
    read_identifier,
)

log = logging.getLogger(__name__)

PENDING = 0xFF00
PENDING_WARNING = 0xFF01  # matches continue; some optional keys were not supported
CANCELLED = 0xFE00
SUCCESS = 0x0000
UNABLE_TO_PROCESS = 0xC001  # seed 002 T3.76: the move destination refused the association
MOVE_DESTINATION_UNKNOWN = 0xA801
SUBOPS_FAILED = 0xA702
SUBOPS_WARNING = 0xB000
UNABLE_TO_GENERATE = 0xC000  # seed 002 T3.76: objects failed to be generated
NOT_GENERATED = -1  # sub-operation outcome: the stored object could not be read/transcoded
FAILED_SOP_INSTANCE_UID_LIST = 0x00080058
PENDING_INTERVAL = 1.0  # seconds between C-MOVE/C-GET pending responses


def encode_identifier(ds: Dataset, transfer_syntax: str) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian = transfer_syntax != EXPLICIT_VR_BIG_ENDIAN
    buf.is_implicit_VR = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    write_dataset(buf, ds)
    return buf.getvalue()


class _QueryRetrieveService:
    """What FIND, MOVE and GET share: the identifier as the data set, model from the context."""

    query: QueryService

    def open_dataset(
        self, assoc: Association, context: PresentationContext, command: cmd.Command
    ) -> DatasetSink:
        return MemorySink(limit=1 << 20)

    def _request(self, assoc: Association, message: Message) -> tuple[Model, Dataset] | None:
        """The information model and decoded identifier; None when a failure was answered."""
        model = MODEL_BY_SOP_CLASS.get(message.context.abstract_syntax)
        if model is None:
            assoc.send_response(message, 0x0211, "Not a Query/Retrieve SOP Class")
            return None
        sink = message.dataset
        data = bytes(sink.data) if isinstance(sink, MemorySink) else b""
        try:
            return model, read_identifier(data, message.context.transfer_syntax)
        except QueryRefused as exc:
            assoc.send_response(message, exc.status, exc.comment)
            return None


class FindService(_QueryRetrieveService):
    def __init__(self, query: QueryService) -> None:
        self.query = query

    def handle(self, assoc: Association, message: Message) -> None:
        request = self._request(assoc, message)
        if request is None:
            return
        model, identifier = request
        implicit = message.context.transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
        message_id = message.command.message_id or 0
        count = 0
        started = time.monotonic()
        try:
            find = self.query.prepare(model, identifier)
            pending = PENDING_WARNING if find.unsupported else PENDING
            for match in self.query.find(find):
                if assoc.cancelled(message_id):
                    assoc.send_response(message, CANCELLED, "Cancelled by C-CANCEL")
                    log.info("C-FIND from %s cancelled after %d matches", assoc.calling_ae, count)
                    return
                assoc.send_response(message, pending, dataset=match.encode(implicit))
                count += 1
        except QueryRefused as exc:
            log.warning(
                "C-FIND from %s refused: 0x%04X %s", assoc.calling_ae, exc.status, exc.comment
            )
            assoc.send_response(message, exc.status, exc.comment)
            return
        except Exception:
            log.exception("C-FIND from %s failed", assoc.calling_ae)
            assoc.send_response(message, 0xC000, "Unable to process the query")
            return
        assoc.send_response(message, SUCCESS)
        log.info(
            "C-FIND %s level from %s: %d matches in %.3f s",
            find.level.name,
            assoc.calling_ae,
            count,
            time.monotonic() - started,
        )


class _Counts:
    def __init__(self, total: int) -> None:
        self.remaining = total
        self.completed = 0
        self.failed = 0
        self.warning = 0
        self.failed_uids: list[str] = []
        self.not_generated = 0
        self._last_pending = 0.0

    def fields(self, final: bool = False) -> list[tuple[int, int]]:
        out = [
            (cmd.NUMBER_OF_COMPLETED_SUBOPERATIONS, self.completed),
            (cmd.NUMBER_OF_FAILED_SUBOPERATIONS, self.failed),
            (cmd.NUMBER_OF_WARNING_SUBOPERATIONS, self.warning),
        ]
        if not final:
            out.append((cmd.NUMBER_OF_REMAINING_SUBOPERATIONS, self.remaining))
        return out

    def record(self, uid: str, status: int | None) -> None:
        self.remaining -= 1
        if status == NOT_GENERATED:
            self.not_generated += 1
        if status is None or status == NOT_GENERATED or is_failure(status):
            self.failed += 1
            self.failed_uids.append(uid)
        elif status == 0:
            self.completed += 1
        else:
            self.warning += 1

    def pending_due(self) -> bool:
        now = time.monotonic()
        if now - self._last_pending >= PENDING_INTERVAL and self.remaining > 0:
            self._last_pending = now
            return True
        return False


def _final(assoc: Association, message: Message, counts: _Counts, ts: str, what: str) -> None:
    """PS3.4 C.4.2.1.5 / seed 002 T3.76: 0000 all done, B000 some failed, A702 all failed, C000
    none could be generated; the Failed SOP Instance UID List when anything failed."""
    dataset = None
    if counts.failed:
        ds = Dataset()
        ds.FailedSOPInstanceUIDList = counts.failed_uids
        dataset = encode_identifier(ds, ts)
    if counts.failed and counts.failed == counts.not_generated and not counts.completed:
        # seed 002 T3.76: C000, the objects could not be generated (read/transcoded)
        status, comment = UNABLE_TO_GENERATE, "The stored objects could not be read or converted"
    elif counts.failed and not counts.completed and not counts.warning:
        status, comment = SUBOPS_FAILED, f"All {counts.failed} {what} sub-operations failed"
    elif counts.failed or counts.warning:
        status, comment = SUBOPS_WARNING, f"{counts.failed} of the {what} sub-operations failed"
    else:
        status, comment = SUCCESS, None
    assoc.send_response(message, status, comment, counts.fields(final=True), dataset)


def _stored_dataset(archive: Archive, item: RetrieveItem) -> DatasetSource:
    path = archive.blobs.path(item.blob_key)
    if path.stat().st_size != item.size:
        raise OSError(f"blob {item.blob_key} is not the size the index recorded")
    offset = item.dataset_offset
    if offset is None:  # not recorded: read the File Meta Information
        with open(path, "rb") as fh:
            offset = file_meta(fh.read(1 << 16)).dataset_offset
    return DatasetSource(path, offset, item.size - offset)


def _pick_context(
    contexts: list[PresentationContext], item: RetrieveItem
) -> tuple[PresentationContext | None, bool]:
    """A context for the instance's SOP Class: the stored transfer syntax if accepted (sent as
    is), else an uncompressed one (transcoded). (context, needs transcoding)."""
    usable = [c for c in contexts if c.abstract_syntax == item.sop_class_uid]
    for c in usable:
        if c.transfer_syntax == item.transfer_syntax:
            return c, False
    for ts in UNCOMPRESSED:
        for c in usable:
            if c.transfer_syntax == ts:
                return c, True
    return None, False


def _send_store(
    target: Association,
    archive: Archive,
    item: RetrieveItem,
    extra: list[tuple[int, object]],
    cancel_of: int | None,
) -> int | None:
    """One C-STORE sub-operation on *target*; the response status, None when no context fits,
    NOT_GENERATED when the stored instance could not be read or transcoded."""
    context, transcode = _pick_context([c for c in target.contexts.values() if c.as_scu], item)
    if context is None:
        log.warning("no accepted context for %s (%s)", item.sop_uid, item.sop_class_uid)
        return None
    try:
        if transcode:
            data: bytes | DatasetSource = transcode_file(
                archive.blobs.path(item.blob_key), context.transfer_syntax
            )
        else:
            data = _stored_dataset(archive, item)
    except (OSError, DatasetFormatError, TranscodeError) as exc:
        log.error("cannot send %s: %s", item.sop_uid, exc)
        return NOT_GENERATED
    fields = [
        (cmd.COMMAND_FIELD, cmd.C_STORE_RQ),
        (cmd.AFFECTED_SOP_CLASS_UID, item.sop_class_uid),
        (cmd.AFFECTED_SOP_INSTANCE_UID, item.sop_uid),
        (cmd.PRIORITY, 0),
        *extra,
    ]
    response = target.request(context.id, fields, data, cancel_of=cancel_of)
    return int(response.command.get(cmd.STATUS, 0xC000))


class MoveService(_QueryRetrieveService):
    def __init__(self, config: Config, archive: Archive, query: QueryService) -> None:
        self.config = config
        self.archive = archive
        self.query = query

    def handle(self, assoc: Association, message: Message) -> None:
        request = self._request(assoc, message)
        if request is None:
            return
        model, identifier = request
        ts = message.context.transfer_syntax
        destination = str(message.command.get(cmd.MOVE_DESTINATION) or "").strip()
        remote = self.config.remote_by_ae(destination)
        if remote is None:
            log.warning(
                "C-MOVE from %s to unknown destination %r refused", assoc.calling_ae, destination
            )
            assoc.send_response(
                message,
                MOVE_DESTINATION_UNKNOWN,
                f"Move destination {destination!r} unknown ([[remote]])",
            )
            return
        try:
            items = self.query.retrieve_items(model, identifier)
        except QueryRefused as exc:
            assoc.send_response(message, exc.status, exc.comment)
            return
        counts = _Counts(len(items))
        if not items:
            assoc.send_response(message, SUCCESS, None, counts.fields(final=True))
            return
        # per SOP Class: the stored transfer syntax alone (sent as is when accepted), and the
        # uncompressed ones as a fallback (transcoded)
        contexts: list[tuple[str, list[str]]] = []
        seen: set[tuple[str, str]] = set()
        for item in items:
            for key, syntaxes in (
                ((item.sop_class_uid, item.transfer_syntax), [item.transfer_syntax]),
                ((item.sop_class_uid, "fallback"), list(UNCOMPRESSED)),
            ):
                if key not in seen:
                    seen.add(key)
                    contexts.append((item.sop_class_uid, syntaxes))
        try:
            target = requestor.associate(
                self.config.dicom,
                host=remote.host,
                port=remote.port,
                called_ae=remote.ae_title,
                contexts=contexts[:128],
            )
        except requestor.AssociationFailed as exc:
            log.warning("C-MOVE from %s: %s", assoc.calling_ae, exc)
            assoc.send_response(
                message,
                UNABLE_TO_PROCESS,
                (
                    "Move destination refused the association"
                    if exc.rejected
                    else "Move destination unreachable"
                ),
                counts.fields(final=True),
            )
            return
        message_id = message.command.message_id or 0
        extra = [
            (cmd.MOVE_ORIGINATOR_AE_TITLE, assoc.calling_ae),
            (cmd.MOVE_ORIGINATOR_MESSAGE_ID, message_id),
        ]
        cancelled = self._run(
            assoc,
            message,
            items,
            counts,
            ts,
            lambda item: _send_store(target, self.archive, item, extra, None),
        )
        requestor.release(target)
        log.info(
            "C-MOVE from %s to %s: %d completed, %d failed, %d warnings%s",
            assoc.calling_ae,
            destination,
            counts.completed,
            counts.failed,
            counts.warning,
            " (cancelled)" if cancelled else "",
        )
        if not cancelled:
            _final(assoc, message, counts, ts, "C-MOVE")

    def _run(
        self,
        assoc: Association,
        message: Message,
        items: list[RetrieveItem],
        counts: _Counts,
        ts: str,
        send: Callable[[RetrieveItem], int | None],
    ) -> bool:
        """Run the sub-operations with pending responses; True if a C-CANCEL stopped them."""
        message_id = message.command.message_id or 0
        for item in items:
            if assoc.cancelled(message_id):
                assoc.send_response(message, CANCELLED, "Cancelled by C-CANCEL", counts.fields())
                return True
            if counts.pending_due():
                assoc.send_response(message, PENDING, None, counts.fields())
            try:
                status = send(item)
            except (OSError, ConnectionError, TimeoutError) as exc:
                log.warning("sub-operation for %s failed: %s", item.sop_uid, exc)
                status = None
            counts.record(item.sop_uid, status)
        return False


class GetService(MoveService):
    """C-GET: the same instance selection; C-STORE sub-operations on the requesting association
    over the contexts where the requestor took the SCP role (PS3.4 C.4.3)."""

    def handle(self, assoc: Association, message: Message) -> None:
        request = self._request(assoc, message)
        if request is None:
            return
        model, identifier = request
        ts = message.context.transfer_syntax
        try:
            items = self.query.retrieve_items(model, identifier)
        except QueryRefused as exc:
            assoc.send_response(message, exc.status, exc.comment)
            return
        counts = _Counts(len(items))
        message_id = message.command.message_id or 0
        cancelled = self._run(
            assoc,
            message,
            items,
            counts,
            ts,
            lambda item: _send_store(assoc, self.archive, item, [], message_id),
        )
        log.info(
            "C-GET from %s: %d completed, %d failed, %d warnings%s",
            assoc.calling_ae,
            counts.completed,
            counts.failed,
            counts.warning,
            " (cancelled)" if cancelled else "",
        )
        if not cancelled:
            _final(assoc, message, counts, ts, "C-GET")
