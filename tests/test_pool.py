"""The pool's shared task pipe (service.pipeline.pool) with real processes: a process
killed while it waits leaves the pipe to the others, and every message still goes
to exactly one process, whole. billiard's own queue is the contrast."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import billiard
import pytest
from billiard.queues import SimpleQueue

from service.pipeline.pool import UnlockedWaitQueue
from tests.support.common import wait_for

pytestmark = pytest.mark.integration

CONTEXT = billiard.get_context("fork")


def _queue(kind: type[SimpleQueue]) -> Any:
    return kind(ctx=CONTEXT)


def _read_until_none(tasks: Any, results: Any) -> None:
    """A pool process: messages until None, each handed back with this process's pid."""
    while (message := tasks.get()) is not None:
        results.put((os.getpid(), message))


def _waiting_reader(tasks: Any) -> Any:
    """A process waiting for a message on ``tasks`` (asleep: nothing else puts it to sleep)."""
    reader = CONTEXT.Process(target=tasks.get_payload)
    reader.start()
    wait_for("the reader to wait", lambda: Path(f"/proc/{reader.pid}/stat").read_text().split(") ")[1][0] == "S")
    return reader


@pytest.mark.parametrize(
    ("kind", "freed"), [(UnlockedWaitQueue, True), (SimpleQueue, False)], ids=["unlocked-wait", "billiard"]
)
def test_a_process_killed_while_it_waits_leaves_the_lock_free(kind: type[SimpleQueue], freed: bool) -> None:
    tasks = _queue(kind)
    reader = _waiting_reader(tasks)
    os.kill(reader.pid, signal.SIGKILL)
    reader.join()
    taken = tasks._rlock.acquire(timeout=1.0)
    assert taken == freed  # billiard's: the dead process holds it for good
    if taken:
        tasks._rlock.release()


def test_after_a_kill_the_next_process_gets_the_next_message() -> None:
    tasks, results = _queue(UnlockedWaitQueue), _queue(SimpleQueue)
    killed = _waiting_reader(tasks)
    os.kill(killed.pid, signal.SIGKILL)
    killed.join()
    reader = CONTEXT.Process(target=_read_until_none, args=(tasks, results))
    reader.start()
    tasks.put("study")
    tasks.put(None)
    reader.join(timeout=10)
    assert reader.exitcode == 0
    assert results.get() == (reader.pid, "study")


def test_each_message_goes_to_one_process_whole() -> None:
    """Four processes wait on one pipe; messages larger than the pipe's buffer are
    written in parts. Each arrives once, intact, and more than one process reads."""
    tasks, results = _queue(UnlockedWaitQueue), _queue(SimpleQueue)
    readers = [CONTEXT.Process(target=_read_until_none, args=(tasks, results)) for _ in range(4)]
    for reader in readers:
        reader.start()
    messages = [(k, bytes([k % 256]) * (k * 7919 % 300_000)) for k in range(200)]
    sender = threading.Thread(target=lambda: [tasks.put(m) for m in [*messages, *[None] * len(readers)]])
    sender.start()  # while the results are read: both pipes fill up
    received = [results.get() for _ in messages]
    sender.join()
    for reader in readers:
        reader.join(timeout=10)
        assert reader.exitcode == 0
    assert sorted(message for _, message in received) == messages
    assert len({pid for pid, _ in received}) > 1
