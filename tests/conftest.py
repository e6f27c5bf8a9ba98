"""Shared fixtures: a free loopback port, settings under a temporary data folder,
the real Redis on 127.0.0.1:6379 (started when it is not answering), DCMTK tools."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.ledger import Ledger
from service.settings import Settings, load_settings

#: DCMTK's tools; pynetdicom installs same-named apps into the venv, so use full paths.
DCMTK = Path("/usr/bin")
REDIS_URL = "redis://127.0.0.1:6379"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dcmtk(tool: str) -> str:
    path = DCMTK / tool
    if not path.exists():
        pytest.fail(f"DCMTK's {tool} is missing: run scripts/setup.sh (apt-get install dcmtk)")
    return str(path)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings for one test: own data folder, own port, loopback only, short quiet period."""
    return load_settings(
        data_dir=tmp_path / "data", host="127.0.0.1", port=free_port(), http_port=0,
        quiet_period_s=0.5, durability="none",
    )


@pytest.fixture
def ledger(settings: Settings) -> Iterator[Ledger]:
    """The ledger of the test's settings, closed afterwards."""
    handle = Ledger(settings.ledger_path, durable=False)
    yield handle
    handle.close()


def _redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The real Redis on 127.0.0.1:6379, started here when it is not answering."""
    if not _redis_up():
        server = shutil.which("redis-server")
        if server is None:
            pytest.fail("redis-server is not installed: run scripts/setup.sh")
        subprocess.run(
            [server, "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379",
             "--save", "", "--appendonly", "no"],
            check=True,
        )
        deadline = time.monotonic() + 10
        while not _redis_up():
            if time.monotonic() > deadline:
                pytest.fail("redis-server did not start on 127.0.0.1:6379")
            time.sleep(0.1)
    return REDIS_URL


@pytest.fixture(scope="module")
def torch_single_thread() -> Iterator[None]:
    """PyTorch on one thread for a test module: on a busy shared 2-core machine
    oversubscribed OpenMP threads run several times slower than one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
