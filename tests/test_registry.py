"""Real-world performance and the registry export end to end: synthetic studies
from two scanners through the real analysis (shipped ONNX model, real ledger),
outcomes imported with ``sonocase outcomes import``, verdicts, then ``sonocase
monitoring performance`` and the monitoring page in headless Chromium against
``evaluate``'s metrics on the same images, and ``sonocase monitoring export``
without a trace of the patients."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.common.spool import instance_path, write_atomic
from service.datasets.synthetic import synthetic_study
from service.ledger import InstanceRecord, Ledger, Verdict
from service.model.inference import OnnxModel
from service.monitoring.classification import classification_metrics
from service.monitoring.drift import DriftConfig
from service.monitoring.registry import FIELDS
from service.monitoring.watcher import DriftWatcher
from service.ops.monitoring_page import monitoring_router
from service.ops.web import API_PREFIX, ExtraRouter, build_web_server
from service.pipeline.analysis import analyse_study
from service.settings import Settings
from tests.support.chromium import Chromium
from tests.support.common import free_port
from tests.support.worker import child_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "onnx_models" / "sonocase-hybrid.onnx"
CLASSES = ["normal", "benign", "malignant"]
SCANNERS = (("ACME", "Sono 9"), ("Other Co", "Echo 2"))
TOKEN = "monitoring-test-token-0123456789"


def _analysed(settings: Settings, ledger: Ledger, model: OnnxModel, index: int, label: str) -> dict[str, Any]:
    """One single-image synthetic study stored as the receiver would and analysed
    by the real pipeline; returns its header facts and the model's output."""
    (ds,) = synthetic_study(1, label, seed=21, index=index)
    ds.Manufacturer, ds.ManufacturerModelName = SCANNERS[index % 2]
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    path = instance_path(settings.spool_dir, ds.StudyInstanceUID, ds.SOPInstanceUID)
    rec = InstanceRecord(
        ds.SOPInstanceUID,
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        ds.SOPClassUID,
        ds.file_meta.TransferSyntaxUID,
        str(path),
        write_atomic(path, out.getvalue(), durable=False),
        "SCANNER",
        "US",
    )
    ledger.record_instance(rec)
    ledger.complete_quiet_studies(0.0, now=2e9)
    generation = ledger.claim_analysis(ds.StudyInstanceUID, 60.0)
    assert generation is not None
    analysis = analyse_study(settings, model, ds.StudyInstanceUID, generation, ledger.instances(ds.StudyInstanceUID))
    assert ledger.finish_analysis(ds.StudyInstanceUID, generation, analysis.result)
    (frame,) = analysis.result.images[0].frames
    return {
        "ds": ds,
        "probabilities": [frame.probabilities[c] for c in CLASSES],
        "label": label,
        "assessed": not frame.out_of_distribution,
    }


def _cell(study: dict[str, Any]) -> tuple[str, str]:
    """The study's scanner (Manufacturer + Manufacturer's Model Name) and month, read
    from its header as a site would."""
    ds = study["ds"]
    return f"{ds.Manufacturer} {ds.ManufacturerModelName}", f"{ds.StudyDate[:4]}-{ds.StudyDate[4:6]}"


@pytest.mark.slow
@pytest.mark.parametrize("ledger", ["sqlite"], indirect=True)
def test_performance_equals_evaluate_and_the_export_names_nobody(
    settings: Settings, ledger: Ledger, tmp_path: Path
) -> None:
    model = OnnxModel(SHIPPED, provider="cpu", threads=2)
    studies = [_analysed(settings, ledger, model, i, ("benign", "malignant")[i % 3 == 0]) for i in range(18)]
    outcomes = tmp_path / "pathology.csv"
    with outcomes.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["accession_number", "outcome", "outcome_date"])
        writer.writerows([s["ds"].AccessionNumber, s["label"], "2026-12-01"] for s in studies)
    ledger.record_verdict(Verdict(studies[0]["ds"].StudyInstanceUID, "", "corrected", "benign", "", "Dr A"))
    ledger.record_verdict(Verdict(studies[1]["ds"].StudyInstanceUID, "", "agree", None, "", "Dr A"))

    def sonocase(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "service", *args],
            env=child_env(settings),
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "18 new outcomes of 18 rows" in sonocase("outcomes", "import", str(outcomes))
    report = json.loads(sonocase("monitoring", "performance"))

    # evaluate's metrics on the same images: the model's calibrated probabilities, the truth
    assessed = [s for s in studies if s["assessed"]]
    assert len(assessed) >= 12
    y = np.array([CLASSES.index(s["label"]) for s in assessed])
    offline = classification_metrics(y, np.array([s["probabilities"] for s in assessed]), CLASSES)
    online = report["performance"]["all"]["all"]
    assert online["sensitivity"]["value"] == pytest.approx(offline["per_class"]["malignant"]["recall"])
    assert online["ppv"]["value"] == pytest.approx(offline["per_class"]["malignant"]["precision"])
    assert online["roc_auc"]["value"] == pytest.approx(offline["per_class"]["malignant"]["roc_auc"])
    assert online["ece"]["value"] == pytest.approx(offline["ece"])
    assert online["sensitivity"]["n"] == int(np.sum(y == 2))
    scanners = report["performance"]["scanner"]
    assert set(scanners) == {"ACME Sono 9", "Other Co Echo 2"}
    assert sum(s["specificity"]["n"] + s["sensitivity"]["n"] for s in scanners.values()) == len(assessed)
    assert set(report["performance"]["month"]) == {
        f"{s['ds'].StudyDate[:4]}-{s['ds'].StudyDate[4:6]}" for s in assessed
    }
    assert report["agreement_with_radiologists"]["n"] == 2
    # Per scanner and month (the page's charts): every assessed study counted once, in its own cell.
    cells = {_cell(s) for s in assessed}
    assert {(scanner, month) for scanner, months in report["trends"].items() for month in months} == cells
    figures = list(csv.DictReader(io.StringIO(sonocase("monitoring", "performance", "--csv"))))
    by_cell = {r["name"]: int(r["n"]) for r in figures if r["group"] == "scanner_month" and r["metric"] == "roc_auc"}
    assert set(by_cell) == {f"{scanner} {month}" for scanner, month in cells} and sum(by_cell.values()) == len(assessed)

    export = tmp_path / "registry.jsonl"
    assert "18 records" in sonocase("monitoring", "export", str(export))
    text = export.read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    assert len(rows) == 18 and all(tuple(r) == FIELDS for r in rows)
    assert {r["outcome"] for r in rows} == {"benign", "malignant"}
    assert {(r["model_name"], r["model_sha256"]) for r in rows} == {(model.card.name, model.card.sha256)}
    assert rows[0]["verdict"] == "corrected" and rows[0]["verdict_class"] == "benign"
    for s in studies:
        ds = s["ds"]
        for secret in (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.StudyInstanceUID):
            assert secret not in text
    sonocase("monitoring", "export", str(tmp_path / "registry.csv"))
    with (tmp_path / "registry.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 18

    # The monitoring page, signed in as on the status page, shows the same figures.
    web = settings.model_copy(update={"web_token": TOKEN, "http_host": "127.0.0.1", "http_port": free_port()})
    page = ExtraRouter(monitoring_router(ledger, DriftWatcher(ledger, DriftConfig()), API_PREFIX), 1 << 16)
    server = build_web_server(web, ledger, routers=[page])
    server.start()
    browser = Chromium(tmp_path / "chromium-profile")
    try:
        url = f"http://127.0.0.1:{server.port}"
        browser.open(url + "/status")
        browser.wait_for("document.querySelector('input[name=token]') !== null")
        browser.evaluate(
            f"document.querySelector('input[name=token]').value = {json.dumps(TOKEN)};"
            "document.querySelector('form[action=\"/login\"]').submit()"
        )
        browser.wait_for("document.querySelector('table#studies') !== null")
        browser.open(url + "/monitoring")
        browser.wait_for("document.querySelector('table#performance') !== null")
        row = "document.querySelector('#performance tr[data-group=\"all:all\"]')"
        cells = browser.evaluate(f"Array.from({row}.querySelectorAll('td')).map(c => c.textContent)")
        shown = dict(zip(("group", "sensitivity", "specificity", "ppv", "npv", "roc_auc", "ece"), cells, strict=True))
        assert shown["sensitivity"].startswith(f"{offline['per_class']['malignant']['recall']:.2f} [")
        assert shown["roc_auc"].startswith(f"{offline['per_class']['malignant']['roc_auc']:.2f} [")
        assert shown["ece"].startswith(f"{offline['ece']:.2f} [")
        assert browser.evaluate("document.querySelectorAll('#reliability circle.bin').length") >= 2
        roc_points = browser.evaluate("document.querySelector('#roc polyline').points.length")
        assert roc_points == len(report["roc"]["fpr"]) > 2
        # One dot per scanner and month with a case in the denominator, months in order.
        for metric, counted in (
            ("sensitivity", lambda s: s["label"] == "malignant"),
            ("specificity", lambda s: s["label"] != "malignant"),
        ):
            chart = f"document.querySelector('svg.trend[data-metric={metric}]')"
            expected = {_cell(s) for s in assessed if counted(s)}
            shown = browser.evaluate(
                f"Array.from({chart}.querySelectorAll('g.series circle.point'))"
                ".map(c => [c.parentNode.dataset.scanner, c.dataset.month])"
            )
            assert sorted(map(tuple, shown)) == sorted(expected)
            months = browser.evaluate(f"Array.from({chart}.querySelectorAll('text.month')).map(t => t.textContent)")
            assert months == sorted({month for _, month in expected})
        assert browser.evaluate("document.querySelectorAll('svg.trend[role=img]').length") == 6
        assert browser.evaluate("document.querySelector('svg.trend circle.point').r.baseVal.value") == 3  # drawn
        scanners = browser.evaluate(
            "Array.from(document.querySelectorAll('#drift tr[data-scanner]')).map(r => r.dataset.scanner)"
        )
        assert sorted(scanners) == ["ACME Sono 9", "Other Co Echo 2"]  # 9 studies each: still collecting
        html = browser.evaluate("document.documentElement.outerHTML")
        assert not any(s["ds"].PatientID in html or str(s["ds"].PatientName) in html for s in studies)
        browser.screenshot(tmp_path / "monitoring.png")
        browser.evaluate("document.getElementById('trends').scrollIntoView()")
        browser.screenshot(tmp_path / "monitoring-trends.png")
    finally:
        browser.close()
        server.stop()
