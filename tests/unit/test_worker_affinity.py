"""WorkerAffinity: when a worker process is kept on one CPU, and that it sets every thread."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from openpacs.server import WorkerAffinity


@pytest.mark.parametrize(
    ("mode", "counts", "pinned"),
    [
        ("auto", [1, 1], True),  # as many associations as workers: every core is busy
        ("auto", [2, 2], True),
        ("auto", [3, 0], True),
        ("auto", [1, 0], False),  # a lone association's worker keeps both cores
        ("auto", [0, 0], False),
        ("auto", [2], False),  # one worker: nothing to separate
        ("on", [0, 0], True),
        ("off", [4, 4], False),
    ],
)
def test_when_a_worker_is_pinned(mode: str, counts: list[int], pinned: bool) -> None:
    assert WorkerAffinity.wanted(mode, counts) is pinned


def test_nothing_to_do_with_one_worker_or_one_cpu() -> None:
    assert WorkerAffinity("on", 0, 1).mode == "off"
    if len(os.sched_getaffinity(0)) < 2:
        assert WorkerAffinity("on", 0, 2).mode == "off"


SCRIPT = textwrap.dedent(
    """
    import os, threading
    from openpacs.server import WorkerAffinity

    def cpus_of_all():
        return {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}

    everything = set(os.sched_getaffinity(0))
    gate = threading.Event()
    early = threading.Thread(target=gate.wait)
    early.start()
    aff = WorkerAffinity("auto", 1, 2)
    aff.update([1, 0])
    assert cpus_of_all() == {frozenset(everything)}, "pinned below the threshold"
    aff.update([1, 1])
    own = sorted(everything)[1]
    assert cpus_of_all() == {frozenset({own})}, cpus_of_all()
    # a thread started by an unpinned thread after the change is set at the next check
    late = threading.Thread(target=gate.wait)
    os.sched_setaffinity(early.native_id, everything)  # as if it was not set yet
    aff._set.discard(early.native_id)
    late.start()
    aff.update([2, 1])
    assert cpus_of_all() == {frozenset({own})}, cpus_of_all()
    aff.update([0, 1])
    assert cpus_of_all() == {frozenset(everything)}, cpus_of_all()
    gate.set()
    print("ok")
    """
)


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux with at least two CPUs",
)
def test_update_sets_every_thread_and_lifts_the_pinning() -> None:
    """In a child process (pinning this one would pin pytest): every thread — those running
    before and one started later — goes onto the worker's CPU and back to all of them."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
