"""Changing the transfer syntax of a stored instance, for peers that do not accept the stored one.

Owns: decoding a stored Part 10 file with pydicom (compressed pixel data through pydicom's
pixel data decoders: pylibjpeg for JPEG/JPEG-LS/JPEG 2000/RLE) and re-encoding it — whole, in
Explicit or Implicit VR Little Endian, for C-MOVE/C-GET peers (``transcode_file``); and frame by
frame, as a Part 10 stream, for WADO-RS (``stream_part10``): Explicit/Implicit VR Little Endian,
and with pydicom's encoders JPEG 2000 Lossless (seed 002 T3.8), RLE Lossless and, when pyjpegls
is installed, JPEG-LS Lossless — at any image size: frames too small for the installed encoders
(JPEG 2000 under 32 pixels a side, tiny JPEG-LS images) still go through pydicom's encoding
pipeline, with our plugin function calling openjpeg (as carried by Pillow, with fewer resolution
levels) or CharLS (with room for its markers). The stream holds one frame at a time, and native
little-endian pixel data is copied in chunks without decoding, so a multi-gigabyte instance is
never in memory.
Which transcodings are possible for an instance is answered before anything is sent
(``refusal``), so an HTTP client gets a 406 instead of a cut stream. Lossy targets are not
produced: an archive does not degrade what it keeps.
Must not: touch the blob store or the network.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID

from openpacs.dicom import frames
from openpacs.dicom.frames import FrameError, FrameReader, StoredPixels
from openpacs.dicom.part10 import encode_file_meta
from openpacs.dicom.transfer_syntaxes import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)

UNCOMPRESSED = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN)
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
# Encapsulated targets, in the order we document them (seed 002 T3.8 first).
COMPRESSED_TARGETS = (JPEG_2000_LOSSLESS, RLE_LOSSLESS, JPEG_LS_LOSSLESS)
EXTENDED_OFFSET_TABLES = (frames.EXTENDED_OFFSET_TABLE, frames.EXTENDED_OFFSET_TABLE_LENGTHS)
CHUNK = 1 << 20
# Limits of the installed encoders beyond PS3.5's profiles, measured: pylibjpeg-openjpeg takes
# 1–24 bits. It always asks openjpeg for six resolution levels, which needs 32 pixels a side, and
# pyjpegls gives CharLS a destination of twice the raw size, too small for the markers of an
# image of a few pixels: smaller images go through ``_encode_small`` instead (any size).
MAX_BITS_STORED = {JPEG_2000_LOSSLESS: 24}
SMALL_SIDE = {JPEG_2000_LOSSLESS: 32}  # below this, openjpeg through Pillow (fewer resolutions)
SMALL_BYTES = {JPEG_LS_LOSSLESS: 4096}  # below this, CharLS with a padded source


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


# ---------------------------------------------------------------------------- capabilities
def producible() -> tuple[str, ...]:
    """The transfer syntaxes we can encode into (compressed ones when their encoder is here)."""
    from pydicom.pixels import get_encoder

    return UNCOMPRESSED + tuple(
        t for t in COMPRESSED_TARGETS if frames.usable_plugins(get_encoder(t).available_plugins)
    )


def can_decode(transfer_syntax: str) -> bool:
    """Whether pixel data stored in *transfer_syntax* can be decoded here."""
    if transfer_syntax in frames.NATIVE_SYNTAXES:
        return True
    from pydicom.pixels import get_decoder

    try:
        return bool(frames.usable_plugins(get_decoder(transfer_syntax).available_plugins))
    except NotImplementedError:
        return False


def is_lossy(transfer_syntax: str) -> bool:
    """Lossy pixel encodings among the standard transfer syntaxes (PS3.5 8.2, 10)."""
    return transfer_syntax in {
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.93",
        "1.2.840.10008.1.2.4.203",
        "1.2.840.10008.1.2.4.111",
        "1.2.840.10008.1.2.4.112",
    } or transfer_syntax.startswith(frames.VIDEO_PREFIXES)


def decoded_photometric(pixels: StoredPixels) -> str:
    """The photometric interpretation of decoded frames (pydicom converts YCbCr to RGB)."""
    if pixels.photometric.startswith("YBR") and pixels.photometric != "YBR_PARTIAL_420":
        return "RGB"
    return pixels.photometric


def needs_decoding(pixels: StoredPixels) -> bool:
    return pixels.encapsulated or pixels.big_endian


def refusal(pixels: StoredPixels | None, stored: str, target: str) -> str | None:
    """Why the instance cannot be delivered in *target* (None: it can). *pixels* is None for an
    instance without pixel data; compressed targets then do not apply (the caller decides)."""
    if target == stored:
        return None
    if target not in producible():
        return f"openpacs cannot encode transfer syntax {target}"
    if pixels is None:
        return None if target in UNCOMPRESSED else "the instance has no pixel data to compress"
    if pixels.is_video:
        return f"video ({stored}) is not transcoded"
    if needs_decoding(pixels) and not can_decode(stored):
        return f"no decoder for the stored transfer syntax {stored}"
    if target in UNCOMPRESSED:
        return None
    if pixels.tag != frames.PIXEL_DATA:
        return "float pixel data cannot be compressed"
    from pydicom.pixels.encoders.base import ENCODING_PROFILES

    photometric = decoded_photometric(pixels)
    if pixels.bits_stored > MAX_BITS_STORED.get(target, 64):
        return f"{UID(target).name} is encoded here for at most {MAX_BITS_STORED[target]} bits"
    if _is_small(pixels, target) and target == JPEG_2000_LOSSLESS and not _pillow_j2k():
        return f"{UID(target).name} needs Pillow with openjpeg for images under 32 pixels a side"
    if _is_small(pixels, target) and (
        pixels.bits_stored > 16 or (pixels.samples_per_pixel > 1 and pixels.bits_stored > 8)
    ):
        return (
            f"{UID(target).name} is encoded here for images under 32 pixels a side only with "
            "up to 16 bits (grey) or 8 bits (colour)"
        )
    for pi, spp, reps, allocated, stored_bits in ENCODING_PROFILES.get(UID(target), []):
        if (
            pi == photometric
            and spp == pixels.samples_per_pixel
            and pixels.pixel_representation in reps
            and pixels.bits_allocated in allocated
            and pixels.bits_stored in stored_bits
        ):
            return None
    return (
        f"{UID(target).name} cannot hold {photometric} with {pixels.samples_per_pixel} "
        f"sample(s) of {pixels.bits_stored}/{pixels.bits_allocated} bits"
    )


# ---------------------------------------------------------------------------- encoding frames
def encode_frame(arr: Any, pixels: StoredPixels, photometric: str, target: str) -> bytes:
    """One decoded frame encoded in the compressed *target* syntax (pydicom's encoders)."""
    from pydicom.pixels import get_encoder

    options: dict[str, Any] = {
        "rows": pixels.rows,
        "columns": pixels.columns,
        "number_of_frames": 1,
        "samples_per_pixel": pixels.samples_per_pixel,
        "bits_allocated": pixels.bits_allocated,
        "bits_stored": pixels.bits_stored,
        "pixel_representation": pixels.pixel_representation,
        "photometric_interpretation": photometric,
        "planar_configuration": 0,
    }
    try:
        if _is_small(pixels, target):
            return _encode_small(arr, target, options)
        encoder = get_encoder(target)
        plugins = frames.usable_plugins(encoder.available_plugins)
        if not plugins:
            raise TranscodeError(f"no usable encoder for {target}")
        return bytes(encoder.encode(arr, encoding_plugin=plugins[0], **options))
    except TranscodeError:
        raise
    except Exception as exc:
        raise TranscodeError(f"cannot encode a frame as {target}: {exc}") from exc


def _pillow_j2k() -> bool:
    from PIL import features

    return bool(features.check_codec("jpg_2000"))


def _is_small(pixels: StoredPixels, target: str) -> bool:
    raw = pixels.rows * pixels.columns * pixels.samples_per_pixel * -(-pixels.bits_stored // 8)
    return min(pixels.rows, pixels.columns) < SMALL_SIDE.get(target, 0) or raw < SMALL_BYTES.get(
        target, 0
    )


def _encode_small(arr: Any, target: str, options: dict[str, Any]) -> bytes:
    """One small frame through pydicom's encoding pipeline (validation against the PS3.5
    profile, the frame's bytes sized for Bits Stored) with our own plugin function in place of
    the installed one, which cannot take images that small."""
    from pydicom.pixels.encoders.base import EncodeRunner

    runner = EncodeRunner(UID(target))
    runner.set_source(arr)
    runner.set_options(**options)
    plugin = _small_j2k if target == JPEG_2000_LOSSLESS else _small_jls
    runner.set_encoders({"openpacs": plugin})
    runner.validate()
    return bytes(runner.encode(None))


def _small_jls(src: bytes, runner: object) -> bytes:
    """JPEG-LS lossless with CharLS (pyjpegls), the source padded so that the destination it
    allocates (twice the source) holds the markers; CharLS reads only rows×columns samples."""
    import _CharLS  # pyjpegls' extension module

    r: Any = runner
    interleave = 0 if r.samples_per_pixel == 1 else 2  # planar configuration 0: by pixel
    padded = src + b"\0" * max(0, 1024 - len(src))
    return bytes(
        _CharLS._encode(
            padded, 0, interleave, r.rows, r.columns, r.samples_per_pixel, r.bits_stored
        )
    )


def _small_j2k(src: bytes, runner: object) -> bytes:
    """JPEG 2000 lossless (reversible 5-3, one layer, no MCT: as pylibjpeg-openjpeg encodes)
    with the openjpeg that Pillow carries, asked for as many resolution levels as the image
    allows. Pillow codes 8- or 16-bit unsigned samples only; other precisions and signed data
    are coded through an offset, then the SIZ marker is set to the real precision and sign
    (ISO 15444-1 B.5.1): the decoder's DC level shift (G.1.2) undoes the offset exactly."""
    import numpy as np
    from PIL import Image

    r: Any = runner
    precision, signed = int(r.bits_stored), bool(r.pixel_representation)
    container = 8 if precision <= 8 else 16
    dtype = np.dtype(f"<{'i' if signed else 'u'}{container // 8}")
    values = np.frombuffer(src, dtype).astype(np.int64)
    offset = (1 << (container - 1)) - (0 if signed else 1 << (precision - 1))
    coded = (values + offset).astype(np.uint8 if container == 8 else np.uint16)
    size = (int(r.columns), int(r.rows))
    if r.samples_per_pixel == 3:
        if container != 8:
            raise TranscodeError("16-bit colour images under 32 pixels a side are not encoded")
        img = Image.frombytes("RGB", size, coded.tobytes())
    elif container == 8:
        img = Image.frombytes("L", size, coded.tobytes())
    else:
        img = Image.frombytes("I;16", size, coded.tobytes())
    levels = max(1, min(6, min(size).bit_length()))
    buf = io.BytesIO()
    img.save(buf, "JPEG2000", no_jp2=True, irreversible=False, num_resolutions=levels, mct=0)
    return _set_siz_precision(buf.getvalue(), precision, signed)


def _set_siz_precision(codestream: bytes, precision: int, signed: bool) -> bytes:
    """*codestream* with every component's Ssiz (ISO 15444-1 Table A.11) set to *precision*
    bits, signed or not."""
    if codestream[:4] != b"\xff\x4f\xff\x51":
        raise TranscodeError("the JPEG 2000 encoder did not produce a codestream")
    out = bytearray(codestream)
    (components,) = struct.unpack(">H", out[40:42])
    for c in range(components):
        out[42 + 3 * c] = (0x80 if signed else 0) | (precision - 1)
    return bytes(out)


# ---------------------------------------------------------------------------- Part 10 streams
def stream_part10(
    path: Path,
    pixels: StoredPixels | None,
    target: str,
    sop_class_uid: str,
    sop_instance_uid: str,
) -> Iterator[bytes]:
    """The stored instance at *path* as a Part 10 file in *target*, produced piecewise: File Meta,
    the data set before the pixel data (re-encoded by pydicom), then the pixel data a chunk or a
    frame at a time. Elements after the pixel data (trailing padding, signatures) are dropped.
    Call ``refusal`` first; errors here raise TranscodeError (the stream cannot be answered)."""
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise TranscodeError(f"cannot read the stored instance: {exc}") from exc
    source = str(ds.file_meta.TransferSyntaxUID)
    ds.file_meta = None  # type: ignore[assignment]
    implicit = target == IMPLICIT_VR_LITTLE_ENDIAN
    yield encode_file_meta(sop_class_uid, sop_instance_uid, target)
    if pixels is None:
        yield _encode(ds, implicit)
        return
    with FrameReader(path, pixels) as reader:
        try:
            if target in UNCOMPRESSED and not needs_decoding(pixels):
                yield _encode(ds, implicit)
                yield _element_header(pixels.tag, pixels.vr, pixels.value.length, implicit)
                yield from reader.chunks(pixels.value, CHUNK)
                return
            first, photometric = reader.decode(0)
            for tag in EXTENDED_OFFSET_TABLES:
                ds.pop(tag, None)
            ds.PhotometricInterpretation = photometric
            if pixels.samples_per_pixel > 1:
                ds.PlanarConfiguration = 0
            if is_lossy(source) and "LossyImageCompression" not in ds:
                ds.LossyImageCompression = "01"  # PS3.3 C.7.6.1.1.5
            yield _encode(ds, implicit)
            if target in UNCOMPRESSED:
                yield from _native_value(reader, first, implicit)
            else:
                yield from _encapsulated_value(reader, first, photometric, target)
        except FrameError as exc:
            raise TranscodeError(str(exc)) from exc


def _encode(ds: object, implicit: bool) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = implicit
    write_dataset(buf, ds)  # type: ignore[arg-type]
    return buf.getvalue()


def _element_header(tag: int, vr: str, length: int, implicit: bool) -> bytes:
    if implicit:
        return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, length)
    return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode("ascii"), 0, length)


def _native_value(reader: FrameReader, first: object, implicit: bool) -> Iterator[bytes]:
    import numpy as np

    p = reader.pixels
    arrays = (first if i == 0 else reader.decode(i)[0] for i in range(p.number_of_frames))
    vr = {frames.FLOAT_PIXEL_DATA: "OF", frames.DOUBLE_FLOAT_PIXEL_DATA: "OD"}.get(
        p.tag, "OW" if p.bits_allocated > 8 else "OB"
    )
    if p.bits_allocated == 1:  # frames packed back to back: pack them together
        data = frames.array_octets(np.stack(list(arrays)), 1)  # type: ignore[arg-type]
        data += b"\0" * (len(data) % 2)
        yield _element_header(p.tag, vr, len(data), implicit) + data
        return
    samples = p.samples_per_pixel
    frame_length = p.rows * p.columns * samples * p.bits_allocated // 8
    total = frame_length * p.number_of_frames
    yield _element_header(p.tag, vr, total + total % 2, implicit)
    for arr in arrays:
        data = frames.array_octets(arr, p.bits_allocated)  # type: ignore[arg-type]
        if len(data) != frame_length:
            raise TranscodeError(f"a decoded frame has {len(data)} bytes, not {frame_length}")
        yield data
    if total % 2:
        yield b"\0"


def _encapsulated_value(
    reader: FrameReader, first: object, photometric: str, target: str
) -> Iterator[bytes]:
    p = reader.pixels
    item = struct.Struct("<HHI")
    # PS3.5 A.4: OB, undefined length, an empty Basic Offset Table, one fragment per frame.
    yield _element_header(frames.PIXEL_DATA, "OB", 0xFFFFFFFF, False) + item.pack(0xFFFE, 0xE000, 0)
    for i in range(p.number_of_frames):
        arr = first if i == 0 else reader.decode(i)[0]
        data = encode_frame(arr, p, photometric, target)
        data += b"\0" * (len(data) % 2)
        yield item.pack(0xFFFE, 0xE000, len(data)) + data
    yield item.pack(0xFFFE, 0xE0DD, 0)
