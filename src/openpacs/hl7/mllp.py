"""The HL7 v2 listener: MLLP framing (python-hl7's asyncio streams) in a thread of the server.

Owns: accepting HIS/RIS connections on ``[hl7] host:port``, reading each MLLP block, handing
it to ``hl7.messages`` (parse → order events), applying the events through the worklist service
and answering: ACK AA only after the events are committed; AE/AR with an ERR segment naming the
field for a message that cannot be used — never a crash, never a silent drop. A peer silent
for ``[dicom] network_timeout`` is disconnected. Every message and every refusal is logged with
the peer's address.
Must not: map HL7 fields (``hl7.messages`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import re
import threading
from collections.abc import Callable

import hl7.mllp

from openpacs.dicom.uids import generate_uid
from openpacs.hl7 import messages
from openpacs.services.orders import OrderError
from openpacs.services.worklist import WorklistService

log = logging.getLogger(__name__)

MAX_MESSAGE = 4 << 20


class Hl7Listener:
    def __init__(
        self,
        worklist: WorklistService,
        host: str,
        port: int,
        idle_timeout: float = 60.0,
        today: Callable[[], dt.date] = dt.date.today,
        options: messages.MappingOptions | None = None,
    ) -> None:
        self.worklist = worklist
        self.options = options or messages.MappingOptions()
        self.host = host
        self.port = port
        self.idle_timeout = idle_timeout
        self.today = today
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="hl7", daemon=True)
        self.messages = 0

    def start(self) -> None:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        future.result(timeout=10)
        log.info("HL7 (MLLP) listener on %s:%d", self.host, self.port)

    async def _start(self) -> None:
        self._server = await hl7.mllp.start_hl7_server(
            self._client, self.host, self.port, limit=MAX_MESSAGE
        )

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._server.wait_closed(), 5)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _client(
        self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter
    ) -> None:
        peer = writer.get_extra_info("peername")
        where = f"{peer[0]}:{peer[1]}" if peer else "?"
        try:
            while True:
                try:
                    block = await asyncio.wait_for(reader.readblock(), self.idle_timeout)
                except TimeoutError:
                    log.info("HL7 peer %s idle for %g s; closed", where, self.idle_timeout)
                    return
                except asyncio.IncompleteReadError:
                    return  # the peer closed the connection
                except (hl7.mllp.InvalidBlockError, ValueError) as exc:
                    log.warning("HL7 peer %s sent an invalid MLLP block (%s); closed", where, exc)
                    return
                answer = await asyncio.get_running_loop().run_in_executor(
                    None, self._handle, bytes(block), where
                )
                writer.writeblock(answer)
                await writer.drain()
        except (ConnectionError, OSError) as exc:
            log.info("HL7 peer %s: connection lost (%s)", where, exc)
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def _handle(self, raw: bytes, where: str) -> bytes:
        """One message → its ACK (runs in a worker thread: the commit waits on the writer)."""
        self.messages += 1
        parsed = None
        try:
            parsed = messages.parse(raw)
            events = messages.to_events(
                parsed, today=self.today(), new_uid=generate_uid, options=self.options
            )
            done = self.worklist.apply(events, "hl7") if events else []
        except messages.HL7MappingError as exc:
            log.warning("HL7 %s from %s refused: %s", getattr(parsed, "type", "?"), where, exc)
            return messages.ack(parsed, raw, "AR" if parsed is None else exc.ack_code, exc)
        except OrderError as exc:
            # an event the worklist cannot apply (unknown order...): nothing was committed
            hl7_field = exc.field if re.fullmatch(r"[A-Z][A-Z0-9]{2}-\d+", exc.field) else ""
            text = exc.message if hl7_field else str(exc)
            error = messages.HL7MappingError(text, field=hl7_field, code=exc.code)
            kind = parsed.type if parsed else "?"
            log.warning("HL7 %s from %s not applied: %s", kind, where, exc)
            return messages.ack(parsed, raw, error.ack_code, error)
        except Exception as exc:
            log.exception("HL7 message from %s failed", where)
            error = messages.HL7MappingError(f"internal error: {exc}", field="", code="207")
            return messages.ack(parsed, raw, "AE", error)
        log.info(
            "HL7 %s %s from %s: %s",
            parsed.type,
            parsed.control_id,
            where,
            "; ".join(done) or "nothing to do",
        )
        return messages.ack(parsed, raw, "AA")
