"""Modality Performed Procedure Steps: what the modality says it did (seed 001 §4–5, PS3.4 F.7).

Owns: the MPPS state machine (IN PROGRESS → COMPLETED | DISCONTINUED; final states are
immutable), the checks of N-CREATE and N-SET (type 1 attributes of seed 001 T4.2 → 0120 naming
them; an existing SOP Instance → 0111; unknown → 0112; wrong status value → 0106; a final step
changed → 0110; optional study verification against the worklist → 0110), keeping every
attribute (dose attributes included) as the merged data set, the references of the Performed
Series Sequence (so the archive can tell which instances an MPPS promised), the worklist step
status it implies, and the relay jobs for each ``[[mpps_forward]]`` destination — all in one
transaction, before the response.
Must not: speak DIMSE (``dimse.worklist_scp`` does).
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from sqlalchemy import Engine, delete, func, insert, select, update
from sqlalchemy.engine import Connection

from openpacs.config import Config
from openpacs.dicom.uids import generate_uid
from openpacs.index.db import IndexWriter, inserted_pk
from openpacs.index.schema import instances, mpps, mpps_references
from openpacs.services.jobs import JobQueue
from openpacs.services.records import normalize_date, normalize_time
from openpacs.services.worklist import WorklistService

log = logging.getLogger(__name__)

MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
FORWARD_JOB = "mpps-forward"
IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
FINAL = (COMPLETED, DISCONTINUED)
STEP_STATUS = {IN_PROGRESS: "STARTED", COMPLETED: "COMPLETED", DISCONTINUED: "DISCONTINUED"}

# seed 001 T4.2: type 1 in N-CREATE (Modality, type 1 in PS3.4, is type 3 there: accepted absent)
CREATE_REQUIRED = {
    0x00400270: "ScheduledStepAttributesSequence",
    0x00400253: "PerformedProcedureStepID",
    0x00400241: "PerformedStationAETitle",
    0x00400244: "PerformedProcedureStepStartDate",
    0x00400245: "PerformedProcedureStepStartTime",
    0x00400252: "PerformedProcedureStepStatus",
}
# PS3.4 F.7.2.2.2: to leave IN PROGRESS these must have values
FINAL_REQUIRED = {
    0x00400250: "PerformedProcedureStepEndDate",
    0x00400251: "PerformedProcedureStepEndTime",
}
VERIFY_COLUMNS = {
    "study_uid": ("StudyInstanceUID", "study_uid"),
    "accession_number": ("AccessionNumber", "accession_number"),
    "requested_procedure_id": ("RequestedProcedureID", "requested_procedure_id"),
}


class MppsRefused(Exception):
    def __init__(self, status: int, comment: str, tags: Sequence[int] = ()) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment
        self.tags = list(tags)


@dataclass(frozen=True)
class MppsOutcome:
    sop_uid: str
    status: str
    scheduled: bool
    steps: int  # worklist steps updated


def encode(ds: Dataset) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def decode(data: bytes, implicit: bool = False) -> Dataset:
    return read_dataset(io.BytesIO(data), implicit, True)


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip() or None


def _refs(ds: Dataset) -> list[dict[str, str]]:
    out = []
    for item in ds.get("ScheduledStepAttributesSequence") or []:
        out.append(
            {
                "study_uid": _text(item, "StudyInstanceUID") or "",
                "accession_number": _text(item, "AccessionNumber") or "",
                "sps_id": _text(item, "ScheduledProcedureStepID") or "",
                "requested_procedure_id": _text(item, "RequestedProcedureID") or "",
            }
        )
    return out


def _references(ds: Dataset) -> list[tuple[str | None, str | None, str]]:
    """(series UID, SOP Class UID, SOP Instance UID) of every instance the step lists."""
    out = []
    for series_item in ds.get("PerformedSeriesSequence") or []:
        series_uid = _text(series_item, "SeriesInstanceUID")
        for keyword in (
            "ReferencedImageSequence",
            "ReferencedNonImageCompositeSOPInstanceSequence",
        ):
            for ref in series_item.get(keyword) or []:
                uid = _text(ref, "ReferencedSOPInstanceUID")
                if uid:
                    out.append((series_uid, _text(ref, "ReferencedSOPClassUID"), uid))
    return out


class MppsService:
    def __init__(
        self,
        config: Config,
        engine: Engine,
        writer: IndexWriter,
        worklist: WorklistService,
    ) -> None:
        self.config = config
        self.engine = engine
        self.writer = writer
        self.worklist = worklist

    # ------------------------------------------------------------------ N-CREATE
    def create(
        self, sop_uid: str | None, ds: Dataset, raw: bytes, transfer_syntax: str, calling_ae: str
    ) -> MppsOutcome:
        missing = [
            tag for tag in CREATE_REQUIRED if ds.get(tag) is None or ds[tag].value in (None, "")
        ]
        for item in ds.get("ScheduledStepAttributesSequence") or []:
            if not _text(item, "StudyInstanceUID"):
                missing.append(0x0020000D)
                break
        if missing:
            names = ", ".join(CREATE_REQUIRED.get(t, "StudyInstanceUID") for t in missing)
            raise MppsRefused(0x0120, f"Missing attribute: {names}"[:64], missing)
        status = _text(ds, "PerformedProcedureStepStatus")
        if status != IN_PROGRESS:
            raise MppsRefused(0x0106, f"N-CREATE status must be IN PROGRESS, not {status}",
                              [0x00400252])  # fmt: skip
        refs = _refs(ds)
        self._verify(refs)
        uid = sop_uid or generate_uid()

        def op(conn: Connection) -> MppsOutcome:
            if conn.execute(select(mpps.c.pk).where(mpps.c.sop_uid == uid)).first() is not None:
                raise MppsRefused(0x0111, "Duplicate SOP Instance: this MPPS exists")
            now = dt.datetime.now(dt.UTC)
            steps = self.worklist.steps_for(conn, refs)
            pk = inserted_pk(
                conn.execute(
                    insert(mpps).values(
                        sop_uid=uid, calling_ae=calling_ae, scheduled=1 if steps else 0,
                        dataset=encode(ds), created_at=now, **self._columns(ds, status),
                    )
                )
            )  # fmt: skip
            self._save_references(conn, pk, ds)
            self.worklist.set_status(conn, steps, STEP_STATUS[status])
            self._forward(conn, "create", uid, raw, transfer_syntax)
            return MppsOutcome(uid, status, bool(steps), len(steps))

        return self.writer.run(op)

    # ------------------------------------------------------------------ N-SET
    def set(
        self, sop_uid: str, ds: Dataset, raw: bytes, transfer_syntax: str, calling_ae: str
    ) -> MppsOutcome:
        new_status = _text(ds, "PerformedProcedureStepStatus")
        if new_status is not None and new_status not in (IN_PROGRESS, COMPLETED, DISCONTINUED):
            raise MppsRefused(0x0106, f"Not a Performed Procedure Step Status: {new_status}",
                              [0x00400252])  # fmt: skip

        def op(conn: Connection) -> MppsOutcome:
            row = conn.execute(
                select(mpps.c.pk, mpps.c.status, mpps.c.dataset).where(mpps.c.sop_uid == sop_uid)
            ).first()
            if row is None:
                raise MppsRefused(0x0112, "No such MPPS (SOP Instance UID unknown)")
            if row.status in FINAL:
                raise MppsRefused(0x0110, f"Performed Procedure Step is already {row.status}")
            merged = decode(row.dataset)
            for elem in ds:
                if elem.tag.group in (0, 2):
                    continue
                merged[elem.tag] = elem
            status = _text(merged, "PerformedProcedureStepStatus") or IN_PROGRESS
            if status in FINAL:
                missing = [t for t in FINAL_REQUIRED if not _text(merged, FINAL_REQUIRED[t])]
                if missing:
                    names = ", ".join(FINAL_REQUIRED[t] for t in missing)
                    raise MppsRefused(0x0120, f"Missing attribute: {names}", missing)
            conn.execute(
                update(mpps)
                .where(mpps.c.pk == row.pk)
                .values(dataset=encode(merged), **self._columns(merged, status))
            )
            self._save_references(conn, row.pk, merged)
            steps = self.worklist.steps_for(conn, _refs(merged))
            self.worklist.set_status(conn, steps, STEP_STATUS[status])
            self._forward(conn, "set", sop_uid, raw, transfer_syntax)
            return MppsOutcome(sop_uid, status, bool(steps), len(steps))

        return self.writer.run(op)

    # ------------------------------------------------------------------ helpers
    def _verify(self, refs: list[dict[str, str]]) -> None:
        """Optional study verification against the worklist (seed 001 §4.3.2.3)."""
        key = self.config.mpps.verify_study
        if not key:
            return
        keyword, column = VERIFY_COLUMNS[key]
        values = [r[column] for r in refs if r.get(column)]
        if not values:
            raise MppsRefused(0x0110, f"Study verification: no {keyword} in the request")
        for value in values:
            if not self.worklist.exists(column, value):
                raise MppsRefused(0x0110, f"Study verification failed: {keyword} {value}"[:64])

    @staticmethod
    def _columns(ds: Dataset, status: str) -> dict[str, Any]:
        first = (ds.get("ScheduledStepAttributesSequence") or [Dataset()])[0]
        return {
            "status": status,
            "pps_id": (_text(ds, "PerformedProcedureStepID") or "")[:16] or None,
            "study_uid": _text(first, "StudyInstanceUID"),
            "accession_number": (_text(first, "AccessionNumber") or "")[:16] or None,
            "sps_id": (_text(first, "ScheduledProcedureStepID") or "")[:16] or None,
            "patient_id": _text(ds, "PatientID"),
            "patient_name": _text(ds, "PatientName"),
            "modality": _text(ds, "Modality"),
            "station_ae": _text(ds, "PerformedStationAETitle"),
            "start_date": normalize_date(_text(ds, "PerformedProcedureStepStartDate")),
            "start_time": normalize_time(_text(ds, "PerformedProcedureStepStartTime")),
            "end_date": normalize_date(_text(ds, "PerformedProcedureStepEndDate")),
            "end_time": normalize_time(_text(ds, "PerformedProcedureStepEndTime")),
            "updated_at": dt.datetime.now(dt.UTC),
        }

    @staticmethod
    def _save_references(conn: Connection, mpps_pk: int, ds: Dataset) -> None:
        conn.execute(delete(mpps_references).where(mpps_references.c.mpps_pk == mpps_pk))
        rows = [
            {"mpps_pk": mpps_pk, "series_uid": s, "sop_class_uid": c, "sop_uid": i}
            for s, c, i in _references(ds)
        ]
        if rows:
            conn.execute(insert(mpps_references), rows)

    def _forward(self, conn: Connection, operation: str, uid: str, raw: bytes, ts: str) -> None:
        """A relay job per destination, in order per MPPS (seed 001 §5: relayed unchanged)."""
        for dest in self.config.mpps_forward:
            JobQueue.add_in(
                conn, FORWARD_JOB,
                {"operation": operation, "sop_uid": uid, "transfer_syntax": ts,
                 "dataset": base64.b64encode(raw).decode("ascii"), "destination": dest.name},
                reference=uid, target=dest.name,
            )  # fmt: skip

    # ------------------------------------------------------------------ reads
    def get(self, sop_uid: str) -> Dataset | None:
        """The MPPS as kept: every attribute of the N-CREATE and N-SETs, merged."""
        with self.engine.connect() as conn:
            data = conn.execute(select(mpps.c.dataset).where(mpps.c.sop_uid == sop_uid)).scalar()
        return None if data is None else decode(data)

    def list(self) -> list[dict[str, Any]]:
        """Every MPPS with how many of the instances it lists the archive holds."""
        referenced = (
            select(mpps_references.c.mpps_pk, func.count().label("n"))
            .group_by(mpps_references.c.mpps_pk)
            .subquery()
        )
        stored = (
            select(
                mpps_references.c.mpps_pk, func.count(func.distinct(instances.c.sop_uid)).label("n")
            )
            .join(instances, instances.c.sop_uid == mpps_references.c.sop_uid)
            .group_by(mpps_references.c.mpps_pk)
            .subquery()
        )
        stmt = (
            select(mpps, referenced.c.n.label("referenced"), stored.c.n.label("stored"))
            .outerjoin(referenced, referenced.c.mpps_pk == mpps.c.pk)
            .outerjoin(stored, stored.c.mpps_pk == mpps.c.pk)
            .order_by(mpps.c.pk)
        )
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]
