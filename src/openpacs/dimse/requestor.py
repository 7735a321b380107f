"""Associations openpacs opens itself: C-MOVE sub-operations, commitment reports, relays.

Owns: the requestor side of association establishment (A-ASSOCIATE-RQ with presentation
contexts and SCP/SCU role selection, reading A-ASSOCIATE-AC/RJ) and release. Once established,
the connection is an ordinary :class:`~openpacs.dimse.association.Association`, so requests go
through the same message code as everywhere else — in particular a stored instance is sent from
its file byte for byte and streamed (pynetdicom's ``send_c_store`` decodes a file with pydicom
and re-encodes it, which would neither keep the received bytes nor bound memory for a 2 GB
instance). PDU item codecs and ``negotiate_as_requestor`` are pynetdicom's.
Must not: decide what to send.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Sequence

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
from pynetdicom.presentation import PresentationContext as PnContext
from pynetdicom.presentation import negotiate_as_requestor

from openpacs.config import DicomConfig
from openpacs.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from openpacs.dimse import pdu
from openpacs.dimse.association import APPLICATION_CONTEXT, Association, PresentationContext
from openpacs.dimse.server import DimseApplication

log = logging.getLogger(__name__)


class AssociationFailed(Exception):
    """The peer could not be reached, refused the association, or broke the protocol."""

    def __init__(self, message: str, *, rejected: bool = False) -> None:
        super().__init__(message)
        self.rejected = rejected


def associate(
    config: DicomConfig,
    *,
    host: str,
    port: int,
    called_ae: str,
    contexts: Sequence[tuple[str, Sequence[str]]],
    roles: dict[str, tuple[bool, bool]] | None = None,
) -> Association:
    """Open an association; *contexts* = (abstract syntax, transfer syntaxes) each proposed as
    its own presentation context; *roles*: abstract syntax → (SCU role, SCP role) proposed by
    SCP/SCU Role Selection (PS3.7 D.3.3.4), e.g. (False, True) for a Storage Commitment report
    sent on a new association (PS3.4 J.3.3)."""
    if not contexts:
        raise AssociationFailed("no presentation contexts to propose")
    if len(contexts) > 128:
        raise AssociationFailed("more than 128 presentation contexts")
    try:
        sock = socket.create_connection((host, port), timeout=config.artim_timeout)
    except OSError as exc:
        raise AssociationFailed(f"cannot connect to {called_ae} at {host}:{port}: {exc}") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    roles = roles or {}
    proposed: list[PnContext] = []
    for i, (abstract, syntaxes) in enumerate(contexts):
        cx = PnContext()
        cx.context_id = 2 * i + 1
        cx.abstract_syntax = abstract
        for ts in syntaxes:
            cx.add_transfer_syntax(ts)
        if abstract in roles:
            cx.scu_role, cx.scp_role = roles[abstract]
        proposed.append(cx)
    rq = A_ASSOCIATE()
    rq.application_context_name = APPLICATION_CONTEXT
    rq.calling_ae_title = config.ae_title
    rq.called_ae_title = called_ae
    rq.presentation_context_definition_list = proposed
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = config.max_pdu
    impl_uid = ImplementationClassUIDNotification()
    impl_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    impl_name = ImplementationVersionNameNotification()
    impl_name.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    role_items = []
    for uid, (scu, scp) in sorted(roles.items()):
        item = SCP_SCU_RoleSelectionNegotiation()
        item.sop_class_uid = uid
        item.scu_role, item.scp_role = scu, scp
        role_items.append(item)
    rq.user_information = [max_length, impl_uid, impl_name, *role_items]
    rq_pdu = AssociateRqPdu()
    rq_pdu.from_primitive(rq)

    app = DimseApplication(config)
    assoc = Association(app, sock, sock.getpeername())
    assoc.calling_ae, assoc.called_ae = config.ae_title, called_ae
    try:
        sock.sendall(rq_pdu.encode())
        pdu_type, length = pdu.read_pdu_header(assoc.reader)
        body = assoc.reader.read(min(length, pdu.MAX_CONTROL_PDU))
    except (OSError, pdu.PeerClosed) as exc:
        sock.close()
        raise AssociationFailed(
            f"{called_ae} at {host}:{port} closed the connection: {exc}"
        ) from exc
    if pdu_type == pdu.A_ASSOCIATE_RJ:
        sock.close()
        result, source, reason = (body[1], body[2], body[3]) if len(body) >= 4 else (0, 0, 0)
        raise AssociationFailed(
            f"{called_ae} rejected the association (result {result}, source {source}, "
            f"reason {reason})",
            rejected=True,
        )
    if pdu_type != pdu.A_ASSOCIATE_AC:
        sock.close()
        raise AssociationFailed(f"{called_ae} answered with PDU type 0x{pdu_type:02X}")
    ac = AssociateAcPdu()
    ac.decode(bytes((pdu_type, 0)) + length.to_bytes(4, "big") + body)
    primitive = ac.to_primitive()
    reply_roles: dict[UID, tuple[bool | None, bool | None]] = {}
    for reply in primitive.user_information or []:
        if isinstance(reply, MaximumLengthNotification):
            assoc.peer_max_pdu = reply.maximum_length_received or 0
        elif isinstance(reply, SCP_SCU_RoleSelectionNegotiation) and reply.sop_class_uid:
            reply_roles[UID(str(reply.sop_class_uid))] = (reply.scu_role, reply.scp_role)
    results = negotiate_as_requestor(
        proposed, primitive.presentation_context_definition_results_list, reply_roles or None
    )
    for cx in results:
        if cx.result == 0x00 and cx.context_id is not None:
            assoc.contexts[cx.context_id] = PresentationContext(
                id=cx.context_id,
                abstract_syntax=str(cx.abstract_syntax),
                transfer_syntax=str(cx.transfer_syntax[0]),
                as_scu=bool(cx.as_scu),
                as_scp=bool(cx.as_scp),
            )
    sock.settimeout(config.network_timeout)
    log.info(
        "association opened: %s -> %s at %s:%d, %d of %d contexts accepted",
        config.ae_title,
        called_ae,
        host,
        port,
        len(assoc.contexts),
        len(proposed),
    )
    return assoc


def release(assoc: Association) -> None:
    """A-RELEASE-RQ, wait for A-RELEASE-RP (PS3.8 7.2), close."""
    try:
        assoc.sock.sendall(pdu.a_release_rq())
        while True:
            pdu_type, length = pdu.read_pdu_header(assoc.reader)
            left = length
            while left:  # skip the body (a late P-DATA-TF included)
                left -= len(assoc.reader.read_chunk(min(left, 1 << 20)))
            if pdu_type in (pdu.A_RELEASE_RP, pdu.A_ABORT):
                break
    except (OSError, pdu.PeerClosed, TimeoutError):
        pass
    finally:
        with contextlib.suppress(OSError):
            assoc.sock.close()


def abort(assoc: Association) -> None:
    with contextlib.suppress(OSError):
        assoc.sock.sendall(pdu.a_abort(pdu.ABORT_SOURCE_USER, pdu.ABORT_NOT_SPECIFIED))
    with contextlib.suppress(OSError):
        assoc.sock.close()
