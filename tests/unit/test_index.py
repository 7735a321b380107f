"""The index write path on both supported databases: SQLite (embedded) and PostgreSQL (real server)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from support import make_image, postgres_database

from openpacs.dicom.header import INDEX_TAGS, scan_dataset
from openpacs.index import db
from openpacs.index.instances import (
    CLASS_CONFLICT,
    IGNORED,
    KEPT_DUPLICATE,
    REJECTED,
    REPLACED,
    STORED,
    InstanceIndex,
)
from openpacs.index.schema import (
    instances,
    patients,
    schema_info,
    series,
    series_requests,
    studies,
)
from openpacs.services.records import build_record


@pytest.fixture(params=["sqlite", "postgresql"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[InstanceIndex]:
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path / 'index.sqlite'}"
        else:
            url = stack.enter_context(postgres_database())
        engine = db.make_engine(url)
        db.create_schema(engine)
        writer = db.IndexWriter(engine)
        yield InstanceIndex(engine, writer)
        writer.close()
        engine.dispose()


def record_of(**kwargs: object):  # type: ignore[no-untyped-def]
    ds = make_image(**kwargs)  # type: ignore[arg-type]
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    ts = "1.2.840.10008.1.2.1"
    return build_record(scan_dataset(buf.getvalue(), ts, INDEX_TAGS), ts)


def rows(index: InstanceIndex, table: sa.Table) -> list[sa.Row]:  # type: ignore[type-arg]
    with index.engine.connect() as conn:
        return list(conn.execute(sa.select(table).order_by(table.c.pk)))


def store(
    index: InstanceIndex, rec: object, policy: str = "overwrite", key: str | None = None
) -> object:
    return index.store(rec, key or uuid.uuid4().hex, 100, "SCU", policy).result()  # type: ignore[arg-type]


def test_levels_and_counts(index: InstanceIndex) -> None:
    study, s1, s2 = "1.2.3.1", "1.2.3.1.1", "1.2.3.1.2"
    for i in range(3):
        assert (
            store(index, record_of(study_uid=study, series_uid=s1, instance_number=i)).kind
            == STORED
        )
    out = store(
        index,
        record_of(
            study_uid=study, series_uid=s2, modality="MR", sop_class="1.2.840.10008.5.1.4.1.1.4"
        ),
    )
    assert out.kind == STORED and out.new_series and not out.new_study
    (st,) = rows(index, studies)
    assert (st.num_series, st.num_instances, st.modalities) == (2, 4, "CT\\MR")
    assert sorted(r.num_instances for r in rows(index, series)) == [1, 3]
    (pt,) = rows(index, patients)
    assert (pt.patient_id, pt.num_studies, pt.patient_name_norm) == ("PID-1", 1, "DOE^JOHN")


def test_duplicate_policies(index: InstanceIndex) -> None:
    rec = record_of(sop_uid="1.2.9.9")
    first = store(index, rec, key="k1")
    assert first.kind == STORED
    assert store(index, rec, "ignore").kind == IGNORED
    assert store(index, rec, "reject").kind == REJECTED
    kept = store(index, rec, "keep", key="k2")
    assert kept.kind == KEPT_DUPLICATE
    assert len(index.find_by_sop_uid("1.2.9.9")) == 2
    replaced = store(index, rec, "overwrite", key="k3")
    assert replaced.kind == REPLACED and sorted(replaced.replaced_blob_keys) == ["k1", "k2"]
    assert [r.blob_key for r in index.find_by_sop_uid("1.2.9.9")] == ["k3"]
    (st,) = rows(index, studies)
    assert st.num_instances == 1
    other_class = record_of(sop_uid="1.2.9.9", sop_class="1.2.840.10008.5.1.4.1.1.7", modality="OT")
    for policy in ("overwrite", "keep", "ignore", "reject"):
        out = store(index, other_class, policy)
        assert out.kind == CLASS_CONFLICT and out.existing_class == "1.2.840.10008.5.1.4.1.1.2"


def test_overwrite_into_another_series_removes_empty_levels(index: InstanceIndex) -> None:
    store(
        index,
        record_of(sop_uid="1.2.7", study_uid="1.2.7.1", series_uid="1.2.7.1.1", patient_id="A"),
    )
    moved = record_of(sop_uid="1.2.7", study_uid="1.2.8.1", series_uid="1.2.8.1.1", patient_id="B")
    assert store(index, moved).kind == REPLACED
    assert [r.study_uid for r in rows(index, studies)] == ["1.2.8.1"]
    assert [r.series_uid for r in rows(index, series)] == ["1.2.8.1.1"]
    assert [r.patient_id for r in rows(index, patients)] == ["B"]
    # the writer's key caches must not point at the deleted rows
    assert (
        store(index, record_of(study_uid="1.2.7.1", series_uid="1.2.7.1.1", patient_id="A")).kind
        == STORED
    )
    assert len(rows(index, studies)) == 2


def test_request_attributes_indexed(index: InstanceIndex) -> None:
    from pydicom import Dataset

    item = Dataset()
    item.RequestedProcedureID = "RP1"
    item.ScheduledProcedureStepID = "SPS1"
    item.AccessionNumber = "A77"
    store(index, record_of(RequestAttributesSequence=[item]))
    (req,) = rows(index, series_requests)
    assert (req.requested_procedure_id, req.scheduled_procedure_step_id, req.accession_number) == (
        "RP1", "SPS1", "A77",
    )  # fmt: skip


def test_failing_operation_does_not_fail_its_batch(index: InstanceIndex) -> None:
    def boom(conn: sa.Connection) -> None:
        raise RuntimeError("boom")

    futures = [index.writer.submit(boom)]
    futures += [index.store(record_of(), uuid.uuid4().hex, 1, None, "overwrite") for _ in range(5)]
    with pytest.raises(RuntimeError):
        futures[0].result()
    assert all(f.result().kind == STORED for f in futures[1:])
    assert len(rows(index, instances)) == 5


def test_checkpoints_report_durability_no_later_than_the_horizon(tmp_path: Path) -> None:
    """The checkpointer (SQLite's automatic checkpoint is off) tells on_durable a time T such
    that every commit before T is durable, and T is never after IndexWriter.horizon."""
    import threading
    import time

    engine = db.make_engine(f"sqlite:///{tmp_path / 'index.sqlite'}")
    db.create_schema(engine)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
    writer = db.IndexWriter(engine)
    reported: list[float] = []
    got = threading.Event()
    writer.on_durable.append(lambda t: (reported.append(t), got.set()))
    pending_since = time.time() - 30.0
    writer.horizon = lambda: pending_since
    writer.run(lambda conn: conn.exec_driver_sql("UPDATE schema_info SET version = version"))
    assert got.wait(5), "no checkpoint after a commit"
    assert reported[0] == pending_since
    writer.horizon = None
    got.clear()
    started = time.time()
    writer.run(lambda conn: conn.exec_driver_sql("UPDATE schema_info SET version = version"))
    assert got.wait(5)
    assert reported[-1] >= started
    # the WAL was checkpointed: its frames are back in the database file
    busy, log_frames, checkpointed = (
        engine.raw_connection().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    )
    assert busy == 0 and log_frames == checkpointed
    writer.close()
    engine.dispose()


def test_wal_starts_over_under_a_steady_stream_of_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two writers (as two server workers: one lock file) commit without pause. A PASSIVE
    checkpoint alone never caught up with them, so SQLite never started the WAL over and it
    grew with every commit (~50 MB here); the checkpointer now copies the last frames with the
    writers held off, and the WAL is rewritten in place."""
    import threading
    import time

    monkeypatch.setattr(db, "CHECKPOINT_INTERVAL", 0.05)
    path = tmp_path / "index.sqlite"
    engine = db.make_engine(f"sqlite:///{path}")
    db.create_schema(engine)
    writers = [db.IndexWriter(engine, lock_path=tmp_path / "index.lock") for _ in range(2)]
    indexes = [InstanceIndex(engine, w) for w in writers]
    records = [record_of(series_uid=f"1.2.3.{i % 7}") for i in range(2000)]
    stop_at = time.monotonic() + 60

    def feed(index: InstanceIndex, part: list) -> None:  # type: ignore[type-arg]
        for rec in part:
            assert time.monotonic() < stop_at
            store(index, rec)

    threads = [
        threading.Thread(target=feed, args=(indexes[i % 2], records[i::4])) for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wal = tmp_path / "index.sqlite-wal"
    wal_size = wal.stat().st_size
    # WAL header bytes 12-15: the checkpoint sequence number, +1 each time the WAL starts over
    restarts = int.from_bytes(wal.read_bytes()[12:16], "big")
    for w in writers:
        w.close()
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(instances)).scalar() == 2000
    engine.dispose()
    assert restarts >= 2, restarts
    # 2,000 commits of ~6 pages (4 KiB each) are ~50 MB in a WAL that never starts over
    assert wal_size < 40_000_000, wal_size


def test_operations_using_sqlalchemy_inside_a_writer_transaction(index: InstanceIndex) -> None:
    """SQLite transactions are begun and committed on the driver connection; an operation that
    executes through SQLAlchemy joins that transaction, commits with it, and rolls back with
    it when it raises."""
    writer = index.writer

    def set_version(value: int, fail: bool = False):  # type: ignore[no-untyped-def]
        def op(conn: sa.Connection) -> int:
            conn.execute(sa.update(schema_info).values(version=value))
            if fail:
                raise RuntimeError("after the update")
            return int(conn.execute(sa.select(schema_info.c.version)).scalar_one())

        return op

    def stored_version() -> int:
        with index.engine.connect() as conn:
            return int(conn.execute(sa.select(schema_info.c.version)).scalar_one())

    version = stored_version()
    assert writer.run(set_version(99)) == 99
    assert stored_version() == 99
    with pytest.raises(RuntimeError):
        writer.run(set_version(7, fail=True))
    assert stored_version() == 99  # rolled back
    # the writer goes on: a filing and a SQLAlchemy operation in one batch
    both = [writer.submit(set_version(version)), index.store(record_of(), "k1", 1, None, "keep")]
    assert both[0].result() == version and both[1].result().kind == STORED
    assert stored_version() == version


def test_index_of_schema_version_1_is_upgraded(tmp_path: Path) -> None:
    """Version 2 counts instances with a SQLite trigger: an index made by version 1 gets it on
    open, and the counts stay right (series and study updated_at = the instance's arrival)."""
    path = tmp_path / "index.sqlite"
    engine = db.make_engine(f"sqlite:///{path}")
    schema_v1 = sa.MetaData()
    for table in db.schema.metadata.sorted_tables:
        table.to_metadata(schema_v1)
    schema_v1.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(schema_info).values(version=1))
    db.create_schema(engine)
    with engine.connect() as conn:
        assert conn.execute(sa.select(schema_info.c.version)).scalar_one() == 2
        triggers = conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'trigger'"
        ).scalars()
        assert list(triggers) == ["tr_instances_count"]
    writer = db.IndexWriter(engine)
    index = InstanceIndex(engine, writer)
    for i in range(3):
        store(index, record_of(study_uid="1.2.9", series_uid=f"1.2.9.{i % 2}"))
    inst = rows(index, instances)
    (st,) = rows(index, studies)
    assert (st.num_series, st.num_instances) == (2, 3)
    assert st.updated_at == inst[-1].received_at
    assert [s.num_instances for s in rows(index, series)] == [2, 1]
    assert [s.updated_at for s in rows(index, series)] == [inst[2].received_at, inst[1].received_at]
    writer.close()
    engine.dispose()


def test_operations_queued_while_another_process_writes_join_one_commit(tmp_path: Path) -> None:
    """While another process holds the index (its flock on index.lock), the operations queued
    in the meantime are committed together once the lock is free, not one transaction each;
    an operation that fails in such a batch still fails alone."""
    import fcntl
    import os
    import time

    engine = db.make_engine(f"sqlite:///{tmp_path / 'index.sqlite'}")
    db.create_schema(engine)
    writer = db.IndexWriter(engine, lock_path=tmp_path / "index.lock")
    index = InstanceIndex(engine, writer)
    other = os.open(tmp_path / "index.lock", os.O_RDWR)  # "another process": a separate open
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        first = index.store(record_of(), uuid.uuid4().hex, 1, None, "overwrite")
        deadline = time.monotonic() + 5
        while writer._queue.qsize():  # the writer took it and now waits for the lock
            assert time.monotonic() < deadline
            time.sleep(0.01)

        def boom(conn: sa.Connection) -> None:
            raise RuntimeError("boom")

        failing = writer.submit(boom)
        later = [index.store(record_of(), uuid.uuid4().hex, 1, None, "overwrite") for _ in range(4)]
        time.sleep(0.1)
        assert not first.done()
        batches_before = writer.batches
        fcntl.flock(other, fcntl.LOCK_UN)
        assert first.result(5).kind == STORED
        assert all(f.result(5).kind == STORED for f in later)
        with pytest.raises(RuntimeError):
            failing.result(5)
        # one grown transaction failed (boom), then each of its six operations ran alone
        assert writer.batches - batches_before == 5
        assert writer.ops == 5
        assert len(rows(index, instances)) == 5

        fcntl.flock(other, fcntl.LOCK_EX)
        held = [index.store(record_of(), uuid.uuid4().hex, 1, None, "overwrite")]
        while writer._queue.qsize():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        held += [index.store(record_of(), uuid.uuid4().hex, 1, None, "overwrite") for _ in range(3)]
        time.sleep(0.1)
        batches_before = writer.batches
        fcntl.flock(other, fcntl.LOCK_UN)
        assert all(f.result(5).kind == STORED for f in held)
        assert writer.batches - batches_before == 1  # all four in one commit
    finally:
        os.close(other)
        writer.close()
        engine.dispose()
