"""The distributed mode with its PostgreSQL ledger: `sonocase serve` (no workers of
its own) and a separate `sonocase worker` process share the ledger through
SONOCASE_LEDGER_URL and the queue through a Redis broker; DCMTK's storescu pushes a
study, the worker analyses and reports it.

On other hosts the worker would mount the node's data_dir from a shared volume;
one test machine has one file system, so here both processes simply use the same
data_dir. What this proves is that nothing goes through a SQLite file: none is
created, and the study's whole life is in PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.ledger import StudyState, open_ledger
from service.settings import Settings
from tests.support.worker import (
    PrivateRedis,
    Process,
    child_env,
    serve,
    storescu,
    wait_for_state,
    write_study,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    yield server
    server.stop()


def test_node_and_a_separate_worker_share_a_postgresql_ledger(
    settings: Settings,
    postgres_url: str,
    private_redis: PrivateRedis,
    tmp_path: Path,
) -> None:
    distributed = settings.model_copy(
        update={"ledger_url": postgres_url, "broker_url": private_redis.url, "workers": 0}
    )
    node = serve(distributed, tmp_path / "node.log")
    worker = Process(distributed, "worker", log=tmp_path / "worker.log", ready=" ready.")
    try:
        study_uid, paths = write_study(tmp_path / "in", 3, "benign", seed=41)
        storescu(distributed, paths)
        wait_for_state(distributed, study_uid, StudyState.REPORTED, timeout=120)
    finally:
        assert worker.stop() == 0, worker.log()
        assert node.stop() == 0, node.log()

    assert not distributed.ledger_path.exists(), "a SQLite ledger was created beside the PostgreSQL one"
    ledger = open_ledger(distributed, durable=False)
    try:
        study, stored = ledger.study(study_uid), ledger.result(study_uid)
        assert study is not None and study.attempts == 1 and len(ledger.instances(study_uid)) == 3
    finally:
        ledger.close()
    assert stored is not None and len(stored.images) == 3
    assert "analysing generation 1" in worker.log()  # analysed by the separate worker, not the node
    assert list(distributed.outbox_dir.rglob("*.dcm")), "no SR or SC in the shared data_dir"

    shown = json.loads(
        subprocess.run(
            [sys.executable, "-m", "service", "status", study_uid, "--json"],
            env=child_env(distributed),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    )
    assert shown["study"]["state"] == StudyState.REPORTED
