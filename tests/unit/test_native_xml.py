"""PS3.19 Native DICOM Model → DICOM JSON (STOW-RS XML metadata)."""

from __future__ import annotations

import pytest
from pydicom import Dataset

from openpacs.dicom.native_xml import NativeXmlError, to_json

DOCUMENT = """<?xml version="1.0" encoding="UTF-8"?>
<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">
  <DicomAttribute tag="00080005" vr="CS" keyword="SpecificCharacterSet">
    <Value number="2">ISO 2022 IR 87</Value>
    <Value number="1"></Value>
  </DicomAttribute>
  <DicomAttribute tag="00100010" vr="PN" keyword="PatientName">
    <PersonName number="1">
      <Alphabetic><FamilyName>Yamada</FamilyName><GivenName>Tarou</GivenName></Alphabetic>
      <Ideographic><FamilyName>山田</FamilyName><GivenName>太郎</GivenName></Ideographic>
      <Phonetic><FamilyName>やまだ</FamilyName><GivenName>たろう</GivenName></Phonetic>
    </PersonName>
  </DicomAttribute>
  <DicomAttribute tag="00100020" vr="LO"/>
  <DicomAttribute tag="00200013" vr="IS"><Value number="1">7</Value></DicomAttribute>
  <DicomAttribute tag="00280030" vr="DS">
    <Value number="1">0.5</Value><Value number="2">0.25</Value>
  </DicomAttribute>
  <DicomAttribute tag="00280010" vr="US"><Value number="1">512</Value></DicomAttribute>
  <DicomAttribute tag="00181088" vr="IS"></DicomAttribute>
  <DicomAttribute tag="00091010" vr="LO" privateCreator="ACME"><Value number="1">x</Value></DicomAttribute>
  <DicomAttribute tag="00091000" vr="LO"><Value number="1">ACME</Value></DicomAttribute>
  <DicomAttribute tag="00081115" vr="SQ">
    <Item number="1">
      <DicomAttribute tag="0020000E" vr="UI"><Value number="1">1.2.3</Value></DicomAttribute>
    </Item>
  </DicomAttribute>
  <DicomAttribute tag="00400275" vr="SQ"/>
  <DicomAttribute tag="7FE00010" vr="OW"><BulkData uri="http://x/bulk/1"/></DicomAttribute>
  <DicomAttribute tag="00420011" vr="OB"><InlineBinary>AAEC
    Aw==</InlineBinary></DicomAttribute>
  <DicomAttribute tag="00080016"><Value number="1">1.2.840.10008.5.1.4.1.1.7</Value></DicomAttribute>
</NativeDicomModel>
"""


def test_document_to_json() -> None:
    obj = to_json(DOCUMENT.encode())
    assert obj["00080005"] == {"vr": "CS", "Value": [None, "ISO 2022 IR 87"]}  # by number
    assert obj["00100010"] == {
        "vr": "PN",
        "Value": [
            {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}
        ],
    }
    assert obj["00100020"] == {"vr": "LO"}
    assert obj["00200013"] == {"vr": "IS", "Value": [7]}
    assert obj["00280030"] == {"vr": "DS", "Value": [0.5, 0.25]}
    assert obj["00280010"] == {"vr": "US", "Value": [512]}
    assert obj["00181088"] == {"vr": "IS"}
    assert obj["00081115"]["Value"] == [{"0020000E": {"vr": "UI", "Value": ["1.2.3"]}}]
    assert obj["00400275"] == {"vr": "SQ"}
    assert obj["7FE00010"] == {"vr": "OW", "BulkDataURI": "http://x/bulk/1"}
    assert obj["00420011"] == {"vr": "OB", "InlineBinary": "AAECAw=="}
    assert obj["00080016"]["vr"] == "UI"  # vr left out: the dictionary's

    without_bulk = {k: v for k, v in obj.items() if k != "7FE00010"}
    ds = Dataset.from_json(without_bulk)  # what the STOW path does with it
    assert ds.PatientName.ideographic == "山田^太郎"
    assert ds.PixelSpacing == [0.5, 0.25]
    assert ds.EncapsulatedDocument == b"\x00\x01\x02\x03"
    assert ds[0x00091010].value == "x"


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        (b"<x/>", "not NativeDicomModel"),
        (b"<NativeDicomModel><", "not well-formed"),
        (b'<!DOCTYPE x [<!ENTITY a "b">]><NativeDicomModel/>', "DOCTYPE"),
        (b'<NativeDicomModel><DicomAttribute tag="0010" vr="LO"/></NativeDicomModel>', "8 hex"),
        (b'<NativeDicomModel><DicomAttribute tag="00100010" vr="pn"/></NativeDicomModel>', "vr"),
        (b'<NativeDicomModel><DicomAttribute tag="00091010"/></NativeDicomModel>', "vr attribute"),
        (
            b'<NativeDicomModel><DicomAttribute tag="00280010" vr="US"><Value number="1">a</Value>'
            b"</DicomAttribute></NativeDicomModel>",
            "not a number",
        ),
        (
            b'<NativeDicomModel><DicomAttribute tag="7FE00010" vr="OB"><BulkData/>'
            b"</DicomAttribute></NativeDicomModel>",
            "without a uri",
        ),
    ],
)
def test_refusals(document: bytes, reason: str) -> None:
    with pytest.raises(NativeXmlError, match=reason):
        to_json(document)
