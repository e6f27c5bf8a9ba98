"""Test support for the worker: synthetic studies as files, DCMTK's storescu, and
`sonocase serve` / `sonocase worker` as processes whose output goes to a log file
(a pipe nobody reads would stall a chatty worker)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from pydicom.dataset import Dataset

from service.common.spool import instance_path
from service.datasets.synthetic import synthetic_study
from service.ledger import InstanceRecord, Ledger, StudyState, open_ledger
from service.pipeline.workers import settings_env
from service.settings import ENV_PREFIX, Settings
from tests.support.common import free_port, wait_for

#: The task lease of the fault tests: short, so a killed worker's study is taken over soon.
LEASE_S = 3.0
#: With a PACS configured a study passes through "reported" to "sent" within a
#: second: waits accept any state from the one awaited on.
REPORTED_OR_SENT = (StudyState.REPORTED, StudyState.SENT)

T = TypeVar("T")


def write_study(folder: Path, n_images: int, label: str, seed: int, index: int = 0) -> tuple[str, list[Path]]:
    """A synthetic study as Part 10 files; returns its Study Instance UID and paths."""
    folder.mkdir(parents=True, exist_ok=True)
    datasets = synthetic_study(n_images, label, seed=seed, index=index)
    paths = []
    for k, ds in enumerate(datasets):
        path = folder / f"{seed}-{index}-{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return str(datasets[0].StudyInstanceUID), paths


def storescu(settings: Settings, paths: list[Path]) -> None:
    """Send ``paths`` with DCMTK's storescu (JPEG baseline and uncompressed proposed)."""
    result = subprocess.run(
        ["/usr/bin/storescu", "-xy", "-aec", settings.ae_title, "127.0.0.1", str(settings.port), *map(str, paths)],
        check=False,
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"storescu failed:\n{result.stdout}\n{result.stderr}"


def study_state(settings: Settings, study_uid: str) -> str | None:
    ledger = open_ledger(settings, durable=False)
    try:
        row = ledger.study(study_uid)
        return row.state if row else None
    finally:
        ledger.close()


def wait_for_state(settings: Settings, study_uid: str, state: str, timeout: float = 60.0) -> None:
    wait_for(f"study {study_uid} to be {state}", lambda: study_state(settings, study_uid) == state, timeout)


def child_env(settings: Settings) -> dict[str, str]:
    """This test's settings, and nothing else of ours, for a child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(settings_env(settings))
    return env


class Process:
    """A ``sonocase`` command as a subprocess in its own process group, output to a file."""

    def __init__(
        self,
        settings: Settings,
        *args: str,
        log: Path,
        ready: str | None = None,
        timeout: float = 60.0,
        run_as: Sequence[str] = (),
    ) -> None:
        """``run_as``: a command line the command runs under (e.g. ``unshare`` into
        a mount namespace of its own)."""
        self.log_path = log
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [*run_as, sys.executable, "-m", "service", *args],
            env=child_env(settings),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if ready:
            wait_for(f"{args[0]} to print {ready!r}", lambda: ready in self.log() or self._died(), timeout)
            if self.proc.poll() is not None:
                raise AssertionError(f"sonocase {args[0]} exited with {self.proc.returncode}:\n{self.log()}")

    def _died(self) -> bool:
        return self.proc.poll() is not None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[int]:
        """Process IDs in this process's group other than itself (the pool processes)."""
        out = subprocess.run(["ps", "-o", "pid=,pgid=", "-A"], capture_output=True, text=True, check=True).stdout
        pids = [tuple(map(int, line.split())) for line in out.splitlines() if line.strip()]
        return [pid for pid, group in pids if group == self.proc.pid and pid != self.proc.pid]

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, as a container stop does; then make sure the whole group is gone."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap_group()
        return int(self.proc.returncode)

    def kill(self) -> None:
        """SIGKILL to the whole group: a crash of the node and everything it started."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._reap_group()

    def _reap_group(self) -> None:
        wait_for("the process group to end", lambda: not self.children(), timeout=30)
        self._log.close()


def serve(settings: Settings, log: Path) -> Process:
    return Process(settings, "serve", log=log, ready="listening as ")


class PrivateRedis:
    """A redis-server of our own on a free port (no persistence), for tests that
    restart it: the machine's shared Redis must not be restarted under others."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        server = shutil.which("redis-server")
        assert server, "redis-server is not installed: run scripts/setup.sh"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                server,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for("redis-server to answer", self._answers, timeout=10)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


def receive(settings: Settings, ledger: Ledger, datasets: list[Dataset], complete: bool = True) -> str:
    """Store ``datasets`` in the spool and the ledger as the receiver does (no
    network), then complete the study; returns its Study Instance UID."""
    for ds in datasets:
        path = instance_path(settings.spool_dir, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        ledger.record_instance(
            InstanceRecord(
                sop_instance_uid=str(ds.SOPInstanceUID),
                study_uid=str(ds.StudyInstanceUID),
                series_uid=str(ds.SeriesInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                path=str(path),
                size=path.stat().st_size,
                calling_ae="TEST",
                modality=str(ds.get("Modality", "")),
            )
        )
    if complete:
        ledger.complete_quiet_studies(0.0, now=time.time() + 1)
    return str(datasets[0].StudyInstanceUID)
