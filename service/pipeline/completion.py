"""Study completion: a study is complete when no instance arrived for the quiet period.

The ledger, not a timer in memory, says when each study last received an instance,
so a restart loses nothing.
"""

from __future__ import annotations

import logging
import threading

from service.ledger import Ledger

LOG = logging.getLogger(__name__)


def complete_quiet_studies(ledger: Ledger, quiet_period_s: float, now: float | None = None) -> list[str]:
    """Mark studies without a new instance for ``quiet_period_s`` complete (as of
    ``now``, default the clock); log each."""
    done = ledger.complete_quiet_studies(quiet_period_s, now)
    for study_uid in done:
        LOG.info("study complete after %.1f s quiet", quiet_period_s, extra={"study_uid": study_uid})
    return done


class CompletionLoop:
    """A thread that completes quiet studies every ``interval_s``; the ledger, not
    this thread, remembers everything, so a restart loses nothing."""

    name = "completion"

    def __init__(self, ledger: Ledger, quiet_period_s: float, interval_s: float = 0.5) -> None:
        self.ledger = ledger
        self.quiet_period_s = quiet_period_s
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sonocase-completion", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                complete_quiet_studies(self.ledger, self.quiet_period_s)
            except Exception:  # a busy or broken ledger must not end completion for good
                LOG.exception("completing quiet studies failed; trying again")
            self._stop.wait(self.interval_s)


