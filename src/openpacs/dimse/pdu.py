"""DICOM Upper Layer PDUs (PS3.8 §9.3): framing on a TCP stream, and the small fixed-form PDUs.

Owns: reading PDU headers and P-DATA-TF presentation data value items from a socket without
holding more than one bounded chunk in memory, and building A-ASSOCIATE-RJ, A-RELEASE, A-ABORT
and P-DATA-TF PDUs. The variable-item PDUs (A-ASSOCIATE-RQ/AC) are decoded and encoded with
pynetdicom's PDU classes (`openpacs.dimse.association`), which are well tested and off the hot path.
Why by hand at all: the per-PDU path has to stream multi-gigabyte data sets to disk and cost a
few microseconds per message; pynetdicom's reactor reads whole PDUs into memory and hands them
between threads through polled queues.
"""

from __future__ import annotations

import select
import socket
import struct
import threading

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

PDU_NAMES = {
    A_ASSOCIATE_RQ: "A-ASSOCIATE-RQ",
    A_ASSOCIATE_AC: "A-ASSOCIATE-AC",
    A_ASSOCIATE_RJ: "A-ASSOCIATE-RJ",
    P_DATA_TF: "P-DATA-TF",
    A_RELEASE_RQ: "A-RELEASE-RQ",
    A_RELEASE_RP: "A-RELEASE-RP",
    A_ABORT: "A-ABORT",
}

# PS3.8 Table 9-21: A-ASSOCIATE-RJ result / source / reason.
RJ_PERMANENT, RJ_TRANSIENT = 1, 2
RJ_SOURCE_USER, RJ_SOURCE_ACSE, RJ_SOURCE_PRESENTATION = 1, 2, 3
RJ_USER_NO_REASON = 1
RJ_USER_APP_CONTEXT_NOT_SUPPORTED = 2
RJ_USER_CALLING_AE_NOT_RECOGNIZED = 3
RJ_USER_CALLED_AE_NOT_RECOGNIZED = 7
RJ_ACSE_PROTOCOL_VERSION_NOT_SUPPORTED = 2
RJ_PRESENTATION_TEMPORARY_CONGESTION = 1
RJ_PRESENTATION_LOCAL_LIMIT_EXCEEDED = 2

# PS3.8 Table 9-26: A-ABORT source / reason.
ABORT_SOURCE_USER, ABORT_SOURCE_PROVIDER = 0, 2
ABORT_NOT_SPECIFIED = 0
ABORT_UNRECOGNIZED_PDU = 1
ABORT_UNEXPECTED_PDU = 2
ABORT_UNRECOGNIZED_PDU_PARAMETER = 4
ABORT_UNEXPECTED_PDU_PARAMETER = 5
ABORT_INVALID_PDU_PARAMETER_VALUE = 6

_PDU_HEADER = struct.Struct(">BxI")
_PDV_HEADER = struct.Struct(">IBB")

MAX_CONTROL_PDU = 1 << 20  # A-ASSOCIATE-RQ with 128 contexts and user identity fits easily


class ProtocolError(Exception):
    """The peer broke PS3.8: the association is aborted with (source, reason)."""

    def __init__(self, message: str, reason: int = ABORT_INVALID_PDU_PARAMETER_VALUE) -> None:
        super().__init__(message)
        self.reason = reason


class PeerClosed(Exception):
    """The TCP connection ended (EOF or reset)."""


def a_associate_rj(result: int, source: int, reason: int) -> bytes:
    return _PDU_HEADER.pack(A_ASSOCIATE_RJ, 4) + bytes((0, result, source, reason))


def a_abort(source: int, reason: int) -> bytes:
    return _PDU_HEADER.pack(A_ABORT, 4) + bytes((0, 0, source, reason))


def a_release_rq() -> bytes:
    return _PDU_HEADER.pack(A_RELEASE_RQ, 4) + b"\x00\x00\x00\x00"


def a_release_rp() -> bytes:
    return _PDU_HEADER.pack(A_RELEASE_RP, 4) + b"\x00\x00\x00\x00"


def p_data_tf(context_id: int, is_command: bool, is_last: bool, data: bytes | memoryview) -> bytes:
    """One P-DATA-TF PDU holding one PDV (PS3.8 §9.3.5, Annex E.2 message control header)."""
    control = (0x01 if is_command else 0x00) | (0x02 if is_last else 0x00)
    n = len(data)
    return b"".join(
        (_PDU_HEADER.pack(P_DATA_TF, n + 6), _PDV_HEADER.pack(n + 2, context_id, control), data)
    )


def fragment(
    context_id: int, is_command: bool, data: bytes | memoryview, max_pdu: int
) -> list[bytes]:
    """Split one message part into P-DATA-TF PDUs no longer than the peer's maximum."""
    limit = (max_pdu if max_pdu else 1 << 20) - 6  # PDV item header inside the PDU
    if limit <= 0:
        limit = 4096 - 6
    view = memoryview(data)
    total = len(view)
    if total == 0:
        return [p_data_tf(context_id, is_command, True, b"")]
    out = []
    for start in range(0, total, limit):
        chunk = view[start : start + limit]
        out.append(p_data_tf(context_id, is_command, start + limit >= total, chunk))
    return out


def kernel_timeout(sock: socket.socket, seconds: float) -> None:
    """Bound every blocking receive and send on *sock* by *seconds*, enforced by the kernel
    (SO_RCVTIMEO / SO_SNDTIMEO on a blocking socket): a call that times out raises
    BlockingIOError. Why not ``settimeout``: Python then polls before every recv and send, two
    system calls and two hand-overs of the GIL where one does (an instance costs three such
    calls on the ingest path)."""
    sec = int(seconds)
    usec = min(999_999, round((seconds - sec) * 1_000_000))
    if sec == 0 and usec == 0:
        usec = 1  # 0 would mean "no timeout"
    value = struct.pack("@ll", sec, usec)  # struct timeval
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


class SocketReader:
    """Exact reads from a socket through one reusable buffer (no per-read buffer objects)."""

    __slots__ = ("_buf", "_end", "_mv", "_start", "sock")

    def __init__(self, sock: socket.socket, size: int = 1 << 18) -> None:
        self.sock = sock
        self._buf = bytearray(size)
        self._mv = memoryview(self._buf)
        self._start = 0
        self._end = 0

    def buffered(self) -> int:
        return self._end - self._start

    def _fill(self, need: int) -> None:
        """Make at least *need* (≤ buffer size) bytes available."""
        if len(self._buf) - self._start < need:  # not enough room after the unread data
            n = self._end - self._start
            self._buf[:n] = self._mv[self._start : self._end]
            self._start, self._end = 0, n
        while self._end - self._start < need:
            try:
                got = self.sock.recv_into(self._mv[self._end :])
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise PeerClosed(str(exc)) from exc
            if not got:
                raise PeerClosed("connection closed by peer")
            self._end += got

    def read(self, n: int) -> bytes:
        if n <= len(self._buf):
            if self._end - self._start < n:
                self._fill(n)
            start = self._start
            self._start = start + n
            return bytes(self._mv[start : start + n])
        out = bytearray(n)
        self.readinto(memoryview(out))
        return bytes(out)

    def readinto(self, target: memoryview) -> None:
        """Fill *target* exactly."""
        n = len(target)
        have = self._end - self._start
        take = min(have, n)
        if take:
            target[:take] = self._mv[self._start : self._start + take]
            self._start += take
        pos = take
        while pos < n:
            try:
                got = self.sock.recv_into(target[pos:])
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise PeerClosed(str(exc)) from exc
            if not got:
                raise PeerClosed("connection closed by peer in the middle of a PDU")
            pos += got

    def read_chunk(self, limit: int) -> memoryview:
        """Up to *limit* bytes already received (at least one; waits if none). The view is only
        valid until the next call."""
        if self._end == self._start:
            self._start = self._end = 0
            self._fill(1)
        take = min(limit, self._end - self._start)
        start = self._start
        self._start = start + take
        return self._mv[start : start + take]

    def wait_readable(
        self, timeout: float, stop: threading.Event | None, slice_s: float = 0.5
    ) -> bool:
        """Wait until data is available. False on timeout or when *stop* is set."""
        if self._end > self._start:
            return True
        remaining = timeout
        while remaining > 0:
            if stop is not None and stop.is_set():
                return False
            wait = min(slice_s, remaining)
            readable, _, _ = select.select([self.sock], [], [], wait)
            if readable:
                return True
            remaining -= wait
        return False


def read_pdu_header(reader: SocketReader) -> tuple[int, int]:
    pdu_type, length = _PDU_HEADER.unpack(reader.read(6))
    return pdu_type, length


def read_pdv_header(reader: SocketReader) -> tuple[int, int, int]:
    """(PDV data length, presentation context ID, message control header)."""
    item_length, context_id, control = _PDV_HEADER.unpack(reader.read(6))
    if item_length < 2:
        raise ProtocolError(f"PDV item length {item_length} is shorter than its header")
    return item_length - 2, context_id, control
