"""Hostile-network check (issues 15 and 24): each attack against a fresh `sonocase
serve`, on each receiver engine, with a real DCMTK storescu storing a new study while
the attack runs. Prints, per attack and engine, the node's peak memory over idle (MB),
whether the PACS's store succeeded during the attack, and what the node did with the
attacker; the HTTP attacks also the share of /healthz probes answered.

    python bench/hostile.py [--engines fast,stock] [--attacks huge-pdu,...]

The tests (tests/test_receiver_hostile.py, tests/test_web.py,
tests/test_dicomweb_receive.py) assert the bounds with small settings; this prints
the figures of the issues' attacks at the default settings for the closing note. Run
it with PYTHONPATH pointing at another checkout to measure that one (the engines'
names must exist there). The HTTP attacks do not depend on the engine: they run on
the first engine only. During every attack a prober asks /healthz once a second, as
Kubernetes' liveness probe does.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import UltrasoundImageStorage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from service.ingest.rules import encode_file_meta
from tests.support import attacks
from tests.support.attacks import Node
from tests.support.common import free_port

TOKEN = "bench-hostile-token-0123456789"
#: The HTTP side on, with a token (status page, API, STOW-RS).
WEB = {"SONOCASE_WEB_TOKEN": TOKEN}
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def huge_pdu(node: Node, connections: int, length: int) -> str:
    with attacks.held(attacks.huge_pdu_headers(node.port, connections, length)) as socks:
        time.sleep(2)  # the node reads (or allocates) meanwhile
        during = node.pacs_stores()
        start = time.monotonic()
        ends = [attacks.ended_by_peer(sock, 15) for sock in socks]
    closed = sum(end is not None for end in ends)
    aborts = sum(end is not None and attacks.abort_pdu(end) for end in ends)
    return (
        f"PACS during: {'ok' if during else 'FAILED'}; {closed}/{connections} closed by the node "
        f"({aborts} with A-ABORT) within {time.monotonic() - start:.1f} s of the store"
    )


def huge_pdu_stream(node: Node, streams: int, mb: int) -> str:
    """``streams`` peers each sending a 4 GiB PDU header, then up to ``mb`` MiB."""
    took: list[int] = []
    senders = [
        threading.Thread(target=lambda: took.append(attacks.stream_after_huge_header(node.port, mb)))
        for _ in range(streams)
    ]
    for sender in senders:
        sender.start()
    during = node.pacs_stores()
    for sender in senders:
        sender.join()
    return (
        f"{streams} streams of up to {mb} MB after a 4 GiB header: the node took {sum(took) / 2**20:.0f} MB "
        f"before closing; PACS during: {'ok' if during else 'FAILED'}"
    )


def silent(node: Node, connections: int) -> str:
    with attacks.held(attacks.silent_connections(node.port, connections)) as socks:
        time.sleep(0.5)
        during = node.pacs_stores()
        start = time.monotonic()
        closed = sum(attacks.ended_by_peer(sock, 30) is not None for sock in socks)
    return (
        f"PACS during: {'ok' if during else 'FAILED'}; {closed}/{connections} closed by the node "
        f"within {time.monotonic() - start:.1f} s"
    )


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
    after = (
        "ok at once" if during else (f"ok after {recovered:.0f} s" if recovered else f"FAILED for {give_up_s:.0f} s")
    )
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


def deep_nesting_explicit(node: Node, depth: int) -> str:
    sop = generate_uid()
    raw = attacks.deeply_nested(sop, depth, explicit_lengths=True)
    status = attacks.send_data_set(node.port, raw, sop, ExplicitVRLittleEndian)
    return f"explicit lengths, depth {depth} -> status 0x{status:04X}"


def large_together(node: Node, count: int, mb: int, resends: int = 3) -> str:
    """``count`` data sets of ``mb`` MiB sent at once, the refused ones sent again."""
    raw = {
        sop: attacks.identifying_elements(sop) + attacks.pixel_data(mb << 20)
        for sop in (generate_uid() for _ in range(count))
    }
    waiting, rounds = list(raw), []
    for _ in range(1 + resends):
        statuses: dict[str, int] = {}

        def send(sop: str, statuses: dict[str, int] = statuses) -> None:
            try:
                statuses[sop] = attacks.send_data_set(node.port, raw[sop], sop, ExplicitVRLittleEndian)
            except AssertionError:  # stock engine: the association aborted
                statuses[sop] = -1

        senders = [threading.Thread(target=send, args=(sop,)) for sop in waiting]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        waiting = [sop for sop in waiting if statuses.get(sop) != 0]
        rounds.append(count - len(waiting))
        if not waiting:
            break
    return f"{count} x {mb} MB at once: stored after each round (first send, resends) {rounds}"


def echo_holders(node: Node, holders: int, tries: int, echo_every_s: float = 20) -> str:
    """``holders`` associations from one other address kept open with a C-ECHO now
    and then, while the PACS tries ``tries`` stores, one a second."""
    assocs = [attacks.associate(node.port, source="127.0.0.2") for _ in range(holders)]
    stop = threading.Event()

    def echo() -> None:
        while not stop.wait(echo_every_s):
            for assoc in assocs:
                if assoc.is_established:
                    assoc.send_c_echo()

    threading.Thread(target=echo, daemon=True).start()
    try:
        stored = 0
        for _ in range(tries):
            stored += node.pacs_stores()
            time.sleep(1)
        held = sum(a.is_established for a in assocs)
    finally:
        stop.set()
        for assoc in assocs:
            assoc.abort()
    return (
        f"{held}/{holders} holders associated; PACS stored {stored}/{tries}; listen backlog "
        f"{attacks.listen_backlog(node.port)}"
    )


# --- the HTTP side (issue 24) -------------------------------------------------------------------


def http_flood(node: Node, request: bytes, drip_s: float, connections: int = 70, probes: int = 30) -> str:
    with attacks.http_flood(node.http_port, connections, request, drip_s) as opened:
        time.sleep(1)
        during = node.pacs_stores()
        answered = attacks.health_answered(node.http_port, probes, 1.0)
    return (
        f"{connections} connections ({opened[0]} opened in all); /healthz answered {answered:.0%} of {probes} "
        f"probes; PACS during: {'ok' if during else 'FAILED'}"
    )


def stow_drip(node: Node, every_s: float = 8, give_up_s: float = 70) -> str:
    """A STOW-RS body, with the right token, sent one byte every ``every_s``."""
    held = attacks.drip_until_closed(
        node.http_port,
        b"POST /studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Length: 100000"
        b'\r\nContent-Type: multipart/related; type="application/dicom"; boundary=b\r\n\r\n' % TOKEN.encode(),
        every_s,
        give_up_s,
    )
    return f"a byte every {every_s:g} s: connection closed after {held:.0f} s" + (
        " (gave up)" if held >= give_up_s else ""
    )


def stow_empty_parts(node: Node, parts: int) -> str:
    boundary = "bbbbbbbb"
    body = f"--{boundary}\r\n\r\n\r\n".encode() * parts + f"--{boundary}--\r\n".encode()
    log_before = len(node.log().splitlines())
    conn = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=900)
    started = time.monotonic()
    try:
        conn.request(
            "POST",
            "/studies",
            body=body,
            headers=BEARER | {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
        )
        response = conn.getresponse()
        status, answer = response.status, response.read()
    except OSError as exc:
        status, answer = 0, repr(exc).encode()
    finally:
        conn.close()
    took = time.monotonic() - started
    lines = len(node.log().splitlines()) - log_before
    return (
        f"{parts} empty parts in {len(body) / 1e6:.1f} MB: HTTP {status} after {took:.1f} s, answer "
        f"{len(answer) / 1e6:.2f} MB, {lines} log lines"
    )


def stow_big_part(node: Node, mb: int) -> str:
    """One STOW-RS part whose Pixel Data is ``mb`` MiB (issue 24: 237 MB cost +327 MB)."""
    sop = generate_uid()
    part = (
        encode_file_meta(UltrasoundImageStorage, sop, ExplicitVRLittleEndian, "BENCH")
        + attacks.identifying_elements(sop)
        + attacks.pixel_data(mb << 20)
    )
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n--b--\r\n"
    del part
    status, _ = _http(
        node,
        "POST",
        "/studies",
        BEARER | {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
        body,
        timeout=600,
    )
    return f"one part of {len(body) / 1e6:.0f} MB: HTTP {status}"


def _http(
    node: Node, method: str, path: str, headers: dict[str, str], body: bytes | None = None, timeout: float = 10
) -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def login_lockout(node: Node, wrong: int = 5) -> str:
    for i in range(wrong):
        _http(node, "GET", "/api/v1/studies", {"Authorization": f"Bearer wrong-{i}"})
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    login = _http(node, "POST", "/login", form, f"token={TOKEN}".encode())[0]
    bearer = _http(node, "GET", "/api/v1/studies", BEARER)[0]
    again = _http(node, "GET", "/api/v1/studies", {"Authorization": "Bearer wrong-again"})[0]
    return f"after {wrong} wrong tokens: right login {login}, right Bearer {bearer}, another wrong one {again}"


def csrf(node: Node) -> str:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    _, headers = _http(node, "POST", "/login", form, f"token={TOKEN}".encode())
    cookie = {"Cookie": headers.get("set-cookie", "").split(";")[0]}
    path = "/api/v1/studies/1.2.3/retry"
    plain = _http(node, "POST", path, cookie)[0]
    cross = _http(node, "POST", path, cookie | {"Sec-Fetch-Site": "cross-site"})[0]
    text = _http(node, "POST", path, cookie | {"Content-Type": "text/plain"}, b"x")[0]
    openapi = _http(node, "GET", "/api/openapi.json", {})[0]
    return (
        f"session POST retry: no token {plain}, cross-site {cross}, text/plain {text} (404: it got through "
        f"to an unknown study; 403: refused); /api/openapi.json without a token {openapi}"
    )


#: name: (settings beyond the defaults, whether it attacks the HTTP side, the attack).
#: Every node serves HTTP; a prober asks /healthz once a second during each attack.
ATTACKS: dict[str, tuple[dict[str, str], bool, Callable[[Node, argparse.Namespace], str]]] = {
    "huge-pdu": ({}, False, lambda node, a: huge_pdu(node, a.connections, a.pdu_length)),
    "huge-pdu-stream": ({}, False, lambda node, a: huge_pdu_stream(node, 2, 1000)),
    "silent": ({}, False, lambda node, a: silent(node, 10)),
    "half-sent": ({}, False, lambda node, a: half_sent(node, 10)),
    "deflate-bomb": ({}, False, lambda node, a: deflate_bomb(node, a.inflated_mb)),
    "deep-nesting": ({}, False, lambda node, a: deep_nesting(node, 1000)),
    "deep-nesting-explicit": ({}, False, lambda node, a: deep_nesting_explicit(node, 1000)),
    "large-together": ({}, False, lambda node, a: large_together(node, 4, 100)),
    "echo-holders": ({}, False, lambda node, a: echo_holders(node, 10, 24)),
    "http-idle": (WEB, True, lambda node, a: http_flood(node, b"", 0)),
    "http-slow-forms": (WEB, True, lambda node, a: http_flood(node, attacks.SLOW_FORM, 8)),
    "stow-drip": (WEB, True, lambda node, a: stow_drip(node)),
    "stow-empty-parts": (WEB, True, lambda node, a: stow_empty_parts(node, a.parts)),
    "stow-big-part": (WEB, True, lambda node, a: stow_big_part(node, 237)),
    "login-lockout": (WEB, True, lambda node, a: login_lockout(node)),
    "csrf": (WEB, True, lambda node, a: csrf(node)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="fast,stock")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--connections", type=int, default=4, help="huge-pdu: connections")
    parser.add_argument("--pdu-length", type=lambda s: int(s, 0), default=attacks.HUGE_PDU_LENGTH)
    parser.add_argument("--inflated-mb", type=int, default=1024, help="deflate-bomb: MiB once inflated")
    parser.add_argument("--parts", type=int, default=1_000_000, help="stow-empty-parts: parts")
    args = parser.parse_args()
    print(f"{'attack':22s} {'engine':6s} {'peak MB':>8s}  outcome", flush=True)
    engines = args.engines.split(",")
    for name in args.attacks.split(","):
        settings, on_http, attack = ATTACKS[name]
        for engine in engines[:1] if on_http else engines:
            with tempfile.TemporaryDirectory(prefix="sonocase-hostile-") as work:
                node = Node(
                    Path(work),
                    engine,
                    {"SONOCASE_LOG_LEVEL": "WARNING", **settings, "SONOCASE_HTTP_PORT": str(free_port())},
                )
                try:
                    with attacks.probing_health(node.http_port) as health:
                        outcome = attack(node, args)
                    peak = node.peak_over_idle()
                    after = "PACS after: " + ("ok" if node.pacs_stores() else "FAILED")
                finally:
                    node.process.stop()
            answered = f"{health[0]}/{health[1]}" if health[1] else "-"
            print(f"{name:22s} {engine:6s} {peak:8.0f}  {outcome}; /healthz during: {answered}; {after}", flush=True)


if __name__ == "__main__":
    main()
