"""Durability: kill -9 mid-ingest, crash leftovers, disk full, a locked index, SIGTERM mid-transfer."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from support import (
    CI,
    CT_IMAGE,
    RawScu,
    ServerProcess,
    blob_path,
    index_rows,
    make_image,
    store_datasets,
    store_pdus,
    stored_instance_files,
)

EXPLICIT = "1.2.840.10008.1.2.1"


def _all_blob_files(data_dir: Path) -> set[Path]:
    """Every blob file holding data. A running server keeps a few empty pre-created files
    ready (blobs/files.py); they hold nothing and are not instances."""
    return {p for p in (data_dir / "blobs").rglob("*.dcm") if p.stat().st_size > 0}


def _empty_blob_files(data_dir: Path) -> set[Path]:
    return {p for p in (data_dir / "blobs").rglob("*.dcm") if p.stat().st_size == 0}


def _check_consistent(data_dir: Path) -> list[dict]:
    """Every row has a readable file, and every file has a row."""
    rows = index_rows(data_dir, "instances")
    files = {blob_path(data_dir, r["blob_key"]) for r in rows}
    for row in rows:
        path = blob_path(data_dir, row["blob_key"])
        ds = pydicom.dcmread(path)
        assert ds.SOPInstanceUID == row["sop_uid"]
        assert path.stat().st_size == row["size"]
        _ = ds.PixelData
    assert _all_blob_files(data_dir) == files
    return rows


def _sender(port: int, acked: list[str], stop: threading.Event, rows: int, tag: int) -> None:
    ae = AE(ae_title=f"CRASH{tag}")
    ae.add_requested_context(CT_IMAGE, EXPLICIT)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="OPENPACS")
    if not assoc.is_established:
        return
    study = generate_uid()
    i = 0
    try:
        while not stop.is_set() and assoc.is_established:
            ds = make_image(
                study_uid=study, rows=rows, columns=rows, seed=tag * 10000 + i, instance_number=i
            )
            rsp = assoc.send_c_store(ds)
            if rsp and rsp.get("Status") == 0:
                acked.append(ds.SOPInstanceUID)
            i += 1
    except Exception:
        pass
    finally:
        if assoc.is_established:
            assoc.abort()


def test_kill_9_during_multi_association_ingest(make_server) -> None:
    """kill -9 while four associations store (small and 8+ MB spooled instances): after the
    restart every acknowledged instance is present and readable, no row lacks its file and no
    file lacks its row."""
    srv = make_server()
    acked: list[str] = []
    stop = threading.Event()
    threads = [
        threading.Thread(target=_sender, args=(srv.port, acked, stop, size, n), daemon=True)
        for n, size in enumerate([32, 32, 64, 2100])  # 2100² × 2 bytes ≈ 8.8 MB: streams to disk
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acked) < 150 and time.monotonic() < deadline:
        time.sleep(0.05)
    # and one 20 MB instance half-way through its transfer (it is being spooled to its blob)
    stalled = RawScu(srv.port, [(CT_IMAGE, [EXPLICIT])])
    pdus = store_pdus(make_image(rows=3200, columns=3200, seed=99))
    for raw in pdus[: len(pdus) // 2]:
        stalled.sock.sendall(raw)
    time.sleep(0.5)
    srv.kill()
    stalled.close()
    stop.set()
    for t in threads:
        t.join(15)
    assert len(acked) >= 150, "ingest did not get going"
    dead_run_files = set((srv.data_dir / "run").glob("*.json"))
    assert dead_run_files  # one per worker process
    srv.start()
    assert "did not stop cleanly" in srv.log()
    # removed: the half-sent 20 MB instance, and the dead workers' unused pre-created (empty)
    # blob files; _check_consistent below proves no file without a row is left
    removed = [int(n) for n in re.findall(r"(\d+) incomplete removed", srv.log())]
    assert sum(removed) >= 1
    assert _empty_blob_files(srv.data_dir) == set()  # nothing stored since the restart
    rows = _check_consistent(srv.data_dir)
    stored = {r["sop_uid"] for r in rows}
    missing = [uid for uid in acked if uid not in stored]
    assert missing == [], f"{len(missing)} acknowledged instances lost"
    # the dead processes' run files are gone, the new ones are there
    live = set((srv.data_dir / "run").glob("*.json"))
    assert live and not live & dead_run_files


def test_crash_leftovers_are_reindexed_or_removed(make_server) -> None:
    """A complete blob without a row (row lost, e.g. power loss after the blob's fsync) is
    re-indexed; a partial blob (transfer cut off) is removed."""
    srv = make_server()
    keep = make_image(seed=1)
    assert store_datasets(srv.port, [keep]) == [(0, None)]
    srv.kill()
    (stored,) = stored_instance_files(srv.data_dir, keep.SOPInstanceUID)
    token = stored.name[:8]  # the blob-key prefix of the worker that stored it
    assert any(
        json.loads(f.read_text())["token"] == token for f in (srv.data_dir / "run").glob("*.json")
    )
    hour_dir = stored.parent
    # a complete instance the index never heard of, written by the dead process
    lost = make_image(seed=2)
    complete = hour_dir / f"{token}{'a' * 24}.dcm"
    lost.save_as(complete, enforce_file_format=True)
    # a transfer cut off in the middle
    partial = hour_dir / f"{token}{'b' * 24}.dcm"
    partial.write_bytes(stored.read_bytes()[:700])
    # a blob of some other (live or foreign) writer must not be touched
    foreign = hour_dir / f"{'f' * 32}.dcm"
    foreign.write_bytes(stored.read_bytes()[:700])
    # a row whose blob never reached the disk (filed while its fsync ran; then the power failed)
    gone = make_image(seed=3)
    srv.start()
    assert store_datasets(srv.port, [gone]) == [(0, None)]
    srv.kill()
    (gone_path,) = stored_instance_files(srv.data_dir, gone.SOPInstanceUID)
    gone_path.unlink()
    token2 = gone_path.name[:8]
    lost2 = gone_path.parent / f"{token2}{'c' * 24}.dcm"
    make_image(seed=4).save_as(lost2, enforce_file_format=True)
    srv.start()
    assert not partial.exists()
    assert foreign.exists()
    foreign.unlink()
    (row,) = index_rows(srv.data_dir, "instances", sop_uid=lost.SOPInstanceUID)
    assert blob_path(srv.data_dir, row["blob_key"]) == complete
    assert "re-indexed" in srv.log()
    assert index_rows(srv.data_dir, "instances", sop_uid=gone.SOPInstanceUID) == []
    assert "1 rows without their blob removed" in srv.log()
    assert lost2.exists() and len(index_rows(srv.data_dir, "instances")) == 3
    _check_consistent(srv.data_dir)


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return r.returncode == 0


def test_disk_full_gives_a700_and_keeps_serving(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "srv")
    blobs = srv.data_dir / "blobs"
    mounted = _mount_tmpfs(blobs, "3m")
    if not mounted:
        if CI:
            pytest.fail(
                "CI runs as root and must be able to mount a small tmpfs for the disk-full test"
            )

        def limit() -> None:  # without mount rights: a file size limit gives EFBIG the same way
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 20, 3 << 20))

        srv.preexec = limit
    try:
        srv.start()
        first = make_image(rows=256, columns=256, seed=1)  # 128 KiB
        assert store_datasets(srv.port, [first]) == [(0, None)]
        big = [make_image(rows=700, columns=700, seed=i) for i in range(2, 8)]  # ~1 MB each
        results = store_datasets(srv.port, big)
        statuses = [s for s, _ in results]
        assert 0xA700 in statuses, results
        failed = [c for s, c in results if s == 0xA700]
        assert all("disk full" in (c or "") for c in failed)
        # what was stored before is intact; nothing partial is indexed
        _check_consistent(srv.data_dir)
        ok = {
            uid
            for uid, (s, _) in zip([d.SOPInstanceUID for d in big], results, strict=True)
            if s == 0
        }
        assert {r["sop_uid"] for r in index_rows(srv.data_dir, "instances")} == ok | {
            first.SOPInstanceUID
        }
        # still serving
        ae = AE()
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", srv.port, ae_title="OPENPACS")
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        assert srv.stop() == 0
        assert _empty_blob_files(srv.data_dir) == set()  # a clean stop deletes unused ones
    finally:
        srv.kill()
        if mounted:
            subprocess.run(["umount", "-l", str(blobs)], check=False)


def test_locked_index_gives_a704_then_recovers(make_server) -> None:
    srv = make_server("[index]\nbusy_timeout = 1.0\n")
    assert store_datasets(srv.port, [make_image(seed=1)]) == [(0, None)]
    blocker = sqlite3.connect(srv.data_dir / "index.sqlite", isolation_level=None, timeout=1)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        [(status, comment)] = store_datasets(srv.port, [make_image(seed=2)])
        assert status == 0xA704
        assert "index unavailable" in comment
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    retry = make_image(seed=3)
    assert store_datasets(srv.port, [retry]) == [(0, None)]
    rows = _check_consistent(srv.data_dir)
    assert len(rows) == 2


def test_sigterm_finishes_the_instance_in_flight(make_server) -> None:
    srv = make_server()
    ds = make_image(rows=512, columns=512)
    scu = RawScu(srv.port, [(CT_IMAGE, [EXPLICIT])])
    # send the command and the first half of the data set, then SIGTERM the server
    pdus = store_pdus(ds)
    half = len(pdus) // 2
    for raw in pdus[:half]:
        scu.sock.sendall(raw)
    time.sleep(0.3)
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    # no new association is accepted now
    with pytest.raises((ConnectionError, OSError)):
        RawScu(srv.port, [(CT_IMAGE, [EXPLICIT])])
    for raw in pdus[half:]:
        scu.sock.sendall(raw)
    rsp = scu.read_response()
    assert rsp.Status == 0
    scu.release()
    assert srv.proc.wait(30) == 0
    (path,) = stored_instance_files(srv.data_dir, ds.SOPInstanceUID)
    assert pydicom.dcmread(path).PixelData == ds.PixelData
    assert list((srv.data_dir / "run").glob("*.json")) == []  # a clean stop
