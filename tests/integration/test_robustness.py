"""Bad input never hurts stored data: oversized PDUs, vanishing peers, and a bounded fuzz run of
random PDUs and mutated data sets over a real socket."""

from __future__ import annotations

import io
import random
import socket
import struct
import time
from pathlib import Path

import pydicom
from pynetdicom import AE
from support import (
    CT_IMAGE,
    MR_IMAGE,
    RawScu,
    associate_rq,
    blob_files,
    blob_path,
    encode_dataset,
    index_rows,
    make_image,
    recv_pdu,
    shipped,
    store_datasets,
    store_pdus,
    stored_instance_files,
)

from openpacs.dicom.header import DatasetFormatError, scan_part10

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"


def _echo_ok(port: int) -> bool:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="OPENPACS")
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().Status == 0
    assoc.release()
    return ok


def _rows_have_intact_files(data_dir: Path) -> list[dict]:
    rows = index_rows(data_dir, "instances")
    for row in rows:
        path = blob_path(data_dir, row["blob_key"])
        assert path.stat().st_size == row["size"]
        scan_part10(path.read_bytes())  # a complete, structurally valid Part 10 file
    assert {blob_path(data_dir, r["blob_key"]) for r in rows} == set(blob_files(data_dir))
    return rows


def test_pdu_larger_than_negotiated_maximum_is_aborted(make_server) -> None:
    srv = make_server("[dicom]\nmax_pdu = 4096\n")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(associate_rq(contexts=[(CT_IMAGE, [EXPLICIT])]))
        pdu_type, _ = recv_pdu(sock)
        assert pdu_type == 0x02
        body = b"\x00" * 10000
        pdv = struct.pack(">IBB", len(body) + 2, 1, 0x03) + body
        sock.sendall(struct.pack(">BxI", 0x04, len(pdv)) + pdv)
        pdu_type, raw = recv_pdu(sock)
        assert pdu_type == 0x07
        assert (raw[8], raw[9]) == (2, 6)  # service provider, invalid PDU parameter value
    assert "exceeds the negotiated maximum 4096" in srv.log()
    assert _echo_ok(srv.port)


def test_peer_vanishing_mid_transfer_leaves_nothing(server) -> None:
    baseline = make_image(seed=1)
    assert store_datasets(server.port, [baseline]) == [(0, None)]
    for rows in (64, 2200):  # in memory, and spooled to its blob file (> 8 MB)
        ds = make_image(rows=rows, columns=rows, seed=rows)
        scu = RawScu(server.port, [(CT_IMAGE, [EXPLICIT])])
        pdus = store_pdus(ds)
        for raw in pdus[: len(pdus) * 3 // 4]:  # the command and most of the data set
            scu.sock.sendall(raw)
        time.sleep(0.3)
        scu.sock.close()
    deadline = time.monotonic() + 10
    while "connection lost" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    rows = _rows_have_intact_files(server.data_dir)
    assert [r["sop_uid"] for r in rows] == [baseline.SOPInstanceUID]
    assert _echo_ok(server.port)


def _mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:  # flip bytes
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif kind == 1:  # truncate
        del buf[rng.randrange(len(buf)) :]
    elif kind == 2:  # insert garbage
        pos = rng.randrange(len(buf))
        buf[pos:pos] = rng.randbytes(rng.randint(1, 16))
    elif kind == 3:  # corrupt a length field near an element header
        pos = rng.randrange(0, max(1, len(buf) - 8), 2)
        buf[pos + 4 : pos + 8] = struct.pack(
            "<I", rng.choice([0xFFFFFFFF, 0x7FFFFFFF, rng.randrange(1 << 16)])
        )
    else:  # duplicate a slice
        a = rng.randrange(len(buf))
        b = min(len(buf), a + rng.randint(1, 64))
        buf[a:a] = buf[a:b]
    return bytes(buf)


def _random_pdu(rng: random.Random) -> bytes:
    pdu_type = rng.choice([0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x00, 0x08, 0xFF])
    body = rng.randbytes(rng.randint(0, 300))
    length = len(body) if rng.random() < 0.8 else rng.choice([0, 3, 0xFFFFFFFF, len(body) + 50])
    return struct.pack(">BxI", pdu_type, length & 0xFFFFFFFF) + body


def _drain(sock: socket.socket, seconds: float = 0.3) -> None:
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


def test_bounded_fuzz_over_a_real_socket(make_server) -> None:
    srv = make_server("[dicom]\nartim_timeout = 1\nnetwork_timeout = 1\n")
    baseline = [make_image(seed=i) for i in range(3)] + [
        make_image(sop_class=MR_IMAGE, modality="MR", seed=9)
    ]
    assert store_datasets(srv.port, baseline) == [(0, None)] * 4
    originals = {
        ds.SOPInstanceUID: stored_instance_files(srv.data_dir, ds.SOPInstanceUID)[0].read_bytes()
        for ds in baseline
    }
    seeds = [
        encode_dataset(make_image(seed=100)),
        encode_dataset(pydicom.dcmread(shipped("CT_small.dcm"))),  # private tags, sequences
    ]
    rng = random.Random(20261125)
    statuses: dict[int, int] = {}
    for i in range(240):
        case = rng.randrange(4)
        try:
            if case == 0:  # garbage instead of an association request
                with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
                    sock.sendall(rng.randbytes(rng.randint(1, 200)))
                    _drain(sock)
            elif case == 1:  # a mutated A-ASSOCIATE-RQ
                rq = _mutate(associate_rq(contexts=[(CT_IMAGE, [EXPLICIT, IMPLICIT])]), rng)
                with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
                    sock.sendall(rq)
                    _drain(sock)
            elif case == 2:  # random PDUs on an established association
                scu = RawScu(srv.port, [(CT_IMAGE, [EXPLICIT])])
                for _ in range(rng.randint(1, 3)):
                    scu.sock.sendall(_random_pdu(rng))
                _drain(scu.sock)
                scu.close()
            else:  # a C-STORE with a mutated data set
                scu = RawScu(srv.port, [(CT_IMAGE, [EXPLICIT]), (MR_IMAGE, [EXPLICIT])])
                data = _mutate(rng.choice(seeds), rng)
                try:
                    ds_uid = (
                        pydicom.dcmread(io.BytesIO(data), force=True).get("SOPInstanceUID")
                        or "1.2.3"
                    )
                except Exception:
                    ds_uid = "1.2.3"
                rsp = scu.store(1, CT_IMAGE, str(ds_uid), data)
                statuses[int(rsp.Status)] = statuses.get(int(rsp.Status), 0) + 1
                scu.release()
        except (OSError, ConnectionError):
            pass  # the server may abort or close: that is an allowed answer
        if i % 40 == 39:
            assert _echo_ok(srv.port), f"server stopped answering after case {i}"
    assert _echo_ok(srv.port)
    assert srv.proc is not None and srv.proc.poll() is None
    log = srv.log()
    assert "internal error" not in log and "Traceback" not in log
    # stored data untouched, nothing partial indexed
    for uid, raw in originals.items():
        assert stored_instance_files(srv.data_dir, uid)[0].read_bytes() == raw
    _rows_have_intact_files(srv.data_dir)
    # the fuzzed stores got real answers (refusals as well as successes)
    assert sum(statuses.values()) > 20
    assert any(code != 0 for code in statuses), statuses


def test_scan_rejects_what_it_cannot_parse() -> None:
    """The archive's validation in miniature: truncated data → DatasetFormatError."""
    raw = shipped("CT_small.dcm").read_bytes()
    try:
        scan_part10(raw[:-100])
    except DatasetFormatError:
        return
    raise AssertionError("a truncated file was accepted")
