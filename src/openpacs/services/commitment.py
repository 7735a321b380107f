"""Storage Commitment (Push Model) — the archive's side (PS3.4 Annex J, seed 002 §3.2.9).

Owns: deciding, for each referenced instance, whether the archive has committed to keep it
(present with the same SOP Class; otherwise Failure Reason 0112 no such object instance, or
0119 class/instance conflict — PS3.4 J.3.2.1.1.2), keeping the result as a durable job, and
building the N-EVENT-REPORT data set (event 1 all committed, 2 failures exist; Retrieve AE
Title set). Delivery itself (same association, or a new one to the requester from [[remote]]
with the SCP role) is done by ``dimse.commitment_scp`` and the job runner.
Must not: speak DIMSE.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom import Dataset
from sqlalchemy import Engine, select

from openpacs.index.schema import instances
from openpacs.services.jobs import JobQueue

log = logging.getLogger(__name__)

JOB_KIND = "commitment-report"
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
PROCESSING_FAILURE = 0x0110
EVENT_ALL_COMMITTED = 1
EVENT_FAILURES = 2


@dataclass(frozen=True)
class Reference:
    sop_class_uid: str
    sop_instance_uid: str


@dataclass
class CommitmentResult:
    transaction_uid: str
    requester: str  # calling AE title of the N-ACTION
    committed: list[Reference]
    failed: list[tuple[Reference, int]]  # (reference, failure reason)

    @property
    def event_type(self) -> int:
        return EVENT_FAILURES if self.failed else EVENT_ALL_COMMITTED

    def to_payload(self) -> dict[str, object]:
        return {
            "transaction_uid": self.transaction_uid,
            "requester": self.requester,
            "committed": [[r.sop_class_uid, r.sop_instance_uid] for r in self.committed],
            "failed": [[r.sop_class_uid, r.sop_instance_uid, reason] for r, reason in self.failed],
        }

    @classmethod
    def from_payload(cls, payload: dict[str, object]) -> CommitmentResult:
        committed = [Reference(c, i) for c, i in payload["committed"]]  # type: ignore[attr-defined]
        failed = [(Reference(c, i), int(r)) for c, i, r in payload["failed"]]  # type: ignore[attr-defined]
        return cls(str(payload["transaction_uid"]), str(payload["requester"]), committed, failed)

    def event_dataset(self, retrieve_ae_title: str) -> Dataset:
        """The N-EVENT-REPORT Event Information (PS3.4 J.3.3.1.1 / J.3.3.1.2)."""
        ds = Dataset()
        ds.TransactionUID = self.transaction_uid
        ds.RetrieveAETitle = retrieve_ae_title
        if self.committed:
            items = []
            for ref in self.committed:
                item = Dataset()
                item.ReferencedSOPClassUID = ref.sop_class_uid
                item.ReferencedSOPInstanceUID = ref.sop_instance_uid
                items.append(item)
            ds.ReferencedSOPSequence = items
        if self.failed:
            items = []
            for ref, reason in self.failed:
                item = Dataset()
                item.ReferencedSOPClassUID = ref.sop_class_uid
                item.ReferencedSOPInstanceUID = ref.sop_instance_uid
                item.FailureReason = reason
                items.append(item)
            ds.FailedSOPSequence = items
        return ds


class CommitmentService:
    def __init__(self, engine: Engine, jobs: JobQueue) -> None:
        self.engine = engine
        self.jobs = jobs

    def evaluate(
        self, transaction_uid: str, requester: str, references: Sequence[Reference]
    ) -> CommitmentResult:
        uids = sorted({r.sop_instance_uid for r in references})
        stored: dict[str, set[str]] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(uids), 500):
                chunk = uids[start : start + 500]
                for sop_uid, sop_class in conn.execute(
                    select(instances.c.sop_uid, instances.c.sop_class_uid).where(
                        instances.c.sop_uid.in_(chunk)
                    )
                ):
                    stored.setdefault(sop_uid, set()).add(sop_class)
        committed: list[Reference] = []
        failed: list[tuple[Reference, int]] = []
        for ref in references:
            classes = stored.get(ref.sop_instance_uid)
            if not classes:
                failed.append((ref, NO_SUCH_OBJECT_INSTANCE))
            elif ref.sop_class_uid not in classes:
                failed.append((ref, CLASS_INSTANCE_CONFLICT))
            else:
                committed.append(ref)
        return CommitmentResult(transaction_uid, requester, committed, failed)

    def keep(self, result: CommitmentResult, delay: float = 0.0) -> int:
        """Store the result as a durable delivery job; returns the job key."""
        return self.jobs.add(
            JOB_KIND,
            result.to_payload(),
            reference=result.transaction_uid,
            target=result.requester,
            delay=delay,
        )
