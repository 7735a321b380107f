"""A 2 GB multi-frame instance streams to disk: the server's peak RSS stays under 200 MB."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from support import index_rows, require_tool, stored_instance_files, tool_env

MF_GRAYSCALE_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"


def write_big_multiframe(path: Path, frames: int, rows: int = 1024, columns: int = 1024) -> Dataset:
    """Header written by pydicom; the Pixel Data value is a sparse extent (no 2 GB in memory)."""
    ds = Dataset()
    ds.SOPClassUID = MF_GRAYSCALE_WORD_SC
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID = "Big^Volume", "BIG-1"
    ds.Modality = "OT"
    ds.StudyDate, ds.StudyTime = "20260101", "080000"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    length = frames * rows * columns * 2
    with open(path, "ab") as fh:
        fh.write(struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OW", length))
        fh.truncate(fh.tell() + length)
    return ds


@pytest.mark.slow
def test_2gb_instance_streams_with_bounded_memory(server, tmp_path: Path) -> None:
    storescu = require_tool("storescu")
    src = tmp_path / "big.dcm"
    ds = write_big_multiframe(src, frames=960)  # 960 × 2 MiB = 2.01e9 bytes of pixel data
    size = src.stat().st_size
    assert size > 2_000_000_000
    r = subprocess.run([storescu, "-xe", "-aec", "OPENPACS", "127.0.0.1", str(server.port), str(src)],
                       capture_output=True, text=True, env=tool_env(), timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    peak_mb = server.rss_peak_kb() / 1024
    (row,) = index_rows(server.data_dir, "instances", sop_uid=ds.SOPInstanceUID)
    assert row["number_of_frames"] == 960
    (stored,) = stored_instance_files(server.data_dir, ds.SOPInstanceUID)
    assert row["size"] == stored.stat().st_size > 2_000_000_000
    header = pydicom.dcmread(stored, stop_before_pixels=True)
    assert header.SOPInstanceUID == ds.SOPInstanceUID
    print(f"peak RSS of the server: {peak_mb:.0f} MB for a {size / 1e9:.2f} GB instance")
    assert peak_mb < 200, f"peak RSS {peak_mb:.0f} MB"
    os.unlink(stored)  # give the disk space back early
