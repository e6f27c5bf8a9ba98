"""From the ledger to the queue: the Celery application, the scheduler, and the
worker processes ``serve`` starts.

The ledger decides what must be analysed; the queue only carries study UIDs to
workers. :func:`schedule_due` sends a task for every study that needs one (complete,
a retry that is due, or a queued/analysing study whose lease ran out) and only then
marks it queued, so a crash between the two re-sends the task (harmless: workers
claim a study in the ledger before they analyse it, and a worker that claims it
before the mark keeps its claim). A message lost by the broker
(a Redis restart without persistence, a worker killed while holding it) is therefore
never a lost study: its lease runs out and the scheduler sends it again.

Brokers (setting ``broker_url``):

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
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery
from kombu.exceptions import KombuError, OperationalError
from kombu.transport import filesystem
from kombu.utils.json import dumps

from service.ledger import Ledger
from service.settings import ENV_PREFIX, Settings
from service.spool import write_atomic

LOG = logging.getLogger(__name__)

TASK_NAME = "sonocase.analyse_study"
QUEUE = "sonocase.analysis"
#: How often the scheduler looks at the ledger, and the embedded broker at its folder
#: (an indexed query and a directory listing: cheap, and each adds half of it to latency).
POLL_S = 0.1


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
                "polling_interval": POLL_S,
                "sonocase_durable": settings.durability == "fsync",
            },
            # No broadcast between workers over a folder: nothing to gossip with.
            worker_enable_remote_control=False,
        )
    else:
        config.update(
            broker_url=settings.broker_url,
            # A message a dead worker held comes back after this; the ledger lease
            # brings the study back on the same schedule in any case.
            broker_transport_options={"visibility_timeout": max(60.0, settings.task_lease_s)},
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


def schedule_due(ledger: Ledger, send: Callable[[str], None], lease_s: float, now: float | None = None) -> list[str]:
    """Send a task for every study the ledger says needs one, then mark it queued.

    Stops at the first failure to send (broker down): the rest stay due and are
    tried on the next round.
    """
    sent = []
    for study_uid in ledger.due_for_queue(now):
        send(study_uid)
        ledger.mark_queued(study_uid, lease_s, now)
        sent.append(study_uid)
        LOG.info("analysis queued", extra={"study_uid": study_uid})
    return sent


class SchedulerService:
    """The node's scheduler thread: :func:`schedule_due` every POLL_S seconds."""

    name = "scheduler"

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.ledger = ledger
        self.app = create_app(settings)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._broker_down = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def run_once(self) -> list[str]:
        try:
            sent = schedule_due(self.ledger, lambda uid: send_analysis(self.app, uid), self.settings.task_lease_s)
        except (OperationalError, KombuError, OSError) as exc:
            if not self._broker_down:
                LOG.error("cannot queue analyses, broker unreachable (%s); studies stay due and are retried", exc)
            self._broker_down = True
            return []
        if self._broker_down:
            LOG.info("broker reachable again")
            self._broker_down = False
        return sent

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.run_once()
            except Exception:  # the loop must outlive any one bad round; the ledger keeps what is due
                LOG.exception("scheduler round failed; trying again")


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as ``SONOCASE_*`` variables, so a child process started with them
    runs with exactly this node's settings (command-line overrides included)."""
    env = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, list):
            text = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        env[ENV_PREFIX + name.upper()] = text
    return env


class WorkerProcesses:
    """``sonocase worker`` as a child of ``serve`` (embedded default): one Celery
    worker with ``settings.workers`` pool processes, restarted if it dies."""

    name = "workers"
    RESTART_DELAY_S = 1.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "service", "worker", "--concurrency", str(self.settings.workers),
                "--parent-pid", str(os.getpid())]

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env.update(settings_env(self.settings))
        # Its own process group: stopping the node stops the pool processes too.
        process = subprocess.Popen(self.command(), env=env, start_new_session=True)
        LOG.info("started analysis worker (pid %d, %d processes)", process.pid, self.settings.workers)
        return process

    def start(self) -> None:
        self.process = self._spawn()
        self._thread.start()

    def _supervise(self) -> None:
        while not self._stop.wait(POLL_S):
            if self.process is not None and self.process.poll() is not None:
                LOG.error("analysis worker exited with %s; restarting it", self.process.returncode)
                self._terminate(self.process)
                if self._stop.wait(self.RESTART_DELAY_S):
                    return
                self.process = self._spawn()

    def stop(self) -> None:
        """Warm shutdown (SIGTERM): the running analysis finishes or, past the
        timeout, is killed; its study comes back when its lease runs out."""
        self._stop.set()
        self._thread.join(timeout=5)
        if self.process is not None:
            self._terminate(self.process)

    @staticmethod
    def _terminate(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
        """SIGTERM to Celery's main process (it stops its pool), then SIGKILL to
        whatever is left of the group, e.g. pool processes of a main that was killed."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                LOG.warning("analysis worker did not stop within %.0f s; killing it", timeout)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
