"""PS3.4 C.2.2.2 attribute matching: the one engine behind C-FIND (Q/R), worklist and QIDO-RS.

Owns: turning a query identifier into typed constraints (`Constraint`, each carrying the clause it
implements), matching constraints against stored values in Python (`match_value`, `match_dataset`:
for attributes the index has no column for, and the reference the SQL is tested against), their
translation into portable SQLAlchemy Core conditions for SQLite and PostgreSQL (`sql_condition`),
and the seed 002 §3.2.11.4 combined Study Date + Study Time range rule. Each rule cites its PS3.4
clause in a comment. The SQL dialect differences live in one seam (`_pattern_match`/`_regex_match`,
after Orthanc's ISqlLookupFormatter).
Must not: do I/O, know the index schema or which keys a query level supports (the caller decides
which constraints go to SQL and which to Python), or build responses.

Interpretations where PS3.4 leaves a choice (conformance statement material):

* Case: matching is case-sensitive (C.2.2.2.1, C.2.2.2.4) except for the tags in
  ``case_insensitive_tags`` (Patient's Name, seed 002 T3.71/§3.2.3): both sides are compared after
  ``str.upper()``; in SQL the caller passes the upper-cased ``*_norm`` column.
* Empty stored values: a zero-length or absent stored value matches only Universal Matching
  (C.2.2.2.3), which includes a key made only of ``*`` (C.2.2.2.4 Note 1). Single Value, List of
  UID, Wild Card and Range Matching never select it (C.2.2.2.1 "exactly match"; a date range
  "falls between" dates, so an unknown date does not). Empty Value Matching (a key of ``""``,
  C.2.2.2.7) needs Extended Negotiation and is not performed: ``""`` is an ordinary value.
* Several values in a key (backslash), other than UIDs: any-of (OR). Without Extended Negotiation
  the meaning is undefined (C.2.2.2.8 Note 4); any-of is what Orthanc and dcm4chee do
  ("ModalitiesInStudy=CT\\MR" finds CT studies and MR studies). A range cannot be one of several
  values. Multiple Value Matching (AND, C.2.2.2.8) is not negotiated.
* Multi-valued stored values: the entity matches if any one stored value matches (C.2.2.2.1 is
  applied per value; cf. C.2.2.3). LT, ST, UT and UR are never split: a backslash is text there.
* DA/TM/DT single values (C.2.2.2.1 b) are compared after normalisation: DA 'YYYYMMDD' (ACR-NEMA
  'YYYY.MM.DD' accepted), TM 'HHMMSS', DT 'YYYYMMDDHHMMSS', missing components as their lowest
  value, fractions ignored (seed 002 "fractions of seconds are ignored"). So a TM key '1015' is the
  instant 10:15:00 and matches stored '1015', '101500' and '101500.25' but not '101530' (C.2.2.2.1:
  "exactly match"); '1015-1015' is the way to ask for the whole minute.
* Ranges (C.2.2.2.5): the low end is padded with lowest values, the high end with highest
  ('-1015' includes 10:15:59, '-10' includes 10:59:59, a DT high end '2026' includes 2026-12-31
  23:59:59); open ends allowed; a reversed range matches nothing (TM ranges crossing midnight are
  not supported, C.2.2.2.5.2). DT values lose their UTC offset: stored and query values are
  compared as written (a deviation from C.2.2.2.5.3 d; the index keeps local times).
* PN (C.2.2.2.1 and C.2.2.2.4 leave it to the implementation): component groups are positional,
  as PS3.5 6.2.1 defines them (alphabetic=ideographic=phonetic). Each non-empty group of the key
  must match the same group of the stored name, empty key groups and stored groups the key does
  not mention are not compared. 'Yamada^Tarou' therefore matches 'Yamada^Tarou=山田^太郎',
  '=山田^太郎' matches by the ideographic group alone, and 'Yamada^Tarou=山田^太郎' needs both.
  Wild cards apply within a group ('*' never crosses '='). Components inside a group (the '^'
  parts) are compared literally.
* Wild cards (C.2.2.2.4) are honoured for AE, CS, LO, LT, PN, SH, ST, UC, UR, UT, and for IS
  (seed 002 T3.15/T3.17 list "*" for Series Number and Instance Number). A key made only of '*' is
  Universal Matching for any VR except UI. Any other '*' or '?' in a DA, TM, DT, UI or numeric key
  is an invalid query (`QueryError`): seed 002 calls wild cards on dates and times undefined.
* Sequences (C.2.2.2.6): the key has one Item; zero Items, an empty Item, or an Item whose keys are
  all universal (a request for return keys only) is Universal Matching.
* Numbers (IS, DS and the binary numeric VRs; CP-2305 makes their matching implementation
  defined): compared by value ('007' matches '7').
* Timezone Offset From UTC (0008,0201) in an identifier is not a matching key (skipped by
  default); query times are compared as written.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import Any

import sqlalchemy as sa
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

__all__ = [
    "ALWAYS_SKIPPED",
    "PATIENT_NAME",
    "Constraint",
    "MatchKind",
    "QueryError",
    "combined_datetime_range",
    "constraint_from_element",
    "constraints_from_identifier",
    "match_dataset",
    "match_value",
    "sql_condition",
]

PATIENT_NAME = 0x00100010
SPECIFIC_CHARACTER_SET = 0x00080005
QUERY_RETRIEVE_LEVEL = 0x00080052
TIMEZONE_OFFSET_FROM_UTC = 0x00080201

# Never matching keys (PS3.4 C.2.2.2: Specific Character Set "is never matched"; C.4.1.1.3
# Query/Retrieve Level selects the level, it is not an attribute of the entities).
ALWAYS_SKIPPED = frozenset({SPECIFIC_CHARACTER_SET, QUERY_RETRIEVE_LEVEL})


class MatchKind(enum.Enum):
    SINGLE = "single"  # PS3.4 C.2.2.2.1
    LIST_OF_UID = "list_of_uid"  # PS3.4 C.2.2.2.2
    UNIVERSAL = "universal"  # PS3.4 C.2.2.2.3
    WILDCARD = "wildcard"  # PS3.4 C.2.2.2.4
    RANGE = "range"  # PS3.4 C.2.2.2.5
    SEQUENCE = "sequence"  # PS3.4 C.2.2.2.6


_CLAUSE = {
    MatchKind.SINGLE: "PS3.4 C.2.2.2.1",
    MatchKind.LIST_OF_UID: "PS3.4 C.2.2.2.2",
    MatchKind.UNIVERSAL: "PS3.4 C.2.2.2.3",
    MatchKind.WILDCARD: "PS3.4 C.2.2.2.4",
    MatchKind.RANGE: "PS3.4 C.2.2.2.5",
    MatchKind.SEQUENCE: "PS3.4 C.2.2.2.6",
}
_RANGE_CLAUSE = {"DA": "PS3.4 C.2.2.2.5.1", "TM": "PS3.4 C.2.2.2.5.2", "DT": "PS3.4 C.2.2.2.5.3"}

# PS3.4 C.2.2.2.4: the VRs wild cards apply to; IS added by seed 002 (T3.15/T3.17).
_WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT", "IS"})
_TEMPORAL_VRS = frozenset({"DA", "TM", "DT"})
_INT_VRS = frozenset({"IS", "US", "SS", "UL", "SL", "UV", "SV"})
_FLOAT_VRS = frozenset({"DS", "FL", "FD"})
_NUMBER_VRS = _INT_VRS | _FLOAT_VRS
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_SINGLE_VALUED_VRS = frozenset({"LT", "ST", "UT", "UR"})  # PS3.5 6.4: VM is always 1
_STRIP_TRAILING_ONLY = frozenset({"LT", "ST", "UT", "UC", "UR"})  # leading spaces significant


def _tag_name(tag: int) -> str:
    keyword = keyword_for_tag(tag)
    text = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    return f"{keyword} {text}" if keyword else text


class QueryError(ValueError):
    """An invalid query value; ``tag`` (when known) is the offending element."""

    def __init__(self, message: str, *, tag: int | None = None) -> None:
        self.tag = tag
        super().__init__(f"{_tag_name(tag)}: {message}" if tag is not None else message)


@dataclass(frozen=True)
class Constraint:
    """One key of a query: how a stored attribute must look for an entity to match."""

    tag: int
    vr: str
    kind: MatchKind
    values: tuple[str, ...] = ()
    low: str | None = None
    high: str | None = None
    items: tuple[Constraint, ...] = ()
    case_insensitive: bool = False
    clause: str = ""

    def __post_init__(self) -> None:
        kind = self.kind
        listed = kind in (MatchKind.SINGLE, MatchKind.LIST_OF_UID, MatchKind.WILDCARD)
        if listed and (not self.values or any(not v for v in self.values)):
            raise ValueError(f"{_tag_name(self.tag)}: {kind.name} needs non-empty values")
        if kind is MatchKind.RANGE and self.low is None and self.high is None:
            raise ValueError(f"{_tag_name(self.tag)}: a range needs at least one end")
        if kind is MatchKind.SEQUENCE and not self.items:
            raise ValueError(f"{_tag_name(self.tag)}: sequence matching needs item keys")
        if not self.clause:
            object.__setattr__(self, "clause", _CLAUSE[kind])

    @property
    def keyword(self) -> str:
        return keyword_for_tag(self.tag) or f"({self.tag >> 16:04X},{self.tag & 0xFFFF:04X})"


# --- values -----------------------------------------------------------------------------------


def _strip(vr: str, text: str) -> str:
    if vr == "UI":
        return text.strip("\0 ")
    return text.rstrip() if vr in _STRIP_TRAILING_ONLY else text.strip()


def _element_strings(elem: DataElement) -> list[str]:
    """The element's values as text (decoded by pydicom with the data set's character set)."""
    value = elem.value
    if value is None or value == "" or value == b"":
        return []
    if isinstance(value, str | bytes | PersonName) or not isinstance(value, Iterable):
        items: list[Any] = [value]
    else:
        items = list(value)
    out = []
    for item in items:
        if elem.VR == "AT":
            text = f"{int(item):08X}"
        elif isinstance(item, bytes):
            text = item.hex()
        else:
            text = str(item)
        out.append(_strip(elem.VR, text))
    return out


def _stored_strings(vr: str, value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        parts = [value] if vr in _SINGLE_VALUED_VRS else value.split("\\")
    else:
        parts = list(value)
    return [s for s in (_strip(vr, p) for p in parts) if s]


def _has_wild(text: str) -> bool:
    return "*" in text or "?" in text


def _all_stars(text: str) -> bool:
    return text == "" or set(text) == {"*"}


def _is_universal_value(vr: str, text: str) -> bool:
    # PS3.4 C.2.2.2.4 Note 1: a value of "*" is Universal Matching; for PN, per component group.
    if vr == "PN":
        return all(_all_stars(group) for group in text.split("="))
    return _all_stars(text)


# PS3.5 6.2 DA/TM/DT, with the ACR-NEMA forms 'YYYY.MM.DD' and 'HH:MM:SS' (PS3.5 6.2 Notes).
_DA = re.compile(r"(\d{4})\.?(\d{2})\.?(\d{2})")
_TM = re.compile(r"(\d{2})(?::?(\d{2}))?(?::?(\d{2}))?(?:\.\d*)?")
_DT = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.\d{0,6})?)?)?)?)?)?"
    r"(?:([+-])(\d{2})(\d{2}))?"
)


def _in(text: str | None, low: int, high: int) -> bool:
    return text is None or low <= int(text) <= high


def _normalise_temporal(vr: str, text: str, *, high: bool = False, strict: bool) -> str | None:
    """'YYYYMMDD' / 'HHMMSS' / 'YYYYMMDDHHMMSS', missing parts lowest (highest if ``high``).

    Fractions and the DT UTC offset are dropped. ``strict`` also checks component ranges (query
    values); stored values are normalised leniently, as the index does (services.records)."""
    if vr == "DA":
        m = _DA.fullmatch(text)
        if not m or (strict and not (_in(m[2], 1, 12) and _in(m[3], 1, 31))):
            return None
        return m[1] + m[2] + m[3]
    if vr == "TM":
        m = _TM.fullmatch(text)
        if not m or (strict and not (_in(m[1], 0, 23) and _in(m[2], 0, 59) and _in(m[3], 0, 60))):
            return None
        fill = "59" if high else "00"
        return m[1] + (m[2] or fill) + (m[3] or fill)
    m = _DT.fullmatch(text)
    if not m:
        return None
    year, month, day, hour, minute, second, sign, off_h, off_m = m.groups()
    if strict:
        ok = _in(month, 1, 12) and _in(day, 1, 31) and _in(hour, 0, 23)
        ok = ok and _in(minute, 0, 59) and _in(second, 0, 60)
        if sign:  # PS3.5 DT: offsets -1200 … +1400
            ok = ok and int(off_m) <= 59 and int(off_h + off_m) <= (1400 if sign == "+" else 1200)
        if not ok:
            return None
    pads = ("12", "31", "23", "59", "59") if high else ("01", "01", "00", "00", "00")
    parts = (month, day, hour, minute, second)
    return year + "".join(part or pad for part, pad in zip(parts, pads, strict=True))


def _parse_range(tag: int, vr: str, text: str) -> tuple[str | None, str | None] | None:
    """A C.2.2.2.5 range as normalised (low, high); None if ``text`` is a single value."""
    if "-" not in text:
        return None
    positions = [i for i, ch in enumerate(text) if ch == "-"]
    if vr != "DT" and len(positions) != 1:
        raise QueryError(f"malformed range {text!r}", tag=tag)
    candidates: list[tuple[str | None, str | None]] = []
    for i in positions:
        low_text, high_text = text[:i].strip(), text[i + 1 :].strip()
        if not low_text and not high_text:
            continue
        low = _normalise_temporal(vr, low_text, strict=True) if low_text else None
        high = _normalise_temporal(vr, high_text, high=True, strict=True) if high_text else None
        if (low_text and low is None) or (high_text and high is None):
            continue
        candidates.append((low, high))
    if vr == "DT":
        # A '-' in a DT may also be the sign of a UTC offset ('20260101-0500'): prefer an
        # ordered range, then a single value, then whatever range the text spells.
        ordered = [c for c in candidates if c[0] is None or c[1] is None or c[0] <= c[1]]
        if ordered:
            return ordered[0]
        if _normalise_temporal(vr, text, strict=True) is not None:
            return None
    if not candidates:
        raise QueryError(f"malformed {vr} range {text!r}", tag=tag)
    return candidates[0]


def _normalise_number(vr: str, text: str) -> str | None:
    """Canonical text of a number (CP-2305: IS/DS matching is implementation defined)."""
    try:
        if vr in _INT_VRS:
            number = Decimal(text)
            if number != number.to_integral_value():
                return None
            return str(int(number))
        return repr(float(text))
    except (ArithmeticError, ValueError):
        return None


# --- constraints from an identifier ----------------------------------------------------------


def constraint_from_element(
    elem: DataElement, *, case_insensitive_tags: Collection[int] = frozenset({PATIENT_NAME})
) -> Constraint:
    """The constraint one key of an identifier asks for (raises QueryError if invalid)."""
    tag, vr = int(elem.tag), elem.VR.split(" or ")[0]
    ci = tag in case_insensitive_tags
    if vr == "SQ":
        return _sequence_constraint(elem, case_insensitive_tags)

    # PS3.4 C.2.2.2.3 universal matching: a zero-length key (empty values of a list dropped).
    values = [v for v in _element_strings(elem) if v]
    if not values:
        return Constraint(tag, vr, MatchKind.UNIVERSAL, case_insensitive=ci)

    if vr == "UI":
        # PS3.4 C.2.2.2.4: no wild cards for UI; C.2.2.2.2: backslash-separated UIDs are a list.
        if any(_has_wild(v) for v in values):
            raise QueryError("wild cards are not allowed in a UID", tag=tag)
        kind = MatchKind.LIST_OF_UID if len(values) > 1 else MatchKind.SINGLE
        return Constraint(tag, vr, kind, tuple(dict.fromkeys(values)), case_insensitive=ci)

    # PS3.4 C.2.2.2.4 Note 1: "*" is equivalent to universal matching (any of the values).
    if any(_is_universal_value(vr, v) for v in values):
        return Constraint(
            tag, vr, MatchKind.UNIVERSAL, case_insensitive=ci, clause="PS3.4 C.2.2.2.4 Note 1"
        )

    if vr in _TEMPORAL_VRS:
        return _temporal_constraint(tag, vr, values)

    if any(_has_wild(v) for v in values):
        if vr not in _WILDCARD_VRS:
            raise QueryError(f"wild card matching is not defined for VR {vr}", tag=tag)
        clause = "PS3.4 C.2.2.2.4" if vr != "IS" else "PS3.4 C.2.2.2.4 (IS: seed 002 T3.15/T3.17)"
        unique = tuple(dict.fromkeys(values))
        return Constraint(tag, vr, MatchKind.WILDCARD, unique, case_insensitive=ci, clause=clause)

    if vr in _NUMBER_VRS:
        numbers = [_normalise_number(vr, v) for v in values]
        if any(n is None for n in numbers):
            raise QueryError(f"not a number: {elem.value!r}", tag=tag)
        values = [n for n in numbers if n is not None]
    elif vr in _BINARY_VRS:
        raise QueryError(f"matching on VR {vr} is not supported", tag=tag)
    # PS3.4 C.2.2.2.1 single value matching (several values: any of them, see module docstring).
    return Constraint(tag, vr, MatchKind.SINGLE, tuple(dict.fromkeys(values)), case_insensitive=ci)


def _temporal_constraint(tag: int, vr: str, values: list[str]) -> Constraint:
    if any(_has_wild(v) for v in values):
        # PS3.4 C.2.2.2.4 excludes DA/TM/DT; seed 002: "wildcard matching on date and time is
        # not supported".
        raise QueryError(f"wild card matching is not defined for VR {vr}", tag=tag)
    ranges = [_parse_range(tag, vr, v) for v in values]
    if any(r is not None for r in ranges):
        if len(values) > 1:
            raise QueryError("a range cannot be one of several values", tag=tag)
        low, high = ranges[0] or (None, None)
        # PS3.4 C.2.2.2.5 range matching.
        return Constraint(tag, vr, MatchKind.RANGE, low=low, high=high, clause=_RANGE_CLAUSE[vr])
    normalised = []
    for v in values:
        n = _normalise_temporal(vr, v, strict=True)
        if n is None:
            raise QueryError(f"invalid {vr} value {v!r}", tag=tag)
        normalised.append(n)
    # PS3.4 C.2.2.2.1 b: a single date/time, compared in normalised form.
    return Constraint(tag, vr, MatchKind.SINGLE, tuple(dict.fromkeys(normalised)))


def _sequence_constraint(elem: DataElement, case_insensitive_tags: Collection[int]) -> Constraint:
    tag = int(elem.tag)
    items = list(elem.value or [])
    if len(items) > 1:
        # PS3.4 C.2.2.2.6: "the Key Attribute shall be structured as a Sequence of Items with a
        # single Item".
        raise QueryError("a sequence key must have exactly one item", tag=tag)
    sub = (
        tuple(
            constraints_from_identifier(
                items[0], skip=frozenset(), case_insensitive_tags=case_insensitive_tags
            )
        )
        if items
        else ()
    )
    if all(c.kind is MatchKind.UNIVERSAL for c in sub):
        # PS3.4 C.2.2.2.6: no Item Key Attribute is universal-like; so is an Item that only asks
        # for return keys.
        return Constraint(tag, "SQ", MatchKind.UNIVERSAL, items=sub, clause="PS3.4 C.2.2.2.6")
    return Constraint(tag, "SQ", MatchKind.SEQUENCE, items=sub)


def constraints_from_identifier(
    ds: Dataset,
    *,
    skip: Collection[int] = frozenset({TIMEZONE_OFFSET_FROM_UTC}),
    case_insensitive_tags: Collection[int] = frozenset({PATIENT_NAME}),
) -> list[Constraint]:
    """One constraint per key of ``ds`` (values decoded with its Specific Character Set).

    Not keys: ALWAYS_SKIPPED, groups 0000 and 0002, group lengths, and ``skip`` (by default
    Timezone Offset From UTC, which qualifies the query's times rather than matching)."""
    out = []
    for elem in ds:  # iterating converts raw elements, decoding text with the character set
        tag = int(elem.tag)
        group, element = tag >> 16, tag & 0xFFFF
        if group in (0x0000, 0x0002) or element == 0 or tag in ALWAYS_SKIPPED or tag in skip:
            continue
        out.append(constraint_from_element(elem, case_insensitive_tags=case_insensitive_tags))
    return out


# --- matching in Python ----------------------------------------------------------------------


@lru_cache(maxsize=1024)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    # PS3.4 C.2.2.2.4: "*" any sequence of characters (including none), "?" any single one.
    body = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.compile(body, re.DOTALL)


def _text_matches(query: str, stored: str, wild: bool) -> bool:
    if wild and _has_wild(query):
        return _glob_regex(query).fullmatch(stored) is not None
    return query == stored


def _pn_matches(query: str, stored: str, wild: bool) -> bool:
    # PN component groups are positional; empty key groups are not compared (module docstring).
    stored_groups = stored.split("=")
    for i, group in enumerate(query.split("=")):
        if _all_stars(group):
            continue
        if not _text_matches(group, stored_groups[i] if i < len(stored_groups) else "", wild):
            return False
    return True


def _matches_one(c: Constraint, query: str, stored: str) -> bool:
    if c.kind is MatchKind.LIST_OF_UID:
        return stored == query  # PS3.4 C.2.2.2.2: each UID in the list may generate a match
    if c.vr in _TEMPORAL_VRS:
        return _normalise_temporal(c.vr, stored, strict=False) == query
    wild = c.kind is MatchKind.WILDCARD
    if c.vr in _NUMBER_VRS:
        number = _normalise_number(c.vr, stored)
        if not wild:
            return number is not None and number == query
        stored = number if number is not None else stored
    if c.case_insensitive:
        query, stored = query.upper(), stored.upper()
    if c.vr == "PN":
        return _pn_matches(query, stored, wild)
    return _text_matches(query, stored, wild)


def match_value(c: Constraint, value: str | Sequence[str] | Sequence[Dataset] | None) -> bool:
    """Whether a stored attribute satisfies ``c``.

    ``value`` is the stored attribute as text: one string (backslash-separated if multi-valued,
    except for LT/ST/UT/UR) or a list of strings; None or '' when absent or empty. For a SEQUENCE
    constraint it is the stored sequence's items (Datasets)."""
    if c.kind is MatchKind.UNIVERSAL:
        return True  # PS3.4 C.2.2.2.3: all entities match, with or without a value
    if c.kind is MatchKind.SEQUENCE:
        # PS3.4 C.2.2.2.6: a match if all Item Key Attributes match for at least one Item.
        items = [item for item in (value or ()) if isinstance(item, Dataset)]
        return any(match_dataset(c.items, item) for item in items)
    stored = _stored_strings(c.vr, value)  # type: ignore[arg-type]
    if c.kind is MatchKind.RANGE:
        # PS3.4 C.2.2.2.5: inclusive, open ends allowed, compared in normalised form.
        for text in stored:
            n = _normalise_temporal(c.vr, text, strict=False)
            if n is None:
                continue
            if (c.low is None or n >= c.low) and (c.high is None or n <= c.high):
                return True
        return False
    return any(_matches_one(c, q, s) for s in stored for q in c.values)


def match_dataset(constraints: Sequence[Constraint], ds: Dataset) -> bool:
    """Whether ``ds`` satisfies every constraint (sequences: some stored item satisfies all)."""
    for c in constraints:
        if c.kind is MatchKind.UNIVERSAL:
            continue
        elem = ds.get(c.tag)
        if c.kind is MatchKind.SEQUENCE:
            items = list(elem.value or []) if elem is not None and elem.VR == "SQ" else []
            if not match_value(c, items):
                return False
        elif not match_value(
            c, _element_strings(elem) if elem is not None and elem.VR != "SQ" else None
        ):
            return False
    return True


# --- SQL translation -------------------------------------------------------------------------


class _Wild(enum.Enum):
    ANY = "*"
    ONE = "?"


_Token = str | _Wild


def _tokens(pattern: str) -> list[_Token]:
    out: list[_Token] = []
    for part in re.split(r"([*?])", pattern):
        if part == "*":
            out.append(_Wild.ANY)
        elif part == "?":
            out.append(_Wild.ONE)
        elif part:
            out.append(part)
    return out


_GLOB_SPECIAL = re.compile(r"[*?\[\]]")
_LIKE_SPECIAL = re.compile(r"[\\%_]")
_REGEX_SPECIAL = frozenset("\\.^$|?*+()[]{}")


def _pattern_match(
    column: sa.ColumnElement[Any], tokens: Sequence[_Token], dialect_name: str
) -> sa.ColumnElement[bool]:
    """The dialect seam (cf. Orthanc ISqlLookupFormatter): a case-sensitive pattern match.

    SQLite's LIKE ignores ASCII case, so SQLite gets GLOB (literal '*', '?', '[', ']' wrapped in
    brackets); PostgreSQL gets LIKE with '\\' escaping '%', '_' and '\\'. No function wraps the
    column, so a literal prefix can use an index: on SQLite a plain one, on PostgreSQL one built
    with text_pattern_ops (or a "C" collation); a default btree there serves equality only."""
    if dialect_name == "sqlite":
        glob = "".join(
            t.value if isinstance(t, _Wild) else _GLOB_SPECIAL.sub(r"[\g<0>]", t) for t in tokens
        )
        return column.op("GLOB", is_comparison=True)(glob)
    if dialect_name == "postgresql":
        like = "".join(
            ("%" if t is _Wild.ANY else "_")
            if isinstance(t, _Wild)
            else _LIKE_SPECIAL.sub(r"\\\g<0>", t)
            for t in tokens
        )
        return column.like(like, escape="\\")
    raise ValueError(f"unsupported SQL dialect {dialect_name!r}")


def _regex_match(
    column: sa.ColumnElement[Any], regex: str, dialect_name: str
) -> sa.ColumnElement[bool]:
    """The other half of the seam: a case-sensitive regular expression (PostgreSQL '~'; SQLite
    REGEXP, which SQLAlchemy's pysqlite dialect provides with Python's re.search). Used only
    where a wild card must not cross a value or component group separator. The expressions use
    the syntax both engines share: \\A, \\Z, bracket classes, '*', groups, '|'."""
    if dialect_name not in ("sqlite", "postgresql"):
        raise ValueError(f"unsupported SQL dialect {dialect_name!r}")
    return column.regexp_match(regex)


def _rx_escape(text: str) -> str:
    return "".join("\\" + ch if ch in _REGEX_SPECIAL else ch for ch in text)


def _rx_body(pattern: str, char_class: str, wild: bool) -> str:
    if not wild:
        return _rx_escape(pattern)
    return "".join(
        char_class + "*" if ch == "*" else char_class if ch == "?" else _rx_escape(ch)
        for ch in pattern
    )


def _literal_prefix(pattern: str, wild: bool) -> str:
    return re.split(r"[*?]", pattern)[0] if wild else pattern


def _exact(
    column: sa.ColumnElement[Any], values: Sequence[Any], multi: bool, dialect_name: str
) -> sa.ColumnElement[bool]:
    equal = column == values[0] if len(values) == 1 else column.in_(values)
    if not multi:
        return equal
    # One stored value of a backslash-joined list equals v: the whole column, or v at the
    # start, end or in the middle of the list (v holds no backslash: keys are split on it).
    conds = [equal]
    for v in values:
        conds += [
            _pattern_match(column, [v + "\\", _Wild.ANY], dialect_name),
            _pattern_match(column, [_Wild.ANY, "\\" + v], dialect_name),
            _pattern_match(column, [_Wild.ANY, "\\" + v + "\\", _Wild.ANY], dialect_name),
        ]
    return sa.or_(*conds)


def _pn_condition(
    column: sa.ColumnElement[Any], query: str, wild: bool, multi: bool, dialect_name: str
) -> sa.ColumnElement[bool]:
    # Positional component groups (module docstring); a key's trailing groups may be omitted.
    groups = query.split("=")
    constrained = [i for i, g in enumerate(groups) if not _all_stars(g)]
    if not constrained:
        return sa.true()
    last = constrained[-1]
    first = groups[0]
    first_wild = wild and _has_wild(first)
    if not multi and last == 0 and not first_wild:
        # The common case, index-friendly: the name itself, or it followed by other groups.
        return sa.or_(
            column == first, _pattern_match(column, [first + "=", _Wild.ANY], dialect_name)
        )
    cls = "[^\\\\=]" if multi else "[^=]"
    body = "=".join(
        cls + "*" if _all_stars(g) else _rx_body(g, cls, wild) for g in groups[: last + 1]
    )
    if multi:
        regex = "(\\A|\\\\)" + body + "(=[^\\\\=]*)*(\\\\|\\Z)"
    else:
        regex = "\\A" + body + "(=[^=]*)*\\Z"
    cond = _regex_match(column, regex, dialect_name)
    prefix = "" if multi or _all_stars(first) else _literal_prefix(first, wild)
    if prefix and not first_wild and last > 0:
        prefix += "="
    if prefix:  # a necessary condition an index can serve
        cond = sa.and_(_pattern_match(column, [prefix, _Wild.ANY], dialect_name), cond)
    return cond


def _is_numeric_column(column: sa.ColumnElement[Any]) -> bool:
    return isinstance(column.type, sa.Integer | sa.Numeric)


def sql_condition(
    c: Constraint,
    column: sa.ColumnElement[Any],
    dialect_name: str,
    *,
    multi_valued: bool = False,
) -> sa.ColumnElement[bool]:
    """The SQL form of ``c`` on ``column``; selects exactly the rows `match_value` accepts.

    ``column`` holds the index's normalised form (dates 'YYYYMMDD', times 'HHMMSS', the
    upper-cased ``*_norm`` column for a case-insensitive constraint, numbers as numbers).
    ``multi_valued``: the column holds backslash-joined values (Modalities in Study), any of
    which may match; exact values use four patterns (whole, first, last, middle), wild cards a
    regular expression. SEQUENCE constraints are the caller's (raises ValueError)."""
    if c.kind is MatchKind.UNIVERSAL:
        return sa.true()  # PS3.4 C.2.2.2.3
    if c.kind is MatchKind.SEQUENCE:
        raise ValueError(f"{_tag_name(c.tag)}: sequence matching has no single-column SQL form")
    if c.kind is MatchKind.RANGE:
        if multi_valued:
            raise ValueError(f"{_tag_name(c.tag)}: no SQL range matching on a multi-valued column")
        # PS3.4 C.2.2.2.5: normalised strings compare in time order. An open low end still
        # excludes empty values ('' > '' is false; NULL compares to nothing).
        lower = column >= c.low if c.low is not None else column > ""
        return lower if c.high is None else sa.and_(lower, column <= c.high)

    values = [v.upper() for v in c.values] if c.case_insensitive else list(c.values)
    wild = c.kind is MatchKind.WILDCARD
    if c.vr in _NUMBER_VRS and _is_numeric_column(column):
        if not wild:
            convert = int if c.vr in _INT_VRS else float
            return _exact(column, [convert(v) for v in values], False, dialect_name)
        column = sa.cast(column, sa.String)  # wild cards on IS (seed 002) match the digits
    if c.vr == "PN":
        conds = [_pn_condition(column, v, wild, multi_valued, dialect_name) for v in values]
        return conds[0] if len(conds) == 1 else sa.or_(*conds)

    # PS3.4 C.2.2.2.1 / C.2.2.2.2: exact values; C.2.2.2.4: patterns.
    literals = [v for v in values if not (wild and _has_wild(v))]
    patterns = [v for v in values if wild and _has_wild(v)]
    conds = [_exact(column, literals, multi_valued, dialect_name)] if literals else []
    for p in patterns:
        if multi_valued:
            regex = "(\\A|\\\\)" + _rx_body(p, "[^\\\\]", True) + "(\\\\|\\Z)"
            conds.append(_regex_match(column, regex, dialect_name))
        else:
            conds.append(_pattern_match(column, _tokens(p), dialect_name))
    return conds[0] if len(conds) == 1 else sa.or_(*conds)


# --- seed 002 §3.2.11.4: Study Date + Study Time ------------------------------------------------


def combined_datetime_range(
    date_c: Constraint | None, time_c: Constraint | None, today: str
) -> tuple[str | None, str | None] | None:
    """The 'YYYYMMDDHHMMSS' (low, high) range on the combined study date+time, or None.

    Seed 002 §3.2.11.4 (as PS3.4 C.2.2.2.5.4 combined datetime matching): a Study Date range
    date1-date2 with a Study Time range time1-time2 is the one range date1.time1-date2.time2; a
    Study Time range without a Study Date (absent or zero-length) is on ``today``; a single Study
    Date with a time range is that day between the times. None when the rule does not apply (no
    time range, several dates, a date with a single time): the caller then matches the date and
    time columns separately, which is the same thing for those cases."""
    if _normalise_temporal("DA", today, strict=True) != today:
        raise ValueError(f"today must be 'YYYYMMDD', not {today!r}")
    if time_c is None or time_c.kind is not MatchKind.RANGE:
        return None
    first_day: str | None
    last_day: str | None
    if date_c is None or date_c.kind is MatchKind.UNIVERSAL:
        first_day, last_day = today, today
    elif date_c.kind is MatchKind.RANGE:
        first_day, last_day = date_c.low, date_c.high
    elif date_c.kind is MatchKind.SINGLE and len(date_c.values) == 1:
        first_day = last_day = date_c.values[0]
    else:
        return None
    low = first_day + (time_c.low or "000000") if first_day is not None else None
    high = last_day + (time_c.high or "235959") if last_day is not None else None
    return low, high
