"""What puts a test in the integration tier: it starts a process or connects to a
server. ``tests/conftest.py`` watches every test outside that tier (and outside
``heavy``) for either and fails it, so that a new test cannot slip a peer into the
fast tier unmarked."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class PeerWatch:
    """The processes started and the TCP connections made from the main thread while
    armed. Read from Python's audit events (``sys.addaudithook``), which cannot be
    removed: one watch is installed per session and armed test by test. Only the main
    thread counts, so a thread another test left behind cannot fail this one."""

    def __init__(self) -> None:
        self._seen: set[str] | None = None
        sys.addaudithook(self._audit)

    def _audit(self, event: str, args: tuple[Any, ...]) -> None:
        seen = self._seen
        if seen is None or threading.current_thread() is not threading.main_thread():
            return
        if event == "subprocess.Popen":
            seen.add(f"starts {args[0]}")
        elif event == "os.fork":
            seen.add("forks")
        elif event == "socket.connect" and isinstance(args[1], tuple):
            seen.add(f"connects to port {args[1][1]}")

    @contextmanager
    def watching(self) -> Iterator[set[str]]:
        """Arm the watch; yields what it sees (filled until the block ends)."""
        self._seen = seen = set()
        try:
            yield seen
        finally:
            self._seen = None
