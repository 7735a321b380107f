"""The DICOM listener: accepts TCP connections and runs one :class:`Association` per connection.

Owns: the listening socket, the association slots (``max_associations``), the bound on
connections still negotiating (``max_pending_connections``; each is also bounded by ARTIM), the
registry of acceptor presentation contexts and of services by command field, and graceful stop
(in-flight operations finish; idle associations are aborted; bounded by ``shutdown_timeout``).
Must not: implement any DIMSE service.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterable

from pynetdicom.presentation import PresentationContext as PnPresentationContext

from openpacs.config import DicomConfig, RemoteNode
from openpacs.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from openpacs.dimse.association import Association, Service

log = logging.getLogger(__name__)


class DimseApplication:
    """What an association needs from the server: policy, contexts, services, slots."""

    def __init__(self, config: DicomConfig, remotes: Iterable[RemoteNode] = ()) -> None:
        self.config = config
        self.remotes = tuple(remotes)
        self.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        self.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        self.stopping = threading.Event()
        self._services: dict[int, Service] = {}
        self._contexts: dict[str, PnPresentationContext] = {}
        self._slots = 0
        self._lock = threading.Lock()

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

    def add_service(self, command_field: int, service: Service) -> None:
        self._services[command_field] = service

    def acceptor_contexts(self) -> list[PnPresentationContext]:
        return list(self._contexts.values())

    def service_for(self, command_field: int) -> Service | None:
        return self._services.get(command_field)

    def remote_by_ae(self, ae_title: str) -> RemoteNode | None:
        for remote in self.remotes:
            if remote.ae_title == ae_title:
                return remote
        return None

    # -------------------------------------------------------------- slots
    def acquire_slot(self) -> bool:
        with self._lock:
            if self._slots >= self.config.max_associations:
                return False
            self._slots += 1
            return True

    def release_slot(self) -> None:
        with self._lock:
            self._slots -= 1

    @property
    def active_associations(self) -> int:
        with self._lock:
            return self._slots


class DimseServer:
    """Listens on (host, port) and serves associations until :meth:`stop`."""

    def __init__(self, app: DimseApplication) -> None:
        self.app = app
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[threading.Thread] = set()
        self._conn_lock = threading.Lock()
        self.port = app.config.port

    def start(self) -> None:
        config = self.app.config
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((config.host, config.port))
        sock.listen(128)
        sock.settimeout(0.5)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="dicom-accept", daemon=True)
        self._thread.start()
        log.info("DICOM listener on %s:%d, AE title %s", config.host, self.port, config.ae_title)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self.app.stopping.is_set():
            try:
                conn, address = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self.app.stopping.is_set():
                    break
                log.exception("accept failed")
                continue
            with self._conn_lock:
                self._connections = {t for t in self._connections if t.is_alive()}
                pending = len(self._connections) - self.app.active_associations
                if pending >= self.app.config.max_pending_connections:
                    log.warning(
                        "connection from %s:%s closed at once: %d connections still negotiating "
                        "(max_pending_connections)",
                        address[0],
                        address[1],
                        pending,
                    )
                    with contextlib.suppress(OSError):
                        conn.close()
                    continue
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                conn.settimeout(self.app.config.artim_timeout)
                assoc = Association(self.app, conn, address)
                thread = threading.Thread(
                    target=assoc.run, name=f"assoc-{address[0]}:{address[1]}", daemon=True
                )
                self._connections.add(thread)
            thread.start()

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
