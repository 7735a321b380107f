"""The virtual modality's printing (seed 004 §3.2.6, T3-39..T3-56) against DCMTK's dcmprscp — a
real Basic Grayscale Print SCP that stores every printed film as a Stored Print object and one
Hardcopy Grayscale Image per image box — and, for what dcmprscp never answers (warnings,
Printer N-EVENT-REPORTs, a printer in FAILURE, association rejection), a scripted pynetdicom
print SCP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from print_support import Dcmprscp, FakePrinter
from pydicom import Dataset
from support import free_port, make_image

from openpacs.modality.config import Peer
from openpacs.modality.printing import PrintResult, print_images, render_preformatted

CALLING = "MOD1"
SEQUENCE_ONE_FILM = [
    "Associate",
    "Film Session N-CREATE",
    "Film Box N-CREATE (film 1)",
    "Image Box N-SET (film 1, position 1)",
    "Film Box N-ACTION (film 1)",
    "Film Box N-DELETE (film 1)",
]


@pytest.fixture(scope="module")
def dcmprscp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dcmprscp]:
    scp = Dcmprscp(tmp_path_factory.mktemp("dcmprscp")).start()
    yield scp
    scp.stop()


def printer_of(scp: Dcmprscp | FakePrinter) -> Peer:
    return Peer(scp.ae_title, "127.0.0.1", scp.port)


def assert_all_success(result: PrintResult) -> None:
    assert result.ok, "\n".join(s.line() for s in result.steps)
    for step in result.steps:
        assert step.ok, step.line()
        if step.name == "Associate":
            continue
        # dcmprscp refuses the optional Printer attributes of T3-53 with 0x0105; the module asks
        # again for Printer Status and Printer Status Info — that second N-GET must succeed.
        if step.name == "Printer N-GET" and step.status == 0x0105:
            assert "asking again" in step.detail
            continue
        assert step.status == 0x0000, step.line()
        assert step.meaning == "Success: Success"


def new_files(scp: Dcmprscp, before: set[Path], prefix: str) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted(scp.files(prefix) - before)]


def test_print_one_image(dcmprscp: Dcmprscp) -> None:
    hg_before, sp_before = dcmprscp.files("HG"), dcmprscp.files("SP")
    image = make_image(rows=40, columns=30, WindowCenter=2048, WindowWidth=4096)
    result = print_images(printer_of(dcmprscp), CALLING, [image])
    assert_all_success(result)
    names = [s.name for s in result.steps]
    assert names[:6] == SEQUENCE_ONE_FILM
    assert names[-2:] == ["Printer N-GET", "Film Session N-DELETE"]
    assert result.films_printed == 1
    assert result.printer_status == "NORMAL"
    assert result.film_session_uid
    # dcmprscp stored the film: one Stored Print, one Hardcopy Grayscale Image of our pixels.
    (sp,) = new_files(dcmprscp, sp_before, "SP")
    box = sp.FilmBoxContentSequence[0]
    assert box.ImageDisplayFormat == "STANDARD\\1,1"
    assert (box.FilmSizeID, box.FilmOrientation) == ("14INX17IN", "PORTRAIT")
    (hg,) = new_files(dcmprscp, hg_before, "HG")
    assert (hg.Rows, hg.Columns, hg.BitsStored) == (40, 30, 8)
    assert hg.PhotometricInterpretation == "MONOCHROME2"
    assert hg.PixelData == render_preformatted(image).PixelData


def test_print_three_images_one_per_film(dcmprscp: Dcmprscp) -> None:
    hg_before, sp_before = dcmprscp.files("HG"), dcmprscp.files("SP")
    sizes = [(32, 24), (48, 40), (20, 60)]
    images = [make_image(rows=r, columns=c, seed=n) for n, (r, c) in enumerate(sizes)]
    result = print_images(printer_of(dcmprscp), CALLING, images, film_size="11INX14IN")
    assert_all_success(result)
    assert result.films_printed == 3 and len(result.film_box_uids) == 3
    assert sum(s.name.startswith("Image Box N-SET") for s in result.steps) == 3
    assert len(new_files(dcmprscp, sp_before, "SP")) == 3
    stored = sorted((hg.Rows, hg.Columns) for hg in new_files(dcmprscp, hg_before, "HG"))
    assert stored == sorted(sizes)


def test_print_three_images_on_one_2x2_film_12_bit(dcmprscp: Dcmprscp) -> None:
    hg_before, sp_before = dcmprscp.files("HG"), dcmprscp.files("SP")
    images = [make_image(rows=16 + n, columns=20, seed=n) for n in range(3)]
    result = print_images(
        printer_of(dcmprscp), CALLING, images, format="STANDARD\\2,2", bits=12,
        medium="PAPER", orientation="LANDSCAPE", copies=2,
    )  # fmt: skip
    assert_all_success(result)
    assert result.films_printed == 1
    sets = [s.name for s in result.steps if s.name.startswith("Image Box N-SET")]
    assert sets == [f"Image Box N-SET (film 1, position {n})" for n in (1, 2, 3)]
    (sp,) = new_files(dcmprscp, sp_before, "SP")
    assert sp.FilmBoxContentSequence[0].ImageDisplayFormat == "STANDARD\\2,2"
    assert sp.FilmBoxContentSequence[0].FilmOrientation == "LANDSCAPE"
    stored = new_files(dcmprscp, hg_before, "HG")
    assert sorted(hg.Rows for hg in stored) == [16, 17, 18]
    assert {(hg.Columns, hg.BitsStored) for hg in stored} == {(20, 12)}


def test_voi_window_rendered_to_8_bit(dcmprscp: Dcmprscp) -> None:
    """The image's window (PS3.3 C.11.2.1.2.1 LINEAR) maps the 12-bit values onto 0..255."""
    hg_before = dcmprscp.files("HG")
    image = make_image(rows=1, columns=5, WindowCenter=2000, WindowWidth=2000)
    image.PixelData = np.array([[0, 1000, 2000, 3000, 4095]], np.uint16).tobytes()
    result = print_images(printer_of(dcmprscp), CALLING, [image])
    assert_all_success(result)
    (hg,) = new_files(dcmprscp, hg_before, "HG")
    assert hg.pixel_array.tolist() == [[0, 0, 128, 255, 255]]
    # MONOCHROME1 is printed inverted, as MONOCHROME2.
    image.PhotometricInterpretation = "MONOCHROME1"
    assert np.frombuffer(render_preformatted(image).PixelData, np.uint8).tolist() == [
        255, 255, 127, 0, 0,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("options", "failing_step", "log_line"),
    [
        ({"format": "STANDARD\\3,3"}, "Film Box N-CREATE (film 1)", "unsupported image display"),
        ({"film_size": "A4"}, "Film Box N-CREATE (film 1)", "illegal film size ID"),
        ({"medium": "GOLD FILM"}, "Film Session N-CREATE", "illegal medium type"),
    ],
)
def test_refused_attributes_fail_the_job(
    dcmprscp: Dcmprscp, options: dict[str, str], failing_step: str, log_line: str
) -> None:
    hg_before = dcmprscp.files("HG")
    result = print_images(printer_of(dcmprscp), CALLING, [make_image()], **options)  # type: ignore[arg-type]
    assert not result.ok
    assert result.films_printed == 0
    failure = result.failure
    assert failure is not None and failure.name == failing_step
    assert failure.status == 0x0106
    assert failure.meaning == "Failure: Invalid attribute value"
    assert result.steps[-1] is failure  # seed §3.2.6.3.1.1: the association is aborted
    assert dcmprscp.files("HG") == hg_before
    assert log_line in dcmprscp.log()


def test_printer_unreachable() -> None:
    port = free_port()
    result = print_images(Peer("NOPRINTER", "127.0.0.1", port), CALLING, [make_image()])
    assert not result.ok
    (step,) = result.steps
    assert step.name == "Associate" and not step.ok and step.status is None
    assert step.meaning == "printer not reachable"
    assert f"NOPRINTER@127.0.0.1:{port} is not reachable" in step.detail


def test_unprintable_image_fails_before_connecting() -> None:
    image = make_image()
    image.PhotometricInterpretation = "RGB"
    result = print_images(Peer("NOPRINTER", "127.0.0.1", 1), CALLING, [image])
    assert not result.ok
    assert [(s.name, s.meaning) for s in result.steps] == [
        ("Render image 1", "image not printable")
    ]


# ---------------------------------------------------------------------------- scripted SCP
@pytest.fixture
def fake_printer() -> Iterator[FakePrinter]:
    printers: list[FakePrinter] = []

    def start(**kwargs: object) -> FakePrinter:
        printer = FakePrinter(**kwargs).start()  # type: ignore[arg-type]
        printers.append(printer)
        return printer

    yield start  # type: ignore[misc]
    for printer in printers:
        printer.stop()


def test_warnings_are_recorded_but_ok(fake_printer) -> None:  # type: ignore[no-untyped-def]
    printer = fake_printer(statuses={"box-create": 0xB605, "image-set": 0xB604})
    result = print_images(printer_of(printer), CALLING, [make_image()])
    assert result.ok, "\n".join(s.line() for s in result.steps)
    by_name = {s.name: s for s in result.steps}
    assert by_name["Film Box N-CREATE (film 1)"].status == 0xB605  # T3-49
    assert by_name["Film Box N-CREATE (film 1)"].meaning.startswith("Warning: Requested Min")
    assert by_name["Image Box N-SET (film 1, position 1)"].status == 0xB604  # T3-52
    assert printer.operations[-1] == "session-delete"


def test_empty_page_warning_fails_the_job(fake_printer) -> None:  # type: ignore[no-untyped-def]
    printer = fake_printer(statuses={"box-action": 0xB603})
    result = print_images(printer_of(printer), CALLING, [make_image()])
    assert not result.ok  # T3-50: B603 aborts the association and fails the job
    assert result.failure is not None and result.failure.status == 0xB603
    assert "session-delete" not in printer.operations


def test_printer_failure_event_fails_the_job(fake_printer) -> None:  # type: ignore[no-untyped-def]
    printer = fake_printer(event=(3, "FILM JAM"))
    images = [make_image(), make_image(seed=1)]
    result = print_images(printer_of(printer), CALLING, images, network_timeout=5)
    assert not result.ok  # T3-55: FAILURE marks the job failed
    assert printer.event_answers == [0x0000]  # T3-56: the report itself was received
    event_step = next(s for s in result.steps if s.name == "Printer N-EVENT-REPORT")
    assert not event_step.ok and "FILM JAM" in event_step.detail
    assert result.printer_status == "FAILURE"
    assert result.films_printed == 1  # no further film after the printer failed


def test_invalid_event_type_answered_0113(fake_printer) -> None:  # type: ignore[no-untyped-def]
    printer = fake_printer(
        event=(9, "UNKNOWN"), printer_status="WARNING", printer_status_info="LOW"
    )
    result = print_images(printer_of(printer), CALLING, [make_image()], network_timeout=5)
    assert printer.event_answers == [0x0113]
    assert result.ok  # an invalid report and a WARNING printer do not fail the job (T3-53 3.)
    assert (result.printer_status, result.printer_status_info) == ("WARNING", "LOW")


def test_printer_status_failure_fails_the_job(fake_printer) -> None:  # type: ignore[no-untyped-def]
    printer = fake_printer(printer_status="FAILURE", printer_status_info="NO FILM")
    result = print_images(printer_of(printer), CALLING, [make_image()])
    assert not result.ok
    assert result.failure is not None and result.failure.name == "Printer N-GET"
    assert "NO FILM" in result.failure.detail


def test_association_rejected(fake_printer) -> None:  # type: ignore[no-untyped-def]
    printer = fake_printer(ae_title="FAKEPRT")
    result = print_images(Peer("WRONGAE", "127.0.0.1", printer.port), CALLING, [make_image()])
    assert not result.ok
    (step,) = result.steps
    assert step.meaning == "association rejected"
    assert "A-ASSOCIATE-RJ" in step.detail and "Called AE title not recognised" in step.detail
