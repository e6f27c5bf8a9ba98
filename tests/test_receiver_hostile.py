"""A node that a port scan, a silent peer or a crafted data set cannot take down
(issues 15 and 24), on each receiver engine: each attack from tests/support/attacks.py against
a real `sonocase serve`, over real sockets on 127.0.0.1, with the node's peak memory
over idle held to the documented bound, a real DCMTK storescu storing a new study
while the attack runs, and /healthz answering throughout."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import UltrasoundImageStorage

from service.ingest.rules import StoreStatus
from tests.support import attacks
from tests.support.attacks import Node
from tests.support.common import free_port, wait_for
from tests.support.dicom_peers import cstore_fragments

pytestmark = pytest.mark.integration

#: The limits the node runs with here: short timeouts, small budgets.
LIMITS = {
    "SONOCASE_MAX_ASSOCIATIONS": "4",
    "SONOCASE_MAX_PENDING_ASSOCIATIONS": "8",
    "SONOCASE_ACSE_TIMEOUT_S": "2",
    "SONOCASE_DIMSE_TIMEOUT_S": "3",
    "SONOCASE_NETWORK_TIMEOUT_S": "8",
    "SONOCASE_MAX_DATASET_MB": "32",
    "SONOCASE_MAX_IN_FLIGHT_MB": "64",
}
#: The bound docs/it-guide.md ("Memory") gives, for these limits: max_in_flight_mb,
#: plus 2 MiB per association and pending connection, plus 32 MB.
BOUND_MB = 64 + 2 * (4 + 8) + 32
#: Slack for a timeout to be seen: the serving loop's poll, a loaded machine.
SLACK_S = 3.0


@pytest.fixture(params=["fast", "stock"])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
    """The node under attack, its /healthz probed twice a second throughout (issue 24:
    a liveness probe must not fail, and Kubernetes restart the node, under any attack)."""
    running = Node(tmp_path, str(request.param), LIMITS | {"SONOCASE_HTTP_PORT": str(free_port())})
    with attacks.probing_health(running.http_port, 0.5) as health:
        yield running
    running.stop()
    answered, probes = health
    assert answered >= 0.9 * probes, f"/healthz answered {answered} of {probes} probes during the attack"


#: The IT guide's allowance for the stock engine when it aborts associations to keep
#: the budget: what they had received stays in pynetdicom's buffers until the next
#: garbage collection (within a second), at most max_in_flight_mb more.
STOCK_ABORTED_MB = int(LIMITS["SONOCASE_MAX_IN_FLIGHT_MB"])


def assert_memory_bounded(node: Node, allowance_mb: int = 0) -> None:
    peak, bound = node.peak_over_idle(), BOUND_MB + allowance_mb
    assert peak < bound, f"peak memory {peak:.0f} MB over idle, bound {bound} MB"


def test_pdu_headers_announcing_4_gib_cost_no_memory_and_are_dropped(node: Node) -> None:
    with attacks.held(attacks.huge_pdu_headers(node.port, 8)) as socks:
        assert node.pacs_stores(), "the PACS could not store during the attack"
        ends = [attacks.ended_by_peer(sock, float(LIMITS["SONOCASE_ACSE_TIMEOUT_S"]) + SLACK_S) for sock in socks]
    assert all(end is not None for end in ends), "a connection that announced 4 GiB is still open"
    if node.engine == "fast":  # the stock engine cannot read the announced length: it waits, then closes
        assert all(end is not None and attacks.abort_pdu(end) for end in ends), "no A-ABORT"
    assert_memory_bounded(node)


def test_a_peer_streaming_after_a_4_gib_pdu_header_is_cut_off(node: Node) -> None:
    """Issue 24, attack 8: the stock engine read whatever the header announced,
    into memory, until a timeout (2.6-6.6 GB). Now, on both engines, the
    connection ends at the header: the node takes a few MB at most."""
    streams = [threading.Thread(target=attacks.stream_after_huge_header, args=(node.port, 300)) for _ in range(2)]
    for stream in streams:
        stream.start()
    assert node.pacs_stores(), "the PACS could not store during the attack"
    for stream in streams:
        stream.join(timeout=30)
    assert not any(stream.is_alive() for stream in streams), "a stream was never cut off"
    assert_memory_bounded(node)


def test_silent_connections_and_health_checks_do_not_lock_out_the_pacs(node: Node) -> None:
    for _ in range(20):  # a load balancer's TCP health check: connect, close
        attacks.connect(node.port).close()
    with attacks.held(attacks.silent_connections(node.port, 20)) as socks:  # more than both budgets
        assert node.pacs_stores(), "the PACS could not store during the attack"
        deadline = float(LIMITS["SONOCASE_ACSE_TIMEOUT_S"]) + SLACK_S
        assert all(attacks.ended_by_peer(sock, deadline) is not None for sock in socks), "a silent peer kept its slot"
    # Evictions are logged as they happen; a timed-out connection is logged just after
    # it is closed. On the stock engine pynetdicom's own ACSE timer (the same
    # acse_timeout_s) may close a silent peer first: then it ends without our line.
    expected = ["the pending budget"] + (["no association within acse_timeout_s"] if node.engine == "fast" else [])
    wait_for("the node to log why it closed them", lambda: all(line in node.log() for line in expected), timeout=5)
    assert_memory_bounded(node)


def test_half_sent_pdus_time_out_and_free_their_slots(node: Node) -> None:
    slots = int(LIMITS["SONOCASE_MAX_ASSOCIATIONS"])
    attackers = [attacks.associate(node.port) for _ in range(slots - 1)]
    try:
        assert all(a.is_established for a in attackers)
        for assoc in attackers:
            attacks.half_sent_pdu(assoc)
        assert node.pacs_stores(), "the PACS could not store beside the attackers"
        # now every slot is taken (once the PACS's association has ended)
        last = wait_for("the PACS's slot to be free", lambda: established(attacks.associate(node.port)), timeout=10)
        attackers.append(last)
        attacks.half_sent_pdu(last)
        start = time.monotonic()
        deadline = start + float(LIMITS["SONOCASE_DIMSE_TIMEOUT_S"]) + SLACK_S
        while not node.pacs_stores():
            assert time.monotonic() < deadline, "the slots of half-sent PDUs were never freed"
        assert all(wait_ended(a, deadline) for a in attackers), "an attacker's association outlived its timeout"
    finally:
        for assoc in attackers:
            assoc.abort()
    assert_memory_bounded(node)


def established(assoc: Association) -> Association | None:
    return assoc if assoc.is_established else None


def wait_ended(assoc: Association, deadline: float) -> bool:
    """Whether the node ended ``assoc`` by ``deadline`` (``time.monotonic()``)."""
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    return not assoc.is_established


@cache
def bomb(sop_instance_uid: str) -> bytes:
    return attacks.deflate_bomb(sop_instance_uid, 1024)


def send(node: Node, raw: bytes, sop_instance_uid: str, syntax: str) -> int:
    return attacks.send_data_set(node.port, raw, sop_instance_uid, syntax)


def while_the_pacs_stores(node: Node, attack: threading.Thread) -> None:
    """Run ``attack`` while the PACS stores, and check it stored."""
    attack.start()
    try:
        assert node.pacs_stores(), "the PACS could not store during the attack"
    finally:
        attack.join(60)


def test_deflate_bomb_is_refused_and_nothing_kept(node: Node) -> None:
    sop = "1.2.826.0.1.3680043.8.498.15"
    raw = bomb(sop)
    assert len(raw) < 1.1 * 2**20  # a megabyte on the wire, a gigabyte inflated
    statuses: list[int] = []
    while_the_pacs_stores(
        node, threading.Thread(target=lambda: statuses.append(send(node, raw, sop, DeflatedExplicitVRLittleEndian)))
    )
    assert statuses == [StoreStatus.TOO_LARGE]
    assert sop not in node.spooled()
    assert_memory_bounded(node)


@pytest.mark.parametrize(
    "depth,explicit_lengths,expected",
    [
        (1000, False, StoreStatus.TOO_DEEP),
        (100_000, False, StoreStatus.TOO_DEEP),
        (10, False, StoreStatus.SUCCESS),
        (1000, True, StoreStatus.TOO_DEEP),
        (20_000, True, StoreStatus.TOO_DEEP),
        (10, True, StoreStatus.SUCCESS),
    ],
)
def test_deeply_nested_sequences_are_refused_for_good(
    node: Node, depth: int, explicit_lengths: bool, expected: StoreStatus
) -> None:
    """Undefined lengths, and explicit ones (issue 24, attack 6: accepted, then the study failed)."""
    sop = generate_uid()
    raw = attacks.deeply_nested(sop, depth, explicit_lengths)
    statuses: list[int] = []
    while_the_pacs_stores(
        node, threading.Thread(target=lambda: statuses.append(send(node, raw, sop, ExplicitVRLittleEndian)))
    )
    assert statuses == [expected]  # never 0x0110, which tells the PACS to retry
    assert (sop in node.spooled()) == (expected == StoreStatus.SUCCESS)
    assert_memory_bounded(node)


def big_data_set(sop_instance_uid: str, mb: int) -> bytes:
    """An ultrasound data set whose Pixel Data is ``mb`` MiB."""
    return attacks.identifying_elements(sop_instance_uid) + attacks.pixel_data(mb << 20)


def send_all_but_the_last_fragment(node: Node, raw: bytes, sop_instance_uid: str) -> Association:
    ae = AE("ATTACKER")
    ae.add_requested_context(UltrasoundImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SONOCASE")
    assert assoc.is_established
    for fragment in cstore_fragments(assoc, raw, UltrasoundImageStorage, sop_instance_uid)[:-1]:
        assoc.dul.send_pdu(fragment)
    return assoc


def test_data_sets_in_flight_stay_within_the_memory_budget(node: Node) -> None:
    """Two 30 MB data sets held one fragment short of complete take 60 MB of a 64 MB
    budget; the PACS's small instance still fits; a third 30 MB data set does not:
    refused 0xA700 once complete (fast) or its association aborted (stock). Each
    holder is aborted once silent for network_timeout_s."""
    holders = [
        send_all_but_the_last_fragment(node, big_data_set(sop, 30), sop) for sop in (generate_uid(), generate_uid())
    ]
    try:
        wait_for("the holders' fragments to be sent", lambda: all(h.dul.to_provider_queue.empty() for h in holders))
        assert node.pacs_stores(), "the PACS could not store beside the data sets in flight"
        sop = generate_uid()
        if node.engine == "fast":
            assert send(node, big_data_set(sop, 30), sop, ExplicitVRLittleEndian) == StoreStatus.OUT_OF_RESOURCES
        else:  # pynetdicom has the whole message before any handler: the stock engine aborts
            third = send_all_but_the_last_fragment(node, big_data_set(sop, 30), sop)
            assert wait_ended(third, time.monotonic() + SLACK_S) and third.is_aborted
        assert sop not in node.spooled()
        deadline = time.monotonic() + float(LIMITS["SONOCASE_NETWORK_TIMEOUT_S"]) + SLACK_S
        assert all(wait_ended(assoc, deadline) for assoc in holders), "an attacker holding memory was never ended"
    finally:
        for assoc in holders:
            assoc.abort()
    assert_memory_bounded(node)


@pytest.mark.parametrize("engine", ["fast", "stock"])
def test_a_peer_holding_associations_open_cannot_lock_the_pacs_out(tmp_path: Path, engine: str) -> None:
    """Issue 24, attack 7: one peer address opens more associations than there are
    slots and keeps them; it gets max_associations_per_peer of them, and the PACS
    (another address) stores. The listen backlog is the configured one (attack 9:
    it was 5)."""
    node = Node(tmp_path, engine, LIMITS | {"SONOCASE_MAX_ASSOCIATIONS_PER_PEER": "2", "SONOCASE_LISTEN_BACKLOG": "64"})
    attackers = [attacks.associate(node.port, source="127.0.0.2") for _ in range(6)]
    try:
        assert sum(a.is_established for a in attackers) == 2
        assert node.pacs_stores(), "the PACS could not store beside a peer holding associations"
        assert attacks.listen_backlog(node.port) == 64
    finally:
        for assoc in attackers:
            assoc.abort()
        node.stop()


def test_large_data_sets_arriving_together_are_all_stored_within_three_resends(node: Node) -> None:
    """Issue 24, attack 5: four 30 MB data sets at once exceed the 64 MB budget
    together. The one that began first is never the one refused, so each round
    stores at least one, and every one is stored within three resends."""
    sops = [generate_uid() for _ in range(4)]
    data = {sop: big_data_set(sop, 30) for sop in sops}
    waiting, rounds = list(sops), 0
    while waiting and rounds < 4:  # the first send and three resends
        statuses: dict[str, int] = {}
        senders = [
            threading.Thread(
                target=lambda sop=sop, statuses=statuses: statuses.update(
                    {sop: send(node, data[sop], sop, ExplicitVRLittleEndian)}
                )
            )
            for sop in waiting
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        stored = [sop for sop in waiting if statuses.get(sop) == StoreStatus.SUCCESS]
        assert stored, f"round {rounds}: none of {len(waiting)} stored ({statuses})"
        waiting, rounds = [sop for sop in waiting if sop not in stored], rounds + 1
    assert not waiting and set(sops) <= node.spooled()
    assert_memory_bounded(node, STOCK_ABORTED_MB if node.engine == "stock" else 0)


def test_a_data_set_beyond_max_dataset_mb_is_refused(node: Node) -> None:
    sop = generate_uid()
    raw = big_data_set(sop, 40)
    if node.engine == "fast":
        assert send(node, raw, sop, ExplicitVRLittleEndian) == StoreStatus.TOO_LARGE
    else:  # pynetdicom has the whole message before any handler: the stock engine aborts
        holder = send_all_but_the_last_fragment(node, raw, sop)
        assert wait_ended(holder, time.monotonic() + SLACK_S) and holder.is_aborted
    assert sop not in node.spooled()
    assert node.pacs_stores()
    assert_memory_bounded(node)
