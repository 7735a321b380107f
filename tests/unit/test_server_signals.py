"""Stop requests from signal handlers never touch a lock the interrupted main thread may hold."""

from __future__ import annotations

import signal
import threading

from openpacs.config import Config
from openpacs.server import Server


def test_the_signal_handler_does_not_take_the_stop_events_lock() -> None:
    """A handler runs in the main thread between two bytecodes, possibly inside
    ``Event.wait()`` while it holds the Event's (non-reentrant) lock. Calling ``Event.set()``
    there waited forever: a server that never stopped after SIGTERM. Simulated here by
    holding that lock in this thread while the handler runs."""
    server = Server(Config())
    done = threading.Event()

    def handler_with_lock_held() -> None:
        with server._stop._cond:  # what Event.wait() holds around its checks
            server.request_stop(signal.SIGTERM, None)
        done.set()

    thread = threading.Thread(target=handler_with_lock_held, daemon=True)
    thread.start()
    assert done.wait(5), "request_stop blocked on the stop event's lock"
    assert not server._stop.is_set()  # recorded only; the main loop turns it into a stop
    assert server._wait_stop(0.0) is True
    assert server._stop.is_set()
