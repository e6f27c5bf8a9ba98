"""Study completion: a study is complete when no instance arrived for the quiet period.

The ledger, not a timer in memory, says when each study last received an instance,
so a restart loses nothing. When a study falls quiet its routing is decided
(service.pipeline.routing): it becomes complete (to be analysed) or skipped, in the
same transaction, so the scheduler never queues a study the rules skip.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from service.ledger import Ledger, Routing

LOG = logging.getLogger(__name__)

#: A study's routing decision (service.pipeline.routing.Router.route).
Route = Callable[[str], Routing]


def complete_quiet_studies(
    ledger: Ledger, quiet_period_s: float, now: float | None = None, route: Route | None = None
) -> list[str]:
    """Complete (or skip, as ``route`` decides; without it every study is analysed)
    the studies without a new instance for ``quiet_period_s`` as of ``now``, default
    the clock; log each."""
    decided = [
        (uid, last, route(uid) if route else Routing()) for uid, last in ledger.quiet_studies(quiet_period_s, now)
    ]
    done = set(ledger.complete_studies(decided, now))
    for study_uid, _, routing in decided:
        if study_uid not in done:
            continue  # an instance arrived meanwhile: decided again next round
        if routing.analyse:
            LOG.info(
                "study complete after %.1f s quiet%s",
                quiet_period_s,
                f" ({routing.reason})" if routing.reason else "",
                extra={"study_uid": study_uid},
            )
        else:
            LOG.info("study stored, not analysed (%s)", routing.reason, extra={"study_uid": study_uid})
    return [uid for uid, _, _ in decided if uid in done]


class CompletionLoop:
    """A thread that completes each quiet study as its quiet period ends.

    It sleeps until the earliest deadline the ledger holds (the oldest
    ``last_received`` of a receiving study, plus the quiet period), so a study is
    complete within milliseconds of going quiet, not a polling interval later; a
    new study's deadline is never earlier than one already known, and with none
    known the loop looks again every ``interval_s``. ``on_complete`` runs after each
    round that completed studies (the node wakes its scheduler with it). The ledger,
    not this thread, remembers everything, so a restart loses nothing.
    """

    name = "completion"
    #: The shortest sleep: a deadline reached to the microsecond may not yet pass
    #: the ledger's comparison; this keeps the loop from spinning on it.
    MIN_WAIT_S = 0.001

    def __init__(
        self,
        ledger: Ledger,
        quiet_period_s: float,
        interval_s: float = 0.5,
        on_complete: Callable[[], None] | None = None,
        route: Route | None = None,
    ) -> None:
        self.ledger = ledger
        self.quiet_period_s = quiet_period_s
        self.interval_s = min(interval_s, quiet_period_s)
        self.on_complete = on_complete
        self.route = route
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sonocase-completion", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def next_wait(self, now: float | None = None) -> float:
        """Seconds until the earliest quiet period ends (at most ``interval_s``)."""
        now = time.time() if now is None else now
        oldest = self.ledger.oldest_receiving()
        if oldest is None:
            return self.interval_s
        return max(self.MIN_WAIT_S, min(self.interval_s, oldest + self.quiet_period_s - now))

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self.interval_s
            try:
                if (
                    complete_quiet_studies(self.ledger, self.quiet_period_s, route=self.route)
                    and self.on_complete is not None
                ):
                    self.on_complete()
                wait = self.next_wait()
            except Exception:  # a busy or broken ledger must not end completion for good
                LOG.exception("completing quiet studies failed; trying again")
            self._stop.wait(wait)
