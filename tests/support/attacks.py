"""What a hostile peer on the network does to a DICOM node, as real sockets and real
encoded bytes, and how much of the node's memory it costs (issue 15). The tests in
``test_receiver_hostile.py`` and ``bench/hostile.py`` run these against a node."""

from __future__ import annotations

import http.client
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import UltrasoundImageStorage, Verification

from tests.support.common import free_port
from tests.support.dicom_peers import NodeProcess, send_raw

#: A PDU header announcing an A-ASSOCIATE-RQ of almost 4 GiB (PS3.8 9.3.2): 6 bytes.
HUGE_PDU_LENGTH = 0xFFFFFFF0
#: A DCMTK storescu stand-in for the PACS: a small real ultrasound file.
PACS_FILE = "OBXXXX1A.dcm"


# --- the node's memory ------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """The process's resident set size now (MB)."""
    return _status_kb(pid, "VmRSS") / 1024


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size since start or :func:`reset_peak` (MB)."""
    return _status_kb(pid, "VmHWM") / 1024


def reset_peak(pid: int) -> None:
    """Reset the kernel's peak RSS record of ``pid`` (proc(5): clear_refs, value 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


# --- the PACS, storing while the attack runs ----------------------------------------


def fresh_instance(out: Path) -> Path:
    """A real ultrasound file as a new instance of a new study (never a duplicate)."""
    ds = dcmread(get_testdata_file(PACS_FILE))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = out / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path)
    return path


def storescu(port: int, path: Path, called: str = "SONOCASE", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu, as the PACS sends (its own ACSE/DIMSE timeouts: 30 s)."""
    return subprocess.run(
        ["/usr/bin/storescu", "-aec", called, "127.0.0.1", str(port), str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Node:
    """`sonocase serve` (receiver only) on a free port with its own data folder, warmed
    up by one store, its idle memory taken and its peak memory record reset: what an
    attack adds is :meth:`peak_over_idle`."""

    def __init__(self, work: Path, engine: str, settings: dict[str, str] | None = None) -> None:
        self.port, self.work, self.engine = free_port(), work, engine
        env = {
            "SONOCASE_HOST": "127.0.0.1",
            "SONOCASE_PORT": str(self.port),
            "SONOCASE_DATA_DIR": str(work / "data"),
            "SONOCASE_HTTP_PORT": "0",
            "SONOCASE_WORKERS": "0",
            "SONOCASE_RECEIVER_ENGINE": engine,
            "SONOCASE_DURABILITY": "none",
            **(settings or {}),
        }
        self.http_port = int(env["SONOCASE_HTTP_PORT"])  #: 0: the HTTP side is off
        self.process = NodeProcess(env, log=work / "node.log")
        self.pid = self.process.proc.pid
        assert self.pacs_stores(), f"the node does not store:\n{self.log()}"
        self.idle_mb = rss_mb(self.pid)
        reset_peak(self.pid)

    def pacs_stores(self) -> bool:
        """Whether a real storescu, as the PACS, stores a new study now."""
        return storescu(self.port, fresh_instance(self.work)).returncode == 0

    def peak_over_idle(self) -> float:
        return peak_rss_mb(self.pid) - self.idle_mb

    def spooled(self) -> set[str]:
        """The SOP Instance UIDs of the files in the spool."""
        return {path.stem for path in (self.work / "data" / "spool").glob("*/*.dcm")}

    def log(self) -> str:
        return (self.work / "node.log").read_text()

    def stop(self) -> None:
        self.process.stop()


# --- connections ----------------------------------------------------------------------


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 0, 0))
    return sock


@contextmanager
def held(socks: list[socket.socket]) -> Iterator[list[socket.socket]]:
    """Keep the attacker's sockets open for the block, then close them."""
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def huge_pdu_headers(port: int, count: int, length: int = HUGE_PDU_LENGTH) -> list[socket.socket]:
    """``count`` connections that each send a 6-byte A-ASSOCIATE-RQ header announcing
    ``length`` bytes, and then nothing (issue 15, attack 1)."""
    socks = [connect(port) for _ in range(count)]
    for sock in socks:
        sock.sendall(struct.pack(">BBL", 0x01, 0, length))
    return socks


def stream_after_huge_header(port: int, mb: int) -> int:
    """Send a PDU header announcing 4 GiB, then up to ``mb`` MiB as fast as the node
    reads them (issue 24, attack 8); the bytes it took before it closed."""
    sock = connect(port)
    sent, block = 0, bytes(1 << 20)
    try:
        sock.sendall(struct.pack(">BBL", 0x01, 0, HUGE_PDU_LENGTH))
        while sent < mb << 20:
            sent += sock.send(block)
    except OSError:  # closed by the node
        pass
    finally:
        sock.close()
    return sent


def silent_connections(port: int, count: int) -> list[socket.socket]:
    """``count`` TCP connections that never send a byte (a port scan, a health check)."""
    return [connect(port) for _ in range(count)]


def ended_by_peer(sock: socket.socket, timeout: float) -> bytes | None:
    """What the node sent before it closed the connection (an A-ABORT PDU, or
    nothing), or ``None`` while the connection is still open after ``timeout``."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return received


def abort_pdu(data: bytes) -> bool:
    """Whether ``data`` is an A-ABORT PDU (PS3.8 9.3.8)."""
    return len(data) == 10 and data[0] == 0x07


# --- associations that go silent --------------------------------------------------------


def associate(
    port: int,
    ae_title: str = "ATTACKER",
    called: str = "SONOCASE",
    source: str = "127.0.0.1",
) -> Association:
    """An association from ``source`` (any 127.x.y.z: another peer address on loopback)."""
    ae = AE(ae_title)
    ae.add_requested_context(Verification)
    ae.add_requested_context(UltrasoundImageStorage)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 120  # the attacker waits longer than the node
    return ae.associate("127.0.0.1", port, ae_title=called, bind_address=(source, 0))


def listen_backlog(port: int) -> int:
    """The backlog the node's listening socket on ``port`` was given (``ss``: Send-Q)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[2])


def half_sent_pdu(assoc: Association) -> None:
    """Send the first 100 bytes of a P-DATA-TF PDU announcing 16 KiB, then nothing
    (issue 15, attack 2b): the node's reader waits for the rest."""
    raw = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    assert raw is not None
    raw.sendall(struct.pack(">BBL", 0x04, 0, 16384) + bytes(100))


def send_data_set(port: int, raw: bytes, sop_instance_uid: str, syntax: str) -> int:
    """C-STORE ``raw`` exactly as it is over an association of its own; the status."""
    ae = AE("ATTACKER")
    ae.add_requested_context(UltrasoundImageStorage, syntax)
    ae.dimse_timeout = 120
    assoc = ae.associate("127.0.0.1", port, ae_title="SONOCASE")
    assert assoc.is_established, "the attacker could not associate"
    try:
        return send_raw(assoc, raw, UltrasoundImageStorage, sop_instance_uid)
    finally:
        assoc.release()


# --- crafted data sets -------------------------------------------------------------------


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element (short form for UI/CS)."""
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value


def _uid(value: str) -> bytes:
    data = value.encode()
    return data + b"\0" if len(data) % 2 else data


def identifying_elements(sop_instance_uid: str, study_uid: str | None = None) -> bytes:
    """The elements the receiver reads: SOP class, instance, modality, study, series."""
    return b"".join(
        (
            _element(0x0008, 0x0016, b"UI", _uid(UltrasoundImageStorage)),
            _element(0x0008, 0x0018, b"UI", _uid(sop_instance_uid)),
            _element(0x0008, 0x0060, b"CS", b"US"),
            _element(0x0020, 0x000D, b"UI", _uid(study_uid or generate_uid())),
            _element(0x0020, 0x000E, b"UI", _uid(generate_uid())),
        )
    )


def _pixel_data_header(size: int) -> bytes:
    return struct.pack("<HH", 0x7FE0, 0x0010) + b"OB\0\0" + struct.pack("<I", size)


def pixel_data(size: int) -> bytes:
    """Pixel Data (OB) of ``size`` zero bytes, explicit VR little endian."""
    return _pixel_data_header(size) + bytes(size)


def deflate_bomb(sop_instance_uid: str, inflated_mb: int) -> bytes:
    """A Deflated Explicit VR Little Endian data set (PS3.5 A.5) whose Pixel Data is
    ``inflated_mb`` MiB of zeros: about a thousandth of that on the wire."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [
        deflater.compress(identifying_elements(sop_instance_uid)),
        deflater.compress(_pixel_data_header(inflated_mb << 20)),
    ]
    block = bytes(1 << 20)
    out += [deflater.compress(block) for _ in range(inflated_mb)]
    out.append(deflater.flush())
    return b"".join(out)


def deeply_nested(
    sop_instance_uid: str,
    depth: int,
    explicit_lengths: bool = False,
    outer_vr: bytes = b"SQ",
) -> bytes:
    """An Explicit VR Little Endian data set with ``depth`` sequences (Content
    Sequence) nested one in the other's item, of undefined or explicit lengths
    (issue 24, attack 6). ``outer_vr=b"UN"`` (explicit lengths): the outermost one
    written as UN, whose value pydicom reads as implicit VR sequences."""
    if explicit_lengths:
        tag, heads, inner = struct.pack("<HH", 0x0040, 0xA730), [], 0
        for level in range(depth):  # the innermost first: each length holds what is inside it
            outermost = level == depth - 1
            if outer_vr == b"UN" and not outermost:  # inside a UN: implicit VR
                head = tag + struct.pack("<I", 8 + inner)
            else:
                head = tag + (outer_vr if outermost else b"SQ") + b"\0\0" + struct.pack("<I", 8 + inner)
            heads.append(head + struct.pack("<HHI", 0xFFFE, 0xE000, inner))
            inner += len(heads[-1])
        return identifying_elements(sop_instance_uid) + b"".join(reversed(heads))
    sequence = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\0\0" + struct.pack("<I", 0xFFFFFFFF)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    sequence_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return identifying_elements(sop_instance_uid) + (sequence + item) * depth + (item_end + sequence_end) * depth


# --- the HTTP side (issue 24) -----------------------------------------------------------

#: A sign-in form whose body is announced and then sent a byte at a time.
SLOW_FORM = (
    b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    b"Content-Length: 1000\r\n\r\n"
)


@contextmanager
def http_flood(
    port: int,
    connections: int,
    request: bytes = b"",
    drip_s: float = 0.0,
) -> Iterator[list[int]]:
    """``connections`` connections to the HTTP port kept open for the block: each sends
    ``request`` (nothing: an idle connection) and then, every ``drip_s`` (0: never),
    one more byte; one the node closes is opened again at once (issue 24, attack 1).
    Yields a one-element list counting the connections opened."""
    opened, stop = [0], threading.Event()

    def keep_open() -> None:
        socks: list[socket.socket | None] = [None] * connections
        last_drip = time.monotonic()
        while not stop.is_set():
            drip = drip_s > 0 and time.monotonic() - last_drip >= drip_s
            last_drip = time.monotonic() if drip else last_drip
            for i, sock in enumerate(socks):
                try:
                    if sock is None:
                        sock = socks[i] = socket.create_connection(("127.0.0.1", port), timeout=5)
                        sock.setblocking(False)
                        opened[0] += 1
                        sock.send(request)
                    elif sock.recv(4096) == b"":  # closed by the node: open another
                        raise ConnectionResetError
                except BlockingIOError:
                    if drip:
                        sock.send(b"a")
                except OSError:
                    if sock is not None:
                        sock.close()
                    socks[i] = None
            stop.wait(0.01)
        for sock in socks:
            if sock is not None:
                sock.close()

    thread = threading.Thread(target=keep_open, daemon=True)
    thread.start()
    try:
        yield opened
    finally:
        stop.set()
        thread.join(timeout=10)


def drip_until_closed(port: int, request: bytes, every_s: float, give_up_s: float) -> float:
    """Send ``request`` (headers), then a byte of body every ``every_s``; the seconds
    until the node closed the connection (``give_up_s`` if it never did)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=every_s)
    sock.sendall(request)
    started = time.monotonic()
    try:
        while time.monotonic() - started < give_up_s:
            try:
                if sock.recv(1) == b"":
                    break
            except TimeoutError:
                sock.sendall(b"a")
    except ConnectionError:
        pass
    finally:
        sock.close()
    return min(time.monotonic() - started, give_up_s)


def healthz_ok(port: int, timeout: float = 1.0) -> bool:
    """One GET /healthz on a new connection (as a Kubernetes probe): 200 within ``timeout``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def health_answered(port: int, probes: int, every_s: float, timeout: float = 1.0) -> float:
    """The share of ``probes`` probes (:func:`healthz_ok`, one every ``every_s``) answered."""
    answered = 0
    for _ in range(probes):
        started = time.monotonic()
        answered += healthz_ok(port, timeout)
        time.sleep(max(0.0, every_s - (time.monotonic() - started)))
    return answered / probes


@contextmanager
def probing_health(port: int, every_s: float = 1.0) -> Iterator[list[int]]:
    """Probe /healthz every ``every_s`` while the block runs; yields [answered, probes]."""
    counts, stop = [0, 0], threading.Event()

    def probe() -> None:
        while not stop.wait(every_s):
            counts[0] += healthz_ok(port)
            counts[1] += 1

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    try:
        yield counts
    finally:
        stop.set()
        thread.join(timeout=5)
