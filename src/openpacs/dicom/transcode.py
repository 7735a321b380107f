"""Changing the transfer syntax of a stored instance, for peers that do not accept the stored one.

Owns: decoding a stored Part 10 file with pydicom (compressed pixel data through pydicom's
pixel data handlers: pylibjpeg for JPEG/JPEG-LS/JPEG 2000/RLE) and re-encoding its data set in
Explicit or Implicit VR Little Endian. Used only when a peer accepts none of the stored
syntax's contexts; otherwise instances are sent exactly as stored.
Must not: touch the blob store or the network.
"""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID

from openpacs.dicom.transfer_syntaxes import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)

UNCOMPRESSED = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN)


class TranscodeError(Exception):
    """The instance cannot be re-encoded (no decoder for its pixel data, corrupt data)."""


def transcode_file(path: Path, target: str) -> bytes:
    """The data set of *path* encoded in *target* (Explicit or Implicit VR Little Endian)."""
    if target not in UNCOMPRESSED:
        raise TranscodeError(f"cannot encode to {target}")
    try:
        ds = dcmread(path)
        source = UID(ds.file_meta.TransferSyntaxUID)
        if source.is_compressed:
            ds.decompress()  # pydicom 3: pixel data decoded, the data set becomes Explicit VR LE
        elif not source.is_little_endian:
            ds.PixelData = ds.pixel_array.astype(ds.pixel_array.dtype.newbyteorder("<")).tobytes()
        buf = DicomBytesIO()
        buf.is_little_endian = True
        buf.is_implicit_VR = target == IMPLICIT_VR_LITTLE_ENDIAN
        write_dataset(buf, ds)
        return buf.getvalue()
    except TranscodeError:
        raise
    except Exception as exc:
        raise TranscodeError(f"{path.name}: {exc}") from exc
