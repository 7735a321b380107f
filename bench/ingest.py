#!/usr/bin/env python3
"""Ingest (C-STORE) benchmark: openpacs against Orthanc and DCMTK storescp.

What it measures
----------------
Instances per second that a DICOM storage SCP accepts over loopback from
DCMTK ``storescu``, for the same synthetic corpus, in one run, for three peers:

* ``openpacs`` -- ``.venv/bin/openpacs serve`` (reported as "n/a: not
  installed" while the console script does not exist);
* ``orthanc``  -- the Debian ``/usr/sbin/Orthanc`` with its default settings
  (config written to a temp dir: storage + SQLite index there, no plugins);
* ``storescp`` -- DCMTK ``storescp --fork``: writes files, no index, no fsync;
  the floor of what a receiver over DCMTK networking can do on this machine.

How
---
* Corpora are generated once with pydicom + numpy into ``bench/.work/`` and
  reused: ``ct512`` (1,000 CT 512x512 int16, 10 studies x 2 series x 50) and
  ``small64`` (10,000 MR 64x64 uint16, 100 studies x 100), all Explicit VR
  Little Endian, plus a 20-instance ``warmup`` corpus (MR 64x64).
* For every (corpus, associations, repeat, peer) the peer is started on free
  loopback ports with a fresh, empty data directory, readiness is polled with
  ``echoscu`` (up to 30 s), the 20 warm-up instances are sent untimed, the
  machine is quiesced (``sync(2)``, then up to 15 s waiting for idle CPUs), then
  the corpus is split into N contiguous equal shards (whole studies per shard
  where the sizes allow) and N ``storescu`` processes are launched at once. The time
  is the wall clock from launching the first ``storescu`` to the exit of the
  last. Every ``storescu`` must exit 0 and the peer must hold exactly
  warm-up + corpus instances (storescp: files in its output dir; Orthanc:
  ``GET /statistics`` CountInstances; openpacs: non-empty ``*.dcm`` under DIR/blobs),
  otherwise the run is FAILED (a cell of several runs is then the median of the
  others, marked ``*``; FAILED when none succeeded). The peer is then stopped with SIGTERM.
* Sender and DCMTK-based receivers run with ``TCP_NODELAY=1`` (DCMTK otherwise
  leaves Nagle on and ingest is latency-bound at ~20 inst/s). ``storescu``
  proposes only Explicit VR Little Endian (a ``-xf`` profile), the corpus's
  own transfer syntax, so nothing is transcoded on either side.
* With ``--repeat N`` each cell is the median (or ``--stat best``) of N runs.
* A run during which other processes or the hypervisor (steal) took more than 10 % of the
  CPUs is measured again, up to ``--redo`` times (default 2), whichever the peer; the
  discarded runs are printed and kept in the JSON.
* The CPU time of each timed send is split (``/proc``) into peer, senders,
  kernel threads and "other"; a run during which other processes were busy is
  flagged, since developer machines are shared.

Run by hand only, never from the test suite::

    .venv/bin/python bench/ingest.py --limit 200          # quick look
    .venv/bin/python bench/ingest.py --json results.json  # full corpora
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WORK_DIR = BENCH_DIR / ".work"
DEFAULT_OPENPACS = REPO_DIR / ".venv" / "bin" / "openpacs"
ORTHANC_BIN = "/usr/sbin/Orthanc"

CORPORA = ("ct512", "small64")
PEERS = ("openpacs", "orthanc", "storescp")
SENDER_AET = "BENCH"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
# Ports that a developer may have something listening on: never use them.
RESERVED_PORTS = frozenset({104, 2575, 4242, 8042, 8080, 11112})

# Bump when the generated content changes, so stale corpora get rebuilt.
GENERATOR_VERSION = 1


# --------------------------------------------------------------------------
# Process bookkeeping: every process this script starts is tracked here and
# killed (by its own pid / process group, nothing else) if the script dies.
# --------------------------------------------------------------------------

_LIVE: set[subprocess.Popen[bytes]] = set()


def _spawn(
    cmd: Sequence[str],
    *,
    log: Path | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    out: Any = subprocess.DEVNULL
    if log is not None:
        out = log.open("ab")
    try:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=new_session,
        )
    finally:
        if log is not None:
            out.close()
    _LIVE.add(proc)
    return proc


def _reap(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    _LIVE.discard(proc)
    return rc


def _kill_hard(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process we started, and its group if it leads its own session."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    _reap(proc, 10)


def _kill_group_leftovers(proc: subprocess.Popen[bytes]) -> None:
    """After a session leader exited, SIGKILL what is left in its group (forked children)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@atexit.register
def _cleanup_live() -> None:
    for proc in list(_LIVE):
        if proc.poll() is None:
            _kill_hard(proc)


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


# --------------------------------------------------------------------------
# Corpus generation (pydicom + numpy), cached under bench/.work/<name>/
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    name: str
    kind: str  # "ct" or "mr"
    studies: int
    series_per_study: int
    instances_per_series: int
    size: int
    seed: int

    @property
    def count(self) -> int:
        return self.studies * self.series_per_study * self.instances_per_series


SPECS: dict[str, CorpusSpec] = {
    "ct512": CorpusSpec("ct512", "ct", 10, 2, 50, 512, seed=512),
    "small64": CorpusSpec("small64", "mr", 100, 1, 100, 64, seed=64),
    "warmup": CorpusSpec("warmup", "mr", 1, 1, 20, 64, seed=20),
}


def _uid(*parts: object) -> str:
    """Deterministic UID (same corpus bytes on every machine)."""
    return generate_uid(entropy_srcs=["openpacs-bench", *(str(p) for p in parts)])


def _ct_pixels(rng: np.random.Generator, z_mm: float, spacing: float) -> np.ndarray:
    """512x512 stored values (HU + 1024) of a smooth thorax-like phantom + noise."""
    n = 512
    coords = (np.arange(n, dtype=np.float32) - (n - 1) / 2) * spacing
    x = coords[np.newaxis, :]
    y = coords[:, np.newaxis]
    s = np.float32(0.9 + 0.1 * np.cos(z_mm / 250.0 * np.pi))
    hu = np.full((n, n), -1000.0, dtype=np.float32)
    body = (x / (165 * s)) ** 2 + (y / (115 * s)) ** 2
    hu[body <= 1.0] = -90.0  # subcutaneous fat
    hu[body <= 0.88] = 40.0  # soft tissue
    for cx in (-70.0, 70.0):  # lungs
        lung = ((x - cx * s) / (50 * s)) ** 2 + ((y + 5) / (70 * s)) ** 2
        hu[lung <= 1.0] = -850.0
    heart = ((x + 15) / 45) ** 2 + ((y + 25) / 40) ** 2
    hu[heart <= 1.0] = 45.0
    aorta = (x - 10) ** 2 + (y - 35) ** 2
    hu[aorta <= 12.0**2] = 180.0
    spine = x**2 + (y - 80 * s) ** 2
    hu[spine <= 17.0**2] = 700.0
    hu[spine <= 12.0**2] = 250.0
    hu += rng.normal(0.0, 12.0, size=(n, n)).astype(np.float32)
    stored: np.ndarray = np.clip(np.rint(hu + 1024.0), -2048, 2047).astype("<i2")
    # Outside the reconstruction circle: padding value, as GE-style scanners do.
    stored[(x**2 + y**2) > (n / 2 * spacing) ** 2] = -2000
    return stored


def _mr_pixels(rng: np.random.Generator, n: int, phase: float) -> np.ndarray:
    """n x n uint16 (12 bits used) smooth blob phantom + Rician-ish noise."""
    coords = np.linspace(-1.0, 1.0, n, dtype=np.float32)
    x = coords[np.newaxis, :]
    y = coords[:, np.newaxis]
    img = 1800.0 * np.exp(-((x / 0.7) ** 2 + (y / 0.85) ** 2) * 2.0)
    img += 900.0 * np.exp(-(((x - 0.3 * np.cos(phase)) / 0.2) ** 2 + ((y - 0.2) / 0.25) ** 2))
    img += np.abs(rng.normal(0.0, 40.0, size=(n, n)))
    out: np.ndarray = np.clip(np.rint(img), 0, 4095).astype("<u2")
    return out


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "OPBENCH_1"
    return meta


def _common_header(ds: Dataset, spec: CorpusSpec, study: int) -> None:
    """Patient, study, equipment attributes shared by both kinds."""
    date = dt.date(2026, 1, 5) + dt.timedelta(days=study)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = f"BENCH^{spec.name.upper()}^{study:03d}"
    ds.PatientID = f"{spec.name.upper()}-{study:04d}"
    ds.PatientBirthDate = f"{1940 + study % 60:04d}0{1 + study % 9}15"
    ds.PatientSex = "MF"[study % 2]
    ds.PatientAge = f"{(2026 - 1940 - study % 60):03d}Y"
    ds.PatientWeight = f"{60 + study % 40}"
    ds.PatientSize = f"{1.60 + (study % 30) / 100:.2f}"
    ds.StudyInstanceUID = _uid(spec.name, "study", study)
    ds.StudyDate = date.strftime("%Y%m%d")
    ds.StudyTime = f"{8 + study % 10:02d}{study % 60:02d}00"
    ds.StudyID = f"{study + 1}"
    ds.AccessionNumber = f"ACC{spec.seed:03d}{study:05d}"
    ds.ReferringPhysicianName = "REFERRER^RITA"
    ds.InstitutionName = "OPENPACS BENCH HOSPITAL"
    ds.InstitutionAddress = "1 Loopback Road"
    ds.StationName = f"{spec.kind.upper()}01"
    ds.InstitutionalDepartmentName = "RADIOLOGY"
    ds.OperatorsName = "TECH^TOM"
    ds.PerformingPhysicianName = "RADIOLOGIST^RAY"
    ds.DeviceSerialNumber = "SN-000123"
    ds.SoftwareVersions = "bench-1"
    ds.PositionReferenceIndicator = ""
    ds.BurnedInAnnotation = "NO"
    ds.PatientPosition = "HFS"


def _ct_dataset(spec: CorpusSpec, study: int, series: int, inst: int) -> Dataset:
    spacing = 0.703125
    thickness = 5.0 if series == 0 else 2.5
    z = -inst * thickness
    sop = _uid(spec.name, "sop", study, series, inst)
    ds = Dataset()
    ds.file_meta = _file_meta(CTImageStorage, sop)
    _common_header(ds, spec, study)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.InstanceCreationDate = ds.StudyDate
    ds.InstanceCreationTime = ds.StudyTime
    ds.StudyDescription = "CT THORAX WITH CONTRAST"
    ds.Modality = "CT"
    ds.Manufacturer = "OPENPACS BENCH"
    ds.ManufacturerModelName = "SYNTH CT 64"
    ds.SeriesInstanceUID = _uid(spec.name, "series", study, series)
    ds.SeriesNumber = series + 2
    ds.SeriesDescription = ["THORAX 5.0 B30f", "THORAX 2.5 B70f"][series]
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.ProtocolName = "THORAX_ROUTINE"
    ds.BodyPartExamined = "CHEST"
    ds.FrameOfReferenceUID = _uid(spec.name, "for", study)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = inst + 1
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = ds.StudyDate
    ds.AcquisitionTime = ds.StudyTime
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.ImagePositionPatient = [f"{-(511 * spacing) / 2:.4f}", f"{-(511 * spacing) / 2:.4f}", z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [spacing, spacing]
    ds.SliceThickness = thickness
    ds.SliceLocation = z
    ds.KVP = 120
    ds.DataCollectionDiameter = 500
    ds.ReconstructionDiameter = f"{512 * spacing:.1f}"
    ds.DistanceSourceToDetector = 1040
    ds.DistanceSourceToPatient = 570
    ds.GantryDetectorTilt = 0
    ds.TableHeight = 160
    ds.RotationDirection = "CW"
    ds.ExposureTime = 500
    ds.XRayTubeCurrent = 250
    ds.Exposure = 125
    ds.FilterType = "BODY"
    ds.GeneratorPower = 30
    ds.FocalSpots = 1.2
    ds.ConvolutionKernel = ["B30f", "B70f"][series]
    ds.RevolutionTime = 0.5
    ds.SingleCollimationWidth = 0.625
    ds.TotalCollimationWidth = 40
    ds.TableSpeed = 55
    ds.SpiralPitchFactor = 1.375
    ds.CTDIvol = 9.8
    ds.ScanOptions = "HELICAL MODE"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.size
    ds.Columns = spec.size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 1
    ds.PixelPaddingValue = -2000
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = [40, -600]
    ds.WindowWidth = [400, 1500]
    ds.WindowCenterWidthExplanation = ["MEDIASTINUM", "LUNG"]
    rng = np.random.default_rng([spec.seed, study, series, inst])
    ds.PixelData = _ct_pixels(rng, z, spacing).tobytes()
    return ds


def _mr_dataset(spec: CorpusSpec, study: int, series: int, inst: int) -> Dataset:
    sop = _uid(spec.name, "sop", study, series, inst)
    ds = Dataset()
    ds.file_meta = _file_meta(MRImageStorage, sop)
    _common_header(ds, spec, study)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyDescription = "MR BRAIN"
    ds.Modality = "MR"
    ds.Manufacturer = "OPENPACS BENCH"
    ds.ManufacturerModelName = "SYNTH MR 1.5T"
    ds.SeriesInstanceUID = _uid(spec.name, "series", study, series)
    ds.SeriesNumber = series + 1
    ds.SeriesDescription = "T2 TSE AX"
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.BodyPartExamined = "HEAD"
    ds.FrameOfReferenceUID = _uid(spec.name, "for", study)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.InstanceNumber = inst + 1
    ds.AcquisitionNumber = 1
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "SK"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime = 4000
    ds.EchoTime = 90
    ds.EchoTrainLength = 15
    ds.MagneticFieldStrength = 1.5
    ds.ImagedNucleus = "1H"
    ds.ImagePositionPatient = [-120, -120, inst * 1.5]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [240 / spec.size, 240 / spec.size]
    ds.SliceThickness = 1.5
    ds.SliceLocation = inst * 1.5
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.size
    ds.Columns = spec.size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 1200
    ds.WindowWidth = 2400
    rng = np.random.default_rng([spec.seed, study, series, inst])
    ds.PixelData = _mr_pixels(rng, spec.size, phase=inst / 10).tobytes()
    return ds


def ensure_corpus(name: str) -> list[Path]:
    """Return the corpus files in send order, generating them if needed."""
    spec = SPECS[name]
    target = WORK_DIR / name
    manifest = target / "manifest.json"
    want = {"generator": GENERATOR_VERSION, "spec": dataclasses.asdict(spec)}
    if manifest.is_file():
        have = json.loads(manifest.read_text())
        if {k: have.get(k) for k in want} == want:
            files = [target / f for f in have["files"]]
            if all(f.is_file() for f in files):
                return files
    print(f"generating corpus {name} ({spec.count} instances) in {target} ...", file=sys.stderr)
    t0 = time.perf_counter()
    tmp = WORK_DIR / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    make = _ct_dataset if spec.kind == "ct" else _mr_dataset
    names: list[str] = []
    idx = 0
    for study in range(spec.studies):
        for series in range(spec.series_per_study):
            for inst in range(spec.instances_per_series):
                fname = f"{idx:05d}.dcm"
                make(spec, study, series, inst).save_as(tmp / fname, enforce_file_format=True)
                names.append(fname)
                idx += 1
    (tmp / "manifest.json").write_text(json.dumps({**want, "files": names}, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    print(f"  done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return [target / f for f in names]


def _warm_page_cache(files: Sequence[Path]) -> None:
    for f in files:
        with f.open("rb") as fh:
            while fh.read(1 << 20):
                pass


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """n distinct free loopback TCP ports (never a well-known DICOM/HTTP default)."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            socks.append(s)
            if port not in RESERVED_PORTS:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def dcmtk_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def dcmtk_bin_dir(tool: str) -> str | None:
    """The directory of DCMTK's *tool* (not pynetdicom's tool of the same name from an
    activated venv)."""
    for d in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin"]:
        exe = Path(d) / tool
        if exe.is_file() and "dcmtk" in _first_line([str(exe), "--version"]).lower():
            return d
    return None


def _first_line(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=20, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def _dcmtk_version(tool: str) -> str:
    line = _first_line([tool, "--version"])  # "$dcmtk: storescp v3.6.7 2022-04-22 $"
    parts = line.strip("$ ").split()
    return f"DCMTK {parts[2].lstrip('v')}" if len(parts) >= 3 else line


def echo_ok(aet: str, port: int) -> bool:
    cmd = [
        "echoscu",
        "-to",
        "2",
        "-ta",
        "2",
        "-td",
        "2",
        "-aet",
        SENDER_AET,
        "-aec",
        aet,
        "127.0.0.1",
        str(port),
    ]
    try:
        rc = subprocess.run(
            cmd,
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=10,
            check=False,
        ).returncode
    except subprocess.TimeoutExpired:
        return False
    return rc == 0


def count_files(root: Path, pattern: str = "*", non_empty: bool = False) -> int:
    if not root.is_dir():
        return 0
    return sum(
        1 for p in root.rglob(pattern) if p.is_file() and (not non_empty or p.stat().st_size)
    )


# One benchmark at a time on a machine: two harnesses interleave their peers' timed sends and
# each one's figures are wrong (their quiesce waits only make the overlap rarer, not absent).
BENCH_LOCK = Path(
    os.environ.get("OPENPACS_BENCH_LOCK") or Path(tempfile.gettempdir()) / "openpacs-bench.lock"
)


def hold_bench_lock(path: Path | None = None) -> tuple[IO[str] | None, str]:
    """Take the machine's benchmark lock (an flock, released when this process exits).

    Returns (the open lock file: keep it open, "") or (None, what the holder wrote there).
    """
    lock_path = path or BENCH_LOCK
    f = open(lock_path, "a+")  # noqa: SIM115 -- held open for the life of the process
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        return None, holder
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}: {shlex.join(sys.argv)}\n")
    f.flush()
    return f, ""


def refuse_second_bench() -> IO[str] | None:
    """For the harnesses' main(): the lock file to keep, or None after printing why not."""
    held, holder = hold_bench_lock()
    if held is None:
        print(
            f"error: another benchmark holds {BENCH_LOCK} ({holder}); two at once disturb each "
            "other's timings — wait for it, or stop it",
            file=sys.stderr,
        )
    return held


CLK_TCK = os.sysconf("SC_CLK_TCK")
# A run is flagged when, during its timed send, user processes other than the
# peer, the senders and this script used more than this share of the machine's
# CPU time (and more than 0.5 CPU-s): somebody else was busy, the figure is low.
OTHER_CPU_WARN = 0.10


def _machine_cpu_s() -> tuple[float, float]:
    """(busy, steal) CPU-seconds of all CPUs since boot, from /proc/stat.

    busy = user + nice + system (guest time is inside user/nice); irq and
    softirq time (mostly our own loopback traffic and disk completions) is left
    out, as is steal, the time the hypervisor gave our vCPUs to someone else.
    """
    f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    f += [0] * (8 - len(f))
    return (f[0] + f[1] + f[2]) / CLK_TCK, f[7] / CLK_TCK


def quiesce(max_wait: float, busy_share: float = 0.15) -> float | None:
    """sync(2), then wait until the machine's CPUs are mostly idle for 0.5 s.

    Flushes what earlier runs left dirty (and the deletions of their data dirs)
    so that their writeback does not land in this run's timing. Returns the
    seconds waited, or None if the machine stayed busy for max_wait seconds.
    """
    t0 = time.monotonic()
    os.sync()
    capacity = 0.5 * (os.cpu_count() or 1)
    while True:
        busy0, _ = _machine_cpu_s()
        time.sleep(0.5)
        busy1, _ = _machine_cpu_s()
        if busy1 - busy0 <= busy_share * capacity:
            return time.monotonic() - t0
        if time.monotonic() - t0 > max_wait:
            return None


@dataclasses.dataclass(frozen=True)
class ProcCpu:
    comm: str
    pgrp: int
    ppid: int
    own: float  # utime + stime
    reaped: float  # cutime + cstime (children it has waited for)


def _scan_procs() -> dict[int, ProcCpu]:
    out: dict[int, ProcCpu] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        rest = text[text.rindex(")") + 2 :].split()
        ticks = [int(v) for v in rest[11:15]]
        own = (ticks[0] + ticks[1]) / CLK_TCK
        reaped = (ticks[2] + ticks[3]) / CLK_TCK
        out[int(entry.name)] = ProcCpu(comm, int(rest[2]), int(rest[1]), own, reaped)
    return out


@dataclasses.dataclass(frozen=True)
class CpuSnapshot:
    """CPU-seconds consumed so far by the machine, every process, our children and us."""

    machine: float
    steal: float
    procs: dict[int, ProcCpu]
    sender: float
    me: float

    @classmethod
    def take(cls) -> CpuSnapshot:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy, steal = _machine_cpu_s()
        return cls(busy, steal, _scan_procs(), kids.ru_utime + kids.ru_stime, time.process_time())

    def minus(self, before: CpuSnapshot, server_pgid: int) -> CpuDelta:
        """Split the CPU used since `before` into peer / senders / kernel threads / others.

        The peer is its whole process group (forked children included, live,
        zombie or reaped); senders are our reaped children (the storescu runs);
        kernel threads are kthreadd's children (they do the peer's writeback and
        journal work too); "other" is the rest of the machine's busy time.
        """
        me_pid = os.getpid()
        server = kthreads = helpers = 0.0
        foreign: dict[str, float] = {}
        for pid, now in self.procs.items():
            old = before.procs.get(pid)
            if old is not None and (now.own < old.own or now.reaped < old.reaped):
                old = None  # pid reused: counters only grow
            d_own = now.own - (old.own if old else 0.0)
            d_reaped = now.reaped - (old.reaped if old else 0.0)
            if now.pgrp == server_pgid:
                server += d_own + d_reaped
            elif pid == 2 or now.ppid == 2:
                kthreads += d_own
            elif now.ppid == me_pid:
                helpers += d_own  # our live children (py-spy); counted with us
            elif pid != me_pid and d_own > 0:
                foreign[now.comm] = foreign.get(now.comm, 0.0) + d_own
        sender = self.sender - before.sender
        me = self.me - before.me + helpers
        other = max(0.0, self.machine - before.machine - server - sender - me - kthreads)
        top = sorted(foreign.items(), key=lambda kv: -kv[1])[:3]
        return CpuDelta(server, sender, kthreads, other, self.steal - before.steal, top)


@dataclasses.dataclass(frozen=True)
class CpuDelta:
    server: float
    sender: float
    kthreads: float
    other: float
    steal: float
    top_other: list[tuple[str, float]]


class PeerError(Exception):
    """A peer could not be started, fed or counted: the run is FAILED."""


# --------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Running:
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log: Path
    http_port: int | None = None


class Peer:
    name: str = ""
    aet: str = ""

    def missing(self) -> str | None:
        """Why this peer cannot run here, or None."""
        return None

    def version(self) -> str:
        raise NotImplementedError

    def durability(self) -> str:
        raise NotImplementedError

    def launch(self, run_dir: Path) -> Running:
        raise NotImplementedError

    def count(self, running: Running) -> int:
        raise NotImplementedError

    def after_stop(self, running: Running) -> None:
        """Inspect the data dir once the server is down (optional)."""

    def start(self, run_dir: Path) -> Running:
        running = self.launch(run_dir)
        deadline = time.monotonic() + READY_TIMEOUT_S
        try:
            while True:
                rc = running.proc.poll()
                if rc is not None:
                    raise PeerError(f"exited with {rc} before ready: {_tail(running.log)}")
                if echo_ok(self.aet, running.port):
                    return running
                if time.monotonic() > deadline:
                    raise PeerError(f"no C-ECHO answer within {READY_TIMEOUT_S:.0f} s")
                time.sleep(0.2)
        except BaseException:
            self.stop(running)
            raise

    def stop(self, running: Running) -> str | None:
        """SIGTERM, wait; returns a warning if it had to be killed."""
        proc = running.proc
        warning = None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            if _reap(proc, STOP_TIMEOUT_S) is None:
                warning = f"{self.name} ignored SIGTERM for {STOP_TIMEOUT_S:.0f} s; killed"
                _kill_hard(proc)
        _reap(proc, 0)
        _kill_group_leftovers(proc)
        return warning


class StorescpPeer(Peer):
    name = "storescp"
    aet = "STORESCP"

    def missing(self) -> str | None:
        return None if shutil.which("storescp") else "storescp not on PATH"

    def version(self) -> str:
        return _dcmtk_version("storescp")

    def durability(self) -> str:
        return (
            "storescp --fork (one process per association): plain file writes, "
            "no fsync, no index -- a floor, not a PACS"
        )

    def launch(self, run_dir: Path) -> Running:
        data = run_dir / "data"
        data.mkdir()
        (port,) = free_ports(1)
        log = run_dir / "storescp.log"
        cmd = ["storescp", "--fork", "-od", str(data), "-aet", self.aet, str(port)]
        proc = _spawn(cmd, log=log, env=dcmtk_env(), new_session=True)
        return Running(proc, port, data, log)

    def count(self, running: Running) -> int:
        return count_files(running.data_dir)


class OrthancPeer(Peer):
    name = "orthanc"
    aet = "ORTHANC"

    def __init__(self) -> None:
        self.journal_mode: str | None = None

    def missing(self) -> str | None:
        return None if Path(ORTHANC_BIN).is_file() else f"{ORTHANC_BIN} not found"

    def version(self) -> str:
        line = _first_line([ORTHANC_BIN, "--version"])  # "/usr/sbin/Orthanc 1.10.1"
        return "Orthanc " + line.split()[-1] if line != "unknown" else line

    def durability(self) -> str:
        jm = f", SQLite journal_mode={self.journal_mode}" if self.journal_mode else ""
        return (
            "Orthanc defaults: SyncStorageArea=true (fsync after every file write), "
            "StoreMD5ForAttachments=true, StorageCompression=false, "
            f"SQLite index in the data dir{jm}, DicomThreadsCount=4, "
            "MaximumPduLength=16384, no plugins, default log level"
        )

    def extra_config(self, spare_port: int) -> dict[str, Any]:
        """Settings a harness adds to Orthanc's config (plugins, modalities…); *spare_port*
        is a free port for an address Orthanc must know but never uses."""
        return {}

    def launch(self, run_dir: Path) -> Running:
        data = run_dir / "data"
        (data / "storage").mkdir(parents=True)
        (data / "index").mkdir()
        dicom_port, http_port, spare_port = free_ports(3)
        config = {
            "Name": "bench",
            "StorageDirectory": str(data / "storage"),
            "IndexDirectory": str(data / "index"),
            "DicomAet": self.aet,
            "DicomPort": dicom_port,
            "HttpPort": http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
        }
        config.update(self.extra_config(spare_port))
        cfg = run_dir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2))
        log = run_dir / "orthanc.log"
        proc = _spawn([ORTHANC_BIN, str(cfg)], log=log, env=dcmtk_env(), new_session=True)
        return Running(proc, dicom_port, data, log, http_port=http_port)

    def count(self, running: Running) -> int:
        url = f"http://127.0.0.1:{running.http_port}/statistics"
        last: Exception | None = None
        for _ in range(20):
            try:
                with urllib.request.urlopen(url, timeout=10) as resp:
                    return int(json.load(resp)["CountInstances"])
            except (urllib.error.URLError, OSError, KeyError, ValueError) as exc:
                last = exc
                time.sleep(0.25)
        raise PeerError(f"GET /statistics failed: {last}")

    def after_stop(self, running: Running) -> None:
        import sqlite3

        index = running.data_dir / "index" / "index"
        if not index.is_file():
            return
        with contextlib.suppress(sqlite3.Error):
            con = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
            try:
                self.journal_mode = str(con.execute("PRAGMA journal_mode").fetchone()[0])
            finally:
                con.close()


# The interpreter matters as much as some of openpacs' own optimisations: on the bench machine
# pyenv's CPython 3.11 (shared libpython, no PGO/LTO) needed ~12 % more CPU per 64² instance than
# Debian's python3.11 (libpython linked in, PGO/LTO) running the same code (docs/performance.md).
INTERPRETER_PROBE = """
import importlib.metadata, os, sys
with open("/proc/self/maps") as maps:
    shared = any("libpython" in line for line in maps)
kind = "shared libpython" if shared else "libpython linked in"
base = os.path.realpath(sys._base_executable)
version = sys.version.split()[0]
print(importlib.metadata.version("openpacs"), "on Python", version, f"({base}, {kind})")
"""


class OpenpacsPeer(Peer):
    name = "openpacs"
    aet = "OPENPACS"

    def __init__(self, binary: Path, config: Path | None) -> None:
        self.binary = binary
        self.config = config

    def missing(self) -> str | None:
        return None if self.binary.is_file() else "not installed"

    def version(self) -> str:
        python = self.binary.parent / "python"
        if not python.is_file():
            return "unknown"
        return "openpacs " + _first_line([str(python), "-c", INTERPRETER_PROBE])

    def durability(self) -> str:
        cfg = f" with --config {self.config}" if self.config else " (default config)"
        return f"openpacs serve{cfg}; see its docs for its fsync/commit policy"

    def launch(self, run_dir: Path) -> Running:
        data = run_dir / "data"
        data.mkdir()
        dicom_port, http_port, hl7_port = free_ports(3)
        cmd = [
            str(self.binary),
            "serve",
            "--data-dir",
            str(data),
            "--dicom-port",
            str(dicom_port),
            "--http-port",
            str(http_port),
            "--hl7-port",
            str(hl7_port),
            "--ae-title",
            self.aet,
        ]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        log = run_dir / "openpacs.log"
        proc = _spawn(cmd, log=log, new_session=True)
        return Running(proc, dicom_port, data, log, http_port=http_port)

    def count(self, running: Running) -> int:
        # empty files are openpacs' pre-created blobs waiting for the next instances
        return count_files(running.data_dir / "blobs", "*.dcm", non_empty=True)


# --------------------------------------------------------------------------
# Sending
# --------------------------------------------------------------------------


def storescu_profile(run_dir: Path) -> Path:
    """A storescu -xf profile proposing CT and MR Image Storage in Explicit VR LE only."""
    cfg = run_dir / "storescu.cfg"
    cfg.write_text(
        "[[TransferSyntaxes]]\n[ExplicitLE]\nTransferSyntax1 = LittleEndianExplicit\n\n"
        "[[PresentationContexts]]\n[Bench]\n"
        f"PresentationContext1 = {CTImageStorage}\\ExplicitLE\n"
        f"PresentationContext2 = {MRImageStorage}\\ExplicitLE\n\n"
        "[[Profiles]]\n[Bench]\nPresentationContexts = Bench\n"
    )
    return cfg


def storescu_cmd(profile: Path, aet: str, port: int, files: Sequence[Path]) -> list[str]:
    return [
        "storescu",
        "-xf",
        str(profile),
        "Bench",
        "-aet",
        SENDER_AET,
        "-aec",
        aet,
        "127.0.0.1",
        str(port),
        *(f.name for f in files),
    ]


def shard(files: Sequence[Path], n: int) -> list[list[Path]]:
    """n contiguous shards whose sizes differ by at most one."""
    q, r = divmod(len(files), n)
    out: list[list[Path]] = []
    start = 0
    for i in range(n):
        end = start + q + (1 if i < r else 0)
        out.append(list(files[start:end]))
        start = end
    return [s for s in out if s]


def send(
    profile: Path,
    aet: str,
    port: int,
    shards: Sequence[Sequence[Path]],
    log_dir: Path,
    timeout: float,
    tag: str,
) -> float:
    """Run one storescu per shard at once; wall-clock seconds; raises PeerError on failure."""
    env = dcmtk_env()
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    failures: list[str] = []
    try:
        t0 = time.perf_counter()
        for i, files in enumerate(shards):
            log = log_dir / f"storescu-{tag}-{i}.log"
            cmd = storescu_cmd(profile, aet, port, files)
            procs.append((_spawn(cmd, log=log, env=env, cwd=files[0].parent), log))
        deadline = time.monotonic() + timeout
        for proc, log in procs:
            rc = _reap(proc, max(0.0, deadline - time.monotonic()))
            if rc is None:
                failures.append(f"storescu timed out after {timeout:.0f} s")
            elif rc != 0:
                failures.append(f"storescu exited {rc}: {_tail(log, 4)}")
        elapsed = time.perf_counter() - t0
    finally:  # timeout, Ctrl-C, SIGTERM: no sender outlives the send
        for proc, _ in procs:
            if proc.poll() is None:
                _kill_hard(proc)
    if failures:
        raise PeerError("; ".join(failures))
    return elapsed


# --------------------------------------------------------------------------
# One measured run
# --------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    ok: bool
    seconds: float | None = None
    rate: float | None = None
    mb_per_s: float | None = None
    stored: int | None = None
    expected: int | None = None
    settle_s: float | None = None
    server_cpu_s: float | None = None
    sender_cpu_s: float | None = None
    kthreads_cpu_s: float | None = None
    other_cpu_s: float | None = None
    steal_s: float | None = None
    note: str = ""
    # other processes or the hypervisor took more than OTHER_CPU_WARN of the CPUs (see --redo)
    disturbed: bool = False
    # when the timed send started (UTC, ISO 8601) and the busiest other processes during it
    # (name, CPU-s), kept for every run: what else ran is otherwise lost once the run is over
    started_utc: str | None = None
    top_other: list[tuple[str, float]] = dataclasses.field(default_factory=list)


# ext4 without a journal (this VM's root filesystem) skips inodes freed in the last 5-40 s when
# it allocates a new one (fs/ext4/ialloc.c, recently_deleted()), reading each one's inode-table
# block: creating files right after another run's 10,000 were deleted cost up to a third of the
# receiver's CPU (perf, 2026-11-25). Run dirs are therefore deleted at the end, or - when the
# scratch disk runs short - in a batch followed by a pause longer than that window.
RECENTLY_DELETED_WINDOW_S = 45.0
_finished_run_dirs: list[Path] = []


def delete_finished_runs(pause: bool) -> None:
    dirs, _finished_run_dirs[:] = list(_finished_run_dirs), []
    for run_dir in dirs:
        shutil.rmtree(run_dir, ignore_errors=True)
    if dirs and pause:
        print(
            f"  deleted {len(dirs)} finished run dir(s) to free disk; waiting "
            f"{RECENTLY_DELETED_WINDOW_S:.0f} s (ext4 recently-deleted inode window)",
            file=sys.stderr,
            flush=True,
        )
        os.sync()
        time.sleep(RECENTLY_DELETED_WINDOW_S)


def measure(
    peer: Peer,
    files: Sequence[Path],
    assocs: int,
    warmup: Sequence[Path],
    scratch: Path,
    args: argparse.Namespace,
    tag: str,
    pyspy_out: Path | None,
) -> RunResult:
    nbytes = sum(f.stat().st_size for f in files)
    if shutil.disk_usage(scratch).free < 3 * nbytes + (1 << 30):
        delete_finished_runs(pause=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{peer.name}-{tag}-", dir=scratch))
    profile = storescu_profile(run_dir)
    expected = len(files) + len(warmup)
    notes: list[str] = []
    running: Running | None = None
    pyspy: subprocess.Popen[bytes] | None = None
    try:
        running = peer.start(run_dir)
        if warmup:
            try:
                send(profile, peer.aet, running.port, [warmup], run_dir, args.timeout, "warmup")
            except PeerError as exc:
                raise PeerError(f"warm-up send: {exc}") from exc
        if quiesce(args.quiesce) is None:
            notes.append(f"machine not quiet after {args.quiesce:.0f} s of waiting")
        if pyspy_out is not None:
            pyspy = start_pyspy(args.py_spy_bin, running.proc.pid, pyspy_out, run_dir)
        started_utc = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        before = CpuSnapshot.take()
        seconds = send(
            profile, peer.aet, running.port, shard(files, assocs), run_dir, args.timeout, "timed"
        )
        cpu = CpuSnapshot.take().minus(before, running.proc.pid)
        if pyspy is not None:
            notes.append(stop_pyspy(pyspy, pyspy_out))
            pyspy = None
        t_sent = time.monotonic()
        stored = peer.count(running)
        settle = 0.0
        while stored < expected and time.monotonic() - t_sent < args.settle:
            time.sleep(0.1)
            stored = peer.count(running)
            settle = time.monotonic() - t_sent
        result = RunResult(
            ok=stored == expected,
            seconds=seconds,
            rate=len(files) / seconds,
            mb_per_s=nbytes / seconds / 1e6,
            stored=stored,
            expected=expected,
            settle_s=round(settle, 2) if settle else None,
            server_cpu_s=round(cpu.server, 3),
            sender_cpu_s=round(cpu.sender, 3),
            kthreads_cpu_s=round(cpu.kthreads, 3),
            other_cpu_s=round(cpu.other, 3),
            steal_s=round(cpu.steal, 3),
            started_utc=started_utc,
            top_other=[(name, round(sec, 2)) for name, sec in cpu.top_other],
        )
        capacity = seconds * (os.cpu_count() or 1)
        too_much = max(0.5, OTHER_CPU_WARN * capacity)  # CPU-s taken by others: a disturbed run
        if cpu.other > too_much:
            who = ", ".join(f"{name} {sec:.1f}" for name, sec in cpu.top_other)
            notes.append(
                f"other processes used {cpu.other:.1f} CPU-s of {capacity:.1f} available "
                f"during the timed send ({who}): machine not quiet, figure is pessimistic"
            )
        if cpu.steal > too_much:
            notes.append(f"hypervisor stole {cpu.steal:.1f} CPU-s of {capacity:.1f}")
        result.disturbed = max(cpu.other, cpu.steal) > too_much
        if not result.ok:
            notes.append(f"stored {stored} != expected {expected} (incl. {len(warmup)} warm-up)")
        elif result.settle_s:
            notes.append(f"count matched {result.settle_s} s after storescu exited")
    except PeerError as exc:
        result = RunResult(ok=False, expected=expected)
        notes.append(str(exc))
        if running is not None:
            notes.append(f"{peer.name} log: {_tail(running.log, 3)}")
    finally:
        if pyspy is not None:
            _kill_hard(pyspy)
        if running is not None:
            warning = peer.stop(running)
            if warning:
                notes.append(warning)
            peer.after_stop(running)
        if args.keep_data:
            notes.append(f"data kept in {run_dir}")
        else:
            _finished_run_dirs.append(run_dir)
    result.note = "; ".join(n for n in notes if n)
    return result


def start_pyspy(binary: Path, pid: int, out: Path, run_dir: Path) -> subprocess.Popen[bytes]:
    fmt = "speedscope" if out.suffix == ".json" else "flamegraph"
    cmd = [
        str(binary),
        "record",
        "--pid",
        str(pid),
        "--subprocesses",
        "--format",
        fmt,
        "-o",
        str(out),
    ]
    proc = _spawn(cmd, log=run_dir / "py-spy.log")
    time.sleep(1.0)  # let it attach before the timed sends start
    if proc.poll() is not None:
        raise PeerError(f"py-spy exited early: {_tail(run_dir / 'py-spy.log')}")
    return proc


def stop_pyspy(proc: subprocess.Popen[bytes], out: Path | None) -> str:
    proc.send_signal(signal.SIGINT)
    if _reap(proc, 60) is None:
        _kill_hard(proc)
        return "py-spy did not stop; profile may be missing"
    return f"py-spy profile: {out} (run perturbed by sampling)"


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def machine_facts(scratch: Path) -> dict[str, Any]:
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    cpu = info.get("model name", "unknown")
    if "cpu family" in info:  # a bare "AMD EPYC" says little; family/model/MHz say more
        cpu += f" (family {info['cpu family']} model {info.get('model', '?')}"
        cpu += f", {float(info.get('cpu MHz', 0)):.0f} MHz)"
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    fs = "unknown"
    with contextlib.suppress(OSError):
        best = ""
        target = str(scratch.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype, opts = line.split()[:4]
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, fs = mnt, f"{fstype} on {dev} ({mnt}, {opts})"
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": mem_gib,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pydicom": pydicom.__version__,
        "scratch_fs": fs,
    }


def _cell(agg: dict[str, Any] | None) -> str:
    if agg is None:
        return "-"
    if agg["status"] == "ok":
        return f"{agg['rate']:.1f}" + ("*" if agg.get("failed_runs") else "")
    return "n/a" if agg["status"] == "n/a" else "FAILED"


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    if a is None or b is None or a["status"] != "ok" or b["status"] != "ok":
        return "-"
    return f"{a['rate'] / b['rate']:.2f}"


def _paired_ratios(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    """openpacs/peer within each repeat (the peers of one repeat run back to back, so these
    compare like with like on a machine whose speed drifts), when there are several."""
    runs_a, runs_b = (a or {}).get("runs", []), (b or {}).get("runs", [])
    if len(runs_a) < 2 or len(runs_a) != len(runs_b):
        return ""
    return ", ".join(
        f"{x['rate'] / y['rate']:.2f}" if x["ok"] and y["ok"] and x["rate"] and y["rate"] else "-"
        for x, y in zip(runs_a, runs_b, strict=True)
    )


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = [
        "corpus",
        "assocs",
        "openpacs",
        "orthanc",
        "storescp",
        "openpacs/orthanc",
        "openpacs/storescp",
    ]
    lines = [header]
    for row in rows:
        p = row["peers"]
        lines.append(
            [
                row["corpus"],
                str(row["assocs"]),
                _cell(p.get("openpacs")),
                _cell(p.get("orthanc")),
                _cell(p.get("storescp")),
                _ratio(p.get("openpacs"), p.get("orthanc")),
                _ratio(p.get("openpacs"), p.get("storescp")),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def describe(res: RunResult, n: int) -> str:
    """One progress line for a run."""
    extra = f" [{res.note}]" if res.note else ""
    if not res.ok or res.seconds is None or res.rate is None:
        return f"FAILED{extra}"
    cpu = ""
    if res.server_cpu_s is not None:
        cpu = (
            f"; CPU: peer {res.server_cpu_s * 1000 / n:.2f} ms/inst, "
            f"storescu {res.sender_cpu_s:.1f} s, kernel threads {res.kthreads_cpu_s:.1f} s, "
            f"other {res.other_cpu_s:.1f} s, steal {res.steal_s:.1f} s"
        )
    return (
        f"{n} inst in {res.seconds:.2f} s = {res.rate:.1f} inst/s ({res.mb_per_s:.1f} MB/s), "
        f"stored {res.stored}/{res.expected}{cpu}{extra}"
    )


def aggregate(runs: Sequence[RunResult], stat: str) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": [dataclasses.asdict(r) for r in runs]}
    rates = [r.rate for r in runs if r.ok and r.rate is not None]
    if not rates:
        out["status"] = "failed"
        return out
    # Some runs failed (a peer refused to store, say): the cell folds the others,
    # marked with * in the table; the failed runs and their notes stay in the output.
    out["failed_runs"] = len(runs) - len(rates)
    out["status"] = "ok"
    out["rate"] = max(rates) if stat == "best" else statistics.median(rates)
    return out


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def _csv(
    kind: Callable[[str], Any], allowed: Sequence[Any] | None = None
) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError("empty list")
        if allowed is not None:
            bad = [v for v in values if v not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(allowed)}")
        return values

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="C-STORE ingest benchmark: openpacs vs Orthanc vs storescp (loopback).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--corpus",
        type=_csv(str, CORPORA),
        default=",".join(CORPORA),
        help="comma-separated corpora",
    )
    ap.add_argument(
        "--assocs",
        type=_csv(int),
        default="1,4",
        help="comma-separated numbers of parallel associations",
    )
    ap.add_argument(
        "--peers", type=_csv(str, PEERS), default=",".join(PEERS), help="comma-separated peers"
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell")
    ap.add_argument(
        "--stat",
        choices=("median", "best"),
        default="median",
        help="how --repeat runs are folded into one number",
    )
    ap.add_argument(
        "--limit", type=int, default=None, help="use only the first N instances of each corpus"
    )
    ap.add_argument(
        "--no-warmup", action="store_true", help="skip the untimed 20-instance warm-up send"
    )
    ap.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        metavar="FILE",
        help="record a py-spy profile of openpacs during each timed send "
        "(.json = speedscope, else flamegraph SVG; suffixed per run "
        "when there are several)",
    )
    ap.add_argument("--py-spy-bin", type=Path, default=None, help="py-spy executable")
    ap.add_argument(
        "--openpacs-config",
        type=Path,
        default=None,
        metavar="FILE",
        help="passed to openpacs serve as --config FILE",
    )
    ap.add_argument(
        "--openpacs-bin", type=Path, default=DEFAULT_OPENPACS, help="openpacs console script"
    )
    ap.add_argument(
        "--scratch",
        type=Path,
        default=WORK_DIR / "runs",
        help="where the per-run data dirs are created (its filesystem matters)",
    )
    ap.add_argument("--keep-data", action="store_true", help="keep per-run data dirs")
    ap.add_argument(
        "--redo",
        type=int,
        default=2,
        metavar="N",
        help="measure a run again (up to N times) when other processes or the hypervisor "
        f"took more than {OTHER_CPU_WARN:.0%}% of the CPUs during it; the same rule for every "
        "peer, discarded runs kept in the JSON",
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=10.0,
        help="seconds to wait for the stored count to catch up after the send",
    )
    ap.add_argument(
        "--quiesce",
        type=float,
        default=15.0,
        help="before each timed send: sync, then wait up to this many seconds for idle CPUs",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        help="seconds before a send is killed and the run FAILED",
    )
    ap.add_argument("--json", type=Path, default=None, metavar="FILE", help="write results")
    args = ap.parse_args(argv)
    if args.repeat < 1 or any(a < 1 for a in args.assocs):
        ap.error("--repeat and --assocs must be >= 1")
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be >= 1")
    return args


def _pyspy_path(base: Path, tag: str, several: bool) -> Path:
    """FILE as given for a single openpacs run, FILE-<corpus>-a<N>-r<k>.ext for several."""
    return base.with_name(f"{base.stem}-{tag}{base.suffix}") if several else base


def _resolve_pyspy(args: argparse.Namespace) -> None:
    if args.py_spy is None:
        return
    if args.py_spy_bin is None:
        found = shutil.which("py-spy")
        candidates = [
            args.openpacs_bin.parent / "py-spy",
            Path(sys.executable).parent / "py-spy",
            REPO_DIR / ".venv" / "bin" / "py-spy",
            *([Path(found)] if found else []),
        ]
        args.py_spy_bin = next((c for c in candidates if c.is_file()), None)
    if args.py_spy_bin is None or not Path(args.py_spy_bin).is_file():
        print("py-spy not installed (pip install py-spy): --py-spy ignored", file=sys.stderr)
        args.py_spy = None


def run_row(
    corpus: str,
    files: Sequence[Path],
    assocs: int,
    active: Sequence[Peer],
    warmup: Sequence[Path],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """All repeats of one (corpus, associations) row, peers interleaved per repeat."""
    several_spy = len(args.corpus) * len(args.assocs) * args.repeat > 1
    runs: dict[str, list[RunResult]] = {p.name: [] for p in active}
    discarded: dict[str, list[RunResult]] = {p.name: [] for p in active}
    for rep in range(args.repeat):
        for peer in active:
            tag = f"{corpus}-a{assocs}-r{rep + 1}"
            spy = None
            if args.py_spy is not None and peer.name == "openpacs":
                spy = _pyspy_path(args.py_spy, tag, several_spy)
            for attempt in range(args.redo + 1):
                res = measure(peer, files, assocs, warmup, args.scratch, args, tag, spy)
                line = f"[{tag}] {peer.name}: {describe(res, len(files))}"
                if res.ok and res.disturbed and attempt < args.redo:
                    # The same rule for every peer: a run the machine disturbed is measured
                    # again; the discarded one stays in the JSON and in the output.
                    discarded[peer.name].append(res)
                    print(f"{line} -- disturbed, measured again", file=sys.stderr, flush=True)
                    continue
                break
            runs[peer.name].append(res)
            print(line, file=sys.stderr, flush=True)
    return {
        "corpus": corpus,
        "assocs": assocs,
        "instances": len(files),
        "bytes": sum(f.stat().st_size for f in files),
        "peers": {
            name: aggregate(r, args.stat)
            | {"discarded": [dataclasses.asdict(d) for d in discarded[name]]}
            for name, r in runs.items()
        },
    }


def print_report(
    rows: Sequence[dict[str, Any]],
    args: argparse.Namespace,
    facts: dict[str, Any],
    versions: dict[str, str],
    durability: dict[str, str],
    settings: dict[str, Any],
) -> None:
    print()
    print(format_table(rows))
    print()
    print(
        f"inst/s, {args.stat} of {args.repeat} run(s) per cell; ratios of inst/s. "
        "n/a = peer not available, FAILED = see notes, * = some runs failed (see notes) and "
        "the cell folds the others."
    )
    for row in rows:
        where = f"{row['corpus']} a{row['assocs']}"
        for name, agg in row["peers"].items():
            runs = agg.get("runs", [])
            if len(runs) > 1:
                rates = ", ".join(f"{r['rate']:.1f}" if r["ok"] else "FAILED" for r in runs)
                print(f"  runs {where} {name}: {rates}")
            for i, run in enumerate(runs):
                if run["note"]:
                    print(f"  note {where} r{i + 1} {name}: {run['note']}")
            if agg["status"] == "n/a":
                print(f"  note {where} {name}: {agg['reason']}")
            for gone in agg.get("discarded", []):
                print(f"  discarded {where} {name}: {gone['rate']:.1f} inst/s ({gone['note']})")
        for peer in ("orthanc", "storescp"):
            paired = _paired_ratios(row["peers"].get("openpacs"), row["peers"].get(peer))
            if paired:
                print(f"  openpacs/{peer} {where} repeat by repeat: {paired}")
    print(
        f"machine: nproc={facts['nproc']}, CPU {facts['cpu']}, {facts['mem_gib']} GiB, "
        f"kernel {facts['kernel']}, scratch {facts['scratch_fs']}"
    )
    print("versions: " + ", ".join(f"{k}: {v}" for k, v in versions.items()))
    for name, text in durability.items():
        print(f"durability {name}: {text}")
    for key in ("sender", "env", "timing", "quiesce", "sharding", "cleanup"):
        print(f"{key}: {settings[key]}")


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _on_sigterm)
    args = parse_args(argv)
    lock = refuse_second_bench()
    if lock is None:
        return 2
    # An activated venv puts pynetdicom's own storescu/echoscu/storescp first on PATH: this
    # harness means DCMTK's, so leave the venv's bin out (openpacs is run by its full path).
    venv_bin = os.path.realpath(os.path.join(sys.prefix, "bin"))
    os.environ["PATH"] = os.pathsep.join(
        d
        for d in os.environ.get("PATH", "").split(os.pathsep)
        if d and os.path.realpath(d) != venv_bin
    )
    for tool in ("storescu", "echoscu"):
        if shutil.which(tool) is None:
            print(f"error: DCMTK {tool} not on PATH (apt-get install dcmtk)", file=sys.stderr)
            return 2

    all_peers: dict[str, Peer] = {
        "openpacs": OpenpacsPeer(args.openpacs_bin, args.openpacs_config),
        "orthanc": OrthancPeer(),
        "storescp": StorescpPeer(),
    }
    selected = [all_peers[p] for p in PEERS if p in args.peers]
    unavailable = {p.name: why for p in selected if (why := p.missing())}
    active = [p for p in selected if p.name not in unavailable]
    for name, why in unavailable.items():
        print(f"{name}: {why}", file=sys.stderr)
    _resolve_pyspy(args)
    versions = {p.name: unavailable.get(p.name) or p.version() for p in selected}
    versions["storescu"] = _dcmtk_version("storescu")

    warmup = [] if args.no_warmup else ensure_corpus("warmup")
    # Absolute: each peer runs with its run directory as working directory, and the
    # storescu config file is named relative to nothing.
    args.scratch = args.scratch.resolve()
    args.redo = max(0, args.redo)
    args.scratch.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC)
    rows: list[dict[str, Any]] = []
    try:
        for corpus in args.corpus:
            files = ensure_corpus(corpus)[: args.limit]
            _warm_page_cache([*files, *warmup])
            for assocs in args.assocs:
                row = run_row(corpus, files, assocs, active, warmup, args)
                for name, why in unavailable.items():
                    row["peers"][name] = {"status": "n/a", "reason": why}
                rows.append(row)
    finally:
        delete_finished_runs(pause=False)

    facts = machine_facts(args.scratch)
    durability = {p.name: p.durability() for p in active}
    settings = {
        "sender": "storescu -xf <profile: CT/MR Image Storage, Explicit VR LE only> Bench "
        f"-aet {SENDER_AET} -aec <peer AET> 127.0.0.1 <port> <files>",
        "env": "TCP_NODELAY=1 for storescu, echoscu, storescp and Orthanc",
        "timing": "wall clock from launching the first storescu to the exit of the last; "
        "starts after the peer answered C-ECHO"
        + ("" if args.no_warmup else " and after an untimed 20-instance warm-up"),
        "sharding": "N contiguous shards of the corpus in file order, one storescu each",
        "fresh": "each run: new empty data dir, peer started and stopped (SIGTERM)",
        "cleanup": "run dirs deleted at the end (or, when the disk runs short, in a batch "
        f"followed by a {RECENTLY_DELETED_WINDOW_S:.0f} s pause): never right before a run",
        "quiesce": "before each timed send: sync(2), then wait (at most "
        f"{args.quiesce:.0f} s) until the CPUs are >= 85% idle over 0.5 s",
        "repeat": args.repeat,
        "stat": args.stat,
        "limit": args.limit,
        "scratch": str(args.scratch),
    }
    print_report(rows, args, facts, versions, durability, settings)
    if args.json is not None:
        doc = {
            "started_utc": started.isoformat(timespec="seconds"),
            "command": shlex.join([sys.executable, *sys.argv]),
            "settings": settings,
            "machine": facts,
            "versions": versions,
            "durability": durability,
            "rows": rows,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"results written to {args.json}")
    failed = any(agg["status"] == "failed" for row in rows for agg in row["peers"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: every peer and sender started was stopped", file=sys.stderr)
        sys.exit(130)
