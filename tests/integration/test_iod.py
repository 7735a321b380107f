"""Objects openpacs writes must pass dciodvfy (dicom3tools) with no Error lines.

For the archive that is the Part 10 wrapper it puts around a received data set: a valid IOD sent
by C-STORE or imported must still validate as stored."""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.uid import generate_uid
from support import require_tool, store_datasets, stored_instance_files


def _dciodvfy_errors(path: Path) -> list[str]:
    dciodvfy = require_tool("dciodvfy")
    r = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")]


def _valid_sc(transfer_syntax: str) -> hd.sc.SCImage:
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    return hd.sc.SCImage(
        pixel_array=pixels, photometric_interpretation="MONOCHROME2", bits_allocated=8,
        coordinate_system="PATIENT", study_instance_uid=generate_uid(), series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(), series_number=1, instance_number=1, manufacturer="openpacs tests",
        patient_id="P1", patient_name="Test^Patient", patient_birth_date="19700101", patient_sex="O",
        accession_number="A1", study_id="1", study_date="20260101", study_time="120000",
        referring_physician_name="Ref^Doc", patient_orientation=("L", "P"), laterality="L",
        content_date="20260101", content_time="120000", transfer_syntax_uid=transfer_syntax,
    )  # fmt: skip


def test_stored_objects_pass_dciodvfy(server, tmp_path: Path) -> None:
    for ts in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2"):
        sc = _valid_sc(ts)
        src = tmp_path / f"sc-{ts}.dcm"
        sc.save_as(src)
        assert _dciodvfy_errors(src) == [], "the test object itself must be valid"
        assert store_datasets(server.port, [sc]) == [(0, None)]
        (stored,) = stored_instance_files(server.data_dir, sc.SOPInstanceUID)
        assert _dciodvfy_errors(stored) == []
