"""Ingest memory stays flat: the server's resident memory does not grow with the number of
instances it has taken in (issue 7: "10k-instance ingest memory flat").

Thousands of small instances over DCMTK ``storescu``, two associations at a time so that both
worker processes take part. Each process's resident set is read after a first batch (the
caches, SQLite's page caches, the blob pool and the interpreter's arenas have reached their
working size by then) and again after three times as many more; what is kept per instance
(a leak) would show as growth in proportion to the second batch.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from support import ServerProcess, index_rows, make_image, require_tool, tool_env

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
PER_STUDY = 100
FIRST = 1_000
SECOND = 3_000
# A leak of 1.5 KB per instance would add 4.5 MB over the second batch.
MAX_GROWTH_KB = 4_096


def _write_corpus(folder: Path, count: int, start: int) -> list[Path]:
    folder.mkdir(parents=True)
    paths: list[Path] = []
    study = series = ""
    for i in range(start, start + count):
        if i % PER_STUDY == 0:
            study, series = generate_uid(), generate_uid()
        ds = make_image(
            sop_class=MR_IMAGE,
            modality="MR",
            study_uid=study,
            series_uid=series,
            patient_id=f"MEM-{i // PER_STUDY}",
            rows=64,
            columns=64,
            instance_number=i % PER_STUDY + 1,
            seed=i,
        )
        path = folder / f"{i:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _send(storescu: str, port: int, files: list[Path]) -> None:
    """Two storescu processes, one association each, over the two halves of *files*."""
    half = len(files) // 2
    senders = [
        subprocess.Popen(
            [storescu, "-xe", "-aec", "OPENPACS", "127.0.0.1", str(port), *map(str, part)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=tool_env(),
        )
        for part in (files[:half], files[half:])
    ]
    for sender in senders:
        out, _ = sender.communicate(timeout=600)
        assert sender.returncode == 0, out[-2000:]


@pytest.mark.slow
def test_resident_memory_does_not_grow_with_the_instances_stored(
    server: ServerProcess, tmp_path: Path
) -> None:
    storescu = require_tool("storescu")
    first = _write_corpus(tmp_path / "first", FIRST, 0)
    second = _write_corpus(tmp_path / "second", SECOND, FIRST)

    _send(storescu, server.port, first)
    # success is answered only once the row is committed: every instance is indexed by now
    assert len(index_rows(server.data_dir, "instances")) == FIRST
    before = server.status_kb("VmRSS")

    _send(storescu, server.port, second)
    assert len(index_rows(server.data_dir, "instances")) == FIRST + SECOND
    after = server.status_kb("VmRSS")

    assert before.keys() == after.keys(), "a server process was replaced during the test"
    growth = {pid: after[pid] - before[pid] for pid in before}
    print(f"resident KB before {before}, after {after}, growth {growth}")
    assert len(before) >= 2  # the master and at least one worker
    for pid, kb in growth.items():
        assert kb < MAX_GROWTH_KB, (
            f"process {pid} grew by {kb} KB over {SECOND} instances "
            f"({kb * 1024 / SECOND:.0f} bytes per instance): {before[pid]} -> {after[pid]} KB"
        )
