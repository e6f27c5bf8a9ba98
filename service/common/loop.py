"""The one stoppable polling thread: the sender, retention and the scheduler each run
a round every few seconds until the node stops."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

LOG = logging.getLogger(__name__)


class PollingLoop:
    """A daemon thread running ``round`` every ``interval_s`` seconds, at once when
    :meth:`wake` asks, and no more after :meth:`stop`.

    A round that raises is logged and the loop goes on: the ledger keeps the work,
    so the next round picks it up; one bad round must not end a node service.
    """

    def __init__(self, name: str, interval_s: float, round: Callable[[], object]) -> None:
        self.name = name
        self.interval_s = interval_s
        self._round = round
        self._stopped = threading.Event()
        self._woken = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sonocase-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Run a round now, not at the next interval."""
        self._woken.set()

    def stop(self, timeout_s: float = 30) -> None:
        """Let the round under way finish (up to ``timeout_s``), then no more."""
        self._stopped.set()
        self._woken.set()
        self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        while True:
            self._woken.wait(self.interval_s)
            self._woken.clear()
            if self._stopped.is_set():
                return
            try:
                self._round()
            except Exception:  # the loop must outlive one bad round; the ledger keeps the work
                LOG.exception("%s round failed; trying again", self.name)
