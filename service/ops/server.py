"""The HTTP server shell: uvicorn serving the ASGI app from a thread of the node.

One asyncio loop in one thread serves every connection, so idle connections cost a
socket, never a thread. uvicorn closes a keep-alive connection idle after a
response and has no read deadlines of its own; :class:`_GuardedH11Protocol` adds
them (headers within a deadline of their first byte, a body at a minimum rate, so
a byte now and then does not keep a connection open) and caps connections, in
total and per client address. When a cap is reached a new connection is not simply
refused, which would let anyone who holds the connections starve ``/healthz``:
the open connection furthest behind its schedule (:func:`furthest_behind`) is
closed to make room for it, so a probe always gets in while a request that is
being served, or a body arriving at a good rate, is never cut.

This module is the only one that touches uvicorn's protocol internals, written
against uvicorn :data:`UVICORN_VERSION`; another uvicorn, or
``web_read_timeout_s = 0``, runs uvicorn's own protocol (no read deadlines, one
plain connection cap), and the log says so.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.common.metrics import observe_web_refusal

LOG = logging.getLogger(__name__)

#: uvicorn closes a keep-alive connection idle this long after a response.
KEEP_ALIVE_S = 5
#: Requests still running at stop get this long to finish.
GRACEFUL_STOP_S = 5
#: The uvicorn release (major.minor) whose protocol internals the guard overrides.
UVICORN_VERSION = "0.55"

T = TypeVar("T")


@dataclass(frozen=True)
class HttpLimits:
    """What the guarded protocol enforces (settings ``web_*``)."""

    read_timeout_s: float
    min_body_rate: float  #: bytes per second a body must keep up, after its first read_timeout_s
    max_connections: int
    max_per_address: int


@dataclass
class Progress:
    """Where one connection stands. ``since``: when it began to wait for a request
    (opened, or answered its last one), or when its body began; ``body_bytes``:
    None outside a body; ``busy``: a complete request is being served."""

    address: str
    since: float
    body_bytes: int | None = None
    busy: bool = False

    def behind(self, now: float, min_body_rate: float) -> float | None:
        """Seconds this connection is behind its schedule; None when it may not be
        closed to make room (a request being served, a body on time)."""
        if self.busy:
            return None
        if self.body_bytes is None:
            return now - self.since  # waiting for a request costs the time it waits
        late = now - self.since - self.body_bytes / min_body_rate
        return late if late > 0 else None


def body_deadline(progress: Progress, limits: HttpLimits) -> float:
    """When a body whose bytes so far are ``progress.body_bytes`` must have sent more:
    ``read_timeout_s`` after it began plus the time its bytes earn at
    ``min_body_rate``. A byte now and then earns almost nothing, so the deadline
    does not restart per byte."""
    return progress.since + limits.read_timeout_s + (progress.body_bytes or 0) / limits.min_body_rate


def furthest_behind(
    address: str,
    others: Sequence[tuple[T, Progress]],
    limits: HttpLimits,
    now: float,
) -> tuple[bool, T | None]:
    """Whether a new connection from ``address`` may stay, and which open one to close
    for it: past ``max_per_address`` connections from its address, that address's
    one furthest behind; past ``max_connections`` in all, anyone's. The new one is
    refused only when every candidate is being served or on time."""
    same = [item for item in others if item[1].address == address]
    if len(same) >= limits.max_per_address:
        pool: Iterable[tuple[T, Progress]] = same
    elif len(others) >= limits.max_connections:
        pool = others
    else:
        return True, None
    late = [(lag, item) for item, progress in pool if (lag := progress.behind(now, limits.min_body_rate)) is not None]
    if not late:
        return False, None
    return True, max(late, key=lambda pair: pair[0])[1]


class _GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with read deadlines and connection caps (module doc).

    A request's headers must be complete within ``read_timeout_s`` of its first
    byte (or of the connection opening); its body must keep to
    :func:`body_deadline`. Closings and refusals are counted
    (``sonocase_http_connections_closed_total``) and logged at DEBUG level only:
    a flood would flood the log otherwise."""

    limits: HttpLimits

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self.progress = Progress(self._address(transport), time.monotonic())
        others = [(p, p.progress) for p in self.connections if isinstance(p, _GuardedH11Protocol) and p is not self]
        super().connection_made(transport)  # type: ignore[arg-type]
        stays, victim = furthest_behind(self.progress.address, others, self.limits, time.monotonic())
        if victim is not None:
            victim._close("evicted", "closed to make room for a new connection")
        if not stays:
            self._close("full", "refused: every connection is being served")
            return
        self._arm(self.progress.since + self.limits.read_timeout_s)

    @staticmethod
    def _address(transport: asyncio.BaseTransport) -> str:
        peer = transport.get_extra_info("peername")
        return str(peer[0]) if peer else "unknown"

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        state, progress, now = self.conn.their_state, self.progress, time.monotonic()
        if state is h11.SEND_BODY:
            if progress.body_bytes is None:  # the headers are in: the body's schedule starts
                progress.since, progress.body_bytes = now, 0
            else:
                progress.body_bytes += len(data)
            self._arm(body_deadline(progress, self.limits))
        elif state is h11.IDLE:
            if self._deadline is None:  # a new request began: its headers have read_timeout_s
                self._arm(now + self.limits.read_timeout_s)
        else:
            progress.busy, progress.body_bytes = True, None
            self._disarm()  # the request is in: the app's time is not limited here

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._disarm()  # uvicorn's keep-alive timer takes over until the next request
        self.progress.since, self.progress.busy, self.progress.body_bytes = time.monotonic(), False, None
        super().on_response_complete()

    def _arm(self, when: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(max(0.0, when - time.monotonic()), self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            self._close("too-slow", "headers or body too slow")

    def _close(self, reason: str, why: str) -> None:
        if not self.transport.is_closing():
            LOG.debug("HTTP connection from %s %s", self.progress.address, why)
            observe_web_refusal(reason)
            self.transport.close()


def unsupported_reason() -> str | None:
    """Why the guard cannot run on the installed uvicorn (None: it can)."""
    if not uvicorn.__version__.startswith(UVICORN_VERSION + "."):
        return (
            f"uvicorn {uvicorn.__version__} is installed; the HTTP guard overrides internals of "
            f"uvicorn {UVICORN_VERSION} only"
        )
    return None


def guarded_protocol(limits: HttpLimits) -> type[H11Protocol]:
    """The protocol class for these limits (uvicorn instantiates it per connection)."""
    return type("GuardedH11Protocol", (_GuardedH11Protocol,), {"limits": limits})


def choose_protocol(limits: HttpLimits) -> tuple[Any, int | None]:
    """uvicorn's ``http`` and ``limit_concurrency``: the guard, with no limit of
    uvicorn's (it would answer 503 to a probe while the guard makes room for it);
    else uvicorn's own protocol capped at ``max_connections``."""
    if limits.read_timeout_s > 0:
        reason = unsupported_reason()
        if reason is None:
            return guarded_protocol(limits), None
        LOG.warning("HTTP guard unavailable (%s): no read deadlines, no per-address cap", reason)
    return "h11", limits.max_connections


class WebServer:
    """Serves an ASGI app with uvicorn from a daemon thread until :meth:`stop` (a node
    service). The socket is bound in :meth:`start`, so a port in use fails the start."""

    name = "web"

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        limits: HttpLimits,
        *,
        on_stop: Sequence[Callable[[], None]] = (),
    ) -> None:
        protocol, limit_concurrency = choose_protocol(limits)
        self.app = app  # what it serves: tests enumerate its routes
        self._config = uvicorn.Config(
            # proxy_headers off: a client's address is the socket's, so that no local
            # process can dodge the login throttle with a forged X-Forwarded-For.
            app,
            http=protocol,
            lifespan="off",
            log_config=None,
            access_log=True,
            server_header=False,
            proxy_headers=False,
            limit_concurrency=limit_concurrency,
            timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=GRACEFUL_STOP_S,
            ws="none",
        )
        self._address = (host, port)
        self._on_stop = list(on_stop)
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError("the web server is not started")
        return int(self._socket.getsockname()[1])

    def start(self) -> None:
        host, port = self._address
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(self._address)
            sock.listen(128)
        except OSError as exc:
            raise OSError(f"cannot serve HTTP on {host}:{port} (setting http_port): {exc}") from exc
        self._socket = sock
        self._server = uvicorn.Server(self._config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="web", daemon=True)
        self._thread.start()
        LOG.info("HTTP on %s:%d (/healthz /readyz /metrics /status /api)", host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=GRACEFUL_STOP_S + 5)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None
        for close in self._on_stop:
            close()
