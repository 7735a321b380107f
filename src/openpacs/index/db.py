"""Index database access: engine setup, schema creation, and the single serialised writer.

Owns: connecting to SQLite (WAL, busy timeout) or PostgreSQL through SQLAlchemy Core; creating
the schema; and :class:`IndexWriter`, the one thread that runs every write operation. Writes
queued while a transaction commits run together in the next transaction (group commit), and no
caller is answered before the transaction holding its write has committed. An operation that
raises is retried alone so that it cannot fail its neighbours.

Durability split (see docs/architecture.md, "Durability"): the blob store is the record of what
was acknowledged — a blob is fsynced before its row is written. On SQLite the WAL runs with
``synchronous=NORMAL``: a commit survives a process crash at once, and survives power loss from
the next checkpoint on. SQLite's own automatic checkpoint is off: it ran inside the commit that
crossed 1,000 WAL pages, with two fsyncs, while that writer held the write lock every other
process was waiting for (lock holds of up to 10 ms, p90 0.65 ms). A checkpointer thread with its
own connection runs a PASSIVE checkpoint every ``CHECKPOINT_INTERVAL`` seconds while there are
new commits (keeping the WAL small, so it is rewritten in place), and then reports the time
before the checkpoint through ``on_durable``; after a crash the archive re-indexes blobs written
since that time that have no row. PostgreSQL commits are durable by themselves.
Must not: decide what is written (that is the archive's and later services' job).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from openpacs.index import schema

log = logging.getLogger(__name__)

T = TypeVar("T")
WriteOp = Callable[[Connection], Any]

MAX_BATCH = 256
CHECKPOINT_INTERVAL = 0.5  # seconds between checkpoints while commits come in


class IndexUnavailable(Exception):
    """The index could not be reached or locked in time (maps to a transient failure)."""


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def busy_timeout_of(engine: Engine) -> float:
    return float(engine.info.get("busy_timeout", 10.0)) if hasattr(engine, "info") else 10.0


def make_engine(url: str, *, busy_timeout: float = 10.0, pool_size: int = 8) -> Engine:
    engine = _make_engine(url, busy_timeout, pool_size)
    engine.info = {"busy_timeout": busy_timeout}  # type: ignore[attr-defined]
    return engine


def _make_engine(url: str, busy_timeout: float, pool_size: int) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"timeout": busy_timeout, "check_same_thread": False},
            pool_size=pool_size,
            max_overflow=32,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy, not pysqlite, decide when transactions begin (SQLAlchemy's
            # documented recipe); the writer then takes the write lock up front.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA wal_autocheckpoint=0")  # IndexWriter checkpoints (see above)
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            # On the driver connection (SQLAlchemy's execution path costs ~40 µs a transaction,
            # ~8 % of the ingest CPU at 4 associations); its errors wrapped as SQLAlchemy's
            # would have been, so "database is locked" stays an OperationalError (A704).
            sql = "BEGIN IMMEDIATE" if conn.info.get("writer") else "BEGIN"
            dbapi = conn.connection.dbapi_connection
            assert dbapi is not None
            try:
                dbapi.execute(sql)
            except sqlite3.Error as exc:
                raise DBAPIError.instance(sql, None, exc, sqlite3.Error) from exc

        return engine
    if url.startswith("postgresql"):
        return create_engine(
            url,
            pool_size=pool_size,
            max_overflow=32,
            pool_pre_ping=True,
            connect_args={
                "connect_timeout": max(1, int(busy_timeout)),
                "options": f"-c lock_timeout={int(busy_timeout * 1000)}",
            },
        )
    return create_engine(url, poolclass=NullPool)


def create_schema(engine: Engine) -> None:
    schema.metadata.create_all(engine)
    with engine.begin() as conn:
        version = conn.execute(select(schema.schema_info.c.version)).scalar()
        if version is None:
            conn.execute(insert(schema.schema_info).values(version=schema.SCHEMA_VERSION))
        elif version != schema.SCHEMA_VERSION:
            raise RuntimeError(
                f"index schema version {version} is not {schema.SCHEMA_VERSION}; "
                "this openpacs cannot open it"
            )


class IndexWriter:
    """The one thread that writes to the index, with group commit."""

    def __init__(self, engine: Engine, lock_path: Path | None = None) -> None:
        self.engine = engine
        # SQLite with several writing processes (server workers, `openpacs import`): their
        # writers take this lock around each transaction. SQLite's own busy handler sleeps
        # 1, 2, 5, 10… ms between retries; a flock hand-over is immediate.
        self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644) if lock_path else None
        self._busy_timeout = busy_timeout_of(engine)
        self._queue: queue.SimpleQueue[tuple[WriteOp, Future[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self._conn: Connection | None = None
        self.batches = 0
        self.ops = 0
        # Called (in the writer thread) after a transaction rolled back, so caches kept by
        # operations can forget keys of rows that were never committed.
        self.on_failure: list[Callable[[], None]] = []
        # Called with a Unix time T once every commit made before T is durable on disk.
        self.on_durable: list[Callable[[float], None]] = []
        # Optional: the start time of the oldest write still on its way to a commit (the
        # archive's blobs whose rows are not filed yet); T is never later than it.
        self.horizon: Callable[[], float | None] | None = None
        self._dirty_since: float | None = None  # time of the first commit not yet checkpointed
        self._dirty_lock = threading.Lock()
        self._stopped = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="index-checkpoint", daemon=True
        )
        self._thread.start()
        self._checkpointer.start()

    def submit(self, op: Callable[[Connection], T]) -> Future[T]:
        future: Future[T] = Future()
        self._queue.put((op, future))
        return future

    def run(self, op: Callable[[Connection], T], timeout: float | None = None) -> T:
        """Run *op* in a write transaction and return its result once committed."""
        return self.submit(op).result(timeout)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)
        self._stopped.set()
        self._checkpointer.join(timeout=60)

    # ------------------------------------------------------------------ thread
    def _connect(self) -> Connection:
        if self._conn is None or self._conn.closed:
            conn = self.engine.connect()
            conn.info["writer"] = True
            self._conn = conn
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.invalidate()
                self._conn.close()
            except Exception:
                log.debug("closing a broken index connection failed", exc_info=True)
        self._conn = None

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            self._run_batch(batch)
        if self._conn is not None:
            self._conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)

    @contextmanager
    def _process_lock(self) -> Iterator[None]:
        if self._lock_fd is None:
            yield
            return
        deadline = time.monotonic() + self._busy_timeout
        pause = 0.00005
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise IndexUnavailable(
                        f"the index is locked by another process for more than "
                        f"{self._busy_timeout:g} s"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.002)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _checkpoint_loop(self) -> None:
        conn: Any = None
        while True:
            stopping = self._stopped.wait(CHECKPOINT_INTERVAL)
            try:
                if is_sqlite(self.engine) and conn is None:
                    conn = self.engine.raw_connection()
                self._checkpoint(conn)
            except Exception:
                log.exception("index checkpoint failed; will retry")
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.invalidate()
                    conn = None
            if stopping:
                break
        if conn is not None:
            conn.close()

    def _checkpoint(self, conn: Any) -> None:
        """Make every commit so far durable; then tell on_durable listeners."""
        with self._dirty_lock:
            if self._dirty_since is None:
                return
            self._dirty_since = None
            before = time.time()  # every commit that finished before this is covered
            pending = self.horizon() if self.horizon is not None else None
        through = before if pending is None else min(before, pending)
        try:
            if conn is not None:
                # The WAL is fsynced before frames are copied back (SQLite, synchronous=NORMAL).
                cursor = conn.cursor()
                try:
                    cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    cursor.fetchall()
                finally:
                    cursor.close()
        except BaseException:
            with self._dirty_lock:
                self._dirty_since = before if self._dirty_since is None else self._dirty_since
            raise
        for callback in self.on_durable:
            try:
                callback(through)
            except Exception:
                log.exception("index on_durable callback failed")

    def _run_batch(self, batch: list[tuple[WriteOp, Future[Any]]]) -> None:
        batch = [(op, fut) for op, fut in batch if fut.set_running_or_notify_cancel()]
        if not batch:
            return
        started = time.time()
        results: list[Any] = []
        try:
            conn = self._connect()
            with self._process_lock(), conn.begin():
                for op, _future in batch:
                    results.append(op(conn))
        except Exception as exc:
            self._rolled_back()
            self._drop_connection_if_broken(exc)
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            # One operation spoiled the batch: run each alone so only the culprit fails.
            for op, future in batch:
                try:
                    conn = self._connect()
                    with self._process_lock(), conn.begin():
                        result = op(conn)
                    self._committed(started, 1)
                    future.set_result(result)
                except Exception as single_exc:
                    self._rolled_back()
                    self._drop_connection_if_broken(single_exc)
                    future.set_exception(single_exc)
            return
        self._committed(started, len(batch))
        for (_op, future), result in zip(batch, results, strict=True):
            future.set_result(result)

    def _committed(self, started: float, ops: int) -> None:
        self.batches += 1
        self.ops += ops
        with self._dirty_lock:
            if self._dirty_since is None:
                self._dirty_since = started

    def _rolled_back(self) -> None:
        for callback in self.on_failure:
            try:
                callback()
            except Exception:
                log.exception("index writer rollback callback failed")

    def _drop_connection_if_broken(self, exc: Exception) -> None:
        if (isinstance(exc, DBAPIError) and exc.connection_invalidated) or (
            self._conn is not None and self._conn.invalidated
        ):
            self._drop_connection()


class Prepared:
    """A SQLAlchemy Core statement compiled once for a dialect and run on the DBAPI cursor.

    For the few statements of the ingest hot path: SQLAlchemy's per-execution machinery (cache
    key, parameter construction, events, result object) cost ~40 µs a statement here, several
    times the database's own work. The SQL, parameter order and bind processors still come
    from SQLAlchemy's compiler for the engine's dialect, so SQLite and PostgreSQL both work.
    """

    def __init__(self, statement: Any, dialect: Any, column_keys: list[str] | None = None) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=column_keys)
        self.sql = str(compiled)
        self.names: list[str] | None = list(compiled.positiontup) if compiled.positional else None
        self.defaults: dict[str, Any] = {}
        self.processors: dict[str, Callable[[Any], Any]] = {}
        for name, bind in compiled.binds.items():
            if bind.value is not None:
                self.defaults[name] = bind.effective_value  # literals such as "+ 1"
            processor = bind.type.bind_processor(dialect)
            if processor is not None:
                self.processors[name] = processor

    def execute(self, cursor: Any, values: dict[str, Any]) -> Any:
        params = {**self.defaults, **values} if self.defaults else dict(values)
        for name, processor in self.processors.items():
            value = params.get(name)
            if value is not None:
                params[name] = processor(value)
        if self.names is not None:
            cursor.execute(self.sql, tuple(params.get(n) for n in self.names))
        else:
            cursor.execute(self.sql, params)
        return cursor


def dbapi_cursor(conn: Connection) -> Any:
    """The DBAPI cursor of *conn*, inside the transaction SQLAlchemy began on it."""
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    return dbapi.cursor()
