"""Shared fixtures and the test tiers (CONTRIBUTING.md).

Fixtures: settings under a temporary data folder, the ledger on both backends (SQLite,
and the real PostgreSQL on 127.0.0.1:5432, started when it is not answering), the real
Redis on 127.0.0.1:6379 (likewise), a real small disk, Orthanc, the similar-case
library's models and studies. Tiers: tests using an integration fixture are marked
``integration`` here, and a test outside that tier and ``heavy`` fails when it starts a
process or connects to a server. Helpers that are not fixtures live in ``tests/support/``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.datasets.synthetic import write_dicom_dataset
from service.ledger import Ledger, open_ledger
from service.settings import Settings, load_settings
from tests.support.common import POSTGRES_SERVER, REDIS_URL, free_port, tmpfs
from tests.support.index import write_model
from tests.support.orthanc import Orthanc
from tests.support.tiers import PeerWatch


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 6 MiB tmpfs (see :func:`tmpfs`)."""
    with tmpfs(tmp_path / "small-disk", 6) as mount_point:
        yield mount_point


def _ledger_backend(test: pytest.Item) -> str:
    """The backend the test's ``ledger`` fixture runs on (sqlite for tests without it)."""
    callspec = getattr(test, "callspec", None)
    return str(callspec.params.get("ledger", "sqlite")) if callspec is not None else "sqlite"


#: Fixtures that start a process or a server, or connect to one. A test using one, or
#: parametrised onto PostgreSQL (the ``ledger`` fixture's backend, or a module's own
#: backend parameter), is marked ``integration`` here; a test that starts a peer itself,
#: or through a fixture of its own module, says so with the marker.
INTEGRATION_FIXTURES = frozenset({"postgres_database", "postgres_url", "redis_url", "orthanc", "small_disk"})


def _on_postgresql(test: pytest.Item) -> bool:
    """Whether a parameter of the test puts it on PostgreSQL."""
    callspec = getattr(test, "callspec", None)
    return callspec is not None and any(isinstance(v, str) and v == "postgresql" for v in callspec.params.values())


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests of the integration fixtures before ``-m`` selects (tryfirst)."""
    for item in items:
        if INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ())) or _on_postgresql(item):
            item.add_marker(pytest.mark.integration)


PEERS = PeerWatch()


@pytest.fixture(autouse=True)
def _fast_tests_start_no_peer(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test outside the integration and heavy tiers fails when it starts a process
    or connects to a server: it belongs to the integration tier (see PeerWatch)."""
    if request.node.get_closest_marker("integration") or request.node.get_closest_marker("heavy"):
        yield
        return
    with PEERS.watching() as seen:
        yield
    if seen:
        pytest.fail(f"mark it @pytest.mark.integration: it {', '.join(sorted(seen))}", pytrace=False)


@pytest.fixture
def settings(tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """Settings for one test: own data folder, own port, loopback only, short quiet
    period; the ledger in a PostgreSQL schema of its own when the test's ``ledger``
    runs on PostgreSQL, so everything the test starts shares that ledger."""
    postgres = _ledger_backend(request.node) == "postgresql"
    return load_settings(
        data_dir=tmp_path / "data",
        host="127.0.0.1",
        port=free_port(),
        http_port=0,
        quiet_period_s=0.5,
        durability="none",
        ledger_url=request.getfixturevalue("postgres_url") if postgres else "",
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(settings: Settings) -> Iterator[Ledger]:
    """The ledger of the test's settings, on each backend in turn, closed afterwards."""
    handle = open_ledger(settings, durable=False)
    yield handle
    handle.close()


def _postgres_up() -> bool:
    import psycopg

    try:
        psycopg.connect(POSTGRES_SERVER + "/postgres", connect_timeout=2).close()
    except psycopg.OperationalError:
        return False
    return True


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A database of this test session on the real PostgreSQL (started here when it
    is not answering), dropped at the end; its URL."""
    import psycopg

    if not _postgres_up():
        if shutil.which("pg_ctlcluster") is None:
            pytest.fail("PostgreSQL is not installed: run scripts/setup.sh")
        for version in os.listdir("/etc/postgresql"):
            subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"], check=False)
        deadline = time.monotonic() + 20
        while not _postgres_up():
            if time.monotonic() > deadline:
                pytest.fail(f"PostgreSQL did not answer at {POSTGRES_SERVER} (trust or PGPASSWORD auth)")
            time.sleep(0.2)
    name = f"sonocase_test_{os.getpid()}_{int(time.time())}"
    with psycopg.connect(POSTGRES_SERVER + "/postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield f"{POSTGRES_SERVER}/{name}"
    with psycopg.connect(POSTGRES_SERVER + "/postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def postgres_url(postgres_database: str) -> Iterator[str]:
    """A ledger URL of a fresh schema (cheaper than a database per test), dropped afterwards."""
    import psycopg

    schema = f"t{os.urandom(6).hex()}"
    with psycopg.connect(postgres_database, autocommit=True) as db:
        db.execute(f"CREATE SCHEMA {schema}")
    yield f"{postgres_database}?options=-csearch_path%3D{schema}"
    with psycopg.connect(postgres_database, autocommit=True) as db:
        db.execute(f"DROP SCHEMA {schema} CASCADE")


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
            [server, "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379", "--save", "", "--appendonly", "no"],
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


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A fresh Orthanc with DICOMweb on 127.0.0.1, no authentication."""
    archive = Orthanc.start(tmp_path / "orthanc")
    yield archive
    archive.stop()


# --- the similar-case library (sonocase index) ------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two small ONNX models of different versions (for ``sonocase index``), per module."""
    folder = tmp_path_factory.mktemp("models")
    return write_model(folder / "a.onnx", 1, "1"), write_model(folder / "b.onnx", 2, "2")


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Synthetic studies, 3 images per class, and their labels CSV."""
    folder = tmp_path_factory.mktemp("studies")
    _, labels = write_dicom_dataset(folder, 3, seed=5)
    return folder, labels


@pytest.fixture
def env(tmp_path: Path, models: tuple[Path, Path]) -> dict[str, str]:
    """The environment ``sonocase index`` runs in: own data folder, the first model."""
    return {
        "SONOCASE_DATA_DIR": str(tmp_path / "data"),
        "SONOCASE_MODEL_PATH": str(models[0]),
        "SONOCASE_EXECUTION_PROVIDER": "cpu",
        "SONOCASE_DURABILITY": "none",
    }
