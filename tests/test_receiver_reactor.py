"""The fast engine's overrides of pynetdicom internals (ReceiverAssociation's reactor,
ReceiverDUL's wait on the network and its PDU reader, ReceiverSocket's reads): each
keeps what the original did, checked against real pynetdicom peers on loopback and
real sockets; and what they take from pynetdicom is still there, as it was."""

from __future__ import annotations

import ast
import inspect
import operator
import os
import queue
import socket
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dul import _PDU_TYPES, DULServiceProvider
from pynetdicom.fsm import TRANSITION_TABLE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import Verification
from pynetdicom.transport import (
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from service.ingest.admission import GuardedServer
from service.ingest.fast import (
    ReceiverAssociation,
    ReceiverDIMSE,
    ReceiverDUL,
    ReceiverRequestHandler,
    ReceiverServer,
    ReceiverSocket,
    RequestQueue,
)
from service.ingest.server import start_receiver, stop_server
from service.ingest.store import StoreSCP
from service.ledger import Ledger
from service.settings import Settings
from tests.support.common import dcmtk, free_port, wait_until


@pytest.fixture
def server(settings: Settings) -> Iterator[ReceiverServer]:
    settings = settings.model_copy(update={"port": free_port(), "receiver_engine": "fast"})
    ledger = Ledger(settings.ledger_path, durable=False)
    store = StoreSCP(settings, ledger)
    rx = start_receiver(settings, store)
    assert isinstance(rx, ReceiverServer)
    yield rx
    stop_server(rx)
    store.close()
    ledger.close()


def associate(server: ReceiverServer, settings: Settings) -> Association:
    ae = AE("REACTORTEST")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title=settings.ae_title)
    assert assoc.is_established
    return assoc


def test_associations_run_on_our_classes_and_serve(server: ReceiverServer, settings: Settings) -> None:
    assoc = associate(server, settings)
    try:
        assert wait_until(lambda: len(server.active_associations) == 1)
        ours = server.active_associations[0]
        assert type(ours) is ReceiverAssociation
        assert type(ours.dul) is ReceiverDUL
        assert type(ours.dul.socket) is ReceiverSocket
        assert type(ours.dimse) is ReceiverDIMSE and type(ours.dimse.msg_queue) is RequestQueue
        for _ in range(20):  # one message after another, each answered
            assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    assert assoc.is_released


@pytest.mark.parametrize("end", ["release", "abort"])
def test_peer_ending_the_association_ends_ours(server: ReceiverServer, settings: Settings, end: str) -> None:
    assoc = associate(server, settings)
    assert assoc.send_c_echo().Status == 0x0000
    getattr(assoc, end)()
    assert wait_until(lambda: not server.active_associations), f"association still served after the peer's {end}"


def test_network_timeout_aborts_a_silent_peer(server: ReceiverServer, settings: Settings) -> None:
    server.ae.network_timeout = 0.3
    assoc = associate(server, settings)
    assert wait_until(lambda: assoc.is_aborted), "a silent peer was never timed out"
    assert wait_until(lambda: not server.active_associations)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.integration
def test_dul_waits_on_the_network_and_closes_its_wake_up_socket(server: ReceiverServer, settings: Settings) -> None:
    """DCMTK's echoscu (20 C-ECHOs an association, five associations): each DUL thread
    had its wake-up socket while it served, closed it when it ended, and no file
    descriptor is left behind. (A pynetdicom requestor is no peer for this: sending
    requests back to back, it can take a quick response in its own reactor thread
    and then wait out its DIMSE timeout.)"""
    duls: list[ReceiverDUL] = []
    waiting: list[bool] = []

    def established(event: Any) -> None:
        duls.append(event.assoc.dul)
        waiting.append(event.assoc.dul._wake is not None)

    server.bind(evt.EVT_ESTABLISHED, established)
    before = open_fds()
    for _ in range(5):
        result = subprocess.run(
            [dcmtk("echoscu"), "--repeat", "20", "-aec", settings.ae_title, "127.0.0.1", str(server.server_address[1])],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
    assert len(duls) == 5 and all(waiting), "a DUL thread had no wake-up socket to wait on"
    assert wait_until(lambda: not server.active_associations)
    assert wait_until(lambda: all(dul._wake is None and not dul.is_alive() for dul in duls))
    assert open_fds() <= before, "file descriptors leak with each association"


@pytest.mark.parametrize("watched", [False, True])
def test_p_data_pdu_decodes_as_pynetdicom_decodes_it(watched: bool) -> None:
    """Over a memoryview unless a handler watches raw PDUs; the same fragments either way."""
    fragments = [[1, b"\x01" + bytes(range(200))], [1, b"\x00" + bytes(70_000)], [3, b"\x02end"]]
    primitive = P_DATA()
    primitive.presentation_data_value_list = fragments
    encoded = P_DATA_TF(primitive).encode()
    dul = Association(AE(), "acceptor").dul
    dul.__class__ = ReceiverDUL
    for handler, _ in dul.assoc.get_handlers(evt.EVT_PDU_RECV):
        dul.assoc.unbind(evt.EVT_PDU_RECV, handler)
    if watched:
        dul.assoc.bind(evt.EVT_DATA_RECV, lambda event: None)
    pdu, event = dul._decode_pdu(bytearray(encoded))
    assert event == "Evt10"
    decoded = pdu.to_primitive().presentation_data_value_list
    assert [[cx, bytes(data)] for cx, data in decoded] == fragments
    assert all(isinstance(data, bytes if watched else memoryview) for _, data in decoded)


def socket_pair() -> tuple[ReceiverSocket, socket.socket]:
    ours, peer = socket.socketpair()
    return ReceiverSocket(Association(AE(), "acceptor"), client_socket=ours), peer


def test_read_into_reassembles_what_arrives_in_pieces() -> None:
    sock, peer = socket_pair()
    payload = bytes(range(256)) * 8192  # 2 MiB: more than one socket buffer, and than the first piece
    sender = threading.Thread(
        target=lambda: [peer.sendall(payload[i : i + 7001]) for i in range(0, len(payload), 7001)]
    )
    sender.start()
    try:
        buffer = bytearray()
        sock.read_into(buffer, 6, time.monotonic() + 10)
        assert buffer == payload[:6]
        sock.read_into(buffer, len(payload) - 6, time.monotonic() + 10)
        assert buffer == payload
    finally:
        sender.join()
        peer.close()
        sock.close()


def test_read_into_returns_what_came_when_the_peer_closes() -> None:
    sock, peer = socket_pair()
    peer.sendall(b"partial PDU")
    peer.close()
    try:
        buffer = bytearray(b"head")
        sock.read_into(buffer, 1 << 30, time.monotonic() + 10)  # announced 1 GiB: nothing like it is allocated
        assert buffer == b"headpartial PDU"
        sock.read_into(buffer, 10, time.monotonic() + 10)
        assert buffer == b"headpartial PDU"
    finally:
        sock.close()


def test_read_into_gives_up_at_its_deadline() -> None:
    sock, peer = socket_pair()
    peer.sendall(b"half")
    try:
        with pytest.raises(TimeoutError):
            sock.read_into(bytearray(), 100, time.monotonic() + 0.2)
    finally:
        peer.close()
        sock.close()


# --- what fast.py takes from pynetdicom ---------------------------------------------------
# A new pynetdicom runs the stock engine (unsupported_reason); these fail, on the
# version the overrides are written for, if any of them no longer matches what it
# overrides or uses, so that moving PYNETDICOM_VERSION on is a reviewed change.

#: (our class, pynetdicom's class, the methods ours overrides)
OVERRIDES = [
    (ReceiverSocket, AssociationSocket, ()),
    (ReceiverDUL, DULServiceProvider, ("run", "send_pdu", "_is_transport_event", "_decode_pdu", "_read_pdu_data")),
    (ReceiverAssociation, Association, ("_run_reactor",)),
    (ReceiverDIMSE, DIMSEServiceProvider, ("receive_primitive",)),
    (ReceiverRequestHandler, RequestHandler, ("_create_association",)),
    (RequestQueue, queue.Queue, ("put",)),
    (
        GuardedServer,
        ThreadedAssociationServer,
        ("get_request", "verify_request", "process_request", "process_request_thread", "service_actions"),
    ),
]


@pytest.mark.parametrize("ours,theirs,methods", OVERRIDES, ids=[o[0].__name__ for o in OVERRIDES])
def test_every_override_overrides_a_method_of_the_same_signature(
    ours: type, theirs: type, methods: tuple[str, ...]
) -> None:
    own = {name for name, value in vars(ours).items() if callable(value) and not name.startswith("__")}
    assert own & set(dir(theirs)) == set(methods), "an override is missing from OVERRIDES, or gone from pynetdicom"
    for name in methods:
        assert [p.name for p in inspect.signature(getattr(ours, name)).parameters.values()] == [
            p.name for p in inspect.signature(getattr(theirs, name)).parameters.values()
        ], name


def test_attributes_the_overrides_use_exist_in_pynetdicom() -> None:
    assoc = Association(AE(), "acceptor")
    for path in (
        "_accepted_cx",
        "_sent_release",
        "_server",
        "_kill",
        "_is_paused",
        "_reactor_checkpoint",
        "network_timeout_response",
        "dimse_timeout",
        "acceptor.maximum_length",
        "requestor.address",
        "requestor.ae_title",
        "dimse.msg_queue",
        "dimse.message",
        "dul.event_queue",
        "dul._recv_pdu",
        "dul._run_loop_delay",
        "dul.state_machine.current_state",
        "dul.socket",
        "acse.send_release",
        "acse.is_release_requested",
        "acse.is_aborted",
        "dul.receive_pdu",
        "dul.idle_timer_expired",
        "dul.kill_dul",
    ):
        owner, _, name = path.rpartition(".")
        assert name in dir(operator.attrgetter(owner)(assoc) if owner else assoc), path
    message = DIMSEMessage()
    assert isinstance(message.data_set, BytesIO) and isinstance(message.encoded_command_set, BytesIO)
    assert "_run_loop_delay" in inspect.getsource(DULServiceProvider.run_reactor)
    assert {k: v[1] for k, v in _PDU_TYPES.items()} == {
        b"\x01": "Evt6",
        b"\x02": "Evt3",
        b"\x03": "Evt4",
        b"\x04": "Evt10",
        b"\x05": "Evt12",
        b"\x06": "Evt13",
        b"\x07": "Evt16",
    }


def test_the_state_machine_does_what_the_overrides_ask_of_it() -> None:
    """Evt19 (invalid PDU) answers an A-ABORT, before and after association;
    Evt17 (connection closed) during an association tells the user (A-P-ABORT)."""
    assert TRANSITION_TABLE[("Evt19", "Sta2")] == "AA-1" and TRANSITION_TABLE[("Evt19", "Sta6")] == "AA-8"
    assert TRANSITION_TABLE[("Evt17", "Sta2")] == "AA-5" and TRANSITION_TABLE[("Evt17", "Sta6")] == "AA-4"
    assert TRANSITION_TABLE[("Evt10", "Sta6")] == "DT-2"
    # serve_at_once sends its response where a P-DATA request is acted on
    assert TRANSITION_TABLE[("Evt9", "Sta6")] == "DT-1" and TRANSITION_TABLE[("Evt9", "Sta8")] == "AR-7"


def test_a_c_store_right_after_the_accept_is_answered(server: ReceiverServer, settings: Settings) -> None:
    """pynetdicom marks an accepted association established only after it sent the
    A-ASSOCIATE-AC and ran the EVT_ACCEPTED handlers; a quick peer's C-STORE can be
    served in between, and its response must still go (it was dropped once: the peer
    waited out its DIMSE timeout). A slow EVT_ACCEPTED handler, bound for this test,
    holds that window open; it stands in for a loaded machine."""
    server.bind(evt.EVT_ACCEPTED, lambda event: time.sleep(1.0))
    ds = dcmread(get_testdata_file("US1_UNCR.dcm", download=False))
    ae = AE("REACTORTEST")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.dimse_timeout = 10
    assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title=settings.ae_title)
    try:
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        assert status and status.Status == 0x0000
    finally:
        assoc.release()


def _checks(function: Callable[..., Any]) -> list[str]:
    """The conditions of the ``if`` statements directly inside a function's loop."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    loop = next(node for node in ast.walk(tree) if isinstance(node, ast.While))
    return [ast.unparse(node.test) for node in loop.body if isinstance(node, ast.If)]


def test_the_reactor_makes_the_checks_pynetdicoms_makes_in_the_same_order() -> None:
    theirs, ours = _checks(Association._run_reactor), _checks(ReceiverAssociation._react)
    assert theirs[0] == "msg" and ours[0] == "msg is not None"  # ours waits on the queue instead of sleeping
    assert ours[1:] == theirs[1:]


def _events_put(function: Callable[..., Any], names: dict[str, str]) -> set[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    return {
        names.get(ast.unparse(node.args[0]), ast.unparse(node.args[0]))
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "self.event_queue.put"
    }


def test_the_pdu_reader_reports_the_events_pynetdicoms_reports() -> None:
    names = {"_CONNECTION_CLOSED": "'Evt17'", "_INVALID_PDU": "'Evt19'"}
    assert _events_put(ReceiverDUL._read_pdu_data, names) == _events_put(DULServiceProvider._read_pdu_data, names)
