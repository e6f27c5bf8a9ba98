"""The queue between the scheduler and the workers: the Celery application.

The queue only carries study UIDs to workers; the ledger decides what must be
analysed (:mod:`service.pipeline.scheduler`). Brokers (setting ``broker_url``):

* empty: the embedded broker, a queue folder under ``data_dir`` (kombu's file-system
  transport; each message written atomically and fsynced), needing no external
  service; queued studies survive a restart of the node. ``serve`` starts the
  workers itself (setting ``workers``).
* ``redis://host:port/db``: distributed mode; any number of ``sonocase worker``
  processes on any hosts that share the data folder (spool, ledger, results). One
  Redis database serves one node: workers read studies from their node's ledger.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Celery
from kombu.transport import filesystem
from kombu.utils.json import dumps

from service.common.spool import write_atomic
from service.pipeline.pool import POOL_PATH
from service.settings import Settings

LOG = logging.getLogger(__name__)

TASK_NAME = "sonocase.analyse_study"
QUEUE = "sonocase.analysis"
#: How often the scheduler looks at the ledger when nothing wakes it (completion
#: wakes it at once; this catches retries and expired leases).
POLL_S = 0.1
#: How often an idle worker lists the embedded broker's folder: a directory listing
#: per worker process, and on average half of it is added to every study's latency.
#: (Redis hands messages over at once.)
BROKER_POLL_S = 0.01


class _AtomicFilesystemChannel(filesystem.Channel):
    """kombu's file-system channel, but a message appears in the queue folder only
    complete (temporary name, fsync, rename): the stock channel creates the file
    before writing it, and a consumer listing the folder in between reads nothing."""

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]  # as kombu's
        name = f"{time.time_ns():020d}_{uuid.uuid4()}.{queue}.msg"
        durable = bool(self.transport_options.get("sonocase_durable", True))
        write_atomic(Path(self.data_folder_out) / name, dumps(payload).encode(), durable=durable)


class AtomicFilesystemTransport(filesystem.Transport):
    Channel = _AtomicFilesystemChannel


def queue_dir(settings: Settings) -> Path:
    """The embedded broker's folder (messages, and kombu's exchange table)."""
    return settings.data_dir / "queue"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for our one task: late acknowledgement, redelivery when a
    worker dies, one message per worker process at a time, JSON only."""
    config: dict[str, Any] = {
        "task_default_queue": QUEUE,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        # Results live in the ledger, not in Celery: no need to wait 10 s for one
        # before a killed pool process's message is rejected and re-queued.
        "worker_lost_wait": 1.0,
        # A hung analysis keeps renewing its lease: Celery kills its pool process after
        # this (a new one takes its place) and the lease brings the study back.
        "task_time_limit": settings.task_time_limit_s,
        "task_ignore_result": not settings.result_backend,
        "result_backend": settings.result_backend or None,
    }
    if settings.embedded_broker:
        folder = queue_dir(settings)
        config.update(
            broker_url="filesystem://localhost/",
            broker_transport=AtomicFilesystemTransport,
            broker_transport_options={
                "data_folder_in": str(folder / "messages"),
                "data_folder_out": str(folder / "messages"),
                "control_folder": str(folder / "control"),
                "polling_interval": BROKER_POLL_S,
                "sonocase_durable": settings.durability == "fsync",
            },
            # No broadcast between workers over a folder: nothing to gossip with.
            worker_enable_remote_control=False,
        )
        if settings.pool_wait_unlocked:  # this broker has no event loop: Celery's blocking pool
            config["worker_pool"] = POOL_PATH
    else:
        config.update(
            broker_url=settings.broker_url,
            # Redis hands an unacknowledged message out again after this, so it must be
            # longer than any analysis may run; the ledger lease brings back a study
            # whose worker died much sooner.
            broker_transport_options={"visibility_timeout": settings.task_time_limit_s + 60.0},
        )
    return config


def create_app(settings: Settings) -> Celery:
    """A Celery application for these settings (no module-level app: each process
    builds its own from the settings it was started with)."""
    if settings.embedded_broker:  # kombu's file-system transport expects its folders
        for sub in ("messages", "control"):
            (queue_dir(settings) / sub).mkdir(parents=True, exist_ok=True)
    app = Celery("sonocase", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def send_analysis(app: Celery, study_uid: str) -> None:
    """Queue the analysis of one study: the message carries only its UID."""
    app.send_task(TASK_NAME, args=[study_uid], queue=QUEUE)
