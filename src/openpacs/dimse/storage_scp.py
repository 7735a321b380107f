"""Verification SCP and Storage SCP: thin adapters from DIMSE messages to the archive.

Owns: C-ECHO (always success, seed 002 §3.2.9.4) and C-STORE request handling — opening the
archive's streaming sink when a C-STORE command arrives, and answering with the status and Error
Comment the archive decides. Must not: validate or file data sets itself.
"""

from __future__ import annotations

from openpacs.dimse import commands as cmd
from openpacs.dimse import status as st
from openpacs.dimse.association import (
    Association,
    DatasetSink,
    MemorySink,
    Message,
    PresentationContext,
)
from openpacs.services.archive import Archive, IncomingInstance


class VerificationService:
    def open_dataset(
        self, assoc: Association, context: PresentationContext, command: cmd.Command
    ) -> DatasetSink:
        return MemorySink(limit=1 << 16)

    def handle(self, assoc: Association, message: Message) -> None:
        assoc.send_response(message, st.SUCCESS)


class _Refused:
    """Sink for a C-STORE that is refused before its data arrives: drains and forgets the data."""

    def __init__(self, status: st.Status, comment: str) -> None:
        self.status = status
        self.comment = comment

    def write(self, data: memoryview) -> None:
        pass

    def close(self) -> None:
        pass

    def discard(self) -> None:
        pass


class StorageService:
    def __init__(self, archive: Archive) -> None:
        self.archive = archive

    def open_dataset(
        self, assoc: Association, context: PresentationContext, command: cmd.Command
    ) -> DatasetSink:
        sop_class = command.get(cmd.AFFECTED_SOP_CLASS_UID) or ""
        sop_instance = command.get(cmd.AFFECTED_SOP_INSTANCE_UID) or ""
        if sop_class != context.abstract_syntax:
            return _Refused(
                st.SOP_CLASS_NOT_SUPPORTED,
                "Affected SOP Class is not the context's abstract syntax",
            )
        if not sop_instance:
            return _Refused(
                st.STORE_REQUIRED_ELEMENT_MISSING,
                "Missing Affected SOP Instance UID (0000,1000)",
            )
        return self.archive.begin(
            sop_class, sop_instance, context.transfer_syntax, assoc.calling_ae
        )

    def handle(self, assoc: Association, message: Message) -> None:
        sink = message.dataset
        if isinstance(sink, _Refused):
            assoc.send_response(message, sink.status, sink.comment)
            return
        if not isinstance(sink, IncomingInstance):  # a C-STORE-RQ without a data set
            assoc.send_response(
                message, st.STORE_CANNOT_UNDERSTAND, "C-STORE request without a data set"
            )
            return
        result = self.archive.finish(sink)
        try:
            assoc.send_response(message, result.status, result.comment)
        finally:  # stored whether or not the response reaches the SCU
            self.archive.log_stored(result)
