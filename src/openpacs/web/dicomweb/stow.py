"""STOW-RS, the Studies Store transaction (PS3.18 10.5; seed 002 §3.2.5): ``POST /studies`` and
``POST /studies/{study}`` under ``/dicom-web``.

Owns: reading the request body as a stream (never whole in memory) — ``multipart/related`` with
``application/dicom`` parts (each written straight into a new blob as it arrives, then filed by
``Archive.import_blob``, the one ingest path: blob fsynced and row committed before it counts as
stored), or ``application/dicom+json`` (or PS3.19 ``application/dicom+xml``, read by
``dicom/native_xml.py``) metadata with bulk data parts (spooled to unnamed
temporary files beside the blobs, then built into a Part 10 file by ``dicom/json_instance.py``
and filed the same way), or a single ``application/dicom`` body; the request-level refusals
(400 malformed, 413 over ``[http] max_request_size`` — from Content-Length before reading, or
while counting — 415 unsupported media type); and the Store Instances Response (PS3.18 Annex I:
Retrieve URL, Referenced SOP Sequence, Failed SOP Sequence with Failure Reason) in DICOM JSON
or, when the client prefers it, XML (PS3.19 Native DICOM Model), with the status of PS3.18
Table 10.5.3-1: 200 all stored, 202 some stored, 400/409/503 none stored.
Must not: validate or file data sets itself, or block the event loop (parsing, file writes and
filing run in the thread pool).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from pydicom.datadict import keyword_for_tag
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from openpacs.blobs.files import BlobWriter
from openpacs.dicom import json_instance as ji
from openpacs.dicom import native_xml
from openpacs.dicom.sopclasses import STORAGE_SOP_CLASSES
from openpacs.dicom.transfer_syntaxes import STORAGE_TRANSFER_SYNTAXES
from openpacs.services.archive import StoreResult
from openpacs.web.dicomweb.common import DICOM_JSON, WebContext, base_url, client_of, problem
from openpacs.web.multipart import (
    MediaType,
    MultipartError,
    MultipartReader,
    PartHeaders,
    PartSink,
    parse_media_type,
)

log = logging.getLogger(__name__)

DICOM = "application/dicom"
METADATA_TYPES = frozenset({DICOM_JSON, "application/json"})
XML_TYPES = frozenset({"application/dicom+xml", "application/xml"})
FEED_BYTES = 1 << 20  # body bytes handed to the parsing thread at a time
METADATA_LIMIT = 64 << 20  # one metadata part is parsed in memory
ACCEPTED_TRANSFER_SYNTAXES = frozenset(STORAGE_TRANSFER_SYNTAXES)
MAX_WARNING_HEADERS = 10
PART10_PREFIX = 132  # preamble + "DICM" (PS3.10 7.1)

# Failure Reasons (PS3.18 Table I.2-2) that mean the data could not be parsed: when every
# instance failed for one of these, the request is answered 400 ("bad syntax"), when every one
# was out of resources 503, otherwise 409 (PS3.18 Table 10.5.3-1).
SYNTAX_REASONS = frozenset({ji.CANNOT_UNDERSTAND, ji.REQUIRED_ELEMENT_MISSING})
OUT_OF_RESOURCES = 0xA700


class RequestError(Exception):
    """The request as a whole is refused: HTTP *status* and the reason the client gets."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Outcome:
    """One instance of the request: stored (reason None) or failed with a Failure Reason."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_uid: str | None = None
    series_uid: str | None = None
    reason: int | None = None
    comment: str = ""

    @classmethod
    def of(cls, result: StoreResult) -> Outcome:
        return cls(
            result.sop_class_uid,
            result.sop_instance_uid,
            result.study_instance_uid,
            result.series_instance_uid,
            None if result.ok else result.status.code,
            result.comment or result.status.meaning,
        )


class _InstanceSink:
    """An application/dicom part: written into a new blob as it arrives, filed at its end.

    A file sent without the 128-byte preamble and "DICM" prefix (pydicom, and so
    dicomweb-client, writes File Meta Information without them unless asked) gets them in
    front, so that every stored blob is a conformant Part 10 file; its File Meta Information
    and data set are kept as sent."""

    def __init__(self, session: StoreSession) -> None:
        self.session = session
        self.writer: BlobWriter | None = None
        self.error: OSError | None = None
        self.head: bytearray | None = bytearray()  # the first bytes, until framing is known
        try:
            self.writer = session.ctx.archive.blobs.create()
        except OSError as exc:
            self.error = exc

    def write(self, data: memoryview) -> None:
        if self.writer is None:
            return  # keep reading the body; the failure is reported at the part's end
        try:
            if self.head is not None:
                self.head += data
                if len(self.head) >= PART10_PREFIX:
                    self._write_head()
                return
            self.writer.write(data)
        except OSError as exc:
            self.error = exc
            self.writer.abort()
            self.writer = None

    def _write_head(self) -> None:
        assert self.writer is not None and self.head is not None
        head, self.head = self.head, None
        if head[128:132] != b"DICM":
            if head.startswith(b"DICM"):
                self.writer.write(bytes(128))
            elif head.startswith(b"\x02\x00"):  # group 0002 first: File Meta, no preamble
                self.writer.write(bytes(128) + b"DICM")
        self.writer.write(head)

    def close(self) -> None:
        if self.writer is not None and self.head is not None:
            try:
                self._write_head()
            except OSError as exc:
                self.error = exc
                self.writer.abort()
                self.writer = None
        writer, self.writer = self.writer, None
        if writer is None:
            self.session.out_of_resources(self.error, None)
            return
        self.session.file(writer, None)

    def abort(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.abort()


class _MetadataSink:
    """An application/dicom+json part: a JSON array of instances, parsed at its end."""

    def __init__(self, session: StoreSession, index: int) -> None:
        self.session = session
        self.index = index
        self.data = bytearray()

    def write(self, data: memoryview) -> None:
        self.data += data
        if len(self.data) > METADATA_LIMIT:
            raise RequestError(413, f"metadata part larger than {METADATA_LIMIT} bytes")

    def close(self) -> None:
        try:
            items = json.loads(bytes(self.data))
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"metadata part {self.index + 1} is not JSON: {exc}") from exc
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise RequestError(
                400, f"metadata part {self.index + 1} is not an array of DICOM JSON objects"
            )
        self.session.metadata.extend(items)
        self.data = bytearray()

    def abort(self) -> None:
        self.data = bytearray()


class _XmlMetadataSink(_MetadataSink):
    """An application/dicom+xml part: one instance in the Native DICOM Model (PS3.19), read
    into DICOM JSON so it is built like JSON metadata."""

    def close(self) -> None:
        try:
            item = native_xml.to_json(bytes(self.data))
        except native_xml.NativeXmlError as exc:
            raise RequestError(400, f"metadata part {self.index + 1}: {exc}") from exc
        self.session.metadata.append(item)
        self.data = bytearray()


class _BulkSink:
    """A bulk data part: spooled to an unnamed temporary file beside the blobs."""

    def __init__(self, session: StoreSession, location: str, media: MediaType) -> None:
        self.session = session
        self.location = location
        self.media = media
        self.file = tempfile.TemporaryFile(dir=session.spool_dir)  # noqa: SIM115 - kept open
        session.spools.append(self.file)
        self.size = 0

    def write(self, data: memoryview) -> None:
        self.file.write(data)
        self.size += len(data)

    def close(self) -> None:
        self.file.flush()
        self.session.bulk[self.location] = ji.BulkPart(
            self.media.value, self.file, self.size, self.media.params
        )

    def abort(self) -> None:
        pass  # closed with the session


class StoreSession:
    """The state of one STOW-RS request; its methods run in the thread pool, one at a time."""

    def __init__(
        self, ctx: WebContext, study_uid: str | None, via: str, default_type: str | None
    ) -> None:
        self.ctx = ctx
        self.study_uid = study_uid
        self.via = via
        self.default_type = default_type
        self.outcomes: list[Outcome] = []
        self.metadata: list[dict[str, Any]] = []
        self.bulk: dict[str, ji.BulkPart] = {}
        self.spools: list[Any] = []
        self.spool_dir = ctx.archive.data_dir / "tmp"
        self.parts = 0

    # -------------------------------------------------------------- parts
    def open_part(self, headers: PartHeaders) -> PartSink:
        self.parts += 1
        media = headers.content_type
        kind = media.value or self.default_type
        if not kind:
            raise RequestError(400, f"part {headers.index + 1} has no Content-Type")
        if kind == DICOM:
            return _InstanceSink(self)
        if kind in METADATA_TYPES:
            return _MetadataSink(self, headers.index)
        if kind in XML_TYPES:
            return _XmlMetadataSink(self, headers.index)
        location = headers.content_location
        if not location:
            raise RequestError(
                400, f"bulk data part {headers.index + 1} ({kind}) has no Content-Location"
            )
        if location in self.bulk:
            raise RequestError(400, f"two bulk data parts have Content-Location {location}")
        self.spool_dir.mkdir(exist_ok=True)
        return _BulkSink(self, location, MediaType(kind, media.params))

    # -------------------------------------------------------------- filing
    def file(self, writer: BlobWriter, fallback: tuple[str | None, str | None] | None) -> None:
        result = self.ctx.archive.import_blob(
            writer,
            via=self.via,
            study_uid=self.study_uid,
            sop_classes=STORAGE_SOP_CLASSES,
            transfer_syntaxes=ACCEPTED_TRANSFER_SYNTAXES,
        )
        outcome = Outcome.of(result)
        if fallback is not None:
            outcome.sop_class_uid = outcome.sop_class_uid or fallback[0]
            outcome.sop_instance_uid = outcome.sop_instance_uid or fallback[1]
        self.outcomes.append(outcome)

    def out_of_resources(
        self, exc: OSError | None, uids: tuple[str | None, str | None] | None
    ) -> None:
        log.error("STOW-RS %s: cannot write a blob: %s", self.via, exc)
        sop_class, sop_uid = uids or (None, None)
        self.outcomes.append(
            Outcome(sop_class, sop_uid, reason=OUT_OF_RESOURCES, comment="cannot write blob")
        )

    def finish(self) -> None:
        """Build and file the instances described by the metadata parts."""
        used: set[str] = set()
        for item in self.metadata:
            uids = (ji.json_uid(item, "00080016"), ji.json_uid(item, "00080018"))
            for element in item.values():
                if isinstance(element, dict) and isinstance(element.get("BulkDataURI"), str):
                    used.add(element["BulkDataURI"])
            try:
                writer = self.ctx.archive.blobs.create()
            except OSError as exc:
                self.out_of_resources(exc, uids)
                continue
            try:
                ji.build_part10(item, self.bulk, writer)
            except ji.InstanceError as exc:
                writer.abort()
                log.warning("STOW-RS %s: instance %s refused: %s", self.via, uids[1], exc.message)
                self.outcomes.append(Outcome(*uids, reason=exc.reason, comment=exc.message))
                continue
            except OSError as exc:
                writer.abort()
                self.out_of_resources(exc, uids)
                continue
            self.file(writer, uids)
        unused = set(self.bulk) - used
        if unused:
            log.info("STOW-RS %s: %d bulk data part(s) not referenced", self.via, len(unused))

    def close(self) -> None:
        for spool in self.spools:
            spool.close()
        self.spools.clear()
        self.bulk.clear()


class _SinglePart:
    """A body that is one application/dicom instance (no multipart)."""

    def __init__(self, sink: PartSink) -> None:
        self.sink: PartSink | None = sink
        self.size = 0

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        if self.sink is not None:
            self.sink.write(memoryview(data))

    def close(self) -> None:
        sink, self.sink = self.sink, None
        if sink is not None and not self.size:
            sink.abort()
            raise RequestError(400, "empty request body")
        if sink is not None:
            sink.close()

    def abort(self) -> None:
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.abort()


# ------------------------------------------------------------------ request level
def _root_type(request: Request) -> tuple[str, MediaType]:
    """("multipart" | "single", the parsed Content-Type), or RequestError 400/415."""
    media = parse_media_type(request.headers.get("content-type"))
    if media.value == DICOM:
        return "single", media
    if media.value != "multipart/related":
        raise RequestError(
            415,
            f"Content-Type {media.value or '(none)'} is not supported: use multipart/related; "
            'type="application/dicom" (or "application/dicom+json" with bulk data)',
        )
    root = parse_media_type(media.param("type")).value or None
    if root is not None and root != DICOM and root not in METADATA_TYPES | XML_TYPES:
        raise RequestError(
            415,
            f"multipart/related type {root} is not supported: use application/dicom, "
            "application/dicom+json or application/dicom+xml",
        )
    if not media.param("boundary"):
        raise RequestError(400, "multipart/related Content-Type without a boundary parameter")
    return "multipart", media


def _check_length(request: Request, limit: int) -> None:
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise RequestError(415, f"Content-Encoding {encoding} is not supported")
    length = request.headers.get("content-length")
    if length is None:
        return
    try:
        size = int(length)
    except ValueError:
        raise RequestError(400, f"invalid Content-Length {length!r}") from None
    if size > limit:
        raise RequestError(413, f"request body of {size} bytes is over the limit of {limit} bytes")


async def _read_body(request: Request, reader: MultipartReader | _SinglePart, limit: int) -> None:
    """Stream the body into *reader* in the thread pool, FEED_BYTES at a time."""
    total = 0
    batch: list[bytes] = []
    pending = 0

    def feed(chunks: list[bytes]) -> None:
        for chunk in chunks:
            reader.feed(chunk)

    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise RequestError(413, f"request body over the limit of {limit} bytes")
        batch.append(chunk)
        pending += len(chunk)
        if pending >= FEED_BYTES:
            await run_in_threadpool(feed, batch)
            batch, pending = [], 0
    if batch:
        await run_in_threadpool(feed, batch)


def _uid(value: str | None) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def _url(value: str | None) -> dict[str, Any]:
    return {"vr": "UR", "Value": [value]} if value else {"vr": "UR"}


def response_body(base: str, study_uid: str | None, outcomes: list[Outcome]) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 Table I.1-1) as DICOM JSON."""
    stored = [o for o in outcomes if o.reason is None]
    failed = [o for o in outcomes if o.reason is not None]
    studies = {o.study_uid for o in stored if o.study_uid}
    study = study_uid or (studies.pop() if len(studies) == 1 else None)
    body: dict[str, Any] = {"00081190": _url(f"{base}/studies/{study}" if study else None)}
    if failed:
        body["00081198"] = {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": _uid(o.sop_class_uid),
                    "00081155": _uid(o.sop_instance_uid),
                    "00081197": {"vr": "US", "Value": [o.reason]},
                }
                for o in failed
            ],
        }
    if stored:
        body["00081199"] = {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": _uid(o.sop_class_uid),
                    "00081155": _uid(o.sop_instance_uid),
                    "00081190": _url(
                        f"{base}/studies/{o.study_uid}/series/{o.series_uid}"
                        f"/instances/{o.sop_instance_uid}"
                        if o.study_uid and o.series_uid
                        else None
                    ),
                }
                for o in stored
            ],
        }
    return body


def to_xml(body: dict[str, Any]) -> str:
    """A DICOM JSON object of the response as PS3.19 Native DICOM Model XML."""

    def attributes(obj: dict[str, Any]) -> str:
        out = []
        for tag, element in obj.items():
            vr = element["vr"]
            keyword = keyword_for_tag(int(tag, 16))
            inner = []
            for n, value in enumerate(element.get("Value", []), start=1):
                if vr == "SQ":
                    inner.append(f'<Item number="{n}">{attributes(value)}</Item>')
                else:
                    inner.append(f'<Value number="{n}">{escape(str(value))}</Value>')
            out.append(
                f'<DicomAttribute tag="{tag}" vr="{vr}" keyword={quoteattr(keyword)}>'
                + "".join(inner)
                + "</DicomAttribute>"
            )
        return "".join(out)

    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">'
        f"{attributes(body)}</NativeDicomModel>\n"
    )


def _wants_xml(request: Request) -> bool:
    """XML only when the client asks for it and not for JSON (seed 002 T3.22 accepts both)."""
    accept = request.headers.get("accept", "").lower()
    types = {parse_media_type(item).value for item in accept.split(",") if item.strip()}
    return bool(types & XML_TYPES) and not types & (METADATA_TYPES | {"*/*", "application/*"})


def http_status(outcomes: list[Outcome]) -> int:
    """PS3.18 Table 10.5.3-1 (seed 002 T3.24)."""
    reasons = [o.reason for o in outcomes if o.reason is not None]
    if not reasons:
        return 200
    if len(reasons) < len(outcomes):
        return 202
    if all(r in SYNTAX_REASONS for r in reasons):
        return 400
    if all(r >> 8 == OUT_OF_RESOURCES >> 8 for r in reasons):
        return 503
    return 409


def routes(ctx: WebContext) -> list[BaseRoute]:
    limit = ctx.config.http.max_request_size

    async def store(request: Request) -> Response:
        study_uid = request.path_params.get("study")
        client = client_of(request)
        try:
            _check_length(request, limit)
            kind, media = _root_type(request)
        except RequestError as exc:
            return problem(request, exc.status, exc.reason)
        session = StoreSession(
            ctx, study_uid, f"STOW-RS ({client})", parse_media_type(media.param("type")).value
        )
        reader: MultipartReader | _SinglePart
        try:
            if kind == "single":
                reader = _SinglePart(_InstanceSink(session))
            else:
                reader = MultipartReader(media.param("boundary") or "", session.open_part)
        except MultipartError as exc:
            return problem(request, 400, str(exc))
        try:
            try:
                await _read_body(request, reader, limit)
                await run_in_threadpool(reader.close)
                await run_in_threadpool(session.finish)
            except BaseException:
                await run_in_threadpool(reader.abort)
                raise
        except RequestError as exc:
            return problem(request, exc.status, _with_stored(exc.reason, session))
        except MultipartError as exc:
            return problem(request, 400, _with_stored(str(exc), session))
        except ClientDisconnect:
            log.warning("STOW-RS from %s: client disconnected (%s)", client, _stored(session))
            return Response(status_code=400)
        except Exception as exc:
            log.exception("STOW-RS from %s failed", client)
            return problem(request, 500, _with_stored(f"internal error: {exc!r}", session))
        finally:
            await run_in_threadpool(session.close)
        outcomes = session.outcomes
        if not outcomes:
            return problem(request, 400, "the request holds no instances")
        status = http_status(outcomes)
        body = response_body(base_url(request, ctx.config.http.public_url), study_uid, outcomes)
        failed = [o for o in outcomes if o.reason is not None]
        warnings = [
            '299 openpacs "{}: {} (0x{:04X})"'.format(
                o.sop_instance_uid or "-", _header_text(o.comment), o.reason or 0
            )
            for o in failed[:MAX_WARNING_HEADERS]
        ]
        log_at = logging.INFO if status == 200 else logging.WARNING
        log.log(
            log_at,
            "STOW-RS from %s: %d stored, %d failed → %d%s",
            client, len(outcomes) - len(failed), len(failed), status,
            "".join(f"; {o.sop_instance_uid or '-'} 0x{o.reason:04X} {o.comment}"
                    for o in failed[:MAX_WARNING_HEADERS]),
        )  # fmt: skip
        if _wants_xml(request):
            content, media_type = to_xml(body), "application/dicom+xml"
        else:
            content, media_type = json.dumps(body), DICOM_JSON
        response = Response(content, status_code=status, media_type=media_type)
        for warning in warnings:
            response.headers.append("Warning", warning)
        return response

    return [
        Route("/studies", store, methods=["POST"]),
        Route("/studies/{study}", store, methods=["POST"]),
    ]


def _header_text(text: str) -> str:
    return "".join(c if " " <= c <= "~" and c not in '"\\' else "'" for c in text)


def _stored(session: StoreSession) -> str:
    stored = sum(1 for o in session.outcomes if o.reason is None)
    return f"{stored} instance(s) of the request stored before that"


def _with_stored(reason: str, session: StoreSession) -> str:
    if any(o.reason is None for o in session.outcomes):
        return f"{reason} ({_stored(session)})"
    return reason
