"""WADO-RS (PS3.18 10.4, seed 002 §3.2.1) against the real server: dicomweb-client as the client
for every transaction it implements (what it received captured off its own HTTP session, so the
bytes compared are those the client parsed), raw HTTP for thumbnails, gzip and what a correct
client would not send. Instances go in by C-STORE (pynetdicom); what comes back is compared
byte for byte with what was sent, pixel for pixel with pydicom's decoding of the original, and
rendered images are opened with Pillow."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.encaps import generate_frames
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom.dsutils import encode
from support import (
    MR_IMAGE,
    ServerProcess,
    dataset_bytes_of_file,
    make_image,
    shipped,
    store_datasets,
    stored_instance_files,
)

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
JLS_LOSSLESS = "1.2.840.10008.1.2.4.80"
RLE = "1.2.840.10008.1.2.5"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
MF_GRAYSCALE_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
AVAILABLE_TS = "00083002"


# ---------------------------------------------------------------------------- data
def _renamed(name: str, study: str) -> Dataset:
    """A test file shipped with pydicom, given fresh UIDs (several share a SOP Instance UID)."""
    ds = dcmread(shipped(name))
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = "WADO-2"
    return ds


def _multiframe(study: str, series: str) -> Dataset:
    frames = np.random.default_rng(7).integers(0, 4096, size=(4, 16, 20)).astype(np.uint16)
    ds = make_image(
        sop_class=MF_GRAYSCALE_WORD_SC,
        modality="OT",
        study_uid=study,
        series_uid=series,
        rows=16,
        columns=20,
        patient_id="WADO-1",
    )
    ds.NumberOfFrames = 4
    ds.PixelData = frames.tobytes()
    return ds


def _gradient(study: str, series: str) -> Dataset:
    """32×32, values 0–1023 row by row: the expected output of any window can be computed."""
    ds = make_image(study_uid=study, series_uid=series, rows=32, columns=32, patient_id="WADO-1")
    ds.PixelData = np.arange(1024, dtype=np.uint16).tobytes()
    ds.InstanceNumber = 9
    return ds


def _with_bulk(study: str, series: str) -> Dataset:
    """An image with an icon (pixel data inside a sequence) and a large private OB value."""
    ds = make_image(study_uid=study, series_uid=series, instance_number=1, patient_id="WADO-1")
    icon = Dataset()
    icon.SamplesPerPixel = 1
    icon.PhotometricInterpretation = "MONOCHROME2"
    icon.Rows = icon.Columns = 64
    icon.BitsAllocated = icon.BitsStored = 8
    icon.HighBit = 7
    icon.PixelRepresentation = 0
    icon.PixelData = bytes(range(256)) * 16
    ds.IconImageSequence = Sequence([icon])
    block = ds.private_block(0x0011, "OPENPACS WADO", create=True)
    block.add_new(0x01, "OB", bytes((i * 7) % 251 for i in range(3000)))
    block.add_new(0x02, "OB", b"\x01\x02\x03\x04")  # small: stays inline
    return ds


def _kos(study: str) -> Dataset:
    ds = make_image(study_uid=study, sop_class=KOS, modality="KO", patient_id="WADO-1")
    for keyword in (
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "PixelData",
        "ImageType",
    ):
        delattr(ds, keyword)
    ds.file_meta.MediaStorageSOPClassUID = KOS
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "113000", "DCM", "Of Interest"
    ds.ConceptNameCodeSequence = [code]
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    return ds


class Archive:
    """The module's server and what was sent to it."""

    def __init__(self, srv: ServerProcess) -> None:
        self.srv = srv
        self.native_study = generate_uid()
        self.codec_study = generate_uid()
        self.series1 = generate_uid()
        self.series2 = generate_uid()
        self.sent: dict[str, Dataset] = {}
        self.by_name: dict[str, Dataset] = {}

    def add(self, name: str, ds: Dataset) -> None:
        self.by_name[name] = ds
        self.sent[str(ds.SOPInstanceUID)] = ds

    def sent_bytes(self, ds: Dataset) -> bytes:
        """The data set as pynetdicom encoded it for C-STORE."""
        ts = pydicom.uid.UID(ds.file_meta.TransferSyntaxUID)
        data = encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
        assert data is not None
        return data

    def stored(self, ds: Dataset) -> bytes:
        (path,) = stored_instance_files(self.srv.data_dir, str(ds.SOPInstanceUID))
        return path.read_bytes()

    def uids(self, name: str) -> tuple[str, str, str]:
        ds = self.by_name[name]
        return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    srv = ServerProcess(tmp_path_factory.mktemp("wado") / "srv").start()
    a = Archive(srv)
    a.add("bulk", _with_bulk(a.native_study, a.series1))
    for n in (2, 3):
        a.add(
            f"ct{n}",
            make_image(
                study_uid=a.native_study,
                series_uid=a.series1,
                instance_number=n,
                seed=n,
                patient_id="WADO-1",
            ),
        )
    a.add("mf", _multiframe(a.native_study, a.series2))
    a.add("gradient", _gradient(a.native_study, a.series2))
    a.add("kos", _kos(a.native_study))
    for name, file in (
        ("jpeg", "SC_rgb_jpeg_dcmtk.dcm"),
        ("j2k", "JPEG2000.dcm"),
        ("jls", "MR_small_jpeg_ls_lossless.dcm"),
        ("rle", "MR_small_RLE.dcm"),
        ("rle2", "SC_rgb_rle_2frame.dcm"),
        ("big", "MR_small_bigendian.dcm"),
        ("deflated", "image_dfl.dcm"),
        ("iso2022", "chrH31.dcm"),
    ):
        a.add(name, _renamed(name=file, study=a.codec_study))
    a.add(
        "utf8",
        make_image(
            sop_class=MR_IMAGE,
            study_uid=a.codec_study,
            charset="ISO_IR 192",
            patient_name="Müller^Jürgen=王^小東",
            patient_id="WADO-2",
        ),
    )
    datasets = list(a.by_name.values())
    assert store_datasets(srv.port, datasets) == [(0, None)] * len(datasets), srv.log()[-3000:]
    yield a
    srv.stop()


class Captured(DICOMwebClient):
    """dicomweb-client with every response body it received kept for inspection."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.responses: list[requests.Response] = []

        def keep(response: requests.Response, *args: Any, **kwargs: Any) -> None:
            _ = response.content  # read now; requests replays it to the client
            self.responses.append(response)

        self._session.hooks["response"].append(keep)

    def last_parts(self) -> list[tuple[dict[str, str], bytes]]:
        return multipart_parts(self.responses[-1])


def client(a: Archive) -> Captured:
    return Captured(f"http://127.0.0.1:{a.srv.http_port}/dicom-web")


def multipart_parts(response: requests.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related body (RFC 2046 5.1), parsed here independently."""
    ctype = response.headers["Content-Type"]
    assert ctype.startswith("multipart/related"), ctype
    match = re.search(r'boundary="?([^";]+)"?', ctype)
    assert match, ctype
    delimiter = b"--" + match.group(1).encode()
    body = response.content
    pieces = body.split(b"\r\n" + delimiter)
    first = pieces[0]
    assert first.startswith(delimiter), body[:80]
    pieces[0] = first[len(delimiter) :]
    assert pieces[-1].startswith(b"--"), "no close delimiter"
    parts = []
    for piece in pieces[:-1]:
        head, sep, content = piece[2:].partition(b"\r\n\r\n")  # after the CRLF of the delimiter
        assert sep, piece[:200]
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
    return parts


def url(a: Archive, path: str) -> str:
    return f"http://127.0.0.1:{a.srv.http_port}/dicom-web{path}"


def get(a: Archive, path: str, accept: str | None = None, **kw: Any) -> requests.Response:
    headers: dict[str, str | None] = {"Accept": accept}  # None: no Accept field at all
    headers.update(kw.pop("headers", {}))
    return requests.get(url(a, path), headers=headers, timeout=30, **kw)


def instance_path(a: Archive, name: str) -> str:
    study, series, sop = a.uids(name)
    return f"/studies/{study}/series/{series}/instances/{sop}"


def pixels_of(ds: Dataset) -> np.ndarray:
    return np.asarray(ds.pixel_array)


def expected_window(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) to 0–255, written out independently of openpacs."""
    x = x.astype(np.float64)
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
    y[x <= c - 0.5 - (w - 1) / 2] = 0
    y[x > c - 0.5 + (w - 1) / 2] = 255
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------- DICOM retrieve
def test_retrieve_study_series_instance_byte_exact(archive: Archive) -> None:
    """Study, series and instance retrieves as stored (the default and ``transfer-syntax=*``):
    every part is the stored file byte for byte, and its data set is what C-STORE sent."""
    a = archive
    web = client(a)
    datasets = web.retrieve_study(a.codec_study)
    codec_names = ("jpeg", "j2k", "jls", "rle", "rle2", "big", "deflated", "iso2022", "utf8")
    assert {str(d.SOPInstanceUID) for d in datasets} == {
        str(a.by_name[n].SOPInstanceUID) for n in codec_names
    }
    parts = web.last_parts()
    assert len(parts) == len(codec_names)
    for headers, content in parts:
        sop = str(dcmread(io.BytesIO(content), stop_before_pixels=True).SOPInstanceUID)
        sent = a.sent[sop]
        ts = str(sent.file_meta.TransferSyntaxUID)
        assert headers["content-type"] == f"application/dicom; transfer-syntax={ts}"
        assert content == a.stored(sent)  # compressed stays compressed: the stored syntax
        if ts != "1.2.840.10008.1.2.1.99":  # deflated: the stored file holds what was inflated
            assert content[132:].endswith(a.sent_bytes(sent)), sop
    # series with several instances, transfer-syntax=* (seed 002 T3.3)
    series = web.retrieve_series(
        a.native_study, a.series1, media_types=(("application/dicom", "*"),)
    )
    assert len(series) == 3
    for headers, content in web.last_parts():
        sop = str(dcmread(io.BytesIO(content)).SOPInstanceUID)
        assert content == a.stored(a.sent[sop])
        with io.BytesIO(content) as fh:
            assert dataset_bytes_of_file_obj(fh) == a.sent_bytes(a.sent[sop])
        assert headers["content-length"] == str(len(content))
    study, series_uid, sop = a.uids("j2k")
    one = web.retrieve_instance(study, series_uid, sop)
    assert str(one.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.91"
    (only,) = web.last_parts()
    assert only[1] == a.stored(a.by_name["j2k"])


def dataset_bytes_of_file_obj(fh: io.BytesIO) -> bytes:
    from pydicom.filereader import _read_file_meta_info, read_preamble

    read_preamble(fh, False)
    _read_file_meta_info(fh)
    return fh.read()


def test_single_part_instance(archive: Archive) -> None:
    """Accept: application/dicom on an instance: one Part 10 body, not multipart."""
    a = archive
    r = get(a, instance_path(a, "rle"), "application/dicom")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/dicom")
    assert f"transfer-syntax={RLE}" in r.headers["content-type"]
    assert r.content == a.stored(a.by_name["rle"])
    # the stored file is what was sent (C-STORE, byte for byte) behind the File Meta
    (path,) = stored_instance_files(a.srv.data_dir, str(a.by_name["rle"].SOPInstanceUID))
    assert dataset_bytes_of_file(path) == a.sent_bytes(a.by_name["rle"])
    # application/dicom is for one instance only
    study = a.native_study
    assert get(a, f"/studies/{study}", "application/dicom").status_code == 406


@pytest.mark.parametrize("name", ["j2k", "jls", "rle2", "big", "deflated", "jpeg"])
def test_transcode_to_explicit_le(archive: Archive, name: str) -> None:
    """Compressed, big endian and deflated instances asked for in Explicit VR Little Endian:
    the pixels are those pydicom decodes from the original."""
    a = archive
    web = client(a)
    original = a.by_name[name]
    ds = web.retrieve_instance(*a.uids(name), media_types=(("application/dicom", EXPLICIT_LE),))
    assert str(ds.file_meta.TransferSyntaxUID) == EXPLICIT_LE
    ((headers, _),) = web.last_parts()
    assert headers["content-type"] == f"application/dicom; transfer-syntax={EXPLICIT_LE}"
    assert ds.SOPInstanceUID == original.SOPInstanceUID
    assert ds.PatientName == original.PatientName
    assert np.array_equal(pixels_of(ds), pixels_of(original))
    if name == "jpeg":  # lossy source: flagged (PS3.3 C.7.6.1.1.5)
        assert ds.LossyImageCompression == "01"
        assert ds.PhotometricInterpretation == "RGB"


@pytest.mark.parametrize("name", ["ct2", "mf", "rle", "big", "jls"])
def test_transcode_to_jpeg2000_lossless(archive: Archive, name: str) -> None:
    """Seed 002 T3.8: JPEG 2000 lossless, decoded again pixel-equal to the original (16×16 and
    16×20 images too: small images are not refused)."""
    a = archive
    web = client(a)
    ds = web.retrieve_instance(*a.uids(name), media_types=(("application/dicom", J2K_LOSSLESS),))
    assert str(ds.file_meta.TransferSyntaxUID) == J2K_LOSSLESS
    original = a.by_name[name]
    assert np.array_equal(pixels_of(ds), pixels_of(original))
    n_frames = int(original.get("NumberOfFrames", 1))
    assert len(list(generate_frames(ds.PixelData, number_of_frames=n_frames))) == n_frames


def test_transcode_series_multipart_other_syntaxes(archive: Archive) -> None:
    """A series in Implicit VR LE (raw HTTP: dicomweb-client does not offer it), RLE and
    JPEG-LS lossless: every instance decodes to its original pixels."""
    a = archive
    web = client(a)
    for ts in (IMPLICIT_LE, RLE, JLS_LOSSLESS):
        if ts == IMPLICIT_LE:
            accept = f'multipart/related; type="application/dicom"; transfer-syntax={ts}'
            r = get(a, f"/studies/{a.native_study}/series/{a.series2}", accept)
            assert r.status_code == 200, r.text
            got = [dcmread(io.BytesIO(content)) for _, content in multipart_parts(r)]
        else:
            got = web.retrieve_series(
                a.native_study, a.series2, media_types=(("application/dicom", ts),)
            )
        assert len(got) == 2
        for ds in got:
            assert str(ds.file_meta.TransferSyntaxUID) == ts
            original = a.sent[str(ds.SOPInstanceUID)]
            assert np.array_equal(pixels_of(ds), pixels_of(original)), ts


def test_transcode_refused_406(archive: Archive) -> None:
    """A syntax we cannot produce (lossy JPEG from native, an unknown UID) is a 406 that says
    why, before any byte of the body."""
    a = archive
    for ts in (JPEG_BASELINE, "1.2.3.4.5.6"):
        r = get(
            a,
            f"/studies/{a.native_study}",
            f'multipart/related; type="application/dicom"; transfer-syntax={ts}',
        )
        assert r.status_code == 406, r.text
        assert ts in r.json()["error"]
    web = client(a)
    with pytest.raises(requests.HTTPError) as exc:
        web.retrieve_instance(*a.uids("ct2"), media_types=(("application/dicom", JPEG_BASELINE),))
    assert exc.value.response.status_code == 406
    # an instance without pixel data asked for a compressed syntax comes in Explicit VR LE
    kos = web.retrieve_instance(*a.uids("kos"), media_types=(("application/dicom", J2K_LOSSLESS),))
    assert str(kos.file_meta.TransferSyntaxUID) == EXPLICIT_LE
    assert kos.SOPClassUID == KOS


# ---------------------------------------------------------------------------- metadata
def test_metadata_levels_and_bulkdata(archive: Archive) -> None:
    a = archive
    web = client(a)
    study_meta = web.retrieve_study_metadata(a.native_study)
    assert len(study_meta) == 6
    series_meta = web.retrieve_series_metadata(a.native_study, a.series1)
    assert len(series_meta) == 3
    meta = web.retrieve_instance_metadata(*a.uids("bulk"))
    original = a.by_name["bulk"]
    assert meta["00100010"]["Value"] == [{"Alphabetic": "Doe^John"}]
    assert meta[AVAILABLE_TS]["Value"] == [EXPLICIT_LE]
    assert meta["00110012"]["Value"] == ["OPENPACS WADO"] if "00110012" in meta else True
    assert meta["00111002"]["InlineBinary"]  # 4 bytes: inline
    # pixel data, the icon's pixel data (inside a sequence) and the large private OB: bulk data
    pixel_uri = meta["7FE00010"]["BulkDataURI"]
    icon_uri = meta["00880200"]["Value"][0]["7FE00010"]["BulkDataURI"]
    private_uri = meta["00111001"]["BulkDataURI"]
    assert icon_uri.endswith("/bulkdata/00880200/0/7FE00010")
    (pixel_value,) = web.retrieve_bulkdata(pixel_uri)
    assert pixel_value == original.PixelData
    (icon_value,) = web.retrieve_bulkdata(icon_uri)
    assert icon_value == original.IconImageSequence[0].PixelData
    (private_value,) = web.retrieve_bulkdata(private_uri)
    assert private_value == original[0x00111001].value
    # the metadata is a DICOM JSON model pydicom reads back
    back = Dataset.from_json(meta, bulk_data_uri_handler=lambda uri: b"")
    assert back.SOPInstanceUID == original.SOPInstanceUID
    assert back.IconImageSequence[0].Rows == 64


def test_metadata_of_compressed_and_big_endian(archive: Archive) -> None:
    a = archive
    web = client(a)
    meta = web.retrieve_instance_metadata(*a.uids("rle2"))
    assert meta[AVAILABLE_TS]["Value"] == [RLE]
    # encapsulated pixel data as bulk data: one part per frame, as stored
    uri = meta["7FE00010"]["BulkDataURI"]
    frames = web.retrieve_bulkdata(uri, media_types=(("image/dicom-rle", RLE),))
    assert frames == list(generate_frames(a.by_name["rle2"].PixelData, number_of_frames=2))
    meta = web.retrieve_instance_metadata(*a.uids("big"))
    (value,) = web.retrieve_bulkdata(meta["7FE00010"]["BulkDataURI"])
    assert value == pixels_of(a.by_name["big"]).astype("<i2").tobytes()  # little endian


def test_metadata_gzip_and_vary(archive: Archive) -> None:
    a = archive
    path = f"/dicom-web/studies/{a.native_study}/metadata"
    bodies = {}
    for encoding in ("gzip", None):
        conn = http.client.HTTPConnection("127.0.0.1", a.srv.http_port, timeout=30)
        headers = {"Accept": "application/dicom+json"}
        if encoding:
            headers["Accept-Encoding"] = encoding
        conn.request("GET", path, headers=headers)
        rsp = conn.getresponse()
        body = rsp.read()
        assert rsp.status == 200
        assert rsp.getheader("Content-Type", "").startswith("application/dicom+json")
        assert "accept-encoding" in rsp.getheader("Vary", "").lower()
        assert rsp.getheader("Content-Encoding") == encoding
        bodies[encoding] = body
        conn.close()
    assert bodies["gzip"][:2] == b"\x1f\x8b"
    assert json.loads(gzip.decompress(bodies["gzip"])) == json.loads(bodies[None])
    assert len(bodies["gzip"]) < len(bodies[None])


def test_metadata_character_sets(archive: Archive) -> None:
    """ISO_IR 192 and ISO 2022 IR 87 names come out as Unicode in the UTF-8 JSON."""
    a = archive
    web = client(a)
    utf8 = web.retrieve_instance_metadata(*a.uids("utf8"))
    assert utf8["00100010"]["Value"] == [{"Alphabetic": "Müller^Jürgen", "Ideographic": "王^小東"}]
    jis = web.retrieve_instance_metadata(*a.uids("iso2022"))
    expected = a.by_name["iso2022"].PatientName  # pydicom decodes the ISO 2022 escapes
    name = jis["00100010"]["Value"][0]
    assert name["Ideographic"] == expected.ideographic
    assert any("\u4e00" <= ch <= "\u9fff" for ch in name["Ideographic"])
    r = get(a, instance_path(a, "utf8") + "/metadata")
    assert "Müller^Jürgen".encode() in r.content  # raw UTF-8, not \u escapes


# ---------------------------------------------------------------------------- frames
def test_frames_native(archive: Archive) -> None:
    a = archive
    web = client(a)
    original = pixels_of(a.by_name["mf"])
    (one,) = web.retrieve_instance_frames(*a.uids("mf"), frame_numbers=[2])
    assert one == original[1].tobytes()
    got = web.retrieve_instance_frames(*a.uids("mf"), frame_numbers=[1, 3, 4])
    assert got == [original[0].tobytes(), original[2].tobytes(), original[3].tobytes()]
    for headers, _ in web.last_parts():
        assert headers["content-type"].startswith("application/octet-stream")


@pytest.mark.parametrize(
    ("name", "media", "ts"),
    [
        ("jpeg", "image/jpeg", JPEG_BASELINE),
        ("j2k", "image/jp2", "1.2.840.10008.1.2.4.91"),
        ("jls", "image/jls", JLS_LOSSLESS),
        ("rle2", "image/dicom-rle", RLE),
    ],
)
def test_frames_stored_compressed(archive: Archive, name: str, media: str, ts: str) -> None:
    """Frames in their stored media type are the stored codestream, byte for byte."""
    a = archive
    web = client(a)
    original = a.by_name[name]
    n = int(original.get("NumberOfFrames", 1))
    stored = list(generate_frames(original.PixelData, number_of_frames=n))
    numbers = list(range(1, n + 1))
    got = web.retrieve_instance_frames(*a.uids(name), numbers, media_types=((media, ts),))
    assert got == stored
    for headers, _ in web.last_parts():
        assert headers["content-type"] == f"{media}; transfer-syntax={ts}"


def test_frames_octets_from_compressed_and_encoded(archive: Archive) -> None:
    a = archive
    web = client(a)
    rle = a.by_name["rle2"]
    decoded = pixels_of(rle)[1].tobytes()
    got = web.retrieve_instance_frames(
        *a.uids("rle2"), [2], media_types=(("application/octet-stream", EXPLICIT_LE),)
    )
    assert got == [decoded]
    # no Accept: uncompressed octets (PS3.18 8.7.3.3.2); */* (the client's default): as stored
    ((headers, content),) = multipart_parts(get(a, instance_path(a, "rle2") + "/frames/2"))
    assert headers["content-type"].startswith("application/octet-stream")
    assert content == decoded
    stored = list(generate_frames(rle.PixelData, number_of_frames=2))
    assert web.retrieve_instance_frames(*a.uids("rle2"), [2, 1]) == [stored[1], stored[0]]
    ((headers, _), _) = web.last_parts()
    assert headers["content-type"] == f"image/dicom-rle; transfer-syntax={RLE}"
    # a native instance's frame asked for as JPEG 2000: encoded here, lossless
    (j2k,) = web.retrieve_instance_frames(
        *a.uids("mf"), [3], media_types=(("image/jp2", J2K_LOSSLESS),)
    )
    from pydicom.pixels import get_decoder

    decoded, _ = get_decoder(J2K_LOSSLESS).as_array(
        pydicom.encaps.encapsulate([j2k]),
        rows=16,
        columns=20,
        samples_per_pixel=1,
        bits_allocated=16,
        bits_stored=12,
        pixel_representation=0,
        photometric_interpretation="MONOCHROME2",
        number_of_frames=1,
    )
    assert np.array_equal(decoded, pixels_of(a.by_name["mf"])[2])


def test_frames_errors(archive: Archive) -> None:
    a = archive
    base = instance_path(a, "mf") + "/frames/"
    for frames, status in (
        ("5", 404),
        ("1,9", 404),
        ("0", 400),
        ("1,,2", 400),
        ("a", 400),
        ("1-3", 400),
    ):
        r = get(a, base + frames)
        assert r.status_code == status, (frames, r.text)
        assert r.json()["error"]
    r = get(a, instance_path(a, "kos") + "/frames/1")
    assert r.status_code == 404 and "pixel data" in r.json()["error"]
    # a compressed media type that does not match and cannot be encoded: 406
    r = get(a, base + "1", 'multipart/related; type="image/jpeg"')
    assert r.status_code == 406 and r.json()["error"]


# ---------------------------------------------------------------------------- rendered
def _image(data: bytes, fmt: str) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    assert img.format == fmt
    img.load()
    return img


def test_rendered_jpeg_default_and_png_window(archive: Archive) -> None:
    a = archive
    web = client(a)
    study, series, sop = a.uids("gradient")
    jpeg = web.retrieve_instance_rendered(study, series, sop)
    img = _image(jpeg, "JPEG")
    assert img.size == (32, 32) and img.mode == "L"
    png = web.retrieve_instance_rendered(
        study, series, sop, media_types=("image/png",), params={"window": "512,256,linear"}
    )
    img = _image(png, "PNG")
    assert img.size == (32, 32) and img.mode == "L"
    values = np.arange(1024).reshape(32, 32)
    out = np.asarray(img)
    assert np.array_equal(out, expected_window(values, 512, 256))
    assert (out[values <= 384] == 0).all() and (out[values > 640] == 255).all()
    assert 0 < out[values == 512][0] < 255
    # a different window changes the pixels as the formula says
    other = _image(
        web.retrieve_instance_rendered(
            study, series, sop, media_types=("image/png",), params={"window": "100,50"}
        ),
        "PNG",
    )
    assert np.array_equal(np.asarray(other), expected_window(values, 100, 50))
    # without a window: the stored range, minimum black, maximum white
    auto = np.asarray(
        _image(get(a, instance_path(a, "gradient") + "/rendered", "image/png").content, "PNG")
    )
    assert auto[0, 0] == 0 and auto[-1, -1] == 255


def test_rendered_frame_viewport_quality_colour(archive: Archive) -> None:
    a = archive
    web = client(a)
    study, series, sop = a.uids("mf")
    png = web.retrieve_instance_frames_rendered(
        study, series, sop, [3], media_types=("image/png",), params={"window": "2048,4096"}
    )
    frame = pixels_of(a.by_name["mf"])[2]
    assert np.array_equal(np.asarray(_image(png, "PNG")), expected_window(frame, 2048, 4096))
    base = instance_path(a, "gradient") + "/rendered"
    # viewport: fit inside vw×vh keeping the aspect ratio; a source region cut out first
    assert _image(get(a, base + "?viewport=64,64", "image/png").content, "PNG").size == (64, 64)
    assert _image(get(a, base + "?viewport=16,8", "image/png").content, "PNG").size == (8, 8)
    region = _image(
        get(a, base + "?viewport=8,8,0,0,8,8&window=512,1024", "image/png").content, "PNG"
    )
    assert region.size == (8, 8)
    full = expected_window(np.arange(1024).reshape(32, 32), 512, 1024)
    assert np.array_equal(np.asarray(region), full[:8, :8])
    big = base + "?viewport=256,256"
    low = get(a, big + "&quality=5", "image/jpeg").content
    high = get(a, big + "&quality=95", "image/jpeg").content
    assert _image(low, "JPEG").size == (256, 256) and len(low) < len(high)
    # colour (JPEG YBR decoded to RGB) and GIF
    rgb = _image(get(a, instance_path(a, "jpeg") + "/rendered", "image/png").content, "PNG")
    assert rgb.mode == "RGB" and rgb.size == (100, 100)
    diff = np.abs(np.asarray(rgb).astype(int) - pixels_of(a.by_name["jpeg"]).astype(int))
    assert diff.max() <= 2  # pydicom's YBR→RGB vs ours: the same decoder, rounding at most
    gif = get(a, base, "image/gif")
    assert gif.headers["content-type"] == "image/gif"
    _image(gif.content, "GIF")


def test_thumbnails(archive: Archive) -> None:
    a = archive
    for path in (
        instance_path(a, "gradient") + "/thumbnail",
        instance_path(a, "mf") + "/frames/2/thumbnail",
        f"/studies/{a.native_study}/series/{a.series2}/thumbnail",
        f"/studies/{a.codec_study}/thumbnail",
    ):
        r = get(a, path)
        assert r.status_code == 200, (path, r.text)
        assert r.headers["content-type"] == "image/jpeg"
        img = _image(r.content, "JPEG")
        assert max(img.size) <= 128
    r = get(a, instance_path(a, "gradient") + "/thumbnail", "image/png")
    assert _image(r.content, "PNG").mode == "L"


def test_rendered_errors(archive: Archive) -> None:
    a = archive
    base = instance_path(a, "gradient") + "/rendered"
    for query in (
        "window=abc,10",
        "window=1",
        "window=10,0",
        "viewport=0,0",
        "quality=0",
        "quality=x",
        "window=1,2,cubic",
    ):
        r = get(a, base + "?" + query)
        assert r.status_code == 400, (query, r.text)
        assert r.json()["error"]
    r = get(a, instance_path(a, "kos") + "/rendered")
    assert r.status_code == 406 and "no pixel data" in r.json()["error"]
    r = get(a, base, "image/tiff")
    assert r.status_code == 406 and "image/jpeg" in r.json()["error"]
    r = get(a, instance_path(a, "mf") + "/frames/1,2/rendered")
    assert r.status_code == 400
    r = get(a, instance_path(a, "mf") + "/frames/7/rendered")
    assert r.status_code == 404


# ---------------------------------------------------------------------------- malformed
def test_malformed_requests_raw_http(archive: Archive) -> None:
    """Each gives a 4xx with a reason, never a 500."""
    a = archive
    study, series, sop = a.uids("ct2")
    inst = f"/studies/{study}/series/{series}/instances/{sop}"
    cases = [
        ("/studies/1.2.abc", None, 400),
        ("/studies/" + "1." * 40 + "1", None, 400),
        (f"/studies/{study}/series/x.y", None, 400),
        ("/studies/1.2.3.999999", None, 404),
        (f"/studies/{study}/series/1.2.3.4", None, 404),
        (f"/studies/{study}/series/{series}/instances/1.2.3.4", None, 404),
        (f"/studies/{study}/series/{series}/instances/1.2.3.4/metadata", None, 404),
        (f"/studies/{study}", "garbage", 400),
        (f"/studies/{study}", "multipart/related; q=abc", 400),
        (f"/studies/{study}", "multipart/related; type=application/dicom; transfer-syntax=x", 400),
        (f"/studies/{study}", "application/pdf", 406),
        (f"/studies/{study}/metadata", "application/dicom+xml", 406),
        (inst + "/bulkdata/ZZZZ", None, 400),
        (inst + "/bulkdata/7FE00010/0", None, 400),
        (inst + "/bulkdata/00100010", None, 404),
        (inst + "/bulkdata/00880200/5/7FE00010", None, 404),
        (inst + "/bulkdata/00091234", None, 404),
        (inst + "?accept=application%2Fzip", None, 406),
    ]
    for path, accept, status in cases:
        r = get(a, path, accept)
        assert r.status_code == status, (path, accept, r.status_code, r.text)
        reason = r.json()["error"]
        assert isinstance(reason, str) and len(reason) > 5, (path, reason)
    assert "Traceback" not in a.srv.log()
    assert " 500 " not in a.srv.log()


# ---------------------------------------------------------------------------- streaming
FRAMES, ROWS, COLUMNS = 100, 1024, 1024  # 200 MiB of 16-bit pixels


def _write_big(path: Path, study: str) -> tuple[str, str]:
    """A ~200 MiB native multi-frame Part 10 file, written a frame at a time (the test's own
    memory stays small)."""
    ds = make_image(
        sop_class=MF_GRAYSCALE_WORD_SC, modality="OT", study_uid=study, rows=ROWS, columns=COLUMNS
    )
    del ds.PixelData
    ds.NumberOfFrames = FRAMES
    ds.save_as(path, enforce_file_format=True)
    frame = np.tile(np.arange(COLUMNS, dtype=np.uint16), (ROWS, 1)).tobytes()
    with open(path, "ab") as fh:
        fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, FRAMES * len(frame)))
        for _ in range(FRAMES):
            fh.write(frame)
    return str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def test_large_study_streams(archive: Archive, tmp_path: Path) -> None:
    """A 200 MiB instance comes back as a study retrieve, byte for byte, while no server
    process grows by anything near its size (the body is streamed, never built)."""
    a = archive
    study = generate_uid()
    big = tmp_path / "big.dcm"
    series, sop = _write_big(big, study)
    imported = a.srv.run_cli("import", "-q", str(big))
    assert imported.returncode == 0, imported.stderr + imported.stdout
    expected = hashlib.sha256()
    (stored,) = stored_instance_files(a.srv.data_dir, sop)
    with open(stored, "rb") as fh:
        while chunk := fh.read(1 << 20):
            expected.update(chunk)
    size = stored.stat().st_size
    assert size > FRAMES * ROWS * COLUMNS * 2
    before = a.srv.rss_peak_kb()
    got = hashlib.sha256()
    received = 0
    boundary_re = re.compile(rb"\r\n\r\n")
    with requests.get(url(a, f"/studies/{study}"), stream=True, timeout=60) as r:
        assert r.status_code == 200
        head = b""
        chunks = r.iter_content(1 << 20)
        for chunk in chunks:  # the part's header fields, then the part
            head += chunk
            match = boundary_re.search(head)
            if match:
                rest = head[match.end() :]
                break
        else:
            pytest.fail("no part header")
        assert b"Content-Length: " + str(size).encode() in head[: match.start()]
        tail = b""
        for chunk in [rest, *chunks]:
            data = tail + chunk
            keep = max(0, len(data) - 256)  # hold back what may be the close delimiter
            body, tail = data[:keep], data[keep:]
            take = min(len(body), size - received)
            got.update(body[:take])
            received += take
            if take < len(body):
                tail = body[take:] + tail
        take = size - received
        got.update(tail[:take])
        received += take
        assert tail[take:].strip().endswith(b"--")
    assert received == size and got.hexdigest() == expected.hexdigest()
    grown_mb = (a.srv.rss_peak_kb() - before) / 1024
    assert grown_mb < 64, f"a server process grew by {grown_mb:.0f} MB for a {size >> 20} MB study"
    # its frames and metadata are read without reading the whole instance either
    last = get(a, f"/studies/{study}/series/{series}/instances/{sop}/frames/{FRAMES}")
    (frame,) = [c for _, c in multipart_parts(last)]
    assert frame == np.tile(np.arange(COLUMNS, dtype=np.uint16), (ROWS, 1)).tobytes()
    assert (a.srv.rss_peak_kb() - before) / 1024 < 64


@pytest.mark.parametrize(
    "name", ["jpeg", "j2k", "jls", "rle", "rle2", "big", "deflated", "iso2022", "utf8", "mf"]
)
def test_every_stored_syntax_serves_all_resources(archive: Archive, name: str) -> None:
    """For each stored syntax: metadata, the first frame as uncompressed octets (equal to
    pydicom's decoding), pixel data bulk data in Explicit VR LE, and a rendered PNG."""
    a = archive
    web = client(a)
    original = a.by_name[name]
    pixels = pixels_of(original)
    first = pixels[0] if int(original.get("NumberOfFrames", 1)) > 1 else pixels
    meta = web.retrieve_instance_metadata(*a.uids(name))
    assert meta[AVAILABLE_TS]["Value"] == [str(original.file_meta.TransferSyntaxUID)]
    octets = (("application/octet-stream", EXPLICIT_LE),)
    (frame,) = web.retrieve_instance_frames(*a.uids(name), [1], media_types=octets)
    assert frame == first.astype(first.dtype.newbyteorder("<")).tobytes()
    values = web.retrieve_bulkdata(meta["7FE00010"]["BulkDataURI"], media_types=octets)
    assert b"".join(values) == pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    png = web.retrieve_instance_rendered(*a.uids(name), media_types=("image/png",))
    img = _image(png, "PNG")
    assert img.size == (int(original.Columns), int(original.Rows))
    assert img.mode == ("RGB" if original.SamplesPerPixel == 3 else "L")
