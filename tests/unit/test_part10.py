from __future__ import annotations

import io

from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from support import make_image

from openpacs.dicom.part10 import encode_file_meta
from openpacs.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME


def test_file_meta_reads_back_with_pydicom() -> None:
    ds = make_image()
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    body = buf.getvalue()
    meta = encode_file_meta(ds.SOPClassUID, ds.SOPInstanceUID, "1.2.840.10008.1.2.1", "MODALITY1")
    read = dcmread(io.BytesIO(meta + body))
    fm = read.file_meta
    assert fm.FileMetaInformationGroupLength == len(meta) - 128 - 4 - 12
    assert fm.FileMetaInformationVersion == b"\x00\x01"
    assert fm.MediaStorageSOPClassUID == ds.SOPClassUID
    assert fm.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert fm.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert fm.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert fm.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    assert fm.SourceApplicationEntityTitle == "MODALITY1"
    assert read.PatientName == ds.PatientName
    assert read.PixelData == ds.PixelData


def test_odd_length_uids_are_padded_with_null() -> None:
    meta = encode_file_meta("1.2.3", "1.2.345", "1.2.840.10008.1.2")
    assert len(meta) % 2 == 0
    fm = dcmread(io.BytesIO(meta + b""), force=True).file_meta
    assert fm.MediaStorageSOPClassUID == "1.2.3"
    assert "SourceApplicationEntityTitle" not in fm
