"""How the query service scales with the number of studies (run by hand, never in tests).

Fills a fresh index (SQLite, or PostgreSQL with --url) with N synthetic patients/studies/series
rows — straight SQL inserts, no blobs: this measures the matching engine and its SQL, not
ingest — then times study-level C-FIND requests through ``QueryService`` (SQL + response
identifiers, encoded as C-FIND would send them) by Patient's Name wildcard, Study Date range,
exact Accession Number and Modalities in Study.

    .venv/bin/python bench/query_scale.py --studies 100000
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
import tempfile
import time
from pathlib import Path

from pydicom import Dataset
from sqlalchemy import insert

from openpacs.index import db
from openpacs.index.schema import patients, series, studies
from openpacs.services.query import Model, QueryService

FAMILY = [
    "SMITH",
    "JOHNSON",
    "MILLER",
    "MARTIN",
    "MOORE",
    "GARCIA",
    "BROWN",
    "DAVIS",
    "LEE",
    "WILSON",
    "ANDERSON",
    "TAYLOR",
    "THOMAS",
    "MOORE",
    "JACKSON",
    "WHITE",
    "HARRIS",
]


def fill(engine: object, n: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    now = dt.datetime.now(dt.UTC)
    n_patients = max(1, n // 3)
    with engine.begin() as conn:  # type: ignore[attr-defined]
        rows = []
        for p in range(n_patients):
            name = f"{rng.choice(FAMILY)}{p % 97}^{rng.choice('ABCDEFGHJKLMNPRST')}"
            rows.append(
                dict(
                    pk=p + 1,
                    patient_id=f"P{p:07d}",
                    issuer="",
                    patient_id_generated=0,
                    patient_name=name,
                    patient_name_norm=name.upper(),
                    birth_date="19600101",
                    sex="O",
                    num_studies=0,
                    created_at=now,
                    updated_at=now,
                )
            )
        conn.execute(insert(patients), rows)
        study_rows, series_rows = [], []
        day0 = dt.date(2021, 1, 1)
        for s in range(n):
            date = (day0 + dt.timedelta(days=rng.randrange(5 * 365))).strftime("%Y%m%d")
            time_ = f"{rng.randrange(24):02d}{rng.randrange(60):02d}00"
            modality = rng.choice(["CT", "MR", "DX", "US"])
            study_rows.append(
                dict(
                    pk=s + 1,
                    patient_pk=rng.randrange(n_patients) + 1,
                    study_uid=f"2.25.{s}",
                    study_date=date,
                    study_time=time_,
                    study_datetime=date + time_,
                    accession_number=f"A{s:08d}",
                    study_id=str(s % 1000),
                    study_description=f"{modality} STUDY",
                    modalities=modality,
                    num_series=1,
                    num_instances=1,
                    created_at=now,
                    updated_at=now,
                )
            )
            series_rows.append(
                dict(
                    pk=s + 1,
                    study_pk=s + 1,
                    series_uid=f"2.25.{s}.1",
                    modality=modality,
                    series_number=1,
                    num_instances=1,
                    created_at=now,
                    updated_at=now,
                )
            )
            if len(study_rows) == 5000:
                conn.execute(insert(studies), study_rows)
                conn.execute(insert(series), series_rows)
                study_rows, series_rows = [], []
        if study_rows:
            conn.execute(insert(studies), study_rows)
            conn.execute(insert(series), series_rows)


def identifier(**keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword in (
        "StudyInstanceUID",
        "StudyDate",
        "AccessionNumber",
        "PatientName",
        "PatientID",
        "StudyDescription",
        "ModalitiesInStudy",
    ):
        setattr(ds, keyword, keys.get(keyword, ""))
    return ds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--url", default="", help="SQLAlchemy URL (default: a temp SQLite file)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="openpacs-qscale-"))
    url = args.url or f"sqlite:///{tmp / 'index.sqlite'}"
    engine = db.make_engine(url)
    db.create_schema(engine)
    t0 = time.perf_counter()
    fill(engine, args.studies)
    print(f"filled {args.studies} studies in {time.perf_counter() - t0:.1f} s ({url})")
    service = QueryService(engine, "OPENPACS", max_results=10**7)
    queries = {
        "PatientName=SMITH1*": identifier(PatientName="SMITH1*"),
        "StudyDate=20240101-20240110": identifier(StudyDate="20240101-20240110"),
        "AccessionNumber=A00054321": identifier(
            AccessionNumber=f"A{min(54321, args.studies - 1):08d}"
        ),
        "ModalitiesInStudy=US, 2025-03": identifier(
            ModalitiesInStudy="US", StudyDate="20250301-20250331"
        ),
    }
    print(f"{'query':34} {'hits':>6} {'median s':>9} {'best s':>8}")
    for name, ds in queries.items():
        times, hits = [], 0
        for _ in range(args.repeat + 1):
            start = time.perf_counter()
            request = service.prepare(Model.STUDY_ROOT, ds)
            hits = sum(len(m.encode(True)) > 0 for m in service.find(request))
            times.append(time.perf_counter() - start)
        times = times[1:]  # the first run warms the caches
        print(f"{name:34} {hits:6d} {statistics.median(times):9.4f} {min(times):8.4f}")


if __name__ == "__main__":
    main()
