"""Drift on the node: the watcher reads each scanner's results from a real ledger,
the collector exports them (with the outcomes received), and the alert rules in deploy/prometheus/ (checked and
unit-tested by ``promtool``) read exactly the metrics the collector writes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.ledger import InstanceRecord, Ledger
from service.monitoring.drift import DriftConfig
from service.monitoring.watcher import DriftWatcher, MonitoringCollector
from service.ops.web import build_web_server
from service.pipeline.analysis import summarise_study
from service.results import FrameResult, ImageResult, ModelIdentity, StudyAttributes, StudyResult
from tests.support.web import BEARER, web_request, web_settings

RULES = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
CLASSES = ["normal", "benign", "malignant"]


def _store_result(
    ledger: Ledger, uid: str, scanner: tuple[str, str], embedding: np.ndarray, ood: bool, now: float
) -> None:
    """A study analysed on ``scanner`` whose one frame has ``embedding``."""
    ledger.record_instance(
        InstanceRecord(
            f"{uid}.1", uid, f"{uid}.2", "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.1.2.1", "x.dcm", 1, "PACS", "US"
        ),
        now=now,
    )
    ledger.complete_quiet_studies(0.0, now=now)
    generation = ledger.claim_analysis(uid, 60.0, now=now)
    assert generation is not None
    label = CLASSES[int(np.argmax(embedding[:3]))]
    probabilities = {c: 0.9 if c == label else 0.05 for c in CLASSES}
    frame = FrameResult(
        frame_number=1,
        probabilities=probabilities,
        predicted=label,
        out_of_distribution=ood,
        ood_distance=0.0,
        heatmap_path="h.npy",
        crop=(0, 0, 8, 8),
        embedding=embedding.tolist(),
    )
    images = [
        ImageResult(
            sop_instance_uid=f"{uid}.1",
            series_uid=f"{uid}.2",
            sop_class_uid="1.2",
            frames=[frame],
            predicted=None if ood else label,
            probability=None if ood else 0.9,
            out_of_distribution=ood,
        )
    ]
    result = StudyResult(
        study_uid=uid,
        generation=generation,
        model=ModelIdentity(name="m", version="1", sha256="0"),
        study=StudyAttributes(manufacturer=scanner[0], model_name=scanner[1]),
        images=images,
        summary=summarise_study(images, CLASSES),
    )
    assert ledger.finish_analysis(uid, generation, result, now=now)


def _metrics(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }


CENTRES = np.eye(3, 16) * 6.0


def _two_scanners(ledger: Ledger) -> None:
    """160 studies from each of two scanners; the second's probe is swapped for its last 40."""
    rng = np.random.default_rng(4)
    steady, swapped = ("ACME", "Sono 9"), ("Other Co", "Echo 2")
    for i in range(160):
        for n, scanner in enumerate((steady, swapped)):
            point = CENTRES[rng.integers(0, 3)] + rng.normal(size=16)
            drifted = scanner == swapped and i >= 120
            if drifted:
                point[15] += 2.0  # the new probe moves the embedding where the classes do not
            _store_result(ledger, f"1.2.{n}.{i}", scanner, point, ood=drifted and i % 4 == 0, now=1e9 + i)


@pytest.mark.heavy
@pytest.mark.parametrize("ledger", ["sqlite", "postgresql"], indirect=True)
def test_the_node_finds_a_drifted_scanner_and_not_a_steady_one(ledger: Ledger) -> None:
    _two_scanners(ledger)
    registry = CollectorRegistry()
    watcher = DriftWatcher(ledger, DriftConfig())
    registry.register(MonitoringCollector(watcher))
    got = _metrics(registry)
    assert got[("sonocase_drift_studies", (("scanner", "Other Co Echo 2"),))] == 160
    assert got[("sonocase_drift_alarm", (("scanner", "Other Co Echo 2"),))] == 1.0
    assert got[("sonocase_drift_alarm", (("scanner", "ACME Sono 9"),))] == 0.0
    assert got[("sonocase_drift_out_of_domain_rate", (("scanner", "Other Co Echo 2"),))] == pytest.approx(0.25)
    shares = [got[("sonocase_drift_predicted_share", (("class", c), ("scanner", "ACME Sono 9")))] for c in CLASSES]
    assert sum(shares) == pytest.approx(1.0)
    assert got[("sonocase_outcomes", (("matched", "no"),))] == 0.0
    assert got[("sonocase_hl7_messages", (("ack_code", "AE"),))] == 0.0
    # A later scrape reads only what is new, and sees it.
    _store_result(ledger, "1.2.9.1", ("New", "Probe"), CENTRES[0], ood=False, now=2e9)
    assert _metrics(registry)[("sonocase_drift_studies", (("scanner", "New Probe"),))] == 1.0


@pytest.mark.integration
def test_the_status_page_heads_with_the_drift_alarm(tmp_path: Path) -> None:
    settings = web_settings(tmp_path)
    ledger = Ledger(settings.ledger_path, durable=False)
    _two_scanners(ledger)
    server = build_web_server(settings, ledger)
    server.start()
    try:
        status, _, body = web_request(f"http://127.0.0.1:{server.port}", "/status", headers=BEARER)
    finally:
        server.stop()
        ledger.close()
    alarms = re.findall(rb"Input drift on scanner ([^:]+):", body)
    assert status == 200 and alarms == [b"Other Co Echo 2"]


@pytest.mark.integration
@pytest.mark.parametrize("ledger", ["sqlite"], indirect=True)
def test_alert_rules_pass_promtool_and_read_the_collector_s_metrics(ledger: Ledger) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: run scripts/setup.sh (Debian package prometheus)")
    for args in (["check", "rules", "sonocase-alerts.yml"], ["test", "rules", "sonocase-alerts.test.yml"]):
        done = subprocess.run([promtool, *args], cwd=RULES, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
    rules = yaml.safe_load((RULES / "sonocase-alerts.yml").read_text())
    used = {
        name
        for group in rules["groups"]
        for rule in group["rules"]
        for name in re.findall(r"sonocase_\w+", rule["expr"] + str(rule.get("annotations", "")))
    }
    written = {family.name for family in MonitoringCollector(DriftWatcher(ledger, DriftConfig())).collect()}
    assert used and used <= written, used - written
