#!/usr/bin/env python3
"""Query/retrieve benchmark: C-FIND and C-MOVE, openpacs against Orthanc.

What it measures
----------------
With 5,001 studies stored in each peer (the ``studies5k`` corpus):

* study-level C-FIND, Study Root, by (1) Patient's Name wildcard, (2) Study Date
  range, (3) exact Accession Number -- timed twice:

  - ``findscu``: one DCMTK process per query, end to end (process start to
    exit: association, query, every response, release);
  - ``assoc``: one pynetdicom association per peer, N queries on it, the time of
    each query from C-FIND-RQ to the final response -- the query cost without
    process start-up and association set-up;

* C-MOVE of a 100-instance CT study (512x512, 16-bit) to a fresh DCMTK
  ``storescp`` with ``movescu``, process start to exit; the 100 files must
  arrive, and their data sets (everything after the file meta) must be
  byte-identical to the originals.

Each figure is the median (or ``--stat best``) of ``--repeat`` runs after one
untimed warm-up run; the peers alternate run by run. Hit counts are checked
against the corpus (which knows the answer) and between peers: a mismatch is
reported loudly and makes the exit status 1. A peer whose query fails (refused,
association rejected, no final response...) reads FAILED with the reason, and
the other peers are still measured.

Peers: ``openpacs serve`` (a config with ``[query] max_results = 100000`` and a
``[[remote]]`` for the C-MOVE destination) and the Debian ``/usr/sbin/Orthanc``
(defaults as in ingest.py, plus ``DicomModalities`` for the destination and the
querying AE, and the C-FIND limits set explicitly to 0 = unlimited, their
default). The corpus is loaded into each peer once per run with 4 parallel
``storescu`` processes; the load is timed and reported separately.

Run by hand only, never from the test suite::

    .venv/bin/python bench/query.py                    # both peers, 5 repeats
    .venv/bin/python bench/query.py --peers orthanc --json out.json

The peer start-up, ports, process bookkeeping, corpus helpers and machine facts
are imported from ingest.py (same directory), so both harnesses start the peers
the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import functools
import json
import logging
import re
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from ingest import (
    DEFAULT_OPENPACS,
    SENDER_AET,
    WORK_DIR,
    CorpusSpec,
    CpuSnapshot,
    OpenpacsPeer,
    OrthancPeer,
    Peer,
    PeerError,
    Running,
    StorescpPeer,
    _csv,
    _ct_dataset,
    _dcmtk_version,
    _file_meta,
    _mr_pixels,
    _on_sigterm,
    _tail,
    _uid,
    _warm_page_cache,
    count_files,
    dcmtk_env,
    free_ports,
    machine_facts,
    quiesce,
    refuse_second_bench,
    send,
    shard,
    storescu_profile,
)
from ingest import GENERATOR_VERSION as INGEST_GENERATOR_VERSION
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)

CORPUS = "studies5k"
CORPUS_DIR = WORK_DIR / CORPUS
# Bump when the generated content changes, so a stale corpus gets rebuilt.
GENERATOR_VERSION = 1
N_STUDIES = 5000
N_PATIENTS = 2000
SEED = 5000
MOVE_SPEC = CorpusSpec("move100", "ct", 1, 1, 100, 512, seed=100)
FIRST_DAY = dt.date(2021, 1, 1)
LAST_DAY = dt.date(2025, 12, 31)
NAME_QUERY = "M*"
DATE_RANGE_START = dt.date(2024, 1, 1)
DATE_RANGE_HITS = 250  # the range is widened day by day until it holds at least this many
DEST_AET = "DEST"
PEERS = ("openpacs", "orthanc")
MAX_RESULTS = 100000
# Return keys of every C-FIND (the query key of each query is added to them).
RETURN_KEYS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "PatientName",
    "PatientID",
    "StudyDescription",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
)


# --------------------------------------------------------------------------
# The studies5k corpus: 5,000 one-instance studies of ~2,000 patients, plus one
# 100-instance CT study for the C-MOVE. Generated once into bench/.work/studies5k.
# --------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return text.split()


# The most frequent US family names with their approximate frequency per
# 100,000 people (US Census 2010). Together about 17 % of the population.
HEAD_SURNAMES = _words(
    "SMITH 828 JOHNSON 655 WILLIAMS 551 BROWN 487 JONES 483 GARCIA 394 MILLER 384 DAVIS 381 "
    "RODRIGUEZ 353 MARTINEZ 348 HERNANDEZ 330 LOPEZ 296 GONZALEZ 277 WILSON 270 ANDERSON 262 "
    "THOMAS 252 TAYLOR 251 MOORE 240 JACKSON 236 MARTIN 235 LEE 229 PEREZ 219 THOMPSON 218 "
    "WHITE 216 HARRIS 204 SANCHEZ 204 CLARK 189 RAMIREZ 187 LEWIS 181 ROBINSON 179 WALKER 177 "
    "YOUNG 165 ALLEN 164 KING 161 WRIGHT 160 SCOTT 154 TORRES 152 NGUYEN 151 HILL 150 "
    "FLORES 150 GREEN 149 ADAMS 148 NELSON 147 BAKER 145 HALL 143 RIVERA 142 CAMPBELL 139 "
    "MITCHELL 139 CARTER 137 ROBERTS 137 GOMEZ 131 PHILLIPS 131 EVANS 130 TURNER 129 DIAZ 128 "
    "PARKER 126 CRUZ 125 EDWARDS 124 COLLINS 123 REYES 122 STEWART 121 MORRIS 118 MORALES 116 "
    "MURPHY 114 COOK 113 ROGERS 112 GUTIERREZ 111 ORTIZ 110 MORGAN 109 COOPER 108 PETERSON 107 "
    "BAILEY 106 REED 105 KELLY 104 HOWARD 103 RAMOS 102 KIM 101 COX 100 WARD 99 RICHARDSON 98 "
    "WATSON 97 BROOKS 96 CHAVEZ 95 WOOD 94 JAMES 93 BENNETT 92 GRAY 91 MENDOZA 90 RUIZ 89 "
    "HUGHES 88 PRICE 87 ALVAREZ 86 CASTILLO 85 SANDERS 84 PATEL 83 MYERS 82 LONG 81 ROSS 80 "
    "FOSTER 79 JIMENEZ 78"
)
# The long tail (the other ~83 %): made-up names whose initials follow the
# approximate initial-letter distribution of US family names (percent), except
# M, raised from ~9.6 to 12 (as with a Scottish/Irish Mc/Mac share) so that
# "M*" selects 10-15 % of the studies, like the 645 of 5,010.
TAIL_INITIALS = _words(
    "A 3.5 B 9.0 C 7.6 D 5.0 E 1.8 F 3.6 G 5.4 H 7.4 I 0.4 J 2.3 K 4.2 L 5.0 M 12.0 N 2.0 "
    "O 1.4 P 5.0 Q 0.2 R 5.8 S 10.0 T 3.8 U 0.2 V 2.0 W 5.6 X 0.05 Y 0.6 Z 0.8"
)
TAIL_MIDDLES = ("A", "E", "I", "O", "U", "AR", "ER", "OR", "AN", "EL", "IL", "OL", "AL", "EN")
TAIL_ENDS = (
    "SON", "MAN", "TON", "LEY", "FORD", "WOOD", "LAND", "BERG", "STEIN", "SKI", "OWSKI", "INI",
    "ELLI", "EZ", "ES", "ER", "ETT", "INS", "ICK", "AND", "OLD", "HAM", "ROW", "DALE", "FIELD",
    "NER", "LER", "OVA", "ENKO", "AKIS",
)  # fmt: skip
TAIL_CLUSTERS = {
    "B": ("BL", "BR"), "C": ("CH", "CL", "CR"), "D": ("DR",), "F": ("FL", "FR"),
    "G": ("GL", "GR"), "K": ("KR",), "P": ("PH", "PL", "PR"), "S": ("SH", "SL", "SP", "ST"),
    "T": ("TH", "TR"), "W": ("WH",),
}  # fmt: skip
MALE_NAMES = _words(
    "JAMES ROBERT JOHN MICHAEL DAVID WILLIAM RICHARD JOSEPH THOMAS CHARLES CHRISTOPHER DANIEL "
    "MATTHEW ANTHONY MARK DONALD STEVEN PAUL ANDREW JOSHUA KENNETH KEVIN BRIAN GEORGE TIMOTHY "
    "RONALD EDWARD JASON JEFFREY RYAN JACOB GARY NICHOLAS ERIC JONATHAN STEPHEN LARRY JUSTIN "
    "SCOTT BRANDON BENJAMIN SAMUEL GREGORY ALEXANDER PATRICK FRANK RAYMOND JACK DENNIS JERRY"
)
FEMALE_NAMES = _words(
    "MARY PATRICIA JENNIFER LINDA ELIZABETH BARBARA SUSAN JESSICA SARAH KAREN LISA NANCY BETTY "
    "SANDRA MARGARET ASHLEY KIMBERLY EMILY DONNA MICHELLE CAROL AMANDA MELISSA DEBORAH "
    "STEPHANIE DOROTHY REBECCA SHARON LAURA CYNTHIA AMY KATHLEEN ANGELA SHIRLEY BRENDA EMMA "
    "ANNA PAMELA NICOLE SAMANTHA KATHERINE CHRISTINE HELEN DEBRA RACHEL CAROLYN JANET MARIA "
    "CATHERINE HEATHER"
)
CT_DESCRIPTIONS = (
    "CT HEAD W/O CONTRAST", "CT CHEST W CONTRAST", "CT ABDOMEN PELVIS W CONTRAST",
    "CT CHEST PE PROTOCOL", "CTA HEAD AND NECK", "CT LUMBAR SPINE W/O CONTRAST",
    "CT SINUS W/O CONTRAST", "CT CHEST LOW DOSE SCREENING", "CT KIDNEY STONE PROTOCOL",
)  # fmt: skip
MR_DESCRIPTIONS = (
    "MR BRAIN W/WO CONTRAST", "MR LUMBAR SPINE W/O CONTRAST", "MR KNEE RIGHT W/O CONTRAST",
    "MR KNEE LEFT W/O CONTRAST", "MR SHOULDER LEFT W/O CONTRAST", "MR CERVICAL SPINE",
    "MR PROSTATE MULTIPARAMETRIC", "MR LIVER W/WO CONTRAST", "MR BREAST BILATERAL",
)  # fmt: skip
INSTITUTIONS = (
    ("OPENPACS GENERAL HOSPITAL", 0.6),
    ("RIVERSIDE MEDICAL CENTER", 0.3),
    ("NORTHGATE IMAGING CLINIC", 0.1),
)


@dataclasses.dataclass(frozen=True)
class StudyRow:
    """What the harness needs to know about one stored study (to predict hit counts)."""

    uid: str
    patient_name: str
    study_date: str
    accession: str


@dataclasses.dataclass(frozen=True)
class Corpus:
    files: list[Path]  # send order: the 5,000 small studies, then the 100 CT instances
    studies: list[StudyRow]  # every study, the C-MOVE study included
    move_uid: str
    move_files: list[Path]
    name_query: str
    date_range: str
    accession: str

    def expected_hits(self, kind: str) -> int:
        if kind == "name":
            prefix = self.name_query.rstrip("*")
            return sum(1 for s in self.studies if s.patient_name.startswith(prefix))
        if kind == "date":
            lo, hi = self.date_range.split("-")
            return sum(1 for s in self.studies if lo <= s.study_date <= hi)
        return sum(1 for s in self.studies if s.accession == self.accession)


def _weighted(
    rng: np.random.Generator, weights: Sequence[float] | np.ndarray, n: int
) -> np.ndarray:
    p = np.asarray(weights, dtype=np.float64)
    out: np.ndarray = rng.choice(len(p), size=n, p=p / p.sum())
    return out


def _tail_surname(rng: np.random.Generator, initial: str) -> str:
    clusters = TAIL_CLUSTERS.get(initial, ())
    if initial in "AEIOUY":
        start = initial + str(rng.choice(list("BDLMNRST")))
    elif clusters and rng.random() < 0.3:
        start = str(rng.choice(clusters))
    else:
        start = initial
    name = start + str(rng.choice(TAIL_MIDDLES)) + str(rng.choice(TAIL_ENDS))
    return name.replace("QA", "QUA").replace("QE", "QUE").replace("QO", "QUO")


def _patients(rng: np.random.Generator) -> list[dict[str, str]]:
    head = HEAD_SURNAMES[0::2]
    head_w = [float(w) for w in HEAD_SURNAMES[1::2]]
    head_share = sum(head_w) / 100000
    letters = TAIL_INITIALS[0::2]
    letter_w = [float(w) for w in TAIL_INITIALS[1::2]]
    male_w = [1 / (i + 1) ** 0.7 for i in range(len(MALE_NAMES))]
    female_w = [1 / (i + 1) ** 0.7 for i in range(len(FEMALE_NAMES))]
    out: list[dict[str, str]] = []
    used_ids: set[str] = set()
    for _ in range(N_PATIENTS):
        if rng.random() < head_share:
            family = head[int(_weighted(rng, head_w, 1)[0])]
        else:
            family = _tail_surname(rng, letters[int(_weighted(rng, letter_w, 1)[0])])
        sex = "F" if rng.random() < 0.52 else "M"
        names, weights = (FEMALE_NAMES, female_w) if sex == "F" else (MALE_NAMES, male_w)
        given = names[int(_weighted(rng, weights, 1)[0])]
        pn = f"{family}^{given}"
        if rng.random() < 0.3:
            pn += "^" + chr(ord("A") + int(rng.integers(0, 26)))
        while True:
            pid = f"P{int(rng.integers(1_000_000, 9_999_999))}"
            if pid not in used_ids:
                used_ids.add(pid)
                break
        birth = dt.date(1930, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 90)))
        out.append({"name": pn, "id": pid, "birth": birth.strftime("%Y%m%d"), "sex": sex})
    return out


def _study_plan(rng: np.random.Generator) -> list[dict[str, Any]]:
    """Patient, date, time, modality, description... of each of the 5,000 studies."""
    patients = _patients(rng)
    # Every patient has one study; the rest go to a skewed minority (follow-ups).
    weights = rng.lognormal(0.0, 0.8, size=N_PATIENTS)
    owners = list(range(N_PATIENTS)) + list(_weighted(rng, weights, N_STUDIES - N_PATIENTS))
    days = [FIRST_DAY + dt.timedelta(days=i) for i in range((LAST_DAY - FIRST_DAY).days + 1)]
    day_w = [0.35 if d.weekday() >= 5 else 1.0 for d in days]
    referrers = [
        f"{HEAD_SURNAMES[2 * i]}^{(MALE_NAMES if i % 2 else FEMALE_NAMES)[i]}" for i in range(40)
    ]
    plan: list[dict[str, Any]] = []
    for owner, day_idx in zip(owners, _weighted(rng, day_w, N_STUDIES), strict=True):
        modality = "CT" if rng.random() < 0.45 else "MR"
        hour = int(rng.choice([7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]))
        plan.append(
            {
                "patient": patients[int(owner)],
                "date": days[int(day_idx)],
                "time": f"{hour:02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}",
                "modality": modality,
                "description": str(
                    rng.choice(CT_DESCRIPTIONS if modality == "CT" else MR_DESCRIPTIONS)
                ),
                "referrer": referrers[int(rng.integers(0, len(referrers)))],
                "institution": INSTITUTIONS[
                    int(_weighted(rng, [w for _, w in INSTITUTIONS], 1)[0])
                ][0],
            }
        )
    # RIS accession numbers grow with time: RA<yy><6-digit running number per year>.
    order = sorted(range(N_STUDIES), key=lambda i: (plan[i]["date"], plan[i]["time"]))
    per_year: dict[int, int] = {}
    for i in order:
        year = plan[i]["date"].year
        per_year[year] = per_year.get(year, 0) + 1
        plan[i]["accession"] = f"RA{year % 100:02d}{per_year[year]:06d}"
    return plan


def _ct_small_pixels(rng: np.random.Generator, n: int) -> np.ndarray:
    """n x n int16 stored values (HU + 1024) of a disk phantom with noise."""
    coords = np.linspace(-1.0, 1.0, n, dtype=np.float32)
    x = coords[np.newaxis, :]
    y = coords[:, np.newaxis]
    hu = np.full((n, n), -1000.0, dtype=np.float32)
    hu[(x / 0.9) ** 2 + (y / 0.7) ** 2 <= 1.0] = 40.0
    hu[((x - 0.1) / 0.2) ** 2 + (y / 0.2) ** 2 <= 1.0] = 300.0
    hu += rng.normal(0.0, 12.0, size=(n, n)).astype(np.float32)
    out: np.ndarray = np.clip(np.rint(hu + 1024.0), -2048, 2047).astype("<i2")
    return out


def _small_dataset(index: int, s: dict[str, Any]) -> Dataset:
    """The one instance (64x64 CT or MR, Explicit VR LE) of study number `index`."""
    ct = s["modality"] == "CT"
    sop_class = CTImageStorage if ct else MRImageStorage
    sop = _uid(CORPUS, "sop", index)
    patient = s["patient"]
    date = s["date"].strftime("%Y%m%d")
    birth = dt.datetime.strptime(patient["birth"], "%Y%m%d").date()
    age = (
        s["date"].year - birth.year - ((s["date"].month, s["date"].day) < (birth.month, birth.day))
    )
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if ct else ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = s["time"]
    ds.AccessionNumber = s["accession"]
    ds.Modality = s["modality"]
    ds.Manufacturer = "OPENPACS BENCH"
    ds.InstitutionName = s["institution"]
    ds.ReferringPhysicianName = s["referrer"]
    ds.StationName = f"{s['modality']}{1 + index % 3:02d}"
    ds.StudyDescription = s["description"]
    ds.SeriesDescription = "AXIAL 5.0" if ct else "T2 TSE AX"
    ds.ManufacturerModelName = "SYNTH CT 64" if ct else "SYNTH MR 1.5T"
    ds.PatientName = patient["name"]
    ds.PatientID = patient["id"]
    ds.PatientBirthDate = patient["birth"]
    ds.PatientSex = patient["sex"]
    ds.PatientAge = f"{max(age, 0):03d}Y"
    ds.BodyPartExamined = s["description"].split()[1].replace("/", "")[:16]
    ds.SliceThickness = 5.0 if ct else 3.0
    if ct:
        ds.KVP = 120
    else:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "SK"
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = 4000
        ds.EchoTime = 90
        ds.MagneticFieldStrength = 1.5
    ds.StudyInstanceUID = _uid(CORPUS, "study", index)
    ds.SeriesInstanceUID = _uid(CORPUS, "series", index)
    ds.StudyID = str(index + 1)
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [-120, -120, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = _uid(CORPUS, "for", index)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 64
    ds.PixelSpacing = [3.75, 3.75]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    rng = np.random.default_rng([SEED, index])
    if ct:
        ds.PixelRepresentation = 1
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.PixelData = _ct_small_pixels(rng, 64).tobytes()
    else:
        ds.PixelRepresentation = 0
        ds.WindowCenter = 1200
        ds.WindowWidth = 2400
        ds.PixelData = _mr_pixels(rng, 64, phase=index / 10).tobytes()
    return ds


def _corpus_from(manifest: dict[str, Any]) -> Corpus:
    files = [CORPUS_DIR / f for f in manifest["files"]]
    return Corpus(
        files=files,
        studies=[StudyRow(*row) for row in manifest["studies"]],
        move_uid=manifest["move_uid"],
        move_files=[CORPUS_DIR / f for f in manifest["move_files"]],
        name_query=manifest["queries"]["name"],
        date_range=manifest["queries"]["date"],
        accession=manifest["queries"]["accession"],
    )


def ensure_corpus() -> Corpus:
    """Return the studies5k corpus, generating it into bench/.work/studies5k if needed."""
    manifest_path = CORPUS_DIR / "manifest.json"
    want = {
        "generator": GENERATOR_VERSION,
        "studies": N_STUDIES,
        "patients": N_PATIENTS,
        "seed": SEED,
        "move": dataclasses.asdict(MOVE_SPEC),
        "ingest_generator": INGEST_GENERATOR_VERSION,  # the C-MOVE study comes from ingest.py
    }
    if manifest_path.is_file():
        have = json.loads(manifest_path.read_text())
        if {k: have.get("spec", {}).get(k) for k in want} == want:
            corpus = _corpus_from(have)
            if all(f.is_file() for f in corpus.files):
                return corpus
    print(
        f"generating corpus {CORPUS} ({N_STUDIES} + 1 studies) in {CORPUS_DIR} ...", file=sys.stderr
    )
    t0 = time.perf_counter()
    tmp = WORK_DIR / f"{CORPUS}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(SEED)
    plan = _study_plan(rng)
    names: list[str] = []
    studies: list[list[str]] = []
    for i, s in enumerate(plan):
        ds = _small_dataset(i, s)
        fname = f"s{i:05d}.dcm"
        ds.save_as(tmp / fname, enforce_file_format=True)
        names.append(fname)
        studies.append([ds.StudyInstanceUID, str(ds.PatientName), ds.StudyDate, s["accession"]])
    move_names: list[str] = []
    for inst in range(MOVE_SPEC.instances_per_series):
        ds = _ct_dataset(MOVE_SPEC, 0, 0, inst)
        fname = f"m{inst:03d}.dcm"
        ds.save_as(tmp / fname, enforce_file_format=True)
        move_names.append(fname)
    studies.append([ds.StudyInstanceUID, str(ds.PatientName), ds.StudyDate, ds.AccessionNumber])
    # Queries: the date range starts on DATE_RANGE_START and is widened day by
    # day until it holds DATE_RANGE_HITS studies; the accession is a seeded pick.
    dates = sorted(s[2] for s in studies)
    end = DATE_RANGE_START
    lo = DATE_RANGE_START.strftime("%Y%m%d")
    while sum(1 for d in dates if lo <= d <= end.strftime("%Y%m%d")) < DATE_RANGE_HITS:
        end += dt.timedelta(days=1)
    queries = {
        "name": NAME_QUERY,
        "date": f"{lo}-{end.strftime('%Y%m%d')}",
        "accession": plan[int(rng.integers(N_STUDIES // 4, 3 * N_STUDIES // 4))]["accession"],
    }
    manifest = {
        "spec": want,
        "files": names + move_names,
        "move_files": move_names,
        "move_uid": studies[-1][0],
        "queries": queries,
        "studies": studies,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=0))
    shutil.rmtree(CORPUS_DIR, ignore_errors=True)
    tmp.rename(CORPUS_DIR)
    print(f"  done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return _corpus_from(manifest)


def describe_corpus(corpus: Corpus) -> dict[str, Any]:
    patients = {s.patient_name for s in corpus.studies[:-1]}
    dates = sorted(s.study_date for s in corpus.studies[:-1])
    return {
        "studies": len(corpus.studies),
        "instances": len(corpus.files),
        "bytes": sum(f.stat().st_size for f in corpus.files),
        "distinct_patient_names": len(patients),
        "study_dates": f"{dates[0]}..{dates[-1]}",
        "queries": {
            "name": corpus.name_query,
            "date": corpus.date_range,
            "accession": corpus.accession,
        },
        "expected_hits": {k: corpus.expected_hits(k) for k in ("name", "date", "accession")},
    }


# --------------------------------------------------------------------------
# Peers with query/retrieve set up (the ingest.py peers plus a C-MOVE destination)
# --------------------------------------------------------------------------


class DestPeer(StorescpPeer):
    """The C-MOVE destination: storescp --fork -od DIR -aet DEST PORT (TCP_NODELAY=1)."""

    name = "dest"
    aet = DEST_AET


class OrthancQR(OrthancPeer):
    """Orthanc as in ingest.py, plus the modalities that Q/R needs."""

    def __init__(self) -> None:
        super().__init__()
        self.dest_port = 0

    def settings(self) -> str:
        return (
            "Orthanc defaults (as ingest.py: storage + SQLite index in the run dir, no plugins, "
            "no HTTP auth) plus DicomModalities {dest: [DEST, 127.0.0.1, <storescp port>], "
            "bench: [BENCH, 127.0.0.1, <unused port>]} (C-FIND/C-MOVE are only answered for "
            "known AETs: DicomAlwaysAllowFind/Move default to false) and LimitFindResults = "
            "LimitFindInstances = 0 (no cap; also their default). StorageAccessOnFind 'Always', "
            "CaseSensitivePN false, SynchronousCMove true, MaximumPduLength 16384 (defaults)"
        )

    def extra_config(self, spare_port: int) -> dict[str, Any]:
        return {
            "DicomModalities": {
                "dest": [DEST_AET, "127.0.0.1", self.dest_port],
                "bench": [SENDER_AET, "127.0.0.1", spare_port],
            },
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
        }

    def count_studies(self, running: Running) -> int | None:
        import urllib.request

        url = f"http://127.0.0.1:{running.http_port}/statistics"
        with (
            contextlib.suppress(OSError, ValueError, KeyError),
            urllib.request.urlopen(url, timeout=10) as resp,
        ):
            return int(json.load(resp)["CountStudies"])
        return None


# openpacs rejects unknown config sections/keys; while [query] max_results does
# not exist yet, the harness retries without it and says so.
_UNKNOWN_QUERY_KEY = re.compile(r"\bquery(\.max_results)?: unknown key")


class OpenpacsQR(OpenpacsPeer):
    """openpacs serve with a config holding [query] max_results and the [[remote]] DEST."""

    def __init__(self, binary: Path, base_config: Path | None) -> None:
        super().__init__(binary, None)
        self.base_config = base_config
        self.dest_port = 0
        self.with_query_section = True
        self.note = ""

    def settings(self) -> str:
        base = f" + {self.base_config}" if self.base_config else ""
        query = (
            f"[query] max_results = {MAX_RESULTS}"
            if self.with_query_section
            else "no [query] section (this openpacs rejects it; max_results at its default)"
        )
        return (
            f"openpacs serve --config <run dir>/openpacs.toml{base}: {query}; "
            "[[remote]] dest = DEST 127.0.0.1 <storescp port>, [[remote]] bench = BENCH; "
            "everything else at its defaults"
        )

    def _write_config(self, run_dir: Path) -> Path:
        text = self.base_config.read_text() + "\n" if self.base_config else ""
        have = tomllib.loads(text) if text else {}
        if self.with_query_section and "query" not in have:
            text += f"[query]\nmax_results = {MAX_RESULTS}\n\n"
        (bench_port,) = free_ports(1)
        for name, aet, port in (
            ("dest", DEST_AET, self.dest_port),
            ("bench", SENDER_AET, bench_port),
        ):
            text += (
                f'[[remote]]\nname = "{name}"\nae_title = "{aet}"\nhost = "127.0.0.1"\n'
                f"port = {port}\n\n"
            )
        cfg = run_dir / "openpacs.toml"
        cfg.write_text(text)
        return cfg

    def launch(self, run_dir: Path) -> Running:
        self.config = self._write_config(run_dir)
        return super().launch(run_dir)

    def start(self, run_dir: Path) -> Running:
        try:
            return super().start(run_dir)
        except PeerError as exc:
            if not (self.with_query_section and _UNKNOWN_QUERY_KEY.search(str(exc))):
                raise
        self.with_query_section = False
        self.note = (
            "openpacs does not know [query] max_results yet: started without it, so its "
            "default cap applies (a query over it must answer A700, not truncate)"
        )
        shutil.rmtree(run_dir / "data", ignore_errors=True)
        with contextlib.suppress(OSError):
            (run_dir / "openpacs.log").rename(run_dir / "openpacs-first-start.log")
        return super().start(run_dir)


# --------------------------------------------------------------------------
# Clients: findscu, pynetdicom (persistent association), movescu
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Call:
    """One timed operation."""

    ok: bool
    seconds: float
    hits: int
    reason: str = ""
    peer_cpu_s: float | None = None  # the peer's whole process group, from /proc (10 ms ticks)
    client_cpu_s: float | None = None  # this process (pynetdicom client) only


@dataclasses.dataclass(frozen=True)
class Query:
    kind: str  # name | date | accession
    key: str
    value: str

    @property
    def label(self) -> str:
        return f"{self.key}={self.value}"

    def elements(self) -> list[tuple[str, str]]:
        out = [("QueryRetrieveLevel", "STUDY")]
        out += [(k, self.value if k == self.key else "") for k in RETURN_KEYS]
        if self.key not in RETURN_KEYS:
            out.append((self.key, self.value))
        return out


def _dcmtk_problem(text: str) -> str:
    """The gist of a DCMTK tool's error output: its E:/F:/W: lines minus data set dumps."""
    lines = []
    for line in text.splitlines():
        if line[:3] in ("E: ", "F: ", "W: "):
            body = line[3:].strip()
            if body and not body.startswith(("#", "(")) and "query keys" not in body:
                lines.append(body)
        if "(0000,0902)" in line:  # Error Comment of a failed response
            lines.append(line[3:].strip())
    return "; ".join(dict.fromkeys(lines)) or "no error message"


_FIND_RSP = re.compile(r"^I: Find Response: \d+ \(", re.MULTILINE)
_FIND_FINAL = re.compile(r"Received Final Find Response \(([^)]*)\)")
_MOVE_FINAL = re.compile(r"Received Final Move Response \(([^)]*)\)")


def _error_comment(cmd: Sequence[str], timeout: float) -> str:
    """Re-run a failed (side-effect free) DCMTK query with -d to get the Error Comment."""
    debug = ["-d" if c == "-v" else c for c in cmd]
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        out = subprocess.run(
            debug, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout, check=False
        )
        found = re.findall(r"\(0000,0902\) LO \[([^\]]*)\]", out.stdout + out.stderr)
        if found:
            return f" (Error Comment, from a -d re-run: {found[-1].strip()})"
    return ""


def _timeouts(timeout: float) -> list[str]:
    t = str(max(1, int(timeout)))
    return ["-to", t, "-ta", t, "-td", t]


def findscu(aet: str, port: int, query: Query, timeout: float) -> tuple[Call, str]:
    cmd = ["findscu", "-v", "-S", *_timeouts(timeout), "-aet", SENDER_AET, "-aec", aet]
    for key, value in query.elements():
        cmd += ["-k", f"{key}={value}" if value else key]
    cmd += ["127.0.0.1", str(port)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout + 30, check=False
        )
    except subprocess.TimeoutExpired:
        return Call(False, time.perf_counter() - t0, 0, f"findscu timed out ({timeout:.0f} s)"), ""
    seconds = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    hits = len(_FIND_RSP.findall(out))
    final = _FIND_FINAL.search(out)
    if final is None:
        why = f"no final C-FIND response (findscu exit {proc.returncode}): {_dcmtk_problem(out)}"
        return Call(False, seconds, hits, why), out
    if final.group(1) != "Success":
        why = f"C-FIND {final.group(1)} after {hits} matches"
        return Call(False, seconds, hits, why + _error_comment(cmd, timeout)), out
    if proc.returncode != 0:
        return Call(False, seconds, hits, f"findscu exit {proc.returncode}"), out
    return Call(True, seconds, hits), out


def movescu(aet: str, port: int, study_uid: str, timeout: float) -> tuple[Call, str]:
    cmd = [
        "movescu", "-v", "-S", *_timeouts(timeout), "-aet", SENDER_AET, "-aec", aet,
        "-aem", DEST_AET, "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
        "127.0.0.1", str(port),
    ]  # fmt: skip
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout + 30, check=False
        )
    except subprocess.TimeoutExpired:
        return Call(False, time.perf_counter() - t0, 0, f"movescu timed out ({timeout:.0f} s)"), ""
    seconds = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    final = _MOVE_FINAL.search(out)
    if final is None:
        why = f"no final C-MOVE response (movescu exit {proc.returncode}): {_dcmtk_problem(out)}"
        return Call(False, seconds, 0, why), out
    if final.group(1) != "Success" or proc.returncode != 0:
        why = f"C-MOVE {final.group(1)} (movescu exit {proc.returncode}): {_dcmtk_problem(out)}"
        return Call(False, seconds, 0, why), out
    return Call(True, seconds, 0), out


class AssocClient:
    """One pynetdicom association to a peer; C-FINDs on it are timed one by one."""

    def __init__(self, aet: str, port: int, timeout: float) -> None:
        from pynetdicom import AE
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]
            StudyRootQueryRetrieveInformationModelFind,
        )

        self.model = StudyRootQueryRetrieveInformationModelFind
        self.aet, self.port = aet, port
        self.ae = AE(ae_title=SENDER_AET)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = timeout
        # Like findscu: Explicit VR Little Endian preferred, Implicit as the fallback.
        self.ae.add_requested_context(self.model, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.reconnects = 0
        self.transfer_syntax = ""
        self.error = self._connect()

    def _connect(self) -> str:
        """Associate; returns why it failed, or ''."""
        self.assoc = self.ae.associate("127.0.0.1", self.port, ae_title=self.aet)
        rejected = [c.abstract_syntax for c in self.assoc.rejected_contexts]
        if not self.assoc.is_established and self.model in rejected:
            return "the peer rejected the Study Root C-FIND presentation context"
        if not self.assoc.is_established:
            if self.assoc.is_rejected:
                return "association rejected"
            return "association aborted" if self.assoc.is_aborted else "association failed"
        if not any(c.abstract_syntax == self.model for c in self.assoc.accepted_contexts):
            self.assoc.release()
            return "Study Root C-FIND presentation context not accepted"
        sock = self.assoc.dul.socket.socket if self.assoc.dul.socket else None
        if sock is not None:  # as TCP_NODELAY=1 does for DCMTK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ctx = next(c for c in self.assoc.accepted_contexts if c.abstract_syntax == self.model)
        self.transfer_syntax = str(ctx.transfer_syntax[0].name)
        return ""

    def find(self, query: Query) -> Call:
        if self.error:
            return Call(False, 0.0, 0, self.error)
        if not self.assoc.is_established:
            # The peer closed it while idle (e.g. Orthanc's DicomScpTimeout, 30 s, while
            # another peer's slow queries ran): associate again, untimed, and say so.
            self.reconnects += 1
            why = self._connect()
            if why:
                return Call(False, 0.0, 0, f"re-association after the peer closed it: {why}")
        ds = Dataset()
        for key, value in query.elements():
            setattr(ds, key, value)
        hits = 0
        final: Dataset | None = None
        c0 = time.process_time()
        t0 = time.perf_counter()
        for status, _identifier in self.assoc.send_c_find(ds, self.model):
            code = getattr(status, "Status", None)
            if code in (0xFF00, 0xFF01):
                hits += 1
            else:
                final = status
        seconds = time.perf_counter() - t0
        client_cpu = round(time.process_time() - c0, 4)
        code = getattr(final, "Status", None)
        if code == 0x0000:
            return Call(True, seconds, hits, client_cpu_s=client_cpu)
        if code is None:
            why = "no final C-FIND response (association aborted or timed out)"
        else:
            comment = getattr(final, "ErrorComment", "")
            meaning = {0xA700: "Refused: Out of Resources", 0xFE00: "Cancel (matching stopped)"}
            why = f"C-FIND status 0x{code:04X}"
            why += f" {meaning[code]}" if code in meaning else ""
            why += f" (Error Comment: {comment})" if comment else ""
        return Call(False, seconds, hits, f"{why} after {hits} matches", client_cpu_s=client_cpu)

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


def dataset_bytes(path: Path) -> bytes:
    """The data set of a Part 10 file: everything after the file meta group."""
    raw = path.read_bytes()
    if raw[128:132] != b"DICM" or raw[132:136] != b"\x02\x00\x00\x00" or raw[136:138] != b"UL":
        raise ValueError(f"{path.name}: no Part 10 header with a group length")
    (group_len,) = struct.unpack("<I", raw[140:144])
    return raw[144 + group_len :]


def check_moved(dest_dir: Path, originals: dict[str, Path], settle: float) -> tuple[int, str, str]:
    """(files arrived, count problem, content problem), waiting up to `settle` s for stragglers."""
    deadline = time.monotonic() + settle
    while count_files(dest_dir) < len(originals) and time.monotonic() < deadline:
        time.sleep(0.05)
    got = sorted(p for p in dest_dir.iterdir() if p.is_file())
    if len(got) != len(originals):
        return len(got), f"{len(got)} of {len(originals)} instances arrived", ""
    differ: list[str] = []
    for path in got:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        orig = originals.get(str(meta.get("MediaStorageSOPInstanceUID", "")))
        if orig is None:
            differ.append(f"{path.name} (unknown SOP Instance UID)")
        elif dataset_bytes(path) != dataset_bytes(orig):
            differ.append(path.name)
    if differ:
        return len(got), "", f"{len(differ)} data sets differ from the originals, e.g. {differ[0]}"
    return len(got), "", ""


def _clear(directory: Path) -> None:
    for p in directory.iterdir():
        if p.is_file():
            p.unlink()


# --------------------------------------------------------------------------
# Cells: one (operation, client) x peer
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Cell:
    runs: list[Call] = dataclasses.field(default_factory=list)
    warmup: Call | None = None
    failed: str = ""  # a reason once the cell has failed; no further runs then
    notes: list[str] = dataclasses.field(default_factory=list)

    def add(self, call: Call, warmup: bool = False) -> None:
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
            "notes": self.notes,
        }
        if self.failed or not self.runs:
            out["status"] = "failed"
            out["reason"] = self.failed or "not run"
            return out
        secs = [r.seconds for r in self.runs]
        out.update(
            status="ok",
            hits=self.runs[0].hits,
            best_s=min(secs),
            median_s=statistics.median(secs),
            seconds=min(secs) if stat == "best" else statistics.median(secs),
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
    """A started peer with its C-MOVE destination."""

    peer: Peer
    run_dir: Path
    running: Running | None = None
    dest: Running | None = None
    error: str = ""
    load: dict[str, Any] = dataclasses.field(default_factory=dict)


def _timed(live: Live, fn: Callable[[], Call]) -> Call:
    """Run fn (which times itself) and add the peer's CPU time (its whole process group)."""
    assert live.running is not None
    before = CpuSnapshot.take()
    call = fn()
    call.peer_cpu_s = round(CpuSnapshot.take().minus(before, live.running.proc.pid).server, 4)
    return call


def start_and_load(live: Live, corpus: Corpus, args: argparse.Namespace) -> None:
    """Start the destination and the peer, then load the corpus (timed, reported apart)."""
    peer = live.peer
    dest_dir = live.run_dir / "dest"
    dest_dir.mkdir()
    dest = DestPeer()
    live.dest = dest.start(dest_dir)
    peer.dest_port = live.dest.port  # type: ignore[attr-defined]
    live.running = peer.start(live.run_dir)
    profile = storescu_profile(live.run_dir)
    n = len(corpus.files)
    t0 = time.perf_counter()
    seconds = send(
        profile,
        peer.aet,
        live.running.port,
        shard(corpus.files, args.load_assocs),
        live.run_dir,
        args.timeout,
        "load",
    )
    stored = peer.count(live.running)
    while stored < n and time.perf_counter() - t0 - seconds < args.settle:
        time.sleep(0.2)
        stored = peer.count(live.running)
    live.load = {
        "instances": n,
        "seconds": round(seconds, 3),
        "rate": round(n / seconds, 1),
        "stored": stored,
        "assocs": args.load_assocs,
    }
    if isinstance(peer, OrthancQR):
        live.load["studies"] = peer.count_studies(live.running)
    if stored != n:
        raise PeerError(f"load: stored {stored} of {n} instances")


def stop(live: Live, keep: bool) -> list[str]:
    notes: list[str] = []
    if live.running is not None:
        warning = live.peer.stop(live.running)
        if warning:
            notes.append(warning)
        live.running = None
    if live.dest is not None:
        DestPeer().stop(live.dest)
        live.dest = None
    if keep:
        notes.append(f"data kept in {live.run_dir}")
    else:
        shutil.rmtree(live.run_dir, ignore_errors=True)
    return notes


def measure_findscu(
    lives: Sequence[Live], queries: Sequence[Query], args: argparse.Namespace
) -> dict[tuple[str, str], dict[str, Cell]]:
    cells: dict[tuple[str, str], dict[str, Cell]] = {}
    for q in queries:
        row = cells[(q.kind, "findscu")] = {lv.peer.name: Cell() for lv in lives}
        quiesce(args.quiesce)
        for rep in range(-1, args.repeat):  # -1: the untimed warm-up
            for lv in lives:
                cell = row[lv.peer.name]
                if cell.failed or lv.running is None:
                    continue
                outputs: list[str] = []

                def run(
                    lv: Live = lv,
                    port: int = lv.running.port,
                    q: Query = q,
                    outputs: list[str] = outputs,
                ) -> Call:
                    call, out = findscu(lv.peer.aet, port, q, args.timeout)
                    outputs.append(out)
                    return call

                call = _timed(lv, run)
                cell.add(call, warmup=rep < 0)
                _progress("findscu", q, rep, lv, call)
                if not call.ok:
                    (lv.run_dir / f"findscu-{q.kind}.out").write_text("".join(outputs))
    return cells


def measure_assoc(
    lives: Sequence[Live], queries: Sequence[Query], args: argparse.Namespace
) -> dict[tuple[str, str], dict[str, Cell]]:
    from pynetdicom import _config

    # pynetdicom formats every identifier for its debug log even when the logger
    # is off; that alone costs ~0.5 ms per response, so switch it off.
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    cells: dict[tuple[str, str], dict[str, Cell]] = {
        (q.kind, "assoc"): {lv.peer.name: Cell() for lv in lives} for q in queries
    }
    clients: dict[str, AssocClient] = {}
    quiesce(args.quiesce)
    try:
        for lv in lives:
            if lv.running is not None:
                clients[lv.peer.name] = AssocClient(lv.peer.aet, lv.running.port, args.timeout)
        for q in queries:
            for rep in range(-1, args.repeat):
                for lv in lives:
                    cell = cells[(q.kind, "assoc")][lv.peer.name]
                    client = clients.get(lv.peer.name)
                    if cell.failed or client is None:
                        continue
                    call = _timed(lv, functools.partial(client.find, q))
                    cell.add(call, warmup=rep < 0)
                    _progress("assoc", q, rep, lv, call)
    finally:
        for name, client in clients.items():
            if client.transfer_syntax:
                note = f"the peer chose {client.transfer_syntax} for the association"
                cells[(queries[0].kind, "assoc")][name].notes.append(note)
            if client.reconnects:
                note = f"the peer closed the idle association; re-associated {client.reconnects}x"
                cells[(queries[0].kind, "assoc")][name].notes.append(note)
            with contextlib.suppress(Exception):
                client.close()
    return cells


def measure_move(
    lives: Sequence[Live], corpus: Corpus, args: argparse.Namespace
) -> dict[str, Cell]:
    originals: dict[str, Path] = {}
    for path in corpus.move_files:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        originals[str(meta.MediaStorageSOPInstanceUID)] = path
    cells = {lv.peer.name: Cell() for lv in lives}
    quiesce(args.quiesce)
    for rep in range(-1, args.repeat):
        for lv in lives:
            cell = cells[lv.peer.name]
            if cell.failed or lv.running is None or lv.dest is None:
                continue
            dest_dir = lv.dest.data_dir
            _clear(dest_dir)
            port = lv.running.port

            def run(lv: Live = lv, port: int = port) -> Call:
                return movescu(lv.peer.aet, port, corpus.move_uid, args.timeout)[0]

            call = _timed(lv, run)
            if call.ok:
                call.hits, missing, differ = check_moved(dest_dir, originals, args.settle)
                if missing:
                    call.ok, call.reason = False, missing
                elif differ and lv.peer.name == "openpacs":
                    call.ok, call.reason = False, differ
                elif differ and differ not in cell.notes:
                    cell.notes.append(differ)
            else:
                call.hits = count_files(dest_dir)
            cell.add(call, warmup=rep < 0)
            _progress("movescu", None, rep, lv, call)
    return cells


def _progress(client: str, q: Query | None, rep: int, lv: Live, call: Call) -> None:
    what = q.label if q else "C-MOVE"
    tag = "warm-up" if rep < 0 else f"r{rep + 1}"
    if call.ok:
        cpu = f", peer CPU {call.peer_cpu_s * 1000:.0f} ms" if call.peer_cpu_s is not None else ""
        if call.client_cpu_s is not None:
            cpu += f", client CPU {call.client_cpu_s * 1000:.0f} ms"
        res = f"{call.seconds:.3f} s, {call.hits} hits{cpu}"
    else:
        res = f"FAILED: {call.reason}"
    print(f"[{client} {what} {tag}] {lv.peer.name}: {res}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def _secs(value: float) -> str:
    return f"{value:.3f}" if value >= 0.01 else f"{value:.4f}"


def check_hits(row: dict[str, Any]) -> list[str]:
    """Problems with the hit counts of a row: against the corpus and between peers."""
    problems: list[str] = []
    got: dict[str, set[int]] = {}
    for name, agg in row["peers"].items():
        runs = [r for r in agg.get("runs", []) if r["ok"]]
        if agg.get("warmup") and agg["warmup"]["ok"]:
            runs.append(agg["warmup"])
        if runs:
            got[name] = {r["hits"] for r in runs}
    for name, hits in got.items():
        if hits != {row["expected"]}:
            problems.append(
                f"{name} returned {', '.join(map(str, sorted(hits)))} "
                f"where the corpus holds {row['expected']}"
            )
    distinct = {frozenset(h) for h in got.values()}
    if len(distinct) > 1:
        problems.append("peers disagree: " + ", ".join(f"{n} {sorted(h)}" for n, h in got.items()))
    return problems


def _grid(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def format_table(rows: Sequence[dict[str, Any]], peers: Sequence[str]) -> str:
    """Seconds per operation, the hit count, and the openpacs/orthanc ratio."""
    ratio = "openpacs" in peers and "orthanc" in peers
    lines = [["operation", "client", "hits", *(f"{p} s" for p in peers)]]
    lines[0] += ["openpacs/orthanc"] if ratio else []
    for row in rows:
        bad = bool(row["hit_problems"])
        line = [row["label"], row["client"], "MISMATCH" if bad else str(row["expected"])]
        for p in peers:
            agg = row["peers"].get(p)
            if agg is None:
                line.append("-")
            elif agg["status"] == "ok":
                line.append(_secs(agg["seconds"]) + ("!" if bad else ""))
            else:
                line.append("n/a" if agg["status"] == "n/a" else "FAILED")
        if ratio:
            a, b = row["peers"].get("openpacs", {}), row["peers"].get("orthanc", {})
            ok = a.get("status") == b.get("status") == "ok" and not bad
            line.append(f"{a['seconds'] / b['seconds']:.2f}" if ok else "-")
        lines.append(line)
    return _grid(lines)


def print_footer(doc: dict[str, Any], setting_keys: Sequence[str]) -> None:
    """The machine, versions, peer settings and the named run settings under a report (also
    dicomweb.py's and worklist.py's)."""
    m = doc["machine"]
    print(
        f"machine: nproc={m['nproc']}, CPU {m['cpu']}, {m['mem_gib']} GiB, "
        f"kernel {m['kernel']}, scratch {m['scratch_fs']}"
    )
    print("versions: " + ", ".join(f"{k}: {v}" for k, v in doc["versions"].items()))
    for name, text in doc["peer_settings"].items():
        print(f"settings {name}: {text}")
    for key in setting_keys:
        print(f"{key}: {doc['settings'][key]}")


def format_cpu(
    rows: Sequence[dict[str, Any]],
    peers: Sequence[str],
    first: str = "operation",
    client: str = "client CPU ms",
) -> str:
    """CPU time of each peer (and of the pynetdicom client) per operation, median, ms (also
    worklist.py's table, with its own column names)."""
    lines = [[first, "client", *(f"{p} CPU ms" for p in peers), client]]
    for row in rows:
        line = [row["label"], row["client"]]
        clients = []
        for p in peers:
            agg = row["peers"].get(p, {})
            cpu = agg.get("peer_cpu_s_median") if agg.get("status") == "ok" else None
            line.append("-" if cpu is None else f"{cpu * 1000:.0f}")
            if agg.get("client_cpu_s_median") is not None:
                clients.append(f"{agg['client_cpu_s_median'] * 1000:.0f}")
        line.append(" / ".join(clients) if clients else "-")
        lines.append(line)
    return _grid(lines)


def format_load(loads: dict[str, dict[str, Any]]) -> str:
    lines = [["load", "instances", "assocs", "seconds", "inst/s", "stored"]]
    for name, load in loads.items():
        if "error" in load:
            lines.append([name, "-", "-", "FAILED", "-", "-"])
        elif load:
            lines.append(
                [
                    name,
                    str(load["instances"]),
                    str(load["assocs"]),
                    f"{load['seconds']:.1f}",
                    f"{load['rate']:.1f}",
                    str(load["stored"])
                    + (f" ({load['studies']} studies)" if load.get("studies") else ""),
                ]
            )
    return _grid(lines)


def print_report(doc: dict[str, Any], args: argparse.Namespace) -> None:
    rows = doc["rows"]
    peers = [p for p in PEERS if p in args.peers]
    info = doc["corpus"]
    print()
    print(
        f"corpus {CORPUS}: {info['studies']} studies, {info['instances']} instances, "
        f"{info['distinct_patient_names']} distinct patient names, dates {info['study_dates']}"
    )
    print(format_load(doc["load"]))
    print()
    print(format_table(rows, peers))
    print()
    print(
        f"seconds, {args.stat} of {args.repeat} run(s) after 1 untimed warm-up; hits = "
        "matches the corpus holds (each peer's count is checked against it); "
        "ratio < 1 = openpacs faster. n/a = peer not available, FAILED = see below."
    )
    print(
        "findscu / movescu: one DCMTK process per operation, start to exit. assoc: one "
        "pynetdicom association per peer, per query from C-FIND-RQ to the final response."
    )
    print()
    print(format_cpu(rows, peers))
    print()
    print(
        "CPU time per operation, median: the peer's whole process group, from /proc in 10 ms "
        "ticks; client = this process (pynetdicom, both of its threads), per peer in "
        "column order."
    )
    for name, reason in doc["unavailable"].items():
        print(f"  n/a {name}: {reason}")
    for name, reason in doc["failed_peers"].items():
        print(f"  FAILED {name} (every cell): {reason}")
    for row in rows:
        where = f"{row['label']} [{row['client']}]"
        for name, agg in row["peers"].items():
            runs = agg.get("runs", [])
            if agg["status"] == "ok" and len(runs) > 1:
                print(
                    f"  runs {where} {name}: "
                    + ", ".join(_secs(r["seconds"]) for r in runs)
                    + f" (best {_secs(agg['best_s'])}, median {_secs(agg['median_s'])})"
                )
            elif agg["status"] == "failed" and name not in doc["failed_peers"]:
                print(f"  FAILED {where} {name}: {agg.get('reason', '')}")
            for note in agg.get("notes", []):
                print(f"  note {where} {name}: {note}")
    problems = [(row, p) for row in rows for p in row["hit_problems"]]
    if problems:
        print()
        print("!" * 78)
        print("HIT COUNT MISMATCH -- these figures are not comparable:")
        for row, p in problems:
            print(f"  {row['label']} [{row['client']}]: {p}")
        print("!" * 78)
    for name, notes in doc["notes"].items():
        for note in notes:
            print(f"note {name}: {note}")
    print_footer(doc, ("findscu", "assoc", "movescu", "load", "timing", "env"))


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Query/retrieve benchmark (C-FIND, C-MOVE): openpacs vs Orthanc (loopback).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--peers", type=_csv(str, PEERS), default=",".join(PEERS), help="comma-separated peers"
    )
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per cell (after a warm-up)")
    ap.add_argument(
        "--stat",
        choices=("median", "best"),
        default="median",
        help="how the runs of a cell make the figure in the table",
    )
    ap.add_argument(
        "--load-assocs", type=int, default=4, help="parallel storescu processes for the load"
    )
    ap.add_argument(
        "--openpacs-bin", type=Path, default=DEFAULT_OPENPACS, help="openpacs console script"
    )
    ap.add_argument(
        "--openpacs-config",
        type=Path,
        default=None,
        metavar="FILE",
        help="extra openpacs TOML; the harness appends its [query] and [[remote]] entries",
    )
    ap.add_argument(
        "--scratch",
        type=Path,
        default=WORK_DIR / "runs",
        help="where the per-run data dirs are created (its filesystem matters)",
    )
    ap.add_argument("--keep-data", action="store_true", help="keep the per-run data dirs")
    ap.add_argument(
        "--settle",
        type=float,
        default=10.0,
        help="seconds to wait for stored/received counts to catch up",
    )
    ap.add_argument(
        "--quiesce",
        type=float,
        default=15.0,
        help="before each group of runs: sync, then wait up to this many seconds for idle CPUs",
    )
    ap.add_argument(
        "--timeout", type=float, default=300.0, help="seconds before one operation is FAILED"
    )
    ap.add_argument("--json", type=Path, default=None, metavar="FILE", help="write results")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.load_assocs < 1:
        ap.error("--repeat and --load-assocs must be >= 1")
    return args


def build_rows(
    corpus: Corpus,
    queries: Sequence[Query],
    cells: dict[tuple[str, str], dict[str, Cell]],
    failed: dict[str, str],
    unavailable: dict[str, str],
    stat: str,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    plan = [
        (q.kind, client, f"C-FIND {q.label}") for client in ("findscu", "assoc") for q in queries
    ]
    plan.sort(key=lambda t: [q.kind for q in queries].index(t[0]))
    plan.append(("move", "movescu", f"C-MOVE {len(corpus.move_files)} CT 512x512 to storescp"))
    for kind, client, label in plan:
        expected = len(corpus.move_files) if kind == "move" else corpus.expected_hits(kind)
        peers: dict[str, dict[str, Any]] = {}
        for name in PEERS:
            if name in unavailable:
                peers[name] = {"status": "n/a", "reason": unavailable[name]}
            elif name in failed:
                peers[name] = {"status": "failed", "reason": failed[name], "runs": []}
            elif (kind, client) in cells and name in cells[(kind, client)]:
                peers[name] = cells[(kind, client)][name].summary(stat)
        row = {"kind": kind, "client": client, "label": label, "expected": expected}
        row["peers"] = peers
        row["hit_problems"] = check_hits(row)
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _on_sigterm)
    args = parse_args(argv)
    lock = refuse_second_bench()
    if lock is None:
        return 2
    for tool in ("findscu", "movescu", "storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            print(f"error: DCMTK {tool} not on PATH (apt-get install dcmtk)", file=sys.stderr)
            return 2
    all_peers: dict[str, Peer] = {
        "openpacs": OpenpacsQR(args.openpacs_bin, args.openpacs_config),
        "orthanc": OrthancQR(),
    }
    selected = [all_peers[p] for p in PEERS if p in args.peers]
    unavailable = {p.name: why for p in selected if (why := p.missing())}
    active = [p for p in selected if p.name not in unavailable]
    for name, why in unavailable.items():
        print(f"{name}: {why}", file=sys.stderr)

    corpus = ensure_corpus()
    info = describe_corpus(corpus)
    share = info["expected_hits"]["name"] / info["studies"]
    print(
        f"corpus {CORPUS}: {info['studies']} studies, {info['instances']} instances; expected "
        f"hits: PatientName={corpus.name_query} {info['expected_hits']['name']} ({share:.1%}), "
        f"StudyDate={corpus.date_range} {info['expected_hits']['date']}, "
        f"AccessionNumber={corpus.accession} {info['expected_hits']['accession']}",
        file=sys.stderr,
    )
    _warm_page_cache(corpus.files)
    queries = [
        Query("name", "PatientName", corpus.name_query),
        Query("date", "StudyDate", corpus.date_range),
        Query("accession", "AccessionNumber", corpus.accession),
    ]
    args.scratch.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC)
    lives = [
        Live(p, Path(tempfile.mkdtemp(prefix=f"query-{p.name}-", dir=args.scratch))) for p in active
    ]
    cells: dict[tuple[str, str], dict[str, Cell]] = {}
    notes: dict[str, list[str]] = {}
    failed: dict[str, str] = {}
    try:
        for lv in lives:
            try:
                start_and_load(lv, corpus, args)
                print(
                    f"[load] {lv.peer.name}: {lv.load['instances']} instances in "
                    f"{lv.load['seconds']:.1f} s ({lv.load['rate']:.0f} inst/s)",
                    file=sys.stderr,
                    flush=True,
                )
            except PeerError as exc:
                log = f"; log: {_tail(lv.running.log, 3)}" if lv.running else ""
                lv.error = f"start/load: {exc}{log}"
                print(f"[load] {lv.peer.name}: FAILED: {lv.error}", file=sys.stderr, flush=True)
                notes.setdefault(lv.peer.name, []).extend(stop(lv, args.keep_data))
        measuring = [lv for lv in lives if not lv.error]
        if measuring:
            cells.update(measure_findscu(measuring, queries, args))
            cells.update(measure_assoc(measuring, queries, args))
            cells[("move", "movescu")] = measure_move(measuring, corpus, args)
    finally:
        for lv in lives:
            if lv.running is not None or lv.dest is not None:
                notes.setdefault(lv.peer.name, []).extend(stop(lv, args.keep_data))
    for lv in lives:
        if lv.error:
            failed[lv.peer.name] = lv.error
        note = getattr(lv.peer, "note", "")
        if note:
            notes.setdefault(lv.peer.name, []).insert(0, note)

    import pynetdicom

    versions = {p.name: unavailable.get(p.name) or p.version() for p in selected}
    versions["dcmtk"] = _dcmtk_version("findscu")
    versions["pynetdicom"] = pynetdicom.__version__
    timeouts = " ".join(_timeouts(args.timeout))
    doc: dict[str, Any] = {
        "started_utc": started.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "settings": {
            "findscu": f"findscu -v -S {timeouts} -aet {SENDER_AET} -aec <AET> "
            "-k QueryRetrieveLevel=STUDY -k <key>=<value> "
            + " ".join(f"-k {k}" for k in RETURN_KEYS)
            + " 127.0.0.1 <port>; hits = 'Find Response: N' lines, success = a final "
            "response with status Success",
            "assoc": "pynetdicom, one association per peer (Study Root FIND, Explicit VR LE "
            "then Implicit VR LE proposed, as findscu does), TCP_NODELAY set on its socket, "
            "identifier logging off; each query timed from send_c_find to the final response, "
            "every response decoded",
            "movescu": f"movescu -v -S {timeouts} -aet {SENDER_AET} -aec <AET> -aem {DEST_AET} "
            "-k QueryRetrieveLevel=STUDY -k StudyInstanceUID=<uid> 127.0.0.1 <port>, start to "
            f"exit; destination storescp --fork -od DIR -aet {DEST_AET} PORT, emptied before "
            "each run; then all files must be in DIR with data sets (after the file meta) "
            "byte-equal to the originals (required of openpacs; a note for Orthanc)",
            "load": f"{args.load_assocs} storescu processes (-xf profile: CT/MR Image Storage, "
            "Explicit VR LE only) on contiguous shards, once per peer; timed, but apart",
            "timing": f"1 untimed warm-up + {args.repeat} timed runs per cell, peers "
            "alternating run by run; sync + wait for idle CPUs (at most "
            f"{args.quiesce:.0f} s) before each query's runs, the assoc runs and the C-MOVE runs",
            "env": "TCP_NODELAY=1 for findscu, movescu, storescu, echoscu, storescp and Orthanc",
            "repeat": args.repeat,
            "stat": args.stat,
            "scratch": str(args.scratch),
        },
        "machine": machine_facts(args.scratch),
        "versions": versions,
        "peer_settings": {
            lv.peer.name: lv.peer.settings()  # type: ignore[attr-defined]
            for lv in lives
        },
        "corpus": info,
        "load": {
            lv.peer.name: ({"error": lv.error} if lv.error and not lv.load else lv.load)
            for lv in lives
        },
        "rows": build_rows(corpus, queries, cells, failed, unavailable, args.stat),
        "failed_peers": failed,
        "unavailable": unavailable,
        "notes": notes,
    }
    print_report(doc, args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"results written to {args.json}")
    bad = any(
        row["hit_problems"] or any(a["status"] == "failed" for a in row["peers"].values())
        for row in doc["rows"]
    )
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: every peer and client started was stopped", file=sys.stderr)
        sys.exit(130)
