"""Report lanes: a worker's result objects built in processes of their own.

Building a study's SR, SCs, SEGs and KOS is single-threaded Python; the analysis
is mostly ONNX Runtime (on a GPU host, almost all of it on the GPU). In one
process they take turns: a thread building objects holds Python's GIL and starves
the next study's analysis (measured: no gain at all). So each worker pool process
starts lane processes (``python -m service.pipeline.report_lane``; setting
``report_processes``, by default half the pool process's share of the cores) and
hands each analysed study to a free one: the next studies are analysed while
their predecessors' objects are built, on other cores.

A lane holds one study at a time; with every lane busy, handing on the next study
waits for the lane that got one first, so a worker never runs ahead of its
objects, and a pool process that stops waits for its lanes' studies. A lane holds
its study's lease while it builds. A lane that dies leaves its study ANALYSED, and the node's sender reports
it once the lease runs out (as for a worker killed mid-report: see
:meth:`service.delivery.sender.Sender.report_orphans`); the next study gets a new
lane. Messages are pickles over the lane's stdin and stdout: the lane is our own
child process, started from our own interpreter. A worker without the node's files
(``data_access = "http"``) builds its objects in memory and posts them with its
result (service.pipeline.remote), without a lane.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import math
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

import numpy as np

from service.common.errors import error_text
from service.common.logs import configure_logging
from service.ledger import Ledger, StudyState, open_ledger
from service.pipeline.similar import ModelIndex
from service.reports.build import build_reports, index_reference_images
from service.results import ModelIdentity
from service.settings import Settings
from service.similar.index import SimilarCaseIndex

LOG = logging.getLogger(__name__)

#: Where Linux states a cgroup v2 CPU limit ("max" or "<quota> <period>").
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
#: The pipe to the lane holds this much: a study's frames (a few hundred KiB) are
#: handed on in one write, whether or not the lane is reading yet.
PIPE_BYTES = 1 << 20
#: How long a stopping worker waits for its lane to finish the study it holds.
CLOSE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ReportJob:
    """One analysed study for the lane: the frames the analysis decoded (the pictures
    are drawn on them) and the model, whose similar-case index has the montage's images."""

    study_uid: str
    generation: int
    model: ModelIdentity | None
    frames: dict[tuple[str, int], np.ndarray]


def report_study(
    settings: Settings,
    ledger: Ledger,
    study_uid: str,
    generation: int,
    index: SimilarCaseIndex | None,
    frames: dict[tuple[str, int], np.ndarray],
) -> None:
    """Build the study's objects and queue them for sending (service.reports).
    Expected failures are recorded there; anything else is recorded here, so a
    study never stays silently analysed-but-unreported."""

    try:
        build_reports(settings, ledger, study_uid, index_reference_images(index) if index is not None else None, frames)
    except Exception as exc:  # the shell's job: any failure becomes a visible ledger state
        LOG.exception("building the reports failed", extra={"study_uid": study_uid, "stage": "report"})
        ledger.transition(
            study_uid,
            StudyState.FAILED,
            generation,
            sources=(StudyState.ANALYSED,),
            failed_stage="report",
            error=error_text(exc)[:2000],
        )


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (a cpuset), capped by a
    cgroup v2 CPU quota (a container's CPU limit), which ``os.cpu_count`` ignores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 CPU controller here
        pass
    return cores


def lane_count(settings: Settings, concurrency: int, cores: int | None = None) -> int:
    """Lanes per pool process for the setting ``report_processes``: "auto" gives each
    half its share of the cores (``cores``, default :func:`available_cores`; none with
    a share below two, where a second worker process does more than a lane). A worker
    without the node's files (``data_access = "http"``) has none (module doc)."""
    if settings.data_access == "http":
        return 0
    if settings.report_processes != "auto":
        return settings.report_processes
    return ((cores or available_cores()) // concurrency) // 2


class ReportLanes:
    """A pool process's lanes (module doc): studies go to them in turn, so with
    every lane busy the next study waits for the lane that got one first."""

    def __init__(self, settings: Settings, count: int) -> None:
        self._lanes = [ReportLane(settings) for _ in range(count)]
        self._turns = itertools.cycle(self._lanes)

    @property
    def pids(self) -> list[int]:
        return [pid for lane in self._lanes if (pid := lane.pid) is not None]

    def start(self) -> None:
        for lane in self._lanes:
            lane.start()

    def submit(self, job: ReportJob) -> None:
        next(self._turns).submit(job)  # waits for that lane's study before

    def close(self) -> None:
        """Wait for every lane's study, then end the lanes."""
        for lane in self._lanes:
            lane.close()


class ReportLane:
    """One lane process, from the worker's side (module doc)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._process: subprocess.Popen[bytes] | None = None
        self._pending: str | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def submit(self, job: ReportJob) -> None:
        """Hand ``job`` to the lane once the study before it is done."""
        self.wait()
        if self._process is None or self._process.poll() is not None:
            self.start()
        assert self._process is not None and self._process.stdin is not None
        try:
            _send(self._process.stdin, job)
        except OSError:  # died since it was started or last answered: its study is an orphan already
            LOG.error("the report process is gone; starting another", extra={"study_uid": job.study_uid})
            self.start()
            assert self._process is not None and self._process.stdin is not None
            _send(self._process.stdin, job)
        self._pending = job.study_uid

    def wait(self) -> None:
        """Until the study in the lane is done (reported or failed in the ledger)."""
        if self._pending is None or self._process is None:
            return
        study_uid, self._pending = self._pending, None
        assert self._process.stdout is not None
        try:
            pickle.load(self._process.stdout)
        except (EOFError, OSError, pickle.UnpicklingError):
            LOG.error(
                "the report process ended while building this study's objects; the node reports it "
                "when its lease runs out",
                extra={"study_uid": study_uid},
            )
            self._stop(kill=True)

    def close(self) -> None:
        """Wait for the study in the lane, then end the lane."""
        self.wait()
        self._stop(kill=False)

    def start(self) -> None:
        """A new lane process (any old one is ended): a pool process starts one as it
        starts, so the lane's imports are done before the first study."""
        self._stop(kill=True)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "service.pipeline.report_lane"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self._process.stdin is not None
        with contextlib.suppress(OSError):  # Linux: a study's frames go into the pipe at once
            fcntl.fcntl(self._process.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        _send(self._process.stdin, self.settings)
        LOG.info("report process %d started", self._process.pid)

    def _stop(self, kill: bool) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if kill:
            process.kill()
        elif process.stdin is not None:
            process.stdin.close()  # the lane's end of input: it exits
        try:
            process.wait(CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()


def _send(pipe: IO[bytes], message: object) -> None:
    pickle.dump(message, pipe, protocol=pickle.HIGHEST_PROTOCOL)
    pipe.flush()


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    """The lane: the settings, then jobs until the end of ``requests``; after each,
    its study UID on ``replies``."""
    settings: Settings = pickle.load(requests)
    configure_logging(settings.log_level, settings.log_format)
    ledger = open_ledger(settings)
    indexes = ModelIndex(settings)
    try:
        while True:
            try:
                job: ReportJob = pickle.load(requests)
            except EOFError:  # the worker stopped
                return
            index = indexes.for_model(job.model) if job.model is not None else None
            with ledger.keep_lease(job.study_uid, job.generation, settings.task_lease_s):
                report_study(settings, ledger, job.study_uid, job.generation, index, job.frames)
            try:
                _send(replies, job.study_uid)
            except BrokenPipeError:  # the worker is gone; what it handed on is done
                return
    finally:
        indexes.close()
        ledger.close()


if __name__ == "__main__":
    replies = sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but replies may reach the worker's pipe
    serve(sys.stdin.buffer, replies)
