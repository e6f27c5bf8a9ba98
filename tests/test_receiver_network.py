"""The receiver on loopback against real peers: DCMTK echoscu/storescu and a
pynetdicom SCU, with every ultrasound file shipped in pydicom and pydicom-data; on
both engines (``engine``), unless a test is about one."""

from __future__ import annotations

import logging
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pynetdicom
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    JPEGLSNearLossless,
)
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import Verification

from service.common.metrics import CONNECTIONS_REFUSED, CSTORE_RESPONSES
from service.common.spool import free_disk_mb
from service.ingest import store as store_module
from service.ingest.admission import GuardedServer
from service.ingest.rules import STORAGE_SOP_CLASSES, StoreStatus
from service.ingest.server import ReceiverService, handle_store
from service.ingest.store import StoreSCP
from service.ledger import Ledger
from service.settings import Settings
from tests.support import attacks
from tests.support.common import dcmtk, free_port, self_signed, wait_until
from tests.support.dicom_peers import (
    DCMTK_ENV,
    STORESCU_SYNTAX_OPTION,
    ULTRASOUND_FILES,
    UsFile,
    cstore_fragments,
    data_set_offset,
    rewrite,
    send_raw,
    split_file,
    ultrasound_files,
)
from tests.support.fuzz import Mutation, mutations, pdu_streams

pytestmark = pytest.mark.integration

US_FILES = {f.name: f for f in ultrasound_files()}


class Receiver:
    """A running receiver with its ledger and settings, stopped by the fixture."""

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.ledger = ledger
        self.service = ReceiverService(settings, ledger)
        self.service.start()
        assert self.service.store is not None
        self.store = self.service.store

    def stored(self, f: UsFile) -> Path:
        return self.settings.spool_dir / f.study_uid / f"{f.sop_instance_uid}.dcm"

    @property
    def incoming(self) -> Path:
        """Where data sets are spooled while they arrive."""
        return self.store.incoming_dir


@pytest.fixture(params=["fast", "stock"])
def engine(request: pytest.FixtureRequest) -> str:
    """The receiver engine a test runs on: each in turn."""
    return str(request.param)


@pytest.fixture
def start(settings: Settings, engine: str) -> Iterator[Callable[..., Receiver]]:
    """Start a receiver with some settings changed; all are stopped after the test."""
    running: list[Receiver] = []

    def _start(**changes: object) -> Receiver:
        changes.setdefault("port", free_port())  # each receiver its own port, all one ledger
        changes.setdefault("receiver_engine", engine)
        rx = Receiver(settings.model_copy(update=changes), Ledger(settings.ledger_path, durable=False))
        running.append(rx)
        return rx

    yield _start
    for rx in running:
        rx.service.stop()
        rx.ledger.close()
        # every data set spooled while it arrived was kept or removed, whatever came
        assert not list(rx.incoming.iterdir()), "temporary spool files left behind"


@pytest.fixture
def receiver(start: Callable[..., Receiver]) -> Receiver:
    return start()


def scu(ae_title: str = "TESTSCU", files: Sequence[UsFile] = (), verification: bool = True) -> AE:
    """A pynetdicom SCU proposing each file's SOP class with the file's own transfer
    syntax only, so nothing can be transcoded."""
    ae = AE(ae_title)
    for sop_class, syntax in sorted({(f.sop_class_uid, f.transfer_syntax) for f in files}):
        ae.add_requested_context(sop_class, syntax)
    if verification:
        ae.add_requested_context(Verification)
    return ae


def associate(rx: Receiver, ae: AE, called: str | None = None, **kwargs: object) -> Association:
    return ae.associate("127.0.0.1", rx.settings.port, ae_title=called or rx.settings.ae_title, **kwargs)


def echoscu(rx: Receiver, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk("echoscu"), "-aec", rx.settings.ae_title, *args, "127.0.0.1", str(rx.settings.port)],
        check=False,
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_stored_as_sent(rx: Receiver, f: UsFile) -> None:
    """Byte-for-byte the data set that was sent, and its pixels decode (all frames;
    colour conversion skipped, it tests no decoder)."""
    stored = rx.stored(f)
    assert stored.read_bytes().endswith(f.data_set), f"{f.name}: stored data set differs from what was sent"
    ds = dcmread(stored)
    assert ds.file_meta.TransferSyntaxUID == f.transfer_syntax
    ds.pixel_array_options(as_rgb=False)
    pixels = ds.pixel_array
    frames = int(ds.get("NumberOfFrames") or 1)
    expected = (frames,) * (frames > 1) + (ds.Rows, ds.Columns) + (ds.SamplesPerPixel,) * (ds.SamplesPerPixel > 1)
    assert pixels.shape == expected, f"{f.name}: decoded {pixels.shape}, expected {expected}"


# --- real peers ------------------------------------------------------------------


def test_dcmtk_echoscu(receiver: Receiver) -> None:
    result = echoscu(receiver)
    assert result.returncode == 0, result.stderr


def storescu(port: int, f: UsFile, called: str = "SONOCASE") -> subprocess.CompletedProcess[str]:
    """DCMTK storescu proposing only the file's SOP class (-R) with its own syntax first."""
    return subprocess.run(
        [
            dcmtk("storescu"),
            "-R",
            STORESCU_SYNTAX_OPTION[UID(f.transfer_syntax)],
            "-aec",
            called,
            "127.0.0.1",
            str(port),
            str(f.path),
        ],
        check=False,
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def witness(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK storescp in bit-preserving mode (-B): its file holds exactly what
    storescu put on the wire, which is not always the file it read (storescu
    re-encodes undefined-length sequences with explicit lengths)."""
    port, out = free_port(), tmp_path / "witness"
    out.mkdir()
    proc = subprocess.Popen([dcmtk("storescp"), "-B", "+xa", "-od", str(out), str(port)], env=DCMTK_ENV)
    deadline = time.monotonic() + 10
    while (
        subprocess.run(
            [dcmtk("echoscu"), "127.0.0.1", str(port)], check=False, env=DCMTK_ENV, capture_output=True
        ).returncode
        != 0
    ):
        assert time.monotonic() < deadline, "storescp did not start"
        time.sleep(0.05)
    yield port, out
    proc.terminate()
    proc.wait(timeout=10)


@pytest.mark.parametrize("name", sorted(ULTRASOUND_FILES))
def test_dcmtk_storescu_sends_every_ultrasound_file(receiver: Receiver, witness: tuple[int, Path], name: str) -> None:
    f = US_FILES[name]
    for port in (receiver.settings.port, witness[0]):
        result = storescu(port, f)
        assert result.returncode == 0, result.stderr
    [on_wire] = witness[1].iterdir()
    sent = on_wire.read_bytes()
    assert_stored_as_sent(receiver, replace(f, data_set=sent[data_set_offset(sent) :]))


@pytest.mark.parametrize("name", sorted(ULTRASOUND_FILES))
def test_pynetdicom_scu_sends_every_ultrasound_file(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # Send the file's data set straight from disk, as encoded (pynetdicom's switch).
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    f = US_FILES[name]
    assoc = associate(receiver, scu(files=[f]))
    assert assoc.is_established
    try:
        assert assoc.send_c_store(f.path).Status == StoreStatus.SUCCESS
    finally:
        assoc.release()
    assert_stored_as_sent(receiver, f)
    [rec] = receiver.ledger.instances(f.study_uid)
    assert (rec.calling_ae, rec.transfer_syntax, rec.modality) == ("TESTSCU", f.transfer_syntax, "US")


@pytest.mark.parametrize(
    "name,syntax",
    [
        ("US1_UNCR.dcm", JPEGLSLossless),
        ("US1_UNCR.dcm", JPEGLSNearLossless),
        ("OBXXXX1A.dcm", DeflatedExplicitVRLittleEndian),
    ],
)
def test_syntaxes_no_shipped_file_uses(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, syntax: str
) -> None:
    """JPEG-LS and deflated, made from real files by pydicom (pyjpegls, zlib)."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    ds = dcmread(US_FILES[name].path)
    if UID(syntax).is_compressed:
        ds.compress(syntax, **({"jls_error": 2} if syntax == JPEGLSNearLossless else {}))
    else:
        ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(tmp_path / "made.dcm", enforce_file_format=True)
    f = split_file(tmp_path / "made.dcm")
    assoc = associate(receiver, scu(files=[f]))
    try:
        assert assoc.send_c_store(f.path).Status == StoreStatus.SUCCESS
    finally:
        assoc.release()
    assert_stored_as_sent(receiver, f)


def test_duplicate_over_the_network_is_idempotent(receiver: Receiver) -> None:
    f = US_FILES["OBXXXX1A_rle.dcm"]
    assoc = associate(receiver, scu(files=[f]))
    try:
        assert send_raw(assoc, f.data_set, f.sop_class_uid, f.sop_instance_uid) == StoreStatus.SUCCESS
        mtime = receiver.stored(f).stat().st_mtime_ns
        assert send_raw(assoc, f.data_set, f.sop_class_uid, f.sop_instance_uid, 2) == StoreStatus.SUCCESS
    finally:
        assoc.release()
    assert receiver.stored(f).stat().st_mtime_ns == mtime
    assert receiver.ledger.instance_count() == 1


def send_over_new_association(rx: Receiver, f: UsFile) -> int:
    """Send ``f`` as it is over an association of its own; return the status."""
    assoc = associate(rx, scu(files=[f]))
    try:
        return send_raw(assoc, f.data_set, f.sop_class_uid, f.sop_instance_uid)
    finally:
        assoc.release()


@pytest.mark.parametrize("engine", ["fast"])  # the stock engine writes the file when the data set is complete
def test_data_set_is_spooled_while_it_arrives(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each fragment goes to disk on arrival; the handler only names the file. The
    handler's own write is made to fail (a stand-in: it must not be needed)."""

    def unused(*args: object) -> None:
        raise AssertionError("the handler wrote the file again")

    monkeypatch.setattr(store_module, "write_new_file", unused)
    f = US_FILES["US1_UNCR.dcm"]
    assoc = associate(receiver, scu(files=[f]))
    try:
        for fragment in cstore_fragments(assoc, f.data_set, f.sop_class_uid, f.sop_instance_uid, max_pdu=16384)[:-1]:
            assoc.dul.send_pdu(fragment)
        # half-way: the fragments so far are on disk under a temporary name
        assert wait_until(lambda: sum(p.stat().st_size for p in receiver.incoming.iterdir()) > len(f.data_set) // 2)
        assoc.abort()
    finally:
        assoc.release()
    assert wait_until(lambda: not list(receiver.incoming.iterdir())), "an aborted transfer left its file"
    assert send_over_new_association(receiver, f) == StoreStatus.SUCCESS
    assert_stored_as_sent(receiver, f)
    [rec] = receiver.ledger.instances(f.study_uid)
    assert rec.size == receiver.stored(f).stat().st_size


def test_full_spool_disk_refuses_with_out_of_resources(small_disk: Path, start: Callable[..., Receiver]) -> None:
    """The spool's disk fills while a data set arrives: the spooled fragments and the
    handler's own write both meet ENOSPC, the peer hears 0xA700, and its retry is
    stored once there is room (no temporary file left: see the fixture)."""
    rx = start(data_dir=small_disk, min_free_disk_mb=0)
    f = US_FILES["US1_UNCR.dcm"]  # 0.9 MB
    room = small_disk / "room"
    room.write_bytes(bytes(int(free_disk_mb(small_disk) * 2**20) - (300 << 10)))
    assert send_over_new_association(rx, f) == StoreStatus.OUT_OF_RESOURCES
    assert not rx.stored(f).exists() and not rx.ledger.has_instance(f.sop_instance_uid)
    room.unlink()
    assert send_over_new_association(rx, f) == StoreStatus.SUCCESS
    assert_stored_as_sent(rx, f)


@pytest.mark.parametrize("engine", ["fast"])
def test_data_set_is_still_stored_when_spooling_it_fails(receiver: Receiver) -> None:
    """No folder to spool into (a real fault): the handler writes the file itself."""
    receiver.incoming.rmdir()
    f = US_FILES["OBXXXX1A_rle.dcm"]
    assert send_over_new_association(receiver, f) == StoreStatus.SUCCESS
    assert_stored_as_sent(receiver, f)
    receiver.incoming.mkdir()


# --- the two engines ------------------------------------------------------------------


def test_a_handler_bound_to_c_store_is_the_one_called(receiver: Receiver) -> None:
    """Stock: pynetdicom fires EVT_C_STORE for each request; fast: it serves C-STORE
    itself only while our handler is the bound one, so a handler bound in its place
    (an observer wrapping ours here) is called on both."""
    seen: list[str] = []

    def observer(event: Event, store: StoreSCP) -> Dataset:
        seen.append(str(event.request.AffectedSOPInstanceUID))
        return handle_store(event, store)

    assert receiver.service.server is not None
    receiver.service.server.bind(evt.EVT_C_STORE, observer, [receiver.store])
    files = [US_FILES["US1_UNCR.dcm"], US_FILES["OBXXXX1A_rle.dcm"]]
    for f in files:
        assert send_over_new_association(receiver, f) == StoreStatus.SUCCESS
        assert_stored_as_sent(receiver, f)
    assert seen == [f.sop_instance_uid for f in files]


@pytest.mark.parametrize("engine", ["fast"])
def test_fast_engine_on_another_pynetdicom_runs_stock(
    start: Callable[..., Receiver], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(pynetdicom, "__version__", "3.0.5")  # what unsupported_reason() reads
    with caplog.at_level(logging.INFO, logger="service.ingest.server"):
        rx = start()
    assert type(rx.service.server) is GuardedServer, "the fast engine's server runs on another pynetdicom"
    assert "pynetdicom 3.0.5 is installed" in caplog.text and "running the stock engine" in caplog.text
    assert "(stock engine)" in caplog.text
    f = US_FILES["OBXXXX1A_rle.dcm"]
    assert send_over_new_association(rx, f) == StoreStatus.SUCCESS
    assert_stored_as_sent(rx, f)


# --- refusing associations -----------------------------------------------------------


def rejection(assoc: Association) -> tuple[int, int, int]:
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    return rj.result, rj.result_source, rj.diagnostic


def test_unknown_calling_ae_is_rejected(start: Callable[..., Receiver]) -> None:
    rx = start(allowed_callers=["PACS"])
    assert rejection(associate(rx, scu("INTRUDER"))) == (1, 1, 3)
    result = echoscu(rx, "-aet", "INTRUDER")
    assert result.returncode != 0 and "Calling AE Title Not Recognized" in result.stderr + result.stdout
    assert echoscu(rx, "-aet", "PACS").returncode == 0


def test_wrong_called_ae_is_rejected(receiver: Receiver) -> None:
    assert rejection(associate(receiver, scu(), called="NOT-US")) == (1, 1, 7)


def test_unknown_host_is_disconnected_before_anything_is_read(start: Callable[..., Receiver]) -> None:
    rx = start(allowed_hosts=["192.0.2.1", "10.0.0.0/8"])
    before = refusals("host")
    with attacks.held(attacks.huge_pdu_headers(rx.settings.port, 1)) as [sock]:
        assert attacks.ended_by_peer(sock, 5) == b"", "not closed at once, or answered"
    refused = associate(rx, scu())
    assert not refused.is_established and not refused.is_rejected
    assert refusals("host") == before + 2  # IT watches this metric for scans and misconfigured peers


def refusals(reason: str) -> float:
    registry = CollectorRegistry()
    registry.register(CONNECTIONS_REFUSED)
    return registry.get_sample_value("sonocase_connections_refused_total", {"reason": reason}) or 0.0


@pytest.mark.parametrize("entry", ["127.0.0.1", "127.0.0.0/8", "localhost"])
def test_allowed_host_as_address_block_or_name(start: Callable[..., Receiver], entry: str) -> None:
    allowed = associate(start(allowed_hosts=["192.0.2.1", entry]), scu())
    assert allowed.is_established
    allowed.release()


def test_association_limit_counts_established_associations(
    start: Callable[..., Receiver], caplog: pytest.LogCaptureFixture
) -> None:
    rx = start(max_associations=1)
    with (
        attacks.held(attacks.silent_connections(rx.settings.port, 3)),
        caplog.at_level(logging.INFO, logger="service.ingest"),
    ):
        first = associate(rx, scu())  # connections that never associate take no slot
        try:
            assert first.is_established
            assert rejection(associate(rx, scu())) == (2, 3, 2)  # transient, local limit exceeded
        finally:
            first.release()
    accepted = [r.getMessage() for r in caplog.records if "accepted" in r.getMessage()]
    assert len(accepted) == 1, "a rejected association was logged as accepted"
    assert any("max_associations" in r.getMessage() for r in caplog.records)


# --- refusing instances ----------------------------------------------------------------


@pytest.mark.parametrize(
    "case,expected",
    [
        ("zero-length", StoreStatus.CANNOT_UNDERSTAND),
        ("truncated", StoreStatus.CANNOT_UNDERSTAND),
        ("no SOP Instance UID", StoreStatus.INVALID_UID),
    ],
)
def test_bad_data_sets_get_a_failure_status(
    receiver: Receiver, tmp_path: Path, case: str, expected: StoreStatus
) -> None:
    f = US_FILES["OBXXXX1A_rle.dcm"]
    raw = {
        "zero-length": b"",
        "truncated": f.data_set[: len(f.data_set) // 2],
        "no SOP Instance UID": rewrite(tmp_path, f.name, SOPInstanceUID=None).data_set,
    }[case]
    assoc = associate(receiver, scu(files=[f]))
    try:
        assert send_raw(assoc, raw, f.sop_class_uid, f.sop_instance_uid) == expected
        assert assoc.send_c_echo().Status == 0  # still serving, same association
    finally:
        assoc.release()
    assert receiver.ledger.instance_count() == 0


@pytest.mark.parametrize(
    "policy,expected", [("store-ignore", StoreStatus.SUCCESS), ("refuse", StoreStatus.MODALITY_REFUSED)]
)
def test_non_ultrasound_modality(
    start: Callable[..., Receiver], tmp_path: Path, policy: str, expected: StoreStatus
) -> None:
    rx = start(non_ultrasound=policy)
    ct = rewrite(tmp_path, "OBXXXX1A_rle.dcm", Modality="CT")
    assoc = associate(rx, scu(files=[ct]))
    try:
        assert send_raw(assoc, ct.data_set, ct.sop_class_uid, ct.sop_instance_uid) == expected
    finally:
        assoc.release()
    assert [r.ignored_reason for r in rx.ledger.instances(ct.study_uid)] == (
        ["modality CT is not US"] if policy == "store-ignore" else []
    )


def cstore_responses(status: str) -> float:
    registry = CollectorRegistry()
    registry.register(CSTORE_RESPONSES)
    return registry.get_sample_value("sonocase_cstore_responses_total", {"status": status}) or 0.0


def test_low_disk_refuses_with_out_of_resources(start: Callable[..., Receiver]) -> None:
    rx = start(min_free_disk_mb=10**9)
    f = US_FILES["US1_UNCR.dcm"]
    refused_before = cstore_responses("0xA700")
    result = subprocess.run(
        [dcmtk("storescu"), "-v", "-xe", "-aec", rx.settings.ae_title, "127.0.0.1", str(rx.settings.port), str(f.path)],
        check=False,
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Received Store Response (Refused: OutOfResources)" in result.stdout + result.stderr
    assert not rx.stored(f).exists() and rx.ledger.instance_count() == 0
    assert cstore_responses("0xA700") == refused_before + 1  # IT alerts on this metric


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=mutations())
def test_fuzzed_files_over_the_network_keep_the_scp_serving(receiver: Receiver, mutation: Mutation) -> None:
    f = US_FILES[mutation.name]
    assoc = associate(receiver, scu(files=[f]))
    try:
        status = send_raw(assoc, mutation.apply(), f.sop_class_uid, f.sop_instance_uid)
        # one of ours: pynetdicom answers 0xC211 only when a handler raised
        assert status in set(StoreStatus) - {StoreStatus.PROCESSING_FAILURE}
    finally:
        assoc.release()
    assert echoscu(receiver).returncode == 0


@pytest.mark.parametrize("engine", ["fast"])  # stock: counted against max_dataset_mb, as a data set
def test_a_command_set_that_never_ends_is_aborted(receiver: Receiver) -> None:
    assoc = associate(receiver, scu())
    assert assoc.is_established
    try:
        for _ in range(5):  # 80 KiB of command fragments, none the last
            fragment = P_DATA()
            fragment.presentation_data_value_list.append(
                (assoc.accepted_contexts[0].context_id, b"\x01" + bytes(16384))
            )
            assoc.dul.send_pdu(fragment)
        assert wait_until(lambda: assoc.is_aborted), "a command set longer than any was read on"
    finally:
        assoc.abort()
    assert echoscu(receiver).returncode == 0


@hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=pdu_streams(), associated=st.booleans())
def test_fuzzed_pdus_over_the_network_keep_the_scp_serving(receiver: Receiver, stream: bytes, associated: bool) -> None:
    """Any bytes, before an association (a scanner) or inside one, then the peer hangs up."""
    if associated:
        assoc = associate(receiver, scu())
        assert assoc.is_established and assoc.dul.socket is not None and assoc.dul.socket.socket is not None
        assoc.dul.socket.socket.sendall(stream)
        assoc.abort()
    else:
        with attacks.held([attacks.connect(receiver.settings.port)]) as [sock]:
            sock.sendall(stream)
    result = echoscu(receiver)
    assert result.returncode == 0, result.stdout + result.stderr


# --- DICOM TLS ----------------------------------------------------------------------------


def client_context(server_cert: Path, client: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_cert))
    if client is not None:
        context.load_cert_chain(*client)
    return context


def test_tls_with_and_without_client_certificates(start: Callable[..., Receiver], tmp_path: Path) -> None:
    server_cert, server_key = self_signed(tmp_path, "sonocase")
    rx = start(tls_cert=server_cert, tls_key=server_key)
    f = US_FILES["OBXXXX1A_rle.dcm"]
    assoc = associate(rx, scu(files=[f]), tls_args=(client_context(server_cert), "127.0.0.1"))
    try:
        assert assoc.is_established
        assert send_raw(assoc, f.data_set, f.sop_class_uid, f.sop_instance_uid) == StoreStatus.SUCCESS
    finally:
        assoc.release()
    assert rx.stored(f).read_bytes().endswith(f.data_set)
    assert not associate(rx, scu()).is_established  # plain TCP to a TLS port

    client = self_signed(tmp_path, "pacs")
    strict = start(tls_cert=server_cert, tls_key=server_key, tls_ca=client[0])
    anonymous = associate(strict, scu(), tls_args=(client_context(server_cert), "127.0.0.1"))
    assert not anonymous.is_established
    known = associate(strict, scu(), tls_args=(client_context(server_cert, client), "127.0.0.1"))
    try:
        assert known.is_established and known.send_c_echo().Status == 0
    finally:
        known.release()


def test_storage_contexts_are_all_offered(receiver: Receiver) -> None:
    ae = AE("TESTSCU")
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = associate(receiver, ae)
    try:
        assert sorted(cx.abstract_syntax for cx in assoc.accepted_contexts) == sorted(STORAGE_SOP_CLASSES)
    finally:
        assoc.release()
