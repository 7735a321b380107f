"""DICOM Part 10 file framing (PS3.10 §7.1): preamble, 'DICM' and the File Meta Information.

Owns: encoding the File Meta Information group that openpacs puts in front of a data set it
received over the network, so that the stored file is the received data set byte for byte behind a
standard header. Written directly (eight elements of fixed VR) because it runs once per stored
instance on the ingest hot path; the tests check the result against pydicom's reader and dciodvfy.
"""

from __future__ import annotations

import struct

from openpacs.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

PREAMBLE = b"\x00" * 128 + b"DICM"
_SHORT = struct.Struct("<HH2sH")  # tag, VR, 2-byte length
_LONG = struct.Struct("<HH2s2xI")  # tag, VR, reserved, 4-byte length


def _pad(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def _short(element: int, vr: bytes, value: bytes) -> bytes:
    return _SHORT.pack(0x0002, element, vr, len(value)) + value


def encode_file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    source_ae_title: str | None = None,
) -> bytes:
    """Preamble + 'DICM' + group 0002 (Explicit VR Little Endian), group length included."""
    body = b"".join(
        (
            _LONG.pack(0x0002, 0x0001, b"OB", 2) + b"\x00\x01",
            _short(0x0002, b"UI", _pad(sop_class_uid, b"\x00")),
            _short(0x0003, b"UI", _pad(sop_instance_uid, b"\x00")),
            _short(0x0010, b"UI", _pad(transfer_syntax_uid, b"\x00")),
            _short(0x0012, b"UI", _pad(IMPLEMENTATION_CLASS_UID, b"\x00")),
            _short(0x0013, b"SH", _pad(IMPLEMENTATION_VERSION_NAME, b" ")),
            _short(0x0016, b"AE", _pad(source_ae_title, b" ")) if source_ae_title else b"",
        )
    )
    group_length = _SHORT.pack(0x0002, 0x0000, b"UL", 4) + struct.pack("<I", len(body))
    return PREAMBLE + group_length + body
