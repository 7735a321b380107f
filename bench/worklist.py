#!/usr/bin/env python3
"""Modality worklist benchmark: MWL C-FIND latency and HL7 order intake.

openpacs against DCMTK ``wlmscpfs`` (file based) and Orthanc's sample worklist plugin.

What it measures
----------------
With N (default 10,000) Scheduled Procedure Steps in each peer:

* **MWL C-FIND latency** of the query a modality sends every few minutes -- today's
  steps for its modality and station AE (``ScheduledProcedureStepStartDate=<today>``,
  ``Modality=CT``, ``ScheduledStationAETitle=CT01``, the usual modality return keys) --
  and of a Patient's Name wildcard query (the console's patient search), timed two ways:

  - ``assoc``: one pynetdicom association per peer, N queries on it (default 50), each
    timed from C-FIND-RQ to the final response; median and p95 (nearest rank);
  - ``findscu``: one DCMTK ``findscu -W`` process per query, start to exit
    (association, query, every response, release); median of N (default 10).

* **HL7 order intake** of openpacs: the N items are loaded into openpacs as ORM^O01
  (HL7 v2.3.1, IHE RAD-4) messages over MLLP, each ACK read (MSA-1 must be ``AA``)
  before the next message goes on that connection. openpacs ACKs only after the commit,
  so this is durable throughput. Once with 1 connection and once with 4 parallel
  connections (``--hl7-conns``), each into a fresh, empty openpacs; the last one loaded
  answers the queries.

The same items are written as ``*.wl`` files (pydicom, Part 10) for ``wlmscpfs`` (``-dfp
DIR``, the files in ``DIR/WLMSCPFS/`` next to the ``lockfile`` it needs) and Orthanc
(``Worklists.Database`` = that same folder). Items: 10 days (yesterday ... +8) x 10 stations
(CT01..CT05 CT, MR01..MR03 MR, CR01..CR02 CR), spread over 07:00-19:59, one patient each
(ISO_IR 100 names, some with Latin-1 letters), each with accession number, requested
procedure ID, SPS ID, Study Instance UID, requested procedure code and protocol code.

Checks: before timing, every peer is asked for all of its items (universal query, untimed)
and must return exactly the generated items, field by field (patient, codes, SPS...).
Every timed query's hit count must equal the count the generator predicts and be the same
on every peer; a mismatch is reported loudly and makes the exit status 1.

Fairness: ``TCP_NODELAY=1`` for findscu, echoscu, wlmscpfs and Orthanc (DCMTK leaves Nagle
on otherwise); the pynetdicom client sets it on its socket. Same items, same queries, same
clients for every peer; one untimed warm-up per cell; the peers alternate query by query.

Run by hand only, never from the test suite::

    .venv/bin/python bench/worklist.py                      # all peers, 10,000 items
    .venv/bin/python bench/worklist.py --items 1000 --repeat 10 --findscu-repeat 3
    .venv/bin/python bench/worklist.py --peers openpacs --py-spy /tmp/mwl.svg  # profile

Peer start-up, ports, process bookkeeping and machine facts come from ingest.py, the
findscu output parsing from query.py (same directory), so the benches start peers alike.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
from ingest import (
    DEFAULT_OPENPACS,
    SENDER_AET,
    WORK_DIR,
    CpuSnapshot,
    OpenpacsPeer,
    OrthancPeer,
    Peer,
    PeerError,
    Running,
    _csv,
    _dcmtk_version,
    _on_sigterm,
    _resolve_pyspy,
    _spawn,
    _tail,
    _uid,
    dcmtk_bin_dir,
    dcmtk_env,
    free_ports,
    machine_facts,
    quiesce,
    refuse_second_bench,
    start_pyspy,
    stop_pyspy,
)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from query import (
    _FIND_FINAL,
    _FIND_RSP,
    _dcmtk_problem,
    _error_comment,
    _grid,
    _timeouts,
    _words,
    format_cpu,
    print_footer,
)

PEERS = ("openpacs", "wlmscpfs", "orthanc")
WORKLIST_PLUGIN = "/usr/share/orthanc/plugins/libModalityWorklists.so"
WLM_AET = "WLMSCPFS"  # wlmscpfs serves DIR/<called AE title>/*.wl
MWL_FIND = "1.2.840.10008.5.1.4.31"
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"
MAX_RESULTS = 100000
SEED = 2026
DAY_OFFSETS = tuple(range(-1, 9))  # yesterday ... today + 8
STATIONS = (
    ("CT01", "CT"), ("CT02", "CT"), ("CT03", "CT"), ("CT04", "CT"), ("CT05", "CT"),
    ("MR01", "MR"), ("MR02", "MR"), ("MR03", "MR"), ("CR01", "CR"), ("CR02", "CR"),
)  # fmt: skip
QUERY_STATION, QUERY_MODALITY = "CT01", "CT"
NAME_QUERY = "LORENZ*"  # a rarer family name (its share of the patients is printed)
FIRST_HOUR, LAST_HOUR = 7, 20  # steps start 07:00 .. 19:59
LATIN1 = "ISO_IR 100"

# Family names with a Zipf-like weight (rank r: 1 / r^0.8); some carry Latin-1 letters.
FAMILIES = _words(
    "MÜLLER SCHMIDT SCHNEIDER FISCHER WEBER MEYER WAGNER BECKER SCHULZ HOFFMANN SCHÄFER "
    "BAUER KOCH RICHTER KLEIN WOLF SCHRÖDER NEUMANN SCHWARZ BRAUN ZIMMERMANN KRÜGER HARTMANN "
    "LANGE WERNER KRAUSE LEHMANN KÖHLER HERRMANN WALTER MAIER KÖNIG MAYER HUBER KAISER FUCHS "
    "PETERS LANG SCHOLZ MÖLLER WEISS JUNG HAHN SCHUBERT VOGEL FRIEDRICH KELLER GÜNTHER FRANK "
    "BERGER WINKLER ROTH BECK LORENZ BAUMANN FRANKE ALBRECHT SCHUSTER SIMON LUDWIG BÖHM "
    "GARCÍA MARTÍNEZ NÚÑEZ LEFÈVRE FRANÇOIS ØSTERGÅRD SÖDERBERG DUBOIS ROSSI JANSEN"
)
GIVEN_F = _words(
    "ANNA MARIA ELENA SOPHIE LENA JULIA LAURA SARAH LEA HANNAH EMMA CLARA ZOË INÈS "
    "BÄRBEL JOSÉPHINE KATRIN PETRA SABINE MONIKA"
)
GIVEN_M = _words(
    "JÜRGEN JOSÉ LUKAS FELIX JONAS PAUL LEON MAXIMILIAN THOMAS MICHAEL ANDREAS STEFAN "
    "KLAUS PETER WOLFGANG BJÖRN SÖREN FRANÇOIS MARTIN TOBIAS"
)
TECHS = (("4321", "TECH", "TINA"), ("4322", "RÖNTGEN", "RUTH"), ("4323", "SCAN", "SAMUEL"))
REFERRERS = (("1234", "WELBY", "MARCUS"), ("1235", "KILDARE", "JAMES"), ("1236", "HÄUSER", "GRETA"))
# modality -> (requested procedure code, meaning; protocol code, meaning)
PROCEDURES: dict[str, tuple[tuple[str, str, str, str], ...]] = {
    "CT": (
        ("CTHEAD", "CT HEAD W/O CONTRAST", "CTH-P1", "CT head routine"),
        ("CTCHEST", "CT CHEST W CONTRAST", "CTC-P2", "CT chest venous phase"),
        ("CTABD", "CT ABDOMEN PELVIS W CONTRAST", "CTA-P1", "CT abdomen portal venous"),
        ("CTSPINE", "CT LUMBAR SPINE W/O CONTRAST", "CTS-P1", "CT spine bone window"),
    ),
    "MR": (
        ("MRBRAIN", "MR BRAIN W/WO CONTRAST", "MRB-P1", "MR brain standard"),
        ("MRKNEE", "MR KNEE RIGHT W/O CONTRAST", "MRK-P1", "MR knee PD fat sat"),
        ("MRLSPINE", "MR LUMBAR SPINE W/O CONTRAST", "MRL-P1", "MR lumbar spine T2"),
    ),
    "CR": (
        ("CRCHEST", "XR CHEST PA AND LATERAL", "CRC-P1", "Chest 2 views"),
        ("CRHAND", "XR HAND LEFT 3 VIEWS", "CRH-P1", "Hand 3 views"),
    ),
}
SCHEME = "99RIS"


# --------------------------------------------------------------------------
# The items (one Scheduled Procedure Step each), generated for today's date
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Item:
    accession: str
    rp_id: str
    sps_id: str
    study_uid: str
    placer: str
    filler: str
    patient_id: str
    family: str
    given: str
    birth: str
    sex: str
    date: str  # YYYYMMDD
    time: str  # HHMMSS
    station: str
    modality: str
    rp_code: str
    rp_meaning: str
    protocol_code: str
    protocol_meaning: str
    tech: tuple[str, str, str]  # id, family, given
    referrer: tuple[str, str, str]

    @property
    def patient_name(self) -> str:
        return f"{self.family}^{self.given}"

    @property
    def tech_name(self) -> str:
        return f"{self.tech[1]}^{self.tech[2]}"

    def signature(self) -> tuple[str, ...]:
        """What a peer must answer for this item (see answer_signature)."""
        return (
            self.accession, self.patient_name, self.patient_id, self.birth, self.sex,
            self.study_uid, self.rp_id, self.rp_meaning, self.rp_code, self.study_uid,
            self.station, self.date, self.time, self.modality, self.tech_name,
            self.protocol_meaning, self.protocol_code, self.sps_id,
        )  # fmt: skip


SIGNATURE_FIELDS = (
    "AccessionNumber", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "RequestedProcedureID", "RequestedProcedureDescription",
    "RequestedProcedureCodeSequence[0].CodeValue",
    "ReferencedStudySequence[0].ReferencedSOPInstanceUID",
    "SPS.ScheduledStationAETitle", "SPS.ScheduledProcedureStepStartDate",
    "SPS.ScheduledProcedureStepStartTime", "SPS.Modality",
    "SPS.ScheduledPerformingPhysicianName", "SPS.ScheduledProcedureStepDescription",
    "SPS.ScheduledProtocolCodeSequence[0].CodeValue", "SPS.ScheduledProcedureStepID",
)  # fmt: skip


def make_items(n: int, today: dt.date) -> list[Item]:
    """n items, round-robin over (day, station) cells so every cell holds n/100 of them."""
    rng = np.random.default_rng(SEED)
    fam_w = np.array([1 / (r + 1) ** 0.8 for r in range(len(FAMILIES))])
    fam_w /= fam_w.sum()
    cells = [(d, s) for d in DAY_OFFSETS for s in STATIONS]
    per_cell = math.ceil(n / len(cells))
    minutes = (LAST_HOUR - FIRST_HOUR) * 60
    used_ids: set[str] = set()
    items: list[Item] = []
    for i in range(n):
        (offset, (station, modality)), k = cells[i % len(cells)], i // len(cells)
        day = today + dt.timedelta(days=offset)
        minute = FIRST_HOUR * 60 + (k * minutes) // per_cell + int(rng.integers(0, 5))
        minute = min(minute, LAST_HOUR * 60 - 1)
        sex = "F" if rng.random() < 0.52 else "M"
        given = str(rng.choice(GIVEN_F if sex == "F" else GIVEN_M))
        while True:
            pid = f"P{int(rng.integers(1_000_000, 9_999_999))}"
            if pid not in used_ids:
                used_ids.add(pid)
                break
        birth = dt.date(1930, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 90)))
        rp_code, rp_meaning, proto_code, proto_meaning = PROCEDURES[modality][
            int(rng.integers(0, len(PROCEDURES[modality])))
        ]
        ymd = day.strftime("%Y%m%d")
        items.append(
            Item(
                accession=f"A{ymd[2:]}{i:06d}",
                rp_id=f"RP{i:07d}",
                sps_id=f"SPS{i:07d}",
                study_uid=_uid("worklist", SEED, i),
                placer=f"PLC{i:07d}",
                filler=f"FIL{i:07d}",
                patient_id=pid,
                family=FAMILIES[int(rng.choice(len(FAMILIES), p=fam_w))],
                given=given,
                birth=birth.strftime("%Y%m%d"),
                sex=sex,
                date=ymd,
                time=f"{minute // 60:02d}{minute % 60:02d}00",
                station=station,
                modality=modality,
                rp_code=rp_code,
                rp_meaning=rp_meaning,
                protocol_code=proto_code,
                protocol_meaning=proto_meaning,
                tech=TECHS[int(rng.integers(0, len(TECHS)))],
                referrer=REFERRERS[int(rng.integers(0, len(REFERRERS)))],
            )
        )
    return items


# --------------------------------------------------------------------------
# The same items as HL7 ORM^O01 v2.3.1 messages and as .wl files
# --------------------------------------------------------------------------


def orm_message(item: Item, index: int, now: str) -> bytes:
    """ORM^O01 v2.3.1 (IHE RAD-4) for one item, MSH-18 8859/1, Latin-1 bytes, \\r segments.

    Station AE in OBR-21 (openpacs: [hl7] orm_station_ae_field = "OBR-21"); requested
    procedure code in OBR-4.1-3, protocol code in OBR-4.4-6 (IHE); Study UID in ZDS-1.
    """
    ts = item.date + item.time
    obr = [""] * 35
    obr[0], obr[1] = "OBR", "1"
    obr[2], obr[3] = f"{item.placer}^RIS", f"{item.filler}^RIS"
    obr[4] = (
        f"{item.rp_code}^{item.rp_meaning}^{SCHEME}^"
        f"{item.protocol_code}^{item.protocol_meaning}^{SCHEME}"
    )
    obr[16] = "^".join(item.referrer)
    obr[18], obr[19], obr[20], obr[21] = item.accession, item.rp_id, item.sps_id, item.station
    obr[24] = item.modality
    obr[27] = f"^^^{ts}^^R"
    obr[34] = "&".join(item.tech)
    segments = [
        f"MSH|^~\\&|RIS|RADIOLOGY|OPENPACS|HOSPITAL|{now}||ORM^O01|MSG{index:08d}|P|2.3.1"
        "||||||8859/1",
        f"PID|1||{item.patient_id}^^^HOSP^MR||{item.family}^{item.given}||{item.birth}|{item.sex}",
        f"PV1|1|O|RAD^{item.station}|||||{'^'.join(item.referrer)}",
        f"ORC|NW|{item.placer}^RIS|{item.filler}^RIS||SC||^^^{ts}^^R",
        "|".join(obr),
        f"ZDS|{item.study_uid}^RIS^Application^DICOM",
    ]
    return ("\r".join(segments) + "\r").encode("latin-1")


def _code(value: str, meaning: str) -> Dataset:
    ds = Dataset()
    ds.CodeValue = value
    ds.CodingSchemeDesignator = SCHEME
    ds.CodeMeaning = meaning
    return ds


def wl_dataset(item: Item) -> Dataset:
    """The worklist file of one item: what openpacs holds after the ORM (for these keys)."""
    ds = Dataset()
    ds.SpecificCharacterSet = LATIN1
    ds.AccessionNumber = item.accession
    ds.ReferringPhysicianName = f"{item.referrer[1]}^{item.referrer[2]}"
    ref = Dataset()
    ref.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    ref.ReferencedSOPInstanceUID = item.study_uid
    ds.ReferencedStudySequence = [ref]
    ds.ReferencedPatientSequence = []
    ds.PatientName = item.patient_name
    ds.PatientID = item.patient_id
    ds.IssuerOfPatientID = "HOSP"
    ds.PatientBirthDate = item.birth
    ds.PatientSex = item.sex
    ds.StudyInstanceUID = item.study_uid
    ds.RequestingPhysician = f"{item.referrer[1]}^{item.referrer[2]}"
    ds.RequestedProcedureDescription = item.rp_meaning
    ds.RequestedProcedureCodeSequence = [_code(item.rp_code, item.rp_meaning)]
    sps = Dataset()
    sps.Modality = item.modality
    sps.ScheduledStationAETitle = item.station
    sps.ScheduledProcedureStepStartDate = item.date
    sps.ScheduledProcedureStepStartTime = item.time
    sps.ScheduledPerformingPhysicianName = item.tech_name
    sps.ScheduledProcedureStepDescription = item.protocol_meaning
    sps.ScheduledProtocolCodeSequence = [_code(item.protocol_code, item.protocol_meaning)]
    sps.ScheduledProcedureStepID = item.sps_id
    sps.ScheduledStationName = ""
    sps.ScheduledProcedureStepLocation = ""
    sps.ScheduledProcedureStepStatus = "SCHEDULED"
    ds.ScheduledProcedureStepSequence = [sps]
    ds.RequestedProcedureID = item.rp_id
    ds.RequestedProcedurePriority = "ROUTINE"
    ds.PlacerOrderNumberImagingServiceRequest = item.placer
    ds.FillerOrderNumberImagingServiceRequest = item.filler
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(MWL_FIND)
    meta.MediaStorageSOPInstanceUID = UID(_uid("worklist-file", SEED, item.accession))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "OPBENCH_1"
    ds.file_meta = meta
    return ds


def write_wl_files(items: Sequence[Item], root: Path) -> Path:
    """root/WLMSCPFS/<accession>.wl + lockfile (wlmscpfs -dfp root; Orthanc's Database)."""
    folder = root / WLM_AET
    folder.mkdir(parents=True)
    (folder / "lockfile").touch()
    for item in items:
        wl_dataset(item).save_as(folder / f"{item.accession}.wl", enforce_file_format=True)
    return folder


# --------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------

SPS = "ScheduledProcedureStepSequence[0]."


@dataclasses.dataclass(frozen=True)
class Shape:
    """One query: its label, the keys (path, value; None = empty sequence), who matches."""

    kind: str
    label: str
    keys: tuple[tuple[str, str | None], ...]
    match: Callable[[Item], bool]


def modality_keys(
    *, date: str = "", modality: str = "", station: str = "", name: str = ""
) -> tuple[tuple[str, str | None], ...]:
    """The identifier a modality sends: its matching keys plus the usual return keys."""
    return (
        ("PatientName", name),
        ("PatientID", ""),
        ("PatientBirthDate", ""),
        ("PatientSex", ""),
        ("AccessionNumber", ""),
        ("StudyInstanceUID", ""),
        ("RequestedProcedureID", ""),
        ("RequestedProcedureDescription", ""),
        ("RequestedProcedureCodeSequence", None),
        ("ReferencedStudySequence", None),
        (SPS + "ScheduledStationAETitle", station),
        (SPS + "ScheduledProcedureStepStartDate", date),
        (SPS + "ScheduledProcedureStepStartTime", ""),
        (SPS + "Modality", modality),
        (SPS + "ScheduledPerformingPhysicianName", ""),
        (SPS + "ScheduledProcedureStepDescription", ""),
        (SPS + "ScheduledProtocolCodeSequence", None),
        (SPS + "ScheduledProcedureStepID", ""),
    )


def shapes(today: dt.date) -> list[Shape]:
    ymd = today.strftime("%Y%m%d")
    prefix = NAME_QUERY.rstrip("*")
    return [
        Shape(
            "today",
            f"today's {QUERY_MODALITY} on {QUERY_STATION} (date={ymd})",
            modality_keys(date=ymd, modality=QUERY_MODALITY, station=QUERY_STATION),
            lambda it: (
                it.date == ymd and it.modality == QUERY_MODALITY and it.station == QUERY_STATION
            ),
        ),
        Shape(
            "name",
            f"PatientName={NAME_QUERY} (any date/station)",
            modality_keys(name=NAME_QUERY),
            lambda it: it.patient_name.startswith(prefix),
        ),
    ]


ALL_ITEMS = Shape("all", "all items (universal)", modality_keys(), lambda it: True)


def query_dataset(keys: Sequence[tuple[str, str | None]]) -> Dataset:
    ds = Dataset()
    for path, value in keys:
        target = ds
        *parents, leaf = path.split(".")
        for parent in parents:
            keyword = parent.removesuffix("[0]")
            if keyword not in target:
                setattr(target, keyword, [Dataset()])
            target = getattr(target, keyword)[0]
        setattr(target, leaf, [] if value is None else value)
    return ds


def _value(ds: Dataset, path: str) -> str:
    target: Any = ds
    for part in path.replace("SPS.", SPS).split("."):
        if target is None:
            return ""
        if part.endswith("[0]"):
            seq = target.get(part.removesuffix("[0]"))
            target = seq[0] if seq else None
        else:
            value = target.get(part)
            return "" if value is None else str(value).strip()
    return ""


def answer_signature(ds: Dataset) -> tuple[str, ...]:
    return tuple(_value(ds, f) for f in SIGNATURE_FIELDS)


def compare_answers(got: Sequence[tuple[str, ...]], want: Sequence[tuple[str, ...]]) -> str:
    """'' when the answers are exactly the expected items, else what differs (short)."""
    if sorted(got) == sorted(want):
        return ""
    by_acc = {w[0]: w for w in want}
    problems: list[str] = []
    seen: set[str] = set()
    for g in got:
        w = by_acc.get(g[0])
        seen.add(g[0])
        if w is None:
            problems.append(f"unexpected item {g[0]!r}")
            continue
        for name, a, b in zip(SIGNATURE_FIELDS, g, w, strict=True):
            if a != b:
                problems.append(f"{g[0]} {name}: got {a!r}, want {b!r}")
                break
    missing = [a for a in by_acc if a not in seen]
    if missing:
        problems.insert(0, f"{len(missing)} expected items missing, e.g. {missing[0]}")
    if len(got) != len(set(g[0] for g in got)):
        problems.insert(0, "duplicate answers")
    return f"{len(problems)} problem(s): " + "; ".join(problems[:3])


# --------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------


class OpenpacsMWL(OpenpacsPeer):
    """openpacs serve with [query] max_results and [hl7] orm_station_ae_field = "OBR-21"."""

    def __init__(self, binary: Path, base_config: Path | None) -> None:
        super().__init__(binary, None)
        self.base_config = base_config

    def settings(self) -> str:
        base = f" (starting with {self.base_config})" if self.base_config else ""
        return (
            f"openpacs serve --config <run dir>/openpacs.toml{base}: [query] max_results = "
            f'{MAX_RESULTS}, [hl7] orm_station_ae_field = "OBR-21"; everything else at its '
            "defaults ([dicom] workers = one per core up to 8, [storage] fsync = true, SQLite "
            "index in the data dir, [worklist] character_set = ISO_IR 100, log level INFO)"
        )

    def launch(self, run_dir: Path) -> Running:
        text = self.base_config.read_text() + "\n" if self.base_config else ""
        have = tomllib.loads(text) if text else {}
        if "query" not in have:
            text += f"[query]\nmax_results = {MAX_RESULTS}\n\n"
        if "hl7" not in have:
            text += '[hl7]\norm_station_ae_field = "OBR-21"\n\n'
        elif str(have["hl7"].get("orm_station_ae_field", "")).upper() != "OBR-21":
            raise PeerError('--openpacs-config has [hl7] without orm_station_ae_field = "OBR-21"')
        cfg = run_dir / "openpacs.toml"
        cfg.write_text(text)
        self.config = cfg
        return super().launch(run_dir)

    def start(self, run_dir: Path) -> Running:
        running = super().start(run_dir)  # answers C-ECHO
        deadline = time.monotonic() + 60
        while "openpacs ready" not in running.log.read_text(errors="replace"):
            if running.proc.poll() is not None or time.monotonic() > deadline:
                self.stop(running)
                raise PeerError(f"no 'openpacs ready' in its log: {_tail(running.log)}")
            time.sleep(0.1)
        return running

    @staticmethod
    def hl7_port(running: Running) -> int:
        args = [str(a) for a in cast("list[str]", running.proc.args)]
        return int(args[args.index("--hl7-port") + 1])


class WlmscpfsPeer(Peer):
    name = "wlmscpfs"
    aet = WLM_AET

    def __init__(self, root: Path | None = None) -> None:
        self.root = root

    def missing(self) -> str | None:
        return None if shutil.which("wlmscpfs") else "wlmscpfs not on PATH (apt-get install dcmtk)"

    def version(self) -> str:
        return _dcmtk_version("wlmscpfs")

    def settings(self) -> str:
        return (
            f"wlmscpfs -dfp <dir> -dfr -csk <port> (TCP_NODELAY=1): serves <dir>/{WLM_AET}/*.wl, "
            "--fork (default: one process per association), -dfr (no rejection of incomplete "
            "files; the files are complete), -csk (answers carry the files' ISO_IR 100; the "
            "default -cs0 would send Latin-1 bytes without a character set), max PDU 16384, "
            "log level warn (defaults)"
        )

    def launch(self, run_dir: Path) -> Running:
        assert self.root is not None
        (port,) = free_ports(1)
        log = run_dir / "wlmscpfs.log"
        cmd = ["wlmscpfs", "-dfp", str(self.root), "-dfr", "-csk", str(port)]
        proc = _spawn(cmd, log=log, env=dcmtk_env(), new_session=True)
        return Running(proc, port, self.root, log)


class OrthancMWL(OrthancPeer):
    """Orthanc with the sample worklist plugin serving the .wl folder."""

    def __init__(self, database: Path | None = None) -> None:
        super().__init__()
        self.database = database
        self.plugin_version = ""

    def missing(self) -> str | None:
        return super().missing() or (
            None if Path(WORKLIST_PLUGIN).is_file() else f"{WORKLIST_PLUGIN} not found"
        )

    def settings(self) -> str:
        return (
            f'Orthanc (TCP_NODELAY=1), "Plugins": ["{WORKLIST_PLUGIN}"], "Worklists": '
            '{"Enable": true, "Database": <dir>/' + WLM_AET + ', "FilterIssuerAet": false, '
            '"LimitAnswers": 0}, "DicomModalities": {"bench": ["BENCH", "127.0.0.1", <unused '
            'port>]} (C-FIND worklist is only answered for known AETs), "LimitFindResults" = '
            '"LimitFindInstances" = 0; storage and SQLite index in the run dir; defaults '
            "otherwise (DefaultEncoding Latin1, DicomThreadsCount 4, MaximumPduLength 16384, "
            "DicomScpTimeout 30, log level warning). The plugin reads and matches every .wl "
            "file of the folder on each query"
        )

    def extra_config(self, spare_port: int) -> dict[str, Any]:
        assert self.database is not None
        return {
            "Plugins": [WORKLIST_PLUGIN],
            "Worklists": {
                "Enable": True,
                "Database": str(self.database),
                "FilterIssuerAet": False,
                "LimitAnswers": 0,
            },
            "DicomModalities": {"bench": [SENDER_AET, "127.0.0.1", spare_port]},
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
        }

    def start(self, run_dir: Path) -> Running:
        running = super().start(run_dir)
        url = f"http://127.0.0.1:{running.http_port}/plugins/worklists"
        with (
            contextlib.suppress(OSError, ValueError, KeyError),
            urllib.request.urlopen(url, timeout=10) as resp,
        ):
            self.plugin_version = str(json.load(resp)["Version"])
        if not self.plugin_version:
            self.stop(running)
            raise PeerError(f"the worklist plugin is not loaded: {_tail(running.log)}")
        return running


# --------------------------------------------------------------------------
# HL7 intake (MLLP)
# --------------------------------------------------------------------------

SB, EB = b"\x0b", b"\x1c\r"


@dataclasses.dataclass
class Intake:
    connections: int
    orders: int
    seconds: float = 0.0
    rate: float = 0.0
    accepted: int = 0
    failures: int = 0
    reasons: list[str] = dataclasses.field(default_factory=list)
    peer_cpu_s: float | None = None
    note: str = ""


def _msa(ack: bytes) -> tuple[str, str]:
    for seg in ack.decode("latin-1").split("\r"):
        if seg.startswith("MSA|"):
            fields = seg.split("|")
            return fields[1], fields[3] if len(fields) > 3 else ""
    return "", f"no MSA segment in {ack[:80]!r}"


def _send_shard(port: int, msgs: Sequence[bytes], timeout: float, go: threading.Barrier,
                out: dict[str, Any]) -> None:  # fmt: skip
    accepted = failures = 0
    reasons: list[str] = []
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            go.wait()
            buf = b""
            for msg in msgs:
                sock.sendall(SB + msg + EB)
                while EB not in buf:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise ConnectionError("the peer closed the MLLP connection")
                    buf += chunk
                ack, _, buf = buf.partition(EB)
                code, text = _msa(ack.lstrip(SB))
                if code == "AA":
                    accepted += 1
                else:
                    failures += 1
                    if len(reasons) < 3:
                        reasons.append(f"MSA-1 {code or '?'}: {text}")
    except (OSError, threading.BrokenBarrierError) as exc:
        reasons.append(f"connection: {exc}")
        with contextlib.suppress(threading.BrokenBarrierError):
            go.abort()
    out.update(accepted=accepted, failures=failures, reasons=reasons)


def send_orders(port: int, msgs: Sequence[bytes], conns: int, timeout: float) -> Intake:
    """conns connections, contiguous shards, one message in flight per connection."""
    size = math.ceil(len(msgs) / conns)
    shards = [msgs[i : i + size] for i in range(0, len(msgs), size)]
    go = threading.Barrier(len(shards) + 1)
    outs: list[dict[str, Any]] = [{} for _ in shards]
    threads = [
        threading.Thread(target=_send_shard, args=(port, s, timeout, go, o), daemon=True)
        for s, o in zip(shards, outs, strict=True)
    ]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    res = Intake(len(shards), len(msgs), seconds=round(seconds, 3))
    for o in outs:
        res.accepted += int(o.get("accepted", 0))
        res.failures += int(o.get("failures", 0))
        res.reasons += list(o.get("reasons", ["thread did not report"]))
    res.failures += len(msgs) - res.accepted - res.failures  # never sent: connection lost
    res.rate = round(res.accepted / seconds, 1) if seconds > 0 else 0.0
    return res


# --------------------------------------------------------------------------
# Clients: pynetdicom (one association per peer) and findscu -W
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Call:
    ok: bool
    seconds: float
    hits: int
    reason: str = ""
    peer_cpu_s: float | None = None
    client_cpu_s: float | None = None


class MwlClient:
    """One pynetdicom association to a peer; MWL C-FINDs on it are timed one by one."""

    def __init__(self, aet: str, port: int, timeout: float) -> None:
        from pynetdicom import AE

        self.aet, self.port = aet, port
        self.ae = AE(ae_title=SENDER_AET)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = timeout
        # Like findscu: Explicit VR Little Endian preferred, Implicit as the fallback.
        self.ae.add_requested_context(MWL_FIND, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.reconnects = 0
        self.transfer_syntax = ""
        self.error = self._connect()

    def _connect(self) -> str:
        self.assoc = self.ae.associate("127.0.0.1", self.port, ae_title=self.aet)
        if not self.assoc.is_established:
            if self.assoc.is_rejected:
                return "association rejected"
            return "association aborted" if self.assoc.is_aborted else "association failed"
        ctx = [c for c in self.assoc.accepted_contexts if c.abstract_syntax == MWL_FIND]
        if not ctx:
            self.assoc.release()
            return "MWL C-FIND presentation context not accepted"
        sock = self.assoc.dul.socket.socket if self.assoc.dul.socket else None
        if sock is not None:  # as TCP_NODELAY=1 does for DCMTK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transfer_syntax = str(ctx[0].transfer_syntax[0].name)
        return ""

    def find(self, shape: Shape, keep: list[tuple[str, ...]] | None = None) -> Call:
        """One timed query; with keep, each answer's signature is appended (after timing)."""
        if self.error:
            return Call(False, 0.0, 0, self.error)
        if not self.assoc.is_established:
            # The peer closed it while idle (Orthanc's DicomScpTimeout, 30 s): associate
            # again, untimed, and say so.
            self.reconnects += 1
            why = self._connect()
            if why:
                return Call(False, 0.0, 0, f"re-association after the peer closed it: {why}")
        ds = query_dataset(shape.keys)
        hits = 0
        final: Dataset | None = None
        answers: list[Dataset] = []
        c0 = time.process_time()
        t0 = time.perf_counter()
        for status, identifier in self.assoc.send_c_find(ds, MWL_FIND):
            code = getattr(status, "Status", None)
            if code in (0xFF00, 0xFF01):
                hits += 1
                if keep is not None and identifier is not None:
                    answers.append(identifier)
            else:
                final = status
        seconds = time.perf_counter() - t0
        client_cpu = round(time.process_time() - c0, 4)
        if keep is not None:
            keep.extend(answer_signature(a) for a in answers)
        code = getattr(final, "Status", None)
        if code == 0x0000:
            return Call(True, seconds, hits, client_cpu_s=client_cpu)
        if code is None:
            why = "no final C-FIND response (association aborted or timed out)"
        else:
            comment = getattr(final, "ErrorComment", "")
            why = f"C-FIND status 0x{code:04X}" + (
                f" (Error Comment: {comment})" if comment else ""
            )
        return Call(False, seconds, hits, f"{why} after {hits} matches", client_cpu_s=client_cpu)

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


def findscu_mwl(aet: str, port: int, shape: Shape, timeout: float) -> Call:
    cmd = ["findscu", "-W", "-v", *_timeouts(timeout), "-aet", SENDER_AET, "-aec", aet]
    for path, value in shape.keys:
        cmd += ["-k", f"{path}={value}" if value else path]
    cmd += ["127.0.0.1", str(port)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, env=dcmtk_env(), capture_output=True, text=True, errors="replace",
            timeout=timeout + 30, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return Call(False, time.perf_counter() - t0, 0, f"findscu timed out ({timeout:.0f} s)")
    seconds = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    hits = len(_FIND_RSP.findall(out))
    final = _FIND_FINAL.search(out)
    if final is None:
        why = f"no final C-FIND response (findscu exit {proc.returncode}): {_dcmtk_problem(out)}"
        return Call(False, seconds, hits, why)
    if final.group(1) != "Success":
        why = f"C-FIND {final.group(1)} after {hits} matches" + _error_comment(cmd, timeout)
        return Call(False, seconds, hits, why)
    if proc.returncode != 0:
        return Call(False, seconds, hits, f"findscu exit {proc.returncode}")
    return Call(True, seconds, hits)


# --------------------------------------------------------------------------
# Cells and the measuring loops
# --------------------------------------------------------------------------


def p95(values: Sequence[float]) -> float:
    """Nearest-rank 95th percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


@dataclasses.dataclass
class Cell:
    runs: list[Call] = dataclasses.field(default_factory=list)
    warmup: Call | None = None
    failed: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)

    def add(self, call: Call, warmup: bool = False) -> None:
        if warmup:
            self.warmup = call
        else:
            self.runs.append(call)
        if not call.ok and not self.failed:
            self.failed = call.reason

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "warmup": dataclasses.asdict(self.warmup) if self.warmup else None,
            "runs": [dataclasses.asdict(r) for r in self.runs],
            "notes": self.notes,
        }
        if self.failed or not self.runs:
            out.update(status="failed", reason=self.failed or "not run")
            return out
        secs = [r.seconds for r in self.runs]
        out.update(
            status="ok",
            hits=sorted({r.hits for r in self.runs}),
            median_s=statistics.median(secs),
            p95_s=p95(secs),
            best_s=min(secs),
            n=len(secs),
        )
        cpu = [r.peer_cpu_s for r in self.runs if r.peer_cpu_s is not None]
        if cpu:
            out["peer_cpu_s_median"] = statistics.median(cpu)
        client = [r.client_cpu_s for r in self.runs if r.client_cpu_s is not None]
        if client:
            out["client_cpu_s_median"] = statistics.median(client)
        return out


@dataclasses.dataclass
class Live:
    peer: Peer
    run_dir: Path
    running: Running | None = None
    error: str = ""


def _timed(live: Live, fn: Callable[[], Call]) -> Call:
    """Run fn (which times itself) and add the peer's CPU time (its whole process group)."""
    assert live.running is not None
    before = CpuSnapshot.take()
    call = fn()
    call.peer_cpu_s = round(CpuSnapshot.take().minus(before, live.running.proc.pid).server, 4)
    return call


def _progress(client: str, shape: Shape, rep: int, name: str, call: Call) -> None:
    tag = "warm-up" if rep < 0 else f"r{rep + 1}"
    if call.ok:
        extra = f", peer CPU {call.peer_cpu_s * 1000:.0f} ms" if call.peer_cpu_s is not None else ""
        if call.client_cpu_s is not None:
            extra += f", client CPU {call.client_cpu_s * 1000:.0f} ms"
        res = f"{call.seconds * 1000:.1f} ms, {call.hits} hits{extra}"
    else:
        res = f"FAILED: {call.reason}"
    print(f"[{client} {shape.kind} {tag}] {name}: {res}", file=sys.stderr, flush=True)


def check_contents(
    lives: Sequence[Live], items: Sequence[Item], timeout: float
) -> dict[str, dict[str, Any]]:
    """Untimed: every peer must answer the universal query with exactly the generated items."""
    want = [it.signature() for it in items]
    out: dict[str, dict[str, Any]] = {}
    for lv in lives:
        if lv.running is None:
            continue
        client = MwlClient(lv.peer.aet, lv.running.port, timeout)
        got: list[tuple[str, ...]] = []
        try:
            t0 = time.perf_counter()
            call = client.find(ALL_ITEMS, keep=got)
            seconds = time.perf_counter() - t0
        finally:
            with contextlib.suppress(Exception):
                client.close()
        problem = call.reason if not call.ok else compare_answers(got, want)
        out[lv.peer.name] = {
            "answers": call.hits,
            "expected": len(want),
            "seconds_incl_client_decoding": round(seconds, 3),
            "problem": problem,
        }
        print(
            f"[check all items] {lv.peer.name}: {call.hits} answers in {seconds:.2f} s"
            + (f" -- PROBLEM: {problem}" if problem else " -- identical to the generated items"),
            file=sys.stderr,
            flush=True,
        )
    return out


def quiet_pynetdicom() -> None:
    from pynetdicom import _config

    # pynetdicom formats every identifier for its debug log even when the logger is off;
    # that alone costs ~0.5 ms per response (see query.py).
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


def measure_assoc(
    lives: Sequence[Live], queries: Sequence[Shape], items: Sequence[Item], args: argparse.Namespace
) -> dict[str, dict[str, Cell]]:
    cells = {q.kind: {lv.peer.name: Cell() for lv in lives} for q in queries}
    clients: dict[str, MwlClient] = {}
    try:
        for lv in lives:
            if lv.running is not None:
                clients[lv.peer.name] = MwlClient(lv.peer.aet, lv.running.port, args.timeout)
        for q in queries:
            want = [it.signature() for it in items if q.match(it)]
            quiesce(args.quiesce)
            for rep in range(-1, args.repeat):
                for lv in lives:
                    cell = cells[q.kind][lv.peer.name]
                    client = clients.get(lv.peer.name)
                    if cell.failed or client is None:
                        continue
                    got: list[tuple[str, ...]] = []
                    keep = got if rep < 0 else None

                    def run(c: MwlClient = client, q: Shape = q, k: Any = keep) -> Call:
                        return c.find(q, keep=k)

                    call = _timed(lv, run)
                    if rep < 0 and call.ok:
                        problem = compare_answers(got, want)
                        if problem:
                            cell.notes.append(f"warm-up answers differ from the items: {problem}")
                    cell.add(call, warmup=rep < 0)
                    _progress("assoc", q, rep, lv.peer.name, call)
    finally:
        for name, client in clients.items():
            first = cells[queries[0].kind][name]
            if client.transfer_syntax:
                first.notes.append(f"the peer chose {client.transfer_syntax}")
            if client.reconnects:
                first.notes.append(
                    f"the peer closed the idle association; re-associated {client.reconnects}x"
                )
            with contextlib.suppress(Exception):
                client.close()
    return cells


def measure_findscu(
    lives: Sequence[Live], queries: Sequence[Shape], args: argparse.Namespace
) -> dict[str, dict[str, Cell]]:
    cells = {q.kind: {lv.peer.name: Cell() for lv in lives} for q in queries}
    for q in queries:
        quiesce(args.quiesce)
        for rep in range(-1, args.findscu_repeat):
            for lv in lives:
                cell = cells[q.kind][lv.peer.name]
                if cell.failed or lv.running is None:
                    continue
                port = lv.running.port

                def run(lv: Live = lv, port: int = port, q: Shape = q) -> Call:
                    return findscu_mwl(lv.peer.aet, port, q, args.timeout)

                call = _timed(lv, run)
                cell.add(call, warmup=rep < 0)
                _progress("findscu", q, rep, lv.peer.name, call)
    return cells


def hl7_load(
    peer: OpenpacsMWL,
    msgs: Sequence[bytes],
    conns: int,
    scratch: Path,
    args: argparse.Namespace,
    keep_running: bool,
) -> tuple[Intake, Live]:
    """A fresh openpacs, then every message over `conns` MLLP connections (timed)."""
    live = Live(peer, Path(tempfile.mkdtemp(prefix=f"mwl-openpacs-c{conns}-", dir=scratch)))
    spy: subprocess.Popen[bytes] | None = None
    notes: list[str] = []
    try:
        live.running = peer.start(live.run_dir)
        port = OpenpacsMWL.hl7_port(live.running)
        if quiesce(args.quiesce) is None:
            notes.append(f"machine not quiet after {args.quiesce:.0f} s of waiting")
        if args.py_spy is not None:
            out = args.py_spy.with_name(f"{args.py_spy.stem}-hl7-c{conns}{args.py_spy.suffix}")
            spy = start_pyspy(args.py_spy_bin, live.running.proc.pid, out, live.run_dir)
        before = CpuSnapshot.take()
        intake = send_orders(port, msgs, conns, args.timeout)
        intake.peer_cpu_s = round(CpuSnapshot.take().minus(before, live.running.proc.pid).server, 3)
        if spy is not None:
            notes.append(stop_pyspy(spy, out))
            spy = None
    except PeerError as exc:
        intake = Intake(conns, len(msgs), failures=len(msgs), reasons=[str(exc)])
        live.error = str(exc)
    finally:
        if spy is not None:
            stop_pyspy(spy, None)
    intake.note = "; ".join(notes)
    if not keep_running or live.error:
        stop_live(live, args.keep_data)
    return intake, live


def stop_live(live: Live, keep: bool) -> str:
    note = ""
    if live.running is not None:
        note = live.peer.stop(live.running) or ""
        live.running = None
    if not keep:
        shutil.rmtree(live.run_dir, ignore_errors=True)
    return note


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def _ms(value: float) -> str:
    return f"{value * 1000:.1f}"


def build_rows(
    queries: Sequence[Shape],
    items: Sequence[Item],
    cells: dict[tuple[str, str], dict[str, Cell]],
    peers: Sequence[str],
    unavailable: dict[str, str],
    failed: dict[str, str],
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for q in queries:
        expected = sum(1 for it in items if q.match(it))
        for client in ("assoc", "findscu"):
            row: dict[str, Any] = {
                "kind": q.kind,
                "label": q.label,
                "client": client,
                "expected": expected,
                "peers": {},
            }
            for name in peers:
                if name in unavailable:
                    row["peers"][name] = {"status": "n/a", "reason": unavailable[name]}
                elif name in failed:
                    row["peers"][name] = {"status": "failed", "reason": failed[name]}
                elif name in cells.get((q.kind, client), {}):
                    row["peers"][name] = cells[(q.kind, client)][name].summary()
            row["problems"] = check_hits(row)
            rows.append(row)
    return rows


def check_hits(row: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    got: dict[str, set[int]] = {}
    for name, agg in row["peers"].items():
        runs = [r for r in agg.get("runs", []) if r["ok"]]
        if agg.get("warmup") and agg["warmup"]["ok"]:
            runs.append(agg["warmup"])
        if runs:
            got[name] = {r["hits"] for r in runs}
        for note in agg.get("notes", []):
            if note.startswith("warm-up answers differ"):
                problems.append(f"{name}: {note}")
    for name, hits in got.items():
        if hits != {row["expected"]}:
            problems.append(
                f"{name} returned {', '.join(map(str, sorted(hits)))} hits where the "
                f"generator scheduled {row['expected']}"
            )
    if len({frozenset(h) for h in got.values()}) > 1:
        problems.append("peers disagree: " + ", ".join(f"{n} {sorted(h)}" for n, h in got.items()))
    return problems


def format_queries(rows: Sequence[dict[str, Any]], peers: Sequence[str]) -> str:
    others = [p for p in peers if p != "openpacs"]
    ratio = "openpacs" in peers
    head = ["query", "client", "hits", *(f"{p} ms" for p in peers)]
    head += [f"{p}/openpacs" for p in others] if ratio else []
    lines = [head]
    for row in rows:
        bad = bool(row["problems"])
        line = [row["label"], row["client"], "MISMATCH" if bad else str(row["expected"])]
        for p in peers:
            agg = row["peers"].get(p)
            if agg is None:
                line.append("-")
            elif agg["status"] == "ok":
                cell = _ms(agg["median_s"])
                if row["client"] == "assoc":
                    cell += f" (p95 {_ms(agg['p95_s'])})"
                line.append(cell + ("!" if bad else ""))
            else:
                line.append("n/a" if agg["status"] == "n/a" else "FAILED")
        if ratio:
            a = row["peers"].get("openpacs", {})
            for p in others:
                b = row["peers"].get(p, {})
                ok = a.get("status") == b.get("status") == "ok" and not bad
                line.append(f"{b['median_s'] / a['median_s']:.2f}" if ok else "-")
        lines.append(line)
    return _grid(lines)


def format_intake(intakes: Sequence[Intake]) -> str:
    lines = [["HL7 ORM^O01 intake", "connections", "orders", "seconds", "orders/s", "not AA"]]
    for it in intakes:
        ok = it.failures == 0 and it.seconds > 0
        lines.append(
            [
                "openpacs (MLLP, ACK after commit)",
                str(it.connections),
                str(it.orders),
                f"{it.seconds:.1f}" if it.seconds else "-",
                f"{it.rate:.1f}" if ok else "FAILED",
                str(it.failures),
            ]
        )
    return _grid(lines)


def targets(doc: dict[str, Any]) -> list[str]:
    """The issue's targets, each MET / MISSED with the figures it rests on."""
    out: list[str] = []
    today = [r for r in doc["rows"] if r["kind"] == "today"]
    for row in today:
        a = row["peers"].get("openpacs", {})
        if a.get("status") != "ok":
            out.append(f"  today's query [{row['client']}]: openpacs not measured")
            continue
        ms = a["median_s"] * 1000
        verdict = "MET" if ms < 50 else "MISSED"
        out.append(f"  < 50 ms per query [{row['client']}, median]: {ms:.1f} ms -> {verdict}")
        for p, b in row["peers"].items():
            if p == "openpacs" or b.get("status") != "ok":
                continue
            r = b["median_s"] / a["median_s"]
            out.append(
                f"  faster than {p} [{row['client']}]: {p}/openpacs = {r:.2f} -> "
                + ("MET" if r > 1 and not row["problems"] else "MISSED")
            )
    for it in doc["hl7_intake"]:
        ok = it["failures"] == 0 and it["rate"] >= 200
        out.append(
            f"  HL7 intake >= 200 orders/s [{it['connections']} connection(s)]: "
            f"{it['rate']:.1f} orders/s -> {'MET' if ok else 'MISSED'}"
        )
    return out


def print_report(doc: dict[str, Any], peers: Sequence[str], args: argparse.Namespace) -> None:
    info = doc["items"]
    print()
    print(
        f"items: {info['count']} Scheduled Procedure Steps, {info['days']} days "
        f"({info['first_date']}..{info['last_date']}), {len(STATIONS)} stations, "
        f"{info['patients']} patients ({info['non_ascii_names']} names with Latin-1 letters); "
        f"today = {info['today']}"
    )
    if doc["hl7_intake"]:
        print()
        print(format_intake([Intake(**i) for i in doc["hl7_intake"]]))
    print()
    print(format_queries(doc["rows"], peers))
    print()
    print(
        f"ms per query: assoc = median (and nearest-rank p95) of {args.repeat} queries on one "
        "pynetdicom association per peer, C-FIND-RQ to final response; findscu = median of "
        f"{args.findscu_repeat} DCMTK findscu -W processes, start to exit. One untimed warm-up "
        "each; peers alternate query by query. Ratio = peer ms / openpacs ms (median): "
        "> 1 = openpacs faster. hits = items the generator scheduled for the query; every "
        "peer's count is checked against it."
    )
    print()
    print(format_cpu(doc["rows"], peers, "query", "pynetdicom client CPU ms"))
    print()
    print(
        "CPU per query, median: the peer's whole process group (/proc, 10 ms ticks); "
        "client = this process (pynetdicom), per peer in column order."
    )
    print()
    print("content check (universal query, untimed; answers compared field by field):")
    for name, chk in doc["content_check"].items():
        verdict = chk["problem"] or "identical to the generated items"
        print(
            f"  {name}: {chk['answers']} of {chk['expected']} items in "
            f"{chk['seconds_incl_client_decoding']:.2f} s -- {verdict}"
        )
    print()
    print("targets (issue): MWL query < 50 ms and faster than both peers; HL7 >= 200 orders/s")
    for line in targets(doc):
        print(line)
    for name, reason in doc["unavailable"].items():
        print(f"  n/a {name}: {reason}")
    for name, reason in doc["failed_peers"].items():
        print(f"  FAILED {name}: {reason}")
    for row in doc["rows"]:
        for name, agg in row["peers"].items():
            if agg["status"] == "failed" and name not in doc["failed_peers"]:
                print(f"  FAILED {row['label']} [{row['client']}] {name}: {agg.get('reason')}")
            for note in agg.get("notes", []):
                print(f"  note {row['kind']} [{row['client']}] {name}: {note}")
    for it in doc["hl7_intake"]:
        for reason in it["reasons"]:
            print(f"  HL7 {it['connections']} conn: {reason}")
        if it["note"]:
            print(f"  note HL7 {it['connections']} conn: {it['note']}")
    problems = [(r, p) for r in doc["rows"] for p in r["problems"]]
    bad_content = {n: c["problem"] for n, c in doc["content_check"].items() if c["problem"]}
    if problems or bad_content:
        print()
        print("!" * 78)
        print("MISMATCH -- the peers do not hold/answer the same items; figures not comparable:")
        for row, p in problems:
            print(f"  {row['label']} [{row['client']}]: {p}")
        for name, p in bad_content.items():
            print(f"  all items: {name}: {p}")
        print("!" * 78)
    for name, notes in doc["notes"].items():
        for note in notes:
            print(f"note {name}: {note}")
    print_footer(doc, ("hl7", "assoc", "findscu", "env"))


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="MWL C-FIND latency and HL7 intake: openpacs vs wlmscpfs vs Orthanc.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--peers", type=_csv(str, PEERS), default=",".join(PEERS), help="comma-separated peers"
    )
    ap.add_argument("--items", type=int, default=10000, help="scheduled procedure steps")
    ap.add_argument("--repeat", type=int, default=50, help="timed queries per assoc cell")
    ap.add_argument(
        "--findscu-repeat", type=int, default=10, help="timed findscu processes per cell"
    )
    ap.add_argument(
        "--hl7-conns",
        type=_csv(int),
        default="1,4",
        help="HL7 loads: parallel MLLP connections of each (a fresh openpacs per load; the "
        "last one answers the queries)",
    )
    ap.add_argument(
        "--openpacs-bin", type=Path, default=DEFAULT_OPENPACS, help="openpacs console script"
    )
    ap.add_argument(
        "--openpacs-config",
        type=Path,
        default=None,
        metavar="FILE",
        help="extra openpacs TOML the generated config starts with",
    )
    ap.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        metavar="FILE",
        help="record py-spy profiles of openpacs: FILE-hl7-c<N> during each HL7 load, "
        "FILE-assoc during the assoc queries (perturbs those figures)",
    )
    ap.add_argument("--py-spy-bin", type=Path, default=None, help="py-spy executable")
    ap.add_argument(
        "--scratch",
        type=Path,
        default=WORK_DIR / "runs",
        help="where the run dirs (data, .wl files) are created",
    )
    ap.add_argument("--keep-data", action="store_true", help="keep the run dirs")
    ap.add_argument(
        "--quiesce",
        type=float,
        default=15.0,
        help="before each load and each group of queries: sync, then wait up to this "
        "many seconds for idle CPUs",
    )
    ap.add_argument(
        "--timeout", type=float, default=300.0, help="seconds before one operation is FAILED"
    )
    ap.add_argument("--json", type=Path, default=None, metavar="FILE", help="write results")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.findscu_repeat < 1 or args.items < 1:
        ap.error("--repeat, --findscu-repeat and --items must be >= 1")
    if any(c < 1 for c in args.hl7_conns):
        ap.error("--hl7-conns must be >= 1")
    return args


def describe_items(items: Sequence[Item], today: dt.date) -> dict[str, Any]:
    dates = sorted({it.date for it in items})
    return {
        "count": len(items),
        "today": today.strftime("%Y%m%d"),
        "days": len(dates),
        "first_date": dates[0],
        "last_date": dates[-1],
        "stations": {s: m for s, m in STATIONS},
        "patients": len({it.patient_id for it in items}),
        "distinct_names": len({it.patient_name for it in items}),
        "non_ascii_names": sum(1 for it in items if not it.patient_name.isascii()),
        "per_station_day": len(items) / (len(DAY_OFFSETS) * len(STATIONS)),
        "name_query": NAME_QUERY,
        "message": "ORM^O01 v2.3.1 (IHE RAD-4), MSH-18 8859/1, station AE in OBR-21, "
        "study UID in ZDS-1, requested procedure code OBR-4.1-3, protocol code OBR-4.4-6",
    }


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _on_sigterm)
    args = parse_args(argv)
    lock = refuse_second_bench()
    if lock is None:
        return 2
    dcmtk = dcmtk_bin_dir("findscu")
    if dcmtk is None or shutil.which("echoscu", path=dcmtk) is None:
        print("error: DCMTK findscu/echoscu not found (apt-get install dcmtk)", file=sys.stderr)
        return 2
    # DCMTK first on PATH: an activated venv has pynetdicom's own findscu/echoscu.
    os.environ["PATH"] = dcmtk + os.pathsep + os.environ.get("PATH", "")
    _resolve_pyspy(args)
    quiet_pynetdicom()

    today = dt.date.today()
    items = make_items(args.items, today)
    queries = shapes(today)
    info = describe_items(items, today)
    info["expected_hits"] = {q.kind: sum(1 for it in items if q.match(it)) for q in queries}
    print(
        f"items: {len(items)}, today {info['today']}; expected hits: "
        + ", ".join(f"{q.label}: {info['expected_hits'][q.kind]}" for q in queries),
        file=sys.stderr,
    )

    all_peers: dict[str, Peer] = {
        "openpacs": OpenpacsMWL(args.openpacs_bin, args.openpacs_config),
        "wlmscpfs": WlmscpfsPeer(),
        "orthanc": OrthancMWL(),
    }
    selected = [all_peers[p] for p in PEERS if p in args.peers]
    peers = [p.name for p in selected]
    unavailable = {p.name: why for p in selected if (why := p.missing())}
    for name, why in unavailable.items():
        print(f"{name}: {why}", file=sys.stderr)
    args.scratch.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="worklist-", dir=args.scratch))
    started = dt.datetime.now(dt.UTC)
    lives: list[Live] = []
    intakes: list[Intake] = []
    failed: dict[str, str] = {}
    notes: dict[str, list[str]] = {}
    cells: dict[tuple[str, str], dict[str, Cell]] = {}
    content: dict[str, dict[str, Any]] = {}
    wl_seconds = None
    try:
        file_peers = [p for p in selected if p.name in ("wlmscpfs", "orthanc")]
        if any(p.name not in unavailable for p in file_peers):
            t0 = time.perf_counter()
            folder = write_wl_files(items, root / "wl")
            wl_seconds = round(time.perf_counter() - t0, 1)
            print(f"wrote {len(items)} .wl files to {folder} in {wl_seconds} s", file=sys.stderr)
            for peer in file_peers:
                if isinstance(peer, WlmscpfsPeer):
                    peer.root = root / "wl"
                elif isinstance(peer, OrthancMWL):
                    peer.database = folder
        openpacs = all_peers["openpacs"]
        if "openpacs" in peers and "openpacs" not in unavailable:
            assert isinstance(openpacs, OpenpacsMWL)
            msgs = [
                orm_message(it, i, started.strftime("%Y%m%d%H%M%S")) for i, it in enumerate(items)
            ]
            for k, conns in enumerate(args.hl7_conns):
                last = k == len(args.hl7_conns) - 1
                intake, live = hl7_load(openpacs, msgs, conns, root, args, keep_running=last)
                intakes.append(intake)
                print(
                    f"[hl7 {conns} conn] openpacs: {intake.accepted} AA of {intake.orders} in "
                    f"{intake.seconds:.1f} s = {intake.rate:.1f} orders/s"
                    + (f"; {intake.failures} not AA: {intake.reasons}" if intake.failures else ""),
                    file=sys.stderr,
                    flush=True,
                )
                if last:
                    lives.append(live)
                    if live.error:
                        failed["openpacs"] = f"start/load: {live.error}"
                    elif intake.failures:
                        failed["openpacs"] = f"HL7 load: {intake.failures} orders not AA"
        for peer in file_peers:
            if peer.name in unavailable:
                continue
            live = Live(peer, Path(tempfile.mkdtemp(prefix=f"mwl-{peer.name}-", dir=root)))
            try:
                live.running = peer.start(live.run_dir)
            except PeerError as exc:
                live.error = str(exc)
                failed[peer.name] = f"start: {exc}"
            lives.append(live)
        measuring = [lv for lv in lives if lv.running is not None and lv.peer.name not in failed]
        if measuring:
            content = check_contents(measuring, items, args.timeout)
            spy: subprocess.Popen[bytes] | None = None
            op = next((lv for lv in measuring if lv.peer.name == "openpacs"), None)
            if args.py_spy is not None and op is not None and op.running is not None:
                out = args.py_spy.with_name(f"{args.py_spy.stem}-assoc{args.py_spy.suffix}")
                spy = start_pyspy(args.py_spy_bin, op.running.proc.pid, out, op.run_dir)
            try:
                for kind, row in measure_assoc(measuring, queries, items, args).items():
                    cells[(kind, "assoc")] = row
            finally:
                if spy is not None:
                    notes.setdefault("openpacs", []).append(stop_pyspy(spy, out))
            for kind, row in measure_findscu(measuring, queries, args).items():
                cells[(kind, "findscu")] = row
    finally:
        for lv in lives:
            warning = stop_live(lv, args.keep_data)
            if warning:
                notes.setdefault(lv.peer.name, []).append(warning)
        if args.keep_data:
            notes.setdefault("run", []).append(f"data kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    import pynetdicom

    versions = {p.name: unavailable.get(p.name) or p.version() for p in selected}
    orthanc = all_peers["orthanc"]
    if isinstance(orthanc, OrthancMWL) and orthanc.plugin_version:
        versions["orthanc"] += f" (worklists plugin {orthanc.plugin_version})"
    versions["findscu"] = _dcmtk_version("findscu")
    versions["pynetdicom"] = pynetdicom.__version__
    timeouts = " ".join(_timeouts(args.timeout))
    doc: dict[str, Any] = {
        "started_utc": started.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "settings": {
            "hl7": f"ORM^O01 v2.3.1 over MLLP (0x0b message 0x1c 0x0d), loads with "
            f"{args.hl7_conns} connection(s), each load into a fresh openpacs; one message in "
            "flight per connection, the next sent after its ACK (MSA-1 must be AA); contiguous "
            "shards; time from all connections open to the last ACK",
            "assoc": "pynetdicom, one association per peer (MWL FIND, Explicit VR LE then "
            "Implicit VR LE proposed, as findscu does), TCP_NODELAY on its socket, identifier "
            "logging off; each query timed from send_c_find to the final response; "
            f"{args.repeat} timed queries per cell after 1 warm-up",
            "findscu": f"findscu -W -v {timeouts} -aet {SENDER_AET} -aec <AET> -k ... 127.0.0.1 "
            f"<port>, start to exit; {args.findscu_repeat} timed runs per cell after 1 warm-up; "
            "hits = 'Find Response: N' lines, success = a final response with status Success",
            "keys": {q.kind: [list(k) for k in q.keys] for q in queries},
            "env": "TCP_NODELAY=1 for findscu, echoscu, wlmscpfs and Orthanc",
            "quiesce": f"sync + wait (at most {args.quiesce:.0f} s) for idle CPUs before each "
            "HL7 load and each group of queries",
            "wl_files_written_s": wl_seconds,
            "scratch": str(args.scratch),
        },
        "machine": machine_facts(args.scratch),
        "versions": versions,
        "peer_settings": {
            p.name: p.settings()  # type: ignore[attr-defined]
            for p in selected
            if p.name not in unavailable
        },
        "items": info,
        "hl7_intake": [dataclasses.asdict(i) for i in intakes],
        "content_check": content,
        "rows": build_rows(queries, items, cells, peers, unavailable, failed),
        "failed_peers": failed,
        "unavailable": unavailable,
        "notes": notes,
    }
    doc["targets"] = targets(doc)
    print_report(doc, peers, args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        print(f"results written to {args.json}")
    bad = (
        bool(failed)
        or any(c["problem"] for c in content.values())
        or any(i.failures for i in intakes)
        or any(
            row["problems"] or any(a["status"] == "failed" for a in row["peers"].values())
            for row in doc["rows"]
        )
    )
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: every peer started was stopped", file=sys.stderr)
        sys.exit(130)
