"""The benchmark scripts in bench/ parse their command line and print their help.

They are run by hand, never by CI; their option parsing is the part that can break unnoticed
(a ``%`` in a help text made ``bench/ingest.py --help`` raise instead of printing it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
