"""The receiver's limits without a network: the admission gate's counts, the memory
budget, bounded inflation (receiver and worker), nesting, allowed_hosts, the clean-up
of unrecorded spool files; and the PDU reader and the data-set parser fuzzed."""

from __future__ import annotations

import socket
import struct
import threading
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import UltrasoundImageStorage
from pynetdicom.transport import AddressInformation

from service.common.deflate import InflatedTooLarge, InflateError, inflate, inflated_size, read_instance
from service.common.hosts import allowed_networks, host_allowed
from service.ingest.admission import Gate, PduBoundedSocket
from service.ingest.fast import ReceiverDUL, ReceiverSocket
from service.ingest.nesting import MAX_SEQUENCE_DEPTH, too_deep
from service.ingest.rules import InvalidInstance, StoreStatus, encode_file_meta, parse_instance
from service.ingest.store import MemoryBudget, StoreSCP
from service.ledger import Ledger
from service.settings import Settings, SettingsError, load_settings
from tests.support import attacks
from tests.support.dicom_peers import ultrasound_files
from tests.support.fuzz import pdu_streams

MB = 1 << 20
US_FILES = {f.name: f for f in ultrasound_files()}


# --- the admission gate ------------------------------------------------------------------


def test_pending_budget_closes_the_longest_waiting() -> None:
    gate = Gate(max_pending=2, max_established=1, pending_deadline_s=5)
    a, b, c = socket.socketpair()[0], socket.socketpair()[0], socket.socketpair()[0]
    try:
        assert gate.add_pending(a, "10.0.0.1", now=1.0) == []
        assert gate.add_pending(b, "10.0.0.2", now=2.0) == []
        [evicted] = gate.add_pending(c, "10.0.0.3", now=3.0)
        assert evicted.sock is a and evicted.peer == "10.0.0.1"
        gate.settle(b)  # associated
        assert gate.pending_count() == 1
    finally:
        for sock in (a, b, c):
            sock.close()


def test_pending_connections_past_their_deadline_are_taken_out() -> None:
    gate = Gate(max_pending=10, max_established=1, pending_deadline_s=5)
    old, new = socket.socketpair(), socket.socketpair()
    try:
        gate.add_pending(old[0], "old", now=100.0)
        gate.add_pending(new[0], "new", now=104.0)
        overdue, ended = gate.sweep(now=105.5)
        assert [p.peer for p in overdue] == ["old"] and ended == []
        new[1].close()  # the peer hangs up, as a health check does
        overdue, ended = gate.sweep(now=106.0)
        assert overdue == [] and [p.peer for p in ended] == ["new"]
        assert gate.pending_count() == 0
    finally:
        for sock in (*old, *new):
            sock.close()


def test_established_slots_are_freed_when_their_association_ends() -> None:
    gate = Gate(max_pending=10, max_established=2, pending_deadline_s=5)
    release = threading.Event()
    running = [threading.Thread(target=release.wait) for _ in range(3)]
    for thread in running:
        thread.start()
    try:
        # an association is a thread: it holds its slot while it runs
        assert gate.admit(running[0], "10.0.0.1") is None and gate.admit(running[1], "10.0.0.2") is None  # type: ignore[arg-type]
        assert "max_associations" in str(gate.admit(running[2], "10.0.0.3"))  # type: ignore[arg-type]
    finally:
        release.set()
        for thread in running:
            thread.join()
    assert gate.admit(running[2], "10.0.0.3") is None  # type: ignore[arg-type]


def test_one_peer_gets_at_most_its_share_of_the_slots() -> None:
    gate = Gate(max_pending=10, max_established=3, pending_deadline_s=5, max_per_peer=2)
    release = threading.Event()
    running = [threading.Thread(target=release.wait) for _ in range(4)]
    for thread in running:
        thread.start()
    try:
        assert [gate.admit(t, "10.0.0.9") for t in running[:2]] == [None, None]  # type: ignore[arg-type]
        assert "max_associations_per_peer" in str(gate.admit(running[2], "10.0.0.9"))  # type: ignore[arg-type]
        assert gate.admit(running[3], "10.0.0.1") is None  # type: ignore[arg-type]  # the PACS still gets in
    finally:
        release.set()
        for thread in running:
            thread.join()


def test_a_pdu_bounded_socket_ends_at_a_header_announcing_too_much() -> None:
    """The stock engine's connections: PDUs within the bound pass as they are, in
    whatever pieces they are read; a header announcing more ends the stream."""
    near, far = socket.socketpair()
    bounded = PduBoundedSocket(near.family, near.type, near.proto, fileno=near.detach())
    bounded.max_pdu = 100
    try:
        pdus = struct.pack(">BBL", 4, 0, 100) + bytes(100) + struct.pack(">BBL", 5, 0, 4) + bytes(4)
        far.sendall(pdus + struct.pack(">BBL", 1, 0, 0xFFFFFFF0) + bytes(1000))

        def read(size: int) -> bytes:  # as pynetdicom reads: a header, then the PDU, in pieces
            got = b""
            while len(got) < size and (piece := bounded.recv(min(size - len(got), 7))):
                got += piece
            return got

        assert b"".join(read(n) for n in (6, 100, 6, 4)) == pdus
        assert read(6) == b""  # the oversized header: the stream ends there
    finally:
        bounded.close()
        far.close()


# --- the memory budget ---------------------------------------------------------------------


def test_memory_budget_is_shared_and_given_back() -> None:
    budget = MemoryBudget(10 * MB)
    first, second = object(), object()
    assert budget.take(first, 6 * MB) and budget.take(first, 2 * MB)
    assert not budget.take(second, 3 * MB) and budget.held(second) == 0
    assert budget.held(first) == 8 * MB and budget.used == 8 * MB
    budget.release(first)
    assert budget.used == 0 and budget.take(second, 10 * MB)


def test_memory_budget_preempts_later_data_sets_for_the_first() -> None:
    """First come, first served: the data set that began first makes room by
    preempting later preemptible ones (latest first), never the other way round."""
    budget = MemoryBudget(10 * MB)
    first, second, third, pinned = object(), object(), object(), object()
    preempted: list[object] = []
    for holder in (first, second, third):
        assert budget.take(holder, 3 * MB, lambda holder=holder: preempted.append(holder))
    assert not budget.take(third, 2 * MB)  # the latest cannot preempt earlier ones
    assert budget.take(first, 2 * MB) and preempted == [third]  # the latest went first
    assert budget.held(third) == 0 and budget.used == 8 * MB
    assert not budget.take(third, 1 * MB)  # preempted: refused until it lets go
    budget.release(third)
    assert budget.pin(second)  # complete: safe from now on
    assert budget.take(pinned, 1 * MB) and budget.take(first, 1 * MB)  # 10 MB: full
    assert not budget.take(first, 1 * MB) and preempted == [third]  # second is pinned; pinned not preemptible


# --- bounded inflation ------------------------------------------------------------------------


def deflated(data: bytes) -> bytes:
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflater.compress(data) + deflater.flush()


@pytest.mark.heavy
def test_inflation_stops_at_its_bound_in_constant_memory() -> None:
    bomb = attacks.deflate_bomb(generate_uid(), 512)
    with pytest.raises(InflatedTooLarge):
        inflated_size(bomb, 64 * MB)
    assert inflated_size(bomb, 1024 * MB) > 512 * MB
    assert inflate(deflated(b"abc" * 100_000), MB) == b"abc" * 100_000
    with pytest.raises(InflateError):
        inflate(b"\xff not deflate", MB)


def test_a_deflate_bomb_is_refused_too_large_and_nothing_is_kept(settings: Settings) -> None:
    ledger = Ledger(settings.ledger_path, durable=False)
    scp = StoreSCP(settings.model_copy(update={"max_dataset_mb": 16, "max_in_flight_mb": 16}), ledger)
    try:
        sop = generate_uid()
        outcome = scp.store(
            attacks.deflate_bomb(sop, 64), DeflatedExplicitVRLittleEndian, "1.2.840.10008.5.1.4.1.1.6.1", sop, "X"
        )
        assert outcome.status == StoreStatus.TOO_LARGE and "max_dataset_mb" in outcome.comment
        assert ledger.instance_count() == 0 and scp.budget.used == 0
        small = deflated(attacks.identifying_elements(sop) + attacks.pixel_data(MB))
        assert (
            scp.store(small, DeflatedExplicitVRLittleEndian, "1.2.840.10008.5.1.4.1.1.6.1", sop, "X").status
            == StoreStatus.SUCCESS
        )
    finally:
        scp.close()
        ledger.close()


def test_the_worker_reads_a_deflated_file_within_the_bound(tmp_path: Path) -> None:
    sop = generate_uid()
    head = encode_file_meta("1.2.840.10008.5.1.4.1.1.6.1", sop, DeflatedExplicitVRLittleEndian, "X")
    path = tmp_path / "a.dcm"
    path.write_bytes(head + deflated(attacks.identifying_elements(sop) + attacks.pixel_data(4 * MB)))
    ds = read_instance(path, 8 * MB)
    assert ds.SOPInstanceUID == sop and len(ds.PixelData) == 4 * MB
    with pytest.raises(InflatedTooLarge):
        read_instance(path, 2 * MB)
    plain = US_FILES["OBXXXX1A.dcm"]
    assert read_instance(plain.path, MB).SOPInstanceUID == dcmread(plain.path).SOPInstanceUID


def test_a_data_set_beyond_max_dataset_is_refused_too_large(settings: Settings) -> None:
    ledger = Ledger(settings.ledger_path, durable=False)
    scp = StoreSCP(settings.model_copy(update={"max_dataset_mb": 1, "max_in_flight_mb": 1}), ledger)
    try:
        sop = generate_uid()
        raw = attacks.identifying_elements(sop) + attacks.pixel_data(2 * MB)
        outcome = scp.store(raw, ExplicitVRLittleEndian, "1.2.840.10008.5.1.4.1.1.6.1", sop, "X")
        assert outcome.status == StoreStatus.TOO_LARGE and ledger.instance_count() == 0
    finally:
        scp.close()
        ledger.close()


# --- nesting ------------------------------------------------------------------------------------

NESTINGS = {
    "undefined lengths": {},
    "explicit lengths": {"explicit_lengths": True},
    "explicit lengths inside UN": {"explicit_lengths": True, "outer_vr": b"UN"},
}


@pytest.mark.parametrize("encoding", NESTINGS)
@pytest.mark.parametrize("depth", [MAX_SEQUENCE_DEPTH + 1, 1_000, 20_000])
def test_deep_nesting_is_refused_for_good(depth: int, encoding: str) -> None:
    """Issue 24, attack 6: explicit lengths were accepted, then failed the study."""
    with pytest.raises(InvalidInstance) as err:
        parse_instance(attacks.deeply_nested(generate_uid(), depth, **NESTINGS[encoding]), ExplicitVRLittleEndian, MB)
    assert err.value.status == StoreStatus.TOO_DEEP  # not 0x0110: that tells the PACS to retry


@pytest.mark.parametrize("encoding", NESTINGS)
def test_the_deepest_nesting_taken_is_read_by_the_worker(tmp_path: Path, encoding: str) -> None:
    """What the receiver takes, the worker reads whole (its reader, every element)."""
    sop = generate_uid()
    raw = attacks.deeply_nested(sop, MAX_SEQUENCE_DEPTH, **NESTINGS[encoding])
    assert parse_instance(raw, ExplicitVRLittleEndian, MB).sop_instance_uid == sop
    path = tmp_path / "nested.dcm"
    path.write_bytes(encode_file_meta(UltrasoundImageStorage, sop, ExplicitVRLittleEndian, "TEST") + raw)
    ds = read_instance(path, MB)
    assert sum(1 for elem in ds.iterall() if elem.VR == "SQ") == MAX_SEQUENCE_DEPTH
    assert ds.to_json_dict()


def test_encapsulated_fragments_are_not_nesting() -> None:
    fragments = b"".join(struct.pack("<HHI", 0xFFFE, 0xE000, 4) + b"abcd" for _ in range(5000))
    pixels = (
        struct.pack("<HH", 0x7FE0, 0x0010)
        + b"OB\0\0"
        + struct.pack("<I", 0xFFFFFFFF)
        + fragments
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )
    assert not too_deep(attacks.identifying_elements(generate_uid()) + pixels, False, True)


# --- allowed_hosts ------------------------------------------------------------------------------


def test_allowed_hosts_are_addresses_blocks_and_names() -> None:
    networks = allowed_networks(["10.20.0.15", "192.168.0.0/16", "localhost", "2001:db8::/32"])
    for host in ("10.20.0.15", "192.168.44.3", "127.0.0.1", "::ffff:192.168.1.1", "2001:db8::7"):
        assert host_allowed(host, networks), host
    for host in ("10.20.0.16", "172.16.0.1", "2001:db9::1", "not-an-address"):
        assert not host_allowed(host, networks), host
    assert host_allowed("203.0.113.9", ())  # none set: everyone


@pytest.mark.parametrize(
    "entry,says", [("10.0.0.0/33", "neither"), ("pacs .local", "neither"), ("no-such-host.invalid", "does not resolve")]
)
def test_an_allowed_host_that_is_none_of_these_stops_the_node_at_start(tmp_path: Path, entry: str, says: str) -> None:
    with pytest.raises(SettingsError, match=f"SONOCASE_ALLOWED_HOSTS.*{says}"):
        load_settings(data_dir=tmp_path, allowed_hosts=entry)


def test_in_flight_budget_must_hold_the_largest_data_set(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="MAX_IN_FLIGHT_MB"):
        load_settings(data_dir=tmp_path, max_dataset_mb=512, max_in_flight_mb=256)


# --- a restart after kill -9 ------------------------------------------------------------------


def test_a_restart_removes_spool_files_the_ledger_does_not_know(settings: Settings) -> None:
    """What kill -9 between the rename into place and the ledger record leaves."""
    ledger = Ledger(settings.ledger_path, durable=False)
    try:
        f = US_FILES["OBXXXX1A_rle.dcm"]
        scp = StoreSCP(settings, ledger)
        assert scp.store(f.data_set, f.transfer_syntax, f.sop_class_uid, f.sop_instance_uid, "X").status == 0
        scp.close()
        study = settings.spool_dir / f.study_uid
        unrecorded = [study / "1.2.3.4.5.6.7.dcm", settings.spool_dir / "1.2.3" / "1.2.3.9.dcm"]
        for path in unrecorded:
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(b"never acknowledged")
        StoreSCP(settings, ledger).close()
        assert not any(path.exists() for path in unrecorded)
        assert (study / f"{f.sop_instance_uid}.dcm").exists()
    finally:
        ledger.close()


# --- fuzzing the PDU reader and the data-set parser ---------------------------------------------

_EVENTS = {"Evt3", "Evt4", "Evt6", "Evt10", "Evt12", "Evt13", "Evt16", "Evt17", "Evt19"}


@pytest.mark.heavy
@hsettings(max_examples=300, deadline=None)
@given(stream=pdu_streams())
def test_fuzzed_pdus_end_in_an_event_and_never_in_memory(stream: bytes) -> None:
    """The fast engine's PDU reader, over a real socket: whatever arrives, it puts a
    state-machine event and reads at most what came (nothing like an announced 4 GiB)."""
    ours, peer = socket.socketpair()
    assoc = Association(AE(), "acceptor")
    assoc.acceptor.maximum_length = MB
    assoc.requestor.address_info = AddressInformation("127.0.0.1", 104)
    assoc.dimse_timeout = 0.5
    transport = ReceiverSocket(assoc, client_socket=ours)
    assoc.dul.socket = transport
    assoc.dul.__class__ = ReceiverDUL
    dul: ReceiverDUL = assoc.dul  # type: ignore[assignment]
    assoc.dul.event_queue.get_nowait()  # Evt5, the connection itself
    peer.sendall(stream)
    peer.shutdown(socket.SHUT_WR)
    try:
        for _ in range(8):
            dul._read_pdu_data()
            event = dul.event_queue.get_nowait()
            assert event in _EVENTS
            if event in ("Evt17", "Evt19"):
                break
    finally:
        peer.close()
        ours.close()


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.binary(max_size=2048),
    syntax=st.sampled_from(
        [ExplicitVRLittleEndian, "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", DeflatedExplicitVRLittleEndian]
    ),
)
def test_fuzzed_bytes_are_parsed_or_refused_with_a_status(raw: bytes, syntax: str) -> None:
    try:
        parse_instance(raw, syntax, MB)
    except InvalidInstance as exc:
        assert exc.status in set(StoreStatus) - {StoreStatus.SUCCESS, StoreStatus.PROCESSING_FAILURE}
