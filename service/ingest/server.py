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
import socketserver
import threading
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from service.common import dicom_tls
from service.common.metrics import observe_cstore
from service.ingest.rules import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    REJECTED_PERMANENT,
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

MAX_PDU_BYTES = 1 << 20

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
    outcome = store.store(
        event.encoded_dataset(include_meta=False), event.context.transfer_syntax,
        str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID), event.assoc.requestor.ae_title,
    )
    observe_cstore(outcome.status)
    status = Dataset()
    status.Status = int(outcome.status)
    if outcome.status != StoreStatus.SUCCESS and outcome.comment:
        status.ErrorComment = error_comment(outcome.comment)
    return status


def _on_echo(event: Event) -> int:
    return int(StoreStatus.SUCCESS)


def _on_requested(event: Event, settings: Settings) -> None:
    request = event.assoc.requestor.primitive
    calling_ae, host = request.calling_ae_title, event.assoc.requestor.address
    rejection = check_association(calling_ae, request.called_ae_title, host, settings)
    if rejection is None:
        LOG.info("association from %s at %s accepted", calling_ae, host, extra={"calling_ae": calling_ae})
        return
    LOG.warning("association from %s at %s rejected: %s", calling_ae, host, rejection.why,
                extra={"calling_ae": calling_ae})
    # As pynetdicom's own rejections do: kill() waits until the A-ASSOCIATE-RJ is
    # sent and the peer has closed, before the server closes the socket.
    event.assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, rejection.reason)
    event.assoc.kill()


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
    ae.maximum_associations = settings.max_associations
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


def start_receiver(settings: Settings, store: StoreSCP) -> ThreadedAssociationServer:
    """Start listening (non-blocking) with the engine the settings ask for (see
    :func:`choose_engine`); stop with ``server.shutdown()``."""
    handlers: list[Any] = [
        (evt.EVT_C_ECHO, _on_echo),
        (evt.EVT_REQUESTED, _on_requested, [settings]),
        (evt.EVT_C_STORE, handle_store, [store]),
    ]
    if settings.log_level != "DEBUG":
        handlers.append((evt.EVT_CONN_OPEN, _without_message_logging))
    engine = choose_engine(settings.receiver_engine)
    extra: dict[str, Any] = {}
    if engine == "fast":
        from service.ingest.fast import ReceiverServer

        extra = {"server_class": ReceiverServer, "store": store, "store_handler": handle_store}
    server = build_ae(settings).make_server(
        (settings.host, settings.port), evt_handlers=handlers, ssl_context=dicom_tls.server_context(settings),
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
        self.server: ThreadedAssociationServer | None = None

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


def stop_server(server: ThreadedAssociationServer) -> None:
    """Stop accepting, close the listening socket. (pynetdicom's ``shutdown()`` also
    leaves ``AE.start_server``'s list, which ``make_server`` never joined.)"""
    socketserver.BaseServer.shutdown(server)
    server.server_close()
