"""What nearly every test needs: a free loopback port, a wait with a deadline, DCMTK's
tools, a real small disk, a guard entry for test model cards."""

from __future__ import annotations

import getpass
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
import sqlalchemy as sa

from service.ledger import Ledger, StudyState
from service.ledger.schema import studies
from service.model.guard import FEATURES
from service.results import ImageResult, ModelIdentity, StudyAttributes, StudyResult, StudySummary

#: DCMTK's tools; pynetdicom installs same-named apps into the venv, so use full paths.
DCMTK = Path("/usr/bin")
REDIS_URL = "redis://127.0.0.1:6379"
#: The machine's PostgreSQL; its tests create a database of their own in it.
POSTGRES_SERVER = f"postgresql://{getpass.getuser()}@127.0.0.1:5432"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.01) -> T:
    """Poll ``probe`` until it returns something truthy, and return that; fail the
    test, saying ``what`` never happened, after ``timeout`` seconds. The suite's one
    polling loop: every wait in the tests has a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def force_state(ledger: Ledger, study_uid: str, state: StudyState, **columns: object) -> None:
    """Put a study in ``state`` (and ``columns``) directly: a fixture's shortcut past
    the stages, which move a study only as ``service.ledger.TRANSITIONS`` allows."""
    columns.setdefault("updated_at", time.time())
    with ledger.transaction() as db:
        db.execute(sa.update(studies).where(studies.c.study_uid == study_uid).values(state=state, **columns))


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> bool:
    """:func:`wait_for` as a truth value, for ``assert wait_until(...), "why"``."""
    try:
        return bool(wait_for("a condition", condition, timeout))
    except AssertionError:
        return False


@contextmanager
def tmpfs(mount_point: Path, size_mb: int) -> Iterator[Path]:
    """A real file system of ``size_mb`` MiB (tmpfs) at ``mount_point``, to fill: a
    full disk, not a stand-in. Needs the right to mount (root, as on these machines
    and in CI)."""
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode:
        pytest.skip(f"no full disk can be made here: mounting a tmpfs failed ({mounted.stderr.strip()})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def dcmtk(tool: str) -> str:
    path = DCMTK / tool
    if not path.exists():
        pytest.fail(f"DCMTK's {tool} is missing: run scripts/setup.sh (apt-get install dcmtk)")
    return str(path)


def guard_card_entry(threshold: float) -> dict[str, object]:
    """A model card's ``ood`` entry for test models: the B-mode guard with a unit
    precision, flagging what scores above ``threshold``."""
    n = len(FEATURES)
    return {
        "features": list(FEATURES),
        "mean": [0.0] * n,
        "precision": [[float(i == j) for j in range(n)] for i in range(n)],
        "threshold": threshold,
        "percentile": 99.0,
    }


def self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made by openssl."""
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def a_result(
    study_uid: str,
    generation: int,
    images: Sequence[ImageResult] = (),
    study: StudyAttributes | None = None,
    predicted: str | None = None,
) -> StudyResult:
    """The smallest valid result of a study (no frames unless ``images`` has some):
    what a test of the ledger or the status views stores and reads back."""
    return StudyResult(
        study_uid=study_uid,
        generation=generation,
        model=ModelIdentity(name="test", version="1", sha256="0" * 64),
        study=study or StudyAttributes(),
        images=list(images),
        summary=StudySummary(
            predicted=predicted,
            probability=None if predicted is None else 0.8,
            decisive_sop_instance_uid=None,
            out_of_distribution=False,
        ),
    )
