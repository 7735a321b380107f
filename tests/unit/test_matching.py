"""PS3.4 C.2.2.2 attribute matching (openpacs.dicom.matching): one test group per rule, real values,
and the SQL translation checked row by row against the Python matcher on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import sqlalchemy as sa
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from support import postgres_database

from openpacs.dicom.matching import (
    Constraint,
    MatchKind,
    QueryError,
    combined_datetime_range,
    constraint_from_element,
    constraints_from_identifier,
    match_dataset,
    match_value,
    sql_condition,
)
from openpacs.index.db import make_engine
from openpacs.services.records import normalize_date, normalize_time

CHARSET_FILES = Path(pydicom.__file__).parent / "data" / "charset_files"

PATIENT_NAME = 0x00100010
ACCESSION = 0x00080050
STUDY_DATE = 0x00080020
STUDY_TIME = 0x00080030
SERIES_NUMBER = 0x00200011

# Range and wild card keys are not valid VR values (PS3.4 C.2.2.2: matching uses characters outside
# the VR's repertoire); pydicom's value validation says so on access. Not the matcher's business.
PYDICOM_VALIDATION = "ignore:Invalid value for VR:UserWarning"
pytestmark = pytest.mark.filterwarnings(PYDICOM_VALIDATION)


def key(keyword: str, value: Any) -> Constraint:
    """The constraint for one identifier key, built the way an SCP receives it."""
    ds = Dataset()
    setattr(ds, keyword, value)
    return constraint_from_element(ds[keyword])


def key_vr(tag: int, vr: str, value: Any) -> Constraint:
    return constraint_from_element(DataElement(tag, vr, value))


def make(keyword: str, value: Any) -> Constraint:
    if keyword == "SeriesNumber":  # IS keys go through the wire: '1*' is no valid IS element
        return key_wire(SERIES_NUMBER, "\\".join(value) if isinstance(value, list) else value)
    return key(keyword, value)


def key_wire(tag: int, text: str) -> Constraint:
    """A key as raw Implicit VR bytes (an IS of '1*' cannot be built as a pydicom element)."""
    data = text.encode() + (b" " if len(text) % 2 else b"")
    raw = (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little")
    raw += len(data).to_bytes(4, "little") + data
    (c,) = constraints_from_identifier(read_dataset(io.BytesIO(raw), True, True))
    return c


def wire(ds: Dataset) -> Dataset:
    """``ds`` encoded (Implicit VR LE, its Specific Character Set) and read back raw, as a C-FIND
    identifier arrives: text is decoded only when the matcher touches it."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, ds)
    return read_dataset(io.BytesIO(buf.getvalue()), True, True)


# --- PS3.4 C.2.2.2.1 single value matching ------------------------------------------------------


def test_single_value_is_case_sensitive_for_accession_number() -> None:
    c = key("AccessionNumber", "A100")
    assert (c.kind, c.values, c.case_insensitive, c.clause) == (
        MatchKind.SINGLE,
        ("A100",),
        False,
        "PS3.4 C.2.2.2.1",
    )
    assert match_value(c, "A100")
    assert not match_value(c, "a100")
    assert not match_value(c, "A1000")
    assert not match_value(c, "A10")


def test_single_value_is_case_insensitive_for_patient_name_only() -> None:
    c = key("PatientName", "müller^hans")
    assert c.case_insensitive
    assert match_value(c, "Müller^Hans")
    assert match_value(c, "MÜLLER^HANS")
    assert not match_value(c, "Mueller^Hans")
    # seed 002 T3.72: Referring Physician's Name is case sensitive.
    referring = key("ReferringPhysicianName", "müller^hans")
    assert not referring.case_insensitive
    assert not match_value(referring, "Müller^Hans")
    assert match_value(referring, "müller^hans")


def test_single_value_several_values_are_any_of() -> None:
    c = key("ModalitiesInStudy", ["CT", "MR"])
    assert (c.kind, c.values) == (MatchKind.SINGLE, ("CT", "MR"))
    assert match_value(c, "CT")
    assert match_value(c, "MR")
    assert not match_value(c, "PT")


@pytest.mark.parametrize(
    ("tag", "query", "stored", "expected"),
    [
        (SERIES_NUMBER, "7", "007", True),  # IS compares by value (CP-2305: implementation defined)
        (SERIES_NUMBER, "+7", "7", True),
        (SERIES_NUMBER, "7", "70", False),
        (0x00101030, "1.5", "1.50", True),  # Patient's Weight, DS
        (0x00101030, "1.5", "15", False),
    ],
)
def test_single_value_numbers(tag: int, query: str, stored: str, expected: bool) -> None:
    assert match_value(key_wire(tag, query), stored) is expected
    rows = key_vr(0x00280010, "US", 512)
    assert (rows.values, match_value(rows, "512"), match_value(rows, "0512")) == (
        ("512",),
        True,
        True,
    )


def test_single_value_number_must_be_a_number() -> None:
    with pytest.raises(QueryError, match=r"SeriesNumber \(0020,0011\)"):
        key_wire(SERIES_NUMBER, "seven")


# --- PS3.4 C.2.2.2.2 list of UID matching -------------------------------------------------------


def test_list_of_uid() -> None:
    c = key("StudyInstanceUID", ["1.2.3", "1.2.4", "1.2.3"])
    assert (c.kind, c.values, c.clause) == (
        MatchKind.LIST_OF_UID,
        ("1.2.3", "1.2.4"),
        "PS3.4 C.2.2.2.2",
    )
    assert match_value(c, "1.2.3")
    assert match_value(c, "1.2.4")
    assert not match_value(c, "1.2.34")
    single = key("StudyInstanceUID", "1.2.3")
    assert single.kind is MatchKind.SINGLE and match_value(single, "1.2.3")


@pytest.mark.parametrize("value", ["1.2.*", "1.2.?", "*"])
def test_wild_card_in_uid_is_refused(value: str) -> None:
    with pytest.raises(QueryError, match=r"StudyInstanceUID \(0020,000D\)") as err:
        key_vr(0x0020000D, "UI", value)
    assert err.value.tag == 0x0020000D


# --- PS3.4 C.2.2.2.3 universal matching ---------------------------------------------------------


@pytest.mark.parametrize(
    ("vr", "value"),
    [
        ("PN", ""),
        ("PN", "*"),
        ("PN", "**"),
        ("PN", "*=*"),
        ("LO", None),
        ("SH", "*"),
        ("CS", ["CT", "*"]),
        ("DA", ""),
        ("DA", "*"),  # seed 002 T3.13 lists "*" for Study Date: it is universal matching
        ("TM", "*"),
        ("IS", "*"),
        ("UI", ""),
    ],
)
def test_universal(vr: str, value: Any) -> None:
    if vr == "IS":
        c = key_wire(SERIES_NUMBER, value)
    else:
        c = key_vr(0x00100010 if vr == "PN" else 0x00080050, vr, value)
    assert c.kind is MatchKind.UNIVERSAL
    assert c.clause.startswith("PS3.4 C.2.2.2.")
    for stored in (None, "", "anything", ["a", "b"]):
        assert match_value(c, stored)


# --- PS3.4 C.2.2.2.4 wild card matching ---------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "stored", "expected"),
    [
        ("Sm*", "Smith", True),
        ("Sm*", "Smith^John", True),
        ("Sm*", "smith", False),  # case sensitive (Referring Physician's Name)
        ("*th", "Smith", True),
        ("*th", "Smithers", False),
        ("S?ith", "Smith", True),
        ("S?ith", "Sith", False),
        ("S?ith", "Smmith", False),
        ("*mi*", "Smith", True),
        ("S*t?", "Smith", True),
        ("S*t?", "Smit", False),
        ("?????", "Smith", True),
        ("?????", "Smit", False),
        ("*^J*", "Smith^John", True),
        ("S*h*J*n", "Smith^John", True),
        ("*%*", "100%", True),  # SQL metacharacters are ordinary characters
        ("A_*", "AB", False),
        ("[*]", "[x]", True),
    ],
)
def test_wild_card(pattern: str, stored: str, expected: bool) -> None:
    c = key("ReferringPhysicianName", pattern)
    assert (c.kind, c.clause) == (MatchKind.WILDCARD, "PS3.4 C.2.2.2.4")
    assert match_value(c, stored) is expected


def test_wild_card_any_of_mixes_literals_and_patterns() -> None:
    c = key("Modality", ["CT", "M?"])
    assert c.kind is MatchKind.WILDCARD
    assert [match_value(c, m) for m in ("CT", "MR", "MG", "CTA", "M")] == [
        True,
        True,
        True,
        False,
        False,
    ]


def test_wild_card_on_patient_name_is_case_insensitive() -> None:
    c = key("PatientName", "mül*")
    assert match_value(c, "MÜLLER^HANS") and match_value(c, "Müller")


def test_wild_card_on_series_number_seed_002() -> None:
    # seed 002 T3.15/T3.17 list "*" for Series Number / Instance Number (IS).
    c = key_wire(SERIES_NUMBER, "1*")
    assert c.kind is MatchKind.WILDCARD
    assert [match_value(c, s) for s in ("1", "12", "012", "21")] == [True, True, True, False]


@pytest.mark.parametrize(
    ("tag", "vr", "value"),
    [
        (STUDY_DATE, "DA", "2026*"),
        (STUDY_DATE, "DA", "202601?1"),
        (STUDY_TIME, "TM", "10*"),
        (0x0040A032, "DT", "2026*"),
        (0x00101020, "DS", "1.*"),  # Patient's Size
        (0x00101010, "AS", "0?5Y"),
    ],
)
def test_wild_card_refused_where_not_defined(tag: int, vr: str, value: str) -> None:
    # PS3.4 C.2.2.2.4 lists AE CS LO LT PN SH ST UC UR UT; seed 002: on dates "undefined".
    with pytest.raises(QueryError, match="wild card"):
        key_wire(tag, value)


# --- PS3.4 C.2.2.2.5 range matching -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [
        ("20260101-20260131", "20260101", "20260131"),
        ("-20260101", None, "20260101"),
        ("20260101-", "20260101", None),
        ("2026.01.01-2026.01.31", "20260101", "20260131"),  # ACR-NEMA form
        ("20260101 - 20260131", "20260101", "20260131"),
    ],
)
def test_date_range(value: str, low: str | None, high: str | None) -> None:
    c = key("StudyDate", value)
    assert (c.kind, c.low, c.high, c.clause) == (MatchKind.RANGE, low, high, "PS3.4 C.2.2.2.5.1")


def test_date_range_matching() -> None:
    c = key("StudyDate", "20260101-20260131")
    assert match_value(c, "20260101") and match_value(c, "20260131")
    assert match_value(c, "2026.01.15")
    assert not match_value(c, "20251231") and not match_value(c, "20260201")
    assert match_value(key("StudyDate", "-20260101"), "19991231")
    assert match_value(key("StudyDate", "20260101-"), "20990101")
    reversed_range = key("StudyDate", "20260131-20260101")
    assert not match_value(reversed_range, "20260115")


@pytest.mark.parametrize(
    "value", ["2026-01", "20260101-20260131-", "-", "202601-", "20261301-", "x-y", "20260132"]
)
def test_malformed_date_is_refused(value: str) -> None:
    with pytest.raises(QueryError, match=r"StudyDate \(0008,0020\)"):
        key("StudyDate", value)


def test_single_date() -> None:
    c = key("StudyDate", "2026.01.15")
    assert (c.kind, c.values) == (MatchKind.SINGLE, ("20260115",))
    assert match_value(c, "20260115") and match_value(c, "2026.01.15")
    assert not match_value(c, "20260116")
    several = key("StudyDate", ["20260115", "20260117"])
    assert several.values == ("20260115", "20260117") and match_value(several, "20260117")
    with pytest.raises(QueryError, match="range"):
        key("StudyDate", ["20260101-20260102", "20260105"])


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [
        ("1000-1200", "100000", "120059"),
        ("-1015", None, "101559"),  # the high end includes 10:15:59
        ("-10", None, "105959"),
        ("10-", "100000", None),
        ("101500.123-101559.999999", "101500", "101559"),  # fractions ignored (seed 002)
        ("08:30-09:00:30", "083000", "090030"),  # ACR-NEMA form
        ("1015-1015", "101500", "101559"),
    ],
)
def test_time_range(value: str, low: str | None, high: str | None) -> None:
    c = key("StudyTime", value)
    assert (c.kind, c.low, c.high, c.clause) == (MatchKind.RANGE, low, high, "PS3.4 C.2.2.2.5.2")


def test_time_range_matching() -> None:
    c = key("StudyTime", "-1015")
    assert match_value(c, "101559") and match_value(c, "101559.999")
    assert match_value(c, "000000") and match_value(c, "1015")
    assert not match_value(c, "101600")
    minute = key("StudyTime", "1015-1015")
    assert [match_value(minute, t) for t in ("101500", "101530.5", "101559", "101600")] == [
        True,
        True,
        True,
        False,
    ]
    # crossing midnight is not supported (C.2.2.2.5.2): a reversed range matches nothing
    assert not match_value(key("StudyTime", "2200-0600"), "230000")


@pytest.mark.parametrize("value", ["2500-", "1060-", "10-11-12", "abc"])
def test_malformed_time_is_refused(value: str) -> None:
    with pytest.raises(QueryError, match=r"StudyTime \(0008,0030\)"):
        key("StudyTime", value)


def test_single_time_is_the_instant_not_the_minute() -> None:
    # C.2.2.2.1 "exactly match", in normalised form: '1015' is 10:15:00; fractions ignored.
    c = key("StudyTime", "1015")
    assert (c.kind, c.values) == (MatchKind.SINGLE, ("101500",))
    assert [match_value(c, t) for t in ("1015", "101500", "101500.25", "10:15:00", "101530")] == [
        True,
        True,
        True,
        True,
        False,
    ]


@pytest.mark.parametrize(
    ("value", "kind", "low", "high"),
    [
        ("20260101-20260131", MatchKind.RANGE, "20260101000000", "20260131235959"),
        ("2026-", MatchKind.RANGE, "20260101000000", None),
        ("-2026", MatchKind.RANGE, None, "20261231235959"),
        ("202601011200-202601011300", MatchKind.RANGE, "20260101120000", "20260101130059"),
        (
            "20260101120000.5+0100-20260102",  # fraction and UTC offset ignored
            MatchKind.RANGE,
            "20260101120000",
            "20260102235959",
        ),
        ("20260101120000-0500-20260102-0500", MatchKind.RANGE, "20260101120000", "20260102235959"),
    ],
)
def test_datetime_range(value: str, kind: MatchKind, low: str | None, high: str | None) -> None:
    c = key_vr(0x0040A032, "DT", value)
    assert (c.kind, c.low, c.high, c.clause) == (kind, low, high, "PS3.4 C.2.2.2.5.3")


def test_datetime_minus_offset_is_a_single_value() -> None:
    c = key_vr(0x0040A032, "DT", "20260101-0500")
    assert (c.kind, c.values) == (MatchKind.SINGLE, ("20260101000000",))
    assert match_value(c, "20260101000000.000-0500")
    r = key_vr(0x0040A032, "DT", "2026010112-2026010113")
    assert match_value(r, "20260101125959.9+0100") and not match_value(r, "20260101140000")


# --- seed 002 §3.2.11.4 combined Study Date + Study Time ---------------------------------------


def test_combined_date_and_time_ranges() -> None:
    date, time = key("StudyDate", "20260105-20260107"), key("StudyTime", "1000-1800")
    assert combined_datetime_range(date, time, "20260301") == ("20260105100000", "20260107180059")


def test_combined_time_range_without_date_is_today() -> None:
    time = key("StudyTime", "0800-1200")
    assert combined_datetime_range(None, time, "20260301") == ("20260301080000", "20260301120059")
    empty_date = key("StudyDate", "")
    assert combined_datetime_range(empty_date, time, "20260301") == (
        "20260301080000",
        "20260301120059",
    )


def test_combined_single_date_with_time_range_is_that_day() -> None:
    assert combined_datetime_range(
        key("StudyDate", "20260105"), key("StudyTime", "-0900"), "20260301"
    ) == ("20260105000000", "20260105090059")


def test_combined_open_ends() -> None:
    time = key("StudyTime", "1000-1800")
    assert combined_datetime_range(key("StudyDate", "20260105-"), time, "20260301") == (
        "20260105100000",
        None,
    )
    assert combined_datetime_range(
        key("StudyDate", "-20260105"), key("StudyTime", "1000-"), "20260301"
    ) == (None, "20260105235959")


@pytest.mark.parametrize(
    ("date", "time"),
    [
        ("20260105-20260107", None),  # no time key: the date column alone
        ("20260105-20260107", ""),
        ("20260105-20260107", "1000"),  # a single time: date range AND that time
        (["20260105", "20260107"], "1000-1100"),  # several days: per-column matching
    ],
)
def test_combined_rule_does_not_apply(date: Any, time: str | None) -> None:
    time_c = key("StudyTime", time) if time is not None else None
    assert combined_datetime_range(key("StudyDate", date), time_c, "20260301") is None


def test_combined_today_must_be_a_date() -> None:
    with pytest.raises(ValueError, match="today"):
        combined_datetime_range(None, key("StudyTime", "0800-0900"), "2026-03-01")


# --- PS3.4 C.2.2.2.6 sequence matching ----------------------------------------------------------


def _request(rp: str, sps: str, accession: str = "") -> Dataset:
    item = Dataset()
    item.RequestedProcedureID = rp
    item.ScheduledProcedureStepID = sps
    if accession:
        item.AccessionNumber = accession
    return item


def _series(*items: Dataset) -> Dataset:
    ds = Dataset()
    ds.Modality = "CT"
    ds.RequestAttributesSequence = list(items)
    return ds


def test_request_attributes_sequence_any_item_matches_all_item_keys() -> None:
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.RequestAttributesSequence = [_request("RP2", "SPS2*")]
    (c,) = constraints_from_identifier(query)
    assert (c.kind, c.clause, [i.keyword for i in c.items]) == (
        MatchKind.SEQUENCE,
        "PS3.4 C.2.2.2.6",
        ["ScheduledProcedureStepID", "RequestedProcedureID"],
    )
    stored = _series(_request("RP1", "SPS1"), _request("RP2", "SPS2a"))
    assert match_dataset([c], stored)
    # the keys must match within one item, not across items
    assert not match_dataset([c], _series(_request("RP2", "SPS1"), _request("RP1", "SPS2a")))
    assert not match_dataset([c], _series())
    assert not match_dataset([c], Dataset())
    assert match_value(c, list(stored.RequestAttributesSequence))
    assert not match_value(c, None)


def test_referenced_request_sequence_nested() -> None:
    code = Dataset()
    code.CodeValue = "CT-CHEST"
    code.CodingSchemeDesignator = "99LOCAL"
    item = Dataset()
    item.AccessionNumber = "A100"
    item.StudyInstanceUID = "1.2.3"
    item.RequestedProcedureCodeSequence = [code]
    stored = Dataset()
    other = Dataset()
    other.AccessionNumber = "A200"
    other.StudyInstanceUID = "1.2.4"
    stored.ReferencedRequestSequence = [other, item]

    q_code = Dataset()
    q_code.CodeValue = "CT-*"
    q_item = Dataset()
    q_item.StudyInstanceUID = ["1.2.3", "1.2.9"]
    q_item.RequestedProcedureCodeSequence = [q_code]
    q_item.AccessionNumber = ""
    query = Dataset()
    query.ReferencedRequestSequence = [q_item]
    cs = constraints_from_identifier(query)
    assert match_dataset(cs, stored)
    q_code.CodeValue = "MR-*"
    assert not match_dataset(constraints_from_identifier(query), stored)


def test_sequence_universal_forms() -> None:
    empty = Dataset()
    empty.RequestAttributesSequence = []
    assert constraints_from_identifier(empty)[0].kind is MatchKind.UNIVERSAL
    empty.RequestAttributesSequence = [Dataset()]
    assert constraints_from_identifier(empty)[0].kind is MatchKind.UNIVERSAL
    # an item asking only for return keys matches every entity, with or without the sequence
    empty.RequestAttributesSequence = [_request("", "")]
    (c,) = constraints_from_identifier(empty)
    assert c.kind is MatchKind.UNIVERSAL and len(c.items) == 2
    assert match_dataset([c], Dataset())


def test_sequence_key_with_two_items_is_refused() -> None:
    query = Dataset()
    query.RequestAttributesSequence = [_request("RP1", ""), _request("RP2", "")]
    with pytest.raises(QueryError, match=r"RequestAttributesSequence \(0040,0275\)"):
        constraints_from_identifier(query)


# --- empty and multi-valued stored values ------------------------------------------------------


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("AccessionNumber", "A100"),
        ("AccessionNumber", "A*"),
        ("AccessionNumber", "?*"),
        ("PatientName", "=山田*"),
        ("StudyDate", "20260101-"),
        ("StudyDate", "-20260101"),
        ("StudyTime", "-1015"),
        ("StudyInstanceUID", ["1.2.3", "1.2.4"]),
        ("ModalitiesInStudy", ["CT", "MR"]),
        ("SeriesNumber", "1"),
        ("SeriesNumber", "1*"),
    ],
)
@pytest.mark.parametrize("stored", [None, "", [], [""], "  "])
def test_empty_stored_value_matches_only_universal(keyword: str, value: Any, stored: Any) -> None:
    c = make(keyword, value)
    assert c.kind is not MatchKind.UNIVERSAL
    assert not match_value(c, stored)
    assert match_value(key("AccessionNumber", ""), stored)
    assert match_value(key("AccessionNumber", "*"), stored)


def test_multi_valued_stored_value_any_value_matches() -> None:
    assert match_value(key("ModalitiesInStudy", "MR"), "CT\\MR\\PT")
    assert match_value(key("ModalitiesInStudy", "MR"), ["CT", "MR"])
    assert not match_value(key("ModalitiesInStudy", "M"), "CT\\MR")
    assert match_value(key("ModalitiesInStudy", "P*"), "CT\\PT")
    assert not match_value(key("ModalitiesInStudy", "C*R"), "CT\\MR")  # '*' stays in one value
    assert match_value(key("ImageType", ["DERIVED"]), "ORIGINAL\\DERIVED")
    # LT/ST/UT hold one value: a backslash there is text
    assert match_value(key("PatientComments", "a\\b"), "a\\b")
    assert not match_value(key("PatientComments", "a"), "a\\b")


# --- PN component groups -------------------------------------------------------------------------

JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"


@pytest.mark.parametrize(
    ("query", "stored", "expected"),
    [
        ("Yamada^Tarou", JAPANESE, True),  # alphabetic group; the others not compared
        ("YAMADA^TAROU", JAPANESE, True),  # Patient's Name: case insensitive
        ("=山田^太郎", JAPANESE, True),  # ideographic group alone
        ("==やまだ^たろう", JAPANESE, True),  # phonetic group alone
        ("Yamada^Tarou=山田^太郎", JAPANESE, True),  # both must match
        ("Yamada^Tarou=山田^花子", JAPANESE, False),
        ("Yamada^Tarou=山田^太郎", "Yamada^Tarou", False),  # no ideographic group stored
        ("Yamada^Tarou=", "Yamada^Tarou", True),  # empty key group: not compared
        ("山田^太郎", JAPANESE, False),  # positional: this is the alphabetic group
        ("山田^太郎", "山田^太郎", True),
        ("=山田*", JAPANESE, True),
        ("*=山田*", JAPANESE, True),
        ("*=*太郎", JAPANESE, True),
        ("Y*=*花子", JAPANESE, False),
        ("*たろう", JAPANESE, False),  # a wild card never crosses '='
        ("Yamada*", "Yamada^Tarou=山田^太郎", True),
        ("Wang^XiaoDong=王^小東", "Wang^XiaoDong=王^小東", True),
    ],
)
def test_person_name_component_groups(query: str, stored: str, expected: bool) -> None:
    assert match_value(key("PatientName", query), stored) is expected


def test_person_name_keeps_components_literal() -> None:
    # '^' components are compared as written (no trailing-delimiter folding)
    assert not match_value(key("PatientName", "Smith^John"), "Smith^John^^^")
    assert match_value(key("PatientName", "Smith^John*"), "Smith^John^^^")


# --- character sets ------------------------------------------------------------------------------


def test_iso_ir_100_identifier_decoded() -> None:
    query = Dataset()
    query.SpecificCharacterSet = "ISO_IR 100"
    query.QueryRetrieveLevel = "PATIENT"
    query.PatientName = "Müller*"
    received = wire(query)
    assert b"M\xfcller*" in received.get_item(PATIENT_NAME).value  # latin-1 on the wire
    (c,) = constraints_from_identifier(received)
    assert c.values == ("Müller*",)
    stored = pydicom.dcmread(CHARSET_FILES / "chrGerm.dcm")  # 'Äneas^Rüdiger', ISO_IR 100
    assert not match_dataset([c], stored)
    query.PatientName = "äneas^rü*"
    assert match_dataset(constraints_from_identifier(wire(query)), stored)


def test_iso_ir_100_worklist_sequence_item_decoded() -> None:
    # A Modality Worklist key inside Scheduled Procedure Step Sequence: the item inherits the
    # identifier's Specific Character Set.
    step = Dataset()
    step.ScheduledPerformingPhysicianName = "Müller*"
    step.ScheduledProcedureStepStartDate = "20260105-20260107"
    step.Modality = "MR"
    query = Dataset()
    query.SpecificCharacterSet = "ISO_IR 100"
    query.ScheduledProcedureStepSequence = [step]
    (c,) = constraints_from_identifier(wire(query))
    by_keyword = {i.keyword: i for i in c.items}
    assert by_keyword["ScheduledPerformingPhysicianName"].values == ("Müller*",)
    assert by_keyword["ScheduledProcedureStepStartDate"].kind is MatchKind.RANGE
    stored_step = Dataset()
    stored_step.ScheduledPerformingPhysicianName = "Müller^Hans"
    stored_step.ScheduledProcedureStepStartDate = "20260106"
    stored_step.Modality = "MR"
    other_step = Dataset()
    other_step.ScheduledPerformingPhysicianName = "Müller^Hans"
    other_step.ScheduledProcedureStepStartDate = "20260106"
    other_step.Modality = "CT"
    item = Dataset()
    item.SpecificCharacterSet = "ISO_IR 100"
    item.ScheduledProcedureStepSequence = [other_step, stored_step]
    assert match_dataset([c], wire(item))
    item.ScheduledProcedureStepSequence = [other_step]
    assert not match_dataset([c], wire(item))


@pytest.mark.parametrize("name", ["Ĳsselmeer^Anna", "山田^太郎"])
def test_iso_ir_192_identifier_decoded(name: str) -> None:
    query = Dataset()
    query.SpecificCharacterSet = "ISO_IR 192"
    query.PatientName = name
    received = wire(query)
    assert name.encode() in received.get_item(PATIENT_NAME).value
    (c,) = constraints_from_identifier(received)
    assert c.values == (name,)
    stored = Dataset()
    stored.SpecificCharacterSet = "ISO_IR 192"
    stored.PatientName = name.upper()
    assert match_dataset([c], wire(stored))


def test_iso_2022_ir_87_identifier_decoded() -> None:
    query = Dataset()
    query.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    query.PatientName = "=山田^太郎"
    received = wire(query)
    assert b"\x1b$B" in received.get_item(PATIENT_NAME).value  # JIS X 0208 escape sequence
    (c,) = constraints_from_identifier(received)
    assert c.values == ("=山田^太郎",)
    h31 = pydicom.dcmread(CHARSET_FILES / "chrH31.dcm")  # Yamada^Tarou=山田^太郎=やまだ^たろう
    assert match_dataset([c], h31)
    assert match_value(c, str(h31.PatientName))
    assert not match_dataset([c], pydicom.dcmread(CHARSET_FILES / "chrX1.dcm"))

    query.PatientName = "やまだ*"
    (c,) = constraints_from_identifier(wire(query))
    assert c.values == ("やまだ*",) and c.kind is MatchKind.WILDCARD
    assert match_dataset([c], pydicom.dcmread(CHARSET_FILES / "chrJapMulti.dcm"))
    assert not match_dataset([c], h31)  # there the kana are the phonetic group


# --- identifiers, errors, constraint values ----------------------------------------------------


def test_constraints_from_identifier_skips_non_keys() -> None:
    query = Dataset()
    query.add_new(0x00080000, "UL", 40)  # group length
    query.SpecificCharacterSet = "ISO_IR 192"
    query.QueryRetrieveLevel = "STUDY"
    query.TimezoneOffsetFromUTC = "+0100"
    query.StudyDate = "20260101-"
    query.AccessionNumber = ""
    query.PatientName = "Doe*"
    cs = constraints_from_identifier(query)
    assert [(c.keyword, c.kind) for c in cs] == [
        ("StudyDate", MatchKind.RANGE),
        ("AccessionNumber", MatchKind.UNIVERSAL),
        ("PatientName", MatchKind.WILDCARD),
    ]
    assert [c.keyword for c in constraints_from_identifier(query, skip={ACCESSION})] == [
        "StudyDate",
        "TimezoneOffsetFromUTC",
        "PatientName",
    ]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_wild_card_series_number_from_the_wire() -> None:
    # An IS of '1*' cannot be built in pydicom but arrives as bytes; it reads back as text.
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    raw = DicomBytesIO()
    raw.is_little_endian, raw.is_implicit_VR = True, True
    write_dataset(raw, query)
    data = raw.getvalue() + bytes.fromhex("2000 1100 0200 0000") + b"1*"
    (c,) = constraints_from_identifier(read_dataset(io.BytesIO(data), True, True))
    assert (c.keyword, c.kind, c.values) == ("SeriesNumber", MatchKind.WILDCARD, ("1*",))


def test_constraint_validates_at_construction() -> None:
    with pytest.raises(ValueError, match="values"):
        Constraint(ACCESSION, "SH", MatchKind.SINGLE)
    with pytest.raises(ValueError, match="end"):
        Constraint(STUDY_DATE, "DA", MatchKind.RANGE)
    with pytest.raises(ValueError, match="item"):
        Constraint(0x00400275, "SQ", MatchKind.SEQUENCE)
    c = Constraint(ACCESSION, "SH", MatchKind.WILDCARD, ("A*",))
    assert c.clause == "PS3.4 C.2.2.2.4"
    with pytest.raises(AttributeError):
        c.values = ("B",)  # type: ignore[misc]


def test_binary_key_is_refused() -> None:
    with pytest.raises(QueryError, match="OB"):
        key_vr(0x00091001, "OB", b"\x01\x02")


def test_sql_condition_refuses_sequences_and_unknown_dialects() -> None:
    column = sa.column("x", sa.String)
    seq = constraints_from_identifier(_series(_request("RP1", "")))[1]
    with pytest.raises(ValueError, match="sequence"):
        sql_condition(seq, column, "sqlite")
    with pytest.raises(ValueError, match="dialect"):
        sql_condition(key("AccessionNumber", "A*"), column, "mysql")


# --- SQL translation: same rows as the Python matcher, on SQLite and PostgreSQL ----------------

metadata = sa.MetaData()
rows_table = sa.Table(
    "match_rows",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name_norm", sa.String(400)),
    sa.Column("referring", sa.String(400)),
    sa.Column("accession", sa.String(16)),
    sa.Column("description", sa.String(64)),
    sa.Column("study_date", sa.String(8)),
    sa.Column("study_time", sa.String(6)),
    sa.Column("study_datetime", sa.String(14)),
    sa.Column("modalities", sa.String(256)),
    sa.Column("physicians", sa.String(400)),
    sa.Column("series_number", sa.Integer),
)
sa.Index("ix_match_rows_name_norm", rows_table.c.name_norm)
sa.Index("ix_match_rows_accession", rows_table.c.accession)

NAMES = [
    "Müller^Hans",
    "MÜLLER^HANS",
    "müller^hans",
    "Mueller^Hans",
    JAPANESE,
    "=山田^花子",
    "Ĳsselmeer^Anna",
    "Smith^John",
    "Smith^John^^^",
    "Smith",
    "Smithers^Waylon",
    "O%Brien^Pat",
    "O_Brien^Pat",
    "Star*^Ringo",
    "Q?^X",
    "[Bracket]^Name",
    "Back]slash",
    "",
    None,
    "Wang^XiaoDong=王^小東",
    "Straße^Otto",
    "yamada^tarou",
    "Yamada^Tarou==やまだ^たろう",
]
ACCESSIONS = [
    "A100",
    "a100",
    "A1000",
    "A%00",
    "A_00",
    "A[0]0",
    "A]00",
    "A*00",
    "B200",
    "",
    None,
    "100",
    "AB00",
]
DESCRIPTIONS = ["Chest [PA]", "CHEST PA", "chest pa", "Abdomen 100%", "Head_Neck", "Thorax*x", ""]
DATES = ["20260101", "20260115", "2026.01.31", "20251231", "20260201", "", None, "20260105"]
TIMES = [
    "000000",
    "0800",
    "101500",
    "101500.999",
    "1015",
    "101559",
    "101600",
    "10",
    "235959.5",
    "",
    None,
    "08:30:00",
    "180000",
]
MODALITIES: list[list[str]] = [
    ["CT"],
    ["MR"],
    ["CT", "MR"],
    ["CT", "MR", "PT"],
    ["MG"],
    ["OT", "SR"],
    ["C"],
    ["CTA"],
    ["CT", "XA"],
    [],
    ["US_X"],
    ["U%X", "USX"],
]
PHYSICIANS: list[list[str]] = [
    ["Doe^Jane"],
    ["Doe^Jane", "Roe^Rich"],
    ["Roe^Rich=ロー^リッチ"],
    ["Doe^Janet", "Poe^Edgar=ポー"],
    [],
    ["X^Y", "Doe^Jane=ドウ^ジェーン"],
]
SERIES_NUMBERS = [1, 2, 7, 10, 12, 100, None, 21]


def _rows() -> list[dict[str, Any]]:
    """~50 rows mixing the value lists at different strides (raw stored values)."""
    out = []
    for i in range(52):
        out.append(
            {
                "id": i + 1,
                "name": NAMES[i % len(NAMES)],
                "referring": NAMES[(i * 5 + 3) % len(NAMES)],
                "accession": ACCESSIONS[(i * 3) % len(ACCESSIONS)],
                "description": DESCRIPTIONS[(i * 2) % len(DESCRIPTIONS)],
                "date": DATES[(i * 3) % len(DATES)],
                "time": TIMES[(i * 7) % len(TIMES)],
                "modalities": MODALITIES[(i * 5) % len(MODALITIES)],
                "physicians": PHYSICIANS[(i * 5) % len(PHYSICIANS)],
                "series_number": SERIES_NUMBERS[(i * 3) % len(SERIES_NUMBERS)],
            }
        )
    return out


def _db_row(raw: dict[str, Any]) -> dict[str, Any]:
    """The row as the index stores it (services.records normalisation)."""
    date, time = normalize_date(raw["date"]), normalize_time(raw["time"])
    return {
        "id": raw["id"],
        "name_norm": raw["name"].upper() if raw["name"] is not None else None,
        "referring": raw["referring"],
        "accession": raw["accession"],
        "description": raw["description"],
        "study_date": date,
        "study_time": time,
        "study_datetime": (date + (time or "000000")) if date else None,
        "modalities": "\\".join(sorted(raw["modalities"])) or None,
        "physicians": "\\".join(raw["physicians"]) or None,
        "series_number": raw["series_number"],
    }


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> Iterator[sa.Engine]:
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            eng = sa.create_engine("sqlite://")
        else:
            eng = sa.create_engine(stack.enter_context(postgres_database()))
        metadata.create_all(eng)
        with eng.begin() as conn:
            conn.execute(rows_table.insert(), [_db_row(r) for r in _rows()])
        yield eng
        eng.dispose()


# (key keyword, key value, column, multi_valued, raw field the Python matcher reads)
SQL_CASES: list[tuple[str, Any, str, bool, str]] = [
    *(
        ("PatientName", v, "name_norm", False, "name")
        for v in [
            "Müller^Hans",
            "müller*",
            "M?LLER*",
            "*HANS",
            "*^*",
            "Yamada^Tarou",
            "=山田^太郎",
            "=山田*",
            "Yamada*=山田^太郎",
            "*=*^花子",
            "==やまだ^たろう",
            "Yamada^Tarou==やまだ*",
            "Smith",
            "SMITH^JOHN",
            "Smith*",
            "Smith^John*",
            "O%Brien^Pat",
            "O_Brien*",
            "O%*",
            "Star*",
            "Q?^X",
            "[Bracket]*",
            "*]*",
            "Back]slash",
            ["Smith", "Yamada^Tarou"],
            ["Sm*", "=山田^花子"],
            "Straße*",
            "STRASSE^OTTO",
            "Ĳ*",
            "?",
            "*a*",
        ]
    ),
    *(
        ("ReferringPhysicianName", v, "referring", False, "referring")
        for v in ["Smith^John", "smith*", "Müller*", "*=山田*", "Yamada^Tarou", "?mith*", "*%*"]
    ),
    *(
        ("AccessionNumber", v, "accession", False, "accession")
        for v in [
            "A100",
            "a100",
            "A%00",
            "A_00",
            "A[0]0",
            "A]00",
            "A*",
            "A?00",
            "*0",
            "A%*",
            "A_*",
            "*[*",
            "*]*",
            "A*00",
            ["A100", "B200"],
            ["A1*", "B2*"],
            "?",
            "???",
        ]
    ),
    *(
        ("StudyDescription", v, "description", False, "description")
        for v in ["Thorax*", "Thorax?x", "chest*", "*100%", "Head_*", "*[PA]", "C*", "*"]
    ),
    *(
        ("StudyDate", v, "study_date", False, "date")
        for v in [
            "20260101",
            "2026.01.31",
            "20260101-20260131",
            "-20260101",
            "20260115-",
            ["20260101", "20260201"],
            "20260131-20260101",
        ]
    ),
    *(
        ("StudyTime", v, "study_time", False, "time")
        for v in [
            "1015",
            "101500",
            "1015-1015",
            "-1015",
            "1016-",
            "10-10",
            "0800-1200",
            "08:30-09:00",
            "101500.5-101559.1",
            "1200-0800",
            "-000000",
        ]
    ),
    *(
        ("ModalitiesInStudy", v, "modalities", True, "modalities")
        for v in [
            "CT",
            "MR",
            "C",
            ["CT", "MG"],
            "C*",
            "*T",
            "M?",
            "?T*",
            "US_X",
            "U%X",
            "U*X",
            "U_*",
            "*",
            "C*R",
        ]
    ),
    *(
        ("PerformingPhysicianName", v, "physicians", True, "physicians")
        for v in [
            "Doe^Jane",
            "Doe*",
            "*Rich",
            "=ロー^リッチ",
            "Roe^Rich",
            "=*",
            "Poe^Edgar=ポー",
            "Doe^Jane=*ジェーン",
            "*=ドウ*",
        ]
    ),
    *(
        ("SeriesNumber", v, "series_number", False, "series_number")
        for v in ["7", "007", "1*", "1?", "*0", ["10", "12"], "2*"]
    ),
]


def _python_ids(c: Constraint, field: str) -> set[int]:
    ids = set()
    for raw in _rows():
        value = raw[field]
        if isinstance(value, int):
            value = str(value)
        if match_value(c, value):
            ids.add(raw["id"])
    return ids


@pytest.mark.parametrize(
    ("keyword", "value", "column", "multi", "field"),
    SQL_CASES,
    ids=[f"{col}:{v if isinstance(v, str) else '|'.join(v)}" for _k, v, col, _m, _f in SQL_CASES],
)
def test_sql_selects_what_python_matches(
    engine: sa.Engine, keyword: str, value: Any, column: str, multi: bool, field: str
) -> None:
    c = make(keyword, value)
    condition = sql_condition(c, rows_table.c[column], engine.dialect.name, multi_valued=multi)
    with engine.connect() as conn:
        got = set(conn.scalars(sa.select(rows_table.c.id).where(condition)))
    assert got == _python_ids(c, field)


def test_sql_cases_are_not_vacuous() -> None:
    sizes = [len(_python_ids(make(k, v), field)) for k, v, _col, _m, field in SQL_CASES]
    assert sum(1 for n in sizes if 0 < n < 52) > len(SQL_CASES) * 2 // 3


@pytest.mark.parametrize(
    ("date", "time"),
    [
        ("20260105-20260131", "1000-1800"),
        ("20260101-20260115", "1015-"),
        ("-20260115", "-1015"),
        ("20260101", "0800-1015"),
        ("", "0000-1015"),
    ],
)
def test_sql_combined_datetime_range(engine: sa.Engine, date: str, time: str) -> None:
    low_high = combined_datetime_range(key("StudyDate", date), key("StudyTime", time), "20260115")
    assert low_high is not None
    c = Constraint(0x0040A032, "DT", MatchKind.RANGE, low=low_high[0], high=low_high[1])
    with engine.connect() as conn:
        got = set(
            conn.scalars(
                sa.select(rows_table.c.id).where(
                    sql_condition(c, rows_table.c.study_datetime, engine.dialect.name)
                )
            )
        )
    expected = set()
    for raw in _rows():
        d, t = normalize_date(raw["date"]), normalize_time(raw["time"])
        if d and match_value(c, d + (t or "000000")):
            expected.add(raw["id"])
    assert got == expected and expected


def test_sql_regexp_works_on_the_index_engine(tmp_path: Path) -> None:
    """Wild cards on multi-valued columns use REGEXP, which SQLAlchemy's pysqlite dialect
    provides; the index's own engine (openpacs.index.db) keeps it."""
    engine = make_engine(f"sqlite:///{tmp_path / 'regexp.sqlite'}")
    try:
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(rows_table.insert(), [_db_row(r) for r in _rows()])
        c = key("ModalitiesInStudy", "?T*")
        condition = sql_condition(c, rows_table.c.modalities, "sqlite", multi_valued=True)
        with engine.connect() as conn:
            got = set(conn.scalars(sa.select(rows_table.c.id).where(condition)))
        assert got == _python_ids(c, "modalities") and got
    finally:
        engine.dispose()


def test_sql_uses_the_column_bare(engine: sa.Engine) -> None:
    """Exact and prefix matches keep the column free of functions, so an index can serve them."""
    dialect = engine.dialect
    cases = [
        (key("AccessionNumber", "A100"), rows_table.c.accession),
        (key("AccessionNumber", "A1*"), rows_table.c.accession),
        (key("PatientName", "müller^hans"), rows_table.c.name_norm),
        (key("PatientName", "Yam*"), rows_table.c.name_norm),
    ]
    for c, column in cases:
        sql = str(sql_condition(c, column, dialect.name).compile(dialect=dialect))
        assert "upper(" not in sql.lower() and "lower(" not in sql.lower()
        assert sql.lstrip("(").startswith(f"match_rows.{column.name} ")
    if dialect.name == "sqlite":
        for c, column in cases:
            stmt = sa.select(rows_table.c.id).where(sql_condition(c, column, "sqlite"))
            compiled = stmt.compile(dialect=dialect)
            with engine.connect() as conn:
                plan = conn.exec_driver_sql(
                    f"EXPLAIN QUERY PLAN {compiled}", tuple(compiled.params.values())
                ).all()
            assert any(f"ix_match_rows_{column.name}" in str(step) for step in plan), plan
    else:
        # Equality uses the default btree; a LIKE prefix would need text_pattern_ops there.
        with engine.connect() as conn:
            conn.exec_driver_sql("SET enable_seqscan = off")
            stmt = sa.select(rows_table.c.id).where(
                sql_condition(key("AccessionNumber", "A100"), rows_table.c.accession, "postgresql")
            )
            compiled = stmt.compile(dialect=dialect)
            plan = conn.exec_driver_sql(f"EXPLAIN {compiled}", compiled.params).all()
            assert any("ix_match_rows_accession" in str(step) for step in plan), plan
