"""The whole path through the queue: DCMTK's storescu pushes a synthetic study to
`sonocase serve`, the scheduler queues it, a worker analyses it and builds its
reports, the ledger (and `sonocase status`) shows the result. Once with the embedded default (no external
service), once with the real Redis as broker and result backend and the worker as a
separate `sonocase worker` process, as in distributed mode."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.ledger import Ledger
from service.pipeline.queue import queue_dir
from service.results import StudyResult
from service.settings import Settings
from tests.support.worker import (
    Process,
    child_env,
    serve,
    storescu,
    wait_for_state,
    write_study,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def node_settings(settings: Settings) -> Settings:
    if not settings.model_path.is_file():
        pytest.fail(f"the model {settings.model_path} is missing: it ships in onnx_models/")
    return settings


@pytest.fixture
def redis_db(redis_url: str) -> Iterator[str]:
    """A database of the shared Redis that no one else uses now: one Redis database
    serves one node (a worker takes any task from its queue)."""
    token = secrets.token_hex(8)
    for db in range(1, 16):
        client = redis.Redis.from_url(f"{redis_url}/{db}")
        if client.set("sonocase-test-owner", token, nx=True, ex=900) and client.dbsize() == 1:
            yield f"{redis_url}/{db}"
            client.flushdb()
            return
    pytest.fail("every database of the Redis on 127.0.0.1:6379 is in use")


def _check_result(settings: Settings, study_uid: str, n_images: int) -> StudyResult:
    ledger = Ledger(settings.ledger_path, durable=False)
    try:
        row, result = ledger.study(study_uid), ledger.result(study_uid)
    finally:
        ledger.close()
    assert row is not None and row.attempts == 1
    assert result is not None
    assert len(result.images) == n_images and all(image.frames for image in result.images)
    assert result.summary.predicted is not None or result.summary.out_of_distribution
    return result


def _status(settings: Settings, study_uid: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "service", "status", study_uid, "--json"],
        env=child_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return json.loads(out)


def test_embedded_default_analyses_a_study_pushed_by_storescu(node_settings: Settings, tmp_path: Path) -> None:
    assert node_settings.broker_url == "" and node_settings.workers == 1
    node = serve(node_settings, tmp_path / "node.log")
    try:
        study_uid, paths = write_study(tmp_path / "in", 4, "malignant", seed=21)
        storescu(node_settings, paths)
        wait_for_state(node_settings, study_uid, "reported")
    finally:
        assert node.stop() == 0, node.log()
    result = _check_result(node_settings, study_uid, 4)
    shown = _status(node_settings, study_uid)
    assert shown["study"]["state"] == "reported" and shown["result"]["summary"] == result.summary.model_dump()
    assert not list((queue_dir(node_settings) / "messages").glob("*.msg")), "a message was left in the queue"


def test_redis_broker_result_backend_and_a_separate_worker(
    node_settings: Settings, redis_db: str, tmp_path: Path
) -> None:
    distributed = node_settings.model_copy(update={"broker_url": redis_db, "result_backend": redis_db, "workers": 0})
    node = serve(distributed, tmp_path / "node.log")
    worker = Process(distributed, "worker", log=tmp_path / "worker.log", ready=" ready.")
    try:
        study_uid, paths = write_study(tmp_path / "in", 4, "benign", seed=22)
        storescu(distributed, paths)
        wait_for_state(distributed, study_uid, "reported")
    finally:
        assert worker.stop() == 0, worker.log()
        assert node.stop() == 0, node.log()
    _check_result(distributed, study_uid, 4)
    backend = redis.Redis.from_url(redis_db)
    metas = [json.loads(backend.get(key)) for key in backend.keys("celery-task-meta-*")]
    assert [m["result"] for m in metas] == [{"study_uid": study_uid, "outcome": "analysed"}]
