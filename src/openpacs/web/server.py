"""The HTTP listener: uvicorn serving the ASGI app in a thread of the server process.

Owns: binding ``[http] host:port`` (127.0.0.1 unless configured otherwise — secure default),
starting and stopping uvicorn without its own signal handling (the server process owns signals).
Must not: define routes.
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn
from starlette.types import ASGIApp

from openpacs.config import HttpConfig

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the openpacs process handles signals
        pass


class HttpServer:
    def __init__(self, app: ASGIApp, config: HttpConfig) -> None:
        self.config = config
        self._server = _Server(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                log_level="warning",
                lifespan="off",
                access_log=False,
            )
        )
        self._thread = threading.Thread(target=self._server.run, name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self._server.started:
            raise RuntimeError(
                f"HTTP listener could not start on {self.config.host}:{self.config.port}"
            )
        log.info("HTTP listener on %s:%d", self.config.host, self.config.port)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
