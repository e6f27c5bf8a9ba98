"""The HTTP side's test inputs: tokens, a ledger holding an analysed study, a failed
delivery and a failed analysis (from a real ultrasound file), settings with a probe
model, and one HTTP request at a time."""

from __future__ import annotations

import http.client
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from service.common.spool import instance_path, write_atomic
from service.ledger import InstanceRecord, Ledger, OutboxState, StudyState
from service.model_card import ModelCard, card_path_for, sha256_file
from service.pipeline.analysis import summarise_study
from service.results import FrameResult, ImageResult, ModelIdentity, StudyResult
from service.settings import Settings, load_settings
from tests.support.common import force_state, free_port, guard_card_entry

TOKEN = "test-token-0123456789"
REVIEW_TOKEN = "review-token-9876543210"
ACCESSION = "ACC20240117"
PATIENT_NAME = "CompressedSamples"  # in US1_UNCR.dcm; must never reach the page


def store_instance(settings: Settings, ledger: Ledger, study_uid: str, now: float) -> InstanceRecord:
    """Spool a copy of a real US file under a new study, as the receiver would."""
    ds = pydicom.dcmread(get_testdata_file("US1_UNCR.dcm", download=False))
    ds.StudyInstanceUID, ds.SOPInstanceUID, ds.AccessionNumber = study_uid, generate_uid(), ACCESSION
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    path = instance_path(settings.spool_dir, study_uid, ds.SOPInstanceUID)
    size = write_atomic(path, out.getvalue(), durable=False)
    rec = InstanceRecord(
        ds.SOPInstanceUID,
        study_uid,
        ds.SeriesInstanceUID,
        ds.SOPClassUID,
        ds.file_meta.TransferSyntaxUID,
        str(path),
        size,
        "SCANNER",
        "US",
    )
    ledger.record_instance(rec, now=now)
    return rec


def record_analysis(
    settings: Settings,
    ledger: Ledger,
    rec: InstanceRecord,
    now: float,
    heat_root: Path | None = None,
    ood: bool = False,
) -> None:
    """Take a study through completion and analysis with a hand-made result: the
    analysis worker is another stage; this is its output as test input. ``ood``:
    the image lies outside the model's training domain, so it has no class."""
    ledger.complete_quiet_studies(1, now=now + 5)
    generation = ledger.claim_analysis(rec.study_uid, 60, now=now + 6)
    assert generation is not None
    yy, xx = np.mgrid[0:64, 0:64]
    heat = np.exp(-((yy - 32) ** 2 + (xx - 32) ** 2) / 200).astype(np.float32)
    heat_path = (heat_root or settings.results_dir) / rec.study_uid / str(generation) / f"{rec.sop_instance_uid}-1.npy"
    heat_path.parent.mkdir(parents=True)
    np.save(heat_path, heat)
    probs = {"normal": 0.03, "benign": 0.10, "malignant": 0.87}
    frame = FrameResult(
        frame_number=1,
        probabilities=probs,
        predicted="malignant",
        out_of_distribution=ood,
        ood_distance=2.0 if ood else 0.2,
        ood_threshold=1.0,
        heatmap_path=str(heat_path),
        crop=(0, 0, 64, 64),
        embedding=[0.0] * 4,
    )
    images = [
        ImageResult(
            sop_instance_uid=rec.sop_instance_uid,
            series_uid=rec.series_uid,
            sop_class_uid=rec.sop_class_uid,
            frames=[frame],
            predicted=None if ood else "malignant",
            probability=None if ood else 0.87,
            out_of_distribution=ood,
        )
    ]
    result = StudyResult(
        study_uid=rec.study_uid,
        generation=generation,
        model=ModelIdentity(name="sonocase-hybrid", version="1", sha256="0" * 64),
        images=images,
        summary=summarise_study(images, list(probs)),
    )
    analysed, not_assessed = result.image_counts()
    assert ledger.finish_analysis(
        rec.study_uid,
        generation,
        result,
        now=now + 8,
        images_analysed=analysed,
        images_not_assessed=not_assessed,
    )


@dataclass
class Node:
    """The HTTP side running over a populated ledger: its three studies and its URL."""

    settings: Settings
    ledger: Ledger
    analysed: str
    undelivered: str
    broken: str
    url: str


def probe_model(tmp_path: Path) -> Path:
    """A model file and its card: the probe verifies the card against the file's bytes
    (sha256), which is all readiness needs of the model file."""
    path = tmp_path / "model" / "probe.onnx"
    path.parent.mkdir()
    path.write_bytes(b"model bytes for the readiness probe")
    card = {
        "name": "sonocase-hybrid",
        "version": "7",
        "architecture": "hybrid",
        "classes": ["normal", "benign", "malignant"],
        "input": {"height": 8, "width": 8, "mean": 0.5, "std": 0.2},
        "embedding_dim": 4,
        "onnx_file": path.name,
        "sha256": sha256_file(path),
        "opset": 18,
        "ood": guard_card_entry(1.0),
        "training_data": {"source": "synthetic"},
        "created": "2026-01-01",
        "intended_use": "tests",
    }
    card_path_for(path).write_text(json.dumps(card))
    ModelCard.load(path)
    return path


def web_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings with both tokens, free ports on loopback and a probe model."""
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "host": "127.0.0.1",
        "port": free_port(),
        "http_host": "127.0.0.1",
        "http_port": free_port(),
        "durability": "none",
        "web_token": TOKEN,
        "web_review_token": REVIEW_TOKEN,
        "model_path": probe_model(tmp_path),
    }
    return load_settings(**(values | overrides))


def populate(settings: Settings) -> tuple[Ledger, str, str, str]:
    """A ledger with a study analysed, one whose delivery failed and one whose analysis
    failed for good; the ledger and the three study UIDs."""
    ledger = Ledger(settings.ledger_path, durable=False)
    now = time.time() - 60
    analysed = store_instance(settings, ledger, generate_uid(), now)
    record_analysis(settings, ledger, analysed, now)
    # Analysed, but the PACS refused the SR: a delivery failure.
    undelivered = store_instance(settings, ledger, generate_uid(), now + 1)
    record_analysis(settings, ledger, undelivered, now + 1)
    sr_path = settings.outbox_dir / undelivered.study_uid / "sr.dcm"
    sr = (generate_uid(), "1.2.840.10008.5.1.4.1.1.88.34", str(sr_path))
    ledger.enqueue_outbox(undelivered.study_uid, 1, [sr], ["PACS@127.0.0.1:104"])
    for row in ledger.outbox(undelivered.study_uid):
        ledger.update_outbox(row.sop_instance_uid, row.destination, OutboxState.FAILED, error="0xA700 refused")
    force_state(ledger, undelivered.study_uid, StudyState.FAILED, failed_stage="send", error="PACS refused the SR")
    # Analysis failed for good.
    broken = store_instance(settings, ledger, generate_uid(), now + 2)
    ledger.complete_quiet_studies(1, now=now + 10)
    assert ledger.claim_analysis(broken.study_uid, 60, now=now + 11)
    ledger.retry_or_fail(broken.study_uid, "analysis", "no pixel data", max_attempts=1, delay_s=lambda _: 1.0)
    return ledger, analysed.study_uid, undelivered.study_uid, broken.study_uid


def web_request(
    url: str,
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    form: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request, redirects not followed."""
    host_port = url.removeprefix("http://")
    conn = http.client.HTTPConnection(host_port, timeout=10)
    body = urlencode(form).encode() if form is not None else None
    hdrs = dict(headers or {})
    if body is not None:
        hdrs["Content-Type"] = "application/x-www-form-urlencoded"
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


BEARER = {"Authorization": f"Bearer {TOKEN}"}
REVIEWER = {"Authorization": f"Bearer {REVIEW_TOKEN}"}


def login(url: str, token: str = TOKEN) -> tuple[str, str]:
    """Sign in with the form; the session cookie and the CSRF token of its page."""
    status, headers, _ = web_request(url, "/login", "POST", form={"token": token})
    assert status == 303, status
    cookie = headers["set-cookie"].split(";")[0]
    page = web_request(url, "/status", headers={"Cookie": cookie})[2].decode()
    return cookie, page.split("name=csrf value='")[1].split("'")[0]
