"""The virtual modality's DICOM exchanges, each as seed 004 describes it: Verification, Modality
Worklist C-FIND (T3-4..T3-7), MPPS N-CREATE/N-SET (T3-11..T3-14), C-STORE (T3-19..T3-21), Storage
Commitment N-ACTION and the N-EVENT-REPORT that answers it (T3-27..T3-32), Study Root C-FIND
(T3-36..T3-38), and the listener that accepts C-ECHO, C-STORE and commitment reports
(T3-16, T3-22, T3-30).

Owns: one association per activity (as the seed: opened, used, released), the identifiers sent,
and the interpretation of every response status by those tables — the outcome of each exchange
is a ``Step`` (status, meaning, ok, detail) that the run prints and puts in its JSON summary;
failures abort the association where the seed says so; a peer that is down, refuses or aborts
is a failed step with the reason, never an exception.
The DICOM networking is pynetdicom's (as an SCU, and the listener is a pynetdicom server):
unlike the archive's hot path, nothing here is throughput-bound.
Must not: build the objects (``modality.objects``) or decide the workflow (``modality.workflow``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, Association, evt
from pynetdicom import status as dimse_status
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # made at import time
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    SecondaryCaptureImageStorage,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
    XRayRadiationDoseSRStorage,
)

from openpacs.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, generate_uid
from openpacs.modality.config import ModalityConfig, Peer

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRLittleEndian]  # seed: Implicit VR LE
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known SOP Instance (PS3.4 J.3)
STORE_CLASSES = (  # seed 004 T3-15 (SCU)
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
)
RECEIVE_CLASSES = (  # seed 004 T3-16 (SCP)
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    SecondaryCaptureImageStorage,
)
MAX_WORKLIST_ITEMS = 100  # seed 004 T3-66; more: C-CANCEL, the items so far are kept (FE00)
WORKLIST_TIMEOUT = 600.0  # seed 004 T3-66: time-out waiting for the final C-FIND response


def peer_name(peer: Peer) -> str:
    return f"{peer.ae_title}@{peer.host}:{peer.port}"


def meaning_of(code: int, service: dict[int, tuple[str, str]] | None = None) -> tuple[str, str]:
    """(category, meaning) of a DIMSE status, from pynetdicom's tables of PS3.4/PS3.7."""
    for table in (service or {}, dimse_status.GENERAL_STATUS):
        if code in table:
            return table[code]
    return dimse_status.code_to_category(code), "status not defined for this service"


@dataclass(frozen=True)
class AssociationFailure:
    """Why an association request did not succeed, as far as the requestor can tell.

    kind: "unreachable" (no TCP connection), "rejected" (A-ASSOCIATE-RJ; *detail* gives its
    result, source and reason), "no-answer" (connected, nothing came back within the ACSE
    timeout), "aborted" (the peer aborted the request, or accepted no context), "unknown", or
    "error" (a socket error; *detail* is its text).
    """

    kind: str
    detail: str = ""


def associate(
    ae: AE,
    host: str,
    port: int,
    ae_title: str,
    handlers: Sequence[tuple[Any, Callable[..., Any]]] = (),
) -> tuple[Association | None, AssociationFailure | None]:
    """Request an association and, when it fails, classify the failure (one place for the
    modality's steps and its print job)."""
    connected, answered = threading.Event(), threading.Event()
    all_handlers: list[Any] = [
        *handlers,
        (evt.EVT_CONN_OPEN, lambda event: connected.set()),
        (evt.EVT_PDU_RECV, lambda event: answered.set()),
    ]
    try:
        assoc = ae.associate(host, port, ae_title=ae_title, evt_handlers=all_handlers)
    except OSError as exc:  # pragma: no cover - pynetdicom reports socket errors itself
        return None, AssociationFailure("error", str(exc))
    if assoc.is_established:
        return assoc, None
    if not connected.is_set():  # pynetdicom reports a failed connect as an abort
        return None, AssociationFailure("unreachable")
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        detail = (
            f"A-ASSOCIATE-RJ result {rj.result_str}, source {rj.source_str}, "
            f"reason {rj.reason_str}" if rj is not None else "A-ASSOCIATE-RJ"
        )  # fmt: skip
        return None, AssociationFailure("rejected", detail)
    if not answered.is_set():
        return None, AssociationFailure("no-answer")
    if assoc.is_aborted:
        return None, AssociationFailure("aborted")
    return None, AssociationFailure("unknown")


@dataclass
class Step:
    """The outcome of one DICOM exchange, as printed and as put in the JSON summary."""

    step: str
    peer: str
    ok: bool
    status: int | None = None
    meaning: str = ""
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "step": self.step,
            "peer": self.peer,
            "ok": self.ok,
            "status": None if self.status is None else f"0x{self.status:04X}",
            "meaning": self.meaning,
        }
        if self.detail:
            out["detail"] = self.detail
        out.update(self.data)
        return out

    def line(self) -> str:
        code = "" if self.status is None else f" 0x{self.status:04X}"
        detail = f" ({self.detail})" if self.detail else ""
        mark = "ok  " if self.ok else "FAIL"
        return f"{mark} {self.step:<20} {self.peer}{code} {self.meaning}{detail}"


def _status_step(
    name: str,
    peer: Peer,
    rsp: Dataset | None,
    service: dict[int, tuple[str, str]] | None,
    ok_categories: Iterable[str] = ("Success", "Warning"),
) -> Step:
    if rsp is None or "Status" not in rsp:
        return Step(
            name,
            peer_name(peer),
            False,
            None,
            "no response",
            "the association was aborted or timed out (DIMSE timeout)",
        )
    code = int(rsp.Status)
    category, meaning = meaning_of(code, service)
    extra = []
    for keyword in ("ErrorComment", "ErrorID"):
        if keyword in rsp and rsp[keyword].value:
            extra.append(f"{keyword}: {rsp[keyword].value}")
    for keyword in ("AttributeIdentifierList", "OffendingElement"):
        if keyword in rsp and rsp[keyword].value:
            value = rsp[keyword].value
            values = value if isinstance(value, list | tuple) else [value]
            extra.append(f"{keyword}: " + " ".join(f"{int(t):08X}" for t in values))
    return Step(
        name,
        peer_name(peer),
        category in ok_categories,
        code,
        f"{category}: {meaning}",
        "; ".join(extra),
    )


class Scu:
    """Opens associations as the modality's AE title, one per activity."""

    def __init__(self, config: ModalityConfig) -> None:
        self.config = config

    def _ae(self, contexts: Sequence[str], roles: dict[str, tuple[bool, bool]] | None = None) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.acse_timeout = self.config.acse_timeout
        ae.dimse_timeout = self.config.network_timeout
        ae.network_timeout = self.config.network_timeout
        ae.connection_timeout = self.config.acse_timeout
        for abstract in contexts:
            ae.add_requested_context(abstract, TRANSFER_SYNTAXES)
        return ae

    def _associate(
        self,
        name: str,
        peer: Peer,
        contexts: Sequence[str],
        handlers: list[tuple[Any, Callable[..., Any]]] | None = None,
    ) -> tuple[Association | None, Step | None]:
        assoc, failure = associate(
            self._ae(contexts), peer.host, peer.port, peer.ae_title, handlers or ()
        )
        if failure is None:
            return assoc, None
        timeout = self.config.acse_timeout
        meaning, detail = {
            "error": ("no association", failure.detail),
            "unreachable": (
                "no association",
                "not reachable: connection refused, no route, or no answer within "
                f"{timeout:g} s (connection timeout)",
            ),
            "rejected": ("association rejected", failure.detail),
            "no-answer": (
                "no association",
                f"accepted the connection but did not answer the association request within "
                f"{timeout:g} s (ACSE timeout)",
            ),
            "aborted": ("association aborted", "the peer aborted the association request"),
        }.get(
            failure.kind,
            (
                "no association",
                "the peer is not reachable or did not answer in time "
                f"(connection/ACSE timeout {timeout:g} s)",
            ),
        )
        return None, Step(name, peer_name(peer), False, None, meaning, detail)

    # ---------------------------------------------------------------------- Verification
    def echo(self, peer: Peer) -> Step:
        assoc, failed = self._associate("echo", peer, [Verification])
        if assoc is None:
            assert failed is not None
            return failed
        try:
            rsp = assoc.send_c_echo()
            return _status_step("echo", peer, rsp, dimse_status.VERIFICATION_SERVICE_CLASS_STATUS)
        finally:
            _close(assoc)

    # ---------------------------------------------------------------------- Worklist
    def worklist_identifier(
        self,
        *,
        day: date | None = None,
        any_date: bool = False,
        modality: str | None = None,
        station_ae: str | None = None,
        patient_name: str = "",
        patient_id: str = "",
        accession: str = "",
    ) -> Dataset:
        """Seed 004 T3-7: matching keys today's date, the modality and (optionally) the station
        AE title; every return key of the table with zero length."""
        ds = Dataset()
        ds.SpecificCharacterSet = ""
        sps = Dataset()
        sps.ScheduledStationAETitle = station_ae or ""
        sps.ScheduledProcedureStepStartDate = (
            "" if any_date else (day or date.today()).strftime("%Y%m%d")
        )
        sps.ScheduledProcedureStepStartTime = ""
        sps.PreMedication = ""
        sps.Modality = modality or ""
        sps.ScheduledPerformingPhysicianName = ""
        sps.ScheduledProtocolCodeSequence = []
        sps.ScheduledProcedureStepID = ""
        sps.ScheduledProcedureStepDescription = ""
        ds.ScheduledProcedureStepSequence = [sps]
        for keyword in (
            "RequestedProcedureComments",
            "RequestedProcedureID",
            "RequestedProcedureDescription",
            "NamesOfIntendedRecipientsOfResults",
            "StudyInstanceUID",
            "RequestedProcedurePriority",
            "RequestingPhysician",
            "ReferringPhysicianName",
            "RequestingService",
            "ImagingServiceRequestComments",
            "AdmissionID",
            "InstitutionName",
            "CurrentPatientLocation",
            "AdmittingDiagnosesDescription",
            "PatientBirthDate",
            "PatientSex",
            "ConfidentialityConstraintOnPatientDataDescription",
            "EthnicGroup",
            "PatientComments",
            "PatientAddress",
            "PatientState",
            "PregnancyStatus",
            "MedicalAlerts",
            "Allergies",
            "SpecialNeeds",
            "AdditionalPatientHistory",
            "OtherPatientIDsSequence",
            "IssuerOfPatientID",
            "PatientWeight",
        ):
            setattr(ds, keyword, [] if keyword.endswith("Sequence") else "")
        ds.RequestedProcedureCodeSequence = []
        ds.ReferencedStudySequence = []
        ds.ReferencedPatientSequence = []
        ds.AccessionNumber = accession
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        return ds

    def query_worklist(
        self, identifier: Dataset, max_items: int = MAX_WORKLIST_ITEMS
    ) -> tuple[Step, list[Dataset]]:
        peer = self.config.worklist
        if peer is None:
            return Step("worklist", "-", False, None, "no [worklist] peer configured"), []
        return self._find(
            "worklist",
            peer,
            ModalityWorklistInformationFind,
            identifier,
            max_items,
            dimse_status.MODALITY_WORKLIST_SERVICE_CLASS_STATUS,
        )

    def query_studies(self, peer: Peer, identifier: Dataset) -> tuple[Step, list[Dataset]]:
        return self._find(
            "query",
            peer,
            StudyRootQueryRetrieveInformationModelFind,
            identifier,
            10_000,
            dimse_status.QR_FIND_SERVICE_CLASS_STATUS,
        )

    def _find(
        self,
        name: str,
        peer: Peer,
        model: str,
        identifier: Dataset,
        max_items: int,
        service: dict[int, tuple[str, str]],
    ) -> tuple[Step, list[Dataset]]:
        """C-FIND as seed 004 T3-5/T3-38: pending answers collected (FF01 logged once); more than
        *max_items*: C-CANCEL, and FE00 then means complete; anything but success, pending or
        that cancel: the association is aborted and the query failed."""
        assoc, failed = self._associate(name, peer, [model])
        if assoc is None:
            assert failed is not None
            return failed, []
        items: list[Dataset] = []
        warned = False
        cancelled = False
        step: Step | None = None
        try:
            message_id = 1
            responses = assoc.send_c_find(identifier, model, msg_id=message_id)
            for rsp, item in responses:
                if rsp is None or "Status" not in rsp:
                    step = _status_step(name, peer, None, service)
                    break
                code = int(rsp.Status)
                if code in (0xFF00, 0xFF01):
                    if code == 0xFF01 and not warned:
                        warned = True
                        log.warning(
                            "%s: %s answers 0xFF01 (optional keys not supported)",
                            name,
                            peer_name(peer),
                        )
                    if item is not None:
                        items.append(item)
                    if len(items) >= max_items and not cancelled:
                        cancelled = True
                        assoc.send_c_cancel(message_id, None, model)
                    continue
                step = _status_step(name, peer, rsp, service, ("Success",))
                if code == 0xFE00 and cancelled:
                    step.ok = True
                    step.detail = f"cancelled after {max_items} items (the maximum)"
                break
            if step is None:
                step = _status_step(name, peer, None, service)
        finally:
            if step is not None and not step.ok:
                assoc.abort()
            else:
                _close(assoc)
        assert step is not None
        if warned:
            step.detail = (
                step.detail + "; " if step.detail else ""
            ) + "0xFF01: optional keys not supported"
        step.data["matches"] = len(items)
        return (
            step,
            items,
        )  # on failure: the items so far (seed 004 T3-38: "list built up to the error")

    # ---------------------------------------------------------------------- MPPS
    def mpps_create(self, ds: Dataset, sop_uid: str) -> Step:
        peer = self.config.mpps
        if peer is None:
            return Step("mpps-create", "-", False, None, "no [mpps] peer configured")
        assoc, failed = self._associate("mpps-create", peer, [ModalityPerformedProcedureStep])
        if assoc is None:
            assert failed is not None
            return failed
        step: Step | None = None
        try:
            settle_reactor(assoc)
            rsp, _ = assoc.send_n_create(ds, ModalityPerformedProcedureStep, sop_uid)
            step = _status_step("mpps-create", peer, rsp, dimse_status.PROCEDURE_STEP_STATUS)
            step.data["mpps_uid"] = sop_uid
            return step
        finally:
            _end(assoc, step)

    def mpps_set(self, ds: Dataset, sop_uid: str, name: str = "mpps-set") -> Step:
        peer = self.config.mpps
        if peer is None:
            return Step(name, "-", False, None, "no [mpps] peer configured")
        assoc, failed = self._associate(name, peer, [ModalityPerformedProcedureStep])
        if assoc is None:
            assert failed is not None
            return failed
        step: Step | None = None
        try:
            settle_reactor(assoc)
            rsp, _ = assoc.send_n_set(ds, ModalityPerformedProcedureStep, sop_uid)
            step = _status_step(name, peer, rsp, dimse_status.PROCEDURE_STEP_STATUS)
            step.data["mpps_uid"] = sop_uid
            return step
        finally:
            _end(assoc, step)

    # ---------------------------------------------------------------------- Storage
    def store(self, peer: Peer, datasets: Sequence[Dataset]) -> tuple[Step, list[dict[str, Any]]]:
        """C-STORE every data set on one association (seed 004 T3-19/T3-20): a failure status
        aborts the association and fails the job; a class whose context was not accepted
        aborts it too. Returns the step and one result per instance."""
        classes = sorted({str(ds.SOPClassUID) for ds in datasets})
        assoc, failed = self._associate("store", peer, classes)
        results: list[dict[str, Any]] = []
        if assoc is None:
            assert failed is not None
            return failed, results
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        missing = [c for c in classes if c not in accepted]
        if missing:
            assoc.abort()
            return Step(
                "store",
                peer_name(peer),
                False,
                None,
                "presentation context not accepted",
                "A-ABORT: the peer accepts no context for " + ", ".join(missing),
            ), results
        step: Step | None = None
        warnings = 0
        try:
            for ds in datasets:
                rsp = assoc.send_c_store(ds)
                one = _status_step("store", peer, rsp, dimse_status.STORAGE_SERVICE_CLASS_STATUS)
                results.append(
                    {
                        "sop_class_uid": str(ds.SOPClassUID),
                        "sop_instance_uid": str(ds.SOPInstanceUID),
                        "status": None if one.status is None else f"0x{one.status:04X}",
                        "meaning": one.meaning,
                        "ok": one.ok,
                    }
                )
                if not one.ok:
                    one.detail = (f"instance {ds.SOPInstanceUID}: " + one.detail).rstrip(": ")
                    one.data["stored"] = sum(1 for r in results if r["ok"])
                    step = one
                    return step, results
                if one.status and one.status != 0:
                    warnings += 1
            step = Step(
                "store",
                peer_name(peer),
                True,
                0x0000,
                "Success",
                f"{len(results)} instance(s)"
                + (f", {warnings} with a warning" if warnings else ""),
                {"stored": len(results)},
            )
            return step, results
        finally:
            _end(assoc, step)

    # ---------------------------------------------------------------------- Commitment
    def request_commitment(
        self,
        peer: Peer,
        instances: Sequence[tuple[str, str]],
        *,
        same_association_wait: float | None = None,
    ) -> tuple[Step, Commitment]:
        """N-ACTION (seed 004 T3-27/T3-28), then wait for the N-EVENT-REPORT on the same
        association for *same_association_wait* (T3-66: 120 s) before releasing it; if it has
        not come, the report may still arrive on a new association to the ``Listener``."""
        wait = (
            self.config.commitment_timeout
            if same_association_wait is None
            else same_association_wait
        )
        transaction = generate_uid()
        commitment = Commitment(transaction, peer_name(peer), tuple(u for _, u in instances))
        _PENDING.expect(commitment)  # before the N-ACTION: the report may come at once

        def on_report(event: Any) -> tuple[Dataset | int, Dataset | None]:
            return handle_report(event, "same association")

        assoc, failed = self._associate(
            "commitment-request",
            peer,
            [StorageCommitmentPushModel],
            [(evt.EVT_N_EVENT_REPORT, on_report)],
        )
        if assoc is None:
            assert failed is not None
            commitment.forget()
            return failed, commitment
        request = Dataset()
        request.TransactionUID = transaction
        request.ReferencedSOPSequence = []
        for sop_class, sop_uid in instances:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_uid
            request.ReferencedSOPSequence.append(item)
        step: Step | None = None
        try:
            settle_reactor(assoc)
            rsp, _ = assoc.send_n_action(
                request, 1, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
            )
            step = _status_step(
                "commitment-request",
                peer,
                rsp,
                dimse_status.STORAGE_COMMITMENT_SERVICE_CLASS_STATUS,
                ("Success",),
            )
            step.data["transaction_uid"] = transaction
            if not step.ok:
                commitment.forget()
                return step, commitment
            commitment.done.wait(wait)  # the report may come on this association
            return step, commitment
        finally:
            _end(assoc, step)


def settle_reactor(assoc: Association) -> None:
    """Hold pynetdicom's association reactor before a request. pynetdicom's ``send_n_*`` pause the
    reactor by clearing a checkpoint and waiting for its ``_is_paused`` flag, but the flag is
    still True for an instant after the reactor has passed the checkpoint; a send in that window
    lets the reactor take the response off the queue (logged "Received unexpected N-GET service
    message") and the request waits out the DIMSE timeout — about 1 in 3,000 requests against a
    local dcmprscp (pynetdicom 3.0; cf. pydicom/pynetdicom#435). Clearing the checkpoint first
    and letting one reactor loop (1 ms sleep) pass closes the window."""
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if checkpoint is None:  # pragma: no cover - a pynetdicom without the checkpoint
        return
    checkpoint.clear()
    time.sleep(0.003)
    deadline = time.monotonic() + 1.0
    while not getattr(assoc, "_is_paused", True) and time.monotonic() < deadline:
        time.sleep(0.0005)


def _close(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()


def _end(assoc: Association, step: Step | None) -> None:
    """Release after success; abort after a failure (the seed's tables: "the association is
    aborted")."""
    if not assoc.is_established:
        return
    if step is None or not step.ok:
        assoc.abort()
    else:
        assoc.release()


# -------------------------------------------------------------------------- commitment results
@dataclass
class Commitment:
    """One Storage Commitment transaction and, once reported, its result (seed 004 T3-31)."""

    transaction_uid: str
    peer: str
    requested: tuple[str, ...]
    issued: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    event_type: int | None = None
    committed: list[str] = field(default_factory=list)
    failed: list[tuple[str, int | None]] = field(default_factory=list)
    via: str = ""
    retrieve_ae: str = ""
    registry: _Registry | None = None

    def forget(self) -> None:
        if self.registry is not None:
            self.registry.forget(self.transaction_uid)

    def step(self, timeout: float) -> Step:
        """The report as a run step: event 1 ok; event 2 a failure naming each failed instance
        and its reason; no report within *timeout*: a failure (T3-28's timer)."""
        if not self.done.is_set():
            return Step(
                "commitment-report",
                self.peer,
                False,
                None,
                "no report",
                f"no N-EVENT-REPORT for transaction {self.transaction_uid} within {timeout:g} s",
                {"transaction_uid": self.transaction_uid},
            )
        data: dict[str, Any] = {
            "transaction_uid": self.transaction_uid,
            "event_type": self.event_type,
            "via": self.via,
            "committed": list(self.committed),
            "failed": [
                {
                    "sop_instance_uid": uid,
                    "reason": None if r is None else f"0x{r:04X}",
                    "meaning": meaning_of(
                        r or 0, dimse_status.STORAGE_COMMITMENT_SERVICE_CLASS_STATUS
                    )[1]
                    if r is not None
                    else "",
                }
                for uid, r in self.failed
            ],
        }
        if self.retrieve_ae:
            data["retrieve_ae_title"] = self.retrieve_ae
        if self.event_type == 1:
            return Step(
                "commitment-report",
                self.peer,
                True,
                None,
                "Storage Commitment Request Successful (event 1)",
                f"{len(self.committed)} committed, via {self.via}",
                data,
            )
        reasons = ", ".join(
            f"{uid} 0x{r:04X}" if r is not None else uid for uid, r in self.failed[:5]
        )
        return Step(
            "commitment-report",
            self.peer,
            False,
            None,
            "Storage Commitment Request Complete - Failures Exist (event 2)",
            f"{len(self.committed)} committed, {len(self.failed)} failed: {reasons}",
            data,
        )


class _Registry:
    """The transactions waiting for their report (T3-32: unknown → 0211, expired → 0213)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: dict[str, Commitment] = {}
        self.expired: set[str] = set()

    def expect(self, commitment: Commitment) -> None:
        with self.lock:
            commitment.registry = self
            self.pending[commitment.transaction_uid] = commitment

    def forget(self, transaction_uid: str) -> None:
        with self.lock:
            if self.pending.pop(transaction_uid, None) is not None:
                self.expired.add(transaction_uid)

    def report(self, event: Any, via: str) -> tuple[Dataset | int, Dataset | None]:
        """Seed 004 T3-31/T3-32: the N-EVENT-REPORT's response status."""
        info = event.event_information
        event_type = int(event.event_type)
        status = Dataset()
        transaction = str(getattr(info, "TransactionUID", "") or "")
        with self.lock:
            commitment = self.pending.get(transaction)
            expired = transaction in self.expired
        if commitment is None:
            status.Status = 0x0213 if expired else 0x0211
            status.ErrorComment = (
                f"transaction {transaction} has expired"
                if expired
                else f"transaction {transaction or '(none)'} was never requested"
            )[:64]
            log.warning("commitment report via %s refused: %s", via, status.ErrorComment)
            return status, None
        if event_type not in (1, 2):
            status.Status = 0x0113
            status.ErrorComment = f"event type {event_type} is not 1 or 2"
            return status, None
        try:
            committed = [
                str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])
            ]
            failed = [
                (
                    str(i.ReferencedSOPInstanceUID),
                    int(i.FailureReason) if "FailureReason" in i else None,
                )
                for i in info.get("FailedSOPSequence", [])
            ]
        except (AttributeError, ValueError, TypeError) as exc:
            status.Status = 0x0110
            status.ErrorComment = f"cannot read the event information: {exc}"[:64]
            return status, None
        unknown = [u for u in committed + [u for u, _ in failed] if u not in commitment.requested]
        if unknown:
            status.Status = 0x0115
            status.ErrorComment = "SOP Instance(s) not in the request"
            reply = Dataset()
            reply.ReferencedSOPSequence = []
            for uid in unknown:
                item = Dataset()
                item.ReferencedSOPInstanceUID = uid
                reply.ReferencedSOPSequence.append(item)
            return status, reply
        commitment.event_type = event_type
        commitment.committed = committed
        commitment.failed = failed
        commitment.via = via
        commitment.retrieve_ae = str(info.get("RetrieveAETitle", "") or "")
        with self.lock:
            self.pending.pop(transaction, None)
            self.expired.add(transaction)
        commitment.done.set()
        log.info("commitment report (event %d) for %s via %s", event_type, transaction, via)
        status.Status = 0x0000
        return status, None


_PENDING = _Registry()


def handle_report(event: Any, via: str) -> tuple[Dataset | int, Dataset | None]:
    return _PENDING.report(event, via)


class Listener:
    """The modality's own listener (seed 004 T3-16, T3-22, T3-30): C-ECHO, C-STORE of CR/DX/SC
    images (kept under *received_dir*), and Storage Commitment reports on a new association
    (the archive proposing the SCP role)."""

    def __init__(self, config: ModalityConfig, received_dir: Path | None = None) -> None:
        self.config = config
        self.received_dir = received_dir
        self.received: list[str] = []
        self.server: Any = None

    def start(self) -> None:
        ae = AE(ae_title=self.config.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.network_timeout = self.config.network_timeout
        ae.acse_timeout = self.config.acse_timeout
        ae.dimse_timeout = self.config.network_timeout
        ae.maximum_associations = 5  # seed 004 T3-66
        syntaxes = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, "1.2.840.10008.1.2.2"]
        ae.add_supported_context(Verification, syntaxes)
        for abstract in RECEIVE_CLASSES:
            ae.add_supported_context(abstract, syntaxes)
        ae.add_supported_context(
            StorageCommitmentPushModel, syntaxes, scu_role=False, scp_role=True
        )
        ae.require_called_aet = True
        handlers: list[Any] = [
            (evt.EVT_N_EVENT_REPORT, lambda event: handle_report(event, "new association")),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: 0x0000),
        ]
        self.server = ae.start_server(
            (self.config.host, self.config.port), block=False, evt_handlers=handlers
        )
        log.info(
            "modality listener on %s:%d as %s",
            self.config.host,
            self.config.port,
            self.config.ae_title,
        )

    def _on_store(self, event: Any) -> int:
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
        except Exception as exc:
            log.warning("incoming C-STORE refused: cannot decode (%s)", exc)
            return 0xC000
        uid = str(ds.SOPInstanceUID)
        if self.received_dir is not None:
            try:
                self.received_dir.mkdir(parents=True, exist_ok=True)
                ds.save_as(self.received_dir / f"{uid}.dcm", enforce_file_format=True)
            except OSError as exc:
                log.error("incoming C-STORE of %s: cannot write (%s)", uid, exc)
                return 0xA700
        self.received.append(uid)
        return 0x0000

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
