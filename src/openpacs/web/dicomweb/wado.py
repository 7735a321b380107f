"""WADO-RS (PS3.18 10.4; seed 002 §3.2.1, Tables 3.1–3.8, 3.10): retrieving studies, series,
instances, metadata, frames, bulk data, rendered images and thumbnails over HTTP.

Owns: the retrieve resources under ``/dicom-web``; reading the Accept header (or the ``accept``
query parameter, which wins, PS3.18 8.3.3.1): media ranges by q-value with their ``type`` and
``transfer-syntax`` parameters; the transfer syntax of each part — the stored one by default and
for ``transfer-syntax=*`` (seed 002 T3.1–T3.3; PS3.18 would default to Explicit VR Little Endian,
which a client gets by asking for it), else transcoded (``dicom.transcode``: Explicit/Implicit VR
Little Endian, JPEG 2000 Lossless, RLE Lossless, JPEG-LS Lossless), decided for every instance
before the first byte is sent, so an impossible request is a 406 that says why, never a cut
stream; multipart/related bodies produced while they are sent (a stored instance is its blob
file byte for byte, read in 1 MiB chunks; a transcoded one is produced frame by frame), so memory
does not grow with a study; DICOM JSON metadata from the header before the pixel data, large
binary values (and the pixel data) as BulkDataURI to our bulkdata resource, gzip when the client
accepts it; frames and pixel data bulk data (``dicom.frames``: the stored codestream under its
media type, PS3.18 Table 8.7.3-2/3, or uncompressed little-endian octet-stream, decoding
compressed and byte-swapping big endian data when needed — the default without an Accept, while
``*/*`` takes compressed frames as stored); rendered
and thumbnail images (``dicom.render``). Statuses: 200; 400 for a malformed UID, frame list,
bulk data path, Accept or rendering parameter; 404 for an unknown study, series, instance, frame
or element; 406 when no acceptable media type/transfer syntax can be produced; 500 with a reason
when stored data cannot be read. Every refusal goes through ``common.problem``.
Written here rather than with a library: no maintained Python WADO-RS server exists; DICOM
decoding/encoding is pydicom's, the HTTP is Starlette's.
Must not: query the index itself (``services.query``) or parse pixel data (``dicom.frames``).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from openpacs.dicom import frames, json_model, render, transcode
from openpacs.dicom.frames import FrameError, FrameReader, StoredPixels
from openpacs.dicom.render import RenderError
from openpacs.dicom.transcode import TranscodeError
from openpacs.services.query import Model, QueryRefused, RetrieveItem
from openpacs.web.dicomweb.common import (
    BULK_DATA_THRESHOLD,
    DICOM_JSON,
    WebContext,
    WebError,
    base_url,
    problem,
)

log = logging.getLogger(__name__)

CHUNK = 1 << 20
BATCH = 4 << 20  # bytes produced per thread-pool hop while streaming
DICOM = "application/dicom"
OCTETS = "application/octet-stream"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
MEDIA_RE = re.compile(r"[a-z0-9!#$&^_.+*-]+/[a-z0-9!#$&^_.+*-]+")
FRAME_LIST_RE = re.compile(r"[0-9]+(,[0-9]+)*")
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
AVAILABLE_TRANSFER_SYNTAX_UID = 0x00083002
ENCAPSULATED_DOCUMENT = 0x00420011

# PS3.18 Table 8.7.3-3/-5: the media type of pixel data (a frame) in each compressed syntax.
MEDIA_BY_PREFIX: tuple[tuple[str, str], ...] = (
    ("1.2.840.10008.1.2.4.5", "image/jpeg"),  # .50–.59 JPEG processes
    ("1.2.840.10008.1.2.4.6", "image/jpeg"),  # .60–.66 retired hierarchical JPEG
    ("1.2.840.10008.1.2.4.70", "image/jpeg"),
    ("1.2.840.10008.1.2.4.80", "image/jls"),
    ("1.2.840.10008.1.2.4.81", "image/jls"),
    ("1.2.840.10008.1.2.4.90", "image/jp2"),
    ("1.2.840.10008.1.2.4.91", "image/jp2"),
    ("1.2.840.10008.1.2.4.92", "image/jpx"),
    ("1.2.840.10008.1.2.4.93", "image/jpx"),
    ("1.2.840.10008.1.2.4.20", "image/jphc"),  # .201–.203 HTJ2K
    ("1.2.840.10008.1.2.4.11", "image/jxl"),  # .110–.112 JPEG XL
    ("1.2.840.10008.1.2.4.100", "video/mpeg2"),
    ("1.2.840.10008.1.2.4.101", "video/mpeg2"),
    ("1.2.840.10008.1.2.4.107", "video/H265"),
    ("1.2.840.10008.1.2.4.108", "video/H265"),
    ("1.2.840.10008.1.2.4.10", "video/mp4"),  # .102–.106 H.264
    ("1.2.840.10008.1.2.5", "image/dicom-rle"),
)
MEDIA_ALIASES = {"image/x-jls": "image/jls", "image/x-dicom-rle": "image/dicom-rle"}
# The syntax a compressed media type means when the client names no transfer-syntax and we must
# encode (PS3.18 Table 8.7.3-3 defaults), among those we can produce.
ENCODE_DEFAULT = {
    "image/jp2": transcode.JPEG_2000_LOSSLESS,
    "image/dicom-rle": transcode.RLE_LOSSLESS,
    "image/jls": transcode.JPEG_LS_LOSSLESS,
}


def media_type_of(transfer_syntax: str) -> str:
    """The media type of a frame stored in *transfer_syntax* (octet-stream when native)."""
    if transfer_syntax in frames.NATIVE_SYNTAXES:
        return OCTETS
    for prefix, media in MEDIA_BY_PREFIX:
        if transfer_syntax.startswith(prefix):
            return media
    return OCTETS  # e.g. Encapsulated Uncompressed (1.2.840.10008.1.2.1.98)


# ------------------------------------------------------------------------------- Accept
@dataclass(frozen=True)
class MediaRange:
    type: str
    params: dict[str, str]
    q: float


def _split(text: str, sep: str) -> list[str]:
    """Split on *sep* outside double quotes."""
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
    out.append("".join(current))
    return out


def parse_accept(text: str) -> list[MediaRange]:
    """The media ranges of an Accept value, best first (q=0 dropped); WebError 400 if malformed."""
    ranges = []
    for raw in _split(text, ","):
        if not raw.strip():
            continue
        pieces = _split(raw, ";")
        mtype = pieces[0].strip().lower()
        if not MEDIA_RE.fullmatch(mtype):
            raise WebError(400, f"malformed media range {raw.strip()!r} in Accept")
        params: dict[str, str] = {}
        for piece in pieces[1:]:
            name, sep, value = piece.partition("=")
            if not sep or not name.strip():
                raise WebError(400, f"malformed parameter {piece.strip()!r} in Accept")
            params[name.strip().lower()] = value.strip().strip('"').strip()
        if "type" in params:
            params["type"] = params["type"].lower()
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            raise WebError(400, f"malformed q-value in Accept: {raw.strip()!r}") from None
        if not 0 <= q <= 1:
            raise WebError(400, f"q-value out of range in Accept: {raw.strip()!r}")
        ts = params.get("transfer-syntax")
        if ts is not None and ts != "*" and not (UID_RE.fullmatch(ts) and len(ts) <= 64):
            raise WebError(400, f"malformed transfer-syntax {ts!r} in Accept")
        if q > 0:
            ranges.append(MediaRange(mtype, params, q))
    ranges.sort(key=lambda r: -r.q)
    return ranges


def accept_of(request: Request) -> list[MediaRange]:
    """The request's acceptable media ranges: the ``accept`` query parameter(s) when present
    (PS3.18 8.3.3.1), else the Accept header; [] means anything."""
    query = request.query_params.getlist("accept")
    text = ",".join(query) if query else request.headers.get("accept", "")
    return parse_accept(text)


# ------------------------------------------------------------------------------- lookups
def _uid(request: Request, name: str, label: str) -> str:
    value = str(request.path_params[name])
    if len(value) > 64 or not UID_RE.fullmatch(value):
        raise WebError(400, f"malformed {label} {value[:80]!r}")
    return value


def _lookup(ctx: WebContext, request: Request, level: str) -> list[RetrieveItem]:
    """The stored instances a study/series/instance resource names (404 when none)."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    identifier.StudyInstanceUID = _uid(request, "study", "Study Instance UID")
    what = f"study {identifier.StudyInstanceUID}"
    if level in ("SERIES", "IMAGE"):
        identifier.SeriesInstanceUID = _uid(request, "series", "Series Instance UID")
        what = f"series {identifier.SeriesInstanceUID} of {what}"
    if level == "IMAGE":
        identifier.SOPInstanceUID = _uid(request, "instance", "SOP Instance UID")
        what = f"instance {identifier.SOPInstanceUID} in {what}"
    items = ctx.query.retrieve_items(Model.STUDY_ROOT, identifier)
    if not items:
        raise WebError(404, f"no {what}")
    if level == "IMAGE":
        return items[-1:]  # duplicates kept (duplicate_policy "keep"): the latest
    return items


def _path(ctx: WebContext, item: RetrieveItem) -> Path:
    path = ctx.archive.blobs.path(item.blob_key)
    if not path.is_file():
        log.error("blob %s of instance %s is missing", item.blob_key, item.sop_uid)
        raise WebError(500, f"the stored file of instance {item.sop_uid} is missing")
    return path


def _pixels(path: Path, item: RetrieveItem, split_frames: bool = True) -> StoredPixels | None:
    try:
        return frames.locate(path, split_frames)
    except FrameError as exc:
        log.error("instance %s: %s", item.sop_uid, exc)
        raise WebError(500, f"the stored instance {item.sop_uid} cannot be read: {exc}") from exc


# ------------------------------------------------------------------------------- multipart
def _boundary() -> str:
    return uuid.uuid4().hex


def _part_head(boundary: str, headers: dict[str, str], first: bool) -> bytes:
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return ("" if first else "\r\n").encode() + f"--{boundary}\r\n{head}\r\n".encode()


def _closing(boundary: str, first: bool) -> bytes:
    return ("" if first else "\r\n").encode() + f"--{boundary}--\r\n".encode()


def multipart(
    boundary: str, parts: Iterable[tuple[dict[str, str], Iterable[bytes]]]
) -> Iterator[bytes]:
    """A multipart/related body (RFC 2387) whose parts are produced as they are sent."""
    first = True
    for headers, body in parts:
        yield _part_head(boundary, headers, first)
        yield from body
        first = False
    yield _closing(boundary, first)


def multipart_length(boundary: str, parts: Iterable[tuple[dict[str, str], int]]) -> int:
    """The length of the body ``multipart`` produces for parts of these sizes."""
    total, first = 0, True
    for headers, size in parts:
        total += len(_part_head(boundary, headers, first)) + size
        first = False
    return total + len(_closing(boundary, first))


def _take(chunks: Iterator[bytes], limit: int) -> list[bytes]:
    """The next pieces of *chunks*, about *limit* bytes of them (in the thread pool)."""
    out: list[bytes] = []
    size = 0
    for piece in chunks:
        out.append(piece)
        size += len(piece)
        if size >= limit:
            break
    return out


async def _batched(chunks: Iterator[bytes], what: str) -> AsyncIterator[bytes]:
    """*chunks* (file reads, transcoding: blocking work) pulled in the thread pool about BATCH
    bytes at a time — one thread hop per batch, not per piece — and sent piece by piece
    without copying. Starlette cancels this when the client goes away; the files close."""
    try:
        while batch := await run_in_threadpool(_take, chunks, BATCH):
            for piece in batch:
                yield piece
    except Exception as exc:  # the status line is sent: all we can do is cut the stream
        log.error("%s: failed after the response started, connection cut: %s", what, exc)
        raise
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            await run_in_threadpool(close)


def _streaming(
    chunks: Iterator[bytes],
    media_type: str,
    what: str,
    length: int | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """A streamed answer; with *length* (every part's size known: stored files) it has a
    Content-Length, else it is sent with chunked transfer coding."""
    headers = dict(headers or {})
    if length is not None:
        headers["Content-Length"] = str(length)
    return StreamingResponse(_batched(chunks, what), media_type=media_type, headers=headers)


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


# ------------------------------------------------------------------------------- DICOM
@dataclass
class Delivery:
    """How one instance goes out: stored bytes (target None) or transcoded to *target*."""

    item: RetrieveItem
    path: Path
    target: str | None
    pixels: StoredPixels | None = None

    @property
    def transfer_syntax(self) -> str:
        return self.target or self.item.transfer_syntax

    def body(self) -> Iterator[bytes]:
        if self.target is None:
            return _file_chunks(self.path)
        return transcode.stream_part10(
            self.path, self.pixels, self.target, self.item.sop_class_uid, self.item.sop_uid
        )


def dicom_choices(ranges: list[MediaRange], instance_level: bool) -> tuple[bool, list[str]]:
    """(multipart, acceptable transfer syntaxes best first, '*' = as stored) for the DICOM
    resources; 406 when the client accepts nothing we send for them."""
    if not ranges:
        return True, ["*"]
    kind: bool | None = None
    choices: list[str] = []
    for r in ranges:
        if r.type in ("*/*", "multipart/*"):
            multi, ts = True, "*"
        elif r.type == "multipart/related":
            if r.params.get("type", DICOM) not in (DICOM, "*/*", "application/*"):
                continue
            multi, ts = True, r.params.get("transfer-syntax", "*")
        elif r.type == DICOM and instance_level:
            multi, ts = False, r.params.get("transfer-syntax", "*")
        else:
            continue
        if kind is None:
            kind = multi
        if multi == kind and ts not in choices:
            choices.append(ts)
    if kind is None:
        raise WebError(
            406,
            'instances are sent as multipart/related; type="application/dicom"'
            + (" (or application/dicom for one instance)" if instance_level else ""),
        )
    return kind, choices


def plan(item: RetrieveItem, path: Path, choices: list[str]) -> Delivery:
    """The first acceptable syntax this instance can be sent in (406 with the reasons if none).
    An instance without pixel data asked for a pixel compression syntax is sent in Explicit VR
    Little Endian (the syntax every origin server must produce, PS3.18 8.7.3.4)."""
    pixels: StoredPixels | None = None
    scanned = False
    reasons = []
    stored = item.transfer_syntax
    for ts in choices:
        if ts in ("*", stored):
            return Delivery(item, path, None)
        if not scanned:
            scanned = True
            try:
                pixels = frames.locate(path)
            except FrameError as exc:
                reasons.append(f"the stored pixel data cannot be read: {exc}")
                break
        why = transcode.refusal(pixels, stored, ts)
        if why is None:
            return Delivery(item, path, ts, pixels)
        if pixels is None and ts in transcode.COMPRESSED_TARGETS:
            return Delivery(item, path, None if stored == EXPLICIT_LE else EXPLICIT_LE, pixels)
        reasons.append(f"{ts}: {why}")
    raise WebError(
        406, f"instance {item.sop_uid} (stored as {stored}) cannot be sent: " + "; ".join(reasons)
    )


def retrieve_dicom(ctx: WebContext, request: Request, level: str) -> Response:
    instance_level = level == "IMAGE"
    multi, choices = dicom_choices(accept_of(request), instance_level)
    items = _lookup(ctx, request, level)
    deliveries = [plan(item, _path(ctx, item), choices) for item in items]
    what = f"WADO-RS {request.url.path}"
    first = _primed(deliveries[0])
    sizes = [d.path.stat().st_size if d.target is None else None for d in deliveries]
    if not multi:
        (d,) = deliveries
        media = f"{DICOM}; transfer-syntax={d.transfer_syntax}"
        return _streaming(first, media, what, sizes[0])
    heads = []
    for d, size in zip(deliveries, sizes, strict=True):
        headers = {"Content-Type": f"{DICOM}; transfer-syntax={d.transfer_syntax}"}
        if size is not None:
            headers["Content-Length"] = str(size)
        heads.append(headers)

    def parts() -> Iterator[tuple[dict[str, str], Iterable[bytes]]]:
        for n, (d, headers) in enumerate(zip(deliveries, heads, strict=True)):
            yield headers, first if n == 0 else d.body()

    boundary = _boundary()
    length = None
    if all(size is not None for size in sizes):  # every part as stored: the length is known
        length = multipart_length(boundary, zip(heads, (s or 0 for s in sizes), strict=True))
    return _streaming(
        multipart(boundary, parts()),
        f'multipart/related; type="{DICOM}"; boundary={boundary}',
        what,
        length,
    )


def _primed(delivery: Delivery) -> Iterator[bytes]:
    """The delivery's body; a transcoded one has its first chunks (File Meta, the header after
    the first frame was decoded) produced now, so that a failure is still a 406 with a reason."""
    body = delivery.body()
    if delivery.target is None:
        return body
    try:
        head = list(itertools.islice(body, 3))
    except TranscodeError as exc:
        raise WebError(406, f"instance {delivery.item.sop_uid}: {exc}") from exc
    return itertools.chain(head, body)


# ------------------------------------------------------------------------------- metadata
def _json_ok(ranges: list[MediaRange]) -> None:
    if not ranges:
        return
    for r in ranges:
        if r.type in (DICOM_JSON, "application/json", "application/*", "*/*"):
            return
    raise WebError(406, "metadata is sent as application/dicom+json only (not DICOM XML)")


def _wants_gzip(request: Request) -> bool:
    """Accept-Encoding names gzip (or *) with a q-value above 0."""
    best: dict[str, float] = {}
    for part in request.headers.get("accept-encoding", "").split(","):
        coding, _, params = part.strip().partition(";")
        q = 1.0
        name, _, value = params.strip().partition("=")
        if name.strip().lower() == "q":
            try:
                q = float(value)
            except ValueError:
                q = 0.0
        if coding.strip():
            best[coding.strip().lower()] = q
    return best.get("gzip", best.get("*", 0.0)) > 0


def _gzip(chunks: Iterable[bytes]) -> Iterator[bytes]:
    z = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: gzip container
    for chunk in chunks:
        out = z.compress(chunk)
        if out:
            yield out
    yield z.flush()


def _vr_of(raw: RawDataElement) -> str:
    if raw.VR:
        return str(raw.VR)
    from pydicom.datadict import dictionary_VR

    try:
        vr = dictionary_VR(raw.tag)
    except KeyError:
        return "UN"
    return "OW" if " or " in vr else vr


def dataset_json(ds: Dataset, uri: Callable[[list[str]], str], path: list[str]) -> dict[str, Any]:
    """PS3.18 F.2 DICOM JSON of *ds*; binary values over BULK_DATA_THRESHOLD bytes (including
    those pydicom deferred and never read) become a BulkDataURI naming their tag path. Written
    over pydicom's per-element ``to_json_dict`` because its data-set version gives the bulk data
    handler no path for elements inside sequences."""
    out: dict[str, Any] = {}
    for tag in sorted(ds.keys()):
        if tag & 0xFFFF == 0:
            continue  # group lengths are not in the JSON model
        key = f"{int(tag):08X}"
        here = [*path, key]
        raw = ds.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
            vr = _vr_of(raw)
            if vr in BULK_VRS:
                out[key] = {"vr": vr, "BulkDataURI": uri(here)}
                continue
        elem = ds[tag]
        if elem.VR == "SQ":
            items = [dataset_json(it, uri, [*here, str(i)]) for i, it in enumerate(elem.value)]
            out[key] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
        elif elem.VR in BULK_VRS and elem.value and len(elem.value) > BULK_DATA_THRESHOLD:
            out[key] = {"vr": elem.VR, "BulkDataURI": uri(here)}
        else:
            out[key] = elem.to_json_dict(None, 0)
    return out


def _read_header(path: Path, item: RetrieveItem, defer: bool = True) -> Dataset:
    try:
        deflated = item.transfer_syntax == frames.DEFLATED
        return dcmread(
            path,
            stop_before_pixels=True,
            defer_size=BULK_DATA_THRESHOLD if defer and not deflated else None,
        )
    except Exception as exc:
        log.error("instance %s: cannot read its header: %s", item.sop_uid, exc)
        raise WebError(500, f"the stored instance {item.sop_uid} cannot be read: {exc}") from exc


def _uid_of(dataset: Mapping[str, Any], key: str) -> str:
    """A UID of the bulk data URIs, as the pydicom path names it ('' when absent or empty)."""
    value = dataset.get(key, {}).get("Value")
    if not value:
        return ""
    if len(value) > 1:
        raise json_model.Unsupported(f"({key}) has {len(value)} values")
    return str(value[0])


def instance_metadata(path: Path, item: RetrieveItem, root: str) -> bytes:
    """One instance's DICOM JSON (encoded), read without its pixel data: encoded from the
    file's bytes (``dicom.json_model``), through pydicom when that declines the file."""

    def base(ds: Mapping[str, Any]) -> str:
        study, series = _uid_of(ds, "0020000D"), _uid_of(ds, "0020000E")
        return f"{root}/studies/{study}/series/{series}/instances/{item.sop_uid}/bulkdata"

    try:
        encoded = json_model.encode_file(
            path, lambda ds, here: f"{base(ds)}/{'/'.join(here)}", BULK_DATA_THRESHOLD
        )
        obj = encoded.dataset
        if encoded.pixels is not None:
            tag = f"{encoded.pixels.tag:08X}"
            vr = "OB" if encoded.pixels.encapsulated else encoded.pixels.vr
            obj[tag] = {"vr": vr, "BulkDataURI": f"{base(obj)}/{tag}"}
    except json_model.Unsupported as exc:
        log.debug("instance %s: metadata through pydicom: %s", item.sop_uid, exc)
        return _pydicom_metadata(path, item, root)
    obj[f"{AVAILABLE_TRANSFER_SYNTAX_UID:08X}"] = {"vr": "UI", "Value": [item.transfer_syntax]}
    return json.dumps(dict(sorted(obj.items())), ensure_ascii=False, separators=(",", ":")).encode()


def _pydicom_metadata(path: Path, item: RetrieveItem, root: str) -> bytes:
    """:func:`instance_metadata` through pydicom (``dcmread`` and ``dataset_json``)."""
    pixels = _pixels(path, item, split_frames=False)
    ds = _read_header(path, item)
    base = (
        f"{root}/studies/{ds.get('StudyInstanceUID', '')}/series/"
        f"{ds.get('SeriesInstanceUID', '')}/instances/{item.sop_uid}/bulkdata"
    )
    obj = dataset_json(ds, lambda here: f"{base}/{'/'.join(here)}", [])
    if pixels is not None:
        vr = "OB" if pixels.encapsulated else pixels.vr
        obj[f"{pixels.tag:08X}"] = {"vr": vr, "BulkDataURI": f"{base}/{pixels.tag:08X}"}
    obj[f"{AVAILABLE_TRANSFER_SYNTAX_UID:08X}"] = {"vr": "UI", "Value": [item.transfer_syntax]}
    return json.dumps(dict(sorted(obj.items())), ensure_ascii=False, separators=(",", ":")).encode()


def retrieve_metadata(ctx: WebContext, request: Request, level: str) -> Response:
    _json_ok(accept_of(request))
    items = _lookup(ctx, request, level)
    root = base_url(request, ctx.config.http.public_url)
    first = instance_metadata(_path(ctx, items[0]), items[0], root)  # errors before the 200

    def body() -> Iterator[bytes]:
        yield b"[" + first
        for item in items[1:]:
            yield b"," + instance_metadata(_path(ctx, item), item, root)
        yield b"]"

    headers = {"Vary": "Accept-Encoding"}
    chunks: Iterator[bytes] = body()
    if _wants_gzip(request):
        headers["Content-Encoding"] = "gzip"
        chunks = _gzip(chunks)
    return _streaming(chunks, DICOM_JSON, f"WADO-RS {request.url.path}", headers=headers)


# ------------------------------------------------------------------------------- frames
@dataclass(frozen=True)
class FrameForm:
    """How frames go out: 'stored' (bytes as stored), 'native' (uncompressed little-endian
    octets) or 'encode' (compressed into *transfer_syntax*); *media* is the part's type."""

    kind: str
    media: str
    transfer_syntax: str

    @property
    def content_type(self) -> str:
        return f"{self.media}; transfer-syntax={self.transfer_syntax}"


def frame_form(ranges: list[MediaRange], pixels: StoredPixels) -> FrameForm:
    """The form frames are sent in (PS3.18 8.7.3.3; default uncompressed octet-stream);
    ``*/*`` and ``transfer-syntax=*`` take them as stored. 406 when nothing acceptable."""
    stored = pixels.transfer_syntax
    stored_media = media_type_of(stored) if pixels.encapsulated else OCTETS
    decodable = transcode.can_decode(stored)
    native = FrameForm("native", OCTETS, EXPLICIT_LE)
    as_stored = FrameForm("stored", stored_media, stored)
    if not pixels.encapsulated and stored not in (EXPLICIT_LE, IMPLICIT_LE):
        # big endian (retired) and deflated frames have no octet-stream form of their own
        # (PS3.18 Table 8.7.3-2): "as stored" is little-endian octets
        as_stored = native
    if not ranges:
        ranges = [MediaRange("multipart/related", {"type": OCTETS}, 1.0)]
    for r in ranges:
        if r.type in ("*/*", "multipart/*"):
            return as_stored
        if r.type != "multipart/related":
            continue
        inner = MEDIA_ALIASES.get(r.params.get("type", OCTETS), r.params.get("type", OCTETS))
        ts = r.params.get("transfer-syntax")
        if inner == "*/*":
            return as_stored
        if inner == OCTETS:
            if ts == "*":
                return as_stored if not pixels.encapsulated else FrameForm("stored", OCTETS, stored)
            if ts in (None, EXPLICIT_LE) and (decodable or not pixels.encapsulated):
                return native
            if ts == stored and not pixels.encapsulated:
                return as_stored
            continue
        if pixels.encapsulated and inner in (stored_media, "image/*") and ts in (None, "*", stored):
            return as_stored
        target = ts or ENCODE_DEFAULT.get(inner)
        if (
            target in transcode.COMPRESSED_TARGETS
            and media_type_of(target) == inner
            and transcode.refusal(pixels, stored, target) is None
        ):
            return FrameForm("encode", inner, target)
    offer = "application/octet-stream (uncompressed)" if decodable else ""
    if pixels.encapsulated:
        offer += (" or " if offer else "") + f"{stored_media}; transfer-syntax={stored} (as stored)"
    raise WebError(406, f"the frames of this instance can be sent as {offer}")


def _frame_numbers(text: str) -> list[int]:
    if not FRAME_LIST_RE.fullmatch(text) or len(text) > 10000:
        raise WebError(400, f"malformed frame list {text[:80]!r} (expected e.g. 1,3,5)")
    numbers = [int(n) for n in text.split(",")]
    if 0 in numbers:
        raise WebError(400, "frame numbers start at 1")
    return numbers


def _frame_body(reader: FrameReader, index: int, form: FrameForm) -> Iterator[bytes]:
    p = reader.pixels
    try:
        if form.kind == "stored" or (
            form.kind == "native" and not p.encapsulated and not p.big_endian
        ):
            if p.encapsulated or p.bits_allocated != 1:
                for span in p.stored_spans(index):
                    yield from reader.chunks(span, CHUNK)
            else:
                yield reader.native_frame(index)
        elif form.kind == "native":
            yield reader.native_frame(index)
        else:
            arr, photometric = reader.decode(index)
            yield transcode.encode_frame(arr, p, photometric, form.transfer_syntax)
    except (FrameError, TranscodeError) as exc:
        raise WebError(406, f"frame {index + 1}: {exc}") from exc


def _instance_pixels(ctx: WebContext, request: Request) -> tuple[RetrieveItem, Path, StoredPixels]:
    (item,) = _lookup(ctx, request, "IMAGE")
    path = _path(ctx, item)
    pixels = _pixels(path, item)
    if pixels is None:
        raise WebError(404, f"instance {item.sop_uid} has no pixel data")
    return item, path, pixels


def _frame_parts(
    path: Path, pixels: StoredPixels, indices: list[int], form: FrameForm
) -> tuple[Iterator[bytes], str]:
    """The parts of a frames response; the first frame is produced before the response starts
    (a decoding failure is then a 406, not a cut stream)."""
    reader = FrameReader(path, pixels)
    try:
        first = b"".join(_frame_body(reader, indices[0], form)) if form.kind != "stored" else None
    except BaseException:
        reader.close()
        raise

    def parts() -> Iterator[tuple[dict[str, str], Iterable[bytes]]]:
        headers = {"Content-Type": form.content_type}
        for n, index in enumerate(indices):
            if n == 0 and first is not None:
                yield headers, [first]
            else:
                yield headers, _frame_body(reader, index, form)

    boundary = _boundary()

    def body() -> Iterator[bytes]:
        with reader:
            yield from multipart(boundary, parts())

    return body(), f'multipart/related; type="{form.media}"; boundary={boundary}'


def retrieve_frames(ctx: WebContext, request: Request) -> Response:
    numbers = _frame_numbers(str(request.path_params["frames"]))
    ranges = accept_of(request)
    item, path, pixels = _instance_pixels(ctx, request)
    for n in numbers:
        if n > pixels.number_of_frames:
            raise WebError(
                404, f"instance {item.sop_uid} has {pixels.number_of_frames} frame(s), not {n}"
            )
    if pixels.is_video:
        raise WebError(406, "frames of a video are not sent one by one; retrieve its bulk data")
    form = frame_form(ranges, pixels)
    body, media_type = _frame_parts(path, pixels, [n - 1 for n in numbers], form)
    return _streaming(body, media_type, f"WADO-RS {request.url.path}")


# ------------------------------------------------------------------------------- bulk data
def _tag_path(text: str) -> list[int]:
    """``7FE00010`` or ``00880200/0/7FE00010``: tags (8 hex digits) and item indexes."""
    segments = [s for s in text.split("/") if s != ""]
    if not segments or len(segments) % 2 == 0 or len(segments) > 33:
        raise WebError(400, f"malformed bulk data path {text[:80]!r}")
    out = []
    for i, seg in enumerate(segments):
        if i % 2 == 0:
            if not re.fullmatch(r"[0-9A-Fa-f]{8}", seg):
                raise WebError(400, f"malformed tag {seg[:20]!r} in bulk data path")
            out.append(int(seg, 16))
        else:
            if not seg.isdigit():
                raise WebError(400, f"malformed item index {seg[:20]!r} in bulk data path")
            out.append(int(seg))
    return out


def _pixel_bulkdata(path: Path, pixels: StoredPixels, ranges: list[MediaRange]) -> Response:
    """Pixel data as bulk data: uncompressed, one part (the whole value); compressed, one part
    per frame (PS3.18 8.7.3.3.2); video, one part (the stream)."""
    if pixels.is_video:
        form = FrameForm("stored", media_type_of(pixels.transfer_syntax), pixels.transfer_syntax)
        if ranges and not any(
            r.type in ("*/*", "multipart/*")
            or (
                r.type == "multipart/related"
                and r.params.get("type") in (form.media, "video/*", "*/*")
            )
            for r in ranges
        ):
            raise WebError(406, f"this video's pixel data is sent as {form.media}")
    else:
        form = frame_form(ranges, pixels)
    whole = form.kind == "native" or (form.kind == "stored" and not pixels.encapsulated)
    if not whole:
        indices = list(range(len(pixels.frames) if pixels.is_video else pixels.number_of_frames))
        body, media_type = _frame_parts(path, pixels, indices, form)
        return _streaming(body, media_type, "WADO-RS bulk data")

    reader = FrameReader(path, pixels)
    decode = form.kind == "native" and (pixels.encapsulated or pixels.big_endian)
    try:  # the first frame decoded before the response starts: a failure is still a 406
        first = _decoded_value_head(reader) if decode else b""
    except FrameError as exc:
        reader.close()
        raise WebError(406, f"the pixel data cannot be decoded: {exc}") from exc

    def value() -> Iterator[bytes]:
        with reader:
            if not decode:
                yield from reader.chunks(pixels.value, CHUNK)
            elif pixels.bits_allocated == 1:  # 1-bit frames are packed back to back
                import numpy as np

                arrays = [reader.decode(i)[0] for i in range(pixels.number_of_frames)]
                yield frames.array_octets(np.stack(arrays), 1)
            else:
                yield first
                for i in range(1, pixels.number_of_frames):
                    yield reader.native_frame(i)

    boundary = _boundary()
    body = multipart(boundary, [({"Content-Type": form.content_type}, value())])
    return _streaming(body, f'multipart/related; type="{form.media}"; boundary={boundary}', "bulk")


def _decoded_value_head(reader: FrameReader) -> bytes:
    """The first frame of a value that is sent decoded (1-bit: checked only, packed later)."""
    if reader.pixels.bits_allocated == 1:
        reader.decode(0)
        return b""
    return reader.native_frame(0)


def retrieve_bulkdata(ctx: WebContext, request: Request) -> Response:
    tags = _tag_path(str(request.path_params["path"]))
    ranges = accept_of(request)
    (item,) = _lookup(ctx, request, "IMAGE")
    path = _path(ctx, item)
    if len(tags) == 1 and tags[0] in frames.PIXEL_KEYWORDS:
        pixels = _pixels(path, item)
        if pixels is None or pixels.tag != tags[0]:
            raise WebError(404, f"instance {item.sop_uid} has no ({tags[0]:08X})")
        return _pixel_bulkdata(path, pixels, ranges)
    ds: Any = _read_header(path, item)
    elem: Any = None
    for i, step in enumerate(tags):
        if i % 2 == 0:
            elem = ds.get(step) if isinstance(ds, Dataset) else None
            if elem is None:
                raise WebError(404, f"no element {step:08X} at {'/'.join(map(str, tags[:i]))}")
        else:
            if elem.VR != "SQ" or step >= len(elem.value):
                raise WebError(404, f"no item {step} in {tags[i - 1]:08X}")
            ds = elem.value[step]
    assert elem is not None
    value = elem.value
    if not isinstance(value, bytes | bytearray):
        raise WebError(404, f"({tags[-1]:08X}) is not a binary (bulk data) element")
    media = OCTETS
    if tags == [ENCAPSULATED_DOCUMENT] and ds.get("MIMETypeOfEncapsulatedDocument"):
        media = str(ds.MIMETypeOfEncapsulatedDocument)
    if ranges and not any(
        r.type in ("*/*", "multipart/*")
        or (
            r.type == "multipart/related" and r.params.get("type", OCTETS) in (media, OCTETS, "*/*")
        )
        for r in ranges
    ):
        raise WebError(406, f"this bulk data is sent as multipart/related; type={media}")
    data = bytes(value)
    if item.transfer_syntax == frames.BIG_ENDIAN:
        data = _little_endian(data, elem.VR)
    boundary = _boundary()
    part_type = media if media != OCTETS else f"{OCTETS}; transfer-syntax={EXPLICIT_LE}"
    body = multipart(boundary, [({"Content-Type": part_type}, [data])])
    return Response(
        b"".join(body), media_type=f'multipart/related; type="{media}"; boundary={boundary}'
    )


def _little_endian(data: bytes, vr: str) -> bytes:
    import numpy as np

    size = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}.get(vr)
    if not size or len(data) % size:
        return data
    return np.frombuffer(data, f">u{size}").astype(f"<u{size}").tobytes()


# ------------------------------------------------------------------------------- rendered
def rendered_media(ranges: list[MediaRange]) -> str:
    if not ranges:
        return "image/jpeg"
    for r in ranges:
        if r.type in ("*/*", "image/*"):
            return "image/jpeg"
        if r.type in render.MEDIA_TYPES:
            return r.type
    raise WebError(406, "rendered images are sent as image/jpeg, image/png or image/gif")


@dataclass(frozen=True)
class RenderRequest:
    media_type: str
    window: render.Window | None
    viewport: render.Viewport | None
    quality: int | None


def render_request(request: Request) -> RenderRequest:
    """PS3.18 8.3.5 parameters (unknown ones, and annotation/charset/iccprofile, are ignored)."""
    q = request.query_params
    try:
        window = render.Window.parse(q["window"]) if "window" in q else None
        viewport = render.Viewport.parse(q["viewport"]) if "viewport" in q else None
        quality = render.parse_quality(q["quality"]) if "quality" in q else None
    except RenderError as exc:
        raise WebError(400, str(exc)) from exc
    return RenderRequest(rendered_media(accept_of(request)), window, viewport, quality)


def _render(
    path: Path,
    item: RetrieveItem,
    pixels: StoredPixels,
    index: int,
    params: RenderRequest,
    fit: int | None,
) -> Response:
    if pixels.is_video:
        raise WebError(406, f"instance {item.sop_uid} is a video; it is not rendered as an image")
    try:
        with FrameReader(path, pixels) as reader:
            arr, photometric = reader.decode(index)
    except FrameError as exc:
        raise WebError(406, f"instance {item.sop_uid} cannot be rendered: {exc}") from exc
    ds = render.frame_attributes(_read_header(path, item, defer=False), index)
    try:
        data = render.render(
            arr,
            ds,
            photometric,
            pixels.bits_stored,
            media_type=params.media_type,
            window=params.window,
            viewport=params.viewport,
            quality=params.quality,
            fit=fit,
        )
    except RenderError as exc:
        raise WebError(406, f"instance {item.sop_uid} cannot be rendered: {exc}") from exc
    return Response(data, media_type=params.media_type)


def retrieve_rendered(ctx: WebContext, request: Request, thumbnail: bool) -> Response:
    params = render_request(request)
    numbers = None
    if "frames" in request.path_params:
        numbers = _frame_numbers(str(request.path_params["frames"]))
        if len(numbers) != 1:
            raise WebError(400, "one frame is rendered at a time")
    (item,) = _lookup(ctx, request, "IMAGE")
    path = _path(ctx, item)
    pixels = _pixels(path, item)
    if pixels is None:
        raise WebError(
            406, f"instance {item.sop_uid} has no pixel data; it has no {params.media_type} form"
        )
    if numbers is not None:
        if numbers[0] > pixels.number_of_frames:
            raise WebError(404, f"instance {item.sop_uid} has {pixels.number_of_frames} frame(s)")
        index = numbers[0] - 1
    else:
        index = pixels.number_of_frames // 2 if thumbnail else 0
    return _render(path, item, pixels, index, params, render.THUMBNAIL_SIZE if thumbnail else None)


def retrieve_thumbnail_of(ctx: WebContext, request: Request, level: str) -> Response:
    """A study's or series' thumbnail: its middle image (the nearest instance with pixel data)."""
    params = render_request(request)
    items = _lookup(ctx, request, level)
    middle = len(items) // 2
    order = sorted(range(len(items)), key=lambda i: abs(i - middle))[:50]
    for i in order:
        item = items[i]
        path = _path(ctx, item)
        pixels = _pixels(path, item)
        if pixels is not None and not pixels.is_video:
            index = pixels.number_of_frames // 2
            return _render(path, item, pixels, index, params, render.THUMBNAIL_SIZE)
    raise WebError(406, f"this {level.lower()} has no image to make a thumbnail of")


# ------------------------------------------------------------------------------- routes
def routes(ctx: WebContext) -> list[BaseRoute]:
    def handler(fn: Callable[[Request], Response]) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:  # sync: Starlette runs it in its threadpool
            try:
                return fn(request)
            except WebError as exc:
                return problem(request, exc.status, exc.reason, exc.headers)
            except QueryRefused as exc:
                return problem(request, 400, exc.comment)
            except Exception as exc:
                log.exception("WADO-RS %s failed", request.url.path)
                return problem(request, 500, f"internal error: {type(exc).__name__}: {exc}")

        return endpoint

    study = "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{instance}"
    frames_ = instance + "/frames/{frames}"

    def get(path: str, fn: Callable[[Request], Response]) -> Route:
        return Route(path, handler(fn), methods=["GET"])

    return [
        get(study, lambda r: retrieve_dicom(ctx, r, "STUDY")),
        get(series, lambda r: retrieve_dicom(ctx, r, "SERIES")),
        get(instance, lambda r: retrieve_dicom(ctx, r, "IMAGE")),
        get(study + "/metadata", lambda r: retrieve_metadata(ctx, r, "STUDY")),
        get(series + "/metadata", lambda r: retrieve_metadata(ctx, r, "SERIES")),
        get(instance + "/metadata", lambda r: retrieve_metadata(ctx, r, "IMAGE")),
        get(frames_, lambda r: retrieve_frames(ctx, r)),
        get(instance + "/bulkdata/{path:path}", lambda r: retrieve_bulkdata(ctx, r)),
        get(instance + "/rendered", lambda r: retrieve_rendered(ctx, r, thumbnail=False)),
        get(frames_ + "/rendered", lambda r: retrieve_rendered(ctx, r, thumbnail=False)),
        get(instance + "/thumbnail", lambda r: retrieve_rendered(ctx, r, thumbnail=True)),
        get(frames_ + "/thumbnail", lambda r: retrieve_rendered(ctx, r, thumbnail=True)),
        get(series + "/thumbnail", lambda r: retrieve_thumbnail_of(ctx, r, "SERIES")),
        get(study + "/thumbnail", lambda r: retrieve_thumbnail_of(ctx, r, "STUDY")),
    ]
