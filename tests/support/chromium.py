"""Headless Chromium (Debian's ``chromium``) driven over the DevTools protocol with
websocket-client: enough to open a page, read and click it, keep screenshots, and
know every uncaught exception and console error the page had.

    browser = Chromium(tmp_path / "profile")
    browser.open(url)
    browser.wait_for("document.querySelector('#root') !== null")
    browser.click("button", text="Skip all")
    browser.screenshot(folder / "page.png")
    assert browser.page_errors() == []
    browser.close()
"""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.common import wait_for

#: The flags every test browser runs with: no GPU, no network of its own, a fresh profile.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


class Chromium:
    """One headless Chromium with one page; see the module doc."""

    def __init__(self, profile: Path, width: int = 1600, height: int = 1000, extra_flags: tuple[str, ...] = ()) -> None:
        import websocket

        binary = shutil.which("chromium")
        if binary is None:
            pytest.fail("chromium is missing: run scripts/setup.sh (apt-get install chromium)")
        profile.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [
                binary,
                *FLAGS,
                *extra_flags,
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"

        def port() -> int | None:
            if self._proc.poll() is not None:
                raise AssertionError(f"chromium exited with {self._proc.returncode}")
            text = port_file.read_text().strip() if port_file.is_file() else ""
            return int(text.split()[0]) if text else None

        try:
            devtools = wait_for("chromium's DevTools port", port, timeout=30, interval=0.1)
            conn = http.client.HTTPConnection("127.0.0.1", devtools, timeout=10)
            conn.request("GET", "/json/list")
            page = next(t for t in json.loads(conn.getresponse().read()) if t["type"] == "page")
            conn.close()
            self._ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        except BaseException:
            self.close()
            raise
        self._id = 0
        self.events: list[dict[str, Any]] = []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result; events that arrive
        meanwhile are kept in :attr:`events`."""
        self._id += 1
        self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv())
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message["result"])
            if "method" in message:
                self.events.append(message)

    def open(self, url: str) -> None:
        """Load ``url``; :meth:`page_errors` and :meth:`console` start afresh for it."""
        self.call("Page.navigate", url=url)
        self.events.clear()

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (awaited when it is a promise)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:200]}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 60) -> Any:
        """Poll until ``expression`` is truthy in a loaded page; its value."""
        try:
            return wait_for(
                expression,
                lambda: self.evaluate(f"document.readyState === 'complete' && ({expression})"),
                timeout_s,
                interval=0.25,
            )
        except AssertionError as exc:
            text = self.evaluate("document.body ? document.body.innerText.slice(0, 2000) : ''")
            raise AssertionError(f"{exc}; the page reads: {text!r}; page errors: {self.page_errors()}") from None

    def click(self, selector: str, text: str | None = None, clicks: int = 1) -> None:
        """A real mouse click (``clicks=2``: a double click) in the middle of the
        first visible element matching ``selector`` (whose text holds ``text``, when
        given), as a person makes it: React listens to these, not to element.click()."""
        x, y = self._centre(selector, text)
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for count in range(1, clicks + 1):
            for kind in ("mousePressed", "mouseReleased"):
                self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=count)

    def hover(self, selector: str) -> None:
        """Move the mouse over the middle of ``selector``, a little off where it was
        (viewers redraw their overlays when the pointer moves over them)."""
        x, y = self._centre(selector, None)
        self._nudge = not getattr(self, "_nudge", False)
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x + (5 if self._nudge else -5), y=y)

    def _centre(self, selector: str, text: str | None) -> tuple[float, float]:
        box = self.evaluate(f"""(() => {{
            const want = {json.dumps(text)};
            const e = [...document.querySelectorAll({json.dumps(selector)})].find(e =>
                e.offsetParent !== null && (want === null || e.innerText.includes(want)));
            if (!e) return null;
            e.scrollIntoView({{block: 'center'}});
            const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2];
        }})()""")
        if box is None:
            raise AssertionError(
                f"nothing visible matches {selector!r} with text {text!r}; page errors: {self.page_errors()}"
            )
        return float(box[0]), float(box[1])

    def screenshot(self, path: Path) -> Path:
        """The page as a PNG file."""
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def page_errors(self) -> list[str]:
        """Uncaught exceptions and console errors so far, as text."""
        self.evaluate("0")  # collect the events that arrived since the last call
        errors = []
        for event in self.events:
            params = event.get("params", {})
            if event["method"] == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
            elif event["method"] == "Runtime.consoleAPICalled" and params.get("type") == "error":
                errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        return errors

    def pending_requests(self, url_part: str) -> int:
        """How many requests of this page whose URL holds ``url_part`` have not ended yet."""
        self.evaluate("0")  # collect the events that arrived since the last call
        started = {
            e["params"]["requestId"]
            for e in self.events
            if e["method"] == "Network.requestWillBeSent" and url_part in e["params"]["request"]["url"]
        }
        ended = {
            e["params"]["requestId"]
            for e in self.events
            if e["method"] in ("Network.loadingFinished", "Network.loadingFailed")
        }
        return len(started - ended)

    def wait_idle(self, url_part: str, timeout_s: float = 60, quiet_s: float = 0.75) -> None:
        """Wait until no request whose URL holds ``url_part`` has been under way for
        ``quiet_s``: a viewer starts its next fetch (a prefetch, the next frame) a moment
        after the last one ends, and a single look can fall in that gap."""
        idle_since: list[float] = []

        def quiet() -> bool:
            if self.pending_requests(url_part):
                idle_since.clear()
                return False
            idle_since[:] = idle_since or [time.monotonic()]
            return time.monotonic() - idle_since[0] >= quiet_s

        wait_for(f"requests to {url_part} to end", quiet, timeout_s, interval=0.25)

    def console(self) -> list[str]:
        """Every console message so far (type: text), for diagnosis."""
        return [
            f"{e['params'].get('type')}: "
            + " ".join(str(a.get("value", a.get("description", ""))) for a in e["params"].get("args", []))
            for e in self.events
            if e["method"] == "Runtime.consoleAPICalled"
        ]

    def close(self) -> None:
        if hasattr(self, "_ws"):
            self._ws.close()
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10)
