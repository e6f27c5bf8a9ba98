"""The node's HTTP side: health, readiness, Prometheus metrics and a status page for IT.

The standard library's threading HTTP server in a daemon thread: the endpoints are
few and small, and a web framework would be one more thing to patch in a hospital.
Routing is a plain function of the request (:meth:`WebApp.handle`), so most of it is
tested without a socket; :class:`WebServer` is the thin shell around it.

``/healthz`` says the process answers; ``/readyz`` runs the readiness checks the node
wires in (broker, disk, ledger, model, index); ``/metrics`` is Prometheus text. The
status page needs ``settings.web_token`` (``Authorization: Bearer`` or the login form,
which sets a cookie) and is off without one. It names studies by UID and accession
number only; patient names and IDs never reach it.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import io
import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import numpy as np
import pydicom
from kombu import Connection
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import ValidationError

from service.common.metrics import STAGES, LedgerCollector, build_registry
from service.common.spool import free_disk_mb
from service.delivery.recovery import (
    NothingToRetry,
    RetryKind,
    UnknownStudy,
    retry_study,
)
from service.ledger import Ledger, OutboxState, StudyState
from service.model_card import DISCLAIMER, ModelCard
from service.pipeline.queue import create_app
from service.results import StudyResult
from service.settings import Settings
from service.similar.index import SimilarCaseIndex

logger = logging.getLogger(__name__)

SESSION_COOKIE = "sonocase_session"
#: Studies listed on the status page, newest change first.
PAGE_STUDIES = 50
THUMBNAIL_PX = 96
_MAX_BODY = 64 * 1024
_STUDY_PATH = re.compile(r"^/studies/([0-9.]{1,64})/(heatmap\.png|resend)$")


# --- readiness checks -------------------------------------------------------------
@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str


#: A readiness check: quick (it runs on every /readyz), never raises.
Check = Callable[[], CheckResult]


def disk_check(data_dir: Path, min_free_mb: int) -> Check:
    """Ready while the data disk has more free space than the receiver's watermark
    (below it the receiver refuses C-STORE with 'out of resources')."""

    def check() -> CheckResult:
        free = free_disk_mb(data_dir)
        return CheckResult(free >= min_free_mb, f"{free:.0f} MB free, watermark {min_free_mb} MB")

    return check


def broker_check(connection: Callable[[], Connection], timeout_s: float = 2.0) -> Check:
    """Ready while the Celery broker accepts a connection (``connection`` makes a
    kombu connection as the Celery app would, transport options included)."""

    def check() -> CheckResult:
        try:
            with connection() as conn:
                conn.ensure_connection(max_retries=0, timeout=timeout_s)
                transport = conn.transport.driver_type
        except Exception as exc:  # noqa: BLE001 - any failure to connect means not ready
            return CheckResult(False, f"broker unreachable: {exc}")
        return CheckResult(True, f"broker reachable ({transport})")

    return check


def ledger_check(ledger: Ledger) -> Check:
    """Ready while the ledger answers a query (not locked out, not corrupt)."""

    def check() -> CheckResult:
        try:
            return CheckResult(True, f"{sum(ledger.count_by_state().values())} studies")
        except Exception as exc:  # noqa: BLE001 - sqlite3 raises several kinds
            return CheckResult(False, f"ledger unreadable: {exc}")

    return check


class ModelProbe:
    """Loads and verifies the model card (and the ONNX file's sha256) the way the
    workers do, again only when the file changes: the readiness check and the
    ``sonocase_model`` info metric."""

    def __init__(self, model_path: Path) -> None:
        self._path = model_path
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._card: ModelCard | None = None
        self._error = "not checked yet"

    def _refresh(self) -> None:
        with self._lock:
            try:
                stat = self._path.stat()
            except OSError as exc:
                self._seen, self._card, self._error = None, None, f"model file unreadable: {exc}"
                return
            key = (stat.st_mtime_ns, stat.st_size)
            if key == self._seen:
                return
            self._seen = key
            try:
                self._card, self._error = ModelCard.load(self._path), ""
            except (OSError, ValueError) as exc:
                self._card, self._error = None, str(exc)

    def check(self) -> CheckResult:
        self._refresh()
        if self._card is None:
            return CheckResult(False, self._error)
        return CheckResult(True, f"{self._card.name} {self._card.version}")

    def info(self) -> dict[str, str]:
        self._refresh()
        card = self._card
        return {} if card is None else {"name": card.name, "version": card.version, "sha256": card.sha256}


class IndexProbe:
    """The similar-case index as the workers will find it: the readiness check and
    the ``sonocase_index`` info metric. No index yet is ready (similar cases are off
    until one is built); an index of another model's embeddings is not."""

    def __init__(self, index_dir: Path, model: ModelProbe) -> None:
        self._dir = index_dir
        self._model = model
        self._lock = threading.Lock()
        self._index: SimilarCaseIndex | None = None

    def _open(self) -> SimilarCaseIndex | None:
        with self._lock:
            if self._index is None and (self._dir / "index.sqlite3").is_file():
                self._index = SimilarCaseIndex(self._dir, None)
            return self._index

    def check(self) -> CheckResult:
        try:
            index = self._open()
            if index is None:
                return CheckResult(True, f"no similar-case index in {self._dir}: similar cases are off")
            bound, version = index.bound_model, index.version
        except (OSError, ValueError, sqlite3.Error) as exc:
            return CheckResult(False, f"similar-case index unreadable: {exc}")
        model_sha = self._model.info().get("sha256")
        if bound is not None and model_sha is not None and bound.sha256 != model_sha:
            return CheckResult(
                False, f"the index holds embeddings of model {bound.name} {bound.version}, not of the"
                " configured model: run 'sonocase index rebuild'",
            )
        return CheckResult(True, f"index version {version}")

    def info(self) -> dict[str, str]:
        try:
            index = self._open()
            return {} if index is None else {"version": index.version}
        except (OSError, ValueError, sqlite3.Error):
            return {}

    def close(self) -> None:
        with self._lock:
            if self._index is not None:
                self._index.close()
            self._index = None


_RETRY_NOTICE = {
    RetryKind.ANALYSIS: "the analysis was queued again",
    RetryKind.REPORT: "its report was built again (see its state below)",
    RetryKind.RESULTS: "its results are being sent again (see its state below)",
}


# --- the status page's view of a study ------------------------------------------------
@dataclass(frozen=True)
class StudyView:
    """What the status page shows of one study: UIDs, accession, state, result."""

    study_uid: str
    accession: str
    state: str
    generation: int
    instances: int
    first_received: float
    timings: dict[str, float]
    result: str
    heatmap: Path | None
    failed_stage: str | None
    error: str | None
    outbox: dict[str, int]
    can_retry: bool


def _accession(path: str) -> str:
    """The Accession Number of a stored instance, read alone (no patient attribute)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["AccessionNumber"])
    except (OSError, pydicom.errors.InvalidDicomError):
        return ""
    return str(ds.get("AccessionNumber", "") or "")


def _result_text(result: StudyResult) -> str:
    summary = result.summary
    if summary.out_of_distribution:
        return "outside the model's experience"
    if summary.predicted is None:
        return "no image analysed"
    probability = "" if summary.probability is None else f" {summary.probability:.2f}"
    return f"{summary.predicted}{probability}"


def _decisive_heatmap(result: StudyResult, results_dir: Path) -> Path | None:
    """The heatmap of the image that decided the study, if it lies under results_dir."""
    images = sorted(result.images, key=lambda i: i.sop_instance_uid != result.summary.decisive_sop_instance_uid)
    for image in images:
        if image.frames:
            path = Path(image.frames[0].heatmap_path).resolve()
            return path if path.is_relative_to(results_dir.resolve()) and path.is_file() else None
    return None


def study_view(ledger: Ledger, results_dir: Path, study: Mapping[str, Any]) -> StudyView:
    """Build the page's view of one ledger row (reads the result and one file header)."""
    uid = study["study_uid"]
    instances = ledger.instances(uid)
    stored = ledger.result(uid)
    result_text, heatmap = "", None
    if stored is not None:
        try:
            result = StudyResult.model_validate(stored)
        except ValidationError:
            result_text = "stored result unreadable"
        else:
            result_text, heatmap = _result_text(result), _decisive_heatmap(result, results_dir)
    timings = {
        stage: study[end] - study[start]
        for stage, (start, end) in STAGES.items()
        if study[start] is not None and study[end] is not None and study[end] >= study[start]
    }
    outbox: dict[str, int] = {}
    for row in ledger.outbox(uid):
        outbox[row["state"]] = outbox.get(row["state"], 0) + 1
    return StudyView(
        study_uid=uid,
        accession=_accession(instances[0].path) if instances else "",
        state=study["state"],
        generation=study["generation"],
        instances=len(instances),
        first_received=study["first_received"],
        timings=timings,
        result=result_text,
        heatmap=heatmap,
        failed_stage=study["failed_stage"],
        error=study["error"],
        outbox=outbox,
        can_retry=study["state"] == StudyState.FAILED or outbox.get(OutboxState.FAILED, 0) > 0,
    )


def heatmap_png(heatmap: np.ndarray, size: int = THUMBNAIL_PX) -> bytes:
    """A colour thumbnail (blue = low, red = high) of a [0, 1] Grad-CAM map."""
    h = np.clip(np.nan_to_num(heatmap.astype(np.float32)), 0.0, 1.0)
    rgb = np.stack([np.clip(1.5 - np.abs(4 * h - c), 0, 1) for c in (3, 2, 1)], axis=-1)
    image = Image.fromarray((rgb * 255).astype(np.uint8), "RGB")
    image.thumbnail((size, size), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# --- HTML ---------------------------------------------------------------------------
_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;width:100%;margin-bottom:2em}
th,td{border-bottom:1px solid #ddd;padding:.35em .5em;text-align:left;vertical-align:top}
code{font-size:12px}.failed{color:#b00}.notice{background:#eef6e8;padding:.6em}
.disclaimer{background:#fff4d6;padding:.6em}img{image-rendering:pixelated}
"""


def _page(title: str, body: str) -> bytes:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{body}</body></html>"
    ).encode()


def _login_form(message: str = "") -> bytes:
    note = f"<p class=failed>{html.escape(message)}</p>" if message else ""
    return _page(
        "Sonocase status: sign in",
        f"{note}<form method=post action=/login><label>Access token "
        "<input type=password name=token autocomplete=current-password autofocus></label> "
        "<button type=submit>Sign in</button></form>",
    )


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def _timings_html(timings: Mapping[str, float]) -> str:
    return "<br>".join(f"{html.escape(k.replace('_', ' '))}: {v:.1f} s" for k, v in timings.items())


def _row_html(view: StudyView) -> str:
    uid = html.escape(view.study_uid)
    thumb = (
        f"<img alt='heatmap' class=heatmap src='/studies/{uid}/heatmap.png' width={THUMBNAIL_PX}>"
        if view.heatmap else ""
    )
    outbox = ", ".join(f"{n} {html.escape(s)}" for s, n in sorted(view.outbox.items()))
    again = f" (analysis {view.generation})" if view.generation > 1 else ""  # re-opened by a late instance
    return (
        f"<tr data-study='{uid}'><td><code>{uid}</code></td><td>{html.escape(view.accession)}</td>"
        f"<td class='state {html.escape(view.state)}'>{html.escape(view.state)}{again}</td>"
        f"<td>{view.instances}</td><td>{_utc(view.first_received)}</td>"
        f"<td>{_timings_html(view.timings)}</td><td class=result>{html.escape(view.result)}</td>"
        f"<td>{thumb}</td><td>{outbox}</td></tr>"
    )


def _failed_html(view: StudyView, csrf: str) -> str:
    uid = html.escape(view.study_uid)
    return (
        f"<tr data-study='{uid}'><td><code>{uid}</code></td><td>{html.escape(view.accession)}</td>"
        f"<td>{html.escape(view.failed_stage or 'delivery')}</td>"
        f"<td class=failed>{html.escape(view.error or 'result objects not accepted by the destination')}</td>"
        f"<td><form method=post action='/studies/{uid}/resend'>"
        f"<input type=hidden name=csrf value='{html.escape(csrf)}'>"
        "<button type=submit class=resend>Resend</button></form></td></tr>"
    )


def render_status(
    views: list[StudyView], counts: Mapping[str, int], csrf: str, notice: str = "",
) -> bytes:
    """The status page: counts per state, failed studies with a resend button, recent studies."""
    summary = " · ".join(f"{html.escape(s.value)}: {counts.get(s, 0)}" for s in StudyState)
    failed = [v for v in views if v.can_retry]
    parts = [
        f"<p class=disclaimer>{html.escape(DISCLAIMER)}</p>",
        f"<p class=notice>{html.escape(notice)}</p>" if notice else "",
        f"<p>Studies by state: {summary}</p>",
        "<form method=post action=/logout><button type=submit>Sign out</button></form>",
        "<h2>Failed</h2>",
    ]
    if failed:
        parts.append(
            "<table id=failed><tr><th>Study UID</th><th>Accession</th><th>Stage</th><th>Reason</th><th></th></tr>"
            + "".join(_failed_html(v, csrf) for v in failed) + "</table>"
        )
    else:
        parts.append("<p>None.</p>")
    parts.append(
        "<h2>Recent studies</h2><table id=studies><tr><th>Study UID</th><th>Accession</th><th>State</th>"
        "<th>Instances</th><th>First received</th><th>Timings</th><th>AI result</th><th>Heatmap</th>"
        "<th>Outbox</th></tr>" + "".join(_row_html(v) for v in views) + "</table>"
    )
    return _page("Sonocase status", "".join(parts))


# --- requests and responses -------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    form: Mapping[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str:
        """A header by case-insensitive name ('' when absent)."""
        wanted = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == wanted), "")


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


_HTML = "text/html; charset=utf-8"
# No script at all; images and forms only from here; never framed.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline';"
    " form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def _redirect(location: str, **headers: str) -> Response:
    return Response(HTTPStatus.SEE_OTHER, b"", headers={"Location": location, **headers})


class WebApp:
    """Routes a request to its answer; holds no per-request state."""

    def __init__(
        self, settings: Settings, ledger: Ledger, checks: Mapping[str, Check], registry: CollectorRegistry,
    ) -> None:
        self._settings = settings
        self._ledger = ledger
        self._checks = dict(checks)
        self._registry = registry
        token = settings.web_token.encode()
        self._token = token
        self._session = hmac.new(token, b"sonocase-session", hashlib.sha256).hexdigest()
        self._csrf = hmac.new(token, b"sonocase-csrf", hashlib.sha256).hexdigest()

    def handle(self, request: Request) -> Response:
        route = (request.method, request.path)
        if route == ("GET", "/healthz"):
            return Response(HTTPStatus.OK, b"ok\n")
        if route == ("GET", "/readyz"):
            return self._readyz()
        if route == ("GET", "/metrics"):
            return Response(HTTPStatus.OK, generate_latest(self._registry), CONTENT_TYPE_LATEST)
        if not self._token:
            return Response(
                HTTPStatus.NOT_FOUND, b"the status page is off: set SONOCASE_WEB_TOKEN to turn it on\n"
            )
        if route == ("GET", "/"):
            return _redirect("/status")
        if route == ("POST", "/login"):
            return self._login(request)
        if route == ("POST", "/logout"):
            expired = f"{SESSION_COOKIE}=; Max-Age=0; Path=/; HttpOnly; SameSite=Strict"
            return _redirect("/status", **{"Set-Cookie": expired})
        auth = self._auth(request)
        if auth is None:
            response = Response(HTTPStatus.UNAUTHORIZED, _login_form(), _HTML, dict(_PAGE_HEADERS))
            response.headers["WWW-Authenticate"] = 'Bearer realm="sonocase"'
            return response
        if route == ("GET", "/status"):
            return self._status(request)
        match = _STUDY_PATH.match(request.path)
        if match and (request.method, match[2]) == ("GET", "heatmap.png"):
            return self._heatmap(match[1])
        if match and (request.method, match[2]) == ("POST", "resend"):
            # A browser form must prove it came from our page; a Bearer client cannot be forged cross-site.
            if auth == "cookie" and not hmac.compare_digest(request.form.get("csrf", ""), self._csrf):
                return Response(HTTPStatus.FORBIDDEN, b"missing or wrong form token: reload the status page\n")
            return self._resend(match[1])
        return Response(HTTPStatus.NOT_FOUND, b"not found\n")

    def _auth(self, request: Request) -> str | None:
        """'bearer' or 'cookie' when the request carries the token, else None."""
        scheme, _, credential = request.header("Authorization").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(credential.strip().encode(), self._token):
            return "bearer"
        for part in request.header("Cookie").split(";"):
            name, _, value = part.strip().partition("=")
            if name == SESSION_COOKIE and hmac.compare_digest(value, self._session):
                return "cookie"
        return None

    def _login(self, request: Request) -> Response:
        if not hmac.compare_digest(request.form.get("token", "").encode(), self._token):
            logger.warning("status page: sign-in with a wrong token")
            return Response(HTTPStatus.UNAUTHORIZED, _login_form("Wrong token."), _HTML, dict(_PAGE_HEADERS))
        return _redirect(
            "/status", **{"Set-Cookie": f"{SESSION_COOKIE}={self._session}; Path=/; HttpOnly; SameSite=Strict"}
        )

    def _readyz(self) -> Response:
        results = {name: check() for name, check in self._checks.items()}
        ready = all(r.ok for r in results.values())
        body = {"ready": ready, "checks": {n: {"ok": r.ok, "detail": r.detail} for n, r in results.items()}}
        status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
        return Response(status, json.dumps(body, indent=1).encode() + b"\n", "application/json")

    def _status(self, request: Request) -> Response:
        # Recent studies, plus failed ones that dropped off the recent list.
        rows = {s["study_uid"]: s for s in self._ledger.studies((StudyState.FAILED,), limit=PAGE_STUDIES)}
        rows.update({s["study_uid"]: s for s in self._ledger.studies(limit=PAGE_STUDIES)})
        rows = dict(sorted(rows.items(), key=lambda item: -item[1]["updated_at"]))
        views = [study_view(self._ledger, self._settings.results_dir, s) for s in rows.values()]
        notice = ""
        outcome, uid = request.query.get("retried", ""), request.query.get("study", "")
        if outcome in _RETRY_NOTICE and re.fullmatch(r"[0-9.]{1,64}", uid):
            notice = f"Study {uid}: {_RETRY_NOTICE[RetryKind(outcome)]}."
        page = render_status(views, self._ledger.count_by_state(), self._csrf, notice)
        return Response(HTTPStatus.OK, page, _HTML, dict(_PAGE_HEADERS))

    def _heatmap(self, study_uid: str) -> Response:
        stored = self._ledger.result(study_uid)
        path = None
        if stored is not None:
            try:
                path = _decisive_heatmap(StudyResult.model_validate(stored), self._settings.results_dir)
            except ValidationError:
                path = None
        if path is None:
            return Response(HTTPStatus.NOT_FOUND, b"no heatmap for this study\n")
        try:
            png = heatmap_png(np.load(path, allow_pickle=False))
        except (OSError, ValueError) as exc:
            logger.warning("heatmap %s unreadable: %s", path, exc, extra={"study_uid": study_uid})
            return Response(HTTPStatus.NOT_FOUND, b"heatmap unreadable\n")
        return Response(HTTPStatus.OK, png, "image/png", {"Cache-Control": "no-store"})

    def _resend(self, study_uid: str) -> Response:
        try:
            retried = retry_study(self._settings, self._ledger, study_uid)
        except UnknownStudy as exc:
            return Response(HTTPStatus.NOT_FOUND, f"{exc}\n".encode())
        except NothingToRetry as exc:
            return Response(HTTPStatus.CONFLICT, f"{exc}\n".encode())
        return _redirect("/status?" + urlencode({"retried": retried.kind.value, "study": study_uid}))


# --- the server shell --------------------------------------------------------------------
class _Server(ThreadingHTTPServer):
    daemon_threads = True
    app: WebApp


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "sonocase"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self._send(Response(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, b"request body too large\n"))
            return
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        form = dict(parse_qsl(body)) if "form-urlencoded" in self.headers.get("Content-Type", "") else {}
        request = Request(method, url.path, dict(parse_qsl(url.query)), dict(self.headers.items()), form)
        try:
            response = self.server.app.handle(request)
        except Exception:
            logger.exception("web: %s %s failed", method, quote(url.path))
            response = Response(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error; see the node's log\n")
        self._send(response)

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        logger.debug("web: " + format, *args)


class WebServer:
    """Serves a :class:`WebApp` from a daemon thread until :meth:`stop` (a node service)."""

    name = "web"

    def __init__(self, app: WebApp, host: str, port: int, on_stop: Sequence[Callable[[], None]] = ()) -> None:
        self._app = app
        self._address = (host, port)
        self._on_stop = list(on_stop)
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the web server is not started")
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        try:
            self._httpd = _Server(self._address, _Handler)
        except OSError as exc:
            host, port = self._address
            raise OSError(f"cannot serve HTTP on {host}:{port} (setting http_port): {exc}") from exc
        self._httpd.app = self._app
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="web", daemon=True)
        self._thread.start()
        logger.info("HTTP on %s:%d (/healthz /readyz /metrics /status)", self._address[0], self.port)

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None
        for close in self._on_stop:
            close()


def build_web_server(settings: Settings, ledger: Ledger) -> WebServer:
    """The node's web server: broker, disk, ledger, model and index readiness
    checks, and a metrics registry over the ledger."""
    model = ModelProbe(settings.model_path)
    index = IndexProbe(settings.effective_index_dir, model)
    all_checks: dict[str, Check] = {
        "broker": broker_check(create_app(settings).connection_for_write),
        "disk": disk_check(settings.data_dir, settings.min_free_disk_mb),
        "ledger": ledger_check(ledger),
        "model": model.check,
        "index": index.check,
    }
    collector = LedgerCollector(ledger, settings.data_dir, model_info=model.info, index_info=index.info)
    app = WebApp(settings, ledger, all_checks, build_registry(collector))
    return WebServer(app, settings.http_host, settings.http_port, on_stop=[index.close])
