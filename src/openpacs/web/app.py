"""The HTTP application: the JSON API (``/api``) and DICOMweb (``/dicom-web``), with CORS.

Owns: assembling the routes of ``web.api`` and ``web.dicomweb.*`` into one Starlette app and the
CORS policy of ``[http] allowed_origins`` (an entry ``scheme://host:*`` allows any port; ``*``
any origin), so a browser viewer such as OHIF can use the server.
Must not: hold any service logic.
"""

from __future__ import annotations

import re

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount

from openpacs.config import Config
from openpacs.services.archive import Archive
from openpacs.services.query import QueryService
from openpacs.services.worklist import WorklistService
from openpacs.web.api import api_routes
from openpacs.web.dicomweb import qido, stow, wado
from openpacs.web.dicomweb.common import WebContext, problem


def origin_regex(origins: tuple[str, ...]) -> str | None:
    """The allowed origins as one regular expression (None: none allowed)."""
    if "*" in origins:
        return ".*"
    parts = []
    for origin in origins:
        if origin.endswith(":*"):
            parts.append(re.escape(origin[:-2]) + r"(:\d+)?")
        else:
            parts.append(re.escape(origin))
    return "(" + "|".join(parts) + ")" if parts else None


def create_app(config: Config, archive: Archive, worklist: WorklistService) -> Starlette:
    ctx = WebContext(
        config=config,
        archive=archive,
        query=QueryService(archive.engine, config.dicom.ae_title, config.query.max_results),
    )
    dicomweb = [*qido.routes(ctx), *wado.routes(ctx), *stow.routes(ctx)]
    middleware = []
    regex = origin_regex(config.http.allowed_origins)
    if regex is not None:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origin_regex=regex,
                allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                allow_headers=["*"],
                expose_headers=["Content-Type", "Content-Length", "Warning", "Content-Location"],
                max_age=600,
            )
        )
    return Starlette(
        routes=[*api_routes(worklist), Mount("/dicom-web", routes=dicomweb)],
        middleware=middleware,
        exception_handlers={HTTPException: http_refusal},
    )


async def http_refusal(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such resource, method not allowed) answered like ours: a
    JSON reason, logged with the client's address."""
    assert isinstance(exc, HTTPException)
    reasons = {
        404: f"no resource {request.url.path}",
        405: f"{request.method} is not allowed on {request.url.path}",
    }
    return problem(request, exc.status_code, reasons.get(exc.status_code, str(exc.detail)),
                   dict(exc.headers or {}))  # fmt: skip
