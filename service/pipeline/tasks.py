"""The analysis worker: a thin Celery task around :func:`process_study`, and the
``sonocase worker`` command.

A task carries only a study UID; everything else comes from the ledger. It is
idempotent: the worker first claims the study in the ledger (a lease), so a
redelivered or re-sent message for a study that is being or has been analysed does
nothing, and results are keyed by (study, generation), heatmaps by UIDs. A failure
is recorded in the ledger and retried by the scheduler with exponential backoff;
after ``task_max_attempts`` the study is FAILED with the reason, never dropped.
With ``data_access = "http"`` the worker reads the study from the node and hands
its results back over HTTP (service.pipeline.remote) instead of using data_dir.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import celery.apps.worker
import click
import numpy as np
from celery import Celery
from celery.signals import setup_logging, worker_process_init, worker_process_shutdown

from service.cli import settings_from
from service.common.backoff import backoff_delay
from service.common.errors import error_text
from service.ledger import Ledger, StudyState, open_ledger
from service.model.inference import ModelError, OnnxModel
from service.pipeline.analysis import analyse_study
from service.pipeline.queue import QUEUE, TASK_NAME, create_app
from service.pipeline.remote import NodeClient, NodeUnavailable, analyse_remotely
from service.pipeline.report_lane import ReportJob, ReportLanes, available_cores, lane_count, report_study
from service.pipeline.similar import ModelIndex
from service.reports.construction import warm_up
from service.results import StudyResult
from service.settings import Settings
from service.similar.index import SimilarCaseIndex

LOG = logging.getLogger(__name__)
#: The jitter of analysis retries: workers that failed together do not retry together.
_JITTER = random.Random()
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class WorkerState:
    """What one worker process keeps between tasks: its ledger handle, the ONNX
    session (loaded once per process) and the similar-case index.

    Built in the parent, opened in each pool process (SQLite handles and ONNX
    Runtime sessions must not cross a fork).
    """

    def __init__(self, settings: Settings, threads: int = 0, report_processes: int = 0) -> None:
        self.settings = settings
        self.threads = threads
        self.report_processes = report_processes
        self._lanes: ReportLanes | None = None
        self._pid: int | None = None
        self._ledger: Ledger | None = None
        self._model: OnnxModel | None = None
        self._indexes = ModelIndex(settings)
        self._node: NodeClient | None = None

    def open(self) -> None:
        """Open the ledger, load the model and start the report lanes of this process.
        A model that cannot load is logged here and reported per study (the study fails visibly)."""
        self._pid = os.getpid()
        self._ledger = open_ledger(self.settings)
        self._model = None
        self._indexes = ModelIndex(self.settings)
        self._lanes = ReportLanes(self.settings, self.report_processes) if self.report_processes else None
        if self._lanes is not None:  # they load while this process does
            self._lanes.start()
        warm_up()  # this process builds objects too (without lanes, or when they are full)
        try:
            self.model()
        except ModelError:
            LOG.exception(
                "the model %s cannot be loaded; studies will fail until it is fixed", self.settings.model_path
            )
        if self._lanes is not None:  # no study before the lanes can build its objects at full speed
            self._lanes.ready()

    @property
    def ledger(self) -> Ledger:
        if self._pid != os.getpid() or self._ledger is None:
            self.open()
        assert self._ledger is not None
        return self._ledger

    def node(self) -> NodeClient:
        """The node's HTTP side, for a worker without its files (``data_access = "http"``)."""
        if self._node is None:
            self._node = NodeClient(self.settings)
        return self._node

    def model(self) -> OnnxModel:
        if self._model is None:
            self._model = OnnxModel(
                self.settings.model_path, self.settings.execution_provider, self.settings.batch_size, self.threads
            )
        return self._model

    def index(self, model: OnnxModel) -> SimilarCaseIndex | None:
        """The node's similar-case index for ``model`` (see :class:`ModelIndex`)."""
        return self._indexes.for_model(model.identity)

    def report(
        self,
        study_uid: str,
        generation: int,
        model: OnnxModel,
        index: SimilarCaseIndex | None,
        frames: dict[tuple[str, int], np.ndarray],
    ) -> None:
        """Build the analysed study's objects in a report lane (service.pipeline.report_lane)
        while this process analyses the next study; here without lanes, or when every
        lane is full."""
        job = ReportJob(study_uid, generation, model.identity if index is not None else None, frames)
        if self._lanes is None or not self._lanes.submit(job):
            report_study(self.settings, self.ledger, study_uid, generation, index, frames)

    @property
    def report_pids(self) -> list[int]:
        """The report lanes' processes that run."""
        return self._lanes.pids if self._lanes is not None else []

    def close(self) -> None:
        """Wait for the report lanes' studies and end the lanes (a pool process stopping)."""
        if self._lanes is not None:
            self._lanes.close()


def process_study(state: WorkerState, study_uid: str) -> str:
    """Claim, analyse and store one study; return what happened (for the task result
    and the tests): ``analysed``, ``not-claimed``, ``stale``, or the ledger state
    after a failure (``complete`` = retry scheduled, ``failed``)."""
    settings, ledger = state.settings, state.ledger
    generation = ledger.claim_analysis(study_uid, settings.task_lease_s)
    if generation is None:
        LOG.info("not claimed: analysed already, or another worker holds its lease", extra={"study_uid": study_uid})
        return "not-claimed"
    LOG.info("analysing generation %d", generation, extra={"study_uid": study_uid})
    with ledger.keep_lease(study_uid, generation, settings.task_lease_s):
        try:
            model = state.model()
            if settings.data_access == "http":
                return _process_remotely(state, study_uid, generation, model)
            index = state.index(model)
            analysis = analyse_study(settings, model, study_uid, generation, ledger.instances(study_uid), index)
        except Exception as exc:  # the shell's job: any failure becomes a visible ledger state
            reason = error_text(exc)
            outcome = ledger.retry_or_fail(
                study_uid,
                "analysis",
                reason,
                settings.task_max_attempts,
                lambda attempts: backoff_delay(
                    attempts, settings.task_retry_backoff_s, settings.task_retry_backoff_max_s, _JITTER
                ),
            )
            LOG.exception(
                "analysis failed (%s)",
                "giving up" if outcome == StudyState.FAILED else "will retry",
                extra={"study_uid": study_uid},
            )
            return str(outcome)
        analysed, not_assessed = analysis.result.image_counts()
        if not ledger.finish_analysis(
            study_uid,
            generation,
            analysis.result,
            lease_s=settings.task_lease_s,
            images_analysed=analysed,
            images_not_assessed=not_assessed,
        ):
            LOG.info(
                "result of generation %d not stored: the study was re-opened, or another worker stored it first",
                generation,
                extra={"study_uid": study_uid},
            )
            return "stale"
        _log_analysed(study_uid, analysis.result)
        if index is not None and analysis.index_entries:
            # Before the report: once the study is sent, retention may remove the
            # spool files the index copies its reference images from.
            try:
                index.add(analysis.index_entries)
            except Exception:  # the result and reports stand; only the index misses this study
                LOG.exception(
                    "the analysed study could not be added to the similar-case index", extra={"study_uid": study_uid}
                )
        state.report(study_uid, generation, model, index, analysis.frames)
    return "analysed"


def _process_remotely(state: WorkerState, study_uid: str, generation: int, model: OnnxModel) -> str:
    """A worker without the node's files (service.pipeline.remote). A node that did
    not answer the upload may still have taken it: if the study moved on meanwhile,
    nothing is retried."""
    try:
        analysis, handed = analyse_remotely(
            state.settings, state.node(), model, study_uid, generation, state.ledger.instances(study_uid)
        )
    except NodeUnavailable:
        now = state.ledger.study(study_uid)
        if now is not None and (now.generation, now.state) != (generation, StudyState.ANALYSING):
            LOG.warning("the node's answer was lost, but it took the result", extra={"study_uid": study_uid})
            return "stale"
        raise
    if handed.outcome == "stale":
        LOG.info(
            "result of generation %d not taken by the node: the study moved on",
            generation,
            extra={"study_uid": study_uid},
        )
        return "stale"
    _log_analysed(study_uid, analysis.result)
    return "analysed"


def _log_analysed(study_uid: str, result: StudyResult) -> None:
    summary = result.summary
    LOG.info(
        "analysed: %s%s in %.2f s",
        summary.predicted or "no class",
        f" ({summary.probability:.3f})" if summary.probability is not None else "",
        result.timings_s.get("total_s", 0.0),
        extra={"study_uid": study_uid},
    )


def analysis_threads(concurrency: int, lanes: int) -> int:
    """ONNX Runtime threads per pool process: its share of the cores less those its
    report lanes build objects on (threads beyond the free cores wait on each other)."""
    return max(1, available_cores() // concurrency - lanes)


def register_tasks(app: Celery, state: WorkerState) -> None:
    """Bind the analysis task to ``app``; acks_late + reject_on_worker_lost come from
    the app's configuration (service.pipeline.queue.celery_config)."""

    @app.task(name=TASK_NAME, queue=QUEUE)
    def analyse(study_uid: str) -> dict[str, Any]:
        return {"study_uid": study_uid, "outcome": process_study(state, study_uid)}


def _stop_with_parent(parent_pid: int) -> None:
    """Have Linux send us SIGTERM (a warm shutdown) when our parent dies, so the
    workers of a killed ``serve`` do not live on beside the restarted node's."""
    if sys.platform != "linux":
        raise click.UsageError("--parent-pid needs Linux (prctl PR_SET_PDEATHSIG)")
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # it died before the request took effect
        raise SystemExit(f"the process that started this worker ({parent_pid}) has exited")


@click.command()
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Pool processes, each with its own model session (one per GPU is typical).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The node's data folder (setting 'data_dir'); shared with the node in distributed mode "
    "unless data_access is 'http'.",
)
@click.option(
    "--parent-pid", type=int, help="Shut down when this process (the 'serve' that started us) dies; Linux only."
)
@click.pass_context
def worker(ctx: click.Context, concurrency: int, data_dir: Path | None, parent_pid: int | None) -> None:
    """Analyse queued studies until SIGTERM (warm shutdown: the running study finishes).

    Uses the broker of setting broker_url (empty: the node's embedded queue folder
    under data_dir). Each pool process loads the ONNX model once.
    """
    settings = settings_from(ctx, data_dir=data_dir)
    if parent_pid is not None:
        _stop_with_parent(parent_pid)
    app = create_app(settings)
    lanes = lane_count(settings, concurrency)
    state = WorkerState(settings, analysis_threads(concurrency, lanes), lanes)
    register_tasks(app, state)
    worker_process_init.connect(lambda **_: state.open(), weak=False)
    worker_process_shutdown.connect(lambda **_: state.close(), weak=False)
    # Our logging (set up by settings_from) stays as it is: with a receiver connected,
    # Celery configures no handler of its own and leaves stdout and stderr alone.
    setup_logging.connect(lambda **_: None, weak=False)
    argv = [
        "worker",
        f"--concurrency={concurrency}",
        "--pool=prefork",
        f"--loglevel={settings.log_level}",
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
        f"--queues={QUEUE}",
        f"--hostname=sonocase-{os.getpid()}@%h",
    ]
    if settings.log_format == "json":
        argv.insert(0, "--quiet")  # celery's own option (before the command): the start-up banner is text
        celery.apps.worker.safe_say = _say_as_log  # its shutdown notices are written to stdout directly
    app.worker_main(argv)


def _say_as_log(msg: str, f: Any = None) -> None:
    """What Celery's worker says outside logging (``celery.apps.worker.safe_say``: the
    shutdown notices of its signal handlers), as a log record: used in json mode only."""
    logging.getLogger("celery.apps.worker").info(msg.strip())
