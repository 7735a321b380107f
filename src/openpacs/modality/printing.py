"""Printing the acquired images on a DICOM printer: Basic Grayscale Print Management as seed 004
§3.2.6 describes it (Tables 3-39 .. 3-56).

Owns: the rendering of a modality image into a Preformatted Grayscale Image (modality LUT, the
image's VOI window, MONOCHROME2, 8 or 12 bits — T3-51), the print sequence on one association
(Film Session N-CREATE → per film: Film Box N-CREATE, Image Box N-SET per image, Film Box
N-ACTION print, Film Box N-DELETE → Printer N-GET → Film Session N-DELETE), the interpretation
of every response status by the seed's tables, Printer N-EVENT-REPORTs received at any time
(T3-55/56), and the communication failures of T3-44. Every exchange ends as a ``PrintStep``;
a DICOM-level failure is a failed step, never an exception.
Must not: choose the printer or the images (the workflow does) or read configuration files.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import UID, ImplicitVRLittleEndian
from pynetdicom import AE, Association, evt

from openpacs.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, generate_uid
from openpacs.modality.config import Peer
from openpacs.modality.scu import associate, settle_reactor

log = logging.getLogger(__name__)

__all__ = [
    "STATUS_MEANINGS",
    "FilmOptions",
    "PrintResult",
    "PrintStep",
    "PrinterEvent",
    "print_images",
    "render_preformatted",
    "status_category",
    "status_meaning",
]

# SOP classes of Basic Grayscale Print Management (PS3.4 H.3.1, H.5; seed 004 T3-39).
BasicGrayscalePrintManagementMeta = UID("1.2.840.10008.5.1.1.9")
BasicFilmSession = UID("1.2.840.10008.5.1.1.1")
BasicFilmBox = UID("1.2.840.10008.5.1.1.2")
BasicGrayscaleImageBox = UID("1.2.840.10008.5.1.1.4")
Printer = UID("1.2.840.10008.5.1.1.16")
PrinterInstance = UID("1.2.840.10008.5.1.1.17")  # the well-known Printer SOP Instance

PRINT_ACTION = 1  # Film Box N-ACTION Action Type ID "Print" (PS3.4 H.4.2)

# ---------------------------------------------------------------------------- status tables
# The meaning of every status the Print Management service can answer: PS3.7 Annex C (general)
# and PS3.4 H.4 (the Basic Film Session/Film Box/Image Box/Printer SOP classes).
STATUS_MEANINGS: dict[int, str] = {
    0x0000: "Success",
    0x0001: "Requested optional Attributes are not supported",
    0x0105: "No such attribute",
    0x0106: "Invalid attribute value",
    0x0107: "Attribute list error",
    0x0110: "Processing failure",
    0x0111: "Duplicate SOP Instance",
    0x0112: "No such SOP Instance",
    0x0113: "No such event type",
    0x0114: "No such argument",
    0x0115: "Invalid argument value",
    0x0116: "Attribute value out of range",
    0x0117: "Invalid object instance",
    0x0118: "No such SOP Class",
    0x0119: "Class-instance conflict",
    0x0120: "Missing attribute",
    0x0121: "Missing attribute value",
    0x0122: "Refused: SOP Class not supported",
    0x0123: "No such action",
    0x0124: "Refused: not authorized",
    0x0210: "Duplicate invocation",
    0x0211: "Unrecognized operation",
    0x0212: "Mistyped argument",
    0x0213: "Resource limitation",
    0xB600: "Memory allocation not supported",
    0xB601: "Film session printing (collation) is not supported",
    0xB602: "Film Session SOP Instance hierarchy does not contain Image Box SOP Instances "
    "(empty page)",
    0xB603: "Film Box SOP Instance hierarchy does not contain Image Box SOP Instances (empty page)",
    0xB604: "Image size is larger than Image Box size; the image has been demagnified",
    0xB605: "Requested Min Density or Max Density outside of printer's operating range; the "
    "printer will use its respective minimum or maximum density value instead",
    0xB609: "Image size is larger than Image Box size; the image has been cropped to fit",
    0xB60A: "Image size or Combined Print Image size is larger than Image Box size; the image or "
    "combined Print Image has been decimated to fit",
    0xC600: "Film Session SOP Instance hierarchy does not contain Film Box SOP Instances",
    0xC601: "Unable to create Print Job SOP Instance; print queue is full",
    0xC602: "Unable to create Print Job SOP Instance; print queue is full",
    0xC603: "Image size is larger than Image Box size",
    0xC605: "Insufficient memory in printer to store the image",
    0xC613: "Combined Print Image size is larger than Image Box size",
    0xC616: "There is an existing Film Box that has not been printed and N-ACTION at the Film "
    "Session level is not supported; a new Film Box will not be created",
}

# Warnings the seed treats as failures, by operation: T3-50 — B603 (empty page) on the Film Box
# N-ACTION aborts the association and fails the job.
SEED_FAILING_WARNINGS: dict[str, frozenset[int]] = {"Film Box N-ACTION": frozenset({0xB603})}

# T3-53: the Printer attributes asked for with N-GET.
PRINTER_ATTRIBUTES = (  # the first two are the ones the seed marks ALWAYS
    "PrinterStatus",
    "PrinterStatusInfo",
    "PrinterName",
    "Manufacturer",
    "ManufacturerModelName",
    "DeviceSerialNumber",
    "SoftwareVersions",
    "DateOfLastCalibration",
    "TimeOfLastCalibration",
)

# T3-55: Printer N-EVENT-REPORT Event Type IDs (PS3.4 H.4.6).
PRINTER_EVENTS = {1: "NORMAL", 2: "WARNING", 3: "FAILURE"}

# T3-45 / T3-48 value sets.
MEDIUM_TYPES = ("BLUE FILM", "CLEAR FILM", "PAPER")
FILM_DESTINATIONS = ("MAGAZINE", "PROCESSOR")
ORIENTATIONS = ("PORTRAIT", "LANDSCAPE")


def status_category(code: int) -> str:
    """Success, Warning or Failure of a DIMSE-N status (PS3.7 C.1-C.5; PS3.4 H.4 warnings B6xx)."""
    if code == 0x0000:
        return "Success"
    if code in (0x0001, 0x0107, 0x0116) or 0xB000 <= code <= 0xBFFF:
        return "Warning"
    return "Failure"


def status_meaning(code: int) -> str:
    return STATUS_MEANINGS.get(code, "status not defined for Print Management")


# ---------------------------------------------------------------------------- results
@dataclass
class PrintStep:
    """The outcome of one DIMSE exchange (or of the association itself)."""

    name: str
    status: int | None
    meaning: str
    ok: bool
    detail: str = ""

    def line(self) -> str:
        code = "" if self.status is None else f" 0x{self.status:04X}"
        detail = f" ({self.detail})" if self.detail else ""
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}{code} {self.meaning}{detail}"

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.name,
            "status": None if self.status is None else f"0x{self.status:04X}",
            "meaning": self.meaning,
            "ok": self.ok,
            "detail": self.detail,
        }


@dataclass
class PrinterEvent:
    """A Printer N-EVENT-REPORT received during the association (T3-55)."""

    event_type: int
    printer_status_info: str
    answered: int  # the status we answered with (T3-56)


@dataclass
class PrintResult:
    ok: bool
    steps: list[PrintStep]
    printer_status: str | None = None  # from N-GET or the last N-EVENT-REPORT
    film_session_uid: str | None = None
    printer_status_info: str | None = None
    film_box_uids: list[str] = field(default_factory=list)
    films_printed: int = 0
    print_job_uids: list[str] = field(default_factory=list)
    events: list[PrinterEvent] = field(default_factory=list)
    printer_info: dict[str, str] = field(default_factory=dict)

    @property
    def failure(self) -> PrintStep | None:
        """The first failed step, if any."""
        return next((s for s in self.steps if not s.ok), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "printer_status": self.printer_status,
            "printer_status_info": self.printer_status_info,
            "film_session_uid": self.film_session_uid,
            "films_printed": self.films_printed,
            "steps": [s.to_json() for s in self.steps],
        }


# ---------------------------------------------------------------------------- rendering
def _first(value: Any) -> float:
    """The first value of a possibly multi-valued DS (Window Center/Width)."""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0]
    return float(value)


def _window(x: np.ndarray, center: float, width: float, function: str, ymax: int) -> np.ndarray:
    """The VOI LUT function of PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID) onto 0..ymax."""
    if function == "SIGMOID":
        return ymax / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return ((x - center) / width + 0.5) * ymax
    width = max(width - 1.0, 1.0)
    return ((x - (center - 0.5)) / width + 0.5) * ymax


def render_preformatted(image: Dataset, bits: Literal[8, 12] = 8) -> Dataset:
    """A Basic Grayscale Image Sequence item (Preformatted Grayscale Image, T3-51) of *image*:
    its modality LUT (Rescale Slope/Intercept or Modality LUT Sequence), then its first VOI
    window (or VOI LUT, or the full range of its values), onto MONOCHROME2 of *bits* bits.
    Raises ValueError for an image that has no printable grayscale pixel data."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if bits not in (8, 12):
        raise ValueError(f"bits must be 8 or 12, not {bits!r}")
    if "PixelData" not in image:
        raise ValueError("the image has no Pixel Data")
    if int(image.get("SamplesPerPixel", 1)) != 1:
        raise ValueError("only grayscale images (Samples per Pixel 1) can be printed in grayscale")
    photometric = str(image.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"Photometric Interpretation {photometric} cannot be printed")
    try:
        pixels = image.pixel_array
    except Exception as exc:  # a decoder's error: missing plugin, truncated data, ...
        raise ValueError(f"cannot decode the pixel data: {exc}") from exc
    if pixels.ndim == 3:  # multi-frame: the first frame
        pixels = pixels[0]
    values = np.asarray(apply_modality_lut(pixels, image), dtype=np.float64)
    ymax = (1 << bits) - 1
    if "WindowCenter" in image and "WindowWidth" in image and _first(image.WindowWidth) > 0:
        function = str(image.get("VOILUTFunction", "LINEAR")).upper() or "LINEAR"
        out = _window(values, _first(image.WindowCenter), _first(image.WindowWidth), function, ymax)
    elif "VOILUTSequence" in image and len(image.VOILUTSequence):
        lut = np.asarray(apply_voi_lut(values.astype(np.int64), image, index=0), np.float64)
        bits_lut = int(image.VOILUTSequence[0].LUTDescriptor[2]) or 16
        out = lut / ((1 << bits_lut) - 1) * ymax
    else:
        low, high = float(values.min()), float(values.max())
        out = (values - low) / (high - low) * ymax if high > low else np.zeros_like(values)
    # MONOCHROME1 (or a Presentation LUT Shape INVERSE): minimum is white — print MONOCHROME2.
    if photometric == "MONOCHROME1" or str(image.get("PresentationLUTShape", "")) == "INVERSE":
        out = ymax - out
    out = np.clip(np.rint(out), 0, ymax)
    item = Dataset()
    item.SamplesPerPixel = 1
    item.PhotometricInterpretation = "MONOCHROME2"
    item.Rows, item.Columns = int(out.shape[0]), int(out.shape[1])
    item.PixelAspectRatio = [1, 1]
    if bits == 8:
        item.BitsAllocated, item.BitsStored, item.HighBit = 8, 8, 7
        item.PixelRepresentation = 0
        item.PixelData = out.astype(np.uint8).tobytes()
        item["PixelData"].VR = "OB"
    else:
        item.BitsAllocated, item.BitsStored, item.HighBit = 16, 12, 11
        item.PixelRepresentation = 0
        item.PixelData = out.astype("<u2").tobytes()
        item["PixelData"].VR = "OW"
    return item


# ---------------------------------------------------------------------------- the print job
@dataclass(frozen=True)
class FilmOptions:
    """What the user chooses for a print job (T3-45, T3-48). Values are passed to the printer as
    given — a printer that does not support one answers with a failure status, which is the
    job's outcome — only their form is checked here."""

    copies: int = 1
    film_size: str = "14INX17IN"
    display_format: str = "STANDARD\\1,1"
    medium: str = "BLUE FILM"
    orientation: str = "PORTRAIT"
    film_destination: str = "MAGAZINE"
    priority: str = "MED"

    def __post_init__(self) -> None:
        if isinstance(self.copies, bool) or not isinstance(self.copies, int):
            raise TypeError(f"copies must be an int, not {type(self.copies).__name__}")
        if not 1 <= self.copies <= 99:  # the seed offers 1..9 (T3-45)
            raise ValueError(f"copies must be 1..99, not {self.copies}")
        for name in ("film_size", "medium", "orientation", "film_destination", "priority"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or len(value) > 16:
                raise ValueError(f"{name} must be a code string of 1..16 characters: {value!r}")
        if not self.display_format or len(self.display_format) > 64:
            raise ValueError(f"format must be an Image Display Format: {self.display_format!r}")


class _Job:
    """One print job on one association: the steps so far and the printer's reported state."""

    def __init__(self, printer: Peer) -> None:
        self.printer = printer
        self.steps: list[PrintStep] = []
        self.events: list[PrinterEvent] = []
        self.lock = threading.Lock()
        self.created_uid: str | None = None  # Affected SOP Instance UID of the last N-CREATE-RSP

    # T3-55/56: an N-EVENT-REPORT may arrive at any time (pynetdicom serves it in its own thread).
    def on_event_report(self, event: evt.Event) -> tuple[Dataset | int, Dataset | None]:
        try:
            event_type = int(getattr(event.request, "EventTypeID", 0) or 0)
            info = ""
            try:
                data = event.event_information
                info = str(data.get("PrinterStatusInfo", "")) if data is not None else ""
            except Exception:  # an undecodable Event Information does not change the outcome
                log.warning("Printer N-EVENT-REPORT: undecodable event information")
            answered = 0x0000 if event_type in PRINTER_EVENTS else 0x0113  # T3-56
            with self.lock:
                self.events.append(PrinterEvent(event_type, info, answered))
                name = PRINTER_EVENTS.get(event_type, f"event type {event_type}")
                if answered:
                    self.steps.append(PrintStep(
                        "Printer N-EVENT-REPORT", answered, status_meaning(answered), True,
                        f"invalid Event Type ID {event_type}: answered 0x0113",
                    ))  # fmt: skip
                else:
                    self.steps.append(PrintStep(
                        "Printer N-EVENT-REPORT", None, f"printer {name}", event_type != 3,
                        f"Printer Status Info: {info}" if info else "",
                    ))  # fmt: skip
                if event_type in (2, 3):
                    log.warning("printer %s reports %s: %s", self.printer.ae_title, name, info)
            return answered, None
        except Exception as exc:  # T3-56: Processing failure, with a short Error Comment
            log.exception("Printer N-EVENT-REPORT handling failed")
            rsp = Dataset()
            rsp.Status = 0x0110
            rsp.ErrorComment = str(exc)[:64]
            return rsp, None

    def on_dimse_recv(self, event: evt.Event) -> None:
        cs = event.message.command_set
        if int(cs.get("CommandField", 0)) == 0x8140:  # N-CREATE-RSP
            uid = cs.get("AffectedSOPInstanceUID")
            with self.lock:
                self.created_uid = str(uid) if uid else None

    def failed_by_event(self) -> bool:
        with self.lock:
            return any(e.event_type == 3 for e in self.events)

    def add(self, step: PrintStep) -> PrintStep:
        with self.lock:
            self.steps.append(step)
        (log.info if step.ok else log.error)("print %s: %s", self.printer.ae_title, step.line())
        return step

    def response(
        self, name: str, rsp: Dataset | None, *, tolerate: int | None = None, note: str = ""
    ) -> PrintStep:
        """The step of a DIMSE response, judged by the seed's status tables (T3-46..T3-54):
        success and the warnings are ok (logged), anything else fails the job — except the
        *tolerate* status, which the caller handles (with *note* saying how)."""
        if rsp is None or "Status" not in rsp:
            return self.add(PrintStep(
                name, None, "no response", False,
                "the association was aborted, or the printer did not answer within the DIMSE "
                "timeout (T3-44)",
            ))  # fmt: skip
        code = int(rsp.Status)
        category = status_category(code)
        ok = category in ("Success", "Warning")
        operation = name.split(" (")[0]
        if code in SEED_FAILING_WARNINGS.get(operation, ()):
            ok = False
        if code == tolerate:
            ok = True
        extra = [note] if note else []
        for keyword in ("ErrorComment", "ErrorID"):
            if rsp.get(keyword):
                extra.append(f"{keyword}: {rsp.get(keyword)}")
        if rsp.get("AttributeIdentifierList"):
            value = rsp.AttributeIdentifierList
            tags = value if isinstance(value, list | tuple) else [value]
            extra.append("attributes: " + " ".join(f"({int(t) >> 16:04X},{int(t) & 0xFFFF:04X})"
                                                   for t in tags))  # fmt: skip
        meaning = f"{category}: {status_meaning(code)}"
        return self.add(PrintStep(name, code, meaning, ok, "; ".join(extra)))


def _associate(
    job: _Job, calling_ae: str, network_timeout: float, acse_timeout: float
) -> Association | None:
    printer = job.printer
    ae = AE(ae_title=calling_ae)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.acse_timeout = acse_timeout
    ae.connection_timeout = acse_timeout
    ae.dimse_timeout = network_timeout
    ae.network_timeout = network_timeout
    ae.add_requested_context(BasicGrayscalePrintManagementMeta, ImplicitVRLittleEndian)  # T3-43
    where = f"{printer.ae_title}@{printer.host}:{printer.port}"
    handlers: list[Any] = [
        (evt.EVT_N_EVENT_REPORT, job.on_event_report),
        (evt.EVT_DIMSE_RECV, job.on_dimse_recv),
    ]
    assoc, failure = associate(ae, printer.host, printer.port, printer.ae_title, handlers)
    if assoc is not None:
        if not any(
            cx.abstract_syntax == BasicGrayscalePrintManagementMeta
            for cx in assoc.accepted_contexts
        ):  # pragma: no cover - pynetdicom aborts when no context is accepted
            assoc.abort()
            detail = f"{where} did not accept Basic Grayscale Print Management Meta"
            job.add(PrintStep("Associate", None, "association refused", False, detail))
            return None
        job.add(PrintStep("Associate", None, "association established", True, where))
        return assoc
    assert failure is not None
    meaning, detail = {
        "error": ("no association", f"{where}: {failure.detail}"),
        "unreachable": (
            "printer not reachable",
            f"{where} is not reachable: connection refused, no route, or no answer within "
            f"{acse_timeout:g} s (connection timeout)",
        ),
        "rejected": ("association rejected", f"{where}: {failure.detail}"),
        "no-answer": (
            "no association",
            f"{where} accepted the connection but did not answer the association request "
            f"within {acse_timeout:g} s (ACSE timeout)",
        ),
        "aborted": (
            "association aborted",
            f"{where} aborted the association request, or accepted no presentation context "
            "for Basic Grayscale Print Management Meta",
        ),
    }.get(
        failure.kind,
        (
            "no association",
            f"{where} did not answer the association request within {acse_timeout:g} s",
        ),
    )
    job.add(PrintStep("Associate", None, meaning, False, detail))
    return None


def _image_box_count(display_format: str) -> int | None:
    """Image boxes per film of an Image Display Format (PS3.3 C.13.3), when the format says."""
    parts = display_format.split("\\")
    kind = parts[0].strip().upper()
    try:
        if kind == "STANDARD" and len(parts) == 2:
            columns, rows = (int(v) for v in parts[1].split(","))
            return columns * rows
        if kind in ("ROW", "COL") and len(parts) == 2:
            return sum(int(v) for v in parts[1].split(","))
    except ValueError:
        return None
    return None


def print_images(
    printer: Peer,
    calling_ae: str,
    images: list[Dataset],
    *,
    copies: int = 1,
    film_size: str = "14INX17IN",
    format: str = "STANDARD\\1,1",
    medium: str = "BLUE FILM",
    orientation: str = "PORTRAIT",
    film_destination: str = "MAGAZINE",
    priority: str = "MED",
    bits: Literal[8, 12] = 8,
    network_timeout: float = 30.0,
    acse_timeout: float = 30.0,
) -> PrintResult:
    """Print *images* on *printer*, one image per image box, as many films as the Image Display
    Format needs, on one association (seed 004 §3.2.6). Never raises for a DICOM-level failure:
    the result's steps say what happened; ``ok`` is True only if every film was printed and no
    step failed."""
    if not images:
        raise ValueError("no images to print")
    options = FilmOptions(
        copies, film_size, format, medium, orientation, film_destination, priority
    )
    job = _Job(printer)
    result = PrintResult(ok=False, steps=job.steps, events=job.events)

    # Render first: an image that cannot be printed fails the job before the printer is bothered.
    items: list[Dataset] = []
    for n, image in enumerate(images, 1):
        try:
            items.append(render_preformatted(image, bits))
        except ValueError as exc:
            job.add(PrintStep(f"Render image {n}", None, "image not printable", False, str(exc)))
            return result

    assoc = _associate(job, calling_ae, network_timeout, acse_timeout)
    if assoc is None:
        return result
    try:
        completed = _run(assoc, job, result, items, options)
    except BaseException:
        assoc.abort()
        raise
    if not completed:
        if assoc.is_established:
            assoc.abort()  # seed §3.2.6.3.1.1: a failure status aborts the association
    else:
        assoc.release()
        if not assoc.is_released:  # pragma: no cover - the printer did not answer A-RELEASE
            job.add(PrintStep("Release", None, "release failed", False,
                              "no A-RELEASE-RP; association aborted"))  # fmt: skip
    if job.failed_by_event():
        result.printer_status = "FAILURE"
    last = job.events[-1] if job.events else None
    if last is not None and last.event_type in PRINTER_EVENTS and result.printer_status is None:
        result.printer_status = PRINTER_EVENTS[last.event_type]
        result.printer_status_info = last.printer_status_info or None
    with job.lock:
        result.ok = all(s.ok for s in job.steps) and result.films_printed > 0
    return result


def _run(
    assoc: Association, job: _Job, result: PrintResult, items: list[Dataset], options: FilmOptions
) -> bool:
    """The DIMSE sequence; False when a failure status means the association must be aborted."""
    # T3-45: Film Session N-CREATE.
    session = Dataset()
    session.NumberOfCopies = str(options.copies)
    session.PrintPriority = options.priority
    session.MediumType = options.medium
    session.FilmDestination = options.film_destination
    session_uid = str(generate_uid())
    settle_reactor(assoc)
    status, _ = assoc.send_n_create(
        session, BasicFilmSession, session_uid, meta_uid=BasicGrayscalePrintManagementMeta
    )
    if not job.response("Film Session N-CREATE", status).ok:
        return False
    result.film_session_uid = session_uid = job.created_uid or session_uid

    display_format = options.display_format
    per_film = _image_box_count(display_format)
    film = 0
    position = 0
    while position < len(items):
        if job.failed_by_event():  # T3-55: the printer reported FAILURE — stop printing
            break
        film += 1
        # T3-48: Film Box N-CREATE, linked to the Film Session.
        box = Dataset()
        box.ImageDisplayFormat = display_format
        ref = Dataset()
        ref.ReferencedSOPClassUID = BasicFilmSession
        ref.ReferencedSOPInstanceUID = session_uid
        box.ReferencedFilmSessionSequence = DicomSequence([ref])
        box.FilmOrientation = options.orientation
        box.FilmSizeID = options.film_size
        box_uid = str(generate_uid())
        job.created_uid = None
        settle_reactor(assoc)
        status, attrs = assoc.send_n_create(
            box, BasicFilmBox, box_uid, meta_uid=BasicGrayscalePrintManagementMeta
        )
        if not job.response(f"Film Box N-CREATE (film {film})", status).ok:
            return False
        box_uid = job.created_uid or box_uid
        result.film_box_uids.append(box_uid)
        boxes = list(attrs.get("ReferencedImageBoxSequence", [])) if attrs is not None else []
        if not boxes:
            job.add(PrintStep(f"Film Box N-CREATE (film {film})", None, "no image boxes", False,
                              "the response references no Basic Grayscale Image Box"))  # fmt: skip
            return False
        if per_film is not None and per_film != len(boxes):
            log.warning("film box %s: %d image boxes for %s", box_uid, len(boxes), display_format)

        # T3-51: Image Box N-SET, one image per image box.
        for slot, ref_box in enumerate(boxes, 1):
            if position >= len(items):
                break
            image_box = Dataset()
            image_box.ImageBoxPosition = slot
            image_box.BasicGrayscaleImageSequence = DicomSequence([items[position]])
            settle_reactor(assoc)
            status, _ = assoc.send_n_set(
                image_box,
                str(ref_box.get("ReferencedSOPClassUID", BasicGrayscaleImageBox)),
                str(ref_box.ReferencedSOPInstanceUID),
                meta_uid=BasicGrayscalePrintManagementMeta,
            )
            position += 1
            if not job.response(f"Image Box N-SET (film {film}, position {slot})", status).ok:
                return False

        # T3-50: Film Box N-ACTION (print); the Action Reply is not evaluated.
        settle_reactor(assoc)
        status, reply = assoc.send_n_action(
            None, PRINT_ACTION, BasicFilmBox, box_uid, meta_uid=BasicGrayscalePrintManagementMeta
        )
        if not job.response(f"Film Box N-ACTION (film {film})", status).ok:
            return False
        result.films_printed += 1
        if reply is not None:
            for item in reply.get("ReferencedPrintJobSequence", []):
                result.print_job_uids.append(str(item.get("ReferencedSOPInstanceUID", "")))

        # Film Box N-DELETE: the printed film box is no longer needed (PS3.4 H.4.2).
        settle_reactor(assoc)
        status = assoc.send_n_delete(
            BasicFilmBox, box_uid, meta_uid=BasicGrayscalePrintManagementMeta
        )
        if not job.response(f"Film Box N-DELETE (film {film})", status).ok:
            return False

    # T3-53/54: Printer N-GET, the printer's status after printing.
    tags = [Tag(keyword) for keyword in PRINTER_ATTRIBUTES]
    settle_reactor(assoc)
    status, printer = assoc.send_n_get(
        tags, Printer, PrinterInstance, meta_uid=BasicGrayscalePrintManagementMeta
    )
    if status is not None and status.get("Status") == 0x0105:
        # Only Printer Status and Printer Status Info are required of a Printer SCP's N-GET
        # (PS3.4 H.4.6); a printer that refuses the optional ones of T3-53 with "No such
        # attribute" (DCMTK's dcmprscp does) is asked again for those two.
        note = "asking again for Printer Status and Printer Status Info only"
        job.response("Printer N-GET", status, tolerate=0x0105, note=note)
        tags = tags[:2]
        settle_reactor(assoc)
        status, printer = assoc.send_n_get(
            tags, Printer, PrinterInstance, meta_uid=BasicGrayscalePrintManagementMeta
        )
    step = job.response("Printer N-GET", status)
    if not step.ok:
        return False
    if printer is not None:
        for keyword in PRINTER_ATTRIBUTES:
            if printer.get(keyword):
                result.printer_info[keyword] = str(printer.get(keyword))
        result.printer_status = str(printer.get("PrinterStatus", "")) or None
        result.printer_status_info = str(printer.get("PrinterStatusInfo", "")) or None
    info = f"Printer Status {result.printer_status}"
    if result.printer_status_info:
        info += f", Printer Status Info {result.printer_status_info}"
    step.detail = "; ".join(p for p in (step.detail, info) if p)
    if result.printer_status == "FAILURE":  # T3-53 evaluation 2: the job fails
        step.ok = False
        log.error("printer %s: status FAILURE (%s)", job.printer.ae_title,
                  result.printer_status_info)  # fmt: skip
    elif result.printer_status == "WARNING":  # evaluation 3: printed, but logged and reported
        log.warning("printer %s: status WARNING (%s)", job.printer.ae_title,
                    result.printer_status_info)  # fmt: skip

    # T3-47: Film Session N-DELETE deletes the whole hierarchy.
    settle_reactor(assoc)
    status = assoc.send_n_delete(
        BasicFilmSession, session_uid, meta_uid=BasicGrayscalePrintManagementMeta
    )
    return job.response("Film Session N-DELETE", status).ok
