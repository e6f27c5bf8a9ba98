"""Report lanes: a worker's result objects built in processes of their own.

Building a study's SR, SCs, SEGs and KOS is single-threaded Python; the analysis
is mostly ONNX Runtime (on a GPU host, almost all of it on the GPU). In one
process they take turns: a thread building objects holds Python's GIL and starves
the next study's analysis (measured: no gain at all). So each worker pool process
starts lane processes (``python -m service.pipeline.report_lane``; setting
``report_processes``, by default half the pool process's share of the cores) and
hands each analysed study to the one holding the fewest: the next studies are analysed while
their predecessors' objects are built, on other cores.

A lane holds at most :data:`LANE_DEPTH` studies: one it builds and one waiting in
its pipe. When every lane holds that many, the worker builds the study's objects
itself instead of waiting, and the lanes build on meanwhile: the cores stay busy
whichever of the analysis and the objects is slower (on a 2-core host the objects
are: a lane alone could not keep up with the analysis). A stopping pool process
waits for its lanes' studies. A lane holds its study's lease while it builds; a
study waiting in its pipe has just had its lease renewed by the worker. A lane
that dies leaves its studies ANALYSED, and the node's sender reports them once
their leases run out (as for a worker killed mid-report: see
:meth:`service.delivery.sender.Sender.report_orphans`); the next study gets a new
lane. Jobs are pickles over the lane's stdin (the lane is our own child process,
started from our own interpreter); the lane answers each with its study UID on a
line of its stdout. A worker without the node's files
(``data_access = "http"``) builds its objects in memory and posts them with its
result (service.pipeline.remote), without a lane.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import pickle
import queue
import select
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

import numpy as np

from service.common.errors import error_text
from service.common.logs import configure_logging
from service.ledger import Ledger, StudyState, open_ledger
from service.pipeline.similar import ModelIndex
from service.reports.build import build_reports, index_reference_images
from service.reports.construction import warm_up
from service.results import ModelIdentity
from service.settings import Settings
from service.similar.index import SimilarCaseIndex

LOG = logging.getLogger(__name__)

#: Where Linux states a cgroup v2 CPU limit ("max" or "<quota> <period>").
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
#: The pipe to the lane holds this much: a study's frames (a few hundred KiB) are
#: handed on in one write while the lane's reader takes them in.
PIPE_BYTES = 1 << 20
#: Studies one lane holds at once (module doc): with two, it never waits while the
#: worker builds a study itself.
LANE_DEPTH = 2
#: How long a worker waits for a new lane to be ready (its imports, :func:`warm_up`).
READY_TIMEOUT_S = 120.0
#: How long a stopping worker waits for each of its lane's studies, and then for the lane to end.
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
    """A pool process's lanes (module doc): each study goes to the lane holding
    the fewest, unless every lane holds :data:`LANE_DEPTH`."""

    def __init__(self, settings: Settings, count: int) -> None:
        self._lanes = [ReportLane(settings) for _ in range(count)]

    @property
    def pids(self) -> list[int]:
        return [pid for lane in self._lanes if (pid := lane.pid) is not None]

    def start(self) -> None:
        """Start every lane; :meth:`ready` waits for them (meanwhile the worker loads its model)."""
        for lane in self._lanes:
            lane.start()

    def ready(self) -> None:
        for lane in self._lanes:
            lane.ready()

    def submit(self, job: ReportJob) -> bool:
        """Hand ``job`` to a lane; False when every lane is full (the caller builds it)."""
        for lane in self._lanes:
            lane.collect()
        lane = min(self._lanes, key=lambda lane: lane.held)
        if lane.held >= LANE_DEPTH:
            return False
        lane.submit(job)
        return True

    def close(self) -> None:
        """Wait for every lane's studies, then end the lanes."""
        for lane in self._lanes:
            lane.close()


class ReportLane:
    """One lane process, from the worker's side (module doc)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._process: subprocess.Popen[bytes] | None = None
        self._held: deque[str] = deque()  # study UIDs handed on and not yet answered, oldest first
        self._answers = b""  # an answer's first bytes, read before its end
        self._starting = False  # started, and its "ready" line not read yet

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def held(self) -> int:
        """Studies handed to the lane that it has not answered yet."""
        return len(self._held)

    def submit(self, job: ReportJob) -> None:
        """Hand ``job`` to the lane (a new one if it has died): it fits in the pipe at once."""
        if self._process is None or self._process.poll() is not None:
            self._lose()
            self.start()
        assert self._process is not None and self._process.stdin is not None
        try:
            _send(self._process.stdin, job)
        except OSError:  # died since it was started or last answered: what it held are orphans already
            self._lose()
            self.start()
            assert self._process is not None and self._process.stdin is not None
            _send(self._process.stdin, job)
        self._held.append(job.study_uid)

    def collect(self, wait_s: float = 0.0) -> None:
        """Take the lane's answers (each a study it is done with: reported or failed
        in the ledger); with ``wait_s``, wait that long for one, and end a lane that
        gives none (its studies are orphans: module doc)."""
        self.ready()
        while self._held and self._process is not None and self._process.stdout is not None:
            stdout = self._process.stdout.fileno()
            if not select.select([stdout], [], [], wait_s)[0]:
                if wait_s:
                    LOG.error("report process %d answered nothing in %.0f s; ending it", self._process.pid, wait_s)
                    self._lose()
                return
            data = os.read(stdout, 4096)
            if not data:
                self._lose()
                return
            self._take(data)
            wait_s = 0.0

    def _take(self, data: bytes) -> None:
        """Count the answers ``data`` completes; a new lane's first line is its "ready"."""
        *lines, self._answers = (self._answers + data).split(b"\n")
        if self._starting and lines:
            self._starting = False
            lines = lines[1:]
        for _ in lines:
            self._held.popleft()

    def close(self) -> None:
        """Wait for the studies in the lane, then end the lane."""
        while self._held and self._process is not None:
            self.collect(CLOSE_TIMEOUT_S)
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
        self._starting = True
        LOG.info("report process %d started", self._process.pid)

    def ready(self) -> None:
        """Wait for a started lane's first line, "ready": it has loaded what building
        objects needs (:func:`warm_up`), so its first study is built at full speed.
        A lane that ends or hangs instead is ended; the next study starts another."""
        while self._starting and self._process is not None and self._process.stdout is not None:
            stdout = self._process.stdout.fileno()
            chunk = os.read(stdout, 4096) if select.select([stdout], [], [], READY_TIMEOUT_S)[0] else b""
            if not chunk:
                LOG.error("report process %d did not start", self._process.pid)
                self._lose()
                return
            self._take(chunk)

    def _lose(self) -> None:
        """The lane ended: the studies it held are orphans (module doc)."""
        for study_uid in self._held:
            LOG.error(
                "the report process ended before this study's objects were built; the node reports it "
                "when its lease runs out",
                extra={"study_uid": study_uid},
            )
        self._held.clear()
        self._answers = b""
        self._stop(kill=True)

    def _stop(self, kill: bool) -> None:
        process, self._process = self._process, None
        self._starting = False
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
    its study UID on a line of ``replies``. Jobs are read as they come (a thread),
    so the worker's write of a study larger than the pipe never waits for the
    study before it."""
    settings: Settings = pickle.load(requests)
    configure_logging(settings.log_level, settings.log_format)
    warm_up()
    ledger = open_ledger(settings)
    indexes = ModelIndex(settings)
    replies.write(b"ready\n")
    replies.flush()
    jobs: queue.SimpleQueue[ReportJob | None] = queue.SimpleQueue()
    threading.Thread(target=_read_jobs, args=(requests, jobs), daemon=True).start()
    answering = True
    try:
        while (job := jobs.get()) is not None:
            index = indexes.for_model(job.model) if job.model is not None else None
            with ledger.keep_lease(job.study_uid, job.generation, settings.task_lease_s):
                report_study(settings, ledger, job.study_uid, job.generation, index, job.frames)
            if answering:
                try:
                    replies.write(job.study_uid.encode("ascii") + b"\n")
                    replies.flush()
                except BrokenPipeError:  # the worker is gone: what it handed on is still built
                    answering = False
    finally:
        indexes.close()
        ledger.close()


def _read_jobs(requests: BinaryIO, jobs: queue.SimpleQueue[ReportJob | None]) -> None:
    """Each job from ``requests`` into ``jobs``, then None at their end (the worker
    stopped) or at a message that cannot be read (raised: the thread's traceback is logged)."""
    try:
        while True:
            jobs.put(pickle.load(requests))
    except EOFError:
        pass
    finally:
        jobs.put(None)


if __name__ == "__main__":
    replies = sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but replies may reach the worker's pipe
    serve(sys.stdin.buffer, replies)
