from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support import ServerProcess


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A running openpacs with the default configuration."""
    proc = ServerProcess(tmp_path / "server").start()
    yield proc
    if proc.proc is not None and proc.proc.poll() is None:
        proc.stop()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[object]:
    """Factory: make_server(config_toml, **kwargs) → a started ServerProcess (stopped at end)."""
    started: list[ServerProcess] = []

    def factory(
        config: str = "", *, start: bool = True, name: str = "server", **kwargs: object
    ) -> ServerProcess:
        proc = ServerProcess(tmp_path / name, config, **kwargs)  # type: ignore[arg-type]
        if start:
            proc.start()
        started.append(proc)
        return proc

    yield factory
    for proc in started:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop()
