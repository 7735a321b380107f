#!/usr/bin/env python3
"""DICOMweb benchmark: QIDO-RS and WADO-RS, openpacs against Orthanc + its DICOMweb plugin.

What it measures
----------------
Both peers hold the same data, the ``studies5k`` corpus of query.py: 5,000
one-instance studies (64x64 CT/MR) plus one 100-instance CT study (512x512,
16-bit, Explicit VR Little Endian, about 52 MB). Over HTTP with keep-alive
(one ``requests.Session`` per peer) it times, each request from sending it to
the last byte of the answer:

* QIDO-RS, ``GET /dicom-web/studies`` with (1) ``PatientName=M*``, (2) a
  ``StudyDate`` range holding about 5 % of the studies, (3) a page,
  ``limit=100&offset=1000&includefield=all``. Accept ``application/dicom+json``.
  Every answer's number of results is checked against the corpus (and, for the
  first two, the set of Study Instance UIDs), so both peers must agree.
* WADO-RS on the 100-instance CT study:

  - retrieve: ``GET /studies/{s}`` with Accept
    ``multipart/related; type="application/dicom"; transfer-syntax=*`` (what
    is stored, no transcoding). There must be 100 parts whose data sets
    (everything after the file meta) are byte-equal to the originals;
  - metadata: ``GET /studies/{s}/metadata``, 100 JSON objects with the
    study's SOP Instance UIDs;
  - one frame: ``GET /studies/{s}/series/{se}/instances/{i}/frames/1`` with
    Accept ``multipart/related; type="application/octet-stream"``, one part
    equal to the stored pixel data (512*512*2 bytes).

Each figure is the median (or ``--stat best``) of ``--repeat`` runs (default 7)
after one untimed warm-up request per peer; the peers alternate run by run, and
the machine is quiesced (sync, wait for idle CPUs) before each operation. The
table shows seconds, openpacs/orthanc ratios and, for WADO-RS, MB/s of the
whole response body (MB = 10^6 bytes). Then one line per target:

* QIDO-RS: openpacs at most 0.5x Orthanc's time (the issue's Orthanc figures at
  5,010 studies were 1.08 / 0.47 / 0.33 s);
* WADO-RS: openpacs throughput at least Orthanc's (ratio <= 1.0; the issue's
  Orthanc figures: retrieve 0.12-0.25 s, metadata 0.08 s, one frame 0.015 s).

Peers: ``openpacs serve`` as in ingest.py with ``--config`` holding ``[query]
max_results = 100000`` (so no QIDO answer here is capped), and the Debian
``/usr/sbin/Orthanc`` with ``libOrthancDicomWeb.so`` (``"DicomWeb": {"Enable":
true, "Root": "/dicom-web/"}``, authentication off, its own storage dir,
``TCP_NODELAY=1`` in its environment, plugin defaults otherwise). The data is
loaded with 4 parallel DCMTK ``storescu`` (``TCP_NODELAY=1``), timed apart.

Run by hand only, never from the test suite::

    .venv/bin/python bench/dicomweb.py                        # 5,001 studies, 7 runs per cell
    .venv/bin/python bench/dicomweb.py --quick                # 500 + 1 studies, 3 runs
    .venv/bin/python bench/dicomweb.py --peers openpacs --py-spy /tmp/dw   # + profiles

Peer start-up, ports, process bookkeeping and machine facts come from
ingest.py, the corpus from query.py (same directory).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as dt
import io
import json
import os
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pydicom
import requests
from ingest import (
    DEFAULT_OPENPACS,
    WORK_DIR,
    CpuSnapshot,
    OpenpacsPeer,
    OrthancPeer,
    Peer,
    PeerError,
    Running,
    _csv,
    _dcmtk_version,
    _kill_hard,
    _on_sigterm,
    _reap,
    _spawn,
    _tail,
    _warm_page_cache,
    dcmtk_bin_dir,
    machine_facts,
    quiesce,
    refuse_second_bench,
    send,
    shard,
    storescu_profile,
)
from query import CORPUS, Corpus, _grid, _secs, ensure_corpus, print_footer

PEERS = ("openpacs", "orthanc")
ORTHANC_DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
MAX_RESULTS = 100000
QUICK_STUDIES = 500
QUICK_REPEAT = 3
PAGE_LIMIT = 100
PAGE_OFFSET = 1000
QIDO_TARGET = 0.5  # openpacs seconds / Orthanc seconds, at most
WADO_TARGET = 1.0  # throughput at least Orthanc's = time ratio at most 1
DICOM_JSON = "application/dicom+json"
ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ACCEPT_FRAME = 'multipart/related; type="application/octet-stream"'
HTTP_READY_TIMEOUT_S = 30.0
READ_CHUNK = 1 << 20
PY_SPY_RATE = 250


# --------------------------------------------------------------------------
# Peers: openpacs with its HTTP listener, Orthanc with the DICOMweb plugin
# --------------------------------------------------------------------------


class OpenpacsWeb(OpenpacsPeer):
    """openpacs serve (as in ingest.py) with [query] max_results raised."""

    def __init__(self, binary: Path, base_config: Path | None) -> None:
        super().__init__(binary, None)
        self.base_config = base_config

    def settings(self) -> str:
        base = f" + {self.base_config}" if self.base_config else ""
        return (
            f"openpacs serve --config <run dir>/openpacs.toml{base}: [query] max_results = "
            f"{MAX_RESULTS}; everything else at its defaults (HTTP listener 127.0.0.1, "
            "default log level)"
        )

    def launch(self, run_dir: Path) -> Running:
        text = self.base_config.read_text() + "\n" if self.base_config else ""
        if "query" not in (tomllib.loads(text) if text else {}):
            text += f"[query]\nmax_results = {MAX_RESULTS}\n"
        self.config = run_dir / "openpacs.toml"
        self.config.write_text(text)
        return super().launch(run_dir)

    def web_root(self, running: Running) -> str:
        return f"http://127.0.0.1:{running.http_port}/dicom-web"


class OrthancWeb(OrthancPeer):
    """Orthanc as in ingest.py, plus the DICOMweb plugin."""

    def missing(self) -> str | None:
        why = super().missing()
        if why is None and not Path(ORTHANC_DICOMWEB).is_file():
            why = f"{ORTHANC_DICOMWEB} not found (apt-get install orthanc-dicomweb)"
        return why

    def version(self) -> str:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "orthanc-dicomweb"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        return f"{super().version()}, DICOMweb plugin {out or 'unknown'}"

    def settings(self) -> str:
        return (
            "Orthanc defaults (as ingest.py: storage + SQLite index in the run dir, no HTTP "
            f'auth, TCP_NODELAY=1) plus "Plugins": ["{ORTHANC_DICOMWEB}"], "DicomWeb": '
            '{"Enable": true, "Root": "/dicom-web/"} (plugin defaults otherwise, e.g. '
            'StudiesMetadata "Full"), LimitFindResults = LimitFindInstances = 0 (no cap; '
            "also their default)"
        )

    def extra_config(self, spare_port: int) -> dict[str, Any]:
        return {
            "Plugins": [ORTHANC_DICOMWEB],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
        }

    def web_root(self, running: Running) -> str:
        return f"http://127.0.0.1:{running.http_port}/dicom-web"


def wait_http(session: requests.Session, root: str, running: Running) -> None:
    """Wait until GET {root}/studies?limit=1 answers 200 or 204."""
    deadline = time.monotonic() + HTTP_READY_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        if running.proc.poll() is not None:
            raise PeerError(f"exited with {running.proc.returncode}: {_tail(running.log)}")
        try:
            resp = session.get(
                f"{root}/studies?limit=1", headers={"Accept": DICOM_JSON}, timeout=10
            )
            if resp.status_code in (200, 204):
                return
            last = f"HTTP {resp.status_code}: {resp.text[:300]}"
        except requests.RequestException as exc:
            last = str(exc)
        time.sleep(0.2)
    raise PeerError(f"DICOMweb not ready within {HTTP_READY_TIMEOUT_S:.0f} s: {last}")


# --------------------------------------------------------------------------
# The data: the studies5k corpus of query.py, or its first N studies (--quick)
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Data:
    files: list[Path]  # what is loaded: N small studies, then the 100 CT instances
    studies: int  # studies loaded
    name_query: str
    date_range: str
    expected_uids: dict[str, set[str]]  # query kind -> Study Instance UIDs it must answer
    study_uid: str  # the 100-instance CT study
    sop_uids: set[str]
    frame_series: str
    frame_sop: str
    frame_pixels: bytes
    originals: dict[str, bytes]  # SOP Instance UID -> data set bytes (after the file meta)
    page_offset: int


def dataset_bytes(raw: bytes) -> bytes:
    """The data set of a Part 10 file: everything after the (Explicit VR LE) file meta group."""
    if raw[128:132] != b"DICM":
        raise ValueError("no DICM preamble")
    pos = 132
    while pos + 8 <= len(raw):
        group, _elem = struct.unpack_from("<HH", raw, pos)
        if group != 0x0002:
            break
        vr = raw[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
            (length,) = struct.unpack_from("<I", raw, pos + 8)
            pos += 12 + length
        else:
            (length,) = struct.unpack_from("<H", raw, pos + 6)
            pos += 8 + length
    return raw[pos:]


def prepare_data(corpus: Corpus, n_studies: int) -> Data:
    n_small = min(n_studies, len(corpus.files) - len(corpus.move_files))
    small_rows = corpus.studies[:n_small]
    move_row = corpus.studies[-1]
    rows = [*small_rows, move_row]
    prefix = corpus.name_query.rstrip("*")
    lo, hi = corpus.date_range.split("-")
    expected = {
        "name": {s.uid for s in rows if s.patient_name.startswith(prefix)},
        "date": {s.uid for s in rows if lo <= s.study_date <= hi},
    }
    originals: dict[str, bytes] = {}
    frame: tuple[str, str, bytes] | None = None
    for path in corpus.move_files:
        raw = path.read_bytes()
        ds = pydicom.dcmread(path)
        originals[str(ds.SOPInstanceUID)] = dataset_bytes(raw)
        if frame is None or int(ds.InstanceNumber) == 1:
            frame = (str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), bytes(ds.PixelData))
    assert frame is not None
    return Data(
        files=corpus.files[:n_small] + list(corpus.move_files),
        studies=len(rows),
        name_query=corpus.name_query,
        date_range=corpus.date_range,
        expected_uids=expected,
        study_uid=corpus.move_uid,
        sop_uids=set(originals),
        frame_series=frame[0],
        frame_sop=frame[1],
        frame_pixels=frame[2],
        originals=originals,
        page_offset=min(PAGE_OFFSET, max(0, len(rows) - PAGE_LIMIT) // 2 * 2),
    )


# --------------------------------------------------------------------------
# Operations, and the checks of their answers
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Call:
    """One timed request."""

    ok: bool
    seconds: float
    nbytes: int = 0
    answer: str = ""  # what was checked: "545 studies", "100 parts, 52.4 MB"...
    reason: str = ""
    peer_cpu_s: float | None = None
    status: int = 0


@dataclasses.dataclass(frozen=True)
class Op:
    kind: str  # name | date | page | retrieve | metadata | frame
    group: str  # QIDO-RS | WADO-RS
    label: str
    path: str  # after /dicom-web
    accept: str
    expected: str
    check: Callable[[requests.Response, bytes], str]  # returns the answer or raises Mismatch

    @property
    def target(self) -> float:
        return QIDO_TARGET if self.group == "QIDO-RS" else WADO_TARGET


class Mismatch(Exception):
    """The answer is not what the corpus holds."""


def parse_multipart(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """(part Content-Type, payload) of each part of a multipart/related body."""
    boundary = ""
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary":
            boundary = value.strip().strip('"')
    if not content_type.lower().startswith("multipart/related") or not boundary:
        raise Mismatch(f"not multipart/related with a boundary: {content_type!r}")
    parts: list[tuple[str, bytes]] = []
    pieces = body.split(b"--" + boundary.encode())
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            break
        head, sep, payload = piece.partition(b"\r\n\r\n")
        if not sep:
            raise Mismatch("a part without a header/body separator")
        if payload.endswith(b"\r\n"):
            payload = payload[:-2]
        ctype = ""
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                ctype = value.strip()
        parts.append((ctype, payload))
    return parts


def _json(body: bytes) -> list[dict[str, Any]]:
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise Mismatch(f"answer is not JSON: {exc}") from exc
    if not isinstance(doc, list):
        raise Mismatch(f"answer is a JSON {type(doc).__name__}, not an array")
    return doc


def _uids(items: list[dict[str, Any]], tag: str) -> list[str]:
    return [str(item.get(tag, {}).get("Value", [""])[0]) for item in items]


def check_studies(
    expected: set[str] | None, count: int
) -> Callable[[requests.Response, bytes], str]:
    def check(resp: requests.Response, body: bytes) -> str:
        items = [] if resp.status_code == 204 else _json(body)
        if len(items) != count:
            raise Mismatch(f"{len(items)} studies where {count} are expected")
        if expected is not None:
            got = set(_uids(items, "0020000D"))
            if got != expected:
                raise Mismatch(
                    f"{len(got - expected)} unexpected and {len(expected - got)} missing "
                    "Study Instance UIDs"
                )
        return f"{len(items)} studies"

    return check


def check_retrieve(data: Data) -> Callable[[requests.Response, bytes], str]:
    def check(resp: requests.Response, body: bytes) -> str:
        parts = parse_multipart(resp.headers.get("content-type", ""), body)
        if len(parts) != len(data.originals):
            raise Mismatch(f"{len(parts)} parts where {len(data.originals)} are expected")
        seen: set[str] = set()
        for ctype, payload in parts:
            if not ctype.lower().startswith("application/dicom"):
                raise Mismatch(f"a part of type {ctype!r}")
            ds_bytes = dataset_bytes(payload)
            uid = str(pydicom.dcmread(io.BytesIO(payload), stop_before_pixels=True).SOPInstanceUID)
            if data.originals.get(uid) != ds_bytes:
                raise Mismatch(f"instance {uid}: data set differs from the original")
            seen.add(uid)
        if seen != data.sop_uids:
            raise Mismatch(f"{len(seen)} distinct instances of {len(data.sop_uids)}")
        payload_bytes = sum(len(p) for _, p in parts)
        return f"{len(parts)} parts, {payload_bytes / 1e6:.1f} MB in parts"

    return check


def check_metadata(data: Data) -> Callable[[requests.Response, bytes], str]:
    def check(resp: requests.Response, body: bytes) -> str:
        items = _json(body)
        got = _uids(items, "00080018")
        if len(items) != len(data.sop_uids) or set(got) != data.sop_uids:
            raise Mismatch(
                f"{len(items)} objects, {len(set(got) & data.sop_uids)} of the study's "
                f"{len(data.sop_uids)} SOP Instance UIDs"
            )
        return f"{len(items)} instances"

    return check


def check_frame(data: Data) -> Callable[[requests.Response, bytes], str]:
    def check(resp: requests.Response, body: bytes) -> str:
        parts = parse_multipart(resp.headers.get("content-type", ""), body)
        if len(parts) != 1:
            raise Mismatch(f"{len(parts)} parts where 1 is expected")
        ctype, payload = parts[0]
        if not ctype.lower().startswith("application/octet-stream"):
            raise Mismatch(f"a part of type {ctype!r}")
        if payload != data.frame_pixels:
            raise Mismatch(
                f"frame of {len(payload)} bytes differs from the stored pixel data "
                f"({len(data.frame_pixels)} bytes)"
            )
        return f"1 part, {len(payload)} bytes"

    return check


def operations(data: Data) -> list[Op]:
    q = urllib.parse.quote
    page_count = max(0, min(PAGE_LIMIT, data.studies - data.page_offset))
    study = f"/studies/{data.study_uid}"
    frame = f"{study}/series/{data.frame_series}/instances/{data.frame_sop}/frames/1"
    name, date = data.expected_uids["name"], data.expected_uids["date"]
    return [
        Op(
            "name",
            "QIDO-RS",
            f"/studies?PatientName={data.name_query}",
            f"/studies?PatientName={q(data.name_query, safe='*^')}",
            DICOM_JSON,
            f"{len(name)} studies",
            check_studies(name, len(name)),
        ),
        Op(
            "date",
            "QIDO-RS",
            f"/studies?StudyDate={data.date_range}",
            f"/studies?StudyDate={data.date_range}",
            DICOM_JSON,
            f"{len(date)} studies",
            check_studies(date, len(date)),
        ),
        Op(
            "page",
            "QIDO-RS",
            f"/studies?limit={PAGE_LIMIT}&offset={data.page_offset}&includefield=all",
            f"/studies?limit={PAGE_LIMIT}&offset={data.page_offset}&includefield=all",
            DICOM_JSON,
            f"{page_count} studies",
            check_studies(None, page_count),
        ),
        Op(
            "retrieve",
            "WADO-RS",
            f"retrieve study ({len(data.originals)} CT 512x512), transfer-syntax=*",
            study,
            ACCEPT_DICOM,
            f"{len(data.originals)} parts",
            check_retrieve(data),
        ),
        Op(
            "metadata",
            "WADO-RS",
            "study metadata",
            f"{study}/metadata",
            DICOM_JSON,
            f"{len(data.originals)} instances",
            check_metadata(data),
        ),
        Op(
            "frame",
            "WADO-RS",
            "one frame (octet-stream)",
            frame,
            ACCEPT_FRAME,
            "1 part",
            check_frame(data),
        ),
    ]


# --------------------------------------------------------------------------
# A started peer and its HTTP client
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Live:
    peer: Peer
    run_dir: Path
    running: Running | None = None
    session: requests.Session | None = None
    root: str = ""
    error: str = ""
    load: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.peer.name

    def connections(self) -> int:
        """TCP connections the session has opened to this peer so far."""
        if self.session is None:
            return 0
        adapter = self.session.get_adapter(self.root)
        pools = adapter.poolmanager.pools  # type: ignore[attr-defined]
        keys = pools.keys()  # a RecentlyUsedContainer: no direct iteration
        return sum(int(pools[key].num_connections) for key in keys)


def new_session() -> requests.Session:
    s = requests.Session()
    # Identity: no gzip on either side (requests asks for gzip by default), so both
    # send the same bytes and the time is the server's work plus the transfer.
    s.headers["Accept-Encoding"] = "identity"
    s.trust_env = False  # no proxy from the environment
    return s


def request(live: Live, op: Op, timeout: float) -> tuple[Call, requests.Response | None, bytes]:
    """One GET, timed from sending it to the last byte of the body; untimed check after."""
    assert live.session is not None and live.running is not None
    url = live.root + op.path
    before = CpuSnapshot.take()
    t0 = time.perf_counter()
    try:
        resp = live.session.get(url, headers={"Accept": op.accept}, stream=True, timeout=timeout)
        body = b"".join(resp.iter_content(READ_CHUNK))
    except requests.RequestException as exc:
        return Call(False, time.perf_counter() - t0, reason=f"GET {url}: {exc}"), None, b""
    seconds = time.perf_counter() - t0
    cpu = round(CpuSnapshot.take().minus(before, live.running.proc.pid).server, 4)
    call = Call(True, seconds, nbytes=len(body), peer_cpu_s=cpu, status=resp.status_code)
    if resp.status_code not in (200, 204):
        call.ok = False
        call.reason = (
            f"GET {url} (Accept: {op.accept}) -> HTTP {resp.status_code} "
            f"{resp.reason}: {body[:500].decode('utf-8', 'replace')}"
        )
        return call, resp, body
    try:
        call.answer = op.check(resp, body)
    except (Mismatch, ValueError) as exc:
        call.ok = False
        call.reason = f"GET {url}: MISMATCH: {exc}"
    return call, resp, body


# --------------------------------------------------------------------------
# Cells: one operation x peer
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Cell:
    runs: list[Call] = dataclasses.field(default_factory=list)
    warmup: Call | None = None
    failed: str = ""

    def add(self, call: Call, warmup: bool) -> None:
        if warmup:
            self.warmup = call
        else:
            self.runs.append(call)
        if not call.ok and not self.failed:
            self.failed = call.reason

    def summary(self, stat: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "warmup": dataclasses.asdict(self.warmup) if self.warmup else None,
            "runs": [dataclasses.asdict(r) for r in self.runs],
        }
        if self.failed or not self.runs:
            out.update(status="failed", reason=self.failed or "not run")
            return out
        secs = [r.seconds for r in self.runs]
        value = min(secs) if stat == "best" else statistics.median(secs)
        nbytes = statistics.median(r.nbytes for r in self.runs)
        out.update(
            status="ok",
            answer=self.runs[0].answer,
            best_s=min(secs),
            median_s=statistics.median(secs),
            seconds=value,
            bytes=int(nbytes),
            mb_per_s=nbytes / value / 1e6 if value > 0 else None,
        )
        cpu = [r.peer_cpu_s for r in self.runs if r.peer_cpu_s is not None]
        if cpu:
            out["peer_cpu_s_median"] = statistics.median(cpu)
        return out


def start_and_load(live: Live, data: Data, args: argparse.Namespace) -> None:
    peer = live.peer
    live.running = peer.start(live.run_dir)
    live.session = new_session()
    live.root = peer.web_root(live.running)  # type: ignore[attr-defined]
    wait_http(live.session, live.root, live.running)
    profile = storescu_profile(live.run_dir)
    n = len(data.files)
    seconds = send(
        profile,
        peer.aet,
        live.running.port,
        shard(data.files, args.load_assocs),
        live.run_dir,
        args.timeout,
        "load",
    )
    t_end = time.perf_counter()
    stored = peer.count(live.running)
    while stored < n and time.perf_counter() - t_end < args.settle:
        time.sleep(0.2)
        stored = peer.count(live.running)
    live.load = {
        "instances": n,
        "seconds": round(seconds, 3),
        "rate": round(n / seconds, 1),
        "stored": stored,
        "assocs": args.load_assocs,
    }
    if stored != n:
        raise PeerError(f"load: stored {stored} of {n} instances")


def stop(live: Live, keep: bool) -> list[str]:
    notes: list[str] = []
    if live.session is not None:
        live.session.close()
    if live.running is not None:
        warning = live.peer.stop(live.running)
        if warning:
            notes.append(warning)
        live.running = None
    if keep:
        notes.append(f"data kept in {live.run_dir}")
    else:
        shutil.rmtree(live.run_dir, ignore_errors=True)
    return notes


def measure(
    lives: Sequence[Live], ops: Sequence[Op], args: argparse.Namespace
) -> dict[str, dict[str, Cell]]:
    cells: dict[str, dict[str, Cell]] = {}
    for op in ops:
        row = cells[op.kind] = {lv.name: Cell() for lv in lives}
        quiesce(args.quiesce)
        for rep in range(-1, args.repeat):  # -1: the untimed warm-up
            for lv in lives:
                cell = row[lv.name]
                if cell.failed or lv.running is None:
                    continue
                call, _, _ = request(lv, op, args.timeout)
                cell.add(call, warmup=rep < 0)
                _progress(op, rep, lv, call)
                if not call.ok and call.status >= 400:
                    print(f"  server log tail: {_tail(lv.running.log, 15)}", file=sys.stderr)
    return cells


def _progress(op: Op, rep: int, lv: Live, call: Call) -> None:
    tag = "warm-up" if rep < 0 else f"r{rep + 1}"
    if call.ok:
        cpu = f", peer CPU {call.peer_cpu_s * 1000:.0f} ms" if call.peer_cpu_s is not None else ""
        res = f"{call.seconds:.4f} s, {call.nbytes} bytes, {call.answer}{cpu}"
    else:
        res = f"FAILED: {call.reason}"
    print(f"[{op.kind} {tag}] {lv.name}: {res}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# py-spy: openpacs only, after the timed runs, one profile per operation
# --------------------------------------------------------------------------


def profile_ops(
    live: Live, ops: Sequence[Op], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Loop each operation on openpacs for --py-spy-seconds under `py-spy record`."""
    assert live.running is not None
    binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out: dict[str, dict[str, Any]] = {}
    for op in ops:
        if op.kind not in args.py_spy_ops:
            continue
        raw = Path(f"{args.py_spy}-{op.kind}.txt")
        svg = Path(f"{args.py_spy}-{op.kind}.svg")
        results: dict[str, Any] = {"raw": str(raw), "svg": str(svg)}
        for fmt, path in (("raw", raw), ("flamegraph", svg)):
            # --subprocesses: with [dicom] workers > 1 the HTTP listener runs in forked
            # worker 1, not in the `openpacs serve` process itself.
            cmd = [binary, "record", "--pid", str(live.running.proc.pid), "--subprocesses"]
            cmd += ["--rate", str(PY_SPY_RATE)]
            cmd += ["--format", fmt, "-o", str(path)]
            proc = _spawn(cmd, log=live.run_dir / "py-spy.log")
            time.sleep(1.0)
            if proc.poll() is not None:
                results["error"] = f"py-spy exited early: {_tail(live.run_dir / 'py-spy.log')}"
                break
            n = 0
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < args.py_spy_seconds:
                request(live, op, args.timeout)
                n += 1
            wall = time.perf_counter() - t0
            proc.send_signal(signal.SIGINT)
            if _reap(proc, 60) is None:
                _kill_hard(proc)
            if fmt == "raw":
                results.update(requests=n, wall_s=round(wall, 2))
        if raw.is_file():
            results.update(hot_spots(raw))
        out[op.kind] = results
    return out


# Leaf frames of threads that wait (py-spy's own idle detection misses these here): the
# event loop's select, thread pools and queues waiting for work, the DICOM accept loop.
IDLE_LEAVES = (
    "EpollSelector.select (selectors.py",
    "Condition.wait (threading.py",
    "Event.wait (threading.py",
    "socket.accept (socket.py",
    "Queue.get (queue.py",
    "IndexWriter._run (openpacs/index/db.py",
    "BaseSelectorEventLoop._write_to_self",
    "BaseSelectorEventLoop._read_from_self",
    "Server._supervise (openpacs/server.py",
)


def hot_spots(raw: Path, top: int = 15) -> dict[str, Any]:
    """Own and inclusive shares per frame of the busy samples of py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = busy = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if not frames or frames[-1].startswith(IDLE_LEAVES):
            continue
        busy += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    return {
        "samples": total,
        "busy_samples": busy,
        "own": [(f, n / busy) for f, n in own.most_common(top)] if busy else [],
        "inclusive": [(f, n / busy) for f, n in incl.most_common(top + 10)] if busy else [],
    }


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def format_table(rows: Sequence[dict[str, Any]], peers: Sequence[str]) -> str:
    ratio = "openpacs" in peers and "orthanc" in peers
    head = ["operation", "answer", *(f"{p} s" for p in peers)]
    head += ["openpacs/orthanc"] if ratio else []
    head += [f"{p} MB/s" for p in peers]
    lines = [head]
    for row in rows:
        line = [f"{row['group']} {row['label']}", row["answer"]]
        for p in peers:
            agg = row["peers"].get(p, {})
            status = agg.get("status")
            line.append(_secs(agg["seconds"]) if status == "ok" else (status or "-").upper())
        if ratio:
            line.append(f"{row['ratio']:.2f}" if row.get("ratio") is not None else "-")
        for p in peers:
            agg = row["peers"].get(p, {})
            wado = row["group"] == "WADO-RS" and agg.get("status") == "ok"
            line.append(f"{agg['mb_per_s']:.1f}" if wado and agg.get("mb_per_s") else "-")
        lines.append(line)
    return _grid(lines)


def format_cpu(rows: Sequence[dict[str, Any]], peers: Sequence[str]) -> str:
    lines = [["operation", *(f"{p} CPU ms" for p in peers), *(f"{p} bytes" for p in peers)]]
    for row in rows:
        line = [f"{row['group']} {row['label']}"]
        for p in peers:
            agg = row["peers"].get(p, {})
            cpu = agg.get("peer_cpu_s_median") if agg.get("status") == "ok" else None
            line.append("-" if cpu is None else f"{cpu * 1000:.0f}")
        for p in peers:
            agg = row["peers"].get(p, {})
            line.append(str(agg["bytes"]) if agg.get("status") == "ok" else "-")
        lines.append(line)
    return _grid(lines)


def build_rows(
    ops: Sequence[Op], cells: dict[str, dict[str, Cell]], stat: str
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for op in ops:
        peers = {name: cell.summary(stat) for name, cell in cells.get(op.kind, {}).items()}
        a, b = peers.get("openpacs", {}), peers.get("orthanc", {})
        ratio = None
        if a.get("status") == b.get("status") == "ok" and b["seconds"] > 0:
            ratio = a["seconds"] / b["seconds"]
        answers = {agg["answer"] for agg in peers.values() if agg.get("status") == "ok"}
        rows.append(
            {
                "kind": op.kind,
                "group": op.group,
                "label": op.label,
                "path": op.path,
                "accept": op.accept,
                "expected": op.expected,
                "answer": " / ".join(sorted(answers)) if answers else op.expected,
                "peers": peers,
                "ratio": ratio,
                "target": op.target,
                "target_met": None if ratio is None else ratio <= op.target,
            }
        )
    return rows


def print_report(doc: dict[str, Any], args: argparse.Namespace) -> None:
    rows = doc["rows"]
    peers = [p for p in PEERS if p in args.peers]
    d = doc["data"]
    print()
    print(
        f"data: {d['studies']} studies ({d['instances']} instances) of corpus {CORPUS}; "
        f"the WADO-RS study: {d['retrieve_instances']} CT 512x512 16-bit Explicit VR LE, "
        f"{d['retrieve_file_bytes'] / 1e6:.1f} MB of files"
    )
    lines = [["load", "instances", "assocs", "seconds", "inst/s", "stored"]]
    for name, load in doc["load"].items():
        if "error" in load:
            lines.append([name, "-", "-", "FAILED", "-", "-"])
        else:
            lines.append(
                [
                    name,
                    str(load["instances"]),
                    str(load["assocs"]),
                    f"{load['seconds']:.1f}",
                    f"{load['rate']:.1f}",
                    str(load["stored"]),
                ]
            )
    print(_grid(lines))
    print()
    print(format_table(rows, peers))
    print()
    print(
        f"seconds, {args.stat} of {args.repeat} run(s) after 1 untimed warm-up, from sending the "
        "GET to the last byte of the body (requests.Session, keep-alive, Accept-Encoding: "
        "identity); answer = what both peers returned, checked against the corpus; ratio < 1 = "
        "openpacs faster; MB/s = response body bytes / s, MB = 10^6 bytes."
    )
    print()
    print(format_cpu(rows, peers))
    print()
    print(
        "CPU ms per request, median: the peer's whole process group, from /proc in 10 ms ticks; "
        "bytes = the response body."
    )
    for row in rows:
        for name, agg in row["peers"].items():
            runs = agg.get("runs", [])
            if agg["status"] == "ok" and len(runs) > 1:
                print(
                    f"  runs {row['group']} {row['label']} {name}: "
                    + ", ".join(_secs(r["seconds"]) for r in runs)
                )
            elif agg["status"] == "failed":
                print(f"  FAILED {row['group']} {row['label']} {name}: {agg.get('reason', '')}")
    for name, reason in doc["failed_peers"].items():
        print(f"  FAILED {name} (every cell): {reason}")
    for name, reason in doc["unavailable"].items():
        print(f"  n/a {name}: {reason}")
    for name, notes in doc["notes"].items():
        for note in notes:
            print(f"note {name}: {note}")
    print()
    for row in rows:
        want = (
            f"openpacs <= {row['target']:.1f}x Orthanc's time"
            if row["group"] == "QIDO-RS"
            else "openpacs throughput >= Orthanc's"
        )
        if row["ratio"] is None:
            verdict = "not measured"
        else:
            verdict = "met" if row["target_met"] else "MISSED"
            verdict = f"ratio {row['ratio']:.2f}: {verdict}"
        print(f"target {row['group']} {row['label']} ({want}): {verdict}")
    for kind, prof in doc.get("py_spy", {}).items():
        print()
        if "error" in prof:
            print(f"py-spy {kind}: {prof['error']}")
            continue
        print(
            f"py-spy {kind}: {prof.get('requests')} openpacs requests in {prof.get('wall_s')} s, "
            f"{prof.get('samples')} samples at {PY_SPY_RATE} Hz (all threads of all openpacs "
            f"processes), {prof.get('busy_samples')} of them busy (leaf not a wait: select, "
            "Condition.wait, accept, Queue.get...); shares are of the busy samples; "
            f"{prof['raw']}, {prof['svg']}"
        )
        print("  own time:")
        for frame, share in prof.get("own", [])[:12]:
            print(f"    {share:6.1%}  {frame}")
        print("  inclusive:")
        for frame, share in prof.get("inclusive", [])[:20]:
            print(f"    {share:6.1%}  {frame}")
    print()
    print_footer(doc, ("client", "load", "timing", "env"))


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="DICOMweb benchmark (QIDO-RS, WADO-RS): openpacs vs Orthanc (loopback).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--peers", type=_csv(str, PEERS), default=",".join(PEERS), help="comma-separated peers"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_STUDIES} + 1 studies and {QUICK_REPEAT} runs per cell "
        "(unless --studies / --repeat say otherwise)",
    )
    ap.add_argument(
        "--studies", type=int, default=None, help="small studies to load (default 5000 = all)"
    )
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per cell (default 7)")
    ap.add_argument("--stat", choices=("median", "best"), default="median")
    ap.add_argument("--load-assocs", type=int, default=4, help="parallel storescu for the load")
    ap.add_argument("--openpacs-bin", type=Path, default=DEFAULT_OPENPACS)
    ap.add_argument(
        "--openpacs-config",
        type=Path,
        default=None,
        metavar="FILE",
        help="extra openpacs TOML the generated config starts with (its [query] wins)",
    )
    ap.add_argument("--scratch", type=Path, default=WORK_DIR / "runs")
    ap.add_argument("--keep-data", action="store_true", help="keep the run dirs and logs")
    ap.add_argument("--settle", type=float, default=10.0, help="wait for stored counts (s)")
    ap.add_argument("--quiesce", type=float, default=15.0, help="longest idle-CPU wait (s)")
    ap.add_argument("--timeout", type=float, default=300.0, help="limit of one request (s)")
    ap.add_argument(
        "--py-spy",
        default=None,
        metavar="PREFIX",
        help="after the timed runs, profile openpacs with py-spy while looping each operation: "
        "PREFIX-<op>.txt (collapsed stacks) and PREFIX-<op>.svg; hot spots are printed",
    )
    ap.add_argument(
        "--py-spy-ops",
        type=_csv(str, ("name", "date", "page", "retrieve", "metadata", "frame")),
        default="name,date,page,retrieve,metadata,frame",
        help="operations to profile",
    )
    ap.add_argument("--py-spy-seconds", type=float, default=8.0, help="loop length per profile")
    ap.add_argument("--json", type=Path, default=None, metavar="FILE", help="write results")
    args = ap.parse_args(argv)
    if args.studies is None:
        args.studies = QUICK_STUDIES if args.quick else 5000
    if args.repeat is None:
        args.repeat = QUICK_REPEAT if args.quick else 7
    if args.repeat < 1 or args.studies < 1 or args.load_assocs < 1:
        ap.error("--repeat, --studies and --load-assocs must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _on_sigterm)
    args = parse_args(argv)
    lock = refuse_second_bench()
    if lock is None:
        return 2
    dcmtk = dcmtk_bin_dir("storescu")
    if dcmtk is None or shutil.which("echoscu", path=dcmtk) is None:
        print("error: DCMTK storescu/echoscu not found (apt-get install dcmtk)", file=sys.stderr)
        return 2
    # DCMTK first on PATH: an activated venv has pynetdicom's own storescu/echoscu.
    os.environ["PATH"] = dcmtk + os.pathsep + os.environ.get("PATH", "")
    all_peers: dict[str, Peer] = {
        "openpacs": OpenpacsWeb(args.openpacs_bin, args.openpacs_config),
        "orthanc": OrthancWeb(),
    }
    selected = [all_peers[p] for p in PEERS if p in args.peers]
    unavailable = {p.name: why for p in selected if (why := p.missing())}
    active = [p for p in selected if p.name not in unavailable]
    for name, why in unavailable.items():
        print(f"{name}: {why}", file=sys.stderr)

    corpus = ensure_corpus()
    data = prepare_data(corpus, args.studies)
    ops = operations(data)
    print(
        f"data: {data.studies} studies, {len(data.files)} instances; expected: "
        + ", ".join(f"{op.label} -> {op.expected}" for op in ops),
        file=sys.stderr,
    )
    _warm_page_cache(data.files)
    args.scratch.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC)
    lives = [
        Live(p, Path(tempfile.mkdtemp(prefix=f"dicomweb-{p.name}-", dir=args.scratch)))
        for p in active
    ]
    cells: dict[str, dict[str, Cell]] = {}
    notes: dict[str, list[str]] = {}
    failed: dict[str, str] = {}
    py_spy: dict[str, dict[str, Any]] = {}
    try:
        for lv in lives:
            try:
                start_and_load(lv, data, args)
                print(
                    f"[load] {lv.name}: {lv.load['instances']} instances in "
                    f"{lv.load['seconds']:.1f} s ({lv.load['rate']:.0f} inst/s)",
                    file=sys.stderr,
                    flush=True,
                )
            except PeerError as exc:
                log = f"; log: {_tail(lv.running.log, 5)}" if lv.running else ""
                lv.error = f"start/load: {exc}{log}"
                print(f"[load] {lv.name}: FAILED: {lv.error}", file=sys.stderr, flush=True)
                notes.setdefault(lv.name, []).extend(stop(lv, args.keep_data))
        measuring = [lv for lv in lives if not lv.error]
        if measuring:
            cells = measure(measuring, ops, args)
        for lv in measuring:
            conns = lv.connections()
            notes.setdefault(lv.name, []).append(
                f"the client opened {conns} TCP connection(s) to it in all (keep-alive)"
            )
        op_live = next((lv for lv in measuring if lv.name == "openpacs"), None)
        if args.py_spy and op_live is not None:
            py_spy = profile_ops(op_live, ops, args)
    finally:
        for lv in lives:
            if lv.running is not None:
                notes.setdefault(lv.name, []).extend(stop(lv, args.keep_data))
    for lv in lives:
        if lv.error:
            failed[lv.name] = lv.error

    versions = {p.name: unavailable.get(p.name) or p.version() for p in selected}
    versions["dcmtk"] = _dcmtk_version("storescu")
    versions["requests"] = requests.__version__
    doc: dict[str, Any] = {
        "started_utc": started.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "settings": {
            "client": "requests.Session per peer (urllib3, TCP_NODELAY on its sockets, "
            "keep-alive), Accept-Encoding: identity, stream=True and the body read in 1 MiB "
            "chunks; checks after the clock stops",
            "load": f"{args.load_assocs} storescu processes (-xf profile: CT/MR Image Storage, "
            "Explicit VR LE only) on contiguous shards, once per peer; timed, but apart",
            "timing": f"1 untimed warm-up + {args.repeat} timed runs per cell, peers "
            f"alternating run by run; sync + wait for idle CPUs (at most {args.quiesce:.0f} s) "
            "before each operation",
            "env": "TCP_NODELAY=1 for storescu, echoscu and Orthanc",
            "repeat": args.repeat,
            "stat": args.stat,
            "studies": data.studies,
            "quick": args.quick,
            "scratch": str(args.scratch),
        },
        "machine": machine_facts(args.scratch),
        "versions": versions,
        "peer_settings": {lv.name: lv.peer.settings() for lv in lives},  # type: ignore[attr-defined]
        "data": {
            "corpus": CORPUS,
            "studies": data.studies,
            "instances": len(data.files),
            "retrieve_instances": len(data.originals),
            "retrieve_file_bytes": sum(p.stat().st_size for p in corpus.move_files),
            "study_uid": data.study_uid,
            "frame_instance": data.frame_sop,
        },
        "load": {
            lv.name: ({"error": lv.error} if lv.error and not lv.load else lv.load) for lv in lives
        },
        "rows": build_rows(ops, cells, args.stat),
        "failed_peers": failed,
        "unavailable": unavailable,
        "notes": notes,
        "py_spy": py_spy,
    }
    print_report(doc, args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"results written to {args.json}")
    bad = failed or any(
        agg["status"] == "failed" for row in doc["rows"] for agg in row["peers"].values()
    )
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: every peer started was stopped", file=sys.stderr)
        sys.exit(130)
