"""`openpacs serve`: builds every service from the config and runs them.

Owns: start-up order (crash recovery before any listener accepts), wiring of DIMSE services and
presentation contexts, the process model, signal handling (SIGINT/SIGTERM: stop accepting, let
in-flight operations finish, exit 0) and clean shutdown.

Process model: with ``[dicom] workers`` > 1 (default: one per core) the master binds the DICOM
listening socket, runs recovery, then forks worker processes that all accept on that socket,
each with its own interpreter, archive and index writer — a single Python process is bound to
one core by its GIL, and ingest is CPU work. Association slots and pending-connection counts
are shared memory, so the configured limits hold for the whole server. Workers die with the
master (PR_SET_PDEATHSIG); a worker that dies alone is logged and replaced.
Must not: implement protocol or domain logic.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from types import FrameType
from typing import Protocol

from openpacs.config import Config
from openpacs.dicom.sopclasses import STORAGE_COMMITMENT_PUSH, STORAGE_SOP_CLASSES, VERIFICATION
from openpacs.dicom.transfer_syntaxes import (
    COMMAND_TRANSFER_SYNTAXES,
    EXPLICIT_VR_BIG_ENDIAN,
    STORAGE_TRANSFER_SYNTAXES,
)
from openpacs.dimse import commands as cmd
from openpacs.dimse.commitment_scp import CommitmentScp, deliver_report
from openpacs.dimse.qr_scp import FindService, GetService, MoveService
from openpacs.dimse.server import (
    DimseApplication,
    DimseServer,
    SharedCounter,
    WorkerLoad,
    bind_listener,
)
from openpacs.dimse.storage_scp import StorageService, VerificationService
from openpacs.dimse.worklist_scp import MWL_FIND, MppsScp, WorklistScp
from openpacs.dimse.worklist_scp import forward as forward_mpps
from openpacs.services.archive import Archive
from openpacs.services.commitment import JOB_KIND as COMMITMENT_JOB
from openpacs.services.commitment import CommitmentService
from openpacs.services.jobs import JobQueue, JobRunner
from openpacs.services.mpps import FORWARD_JOB as MPPS_FORWARD_JOB
from openpacs.services.mpps import MPPS_SOP_CLASS, MppsService
from openpacs.services.query import MODEL_BY_SOP_CLASS, QueryService
from openpacs.services.worklist import WorklistService

QUERY_RETRIEVE_SOP_CLASSES = tuple(MODEL_BY_SOP_CLASS)

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def build_dimse(
    config: Config,
    archive: Archive,
    slots: SharedCounter | None = None,
    pending: SharedCounter | None = None,
) -> DimseApplication:
    app = DimseApplication(config.dicom, config.remotes, slots=slots, pending=pending)
    app.add_contexts([VERIFICATION], COMMAND_TRANSFER_SYNTAXES)
    # Storage: we accept the SCU role too when asked (C-GET sub-operations, PS3.4 C.4.3).
    app.add_contexts(STORAGE_SOP_CLASSES, STORAGE_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    app.add_contexts(QUERY_RETRIEVE_SOP_CLASSES, COMMAND_TRANSFER_SYNTAXES)
    app.add_contexts([STORAGE_COMMITMENT_PUSH], COMMAND_TRANSFER_SYNTAXES)
    # seed 000 T3.5: the worklist also in Explicit VR Big Endian
    app.add_contexts(
        [MWL_FIND, MPPS_SOP_CLASS], (*COMMAND_TRANSFER_SYNTAXES, EXPLICIT_VR_BIG_ENDIAN)
    )
    query = QueryService(archive.engine, config.dicom.ae_title, config.query.max_results)
    jobs = JobQueue(archive.engine, archive.writer)
    commitment = CommitmentService(archive.engine, jobs)
    worklist = WorklistService(archive.engine, archive.writer, config.query.max_results)
    mpps = MppsService(config, archive.engine, archive.writer, worklist)
    app.add_service(cmd.C_ECHO_RQ, VerificationService())
    app.add_service(cmd.C_STORE_RQ, StorageService(archive))
    app.add_service(cmd.C_FIND_RQ, FindService(query))
    app.add_service(cmd.C_MOVE_RQ, MoveService(config, archive, query))
    app.add_service(cmd.C_GET_RQ, GetService(config, archive, query))
    app.add_service(cmd.N_ACTION_RQ, CommitmentScp(config, commitment, jobs))
    app.add_service(cmd.C_FIND_RQ, WorklistScp(config, worklist), [MWL_FIND])
    mpps_scp = MppsScp(mpps)
    app.add_service(cmd.N_CREATE_RQ, mpps_scp)
    app.add_service(cmd.N_SET_RQ, mpps_scp)
    return app


class _Stoppable(Protocol):
    def stop(self) -> None: ...


def start_singletons(config: Config, archive: Archive) -> list[_Stoppable]:
    """What one process of the server runs for all: the job runner, the HTTP listener and
    the HL7 listener."""
    from openpacs.hl7.messages import MappingOptions
    from openpacs.hl7.mllp import Hl7Listener
    from openpacs.web.app import create_app
    from openpacs.web.server import HttpServer

    started: list[_Stoppable] = [start_jobs(config, archive)]
    worklist = WorklistService(archive.engine, archive.writer, config.query.max_results)
    http = HttpServer(create_app(config, archive, worklist), config.http)
    http.start()
    started.append(http)
    options = MappingOptions(
        primary_issuer=config.hl7.primary_issuer or None,
        orm_station_ae_field=config.hl7.orm_station_ae_field or None,
        default_coding_scheme=config.hl7.default_coding_scheme,
    )
    listener = Hl7Listener(
        worklist, config.hl7.host, config.hl7.port, config.dicom.network_timeout, options=options
    )
    listener.start()
    started.append(listener)
    return started


def start_jobs(config: Config, archive: Archive) -> JobRunner:
    """The durable-job runner (one process of the server runs it)."""
    queue = JobQueue(archive.engine, archive.writer)
    runner = JobRunner(queue)
    runner.register(COMMITMENT_JOB, lambda job: deliver_report(config, job))
    runner.register(MPPS_FORWARD_JOB, lambda job: forward_mpps(config, queue, job))
    runner.start()
    return runner


def worker_count(config: Config) -> int:
    return config.dicom.workers or max(1, min(os.cpu_count() or 1, 8))


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._stop = threading.Event()
        self._signalled: int | None = None  # set by the signal handler (see request_stop)
        self._sock: socket.socket | None = None
        self._slots = SharedCounter()
        self._pending = SharedCounter()
        self._load: WorkerLoad | None = None
        self._workers: dict[int, int] = {}  # pid -> worker number
        self._ready_w: int | None = None  # worker 1 writes here once its listeners are up

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        """Signal handler (and callable from any thread). As a handler it only records the
        signal: it runs in the main thread between two bytecodes, possibly while that thread
        holds the lock inside ``self._stop.wait()``, and ``Event.set()`` would then wait for
        that lock forever (a server that never stopped after SIGTERM, seen once in CI). The
        main thread's short waits notice the flag (:meth:`_wait_stop`)."""
        if signum is None:
            self._stop.set()
        else:
            self._signalled = signum

    def _wait_stop(self, timeout: float) -> bool:
        """Wait up to *timeout* for a stop request; True once one has been made."""
        signum = self._signalled
        if signum is not None and not self._stop.is_set():
            log.info("received %s: finishing in-flight work", signal.Signals(signum).name)
            self._stop.set()
        return self._stop.wait(timeout)

    def serve_forever(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self._sock = bind_listener(self.config.dicom)
        log.info(
            "DICOM listener on %s:%d, AE title %s",
            self.config.dicom.host, self._sock.getsockname()[1], self.config.dicom.ae_title,
        )  # fmt: skip
        # Recovery runs once, before anything accepts (connections wait in the backlog).
        recovery = Archive(self.config)
        recovery.recover()
        recovery.close(clean=True)
        n = worker_count(self.config)
        if n == 1:
            self._serve_in_process()
        else:
            self._supervise(n)
        log.info("openpacs stopped")

    def _ready(self, detail: str) -> None:
        log.info(
            "openpacs ready: data in %s, index %s, duplicate policy %s, %s",
            self.config.storage.data_dir.resolve(),
            _safe_url(self.config.index_url),
            self.config.storage.duplicate_policy,
            detail,
        )

    # ------------------------------------------------------------------ one process
    def _serve_in_process(self) -> None:
        archive = Archive(self.config)
        archive.register()
        dimse = DimseServer(
            build_dimse(self.config, archive, self._slots, self._pending), self._sock
        )
        dimse.start()
        singletons = start_singletons(self.config, archive)
        self._ready("1 process")
        while not self._wait_stop(0.2):
            pass
        dimse.stop()
        for service in singletons:
            service.stop()
        archive.close(clean=True)

    # ------------------------------------------------------------------ workers
    def _supervise(self, n: int) -> None:
        # worker 1 also runs the HTTP and HL7 listeners: "ready" once it says they are up
        ready_r, self._ready_w = os.pipe()
        self._load = WorkerLoad(n)
        for number in range(1, n + 1):
            self._spawn(number)
        os.close(self._ready_w)
        if select.select([ready_r], [], [], 60)[0] and os.read(ready_r, 1) == b"1":
            self._ready(f"{n} worker processes")
        else:
            log.error("worker 1 did not start its listeners; stopping")
            self._stop.set()
        os.close(ready_r)
        while not self._wait_stop(0.0):
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid and pid in self._workers:
                number = self._workers.pop(pid)
                if not self._stop.is_set():
                    log.error("worker %d (pid %d) died (%s); starting a new one",
                              number, pid, _describe(status))  # fmt: skip
                    if self._load is not None:
                        self._load.reset(number - 1)
                    self._spawn(number, recover=True)
            self._wait_stop(0.2)
        with contextlib.suppress(OSError):
            assert self._sock is not None
            self._sock.close()
        for pid in list(self._workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.dicom.shutdown_timeout + 10
        while self._workers and time.monotonic() < deadline:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                self._workers.pop(pid, None)
            else:
                time.sleep(0.05)
        for pid in self._workers:
            log.warning("worker pid %d did not stop in time; killing it", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _spawn(self, number: int, recover: bool = False) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            self._workers[pid] = number
            return
        code = 0
        try:
            _die_with_parent()
            self._worker(number, recover)
        except BaseException:
            log.exception("worker %d failed", number)
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)

    def _worker(self, number: int, recover: bool) -> None:
        stopping: list[int] = []  # the handler only appends (see Server.request_stop)
        signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the master decides
        archive = Archive(self.config)
        if recover:
            archive.recover()  # the worker this one replaces left its blobs behind
        else:
            archive.register()
        dimse = DimseServer(
            build_dimse(self.config, archive, self._slots, self._pending),
            self._sock,
            load=self._load,
            worker=number - 1,
        )
        dimse.start()
        singletons = start_singletons(self.config, archive) if number == 1 else []
        log.info("worker %d (pid %d) accepting", number, os.getpid())
        if number == 1 and self._ready_w is not None:
            with contextlib.suppress(OSError):
                os.write(self._ready_w, b"1")
                os.close(self._ready_w)
            self._ready_w = None
        load = self._load
        affinity = WorkerAffinity(
            self.config.dicom.worker_affinity, number - 1, len(load) if load is not None else 1
        )
        while not stopping:
            time.sleep(0.2)
            if load is not None:
                affinity.update(load.counts())
            if os.getppid() == 1:
                break  # orphaned: the master is gone
        dimse.stop()
        for service in singletons:
            service.stop()
        archive.close(clean=True)


class WorkerAffinity:
    """Keeps a worker process on one CPU while the server is busy (Linux; elsewhere, or with
    one CPU or one worker, nothing is done).

    With as many open associations as workers, every core is needed and each worker is a
    process whose threads (association threads, index writer, blob pool) take turns at one
    GIL. Left to the scheduler, those threads run on both cores, so every GIL hand-over and
    every wake-up of the index writer crosses CPUs — an inter-processor interrupt, which in a
    virtual machine is an exit to the hypervisor. Worker *i* pinned to the *i*-th allowed CPU
    keeps its hand-overs on one core: 64² instances in interleaved runs, +21…+35 % at 2
    associations, −10…+28 % (mean about +10 %) at 4 (docs/performance.md). With fewer
    associations than workers the pinning is
    lifted: a lone association's worker then uses both cores (its index writer's SQLite work
    runs without the GIL, beside the association thread), which pinning measurably slowed.

    ``mode``: ``auto`` (the above), ``on`` (always pinned), ``off`` (never). Checked every
    0.2 s by the worker's main loop; threads started since the last check are set too (a new
    thread inherits its creator's CPUs, so only one started during a change can be wrong).
    """

    def __init__(self, mode: str, worker: int, workers: int) -> None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        usable = len(cpus) > 1 and workers > 1 and hasattr(os, "sched_setaffinity")
        self.mode = mode if usable else "off"
        self.all_cpus: set[int] = set(cpus)
        self.own_cpu: set[int] = {cpus[worker % len(cpus)]} if cpus else set()
        self.pinned = False
        self._set: set[int] = set()  # threads whose CPUs match self.pinned

    @staticmethod
    def wanted(mode: str, counts: list[int]) -> bool:
        if mode == "on":
            return True
        if mode == "auto":
            return len(counts) > 1 and sum(counts) >= len(counts)
        return False

    def update(self, counts: list[int]) -> None:
        if self.mode == "off":
            return
        want = self.wanted(self.mode, counts)
        try:
            threads = {int(tid) for tid in os.listdir("/proc/self/task")}
        except OSError:
            return
        todo = threads if want != self.pinned else threads - self._set
        cpus = self.own_cpu if want else self.all_cpus
        for tid in todo:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError as exc:  # the thread ended, or a cgroup took the CPU away
                if exc.errno != errno.ESRCH:
                    log.warning("cannot set the CPUs of thread %d: %s; affinity off", tid, exc)
                    self.mode = "off"
                    for other in threads:  # best effort: back on every CPU
                        with contextlib.suppress(OSError):
                            os.sched_setaffinity(other, self.all_cpus)
                    return
        if want != self.pinned:
            log.debug("worker %s: %s", os.getpid(), f"on CPU {cpus}" if want else "on all CPUs")
        self.pinned = want
        self._set = threads


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the master dies (kill -9 included)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def _safe_url(url: str) -> str:
    """An index URL for the log, without a password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url
