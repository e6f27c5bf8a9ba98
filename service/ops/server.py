"""The HTTP server shell: uvicorn serving the ASGI app from a thread of the node.

One asyncio loop in one thread serves every connection, so idle connections cost a
socket, never a thread. uvicorn closes a keep-alive connection idle after a
response; what it leaves open (a client that connects and sends nothing, headers
sent a byte at a time, a body shorter than its Content-Length) is closed here by
:class:`_GuardedH11Protocol`, together with a cap on open connections. This module
is the only one that touches uvicorn's protocol internals; ``web_read_timeout_s = 0``
runs uvicorn's own protocol instead (no read deadlines, no connection cap).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

LOG = logging.getLogger(__name__)

#: uvicorn closes a keep-alive connection idle this long after a response.
KEEP_ALIVE_S = 5
#: Requests still running at stop get this long to finish.
GRACEFUL_STOP_S = 5


class _GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with read deadlines and a connection cap.

    A request's headers must be complete within ``read_timeout_s`` of its first
    byte (or of the connection opening); its body may pause for at most
    ``read_timeout_s`` between pieces. Past ``max_connections`` open connections a
    new one is closed at once. Both are counted in the log at DEBUG level only: a
    port scan would flood it otherwise.
    """

    read_timeout_s: float = 10.0
    max_connections: int = 64

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)  # type: ignore[arg-type]
        if len(self.connections) > self.max_connections:
            LOG.debug("HTTP connection from %s refused: %d connections open", self.client, len(self.connections))
            transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            self._arm()  # the body may pause, but not for long
        elif state is h11.IDLE:
            if self._deadline is None:  # a new request began: its headers have read_timeout_s
                self._arm()
        else:
            self._disarm()  # the request is in: the app's time is not limited here

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._disarm()  # uvicorn's keep-alive timer takes over until the next request
        super().on_response_complete()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.read_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            LOG.debug("HTTP connection from %s closed: nothing read for %.0f s", self.client, self.read_timeout_s)
            self.transport.close()


def guarded_protocol(read_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """The protocol class for these limits (uvicorn instantiates it per connection)."""
    return type("GuardedH11Protocol", (_GuardedH11Protocol,),
                {"read_timeout_s": read_timeout_s, "max_connections": max_connections})


class WebServer:
    """Serves an ASGI app with uvicorn from a daemon thread until :meth:`stop` (a node
    service). The socket is bound in :meth:`start`, so a port in use fails the start."""

    name = "web"

    def __init__(
        self, app: Any, host: str, port: int, *, read_timeout_s: float, max_connections: int,
        on_stop: Sequence[Callable[[], None]] = (),
    ) -> None:
        protocol: Any = guarded_protocol(read_timeout_s, max_connections) if read_timeout_s > 0 else "h11"
        self._config = uvicorn.Config(
            # proxy_headers off: a client's address is the socket's, so that no local
            # process can dodge the login throttle with a forged X-Forwarded-For.
            app, http=protocol, lifespan="off", log_config=None, access_log=True, server_header=False,
            proxy_headers=False,
            limit_concurrency=max_connections, timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=GRACEFUL_STOP_S, ws="none",
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
