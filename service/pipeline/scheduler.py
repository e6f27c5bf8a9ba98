"""From the ledger to the queue: the scheduler.

:func:`schedule_due` sends a task for every study that needs one (complete, a retry
that is due, or a queued/analysing study whose lease ran out) and only then marks it
queued, so a crash between the two re-sends the task (harmless: workers claim a
study in the ledger before they analyse it, and a worker that claims it before the
mark keeps its claim). A message lost by the broker (a Redis restart without
persistence, a worker killed while holding it) is therefore never a lost study: its
lease runs out and the scheduler sends it again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kombu.exceptions import KombuError, OperationalError

from service.common.loop import PollingLoop
from service.ledger import Ledger
from service.pipeline.queue import POLL_S, create_app, send_analysis
from service.settings import Settings

LOG = logging.getLogger(__name__)


def schedule_due(ledger: Ledger, send: Callable[[str], None], lease_s: float, now: float | None = None) -> list[str]:
    """Send a task for every study the ledger says needs one, then mark it queued.

    Stops at the first failure to send (broker down): the rest stay due and are
    tried on the next round.
    """
    sent = []
    for study_uid in ledger.due_for_queue(now):
        send(study_uid)
        ledger.mark_queued(study_uid, lease_s, now)
        sent.append(study_uid)
        LOG.info("analysis queued", extra={"study_uid": study_uid})
    return sent


class SchedulerService:
    """The node's scheduler thread: :func:`schedule_due` every POLL_S seconds, and at
    once when :meth:`wake` says studies just became complete."""

    name = "scheduler"

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.ledger = ledger
        self.app = create_app(settings)
        self._loop = PollingLoop(self.name, POLL_S, self.run_once)
        self._broker_down = False

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop(timeout_s=10)

    def wake(self) -> None:
        """Run a round now (studies became complete), not at the next poll."""
        self._loop.wake()

    def run_once(self) -> list[str]:
        try:
            sent = schedule_due(self.ledger, lambda uid: send_analysis(self.app, uid), self.settings.task_lease_s)
        except (OperationalError, KombuError, OSError) as exc:
            if not self._broker_down:
                LOG.error("cannot queue analyses, broker unreachable (%s); studies stay due and are retried", exc)
            self._broker_down = True
            return []
        if self._broker_down:
            LOG.info("broker reachable again")
            self._broker_down = False
        return sent
