"""The HL7 listener: ORU^R01 messages over MLLP, each stored before its ACK is sent.

A thin shell around :func:`service.outcomes.hl7_oru.receive`: the ``hl7`` package's
asyncio MLLP streams frame the messages, on an event loop of its own thread; the
ledger write (one transaction: the message, its ACK code and its outcomes) runs in
a worker thread, and only once it has committed is the ACK written. A message that
cannot be stored gets AR (the sender sends it again later), so an accepted message
is never lost. Nothing of a message's content is logged: it names a patient.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from hl7.mllp import InvalidBlockError, start_hl7_server
from hl7.mllp.streams import MLLPStreamReader, MLLPStreamWriter

from service.ledger import Ledger
from service.outcomes.hl7_oru import APPLICATION_ERROR, Received, ack, receive
from service.settings import Settings

LOG = logging.getLogger(__name__)


class MllpService:
    """The HL7 listener as one of the node's services; ``port`` is the bound port
    (the setting's, or the one the system chose for port 0 in tests)."""

    name = "hl7"

    def __init__(self, settings: Settings, ledger: Ledger, port: int | None = None) -> None:
        self.host, self.port = settings.hl7_host, settings.hl7_port if port is None else port
        self.limit = settings.hl7_max_message_kb << 10
        self.ledger = ledger
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None

    def start(self) -> None:
        started = threading.Event()
        failure: list[BaseException] = []

        async def serve() -> None:
            self._stop = asyncio.Event()
            try:
                server = await start_hl7_server(self._connection, self.host, self.port, limit=self.limit)
            except OSError as exc:
                failure.append(exc)
                started.set()
                return
            self.port = server.sockets[0].getsockname()[1]
            started.set()
            async with server:
                await self._stop.wait()

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(serve(),), name="hl7", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            self._thread.join()
            raise RuntimeError(f"the HL7 listener cannot listen on {self.host}:{self.port}: {failure[0]}")
        LOG.info("HL7 (MLLP) listener on %s:%d", self.host, self.port)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join()
            self._loop.close()
        self._loop = self._thread = self._stop = None

    async def _connection(self, reader: MLLPStreamReader, writer: MLLPStreamWriter) -> None:
        """Answer each message of one connection in turn, until the peer closes it."""
        try:
            while True:
                try:
                    block = await reader.readblock()
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                except (InvalidBlockError, ValueError) as exc:  # not MLLP framing, or over the size limit
                    LOG.warning("HL7 connection closed: %s", exc)
                    return
                reply = await self._answer(block.decode("utf-8", errors="replace"))
                writer.writeblock(reply.encode("utf-8"))
                await writer.drain()
        finally:
            writer.close()

    async def _answer(self, text: str) -> str:
        """The ACK to send for ``text``, once the message is stored."""
        received: Received = receive(text)
        try:
            await asyncio.to_thread(
                self.ledger.record_hl7_message,
                received.control_id,
                text,
                received.ack_code,
                received.error,
                received.outcomes,
            )
        except Exception:  # any storage failure: the sender must send the message again
            LOG.exception("HL7 message %s could not be stored; answered AR", received.control_id)
            return ack(
                received.message, "AR", APPLICATION_ERROR, "the node cannot store the message now: send it again later"
            )
        LOG.info(
            "HL7 message %s: %s%s",
            received.control_id,
            received.ack_code,
            f" ({len(received.outcomes)} outcomes)" if received.outcomes else f": {received.error}",
        )
        return received.ack
