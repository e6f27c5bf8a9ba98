"""Celery's prefork pool, with pool processes that wait for a study without holding
the lock of the pipe they share.

With a broker that has no event loop (the embedded queue: kombu's file-system
transport), Celery runs billiard's blocking pool: one pipe carries every study to
the pool processes, and a process waiting for its next study holds that pipe's
read lock, a semaphore shared by all of them, for as long as it waits
(``billiard.queues.SimpleQueue.get_payload``). A process killed there (SIGKILL, the
OOM killer, which picks the largest process whether it is busy or not) never
releases it: the process that replaces it and every other one wait for the lock
forever, and so does the worker's warm shutdown (measured: the worker took no
study again; tests/test_worker_faults.py). Here a process waits for the pipe to
become readable without the lock, and takes the lock only to read a study that is
there. With Redis, Celery's asynchronous pool gives each process a pipe of its own,
and nothing here is used.

Setting ``pool_wait_unlocked`` (on by default; off: Celery's own pool). Should
billiard's queue not be the class this was written for, the pool is billiard's own,
with a warning.
"""

from __future__ import annotations

import logging

from billiard.pool import Pool
from billiard.queues import SimpleQueue
from celery.concurrency import prefork

LOG = logging.getLogger(__name__)

#: What Celery's setting ``worker_pool`` names to use :class:`TaskPool`.
POOL_PATH = f"{__name__}:TaskPool"


class UnlockedWaitQueue(SimpleQueue):  # type: ignore[misc]  # billiard has no type hints
    """billiard's queue between the pool's main process and its processes, read
    under its lock only once a message is there (module doc)."""

    def get_payload(self) -> bytes:
        while True:
            self._reader.poll(None)  # until a message arrives, without the lock
            with self._rlock:
                if self._reader.poll(0):  # another process may have read it meanwhile
                    data: bytes = self._reader.recv_bytes()
                    return data


class BlockingPool(Pool):  # type: ignore[misc]  # billiard has no type hints
    """billiard's blocking pool whose inbound queue is an :class:`UnlockedWaitQueue`."""

    def _setup_queues(self) -> None:
        super()._setup_queues()
        if type(self._inqueue) is SimpleQueue:  # the same pipe and locks: only the wait differs
            self._inqueue.__class__ = UnlockedWaitQueue
        else:
            LOG.warning(
                "billiard's task queue is a %s, not the SimpleQueue this pool was written for: "
                "using it as it is (a pool process killed while it waits may stop the worker)",
                type(self._inqueue).__name__,
            )


class TaskPool(prefork.TaskPool):  # type: ignore[misc]  # celery has no type hints
    """Celery's prefork pool with :class:`BlockingPool` for brokers without an event loop."""

    BlockingPool = BlockingPool
