"""The ``/metrics`` figures read from the ledger (and the data disk) when Prometheus
scrapes: studies per state, instances, images, stage latencies, the outbox, the
spool and what retention removed. The ledger is shared by every process of the node
and survives restarts, so these are never counted in one process's memory; the
counters of what one process sees as it happens are in :mod:`service.common.metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from service.common.spool import free_disk_mb
from service.ledger import FILE_KINDS, Ledger, OutboxState, StudyState

#: Seconds; studies take from under a second (analysis) to hours (a PACS down).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.5,
    1,
    2,
    5,
    10,
    20,
    30,
    60,
    120,
    300,
    600,
    1800,
    3600,
    7200,
    21600,
    86400,
)

#: stage label -> (start, end) time stamps of a study in the ledger.
STAGES: dict[str, tuple[str, str]] = {
    "receive_to_complete": ("first_received", "completed_at"),
    "complete_to_analysed": ("completed_at", "analysed_at"),
    "analysis": ("analysis_started", "analysed_at"),
    "analysed_to_sent": ("analysed_at", "sent_at"),
    "receive_to_sent": ("first_received", "sent_at"),
}

#: States in which a study waits for a worker to take it.
WAITING = (StudyState.COMPLETE, StudyState.QUEUED)


#: Returns e.g. {"name": ..., "version": ..., "sha256": ...}; {} when unknown.
VersionSource = Callable[[], Mapping[str, str]]


class LedgerCollector(Collector):
    """Figures read from the ledger (and the data disk) at scrape time."""

    def __init__(
        self,
        ledger: Ledger,
        data_dir: Path,
        model_info: VersionSource = dict,
        index_info: VersionSource = dict,
    ) -> None:
        self._ledger = ledger
        self._data_dir = data_dir
        self._model_info = model_info
        self._index_info = index_info

    def collect(self) -> Iterator[Metric]:
        counts = self._ledger.count_by_state()
        yield CounterMetricFamily(
            "sonocase_instances_received",
            "Instances stored (ledger; duplicates not counted)",
            value=self._ledger.instance_count(),
        )
        yield CounterMetricFamily(
            "sonocase_studies_received",
            "Studies seen (ledger)",
            value=sum(counts.values()),
        )
        by_state = GaugeMetricFamily("sonocase_studies", "Studies per state (ledger)", labels=["state"])
        for state in StudyState:
            by_state.add_metric([state.value], counts.get(state, 0))
        yield by_state
        yield GaugeMetricFamily(
            "sonocase_queue_depth",
            "Studies complete or queued, waiting for a worker",
            value=sum(counts.get(s, 0) for s in WAITING),
        )
        analysed, not_assessed = self._ledger.image_totals()
        yield CounterMetricFamily(
            "sonocase_images_analysed",
            "Images analysed (ledger; a re-analysed study counts again)",
            value=analysed,
        )
        yield CounterMetricFamily(
            "sonocase_images_not_assessed",
            "Analysed images the domain guard flagged as outside the model's training "
            "domain: reported as not assessed, without a class (ledger; a re-analysed study counts again)",
            value=not_assessed,
        )
        yield self._latencies()
        yield from self._outbox()
        yield from self._files()
        yield GaugeMetricFamily(
            "sonocase_disk_free_bytes",
            "Free disk space where the spool and ledger live",
            value=free_disk_mb(self._data_dir) * 2**20,
        )
        for name, doc, source in (
            ("sonocase_model", "The model the node is configured with", self._model_info),
            ("sonocase_index", "The similar-case index the node queries", self._index_info),
        ):
            info = dict(source())
            if info:
                yield InfoMetricFamily(name, doc, value=info)

    def _latencies(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            "sonocase_stage_latency_seconds",
            "Seconds between two time stamps of a study (ledger), per stage",
            labels=["stage"],
        )
        for stage, (start, end) in STAGES.items():
            cumulative, count, total = self._ledger.latency_histogram(start, end, LATENCY_BUCKETS)
            buckets = [(str(b), c) for b, c in zip(LATENCY_BUCKETS, cumulative, strict=True)]
            family.add_metric([stage], [*buckets, ("+Inf", count)], sum_value=total)
        return family

    def _outbox(self) -> Iterator[Metric]:
        totals = self._ledger.outbox_totals()
        objects = GaugeMetricFamily("sonocase_outbox_objects", "Result objects per delivery state", labels=["state"])
        for state in OutboxState:
            objects.add_metric([state.value], totals.get(state, (0, 0))[0])
        yield objects
        yield GaugeMetricFamily(
            "sonocase_send_retries",
            "Failed delivery attempts recorded in the outbox (each is retried; a resend resets them)",
            value=sum(attempts for _, attempts in totals.values()),
        )

    def _files(self) -> Iterator[Metric]:
        spool = GaugeMetricFamily(
            "sonocase_spool_bytes", "Bytes of received instances in the spool, by study state", labels=["state"]
        )
        held = self._ledger.spool_bytes_by_state()
        for state in StudyState:
            spool.add_metric([state.value], held.get(state, 0))
        yield spool
        removed = CounterMetricFamily(
            "sonocase_removed_bytes", "Bytes of done studies' files removed by retention", labels=["kind"]
        )
        totals = self._ledger.purge_totals()
        for kind in FILE_KINDS:
            removed.add_metric([kind], totals.get(kind, (0, 0))[1])
        yield removed
