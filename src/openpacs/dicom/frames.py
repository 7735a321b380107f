"""The frames of a stored instance: where its pixel data and each frame's bytes are in the file.

Owns: locating the pixel data element of a Part 10 file (``dicom.header``'s scanner over a
memory map, so only element headers are touched) with the Image Pixel attributes a frame needs;
the frame → byte ranges map of native pixel data (fixed-size frames; bit-packed 1-bit frames
that need not start on a byte) and of encapsulated pixel data (PS3.5 A.4: the Extended Offset
Table, else the Basic Offset Table, else one fragment per frame, else frame starts found from
the codestream's start marker — several fragments per frame are allowed); reading a frame's
stored bytes (a compressed frame exactly as stored); and decoding one frame to an array or to
native little-endian octets (PS3.18 8.7.3.3.2 uncompressed bulk data) with pydicom's decoders.
Hand-written rather than ``pydicom.encaps``: pydicom finds frames by reading the fragments
themselves; here only item headers are read (8 bytes each) and a frame is read on its own, so
one frame of a multi-gigabyte instance costs one frame of I/O and memory, and stored bytes can be
streamed in chunks. pydicom remains the decoder (and the test oracle).
Must not: know about HTTP, the index or the blob store's layout.
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from openpacs.dicom import header

PIXEL_DATA = 0x7FE00010
FLOAT_PIXEL_DATA = 0x7FE00008
DOUBLE_FLOAT_PIXEL_DATA = 0x7FE00009
EXTENDED_OFFSET_TABLE = 0x7FE00001
EXTENDED_OFFSET_TABLE_LENGTHS = 0x7FE00002
PIXEL_KEYWORDS = {
    PIXEL_DATA: "PixelData",
    FLOAT_PIXEL_DATA: "FloatPixelData",
    DOUBLE_FLOAT_PIXEL_DATA: "DoubleFloatPixelData",
}
IMAGE_TAGS = frozenset(
    {
        0x00280002,  # Samples per Pixel
        0x00280004,  # Photometric Interpretation
        0x00280006,  # Planar Configuration
        0x00280008,  # Number of Frames
        0x00280010,  # Rows
        0x00280011,  # Columns
        0x00280100,  # Bits Allocated
        0x00280101,  # Bits Stored
        0x00280103,  # Pixel Representation
        EXTENDED_OFFSET_TABLE,
        EXTENDED_OFFSET_TABLE_LENGTHS,
        *PIXEL_KEYWORDS,
    }
)

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
NATIVE_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2",  # Implicit VR Little Endian
        EXPLICIT_VR_LITTLE_ENDIAN,
        "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian (inflated by the scan)
        "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
    }
)
BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
# Video: the frames are one stream and cannot be served one by one (PS3.5 8.2.5–8.2.8).
VIDEO_PREFIXES = ("1.2.840.10008.1.2.4.10",)

_ITEM = 0xE000FFFE  # (FFFE,E000) read as one little-endian uint32
_SEQUENCE_DELIMITER = 0xE0DDFFFE
_ITEM_HEADER = struct.Struct("<II")
# Codestream signatures a frame's first fragment starts with (PS3.5 A.4: JPEG and JPEG-LS SOI,
# the JPEG 2000 SOC+SIZ codestream or JP2 signature box, JPEG XL codestream or container).
_FRAME_STARTS = (
    b"\xff\xd8",
    b"\xff\x4f\xff\x51",
    b"\x00\x00\x00\x0cjP  ",
    b"\xff\x0a",
    b"\x00\x00\x00\x0cJXL ",
)


# pydicom plugins in the order we use them. Never gdcm: on some inputs it aborts the process from
# C++ (``terminate called``) instead of raising, which would take the whole server down.
PLUGIN_ORDER = ("pylibjpeg", "pyjpegls", "pydicom", "pillow")


def usable_plugins(available: tuple[str, ...] | list[str]) -> list[str]:
    return [p for p in PLUGIN_ORDER if p in available]


class FrameError(Exception):
    """The stored pixel data cannot be split into frames or a frame cannot be read/decoded."""


@dataclass(frozen=True)
class Span:
    """A byte range of the source (the file, or the inflated data set for Deflated)."""

    offset: int
    length: int


@dataclass
class StoredPixels:
    """Where an instance's pixel data is and how it is laid out."""

    transfer_syntax: str
    tag: int
    vr: str  # as stored (implicit VR: OW above 8 bits allocated, else OB)
    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    planar_configuration: int
    photometric: str
    number_of_frames: int
    value: Span  # the element's value (encapsulated: from the Basic Offset Table item on)
    encapsulated: bool
    frames: list[list[Span]] = field(default_factory=list)  # encapsulated: fragments per frame
    data: bytes | None = None  # Deflated: the inflated data set (spans are offsets in it)

    @property
    def keyword(self) -> str:
        return PIXEL_KEYWORDS[self.tag]

    @property
    def big_endian(self) -> bool:
        return self.transfer_syntax == BIG_ENDIAN

    @property
    def is_video(self) -> bool:
        return self.transfer_syntax.startswith(VIDEO_PREFIXES)

    @property
    def native_frame_bits(self) -> int:
        """Bits of one native frame (YBR_FULL_422 stores two samples per pixel, PS3.3 C.7.6.3)."""
        samples = 2 if self.photometric == "YBR_FULL_422" else self.samples_per_pixel
        return self.rows * self.columns * samples * self.bits_allocated

    def check_frame(self, number: int) -> None:
        """Raise IndexError unless 1 <= number <= number_of_frames."""
        if not 1 <= number <= self.number_of_frames:
            raise IndexError(f"frame {number} of {self.number_of_frames}")

    def stored_spans(self, index: int) -> list[Span]:
        """Byte ranges of frame *index* (0-based) as stored; a 1-bit native frame that does not
        start on a byte boundary is returned as the bytes that hold it (see native_frame)."""
        if self.encapsulated:
            return self.frames[index]
        bits = self.native_frame_bits
        first, end = (index * bits) // 8, -(-((index + 1) * bits) // 8)
        if end > self.value.length:
            raise FrameError(
                f"frame {index + 1} runs past the end of the stored pixel data "
                f"({self.value.length} bytes)"
            )
        return [Span(self.value.offset + first, end - first)]

    def pixel_options(self) -> dict[str, Any]:
        """Decoding options for one frame (pydicom's pixel data decoders)."""
        opts: dict[str, Any] = {
            "rows": self.rows,
            "columns": self.columns,
            "samples_per_pixel": self.samples_per_pixel,
            "bits_allocated": self.bits_allocated,
            "bits_stored": self.bits_stored,
            "pixel_representation": self.pixel_representation,
            "photometric_interpretation": self.photometric,
            "number_of_frames": 1,
            "pixel_keyword": self.keyword,
        }
        if self.samples_per_pixel > 1:
            opts["planar_configuration"] = self.planar_configuration
        if not self.encapsulated:
            opts["pixel_vr"] = self.vr
        return opts


# ------------------------------------------------------------------------------------ locate
def locate(path: Path, split_frames: bool = True) -> StoredPixels | None:
    """The pixel data of the Part 10 file at *path* (None when it has none). Raises FrameError
    when the file cannot be scanned or (with *split_frames*) its encapsulated pixel data cannot
    be split into frames. Video is one stream: all its fragments are one "frame"."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise FrameError(f"{path.name} is empty")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            try:
                meta, scanned = header.scan_part10(mm, IMAGE_TAGS)
            except header.DatasetFormatError as exc:
                raise FrameError(f"cannot scan the stored instance: {exc}") from exc
            try:
                return _layout(meta.transfer_syntax, scanned, fh.fileno(), split_frames)
            finally:
                del scanned  # holds a view of the map


def _layout(
    ts: str, scanned: header.ScannedHeader, fd: int, split_frames: bool
) -> StoredPixels | None:
    if scanned.pixel_data is None:
        return None
    tag = next((t for t in PIXEL_KEYWORDS if scanned.has(t)), PIXEL_DATA)
    element, length = scanned.pixel_data

    def number(t: int, default: int) -> int:
        value = scanned.int_value(t)
        return default if value is None else value

    bits_allocated = number(0x00280100, 8)
    explicit = not scanned.implicit_vr
    vr = scanned.vr(tag) or ""
    if not explicit or vr in ("", "UN") or " or " in vr:
        vr = {FLOAT_PIXEL_DATA: "OF", DOUBLE_FLOAT_PIXEL_DATA: "OD"}.get(
            tag, "OW" if bits_allocated > 8 else "OB"
        )
    value_offset = element + (12 if explicit else 8)
    data = None
    if ts == DEFLATED:
        data = bytes(scanned.buffer)
    pixels = StoredPixels(
        transfer_syntax=ts,
        tag=tag,
        vr=vr,
        rows=number(0x00280010, 0),
        columns=number(0x00280011, 0),
        samples_per_pixel=number(0x00280002, 1),
        bits_allocated=bits_allocated,
        bits_stored=number(0x00280101, bits_allocated),
        pixel_representation=number(0x00280103, 0),
        planar_configuration=number(0x00280006, 0),
        photometric=(scanned.text(0x00280004) or "MONOCHROME2").strip().upper(),
        number_of_frames=max(number(0x00280008, 1), 1),
        value=Span(value_offset, length or 0),
        encapsulated=length is None,
        data=data,
    )
    if pixels.rows <= 0 or pixels.columns <= 0:
        raise FrameError("the pixel data has no Rows/Columns")
    if pixels.encapsulated and pixels.is_video:
        pixels.frames = [parse_items(_reader(fd, data), value_offset)[1]]
    elif pixels.encapsulated and split_frames:
        read = _reader(fd, data)
        eot = None
        if scanned.has(EXTENDED_OFFSET_TABLE) and scanned.has(EXTENDED_OFFSET_TABLE_LENGTHS):
            eot = _u64s(scanned.raw_value(EXTENDED_OFFSET_TABLE) or b"")
        pixels.frames = _encapsulated_frames(read, value_offset, pixels.number_of_frames, eot)
    elif pixels.bits_allocated % 8 and pixels.bits_allocated != 1:
        raise FrameError(f"Bits Allocated {pixels.bits_allocated} is not supported")
    return pixels


def _u64s(raw: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(raw) // 8}Q", raw[: len(raw) // 8 * 8]))


def _reader(fd: int, data: bytes | None) -> Any:
    if data is not None:
        return lambda offset, n: data[offset : offset + n]
    return lambda offset, n: os.pread(fd, n, offset)


def parse_items(read: Any, start: int) -> tuple[bytes, list[Span]]:
    """The Basic Offset Table value and the fragments (value spans) of encapsulated pixel data
    whose value starts at *start* (PS3.5 A.4), reading only item headers."""
    bot_header = read(start, 8)
    if len(bot_header) < 8:
        raise FrameError("encapsulated pixel data is truncated")
    tag, length = _ITEM_HEADER.unpack(bot_header)
    if tag != _ITEM:
        raise FrameError("encapsulated pixel data does not start with a Basic Offset Table item")
    bot = read(start + 8, length) if length else b""
    offset = start + 8 + length
    fragments: list[Span] = []
    while True:
        raw = read(offset, 8)
        if len(raw) < 8:
            raise FrameError("encapsulated pixel data has no sequence delimiter")
        tag, length = _ITEM_HEADER.unpack(raw)
        if tag == _SEQUENCE_DELIMITER:
            return bot, fragments
        if tag != _ITEM or length == 0xFFFFFFFF:
            raise FrameError(f"unexpected item tag {tag:#010x} in encapsulated pixel data")
        fragments.append(Span(offset + 8, length))
        offset += 8 + length


def _encapsulated_frames(
    read: Any, start: int, n_frames: int, eot: list[int] | None
) -> list[list[Span]]:
    bot_raw, fragments = parse_items(read, start)
    if not fragments:
        raise FrameError("encapsulated pixel data has no fragments")
    first_item = fragments[0].offset - 8
    # Offsets (relative to the first fragment's item tag) of each frame's first fragment.
    for offsets in (eot, list(struct.unpack(f"<{len(bot_raw) // 4}I", bot_raw))):
        if offsets and len(offsets) == n_frames and _valid_offsets(offsets):
            return _split(fragments, [first_item + o for o in offsets])
    if n_frames == 1:
        return [fragments]
    if len(fragments) == n_frames:
        return [[f] for f in fragments]
    starts = [f.offset - 8 for f in fragments if _starts_frame(read(f.offset, 12))]
    if len(starts) == n_frames and starts[0] == first_item:
        return _split(fragments, starts)
    raise FrameError(
        f"cannot tell where the {n_frames} frames begin among {len(fragments)} fragments "
        "(no offset table)"
    )


def _valid_offsets(offsets: list[int]) -> bool:
    return offsets[0] == 0 and all(a < b for a, b in itertools.pairwise(offsets))


def _starts_frame(head: bytes) -> bool:
    return any(head.startswith(sig) for sig in _FRAME_STARTS)


def _split(fragments: list[Span], starts: list[int]) -> list[list[Span]]:
    frames: list[list[Span]] = [[] for _ in starts]
    index = 0
    for frag in fragments:
        item = frag.offset - 8
        while index + 1 < len(starts) and item >= starts[index + 1]:
            index += 1
        frames[index].append(frag)
    if any(not f for f in frames):
        raise FrameError("the offset table names a frame that has no fragment")
    return frames


# ------------------------------------------------------------------------------------ reading
class FrameReader:
    """Reads frames of one stored instance (open file, or the inflated data set)."""

    def __init__(self, path: Path, pixels: StoredPixels) -> None:
        self.pixels = pixels
        self._fh = open(path, "rb")  # noqa: SIM115 - closed by close()/__exit__
        self._read = _reader(self._fh.fileno(), pixels.data)

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._fh.close()

    def read(self, span: Span) -> bytes:
        data: bytes = self._read(span.offset, span.length)
        if len(data) != span.length:
            raise FrameError("the stored file is shorter than its pixel data")
        return data

    def chunks(self, span: Span, chunk: int = 1 << 20) -> Iterator[bytes]:
        """The bytes of *span*, *chunk* bytes at a time."""
        offset, end = span.offset, span.offset + span.length
        while offset < end:
            n = min(chunk, end - offset)
            yield self.read(Span(offset, n))
            offset += n

    def stored_frame(self, index: int) -> bytes:
        """Frame *index* (0-based) as stored: a compressed frame's codestream (its fragments
        joined), or a native frame's bytes (see native_frame for 1-bit and big endian)."""
        p = self.pixels
        if p.encapsulated:
            return b"".join(self.read(s) for s in p.frames[index])
        return self._native_stored(index)

    def _native_stored(self, index: int) -> bytes:
        p = self.pixels
        (span,) = p.stored_spans(index)
        data = self.read(span)
        bits = p.native_frame_bits
        shift = (index * bits) % 8
        if p.bits_allocated == 1 and (shift or bits % 8):
            # PS3.5 8.1.1: 1-bit frames are packed back to back, least significant bit first.
            unpacked = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
            data = np.packbits(unpacked[shift : shift + bits], bitorder="little").tobytes()
        return data

    def decode(self, index: int) -> tuple[np.ndarray, str]:
        """Frame *index* decoded (YCbCr converted to RGB as pydicom does) and the photometric
        interpretation of the result."""
        from pydicom.encaps import encapsulate
        from pydicom.pixels import get_decoder

        p = self.pixels
        ts = EXPLICIT_VR_LITTLE_ENDIAN if p.transfer_syntax == DEFLATED else p.transfer_syntax
        try:
            decoder = get_decoder(ts)
        except NotImplementedError as exc:
            raise FrameError(f"no decoder for transfer syntax {ts}") from exc
        if not decoder.is_available:
            raise FrameError(f"the decoder for transfer syntax {ts} is not installed")
        if p.encapsulated:
            src = encapsulate([self.stored_frame(index)])
        else:
            src = self._native_stored(index)
            if p.big_endian and p.vr == "OW" and len(src) % 2:
                # an odd frame of 8-bit OW data: its swapped word ends in the padding byte
                (span,) = p.stored_spans(index)
                src = self.read(Span(span.offset, span.length + 1))
        plugins = usable_plugins(decoder.available_plugins) if decoder.available_plugins else [""]
        if not plugins:
            raise FrameError(f"no usable decoder for transfer syntax {ts}")
        errors = []
        for plugin in plugins:
            try:
                arr, meta = decoder.as_array(src, decoding_plugin=plugin, **p.pixel_options())
                return arr, str(meta.get("photometric_interpretation", p.photometric))
            except Exception as exc:
                errors.append(f"{plugin or 'pydicom'}: {exc}")
        raise FrameError(f"frame {index + 1} cannot be decoded: {'; '.join(errors)}")

    def native_frame(self, index: int) -> bytes:
        """Frame *index* as uncompressed little-endian octets (PS3.18 8.7.3.3.2): stored bytes
        for native little endian, byte-swapped for big endian, decoded for encapsulated."""
        p = self.pixels
        if not p.encapsulated and not p.big_endian:
            return self._native_stored(index)
        arr, _ = self.decode(index)
        return array_octets(arr, p.bits_allocated)


def array_octets(arr: np.ndarray, bits_allocated: int) -> bytes:
    """Native little-endian octets of a decoded array (1-bit data packed again)."""
    if bits_allocated == 1:
        from pydicom.pixels import pack_bits

        return bytes(pack_bits(arr, pad=False))
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
