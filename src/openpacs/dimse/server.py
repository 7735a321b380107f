"""The DICOM listener: accepts TCP connections and runs one :class:`Association` per connection.

Owns: the listening socket, the association slots (``max_associations``) and the bound on
connections still negotiating (``max_pending_connections``; each is also bounded by ARTIM) —
both counted in shared memory so that they hold across worker processes accepting on the same
socket — the registry of acceptor presentation contexts and of services by command field, and
graceful stop (in-flight operations finish; idle associations are aborted; bounded by
``shutdown_timeout``).
Must not: implement any DIMSE service.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import select
import socket
import threading
import time
from collections.abc import Iterable

from pynetdicom.presentation import PresentationContext as PnPresentationContext

from openpacs.config import DicomConfig, RemoteNode
from openpacs.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from openpacs.dimse.association import Association, Service

log = logging.getLogger(__name__)


class SharedCounter:
    """A bounded counter in shared memory: valid across processes forked after its creation."""

    def __init__(self) -> None:
        self._value = multiprocessing.Value("i", 0)

    def try_acquire(self, limit: int) -> bool:
        with self._value.get_lock():
            if self._value.value >= limit:
                return False
            self._value.value += 1
            return True

    def release(self) -> None:
        with self._value.get_lock():
            self._value.value -= 1

    @property
    def value(self) -> int:
        return int(self._value.value)


class WorkerLoad:
    """Open associations per worker process, in shared memory (created before the fork).

    Worker processes accept on one listening socket; the kernel wakes all of them and whoever
    calls accept() first wins, so four associations often landed 3:1 or 4:0 on two workers —
    and a worker is one core (GIL). A worker that has more open associations than another
    leaves a waiting connection to the less loaded one for BALANCE_GRACE seconds, then takes
    it anyway (so a busy or stuck worker never strands a connection).
    """

    def __init__(self, workers: int) -> None:
        self._counts = multiprocessing.Array("i", workers, lock=False)
        self._lock = threading.Lock()  # re-created per process by fork's copy: per process

    def __len__(self) -> int:
        return len(self._counts)

    def add(self, worker: int, delta: int) -> None:
        # Only the worker itself changes its own count (its accept and association threads,
        # serialised by a process-local lock); other processes only read it.
        with self._lock:
            self._counts[worker] += delta

    def reset(self, worker: int) -> None:
        """A worker died: its associations died with it (called by the master)."""
        self._counts[worker] = 0

    def counts(self) -> list[int]:
        """Every worker's open associations (a snapshot)."""
        return list(self._counts)

    def least_loaded(self, worker: int) -> bool:
        mine = self._counts[worker]
        return all(mine <= other for other in self._counts)


BALANCE_GRACE = 0.02  # seconds a more loaded worker leaves a new connection to the others


class DimseApplication:
    """What an association needs from the server: policy, contexts, services, slots."""

    def __init__(
        self,
        config: DicomConfig,
        remotes: Iterable[RemoteNode] = (),
        *,
        slots: SharedCounter | None = None,
        pending: SharedCounter | None = None,
    ) -> None:
        self.config = config
        self.remotes = tuple(remotes)
        self.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        self.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        self.stopping = threading.Event()
        self._services: dict[int, Service] = {}
        self._by_syntax: dict[tuple[int, str], Service] = {}
        self._contexts: dict[str, PnPresentationContext] = {}
        self.slots = slots or SharedCounter()
        self.pending = pending or SharedCounter()

    # -------------------------------------------------------------- registration
    def add_contexts(
        self,
        abstract_syntaxes: Iterable[str],
        transfer_syntaxes: Iterable[str],
        *,
        scu_role: bool | None = None,
        scp_role: bool | None = None,
    ) -> None:
        """Accept these abstract syntaxes with the transfer syntaxes in our preference order.
        scu_role/scp_role: what we answer to SCP/SCU role selection (None: default roles only)."""
        transfer = list(transfer_syntaxes)
        for uid in abstract_syntaxes:
            context = PnPresentationContext()
            context.abstract_syntax = uid
            for ts in transfer:
                context.add_transfer_syntax(ts)
            context.scu_role = scu_role
            context.scp_role = scp_role
            self._contexts[uid] = context

    def add_service(
        self, command_field: int, service: Service, abstract_syntaxes: Iterable[str] = ()
    ) -> None:
        """The service for a command; with *abstract_syntaxes*, only on those contexts (e.g.
        C-FIND on the worklist model vs the Q/R models)."""
        syntaxes = list(abstract_syntaxes)
        if not syntaxes:
            self._services[command_field] = service
        for uid in syntaxes:
            self._by_syntax[(command_field, uid)] = service

    def acceptor_contexts(self) -> list[PnPresentationContext]:
        return list(self._contexts.values())

    def service_for(self, command_field: int, abstract_syntax: str = "") -> Service | None:
        service = self._by_syntax.get((command_field, abstract_syntax))
        return service if service is not None else self._services.get(command_field)

    def remote_by_ae(self, ae_title: str) -> RemoteNode | None:
        for remote in self.remotes:
            if remote.ae_title == ae_title:
                return remote
        return None

    # -------------------------------------------------------------- slots
    def acquire_slot(self) -> bool:
        return self.slots.try_acquire(self.config.max_associations)

    def release_slot(self) -> None:
        self.slots.release()


def bind_listener(config: DicomConfig) -> socket.socket:
    """The listening socket; created before worker processes fork so they all accept on it
    (connections arriving meanwhile wait in the backlog)."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    sock.listen(512)
    return sock


class DimseServer:
    """Accepts on a listening socket and serves associations until :meth:`stop`."""

    def __init__(
        self,
        app: DimseApplication,
        sock: socket.socket | None = None,
        *,
        load: WorkerLoad | None = None,
        worker: int = 0,
    ) -> None:
        self.app = app
        self._sock = sock
        self._load = load if load is not None and len(load) > 1 else None
        self._worker = worker
        self._thread: threading.Thread | None = None
        self._connections: set[threading.Thread] = set()
        self._conn_lock = threading.Lock()
        self.port = app.config.port

    def start(self) -> None:
        config = self.app.config
        if self._sock is None:
            self._sock = bind_listener(config)
        self._sock.settimeout(0.0)  # accept() only after select() (see _accept)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="dicom-accept", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        config = self.app.config
        while not self.app.stopping.is_set():
            try:
                conn, address = self._accept()
            except (TimeoutError, BlockingIOError, InterruptedError):
                continue  # another worker took it, or the timeout slice ended
            except (OSError, ValueError):  # ValueError: select() on the socket stop() closed
                if self.app.stopping.is_set():
                    break
                log.exception("accept failed")
                continue
            if not self.app.pending.try_acquire(config.max_pending_connections):
                log.warning(
                    "connection from %s:%s closed at once: %d connections still negotiating "
                    "(max_pending_connections)", address[0], address[1], self.app.pending.value,
                )  # fmt: skip
                with contextlib.suppress(OSError):
                    conn.close()
                continue
            conn.setblocking(True)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            conn.settimeout(config.artim_timeout)
            assoc = Association(self.app, conn, address)
            if self._load is not None:
                self._load.add(self._worker, 1)
            thread = threading.Thread(
                target=self._run_association,
                args=(assoc,),
                name=f"assoc-{address[0]}:{address[1]}",
                daemon=True,
            )
            with self._conn_lock:
                self._connections = {t for t in self._connections if t.is_alive()}
                self._connections.add(thread)
            thread.start()

    def _accept(self) -> tuple[socket.socket, tuple[str, int]]:
        """Wait (0.5 s slices) for a connection and accept it; a worker that is not the least
        loaded first leaves it to the others for BALANCE_GRACE (see WorkerLoad). The listening
        socket is non-blocking, so a worker that lost the race (BlockingIOError) decides
        again with fresh counts."""
        assert self._sock is not None
        if not select.select([self._sock], [], [], 0.5)[0]:
            raise TimeoutError
        if self._load is not None and not self._load.least_loaded(self._worker):
            time.sleep(BALANCE_GRACE)
        return self._sock.accept()

    def _run_association(self, assoc: Association) -> None:
        try:
            assoc.run()
        finally:
            if self._load is not None:
                self._load.add(self._worker, -1)

    def stop(self) -> None:
        """Stop accepting; let in-flight operations finish within shutdown_timeout."""
        self.app.stopping.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._conn_lock:
            threads = list(self._connections)
        timeout = self.app.config.shutdown_timeout
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        alive = [t for t in threads if t.is_alive()]
        if alive:
            log.warning(
                "%d associations still busy after %g s; exiting anyway", len(alive), timeout
            )
