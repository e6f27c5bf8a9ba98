"""The worker processes ``serve`` starts itself (embedded default): one
``sonocase worker`` child, supervised and restarted if it dies."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading

from pydantic import BaseModel
from pydantic_settings import NoDecode

from service.pipeline.queue import POLL_S
from service.settings import ENV_PREFIX, Settings

LOG = logging.getLogger(__name__)


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as ``SONOCASE_*`` variables, so a child process started with them
    runs with exactly this node's settings (command-line overrides included)."""
    env = {}
    for name, field in type(settings).model_fields.items():
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, list) and NoDecode in field.metadata:  # a,b,c
            text = ",".join(str(v) for v in value)
        elif isinstance(value, list):  # JSON, as pydantic-settings reads a complex value
            text = json.dumps([v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value])
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
        return [
            sys.executable,
            "-m",
            "service",
            "worker",
            "--concurrency",
            str(self.settings.workers),
            "--parent-pid",
            str(os.getpid()),
        ]

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
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
