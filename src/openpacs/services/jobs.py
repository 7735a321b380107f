"""Durable jobs: work that must happen eventually, retried with backoff, surviving restarts.

Owns: the ``jobs`` rows (added through the index writer, so a job exists before whatever
depends on it is acknowledged), claiming due jobs with a lease (a job claimed by a process that
died is claimed again when the lease runs out), and the runner thread that calls the handler
registered for each kind. Backoff: 5 s doubling to 10 min; a handler raises ``JobGaveUp`` to stop
retrying for good.
Must not: know what a job does (handlers are registered by services).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, insert, or_, select, update
from sqlalchemy.engine import Connection

from openpacs.index.db import IndexWriter, inserted_pk
from openpacs.index.schema import jobs

log = logging.getLogger(__name__)

LEASE = dt.timedelta(minutes=5)
FIRST_RETRY = 5.0
MAX_RETRY = 600.0


class JobGaveUp(Exception):
    """The job cannot succeed (e.g. nowhere to deliver to): stop retrying."""


class JobDeferred(Exception):
    """Not yet (e.g. an earlier job of the same sequence is not done): try again shortly,
    without counting an attempt."""


@dataclass(frozen=True)
class Job:
    pk: int
    kind: str
    reference: str | None
    target: str | None
    payload: dict[str, Any]
    attempts: int


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class JobQueue:
    def __init__(self, engine: Engine, writer: IndexWriter) -> None:
        self.engine = engine
        self.writer = writer

    @staticmethod
    def add_in(
        conn: Connection,
        kind: str,
        payload: dict[str, Any],
        *,
        reference: str | None = None,
        target: str | None = None,
    ) -> int:
        """Add a job inside a writer operation (committed with that operation)."""
        now = _now()
        return inserted_pk(
            conn.execute(
                insert(jobs).values(
                    kind=kind, reference=reference, target=target,
                    payload=json.dumps(payload), state="pending", attempts=0,
                    next_attempt_at=now, created_at=now, updated_at=now,
                )
            )
        )  # fmt: skip

    def add(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        reference: str | None = None,
        target: str | None = None,
        delay: float = 0.0,
    ) -> int:
        """Add a job; returns once it is committed."""
        now = _now()

        def op(conn: Connection) -> int:
            return inserted_pk(
                conn.execute(
                    insert(jobs).values(
                        kind=kind,
                        reference=reference,
                        target=target,
                        payload=json.dumps(payload),
                        state="pending",
                        attempts=0,
                        next_attempt_at=now + dt.timedelta(seconds=delay),
                        created_at=now,
                        updated_at=now,
                    )
                )
            )

        return self.writer.run(op)

    def claim(self, limit: int = 16) -> list[Job]:
        """Due jobs, marked running under a lease."""
        now = _now()

        def op(conn: Connection) -> list[Job]:
            rows = conn.execute(
                select(jobs)
                .where(
                    or_(
                        (jobs.c.state == "pending") & (jobs.c.next_attempt_at <= now),
                        (jobs.c.state == "running") & (jobs.c.claimed_until < now),
                    )
                )
                .order_by(jobs.c.next_attempt_at)
                .limit(limit)
            ).all()
            if rows:
                conn.execute(
                    update(jobs)
                    .where(jobs.c.pk.in_([r.pk for r in rows]))
                    .values(state="running", claimed_until=now + LEASE, updated_at=now)
                )
            return [
                Job(r.pk, r.kind, r.reference, r.target, json.loads(r.payload), r.attempts)
                for r in rows
            ]

        return self.writer.run(op)

    def defer(self, job: Job, seconds: float = 1.0) -> None:
        self._set(job.pk, state="pending", claimed_until=None,
                  next_attempt_at=_now() + dt.timedelta(seconds=seconds))  # fmt: skip

    def earlier_pending(self, job: Job) -> bool:
        """Whether a job of the same kind, reference and target, added before *job*, is not
        done yet (jobs that must be delivered in order)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(jobs.c.pk).where(
                    jobs.c.kind == job.kind, jobs.c.reference == job.reference,
                    jobs.c.target == job.target, jobs.c.pk < job.pk,
                    jobs.c.state.in_(("pending", "running")),
                ).limit(1)
            ).first()  # fmt: skip
        return row is not None

    def make_due(self, job_pk: int) -> None:
        """A waiting job becomes due now (e.g. the same-association attempt did not happen)."""
        self._set(job_pk, next_attempt_at=_now())

    def finish(self, job_pk: int) -> None:
        self._set(job_pk, state="done", claimed_until=None, last_error=None)

    def retry_later(self, job: Job, error: str) -> float:
        delay = min(FIRST_RETRY * 2**job.attempts, MAX_RETRY)
        self._set(
            job.pk,
            state="pending",
            attempts=job.attempts + 1,
            claimed_until=None,
            last_error=error[:2000],
            next_attempt_at=_now() + dt.timedelta(seconds=delay),
        )
        return delay

    def give_up(self, job: Job, error: str) -> None:
        self._set(
            job.pk,
            state="failed",
            attempts=job.attempts + 1,
            claimed_until=None,
            last_error=error[:2000],
        )

    def _set(self, job_pk: int, **values: Any) -> None:
        values["updated_at"] = _now()
        self.writer.run(
            lambda conn: conn.execute(update(jobs).where(jobs.c.pk == job_pk).values(**values))
        )

    def get(self, job_pk: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.pk == job_pk)).mappings().first()
        return dict(row) if row else None


Handler = Callable[[Job], None]


class JobRunner:
    """Runs due jobs in a thread (one process of the server runs it)."""

    def __init__(self, queue: JobQueue, poll_interval: float = 1.0) -> None:
        self.queue = queue
        self.poll_interval = poll_interval
        self.handlers: dict[str, Handler] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jobs", daemon=True)

    def register(self, kind: str, handler: Handler) -> None:
        self.handlers[kind] = handler

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                claimed = self.queue.claim()
            except Exception:
                log.exception("claiming jobs failed")
                claimed = []
            for job in claimed:
                if self._stop.is_set():
                    break
                self._run_one(job)
            if not claimed:
                self._wake.wait(self.poll_interval)
                self._wake.clear()

    def _run_one(self, job: Job) -> None:
        handler = self.handlers.get(job.kind)
        try:
            if handler is None:
                raise JobGaveUp(f"no handler for job kind {job.kind!r}")
            handler(job)
        except JobDeferred:
            self.queue.defer(job)
        except JobGaveUp as exc:
            log.error("job %d (%s %s) given up: %s", job.pk, job.kind, job.reference or "", exc)
            self.queue.give_up(job, str(exc))
        except Exception as exc:
            delay = self.queue.retry_later(job, f"{type(exc).__name__}: {exc}")
            log.warning(
                "job %d (%s %s) failed (attempt %d): %s; retry in %.0f s",
                job.pk,
                job.kind,
                job.reference or "",
                job.attempts + 1,
                exc,
                delay,
            )
        else:
            self.queue.finish(job.pk)
            log.info("job %d (%s %s) done", job.pk, job.kind, job.reference or "")
