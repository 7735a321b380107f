"""Writing and reading instance rows (with their patient, study and series) in the index.

Owns: the transaction that files one instance — duplicate policy decision (overwrite | ignore |
reject | keep, seed 002 §3.2.9.4), same-UID-different-class conflict (C016), patient/study/series
creation, counts and Modalities in Study — run on the :class:`IndexWriter` so it is serialised
and group-committed; and simple reads (lookups by UID, listings, blob keys).
Must not: touch blobs (the archive deletes replaced blobs after the commit) or speak DICOM.
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, bindparam, delete, func, insert, select, update
from sqlalchemy.engine import Connection, Row

from openpacs.index.db import IndexWriter, Pending, Prepared, dbapi_cursor
from openpacs.index.schema import instances, patients, series, series_requests, studies
from openpacs.services.records import InstanceRecord

STORED, REPLACED, KEPT_DUPLICATE, IGNORED, REJECTED, CLASS_CONFLICT = (
    "stored", "replaced", "kept-duplicate", "ignored", "rejected", "class-conflict",
)  # fmt: skip
# Nothing written: replacing stored copies must wait until the new blob is durable.
NEEDS_DURABLE_BLOB = "needs-durable-blob"


@dataclass
class StoreOutcome:
    kind: str
    instance_pk: int | None = None
    existing_class: str | None = None
    replaced_blob_keys: list[str] = field(default_factory=list)
    new_study: bool = False
    new_series: bool = False


class _LRU(OrderedDict[Any, Any]):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.size:
            self.popitem(last=False)

    def lookup(self, key: Any) -> Any:
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value


# The hot-path statements, compiled once per dialect (see db.Prepared).
_FIND_BY_SOP = select(instances.c.pk, instances.c.sop_class_uid, instances.c.blob_key).where(
    instances.c.sop_uid == bindparam("sop_uid")
)
_FIND_PATIENT = select(patients.c.pk).where(
    patients.c.patient_id == bindparam("pid"), patients.c.issuer == bindparam("issuer")
)
_FIND_STUDY = select(studies.c.pk).where(studies.c.study_uid == bindparam("uid"))
_FIND_SERIES = select(series.c.pk).where(series.c.series_uid == bindparam("uid"))
_BUMP_SERIES = (
    update(series)
    .where(series.c.pk == bindparam("b_pk"))
    .values(num_instances=series.c.num_instances + 1, updated_at=bindparam("b_now"))
)
_BUMP_STUDY = (
    update(studies)
    .where(studies.c.pk == bindparam("b_pk"))
    .values(
        num_instances=studies.c.num_instances + 1,
        num_series=studies.c.num_series + bindparam("b_new_series"),
        updated_at=bindparam("b_now"),
    )
)
_BUMP_STUDY_SERIES = (  # with the SQLite trigger, which counts the instances
    update(studies)
    .where(studies.c.pk == bindparam("b_pk"))
    .values(num_series=studies.c.num_series + 1)
)
_BUMP_PATIENT = (
    update(patients)
    .where(patients.c.pk == bindparam("b_pk"))
    .values(num_studies=patients.c.num_studies + 1, updated_at=bindparam("b_now"))
)
_GET_MODALITIES = select(studies.c.modalities).where(studies.c.pk == bindparam("b_pk"))
_SET_MODALITIES = (
    update(studies).where(studies.c.pk == bindparam("b_pk")).values(modalities=bindparam("b_mod"))
)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _sqlite_stamp(now: dt.datetime) -> str:
    # What sqlite3's default datetime adapter stores (SQLAlchemy's SQLite DateTime leaves
    # binding to it): made once per filing instead of by a Python callback per parameter.
    return now.isoformat(" ")


def _same(now: dt.datetime) -> dt.datetime:
    return now


class _Statements:
    """Prepared statements of the filing transaction, for one dialect."""

    def __init__(self, dialect: Any) -> None:
        self.dialect = dialect
        # The value bound for a timestamp on the hot path (see _sqlite_stamp).
        self.stamp: Any = _sqlite_stamp if dialect.name == "sqlite" else _same
        # SQLite: schema.SQLITE_TRIGGERS counts the instances of series and studies.
        self.counts_by_trigger = dialect.name == "sqlite"
        self.find_by_sop = Prepared(_FIND_BY_SOP, dialect)
        self.find_patient = Prepared(_FIND_PATIENT, dialect)
        self.find_study = Prepared(_FIND_STUDY, dialect)
        self.find_series = Prepared(_FIND_SERIES, dialect)
        self.bump_series = Prepared(_BUMP_SERIES, dialect)
        self.bump_study = Prepared(_BUMP_STUDY, dialect)
        self.bump_study_series = Prepared(_BUMP_STUDY_SERIES, dialect)
        self.bump_patient = Prepared(_BUMP_PATIENT, dialect)
        self.get_modalities = Prepared(_GET_MODALITIES, dialect)
        self.set_modalities = Prepared(_SET_MODALITIES, dialect)
        self._inserts: dict[tuple[str, tuple[str, ...]], Prepared] = {}

    def insert(self, cursor: Any, table: Any, values: dict[str, Any]) -> int:
        """INSERT … RETURNING pk, compiled once per table and set of columns."""
        key = (table.name, tuple(values))
        prepared = self._inserts.get(key)
        if prepared is None:
            statement = insert(table).returning(table.c.pk)
            prepared = self._inserts[key] = Prepared(statement, self.dialect, list(values))
        return int(prepared.execute(cursor, values).fetchone()[0])


class InstanceIndex:
    def __init__(self, engine: Engine, writer: IndexWriter) -> None:
        self.engine = engine
        self.writer = writer
        self._sql = _Statements(engine.dialect)
        # Writer-thread caches of primary keys (only touched inside writer operations).
        self._patient_pk = _LRU(4096)
        self._study_pk = _LRU(4096)
        self._series_pk = _LRU(16384)
        writer.on_failure.append(self.forget_cached_keys)

    def forget_cached_keys(self) -> None:
        """A write transaction rolled back: cached keys may name rows that do not exist."""
        self._patient_pk.clear()
        self._study_pk.clear()
        self._series_pk.clear()

    # ------------------------------------------------------------------ writes
    def store(
        self,
        record: InstanceRecord,
        blob_key: str,
        size: int,
        calling_ae: str | None,
        policy: str,
        blob_durable: bool = True,
    ) -> Pending[StoreOutcome]:
        """File one instance; the future completes once the transaction has committed.
        blob_durable=False: the blob's fsync may still be running; the row is written anyway,
        except when it would replace stored copies (then NEEDS_DURABLE_BLOB, nothing written)."""
        return self.writer.submit(
            lambda conn: self._store_op(
                conn, record, blob_key, size, calling_ae, policy, blob_durable
            )
        )

    def delete_instance(self, instance_pk: int) -> None:
        self.writer.run(lambda conn: self._delete_instance(conn, instance_pk, _now()))

    def _store_op(
        self,
        conn: Connection,
        rec: InstanceRecord,
        blob_key: str,
        size: int,
        calling_ae: str | None,
        policy: str,
        blob_durable: bool,
    ) -> StoreOutcome:
        now = _now()
        sql = self._sql
        stamp = sql.stamp(now)
        cur = dbapi_cursor(conn)
        existing = sql.find_by_sop.execute(cur, {"sop_uid": rec.sop_uid}).fetchall()
        kind = STORED
        replaced: list[tuple[int, str, str]] = []
        if existing:
            for _pk, sop_class, _key in existing:
                if sop_class != rec.sop_class_uid:
                    return StoreOutcome(CLASS_CONFLICT, existing_class=sop_class)
            if policy == "ignore":
                return StoreOutcome(IGNORED)
            if policy == "reject":
                return StoreOutcome(REJECTED)
            if policy == "overwrite":
                if not blob_durable:
                    return StoreOutcome(NEEDS_DURABLE_BLOB)
                replaced = list(existing)
                kind = REPLACED
            else:
                kind = KEPT_DUPLICATE

        patient_pk = self._patient(cur, rec, now)
        study_pk, new_study = self._study_row(cur, rec, patient_pk, now)
        series_pk, new_series = self._series_row(cur, rec, study_pk, now)
        values = dict(rec.instance)
        values.update(
            series_pk=series_pk,
            sop_uid=rec.sop_uid,
            blob_key=blob_key,
            size=size,
            calling_ae=calling_ae,
            received_at=stamp,
        )
        instance_pk = sql.insert(cur, instances, values)
        if not sql.counts_by_trigger:
            sql.bump_series.execute(cur, {"b_pk": series_pk, "b_now": stamp})
            sql.bump_study.execute(
                cur, {"b_pk": study_pk, "b_new_series": 1 if new_series else 0, "b_now": stamp}
            )
        elif new_series:
            sql.bump_study_series.execute(cur, {"b_pk": study_pk})
        if new_study:
            sql.bump_patient.execute(cur, {"b_pk": patient_pk, "b_now": stamp})
        for pk, _class, _key in replaced:
            self._delete_instance(conn, pk, now)
        return StoreOutcome(
            kind,
            instance_pk=instance_pk,
            replaced_blob_keys=[key for _pk, _class, key in replaced],
            new_study=new_study,
            new_series=new_series,
        )

    def _patient(self, cur: Any, rec: InstanceRecord, now: dt.datetime) -> int:
        key = rec.patient_key
        pk = self._patient_pk.lookup(key)
        if pk is not None:
            return int(pk)
        found = self._sql.find_patient.execute(cur, {"pid": key[0], "issuer": key[1]}).fetchone()
        if found is not None:
            pk = found[0]
        else:
            pk = self._sql.insert(
                cur,
                patients,
                {**rec.patient, "num_studies": 0, "created_at": now, "updated_at": now},
            )
        self._patient_pk.put(key, pk)
        return int(pk)

    def _study_row(
        self, cur: Any, rec: InstanceRecord, patient_pk: int, now: dt.datetime
    ) -> tuple[int, bool]:
        pk = self._study_pk.lookup(rec.study_uid)
        if pk is not None:
            return int(pk), False
        found = self._sql.find_study.execute(cur, {"uid": rec.study_uid}).fetchone()
        if found is not None:
            self._study_pk.put(rec.study_uid, found[0])
            return int(found[0]), False
        pk = self._sql.insert(
            cur,
            studies,
            {
                **rec.study,
                "patient_pk": patient_pk,
                "modalities": None,
                "num_series": 0,
                "num_instances": 0,
                "created_at": now,
                "updated_at": now,
            },
        )
        self._study_pk.put(rec.study_uid, pk)
        return pk, True

    def _series_row(
        self, cur: Any, rec: InstanceRecord, study_pk: int, now: dt.datetime
    ) -> tuple[int, bool]:
        pk = self._series_pk.lookup(rec.series_uid)
        if pk is not None:
            return int(pk), False
        found = self._sql.find_series.execute(cur, {"uid": rec.series_uid}).fetchone()
        if found is not None:
            self._series_pk.put(rec.series_uid, found[0])
            return int(found[0]), False
        pk = self._sql.insert(
            cur,
            series,
            {
                **rec.series,
                "study_pk": study_pk,
                "num_instances": 0,
                "created_at": now,
                "updated_at": now,
            },
        )
        for request in rec.requests:
            self._sql.insert(cur, series_requests, {**request, "series_pk": pk})
        modality = rec.modality
        if modality:
            # Read under the write lock, not from a cache: another process may have added one.
            current = self._sql.get_modalities.execute(cur, {"b_pk": study_pk}).fetchone()[0]
            modalities = set(filter(None, (current or "").split("\\")))
            if modality not in modalities:
                modalities.add(modality)
                self._sql.set_modalities.execute(
                    cur, {"b_pk": study_pk, "b_mod": "\\".join(sorted(modalities))}
                )
        self._series_pk.put(rec.series_uid, pk)
        return pk, True

    def _delete_instance(self, conn: Connection, instance_pk: int, now: dt.datetime) -> None:
        """Remove one instance row, fix counts, drop a series/study/patient left empty."""
        row = conn.execute(
            select(instances.c.series_pk, series.c.study_pk, studies.c.patient_pk)
            .join(series, series.c.pk == instances.c.series_pk)
            .join(studies, studies.c.pk == series.c.study_pk)
            .where(instances.c.pk == instance_pk)
        ).one()
        conn.execute(delete(instances).where(instances.c.pk == instance_pk))
        left = conn.execute(
            update(series)
            .where(series.c.pk == row.series_pk)
            .values(num_instances=series.c.num_instances - 1, updated_at=now)
            .returning(series.c.num_instances)
        ).scalar_one()
        series_gone = left <= 0
        if series_gone:
            conn.execute(
                delete(series_requests).where(series_requests.c.series_pk == row.series_pk)
            )
            conn.execute(delete(series).where(series.c.pk == row.series_pk))
        study_left = conn.execute(
            update(studies)
            .where(studies.c.pk == row.study_pk)
            .values(
                num_instances=studies.c.num_instances - 1,
                num_series=studies.c.num_series - (1 if series_gone else 0),
                updated_at=now,
            )
            .returning(studies.c.num_instances)
        ).scalar_one()
        if series_gone:
            self._refresh_modalities(conn, row.study_pk)
        if study_left <= 0:
            conn.execute(delete(studies).where(studies.c.pk == row.study_pk))
            studies_left = conn.execute(
                update(patients)
                .where(patients.c.pk == row.patient_pk)
                .values(num_studies=patients.c.num_studies - 1, updated_at=now)
                .returning(patients.c.num_studies)
            ).scalar_one()
            if studies_left <= 0:
                conn.execute(delete(patients).where(patients.c.pk == row.patient_pk))
        if series_gone or study_left <= 0:
            self.forget_cached_keys()

    def _refresh_modalities(self, conn: Connection, study_pk: int) -> None:
        found = conn.execute(
            select(series.c.modality).where(series.c.study_pk == study_pk).distinct()
        ).scalars()
        modalities = sorted({m for m in found if m})
        conn.execute(
            update(studies)
            .where(studies.c.pk == study_pk)
            .values(modalities="\\".join(modalities) or None)
        )

    # ------------------------------------------------------------------ reads
    def find_by_sop_uid(self, sop_uid: str) -> Sequence[Row[*tuple[Any, ...]]]:
        with self.engine.connect() as conn:
            return conn.execute(
                select(instances).where(instances.c.sop_uid == sop_uid).order_by(instances.c.pk)
            ).all()

    def rows_with_key_prefix(self, prefix: str) -> Sequence[Row[*tuple[Any, ...]]]:
        """Instance rows whose blob key starts with *prefix* (an index range scan)."""
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        with self.engine.connect() as conn:
            return conn.execute(
                select(instances.c.pk, instances.c.blob_key, instances.c.size).where(
                    instances.c.blob_key >= prefix, instances.c.blob_key < upper
                )
            ).all()

    def delete_instances(self, instance_pks: Sequence[int]) -> None:
        def op(conn: Connection) -> None:
            now = _now()
            for pk in instance_pks:
                self._delete_instance(conn, pk, now)

        if instance_pks:
            self.writer.run(op)

    def existing_blob_keys(self, keys: Sequence[str]) -> set[str]:
        """Those of *keys* that an instance row names."""
        found: set[str] = set()
        with self.engine.connect() as conn:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                found.update(
                    conn.execute(
                        select(instances.c.blob_key).where(instances.c.blob_key.in_(chunk))
                    ).scalars()
                )
        return found

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {
                name: int(conn.execute(select(func.count()).select_from(table)).scalar_one())
                for name, table in (
                    ("patients", patients),
                    ("studies", studies),
                    ("series", series),
                    ("instances", instances),
                )
            }

    def list_studies(self, limit: int | None = None) -> Sequence[Row[*tuple[Any, ...]]]:
        query = (
            select(
                patients.c.patient_id,
                patients.c.patient_name,
                studies.c.study_uid,
                studies.c.study_date,
                studies.c.study_time,
                studies.c.accession_number,
                studies.c.study_description,
                studies.c.modalities,
                studies.c.num_series,
                studies.c.num_instances,
            )
            .join(patients, patients.c.pk == studies.c.patient_pk)
            .order_by(studies.c.study_date.desc(), studies.c.study_time.desc(), studies.c.pk)
        )
        if limit:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return conn.execute(query).all()
