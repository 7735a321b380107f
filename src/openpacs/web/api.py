"""The REST API (JSON): worklist orders for sites without a HIS, and a health check.

Owns: ``/api/health``; ``GET /api/worklist`` (list), ``POST /api/worklist`` (schedule: the JSON
form of a worklist item, answered 201 only after it is committed; 400 naming the field for
invalid input), ``DELETE /api/worklist/{accession}`` (cancel; 404 when unknown). DICOMweb
is mounted beside it (``web.app``). Starlette, because the project's HTTP stack is ASGI.
Must not: hold worklist rules (``services.worklist`` does).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from openpacs.dicom.uids import generate_uid
from openpacs.services.orders import (
    CancelOrder,
    Code,
    NewOrder,
    OrderError,
    OtherId,
    Patient,
    WorklistItem,
)
from openpacs.services.worklist import WorklistService

log = logging.getLogger(__name__)


def item_from_request(body: Any) -> WorklistItem:
    """A worklist item from its JSON form; defaults: study UID generated, requested procedure
    ID = accession number, SPS ID = accession + '-1', date = today."""
    if not isinstance(body, dict):
        raise OrderError("the body must be a JSON object")
    data = dict(body)
    patient = data.pop("patient", None)
    if not isinstance(patient, dict):
        raise OrderError("missing or not an object", "patient")
    try:
        patient["other_ids"] = tuple(OtherId(**o) for o in patient.get("other_ids", ()))
        data["protocol_codes"] = tuple(Code(**c) for c in data.get("protocol_codes", ()))
        data["requested_procedure_codes"] = tuple(
            Code(**c) for c in data.get("requested_procedure_codes", ())
        )
        accession = str(data.get("accession_number", ""))
        data.setdefault("requested_procedure_id", accession)
        data.setdefault("sps_id", f"{accession}-1"[:16])
        data.setdefault("study_uid", generate_uid())
        data.setdefault("sps_start_date", dt.date.today().strftime("%Y%m%d"))
        return WorklistItem(patient=Patient(**patient), **data)
    except TypeError as exc:  # unknown or missing keys
        raise OrderError(str(exc).replace("__init__() ", "")) from exc


def api_routes(worklist: WorklistService) -> list[Route]:
    async def health(_request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    def peer(request: Request) -> str:
        return f"{request.client.host}:{request.client.port}" if request.client else "-"

    async def list_items(request: Request) -> JSONResponse:
        rows = await run_in_threadpool(
            worklist.list,
            include_closed=request.query_params.get("all") in ("1", "true"),
            date=request.query_params.get("date"),
        )
        return JSONResponse([dict(r._mapping) for r in rows])

    async def add_item(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning("worklist POST from %s refused: not JSON (%s)", peer(request), exc)
            return JSONResponse({"error": f"not JSON: {exc}"}, status_code=400)
        try:
            item = item_from_request(body)
            # the commit waits on the index writer: off the event loop
            done = await run_in_threadpool(worklist.apply, [NewOrder(item)], "api")
        except OrderError as exc:
            log.warning("worklist POST from %s refused: %s", peer(request), exc)
            return JSONResponse({"error": str(exc), "field": exc.field}, status_code=400)
        log.info("worklist via API from %s: %s", peer(request), done[0])
        return JSONResponse(
            {
                "result": done[0],
                "study_uid": item.study_uid,
                "sps_id": item.sps_id,
                "accession_number": item.accession_number,
            },
            status_code=201,
        )

    async def cancel_item(request: Request) -> JSONResponse:
        accession = request.path_params["accession"]
        try:
            done = await run_in_threadpool(
                worklist.apply, [CancelOrder(None, None, accession)], "api"
            )
        except OrderError as exc:
            log.warning("worklist DELETE %s from %s refused: %s", accession, peer(request), exc)
            return JSONResponse({"error": str(exc)}, status_code=404)
        log.info("worklist via API from %s: %s", peer(request), done[0])
        return JSONResponse({"result": done[0]})

    return [
        Route("/api/health", health),
        Route("/api/worklist", list_items, methods=["GET"]),
        Route("/api/worklist", add_item, methods=["POST"]),
        Route("/api/worklist/{accession}", cancel_item, methods=["DELETE"]),
    ]
