"""The one retry delay: every "try again later" of the node waits the same way."""

from __future__ import annotations

import random


def backoff_delay(attempts: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Delay before try ``attempts + 1``: exponential, capped, with "equal jitter"
    (half fixed, half random) so many objects never hammer a PACS in lockstep."""
    delay = min(max_s, base_s * 2.0 ** max(0, attempts - 1))
    return delay / 2 + rng.uniform(0, delay / 2)
