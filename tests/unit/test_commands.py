"""DIMSE command set codec against pynetdicom's encoder and pydicom's reader as oracles."""

from __future__ import annotations

import io

import pytest
from pydicom.filereader import read_dataset
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from openpacs.dimse import commands as cmd


def _pynetdicom_command_bytes(primitive: C_STORE, message_cls: type) -> bytes:
    message = message_cls()
    message.primitive_to_message(primitive)
    # encode_msg yields P-DATA fragments; the command set is the first PDV's data.
    pdvs = list(message.encode_msg(1, 16384))
    data = b""
    for pdata in pdvs:
        for _context_id, value in pdata.presentation_data_value_list:
            if value[0] & 0x01:  # message control header: command fragment
                data += value[1:]
    return data


def test_decode_pynetdicom_c_store_rq() -> None:
    primitive = C_STORE()
    primitive.MessageID = 7
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    primitive.AffectedSOPInstanceUID = "1.2.3.4.5"
    primitive.Priority = 0x0002
    primitive.MoveOriginatorApplicationEntityTitle = "MOVER"
    primitive.MoveOriginatorMessageID = 3
    primitive.DataSet = io.BytesIO(b"\x00" * 4)
    raw = _pynetdicom_command_bytes(primitive, C_STORE_RQ)
    decoded = cmd.decode_command(raw)
    assert decoded.field == cmd.C_STORE_RQ
    assert decoded.message_id == 7
    assert decoded[cmd.AFFECTED_SOP_CLASS_UID] == "1.2.840.10008.5.1.4.1.1.2"
    assert decoded[cmd.AFFECTED_SOP_INSTANCE_UID] == "1.2.3.4.5"
    assert decoded[cmd.PRIORITY] == 2
    assert decoded[cmd.MOVE_ORIGINATOR_AE_TITLE] == "MOVER"
    assert decoded[cmd.MOVE_ORIGINATOR_MESSAGE_ID] == 3
    assert decoded.has_dataset


def test_encoded_response_reads_back_with_pydicom() -> None:
    raw = cmd.encode_command(
        [
            (cmd.COMMAND_FIELD, cmd.C_STORE_RSP),
            (cmd.MESSAGE_ID_BEING_RESPONDED_TO, 9),
            (cmd.STATUS, 0xC00B),
            (cmd.AFFECTED_SOP_CLASS_UID, "1.2.840.10008.5.1.4.1.1.2"),
            (cmd.AFFECTED_SOP_INSTANCE_UID, "1.2.3"),
            (cmd.ERROR_COMMENT, "odd"),  # odd length: padded with a space
            (cmd.OFFENDING_ELEMENT, [0x0020000D, 0x00080018]),
            (cmd.COMMAND_DATA_SET_TYPE, cmd.NO_DATASET),
        ]
    )
    ds = read_dataset(io.BytesIO(raw), is_implicit_VR=True, is_little_endian=True)
    assert ds.CommandGroupLength == len(raw) - 12
    assert ds.CommandField == 0x8001
    assert ds.MessageIDBeingRespondedTo == 9
    assert ds.Status == 0xC00B
    assert ds.AffectedSOPInstanceUID == "1.2.3"
    assert ds.ErrorComment == "odd"
    assert list(ds.OffendingElement) == [0x0020000D, 0x00080018]
    assert ds.CommandDataSetType == 0x0101
    assert len(raw) % 2 == 0
    # and pynetdicom understands it as a C-STORE-RSP
    message = C_STORE_RSP()
    message.command_set = ds
    assert message.message_to_primitive().Status == 0xC00B


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\x00\x00\x01\x04\x00",  # truncated element header
        b"\x00\x00\x00\x01\x04\x00\x00\x00\x01\x00",  # value overruns
        b"\x08\x00\x18\x00\x02\x00\x00\x001\x00",  # group 0008 inside a command set
        b"",  # no Command Field
    ],
)
def test_bad_command_sets_raise(raw: bytes) -> None:
    with pytest.raises(cmd.CommandError):
        cmd.decode_command(raw)
