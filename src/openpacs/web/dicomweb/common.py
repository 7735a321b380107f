"""What the DICOMweb services share: the context they run in, error answers, DICOM JSON.

Owns: ``WebContext`` (the archive, the query service and the config a request needs); the
error answer of every DICOMweb refusal (JSON ``{"error": reason}`` with the HTTP status, logged
with the client's address — a 4xx always says why, never a bare 500); the DICOM JSON model
(PS3.18 F.2) of a data set through pydicom's ``to_json_dict`` (PN objects, InlineBinary, and
BulkDataURI for large binary values when the caller gives the URI).
Must not: query or store anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pydicom.dataelem import DataElement
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from openpacs.config import Config
from openpacs.services.archive import Archive
from openpacs.services.query import QueryService

log = logging.getLogger("openpacs.web.dicomweb")

DICOM_JSON = "application/dicom+json"
BULK_DATA_THRESHOLD = 1024  # binary values larger than this become BulkDataURI (when offered)


@dataclass
class WebContext:
    config: Config
    archive: Archive
    query: QueryService


class WebError(Exception):
    """A request that cannot be served: the HTTP status and the reason the client gets."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


def client_of(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "-"


def problem(
    request: Request, status: int, reason: str, headers: dict[str, str] | None = None
) -> Response:
    """The answer to a refused request, logged with the client's address."""
    log.warning(
        "%s %s from %s refused: %d %s",
        request.method,
        request.url.path + (f"?{request.url.query}" if request.url.query else ""),
        client_of(request),
        status,
        reason,
    )
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


def to_json(ds: Dataset, bulk_uri: Callable[[DataElement], str] | None = None) -> dict[str, Any]:
    """PS3.18 F.2 DICOM JSON of *ds*: binary values over BULK_DATA_THRESHOLD bytes as
    BulkDataURI when *bulk_uri* is given (else InlineBinary)."""
    if bulk_uri is None:
        return ds.to_json_dict(bulk_data_threshold=1 << 62)
    return ds.to_json_dict(
        bulk_data_threshold=BULK_DATA_THRESHOLD, bulk_data_element_handler=bulk_uri
    )


def base_url(request: Request, public_url: str) -> str:
    """``http://host:port/dicom-web`` as the client reached us (for RetrieveURL, BulkDataURI):
    ``[http] public_url`` when set (behind a reverse proxy), else the Host header — with the
    listening port added when the header has none (dicomweb-client sends the host only)."""
    root_path = request.scope.get("root_path", "")
    if public_url:
        return public_url + root_path
    url = request.base_url
    server = request.scope.get("server")
    default = {"http": 80, "https": 443}.get(url.scheme)
    if url.port is None and server and server[1] != default:
        url = url.replace(port=server[1])
    return str(url).rstrip("/") + root_path
