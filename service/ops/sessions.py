"""Who is signed in to the status page, and who is guessing the token.

Pure state with ``now=`` parameters, so expiry and throttling are tested without
waiting. Sessions live in the node's memory only: a restart signs everyone out,
and nothing about them can be computed from the token (each is 256 random bits).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Literal

#: What a credential may do: ``admin`` (web_token) everything; ``reviewer``
#: (web_review_token) read, and give verdicts.
Role = Literal["admin", "reviewer"]


@dataclass
class Session:
    """One sign-in: its cookie value, the CSRF token its forms carry, when it ends,
    and the role of the token signed in with (a cookie carries no authority of its own)."""

    id: str
    csrf: str
    created: float
    last_seen: float
    role: Role


class SessionStore:
    """Server-side sessions that end after ``idle_s`` without a request, ``max_age_s``
    after sign-in, or at sign-out (the cookie is worthless from then on)."""

    def __init__(self, idle_s: float, max_age_s: float, max_sessions: int = 1000) -> None:
        self.idle_s = idle_s
        self.max_age_s = max_age_s
        self._max = max_sessions
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def create(self, role: Role, now: float | None = None) -> Session:
        """A new session for ``role``; the oldest one goes when the store is full."""
        now = time.time() if now is None else now
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now, now, role)
        with self._lock:
            self._sessions[session.id] = session
            while len(self._sessions) > self._max:
                self._sessions.popitem(last=False)
        return session

    def get(self, session_id: str, now: float | None = None) -> Session | None:
        """The live session with this id (its idle clock restarts), else None."""
        now = time.time() if now is None else now
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return None
            if now - session.last_seen > self.idle_s or now - session.created > self.max_age_s:
                del self._sessions[session_id]
                return None
            session.last_seen = now
            self._sessions.move_to_end(session_id)
            return session

    def revoke(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._sessions)


class LoginThrottle:
    """At most ``attempts`` failures per key (a client address, a credential) in any
    ``window_s``; past that the key must wait until its oldest failure leaves the
    window. What counts as a failure, and what waiting means, is the caller's."""

    def __init__(self, attempts: int, window_s: float, max_keys: int = 10_000) -> None:
        self.attempts = attempts
        self.window_s = window_s
        self._max = max_keys
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, key: str, now: float | None = None) -> float:
        """Seconds until ``key`` may try again; 0 when it may now."""
        now = time.time() if now is None else now
        with self._lock:
            failures = self._failures.get(key)
            if failures is None:
                return 0.0
            while failures and now - failures[0] >= self.window_s:
                failures.popleft()
            if not failures:
                del self._failures[key]
                return 0.0
            if len(failures) < self.attempts:
                return 0.0
            return failures[0] + self.window_s - now

    def failed(self, key: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            self._failures.setdefault(key, deque(maxlen=self.attempts)).append(now)
            self._failures.move_to_end(key)
            while len(self._failures) > self._max:
                self._failures.popitem(last=False)
