"""`openpacs serve`: builds every service from the config and runs them in one process.

Owns: start-up order (archive and recovery before any listener), wiring of DIMSE services and
presentation contexts, signal handling (SIGINT/SIGTERM: stop accepting, let in-flight operations
finish, exit 0) and clean shutdown (which lets the next start skip orphan recovery).
Must not: implement protocol or domain logic.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from openpacs.config import Config
from openpacs.dicom.sopclasses import STORAGE_SOP_CLASSES, VERIFICATION
from openpacs.dicom.transfer_syntaxes import COMMAND_TRANSFER_SYNTAXES, STORAGE_TRANSFER_SYNTAXES
from openpacs.dimse import commands as cmd
from openpacs.dimse.server import DimseApplication, DimseServer
from openpacs.dimse.storage_scp import StorageService, VerificationService
from openpacs.services.archive import Archive

log = logging.getLogger(__name__)


def build_dimse(config: Config, archive: Archive) -> DimseApplication:
    app = DimseApplication(config.dicom, config.remotes)
    app.add_contexts([VERIFICATION], COMMAND_TRANSFER_SYNTAXES)
    app.add_contexts(STORAGE_SOP_CLASSES, STORAGE_TRANSFER_SYNTAXES)
    app.add_service(cmd.C_ECHO_RQ, VerificationService())
    app.add_service(cmd.C_STORE_RQ, StorageService(archive))
    return app


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.archive = Archive(config)
        self.archive.recover()
        self.dimse = DimseServer(build_dimse(config, self.archive))
        self._stop = threading.Event()

    def start(self) -> None:
        self.dimse.start()
        log.info(
            "openpacs ready: data in %s, index %s, duplicate policy %s",
            self.config.storage.data_dir.resolve(),
            _safe_url(self.config.index_url),
            self.config.storage.duplicate_policy,
        )

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        if signum is not None:
            log.info("received %s: finishing in-flight work", signal.Signals(signum).name)
        self._stop.set()

    def serve_forever(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self.start()
        while not self._stop.wait(1.0):
            pass
        self.stop()

    def stop(self) -> None:
        self.dimse.stop()
        self.archive.close(clean=True)
        log.info("openpacs stopped")


def _safe_url(url: str) -> str:
    """An index URL for the log, without a password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url
