"""One accepted DICOM association: negotiation, the message loop, and sending responses.

Owns: the acceptor side of the PS3.8 state machine for one TCP connection — ARTIM while waiting
for A-ASSOCIATE-RQ, the acceptance policy (seed 002 §3.2.9.4: called AE title, known calling AE,
association limit), presentation context and role negotiation (pynetdicom's
``negotiate_as_acceptor``), reassembly of DIMSE messages from P-DATA fragments with data sets
streamed into a sink chosen by the service, release and abort, and the network timeout.
Must not: interpret data sets or know what a service does; services are looked up by command
field in the :class:`~openpacs.dimse.server.DimseApplication`.

The upper layer is written here rather than driven through pynetdicom's ``AE``: pynetdicom's
reactor polls queues between a socket thread and an association thread and re-encodes every
command set through pydicom, which capped a C-STORE SCP at ~190 small instances/s here against
Orthanc's ~600. PDU item codecs and the negotiation algorithm are pynetdicom's; conformance of
this loop is proven by the DCMTK and pynetdicom interoperability tests.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC as AssociateAcPdu
from pynetdicom.pdu import A_ASSOCIATE_RQ as AssociateRqPdu
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import negotiate_as_acceptor

from openpacs.dimse import commands as cmd
from openpacs.dimse import pdu
from openpacs.dimse.status import Status

if TYPE_CHECKING:
    from openpacs.dimse.server import DimseApplication

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # PS3.7 A.2.1 DICOM Application Context Name
CHUNK = 1 << 20  # largest piece of a data set handed to a sink at once


@dataclass(frozen=True)
class PresentationContext:
    id: int
    abstract_syntax: str
    transfer_syntax: str
    as_scu: bool  # we may act as SCU on this context (send requests)
    as_scp: bool  # we act as SCP (receive requests)


@dataclass(frozen=True)
class DatasetSource:
    """A data set to send that lives in a file: *length* bytes from *offset* of *path*."""

    path: Path
    offset: int
    length: int


class DatasetSink(Protocol):
    """Where the data set of an incoming message is streamed."""

    def write(self, data: memoryview) -> None: ...

    def close(self) -> None: ...  # the last fragment arrived

    def discard(self) -> None: ...  # the message will not complete (abort, error)


class MemorySink:
    """Holds a (small) data set in memory: identifiers, N-ACTION/N-CREATE data sets."""

    __slots__ = ("data", "limit")

    def __init__(self, limit: int = 64 << 20) -> None:
        self.data = bytearray()
        self.limit = limit

    def write(self, data: memoryview) -> None:
        if len(self.data) + len(data) > self.limit:
            raise pdu.ProtocolError(
                f"data set larger than {self.limit} bytes for a non-storage message",
                pdu.ABORT_INVALID_PDU_PARAMETER_VALUE,
            )
        self.data += data

    def close(self) -> None:
        pass

    def discard(self) -> None:
        self.data = bytearray()


@dataclass
class Message:
    context: PresentationContext
    command: cmd.Command
    dataset: DatasetSink | None


class Service(Protocol):
    """A DIMSE service provider plugged into the application by command field."""

    def open_dataset(
        self, assoc: Association, context: PresentationContext, command: cmd.Command
    ) -> DatasetSink: ...

    def handle(self, assoc: Association, message: Message) -> None: ...


class _Release(Exception):
    pass


class _Aborted(Exception):
    pass


class Association:
    """The acceptor side of one association; :meth:`run` owns the connection until it ends."""

    def __init__(
        self, app: DimseApplication, sock: socket.socket, address: tuple[Any, ...]
    ) -> None:
        self.app = app
        self.sock = sock
        self.peer = f"{address[0]}:{address[1]}"
        self.reader = pdu.SocketReader(sock)
        self.calling_ae = ""
        self.called_ae = ""
        self.peer_max_pdu = 0
        self.peer_implementation = ""
        self.contexts: dict[int, PresentationContext] = {}
        self.messages = 0
        self._backlog: list[Message] = []  # requests that arrived while we awaited a response
        self._cancelled: set[int] = set()  # message ids the peer sent C-CANCEL-RQ for
        self._has_slot = False
        self._next_message_id = 1
        self.started = time.monotonic()

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> None:
        try:
            try:
                negotiated = self._negotiate()
            finally:
                self.app.pending.release()  # taken by the accept loop
            if not negotiated:
                return
            self._message_loop()
        except pdu.PeerClosed as exc:
            if self.calling_ae:
                log.warning(
                    "association %s -> %s from %s: connection lost (%s)",
                    self.calling_ae,
                    self.called_ae,
                    self.peer,
                    exc,
                )
        except (TimeoutError, BlockingIOError):  # BlockingIOError: see pdu.kernel_timeout
            self._abort(
                pdu.ABORT_SOURCE_PROVIDER,
                pdu.ABORT_NOT_SPECIFIED,
                f"network timeout ({self.app.config.network_timeout:g} s) waiting for the peer",
            )
        except pdu.ProtocolError as exc:
            self._abort(pdu.ABORT_SOURCE_PROVIDER, exc.reason, f"protocol error: {exc}")
        except _Aborted:
            pass
        except OSError as exc:
            log.warning(
                "association %s from %s: socket error %s", self.calling_ae or "?", self.peer, exc
            )
        except Exception:
            log.exception(
                "association %s from %s: internal error", self.calling_ae or "?", self.peer
            )
            self._abort(pdu.ABORT_SOURCE_PROVIDER, pdu.ABORT_NOT_SPECIFIED, "internal error")
        finally:
            self._release_slot()
            with contextlib.suppress(OSError):
                self.sock.close()

    def _release_slot(self) -> None:
        """Free the association slot — before the peer hears the association is over, so a
        peer that reconnects at once finds it free."""
        if self._has_slot:
            self._has_slot = False
            self.app.release_slot()

    def _abort(self, source: int, reason: int, why: str) -> None:
        log.warning(
            "association %s -> %s from %s aborted: %s",
            self.calling_ae or "?",
            self.called_ae or "?",
            self.peer,
            why,
        )
        self._release_slot()
        with contextlib.suppress(OSError):
            self.sock.sendall(pdu.a_abort(source, reason))

    def _reject(self, result: int, source: int, reason: int, why: str) -> None:
        log.warning(
            "association rejected (%s): calling AE %r, called AE %r, from %s",
            why,
            self.calling_ae,
            self.called_ae,
            self.peer,
        )
        with contextlib.suppress(OSError):
            self.sock.sendall(pdu.a_associate_rj(result, source, reason))
            self._linger()

    def _linger(self) -> None:
        """After RJ/RP/abort, give the peer ARTIM to close first (PS3.8 Sta13)."""
        self.sock.settimeout(self.app.config.artim_timeout)
        with contextlib.suppress(OSError, pdu.PeerClosed, TimeoutError):
            deadline = time.monotonic() + self.app.config.artim_timeout
            while time.monotonic() < deadline:
                self.reader.read_chunk(1 << 16)

    # ------------------------------------------------------------------ negotiation
    def _negotiate(self) -> bool:
        config = self.app.config
        self.sock.settimeout(config.artim_timeout)
        try:
            pdu_type, length = pdu.read_pdu_header(self.reader)
        except pdu.PeerClosed:
            log.debug("connection from %s closed before A-ASSOCIATE-RQ", self.peer)
            return False
        except TimeoutError:
            log.warning(
                "connection from %s sent no A-ASSOCIATE-RQ within ARTIM (%g s); closed",
                self.peer,
                config.artim_timeout,
            )
            return False
        if pdu_type != pdu.A_ASSOCIATE_RQ:
            self._abort(
                pdu.ABORT_SOURCE_PROVIDER,
                pdu.ABORT_UNEXPECTED_PDU,
                f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}",
            )
            return False
        if length > pdu.MAX_CONTROL_PDU or length < 68:
            self._abort(
                pdu.ABORT_SOURCE_PROVIDER,
                pdu.ABORT_INVALID_PDU_PARAMETER_VALUE,
                f"A-ASSOCIATE-RQ length {length} out of range",
            )
            return False
        body = self.reader.read(length)
        raw = bytes((pdu_type, 0)) + length.to_bytes(4, "big") + body
        try:
            rq = AssociateRqPdu()
            rq.decode(raw)
            primitive = rq.to_primitive()
            self.calling_ae = str(rq.calling_ae_title).strip()
            self.called_ae = str(rq.called_ae_title).strip()
        except Exception as exc:
            self._abort(
                pdu.ABORT_SOURCE_PROVIDER,
                pdu.ABORT_INVALID_PDU_PARAMETER_VALUE,
                f"undecodable A-ASSOCIATE-RQ: {exc}",
            )
            return False

        if not (rq.protocol_version & 0x0001):
            self._reject(
                pdu.RJ_PERMANENT,
                pdu.RJ_SOURCE_ACSE,
                pdu.RJ_ACSE_PROTOCOL_VERSION_NOT_SUPPORTED,
                f"protocol version 0x{rq.protocol_version:04X} not supported",
            )
            return False
        if rq.application_context_name != APPLICATION_CONTEXT:
            self._reject(
                pdu.RJ_PERMANENT,
                pdu.RJ_SOURCE_USER,
                pdu.RJ_USER_APP_CONTEXT_NOT_SUPPORTED,
                f"application context {rq.application_context_name} not supported",
            )
            return False
        if self.called_ae != config.ae_title:
            self._reject(
                pdu.RJ_PERMANENT,
                pdu.RJ_SOURCE_USER,
                pdu.RJ_USER_CALLED_AE_NOT_RECOGNIZED,
                "called AE title not recognised",
            )
            return False
        if config.require_known_calling_ae and self.app.remote_by_ae(self.calling_ae) is None:
            self._reject(
                pdu.RJ_PERMANENT,
                pdu.RJ_SOURCE_USER,
                pdu.RJ_USER_CALLING_AE_NOT_RECOGNIZED,
                "calling AE title not recognised (require_known_calling_ae)",
            )
            return False
        if self.app.stopping.is_set():
            self._reject(
                pdu.RJ_TRANSIENT,
                pdu.RJ_SOURCE_PRESENTATION,
                pdu.RJ_PRESENTATION_TEMPORARY_CONGESTION,
                "server is shutting down",
            )
            return False
        if not self.app.acquire_slot():
            self._reject(
                pdu.RJ_TRANSIENT,
                pdu.RJ_SOURCE_PRESENTATION,
                pdu.RJ_PRESENTATION_LOCAL_LIMIT_EXCEEDED,
                f"local limit exceeded (max_associations = {config.max_associations})",
            )
            return False
        self._has_slot = True

        user_info = primitive.user_information or []
        roles: dict[UID, tuple[bool | None, bool | None]] = {}
        for item in user_info:
            if isinstance(item, MaximumLengthNotification):
                self.peer_max_pdu = item.maximum_length_received or 0
            elif isinstance(item, ImplementationClassUIDNotification):
                self.peer_implementation = str(item.implementation_class_uid or "")
            elif isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid:
                roles[UID(str(item.sop_class_uid))] = (item.scu_role, item.scp_role)

        results, role_replies = negotiate_as_acceptor(
            primitive.presentation_context_definition_list,
            self.app.acceptor_contexts(),
            roles or None,
        )
        for ctx in results:
            if ctx.result == 0x00 and ctx.context_id is not None:
                self.contexts[ctx.context_id] = PresentationContext(
                    id=ctx.context_id,
                    abstract_syntax=str(ctx.abstract_syntax),
                    transfer_syntax=str(ctx.transfer_syntax[0]),
                    as_scu=bool(ctx.as_scu),
                    as_scp=bool(ctx.as_scp),
                )

        ac = A_ASSOCIATE()
        ac.application_context_name = APPLICATION_CONTEXT
        ac.calling_ae_title = self.calling_ae
        ac.called_ae_title = self.called_ae
        ac.result = 0x00
        ac.presentation_context_definition_results_list = results
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = config.max_pdu
        impl_uid = ImplementationClassUIDNotification()
        impl_uid.implementation_class_uid = self.app.implementation_class_uid
        impl_name = ImplementationVersionNameNotification()
        impl_name.implementation_version_name = self.app.implementation_version_name
        ac.user_information = [max_length, impl_uid, impl_name, *role_replies]
        ac_pdu = AssociateAcPdu()
        ac_pdu.from_primitive(ac)
        self.sock.sendall(ac_pdu.encode())
        log.info(
            "association accepted: %s -> %s from %s, %d of %d presentation contexts, max PDU %s",
            self.calling_ae,
            self.called_ae,
            self.peer,
            len(self.contexts),
            len(results),
            self.peer_max_pdu or "unlimited",
        )
        return True

    # ------------------------------------------------------------------ message loop
    def _message_loop(self) -> None:
        pdu.kernel_timeout(self.sock, self.app.config.network_timeout)
        try:
            while True:
                message = self._backlog.pop(0) if self._backlog else self._next_message(idle=True)
                self._dispatch(message)
        except _Release:
            return

    def _next_message(self, *, idle: bool) -> Message:
        """Read PDUs until one whole DIMSE message has arrived (its data set streamed into the
        sink the service chose). idle: between operations — wait in slices so that a stop
        request is noticed, and give up after network_timeout. Handles A-RELEASE-RQ (raises
        _Release) and A-ABORT (raises _Aborted)."""
        config = self.app.config
        reader = self.reader
        stop = self.app.stopping
        max_pdu = config.max_pdu
        command_buf = bytearray()
        command: cmd.Command | None = None
        context: PresentationContext | None = None
        sink: DatasetSink | None = None
        try:
            while True:
                if (
                    idle
                    and command is None
                    and not command_buf
                    and not reader.wait_readable(config.network_timeout, stop)
                ):
                    if stop.is_set():
                        self._abort(
                            pdu.ABORT_SOURCE_USER, pdu.ABORT_NOT_SPECIFIED, "server shutting down"
                        )
                        raise _Aborted
                    raise TimeoutError
                pdu_type, length = pdu.read_pdu_header(reader)
                if pdu_type == pdu.P_DATA_TF:
                    if max_pdu and length > max_pdu:
                        raise pdu.ProtocolError(
                            f"P-DATA-TF of {length} bytes exceeds the negotiated maximum {max_pdu}"
                        )
                    remaining = length
                    while remaining > 0:
                        if remaining < 6:
                            raise pdu.ProtocolError("P-DATA-TF ends inside a PDV item header")
                        data_len, cid, control = pdu.read_pdv_header(reader)
                        remaining -= 6
                        if data_len > remaining:
                            raise pdu.ProtocolError(
                                f"PDV item of {data_len} bytes overruns its P-DATA-TF "
                                f"({remaining} bytes left)"
                            )
                        remaining -= data_len
                        ctx = self.contexts.get(cid)
                        if ctx is None:
                            raise pdu.ProtocolError(
                                f"PDV uses presentation context {cid}, which was not accepted",
                                pdu.ABORT_UNEXPECTED_PDU_PARAMETER,
                            )
                        is_last = bool(control & 0x02)
                        if control & 0x01:  # command fragment
                            if command is not None:
                                raise pdu.ProtocolError(
                                    "command fragment while a data set was expected",
                                    pdu.ABORT_UNEXPECTED_PDU_PARAMETER,
                                )
                            if context is not None and context.id != cid:
                                raise pdu.ProtocolError("command fragments on different contexts")
                            context = ctx
                            command_buf += reader.read(data_len)
                            if len(command_buf) > 65536:
                                raise pdu.ProtocolError("command set longer than 64 KiB")
                            if is_last:
                                try:
                                    command = cmd.decode_command(command_buf)
                                except cmd.CommandError as exc:
                                    raise pdu.ProtocolError(f"bad command set: {exc}") from exc
                                command_buf = bytearray()
                                if not command.has_dataset:
                                    if remaining:
                                        raise pdu.ProtocolError("PDVs after a complete message")
                                    return Message(context, command, None)
                                sink = self._open_dataset(context, command)
                        else:  # data set fragment
                            if command is None or context is None or sink is None:
                                raise pdu.ProtocolError(
                                    "data set fragment without a preceding command",
                                    pdu.ABORT_UNEXPECTED_PDU_PARAMETER,
                                )
                            if cid != context.id:
                                raise pdu.ProtocolError(
                                    "data set on a different presentation context than its command",
                                    pdu.ABORT_UNEXPECTED_PDU_PARAMETER,
                                )
                            left = data_len
                            while left:
                                chunk = reader.read_chunk(min(left, CHUNK))
                                left -= len(chunk)
                                sink.write(chunk)
                            if is_last:
                                if remaining:
                                    raise pdu.ProtocolError("PDVs after a complete message")
                                sink.close()
                                done, sink = sink, None
                                return Message(context, command, done)
                elif pdu_type == pdu.A_RELEASE_RQ:
                    reader.read(min(length, pdu.MAX_CONTROL_PDU))
                    if command is not None or command_buf:
                        log.warning(
                            "association %s from %s released in the middle of a message",
                            self.calling_ae,
                            self.peer,
                        )
                    self._release_slot()
                    self.sock.sendall(pdu.a_release_rp())
                    log.info(
                        "association released: %s -> %s from %s, %d messages in %.1f s",
                        self.calling_ae,
                        self.called_ae,
                        self.peer,
                        self.messages,
                        time.monotonic() - self.started,
                    )
                    self._linger()
                    raise _Release
                elif pdu_type == pdu.A_ABORT:
                    body = reader.read(min(length, 64))
                    source, reason = (body[2], body[3]) if len(body) >= 4 else (-1, -1)
                    log.warning(
                        "association %s -> %s from %s aborted by the peer (source %d, reason %d)",
                        self.calling_ae,
                        self.called_ae,
                        self.peer,
                        source,
                        reason,
                    )
                    raise _Aborted
                elif pdu_type in pdu.PDU_NAMES:
                    raise pdu.ProtocolError(
                        f"unexpected {pdu.PDU_NAMES[pdu_type]} on an established association",
                        pdu.ABORT_UNEXPECTED_PDU,
                    )
                else:
                    raise pdu.ProtocolError(
                        f"unrecognised PDU type 0x{pdu_type:02X}", pdu.ABORT_UNRECOGNIZED_PDU
                    )
        finally:
            if sink is not None:
                sink.discard()

    def _open_dataset(self, context: PresentationContext, command: cmd.Command) -> DatasetSink:
        if command.field & 0x8000:
            return MemorySink()  # a response to one of our requests
        service = self.app.service_for(command.field, context.abstract_syntax)
        if service is None:
            return MemorySink()
        return service.open_dataset(self, context, command)

    def _dispatch(self, message: Message) -> None:
        self.messages += 1
        command = message.command
        if command.field == cmd.C_CANCEL_RQ:
            return  # nothing of that message id is running (any more): PS3.7 9.3.2.3
        service = self.app.service_for(command.field, message.context.abstract_syntax)
        if service is None:
            log.warning(
                "association %s from %s: %s is not supported here",
                self.calling_ae,
                self.peer,
                command.name,
            )
            if message.dataset is not None:
                message.dataset.discard()
            if command.field & 0x8000:
                return  # an unsolicited response: nothing to answer
            self.send_response(
                message,
                Status(0x0211, "Unrecognized operation", "PS3.7 C.4.17"),
                f"{command.name} is not supported by this SCP",
            )
            return
        if not message.context.as_scp:
            if message.dataset is not None:
                message.dataset.discard()
            self.send_response(
                message,
                Status(0x0211, "Unrecognized operation", "PS3.7 C.4.17"),
                "we did not accept the SCP role on this presentation context",
            )
            return
        service.handle(self, message)

    # ------------------------------------------------------------------ requests we send
    def request(
        self,
        context_id: int,
        fields: Iterable[tuple[int, Any]],
        dataset: bytes | DatasetSource | None = None,
        *,
        cancel_of: int | None = None,
    ) -> Message:
        """Send a request (C-STORE of a C-GET, N-EVENT-REPORT of a commitment) and wait for its
        response. Requests the peer sends meanwhile wait in a backlog; a C-CANCEL-RQ for the
        operation *cancel_of* is noted (see :meth:`cancelled`)."""
        message_id = self.next_message_id()
        self.send_message(context_id, [*fields, (cmd.MESSAGE_ID, message_id)], dataset)
        while True:
            message = self._next_message(idle=False)
            command = message.command
            if (
                command.field & 0x8000
                and command.get(cmd.MESSAGE_ID_BEING_RESPONDED_TO) == message_id
            ):
                return message
            self._note(message, cancel_of)

    def cancelled(self, message_id: int) -> bool:
        """Whether the peer sent C-CANCEL-RQ for *message_id* (PS3.7 9.1.5): checked between the
        responses of a C-FIND and the sub-operations of a C-MOVE or C-GET."""
        if message_id in self._cancelled:
            return True
        while self.reader.buffered() or select.select([self.sock], [], [], 0)[0]:
            self._note(self._next_message(idle=False), message_id)
        return message_id in self._cancelled

    def _note(self, message: Message, cancel_of: int | None) -> None:
        command = message.command
        if command.field == cmd.C_CANCEL_RQ:
            target = command.get(cmd.MESSAGE_ID_BEING_RESPONDED_TO)
            if target is not None:
                self._cancelled.add(target)
            return
        if command.field & 0x8000:
            log.warning("association %s from %s: unexpected %s ignored",
                        self.calling_ae, self.peer, command.name)  # fmt: skip
            return
        self._backlog.append(message)

    # ------------------------------------------------------------------ sending
    def send_message(
        self,
        context_id: int,
        fields: Iterable[tuple[int, Any]],
        dataset: bytes | DatasetSource | None = None,
    ) -> None:
        """Send one DIMSE message (command, and data set if given) on *context_id*; a data set
        in a file is streamed from it, never held in memory whole."""
        fields = list(fields)
        fields.append(
            (
                cmd.COMMAND_DATA_SET_TYPE,
                cmd.DATASET_PRESENT if dataset is not None else cmd.NO_DATASET,
            )
        )
        command_bytes = cmd.encode_command(fields)
        pdus = pdu.fragment(context_id, True, command_bytes, self.peer_max_pdu)
        if isinstance(dataset, DatasetSource):
            # read ~1 MiB at a time, cut it into PDUs of the peer's size, one send per read;
            # the file is opened before the command goes out (a missing file must not leave a
            # command without its data set on the wire)
            piece = min((self.peer_max_pdu or (1 << 20)) - 6, 1 << 20)
            block = max(piece, (1 << 20) // piece * piece)
            out = [b"".join(pdus)]
            with open(dataset.path, "rb") as fh:
                fh.seek(dataset.offset)
                left = dataset.length
                if left == 0:
                    out.append(pdu.p_data_tf(context_id, False, True, b""))
                while left > 0:
                    chunk = fh.read(min(block, left))
                    if not chunk:
                        raise OSError(f"{dataset.path} ended early")
                    left -= len(chunk)
                    view = memoryview(chunk)
                    for start in range(0, len(view), piece):
                        part = view[start : start + piece]
                        last = left == 0 and start + piece >= len(view)
                        out.append(pdu.p_data_tf(context_id, False, last, part))
                    self.sock.sendall(b"".join(out))
                    out = []
            if out:
                self.sock.sendall(b"".join(out))
            return
        if dataset is not None:
            pdus.extend(pdu.fragment(context_id, False, dataset, self.peer_max_pdu))
        # one send for a small message; a large data set goes out in batches of PDUs
        for start in range(0, len(pdus), 64):
            self.sock.sendall(b"".join(pdus[start : start + 64]))

    def send_response(
        self,
        request: Message,
        status: Status | int,
        comment: str | None = None,
        extra: Iterable[tuple[int, Any]] = (),
        dataset: bytes | None = None,
    ) -> None:
        command = request.command
        code = status if isinstance(status, int) else status.code
        fields: list[tuple[int, Any]] = [
            (cmd.COMMAND_FIELD, command.field | 0x8000),
            (cmd.MESSAGE_ID_BEING_RESPONDED_TO, command.message_id or 0),
            (cmd.STATUS, code),
        ]
        sop_class = command.get(cmd.AFFECTED_SOP_CLASS_UID) or command.get(
            cmd.REQUESTED_SOP_CLASS_UID
        )
        if sop_class:
            fields.append((cmd.AFFECTED_SOP_CLASS_UID, sop_class))
        sop_instance = command.get(cmd.AFFECTED_SOP_INSTANCE_UID) or command.get(
            cmd.REQUESTED_SOP_INSTANCE_UID
        )
        if sop_instance:
            fields.append((cmd.AFFECTED_SOP_INSTANCE_UID, sop_instance))
        if comment and code != 0x0000:
            fields.append((cmd.ERROR_COMMENT, comment))
        extra = list(extra)
        overridden = {tag for tag, _ in extra}  # e.g. the SOP Instance UID an N-CREATE made
        fields = [f for f in fields if f[0] not in overridden] + extra
        self.send_message(request.context.id, fields, dataset)

    def next_message_id(self) -> int:
        value = self._next_message_id
        self._next_message_id = value % 0xFFFF + 1
        return value
