"""Results sent by STOW-RS: to a real Orthanc (DICOMweb plugin) they arrive byte-valid
(dciodvfy) in the right study; HTTP basic authentication from a password file; a
partly stored request resends only what failed; an archive that answers 503 or
drops the connection mid-upload loses nothing; Bearer authentication against our
own STOW-RS endpoint, whose refusal of SR classes walks the SR fallback."""

from __future__ import annotations

import http.server
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import EnhancedSRStorage, KeyObjectSelectionDocumentStorage, SegmentationStorage, generate_uid

from service.delivery.dicomweb import StowOutcome, stow_outcomes
from service.delivery.sender import Sender
from service.ledger import Ledger, OutboxState, StudyState, open_ledger
from service.reports.build import build_reports
from service.settings import DicomWebDestination, Settings, load_settings
from tests.support.common import free_port, self_signed
from tests.support.dicomweb import TOKEN, ReceivingNode
from tests.support.orthanc import Orthanc
from tests.support.reports import analysed_study, dciodvfy_errors

FAR_FUTURE = 4e9
FILES = ["US1_UNCR.dcm", "OBXXXX1A.dcm"]


def to(settings: Settings, url: str, **update: object) -> Settings:
    """``settings`` sending to the DICOMweb base ``url``, with short backoff for tests."""
    return settings.model_copy(
        update={
            "destinations": [DicomWebDestination.parse(url)],
            "send_backoff_s": 0.2,
            "send_backoff_max_s": 1.0,
            "send_max_attempts": 5,
            **update,
        }
    )


def reported(settings: Settings, ledger: Ledger) -> tuple[str, list[str]]:
    """A real study analysed and reported into the outbox: its UID and its objects' UIDs."""
    study = analysed_study(settings, ledger, files=FILES)
    paths = build_reports(settings, ledger, study.uid, study.reference_images)
    return study.uid, sorted(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths)


def secret(tmp_path: Path, name: str, value: str) -> Path:
    path = tmp_path / name
    path.write_text(value + "\n")
    return path


# --- the pure reading of a response ---------------------------------------------------------


def test_outcomes_from_a_stow_response() -> None:
    response = pydicom.Dataset.from_json(
        {
            "00081198": {
                "vr": "SQ",
                "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.2"]}, "00081197": {"vr": "US", "Value": [0xA700]}}],
            },
            "00081199": {
                "vr": "SQ",
                "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.1"]}, "00081196": {"vr": "US", "Value": [0xB000]}}],
            },
        }
    )
    outcomes = stow_outcomes(202, response, ["1.2.1", "1.2.2", "1.2.3"])
    assert outcomes["1.2.1"] == StowOutcome(True, "coercion of data elements (Warning Reason 0xB000)")
    assert outcomes["1.2.2"] == StowOutcome(False, "out of resources (Failure Reason 0xA700)", 0xA700)
    assert not outcomes["1.2.3"].stored and "does not list it" in outcomes["1.2.3"].reason
    assert stow_outcomes(200, pydicom.Dataset(), ["1.2.3"])["1.2.3"].stored  # 200: all stored


# --- against Orthanc ----------------------------------------------------------------------


@pytest.mark.integration
def test_results_arrive_byte_valid_in_the_right_study(settings: Settings, orthanc: Orthanc) -> None:
    s = to(settings, orthanc.dicomweb_url)
    ledger = open_ledger(s, durable=False)
    try:
        study_uid, uids = reported(s, ledger)
        assert Sender(s, ledger).run_once() == len(uids)
        assert sorted(orthanc.sop_classes(study_uid)) == uids  # in the right study
        for uid in uids:
            path = s.data_dir / f"from-orthanc-{uid}.dcm"
            path.write_bytes(orthanc.file(uid))
            assert pydicom.dcmread(path).StudyInstanceUID == study_uid
            assert dciodvfy_errors(path) == [], uid
        assert ledger.study(study_uid).state == StudyState.SENT
        assert {r.state for r in ledger.outbox()} == {OutboxState.SENT}
    finally:
        ledger.close()


@pytest.mark.integration
def test_basic_authentication_from_a_password_file(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    archive = Orthanc.start(tmp_path / "orthanc", users={"sonocase": "s3cret-pw"})
    try:
        wrong = to(
            settings,
            archive.dicomweb_url,
            dicomweb_user="sonocase",
            dicomweb_password_file=secret(tmp_path, "wrong", "not-it"),
        )
        ledger = open_ledger(wrong, durable=False)
        study_uid, uids = reported(wrong, ledger)
        with caplog.at_level(logging.DEBUG):
            assert Sender(wrong, ledger).run_once() == 0
        assert {r.error.split(": ", 1)[1] for r in ledger.outbox()} == {"HTTP 401 Unauthorized"}
        right = wrong.model_copy(update={"dicomweb_password_file": secret(tmp_path, "right", "s3cret-pw")})
        with caplog.at_level(logging.DEBUG):
            assert Sender(right, ledger).run_once(now=FAR_FUTURE) == len(uids)
        assert sorted(archive.sop_classes(study_uid)) == uids
        assert "s3cret-pw" not in caplog.text and "not-it" not in caplog.text
        ledger.close()
    finally:
        archive.stop()


@pytest.mark.integration
def test_a_partly_stored_request_resends_only_what_failed(settings: Settings, orthanc: Orthanc) -> None:
    """One object of the study carries another Study Instance UID (an outbox file
    changed behind our back): Orthanc stores the others and fails it (HTTP 409, the
    stored ones in the Referenced SOP Sequence); only that one is retried."""
    s = to(settings, orthanc.dicomweb_url)
    ledger = open_ledger(s, durable=False)
    try:
        study_uid, uids = reported(s, ledger)
        row = next(r for r in ledger.outbox() if r.sop_class_uid != "1.2.840.10008.5.1.4.1.1.88.34")
        ds = pydicom.dcmread(row.path)
        ds.StudyInstanceUID = generate_uid()
        ds.save_as(row.path)
        assert Sender(s, ledger).run_once() == len(uids) - 1
        rows = {r.sop_instance_uid: r for r in ledger.outbox()}
        failed = rows.pop(row.sop_instance_uid)
        assert (failed.state, failed.attempts) == (OutboxState.PENDING, 1)
        assert "Failure Reason 0x" in failed.error
        assert {r.state for r in rows.values()} == {OutboxState.SENT}
        assert sorted(orthanc.sop_classes(study_uid)) == sorted(rows)
        assert ledger.study(study_uid).state == StudyState.REPORTED
    finally:
        ledger.close()


class FaultyArchive:
    """NAMED FAKE, for faults Orthanc cannot be made to show: an HTTP server in front
    of the real Orthanc that answers the first request 503, drops the connection
    half-way through reading the second, and hands every later one to Orthanc."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.requests = 0
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                fake.requests += 1
                if fake.requests == 1:
                    self._body()
                    self.send_response(503, "Service Unavailable")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif fake.requests == 2:
                    self.rfile.read(32 << 10)  # a part of the upload, then the connection is gone
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                else:
                    answer = requests.post(
                        fake.upstream + self.path,
                        data=self._body(),
                        timeout=60,
                        headers={"Content-Type": self.headers["Content-Type"]},
                    )
                    self.send_response(answer.status_code)
                    self.send_header("Content-Type", answer.headers.get("Content-Type", "application/dicom+json"))
                    self.send_header("Content-Length", str(len(answer.content)))
                    self.end_headers()
                    self.wfile.write(answer.content)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return body

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def faulty(orthanc: Orthanc) -> Iterator[FaultyArchive]:
    archive = FaultyArchive(orthanc.url)
    yield archive
    archive.stop()


@pytest.mark.integration
def test_503_and_a_dropped_upload_lose_nothing(
    settings: Settings,
    orthanc: Orthanc,
    faulty: FaultyArchive,
) -> None:
    s = to(settings, faulty.url)
    ledger = open_ledger(s, durable=False)
    try:
        study_uid, uids = reported(s, ledger)
        sender = Sender(s, ledger)
        assert sender.run_once() == 0
        assert {r.error.split(": ", 1)[1] for r in ledger.outbox()} == {"HTTP 503 Service Unavailable"}
        assert sender.run_once(now=FAR_FUTURE) == 0
        assert all(": no answer: " in r.error for r in ledger.outbox())
        assert {r.attempts for r in ledger.outbox()} == {2}
        assert sender.run_once(now=FAR_FUTURE) == len(uids)
        assert sorted(orthanc.sop_classes(study_uid)) == uids  # every object, once
        assert orthanc.get_json("/statistics")["CountInstances"] == len(uids)
        assert ledger.study(study_uid).state == StudyState.SENT
        assert faulty.requests == 3
    finally:
        ledger.close()


@pytest.mark.integration
def test_an_archive_that_never_answers_times_out(settings: Settings) -> None:
    """A port that takes the connection (the kernel's backlog) and never answers:
    each try ends after dicomweb_timeout_s, recorded and retried."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        s = to(settings, f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web", dicomweb_timeout_s=0.5)
        ledger = open_ledger(s, durable=False)
        try:
            reported(s, ledger)
            assert Sender(s, ledger).run_once() == 0
            assert all("no answer" in r.error and "timed out" in r.error for r in ledger.outbox())
            assert {(r.state, r.attempts) for r in ledger.outbox()} == {(OutboxState.PENDING, 1)}
        finally:
            ledger.close()


# --- against our own STOW-RS endpoint --------------------------------------------------------


@pytest.fixture
def node_b(tmp_path: Path) -> Iterator[ReceivingNode]:
    """Another node receiving over STOW-RS with its web token, over HTTPS (a
    certificate of its own, 127.0.0.1)."""
    receiving = load_settings(
        data_dir=tmp_path / "b",
        host="127.0.0.1",
        port=free_port(),
        http_port=0,
        durability="none",
        web_token=TOKEN,
        min_free_disk_mb=1,
    )
    ledger = open_ledger(receiving, durable=False)
    node = ReceivingNode(receiving, ledger, tls=self_signed(tmp_path, "node-b"))
    yield node
    node.stop()
    ledger.close()


@pytest.mark.integration
def test_https_peer_verified_against_the_site_ca(settings: Settings, tmp_path: Path, node_b: ReceivingNode) -> None:
    s = to(settings, node_b.url, dicomweb_token_file=secret(tmp_path, "token", TOKEN))
    ledger = open_ledger(s, durable=False)
    try:
        reported(s, ledger)
        assert Sender(s, ledger).run_once() == 0  # its CA is not a public one
        assert all("SSLError" in r.error and "CERTIFICATE_VERIFY_FAILED" in r.error for r in ledger.outbox())
        site_ca = s.model_copy(update={"dicomweb_ca": tmp_path / "node-b.crt"})
        assert Sender(site_ca, ledger).run_once(now=FAR_FUTURE) == len(node_b.spooled()) > 0
    finally:
        ledger.close()


@pytest.mark.integration
def test_bearer_token_and_the_sr_fallback_against_our_stow_endpoint(
    settings: Settings,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Node B receives over STOW-RS with its web token; it takes Secondary Captures
    but no SR class (Failure Reason 0x0122), so the SR is rebuilt class after class
    and, when none is taken, fails with that reason; the key-image flag and the
    overlay (optional classes it does not take either) are skipped there."""
    receiving = load_settings(
        data_dir=tmp_path / "b",
        host="127.0.0.1",
        port=free_port(),
        http_port=0,
        durability="none",
        web_token=TOKEN,
        min_free_disk_mb=1,
    )
    ledger_b = open_ledger(receiving, durable=False)
    node_b = ReceivingNode(receiving, ledger_b)
    s = to(settings, node_b.url, dicomweb_token_file=secret(tmp_path, "token", "wrong"), send_max_attempts=10)
    ledger = open_ledger(s, durable=False)
    try:
        study_uid, uids = reported(s, ledger)
        assert Sender(s, ledger).run_once() == 0
        assert {r.error.split(": ", 1)[1] for r in ledger.outbox()} == {"HTTP 401 Unauthorized"}
        s = s.model_copy(update={"dicomweb_token_file": secret(tmp_path, "token", TOKEN)})
        sender = Sender(s, ledger)
        with caplog.at_level(logging.DEBUG):
            for _ in range(4):  # the SCs, then the SR in each class after the first
                sender.run_once(now=FAR_FUTURE)
        assert TOKEN not in caplog.text
        rows = ledger.outbox()
        unsent = {r.sop_class_uid: r for r in rows if r.state != OutboxState.SENT}
        refused = {r.sop_class_uid for r in rows} & {SegmentationStorage, KeyObjectSelectionDocumentStorage}
        assert KeyObjectSelectionDocumentStorage in refused  # node B stores images only
        assert set(unsent) == {EnhancedSRStorage} | refused
        assert "accepts none of the SR classes" in unsent[EnhancedSRStorage].error
        assert all(unsent[sop_class].state == OutboxState.SKIPPED for sop_class in refused)
        assert all("does not accept SOP class" in unsent[sop_class].error for sop_class in refused)
        stored = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in node_b.spooled()}
        assert stored == {r.sop_instance_uid for r in rows if r.state == OutboxState.SENT}
        assert len(stored) == len(uids) - len(unsent) and study_uid in {p.parent.name for p in node_b.spooled()}
        assert caplog.text.count("does not accept SR class") == 2  # Comprehensive 3D -> Comprehensive -> Enhanced
    finally:
        ledger.close()
        node_b.stop()
        ledger_b.close()
