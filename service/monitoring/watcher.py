"""Drift on the node: each scanner's stream of analysed studies, watched as
bench/monitoring.py watches its simulation, exported as Prometheus metrics.

:class:`DriftWatcher` keeps one entry per study (its newest result: mean embedding
of the analysed frames, share of frames out of domain, the study's class), read
from the ledger incrementally, grouped by scanner (Manufacturer + Manufacturer's
Model Name). A scanner's reference is its first ``reference_size`` studies; its
latest ``window_size`` are tested against them (service.monitoring.drift).
:class:`MonitoringCollector` turns that (and the outcomes received) into gauges at each scrape; deploy/prometheus/
holds the alert rules that read them. The permutations are drawn from a fixed seed,
so the same studies always give the same p-value.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.ledger import Ledger
from service.monitoring.drift import DriftConfig, WindowDrift, guard_unit, window_drift
from service.results import StudyResult

#: Results committed out of order by concurrent workers are picked up if no older than this.
_LOOKBACK_S = 600.0


@dataclass(frozen=True)
class StudyPoint:
    """What drift needs of one analysed study."""

    created_at: float
    embedding: np.ndarray
    guard: float  # service.monitoring.drift.guard_unit of its frames
    out_of_domain: float
    predicted: int  # class index; -1 not assessed


def study_point(result: StudyResult, created_at: float, classes: list[str]) -> StudyPoint | None:
    """The study's point, or None when no frame was analysed."""
    frames = [frame for image in result.images for frame in image.frames]
    if not frames:
        return None
    predicted = result.summary.predicted
    return StudyPoint(
        created_at,
        np.mean([f.embedding for f in frames], axis=0),
        guard_unit([f.ood_distance for f in frames]),
        float(np.mean([f.out_of_distribution for f in frames])),
        classes.index(predicted) if predicted in classes else -1,
    )


def scanner_of(result: StudyResult) -> str:
    return f"{result.study.manufacturer} {result.study.model_name}".strip() or "unknown"


class DriftWatcher:
    """Each scanner's latest drift window, from the ledger's results."""

    def __init__(self, ledger: Ledger, config: DriftConfig) -> None:
        self.ledger, self.config = ledger, config
        #: The model's classes, as the first result's probabilities name them.
        self.classes: list[str] = []
        self._points: dict[str, dict[str, StudyPoint]] = defaultdict(dict)
        self._seen: dict[tuple[str, int], float] = {}
        self._newest = 0.0
        self._lock = threading.Lock()

    def update(self) -> None:
        """Read the results stored since the last update."""
        with self._lock:
            for row in self.ledger.results_since(self._newest - _LOOKBACK_S):
                key = (row.study_uid, row.generation)
                if key in self._seen:
                    continue
                self._seen[key] = row.created_at
                self._newest = max(self._newest, row.created_at)
                result = StudyResult.model_validate_json(row.result)
                if not self.classes:
                    self.classes = next((list(f.probabilities) for i in result.images for f in i.frames), [])
                point = study_point(result, row.created_at, self.classes)
                if point is not None:
                    self._points[scanner_of(result)][row.study_uid] = point

    def latest(self) -> dict[str, tuple[int, WindowDrift | None]]:
        """Per scanner: studies seen, and the drift of its latest window (None
        until it has a reference and a window)."""
        self.update()
        with self._lock:  # a snapshot: the page and a scrape may ask at once
            streams = {
                scanner: sorted(by_study.values(), key=lambda p: p.created_at)
                for scanner, by_study in self._points.items()
            }
        out: dict[str, tuple[int, WindowDrift | None]] = {}
        for scanner, points in sorted(streams.items()):
            drift = None
            if len(points) >= self.config.reference_size + self.config.window_size:
                drift = window_drift(
                    np.array([p.embedding for p in points]),
                    np.array([p.guard for p in points]),
                    np.array([p.out_of_domain for p in points]),
                    np.array([p.predicted for p in points]),
                    len(self.classes),
                    self.config,
                    np.random.default_rng(0),
                    len(points),
                )
            out[scanner] = (len(points), drift)
        return out


class MonitoringCollector(Collector):
    """The watcher's figures as Prometheus gauges, per scanner, and the outcomes
    and HL7 messages received."""

    def __init__(self, watcher: DriftWatcher) -> None:
        self.watcher = watcher

    def collect(self) -> Iterator[GaugeMetricFamily]:
        matched, waiting, acks = self.watcher.ledger.outcome_totals()
        outcomes = GaugeMetricFamily(
            "sonocase_outcomes", "Outcomes received, matched to a study or waiting for it", labels=["matched"]
        )
        outcomes.add_metric(["yes"], matched)
        outcomes.add_metric(["no"], waiting)
        messages = GaugeMetricFamily(
            "sonocase_hl7_messages",
            "HL7 messages received, by the ACK code they got (AA accepted, AE content error, AR rejected)",
            labels=["ack_code"],
        )
        for code in ("AA", "AE", "AR"):
            messages.add_metric([code], acks.get(code, 0))
        yield from (outcomes, messages)
        studies = GaugeMetricFamily(
            "sonocase_drift_studies", "Analysed studies per scanner (drift's stream)", labels=["scanner"]
        )
        p_value = GaugeMetricFamily(
            "sonocase_drift_p_value",
            "Permutation p-value of the latest window's MMD against the scanner's reference window",
            labels=["scanner"],
        )
        mmd2 = GaugeMetricFamily("sonocase_drift_mmd2", "Squared MMD of the latest window", labels=["scanner"])
        alarm = GaugeMetricFamily(
            "sonocase_drift_alarm",
            "1 when the latest window's p-value is at or below the drift level (input drift), else 0",
            labels=["scanner"],
        )
        ood = GaugeMetricFamily(
            "sonocase_drift_out_of_domain_rate",
            "Share of the latest window's images the domain guard flagged",
            labels=["scanner"],
        )
        mix = GaugeMetricFamily(
            "sonocase_drift_predicted_share",
            "Share of the latest window's studies per predicted class",
            labels=["scanner", "class"],
        )
        for scanner, (count, drift) in self.watcher.latest().items():
            studies.add_metric([scanner], count)
            if drift is None:
                continue
            p_value.add_metric([scanner], drift.p_value)
            mmd2.add_metric([scanner], drift.mmd2)
            alarm.add_metric([scanner], float(drift.alarm))
            ood.add_metric([scanner], drift.out_of_domain_rate)
            for name, share in zip(self.watcher.classes, drift.class_mix, strict=True):
                mix.add_metric([scanner, name], share)
        yield from (studies, p_value, mmd2, alarm, ood, mix)
