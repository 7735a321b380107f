"""QIDO-RS (PS3.18 10.6; seed 002 §3.2.3, Tables 3.12–3.19): searching studies, series and
instances over HTTP.

Owns: the six search resources under ``/dicom-web``; turning the query string into a request
identifier (attribute IDs as keyword, tag or dotted sequence path; UID lists with ``,`` or
``\\``; ``includefield`` incl. ``all``; ``limit``/``offset``; ``fuzzymatching``), handed to the
same query service as C-FIND as a *relational* query (keys of the levels above are allowed);
the default return attributes of PS3.18 Table 6.7.1-2 (with the study's attributes for
``/series`` and the study's and series' for ``/instances``), RetrieveURL, and the DICOM JSON
answer written directly from the response identifiers (PN as objects, IS/DS/US… as numbers).
Statuses: 200; 204 when nothing matches (seed 002 T3.19); 400 naming what is wrong with the
query; 406 for an Accept we cannot produce (only application/dicom+json, as seed 002); 413 when
more than ``[query] max_results`` match and the client did not page. A ``Warning: 299`` header
says when more results can be paged, when ``fuzzymatching`` was asked but literal matching done,
and which keys could not be matched on.
Written here rather than with a library: no maintained Python QIDO-RS server library exists;
the matching is the shared engine (``dicom.matching`` via ``services.query``).
Must not: match or touch the index itself (``services.query`` does).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from openpacs.dicom.identifier import Identifier
from openpacs.dicom.matching import QueryError
from openpacs.services import records
from openpacs.services.query import (
    KEYS,
    QUERY_RETRIEVE_LEVEL,
    SPECIFIC_CHARACTER_SET,
    Level,
    Model,
    QueryRefused,
    TooManyMatches,
)
from openpacs.web.dicomweb.common import (
    DICOM_JSON,
    WebContext,
    WebError,
    base_url,
    problem,
)

STUDY_UID, SERIES_UID, SOP_UID = 0x0020000D, 0x0020000E, 0x00080018
RETRIEVE_URL = 0x00081190
WARNING = "299 openpacs"

# PS3.18 Table 6.7.1-2 default return attributes (+ seed 002 T3.13/T3.15 "NONE" return keys and
# Study Description, which viewers list); RetrieveURL is added from the UIDs.
STUDY_DEFAULT = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "InstanceAvailability",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "TimezoneOffsetFromUTC",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "OtherPatientIDsSequence",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_DEFAULT = (
    "Modality",
    "TimezoneOffsetFromUTC",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "RequestAttributesSequence",
)
INSTANCE_DEFAULT = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceAvailability",
    "TimezoneOffsetFromUTC",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
)
DEFAULTS = {Level.STUDY: STUDY_DEFAULT, Level.SERIES: SERIES_DEFAULT, Level.IMAGE: INSTANCE_DEFAULT}
RAW_ATTRS = {
    Level.PATIENT: records.PATIENT_ATTRS,
    Level.STUDY: records.STUDY_ATTRS,
    Level.SERIES: records.SERIES_ATTRS,
    Level.IMAGE: records.INSTANCE_ATTRS,
}
CONTROL = frozenset({"limit", "offset", "includefield", "fuzzymatching", "charset", "emptyvalue"})
NUMBER_VRS = frozenset({"IS", "DS", "US", "UL", "SS", "SL", "FL", "FD", "SV", "UV"})
INT_VRS = frozenset({"IS", "US", "UL", "SS", "SL", "SV", "UV"})


# ----------------------------------------------------------------------------- query string
def attribute_path(text: str) -> list[int]:
    """``PatientName``, ``00100010`` or ``00400275.00401001`` → tags (PS3.18 8.3.4.1)."""
    path = []
    for part in text.split("."):
        part = part.strip()
        if re.fullmatch(r"[0-9A-Fa-f]{8}", part):
            tag = int(part, 16)
        else:
            found = tag_for_keyword(part)
            if found is None:
                raise WebError(400, f"unknown attribute {part!r} in {text!r}")
            tag = int(found)
        try:
            dictionary_VR(tag)
        except KeyError:
            raise WebError(
                400,
                f"attribute {part!r} is not in the DICOM dictionary (private tags cannot "
                "be queried)",
            ) from None
        path.append(tag)
    for tag in path[:-1]:
        if dictionary_VR(tag) != "SQ":
            raise WebError(400, f"{text!r}: {_name(tag)} is not a sequence")
    return path


def _name(tag: int) -> str:
    return keyword_for_tag(tag) or f"{tag:08X}"


def _put(ds: Dataset, path: list[int], value: str | None) -> None:
    """Set *value* (None: a return key) at *path*, creating sequence items on the way."""
    tag = path[0]
    vr = dictionary_VR(tag)
    if len(path) > 1:
        if tag not in ds or not ds[tag].value:
            ds.add_new(tag, "SQ", [Dataset()])
        _put(ds[tag].value[0], path[1:], value)
        return
    if tag in ds and value is None:
        return  # a return key already present (maybe as a matching key)
    if vr == "SQ":
        if value:
            raise WebError(
                400, f"{_name(tag)} is a sequence: give a value to one of its attributes"
            )
        ds.add_new(tag, "SQ", [])
        return
    if value is None:
        ds.add_new(tag, vr.split(" or ")[0], None)
        return
    if vr == "UI":
        value = "\\".join(v.strip() for v in re.split(r"[,\\]", value) if v.strip())
    ds.add_new(tag, vr.split(" or ")[0], value)


class Search:
    """A parsed QIDO-RS request."""

    def __init__(self, level: Level, params: Iterable[tuple[str, str]], path_uids: dict[int, str]):
        self.level = level
        self.identifier = Dataset()
        self.offset = 0
        self.limit: int | None = None
        self.fuzzy = False
        self.include_all = False
        self.includes: list[list[int]] = []
        seen: set[str] = set()
        for name, value in params:
            key = name.strip()
            lower = key.lower()
            if lower in CONTROL:
                self._control(lower, value)
                continue
            if key in seen:
                raise WebError(400, f"{key} is given more than once")
            seen.add(key)
            path = attribute_path(key)
            if path[0] in path_uids:
                raise WebError(400, f"{key} is already fixed by the URL")
            _put(self.identifier, path, value)
        for tag, uid in path_uids.items():
            _put(self.identifier, [tag], uid)
        # return keys: the defaults of this level and of the levels the URL does not fix
        levels = [level]
        if level == Level.IMAGE and SERIES_UID not in path_uids:
            levels.append(Level.SERIES)
        if STUDY_UID not in path_uids and level != Level.STUDY:
            levels.append(Level.STUDY)
        for lvl in levels:
            for keyword in DEFAULTS[lvl]:
                _put(self.identifier, [int(tag_for_keyword(keyword) or 0)], None)
        if self.include_all:
            for lvl in Level:
                if lvl.value > level.value:
                    continue
                for tag, known in KEYS.items():
                    if known.level == lvl:
                        _put(self.identifier, [tag], None)
                for tag in RAW_ATTRS[lvl]:
                    _put(self.identifier, [tag], None)
        for path in self.includes:
            _put(self.identifier, path, None)
        self.identifier.QueryRetrieveLevel = level.name

    def _control(self, name: str, value: str) -> None:
        if name in ("limit", "offset"):
            if not re.fullmatch(r"\s*\d{1,9}\s*", value):
                raise WebError(400, f"{name} must be a non-negative integer, not {value!r}")
            number = int(value)
            if name == "limit":
                if number == 0:
                    raise WebError(400, "limit must be at least 1")
                self.limit = number
            else:
                self.offset = number
        elif name == "includefield":
            for part in value.split(","):
                part = part.strip()
                if not part:
                    continue
                if part.lower() == "all":
                    self.include_all = True
                else:
                    self.includes.append(attribute_path(part))
        elif name == "fuzzymatching":
            if value.strip().lower() not in ("true", "false"):
                raise WebError(400, f"fuzzymatching must be true or false, not {value!r}")
            self.fuzzy = value.strip().lower() == "true"
        # charset / emptyvalue: answers are UTF-8 JSON; empty values are returned as such


# ----------------------------------------------------------------------------- DICOM JSON
def _person_name(text: str) -> dict[str, str]:
    groups = text.split("=")
    out = {}
    for label, group in zip(("Alphabetic", "Ideographic", "Phonetic"), groups, strict=False):
        if group:
            out[label] = group
    return out


def _number(vr: str, text: Any) -> int | float | str:
    if isinstance(text, int | float):
        return text
    raw = str(text).strip()
    try:
        return int(raw) if vr in INT_VRS else float(raw)
    except ValueError:
        return raw  # kept as received rather than dropped


def identifier_json(ident: Identifier) -> dict[str, Any]:
    """PS3.18 F.2 DICOM JSON of a response identifier (without Specific Character Set and
    Query/Retrieve Level: the answer is UTF-8 JSON)."""
    out: dict[str, Any] = {}
    for tag, vr, value in ident.items():
        if tag in (SPECIFIC_CHARACTER_SET, QUERY_RETRIEVE_LEVEL):
            continue
        key = f"{tag:08X}"
        if isinstance(value, DataElement):
            out[key] = value.to_json_dict(None, 1 << 62)
            continue
        if value is None or value == "" or value == []:
            out[key] = {"vr": vr}
            continue
        values = value if isinstance(value, list) else [value]
        if vr == "PN":
            out[key] = {"vr": vr, "Value": [_person_name(str(v)) for v in values]}
        elif vr in NUMBER_VRS:
            out[key] = {"vr": vr, "Value": [_number(vr, v) for v in values]}
        else:
            out[key] = {"vr": vr, "Value": [str(v) for v in values]}
    return out


# ----------------------------------------------------------------------------- resource
def _accepts_json(request: Request) -> bool:
    accept = request.headers.get("accept", "").strip()
    if not accept:
        return True
    for part in accept.split(","):
        media = part.split(";")[0].strip().lower()
        if media in (DICOM_JSON, "application/json", "*/*", "application/*"):
            return True
    return False


def routes(ctx: WebContext) -> list[BaseRoute]:
    def search(level: Level, fixed: tuple[tuple[str, int], ...]) -> Any:
        async def endpoint(request: Request) -> Response:
            if not _accepts_json(request):
                return problem(
                    request,
                    406,
                    f"QIDO-RS answers {DICOM_JSON} only; Accept was "
                    f"{request.headers.get('accept')!r}",
                )
            try:
                path_uids = {tag: request.path_params[name] for name, tag in fixed}
                search = Search(level, request.query_params.multi_items(), path_uids)
                return await run_in_threadpool(answer, request, search)
            except WebError as exc:
                return problem(request, exc.status, exc.reason, exc.headers)

        return endpoint

    def answer(request: Request, search: Search) -> Response:
        max_results = ctx.config.query.max_results
        warnings: list[str] = []
        try:
            find = ctx.query.prepare(Model.STUDY_ROOT, search.identifier, relational=True)
            if search.limit is None and search.offset == 0:
                try:
                    matches = list(ctx.query.find(find))
                except TooManyMatches:
                    raise WebError(
                        413,
                        f"more than {max_results} matches ([query] max_results): narrow the "
                        "query or page with limit and offset",
                    ) from None
                more = False
            else:
                limit = search.limit if search.limit is not None else max_results
                if limit > max_results:
                    warnings.append(
                        f"{WARNING} \"limit {limit} is over the server's {max_results}; "
                        f'{max_results} results are returned at most"'
                    )
                    limit = max_results
                matches, more = ctx.query.find_page(find, search.offset, limit)
        except QueryRefused as exc:
            raise WebError(400, exc.comment) from exc
        except QueryError as exc:
            raise WebError(400, str(exc)) from exc
        if find.unsupported:
            names = ", ".join(_name(t) for t in find.unsupported)
            warnings.append(f'{WARNING} "not matched on (unsupported keys): {names}"')
        if search.fuzzy:
            warnings.append(
                f'{WARNING} "The fuzzymatching parameter is not supported. Only literal matching '
                'has been performed."'
            )
        if more:
            warnings.append(f'{WARNING} "There are additional results that can be requested"')
        headers = {"Warning": ", ".join(warnings)} if warnings else {}
        if not matches:
            return Response(status_code=204, headers=headers)
        root = base_url(request, ctx.config.http.public_url)
        body = []
        for ident in matches:
            item = identifier_json(ident)
            url = _retrieve_url(root, item, search.level)
            if url:
                item["00081190"] = {"vr": "UR", "Value": [url]}
            body.append(dict(sorted(item.items())))
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return Response(data, media_type=DICOM_JSON, headers=headers)

    return [
        Route("/studies", search(Level.STUDY, ()), methods=["GET"]),
        Route("/series", search(Level.SERIES, ()), methods=["GET"]),
        Route("/instances", search(Level.IMAGE, ()), methods=["GET"]),
        Route(
            "/studies/{study}/series",
            search(Level.SERIES, (("study", STUDY_UID),)),
            methods=["GET"],
        ),
        Route(
            "/studies/{study}/instances",
            search(Level.IMAGE, (("study", STUDY_UID),)),
            methods=["GET"],
        ),
        Route(
            "/studies/{study}/series/{series}/instances",
            search(Level.IMAGE, (("study", STUDY_UID), ("series", SERIES_UID))),
            methods=["GET"],
        ),
    ]


def _retrieve_url(root: str, item: dict[str, Any], level: Level) -> str | None:
    def uid(tag: int) -> str | None:
        value = item.get(f"{tag:08X}", {}).get("Value")
        return str(value[0]) if value else None

    study = uid(STUDY_UID)
    if study is None:
        return None
    url = f"{root}/studies/{study}"
    if level == Level.STUDY:
        return url
    series = uid(SERIES_UID)
    if series is None:
        return None
    url += f"/series/{series}"
    if level == Level.SERIES:
        return url
    sop = uid(SOP_UID)
    return f"{url}/instances/{sop}" if sop else None
