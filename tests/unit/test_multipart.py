"""The streaming multipart/related reader (web/multipart.py): bodies written by independent
encoders (urllib3, dicomweb-client) come out part for part at every chunking, and malformed
bodies raise MultipartError with a reason."""

from __future__ import annotations

import os

import pytest
from dicomweb_client.api import DICOMwebClient
from urllib3.filepost import encode_multipart_formdata

from openpacs.web.multipart import (
    MAX_HEADER_FIELDS,
    MultipartError,
    MultipartReader,
    PartHeaders,
    parse_media_type,
)

BOUNDARY = "0f3cf5c0-70e0-41ef-baef-c6f9f65ec3e1"


class Recorder:
    """Collects each part's headers, content and how it ended."""

    def __init__(self) -> None:
        self.parts: list[tuple[PartHeaders, bytearray, list[str]]] = []

    def open_part(self, headers: PartHeaders) -> Recorder.Sink:
        sink = Recorder.Sink()
        self.parts.append((headers, sink.data, sink.events))
        return sink

    class Sink:
        def __init__(self) -> None:
            self.data = bytearray()
            self.events: list[str] = []

        def write(self, data: memoryview) -> None:
            assert isinstance(data, memoryview)
            self.data += data
            self.events.append("write")

        def close(self) -> None:
            self.events.append("close")

        def abort(self) -> None:
            self.events.append("abort")

    def contents(self) -> list[bytes]:
        return [bytes(data) for _h, data, _e in self.parts]


def read(body: bytes, boundary: str = BOUNDARY, chunk: int | None = None) -> Recorder:
    recorder = Recorder()
    reader = MultipartReader(boundary, recorder.open_part)
    step = chunk or len(body) or 1
    for i in range(0, len(body), step):
        reader.feed(body[i : i + step])
    reader.close()
    assert reader.parts == len(recorder.parts)
    return recorder


# Contents that look like delimiters without being ones.
TRICKY = [
    b"",
    b"\r\n",
    b"--" + BOUNDARY.encode(),  # not at the start of a line
    b"x\r\n--" + BOUNDARY.encode()[:-1],  # a delimiter cut short
    b"\r\n--" + BOUNDARY.encode() + b"X tail",  # followed by a character that ends no delimiter
    b"\r\r\n\n--\r\n",
    os.urandom(70_000),
]


@pytest.mark.parametrize("chunk", [None, 1, 2, 3, 7, 64, 4096])
def test_urllib3_body_round_trips_at_every_chunking(chunk: int | None) -> None:
    fields = [
        (f"p{i}", (f"f{i}", content, "application/dicom")) for i, content in enumerate(TRICKY)
    ]
    body, ctype = encode_multipart_formdata(fields, boundary=BOUNDARY)
    assert parse_media_type(ctype).param("boundary") == BOUNDARY
    recorder = read(body, chunk=chunk)
    assert recorder.contents() == TRICKY
    for headers, _data, events in recorder.parts:
        assert headers.content_type.value == "application/dicom"
        assert events[-1] == "close" and "abort" not in events


def test_dicomweb_client_body_with_leading_crlf() -> None:
    """dicomweb-client starts its body with CRLF before the first delimiter."""
    ctype = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'
    contents = [b"first", os.urandom(10_000), b"third\r\n"]
    body = DICOMwebClient._encode_multipart_message(contents, ctype)
    assert body.startswith(b"\r\n--")
    media = parse_media_type(ctype)
    assert (media.value, media.param("type"), media.param("boundary")) == (
        "multipart/related",
        "application/dicom",
        BOUNDARY,
    )
    for chunk in (None, 1, 5):
        recorder = read(body, chunk=chunk)
        assert recorder.contents() == contents


def test_preamble_epilogue_and_header_fields() -> None:
    body = (
        b"A preamble that is ignored\r\n"
        b"--b\r\n"
        b"CONTENT-TYPE: Application/DICOM+JSON; Charset=utf-8\r\n"
        b"Content-Location:   http://x/bulk/1  \r\n"
        b"X-Repeated: 1\r\n"
        b"x-repeated: 2\r\n"
        b"\r\n"
        b"[]\r\n"
        b"--b--\r\n"
        b"an epilogue, ignored\r\n--b\r\n"
    )
    for chunk in (None, 1):
        recorder = read(body, "b", chunk)
        ((headers, data, _events),) = recorder.parts
        assert bytes(data) == b"[]"
        assert headers.content_type.value == "application/dicom+json"
        assert headers.content_type.param("charset") == "utf-8"
        assert headers.content_location == "http://x/bulk/1"
        assert headers.get("X-REPEATED") == "2"
        assert headers.index == 0


def test_parse_media_type() -> None:
    media = parse_media_type('Multipart/Related ; TYPE="application/dicom" ;boundary="a b;c"')
    assert media.value == "multipart/related"
    assert media.params == {"type": "application/dicom", "boundary": "a b;c"}
    assert parse_media_type(None).value == ""
    assert parse_media_type("application/dicom").params == {}


def test_zero_parts() -> None:
    assert read(b"--b--\r\n", "b").parts == []


def test_parts_are_streamed_not_buffered() -> None:
    content = os.urandom(1 << 20)
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + content + b"\r\n--b--"
    recorder = Recorder()
    reader = MultipartReader("b", recorder.open_part)
    reader.feed(body[: 512 << 10])
    ((_headers, data, events),) = recorder.parts
    assert len(data) > 500_000 and "close" not in events  # written before the part ended
    reader.feed(body[512 << 10 :])
    reader.close()
    assert bytes(data) == content and events[-1] == "close"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty request body"),
        (b"  \r\n", "empty request body"),
        (b"no delimiter here", "no multipart boundary delimiter"),
        (b"--b\r\nContent-Type: application/dicom\r\n\r\ndata", "ended before its closing"),
        (b"--b\r\nContent-Type: application/dicom\r\n\r\ndata\r\n--b\r\n", "ended before"),
        (b"--b\r\nContent Type: x\r\n\r\ndata\r\n--b--", "malformed multipart body"),
        (b"--b\r\nContent-Type: x\n\ndata\r\n--b--", "malformed|ended before"),  # bare LF
        (b"--bX\r\n\r\ndata\r\n--b--", "malformed multipart body"),
        (
            b"--b\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_HEADER_FIELDS + 1)),
            "malformed multipart body",
        ),
        (b"--b\r\nX-Long: " + b"v" * 10_000 + b"\r\n\r\n", "malformed multipart body"),
    ],
)
def test_malformed_bodies(body: bytes, reason: str) -> None:
    recorder = Recorder()
    reader = MultipartReader("b", recorder.open_part)
    with pytest.raises(MultipartError, match=reason):
        reader.feed(body)
        reader.close()
    for _headers, _data, events in recorder.parts:
        assert events[-1] in ("abort", "close")
    if reason == "ended before its closing":
        assert recorder.parts[-1][2][-1] == "abort"  # the part cut off is aborted


def test_preamble_without_delimiter_is_bounded() -> None:
    reader = MultipartReader("b", Recorder().open_part)
    with pytest.raises(MultipartError, match="no multipart boundary delimiter"):
        for _ in range(100):
            reader.feed(b"x" * 4096)


@pytest.mark.parametrize("boundary", ["", "x" * 71, "trailing ", "ünicode"])
def test_invalid_boundaries(boundary: str) -> None:
    with pytest.raises(MultipartError):
        MultipartReader(boundary, Recorder().open_part)
