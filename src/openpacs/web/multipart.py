"""Streaming reader of ``multipart/related`` request bodies (RFC 2387, RFC 2046 §5.1) for STOW-RS.

Owns: parsing a Content-Type value into its media type and parameters (the ``boundary``, RFC 2387's
``type``, a part's ``transfer-syntax``), and turning a body fed in chunks of any size into parts —
each part's header fields, then its content handed to a sink as it arrives, so a part of any size
never sits in memory. The byte-level parsing is python-multipart's ``MultipartParser`` (the parser
Starlette uses for forms; its callbacks work for any multipart body with a boundary). This module
adds what that parser leaves to its caller: skipping a preamble before the first delimiter,
collecting and bounding a part's header fields, and refusing a body that ends before its closing
delimiter (the parser's ``finalize`` does not check).
Must not: know DICOM, or read from the network itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

MAX_PREAMBLE = 64 << 10  # bytes before the first delimiter that are skipped (RFC 2046 preamble)
MAX_HEADER_LINE = 8 << 10  # one header field of a part
MAX_HEADER_FIELDS = 32  # header fields per part


class MultipartError(ValueError):
    """The body is not a well-formed multipart body; the message says why (for a 400)."""


@dataclass(frozen=True)
class MediaType:
    """A media type (lower case, ``type/subtype``) and its parameters (names in lower case)."""

    value: str
    params: dict[str, str] = field(default_factory=dict)

    def param(self, name: str) -> str | None:
        return self.params.get(name)


def parse_media_type(header: str | None) -> MediaType:
    """``multipart/related; type="application/dicom"; boundary=x`` → MediaType (quoted values
    unquoted). An absent header is the empty media type."""
    value, raw = parse_options_header(header or "")
    params = {
        k.decode("latin-1").strip().lower(): v.decode("latin-1").strip() for k, v in raw.items()
    }
    return MediaType(value.decode("latin-1").strip().lower(), params)


class PartSink(Protocol):
    """Where one part's content goes while it arrives."""

    def write(self, data: memoryview) -> None: ...

    def close(self) -> None:
        """The part ended: all its content was written."""

    def abort(self) -> None:
        """The body broke off inside this part."""


@dataclass
class PartHeaders:
    """A part's header fields (names in lower case; a repeated field keeps its last value)."""

    fields: dict[str, str] = field(default_factory=dict)
    index: int = 0  # 0-based position of the part in the body

    def get(self, name: str) -> str | None:
        return self.fields.get(name.lower())

    @property
    def content_type(self) -> MediaType:
        return parse_media_type(self.get("content-type"))

    @property
    def content_location(self) -> str | None:
        return self.get("content-location")


class MultipartReader:
    """Feed the body with :meth:`feed` (any chunking), then :meth:`close`. For each part,
    *open_part* is called with its headers and returns the sink its content is written to."""

    def __init__(self, boundary: str, open_part: Callable[[PartHeaders], PartSink]) -> None:
        if not boundary or len(boundary) > 70 or boundary.endswith(" "):
            # RFC 2046 §5.1.1: 1 to 70 characters, not ending in a space.
            raise MultipartError(f"invalid multipart boundary {boundary!r}")
        try:
            self._delimiter = b"--" + boundary.encode("ascii")
        except UnicodeEncodeError as exc:
            raise MultipartError("multipart boundary is not ASCII") from exc
        self._open_part = open_part
        self._parser = MultipartParser(
            boundary.encode("ascii"),
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
            max_header_count=MAX_HEADER_FIELDS,
            max_header_size=MAX_HEADER_LINE,
        )
        self._head: bytearray | None = bytearray()  # until the first delimiter is found
        self._name = bytearray()
        self._value = bytearray()
        self._headers = PartHeaders()
        self._sink: PartSink | None = None
        self.parts = 0
        self.complete = False
        self.size = 0

    # ------------------------------------------------------------------ input
    def feed(self, data: bytes) -> None:
        self.size += len(data)
        if self.complete:
            return  # the epilogue after the closing delimiter is ignored (RFC 2046)
        if self._head is not None:
            self._head += data
            start = self._first_delimiter(self._head)
            if start < 0:
                if len(self._head) > MAX_PREAMBLE:
                    raise MultipartError("no multipart boundary delimiter at the start of the body")
                return
            data, self._head = bytes(self._head[start:]), None
        try:
            self._parser.write(data)
        except MultipartParseError as exc:
            self.abort()
            raise MultipartError(f"malformed multipart body: {exc}") from exc

    def _first_delimiter(self, head: bytearray) -> int:
        """Offset of the first delimiter line (a preamble before it is skipped), -1 if not yet
        seen (or only partly)."""
        if head.startswith(self._delimiter):
            return 0
        at = head.find(b"\r\n" + self._delimiter)
        if at < 0:
            at = head.find(b"\n" + self._delimiter)  # tolerate a bare LF ending the preamble
            return at + 1 if at >= 0 else -1
        return at + 2

    def close(self) -> None:
        """The body ended: it must have ended with the closing delimiter."""
        if self.complete:
            return
        self.abort()
        if self._head is not None:
            if not self._head.strip():
                raise MultipartError("empty request body")
            raise MultipartError("no multipart boundary delimiter in the body")
        raise MultipartError(
            f"multipart body ended before its closing boundary delimiter (after {self.parts} "
            "part(s): truncated, or the boundary parameter does not match the body)"
        )

    def abort(self) -> None:
        """Give up: the part being received (if any) is aborted."""
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.abort()

    # ------------------------------------------------------------------ parser callbacks
    def _part_begin(self) -> None:
        self._headers = PartHeaders(index=self.parts)
        self._name.clear()
        self._value.clear()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        name = self._name.decode("latin-1").strip().lower()
        self._headers.fields[name] = self._value.decode("latin-1").strip()
        self._name.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        self._sink = self._open_part(self._headers)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._sink is not None and end > start:
            self._sink.write(memoryview(data)[start:end])

    def _part_end(self) -> None:
        sink, self._sink = self._sink, None
        self.parts += 1
        if sink is not None:
            sink.close()

    def _end(self) -> None:
        self.complete = True
