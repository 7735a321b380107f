"""The command line: serve flags and config errors, import, studies; log lines."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
from support import (
    ServerProcess,
    encode_dataset,
    free_port,
    index_rows,
    make_image,
    shipped,
    store_datasets,
    stored_instance_files,
)


def run(
    *args: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "openpacs", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)  # fmt: skip


def test_invalid_config_stops_startup_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[dicom]\nmax_pdu = 1024\n[storage]\nduplicate_policy = "twice"\n')
    r = run(
        "serve",
        "--config",
        str(bad),
        "--data-dir",
        str(tmp_path / "d"),
        "--dicom-port",
        str(free_port()),
    )
    assert r.returncode == 2
    assert "dicom.max_pdu" in r.stderr and "4096" in r.stderr
    assert not (tmp_path / "d").exists()  # nothing started
    r = run("serve", "--ae-title", "THIS_IS_FAR_TOO_LONG", "--data-dir", str(tmp_path / "d"))
    assert r.returncode == 2 and "--ae-title" in r.stderr


def test_flags_override_config_file(tmp_path: Path) -> None:
    srv = ServerProcess(
        tmp_path / "s", '[dicom]\nae_title = "FROMFILE"\nport = 1\n', ae_title="FROMFLAG"
    )
    srv.start()
    try:
        assert f"DICOM listener on 127.0.0.1:{srv.port}, AE title FROMFLAG" in srv.log()
        assert store_datasets(srv.port, [make_image()], called="FROMFLAG") == [(0, None)]
    finally:
        assert srv.stop() == 0


def test_log_lines_per_association_and_instance(server) -> None:
    datasets = [make_image(seed=i) for i in range(3)]
    store_datasets(server.port, datasets, calling="LOGSCU")
    log = server.log()
    assert log.count("association accepted: LOGSCU -> OPENPACS") == 1
    assert log.count("association released: LOGSCU -> OPENPACS") == 1
    for ds in datasets:
        assert f"stored CT {ds.SOPInstanceUID}" in log


def test_default_data_dir_is_openpacs_data(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "openpacs", "serve", "--dicom-port", str(port), "--host", "127.0.0.1"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        assert store_datasets_when_up(port) == [(0, None)]
    finally:
        proc.terminate()
        out, _ = proc.communicate(30)
    assert proc.returncode == 0, out
    assert (tmp_path / "openpacs-data" / "index.sqlite").exists()
    assert list((tmp_path / "openpacs-data" / "blobs").rglob("*.dcm"))


def store_datasets_when_up(port: int) -> list[tuple[int, str | None]]:
    import socket
    import time

    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    return store_datasets(port, [make_image()])


def test_import_folders_summary_and_exit_code(tmp_path: Path) -> None:
    src = tmp_path / "incoming"
    (src / "a" / "b").mkdir(parents=True)
    good = [make_image(seed=i) for i in range(4)]
    for i, ds in enumerate(good):
        ds.save_as(src / ("a" if i % 2 else "a/b") / f"img{i}.dcm", enforce_file_format=True)
    shutil.copy(shipped("MR_small_RLE.dcm"), src / "rle.dcm")
    shutil.copy(shipped("CT_small.dcm"), src / "a" / "again.dcm")
    shutil.copy(shipped("CT_small.dcm"), src / "again2.dcm")  # a duplicate
    (src / "notes.txt").write_text("not DICOM")
    shutil.copy(shipped("rtplan_truncated.dcm"), src / "truncated.dcm")
    # a bare data set without File Meta (older files)
    bare = make_image(seed=99)
    (src / "bare.dcm").write_bytes(encode_dataset(bare, implicit=True))
    (src / "DICOMDIR").write_bytes(b"")  # the directory record file is not an instance
    data = tmp_path / "data"
    r = run("import", "--data-dir", str(data), "-q", str(src))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "stored: 7  duplicates: 1  failed: 2" in r.stdout
    assert "notes.txt" in r.stdout and "truncated.dcm" in r.stdout
    for ds in [*good, bare]:
        (path,) = stored_instance_files(data, ds.SOPInstanceUID)
        assert pydicom.dcmread(path).PixelData == ds.PixelData
    # the bare data set got a File Meta in front of its unchanged bytes
    (path,) = stored_instance_files(data, bare.SOPInstanceUID)
    assert path.read_bytes().endswith((src / "bare.dcm").read_bytes())
    # imported files are stored byte for byte
    (path,) = stored_instance_files(
        data, pydicom.dcmread(shipped("MR_small_RLE.dcm")).SOPInstanceUID
    )
    assert path.read_bytes() == shipped("MR_small_RLE.dcm").read_bytes()
    # everything good → exit 0; and `studies` lists what is there
    r = run("import", "--data-dir", str(data), "-q", str(src / "a"))
    assert r.returncode == 0 and "stored: 0  duplicates: 5  failed: 0" in r.stdout
    r = run("studies", "--data-dir", str(data))
    assert r.returncode == 0
    assert f"{len(index_rows(data, 'studies'))} studies" in r.stdout
    assert "CompressedSamples^CT1" in r.stdout


def test_import_while_the_server_runs(server, tmp_path: Path) -> None:
    src = tmp_path / "files"
    src.mkdir()
    files = [make_image(seed=i) for i in range(20)]
    for i, ds in enumerate(files):
        ds.save_as(src / f"{i}.dcm", enforce_file_format=True)
    live = [make_image(seed=100 + i) for i in range(20)]
    proc = subprocess.Popen([sys.executable, "-m", "openpacs", "import", "-q", "--data-dir", str(server.data_dir), str(src)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert store_datasets(server.port, live) == [(0, None)] * 20
    out, _ = proc.communicate(120)
    assert proc.returncode == 0, out
    assert len(index_rows(server.data_dir, "instances")) == 40
    assert list((server.data_dir / "run").glob("*.json")) != []  # the server's registration stays
