"""Test support for DICOMweb (no tests here): the node's receiving side with STOW-RS,
multipart bodies written byte by byte, and curl as a client.

:class:`ReceivingNode` is what ``sonocase serve`` runs to receive: the C-STORE
receiver and the STOW-RS router on the HTTP side (uvicorn, FastAPI), sharing the
receiver's one store.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from service.ingest.server import ReceiverService
from service.ingest.stow import stow_router
from service.ledger import Ledger
from service.settings import Settings
from tests.support.common import wait_for

TOKEN = "test-stow-token"
BOUNDARY = "sonocase-test-boundary-7f3a"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


class ReceivingNode:
    """C-STORE on ``settings.port`` and STOW-RS on :attr:`url` (HTTPS with ``tls``: a
    certificate and its key), one store; :meth:`stop`."""

    def __init__(self, settings: Settings, ledger: Ledger, tls: tuple[Path, Path] | None = None) -> None:
        self.settings = settings
        self.scheme = "https" if tls else "http"
        self.receiver = ReceiverService(settings, ledger)
        self.receiver.start()
        app = FastAPI()
        app.include_router(stow_router(settings, lambda: self.receiver.store))
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        cert, key = tls or (None, None)
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_config=None,
                lifespan="off",
                access_log=False,
                ssl_certfile=cert,
                ssl_keyfile=key,
                timeout_graceful_shutdown=2,  # not the join's 20 s for a client's lingering connection (seen in CI)
            )
        )
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True)
        self._thread.start()
        wait_for("uvicorn to serve", lambda: self.server.started)

    @property
    def url(self) -> str:
        """The DICOMweb base URL (``/studies`` is under it)."""
        return f"{self.scheme}://127.0.0.1:{self._socket.getsockname()[1]}"

    def incoming(self) -> list[Path]:
        """Temporary files of instances still arriving (none once a request is answered)."""
        return list((self.settings.spool_dir / ".incoming").iterdir())

    def spooled(self) -> list[Path]:
        return sorted(self.settings.spool_dir.glob("*/*.dcm"))

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=20)
        self._socket.close()
        self.receiver.stop()


def multipart(parts: list[bytes], close: bool = True) -> bytes:
    """A multipart/related body of ``application/dicom`` parts (``close``: with the
    closing delimiter, as a complete body ends)."""
    body = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n" for part in parts
    )
    return body + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


@dataclass
class CurlAnswer:
    status: int
    headers: dict[str, list[str]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def failures(self) -> dict[str, int]:
        """SOP Instance UID ("" for an unnamed part) -> Failure Reason."""
        items = self.json().get("00081198", {}).get("Value", [])
        return {(item.get("00081155", {}).get("Value") or [""])[0]: item["00081197"]["Value"][0] for item in items}

    def stored(self) -> list[str]:
        items = self.json().get("00081199", {}).get("Value", [])
        return [item["00081155"]["Value"][0] for item in items]


def curl(url: str, body: Path, content_type: str = MULTIPART, token: str | None = TOKEN, *extra: str) -> CurlAnswer:
    """POST ``body`` with curl (a client that is not ours); the answer."""
    headers = ["-H", f"Content-Type: {content_type}"]
    if token is not None:
        headers += ["-H", f"Authorization: Bearer {token}"]
    out = body.with_suffix(".answer")
    proc = subprocess.run(
        ["curl", "-sS", "-D", "-", "-o", str(out), "--data-binary", f"@{body}", *headers, *extra, url],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    blocks = [b for b in proc.stdout.replace("\r\n", "\n").split("\n\n") if b.startswith("HTTP/")]
    status_line, *lines = blocks[-1].splitlines()  # the last response (after any 100 Continue)
    headers_out: dict[str, list[str]] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers_out.setdefault(name.strip().lower(), []).append(value.strip())
    return CurlAnswer(int(status_line.split()[1]), headers_out, out.read_bytes() if out.exists() else b"")
