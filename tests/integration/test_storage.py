"""Storage SCP against real peers: DCMTK storescu and pynetdicom, statuses of seed 002 T3.58."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from support import (
    CT_IMAGE,
    MR_IMAGE,
    SC_IMAGE,
    RawScu,
    blob_files,
    dataset_bytes_of_file,
    encode_dataset,
    index_rows,
    make_image,
    require_tool,
    shipped,
    store_datasets,
    stored_instance_files,
    tool_env,
)

EXPLICIT = "1.2.840.10008.1.2.1"

# (file shipped with pydicom, storescu option proposing exactly its transfer syntax)
INTEROP_FILES = [
    ("CT_small.dcm", "-xe"),  # Explicit VR LE, ISO_IR 100
    ("MR_small_implicit.dcm", "-xi"),  # Implicit VR LE
    ("MR_small_bigendian.dcm", "-xb"),  # Explicit VR BE (retired)
    ("image_dfl.dcm", "-xd"),  # Deflated Explicit VR LE
    ("SC_rgb_jpeg_dcmtk.dcm", "-xy"),  # JPEG Baseline, ISO_IR 192
    ("JPGExtended.dcm", "-xx"),  # JPEG Extended
    ("SC_rgb_jpeg_gdcm.dcm", "-xs"),  # JPEG Lossless SV1
    ("MR_small_jp2klossless.dcm", "-xv"),  # JPEG 2000 lossless
    ("JPEG2000.dcm", "-xw"),  # JPEG 2000
    ("MR_small_jpeg_ls_lossless.dcm", "-xt"),  # JPEG-LS lossless
    ("JPEGLSNearLossless_16.dcm+uids", "-xu"),  # JPEG-LS near-lossless
    ("MR_small_RLE.dcm", "-xr"),  # RLE
    ("rtplan.dcm", "-xi"),  # RT Plan: non-image, nested sequences
    ("waveform_ecg.dcm", "-xe"),  # waveform, private and retired elements
    ("JPEG-lossy.dcm", "-xx"),  # private and retired elements, JPEG Extended
    ("J2K_pixelrep_mismatch.dcm", "-xv"),  # ISO 2022 IR 87 with private elements
    ("examples_overlay.dcm", "-xe"),  # overlay planes
]


def source_file(name: str, tmp_path: Path) -> Path:
    """A shipped test file; "+uids" adds the Study/Series Instance UIDs some of them lack (the
    compressed pixel data is kept as is)."""
    if not name.endswith("+uids"):
        return shipped(name)
    ds = pydicom.dcmread(shipped(name.removesuffix("+uids")))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    path = tmp_path / "with-uids.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _storescp_reference(tmp_path: Path, src: Path, option: str) -> bytes:
    """What storescu really puts on the wire for *src*: DCMTK's storescp in bit-preserving mode
    (+B) writes the received data set exactly as read."""
    import socket as _socket

    from support import free_port

    storescp, storescu = require_tool("storescp"), require_tool("storescu")
    out = tmp_path / "reference"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [storescp, "+B", "+xa", "-od", str(out), "-aet", "REF", str(port)], env=tool_env()
    )
    try:
        for _ in range(100):
            try:
                _socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                import time

                time.sleep(0.05)
        r = subprocess.run([storescu, option, "-aec", "REF", "127.0.0.1", str(port), str(src)],
                           capture_output=True, text=True, env=tool_env(), timeout=60)  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        proc.terminate()
        proc.wait(10)
    (received,) = list(out.iterdir())
    return dataset_bytes_of_file(received)


@pytest.mark.parametrize(("name", "option"), INTEROP_FILES, ids=[n for n, _ in INTEROP_FILES])
def test_storescu_stores_bytes_exactly(server, tmp_path: Path, name: str, option: str) -> None:
    """Level-2 storage: the stored data set is byte-identical to what storescu sent — the bytes
    DCMTK's own storescp writes in bit-preserving mode — private and retired elements included;
    the File Meta names the sender and the transfer syntax is the file's."""
    storescu = require_tool("storescu")
    src = source_file(name, tmp_path)
    r = subprocess.run(
        [storescu, option, "-aet", "MODALITY", "-aec", "OPENPACS", "127.0.0.1", str(server.port), str(src)],
        capture_output=True, text=True, env=tool_env(), timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    source = pydicom.dcmread(src, stop_before_pixels=True)
    files = stored_instance_files(server.data_dir, source.SOPInstanceUID)
    assert len(files) == 1, server.log()
    assert dataset_bytes_of_file(files[0]) == _storescp_reference(tmp_path, src, option)
    stored = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert stored.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
    assert stored.file_meta.SourceApplicationEntityTitle == "MODALITY"
    (row,) = index_rows(server.data_dir, "instances", sop_uid=source.SOPInstanceUID)
    assert row["transfer_syntax"] == source.file_meta.TransferSyntaxUID
    assert row["calling_ae"] == "MODALITY"


# pynetdicom re-deflates a deflated data set, so that file is covered by the storescu case only.
PYNETDICOM_FILES = [name for name, _ in INTEROP_FILES if name != "image_dfl.dcm"]


@pytest.mark.parametrize("name", PYNETDICOM_FILES)
def test_pynetdicom_file_bytes_stored_exactly(server, tmp_path: Path, name: str) -> None:
    """pynetdicom sends a file's data set bytes unchanged: the stored data set equals the file's."""
    from pynetdicom import AE

    src = source_file(name, tmp_path)
    source = pydicom.dcmread(src, stop_before_pixels=True)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(source.SOPClassUID, source.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="OPENPACS")
    assert assoc.is_established
    status = assoc.send_c_store(src)
    assoc.release()
    assert status.Status == 0, status
    (path,) = stored_instance_files(server.data_dir, source.SOPInstanceUID)
    assert dataset_bytes_of_file(path) == dataset_bytes_of_file(src)


def test_storescu_many_files_one_association(server, tmp_path: Path) -> None:
    storescu = require_tool("storescu")
    study = generate_uid(prefix=None)  # 2.25.<uuid>: room for the series suffix within 64
    for i, (cls, mod) in enumerate(
        [(CT_IMAGE, "CT")] * 5 + [(MR_IMAGE, "MR")] * 5 + [(SC_IMAGE, "OT")] * 3
    ):
        make_image(sop_class=cls, modality=mod, study_uid=study, series_uid=f"{study}.{len(mod)}{ord(mod[0])}",
                   instance_number=i, seed=i).save_as(tmp_path / f"{i:03d}.dcm", enforce_file_format=True)  # fmt: skip
    r = subprocess.run([storescu, "+sd", "-aec", "OPENPACS", "127.0.0.1", str(server.port), str(tmp_path)],
                       capture_output=True, text=True, env=tool_env(), timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    (study_row,) = index_rows(server.data_dir, "studies", study_uid=study)
    assert (study_row["num_series"], study_row["num_instances"], study_row["modalities"]) == (
        3,
        13,
        "CT\\MR\\OT",
    )
    assert server.log().count("association accepted") == 1


def test_several_contexts_for_one_abstract_syntax(server) -> None:
    from pynetdicom import AE

    ae = AE(ae_title="MULTICTX")
    for ts in ("1.2.840.10008.1.2", EXPLICIT, "1.2.840.10008.1.2.2"):
        ae.add_requested_context(CT_IMAGE, ts)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="OPENPACS")
    assert assoc.is_established
    cts = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == CT_IMAGE]
    assert len(cts) == 3
    for cx in cts:  # use each context in turn
        ds = make_image()
        ds.file_meta.TransferSyntaxUID = cx.transfer_syntax[0]
        status = assoc.send_c_store(ds)
        assert status.Status == 0
        (row,) = index_rows(server.data_dir, "instances", sop_uid=ds.SOPInstanceUID)
        assert row["transfer_syntax"] == cx.transfer_syntax[0]
    assoc.release()


def test_required_uid_missing_gives_c00b(server) -> None:
    ds = make_image()
    del ds.StudyInstanceUID
    [(status, comment)] = store_datasets(server.port, [ds])
    assert status == 0xC00B
    assert comment and "StudyInstanceUID" in comment
    assert index_rows(server.data_dir, "instances") == []


def test_same_instance_other_class_gives_c016(server) -> None:
    uid = generate_uid()
    ct = make_image(sop_uid=uid)
    sc = make_image(sop_uid=uid, sop_class=SC_IMAGE, modality="OT")
    assert store_datasets(server.port, [ct]) == [(0, None)]
    [(status, comment)] = store_datasets(server.port, [sc])
    assert status == 0xC016
    assert "different SOP Class" in (comment or "")
    (row,) = index_rows(server.data_dir, "instances", sop_uid=uid)
    assert row["sop_class_uid"] == CT_IMAGE


def test_command_and_dataset_disagreements(server) -> None:
    scu = RawScu(server.port, [(CT_IMAGE, [EXPLICIT]), (MR_IMAGE, [EXPLICIT])])
    ct = make_image()
    # Affected SOP Class in the command ≠ the data set's SOP Class → A900
    rsp = scu.store(
        1,
        CT_IMAGE,
        ct.SOPInstanceUID,
        encode_dataset(make_image(sop_class=MR_IMAGE, sop_uid=ct.SOPInstanceUID)),
    )
    assert rsp.Status == 0xA900 and "does not match" in rsp.ErrorComment
    # Affected SOP Instance ≠ the data set's → C011 (seed 002: Instance UID mismatch)
    rsp = scu.store(1, CT_IMAGE, "1.2.3.4.5.6", encode_dataset(ct))
    assert rsp.Status == 0xC011 and "does not match" in rsp.ErrorComment
    # Affected SOP Class ≠ the presentation context's abstract syntax → 0122
    rsp = scu.store(3, CT_IMAGE, ct.SOPInstanceUID, encode_dataset(ct))
    assert rsp.Status == 0x0122
    # a data set that cannot be parsed → C000; the association carries on
    rsp = scu.store(1, CT_IMAGE, ct.SOPInstanceUID, encode_dataset(ct)[:-1000])
    assert rsp.Status == 0xC000 and "Cannot parse" in rsp.ErrorComment
    rsp = scu.store(1, CT_IMAGE, ct.SOPInstanceUID, b"\x08\x00\x16\x00UI\x07")
    assert rsp.Status == 0xC000
    # and then a good one on the same association
    rsp = scu.store(1, CT_IMAGE, ct.SOPInstanceUID, encode_dataset(ct))
    assert rsp.Status == 0
    scu.release()
    assert [r["sop_uid"] for r in index_rows(server.data_dir, "instances")] == [ct.SOPInstanceUID]
    assert "refused" in server.log() and "RAWSCU" in server.log()


@pytest.mark.parametrize("policy", ["overwrite", "ignore", "reject", "keep"])
def test_duplicate_policy(make_server, policy: str) -> None:
    srv = make_server(f'[storage]\nduplicate_policy = "{policy}"\n')
    uid = generate_uid()
    first = make_image(sop_uid=uid, seed=1)
    second = make_image(
        sop_uid=uid, seed=2, study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID
    )
    assert store_datasets(srv.port, [first]) == [(0, None)]
    [(status, comment)] = store_datasets(srv.port, [second])
    rows = index_rows(srv.data_dir, "instances", sop_uid=uid)
    pixels = [
        pydicom.dcmread(stored_instance_files(srv.data_dir, uid)[i]).PixelData
        for i in range(len(rows))
    ]
    if policy == "overwrite":
        assert status == 0 and len(rows) == 1 and pixels == [second.PixelData]
    elif policy == "ignore":
        assert status == 0 and len(rows) == 1 and pixels == [first.PixelData]
    elif policy == "reject":
        assert status == 0xC011 and "duplicate_policy = reject" in comment
        assert len(rows) == 1 and pixels == [first.PixelData]
    else:
        assert status == 0 and len(rows) == 2 and pixels == [first.PixelData, second.PixelData]
    (study,) = index_rows(srv.data_dir, "studies")
    assert study["num_instances"] == len(rows)
    # no stray blob files either way
    blobs = blob_files(srv.data_dir)
    assert len(blobs) == len(rows)


def test_empty_patient_id_rules(server) -> None:
    """seed 002: an empty Patient ID is replaced by the Patient's Name, else a generated ID."""
    named = make_image(patient_id="", patient_name="Nobody^Known")
    anonymous = make_image(patient_id="", patient_name="")
    assert store_datasets(server.port, [named, anonymous]) == [(0, None), (0, None)]
    patients = {p["patient_id"]: p for p in index_rows(server.data_dir, "patients")}
    assert patients["Nobody^Known"]["patient_id_generated"] == 1
    generated = [p for p in patients.values() if p["patient_id_generated"] == 2]
    assert len(generated) == 1 and generated[0]["patient_id"].startswith("OPENPACS-")
    assert server.log().count("has an empty Patient ID") == 2
    # the stored bytes are not coerced
    assert (
        pydicom.dcmread(stored_instance_files(server.data_dir, named.SOPInstanceUID)[0]).PatientID
        == ""
    )


@pytest.mark.parametrize(
    ("charset", "name"),
    [
        ("ISO_IR 100", "Müller^Jürgen"),
        ("ISO_IR 192", "Ĳsselmeer^Zoë=山田^太郎"),
        ("ISO_IR 138", "שרון^דבורה"),
        ("ISO_IR 144", "Люкceмбypг^Иван"),
    ],
)
def test_character_sets_indexed_as_text(server, charset: str, name: str) -> None:
    ds = make_image(charset=charset, patient_name=name)
    assert store_datasets(server.port, [ds]) == [(0, None)]
    (patient,) = index_rows(server.data_dir, "patients")
    assert patient["patient_name"] == name
    assert patient["patient_name_norm"] == name.upper()
    assert patient["charset"] == charset


@pytest.mark.parametrize(
    "name",
    [
        "chrH31.dcm",
        "chrJapMulti.dcm",
        "chrI2.dcm",
        "chrX1.dcm",
        "chrHbrw.dcm",
        "chrRuss.dcm",
        "chrX2.dcm",
    ],
)
def test_iso2022_and_other_charset_files(server, name: str) -> None:
    storescu = require_tool("storescu")
    src = shipped(name)
    r = subprocess.run([storescu, "-xe", "-aec", "OPENPACS", "127.0.0.1", str(server.port), str(src)],
                       capture_output=True, text=True, env=tool_env(), timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    expected = pydicom.dcmread(src)
    expected.decode()
    (patient,) = index_rows(server.data_dir, "patients")
    assert patient["patient_name"] == str(expected.PatientName)


def test_verification_on_storage_listener_with_both_syntaxes(server) -> None:
    from pynetdicom import AE

    for ts in ("1.2.840.10008.1.2", EXPLICIT):
        ae = AE()
        ae.add_requested_context("1.2.840.10008.1.1", ts)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="OPENPACS")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()


def test_restart_keeps_data(make_server, tmp_path: Path) -> None:
    srv = make_server()
    datasets = [make_image(seed=i) for i in range(5)]
    assert store_datasets(srv.port, datasets) == [(0, None)] * 5
    assert srv.stop() == 0
    assert "received SIGTERM" in srv.log() and "openpacs stopped" in srv.log()
    srv.start()
    for ds in datasets:
        (path,) = stored_instance_files(srv.data_dir, ds.SOPInstanceUID)
        assert pydicom.dcmread(path).PixelData == ds.PixelData
    # still accepting after the restart
    assert store_datasets(srv.port, [make_image()]) == [(0, None)]
    listing = srv.run_cli("studies")
    assert listing.returncode == 0 and "6 studies" in listing.stdout


def test_empty_pixel_data_is_accepted(server) -> None:
    """seed 002 refuses it with A717; an archive should keep what the modality produced."""
    ds = make_image()
    ds.PixelData = b""
    assert store_datasets(server.port, [ds]) == [(0, None)]
    (path,) = stored_instance_files(server.data_dir, ds.SOPInstanceUID)
    stored = pydicom.dcmread(path)
    assert "PixelData" in stored and not stored.PixelData  # present, zero length
