"""Hostile-network check (issue 15): each attack against a fresh `sonocase serve`, on
each receiver engine, with a real DCMTK storescu storing a new study while the attack
runs. Prints, per attack and engine, the node's peak memory over idle (MB), whether the
PACS's store succeeded during the attack, and what the node did with the attacker.

    python bench/hostile.py [--engines fast,stock] [--attacks huge-pdu,...]

The tests (tests/test_receiver_hostile.py) assert the bounds; this prints the figures
for the closing note. Run it with PYTHONPATH pointing at another checkout to measure
that one (the engines' names must exist there).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import attacks  # noqa: E402  (the tests' helpers: one definition of each attack)
from attacks import Node  # noqa: E402


def huge_pdu(node: Node, connections: int, length: int) -> str:
    with attacks.held(attacks.huge_pdu_headers(node.port, connections, length)) as socks:
        time.sleep(2)  # the node reads (or allocates) meanwhile
        during = node.pacs_stores()
        start = time.monotonic()
        ends = [attacks.ended_by_peer(sock, 15) for sock in socks]
    closed = sum(end is not None for end in ends)
    aborts = sum(end is not None and attacks.abort_pdu(end) for end in ends)
    return (f"PACS during: {'ok' if during else 'FAILED'}; {closed}/{connections} closed by the node "
            f"({aborts} with A-ABORT) within {time.monotonic() - start:.1f} s of the store")


def silent(node: Node, connections: int) -> str:
    with attacks.held(attacks.silent_connections(node.port, connections)) as socks:
        time.sleep(0.5)
        during = node.pacs_stores()
        start = time.monotonic()
        closed = sum(attacks.ended_by_peer(sock, 30) is not None for sock in socks)
    return (f"PACS during: {'ok' if during else 'FAILED'}; {closed}/{connections} closed by the node "
            f"within {time.monotonic() - start:.1f} s")


def half_sent(node: Node, connections: int, give_up_s: float = 40) -> str:
    assocs = [attacks.associate(node.port) for _ in range(connections)]
    established = sum(a.is_established for a in assocs)
    for assoc in assocs:
        if assoc.is_established:
            attacks.half_sent_pdu(assoc)
    start = time.monotonic()
    during = node.pacs_stores()
    recovered = None
    while not during and time.monotonic() - start < give_up_s:
        if node.pacs_stores():
            recovered = time.monotonic() - start
            break
        time.sleep(1)
    for assoc in assocs:
        assoc.abort()
    after = "ok at once" if during else (f"ok after {recovered:.0f} s" if recovered else f"FAILED for {give_up_s:.0f} s")
    return f"{established}/{connections} attackers associated; PACS: {after}"


def deflate_bomb(node: Node, inflated_mb: int) -> str:
    sop = generate_uid()
    raw = attacks.deflate_bomb(sop, inflated_mb)
    status = attacks.send_data_set(node.port, raw, sop, DeflatedExplicitVRLittleEndian)
    kept = "kept" if sop in node.spooled() else "not kept"
    return f"{len(raw) / 2**20:.2f} MB on the wire -> status 0x{status:04X}, {kept}"


def deep_nesting(node: Node, depth: int) -> str:
    sop = generate_uid()
    status = attacks.send_data_set(node.port, attacks.deeply_nested(sop, depth), sop, ExplicitVRLittleEndian)
    return f"depth {depth} -> status 0x{status:04X}"


ATTACKS: dict[str, Callable[[Node, argparse.Namespace], str]] = {
    "huge-pdu": lambda node, a: huge_pdu(node, a.connections, a.pdu_length),
    "silent": lambda node, a: silent(node, 10),
    "half-sent": lambda node, a: half_sent(node, 10),
    "deflate-bomb": lambda node, a: deflate_bomb(node, a.inflated_mb),
    "deep-nesting": lambda node, a: deep_nesting(node, 1000),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="fast,stock")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--connections", type=int, default=4, help="huge-pdu: connections")
    parser.add_argument("--pdu-length", type=lambda s: int(s, 0), default=attacks.HUGE_PDU_LENGTH)
    parser.add_argument("--inflated-mb", type=int, default=1024, help="deflate-bomb: MiB once inflated")
    args = parser.parse_args()
    print(f"{'attack':14s} {'engine':6s} {'peak MB':>8s}  outcome", flush=True)
    for name in args.attacks.split(","):
        for engine in args.engines.split(","):
            with tempfile.TemporaryDirectory(prefix="sonocase-hostile-") as work:
                node = Node(Path(work), engine, {"SONOCASE_LOG_LEVEL": "WARNING"})
                try:
                    outcome = ATTACKS[name](node, args)
                    peak = node.peak_over_idle()
                    after = "PACS after: " + ("ok" if node.pacs_stores() else "FAILED")
                finally:
                    node.process.stop()
            print(f"{name:14s} {engine:6s} {peak:8.0f}  {outcome}; {after}", flush=True)


if __name__ == "__main__":
    main()
