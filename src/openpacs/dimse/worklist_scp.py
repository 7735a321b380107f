"""Modality Worklist SCP and MPPS SCP, plus the MPPS relay (seed 001 §3–5, seed 000).

Owns: the DIMSE side of the RIS services — MWL C-FIND (pending FF00, or FF01 when the request
has matching keys we do not support, seed 001 §3.3.2.3; success with no pending when nothing
matches; the hit limit as an explicit failure; C-CANCEL), the Specific Character Set of the
answers (`[worklist] character_set` when every value fits, else ISO_IR 192), N-CREATE/N-SET
of MPPS with the statuses decided by ``services.mpps`` (0120 comes with the Attribute
Identifier List of what is missing), and relaying each N-CREATE/N-SET unchanged to the
`[[mpps_forward]]` destinations from durable jobs, in order per MPPS.
Must not: decide matching or MPPS rules.
"""

from __future__ import annotations

import base64
import logging

from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from openpacs.config import Config
from openpacs.dicom.identifier import Element, elements_dataset, encode_elements
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
from openpacs.dimse.status import is_failure
from openpacs.services.jobs import Job, JobDeferred, JobGaveUp, JobQueue
from openpacs.services.mpps import MPPS_SOP_CLASS, MppsRefused, MppsService, decode
from openpacs.services.query import QueryRefused, read_identifier
from openpacs.services.worklist import WorklistService

log = logging.getLogger(__name__)

MWL_FIND = "1.2.840.10008.5.1.4.31"


CODECS = {"ISO_IR 100": "latin-1", "ISO_IR 6": "ascii", "ISO_IR 192": "utf-8"}
SPECIFIC_CHARACTER_SET = 0x00080005


def _with_charset(elements: list[Element], charset: str) -> list[Element]:
    if charset == "ISO_IR 6":
        return elements  # the default repertoire: no Specific Character Set
    at = next((n for n, e in enumerate(elements) if e[0] > SPECIFIC_CHARACTER_SET), len(elements))
    return [*elements[:at], (SPECIFIC_CHARACTER_SET, "CS", charset), *elements[at:]]


def encode_answer(elements: list[Element], transfer_syntax: str, charset: str) -> bytes:
    """The answer in the configured character set when it can hold every value, else in
    ISO_IR 192 (UTF-8) — never with substituted characters."""
    if transfer_syntax == EXPLICIT_VR_BIG_ENDIAN:  # retired; pydicom writes it
        try:
            _check_fits(elements, CODECS[charset])
        except UnicodeEncodeError:
            charset = "ISO_IR 192"
        return _write(elements_dataset(_with_charset(elements, charset)), transfer_syntax)
    implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    try:
        return encode_elements(_with_charset(elements, charset), implicit, CODECS[charset])
    except UnicodeEncodeError:
        return encode_elements(_with_charset(elements, "ISO_IR 192"), implicit, "utf-8")


def _check_fits(elements: list[Element], codec: str) -> None:
    """UnicodeEncodeError when a text value does not fit *codec*."""
    for _, vr, value in elements:
        if vr == "SQ":
            for item in value or ():
                _check_fits(item, codec)
        elif isinstance(value, str):
            value.encode(codec)


def _write(ds: Dataset, transfer_syntax: str) -> bytes:
    """pydicom's encoding of *ds*, text in the data set's own character set."""
    buf = DicomBytesIO()
    buf.is_little_endian = transfer_syntax != EXPLICIT_VR_BIG_ENDIAN
    buf.is_implicit_VR = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    write_dataset(buf, ds)
    return buf.getvalue()


def _payload(message: Message) -> bytes:
    sink = message.dataset
    return bytes(sink.data) if isinstance(sink, MemorySink) else b""


class WorklistScp:
    def __init__(self, config: Config, worklist: WorklistService) -> None:
        self.config = config
        self.worklist = worklist

    def open_dataset(
        self, assoc: Association, context: PresentationContext, command: cmd.Command
    ) -> DatasetSink:
        return MemorySink(limit=1 << 20)

    def handle(self, assoc: Association, message: Message) -> None:
        ts = message.context.transfer_syntax
        message_id = message.command.message_id or 0
        try:
            request = read_identifier(_payload(message), ts)
            query = self.worklist.prepare(request)
            pending = 0xFF01 if query.unsupported else 0xFF00
            count = 0
            for answer in self.worklist.find(query):
                if assoc.cancelled(message_id):
                    assoc.send_response(message, 0xFE00, "Cancelled by C-CANCEL")
                    return
                data = encode_answer(answer, ts, self.config.worklist.character_set)
                assoc.send_response(message, pending, dataset=data)
                count += 1
        except QueryRefused as exc:
            log.warning(
                "worklist query from %s (%s) refused: 0x%04X %s",
                assoc.calling_ae,
                assoc.peer,
                exc.status,
                exc.comment,
            )
            assoc.send_response(message, exc.status, exc.comment)
            return
        except Exception:
            log.exception("worklist query from %s failed", assoc.calling_ae)
            assoc.send_response(message, 0xC000, "Unable to process the worklist query")
            return
        assoc.send_response(message, 0x0000)
        log.info(
            "worklist query from %s: %d items%s",
            assoc.calling_ae,
            count,
            (
                " (not matched on: "
                + ", ".join(f"({t >> 16:04X},{t & 0xFFFF:04X})" for t in query.unsupported)
                + ")"
            )
            if query.unsupported
            else "",
        )


class MppsScp:
    def __init__(self, mpps: MppsService) -> None:
        self.mpps = mpps

    def open_dataset(
        self, assoc: Association, context: PresentationContext, command: cmd.Command
    ) -> DatasetSink:
        return MemorySink(limit=16 << 20)

    def handle(self, assoc: Association, message: Message) -> None:
        command = message.command
        if message.context.abstract_syntax != MPPS_SOP_CLASS:
            assoc.send_response(message, 0x0211, "Not the MPPS SOP Class")
            return
        ts = message.context.transfer_syntax
        raw = _payload(message)
        try:
            ds = decode(raw, ts == IMPLICIT_VR_LITTLE_ENDIAN) if raw else Dataset()
        except Exception as exc:
            log.warning(
                "MPPS from %s (%s): unreadable data set: %s", assoc.calling_ae, assoc.peer, exc
            )
            assoc.send_response(message, 0x0110, "Cannot read the data set")
            return
        try:
            if command.field == cmd.N_CREATE_RQ:
                outcome = self.mpps.create(
                    command.get(cmd.AFFECTED_SOP_INSTANCE_UID), ds, raw, ts, assoc.calling_ae
                )
                extra = [(cmd.AFFECTED_SOP_INSTANCE_UID, outcome.sop_uid)]
            else:
                uid = command.get(cmd.REQUESTED_SOP_INSTANCE_UID) or ""
                outcome = self.mpps.set(uid, ds, raw, ts, assoc.calling_ae)
                extra = []
        except MppsRefused as exc:
            log.warning(
                "MPPS %s from %s (%s) refused: 0x%04X %s",
                command.name,
                assoc.calling_ae,
                assoc.peer,
                exc.status,
                exc.comment,
            )
            fields = [(cmd.ATTRIBUTE_IDENTIFIER_LIST, exc.tags)] if exc.tags else []
            assoc.send_response(message, exc.status, exc.comment, fields)
            return
        except Exception:
            log.exception("MPPS %s from %s failed", command.name, assoc.calling_ae)
            assoc.send_response(message, 0x0110, "Processing failure")
            return
        assoc.send_response(message, 0x0000, None, extra)
        log.info(
            "MPPS %s %s from %s: %s%s",
            command.name,
            outcome.sop_uid,
            assoc.calling_ae,
            outcome.status,
            "" if outcome.scheduled else " (unscheduled)",
        )


def forward(config: Config, jobs: JobQueue, job: Job) -> None:
    """Job handler: relay one N-CREATE/N-SET unchanged to an [[mpps_forward]] destination."""
    if jobs.earlier_pending(job):
        raise JobDeferred
    payload = job.payload
    dest = next((d for d in config.mpps_forward if d.name == job.target), None)
    if dest is None:
        raise JobGaveUp(f"[[mpps_forward]] {job.target!r} is no longer configured")
    ts = str(payload["transfer_syntax"])
    raw = base64.b64decode(str(payload["dataset"]))
    syntaxes = [ts] + [t for t in COMMAND_TRANSFER_SYNTAXES if t != ts]
    try:
        assoc = requestor.associate(
            config.dicom,
            host=dest.host,
            port=dest.port,
            called_ae=dest.ae_title,
            contexts=[(MPPS_SOP_CLASS, [t]) for t in syntaxes],
        )
    except requestor.AssociationFailed as exc:
        raise ConnectionError(str(exc)) from exc
    try:
        context = next((c for c in assoc.contexts.values() if c.transfer_syntax == ts), None)
        data = raw
        if context is None:
            context = next(iter(assoc.contexts.values()), None)
            if context is None:
                raise ConnectionError(f"{dest.ae_title} accepted no MPPS context")
            # the destination takes none of our syntax: the same data set, transcoded
            data = _write(decode(raw, ts == IMPLICIT_VR_LITTLE_ENDIAN), context.transfer_syntax)
        uid = str(payload["sop_uid"])
        if payload["operation"] == "create":
            fields = [
                (cmd.COMMAND_FIELD, cmd.N_CREATE_RQ),
                (cmd.AFFECTED_SOP_CLASS_UID, MPPS_SOP_CLASS),
                (cmd.AFFECTED_SOP_INSTANCE_UID, uid),
            ]
        else:
            fields = [
                (cmd.COMMAND_FIELD, cmd.N_SET_RQ),
                (cmd.REQUESTED_SOP_CLASS_UID, MPPS_SOP_CLASS),
                (cmd.REQUESTED_SOP_INSTANCE_UID, uid),
            ]
        response = assoc.request(context.id, fields, data)
        status = int(response.command.get(cmd.STATUS, 0xC000))
        if is_failure(status):
            raise JobGaveUp(
                f"{dest.ae_title} refused the relayed {payload['operation']}: 0x{status:04X}"
            )
    finally:
        requestor.release(assoc)
    log.info("MPPS %s %s relayed to %s", payload["operation"], uid, dest.ae_title)
