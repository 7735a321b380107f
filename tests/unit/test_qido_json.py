"""QIDO-RS DICOM JSON written from response identifiers equals pydicom's to_json_dict (PS3.18 F.2),
and the query-string parser's rules."""

from __future__ import annotations

import pytest
from pydicom import Dataset

from openpacs.dicom.identifier import Identifier
from openpacs.services.query import Level
from openpacs.web.dicomweb.common import WebError
from openpacs.web.dicomweb.qido import Search, attribute_path, identifier_json


def test_identifier_json_equals_pydicom() -> None:
    seq_item = Dataset()
    seq_item.PatientID = "X-1"
    seq_item.IssuerOfPatientID = "CITY"
    other = Dataset()
    other.OtherPatientIDsSequence = [seq_item]
    ident = Identifier()
    ident.add(0x00100010, "PN", "Müller^Jürgen=山田^太郎")
    ident.add(0x00100020, "LO", "P1")
    ident.add(0x00080061, "CS", ["CT", "MR"])
    ident.add(0x00201208, "IS", 6)
    ident.add(0x00200011, "IS", "12")
    ident.add(0x00101030, "DS", "71.5")
    ident.add(0x00280010, "US", 512)
    ident.add(0x00080020, "DA", None)
    ident.add(0x00081030, "LO", "")
    ident.add_element(other["OtherPatientIDsSequence"])
    ident.charset = "ISO_IR 192"
    expected = ident.to_dataset().to_json_dict()
    expected.pop("00080005")
    assert identifier_json(ident) == expected


def test_attribute_paths() -> None:
    assert attribute_path("PatientName") == [0x00100010]
    assert attribute_path("0020000d") == [0x0020000D]
    assert attribute_path("00400275.RequestedProcedureID") == [0x00400275, 0x00401001]
    for bad in ("Nope", "00091010", "PatientName.PatientID", "1234"):
        with pytest.raises(WebError) as exc:
            attribute_path(bad)
        assert exc.value.status == 400


def test_search_builds_a_relational_identifier() -> None:
    search = Search(
        Level.IMAGE,
        [
            ("PatientName", "DOE*"),
            ("includefield", "00081030,ImageType"),
            ("limit", "5"),
            ("SOPInstanceUID", "1.2,1.3"),
        ],
        {0x0020000D: "1.2.3"},
    )
    ds = search.identifier
    assert ds.QueryRetrieveLevel == "IMAGE" and ds.PatientName == "DOE*"
    assert ds.StudyInstanceUID == "1.2.3"
    assert list(ds.SOPInstanceUID) == ["1.2", "1.3"]  # a UID list
    assert "SeriesInstanceUID" in ds and "Modality" in ds  # series defaults: no series in URL
    assert "StudyDate" not in ds  # the study is fixed by the URL: no study defaults
    assert "StudyDescription" in ds and "ImageType" in ds and search.limit == 5
