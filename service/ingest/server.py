"""The DICOM receiver: the C-STORE listener the PACS pushes ultrasound studies to.

The rules (:mod:`service.ingest.rules`) and the store (:mod:`service.ingest.store`)
do the work; here they are put on the network with one of two engines (setting
``receiver_engine``): ``stock``, plain pynetdicom with an ``EVT_C_STORE`` handler,
or ``fast``, the same store behind the overrides of :mod:`service.ingest.fast`. Both
answer Success only after the received bytes are on disk exactly as they came and
recorded in the ledger; bad input gets a failure status that says why, and a log
line; nothing a peer sends can stop the server.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import struct
import threading
import weakref
from functools import partial
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification

from service.common import dicom_tls
from service.common.metrics import observe_cstore
from service.ingest.admission import Gate, GuardedServer, refused
from service.ingest.rules import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    LOCAL_LIMIT_EXCEEDED,
    MAX_PDU_BYTES,
    PDU_MARGIN,
    REJECTED_PERMANENT,
    REJECTED_TRANSIENT,
    SOURCE_PROVIDER_PRESENTATION,
    SOURCE_SERVICE_USER,
    STORAGE_SOP_CLASSES,
    TRANSFER_SYNTAXES,
    StoreStatus,
    check_association,
    error_comment,
)
from service.ingest.store import StoreSCP
from service.ledger import Ledger
from service.settings import Settings

LOG = logging.getLogger(__name__)

#: pynetdicom's own association limit counts every connection's thread, associated
#: or not: set out of the way, the gate counts (service.ingest.admission).
_LIBRARY_LIMIT_OFF = 1 << 30

#: How often the server looks for a stop request (pynetdicom's default: 0.5 s), so
#: the node, and every test, stops promptly.
_POLL_S = 0.1
_PER_MESSAGE_LOG_EVENTS = (evt.EVT_PDU_RECV, evt.EVT_PDU_SENT, evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT)


def handle_store(event: Event, store: StoreSCP) -> Dataset:
    """``EVT_C_STORE``: hand the peer's encoded data set to the store and answer its
    outcome, with an Error Comment saying why when it is not Success.

    The stock engine calls it for every C-STORE; the fast engine does the same work
    without pynetdicom's storage service class, and only while this handler is
    the one bound (:meth:`service.ingest.fast.ReceiverAssociation.serve_at_once`):
    bind another to ``EVT_C_STORE`` and both engines call that one instead.
    """
    request = event.request
    store.budget.pin(event.assoc)  # the stock engine's data set is complete: no preemption now (StockDataGuard)
    outcome = store.store(
        event.encoded_dataset(include_meta=False),
        event.context.transfer_syntax,
        str(request.AffectedSOPClassUID),
        str(request.AffectedSOPInstanceUID),
        event.assoc.requestor.ae_title,
    )
    observe_cstore(outcome.status)
    store.budget.release(event.assoc)  # the stock engine's hold on the data set (StockDataGuard)
    status = Dataset()
    status.Status = int(outcome.status)
    if outcome.status != StoreStatus.SUCCESS and outcome.comment:
        status.ErrorComment = error_comment(outcome.comment)
    return status


def _on_echo(event: Event, store: StoreSCP) -> int:
    store.budget.release(event.assoc)
    return int(StoreStatus.SUCCESS)


def _on_requested(event: Event, settings: Settings, gate: Gate) -> None:
    """``EVT_REQUESTED``: reject a caller the rules refuse, or one beyond
    ``max_associations``; otherwise pynetdicom accepts it."""
    assoc = event.assoc
    request = assoc.requestor.primitive
    calling_ae = request.calling_ae_title
    peer = f"{calling_ae} at {assoc.requestor.address}"
    rejection = check_association(calling_ae, request.called_ae_title, settings)
    if rejection is not None:
        refused(peer, "caller", f"association rejected: {rejection.why}")
        _reject(assoc, REJECTED_PERMANENT, SOURCE_SERVICE_USER, rejection.reason)
    elif (limit := gate.admit(assoc, assoc.requestor.address)) is not None:
        refused(peer, "association-limit", f"association rejected: {limit}")
        _reject(assoc, REJECTED_TRANSIENT, SOURCE_PROVIDER_PRESENTATION, LOCAL_LIMIT_EXCEEDED)
    else:
        LOG.info("association from %s accepted", peer, extra={"calling_ae": calling_ae})


def _reject(assoc: Any, result: int, source: int, reason: int) -> None:
    # As pynetdicom's own rejections do: kill() waits until the A-ASSOCIATE-RJ is
    # sent and the peer has closed, before the server closes the socket.
    assoc.acse.send_reject(result, source, reason)
    assoc.kill()


def _on_connection(event: Event, gate: Gate) -> None:
    """``EVT_CONN_OPEN``: the gate learns which association a pending connection has."""
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        gate.attach(sock, event.assoc)


def _on_established(event: Event, gate: Gate) -> None:
    """``EVT_ESTABLISHED``: the connection no longer counts as pending."""
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        gate.settle(sock)


#: An A-ABORT PDU (PS3.8 9.3.8), source: DICOM UL service-user, reason not given.
_A_ABORT = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0, 0)


class StockDataGuard:
    """The stock engine's bound on data sets in memory.

    pynetdicom collects a DIMSE message whole, in memory, before any handler sees
    it; so this counts the P-DATA bytes each association sends (``EVT_DATA_RECV``,
    released when its message is handled or its connection closes) against
    ``max_dataset_mb`` and the store's :class:`~service.ingest.store.MemoryBudget`,
    and beyond either sends an A-ABORT and closes the connection: unlike the fast
    engine, it cannot answer a status there. An association whose data set began
    later is aborted the same way when the budget makes room for an earlier one
    (see :class:`~service.ingest.store.MemoryBudget`). What an aborted association
    held is freed by the garbage collection the gate runs soon after.
    """

    def __init__(self, store: StoreSCP, gate: Gate) -> None:
        self.store = store
        self.gate = gate
        #: Aborted, and ending: what they still send is not counted again (nor aborted twice).
        self._aborted: weakref.WeakSet[Association] = weakref.WeakSet()

    def on_data(self, event: Event) -> None:
        data = event.data
        if data[:1] != b"\x04" or event.assoc in self._aborted:  # P-DATA-TF: the rest is small, bounded by pynetdicom
            return
        assoc, size = event.assoc, len(data) - 6
        budget = self.store.budget
        if budget.held(assoc) + size > self.store.max_dataset:
            self.abort(assoc, "too-large", f"data set larger than max_dataset_mb ({self.store.max_dataset >> 20} MB)")
        elif not budget.take(
            assoc,
            size,
            partial(
                self.abort, assoc, "preempted", "its data set made room in max_in_flight_mb for one that began earlier"
            ),
        ):
            self.abort(assoc, "in-flight", f"data sets in flight fill max_in_flight_mb ({budget.limit >> 20} MB)")

    def abort(self, assoc: Association, reason: str, why: str) -> None:
        """Give back what the association holds, send it an A-ABORT and end it."""
        self._aborted.add(assoc)
        self.store.budget.release(assoc)
        refused(f"{assoc.requestor.ae_title} at {assoc.requestor.address}", reason, f"association aborted: {why}")
        sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        if sock is not None:
            try:
                sock.sendall(_A_ABORT)
                # The DUL reads the end (A-P-ABORT) and closes the socket itself: its
                # close follows a shutdown that must not fail, so reading ends only.
                socket.socket.shutdown(sock, socket.SHUT_RD)
            except OSError:
                pass
        self.gate.request_collection()

    def on_close(self, event: Event) -> None:
        if self.store.budget.held(event.assoc):
            self.gate.request_collection()
        self.store.budget.release(event.assoc)


def _without_message_logging(event: Event) -> None:
    """pynetdicom binds handlers to every association that format a DEBUG line for
    each PDU and DIMSE message, logged or not: a sixth of the CPU of a C-STORE.
    We bind nothing to these events, so all their handlers go."""
    for event_type in _PER_MESSAGE_LOG_EVENTS:
        for handler, _ in list(event.assoc.get_handlers(event_type)):
            event.assoc.unbind(event_type, handler)


def build_ae(settings: Settings) -> AE:
    """Our Application Entity: the storage contexts, Verification, limits."""
    ae = AE(ae_title=settings.ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.maximum_associations = _LIBRARY_LIMIT_OFF
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.network_timeout = settings.network_timeout_s
    # Peers send PDUs up to this size: fewer, larger PDUs cost far less Python per
    # instance than pynetdicom's default of 16 KiB (DCMTK sends at most 128 KiB).
    ae.maximum_pdu_size = MAX_PDU_BYTES
    ae.require_called_aet = True
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
    return ae


def choose_engine(requested: str) -> str:
    """The engine that will run: ``fast`` only where the installed pynetdicom is the
    one its overrides were written for; otherwise ``stock``, and the log says why."""
    if requested != "fast":
        return "stock"
    from service.ingest.fast import unsupported_reason

    reason = unsupported_reason()
    if reason is not None:
        LOG.warning("receiver engine 'fast' unavailable (%s): running the stock engine", reason)
        return "stock"
    return "fast"


def start_receiver(settings: Settings, store: StoreSCP) -> GuardedServer:
    """Start listening (non-blocking) with the engine the settings ask for (see
    :func:`choose_engine`), behind the admission gate; stop with :func:`stop_server`."""
    gate = Gate(
        settings.max_pending_associations,
        settings.max_associations,
        settings.acse_timeout_s,
        settings.max_associations_per_peer,
    )
    handlers: list[Any] = [
        (evt.EVT_C_ECHO, _on_echo, [store]),
        (evt.EVT_REQUESTED, _on_requested, [settings, gate]),
        (evt.EVT_CONN_OPEN, _on_connection, [gate]),
        (evt.EVT_ESTABLISHED, _on_established, [gate]),
        (evt.EVT_C_STORE, handle_store, [store]),
    ]
    if settings.log_level != "DEBUG":
        handlers.append((evt.EVT_CONN_OPEN, _without_message_logging))
    engine = choose_engine(settings.receiver_engine)
    extra: dict[str, Any] = {"server_class": GuardedServer, "settings": settings, "gate": gate}
    if engine == "fast":
        from service.ingest.fast import ReceiverServer

        extra.update(server_class=ReceiverServer, store=store, store_handler=handle_store)
    else:
        guard = StockDataGuard(store, gate)
        handlers += [(evt.EVT_DATA_RECV, guard.on_data), (evt.EVT_CONN_CLOSE, guard.on_close)]
        extra["max_pdu"] = MAX_PDU_BYTES + PDU_MARGIN
    server = build_ae(settings).make_server(
        (settings.host, settings.port),
        evt_handlers=handlers,
        ssl_context=dicom_tls.server_context(settings),
        **extra,
    )
    threading.Thread(target=server.serve_forever, args=(_POLL_S,), name="sonocase-receiver", daemon=True).start()
    LOG.info("receiving on %s:%d as %s (%s engine)", settings.host, settings.port, settings.ae_title, engine)
    return server


class ReceiverService:
    """The receiver as one of the node's background services."""

    name = "receiver"

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.ledger = ledger
        self.store: StoreSCP | None = None
        self.server: GuardedServer | None = None

    def start(self) -> None:
        self.store = StoreSCP(self.settings, self.ledger)
        self.server = start_receiver(self.settings, self.store)

    def stop(self) -> None:
        if self.server is not None:
            stop_server(self.server)
            self.server = None
        if self.store is not None:
            self.store.close()
            self.store = None


def stop_server(server: GuardedServer) -> None:
    """Stop accepting, close the listening socket. (pynetdicom's ``shutdown()`` also
    leaves ``AE.start_server``'s list, which ``make_server`` never joined.)"""
    socketserver.BaseServer.shutdown(server)
    server.server_close()
