"""The sender against DCMTK's storescp as the receiving PACS: results arrive once;
a PACS that is down, refuses the SR class or drops the association gets everything
once it is back; bounded tries end in a visible failure that `sonocase resend`
undoes; a killed sender loses nothing."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import typing
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from prometheus_client import CollectorRegistry
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    SecondaryCaptureImageStorage,
)

from service.common.backoff import backoff_delay
from service.common.metrics import SEND_ATTEMPTS
from service.delivery.recovery import retry_study
from service.delivery.sender import TRANSPORTS, Sender, SenderService
from service.ledger import Ledger, OutboxState, StudyState
from service.reports.build import OPTIONAL_CLASSES, build_reports
from service.reports.template import TemplateError
from service.settings import Peer, Settings, load_settings
from service.similar.index import IndexEntry, SimilarCaseIndex
from tests.support.common import free_port, wait_for
from tests.support.reports import (
    MODEL,
    Storescp,
    analysed_study,
    dsr2html,
    start_storescp,
    storescp_profile,
)

FAR_FUTURE = 4e9
#: DCMTK's names of the non-SR classes the node sends: heatmap SC, overlay SEG, key-image flag.
NOT_SR = ["SecondaryCaptureImageStorage", "SegmentationStorage", "KeyObjectSelectionDocumentStorage"]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def to_pacs(settings: Settings, port: int) -> Settings:
    """Settings sending to STORESCP on ``port``, with short backoff for tests."""
    return settings.model_copy(
        update={
            "destinations": load_settings(destinations=f"STORESCP@127.0.0.1:{port}").destinations,
            "send_backoff_s": 0.2,
            "send_backoff_max_s": 1.0,
            "send_max_attempts": 3,
        }
    )


@pytest.fixture
def pacs_factory(tmp_path: Path, port: int):  # type: ignore[no-untyped-def]
    started: list[Storescp] = []

    def start(*extra: str, name: str = "pacs") -> Storescp:
        scp = start_storescp(tmp_path / name, port, *extra)
        started.append(scp)
        return scp

    yield start
    for scp in started:
        if scp.process.poll() is None:
            scp.stop()


def _reported(settings: Settings, ledger: Ledger, **kwargs: object) -> list[str]:
    """A real study analysed and reported into the outbox; its objects' UIDs."""
    study = analysed_study(settings, ledger, **kwargs)  # type: ignore[arg-type]
    paths = build_reports(settings, ledger, study.uid, study.reference_images)
    assert paths
    return sorted(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths)


def _study_uid(ledger: Ledger) -> str:
    (study,) = ledger.studies()
    return str(study.study_uid)


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    rng = random.Random(7)
    for attempts, full in [(1, 5.0), (2, 10.0), (3, 20.0), (8, 600.0), (30, 600.0)]:
        delays = [backoff_delay(attempts, 5.0, 600.0, rng) for _ in range(200)]
        assert full / 2 <= min(delays) and max(delays) <= full
        assert max(delays) - min(delays) > full / 4  # jittered, not in lockstep


def test_every_kind_of_destination_has_a_transport(settings: Settings, ledger: Ledger) -> None:
    assert set(TRANSPORTS) == set(typing.get_args(Peer))
    transports = Sender(settings, ledger).transports
    assert {kind: type(transport) for kind, transport in transports.items()} == TRANSPORTS


@pytest.mark.integration
def test_results_arrive_once_and_the_study_is_sent(to_pacs: Settings, ledger: Ledger, pacs_factory) -> None:
    uids = _reported(to_pacs, ledger, files=["US1_UNCR.dcm", "examples_ybr_color.dcm"])
    pacs = pacs_factory()
    sender = Sender(to_pacs, ledger)
    assert sender.run_once() == len(uids)
    assert sorted(pacs.received_uids()) == uids
    study = ledger.study(_study_uid(ledger))
    assert study.state == StudyState.SENT and study.sent_at >= study.reported_at
    assert sender.run_once(now=FAR_FUTURE) == 0
    assert sorted(pacs.received_uids()) == uids
    (sr,) = [ds for ds in pacs.received() if ds.Modality == "SR"]
    assert sr.SOPClassUID == Comprehensive3DSRStorage


def _send_attempts() -> dict[str, float]:
    """The sender's attempt counter (process-wide) by outcome, as /metrics shows it."""
    registry = CollectorRegistry()
    registry.register(SEND_ATTEMPTS)
    return {
        outcome: registry.get_sample_value("sonocase_send_attempts_total", {"outcome": outcome}) or 0.0
        for outcome in ("accepted", "failed")
    }


@pytest.mark.integration
def test_pacs_down_then_up_everything_arrives_once(to_pacs: Settings, ledger: Ledger, pacs_factory) -> None:
    uids = _reported(to_pacs, ledger, files=["US1_UNCR.dcm"])
    sender = Sender(to_pacs, ledger)
    attempts_before = _send_attempts()
    before = time.time()
    assert sender.run_once() == 0
    rows = ledger.outbox()
    assert {(r.state, r.attempts) for r in rows} == {(OutboxState.PENDING, 1)}
    assert all("association with STORESCP@127.0.0.1" in r.error for r in rows)
    assert all(before + 0.1 <= r.next_attempt_at <= time.time() + 0.2 for r in rows)
    assert sender.run_once() == 0 and {r.attempts for r in ledger.outbox()} == {1}  # backing off: not due
    pacs = pacs_factory()
    assert sender.run_once(now=FAR_FUTURE) == len(uids)
    assert sorted(pacs.received_uids()) == uids
    assert ledger.study(_study_uid(ledger)).state == StudyState.SENT
    attempts = _send_attempts()
    assert attempts["failed"] - attempts_before["failed"] == len(uids)  # the round while the PACS was down
    assert attempts["accepted"] - attempts_before["accepted"] == len(uids)


@pytest.mark.integration
def test_bounded_tries_then_failed_then_resend(to_pacs: Settings, ledger: Ledger, pacs_factory) -> None:
    uids = _reported(to_pacs, ledger, files=["US1_UNCR.dcm"], n_similar=0)
    study_uid = _study_uid(ledger)
    sender = Sender(to_pacs, ledger)
    for _ in range(to_pacs.send_max_attempts):
        sender.run_once(now=FAR_FUTURE)
    assert {r.state for r in ledger.outbox()} == {OutboxState.FAILED}
    study = ledger.study(study_uid)
    assert (study.state, study.failed_stage) == (StudyState.FAILED, "send")
    assert "association with STORESCP" in study.error
    assert sender.run_once(now=FAR_FUTURE) == 0  # failed objects wait for a person

    message = retry_study(to_pacs, ledger, study_uid).message
    assert message.startswith(f"{len(uids)} object(s) due for sending now")
    assert ledger.study(study_uid).state == StudyState.REPORTED
    pacs = pacs_factory()
    assert sender.run_once() == len(uids)
    assert sorted(pacs.received_uids()) == uids
    assert ledger.study(study_uid).state == StudyState.SENT


@pytest.mark.integration
@pytest.mark.parametrize(
    ("accepted", "expected"),
    [
        (["ComprehensiveSRStorage", "EnhancedSRStorage"], ComprehensiveSRStorage),
        (["EnhancedSRStorage"], EnhancedSRStorage),
    ],
)
def test_sr_class_refused_falls_back(
    to_pacs: Settings,
    ledger: Ledger,
    pacs_factory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    accepted: list[str],
    expected: str,
) -> None:
    uids = _reported(to_pacs, ledger, files=["US1_UNCR.dcm"])
    pacs = pacs_factory(*storescp_profile(tmp_path / "pacs.cfg", [*NOT_SR, *accepted]))
    with caplog.at_level("WARNING", logger="service.delivery.sender"):
        assert Sender(to_pacs, ledger).run_once() == len(uids)
    assert f"does not accept SR class {Comprehensive3DSRStorage}; sending the SR rebuilt as {expected}" in caplog.text
    received = pacs.received()
    (sr,) = [ds for ds in received if ds.Modality == "SR"]
    assert sr.SOPClassUID == expected and sr.SOPInstanceUID not in uids
    assert len(received) == len(uids)
    sr_rows = [r for r in ledger.outbox() if r.sop_class_uid == expected]
    assert [(r.sop_instance_uid, r.state) for r in sr_rows] == [(sr.SOPInstanceUID, OutboxState.SENT)]
    path = tmp_path / "received-sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert "accession REF-0" in dsr2html(path, tmp_path / "sr.html")
    assert ledger.study(_study_uid(ledger)).state == StudyState.SENT


@pytest.mark.integration
def test_a_pacs_without_seg_or_kos_gets_the_rest_and_the_study_is_sent(
    to_pacs: Settings,
    ledger: Ledger,
    pacs_factory,
    tmp_path: Path,
) -> None:
    """Many archives store no Segmentation or Key Object Selection: those two are
    skipped there (recorded, retried by 'sonocase resend'), never failing the study."""
    uids = _reported(to_pacs, ledger, files=["US1_UNCR.dcm"])
    optional = [r for r in ledger.outbox() if r.sop_class_uid in OPTIONAL_CLASSES]
    assert optional  # the key-object selection at least (no SEG for an uncalibrated image)
    pacs = pacs_factory(
        *storescp_profile(tmp_path / "pacs.cfg", ["SecondaryCaptureImageStorage", "Comprehensive3DSRStorage"])
    )
    assert Sender(to_pacs, ledger).run_once() == len(uids) - len(optional)
    assert {ds.SOPClassUID for ds in pacs.received()} == {SecondaryCaptureImageStorage, Comprehensive3DSRStorage}
    skipped = [r for r in ledger.outbox() if r.state == OutboxState.SKIPPED]
    assert sorted(r.sop_instance_uid for r in skipped) == sorted(r.sop_instance_uid for r in optional)
    assert all("does not accept SOP class" in r.error for r in skipped)
    assert ledger.study(_study_uid(ledger)).state == StudyState.SENT
    assert Sender(to_pacs, ledger).run_once() == 0  # nothing left due


@pytest.mark.integration
def test_a_pacs_taking_no_sr_class_gets_the_images_and_the_sr_waits(
    to_pacs: Settings,
    ledger: Ledger,
    pacs_factory,
    tmp_path: Path,
) -> None:
    uids = _reported(to_pacs, ledger, files=["US1_UNCR.dcm"], n_similar=0)
    pacs = pacs_factory(*storescp_profile(tmp_path / "pacs.cfg", NOT_SR))
    assert Sender(to_pacs, ledger).run_once() == len(uids) - 1
    assert "SR" not in {ds.Modality for ds in pacs.received()}
    (waiting,) = [r for r in ledger.outbox() if r.state == OutboxState.PENDING]
    assert "accepts none of the SR classes" in waiting.error
    assert ledger.study(_study_uid(ledger)).state == StudyState.REPORTED


@pytest.mark.integration
def test_association_dropped_mid_send_is_retried(to_pacs: Settings, ledger: Ledger, pacs_factory) -> None:
    uids = _reported(to_pacs, ledger, files=["US1_UNCR.dcm"], n_similar=0)
    flaky = pacs_factory("--abort-after", name="flaky")
    sender = Sender(to_pacs, ledger)
    # However the connection ends, the sender notices at once, not after its DIMSE
    # timeout (120 s) for each object (the bound below is generous on purpose).
    results: list[int] = []
    attempt = threading.Thread(target=lambda: results.append(sender.run_once()))
    attempt.start()
    attempt.join(timeout=60)
    assert not attempt.is_alive(), "the sender waited out the DIMSE timeout on a dead association"
    assert results == [0]
    assert {r.state for r in ledger.outbox()} == {OutboxState.PENDING}
    assert any("no response" in r.error or "ended early" in r.error for r in ledger.outbox())
    flaky.stop()
    pacs = pacs_factory(name="pacs")
    assert sender.run_once(now=FAR_FUTURE) == len(uids)
    assert sorted(pacs.received_uids()) == uids


_SENDER_PROCESS = """
import time
from service.common.logs import configure_logging
from service.ledger import open_ledger
from service.delivery.sender import SenderService
from service.settings import load_settings
settings = load_settings()
configure_logging("INFO")
SenderService(settings, open_ledger(settings)).start()
print("sender started", flush=True)
time.sleep(600)
"""


def _sender_process(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "SONOCASE_DATA_DIR": str(settings.data_dir),
        "SONOCASE_LEDGER_URL": settings.ledger_url,
        "SONOCASE_DURABILITY": "none",
        "SONOCASE_DESTINATIONS": ",".join(str(d) for d in settings.destinations),
        "SONOCASE_SEND_BACKOFF_S": "0.2",
        "SONOCASE_SEND_BACKOFF_MAX_S": "0.5",
        "SONOCASE_SEND_MAX_ATTEMPTS": "1000",
    }
    return subprocess.Popen(
        [sys.executable, "-c", _SENDER_PROCESS], env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT
    )


@pytest.mark.integration
def test_killed_sender_sends_after_restart(to_pacs: Settings, ledger: Ledger, pacs_factory, tmp_path: Path) -> None:
    """Results wait in the outbox while the PACS is down; the sender process is
    killed (-9); after the PACS and the sender are back, everything arrives once."""
    uids = _reported(to_pacs, ledger, files=["US1_UNCR.dcm"])
    study_uid = _study_uid(ledger)
    log = tmp_path / "sender.log"
    first = _sender_process(to_pacs, log)
    try:
        wait_for("the sender", lambda: min(r.attempts for r in ledger.outbox()) >= 2)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    assert ledger.study(study_uid).state == StudyState.REPORTED
    pacs = pacs_factory()
    second = _sender_process(to_pacs, log)
    try:
        wait_for("the sender", lambda: ledger.study(study_uid).state == StudyState.SENT)
    finally:
        second.send_signal(signal.SIGKILL)
        second.wait(timeout=10)
    counts = Counter(pacs.received_uids())
    assert sorted(counts) == uids and set(counts.values()) == {1}, log.read_text()[-3000:]


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "SONOCASE_DATA_DIR": str(settings.data_dir),
        "SONOCASE_LEDGER_URL": settings.ledger_url,
        "SONOCASE_DESTINATIONS": ",".join(str(d) for d in settings.destinations),
    }
    return subprocess.run(
        [sys.executable, "-m", "service", *args], check=False, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.integration
def test_resend_command(settings: Settings, to_pacs: Settings, ledger: Ledger) -> None:
    """Reported without a destination; `sonocase resend` says the objects stay in
    the outbox, and queues them once a destination is configured."""
    uids = _reported(settings, ledger, files=["US1_UNCR.dcm"], n_similar=0)
    study_uid = _study_uid(ledger)
    quiet = _cli(settings, "resend", study_uid)
    assert quiet.returncode == 0, quiet.stderr
    assert "no destination configured" in quiet.stdout and str(settings.outbox_dir) in quiet.stdout
    status = _cli(settings, "status", study_uid)
    assert status.returncode == 0, status.stderr
    assert f"no destination configured (SONOCASE_DESTINATIONS): results stay in {settings.outbox_dir}" in status.stdout
    queued = _cli(to_pacs, "resend", study_uid)
    assert queued.returncode == 0, queued.stderr
    assert f"{len(uids)} object(s) due for sending now" in queued.stdout
    assert sorted(r.sop_instance_uid for r in ledger.outbox(study_uid)) == uids
    unknown = _cli(settings, "resend", "1.2.3.4")
    assert unknown.returncode != 0 and "unknown study 1.2.3.4" in unknown.stderr


def test_the_node_does_not_start_with_a_broken_template(settings: Settings, ledger: Ledger, tmp_path: Path) -> None:
    broken = tmp_path / "template.json"
    broken.write_text("{}")
    service = SenderService(settings.model_copy(update={"sr_template": broken}), ledger)
    with pytest.raises(TemplateError, match=r"template.json is invalid"):
        service.start()
    healthy = SenderService(settings, ledger)
    healthy.start()
    healthy.stop()


def test_a_study_analysed_but_never_reported_is_reported_later(to_pacs: Settings, ledger: Ledger) -> None:
    """A worker died between analysis and report: the sender reports the study,
    with the montage's reference images from the real similar-case index."""
    study = analysed_study(to_pacs, ledger, files=["US1_UNCR.dcm"], n_similar=1)
    similar = study.result.similar[0]
    reference = study.reference_images[similar.sop_instance_uid]
    with SimilarCaseIndex.from_settings(to_pacs, MODEL) as index:
        index.add(
            [
                IndexEntry(
                    embedding=np.full(8, 8**-0.5, np.float32),
                    sop_instance_uid=similar.sop_instance_uid,
                    series_uid=similar.series_uid,
                    study_uid=similar.study_uid,
                    sop_class_uid=similar.sop_class_uid,
                    label=similar.label,
                    label_source=similar.label_source,
                    confirmed=True,
                    image_path=reference,
                )
            ]
        )
    sender = Sender(to_pacs, ledger)
    assert sender.report_orphans() == 0  # just analysed: its worker holds the lease and is reporting it
    assert sender.report_orphans(now=time.time() + to_pacs.task_lease_s + 1) == 1  # the worker stopped renewing
    assert sender.report_orphans(now=time.time() + to_pacs.task_lease_s + 2) == 0  # reported: no longer an orphan
    assert ledger.study(study.uid).state == StudyState.REPORTED
    assert len(ledger.outbox(study.uid)) == 4  # SR, heatmap, montage, key-image flag (uncalibrated: no overlay)


@pytest.mark.integration
def test_results_go_over_mutual_dicom_tls(
    settings: Settings, ledger: Ledger, pacs_factory, port: int, tmp_path: Path
) -> None:
    """storescp with TLS, requiring our certificate; we verify its certificate."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    secure = settings.model_copy(
        update={
            "destinations": load_settings(destinations=f"STORESCP@127.0.0.1:{port}+tls").destinations,
            "tls_cert": cert,
            "tls_key": key,
            "tls_ca": cert,
        }
    )
    uids = _reported(secure, ledger, files=["US1_UNCR.dcm"], n_similar=0)
    pacs = pacs_factory("+tls", str(key), str(cert), "-pw", "+cf", str(cert))
    assert Sender(secure, ledger).run_once() == len(uids)
    assert sorted(pacs.received_uids()) == uids
