"""Print SCPs for the modality's print tests: DCMTK's dcmprscp (the real one) with a minimal
configuration, and a scripted pynetdicom Print SCP for what dcmprscp never does (warning
statuses, Printer N-EVENT-REPORTs, a printer in FAILURE, association rejection)."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import support
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt

from openpacs.modality.printing import (
    BasicFilmSession,
    BasicGrayscaleImageBox,
    BasicGrayscalePrintManagementMeta,
    Printer,
    PrinterInstance,
)

DCMPRSCP_CONFIG = """\
# dcmprscp configuration for the openpacs print tests (format: /etc/dcmtk/dcmpstat.cfg)
[[GENERAL]]
[APPLICATION]
LogDirectory = {root}/log
LogFile = general.log
LogLevel = INFO
[PRINT]
Directory = {root}/spool
DetailedLog = false
BinaryLog = false
[DATABASE]
Directory = {root}/db
[LUT]
Directory = {root}/lut

[[COMMUNICATION]]
[{name}]
Aetitle = {ae_title}
Description = openpacs test print SCP
Hostname = localhost
Port = {port}
Type = LOCALPRINTER
DisplayFormat = 1,1\\1,2\\2,2
FilmDestination = MAGAZINE\\PROCESSOR
FilmSizeID = 8INX10IN\\11INX14IN\\14INX14IN\\14INX17IN
MediumType = PAPER\\CLEAR FILM\\BLUE FILM
MagnificationType = REPLICATE\\BILINEAR\\CUBIC\\NONE
MaxDensity = 320
MinDensity = 20
MaxPDU = 32768
ImplicitOnly = false
DisableNewVRs = false
Supports12Bit = true
SupportsPresentationLUT = false
OmitSOPClassUIDFromCreateResponse = false
"""


def wait_listening(port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"print SCP exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


class Dcmprscp:
    """DCMTK's dcmprscp with its own configuration, database and spool under *root*. It writes a
    Stored Print (SP_*.dcm) and one Hardcopy Grayscale Image (HG_*.dcm) per image box into the
    database directory for every film box it prints."""

    def __init__(self, root: Path, ae_title: str = "TESTPRT", name: str = "OPENPACS_TEST") -> None:
        self.binary = support.require_tool("dcmprscp")
        self.root = root
        self.ae_title = ae_title
        self.port = support.free_port()
        for sub in ("db", "spool", "log", "lut"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.config = root / "dcmprscp.cfg"
        self.config.write_text(
            DCMPRSCP_CONFIG.format(root=root, name=name, ae_title=ae_title, port=self.port),
            encoding="utf-8",
        )
        self.name = name
        self.log_path = root / "dcmprscp.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def database(self) -> Path:
        return self.root / "db"

    def start(self) -> Dcmprscp:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [self.binary, "--config", str(self.config), "--printer", self.name, "--verbose"],
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=support.tool_env(),
        )
        log.close()
        wait_listening(self.port, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def files(self, prefix: str) -> set[Path]:
        return set(self.database.glob(f"{prefix}_*.dcm"))


# ---------------------------------------------------------------------------- scripted SCP
@dataclass
class FakePrinter:
    """A pynetdicom Basic Grayscale Print SCP answering each operation with a chosen status
    (``statuses``: "session-create", "box-create", "image-set", "box-action", "box-delete",
    "printer-get", "session-delete"); ``event`` (Event Type ID, Printer Status Info) is sent as a
    Printer N-EVENT-REPORT while the Film Box N-ACTION is being answered."""

    ae_title: str = "FAKEPRT"
    statuses: dict[str, int] = field(default_factory=dict)
    printer_status: str = "NORMAL"
    printer_status_info: str = "NORMAL"
    event: tuple[int, str] | None = None
    image_boxes: int = 1
    port: int = field(default_factory=support.free_port)
    operations: list[str] = field(default_factory=list)
    event_answers: list[int | None] = field(default_factory=list)
    _server: Any = None

    def _status(self, operation: str) -> int:
        self.operations.append(operation)
        return self.statuses.get(operation, 0x0000)

    def _on_create(self, event: evt.Event) -> tuple[int, Dataset | None]:
        if getattr(event.request, "AffectedSOPClassUID", None) == BasicFilmSession:
            return self._status("session-create"), Dataset()
        status = self._status("box-create")
        attrs = Dataset()
        items = []
        for _ in range(self.image_boxes):
            item = Dataset()
            item.ReferencedSOPClassUID = BasicGrayscaleImageBox
            item.ReferencedSOPInstanceUID = generate_uid()
            items.append(item)
        attrs.ReferencedImageBoxSequence = DicomSequence(items)
        return status, attrs

    def _on_set(self, event: evt.Event) -> tuple[int, Dataset | None]:
        return self._status("image-set"), Dataset()

    def _on_action(self, event: evt.Event) -> tuple[int, Dataset | None]:
        if self.event is not None:
            info = Dataset()
            info.PrinterStatusInfo = self.event[1]
            status, _ = event.assoc.send_n_event_report(
                info, self.event[0], Printer, PrinterInstance,
                meta_uid=BasicGrayscalePrintManagementMeta,
            )  # fmt: skip
            self.event_answers.append(int(status.Status) if "Status" in status else None)
        return self._status("box-action"), None

    def _on_delete(self, event: evt.Event) -> int:
        session = getattr(event.request, "RequestedSOPClassUID", None) == BasicFilmSession
        return self._status("session-delete" if session else "box-delete")

    def _on_get(self, event: evt.Event) -> tuple[int, Dataset | None]:
        status = self._status("printer-get")
        attrs = Dataset()
        attrs.PrinterStatus = self.printer_status
        attrs.PrinterStatusInfo = self.printer_status_info
        attrs.PrinterName = "FAKE"
        return status, attrs

    def start(self) -> FakePrinter:
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True
        ae.add_supported_context(BasicGrayscalePrintManagementMeta, ImplicitVRLittleEndian)
        handlers: list[Any] = [
            (evt.EVT_N_CREATE, self._on_create),
            (evt.EVT_N_SET, self._on_set),
            (evt.EVT_N_ACTION, self._on_action),
            (evt.EVT_N_DELETE, self._on_delete),
            (evt.EVT_N_GET, self._on_get),
        ]
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
