"""The virtual modality's exam workflow (seed 004 §3.1.3, Figures 2–5): select the worklist item
(or register an unscheduled patient), MPPS IN PROGRESS, acquire (synthesise) the images and the
dose report, MPPS COMPLETED or DISCONTINUED, store to every destination, Storage Commitment, and
print when asked.

Owns: the order of the steps and what a failure of one means for the next (an MPPS that could
not be created is not updated; a store that failed is not committed; the other destinations
still get their images), waiting for outstanding commitment reports, and the run report — every
step with its status and every UID — that the command prints or writes as JSON.
Must not: speak DICOM itself (``modality.scu``, ``modality.printing``) or build objects
(``modality.objects``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset

from openpacs.modality import objects, scu
from openpacs.modality.config import ModalityConfig
from openpacs.modality.scu import Commitment, Listener, Scu, Step

log = logging.getLogger(__name__)


class SelectionError(Exception):
    """No single worklist item could be chosen; the message says why (and lists the items)."""


@dataclass
class RunRequest:
    accession: str | None = None
    first: bool = False
    images: int = 1
    discontinue: str | None = None  # a key of objects.DISCONTINUATION_REASONS
    print_films: bool = False
    unscheduled: dict[str, str] | None = None  # patient_id, patient_name, birth_date, sex
    anatomy: str = "chest"
    received_dir: Path | None = None
    same_association_wait: float | None = None  # default: config.commitment_timeout
    commitment_wait: float | None = None  # default: config.commitment_wait


@dataclass
class RunReport:
    steps: list[Step] = field(default_factory=list)
    procedure: dict[str, Any] = field(default_factory=dict)
    instances: list[dict[str, str]] = field(default_factory=list)
    mpps_uid: str | None = None

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(s.ok for s in self.steps)

    def add(self, step: Step) -> Step:
        self.steps.append(step)
        log.log(logging.INFO if step.ok else logging.ERROR, "%s", step.line())
        return step

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "procedure": self.procedure,
            "mpps_uid": self.mpps_uid,
            "instances": self.instances,
            "steps": [s.to_json() for s in self.steps],
        }


def worklist_items(config: ModalityConfig, client: Scu, **keys: Any) -> tuple[Step, list[Dataset]]:
    """Seed 004 T3-7 query: today's date, the configured modality and station AE title."""
    identifier = client.worklist_identifier(
        modality=keys.pop("modality", config.modality),
        station_ae=keys.pop("station_ae", config.ae_title),
        **keys,
    )
    return client.query_worklist(identifier)


def describe_item(item: Dataset) -> dict[str, str]:
    sps = (
        item.ScheduledProcedureStepSequence[0]
        if item.get("ScheduledProcedureStepSequence")
        else Dataset()
    )
    return {
        "date": str(sps.get("ScheduledProcedureStepStartDate", "") or ""),
        "time": str(sps.get("ScheduledProcedureStepStartTime", "") or "")[:6],
        "accession_number": str(item.get("AccessionNumber", "") or ""),
        "patient_id": str(item.get("PatientID", "") or ""),
        "patient_name": str(item.get("PatientName", "") or ""),
        "procedure": str(
            item.get("RequestedProcedureDescription", "")
            or sps.get("ScheduledProcedureStepDescription", "")
            or ""
        ),
        "station_ae": str(sps.get("ScheduledStationAETitle", "") or ""),
        "modality": str(sps.get("Modality", "") or ""),
        "sps_id": str(sps.get("ScheduledProcedureStepID", "") or ""),
        "study_instance_uid": str(item.get("StudyInstanceUID", "") or ""),
    }


def select(items: list[Dataset], accession: str | None, first: bool) -> Dataset:
    if accession is not None:
        items = [i for i in items if str(i.get("AccessionNumber", "")) == accession]
        if not items:
            raise SelectionError(f"no worklist item with Accession Number {accession!r}")
    if not items:
        raise SelectionError("the worklist has no item for this modality today")
    if len(items) > 1 and not first:
        listed = "; ".join(
            f"{d['accession_number']} {d['patient_name']} {d['procedure']}"
            for d in map(describe_item, items[:10])
        )
        raise SelectionError(
            f"{len(items)} worklist items match: choose with --accession or --first ({listed})"
        )
    return items[0]


def run(config: ModalityConfig, request: RunRequest) -> RunReport:
    report = RunReport()
    client = Scu(config)
    listener: Listener | None = None
    if any(s.commit for s in config.store):
        listener = Listener(config, request.received_dir)
        try:
            listener.start()
        except OSError as exc:
            report.add(
                Step(
                    "listener",
                    f"{config.ae_title}@{config.host}:{config.port}",
                    False,
                    None,
                    "cannot listen",
                    f"{exc} (commitment reports on a new association will be lost)",
                )
            )
            listener = None
    try:
        _run(config, request, client, report)
    finally:
        if listener is not None:
            listener.stop()
    return report


def _run(config: ModalityConfig, request: RunRequest, client: Scu, report: RunReport) -> None:
    # 1. the procedure: from the worklist, or an unscheduled (locally registered) patient
    if request.unscheduled is not None:
        u = request.unscheduled
        proc = objects.unscheduled_procedure(
            u["patient_id"],
            u["patient_name"],
            u.get("birth_date", ""),
            u.get("sex", ""),
            accession_number=u.get("accession_number", ""),
        )
        report.add(
            Step(
                "register",
                "local",
                True,
                None,
                "unscheduled patient registered locally",
                f"{proc.patient_id} {proc.patient_name}",
            )
        )
    else:
        keys: dict[str, Any] = {}
        if request.accession:
            keys["accession"] = request.accession
        step, items = worklist_items(config, client, **keys)
        report.add(step)
        if not step.ok:
            return
        try:
            item = select(items, request.accession, request.first)
        except SelectionError as exc:
            report.add(Step("select", "local", False, None, "no item selected", str(exc)))
            return
        proc = objects.procedure_from_worklist(item)
        report.add(
            Step(
                "select",
                "local",
                True,
                None,
                "worklist item selected",
                f"{proc.accession_number} {proc.patient_name}",
                {"item": describe_item(item)},
            )
        )
    performed = objects.new_performed(proc, config, anatomy=request.anatomy)
    report.mpps_uid = performed.mpps_uid
    report.procedure = {
        "patient_id": proc.patient_id,
        "patient_name": proc.patient_name,
        "accession_number": proc.accession_number,
        "study_instance_uid": proc.study_uid,
        "scheduled": proc.scheduled,
        "performed_procedure_step_id": performed.pps_id,
    }

    # 2. MPPS IN PROGRESS at the first exposure
    mpps_ok = False
    if config.mpps is not None:
        step = report.add(
            client.mpps_create(objects.mpps_create(proc, performed, config), performed.mpps_uid)
        )
        mpps_ok = step.ok

    # 3. acquisition
    images = objects.make_images(proc, performed, config, request.images) if request.images else []
    dose = objects.make_dose_sr(proc, performed, config, images) if images else None
    created = images + ([dose] if dose is not None else [])
    for ds in created:
        report.instances.append(
            {
                "kind": "dose-report" if ds is dose else "image",
                "sop_class_uid": str(ds.SOPClassUID),
                "sop_instance_uid": str(ds.SOPInstanceUID),
                "series_instance_uid": str(ds.SeriesInstanceUID),
            }
        )
    report.add(
        Step(
            "acquire",
            "local",
            True,
            None,
            f"{len(images)} image(s) and "
            f"{'a dose report' if dose is not None else 'no dose report'} created",
        )
    )

    # 4. MPPS COMPLETED / DISCONTINUED
    reason = None
    if request.discontinue:
        reason = objects.DISCONTINUATION_REASONS[request.discontinue]
    if config.mpps is not None:
        if mpps_ok:
            final = objects.mpps_set(proc, performed, config, images, dose, discontinue=reason)
            name = "mpps-discontinued" if reason is not None else "mpps-completed"
            report.add(client.mpps_set(final, performed.mpps_uid, name))
        else:
            report.add(
                Step(
                    "mpps-set",
                    scu.peer_name(config.mpps),
                    False,
                    None,
                    "not sent",
                    "the MPPS was not created, so it cannot be completed",
                )
            )

    # 5. store, then commitment, per destination
    commitments: list[Commitment] = []
    if created:
        for peer in config.store:
            step, _results = client.store(peer, created)
            report.add(step)
            if not step.ok or not peer.commit:
                continue
            refs = [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in created]
            step, commitment = client.request_commitment(
                peer, refs, same_association_wait=request.same_association_wait
            )
            report.add(step)
            if step.ok:
                commitments.append(commitment)

    # 6. the reports still outstanding may come on a new association (T3-30)
    wait = config.commitment_wait if request.commitment_wait is None else request.commitment_wait
    for commitment in commitments:
        remaining = commitment.issued + wait - time.monotonic()
        if remaining > 0:
            commitment.done.wait(remaining)
        if not commitment.done.is_set():
            commitment.forget()  # a late report now gets 0x0213 (T3-32)
        report.add(commitment.step(wait))

    # 7. film
    if request.print_films:
        from openpacs.modality import printing

        if not config.printer:
            report.add(Step("print", "-", False, None, "no [[printer]] configured"))
        for printer in config.printer:
            result = printing.print_images(
                printer,
                config.ae_title,
                images,
                network_timeout=config.network_timeout,
                acse_timeout=config.acse_timeout,
            )
            for ps in result.steps:
                report.add(
                    Step(
                        f"print-{ps.name}",
                        scu.peer_name(printer),
                        ps.ok,
                        ps.status,
                        ps.meaning,
                        ps.detail,
                    )
                )
