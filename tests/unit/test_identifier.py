"""Fast identifier encoding against pydicom's reader (and writer) as the oracle."""

from __future__ import annotations

import io

import pytest
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from openpacs.dicom.identifier import Identifier


def _sample(charset: str | list[str] | None, name: str) -> Identifier:
    ident = Identifier()
    ident.charset = charset
    ident.add(0x00080052, "CS", "STUDY")
    ident.add(0x0020000D, "UI", "1.2.3.45")  # odd length: NUL padded
    ident.add(0x00100010, "PN", name)
    ident.add(0x00081030, "LO", name.split("^")[0] + " study")
    ident.add(0x00080061, "CS", ["CT", "MR"])
    ident.add(0x00201208, "IS", "17")
    ident.add(0x00280010, "US", 512)
    ident.add(0x00080050, "SH", None)
    item = Dataset()
    item.RequestedProcedureID = "RP1"
    ident.add_element(DataElement(0x00400275, "SQ", [item]))
    return ident


@pytest.mark.parametrize("implicit", [True, False])
@pytest.mark.parametrize(
    ("charset", "name"),
    [
        (None, "Doe^John"),
        ("ISO_IR 100", "Müller^Jürgen"),
        ("ISO_IR 192", "Ĳsselmeer^Zoë=山田^太郎"),
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
        ("ISO_IR 144", "Люкceмбypг^Иван"),
    ],
)
def test_pydicom_reads_back_what_we_encode(
    implicit: bool, charset: str | list[str] | None, name: str
) -> None:
    ident = _sample(charset, name)
    raw = ident.encode(implicit)
    assert len(raw) % 2 == 0
    ds = read_dataset(io.BytesIO(raw), implicit, True)
    ds.decode()
    assert str(ds.PatientName) == name
    assert ds.StudyDescription == name.split("^")[0] + " study"
    assert list(ds.ModalitiesInStudy) == ["CT", "MR"]
    assert ds.StudyInstanceUID == "1.2.3.45"
    assert ds.NumberOfStudyRelatedInstances == 17
    assert ds.Rows == 512
    assert "AccessionNumber" in ds and not ds.AccessionNumber
    assert ds.RequestAttributesSequence[0].RequestedProcedureID == "RP1"
    # the same bytes pydicom itself would write for the same data set
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, ident.to_dataset())
    assert raw == buf.getvalue()
