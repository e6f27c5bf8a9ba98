"""The receiver's overrides of pynetdicom internals (ReceiverAssociation's reactor,
ReceiverDUL's wait on the network, ReceiverSocket's recv): each keeps what the original did,
checked against real pynetdicom peers on loopback and real sockets."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest
from conftest import free_port, wait_until
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import Verification

from service.ingest.fast import (
    ReceiverAssociation,
    ReceiverDIMSE,
    ReceiverDUL,
    ReceiverServer,
    ReceiverSocket,
    RequestQueue,
)
from service.ingest.server import start_receiver, stop_server
from service.ingest.store import StoreSCP
from service.ledger import Ledger
from service.settings import Settings


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


def test_dul_waits_on_the_network_and_closes_its_wake_up_socket(server: ReceiverServer, settings: Settings) -> None:
    before = open_fds()
    for _ in range(5):
        assoc = associate(server, settings)
        try:
            assert wait_until(lambda: len(server.active_associations) == 1)
            dul = server.active_associations[0].dul
            assert dul._run_loop_delay == 0 and dul._wake is not None, "the DUL thread sleeps instead of waiting"
            for _ in range(20):  # each request read, and each response sent, by the waiting thread
                assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
        assert wait_until(lambda: not server.active_associations)
        assert wait_until(lambda: dul._wake is None and not dul.is_alive())
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


def test_recv_reassembles_what_arrives_in_pieces() -> None:
    sock, peer = socket_pair()
    payload = bytes(range(256)) * 8192  # 2 MiB: more than one socket buffer
    sender = threading.Thread(target=lambda: [peer.sendall(payload[i:i + 7001]) for i in range(0, len(payload), 7001)])
    sender.start()
    try:
        assert sock.recv(6) == payload[:6]
        assert sock.recv(len(payload) - 6) == payload[6:]
    finally:
        sender.join()
        peer.close()
        sock.close()


def test_recv_returns_what_came_when_the_peer_closes() -> None:
    sock, peer = socket_pair()
    peer.sendall(b"partial PDU")
    peer.close()
    try:
        data = sock.recv(1000)
        assert data == b"partial PDU"
        assert isinstance(data, bytearray)
        assert sock.recv(10) == b""
    finally:
        sock.close()
