"""The node services' polling thread (service.common.loop): a bad round is logged and
the loop goes on, wake() runs a round at once, stop() ends the thread."""

from __future__ import annotations

import threading

import pytest

from service.common.loop import PollingLoop


def test_a_bad_round_is_logged_the_loop_goes_on_and_stop_ends_it(caplog: pytest.LogCaptureFixture) -> None:
    rounds: list[int] = []
    first_done, second_done = threading.Event(), threading.Event()

    def one_round() -> None:
        rounds.append(len(rounds) + 1)
        if len(rounds) == 1:
            first_done.set()
            raise RuntimeError("a bad round")
        second_done.set()

    loop = PollingLoop("loop-test", 3600, one_round)  # an hour: only wake() runs a round here
    with caplog.at_level("ERROR", logger="service.common.loop"):
        loop.start()
        loop.wake()
        assert first_done.wait(10)
        loop.wake()
        assert second_done.wait(10)
    assert "loop-test round failed" in caplog.text and "a bad round" in caplog.text
    loop.stop(timeout_s=10)
    assert "sonocase-loop-test" not in {t.name for t in threading.enumerate()}
    assert rounds == [1, 2]
