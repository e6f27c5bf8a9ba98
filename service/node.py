"""``sonocase serve``: one process running the node's background services.

Each stage contributes a service (an object with ``name``, ``start()`` and
``stop()``) to :func:`node_services`; :class:`Node` starts them in order and stops
them in reverse on SIGTERM/SIGINT. Services hand work on through the ledger, so
stopping (or killing) the node at any moment loses nothing.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Protocol

import click

from service.cli import settings_from
from service.common.logs import announce
from service.delivery.retention import RetentionService
from service.delivery.sender import SenderService
from service.ingest.server import ReceiverService
from service.ingest.stow import stow_router
from service.ledger import Ledger, open_ledger
from service.monitoring.drift import DriftConfig
from service.monitoring.watcher import DriftWatcher
from service.ops.monitoring_page import monitoring_router
from service.ops.review import review_router
from service.ops.verdicts import verdict_router
from service.ops.web import API_PREFIX, ExtraRouter, build_web_server
from service.ops.worker_api import worker_router
from service.outcomes.mllp import MllpService
from service.pipeline.completion import CompletionLoop
from service.pipeline.routing import Router
from service.pipeline.scheduler import SchedulerService
from service.pipeline.workers import WorkerProcesses
from service.settings import Settings

LOG = logging.getLogger(__name__)


class Service(Protocol):
    """A background part of the node; ``start`` returns once it runs."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


def node_services(settings: Settings, ledger: Ledger) -> list[Service]:
    """The node's services in start order (each stage adds its line here)."""
    scheduler = SchedulerService(settings, ledger)
    receiver = ReceiverService(settings, ledger)
    # STOW-RS stores through the running receiver's store (503 until it runs).
    stow = ExtraRouter(stow_router(settings, lambda: receiver.store), settings.stow_max_request_mb << 20)
    verdicts = ExtraRouter(verdict_router(ledger, API_PREFIX), settings.web_max_body_bytes, reviewers=True)
    drift = DriftWatcher(ledger, DriftConfig())  # one per node: the page and /metrics read the same
    monitoring = ExtraRouter(monitoring_router(ledger, drift, API_PREFIX), settings.web_max_body_bytes)
    routers = [stow, verdicts, monitoring]
    if settings.worker_token and not settings.http_port:
        LOG.warning("worker_token is set but http_port is 0: workers with data_access 'http' cannot reach this node")
    if settings.worker_token:  # workers without the node's files read and hand back through these
        routers.append(ExtraRouter(worker_router(settings, ledger), settings.worker_max_result_mb << 20, own_auth=True))
    return [
        *(
            [build_web_server(settings, ledger, routers=routers, pages=[review_router(ledger)], drift=drift)]
            if settings.http_port
            else []
        ),
        CompletionLoop(
            ledger, settings.quiet_period_s, on_complete=scheduler.wake, route=Router(settings, ledger).route
        ),
        *([WorkerProcesses(settings)] if settings.workers else []),
        scheduler,
        SenderService(settings, ledger),
        RetentionService(settings, ledger),
        *([MllpService(settings, ledger)] if settings.hl7_port else []),
        receiver,
    ]


class Node:
    """Starts services in order, stops them in reverse; a failed start stops the
    ones already running before the error goes on."""

    def __init__(self, services: Sequence[Service]) -> None:
        self.services = list(services)
        self._running: list[Service] = []
        self._stop_requested = threading.Event()

    def start(self) -> None:
        for service in self.services:
            try:
                service.start()
            except BaseException:
                LOG.error("service %s failed to start; stopping the node", service.name)
                self.stop()
                raise
            self._running.append(service)
            LOG.debug("service %s started", service.name)

    def stop(self) -> None:
        while self._running:
            service = self._running.pop()
            try:
                service.stop()
            except Exception:  # the other services must still stop
                LOG.exception("service %s did not stop cleanly", service.name)

    def request_stop(self) -> None:
        self._stop_requested.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a stop is requested; False if ``timeout`` ran out first."""
        return self._stop_requested.wait(timeout)

    def stop_on_signals(self) -> None:
        """SIGTERM (container stop) and SIGINT (Ctrl-C) end :meth:`wait`."""

        def handler(signum: int, frame: FrameType | None) -> None:
            LOG.info("%s received, stopping", signal.Signals(signum).name)
            self.request_stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


@click.command()
@click.option("--port", type=click.IntRange(1, 65535), help="DICOM port (setting 'port', default 11112).")
@click.option("--ae-title", help="Our AE title (setting 'ae_title', default SONOCASE).")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where spool, ledger and results live (setting 'data_dir', default ./sonocase-data).",
)
@click.pass_context
def serve(ctx: click.Context, port: int | None, ae_title: str | None, data_dir: Path | None) -> None:
    """Run the node until SIGTERM or Ctrl-C.

    Receives studies by C-STORE, completes each after its quiet period and keeps
    everything in the ledger, so a restart resumes where the node stopped.
    """
    settings = settings_from(ctx, port=port, ae_title=ae_title, data_dir=data_dir)
    if not settings.allowed_callers:
        LOG.warning("allowed_callers is empty: any calling AE title may store to %s", settings.ae_title)
    ledger = open_ledger(settings)
    node = Node(node_services(settings, ledger))
    node.stop_on_signals()
    try:
        node.start()
        tls = " (DICOM TLS)" if settings.tls_cert else ""
        announce(
            f"listening as {settings.ae_title} on {settings.host}:{settings.port}{tls}", settings.log_format, __name__
        )
        node.wait()
    finally:
        node.stop()
        ledger.close()
