"""Test support: the real server as a subprocess, external tools, DICOM generation, index reads."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"


def require_tool(name: str) -> str:
    """Path of an external tool; skip when missing, but fail under CI=true."""
    # pynetdicom installs its own echoscu/findscu/storescu... into the venv's bin: skip those, the
    # interoperability tests mean DCMTK's tools.
    venv_bin = os.path.realpath(os.path.join(sys.prefix, "bin"))
    search = os.pathsep.join(
        d
        for d in os.environ.get("PATH", os.defpath).split(os.pathsep)
        if d and os.path.realpath(d) != venv_bin
    )
    path = shutil.which(name, path=search)
    if path is None:
        message = f"{name} is not installed (apt-get install -y dcmtk dicom3tools)"
        if CI:
            pytest.fail(message + " — CI must run interoperability tests")
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tool_env() -> dict[str, str]:
    """DCMTK tools are Nagle-bound without TCP_NODELAY=1."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


class ServerProcess:
    """`openpacs serve` in a subprocess with its own data dir, config and free ports."""

    def __init__(
        self,
        workdir: Path,
        config: str = "",
        ae_title: str = "OPENPACS",
        data_dir: Path | None = None,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir or workdir / "data"
        self.ae_title = ae_title
        self.port = free_port()
        self.http_port = free_port()
        self.hl7_port = free_port()
        self.config_path = workdir / "openpacs.toml"
        self.config_path.write_text(config, encoding="utf-8")
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.preexec: Any = None
        self._log_offset = 0

    def start(self, wait: bool = True) -> ServerProcess:
        self._log_offset = len(self.log())
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "openpacs",
                "serve",
                "--config",
                str(self.config_path),
                "--data-dir",
                str(self.data_dir),
                "--ae-title",
                self.ae_title,
                "--dicom-port",
                str(self.port),
                "--http-port",
                str(self.http_port),
                "--hl7-port",
                str(self.hl7_port),
                "--host",
                "127.0.0.1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=self.preexec,
        )
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if "openpacs ready" in self.log()[self._log_offset :]:
                return
            time.sleep(0.05)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def pids(self) -> list[int]:
        """The server's processes: the master and its worker processes."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [self.proc.pid, *map(int, children)]

    def status_kb(self, field: str) -> dict[int, int]:
        """A size field of /proc/<pid>/status (VmRSS, VmHWM, …) in kB, per server process."""
        sizes: dict[int, int] = {}
        for pid in self.pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(f"{field}:"):
                    sizes[pid] = int(line.split()[1])
        return sizes

    def rss_peak_kb(self) -> int:
        """The largest peak resident set (VmHWM) of any of the server's processes."""
        return max(self.status_kb("VmHWM").values())

    def run_cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "openpacs", *args, "--config", str(self.config_path),
             "--data-dir", str(self.data_dir)],
            capture_output=True, text=True, check=check, timeout=300,
        )  # fmt: skip


@contextlib.contextmanager
def running_server(workdir: Path, config: str = "", **kwargs: Any) -> Iterator[ServerProcess]:
    server = ServerProcess(workdir, config, **kwargs).start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()


# ---------------------------------------------------------------------------- DICOM generation
def make_image(
    *,
    sop_class: str = CT_IMAGE,
    modality: str = "CT",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_id: str = "PID-1",
    patient_name: str = "Doe^John",
    rows: int = 16,
    columns: int = 16,
    instance_number: int = 1,
    seed: int = 0,
    charset: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    **extra: Any,
) -> Dataset:
    """A small, complete-enough image instance with plausible pixel data and a file meta."""
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyDate = "20260115"
    ds.StudyTime = "093012.123"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = modality
    ds.Manufacturer = "openpacs tests"
    ds.ReferringPhysicianName = "Ref^Doctor"
    ds.StudyDescription = "Test study"
    ds.SeriesDescription = "Test series"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(seed)
    pixels = (rng.integers(0, 4096, size=(rows, columns))).astype(np.uint16)
    ds.PixelData = pixels.tobytes()
    for key, value in extra.items():
        setattr(ds, key, value)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    return ds


def dataset_bytes_of_file(path: Path) -> bytes:
    """The data set part of a Part 10 file (everything after the File Meta Information)."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with open(path, "rb") as fh:
        read_preamble(fh, False)
        _read_file_meta_info(fh)
        return fh.read()


# ---------------------------------------------------------------------------- index reads
def index_rows(data_dir: Path, table: str, **where: Any) -> list[dict[str, Any]]:
    import sqlite3

    conn = sqlite3.connect(f"file:{data_dir / 'index.sqlite'}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        sql = f"SELECT * FROM {table}"
        params: list[Any] = []
        if where:
            sql += " WHERE " + " AND ".join(f"{k} = ?" for k in where)
            params = list(where.values())
        return [dict(r) for r in conn.execute(sql + " ORDER BY pk", params)]
    finally:
        conn.close()


def blob_files(data_dir: Path) -> list[Path]:
    """The blob files that hold data. A running server keeps a few empty pre-created files
    ready for the next instances (blobs/files.py): they are not instances."""
    return sorted(p for p in (data_dir / "blobs").rglob("*.dcm") if p.stat().st_size > 0)


def blob_path(data_dir: Path, key: str) -> Path:
    return data_dir / "blobs" / f"{key}.dcm"


def stored_instance_files(data_dir: Path, sop_uid: str) -> list[Path]:
    return [
        blob_path(data_dir, r["blob_key"])
        for r in index_rows(data_dir, "instances", sop_uid=sop_uid)
    ]


# ---------------------------------------------------------------------------- pynetdicom SCU
def store_datasets(
    port: int,
    datasets: Sequence[Dataset],
    *,
    called: str = "OPENPACS",
    calling: str = "TESTSCU",
) -> list[tuple[int, str | None]]:
    """C-STORE each data set on one association; (status, error comment) per data set."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    seen: set[tuple[str, str]] = set()
    for ds in datasets:
        key = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        if key not in seen:
            ae.add_requested_context(key[0], key[1])
            seen.add(key)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association not established"
    out: list[tuple[int, str | None]] = []
    try:
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            assert rsp, "no C-STORE response (association aborted?)"
            out.append((int(rsp.Status), rsp.get("ErrorComment")))
    finally:
        assoc.release()
    return out


def shipped(name: str) -> Path:
    """A test file shipped inside the pydicom package (never downloaded)."""
    import pydicom

    base = Path(pydicom.__file__).parent / "data"
    for sub in ("test_files", "charset_files"):
        path = base / sub / name
        if path.exists():
            return path
    raise FileNotFoundError(f"{name} is not shipped with pydicom {pydicom.__version__}")


# ---------------------------------------------------------------------------- raw DIMSE peer
VERIFICATION_UID = "1.2.840.10008.1.1"


def associate_rq(
    called: str = "OPENPACS",
    calling: str = "RAWSCU",
    contexts: Sequence[tuple[str, Sequence[str]]] | None = None,
    app_context: str = "1.2.840.10008.3.1.1.1",
    max_pdu: int = 16384,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU encoded by pynetdicom (an independent encoder)."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = app_context
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    items = []
    for i, (abstract, syntaxes) in enumerate(
        contexts or [(VERIFICATION_UID, ["1.2.840.10008.1.2"])]
    ):
        cx = build_context(abstract, list(syntaxes))
        cx.context_id = 2 * i + 1
        items.append(cx)
    primitive.presentation_context_definition_list = items
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    primitive.user_information = [max_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def recv_pdu(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes]:
    import struct

    sock.settimeout(timeout)

    def exact(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("connection closed")
            out += chunk
        return out

    header = exact(6)
    pdu_type, length = struct.unpack(">BxI", header)
    return pdu_type, header + exact(length)


class RawScu:
    """A DIMSE peer built from pynetdicom's encoders that can send what a correct SCU would not:
    a command that disagrees with its data set, undecodable data sets, arbitrary PDUs."""

    def __init__(
        self, port: int, contexts: Sequence[tuple[str, Sequence[str]]], called: str = "OPENPACS"
    ) -> None:
        from pynetdicom.pdu import A_ASSOCIATE_AC

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(associate_rq(called=called, contexts=contexts))
        pdu_type, raw = recv_pdu(self.sock)
        if pdu_type != 0x02:
            raise ConnectionError(f"association not accepted (PDU type {pdu_type:#x})")
        ac = A_ASSOCIATE_AC()
        ac.decode(raw)
        self.accepted = {
            cx.context_id: str(cx.transfer_syntax[0])
            for cx in ac.to_primitive().presentation_context_definition_results_list
            if cx.result == 0
        }
        self.message_id = 0

    def send_store(
        self,
        context_id: int,
        sop_class: str,
        sop_instance: str,
        dataset: bytes,
        max_pdu: int = 16384,
    ) -> None:
        from pynetdicom.dimse_messages import C_STORE_RQ
        from pynetdicom.dimse_primitives import C_STORE
        from pynetdicom.pdu import P_DATA_TF

        self.message_id += 1
        primitive = C_STORE()
        primitive.MessageID = self.message_id
        primitive.AffectedSOPClassUID = sop_class
        primitive.AffectedSOPInstanceUID = sop_instance
        primitive.Priority = 2
        primitive.DataSet = io.BytesIO(dataset)
        message = C_STORE_RQ()
        message.primitive_to_message(primitive)
        for p_data in message.encode_msg(context_id, max_pdu):
            pdu = P_DATA_TF()
            pdu.from_primitive(p_data)
            self.sock.sendall(pdu.encode())

    def read_response(self, timeout: float = 30.0) -> Dataset:
        from pydicom.filereader import read_dataset

        data = b""
        while True:
            pdu_type, raw = recv_pdu(self.sock, timeout)
            if pdu_type != 0x04:
                raise ConnectionError(f"expected P-DATA-TF, got PDU type {pdu_type:#x}")
            pos = 6
            last = False
            while pos < len(raw):
                length = int.from_bytes(raw[pos : pos + 4], "big")
                control = raw[pos + 5]
                data += raw[pos + 6 : pos + 4 + length]
                last = bool(control & 0x02)
                pos += 4 + length
            if last:
                return read_dataset(io.BytesIO(data), True, True)

    def store(self, context_id: int, sop_class: str, sop_instance: str, dataset: bytes) -> Dataset:
        self.send_store(context_id, sop_class, sop_instance, dataset)
        return self.read_response()

    def release(self) -> None:
        self.sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        with contextlib.suppress(OSError, ConnectionError):
            recv_pdu(self.sock, 5)
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


def encode_dataset(ds: Dataset, implicit: bool = False, little: bool = True) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = little, implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def store_pdus(ds: Dataset, context_id: int = 1) -> list[bytes]:
    """The P-DATA-TF PDUs of one C-STORE-RQ, encoded by pynetdicom."""
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu import P_DATA_TF

    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = ds.SOPClassUID
    primitive.AffectedSOPInstanceUID = ds.SOPInstanceUID
    primitive.Priority = 2
    primitive.DataSet = io.BytesIO(encode_dataset(ds))
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    out = []
    for p_data in message.encode_msg(context_id, 16384):
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        out.append(pdu.encode())
    return out


# ---------------------------------------------------------------------------- PostgreSQL
PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1/postgres"


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database on the local server, dropped afterwards; yields its URL.
    Skips when no server answers — fails under CI=true, which must test PostgreSQL."""
    import uuid

    import sqlalchemy as sa

    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect():
            pass
    except Exception:
        admin.dispose()
        if CI:
            pytest.fail("PostgreSQL at 127.0.0.1:5432 is required in CI")
        pytest.skip("PostgreSQL not reachable")
    name = f"openpacs_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1/{name}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
