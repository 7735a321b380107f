"""The query service: one place where a query on the archive's index is answered.

Owns: the Query/Retrieve information models (Patient Root, Study Root, Patient/Study Only) and
their levels, the map from DICOM attributes to index columns per level (seed 002 T3.71–T3.74,
T3.13/T3.15/T3.17), the hierarchical-query rules (PS3.4 C.4.1.2.2: unique keys above the query
level, single valued), turning a request identifier into one SQL statement (matching done by
``dicom.matching``: in SQL where the index has a column, in Python for attributes kept raw),
the hit limit, building response identifiers (return keys, Specific Character Set), and the
instance set of a C-MOVE/C-GET. C-FIND, and later MWL and QIDO-RS, call it.
Must not: speak DIMSE or HTTP.
"""

from __future__ import annotations

import datetime as dt
import enum
import io
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset
from pydicom.dataelem import DataElement
from sqlalchemy import Engine, Select, and_, exists, func, select, true
from sqlalchemy.sql.elements import ColumnElement

from openpacs.dicom import matching
from openpacs.dicom.identifier import Identifier
from openpacs.dicom.matching import Constraint, MatchKind, QueryError
from openpacs.dicom.transfer_syntaxes import EXPLICIT_VR_BIG_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN
from openpacs.index.schema import instances, patients, series, series_requests, studies
from openpacs.services.records import parse_raw_attrs

log = logging.getLogger(__name__)


class Level(enum.Enum):
    PATIENT = 0
    STUDY = 1
    SERIES = 2
    IMAGE = 3


class Model(enum.Enum):
    """Q/R information models (PS3.4 C.6) and the levels each has, top down."""

    PATIENT_ROOT = (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)
    STUDY_ROOT = (Level.STUDY, Level.SERIES, Level.IMAGE)
    PATIENT_STUDY_ONLY = (Level.PATIENT, Level.STUDY)  # retired, seed 002 T3.65


MODEL_BY_SOP_CLASS: dict[str, Model] = {
    "1.2.840.10008.5.1.4.1.2.1.1": Model.PATIENT_ROOT,  # FIND
    "1.2.840.10008.5.1.4.1.2.1.2": Model.PATIENT_ROOT,  # MOVE
    "1.2.840.10008.5.1.4.1.2.1.3": Model.PATIENT_ROOT,  # GET
    "1.2.840.10008.5.1.4.1.2.2.1": Model.STUDY_ROOT,
    "1.2.840.10008.5.1.4.1.2.2.2": Model.STUDY_ROOT,
    "1.2.840.10008.5.1.4.1.2.2.3": Model.STUDY_ROOT,
    "1.2.840.10008.5.1.4.1.2.3.1": Model.PATIENT_STUDY_ONLY,
    "1.2.840.10008.5.1.4.1.2.3.2": Model.PATIENT_STUDY_ONLY,
    "1.2.840.10008.5.1.4.1.2.3.3": Model.PATIENT_STUDY_ONLY,
}

QUERY_RETRIEVE_LEVEL = 0x00080052
SPECIFIC_CHARACTER_SET = 0x00080005
RETRIEVE_AE_TITLE = 0x00080054
INSTANCE_AVAILABILITY = 0x00080056
UNIQUE_KEY = {
    Level.PATIENT: 0x00100020,  # Patient ID
    Level.STUDY: 0x0020000D,  # Study Instance UID
    Level.SERIES: 0x0020000E,  # Series Instance UID
    Level.IMAGE: 0x00080018,  # SOP Instance UID
}
LEVEL_NAMES = {
    "PATIENT": Level.PATIENT,
    "STUDY": Level.STUDY,
    "SERIES": Level.SERIES,
    "IMAGE": Level.IMAGE,
}


class Kind(enum.Enum):
    TEXT = "text"  # compared as stored
    NAME_CI = "name_ci"  # Patient's Name: matched on the upper-cased column (seed 002)
    INT = "int"  # IS/US values kept as integers
    MULTI = "multi"  # backslash-joined values (Modalities in Study, Image Type)
    COMPUTED = "computed"  # return only


@dataclass(frozen=True)
class Key:
    """Where an attribute lives in the index: table, column to match on, column to return."""

    level: Level
    match: Any  # ColumnElement or None (return only)
    value: Any  # ColumnElement to return
    kind: Kind = Kind.TEXT


def _k(level: Level, column: Any, kind: Kind = Kind.TEXT, value: Any = None) -> Key:
    return Key(level, column, value if value is not None else column, kind)


# seed 002 T3.71 (patient), T3.72 (study), T3.73 (series), T3.74 (instance); QIDO T3.13–T3.17.
KEYS: dict[int, Key] = {
    0x00100010: _k(
        Level.PATIENT, patients.c.patient_name_norm, Kind.NAME_CI, patients.c.patient_name
    ),
    0x00100020: _k(Level.PATIENT, patients.c.patient_id),
    0x00100021: _k(Level.PATIENT, patients.c.issuer),
    0x00100030: _k(Level.PATIENT, patients.c.birth_date),
    0x00100040: _k(Level.PATIENT, patients.c.sex),
    0x00201200: _k(Level.PATIENT, None, Kind.COMPUTED, patients.c.num_studies),
    0x0020000D: _k(Level.STUDY, studies.c.study_uid),
    0x00080020: _k(Level.STUDY, studies.c.study_date),
    0x00080030: _k(Level.STUDY, studies.c.study_time),
    0x00080050: _k(Level.STUDY, studies.c.accession_number),
    0x00200010: _k(Level.STUDY, studies.c.study_id),
    0x00081030: _k(Level.STUDY, studies.c.study_description),
    0x00080090: _k(Level.STUDY, studies.c.referring_physician),  # case-sensitive (seed 002)
    0x00080080: _k(Level.STUDY, studies.c.institution_name),
    0x00080061: _k(Level.STUDY, studies.c.modalities, Kind.MULTI),
    0x00201206: _k(Level.STUDY, None, Kind.COMPUTED, studies.c.num_series),
    0x00201208: _k(Level.STUDY, None, Kind.COMPUTED, studies.c.num_instances),
    0x0020000E: _k(Level.SERIES, series.c.series_uid),
    0x00080060: _k(Level.SERIES, series.c.modality),
    0x00200011: _k(Level.SERIES, series.c.series_number, Kind.INT),
    0x0008103E: _k(Level.SERIES, series.c.series_description),
    0x00180015: _k(Level.SERIES, series.c.body_part),
    0x00081010: _k(Level.SERIES, series.c.station_name),
    0x00400244: _k(Level.SERIES, series.c.pps_start_date),
    0x00400245: _k(Level.SERIES, series.c.pps_start_time),
    0x00201209: _k(Level.SERIES, None, Kind.COMPUTED, series.c.num_instances),
    0x00080018: _k(Level.IMAGE, instances.c.sop_uid),
    0x00080016: _k(Level.IMAGE, instances.c.sop_class_uid),
    0x00200013: _k(Level.IMAGE, instances.c.instance_number, Kind.INT),
    0x00080023: _k(Level.IMAGE, instances.c.content_date),
    0x00080033: _k(Level.IMAGE, instances.c.content_time),
    0x00280008: _k(Level.IMAGE, instances.c.number_of_frames, Kind.INT),
    0x00280010: _k(Level.IMAGE, instances.c.rows, Kind.INT),
    0x00280011: _k(Level.IMAGE, instances.c.columns, Kind.INT),
    0x00280100: _k(Level.IMAGE, instances.c.bits_allocated, Kind.INT),
    0x00080008: _k(Level.IMAGE, instances.c.image_type, Kind.MULTI),
}
# Request Attributes Sequence items are matched through their own table (seed 002 T3.73).
REQUEST_ATTRIBUTES_SEQUENCE = 0x00400275
REQUEST_ITEM_COLUMNS = {
    0x00401001: series_requests.c.requested_procedure_id,
    0x00400009: series_requests.c.scheduled_procedure_step_id,
    0x00080050: series_requests.c.accession_number,
}
STUDY_DATE, STUDY_TIME = 0x00080020, 0x00080030
BINARY_INT_VRS = frozenset({"US", "UL", "SS", "SL", "SV", "UV"})
# Not matching keys: they qualify the query (Timezone Offset From UTC qualifies its times).
NOT_KEYS = frozenset({QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET, 0x00080201})

TABLE = {
    Level.PATIENT: patients,
    Level.STUDY: studies,
    Level.SERIES: series,
    Level.IMAGE: instances,
}
ATTRS = {lvl: (TABLE[lvl].c.attrs, TABLE[lvl].c.attrs_ts, TABLE[lvl].c.charset) for lvl in Level}


class QueryRefused(Exception):
    """The identifier cannot be answered; *status* is the DIMSE failure status to send."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


class TooManyMatches(QueryRefused):
    def __init__(self, limit: int) -> None:
        # seed 002 returns zero matches silently; we refuse explicitly and say why (A700).
        super().__init__(
            0xA700, f"More than {limit} matches ([query] max_results); narrow the query"
        )


@dataclass
class FindRequest:
    model: Model
    level: Level
    identifier: Dataset
    constraints: list[Constraint] = field(default_factory=list)
    unsupported: list[int] = field(default_factory=list)  # matching keys we cannot match on


@dataclass(frozen=True)
class RetrieveItem:
    pk: int
    sop_class_uid: str
    sop_uid: str
    transfer_syntax: str
    blob_key: str
    size: int
    dataset_offset: int | None


def read_identifier(data: bytes, transfer_syntax: str) -> Dataset:
    """Decode a request identifier in its presentation context's transfer syntax."""
    from pydicom.filereader import read_dataset

    if not data:
        raise QueryRefused(0xC000, "Empty identifier")
    implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    little = transfer_syntax != EXPLICIT_VR_BIG_ENDIAN
    try:
        ds = read_dataset(io.BytesIO(data), implicit, little)
        ds.decode()  # apply the identifier's own Specific Character Set now
    except Exception as exc:
        raise QueryRefused(0xC000, f"Cannot decode the identifier: {exc}"[:64]) from exc
    return ds


def parse_level(model: Model, identifier: Dataset) -> Level:
    raw = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if not raw:
        raise QueryRefused(0xA900, "Query/Retrieve Level (0008,0052) is missing")
    level = LEVEL_NAMES.get(raw)
    if level is None or level not in model.value:
        raise QueryRefused(0xA900, f"Query/Retrieve Level {raw} is not in this model")
    return level


def _single(identifier: Dataset, tag: int) -> str | None:
    elem = identifier.get(tag)
    if elem is None or elem.VM == 0 or elem.value in (None, ""):
        return None
    value = str(elem.value).strip()
    if elem.VM > 1 or "*" in value or "?" in value or "\\" in value:
        return "\\"  # not a single value
    return value


def check_hierarchical(model: Model, level: Level, identifier: Dataset) -> None:
    """PS3.4 C.4.1.2.2.1: each level above the query level is fixed by its unique key, given as
    a single value. Anything else is a relational query, which we do not support (seed 002)."""
    for upper in model.value:
        if upper == level:
            break
        if model == Model.STUDY_ROOT and upper == Level.PATIENT:
            continue
        value = _single(identifier, UNIQUE_KEY[upper])
        if value is None or value == "\\":
            name = {
                Level.PATIENT: "Patient ID",
                Level.STUDY: "Study Instance UID",
                Level.SERIES: "Series Instance UID",
            }[upper]
            raise QueryRefused(
                0xA900, f"Relational query refused: {level.name} level needs one {name}"
            )


def _ancestor_levels(model: Model, level: Level) -> list[Level]:
    """The levels whose attributes are keys of a query at *level* (PS3.4 C.6.1/C.6.2 tables):
    in the Study Root model, patient attributes are study-level keys."""
    levels = [lvl for lvl in Level if lvl.value <= level.value]
    if model == Model.PATIENT_STUDY_ONLY:
        levels = [lvl for lvl in levels if lvl in (Level.PATIENT, Level.STUDY)]
    return levels


def _base_select(level: Level) -> Select[Any]:
    joined: Any = TABLE[level]
    if level.value >= Level.SERIES.value + 1:
        joined = joined.join(series, series.c.pk == instances.c.series_pk)
    if level.value >= Level.SERIES.value:
        joined = joined.join(studies, studies.c.pk == series.c.study_pk)
    if level.value >= Level.STUDY.value:
        joined = joined.join(patients, patients.c.pk == studies.c.patient_pk)
    return select(TABLE[level].c.pk).select_from(joined)


class QueryService:
    def __init__(self, engine: Engine, ae_title: str, max_results: int = 1000) -> None:
        self.engine = engine
        self.ae_title = ae_title
        self.max_results = max_results
        self.dialect = engine.dialect.name

    # ------------------------------------------------------------------ C-FIND
    def prepare(self, model: Model, identifier: Dataset, relational: bool = False) -> FindRequest:
        """The request for *identifier*; ``relational`` (QIDO-RS) allows matching keys of the
        levels above the query level, which hierarchical C-FIND refuses."""
        level = parse_level(model, identifier)
        if not relational:
            check_hierarchical(model, level, identifier)
        request = FindRequest(model, level, identifier)
        allowed = set(_ancestor_levels(model, level))
        for elem in identifier:
            if elem.tag in NOT_KEYS or elem.tag.group in (0, 2):
                continue
            try:
                constraint = matching.constraint_from_element(elem)
            except QueryError as exc:
                raise QueryRefused(0xA900, str(exc)[:64]) from exc
            if constraint.kind == MatchKind.UNIVERSAL:
                continue  # a return key only
            key = KEYS.get(int(elem.tag))
            known = (key is not None and key.level in allowed and key.match is not None) or (
                int(elem.tag) == REQUEST_ATTRIBUTES_SEQUENCE and Level.SERIES in allowed
            )
            if known or self._raw_level(int(elem.tag), allowed) is not None:
                request.constraints.append(constraint)
            else:
                request.unsupported.append(int(elem.tag))
        return request

    def _raw_level(self, tag: int, allowed: set[Level]) -> Level | None:
        from openpacs.services import records

        for lvl, tags in (
            (Level.IMAGE, records.INSTANCE_ATTRS),
            (Level.SERIES, records.SERIES_ATTRS),
            (Level.STUDY, records.STUDY_ATTRS),
            (Level.PATIENT, records.PATIENT_ATTRS),
        ):
            if lvl in allowed and tag in tags:
                return lvl
        return None

    def find(self, request: FindRequest, today: str | None = None) -> Iterator[Identifier]:
        """Response identifiers, one per match. Raises TooManyMatches before yielding anything
        when the match count exceeds max_results."""
        pks = self._matches(request, today, 0, None)
        for start in range(0, len(pks), 500):
            yield from self._responses(request, pks[start : start + 500])

    def find_page(
        self, request: FindRequest, offset: int, limit: int, today: str | None = None
    ) -> tuple[list[Identifier], bool]:
        """One page of matches (QIDO-RS limit/offset, in a stable order) and whether more
        follow it."""
        pks = self._matches(request, today, offset, limit + 1)
        more = len(pks) > limit
        return list(self._responses(request, pks[:limit])), more

    def _matches(
        self, request: FindRequest, today: str | None, offset: int, page: int | None
    ) -> list[int]:
        """Primary keys of the matches at the request's level, in index order: all of them
        (TooManyMatches over max_results) or the *page* after *offset*."""
        level = request.level
        allowed = set(_ancestor_levels(request.model, level))
        stmt = _base_select(level)
        python_side: list[tuple[Level, Constraint]] = []
        by_tag = {c.tag: c for c in request.constraints}
        date_c, time_c = by_tag.get(STUDY_DATE), by_tag.get(STUDY_TIME)
        combined = None
        if Level.STUDY in allowed and time_c is not None:
            combined = matching.combined_datetime_range(
                date_c, time_c, today or dt.date.today().strftime("%Y%m%d")
            )
        for c in request.constraints:
            if combined is not None and c.tag in (STUDY_DATE, STUDY_TIME):
                continue
            cond = self._sql_condition(c, allowed)
            if cond is not None:
                stmt = stmt.where(cond)
                continue
            raw_level = self._raw_level(c.tag, allowed)
            if raw_level is not None:
                python_side.append((raw_level, c))
        if combined is not None:
            low, high = combined
            if low is not None:
                stmt = stmt.where(studies.c.study_datetime >= low)
            if high is not None:
                stmt = stmt.where(studies.c.study_datetime <= high)
        stmt = stmt.order_by(TABLE[level].c.pk)
        if page is not None:
            with self.engine.connect() as conn:
                if not python_side:
                    return list(conn.execute(stmt.offset(offset).limit(page)).scalars())
                pks = list(conn.execute(stmt).scalars())
            pks = [pk for pk in pks if self._python_match(level, pk, python_side)]
            return pks[offset : offset + page]
        limit = self.max_results
        with self.engine.connect() as conn:
            pks = list(conn.execute(stmt if python_side else stmt.limit(limit + 1)).scalars())
        if python_side:
            pks = [pk for pk in pks if self._python_match(level, pk, python_side)]
        if len(pks) > limit:
            raise TooManyMatches(limit)
        return pks

    def _sql_condition(self, c: Constraint, allowed: set[Level]) -> ColumnElement[bool] | None:
        if c.tag == REQUEST_ATTRIBUTES_SEQUENCE:
            conds: list[ColumnElement[bool]] = [true()]
            for item in c.items:
                column = REQUEST_ITEM_COLUMNS.get(item.tag)
                if column is not None and item.kind != MatchKind.UNIVERSAL:
                    conds.append(matching.sql_condition(item, column, self.dialect))
            return exists(
                select(series_requests.c.pk).where(
                    series_requests.c.series_pk == series.c.pk, and_(*conds)
                )
            )
        key = KEYS.get(c.tag)
        if key is None or key.match is None or key.level not in allowed:
            return None
        if c.kind == MatchKind.SEQUENCE:
            return None
        if key.kind == Kind.INT:
            if c.kind == MatchKind.SINGLE:
                try:
                    values = [int(float(v)) for v in c.values]
                except ValueError:
                    raise QueryRefused(0xA900, f"{_keyword(c.tag)} is not a number") from None
                return key.match.in_(values) if len(values) > 1 else key.match == values[0]
            return None  # other kinds on numbers: matched in Python on the text
        return matching.sql_condition(
            c, key.match, self.dialect, multi_valued=key.kind == Kind.MULTI
        )

    def _python_match(self, level: Level, pk: int, checks: list[tuple[Level, Constraint]]) -> bool:
        datasets: dict[Level, Dataset] = {}
        for raw_level, c in checks:
            if raw_level not in datasets:
                datasets[raw_level] = self._attrs_of(level, pk, raw_level)
            if not matching.match_dataset([c], datasets[raw_level]):
                return False
        return True

    def _attrs_of(self, level: Level, pk: int, want: Level) -> Dataset:
        stmt = (
            _base_select(level).with_only_columns(*ATTRS[want][:2]).where(TABLE[level].c.pk == pk)
        )
        with self.engine.connect() as conn:
            row = conn.execute(stmt).first()
        if row is None or row[0] is None:
            return Dataset()
        return parse_raw_attrs(row[0], row[1])

    def _responses(self, request: FindRequest, pks: Sequence[int]) -> Iterator[Identifier]:
        level = request.level
        allowed = set(_ancestor_levels(request.model, level))
        wanted = [
            e
            for e in request.identifier
            if e.tag not in (QUERY_RETRIEVE_LEVEL,) and e.tag.group not in (0, 2)
        ]
        columns: dict[str, Any] = {"_pk": TABLE[level].c.pk}
        for elem in wanted:
            key = KEYS.get(int(elem.tag))
            if key is not None and key.level in allowed:
                columns[f"t{int(elem.tag):08x}"] = key.value
        raw_levels = sorted(
            {lvl for e in wanted if (lvl := self._raw_level(int(e.tag), allowed)) is not None},
            key=lambda lvl: lvl.value,
        )
        for lvl in raw_levels:
            columns[f"attrs{lvl.value}"] = ATTRS[lvl][0]
            columns[f"attrs_ts{lvl.value}"] = ATTRS[lvl][1]
        top = Level.STUDY if level.value >= Level.STUDY.value else Level.PATIENT
        columns["_charset"] = ATTRS[top][2]
        stmt = (
            _base_select(level)
            .with_only_columns(*[col.label(name) for name, col in columns.items()])
            .where(TABLE[level].c.pk.in_(list(pks)))
            .order_by(TABLE[level].c.pk)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).mappings().all()
        for row in rows:
            raw: dict[int, Dataset] = {}
            for lvl in raw_levels:
                blob = row[f"attrs{lvl.value}"]
                raw[lvl.value] = (
                    parse_raw_attrs(blob, row[f"attrs_ts{lvl.value}"]) if blob else Dataset()
                )
            yield self._response(request, row, raw, wanted, allowed)

    def _response(
        self,
        request: FindRequest,
        row: Any,
        raw: dict[int, Dataset],
        wanted: list[DataElement],
        allowed: set[Level],
    ) -> Identifier:
        out = Identifier()
        non_ascii = False
        for elem in wanted:
            tag = int(elem.tag)
            vr = elem.VR
            name = f"t{tag:08x}"
            if tag == SPECIFIC_CHARACTER_SET:
                continue
            if tag == RETRIEVE_AE_TITLE:
                out.add(tag, "AE", self.ae_title)
                continue
            if tag == INSTANCE_AVAILABILITY:
                out.add(tag, "CS", "ONLINE")
                continue
            if name in row:
                value = row[name]
                if value is None or vr in BINARY_INT_VRS or vr in ("FL", "FD"):
                    out.add(tag, vr, value)
                else:
                    text = str(value)
                    non_ascii = non_ascii or not text.isascii()
                    out.add(tag, vr, text.split("\\") if "\\" in text else text)
                continue
            found = None
            for ds in raw.values():
                if tag in ds:
                    found = ds[tag]
                    break
            if found is not None:
                out.add_element(found)
                non_ascii = True  # may hold text in the stored character set
            else:
                out.add(tag, vr, None)
        out.add(QUERY_RETRIEVE_LEVEL, "CS", request.level.name)
        if RETRIEVE_AE_TITLE not in out:
            out.add(RETRIEVE_AE_TITLE, "AE", self.ae_title)
        charset = row["_charset"]
        if non_ascii:
            # the stored data's own character set can encode what came from it
            out.charset = (
                (charset.split("\\") if "\\" in charset else charset) if charset else "ISO_IR 192"
            )
        return out

    # ------------------------------------------------------------------ C-MOVE / C-GET
    def retrieve_items(self, model: Model, identifier: Dataset) -> list[RetrieveItem]:
        """The instances a C-MOVE/C-GET identifier names (PS3.4 C.4.2.2.1: unique keys; a list
        of UIDs at the retrieve level)."""
        level = parse_level(model, identifier)
        conds: list[ColumnElement[bool]] = []
        for lvl in model.value:
            tag = UNIQUE_KEY[lvl]
            elem = identifier.get(tag)
            values = _values(elem)
            if lvl == level:
                if not values:
                    raise QueryRefused(0xA900, f"{_keyword(tag)} is needed at {lvl.name} level")
                conds.append(KEYS[tag].match.in_(values))
                break
            if values:
                if len(values) > 1 and not (model == Model.STUDY_ROOT and lvl == Level.PATIENT):
                    raise QueryRefused(0xA900, f"{_keyword(tag)} must be a single value")
                conds.append(KEYS[tag].match.in_(values))
        stmt = (
            select(
                instances.c.pk,
                instances.c.sop_class_uid,
                instances.c.sop_uid,
                instances.c.transfer_syntax,
                instances.c.blob_key,
                instances.c.size,
                instances.c.dataset_offset,
            )
            .select_from(
                instances.join(series, series.c.pk == instances.c.series_pk)
                .join(studies, studies.c.pk == series.c.study_pk)
                .join(patients, patients.c.pk == studies.c.patient_pk)
            )
            .where(*conds)
            .order_by(series.c.pk, instances.c.instance_number, instances.c.pk)
        )
        with self.engine.connect() as conn:
            return [RetrieveItem(*row) for row in conn.execute(stmt)]

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(studies)).scalar_one())


def _values(elem: DataElement | None) -> list[str]:
    if elem is None or elem.value in (None, ""):
        return []
    if elem.VM > 1:
        return [str(v).strip() for v in elem.value if str(v).strip()]
    return [v.strip() for v in str(elem.value).split("\\") if v.strip()]


def _keyword(tag: int) -> str:
    from pydicom.datadict import keyword_for_tag

    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
