"""The benchmark scripts in bench/ parse their command line and print their help.

They are run by hand, never by CI; their option parsing is the part that can break unnoticed
(a ``%`` in a help text made ``bench/ingest.py --help`` raise instead of printing it).
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py"))


def test_the_bench_scripts_are_found() -> None:
    assert {"ingest.py", "query.py", "pyperf.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage(script: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:"), done.stdout[:500]
    assert done.stderr == "", done.stderr[-2000:]


def _hold(path: Path) -> Any:
    f = open(path, "a+")  # noqa: SIM115 -- closed by the caller
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.write("pid 4242: bench/ingest.py --repeat 3\n")
    f.flush()
    return f


@pytest.mark.parametrize("script", ["ingest.py", "query.py", "dicomweb.py", "worklist.py"])
def test_a_second_benchmark_is_refused(script: str, tmp_path: Path) -> None:
    """Two harnesses at once interleave their timed sends (it happened: each one's figures were
    wrong); the second one stops before doing anything, naming the one that runs."""
    lock = tmp_path / "bench.lock"
    held = _hold(lock)
    try:
        done = subprocess.run(
            [sys.executable, str(BENCH / script), "--scratch", str(tmp_path / "scratch")]
            if script == "ingest.py"
            else [sys.executable, str(BENCH / script)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "OPENPACS_BENCH_LOCK": str(lock)},
        )
    finally:
        held.close()
    assert done.returncode == 2, done.stderr[-2000:]
    assert "another benchmark holds" in done.stderr
    assert "pid 4242: bench/ingest.py --repeat 3" in done.stderr
    assert not (tmp_path / "scratch").exists()


def _load_ingest() -> Any:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_ingest", BENCH / "ingest.py")
        assert spec is not None and spec.loader is not None
        ingest = importlib.util.module_from_spec(spec)
        sys.modules["bench_ingest"] = ingest  # dataclasses look their module up while defined
        spec.loader.exec_module(ingest)
    finally:
        sys.path.remove(str(BENCH))
        sys.modules.pop("bench_ingest", None)
    return ingest


def test_the_lock_is_taken_and_given_back(tmp_path: Path) -> None:
    ingest = _load_ingest()
    lock = tmp_path / "bench.lock"
    first, holder = ingest.hold_bench_lock(lock)
    assert first is not None and holder == ""
    assert f"pid {os.getpid()}:" in lock.read_text()
    second, holder = ingest.hold_bench_lock(lock)
    assert second is None and holder.startswith(f"pid {os.getpid()}:")
    first.close()  # the holder ends
    third, holder = ingest.hold_bench_lock(lock)
    assert third is not None and holder == ""
    third.close()


def test_the_openpacs_version_names_its_interpreter() -> None:
    """The interpreter build changes openpacs' figures (~12 % CPU per instance between pyenv's
    and Debian's CPython 3.11 here): every run records which one ran it."""
    ingest = _load_ingest()
    line = subprocess.run(
        [sys.executable, "-c", ingest.INTERPRETER_PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.strip()
    with open("/proc/self/maps") as maps:
        shared = any("libpython" in entry for entry in maps)
    base = os.path.realpath(sys._base_executable)  # type: ignore[attr-defined]
    version = sys.version.split()[0]
    kind = "shared libpython" if shared else "libpython linked in"
    assert line.endswith(f" on Python {version} ({base}, {kind})"), line
    assert line.split()[0][0].isdigit(), line  # openpacs' own version comes first
