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
new commits (the checkpointers of several processes take turns), reports the time before it
through ``on_durable`` when it covered every earlier frame, and asks the writer thread to copy
back the frames committed meanwhile between two transactions, under the write lock: only then
does SQLite start the WAL over, which a steady stream of commits otherwise never allowed (the
WAL grew by ~27 KB an instance). After a crash the archive re-indexes blobs written since the
last reported time that have no row. PostgreSQL commits are durable by themselves.
Must not: decide what is written (that is the archive's and later services' job).
"""

from __future__ import annotations

import _thread
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

from sqlalchemy import Engine, create_engine, event, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from openpacs.index import schema

log = logging.getLogger(__name__)

T = TypeVar("T")
WriteOp = Callable[[Connection], Any]

MAX_BATCH = 256
CHECKPOINT_INTERVAL = 0.5  # seconds between checkpoints while commits come in
CHECKPOINT_TURN_WAIT = 2.0  # its wait for another process's checkpointer (else the next round)


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
            # A WAL that grew past this (a burst during a long query) is cut back when it
            # starts over.
            cur.execute("PRAGMA journal_size_limit=67108864")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            # On the driver connection (SQLAlchemy's execution path costs ~40 µs a transaction,
            # ~8 % of the ingest CPU at 4 associations); its errors wrapped as SQLAlchemy's
            # would have been, so "database is locked" stays an OperationalError (A704).
            dbapi = conn.connection.dbapi_connection
            assert dbapi is not None
            if dbapi.in_transaction:  # begun by IndexWriter._transaction on the driver
                return
            sql = "BEGIN IMMEDIATE" if conn.info.get("writer") else "BEGIN"
            _driver(sql, dbapi.execute, sql)

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


def _driver(sql: str, call: Callable[..., Any], *args: Any) -> Any:
    """``call(*args)`` on the sqlite3 driver connection (doing *sql*), its errors wrapped as
    SQLAlchemy's would have been (``sqlite3.OperationalError`` -> its OperationalError)."""
    try:
        return call(*args)
    except sqlite3.Error as exc:
        raise DBAPIError.instance(sql, None, exc, sqlite3.Error) from exc


class Pending(Generic[T]):
    """The result of a queued write operation, for the one thread waiting on it.

    ``concurrent.futures.Future`` with less: one lock released when the result is set, instead
    of a Condition whose notify/wait (pure Python) took ~5 % of the index writer's GIL time
    at 4 associations. No callbacks, no cancellation."""

    __slots__ = ("_exception", "_lock", "_result", "_set")

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._lock.acquire()
        self._set = False
        self._result: T | None = None
        self._exception: BaseException | None = None

    def set_result(self, result: T) -> None:
        self._result = result
        self._set = True
        self._lock.release()

    def set_exception(self, exception: BaseException) -> None:
        self._exception = exception
        self._set = True
        self._lock.release()

    def done(self) -> bool:
        return self._set

    def result(self, timeout: float | None = None) -> T:
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError("index write still pending")
        self._lock.release()
        if self._exception is not None:
            raise self._exception
        return self._result  # type: ignore[return-value]


def _flock(fd: int, timeout: float) -> bool:
    """Take the exclusive flock on *fd* within *timeout* seconds (polling: SQLite's own busy
    handler sleeps 1, 2, 5, 10… ms between retries; this hands over within ~50 µs–2 ms)."""
    deadline = time.monotonic() + timeout
    pause = 0.00005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.002)


def create_schema(engine: Engine) -> None:
    schema.metadata.create_all(engine)
    with engine.begin() as conn:
        version = conn.execute(select(schema.schema_info.c.version)).scalar()
        if is_sqlite(engine) and version in (None, 1):
            for ddl in schema.SQLITE_TRIGGERS:
                conn.exec_driver_sql(ddl)
        if version is None:
            conn.execute(insert(schema.schema_info).values(version=schema.SCHEMA_VERSION))
        elif version == 1:  # version 2 added SQLITE_TRIGGERS
            conn.execute(update(schema.schema_info).values(version=schema.SCHEMA_VERSION))
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
        self._finish_wal = False  # set by the checkpointer: see _finish_checkpoint
        # Held by the checkpointer (or the writer's finishing pass) of one process at a time.
        self._turn_fd = (
            os.open(f"{lock_path}.checkpoint", os.O_RDWR | os.O_CREAT, 0o644) if lock_path else None
        )
        self._busy_timeout = busy_timeout_of(engine)
        self._queue: queue.SimpleQueue[tuple[WriteOp, Pending[Any]] | None] = queue.SimpleQueue()
        self._sqlite = is_sqlite(engine)
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
        self._stopping = False  # the writer thread saw close()'s sentinel
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="index-checkpoint", daemon=True
        )
        self._thread.start()
        self._checkpointer.start()

    def submit(self, op: Callable[[Connection], T]) -> Pending[T]:
        pending: Pending[T] = Pending()
        self._queue.put((op, pending))
        return pending

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
        while not self._stopping:
            item = self._queue.get()
            if item is None:
                break
            self._run_batch([item])  # the transaction adds what else is queued
            if self._finish_wal and self._sqlite:
                self._finish_checkpoint()
        if self._conn is not None:
            self._conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)

    def _drain(self, batch: list[tuple[WriteOp, Pending[Any]]]) -> None:
        """Add the operations queued by now to *batch* (up to MAX_BATCH)."""
        while len(batch) < MAX_BATCH and not self._stopping:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                return
            if nxt is None:
                self._stopping = True
                return
            batch.append(nxt)

    @contextmanager
    def _process_lock(self) -> Iterator[None]:
        if self._lock_fd is None:
            yield
            return
        if not _flock(self._lock_fd, self._busy_timeout):
            raise IndexUnavailable(
                f"the index is locked by another process for more than {self._busy_timeout:g} s"
            )
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
        if self._turn_fd is not None:
            os.close(self._turn_fd)

    def _checkpoint(self, conn: Any) -> None:
        """Make every commit so far durable; then tell on_durable listeners."""
        with self._dirty_lock:
            if self._dirty_since is None:
                return
            self._dirty_since = None
            before = time.time()  # every commit that finished before this is covered
            pending = self.horizon() if self.horizon is not None else None
        through = before if pending is None else min(before, pending)
        done = False
        try:
            done = conn is None or self._checkpoint_wal(conn)
        finally:
            if not done:  # nothing reported; the next round retries
                with self._dirty_lock:
                    self._dirty_since = before if self._dirty_since is None else self._dirty_since
        if not done:
            return
        for callback in self.on_durable:
            try:
                callback(through)
            except Exception:
                log.exception("index on_durable callback failed")

    def _checkpoint_wal(self, conn: Any) -> bool:
        """Copy the WAL back into the database file; True when every frame committed before
        it started was (so every commit so far is on disk: SQLite with synchronous=NORMAL
        fsyncs the WAL before copying frames back and the database file after). False when
        another process's checkpointer kept its turn or a reader still used those frames."""
        if self._turn_fd is not None and not _flock(self._turn_fd, CHECKPOINT_TURN_WAIT):
            return False  # checkpointers take turns (SQLite answers "busy" to a second one)
        try:
            done = _passive_checkpoint(conn)
        finally:
            if self._turn_fd is not None:
                fcntl.flock(self._turn_fd, fcntl.LOCK_UN)
        # SQLite starts the WAL over only when a writer begins with every frame copied back.
        # Under a steady stream of commits the frames appended while a checkpoint ran always
        # remained, and the WAL grew by ~27 KB an instance (269 MB after 10,000), each commit
        # extending the file. The writer thread copies the rest between two transactions,
        # holding the write lock (a waiting checkpointer thread lost the lock to the writers'
        # quick re-takes in most rounds).
        self._finish_wal = True
        return done

    def _finish_checkpoint(self) -> None:
        """In the writer thread: copy back the frames committed since the checkpointer's last
        pass while no writer can append (a few ms at most, no fsync when there are none), so
        that the next transaction rewrites the WAL from its beginning. Skipped (until after the
        next batch) while another process's checkpointer has its turn."""
        if self._turn_fd is not None:
            try:
                fcntl.flock(self._turn_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
        self._finish_wal = False
        try:
            conn = self._connect()
            with self._process_lock():
                dbapi = conn.connection.dbapi_connection
                assert dbapi is not None
                _passive_checkpoint(dbapi)
        except Exception:
            log.warning("index checkpoint (writer pass) failed; will retry", exc_info=True)
        finally:
            if self._turn_fd is not None:
                fcntl.flock(self._turn_fd, fcntl.LOCK_UN)

    def _transaction(
        self, batch: list[tuple[WriteOp, Pending[Any]]], grow: bool = False
    ) -> list[Any]:
        """Run the operations of *batch* in one write transaction and commit it; their results
        in order. grow: once the lock is held, first add what is queued by then (including what
        arrived while another process held the index: it joins this commit, not the next)."""
        conn = self._connect()
        with self._process_lock():
            if grow:
                self._drain(batch)
            ops = [op for op, _pending in batch]
            if not self._sqlite:
                with conn.begin():
                    return [op(conn) for op in ops]
            # SQLite: BEGIN and COMMIT on the driver connection, without SQLAlchemy's
            # transaction bookkeeping (~17 % of the writer's GIL time, most transactions hold
            # one or two instances). An operation that executes through SQLAlchemy autobegins
            # its transaction (the begin hook sees the driver's one) and commits it here.
            dbapi = conn.connection.dbapi_connection
            assert dbapi is not None
            _driver("BEGIN IMMEDIATE", dbapi.execute, "BEGIN IMMEDIATE")
            try:
                results = [op(conn) for op in ops]
                if conn.in_transaction():
                    conn.commit()
                else:
                    _driver("COMMIT", dbapi.commit)
            except BaseException:
                try:
                    if conn.in_transaction():
                        conn.rollback()
                    elif dbapi.in_transaction:
                        dbapi.rollback()
                except Exception:
                    log.debug("rollback of a failed index transaction failed", exc_info=True)
                raise
            return results

    def _run_batch(self, batch: list[tuple[WriteOp, Pending[Any]]]) -> None:
        started = time.time()
        try:
            results = self._transaction(batch, grow=True)  # *batch* may grow
        except Exception as exc:
            self._rolled_back()
            self._drop_connection_if_broken(exc)
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            # One operation spoiled the batch: run each alone so only the culprit fails.
            for op, pending in batch:
                try:
                    (result,) = self._transaction([(op, pending)])
                    self._committed(started, 1)
                    pending.set_result(result)
                except Exception as single_exc:
                    self._rolled_back()
                    self._drop_connection_if_broken(single_exc)
                    pending.set_exception(single_exc)
            return
        self._committed(started, len(batch))
        for (_op, pending), result in zip(batch, results, strict=True):
            pending.set_result(result)

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


def _passive_checkpoint(conn: Any) -> bool:
    """PRAGMA wal_checkpoint(PASSIVE) on a DBAPI connection; True when every WAL frame has been
    copied back to the database file."""
    cursor = conn.cursor()
    try:
        cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
        busy, frames, backfilled = cursor.fetchone()
    finally:
        cursor.close()
    return not busy and frames == backfilled


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


def inserted_pk(result: Any) -> int:
    """The primary key of the row an INSERT made (SQLAlchemy types it as possibly missing)."""
    key = result.inserted_primary_key
    if key is None or key[0] is None:
        raise RuntimeError("the INSERT returned no primary key")
    return int(key[0])


def dbapi_cursor(conn: Connection) -> Any:
    """The DBAPI cursor of *conn*, inside the transaction SQLAlchemy began on it."""
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    return dbapi.cursor()
