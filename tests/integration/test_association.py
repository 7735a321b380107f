"""Association acceptance policy (seed 002 §3.2.9.4), timeouts and slot accounting, on the wire."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_AC
from support import associate_rq, recv_pdu, require_tool, tool_env

VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


def raw_associate(port: int, rq: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(rq)
        return recv_pdu(sock)


def rj_fields(raw: bytes) -> tuple[int, int, int]:
    """(result, source, reason) of an A-ASSOCIATE-RJ (PS3.8 9.3.4)."""
    assert raw[0] == 0x03, f"expected A-ASSOCIATE-RJ, got PDU type {raw[0]:#x}"
    return raw[7], raw[8], raw[9]


def test_wrong_called_ae_rejected_permanently(server) -> None:
    assert rj_fields(raw_associate(server.port, associate_rq(called="NOTME"))[1]) == (1, 1, 7)
    assert "association rejected (called AE title not recognised)" in server.log()
    assert "'RAWSCU'" in server.log() and "127.0.0.1:" in server.log()


def test_wrong_called_ae_with_echoscu(server) -> None:
    echoscu = require_tool("echoscu")
    r = subprocess.run([echoscu, "-aec", "SOMEONE", "127.0.0.1", str(server.port)],
                       capture_output=True, text=True, env=tool_env(), timeout=30)  # fmt: skip
    assert r.returncode != 0
    assert "Called AE Title Not Recognized" in r.stdout + r.stderr


def test_unsupported_application_context(server) -> None:
    raw = raw_associate(server.port, associate_rq(app_context="1.2.3.4"))[1]
    assert rj_fields(raw) == (1, 1, 2)


def test_unknown_calling_ae_rejected_when_required(make_server) -> None:
    srv = make_server(
        "[dicom]\nrequire_known_calling_ae = true\n"
        '[[remote]]\nname = "ct"\nae_title = "KNOWNCT"\nhost = "127.0.0.1"\nport = 104\n'
    )
    assert rj_fields(raw_associate(srv.port, associate_rq(calling="STRANGER"))[1]) == (1, 1, 3)
    assert "calling AE title not recognised" in srv.log() and "'STRANGER'" in srv.log()
    pdu_type, _ = raw_associate(srv.port, associate_rq(calling="KNOWNCT"))
    assert pdu_type == 0x02


def test_association_limit_is_transient_and_frees_up(make_server) -> None:
    srv = make_server("[dicom]\nmax_associations = 2\n")
    ae = AE(ae_title="LIMITSCU")
    ae.add_requested_context(VERIFICATION)
    first = ae.associate("127.0.0.1", srv.port, ae_title="OPENPACS")
    second = ae.associate("127.0.0.1", srv.port, ae_title="OPENPACS")
    assert first.is_established and second.is_established
    # the third gets A-ASSOCIATE-RJ: rejected-transient, service-provider (presentation), local limit
    assert rj_fields(raw_associate(srv.port, associate_rq())[1]) == (2, 3, 2)
    assert "local limit exceeded (max_associations = 2)" in srv.log()
    first.release()
    deadline = time.monotonic() + 5
    while True:
        pdu_type, _ = raw_associate(srv.port, associate_rq())
        if pdu_type == 0x02 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert pdu_type == 0x02
    second.release()


def test_contexts_negotiated_per_seed_preferences(server) -> None:
    """Several contexts for one abstract syntax are all accepted; the transfer syntax chosen is
    the first of seed 002 T3.57 that was proposed; an unknown abstract syntax is refused."""
    contexts = [
        (CT, ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]),  # implicit and explicit → explicit
        (CT, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90"]),  # → J2K lossless first in T3.57
        (CT, ["1.2.840.10008.1.2.4.80"]),  # JPEG-LS: beyond the seed, accepted
        ("1.2.3.4.5.6", ["1.2.840.10008.1.2"]),  # not a storage class
        (CT, ["1.2.752.24.3.7.6"]),  # Sectra private syntax: not ours
    ]
    pdu_type, raw = raw_associate(server.port, associate_rq(contexts=contexts))
    assert pdu_type == 0x02
    ac = A_ASSOCIATE_AC()
    ac.decode(raw)
    results = {
        cx.context_id: (cx.result, str(cx.transfer_syntax[0]) if cx.transfer_syntax else None)
        for cx in ac.to_primitive().presentation_context_definition_results_list
    }
    assert results[1] == (0, "1.2.840.10008.1.2.1")
    assert results[3] == (0, "1.2.840.10008.1.2.4.90")
    assert results[5] == (0, "1.2.840.10008.1.2.4.80")
    assert results[7][0] == 3  # abstract syntax not supported
    assert results[9][0] == 4  # transfer syntaxes not supported


def test_health_check_and_idle_connections_do_not_block(make_server) -> None:
    srv = make_server("[dicom]\nartim_timeout = 1.0\nmax_associations = 1\n")
    # a load-balancer health check: connect and close
    for _ in range(20):
        socket.create_connection(("127.0.0.1", srv.port), timeout=5).close()
    # idle peers that never send A-ASSOCIATE-RQ
    idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(5)]
    # the next modality still gets in, at once, even with max_associations = 1
    assert raw_associate(srv.port, associate_rq())[0] == 0x02
    # and the idle ones are closed after ARTIM
    for sock in idle:
        sock.settimeout(5)
        start = time.monotonic()
        assert sock.recv(1) == b""
        assert time.monotonic() - start < 3
        sock.close()
    assert "sent no A-ASSOCIATE-RQ within ARTIM" in srv.log()


def test_idle_association_is_aborted_after_network_timeout(make_server) -> None:
    srv = make_server("[dicom]\nnetwork_timeout = 1.0\nmax_associations = 1\n")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(associate_rq())
        assert recv_pdu(sock)[0] == 0x02
        start = time.monotonic()
        pdu_type, _ = recv_pdu(sock, timeout=10)  # silence: the SCP aborts
        assert pdu_type == 0x07
        assert time.monotonic() - start < 5
    assert "network timeout" in srv.log()
    # the slot is free again
    assert raw_associate(srv.port, associate_rq())[0] == 0x02


def test_silence_inside_a_pdu_is_aborted_after_network_timeout(make_server) -> None:
    """A peer that stops in the middle of a P-DATA-TF (the kernel's receive timeout, not the
    idle wait between messages) is aborted after network_timeout and its slot freed."""
    srv = make_server("[dicom]\nnetwork_timeout = 1.0\nmax_associations = 1\n")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(associate_rq())
        assert recv_pdu(sock)[0] == 0x02
        # P-DATA-TF announcing 1,000 bytes, of which only the PDV item header arrives
        sock.sendall(
            b"\x04\x00" + (1000).to_bytes(4, "big") + (994).to_bytes(4, "big") + b"\x01\x03"
        )
        start = time.monotonic()
        pdu_type, _ = recv_pdu(sock, timeout=10)
        assert pdu_type == 0x07
        assert 0.8 < time.monotonic() - start < 5
    assert "network timeout" in srv.log()
    assert raw_associate(srv.port, associate_rq())[0] == 0x02


def test_peer_that_takes_no_responses_is_aborted_after_network_timeout(make_server) -> None:
    """A peer that keeps sending requests but never reads the responses: once the responses
    fill the socket buffers, the SCP's send waits at most network_timeout (the kernel's
    SO_SNDTIMEO), then the association is aborted and its slot freed."""
    from openpacs.dimse import commands as cmd
    from openpacs.dimse import pdu

    srv = make_server("[dicom]\nnetwork_timeout = 1.0\nmax_associations = 1\n")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", srv.port))
    try:
        sock.sendall(associate_rq())
        assert recv_pdu(sock)[0] == 0x02
        echo = cmd.encode_command(
            [
                (cmd.AFFECTED_SOP_CLASS_UID, VERIFICATION),
                (cmd.COMMAND_FIELD, cmd.C_ECHO_RQ),
                (cmd.MESSAGE_ID, 1),
                (cmd.COMMAND_DATA_SET_TYPE, cmd.NO_DATASET),
            ]
        )
        burst = pdu.p_data_tf(1, True, True, echo) * 256
        sock.settimeout(3)
        deadline = time.monotonic() + 60
        # the SCP stops reading (its sends are blocked): our send times out, or is reset once
        # the SCP has given up on us
        with pytest.raises((TimeoutError, ConnectionResetError, BrokenPipeError)):
            while True:
                assert time.monotonic() < deadline, "the SCP kept reading"
                sock.sendall(burst)
        # without reading anything: the slot comes free once the SCP gave up on this peer
        deadline = time.monotonic() + 15
        while "network timeout" not in srv.log():
            assert time.monotonic() < deadline, "no abort after network_timeout"
            time.sleep(0.1)
        assert raw_associate(srv.port, associate_rq())[0] == 0x02
    finally:
        sock.close()


def test_pending_connection_bound(make_server) -> None:
    srv = make_server("[dicom]\nmax_pending_connections = 3\nartim_timeout = 5\n")
    idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(3)]
    time.sleep(0.3)
    extra = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    extra.settimeout(3)
    assert extra.recv(1) == b""  # closed at once, not after ARTIM
    extra.close()
    assert "max_pending_connections" in srv.log()
    for sock in idle:
        sock.close()


@pytest.mark.parametrize(
    "junk", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x04\x00\x00\x00\x00\x02\x00\x00"]
)
def test_garbage_before_association_is_aborted(server, junk: bytes) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(junk)
        sock.settimeout(5)
        data = sock.recv(64)
        assert data == b"" or data[0] == 0x07
    assert raw_associate(server.port, associate_rq())[0] == 0x02


def _connections_per_process(
    pids: list[int], server_port: int, any_state: bool = False
) -> dict[int, int]:
    """How many established (any_state: not listening) TCP connections on *server_port* each
    process holds (Linux /proc)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[target[8:-1]] = pid
    counts = dict.fromkeys(pids, 0)
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        wanted = fields[3] != "0A" if any_state else fields[3] == "01"  # 0A LISTEN, 01 ESTABLISHED
        if local_port == server_port and wanted and fields[9] in inodes:
            counts[inodes[fields[9]]] += 1
    return counts


def test_associations_are_spread_over_worker_processes(make_server) -> None:
    """Worker processes share one listening socket; whoever calls accept() first used to win,
    so several associations could all land on one worker (one core). They are balanced."""
    srv = make_server("[dicom]\nworkers = 2\n")
    for _round in range(3):
        ae = AE(ae_title="SPREAD")
        ae.add_requested_context("1.2.840.10008.1.1")
        held = []
        for _ in range(4):
            assoc = ae.associate("127.0.0.1", srv.port, ae_title="OPENPACS")
            assert assoc.is_established
            held.append(assoc)
        try:
            workers = srv.pids()[1:]
            assert len(workers) == 2
            counts = _connections_per_process(workers, srv.port)
            assert sorted(counts.values()) == [2, 2], (_round, counts)
            assert all(a.send_c_echo().Status == 0 for a in held)
        finally:
            for assoc in held:
                assoc.release()
        # the next round starts once the server has closed every connection of this one
        deadline = time.monotonic() + 5
        while any(_connections_per_process(srv.pids()[1:], srv.port, any_state=True).values()):
            assert time.monotonic() < deadline, "connections still open after release"
            time.sleep(0.05)
        time.sleep(0.2)  # the association threads end right after closing their sockets


def _cpus_per_thread(pid: int) -> set[str]:
    """The Cpus_allowed_list of every thread of process *pid*."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("Cpus_allowed_list:"):
                    found.add(line.split(":", 1)[1].strip())
    return found


def _wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs at least two CPUs")
def test_busy_workers_are_kept_on_their_own_cpu(make_server) -> None:
    """worker_affinity = "auto": with as many open associations as workers each worker's
    threads run on one CPU of their own; once associations close, on every CPU again."""
    everything = _cpus_per_thread(os.getpid())
    srv = make_server("[dicom]\nworkers = 2\n")
    workers = srv.pids()[1:]
    assert len(workers) == 2
    ae = AE(ae_title="PINNED")
    ae.add_requested_context("1.2.840.10008.1.1")
    lone = ae.associate("127.0.0.1", srv.port, ae_title="OPENPACS")
    assert lone.is_established
    time.sleep(0.6)  # three checks of the worker loops
    assert all(_cpus_per_thread(pid) == everything for pid in workers)
    second = ae.associate("127.0.0.1", srv.port, ae_title="OPENPACS")
    assert second.is_established
    try:

        def pinned_apart() -> bool:
            per_worker = [_cpus_per_thread(pid) for pid in workers]
            single = [cpus.pop() for cpus in per_worker if len(cpus) == 1]
            return len(single) == 2 and all(c.isdigit() for c in single) and single[0] != single[1]

        assert _wait_for(pinned_apart), [_cpus_per_thread(pid) for pid in workers]
        assert second.send_c_echo().Status == 0 and lone.send_c_echo().Status == 0
    finally:
        second.release()
        lone.release()
    assert _wait_for(lambda: all(_cpus_per_thread(pid) == everything for pid in workers))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs at least two CPUs")
def test_worker_affinity_off_leaves_the_cpus_to_the_scheduler(make_server) -> None:
    everything = _cpus_per_thread(os.getpid())
    srv = make_server('[dicom]\nworkers = 2\nworker_affinity = "off"\n')
    ae = AE(ae_title="FREE")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = [ae.associate("127.0.0.1", srv.port, ae_title="OPENPACS") for _ in range(4)]
    try:
        assert all(a.is_established for a in held)
        time.sleep(0.6)
        assert all(_cpus_per_thread(pid) == everything for pid in srv.pids()[1:])
    finally:
        for assoc in held:
            assoc.release()
