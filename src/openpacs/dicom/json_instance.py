"""A Part 10 instance built from DICOM JSON metadata and bulk data (STOW-RS, PS3.18 10.5.1.4).

Owns: the Transfer Syntax an instance gets from the media type of its Pixel Data bulk part
(PS3.18 Table 8.7.3-5; seed 002 T3.22 names image/jpeg and video/mp4; application/octet-stream is
native pixel data, stored as Explicit VR Little Endian), read from the part's ``transfer-syntax``
parameter or else from the compressed stream itself (JPEG SOF/SOS markers, the MP4 sample
description); the Image Pixel Description attributes the metadata may omit for those media types
(PS3.18 10.5.1.4), filled from the stream, and refused when the metadata contradicts it; and the
encoding of the Part 10 file — File Meta Information with our implementation UID
(``dicom/part10.py``), then the data set in Explicit VR Little Endian in tag order, top-level
bulk values copied from their parts in pieces (so a large Pixel Data value never sits in memory)
and everything else encoded by pydicom. The stream parsing is written here because it reads only
a few header fields and no installed library reads MP4 containers.
Must not: store or index anything, or know HTTP (a bulk part arrives as a seekable file).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import Tag
from pydicom.values import convert_value

from openpacs.dicom.part10 import encode_file_meta
from openpacs.dicom.transfer_syntaxes import EXPLICIT_VR_LITTLE_ENDIAN

# Failure Reason values (PS3.18 Table I.2-2).
CANNOT_UNDERSTAND = 0xC000
DATASET_MISMATCH = 0xA900
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
REQUIRED_ELEMENT_MISSING = 0xC00B  # in the Cxxx "cannot understand" range (seed 002 T3.58)

OCTET_STREAM = "application/octet-stream"
PIXEL_DATA = 0x7FE00010
COPY_CHUNK = 4 << 20
NESTED_BULK_LIMIT = 64 << 20  # a bulk value inside a sequence is decoded in memory
MAX_FRAGMENT = 1 << 30  # video streams are split into fragments of at most 1 GiB

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_PROGRESSIVE = "1.2.840.10008.1.2.4.55"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.57"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_LS_NEAR_LOSSLESS = "1.2.840.10008.1.2.4.81"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
H264_HP_41 = "1.2.840.10008.1.2.4.102"
H264_HP_42_2D = "1.2.840.10008.1.2.4.104"
H264_STEREO_HP_42 = "1.2.840.10008.1.2.4.106"
HEVC_MAIN_51 = "1.2.840.10008.1.2.4.107"
HEVC_MAIN10_51 = "1.2.840.10008.1.2.4.108"

# PS3.18 Table 8.7.3-5: the Transfer Syntaxes each compressed bulk data media type may carry
# (the first is the default when the part does not say and the stream is not inspected).
MEDIA_TRANSFER_SYNTAXES: dict[str, tuple[str, ...]] = {
    "image/jpeg": (
        JPEG_LOSSLESS_SV1,
        JPEG_BASELINE,
        JPEG_EXTENDED,
        JPEG_LOSSLESS,
        JPEG_PROGRESSIVE,  # retired, but seed 002 T3.57 accepts it
    ),
    "image/jls": (JPEG_LS_LOSSLESS, JPEG_LS_NEAR_LOSSLESS),
    "image/jp2": ("1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.90"),
    "image/jpx": ("1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.92"),
    "image/jphc": (
        "1.2.840.10008.1.2.4.203",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
    ),
    "image/dicom-rle": (RLE_LOSSLESS,),
    "video/mp4": (
        H264_HP_41,
        "1.2.840.10008.1.2.4.103",
        H264_HP_42_2D,
        "1.2.840.10008.1.2.4.105",
        H264_STEREO_HP_42,
        "1.2.840.10008.1.2.4.102.1",
        "1.2.840.10008.1.2.4.103.1",
        "1.2.840.10008.1.2.4.104.1",
        "1.2.840.10008.1.2.4.105.1",
        "1.2.840.10008.1.2.4.106.1",
        HEVC_MAIN_51,
        HEVC_MAIN10_51,
    ),
}
# One part of these holds one frame (a video part holds them all).
SINGLE_FRAME_MEDIA = frozenset(m for m in MEDIA_TRANSFER_SYNTAXES if m.startswith("image/"))

# Explicit VR: these VRs have a reserved field and a 4-byte value length (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM"}
)
_TEXT_VRS |= {"UC", "UR", "UT"}
_VALID_VRS = _LONG_VRS | _TEXT_VRS | {"AT", "FD", "FL", "SL", "SS", "UI", "UL", "US"}


class InstanceError(ValueError):
    """The instance cannot be built: *reason* is its Failure Reason (PS3.18 Table I.2-2)."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Output(Protocol):
    def write(self, data: bytes | bytearray | memoryview) -> None: ...


@dataclass
class BulkPart:
    """A bulk data part of the request, spooled to a seekable file."""

    media_type: str
    file: BinaryIO
    size: int
    params: dict[str, str] = field(default_factory=dict)

    def chunks(self) -> Iterator[bytes]:
        self.file.seek(0)
        left = self.size
        while left > 0:
            data = self.file.read(min(COPY_CHUNK, left))
            if not data:
                raise InstanceError(CANNOT_UNDERSTAND, "bulk data part shorter than received")
            left -= len(data)
            yield data

    def read_all(self) -> bytes:
        return b"".join(self.chunks())


@dataclass(frozen=True)
class StreamInfo:
    """What a compressed stream says about the pixels it holds (None: not known)."""

    transfer_syntax: str | None
    rows: int | None = None
    columns: int | None = None
    samples: int | None = None
    precision: int | None = None
    photometric: str | None = None
    frames: int | None = None
    frame_time_ms: float | None = None


@dataclass(frozen=True)
class BuiltInstance:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


def json_uid(metadata: Mapping[str, Any], tag: str) -> str | None:
    """A UID value of a DICOM JSON object, if it has one (for failure reports)."""
    element = metadata.get(tag)
    if isinstance(element, dict):
        values = element.get("Value")
        if isinstance(values, list) and values and isinstance(values[0], str):
            return values[0]
    return None


# ---------------------------------------------------------------------------- JPEG
def _jpeg_segments(fh: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(marker, payload) of each marker segment from SOI up to and including SOS."""
    fh.seek(0)
    if fh.read(2) != b"\xff\xd8":
        raise InstanceError(CANNOT_UNDERSTAND, "JPEG bulk data does not start with SOI")
    pos = 2
    while True:
        fh.seek(pos)
        head = fh.read(4)
        if len(head) < 2 or head[0] != 0xFF:
            raise InstanceError(CANNOT_UNDERSTAND, f"JPEG bulk data: no marker at byte {pos}")
        marker = head[1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            pos += 2
            continue
        if len(head) < 4:
            raise InstanceError(CANNOT_UNDERSTAND, "JPEG bulk data ends before its scan")
        length = int.from_bytes(head[2:4], "big")
        payload = fh.read(length - 2)
        if length < 2 or len(payload) != length - 2:
            raise InstanceError(CANNOT_UNDERSTAND, f"JPEG bulk data: bad segment at byte {pos}")
        yield marker, payload
        if marker == 0xDA:  # SOS: entropy-coded data follows
            return
        pos += 2 + length


def inspect_jpeg(fh: BinaryIO, media_type: str = "image/jpeg") -> StreamInfo:
    """The JPEG process (ISO 10918-1 SOFn, or JPEG-LS SOF55) → Transfer Syntax, and the frame
    header's size, components and precision."""
    sof: tuple[int, bytes] | None = None
    adobe_transform: int | None = None
    for marker, payload in _jpeg_segments(fh):
        if marker == 0xEE and payload.startswith(b"Adobe") and len(payload) >= 12:
            adobe_transform = payload[11]
        elif (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
            sof = (marker, payload)
        elif marker == 0xDA:
            if sof is None:
                raise InstanceError(CANNOT_UNDERSTAND, "JPEG bulk data has no frame header")
            return _jpeg_info(sof[0], sof[1], payload, adobe_transform, media_type)
    raise InstanceError(CANNOT_UNDERSTAND, "JPEG bulk data has no scan")  # pragma: no cover


def _jpeg_info(
    marker: int, sof: bytes, sos: bytes, adobe_transform: int | None, media_type: str
) -> StreamInfo:
    if len(sof) < 6 or len(sof) < 6 + 3 * sof[5] or len(sos) < 1 or len(sos) < 4 + 2 * sos[0]:
        raise InstanceError(CANNOT_UNDERSTAND, "JPEG bulk data: truncated frame or scan header")
    precision, rows, columns, components = sof[0], *struct.unpack(">HH", sof[1:5]), sof[5]
    after_components = sos[1 + 2 * sos[0] :]  # Ss Se AhAl (ISO 10918-1) / NEAR ILV Al (JPEG-LS)
    lossless = marker in (0xC3, 0xF7)
    ts: str | None
    if marker == 0xF7 and media_type != "image/jls":
        raise InstanceError(TRANSFER_SYNTAX_NOT_SUPPORTED, f"{media_type} bulk data is JPEG-LS")
    if marker == 0xF7:
        ts = JPEG_LS_LOSSLESS if after_components[0] == 0 else JPEG_LS_NEAR_LOSSLESS
    elif media_type == "image/jls":
        raise InstanceError(TRANSFER_SYNTAX_NOT_SUPPORTED, "image/jls bulk data is not JPEG-LS")
    else:
        ts = {
            0xC0: JPEG_BASELINE,
            0xC1: JPEG_EXTENDED,
            0xC2: JPEG_PROGRESSIVE,
            0xC3: JPEG_LOSSLESS_SV1 if after_components[0] == 1 else JPEG_LOSSLESS,
        }.get(marker)
        if ts is None:
            raise InstanceError(
                TRANSFER_SYNTAX_NOT_SUPPORTED,
                f"JPEG process of marker SOF{marker - 0xC0} (hierarchical or arithmetic coding) "
                "is not supported",
            )
    if components == 1:
        photometric = "MONOCHROME2"
    elif components == 3:
        sampling = [sof[7 + 3 * i] for i in range(3)]  # Hi << 4 | Vi of each component
        if lossless or adobe_transform == 0:
            photometric = "RGB"
        elif sampling[0] != sampling[1] or sampling[0] != sampling[2]:
            photometric = "YBR_FULL_422"
        else:
            photometric = "YBR_FULL"
    else:
        photometric = None
    return StreamInfo(ts, rows or None, columns, components, precision, photometric)


# ---------------------------------------------------------------------------- MP4
def _boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, payload end) of the ISO BMFF boxes in data[start:end]."""
    end = len(data) if end is None else end
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        header = 8
        if size == 1:
            if pos + 16 > end:
                return
            size = struct.unpack(">Q", data[pos + 8 : pos + 16])[0]
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            return
        yield kind, pos + header, pos + size
        pos += size


def _child(data: bytes, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    for found, s, e in _boxes(data, start, end):
        if found == kind:
            return s, e
    return None


def _read_moov(fh: BinaryIO, size: int) -> bytes:
    pos = 0
    while pos + 8 <= size:
        fh.seek(pos)
        head = fh.read(16)
        box_size, kind = struct.unpack(">I4s", head[:8])
        if box_size == 1 and len(head) == 16:
            box_size = struct.unpack(">Q", head[8:16])[0]
        elif box_size == 0:
            box_size = size - pos
        if box_size < 8:
            break
        if kind == b"moov":
            if box_size > NESTED_BULK_LIMIT:
                raise InstanceError(CANNOT_UNDERSTAND, "MP4 movie header too large")
            fh.seek(pos)
            return fh.read(box_size)
        pos += box_size
    raise InstanceError(CANNOT_UNDERSTAND, "video/mp4 bulk data has no movie box (moov)")


def inspect_mp4(fh: BinaryIO, size: int) -> StreamInfo:
    """The video track's codec, profile and level (avcC / hvcC) → Transfer Syntax (PS3.5 8.2.8,
    8.2.11), its frame size, frame count and frame time."""
    moov = _read_moov(fh, size)
    for kind, start, end in _boxes(moov, 8):
        if kind != b"trak":
            continue
        mdia = _child(moov, start, end, b"mdia")
        if mdia is None:
            continue
        hdlr = _child(moov, *mdia, b"hdlr")
        if hdlr is None or moov[hdlr[0] + 8 : hdlr[0] + 12] != b"vide":
            continue
        return _video_track(moov, mdia)
    raise InstanceError(CANNOT_UNDERSTAND, "video/mp4 bulk data has no video track")


def _video_track(moov: bytes, mdia: tuple[int, int]) -> StreamInfo:
    timescale = duration = 0
    mdhd = _child(moov, *mdia, b"mdhd")
    if mdhd is not None:
        s = mdhd[0]
        if moov[s] == 1:
            timescale, duration = struct.unpack(">IQ", moov[s + 20 : s + 32])
        else:
            timescale, duration = struct.unpack(">II", moov[s + 12 : s + 20])
    minf = _child(moov, *mdia, b"minf")
    stbl = _child(moov, *minf, b"stbl") if minf else None
    stsd = _child(moov, *stbl, b"stsd") if stbl else None
    if stbl is None or stsd is None:
        raise InstanceError(CANNOT_UNDERSTAND, "video/mp4: no sample description")
    frames = None
    stsz = _child(moov, *stbl, b"stsz")
    if stsz is not None and stsz[1] - stsz[0] >= 12:
        frames = struct.unpack(">I", moov[stsz[0] + 8 : stsz[0] + 12])[0] or None
    frame_time = duration / timescale * 1000 / frames if timescale and frames else None
    for kind, start, end in _boxes(moov, stsd[0] + 8, stsd[1]):
        if end - start < 78:
            continue
        columns, rows = struct.unpack(">HH", moov[start + 24 : start + 28])
        config = _boxes(moov, start + 78, end)
        ts = None
        for ckind, cs, ce in config:
            if kind in (b"avc1", b"avc3") and ckind == b"avcC" and ce - cs >= 4:
                ts = _h264_syntax(profile=moov[cs + 1], level=moov[cs + 3])
            elif kind in (b"hvc1", b"hev1") and ckind == b"hvcC" and ce - cs >= 13:
                ts = _hevc_syntax(profile=moov[cs + 1] & 0x1F, level=moov[cs + 12])
        if ts is None:
            raise InstanceError(
                TRANSFER_SYNTAX_NOT_SUPPORTED,
                f"video/mp4 codec {kind.decode('latin-1')!r} is neither H.264 nor HEVC",
            )
        return StreamInfo(ts, rows, columns, 3, 8, "YBR_PARTIAL_420", frames, frame_time)
    raise InstanceError(CANNOT_UNDERSTAND, "video/mp4: empty sample description")


def _h264_syntax(profile: int, level: int) -> str:
    """PS3.5 8.2.8: High Profile (or its subsets Constrained Baseline and Main) at level ≤ 4.1,
    or 4.2 for 2D video; Stereo High at 4.2."""
    if profile == 128 and level <= 42:
        return H264_STEREO_HP_42
    if profile in (66, 77, 100):
        if level <= 41:
            return H264_HP_41
        if level == 42:
            return H264_HP_42_2D
    raise InstanceError(
        TRANSFER_SYNTAX_NOT_SUPPORTED,
        f"H.264 profile {profile} level {level / 10:.1f} has no DICOM Transfer Syntax",
    )


def _hevc_syntax(profile: int, level: int) -> str:
    """PS3.5 8.2.11: HEVC Main / Main 10 Profile at level ≤ 5.1 (level_idc = 30 × level)."""
    if level <= 153 and profile in (1, 2):
        return HEVC_MAIN_51 if profile == 1 else HEVC_MAIN10_51
    raise InstanceError(
        TRANSFER_SYNTAX_NOT_SUPPORTED,
        f"HEVC profile {profile} level {level / 30:.1f} has no DICOM Transfer Syntax",
    )


# ---------------------------------------------------------------------------- choosing
def stream_info(part: BulkPart) -> StreamInfo:
    """The Transfer Syntax (and what the stream says) of a Pixel Data bulk part."""
    media = part.media_type
    if media == OCTET_STREAM:
        return StreamInfo(EXPLICIT_VR_LITTLE_ENDIAN)
    allowed = MEDIA_TRANSFER_SYNTAXES.get(media)
    if allowed is None:
        raise InstanceError(
            TRANSFER_SYNTAX_NOT_SUPPORTED, f"media type {media!r} is not supported for Pixel Data"
        )
    if media in ("image/jpeg", "image/jls"):
        info = inspect_jpeg(part.file, media)
    elif media == "video/mp4":
        info = inspect_mp4(part.file, part.size)
    else:
        info = StreamInfo(allowed[0])
    declared = part.params.get("transfer-syntax")
    if declared:
        if declared not in allowed:
            raise InstanceError(
                TRANSFER_SYNTAX_NOT_SUPPORTED,
                f"transfer-syntax {declared} is not one of {media}'s (PS3.18 Table 8.7.3-5)",
            )
        info = StreamInfo(
            declared, info.rows, info.columns, info.samples, info.precision, info.photometric,
            info.frames, info.frame_time_ms,
        )  # fmt: skip
    return info


def _complete_pixel_description(ds: Dataset, info: StreamInfo, media: str) -> None:
    """Fill what the metadata omits from the stream; refuse what contradicts it."""
    for keyword, found in (
        ("Rows", info.rows),
        ("Columns", info.columns),
        ("SamplesPerPixel", info.samples),
    ):
        given = ds.get(keyword)
        if found is None:
            continue
        if given is None or given == "":
            setattr(ds, keyword, found)
        elif int(given) != found:
            raise InstanceError(
                DATASET_MISMATCH,
                f"{keyword} is {given} in the metadata, {found} in the {media} data",
            )
    frames = ds.get("NumberOfFrames")
    if media in SINGLE_FRAME_MEDIA and frames not in (None, "") and int(frames) > 1:
        raise InstanceError(
            DATASET_MISMATCH,
            f"Number of Frames is {frames} but one {media} part holds one frame "
            "(send multi-frame instances as application/dicom)",
        )
    if info.precision is not None:
        allocated = 8 if info.precision <= 8 else 16
        for keyword, value in (
            ("BitsAllocated", allocated),
            ("BitsStored", info.precision),
            ("HighBit", info.precision - 1),
            ("PixelRepresentation", 0),
        ):
            if ds.get(keyword) in (None, ""):
                setattr(ds, keyword, value)
    if info.photometric and ds.get("PhotometricInterpretation") in (None, ""):
        ds.PhotometricInterpretation = info.photometric
    if (ds.get("SamplesPerPixel") or 1) > 1 and ds.get("PlanarConfiguration") in (None, ""):
        ds.PlanarConfiguration = 0
    if info.frames is not None and frames in (None, ""):
        ds.NumberOfFrames = info.frames
        if info.frame_time_ms is not None and ds.get("FrameTime") in (None, ""):
            ds.FrameTime = round(info.frame_time_ms, 4)
        if "FrameIncrementPointer" not in ds:
            ds.FrameIncrementPointer = Tag("FrameTime")


# ---------------------------------------------------------------------------- encoding
def _element_header(tag: int, vr: str, length: int) -> bytes:
    if vr in _LONG_VRS:
        return struct.pack("<HH2s2xI", tag >> 16, tag & 0xFFFF, vr.encode(), length)
    if length > 0xFFFF:
        raise InstanceError(
            CANNOT_UNDERSTAND, f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {vr} too long"
        )
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), length)


def _pad_byte(vr: str) -> bytes:
    return b" " if vr in _TEXT_VRS else b"\x00"


def _write_native(out: Output, tag: int, vr: str, part: BulkPart) -> None:
    odd = part.size % 2
    out.write(_element_header(tag, vr, part.size + odd))
    for chunk in part.chunks():
        out.write(chunk)
    if odd:
        out.write(_pad_byte(vr))


def _write_encapsulated(out: Output, part: BulkPart, single_frame: bool) -> None:
    """PS3.5 A.4: undefined-length OB, an empty Basic Offset Table item, the stream in
    fragments (one for a single frame; at most MAX_FRAGMENT each for video), delimiter."""
    out.write(struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OB", 0xFFFFFFFF))
    out.write(struct.pack("<HHI", 0xFFFE, 0xE000, 0))
    if part.size == 0:
        raise InstanceError(CANNOT_UNDERSTAND, "empty compressed Pixel Data part")
    fragment = part.size if single_frame else MAX_FRAGMENT
    if fragment > 0xFFFFFFFE:
        raise InstanceError(CANNOT_UNDERSTAND, "one compressed frame larger than 4 GiB")
    left = part.size
    chunks = part.chunks()
    pending = b""
    while left > 0:
        size = min(fragment, left)
        odd = size % 2
        out.write(struct.pack("<HHI", 0xFFFE, 0xE000, size + odd))
        need = size
        while need > 0:
            if not pending:
                pending = next(chunks)
            piece, pending = pending[:need], pending[need:]
            out.write(piece)
            need -= len(piece)
        if odd:
            out.write(b"\x00")
        left -= size
    out.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))


def build_part10(
    metadata: Mapping[str, Any], parts: Mapping[str, BulkPart], out: Output
) -> BuiltInstance:
    """Encode the instance described by one DICOM JSON object (PS3.18 F.2) whose BulkDataURI
    values name parts of the request by Content-Location, into *out* as a Part 10 file."""
    if not isinstance(metadata, Mapping):
        raise InstanceError(CANNOT_UNDERSTAND, "metadata item is not a DICOM JSON object")
    rest: dict[str, Any] = {}
    streamed: dict[int, tuple[str, BulkPart]] = {}
    for key, element in metadata.items():
        try:
            tag = int(key, 16)
        except ValueError:
            raise InstanceError(CANNOT_UNDERSTAND, f"metadata key {key!r} is not a tag") from None
        if tag >> 16 == 0x0002:
            continue  # File Meta Information is ours to write
        if isinstance(element, dict) and "BulkDataURI" in element:
            uri, vr = element["BulkDataURI"], element.get("vr")
            part = parts.get(uri) if isinstance(uri, str) else None
            if part is None:
                raise InstanceError(
                    CANNOT_UNDERSTAND, f"BulkDataURI {uri!r} of {key} names no part of the request"
                )
            if not isinstance(vr, str):
                raise InstanceError(CANNOT_UNDERSTAND, f"{key} has no VR")
            streamed[tag] = (vr, part)
            continue
        rest[key] = element

    def nested_bulk(tag: str, vr: str, uri: str) -> Any:
        part = parts.get(uri)
        if part is None:
            raise InstanceError(CANNOT_UNDERSTAND, f"BulkDataURI {uri!r} names no part")
        if part.size > NESTED_BULK_LIMIT:
            raise InstanceError(
                CANNOT_UNDERSTAND, f"bulk data in a sequence over {NESTED_BULK_LIMIT}"
            )
        raw = part.read_all()
        if vr in _BINARY_VRS:
            return raw
        element = RawDataElement(Tag(int(tag, 16)), vr, len(raw), raw, 0, False, True)
        return convert_value(vr, element, charset)

    charset = json_values(metadata.get("00080005"))
    try:
        ds = Dataset.from_json(rest, nested_bulk)
    except InstanceError:
        raise
    except Exception as exc:
        raise InstanceError(CANNOT_UNDERSTAND, f"invalid DICOM JSON: {exc}") from exc
    sop_class = str(ds.get("SOPClassUID") or "")
    sop_uid = str(ds.get("SOPInstanceUID") or "")
    missing = [k for k, v in (("SOPClassUID", sop_class), ("SOPInstanceUID", sop_uid)) if not v]
    if missing:
        raise InstanceError(REQUIRED_ELEMENT_MISSING, f"metadata has no {' or '.join(missing)}")

    transfer_syntax = EXPLICIT_VR_LITTLE_ENDIAN
    encapsulated: BulkPart | None = None
    if PIXEL_DATA in streamed:
        part = streamed[PIXEL_DATA][1]
        info = stream_info(part)
        transfer_syntax = info.transfer_syntax or EXPLICIT_VR_LITTLE_ENDIAN
        if part.media_type != OCTET_STREAM:
            encapsulated = part
            _complete_pixel_description(ds, info, part.media_type)

    out.write(encode_file_meta(sop_class, sop_uid, transfer_syntax))
    encodings = ds.get("SpecificCharacterSet")
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    tags = sorted({int(elem.tag) for elem in ds} | set(streamed))
    for tag in tags:
        if tag & 0xFFFF == 0 and tag >> 16 > 6:
            continue  # group lengths are not written (PS3.5 7.2)
        if tag in streamed:
            if buf.tell():
                out.write(buf.getvalue())
                buf = DicomBytesIO()
                buf.is_little_endian, buf.is_implicit_VR = True, False
            vr, part = streamed[tag]
            if tag == PIXEL_DATA and vr not in ("OB", "OW"):
                # "OB or OW" (pydicom writes the dictionary's VR when it was not resolved)
                vr = "OW" if int(ds.get("BitsAllocated") or 8) > 8 else "OB"
            elif vr not in _VALID_VRS:
                raise InstanceError(CANNOT_UNDERSTAND, f"invalid VR {vr!r} of {tag:08X}")
            if tag == PIXEL_DATA and encapsulated is not None:
                _write_encapsulated(out, part, part.media_type in SINGLE_FRAME_MEDIA)
            else:
                _write_native(out, tag, vr, part)
            continue
        try:
            write_data_element(buf, ds.get_item(Tag(tag)), encodings)
        except Exception as exc:
            raise InstanceError(
                CANNOT_UNDERSTAND, f"cannot encode ({tag >> 16:04X},{tag & 0xFFFF:04X}): {exc}"
            ) from exc
    if buf.tell():
        out.write(buf.getvalue())
    return BuiltInstance(sop_class, sop_uid, transfer_syntax)


def json_values(element: Any) -> list[str] | None:
    """The string values of a DICOM JSON element (e.g. Specific Character Set)."""
    if isinstance(element, dict) and isinstance(element.get("Value"), list):
        return [v for v in element["Value"] if isinstance(v, str)] or None
    return None
