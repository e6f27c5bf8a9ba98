"""The fast receiver engine: pynetdicom 3.0.4 with its receive path overridden.

Every override of pynetdicom's internals lives in this module, each documented
where it is made. They exist because pynetdicom's own path cost about twice the
CPU per instance (see the README's ingest figures). They are written for exactly
one pynetdicom version (:data:`PYNETDICOM_VERSION`): :func:`unsupported_reason`
says why another cannot take them, and :mod:`service.ingest.server` then runs the
stock engine, plain pynetdicom, instead.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from io import BytesIO
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import _PDU_TYPES, DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

from service.common.metrics import observe_cstore
from service.ingest.admission import GuardedServer, refused
from service.ingest.rules import (
    PDU_MARGIN,
    InvalidInstance,
    StoreStatus,
    error_comment,
    pad,
    too_large,
)
from service.ingest.store import IncomingFile, StoreSCP

LOG = logging.getLogger(__name__)

#: The pynetdicom release these overrides were written against and tested with.
PYNETDICOM_VERSION = "3.0.4"


def unsupported_reason() -> str | None:
    """Why the fast engine cannot run on the installed pynetdicom (None: it can)."""
    installed = pynetdicom.__version__
    if installed != PYNETDICOM_VERSION:
        return (
            f"pynetdicom {installed} is installed; the fast engine overrides internals of "
            f"pynetdicom {PYNETDICOM_VERSION} only"
        )
    return None


def _command_element(element: int, value: bytes) -> bytes:
    """One element of the command group (0000,eeee), implicit VR little endian."""
    return struct.pack("<HHI", 0, element, len(value)) + value


_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101


def encode_store_response(
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    status: int,
    comment: str = "",
) -> bytes:
    """The command set of a C-STORE-RSP (PS3.7 9.3.1.2), implicit VR little endian as
    every command set (PS3.7 6.3.1), with an Error Comment when there is one.

    Encoded directly: pynetdicom's response primitive and its encoding through pydicom
    validate each UID with three regular expressions, a sixth of a C-STORE's CPU.
    """
    body = b"".join(
        (
            _command_element(0x0002, pad(sop_class_uid, b"\0")),
            _command_element(0x0100, struct.pack("<H", _C_STORE_RSP)),
            _command_element(0x0120, struct.pack("<H", message_id)),
            _command_element(0x0800, struct.pack("<H", _NO_DATA_SET)),
            _command_element(0x0900, struct.pack("<H", status)),
            # LO: 64 characters at most, from the default character repertoire
            _command_element(0x0902, pad(error_comment(comment), b" ")) if comment else b"",
            _command_element(0x1000, pad(sop_instance_uid, b"\0")),
        )
    )
    return _command_element(0x0000, struct.pack("<I", len(body))) + body


class SpoolingBuffer(BytesIO):
    """The buffer pynetdicom collects a DIMSE message's data set fragments in, which
    also writes each C-STORE fragment to an :class:`IncomingFile` as it arrives,
    and holds the data set within the store's limits.

    It runs in the association's DUL thread, which otherwise waits for the network.
    Spooling is an optimisation only: if it fails (say the disk is full) the file is
    dropped and the C-STORE handler writes the data set itself, and reports the
    error that write meets. The bytes it holds are taken from the store's
    :class:`~service.ingest.store.MemoryBudget`; a data set beyond
    ``max_dataset_mb``, or beyond what the budget has left, is dropped as it
    arrives, and its C-STORE answered with :attr:`refusal` once it is complete.
    A data set that began earlier may preempt it (:meth:`preempt`, from that data
    set's thread) until it is complete and :meth:`claim`-ed: so one of several
    large data sets arriving together always gets through.
    """

    def __init__(self, message: DIMSEMessage, assoc: Association, store: StoreSCP) -> None:
        super().__init__()
        self._message = message
        self._assoc = assoc
        self._store = store
        self._spooling = True
        self._lock = threading.RLock()  # this thread's writes against another's preempt()
        self.incoming: IncomingFile | None = None
        self.refusal: InvalidInstance | None = None

    def write(self, data: Any) -> int:
        with self._lock:
            if self.refusal is not None:
                return len(data)
            self.refusal = self._hold(len(data))
            if self.refusal is not None:
                self.discard()
                return len(data)
            if self._spooling:
                try:
                    self._spool(data)
                except Exception:
                    LOG.debug("spooling a data set while it arrives failed; the handler writes it", exc_info=True)
                    self._stop_spooling()
            return super().write(data)

    def _hold(self, size: int) -> InvalidInstance | None:
        budget = self._store.budget
        refusal = too_large(budget.held(self) + size, self._store.max_dataset)
        if refusal is None and not budget.take(self, size, self.preempt):
            refusal = InvalidInstance(
                StoreStatus.OUT_OF_RESOURCES, f"data sets in flight fill max_in_flight_mb ({budget.limit >> 20} MB)"
            )
        return refusal

    def preempt(self) -> None:
        """Drop the data set for one that began earlier (the budget already let go
        of its bytes); its C-STORE is answered 0xA700, and the peer's resend comes
        after the earlier one."""
        with self._lock:
            if self.refusal is None:
                self.refusal = InvalidInstance(
                    StoreStatus.OUT_OF_RESOURCES,
                    "made room in max_in_flight_mb for a data set that began earlier: send it again",
                )
            self.discard()

    def claim(self) -> InvalidInstance | None:
        """The complete data set is about to be served: no preemption from now on.
        Its refusal, if it was dropped meanwhile."""
        with self._lock:
            if not self._store.budget.pin(self) and self.refusal is None:
                self.preempt()
            return self.refusal

    def _spool(self, data: bytes) -> None:
        if self.incoming is None:
            message = self._message
            if not isinstance(message, C_STORE_RQ):
                self._spooling = False
                return
            command, assoc = message.command_set, self._assoc
            self.incoming = self._store.open_incoming(
                str(command.AffectedSOPClassUID),
                str(command.AffectedSOPInstanceUID),
                assoc._accepted_cx[message.context_id].transfer_syntax[0],
                assoc.requestor.ae_title,
            )
        self.incoming.append(data)

    def _stop_spooling(self) -> None:
        """Stop spooling and remove what was spooled (unless the store kept it)."""
        self._spooling = False
        if self.incoming is not None:
            self.incoming.close()
            self.incoming = None

    def discard(self) -> None:
        """Done with the data set: stop spooling, drop the bytes held, give them
        back to the budget."""
        with self._lock:
            self._stop_spooling()
            self.seek(0)
            self.truncate()
            self._store.budget.release(self)


class RequestQueue(queue.Queue[tuple[int, Any]]):
    """The queue of complete DIMSE requests from the DUL thread to the association's
    reactor, except that C-STORE requests are served on the spot.

    Replaces pynetdicom 3.0.4's ``DIMSEServiceProvider.msg_queue``. A C-STORE is
    served in the DUL thread that decoded it (the peer waits for the response in
    any case) with a hand-encoded response (:func:`serve_store`): pynetdicom's hand-off
    to the reactor thread and back, its storage service class and its response
    primitive cost about a millisecond per instance. Everything else, C-ECHO
    included, is queued for the reactor as before.
    """

    def __init__(self, assoc: ReceiverAssociation) -> None:
        super().__init__()
        self._assoc = assoc

    def put(self, item: tuple[int, Any], block: bool = True, timeout: float | None = None) -> None:
        context_id, msg = item
        if not self._assoc.serve_at_once(msg, context_id):
            super().put(item, block, timeout)


#: The longest command set we read (PS3.7 9.3: a C-STORE-RQ's is under 300 bytes);
#: a peer sending more, fragment after fragment, is aborted.
MAX_COMMAND_BYTES = 64 << 10


class ReceiverDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, collecting each message's data set in a
    :class:`SpoolingBuffer` (pynetdicom 3.0.4 makes a plain ``BytesIO`` in
    ``DIMSEMessage.__init__``) and aborting a command set past
    :data:`MAX_COMMAND_BYTES`, which pynetdicom would collect without end;
    ``receive_primitive`` is otherwise unchanged."""

    def receive_primitive(self, primitive: P_DATA) -> None:
        if self.message is None:
            assert self.assoc._server is not None  # an acceptor: our server made it
            self.message = DIMSEMessage()
            self.message.data_set = SpoolingBuffer(self.message, self.assoc, self.assoc._server.store)
        super().receive_primitive(primitive)
        message = self.message
        if message is not None and message.encoded_command_set.tell() > MAX_COMMAND_BYTES:
            refused(
                self.assoc.requestor.address,
                "command-too-large",
                f"association aborted: a command set longer than {MAX_COMMAND_BYTES} bytes",
            )
            if isinstance(message.data_set, SpoolingBuffer):
                message.data_set.discard()
            self.message = None
            self.assoc.dul.event_queue.put(_INVALID_PDU)  # the state machine sends the A-ABORT

    def discard_unhandled(self) -> None:
        """Drop the files of messages no handler will see: the one the peer never
        finished and those still queued when the association ended."""
        buffers = [self.message.data_set] if self.message is not None else []
        while True:
            try:
                _, primitive = self.msg_queue.get_nowait()
            except queue.Empty:
                break
            buffers.append(getattr(primitive, "DataSet", None))
        for buffer in buffers:
            if isinstance(buffer, SpoolingBuffer):
                buffer.discard()


def serve_store(scp: StoreSCP, request: C_STORE, context_id: int, transfer_syntax: str, calling_ae: str) -> P_DATA:
    """Store one C-STORE request's data set, or refuse the one its buffer dropped;
    return the response to send."""
    buffer = request.DataSet
    spooling = buffer if isinstance(buffer, SpoolingBuffer) else None
    refusal = spooling.claim() if spooling is not None else None
    try:
        if refusal is not None:
            outcome = scp.refuse(refusal, calling_ae)
        else:
            outcome = scp.store(
                buffer.getvalue() if buffer is not None else b"",
                transfer_syntax,
                str(request.AffectedSOPClassUID),
                str(request.AffectedSOPInstanceUID),
                calling_ae,
                spooling.incoming if spooling is not None else None,
            )
    finally:
        if spooling is not None:
            spooling.discard()
    observe_cstore(outcome.status)
    command = encode_store_response(
        int(request.MessageID or 0),
        str(request.AffectedSOPClassUID),
        str(request.AffectedSOPInstanceUID),
        int(outcome.status),
        outcome.comment if outcome.status != StoreStatus.SUCCESS else "",
    )
    response = P_DATA()
    response.presentation_data_value_list.append((context_id, b"\x03" + command))  # last command fragment
    return response


#: The longest an association's DUL thread waits in select() for the peer, or for a
#: PDU of ours to send, before it looks at its timers and its stop flag again (the
#: same cadence as pynetdicom's idle sleep).
_DUL_WAIT_S = 0.001
#: How often an association's reactor checks for a release, an abort or the network
#: timeout while it waits for a DIMSE message (pynetdicom's cadence).
_REACTOR_CHECK_S = 0.001


class ReceiverSocket(AssociationSocket):
    """pynetdicom's association socket, receiving a PDU straight into one buffer
    that grows as the bytes arrive, within a deadline.

    Stands in for pynetdicom 3.0.4's ``AssociationSocket.recv`` (see
    :meth:`ReceiverDUL._read_pdu_data`), which reads in 4 KiB pieces and appends
    each to a growing bytearray: about 250 calls and copies for a 1 MiB P-DATA PDU,
    a tenth of the CPU a C-STORE of a 0.9 MB image costs. Its buffer takes the
    first 64 KiB of a PDU, and room for the rest (at most the negotiated length plus
    a margin: :meth:`ReceiverDUL._read_pdu_data`) only once they have come, so what
    a PDU announces costs little until it arrives.
    """

    def read_into(self, buffer: bytearray, nr_bytes: int, deadline: float) -> None:
        """Append ``nr_bytes`` from the socket to ``buffer``; fewer only when the peer
        closed the connection. TimeoutError when they have not all come by
        ``deadline`` (``time.monotonic()``)."""
        sock = self.socket
        assert sock is not None  # the DUL reads only a connected socket
        filled = len(buffer)
        end = filled + nr_bytes
        while filled < end:
            if filled == len(buffer):
                buffer += bytes(min(end - filled, _FIRST_PIECE) if filled < _FIRST_PIECE else end - filled)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the PDU did not arrive in full in time")
            # The socket's own timeout bounds each read (see GuardedServer.get_request);
            # it is set again (a system call) only where the deadline is nearer.
            timeout = sock.gettimeout()
            if timeout is None or remaining < timeout - _DEADLINE_SLACK_S:
                sock.settimeout(remaining)
            try:
                got = sock.recv_into(memoryview(buffer)[filled:])
            except TimeoutError:
                if time.monotonic() < deadline:  # a timeout shortened for an earlier PDU
                    sock.settimeout(deadline - time.monotonic())
                    continue
                raise
            if not got:
                break
            filled += got
        del buffer[filled:]


#: How far past its deadline a PDU's read may wait, to spare a system call per read.
_DEADLINE_SLACK_S = 1.0
#: A PDU buffer holds this much until that much has arrived.
_FIRST_PIECE = 64 << 10


class ReceiverDUL(DULServiceProvider):
    """pynetdicom's DUL thread, waiting on the network instead of sleeping.

    Overrides pynetdicom 3.0.4's idle sleep (``_run_loop_delay``, 1 ms after every
    loop that found nothing to do, before a zero-timeout select): each PDU of the
    peer's waited half a millisecond on average, and each response of ours as long,
    and a shorter sleep costs a core per association. Here the loop does not sleep;
    when there is nothing to read, :meth:`_is_transport_event` blocks in select() on
    the socket and on a wake-up socket that :meth:`send_pdu` writes to, so either is
    handled the moment it comes.
    """

    _wake: tuple[socket.socket, socket.socket] | None = None  # pynetdicom builds the object: no __init__ of ours

    def run(self) -> None:
        """The thread's body (pynetdicom's ``run_reactor``), with the wake-up socket
        open for exactly as long as it runs."""
        self._run_loop_delay = 0.0  # pynetdicom sets it per object
        self._wake = socket.socketpair()
        for end in self._wake:
            end.setblocking(False)
        try:
            super().run()
        finally:
            wake, self._wake = self._wake, None
            for end in wake:
                end.close()

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        wake = self._wake
        if wake is not None:
            # full (a wake-up is pending anyway) or closed (the loop has ended)
            with contextlib.suppress(OSError):
                wake[1].send(b"\0")

    def _is_transport_event(self) -> bool:
        if super()._is_transport_event():
            return True
        self._wait_for_network()
        return False

    def _decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        """Decode a P-DATA-TF PDU over a view of the received bytes.

        Overrides pynetdicom 3.0.4's ``_decode_pdu``, which copies each PDU three
        times before the DIMSE layer sees it (``bytes()`` of it, its body, each
        fragment). Over a memoryview the data set is copied once, into its
        message's buffer. Other PDUs, and every PDU while a handler watches raw
        PDUs (DEBUG logging), go through the original.
        """
        if bytestream[:1] != _P_DATA_TF or any(self.assoc.get_handlers(e) for e in _RAW_PDU_EVENTS):
            return super()._decode_pdu(bytestream)
        pdu = P_DATA_TF()
        pdu.decode(memoryview(bytestream))
        return pdu, _P_DATA_TF_RECEIVED

    def _read_pdu_data(self) -> None:
        """Read one PDU, within bounds.

        Overrides pynetdicom 3.0.4's ``_read_pdu_data``, which allocates at once a
        buffer of whatever length a PDU header announces (up to 4 GiB, before any
        association) and waits for it with no deadline. Here a PDU longer than the
        maximum length we negotiated plus :data:`PDU_MARGIN` is refused (Evt19: the
        state machine answers an A-ABORT), one that has not arrived in full within
        ``dimse_timeout_s`` ends the connection (Evt17), and the buffer grows with
        the bytes that come (:meth:`ReceiverSocket.read_into`). Otherwise as the
        original: the same events for the same outcomes, in the same order.
        """
        transport = self.socket
        assert isinstance(transport, ReceiverSocket)
        peer = self.assoc.requestor.address
        pdu = bytearray()
        try:
            transport.read_into(pdu, 6, time.monotonic() + self._pdu_timeout())
            if len(pdu) < 6:
                self.event_queue.put(_CONNECTION_CLOSED)
                return
            pdu_type, _, length = struct.unpack_from(">BBL", pdu)
            if bytes(pdu[:1]) not in _PDU_TYPES:
                refused(peer, "pdu-invalid", f"unknown PDU type 0x{pdu_type:02X}: A-ABORT")
                self.event_queue.put(_INVALID_PDU)
                return
            limit = (self.assoc.acceptor.maximum_length or 0) + PDU_MARGIN
            if length > limit:
                refused(peer, "pdu-too-large", f"a PDU announces {length} bytes, more than {limit}: A-ABORT")
                self.event_queue.put(_INVALID_PDU)
                return
            transport.read_into(pdu, length, time.monotonic() + self._pdu_timeout())
        except TimeoutError:
            refused(
                peer,
                "pdu-timeout",
                f"a PDU did not arrive in full within dimse_timeout_s ({self._pdu_timeout():g} s): connection closed",
            )
            self.event_queue.put(_CONNECTION_CLOSED)
            return
        except OSError:
            self.event_queue.put(_CONNECTION_CLOSED)
            return
        if len(pdu) != 6 + length:
            LOG.debug("connection from %s closed in the middle of a PDU", peer)
            self.event_queue.put(_CONNECTION_CLOSED)
            return
        try:
            decoded, event = self._decode_pdu(pdu)
        except Exception:  # noqa: BLE001 - whatever a hostile PDU breaks, the peer is refused
            refused(peer, "pdu-invalid", "a PDU does not decode: A-ABORT")
            self.event_queue.put(_INVALID_PDU)
            return
        self.event_queue.put(event)
        self._recv_pdu.put(decoded)

    def _pdu_timeout(self) -> float:
        """``dimse_timeout_s``: how long one PDU may take to arrive."""
        return float(self.assoc.dimse_timeout or _NO_TIMEOUT_S)

    def _wait_for_network(self) -> None:
        """Block until the peer sent something, we have a PDU to send, or _DUL_WAIT_S."""
        transport, wake = self.socket, self._wake
        sock = transport.socket if transport is not None and transport._is_connected else None
        if sock is None or wake is None:
            time.sleep(_DUL_WAIT_S)
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted data select() cannot see
        try:
            ready, _, _ = select.select([sock, wake[0]], [], [], _DUL_WAIT_S)
        except (OSError, ValueError):  # closed meanwhile: the next look reports it
            return
        if wake[0] in ready:
            with contextlib.suppress(OSError):
                wake[0].recv(4096)


_P_DATA_TF = b"\x04"
#: The states in which a P-DATA request primitive (Evt9) is acted on (PS3.8 Table
#: 9-10): data transfer, and awaiting our own A-RELEASE response.
_SENDS_P_DATA = ("Sta6", "Sta8")
#: The state machine's events (PS3.8 Table 9-10): P-DATA-TF PDU received, transport
#: connection closed, invalid or unrecognised PDU received.
_P_DATA_TF_RECEIVED = "Evt10"
_CONNECTION_CLOSED = "Evt17"
_INVALID_PDU = "Evt19"
#: A PDU's deadline where pynetdicom has no DIMSE timeout (we always set one).
_NO_TIMEOUT_S = 3600.0
_RAW_PDU_EVENTS = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV)


class ReceiverAssociation(Association):
    """pynetdicom's acceptor association, picking up each DIMSE message at once.

    Overrides pynetdicom 3.0.4's ``Association._run_reactor``, which sleeps 1 ms
    before every look at the message queue, so a complete C-STORE request waited
    half a millisecond on average before its handler ran. This loop waits on the
    queue itself, with the same 1 ms cadence for everything else it checks; the
    checks and their order are pynetdicom's. C-STORE requests never reach it: see
    :class:`RequestQueue`.
    """

    def _run_reactor(self) -> None:
        try:
            self._react()
        finally:  # the DUL has stopped: nothing writes to a spooled file any more
            if isinstance(self.dimse, ReceiverDIMSE):
                self.dimse.discard_unhandled()

    def _react(self) -> None:
        self._is_paused = False
        while not self._kill:
            # pynetdicom's send_*() methods pause the reactor at this checkpoint
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            try:
                context_id, msg = self.dimse.msg_queue.get(timeout=_REACTOR_CHECK_S)
            except queue.Empty:
                context_id, msg = None, None
            if msg is not None:
                self._serve_request(msg, context_id)
                buffer = getattr(msg, "DataSet", None)
                if isinstance(buffer, SpoolingBuffer):  # served by pynetdicom's path: done with it
                    buffer.discard()
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                LOG.info("association from %s released", self.requestor.ae_title)
                self.is_released, self.is_established = True, False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                LOG.info("association from %s aborted", self.requestor.ae_title)
                self.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV fires
                self.is_aborted, self.is_established = True, False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                LOG.warning("network timeout: no PDU from %s for %s s", self.requestor.ae_title, self.network_timeout)
                self._end_idle_association()
                self.kill()
                return

    def serve_at_once(self, msg: Any, context_id: int) -> bool:
        """Serve a C-STORE request with :func:`serve_store`, in the calling thread;
        False for anything pynetdicom's ``_serve_request`` must serve (another
        request, or one it refuses: during release, invalid, unknown context). A
        data set its buffer refused is answered here whatever handler is bound: no
        handler must see a data set with bytes dropped."""
        context = self._accepted_cx.get(context_id)
        if type(msg) is not C_STORE or context is None or self._sent_release or not msg.is_valid_request:
            return False
        server = self._server
        assert isinstance(server, ReceiverServer)  # an acceptor: our server made it
        refused_data_set = isinstance(msg.DataSet, SpoolingBuffer) and msg.DataSet.claim() is not None
        if self.get_handlers(evt.EVT_C_STORE)[0] is not server.store_handler and not refused_data_set:
            return False  # someone bound their own handler: pynetdicom's path calls it
        response = serve_store(server.store, msg, context_id, context.transfer_syntax[0], self.requestor.ae_title)
        # Not ``is_established``: pynetdicom sets it only after it sent the A-ASSOCIATE-AC
        # and ran the EVT_ACCEPTED handlers, so a quick peer's first C-STORE can be
        # served before; its response must still go. Sent in the states where the
        # state machine takes a P-DATA request (not once the peer aborted).
        if self.dul.state_machine.current_state in _SENDS_P_DATA:
            self.dul.send_pdu(response)
        return True

    def _end_idle_association(self) -> None:
        if self.network_timeout_response == "A-RELEASE":
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self.release()
            self._is_paused = False
        else:
            self.abort()


class ReceiverRequestHandler(RequestHandler):
    """Makes each incoming association one of ours: :class:`ReceiverAssociation`,
    :class:`ReceiverDUL`, :class:`ReceiverSocket`, :class:`ReceiverDIMSE` with a
    :class:`RequestQueue`."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # pynetdicom builds all three itself; ours differ in methods only, so the
        # objects are kept and given our classes.
        assoc.__class__ = ReceiverAssociation
        assoc.dul.__class__ = ReceiverDUL
        assoc.dul.socket.__class__ = ReceiverSocket
        assoc.dimse.__class__ = ReceiverDIMSE
        assoc.dimse.msg_queue = RequestQueue(assoc)
        return assoc


class ReceiverServer(GuardedServer):
    """The guarded server (:mod:`service.ingest.admission`), making its associations
    ours (:class:`ReceiverRequestHandler`) and holding the store they serve C-STORE
    requests with, and ``store_handler``, the ``EVT_C_STORE`` handler that
    serving stands in for."""

    def __init__(self, *args: Any, store: StoreSCP, store_handler: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(*args, request_handler=ReceiverRequestHandler, **kwargs)
        self.store = store
        self.store_handler = store_handler
