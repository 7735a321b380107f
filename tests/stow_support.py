"""Test support for STOW-RS: multipart bodies written by hand (so a test controls every byte),
a minimal but well-formed MP4 container, and raw HTTP exchanges."""

from __future__ import annotations

import contextlib
import io
import socket
import struct
from collections.abc import Sequence

import pydicom
from pydicom import Dataset

BOUNDARY = "stow-test-boundary-6f1c"


def part10_bytes(ds: Dataset, preamble: bool = False) -> bytes:
    """The file a DICOMweb client sends for *ds*: what dicomweb-client's store_instances writes
    (pydicom's default: no preamble and "DICM" unless the data set was read with one), or with
    *preamble* a conformant Part 10 file."""
    with io.BytesIO() as b:
        pydicom.dcmwrite(b, ds, enforce_file_format=preamble)
        return b.getvalue()


def as_stored(sent: bytes) -> bytes:
    """What openpacs stores for a sent file: the same bytes, behind a preamble and "DICM" when
    the sender left them out."""
    return sent if sent[128:132] == b"DICM" else bytes(128) + b"DICM" + sent


def multipart(
    parts: Sequence[tuple[dict[str, str], bytes]],
    boundary: str = BOUNDARY,
    *,
    preamble: bytes = b"",
    epilogue: bytes = b"",
) -> bytes:
    """A multipart body: each part's header fields, then its content (RFC 2046 §5.1)."""
    out = [preamble]
    for headers, content in parts:
        out.append(f"--{boundary}\r\n".encode())
        for name, value in headers.items():
            out.append(f"{name}: {value}\r\n".encode())
        out.append(b"\r\n")
        out.append(content)
        out.append(b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    out.append(epilogue)
    return b"".join(out)


def content_type(root: str = "application/dicom", boundary: str = BOUNDARY) -> str:
    return f'multipart/related; type="{root}"; boundary={boundary}'


def _box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def make_mp4(
    *,
    width: int = 320,
    height: int = 240,
    frames: int = 25,
    timescale: int = 1000,
    duration: int = 1000,
    codec: bytes = b"avc1",
    profile: int = 100,
    level: int = 41,
    payload: bytes = b"\x00\x00\x00\x02\x09\xf0" * 100,
) -> bytes:
    """An ISO BMFF file with one video track: ftyp, moov (mdhd, hdlr 'vide', stsd with an
    avc1/avcC or hvc1/hvcC sample entry, stsz) and an mdat. The coded samples are not a
    decodable stream: what openpacs reads is the container's description of it."""
    if codec in (b"avc1", b"avc3"):
        config = _box(b"avcC", bytes([1, profile, 0, level, 0xFF, 0xE0, 0]))
    else:
        config = _box(b"hvcC", bytes([1, profile & 0x1F]) + b"\x00" * 10 + bytes([level]))
    entry = _box(
        codec,
        b"\x00" * 6 + struct.pack(">H", 1),  # reserved, data reference index
        b"\x00" * 16,  # pre_defined, reserved
        struct.pack(">HHIII", width, height, 0x00480000, 0x00480000, 0),
        struct.pack(">H", 1) + b"\x00" * 32 + struct.pack(">Hh", 0x18, -1),
        config,
    )
    stsd = _box(b"stsd", struct.pack(">II", 0, 1), entry)
    stsz = _box(b"stsz", struct.pack(">III", 0, 0, frames), struct.pack(">I", 6) * frames)
    mdhd = _box(b"mdhd", struct.pack(">IIIIIHH", 0, 0, 0, timescale, duration, 0x55C4, 0))
    hdlr = _box(b"hdlr", struct.pack(">II4s", 0, 0, b"vide"), b"\x00" * 12, b"video\x00")
    moov = _box(
        b"moov",
        _box(b"mvhd", b"\x00" * 100),
        _box(b"trak", _box(b"mdia", mdhd, hdlr, _box(b"minf", _box(b"stbl", stsd, stsz)))),
    )
    ftyp = _box(b"ftyp", b"isom", struct.pack(">I", 512), b"isomiso2avc1mp41")
    return ftyp + moov + _box(b"mdat", payload)


def raw_http(
    port: int, head: bytes, body: bytes = b"", *, timeout: float = 20.0
) -> tuple[int, dict[str, str], bytes]:
    """Send *head* (request line and header fields, no blank line) and *body* as they are;
    return (status, headers, body) of the answer (read until the server closes or the length
    is complete)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.rstrip(b"\r\n") + b"\r\nConnection: close\r\n\r\n")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(body)  # the server may answer early and stop reading
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        header_block, _, rest = data.partition(b"\r\n\r\n")
        lines = header_block.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "-1"))
        while length < 0 or len(rest) < length:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            rest += chunk
        return status, headers, rest
