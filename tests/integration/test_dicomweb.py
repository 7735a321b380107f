"""DICOMweb across its transactions, against the real server: C-STORE (DCMTK storescu) and STOW-RS
(dicomweb-client) in, QIDO-RS to find, WADO-RS out byte for byte; and a sweep of malformed
requests over every resource, none of which may give a 500."""

from __future__ import annotations

import http.client
import json
import random
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid
from stow_support import as_stored, part10_bytes, raw_http
from support import (
    ServerProcess,
    dataset_bytes_of_file,
    make_image,
    require_tool,
    shipped,
    stored_instance_files,
    tool_env,
)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path_factory.mktemp("dicomweb")).start()
    yield server
    server.stop()


def client(srv: ServerProcess) -> DICOMwebClient:
    return DICOMwebClient(url=f"http://127.0.0.1:{srv.http_port}/dicom-web")


def http_get(srv: ServerProcess, path: str, accept: str) -> tuple[int, dict[str, str], bytes]:
    """GET with http.client (it undoes the chunked transfer coding of streamed answers)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=30)
    try:
        conn.request("GET", path, headers={"Accept": accept})
        rsp = conn.getresponse()
        return rsp.status, {k.lower(): v for k, v in rsp.getheaders()}, rsp.read()
    finally:
        conn.close()


def _dataset_bytes(data: bytes, tmp: Path) -> bytes:
    path = tmp / "part.dcm"
    path.write_bytes(data)
    return dataset_bytes_of_file(path)


def test_c_store_then_qido_then_wado_byte_for_byte(srv: ServerProcess, tmp_path: Path) -> None:
    """What DCMTK's storescu sent comes back from WADO-RS unchanged: the data set byte for byte
    (compressed stays compressed), found first by QIDO-RS with a wildcard on the name."""
    storescu = require_tool("storescu")
    study = generate_uid()
    files = []
    native = make_image(
        study_uid=study, patient_name="Ōtani^Shōhei", patient_id="RT-1", charset="ISO_IR 192"
    )
    native.add_new(0x00091010, "LO", "private value")  # private tag, kept as sent
    native.add_new(0x00091001, "LO", "OPENPACS-TEST")
    files.append(native)
    for name in ("JPEG2000.dcm", "MR_small_RLE.dcm"):
        ds = pydicom.dcmread(shipped(name))
        ds.StudyInstanceUID = study
        ds.PatientName = "Ōtani^Shōhei"
        ds.PatientID = "RT-1"
        ds.SpecificCharacterSet = "ISO_IR 192"
        files.append(ds)
    paths = []
    for n, ds in enumerate(files):
        path = tmp_path / f"in{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    for path, option in zip(paths, ("-xe", "-xw", "-xr"), strict=True):
        done = subprocess.run(
            [storescu, option, "-aec", srv.ae_title, "127.0.0.1", str(srv.port), str(path)],
            env=tool_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr

    web = client(srv)
    found = web.search_for_studies(search_filters={"PatientName": "ōtani*"})
    assert [s["0020000D"]["Value"][0] for s in found] == [study]
    assert found[0]["00201208"]["Value"] == [3]  # Number of Study Related Instances
    assert found[0]["00100010"]["Value"][0]["Alphabetic"] == "Ōtani^Shōhei"

    retrieved = web.retrieve_study(study)
    assert len(retrieved) == 3
    by_uid = {str(ds.SOPInstanceUID): ds for ds in retrieved}
    for path, ds in zip(paths, files, strict=True):
        back = by_uid[str(ds.SOPInstanceUID)]
        assert back.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert back.PatientName == "Ōtani^Shōhei"
        assert back.PixelData == pydicom.dcmread(path).PixelData

    # The raw multipart body, not re-encoded by pydicom: each part is the stored file byte for
    # byte, i.e. what storescu sent on the wire (test_storage checks the blob against DCMTK's
    # own bit-preserving storescp).
    status, headers, body = http_get(
        srv, f"/dicom-web/studies/{study}", 'multipart/related; type="application/dicom"'
    )
    assert status == 200
    boundary = headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    parts = body.split(b"--" + boundary.encode())
    assert parts[0] == b"" and parts[-1] == b"--\r\n"
    got = set()
    for part in parts[1:-1]:
        head, _, content = part.partition(b"\r\n\r\n")
        assert b"transfer-syntax=" in head
        got.add(content[:-2] if content.endswith(b"\r\n") else content)
    stored = {
        stored_instance_files(srv.data_dir, str(ds.SOPInstanceUID))[0].read_bytes() for ds in files
    }
    assert got == stored
    for ds in files:  # and the data set sent is the data set stored (pixel data untouched)
        blob = stored_instance_files(srv.data_dir, str(ds.SOPInstanceUID))[0]
        assert pydicom.dcmread(blob).PixelData == ds.PixelData


def test_stow_then_qido_then_wado_byte_for_byte(srv: ServerProcess, tmp_path: Path) -> None:
    """Instances sent with dicomweb-client's STOW-RS are found by QIDO-RS at every level and
    retrieved by WADO-RS as the bytes that were sent (behind a preamble when the client left it
    out), including their metadata."""
    study = generate_uid()
    series = generate_uid()
    sent = [
        make_image(study_uid=study, series_uid=series, instance_number=n + 1, seed=n)
        for n in range(3)
    ]
    for ds in sent:
        ds.PatientName = "Stow^Round^Trip"
        ds.AccessionNumber = "STOW-RT-1"
    web = client(srv)
    answer = web.store_instances(sent)
    assert len(answer.ReferencedSOPSequence) == 3
    assert "FailedSOPSequence" not in answer

    studies = web.search_for_studies(search_filters={"AccessionNumber": "STOW-RT-1"})
    assert [s["0020000D"]["Value"][0] for s in studies] == [study]
    assert [s["0020000E"]["Value"][0] for s in web.search_for_series(study)] == [series]
    instances = web.search_for_instances(study, series, search_filters={"InstanceNumber": "2"})
    assert [i["00080018"]["Value"][0] for i in instances] == [sent[1].SOPInstanceUID]
    retrieve_url = instances[0]["00081190"]["Value"][0]
    assert retrieve_url.endswith(
        f"/studies/{study}/series/{series}/instances/{sent[1].SOPInstanceUID}"
    )

    for ds in sent:
        status, headers, body = http_get(
            srv,
            f"/dicom-web/studies/{study}/series/{series}/instances/{ds.SOPInstanceUID}",
            "application/dicom; transfer-syntax=*",
        )
        assert status == 200, body
        assert headers["content-type"].startswith("application/dicom")
        assert body == as_stored(part10_bytes(ds))

    metadata = web.retrieve_series_metadata(study, series)
    assert sorted(m["00200013"]["Value"][0] for m in metadata) == [1, 2, 3]
    pixel = metadata[0]["7FE00010"]
    assert "BulkDataURI" in pixel and "Value" not in pixel
    uid = metadata[0]["00080018"]["Value"][0]
    original = next(ds for ds in sent if ds.SOPInstanceUID == uid)
    assert web.retrieve_bulkdata(pixel["BulkDataURI"])[0] == original.PixelData


# ----------------------------------------------------------------------------- malformed sweep
def _request(srv: ServerProcess, method: str, target: str, headers: dict[str, str], body=b""):
    head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    return raw_http(srv.http_port, head.encode("utf-8"), body)


def _check(status: int, headers: dict[str, str], body: bytes, what: str) -> None:
    assert status != 500 and status < 500, f"{what}: {status} {body[:300]!r}"
    if status >= 400:
        assert status != 404 or body, what
        answer = json.loads(body) if body else {}
        # a refusal names its reason; a STOW-RS failure per instance has a Failure Reason
        reason = answer.get("error") or answer.get("00081198", {}).get("Value")
        assert reason, f"{what}: {status} without a reason"


def test_malformed_requests_never_give_500(srv: ServerProcess) -> None:
    """Hand-made bad requests on every resource, and a seeded random sweep of junk path
    segments, parameters and headers: each gets a 4xx with a reason (or a valid answer), never
    a server error, and the server keeps answering."""
    study = generate_uid()
    ds = make_image(study_uid=study)
    assert client(srv).store_instances([ds]).ReferencedSOPSequence
    se, sop = ds.SeriesInstanceUID, ds.SOPInstanceUID
    inst = f"/dicom-web/studies/{study}/series/{se}/instances/{sop}"
    cases: list[tuple[str, str, dict[str, str], bytes, int]] = [
        ("GET", "/dicom-web/studies?StudyDate=2024-01-01", {}, b"", 400),
        ("GET", "/dicom-web/studies?limit=-1", {}, b"", 400),
        ("GET", "/dicom-web/studies?offset=abc", {}, b"", 400),
        ("GET", "/dicom-web/studies?NoSuchKeyword=1", {}, b"", 400),
        ("GET", "/dicom-web/studies?00091010=x", {}, b"", 400),
        ("GET", "/dicom-web/studies?includefield=Bogus", {}, b"", 400),
        ("GET", "/dicom-web/studies", {"Accept": "text/html"}, b"", 406),
        ("GET", "/dicom-web/studies/1.2.x", {}, b"", 400),
        ("GET", "/dicom-web/studies/1.2.3.4.5.6.7.8", {}, b"", 404),
        ("GET", f"{inst}/frames/0", {}, b"", 400),
        ("GET", f"{inst}/frames/1,,2", {}, b"", 400),
        ("GET", f"{inst}/frames/99", {}, b"", 404),
        ("GET", f"{inst}/bulkdata/ZZZZ", {}, b"", 400),
        ("GET", f"{inst}/bulkdata/00100020/0", {}, b"", 400),
        ("GET", f"{inst}/rendered?window=a,b", {}, b"", 400),
        ("GET", f"{inst}/rendered", {"Accept": "application/pdf"}, b"", 406),
        ("GET", inst, {"Accept": "multipart/related; type=application/dicom; q=x"}, b"", 400),
        ("GET", inst, {"Accept": "text/plain"}, b"", 406),
        ("GET", f"{inst}/metadata", {"Accept": "application/dicom+xml"}, b"", 406),
        ("POST", "/dicom-web/studies", {"Content-Type": "text/plain"}, b"hello", 415),
        ("POST", "/dicom-web/studies", {"Content-Type": "multipart/related"}, b"x", 400),
        (
            "POST",
            "/dicom-web/studies",
            {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
            b"--b\r\nContent-Type: application/dicom\r\n\r\nnot dicom",
            400,
        ),
        (
            "POST",
            f"/dicom-web/studies/{generate_uid()}",
            {"Content-Type": "application/dicom"},
            as_stored(part10_bytes(make_image())),
            409,
        ),
    ]
    for method, target, headers, body, expected in cases:
        status, rh, rb = _request(srv, method, target, headers, body)
        _check(status, rh, rb, f"{method} {target}")
        assert status == expected, f"{method} {target} {headers}: {status} {rb[:200]!r}"

    rng = random.Random(20261125)
    junk = [
        "",
        "%00",
        "%ff%fe",
        "..%2f..%2fetc%2fpasswd",
        "1." * 40,
        "Ω",
        "*",
        "-1",
        "9" * 70,
        "1.2.3",
        study,
        "a b",
        "%25",
    ]
    resources = [
        "/dicom-web/studies/{a}",
        "/dicom-web/studies/{a}/series/{b}",
        "/dicom-web/studies/{a}/metadata",
        "/dicom-web/studies/{a}/series/{b}/instances/{c}/frames/{d}",
        "/dicom-web/studies/{a}/series/{b}/instances/{c}/bulkdata/{d}",
        "/dicom-web/studies/{a}/series/{b}/instances/{c}/rendered",
        "/dicom-web/studies/{a}/thumbnail",
        "/dicom-web/studies/{a}/series",
        "/dicom-web/studies/{a}/instances",
    ]
    keys = ["PatientName", "StudyDate", "limit", "offset", "includefield", "00100020", "fuzzymatching",
            "window", "viewport", "quality", "accept", "ModalitiesInStudy", "StudyTime"]  # fmt: skip
    accepts = ["", "*/*", "image/*;q=0", 'multipart/related; type="image/jp2"', "application/dicom;"
               " transfer-syntax=1.2.3", "multipart/related; type=application/octet-stream;"
               " transfer-syntax=*", ";;;", "image/png, image/jpeg;q=0.5"]  # fmt: skip
    for _ in range(120):
        parts = {k: urllib.parse.quote(rng.choice(junk), safe="%") for k in "abcd"}
        parts["b"] = se if rng.random() < 0.5 else parts["b"]
        parts["c"] = sop if rng.random() < 0.5 else parts["c"]
        parts["a"] = study if rng.random() < 0.5 else parts["a"]
        path = rng.choice(resources).format(**parts)
        query = "&".join(
            f"{rng.choice(keys)}={urllib.parse.quote(rng.choice(junk), safe='%')}"
            for _ in range(rng.randint(0, 3))
        )
        headers = {"Accept": rng.choice(accepts)} if rng.random() < 0.6 else {}
        target = path + ("?" + query if query else "")
        status, rh, rb = _request(srv, "GET", target, headers)
        _check(status, rh, rb, f"GET {target} {headers}")
    status, _, _ = _request(srv, "GET", f"/dicom-web/studies?StudyInstanceUID={study}", {})
    assert status == 200
    assert "Traceback" not in srv.log()
