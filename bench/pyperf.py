"""CPU of a running openpacs by Python function, kernel time included, from ``perf``.

py-spy tells where threads *are*, not where the CPU goes: it counts a thread blocked in
``fsync`` or waiting for the GIL like one running, and with ``--gil`` it caught too few
samples to use here. ``perf`` counts CPU, but on Python 3.11 it stops at
``_PyEval_EvalFrameDefault``. Python 3.12's perf trampolines (``PYTHONPERFSUPPORT=1``) put a
``py::<function>`` frame on the native stack for every Python call, so each perf sample can be
charged to the innermost Python function running: its own bytecode, the C it called, and the
kernel below (a ``writev``, an ``fsync``, SQLite). By hand, never in tests.

Recipe (a 3.12 venv beside the project's, the same source)::

    python3.12 -m venv /tmp/v312 && /tmp/v312/bin/pip install -e .
    printf '#!/bin/sh\\nPYTHONPERFSUPPORT=1 exec /tmp/v312/bin/openpacs "$@"\\n' > /tmp/op312
    chmod +x /tmp/op312
    # start the bench (or any load) with --openpacs-bin /tmp/op312, then during the send:
    perf record -a --call-graph dwarf,32768 -F 499 -o /tmp/perf.data -- sleep 5
    perf script -i /tmp/perf.data > /tmp/perf.txt    # while /tmp/perf-<pid>.map still exist
    .venv/bin/python bench/pyperf.py /tmp/perf.txt [--comm openpacs] [--top 60]

Output: per function, its share of the process's samples and where those samples were
(``kernel``, ``sqlite``, ``python`` = the interpreter, ``other`` = libc and the rest);
``--under FUNC`` lists the native frames beneath one function instead (what its kernel time
is made of).
"""

from __future__ import annotations

import argparse
import collections
import re
from collections.abc import Iterator

_TRIM = re.compile(r":/\S*/(src/openpacs/|site-packages/|python3\.\d+/)")


def samples(path: str, comm: str) -> Iterator[list[str]]:
    """The call stacks (innermost first) of *comm*'s samples in ``perf script`` output."""
    frames: list[str] = []
    keep = False
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                if keep and frames:
                    yield frames
                frames, keep = [], False
            elif not line[0].isspace():
                keep = line.split(None, 1)[0] == comm
            elif keep:
                frames.append(line.strip())
    if keep and frames:
        yield frames


def python_function(frames: list[str]) -> tuple[str | None, int]:
    for i, frame in enumerate(frames):
        if "py::" in frame:
            name = frame.split("py::", 1)[1].split("+0x", 1)[0]
            return _TRIM.sub(" ", name), i
    return None, len(frames)


def where(frame: str) -> str:
    if "[kernel" in frame:
        return "kernel"
    if "sqlite3" in frame:
        return "sqlite"
    if "libpython" in frame:
        return "python"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("perf_script", help="output of `perf script`")
    ap.add_argument("--comm", default="openpacs", help="process name (perf's comm)")
    ap.add_argument("--top", type=int, default=60)
    ap.add_argument("--under", metavar="FUNC", help="native frames beneath this function")
    args = ap.parse_args()

    total = 0
    by_function: collections.Counter[str] = collections.Counter()
    split: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    beneath: collections.Counter[str] = collections.Counter()
    chosen = 0
    for frames in samples(args.perf_script, args.comm):
        total += 1
        function, depth = python_function(frames)
        function = function or "<no Python frame>"
        by_function[function] += 1
        split[function][where(frames[0])] += 1
        if args.under and args.under in function:
            chosen += 1
            names = {f.split(None, 1)[-1].split("+0x", 1)[0] for f in frames[:depth]}
            beneath.update(names)
    if not total:
        raise SystemExit(f"no samples of {args.comm!r} in {args.perf_script}")
    if args.under:
        print(f"{chosen} of {total} samples under {args.under}")
        for name, n in beneath.most_common(args.top):
            print(f"{n / max(chosen, 1) * 100:5.1f}%  {name}")
        return
    print(f"{total} samples of {args.comm}")
    for function, n in by_function.most_common(args.top):
        parts = " ".join(f"{k} {v}" for k, v in split[function].most_common())
        print(f"{n / total * 100:5.1f}%  {function}   [{parts}]")


if __name__ == "__main__":
    main()
