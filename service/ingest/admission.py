"""Admission: which connections the receiver serves, and for how long.

A port scan, a load balancer's TCP health check or a peer that connects and says
nothing must not hold what the PACS needs. So, on both engines:

* a peer outside ``allowed_hosts`` is disconnected before anything it sends is read;
* a connection counts as *pending* until its association is established; pending
  connections have a budget of their own (``max_pending_associations``: when it is
  full, the one that has waited longest is closed) and a deadline
  (``acse_timeout_s``: one that has not associated by then is closed);
* ``max_associations`` counts established associations only, and one peer
  address may hold at most ``max_associations_per_peer`` of them (see
  :meth:`Gate.admit`, called from the ``EVT_REQUESTED`` handler);
* every accepted socket has a timeout (``dimse_timeout_s``), so a reader blocked
  on a PDU that never arrives in full gives up and the slot is freed;
* a TLS handshake runs in the connection's own thread, never in the one that
  accepts connections;
* on the stock engine (plain TCP), a PDU header announcing more than we take
  ends the connection before pynetdicom reads it (:class:`PduBoundedSocket`).

Every refusal is logged with the peer's address and the reason, and counted
(``sonocase_connections_refused_total``). Only socketserver's hooks (the server
class pynetdicom's ``make_server`` takes) and pynetdicom's public events are used.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import socket
import ssl
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer

from service.common.hosts import allowed_networks, host_allowed
from service.common.metrics import observe_refusal
from service.settings import Settings

LOG = logging.getLogger(__name__)

#: pynetdicom runs a full gc.collect() every 60th poll to free finished
#: associations; a collection stalls every association for tens of milliseconds,
#: so keep the cadence this gives at pynetdicom's 0.5 s poll, whatever our poll.
_COLLECT_EVERY_S = 30.0
#: Seconds between an aborted association and the collection that frees its memory
#: (its threads have ended by then).
_SETTLE_S = 0.5


def refused(peer: str, reason: str, why: str) -> None:
    """Log and count one refused, closed or aborted connection or association."""
    LOG.warning("refused %s: %s", peer, why, extra={"peer": peer, "reason": reason})
    observe_refusal(reason)


@dataclass(slots=True)
class Pending:
    """A connection whose association is not yet established."""

    sock: socket.socket
    peer: str
    since: float
    assoc: Association | None = None

    def ended(self) -> bool:
        """Whether the connection already ended: closed here (rejected), or by the
        peer (what a health check does), which leaves pynetdicom waiting for a
        request until ``acse_timeout_s``.

        Race-free and never blocking: a peek (``MSG_PEEK | MSG_DONTWAIT``) through a
        duplicate of the descriptor (the connection's own socket has a timeout, so
        Python would wait for it to become readable) finds the end of the stream,
        which stays; bytes the connection's thread took meanwhile cannot pass for it.
        """
        try:
            with socket.fromfd(self.sock.fileno(), self.sock.family, socket.SOCK_STREAM) as probe:
                return probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:  # nothing to read, and not the end: still open
            return False
        except (OSError, ValueError):  # reset by the peer, or closed meanwhile
            return True


class Gate:
    """The counts behind admission, without I/O; every method is thread-safe."""

    def __init__(
        self, max_pending: int, max_established: int, pending_deadline_s: float, max_per_peer: int | None = None
    ) -> None:
        self.max_pending = max_pending
        self.max_established = max_established
        self.max_per_peer = max_per_peer or max_established
        self.pending_deadline_s = pending_deadline_s
        self._pending: dict[int, Pending] = {}
        self._admitted: weakref.WeakKeyDictionary[Association, str] = weakref.WeakKeyDictionary()
        self._collect_at: float | None = None
        self._lock = threading.Lock()

    def add_pending(self, sock: socket.socket, peer: str, now: float) -> list[Pending]:
        """Count a new connection as pending; return those to close to make room
        for it, longest waiting first."""
        with self._lock:
            self._pending[id(sock)] = Pending(sock, peer, now)
            evicted = []
            while len(self._pending) > self.max_pending:
                oldest = min(self._pending.values(), key=lambda p: p.since)
                evicted.append(self._pending.pop(id(oldest.sock)))
            return evicted

    def attach(self, sock: socket.socket, assoc: Association) -> None:
        """The association pynetdicom made for a pending connection."""
        with self._lock:
            pending = self._pending.get(id(sock))
            if pending is not None and pending.sock is sock:
                pending.assoc = assoc

    def settle(self, sock: socket.socket) -> None:
        """A connection is no longer pending (associated, or ended)."""
        with self._lock:
            pending = self._pending.get(id(sock))
            if pending is not None and pending.sock is sock:
                del self._pending[id(sock)]

    def sweep(self, now: float) -> tuple[list[Pending], list[Pending]]:
        """Take out the pending connections past their deadline (to be closed) and
        those whose transport already ended (to be let go quietly)."""
        with self._lock:
            pending = list(self._pending.values())
        overdue = [p for p in pending if now - p.since > self.pending_deadline_s]
        ended = [p for p in pending if p not in overdue and p.ended()]
        with self._lock:
            taken = [p for p in overdue + ended if self._pending.get(id(p.sock)) is p]
            for p in taken:
                del self._pending[id(p.sock)]
        return [p for p in overdue if p in taken], [p for p in ended if p in taken]

    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)

    def request_collection(self, delay_s: float = _SETTLE_S) -> None:
        """Ask for a garbage collection soon: an aborted association left memory
        behind in reference cycles (see :meth:`collection_due`)."""
        with self._lock:
            self._collect_at = time.monotonic() + delay_s

    def collection_due(self, now: float) -> bool:
        """Whether a requested collection is due (once: asking again resets it)."""
        with self._lock:
            if self._collect_at is None or now < self._collect_at:
                return False
            self._collect_at = None
            return True

    def admit(self, assoc: Association, peer: str) -> str | None:
        """Give an association one of the ``max_associations`` slots, at most
        ``max_per_peer`` of them to one peer address, so that a few peers holding
        associations open cannot lock the PACS out; else the limit it met. A slot is
        free again the moment its association's thread ends."""
        with self._lock:
            running = [address for other, address in self._admitted.items() if other.is_alive()]
            if running.count(peer) >= self.max_per_peer:
                return f"{self.max_per_peer} associations from {peer} are established (max_associations_per_peer)"
            if len(running) >= self.max_established:
                return f"{self.max_established} associations are established (max_associations)"
            self._admitted[assoc] = peer
            return None


class PduBoundedSocket(socket.socket):
    """A connection that ends, as if the peer had closed it, at a PDU header
    announcing more than ``max_pdu`` bytes.

    For the stock engine: pynetdicom 3.0.4 reads whatever length a PDU header
    announces (up to 4 GiB, before any association), keeping it all in memory
    until a timeout ends the connection, and offers no setting against it. This
    follows the PDU framing in the bytes pynetdicom reads through ``recv`` (it
    never reads past a PDU's end), so a connection holds at most one PDU of
    ``max_pdu`` bytes. Not for TLS connections (the TLS layer reads the socket
    itself), nor for the fast engine (it bounds PDUs itself, reading with
    ``recv_into``).
    """

    max_pdu = 0
    _header = b""  # of the PDU being read, until it has its 6 bytes
    _left = 0  # bytes of the PDU being read still to come after its header

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        if flags & socket.MSG_PEEK:
            return data
        pos = 0
        while pos < len(data):
            if self._left:
                step = min(self._left, len(data) - pos)
                self._left -= step
                pos += step
                continue
            step = min(6 - len(self._header), len(data) - pos)
            self._header += data[pos : pos + step]
            pos += step
            if len(self._header) == 6:
                self._left, self._header = int.from_bytes(self._header[2:6], "big"), b""
                if self._left > self.max_pdu:
                    return self._end(self._left)
        return data

    def _end(self, announced: int) -> bytes:
        try:
            address = self.getpeername()
            socket.socket.shutdown(self, socket.SHUT_RDWR)
        except OSError:
            address = "a closed connection"
        peer = str(address[0]) if isinstance(address, tuple) else str(address)
        refused(
            peer, "pdu-too-large", f"a PDU announces {announced} bytes, more than {self.max_pdu}: connection closed"
        )
        return b""


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server behind a :class:`Gate` (see the module's text);
    with ``max_pdu``, each connection is a :class:`PduBoundedSocket`."""

    def __init__(self, *args: Any, settings: Settings, gate: Gate, max_pdu: int | None = None, **kwargs: Any) -> None:
        self.settings = settings
        self.networks = allowed_networks(settings.allowed_hosts)
        self.gate = gate
        self.max_pdu = max_pdu
        self._last_collect = time.monotonic()
        # socketserver listens with this backlog (its default, 5, turns a burst of
        # connections into SYN retries of a second or more)
        self.request_queue_size = settings.listen_backlog
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept; unlike pynetdicom's, give the socket a timeout, and leave the TLS
        handshake to the connection's thread (:meth:`process_request_thread`)."""
        assert self.socket is not None  # listening
        sock, address = self.socket.accept()
        if self.max_pdu is not None and not self.ssl_context:
            bounded = PduBoundedSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
            bounded.max_pdu = self.max_pdu
            sock = bounded
        sock.settimeout(self.settings.dimse_timeout_s)  # after: a socket made from a descriptor has none
        if self.ssl_context:
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if host_allowed(str(client_address[0]), self.networks):
            return True
        refused(str(client_address[0]), "host", "not in allowed_hosts; disconnected before reading")
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        for evicted in self.gate.add_pending(request, str(client_address[0]), time.monotonic()):
            self._close(
                evicted,
                "pending-full",
                "no association yet, and the pending budget "
                f"(max_pending_associations = {self.gate.max_pending}) is full: closed the longest waiting",
            )
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError; ValueError: closed meanwhile
                self.gate.settle(request)
                refused(str(client_address[0]), "tls", f"TLS handshake failed ({type(exc).__name__})")
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)

    def service_actions(self) -> None:
        """Each poll of the serving loop: close pending connections past their
        deadline, let go of those that ended, and collect garbage now and then."""
        now = time.monotonic()
        overdue, ended = self.gate.sweep(now)
        for pending in overdue:
            self._close(
                pending,
                "association-timeout",
                f"no association within acse_timeout_s = {self.settings.acse_timeout_s:g} s",
            )
        for pending in ended:
            self._stop(pending)
        if now - self._last_collect >= _COLLECT_EVERY_S or self.gate.collection_due(now):
            self._last_collect = now
            gc.collect()

    def _close(self, pending: Pending, reason: str, why: str) -> None:
        # socket.socket's shutdown even for TLS: SSLSocket.shutdown also drops its
        # SSL object under the thread that may be reading it
        with contextlib.suppress(OSError):  # closed meanwhile
            socket.socket.shutdown(pending.sock, socket.SHUT_RDWR)
        refused(pending.peer, reason, why)
        self._stop(pending)

    @staticmethod
    def _stop(pending: Pending) -> None:
        """Stop the connection's DUL thread: pynetdicom keeps it polling until the
        association's thread gives up waiting for a request (``acse_timeout_s``)."""
        if pending.assoc is not None:
            pending.assoc.dul.kill_dul()
