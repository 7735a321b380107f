from __future__ import annotations

import subprocess
from pathlib import Path

from support import (
    dataset_bytes_of_file,
    index_rows,
    make_image,
    require_tool,
    store_datasets,
    stored_instance_files,
    tool_env,
)


def test_echoscu_and_storescu_roundtrip(server, tmp_path: Path) -> None:
    echoscu = require_tool("echoscu")
    storescu = require_tool("storescu")
    r = subprocess.run(
        [echoscu, "-aec", "OPENPACS", "127.0.0.1", str(server.port)],
        capture_output=True,
        text=True,
        env=tool_env(),
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    ds = make_image()
    src = tmp_path / "a.dcm"
    ds.save_as(src, enforce_file_format=True)
    r = subprocess.run(
        [storescu, "-xe", "-aec", "OPENPACS", "127.0.0.1", str(server.port), str(src)],
        capture_output=True,
        text=True,
        env=tool_env(),
        timeout=30,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    files = stored_instance_files(server.data_dir, ds.SOPInstanceUID)
    assert len(files) == 1
    assert dataset_bytes_of_file(files[0]) == dataset_bytes_of_file(src)


def test_pynetdicom_store_indexes_levels(server) -> None:
    study = "1.2.826.0.1.3680043.8.498.1"
    series = "1.2.826.0.1.3680043.8.498.2"
    datasets = [
        make_image(study_uid=study, series_uid=series, instance_number=i, seed=i) for i in range(3)
    ]
    statuses = store_datasets(server.port, datasets)
    assert statuses == [(0, None)] * 3
    (study_row,) = index_rows(server.data_dir, "studies", study_uid=study)
    assert study_row["num_instances"] == 3
    assert study_row["num_series"] == 1
    assert study_row["modalities"] == "CT"
    assert study_row["study_date"] == "20260115"
    assert study_row["study_time"] == "093012"
