"""Prometheus metrics for ``/metrics``.

Two kinds of figure. The ledger is shared by every process of the node (receiver,
worker subprocesses, workers on other hosts) and survives restarts, so whatever it
knows - studies per state, instances received, stage latencies, outbox retries - is
read from it when Prometheus scrapes (:class:`service.ops.ledger_metrics.LedgerCollector`),
never counted in one process's memory. What only the receiving or sending code sees as it happens -
the C-STORE status it returned, the outcome of each STOW-RS instance and of each
delivery attempt - is counted by the stages calling :func:`observe_cstore`,
:func:`observe_stow` and :func:`observe_send`; those counters
belong to the process that serves ``/metrics`` (the node), where both stages run.
"""

from __future__ import annotations

from typing import Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.registry import Collector

# Created unregistered: each node's registry (build_registry) adds them, so several
# nodes in one process (the tests) never collide on the global registry.
CSTORE_RESPONSES = Counter(
    "sonocase_cstore_responses",
    "C-STORE responses the receiver returned, by status code",
    ["status"],
    registry=None,
)
CONNECTIONS_REFUSED = Counter(
    "sonocase_connections_refused",
    "DICOM connections and associations the receiver refused, closed or aborted, by reason",
    ["reason"],
    registry=None,
)
STOW_INSTANCES = Counter(
    "sonocase_stow_instances",
    "Instances received over STOW-RS, by Failure Reason (0x0000: stored)",
    ["status"],
    registry=None,
)
HTTP_CONNECTIONS_CLOSED = Counter(
    "sonocase_http_connections_closed",
    "HTTP connections the node closed or refused before their request was "
    "in, by reason (too-slow, evicted to make room, full)",
    ["reason"],
    registry=None,
)
WEB_LOGINS_REFUSED = Counter(
    "sonocase_web_logins_refused",
    "Sign-ins and Bearer tokens refused, by reason (wrong token, throttled)",
    ["reason"],
    registry=None,
)
SEND_ATTEMPTS = Counter(
    "sonocase_send_attempts",
    "Delivery attempts of the sender (C-STORE or STOW-RS), by outcome (failed ones are retried)",
    ["outcome"],
    registry=None,
)


def observe_cstore(status: int) -> None:
    """Count one C-STORE response (the receiver calls this with the status it returns)."""
    CSTORE_RESPONSES.labels(status=f"0x{status:04X}").inc()


def observe_refusal(reason: str) -> None:
    """Count one connection or association the receiver refused, closed or aborted
    (``reason``: a short fixed word such as ``host`` or ``pdu-too-large``)."""
    CONNECTIONS_REFUSED.labels(reason=reason).inc()


def observe_stow(status: int) -> None:
    """Count one instance of a STOW-RS request: 0 stored, else its Failure Reason."""
    STOW_INSTANCES.labels(status=f"0x{status:04X}").inc()


def observe_web_refusal(reason: str) -> None:
    """Count one HTTP connection closed before its request was in (``reason``: a short fixed word)."""
    HTTP_CONNECTIONS_CLOSED.labels(reason=reason).inc()


def observe_login_refusal(reason: Literal["wrong", "throttled"]) -> None:
    """Count one credential refused: a wrong token, or any token while its sender is throttled."""
    WEB_LOGINS_REFUSED.labels(reason=reason).inc()


def observe_send(outcome: Literal["accepted", "failed"]) -> None:
    """Count one delivery attempt of one object (the sender calls this)."""
    SEND_ATTEMPTS.labels(outcome=outcome).inc()


def build_registry(collector: Collector) -> CollectorRegistry:
    """A registry for one node: its ledger figures (``collector``:
    :class:`service.ops.ledger_metrics.LedgerCollector`), this process's counters and
    the usual process figures (CPU, memory, open files)."""
    registry = CollectorRegistry()
    for metric in (
        CSTORE_RESPONSES,
        CONNECTIONS_REFUSED,
        STOW_INSTANCES,
        SEND_ATTEMPTS,
        HTTP_CONNECTIONS_CLOSED,
        WEB_LOGINS_REFUSED,
        collector,
    ):
        registry.register(metric)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry
