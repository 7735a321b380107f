"""DIMSE status codes used by openpacs, as data, each citing where it comes from.

Owns: the status values (0000,0900) we send and their meanings. Services pick a constant from here
and add an Error Comment (0000,0902) with the concrete reason, so a modality's log says why.
"""

from __future__ import annotations

from typing import NamedTuple


class Status(NamedTuple):
    code: int
    meaning: str
    source: str


SUCCESS = Status(0x0000, "Success", "PS3.7 C.1")

# C-STORE — PS3.4 B.2.3 and seed 002 Table 3.58.
STORE_OUT_OF_RESOURCES = Status(
    0xA700, "Refused: Out of resources (blob storage)", "seed 002 T3.58 A700"
)
STORE_INDEX_UNAVAILABLE = Status(
    0xA704, "Refused: Out of resources (index unavailable)", "seed 002 T3.58 A704"
)
STORE_INDEX_OPERATION_FAILED = Status(
    0xA707, "Refused: Out of resources (index operation failed)", "seed 002 T3.58 A707"
)
STORE_SOP_CLASS_MISMATCH = Status(0xA900, "Error: Data Set does not match SOP Class", "PS3.4 B.2.3")
STORE_CANNOT_UNDERSTAND = Status(0xC000, "Error: Cannot understand", "PS3.4 B.2.3")
STORE_REQUIRED_ELEMENT_MISSING = Status(
    0xC00B, "Error: Cannot understand – required DICOM element missing", "seed 002 T3.58 C00B"
)
STORE_REJECTED = Status(0xC011, "Error: Cannot understand – rejected", "seed 002 T3.58 C011")
STORE_SOP_CLASS_CONFLICT = Status(
    0xC016,
    "Error: Cannot understand – same SOP Instance with different SOP Class",
    "seed 002 T3.58 C016",
)
# PS3.18 Table I.2-2 (STOW-RS Failure Reason): the instance's Transfer Syntax is not accepted.
STORE_TRANSFER_SYNTAX_NOT_SUPPORTED = Status(
    0xC122, "Referenced Transfer Syntax not supported", "PS3.18 I.2.2"
)
# PS3.7 C.4.2: the Affected SOP Class in the command is not the context's abstract syntax.
SOP_CLASS_NOT_SUPPORTED = Status(0x0122, "Refused: SOP Class not supported", "PS3.7 C.4.2")

# General DIMSE failures — PS3.7 Annex C.
PROCESSING_FAILURE = Status(0x0110, "Processing failure", "PS3.7 C.4.1")
UNRECOGNIZED_OPERATION = Status(0x0211, "Unrecognized operation", "PS3.7 C.4.17")
MISTYPED_ARGUMENT = Status(0x0212, "Mistyped argument", "PS3.7 C.4.18")

ALL: tuple[Status, ...] = tuple(v for v in globals().values() if isinstance(v, Status))
BY_CODE: dict[int, Status] = {s.code: s for s in ALL}


def is_failure(code: int) -> bool:
    """PS3.7 C.1-C.4: 0000 success, FF00/FF01 pending, FE00 cancel, Bxxx/0001/0107/0116 warning."""
    if code in (0x0000, 0xFF00, 0xFF01, 0xFE00, 0x0001, 0x0107, 0x0116):
        return False
    return not 0xB000 <= code <= 0xBFFF
