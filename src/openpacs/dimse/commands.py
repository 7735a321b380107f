"""DIMSE command sets (PS3.7 §9.3, §10.3, Annex E): encoding and decoding.

Owns: the byte form of command sets — always Implicit VR Little Endian, group 0000 only — and the
command-field constants. A command set has a fixed, small repertoire of elements with known VRs,
so it is coded here directly: pydicom's general reader/writer (what pynetdicom uses) costs about
half a millisecond per message, which dominated per-instance CPU on the C-STORE hot path.
Must not: know about services, sockets or data sets.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

# PS3.7 E.1: command fields.
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RQ, C_GET_RSP = 0x0010, 0x8010
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_MOVE_RQ, C_MOVE_RSP = 0x0021, 0x8021
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
N_EVENT_REPORT_RQ, N_EVENT_REPORT_RSP = 0x0100, 0x8100
N_GET_RQ, N_GET_RSP = 0x0110, 0x8110
N_SET_RQ, N_SET_RSP = 0x0120, 0x8120
N_ACTION_RQ, N_ACTION_RSP = 0x0130, 0x8130
N_CREATE_RQ, N_CREATE_RSP = 0x0140, 0x8140
N_DELETE_RQ, N_DELETE_RSP = 0x0150, 0x8150
C_CANCEL_RQ = 0x0FFF

COMMAND_NAMES = {
    C_STORE_RQ: "C-STORE-RQ", C_STORE_RSP: "C-STORE-RSP",
    C_GET_RQ: "C-GET-RQ", C_GET_RSP: "C-GET-RSP",
    C_FIND_RQ: "C-FIND-RQ", C_FIND_RSP: "C-FIND-RSP",
    C_MOVE_RQ: "C-MOVE-RQ", C_MOVE_RSP: "C-MOVE-RSP",
    C_ECHO_RQ: "C-ECHO-RQ", C_ECHO_RSP: "C-ECHO-RSP",
    N_EVENT_REPORT_RQ: "N-EVENT-REPORT-RQ", N_EVENT_REPORT_RSP: "N-EVENT-REPORT-RSP",
    N_GET_RQ: "N-GET-RQ", N_GET_RSP: "N-GET-RSP",
    N_SET_RQ: "N-SET-RQ", N_SET_RSP: "N-SET-RSP",
    N_ACTION_RQ: "N-ACTION-RQ", N_ACTION_RSP: "N-ACTION-RSP",
    N_CREATE_RQ: "N-CREATE-RQ", N_CREATE_RSP: "N-CREATE-RSP",
    N_DELETE_RQ: "N-DELETE-RQ", N_DELETE_RSP: "N-DELETE-RSP",
    C_CANCEL_RQ: "C-CANCEL-RQ",
}  # fmt: skip

NO_DATASET = 0x0101  # (0000,0800) Command Data Set Type: "no data set present"
DATASET_PRESENT = 0x0000  # any other value means a data set follows; we send 0x0000

# PS3.7 E.1 command elements, tag → VR.
COMMAND_GROUP_LENGTH = 0x00000000
AFFECTED_SOP_CLASS_UID = 0x00000002
REQUESTED_SOP_CLASS_UID = 0x00000003
COMMAND_FIELD = 0x00000100
MESSAGE_ID = 0x00000110
MESSAGE_ID_BEING_RESPONDED_TO = 0x00000120
MOVE_DESTINATION = 0x00000600
PRIORITY = 0x00000700
COMMAND_DATA_SET_TYPE = 0x00000800
STATUS = 0x00000900
OFFENDING_ELEMENT = 0x00000901
ERROR_COMMENT = 0x00000902
ERROR_ID = 0x00000903
AFFECTED_SOP_INSTANCE_UID = 0x00001000
REQUESTED_SOP_INSTANCE_UID = 0x00001001
EVENT_TYPE_ID = 0x00001002
ATTRIBUTE_IDENTIFIER_LIST = 0x00001005
ACTION_TYPE_ID = 0x00001008
NUMBER_OF_REMAINING_SUBOPERATIONS = 0x00001020
NUMBER_OF_COMPLETED_SUBOPERATIONS = 0x00001021
NUMBER_OF_FAILED_SUBOPERATIONS = 0x00001022
NUMBER_OF_WARNING_SUBOPERATIONS = 0x00001023
MOVE_ORIGINATOR_AE_TITLE = 0x00001030
MOVE_ORIGINATOR_MESSAGE_ID = 0x00001031

COMMAND_VRS: dict[int, str] = {
    COMMAND_GROUP_LENGTH: "UL",
    AFFECTED_SOP_CLASS_UID: "UI",
    REQUESTED_SOP_CLASS_UID: "UI",
    COMMAND_FIELD: "US",
    MESSAGE_ID: "US",
    MESSAGE_ID_BEING_RESPONDED_TO: "US",
    MOVE_DESTINATION: "AE",
    PRIORITY: "US",
    COMMAND_DATA_SET_TYPE: "US",
    STATUS: "US",
    OFFENDING_ELEMENT: "AT",
    ERROR_COMMENT: "LO",
    ERROR_ID: "US",
    AFFECTED_SOP_INSTANCE_UID: "UI",
    REQUESTED_SOP_INSTANCE_UID: "UI",
    EVENT_TYPE_ID: "US",
    ATTRIBUTE_IDENTIFIER_LIST: "AT",
    ACTION_TYPE_ID: "US",
    NUMBER_OF_REMAINING_SUBOPERATIONS: "US",
    NUMBER_OF_COMPLETED_SUBOPERATIONS: "US",
    NUMBER_OF_FAILED_SUBOPERATIONS: "US",
    NUMBER_OF_WARNING_SUBOPERATIONS: "US",
    MOVE_ORIGINATOR_AE_TITLE: "AE",
    MOVE_ORIGINATOR_MESSAGE_ID: "US",
}

_ELEMENT_HEADER = struct.Struct("<HHI")
_US = struct.Struct("<H")
_UL = struct.Struct("<I")


class CommandError(ValueError):
    """A command set that cannot be decoded (PS3.7 §9.3)."""


class Command(dict[int, Any]):
    """A decoded command set: tag → value (str for UI/AE/LO, int for US/UL, list[int] for AT)."""

    @property
    def field(self) -> int:
        value = self.get(COMMAND_FIELD)
        if not isinstance(value, int):
            raise CommandError("command set has no Command Field (0000,0100)")
        return value

    @property
    def name(self) -> str:
        return COMMAND_NAMES.get(
            self.get(COMMAND_FIELD, -1), f"command 0x{self.get(COMMAND_FIELD, 0):04X}"
        )

    @property
    def message_id(self) -> int | None:
        return self.get(MESSAGE_ID)

    @property
    def has_dataset(self) -> bool:
        return self.get(COMMAND_DATA_SET_TYPE, NO_DATASET) != NO_DATASET


def decode_command(data: bytes | bytearray | memoryview) -> Command:
    """Decode an Implicit VR Little Endian group 0000 command set."""
    command = Command()
    mv = memoryview(data)
    end = len(mv)
    offset = 0
    while offset < end:
        if offset + 8 > end:
            raise CommandError(f"command set truncated at byte {offset}")
        group, element, length = _ELEMENT_HEADER.unpack_from(mv, offset)
        offset += 8
        if group != 0x0000:
            raise CommandError(
                f"command set contains ({group:04X},{element:04X}) outside group 0000"
            )
        if length == 0xFFFFFFFF or offset + length > end:
            raise CommandError(
                f"command element (0000,{element:04X}) length {length} overruns the set"
            )
        value = mv[offset : offset + length]
        offset += length
        tag = element
        vr = COMMAND_VRS.get(tag)
        if vr == "US":
            if length < 2:
                raise CommandError(f"command element (0000,{element:04X}) US value too short")
            command[tag] = _US.unpack_from(value)[0]
        elif vr == "UL":
            if length < 4:
                raise CommandError(f"command element (0000,{element:04X}) UL value too short")
            command[tag] = _UL.unpack_from(value)[0]
        elif vr == "AT":
            tags = []
            for i in range(0, length - length % 4, 4):
                g, e = struct.unpack_from("<HH", value, i)
                tags.append((g << 16) | e)
            command[tag] = tags
        elif vr is not None:  # UI, AE, LO
            command[tag] = bytes(value).decode("ascii", "replace").rstrip("\x00 ").lstrip(" ")
        # Unknown (retired or future) command elements are ignored, as PS3.7 allows.
    if COMMAND_FIELD not in command:
        raise CommandError("command set has no Command Field (0000,0100)")
    return command


def _encode_value(tag: int, value: Any) -> bytes:
    vr = COMMAND_VRS[tag]
    if vr == "US":
        return _US.pack(value)
    if vr == "UL":
        return _UL.pack(value)
    if vr == "AT":
        return b"".join(struct.pack("<HH", t >> 16, t & 0xFFFF) for t in value)
    raw = str(value).encode("ascii", "replace")
    if vr == "UI":
        return raw + b"\x00" if len(raw) % 2 else raw
    if vr == "LO":
        raw = raw[:64]
    return raw + b" " if len(raw) % 2 else raw


def encode_command(fields: Iterable[tuple[int, Any]]) -> bytes:
    """Encode (tag, value) pairs as a command set with its (0000,0000) group length."""
    parts: list[bytes] = []
    for tag, value in sorted(fields, key=lambda item: item[0]):
        if value is None or tag == COMMAND_GROUP_LENGTH:
            continue
        encoded = _encode_value(tag, value)
        parts.append(_ELEMENT_HEADER.pack(0, tag, len(encoded)))
        parts.append(encoded)
    body = b"".join(parts)
    return _ELEMENT_HEADER.pack(0, 0, 4) + _UL.pack(len(body)) + body
