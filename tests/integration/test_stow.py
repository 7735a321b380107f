"""STOW-RS against the real server (PS3.18 10.5, seed 002 §3.2.5): dicomweb-client as the client
for the transaction, raw HTTP for what a correct client would not send, the stored files compared
byte for byte with what was sent, the index checked with a DICOM C-FIND, and the objects built
from DICOM JSON + bulk data checked with dciodvfy."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from stow_support import (
    BOUNDARY,
    as_stored,
    content_type,
    make_mp4,
    multipart,
    part10_bytes,
    raw_http,
)
from support import (
    ServerProcess,
    dataset_bytes_of_file,
    index_rows,
    make_image,
    require_tool,
    shipped,
    stored_instance_files,
)

SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
VIDEO_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4.1"
MF_GRAYSCALE_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
RETRIEVE_URL = "00081190"
FAILURE_REASON = "00081197"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path_factory.mktemp("stow") / "srv").start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.stop()


def _client(server: ServerProcess) -> DICOMwebClient:
    return DICOMwebClient(f"http://127.0.0.1:{server.http_port}/dicom-web")


def _url(server: ServerProcess, path: str = "/studies") -> str:
    return f"http://127.0.0.1:{server.http_port}/dicom-web{path}"


def _find_study(port: int, study_uid: str) -> list[Dataset]:
    """Study-level C-FIND (pynetdicom SCU): the index as a DICOM peer sees it."""
    ae = AE(ae_title="STOWTEST")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="OPENPACS")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    query.PatientID = ""
    query.NumberOfStudyRelatedInstances = ""
    out = []
    try:
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            if status and status.Status in (0xFF00, 0xFF01):
                out.append(identifier)
    finally:
        assoc.release()
    return out


def _dciodvfy_errors(path: Path) -> list[str]:
    dciodvfy = require_tool("dciodvfy")
    r = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")]


def _stored_file(server: ServerProcess, sop_uid: str) -> Path:
    (path,) = stored_instance_files(server.data_dir, sop_uid)
    return path


def _with_private_and_charset() -> Dataset:
    ds = make_image(charset="ISO_IR 192", patient_name="Ærøskøbing^Zoë=王^小東")
    block = ds.private_block(0x0011, "OPENPACS TEST", create=True)
    block.add_new(0x01, "LO", "private value")
    block.add_new(0x02, "OB", b"\x01\x02\x03\x04")
    return ds


# ------------------------------------------------------------------ dicomweb-client, byte-exact
def test_store_instances_byte_exact_and_indexed(srv: ServerProcess) -> None:
    """store_instances of native, compressed (RLE, JPEG 2000, JPEG lossless and extended,
    JPEG-LS, deflated), ISO 2022 and UTF-8 character sets and private elements: 200, every
    stored file holds the sent data set byte for byte, and C-FIND finds each study."""
    datasets = [_with_private_and_charset(), make_image()]
    for name in (
        "MR_small_RLE.dcm",
        "JPEG2000.dcm",
        "SC_rgb_jpeg_gdcm.dcm",
        "JPGExtended.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "image_dfl.dcm",
        "chrH31.dcm",
        "chrKoreanMulti.dcm",
        "CT_small.dcm",
    ):
        ds = pydicom.dcmread(shipped(name))
        # Several of pydicom's files are one image in different syntaxes (same SOP Instance).
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        datasets.append(ds)
    response = _client(srv).store_instances(datasets)
    referenced = response.ReferencedSOPSequence
    assert [str(i.ReferencedSOPInstanceUID) for i in referenced] == [
        str(ds.SOPInstanceUID) for ds in datasets
    ]
    assert "FailedSOPSequence" not in response
    for ds, item in zip(datasets, referenced, strict=True):
        assert item.ReferencedSOPClassUID == ds.SOPClassUID
        assert item.RetrieveURL == _url(
            srv,
            f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}",
        )
        sent = part10_bytes(ds)
        stored = _stored_file(srv, ds.SOPInstanceUID)
        # The stored file is the sent File Meta and data set, unchanged, behind the preamble
        # and "DICM" that pydicom's writer (so dicomweb-client) leaves out.
        assert stored.read_bytes() == as_stored(sent)
        assert dataset_bytes_of_file(stored) == dataset_bytes_of_file_bytes(sent)
        (found,) = _find_study(srv.port, str(ds.StudyInstanceUID))
        assert int(found.NumberOfStudyRelatedInstances) >= 1
    row = index_rows(srv.data_dir, "patients", patient_id="PID-1")
    assert row, "patient row indexed"


def dataset_bytes_of_file_bytes(data: bytes) -> bytes:
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fh = io.BytesIO(data)
    read_preamble(fh, True)
    _read_file_meta_info(fh)
    return fh.read()


def test_raw_odd_length_value_preamble_and_single_part(srv: ServerProcess) -> None:
    """A data set with an odd-length value (which pydicom would pad, so the body is written by
    hand), a multipart preamble and epilogue, parts with extra header fields; and a
    single-part application/dicom body. Stored files equal the sent files."""
    ds = make_image()
    del ds.PixelData
    encoded = part10_bytes(ds, preamble=True)
    # (0099,0010) private creator, (0099,1001) LO with a 3-byte value, appended in tag order.
    odd = struct.pack("<HH2sH", 0x0099, 0x0010, b"LO", 4) + b"ODD "
    odd += struct.pack("<HH2sH", 0x0099, 0x1001, b"LO", 3) + b"abc"
    sent = encoded + odd
    other = part10_bytes(make_image())
    body = multipart(
        [
            ({"Content-Type": "application/dicom", "Content-ID": "<1@x>"}, sent),
            ({"content-type": "application/dicom", "Content-Length": str(len(other))}, other),
        ],
        preamble=b"This is a preamble.\r\n",
        epilogue=b"and an epilogue\r\n",
    )
    r = requests.post(_url(srv), data=body, headers={"Content-Type": content_type()}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/dicom+json")
    assert len(r.json()[REFERENCED_SOP_SEQUENCE]["Value"]) == 2
    assert _stored_file(srv, ds.SOPInstanceUID).read_bytes() == sent
    assert pydicom.dcmread(io.BytesIO(sent))[0x00991001].value == "abc"

    single = make_image()
    r = requests.post(
        _url(srv, f"/studies/{single.StudyInstanceUID}"),
        data=part10_bytes(single),
        headers={"Content-Type": "application/dicom"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    body_json = r.json()
    assert body_json[RETRIEVE_URL]["Value"] == [_url(srv, f"/studies/{single.StudyInstanceUID}")]
    sent_single = part10_bytes(single)
    assert sent_single[:4] == b"\x02\x00\x02\x00"  # File Meta first, no preamble
    assert _stored_file(srv, single.SOPInstanceUID).read_bytes() == as_stored(sent_single)


def test_xml_response_when_asked(srv: ServerProcess) -> None:
    ds = make_image()
    body = multipart([({"Content-Type": "application/dicom"}, part10_bytes(ds))])
    r = requests.post(
        _url(srv),
        data=body,
        headers={"Content-Type": content_type(), "Accept": "application/dicom+xml"},
        timeout=30,
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/dicom+xml")
    from xml.etree import ElementTree

    root = ElementTree.fromstring(r.content)
    ns = "{http://dicom.nema.org/PS3.19/models/NativeDICOM}"
    uids = [v.text for v in root.iter(f"{ns}Value")]
    assert str(ds.SOPInstanceUID) in uids


# ------------------------------------------------------------------ partial failure, conflicts
def test_partial_failure_is_202_with_failed_sop_sequence(srv: ServerProcess) -> None:
    good = make_image()
    unknown_class = make_image(sop_class="1.2.3.4.5.6.7")
    body = multipart(
        [
            ({"Content-Type": "application/dicom"}, part10_bytes(good)),
            ({"Content-Type": "application/dicom"}, b"this is not a DICOM file at all" * 10),
            ({"Content-Type": "application/dicom"}, part10_bytes(unknown_class)),
            ({"Content-Type": "application/dicom"}, part10_bytes(make_image())[:700]),  # cut off
        ]
    )
    r = requests.post(_url(srv), data=body, headers={"Content-Type": content_type()}, timeout=30)
    assert r.status_code == 202, r.text
    result = Dataset.from_json(r.json())
    assert [i.ReferencedSOPInstanceUID for i in result.ReferencedSOPSequence] == [
        good.SOPInstanceUID
    ]
    reasons = [int(i.FailureReason) for i in result.FailedSOPSequence]
    assert reasons == [0xC000, 0x0122, 0xC000]
    assert result.FailedSOPSequence[1].ReferencedSOPInstanceUID == unknown_class.SOPInstanceUID
    assert result.FailedSOPSequence[1].ReferencedSOPClassUID == "1.2.3.4.5.6.7"
    assert r.headers.get("warning", "").startswith("299 openpacs")
    assert stored_instance_files(srv.data_dir, unknown_class.SOPInstanceUID) == []

    # dicomweb-client sees the same 202 answer.
    response = _client(srv).store_instances([make_image(), make_image(sop_class="1.2.3.4.5.6.8")])
    assert len(response.ReferencedSOPSequence) == 1
    assert int(response.FailedSOPSequence[0].FailureReason) == 0x0122


def test_study_mismatch_is_409_or_202(srv: ServerProcess) -> None:
    study = generate_uid()
    other = make_image()
    client = _client(srv)
    with pytest.raises(requests.HTTPError) as raised:
        client.store_instances([other], study_instance_uid=study)
    answer = raised.value.response
    assert answer.status_code == 409
    result = Dataset.from_json(answer.json())
    assert int(result.FailedSOPSequence[0].FailureReason) == 0xA900
    assert result.FailedSOPSequence[0].ReferencedSOPInstanceUID == other.SOPInstanceUID
    assert result.RetrieveURL == _url(srv, f"/studies/{study}")
    assert stored_instance_files(srv.data_dir, other.SOPInstanceUID) == []

    matching = make_image(study_uid=study)
    response = client.store_instances([matching, make_image()], study_instance_uid=study)
    assert [i.ReferencedSOPInstanceUID for i in response.ReferencedSOPSequence] == [
        matching.SOPInstanceUID
    ]
    assert int(response.FailedSOPSequence[0].FailureReason) == 0xA900


# ------------------------------------------------------------------ malformed requests
def _post_raw(server: ServerProcess, ctype: str | None, body: bytes) -> requests.Response:
    headers = {"Content-Type": ctype} if ctype is not None else {}
    return requests.post(_url(server), data=body, headers=headers, timeout=30)


GOOD_PART = ({"Content-Type": "application/dicom"}, b"")  # content filled in per test


@pytest.mark.parametrize(
    ("name", "status", "ctype", "body"),
    [
        ("no content type", 415, None, b"x"),
        ("image/png", 415, "image/png", b"x"),
        ("multipart form", 415, "multipart/form-data; boundary=b", b"--b--\r\n"),
        ("unknown root type", 415, 'multipart/related; type="text/plain"; boundary=b', b""),
        ("no boundary", 400, 'multipart/related; type="application/dicom"', b"x"),
        ("empty body", 400, content_type(), b""),
        ("no delimiter", 400, content_type(), b"garbage without any delimiter"),
        ("wrong boundary", 400, content_type(boundary="other"), multipart([GOOD_PART])),
        ("no parts", 400, content_type(), f"--{BOUNDARY}--\r\n".encode()),
        ("truncated", 400, content_type(), multipart([GOOD_PART])[:-30]),
        (
            "broken part header",
            400,
            content_type(),
            f"--{BOUNDARY}\r\nContent Type application/dicom\r\n\r\nx\r\n--{BOUNDARY}--".encode(),
        ),
        (
            "metadata not JSON",
            400,
            content_type("application/dicom+json"),
            multipart([({"Content-Type": "application/dicom+json"}, b"[{not json")]),
        ),
        (
            "metadata not an array of objects",
            400,
            content_type("application/dicom+json"),
            multipart([({"Content-Type": "application/dicom+json"}, b"[1, 2]")]),
        ),
        (
            "bulk part without Content-Location",
            400,
            content_type("application/dicom+json"),
            multipart([({"Content-Type": "application/octet-stream"}, b"1234")]),
        ),
        (
            "part without content type and no type parameter",
            400,
            f"multipart/related; boundary={BOUNDARY}",
            multipart([({}, b"1234")]),
        ),
        (
            "xml part that is not the Native DICOM Model",
            400,
            content_type(),
            multipart([({"Content-Type": "application/dicom+xml"}, b"<x/>")]),
        ),
        (
            "xml with entity declarations",
            400,
            content_type("application/dicom+xml"),
            multipart(
                [
                    (
                        {"Content-Type": "application/dicom+xml"},
                        b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaa">]>'
                        b"<NativeDicomModel>&a;</NativeDicomModel>",
                    )
                ]
            ),
        ),
        (
            "xml not well formed",
            400,
            content_type("application/dicom+xml"),
            multipart([({"Content-Type": "application/dicom+xml"}, b"<NativeDicomModel><")]),
        ),
        ("gzip", 415, content_type(), b""),
        ("empty single part", 400, "application/dicom", b""),
    ],
)
def test_malformed_requests_get_4xx_with_reason(
    srv: ServerProcess, name: str, status: int, ctype: str | None, body: bytes
) -> None:
    if name == "gzip":
        r = requests.post(
            _url(srv),
            data=b"\x1f\x8b",
            headers={"Content-Type": ctype or "", "Content-Encoding": "gzip"},
            timeout=30,
        )
    else:
        r = _post_raw(srv, ctype, body)
    assert r.status_code == status, (name, r.status_code, r.text)
    assert r.json()["error"], name  # a reason, as JSON
    assert f"refused: {status}" in srv.log()  # logged with the client's address


def test_metadata_failures_are_reported_per_instance(srv: ServerProcess) -> None:
    """A metadata item naming a missing bulk part, or lacking its SOP Instance UID, fails
    alone (C000, C00B); the request is 400 when nothing could be stored."""
    good = _sc_metadata()
    missing_part = _sc_metadata()
    no_uid = _sc_metadata()
    del no_uid[0]["00080018"]
    pixels = np.zeros((64, 64), dtype=np.uint8).tobytes()
    body = multipart(
        [
            (
                {"Content-Type": "application/dicom+json"},
                _dumps([good[0], missing_part[0], no_uid[0]]).encode(),
            ),
            ({"Content-Type": "application/octet-stream", "Content-Location": good[1]}, pixels),
            ({"Content-Type": "application/octet-stream", "Content-Location": no_uid[1]}, pixels),
        ]
    )
    r = requests.post(
        _url(srv),
        data=body,
        headers={"Content-Type": content_type("application/dicom+json")},
        timeout=30,
    )
    assert r.status_code == 202, r.text
    result = Dataset.from_json(r.json())
    assert len(result.ReferencedSOPSequence) == 1
    assert [int(i.FailureReason) for i in result.FailedSOPSequence] == [0xC000, 0xC00B]

    body = multipart(
        [({"Content-Type": "application/dicom+json"}, _dumps([missing_part[0]]).encode())]
    )
    r = requests.post(
        _url(srv),
        data=body,
        headers={"Content-Type": content_type("application/dicom+json")},
        timeout=30,
    )
    assert r.status_code == 400
    assert int(Dataset.from_json(r.json()).FailedSOPSequence[0].FailureReason) == 0xC000


def test_over_max_request_size_is_413_before_reading(make_server) -> None:
    server = make_server("[http]\nmax_request_size = 100000\n")
    # Content-Length over the limit: answered without the body ever being sent.
    head = (
        f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type()}\r\n"
        "Content-Length: 1000000000\r\nExpect: 100-continue"
    ).encode()
    t0 = time.monotonic()
    status, _headers, answer = raw_http(server.http_port, head)
    assert status == 413
    assert "100000" in json.loads(answer)["error"]
    assert time.monotonic() - t0 < 5
    # Chunked (no Content-Length): refused once the count passes the limit.
    ds = make_image(rows=256, columns=256)  # 128 KiB of pixel data
    body = multipart([({"Content-Type": "application/dicom"}, part10_bytes(ds))])

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 16384):
            yield body[i : i + 16384]

    try:
        r = requests.post(
            _url(server), data=chunks(), headers={"Content-Type": content_type()}, timeout=30
        )
        assert r.status_code == 413
        assert r.json()["error"]
    except requests.ConnectionError:
        pass  # the server may close before the client finished sending: the log says why
    assert "413" in server.log()
    assert stored_instance_files(server.data_dir, ds.SOPInstanceUID) == []
    # A request under the limit is stored.
    small = make_image()
    response = _client(server).store_instances([small])
    assert len(response.ReferencedSOPSequence) == 1


# ------------------------------------------------------------------ DICOM JSON + bulk data
def _sc(pixels: np.ndarray, photometric: str = "MONOCHROME2") -> hd.sc.SCImage:
    return hd.sc.SCImage(
        pixel_array=pixels, photometric_interpretation=photometric, bits_allocated=8,
        coordinate_system="PATIENT", study_instance_uid=generate_uid(), series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(), series_number=1, instance_number=1, manufacturer="openpacs tests",
        patient_id="P-JSON", patient_name="Jöns^Åsa", patient_birth_date="19700101", patient_sex="O",
        accession_number="A1", study_id="1", study_date="20260101", study_time="120000",
        referring_physician_name="Ref^Doc", patient_orientation=("L", "P"), laterality="L",
        content_date="20260101", content_time="120000",
    )  # fmt: skip


def _sc_metadata(pixels: np.ndarray | None = None) -> tuple[dict, str]:
    """A valid SC instance as DICOM JSON with its Pixel Data as a BulkDataURI."""
    sc = _sc(pixels if pixels is not None else np.zeros((64, 64), dtype=np.uint8))
    sc.SpecificCharacterSet = "ISO_IR 192"
    uri = f"http://client.example/bulk/{sc.SOPInstanceUID}/pixels"
    return sc.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda _e: uri), uri


def _dumps(metadata: object) -> str:
    """JSON of DICOM JSON objects (highdicom keeps dates as pydicom DA values: str them)."""
    return json.dumps(metadata, default=str)


def _video_metadata() -> tuple[Dataset, str]:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = VIDEO_PHOTOGRAPHIC
    ds.SOPInstanceUID = generate_uid()
    ds.StudyDate, ds.StudyTime = "20260101", "120000"
    ds.ContentDate, ds.ContentTime = "20260101", "120000"
    ds.AccessionNumber, ds.Modality, ds.Manufacturer = "A1", "XC", "openpacs tests"
    ds.ReferringPhysicianName = "Ref^Doc"
    ds.PatientName, ds.PatientID = "Müller^Jörg", "P-VIDEO"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ""
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = (
        "818981001",
        "SCT",
        "Abdomen",
    )
    ds.AnatomicRegionSequence = [region]
    ds.AcquisitionContextSequence = []
    ds.LossyImageCompression, ds.LossyImageCompressionRatio = "01", 50
    ds.LossyImageCompressionMethod = "ISO_14496_10"
    ds.CineRate = 25
    ds.PixelData = b"\0\0"
    ds["PixelData"].VR = "OB"
    return ds, f"urn:openpacs-test:{ds.SOPInstanceUID}:video"


def test_json_with_jpeg_octet_stream_and_mp4_bulk_data(srv: ServerProcess, tmp_path: Path) -> None:
    """Metadata + bulk data (seed 002 T3.22: image/jpeg, video/mp4; and native pixels): each
    stored object passes dciodvfy, has the right Transfer Syntax and the sent bulk data."""
    from PIL import Image

    rng = np.random.default_rng(1)
    gray = rng.integers(0, 255, (64, 64), dtype=np.uint8)
    jpeg_meta, jpeg_uri = _sc_metadata(gray)
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit"):
        del jpeg_meta[f"{tag_for_keyword(keyword):08X}"]
    jpeg_meta["00282110"] = {"vr": "CS", "Value": ["01"]}  # Lossy Image Compression
    jpeg = io.BytesIO()
    Image.fromarray(gray).save(jpeg, "JPEG", quality=90)
    jpeg_bytes = jpeg.getvalue()

    native_meta, native_uri = _sc_metadata(rng.integers(0, 255, (64, 64), dtype=np.uint8))
    native_pixels = rng.integers(0, 255, (64, 64), dtype=np.uint8).tobytes()

    video, video_uri = _video_metadata()
    video_meta = video.to_json_dict(
        bulk_data_threshold=1, bulk_data_element_handler=lambda _e: video_uri
    )
    mp4 = make_mp4(width=640, height=480, frames=50, duration=2000)

    body = multipart(
        [
            (
                {"Content-Type": "application/dicom+json; charset=utf-8"},
                _dumps([jpeg_meta, native_meta, video_meta]).encode(),
            ),
            ({"Content-Type": "image/jpeg", "Content-Location": jpeg_uri}, jpeg_bytes),
            (
                {"Content-Type": "application/octet-stream", "Content-Location": native_uri},
                native_pixels,
            ),
            ({"Content-Type": "video/mp4", "Content-Location": video_uri}, mp4),
        ]
    )
    r = requests.post(
        _url(srv),
        data=body,
        headers={"Content-Type": content_type("application/dicom+json")},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    result = Dataset.from_json(r.json())
    assert len(result.ReferencedSOPSequence) == 3

    jpeg_file = _stored_file(srv, jpeg_meta["00080018"]["Value"][0])
    native_file = _stored_file(srv, native_meta["00080018"]["Value"][0])
    video_file = _stored_file(srv, str(video.SOPInstanceUID))
    for path in (jpeg_file, native_file, video_file):
        assert _dciodvfy_errors(path) == [], path

    stored = pydicom.dcmread(jpeg_file)
    assert stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert stored.file_meta.ImplementationClassUID == "2.25.331373958394457291347211950296212640341"
    assert (stored.Rows, stored.Columns, stored.BitsStored) == (64, 64, 8)
    assert stored.PatientName == "Jöns^Åsa"
    assert pydicom.encaps.generate_frames(stored.PixelData, number_of_frames=1).__next__().rstrip(
        b"\0"
    ) == jpeg_bytes.rstrip(b"\0")
    decoded = stored.pixel_array.astype(int)
    expected = np.asarray(Image.open(io.BytesIO(jpeg_bytes))).astype(int)
    # The frame bytes are identical (above); two JPEG decoders (Pillow's libjpeg and the
    # DICOM codec) may round the inverse DCT differently by one grey level.
    assert decoded.shape == expected.shape
    assert int(np.abs(decoded - expected).max()) <= 1

    stored = pydicom.dcmread(native_file)
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert stored.PixelData == native_pixels

    stored = pydicom.dcmread(video_file)
    assert stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.102"
    assert (stored.Rows, stored.Columns, int(stored.NumberOfFrames)) == (480, 640, 50)
    assert float(stored.FrameTime) == 40.0
    fragments = b"".join(pydicom.encaps.generate_fragments(stored.PixelData))
    assert fragments[: len(mp4)] == mp4

    (found,) = _find_study(srv.port, str(video.StudyInstanceUID))
    assert found.PatientID == "P-VIDEO"


def _native_xml(obj: dict) -> bytes:
    """A DICOM JSON object written as a PS3.19 Native DICOM Model document (the test's own
    writer: person names as name components, sequences as items, bulk data by URI)."""
    from xml.sax.saxutils import escape, quoteattr

    def attrs(o: dict) -> str:
        out = []
        for tag, el in o.items():
            vr = el["vr"]
            inner = []
            if "BulkDataURI" in el:
                inner.append(f"<BulkData uri={quoteattr(el['BulkDataURI'])}/>")
            for n, v in enumerate(el.get("Value", []), start=1):
                if vr == "SQ":
                    inner.append(f'<Item number="{n}">{attrs(v)}</Item>')
                elif vr == "PN":
                    comps = v["Alphabetic"].split("^")
                    names = ["FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix"]
                    xml = "".join(
                        f"<{k}>{escape(c)}</{k}>" for k, c in zip(names, comps, strict=False)
                    )
                    inner.append(
                        f'<PersonName number="{n}"><Alphabetic>{xml}</Alphabetic></PersonName>'
                    )
                else:
                    inner.append(f'<Value number="{n}">{escape(str(v))}</Value>')
            out.append(f'<DicomAttribute tag="{tag}" vr="{vr}">{"".join(inner)}</DicomAttribute>')
        return "".join(out)

    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<NativeDicomModel '
        'xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">'
        + attrs(obj)
        + "</NativeDicomModel>"
    ).encode()


def test_xml_metadata_with_bulk_data(srv: ServerProcess) -> None:
    """PS3.19 XML metadata (seed 002 T3.22 accepts application/dicom+xml): one document per
    instance, pixel data as a bulk part; the object is stored like a JSON one and passes
    dciodvfy."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 255, (64, 64), dtype=np.uint8)
    meta, uri = _sc_metadata(pixels)
    meta = json.loads(_dumps(meta))
    body = multipart(
        [
            ({"Content-Type": "application/dicom+xml"}, _native_xml(meta)),
            (
                {"Content-Type": "application/octet-stream", "Content-Location": uri},
                pixels.tobytes(),
            ),
        ]
    )
    r = requests.post(
        _url(srv),
        data=body,
        headers={"Content-Type": content_type("application/dicom+xml")},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    path = _stored_file(srv, meta["00080018"]["Value"][0])
    assert _dciodvfy_errors(path) == [], path
    stored = pydicom.dcmread(path)
    assert stored.PatientName == "Jöns^Åsa"
    assert stored.Rows == 64 and stored.PixelData == pixels.tobytes()
    assert stored.ReferringPhysicianName == "Ref^Doc"
    assert stored.SeriesNumber == 1


# ------------------------------------------------------------------ size, memory, durability
def _big_multipart_file(
    path: Path, frames: int, rows: int = 1024, columns: int = 1024
) -> tuple[Dataset, int]:
    """A multipart body holding one multi-frame instance whose Pixel Data is a sparse extent."""
    ds = Dataset()
    ds.SOPClassUID = MF_GRAYSCALE_WORD_SC
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "Big^Upload", "BIG-STOW"
    ds.Modality = "OT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.NumberOfFrames, ds.Rows, ds.Columns = frames, rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    length = frames * rows * columns * 2
    with open(path, "wb") as fh:
        fh.write(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        fh.write(part10_bytes(ds))
        fh.write(struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OW", length))
        fh.seek(length, os.SEEK_CUR)
        fh.write(f"\r\n--{BOUNDARY}--\r\n".encode())
    return ds, length


def test_big_instance_streams_with_bounded_memory(srv: ServerProcess, tmp_path: Path) -> None:
    body = tmp_path / "big.multipart"
    ds, length = _big_multipart_file(body, frames=150)  # 150 × 2 MiB = 315 MB
    size = body.stat().st_size
    before_kb = srv.rss_peak_kb()
    t0 = time.monotonic()
    with open(body, "rb") as fh:
        r = requests.post(_url(srv), data=fh, headers={"Content-Type": content_type()}, timeout=300)
    elapsed = time.monotonic() - t0
    assert r.status_code == 200, r.text
    peak_kb = srv.rss_peak_kb()
    stored = _stored_file(srv, ds.SOPInstanceUID)
    (row,) = index_rows(srv.data_dir, "instances", sop_uid=ds.SOPInstanceUID)
    assert row["size"] == stored.stat().st_size > length
    print(
        f"STOW-RS of {size / 1e6:.0f} MB in {elapsed:.1f} s ({size / 1e6 / elapsed:.0f} MB/s); "
        f"server peak RSS {before_kb / 1024:.0f} MB before, {peak_kb / 1024:.0f} MB after"
    )
    assert (peak_kb - before_kb) / 1024 < 64, (
        f"peak RSS grew by {(peak_kb - before_kb) / 1024:.0f} MB"
    )
    stored.unlink()  # give the disk space back early


def test_kill_9_right_after_200_keeps_the_instance(make_server) -> None:
    server = make_server()
    ds = make_image()
    response = _client(server).store_instances([ds])
    assert len(response.ReferencedSOPSequence) == 1
    server.kill()
    server.start()
    (found,) = _find_study(server.port, str(ds.StudyInstanceUID))
    assert int(found.NumberOfStudyRelatedInstances) == 1
    assert _stored_file(server, ds.SOPInstanceUID).read_bytes() == as_stored(part10_bytes(ds))
