"""The modality worklist: orders in, Scheduled Procedure Steps out (seed 000, seed 001 §3).

Owns: storing worklist items and applying order events (new, change, cancel, patient update,
patient merge) in one transaction each — an HL7 ACK or API answer follows the commit; the
status of each step (SCHEDULED … COMPLETED, CANCELLED; MPPS keeps it current); answering
Modality Worklist C-FIND requests with the shared matching engine (matching keys of seed 000
T3.7 and seed 001 T3.2 in SQL, others reported as unsupported → FF01), building each item's
return attributes (Referenced Study Sequence, code sequences, Other Patient IDs Sequence,
Patient's Age computed today, the pregnancy status rule) and projecting them onto the request.
Must not: parse HL7 or speak DIMSE.
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from sqlalchemy import Engine, and_, insert, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from openpacs.dicom import matching
from openpacs.dicom.identifier import Element, elements_dataset
from openpacs.dicom.matching import Constraint, MatchKind, QueryError
from openpacs.index.db import IndexWriter
from openpacs.index.schema import worklist_items
from openpacs.services.orders import (
    CancelOrder,
    ChangeOrder,
    Code,
    NewOrder,
    OrderError,
    OrderEvent,
    OtherId,
    Patient,
    PatientMerge,
    PatientUpdate,
    WorklistItem,
)
from openpacs.services.query import QueryRefused, TooManyMatches

log = logging.getLogger(__name__)

# Steps a modality sees when it does not ask for a status (seed 001 T3.2: SCHEDULED or ARRIVED;
# a STARTED step stays so an interrupted procedure can be resumed; a DISCONTINUED one can be
# performed again). COMPLETED and CANCELLED steps leave the worklist.
VISIBLE = ("SCHEDULED", "ARRIVED", "READY", "STARTED", "DISCONTINUED")
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"  # seed 000 T3.7 Referenced Study Sequence

SPS_SEQUENCE = 0x00400100
SPS_START_DATE, SPS_START_TIME = 0x00400002, 0x00400003
SPS_STATUS = 0x00400020
C = worklist_items.c
# seed 000 T3.7 / seed 001 T3.2 matching keys → columns (case-insensitive ones on *_norm).
TOP_KEYS: dict[int, Any] = {
    0x00080050: C.accession_number,
    0x00401001: C.requested_procedure_id,
    0x00100010: C.patient_name_norm,
    0x00100020: C.patient_id,
    0x00100021: C.issuer,
    0x00100030: C.birth_date,
    0x00100040: C.sex,
    0x0020000D: C.study_uid,
    0x00080090: C.referring_physician,
}
SPS_KEYS: dict[int, Any] = {
    0x00400001: C.station_ae,
    0x00400002: C.sps_start_date,
    0x00400003: C.sps_start_time,
    0x00080060: C.modality,
    0x00400006: C.performing_physician_norm,
    0x00400010: C.station_name,
    0x00400009: C.sps_id,
    SPS_STATUS: C.status,
}
CASE_INSENSITIVE = {0x00100010, 0x00400006}  # Patient's Name; Scheduled Performing Physician
NOT_KEYS = frozenset({0x00080005, 0x00080201})


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# ---------------------------------------------------------------------------- (de)serialising
def item_to_json(item: WorklistItem) -> str:
    return json.dumps(dataclasses.asdict(item), ensure_ascii=False, sort_keys=True)


def item_from_json(text: str) -> WorklistItem:
    data = json.loads(text)
    patient = data.pop("patient")
    patient["other_ids"] = tuple(OtherId(**o) for o in patient.get("other_ids", ()))
    data["protocol_codes"] = tuple(Code(**c) for c in data.get("protocol_codes", ()))
    data["requested_procedure_codes"] = tuple(
        Code(**c) for c in data.get("requested_procedure_codes", ())
    )
    return WorklistItem(patient=Patient(**patient), **data)


def _row(item: WorklistItem, source: str, now: dt.datetime) -> dict[str, Any]:
    p = item.patient
    time6 = (item.sps_start_time + "0000")[:6]
    return {
        "accession_number": item.accession_number,
        "requested_procedure_id": item.requested_procedure_id,
        "sps_id": item.sps_id,
        "study_uid": item.study_uid,
        "placer_order_number": item.placer_order_number,
        "filler_order_number": item.filler_order_number,
        "patient_id": p.patient_id,
        "issuer": p.issuer,
        "patient_name": p.name,
        "patient_name_norm": p.name.upper(),
        "birth_date": p.birth_date,
        "sex": p.sex,
        "modality": item.modality,
        "station_ae": item.station_ae,
        "station_name": item.station_name,
        "sps_start_date": item.sps_start_date,
        "sps_start_time": time6,
        "sps_datetime": item.sps_start_date + time6,
        "performing_physician": item.performing_physician,
        "performing_physician_norm": (item.performing_physician or "").upper() or None,
        "referring_physician": item.referring_physician,
        "priority": item.priority,
        "status": item.status,
        "item": item_to_json(item),
        "source": source,
        "updated_at": now,
    }


# ---------------------------------------------------------------------------- return attributes
def patient_age(birth_date: str | None, today: dt.date) -> str | None:
    """(0010,1010) Patient's Age as AS, computed today (seed 000 T3.7)."""
    if not birth_date:
        return None
    try:
        born = dt.datetime.strptime(birth_date, "%Y%m%d").date()
    except ValueError:
        return None
    days = (today - born).days
    if days < 0:
        return None
    years = today.year - born.year - ((today.month, today.day) < (born.month, born.day))
    if years >= 1:
        return f"{min(years, 999):03d}Y"
    months = (today.year - born.year) * 12 + today.month - born.month - (today.day < born.day)
    if months >= 1:
        return f"{months:03d}M"
    return f"{days:03d}D"


Tree = dict[int, tuple[str, Any]]  # tag → (VR, value); an SQ value is a list of Trees
_TAGS: dict[str, tuple[int, str]] = {}


def _tree(pairs: Iterable[tuple[str, Any]]) -> Tree:
    out: Tree = {}
    for keyword, value in pairs:
        hit = _TAGS.get(keyword)
        if hit is None:
            tag = tag_for_keyword(keyword)
            assert tag is not None, keyword
            hit = _TAGS[keyword] = (tag, dictionary_VR(tag))
        out[hit[0]] = (hit[1], value)
    return out


def _codes(codes: Sequence[Code]) -> list[Tree]:
    return [
        _tree(
            (
                ("CodeValue", code.value),
                ("CodingSchemeDesignator", code.scheme),
                *((("CodingSchemeVersion", code.version),) if code.version else ()),
                ("CodeMeaning", code.meaning),
            )
        )
        for code in codes
    ]


def item_tree(item: WorklistItem, today: dt.date) -> Tree:
    """Every worklist attribute seed 000 T3.7 / seed 001 T3.2 fills, for one item."""
    p = item.patient
    sps = _tree(
        (
            ("ScheduledStationAETitle", item.station_ae or ""),
            ("ScheduledProcedureStepStartDate", item.sps_start_date),
            ("ScheduledProcedureStepStartTime", item.sps_start_time),
            ("Modality", item.modality),
            ("ScheduledPerformingPhysicianName", item.performing_physician or ""),
            ("ScheduledProcedureStepDescription", item.sps_description or ""),
            ("ScheduledProtocolCodeSequence", _codes(item.protocol_codes)),
            ("ScheduledStationName", item.station_name or ""),
            ("ScheduledProcedureStepLocation", item.sps_location or ""),
            ("ScheduledProcedureStepID", item.sps_id),
            ("RequestedContrastAgent", item.contrast_agent or ""),
            ("ScheduledProcedureStepStatus", item.status),
        )
    )
    ref = _tree(
        (
            ("ReferencedSOPClassUID", DETACHED_STUDY_MANAGEMENT),
            ("ReferencedSOPInstanceUID", item.study_uid),
        )
    )
    others = [
        _tree(
            (
                ("PatientID", other.patient_id),
                ("IssuerOfPatientID", other.issuer),
                ("TypeOfPatientID", other.type),
            )
        )
        for other in p.other_ids
    ]
    return _tree(
        (
            ("ScheduledProcedureStepSequence", [sps]),
            ("RequestedProcedureID", item.requested_procedure_id),
            ("RequestedProcedureDescription", item.requested_procedure_description or ""),
            ("RequestedProcedureCodeSequence", _codes(item.requested_procedure_codes)),
            ("StudyInstanceUID", item.study_uid),
            ("ReferencedStudySequence", [ref]),
            ("RequestedProcedurePriority", item.priority),
            ("ReasonForTheRequestedProcedure", item.reason or ""),
            ("RequestedProcedureComments", item.comments or ""),
            ("AccessionNumber", item.accession_number),
            ("RequestingPhysician", item.requesting_physician or ""),
            ("RequestingService", item.requesting_service or ""),
            ("ReferringPhysicianName", item.referring_physician or ""),
            ("AdmissionID", p.admission_id or ""),
            ("CurrentPatientLocation", p.location or ""),
            ("ReferencedPatientSequence", []),
            ("PatientName", p.name),
            ("PatientID", p.patient_id),
            ("IssuerOfPatientID", p.issuer),
            ("TypeOfPatientID", "TEXT"),
            *((("OtherPatientIDsSequence", others),) if others else ()),
            ("PatientBirthDate", p.birth_date or ""),
            ("PatientSex", p.sex or ""),
            ("PatientAge", patient_age(p.birth_date, today) or ""),
            ("PatientSize", p.size or ""),
            ("PatientWeight", p.weight or ""),
            ("MedicalAlerts", p.medical_alerts or ""),
            ("Allergies", p.allergies or ""),
            ("PregnancyStatus", p.effective_pregnancy_status()),
            ("PlacerOrderNumberImagingServiceRequest", item.placer_order_number or ""),
            ("FillerOrderNumberImagingServiceRequest", item.filler_order_number or ""),
        )
    )


def _whole(tree: Tree) -> list[Element]:
    return [
        (tag, vr, [_whole(i) for i in value] if vr == "SQ" else value)
        for tag, (vr, value) in sorted(tree.items())
    ]


def item_dataset(item: WorklistItem, today: dt.date) -> Dataset:
    """The whole item as a pydicom Dataset (for tools and tests; answers use item_tree)."""
    return elements_dataset(_whole(item_tree(item, today)))


# A compiled request: (tag, VR, sub) in tag order; sub is None (a plain attribute), ALL (a
# sequence asked for with no item or an empty one: whole items) or a template for each item.
ALL = "ALL"
Template = list[tuple[int, str, Any]]


def compile_template(request: Dataset) -> Template:
    out: Template = []
    for elem in request:
        tag = int(elem.tag)
        if tag == 0x00080005 or (tag >> 16) in (0, 2):
            continue
        if elem.VR == "SQ":
            first = elem.value[0] if elem.value else None
            out.append(
                (tag, "SQ", ALL if first is None or len(first) == 0 else compile_template(first))
            )
        else:
            vr = elem.VR.split(" or ")[0] if len(elem.VR) != 2 else elem.VR
            out.append((tag, vr, None))
    return out


def project(template: Template, tree: Tree) -> list[Element]:
    """The response: every requested attribute, valued from *tree* when known, else empty;
    a requested sequence item selects the sub-attributes of each stored item (PS3.4 C.2.2.1)."""
    out: list[Element] = []
    for tag, vr, sub in template:
        stored = tree.get(tag)
        if vr == "SQ":
            if stored is None or stored[0] != "SQ":
                out.append((tag, "SQ", []))
            elif isinstance(sub, str):  # ALL
                out.append((tag, "SQ", [_whole(i) for i in stored[1]]))
            else:
                out.append((tag, "SQ", [project(sub, i) for i in stored[1]]))
        elif stored is not None:
            stored_vr, value = stored
            out.append((tag, stored_vr, [_whole(i) for i in value] if stored_vr == "SQ" else value))
        else:
            out.append((tag, vr, None))
    return out


# ---------------------------------------------------------------------------- the service
@dataclass
class WorklistQuery:
    request: Dataset
    constraints: list[Constraint] = field(default_factory=list)
    sps_constraints: list[Constraint] = field(default_factory=list)
    unsupported: list[int] = field(default_factory=list)


class WorklistService:
    def __init__(self, engine: Engine, writer: IndexWriter, max_results: int = 1000) -> None:
        self.engine = engine
        self.writer = writer
        self.max_results = max_results
        self.dialect = engine.dialect.name

    # ------------------------------------------------------------------ orders
    def apply(self, events: Sequence[OrderEvent], source: str) -> list[str]:
        """Apply the events of one message in one transaction; returns what was done. Raises
        OrderError (nothing applied) when an event cannot be applied."""
        return self.writer.run(lambda conn: [self._apply(conn, e, source) for e in events])

    def _apply(self, conn: Connection, event: OrderEvent, source: str) -> str:
        now = _now()
        if isinstance(event, NewOrder | ChangeOrder):
            item = event.item
            existing = self._find_order(
                conn,
                item.placer_order_number,
                item.filler_order_number,
                item.accession_number,
                item.sps_id,
            )
            if existing is not None:
                status = existing.status if isinstance(event, ChangeOrder) else item.status
                if isinstance(event, ChangeOrder) or existing.status in VISIBLE:
                    changed = dataclasses.replace(item, status=status)
                    conn.execute(
                        update(worklist_items)
                        .where(C.pk == existing.pk)
                        .values(_row(changed, source, now))
                    )
                    return f"updated {item.accession_number}/{item.sps_id}"
            conn.execute(insert(worklist_items).values(**_row(item, source, now), created_at=now))
            return f"scheduled {item.accession_number}/{item.sps_id}"
        if isinstance(event, CancelOrder):
            rows = self._order_rows(
                conn, event.placer_order_number, event.filler_order_number, event.accession_number
            )
            if not rows:
                raise OrderError("no such order", "ORC-2", "204")
            # a RIS discontinue (HL7 DC) withdraws the order like a cancel: both leave the
            # worklist (a DISCONTINUED step stays visible, for a modality's own discontinued MPPS)
            for row in rows:
                self._set_status(conn, row.pk, "CANCELLED", now)
            return f"{event.reason} {len(rows)} step(s)"
        if isinstance(event, PatientUpdate):
            count = self._repatient(conn, event.patient, event.patient, now)
            return f"updated patient on {count} step(s)"
        if isinstance(event, PatientMerge):
            old = Patient(patient_id=event.merged_id, issuer=event.merged_issuer)
            return f"merged patient on {self._repatient(conn, old, event.surviving, now)} step(s)"
        raise OrderError(f"unsupported event {type(event).__name__}")

    def _find_order(
        self, conn: Connection, placer: str | None, filler: str | None, accession: str, sps_id: str
    ) -> Any:
        conds = [and_(C.accession_number == accession, C.sps_id == sps_id)]
        if placer:
            conds.append(and_(C.placer_order_number == placer, C.sps_id == sps_id))
        if filler:
            conds.append(and_(C.filler_order_number == filler, C.sps_id == sps_id))
        return conn.execute(select(C.pk, C.status).where(or_(*conds)).order_by(C.pk)).first()

    def _order_rows(
        self, conn: Connection, placer: str | None, filler: str | None, accession: str | None
    ) -> list[Any]:
        conds = []
        if placer:
            conds.append(C.placer_order_number == placer)
        if filler:
            conds.append(C.filler_order_number == filler)
        if accession:
            conds.append(C.accession_number == accession)
        if not conds:
            raise OrderError("no order number or accession number to find the order by", "ORC-2")
        return list(conn.execute(select(C.pk, C.status).where(or_(*conds), C.status.in_(VISIBLE))))

    def _repatient(self, conn: Connection, old: Patient, new: Patient, now: dt.datetime) -> int:
        rows = conn.execute(
            select(C.pk, C.item).where(
                C.patient_id == old.patient_id, C.issuer == old.issuer, C.status.in_(VISIBLE)
            )
        ).all()
        for row in rows:
            item = item_from_json(row.item)
            changed = dataclasses.replace(item, patient=new)
            values = _row(changed, "hl7", now)
            values.pop("source")
            conn.execute(update(worklist_items).where(C.pk == row.pk).values(values))
        return len(rows)

    def _set_status(self, conn: Connection, pk: int, status: str, now: dt.datetime) -> None:
        row = conn.execute(select(C.item).where(C.pk == pk)).scalar_one()
        item = dataclasses.replace(item_from_json(row), status=status)
        conn.execute(
            update(worklist_items)
            .where(C.pk == pk)
            .values(status=status, item=item_to_json(item), updated_at=now)
        )

    def set_status(self, conn: Connection, pks: Sequence[int], status: str) -> None:
        """Inside a writer transaction (MPPS): the steps' status."""
        now = _now()
        for pk in pks:
            self._set_status(conn, pk, status, now)

    def steps_for(self, conn: Connection, refs: Sequence[dict[str, str]]) -> list[int]:
        """Worklist steps an MPPS Scheduled Step Attribute Sequence names (by SPS ID with the
        accession number or Study Instance UID; or by the accession number alone)."""
        found: list[int] = []
        for ref in refs:
            conds = []
            if ref.get("study_uid"):
                conds.append(C.study_uid == ref["study_uid"])
            if ref.get("accession_number"):
                conds.append(C.accession_number == ref["accession_number"])
            if not conds:
                continue
            stmt = select(C.pk).where(or_(*conds))
            if ref.get("sps_id"):
                stmt = stmt.where(C.sps_id == ref["sps_id"])
            found.extend(pk for pk in conn.execute(stmt).scalars() if pk not in found)
        return found

    def exists(self, column: str, value: str) -> bool:
        with self.engine.connect() as conn:
            return (
                conn.execute(select(C.pk).where(getattr(C, column) == value).limit(1)).first()
                is not None
            )

    def list(self, *, include_closed: bool = False, date: str | None = None) -> list[Any]:
        stmt = select(
            C.pk,
            C.accession_number,
            C.sps_id,
            C.patient_id,
            C.patient_name,
            C.modality,
            C.station_ae,
            C.sps_start_date,
            C.sps_start_time,
            C.status,
            C.study_uid,
        ).order_by(C.sps_datetime, C.pk)
        if not include_closed:
            stmt = stmt.where(C.status.in_(VISIBLE))
        if date:
            stmt = stmt.where(C.sps_start_date == date)
        with self.engine.connect() as conn:
            return list(conn.execute(stmt))

    def get(self, accession_number: str) -> builtins.list[WorklistItem]:
        with self.engine.connect() as conn:
            return [
                item_from_json(t)
                for t in conn.execute(
                    select(C.item).where(C.accession_number == accession_number).order_by(C.pk)
                ).scalars()
            ]

    # ------------------------------------------------------------------ C-FIND
    def prepare(self, request: Dataset) -> WorklistQuery:
        query = WorklistQuery(request)
        for elem in request:
            if elem.tag in NOT_KEYS or elem.tag.group in (0, 2):
                continue
            try:
                c = matching.constraint_from_element(elem, case_insensitive_tags=CASE_INSENSITIVE)
            except QueryError as exc:
                raise QueryRefused(0xA900, str(exc)[:64]) from exc
            if c.kind == MatchKind.UNIVERSAL:
                continue
            if int(elem.tag) == SPS_SEQUENCE and c.kind == MatchKind.SEQUENCE:
                for item in c.items:
                    if item.kind == MatchKind.UNIVERSAL:
                        continue
                    if item.tag in SPS_KEYS:
                        query.sps_constraints.append(item)
                    else:
                        query.unsupported.append(item.tag)
            elif int(elem.tag) in TOP_KEYS and c.kind != MatchKind.SEQUENCE:
                query.constraints.append(c)
            else:
                query.unsupported.append(int(elem.tag))
        return query

    def find(
        self, query: WorklistQuery, today: dt.date | None = None
    ) -> Iterator[builtins.list[Element]]:
        today = today or dt.date.today()
        conds: list[ColumnElement[bool]] = []
        for c in query.constraints:
            conds.append(matching.sql_condition(c, TOP_KEYS[c.tag], self.dialect))
        by_tag = {c.tag: c for c in query.sps_constraints}
        combined = None
        if SPS_START_TIME in by_tag:
            combined = matching.combined_datetime_range(
                by_tag.get(SPS_START_DATE), by_tag[SPS_START_TIME], today.strftime("%Y%m%d")
            )
        for c in query.sps_constraints:
            if combined is not None and c.tag in (SPS_START_DATE, SPS_START_TIME):
                continue
            conds.append(matching.sql_condition(c, SPS_KEYS[c.tag], self.dialect))
        if combined is not None:
            low, high = combined
            if low is not None:
                conds.append(C.sps_datetime >= low)
            if high is not None:
                conds.append(C.sps_datetime <= high)
        if SPS_STATUS not in by_tag:
            conds.append(C.status.in_(VISIBLE))
        stmt = (
            select(C.item).where(*conds).order_by(C.sps_datetime, C.pk).limit(self.max_results + 1)
        )
        with self.engine.connect() as conn:
            items = list(conn.execute(stmt).scalars())
        if len(items) > self.max_results:
            raise TooManyMatches(self.max_results)
        template = compile_template(query.request)
        for text in items:
            yield project(template, item_tree(item_from_json(text), today))
