"""The node's HTTP side on FastAPI: health, readiness, metrics, the status page and
a JSON API, served by uvicorn inside the node (:mod:`service.ops.server`).

``/healthz``, ``/readyz`` and ``/metrics`` need no credential. The status page
(``/status``) and the API (``/api/v1``, described at ``/api/openapi.json`` unless
``web_openapi_public``) need ``settings.web_token``: as ``Authorization: Bearer``,
or for the page through the sign-in form, which starts a server-side session
(:mod:`service.ops.sessions`) that expires and ends at sign-out. Every
state-changing request of a session carries its CSRF token (a form field, or the
``X-CSRF-Token`` header for the API), and none may come from another site (Fetch
Metadata). Wrong tokens are throttled per client address and per token; the right
one never is. Without a token both are off.

A second token, ``settings.web_review_token``, signs radiologists in as
``reviewer``: they read all the page and API show and give verdicts, and every
other state-changing route answers them 403 (:func:`admin_auth`,
:func:`admin_page_auth`; an extra router is admin-only unless it says
``reviewers``).

Other stages add routes through ``routers`` (:class:`ExtraRouter`): each is mounted
behind the same Bearer check, with its own body-size limit.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.common.bearer import CHALLENGE, token_matches
from service.common.metrics import build_registry, observe_login_refusal
from service.delivery.recovery import NothingToRetry, UnknownStudy, retry_study
from service.ledger import Ledger
from service.monitoring.drift import DriftConfig
from service.monitoring.watcher import DriftWatcher, MonitoringCollector
from service.ops.ledger_metrics import LedgerCollector
from service.ops.pages import login_page, render_status
from service.ops.probes import Check, IndexProbe, ModelProbe, broker_check, disk_check, ledger_check, readiness
from service.ops.server import HttpLimits, WebServer
from service.ops.sessions import LoginThrottle, Role, Session, SessionStore
from service.ops.views import (
    PAGE_STUDIES,
    StudyView,
    recent_views,
    retry_notice,
    study_heatmap_png,
    study_view,
)
from service.pipeline.queue import create_app
from service.settings import Settings

LOG = logging.getLogger(__name__)

SESSION_COOKIE = "sonocase_session"
API_PREFIX = "/api/v1"
OPENAPI_URL = "/api/openapi.json"
#: The header a signed-in browser's state-changing API request carries its session's CSRF token in.
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
OFF = "the status page and API are off: set SONOCASE_WEB_TOKEN to turn them on"
StudyUid = Annotated[str, PathParam(pattern=r"^[0-9.]{1,64}$", description="Study Instance UID")]
# No script at all; images and forms only from here; never framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline';"
    " form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


@dataclass(frozen=True)
class ExtraRouter:
    """Routes another stage serves from the node's HTTP side (e.g. STOW-RS): mounted
    behind the Bearer check, with request bodies up to ``max_body_bytes``. Their
    state-changing routes are the admin's unless ``reviewers`` (verdicts): a new
    router is refused to reviewers until it says otherwise."""

    router: APIRouter
    max_body_bytes: int
    reviewers: bool = False


@dataclass
class WebState:
    """What the routes share, kept on ``app.state.web``."""

    settings: Settings
    ledger: Ledger
    checks: dict[str, Check]
    registry: CollectorRegistry
    sessions: SessionStore
    throttle: LoginThrottle
    drift: DriftWatcher | None = None  # its alarms head the status page


# --- ASGI middleware ----------------------------------------------------------------
class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every response that does not set them itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._headers = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *(h for h in self._headers if h[0] not in present)]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyLimit:
    """Refuses a request body over its route's limit with 413, by its Content-Length
    before reading anything, or as it streams in (chunked: the app then sees the
    client gone, and what it answers is dropped); a Content-Length that is not a
    number is 400. The limit is ``limit_for(path)``."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        too_large = PlainTextResponse(f"request body over {limit} bytes\n", 413)
        lengths = [v for k, v in scope["headers"] if k == b"content-length"]
        if lengths and not all(v.isdigit() for v in lengths):
            await PlainTextResponse("Content-Length is not a number\n", 400)(scope, receive, send)
            return
        if lengths and int(lengths[0]) > limit:
            await too_large(scope, receive, send)
            return
        received, started, refused = 0, False, False

        async def counted_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        await too_large(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted_receive, guarded_send)


# --- authentication ---------------------------------------------------------------------
@dataclass(frozen=True)
class Auth:
    """How a request proved it may see the page (a Bearer token, or a session), and
    with which role."""

    kind: Literal["bearer", "session"]
    role: Role
    session: Session | None = None


def _state(request: Request) -> WebState:
    state: WebState = request.app.state.web
    return state


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


class _Throttled(Exception):
    """Too many wrong tokens from this address, or of this token: wait ``retry_after`` seconds."""

    def __init__(self, wait: float) -> None:
        self.retry_after = str(math.ceil(wait))


def throttle_keys(client: str, given: str) -> tuple[str, str]:
    """What wrong tokens are counted against: the address that sent them, and the
    token itself (a script repeating a stale one from many addresses); the token
    only as a hash, in memory."""
    return f"address {client}", "token " + hashlib.sha256(given.encode()).hexdigest()


def _token_role(state: WebState, client: str, given: str) -> Role | None:
    """The role of ``given`` (web_token: admin, web_review_token: reviewer), None
    for a wrong token. The right token is always taken, whoever
    else at its address guessed wrong (behind an ingress every client shares one
    address). A wrong one is counted per address and per token; past
    ``web_login_attempts`` of either it gets :class:`_Throttled` (429) instead of
    401, and no log line: one typo-ing script cannot lock out the PACS or fill the
    log. What keeps a guesser out is the token's length, not the count."""
    tokens: list[tuple[str, Role]] = [
        (state.settings.web_token, "admin"),
        (state.settings.web_review_token, "reviewer"),
    ]
    for token, role in tokens:
        if token_matches(given, token):
            return role
    keys = throttle_keys(client, given)
    wait = max(state.throttle.retry_after(key) for key in keys)
    if wait > 0:
        observe_login_refusal("throttled")
        raise _Throttled(wait)
    for key in keys:
        state.throttle.failed(key)
    observe_login_refusal("wrong")
    LOG.warning("HTTP: wrong token from %s", client)
    return None


_bearer = HTTPBearer(auto_error=False, description="The node's web_token (or web_review_token: reviewer)")


def authenticate(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Auth:
    """The request's credential, checked; raises 401 (or 404 with no token set, 429
    for a wrong token past the throttle's count)."""
    state = _state(request)
    if not state.settings.web_token:
        raise HTTPException(404, OFF)
    if bearer is not None:
        try:
            role = _token_role(state, _client(request), bearer.credentials.strip())
            if role is not None:
                return Auth("bearer", role)
        except _Throttled as exc:
            raise HTTPException(429, "too many wrong tokens", {"Retry-After": exc.retry_after}) from None
    else:
        session = state.sessions.get(request.cookies.get(SESSION_COOKIE, ""))
        if session is not None:
            return Auth("session", session.role, session)
    raise HTTPException(401, "sign in, or send Authorization: Bearer <web_token>", CHALLENGE)


def _cross_site(request: Request) -> bool:
    """Whether the browser says the request comes from another site (Fetch Metadata)."""
    return request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none")


class _PageRefusal(Exception):
    """A page request refused: answered as the sign-in page or plain text, not JSON."""

    def __init__(self, response: Response) -> None:
        self.response = response


def page_auth(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Auth:
    """:func:`authenticate` for the page: a 401 shows the sign-in form."""
    try:
        return authenticate(request, bearer)
    except HTTPException as exc:
        if exc.status_code == 401:
            raise _PageRefusal(HTMLResponse(login_page(), 401, exc.headers)) from None
        raise _PageRefusal(PlainTextResponse(f"{exc.detail}\n", exc.status_code, exc.headers)) from None


def csrf_problem(request: Request, auth: Auth, given: str) -> str | None:
    """Why a state-changing request may not have come from our own page, or None.
    Fetch Metadata first (where the browser sends it); then, with a session, the
    session's CSRF token. A Bearer request needs neither: no browser adds that
    header by itself."""
    if _cross_site(request):
        return "cross-site request refused"
    if auth.session is not None and not hmac.compare_digest(given.encode(), auth.session.csrf.encode()):
        return "missing or wrong CSRF token: reload the status page"
    return None


def _check_form(request: Request, auth: Auth, csrf: str) -> None:
    """A form post must pass :func:`csrf_problem` with its ``csrf`` field."""
    problem = csrf_problem(request, auth, csrf)
    if problem is not None:
        raise _PageRefusal(PlainTextResponse(f"{problem}\n", 403))


def api_auth(request: Request, auth: Annotated[Auth, Depends(authenticate)]) -> Auth:
    """:func:`authenticate`, and for a method that changes state, :func:`csrf_problem`
    with the ``X-CSRF-Token`` header (403)."""
    if request.method not in SAFE_METHODS:
        problem = csrf_problem(request, auth, request.headers.get(CSRF_HEADER, ""))
        if problem is not None:
            raise HTTPException(403, problem)
    return auth


def reviewer_refusal(request: Request, auth: Auth) -> str | None:
    """Why ``auth`` may not make this request, or None: a reviewer reads anything
    but changes nothing outside the verdicts, whose routes do not ask."""
    if auth.role == "reviewer" and request.method not in SAFE_METHODS:
        return f"reviewers may not {request.method} {request.url.path}: it takes the web_token"
    return None


def admin_auth(request: Request, auth: Annotated[Auth, Depends(api_auth)]) -> Auth:
    """:func:`api_auth`, and :func:`reviewer_refusal` (403): every administrative API route."""
    problem = reviewer_refusal(request, auth)
    if problem is not None:
        raise HTTPException(403, problem)
    return auth


def admin_page_auth(request: Request, auth: Annotated[Auth, Depends(page_auth)]) -> Auth:
    """:func:`page_auth`, and :func:`reviewer_refusal` (403 as text): every administrative form."""
    problem = reviewer_refusal(request, auth)
    if problem is not None:
        raise _PageRefusal(PlainTextResponse(f"{problem}\n", 403))
    return auth


PageAuth = Annotated[Auth, Depends(page_auth)]
ApiAuth = Annotated[Auth, Depends(api_auth)]
AdminAuth = Annotated[Auth, Depends(admin_auth)]
AdminPageAuth = Annotated[Auth, Depends(admin_page_auth)]
CsrfField = Annotated[str, Form()]


# --- health, readiness, metrics ------------------------------------------------------------
health = APIRouter(tags=["health"])


@health.get("/healthz", response_class=PlainTextResponse, summary="The process answers")
def healthz() -> str:
    return "ok\n"


@health.get("/readyz", summary="Every readiness check passes (503 names those that fail)")
def readyz(request: Request) -> Response:
    ready, doc = readiness(_state(request).checks)
    return Response(json.dumps(doc, indent=1) + "\n", 200 if ready else 503, media_type="application/json")


@health.get("/metrics", summary="Prometheus text format")
def metrics(request: Request) -> Response:
    return Response(generate_latest(_state(request).registry), media_type=CONTENT_TYPE_LATEST)


# --- the status page --------------------------------------------------------------------------
page = APIRouter(include_in_schema=False)


@page.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/status", 303)


@page.post("/login")
def login(request: Request, token: Annotated[str, Form()] = "") -> Response:
    """The sign-in form: a right token starts a session with that token's role. The
    form needs no CSRF token: it carries the secret itself."""
    state = _state(request)
    if not state.settings.web_token:
        return PlainTextResponse(OFF + "\n", 404)
    if _cross_site(request):
        return PlainTextResponse("cross-site form refused\n", 403)
    try:
        role = _token_role(state, _client(request), token)
        if role is None:
            return HTMLResponse(login_page("Wrong token."), 401)
    except _Throttled as exc:
        return HTMLResponse(
            login_page(f"Too many wrong tokens: try again in {exc.retry_after} s."),
            429,
            {"Retry-After": exc.retry_after},
        )
    session = state.sessions.create(role)
    response = RedirectResponse("/status", 303)
    response.set_cookie(
        SESSION_COOKIE, session.id, max_age=int(state.sessions.max_age_s), path="/", httponly=True, samesite="strict"
    )
    return response


@page.post("/logout")
def logout(request: Request, auth: PageAuth, csrf: CsrfField = "") -> Response:
    """Ends the session on the server: its cookie is refused from now on, anywhere."""
    _check_form(request, auth, csrf)
    if auth.session is not None:
        _state(request).sessions.revoke(auth.session.id)
    response = RedirectResponse("/status", 303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


@page.get("/status", response_class=HTMLResponse)
def status_page(request: Request, auth: PageAuth, retried: str = "", study: str = "") -> HTMLResponse:
    state = _state(request)
    views = recent_views(state.ledger, state.settings.results_dir)
    csrf = auth.session.csrf if auth.session is not None else ""
    drifting = [
        scanner
        for scanner, (_, window) in (state.drift.latest() if state.drift else {}).items()
        if window is not None and window.alarm
    ]
    return HTMLResponse(
        render_status(
            views,
            state.ledger.count_by_state(),
            csrf,
            retry_notice(retried, study),
            drifting,
            admin=auth.role == "admin",
        )
    )


@page.get("/status/studies/{study_uid}/heatmap.png")
def heatmap(request: Request, auth: PageAuth, study_uid: StudyUid) -> Response:
    state = _state(request)
    png = study_heatmap_png(state.ledger, state.settings.results_dir, study_uid)
    if png is None:
        return PlainTextResponse("no heatmap for this study\n", 404)
    return Response(png, media_type="image/png")


@page.post("/status/studies/{study_uid}/resend")
def resend(request: Request, auth: AdminPageAuth, study_uid: StudyUid, csrf: CsrfField = "") -> Response:
    _check_form(request, auth, csrf)
    state = _state(request)
    try:
        retried = retry_study(state.settings, state.ledger, study_uid)
    except UnknownStudy as exc:
        return PlainTextResponse(f"{exc}\n", 404)
    except NothingToRetry as exc:
        return PlainTextResponse(f"{exc}\n", 409)
    return RedirectResponse("/status?" + urlencode({"retried": retried.kind.value, "study": study_uid}), 303)


# --- the JSON API ---------------------------------------------------------------------------------
class RetryOut(BaseModel):
    """What a retry did: ``analysis`` queued again, ``report`` built again, or ``results`` sent again."""

    kind: str
    message: str


api = APIRouter(
    prefix=API_PREFIX,
    tags=["studies"],
    responses={
        401: {"description": "No or wrong Bearer token"},
        403: {"description": "A reviewer's administrative request, or a session's without its CSRF token"},
        429: {"description": "Too many wrong tokens (the right one is never refused)"},
    },
)


@api.get("/studies", summary="Recent studies, newest change first, and failed ones")
def api_studies(
    request: Request, auth: ApiAuth, limit: Annotated[int, Query(ge=1, le=1000)] = PAGE_STUDIES
) -> list[StudyView]:
    state = _state(request)
    return recent_views(state.ledger, state.settings.results_dir, limit)


@api.get("/studies/{study_uid}", summary="One study", responses={404: {"description": "Unknown study"}})
def api_study(request: Request, auth: ApiAuth, study_uid: StudyUid) -> StudyView:
    state = _state(request)
    row = state.ledger.study(study_uid)
    if row is None:
        raise HTTPException(404, f"unknown study {study_uid}")
    return study_view(state.ledger, state.settings.results_dir, row)


@api.post(
    "/studies/{study_uid}/retry",
    summary="Retry a failed study, or send its results again",
    responses={404: {"description": "Unknown study"}, 409: {"description": "Nothing to retry"}},
)
def api_retry(request: Request, auth: AdminAuth, study_uid: StudyUid) -> RetryOut:
    state = _state(request)
    try:
        retried = retry_study(state.settings, state.ledger, study_uid)
    except UnknownStudy as exc:
        raise HTTPException(404, str(exc)) from None
    except NothingToRetry as exc:
        raise HTTPException(409, str(exc)) from None
    return RetryOut(kind=retried.kind.value, message=retried.message)


# --- the application ------------------------------------------------------------------------------
def _body_limits(settings: Settings, routers: Sequence[ExtraRouter]) -> Callable[[str], int]:
    """The body limit of a path: that of the extra router whose route matches, else
    ``web_max_body_bytes``."""
    patterns = [
        (route.path_regex, extra.max_body_bytes)
        for extra in routers
        for route in extra.router.routes
        if hasattr(route, "path_regex")
    ]

    def limit_for(path: str) -> int:
        return next((limit for regex, limit in patterns if regex.match(path)), settings.web_max_body_bytes)

    return limit_for


async def _page_refusal(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, _PageRefusal)
    return exc.response


def build_app(
    settings: Settings,
    ledger: Ledger,
    checks: dict[str, Check],
    registry: CollectorRegistry,
    routers: Sequence[ExtraRouter] = (),
    pages: Sequence[APIRouter] = (),
    drift: DriftWatcher | None = None,
) -> FastAPI:
    """The ASGI application: health, page, API, ``routers`` (each behind the Bearer
    check, and refused to reviewers unless it takes them) and ``pages`` (page routes
    of other modules, each checking ``PageAuth`` or ``AdminPageAuth`` and its form's
    CSRF token itself)."""
    app = FastAPI(
        title="Sonocase",
        summary="Breast-ultrasound AI beside the PACS: studies, results and retries",
        description="Not for primary diagnosis. Authenticate with `Authorization: Bearer <web_token>`; "
        "`<web_review_token>` reads and gives verdicts only.",
        openapi_url=OPENAPI_URL if settings.web_openapi_public else None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.web = WebState(
        settings,
        ledger,
        dict(checks),
        registry,
        SessionStore(settings.web_session_idle_s, settings.web_session_max_s),
        LoginThrottle(settings.web_login_attempts, settings.web_login_window_s),
        drift,
    )
    app.include_router(health)
    app.include_router(page)
    for extra_page in pages:
        app.include_router(extra_page)
    app.include_router(api)
    if not settings.web_openapi_public:

        @app.get(OPENAPI_URL, include_in_schema=False)
        def openapi(auth: ApiAuth) -> dict[str, Any]:
            """The API's description, behind the same check as the API (web_openapi_public)."""
            return app.openapi()

    for extra in routers:
        app.include_router(extra.router, dependencies=[Depends(api_auth if extra.reviewers else admin_auth)])
    app.add_exception_handler(_PageRefusal, _page_refusal)
    app.add_middleware(BodyLimit, limit_for=_body_limits(settings, routers))
    app.add_middleware(SecurityHeaders)
    return app


def build_web_server(
    settings: Settings,
    ledger: Ledger,
    routers: Sequence[ExtraRouter] = (),
    pages: Sequence[APIRouter] = (),
    drift: DriftWatcher | None = None,
) -> WebServer:
    """The node's web server: broker, disk, ledger, model and index readiness checks,
    a metrics registry over the ledger (and ``drift``'s figures, a watcher of its
    own when None), ``routers`` and ``pages`` from other stages."""
    model = ModelProbe(settings.model_path)
    index = IndexProbe(settings.effective_index_dir, model)
    checks: dict[str, Check] = {
        "broker": broker_check(create_app(settings).connection_for_write),
        "disk": disk_check(settings.data_dir, settings.min_free_disk_mb),
        "ledger": ledger_check(ledger),
        "model": model.check,
        "index": index.check,
    }
    collector = LedgerCollector(ledger, settings.data_dir, model_info=model.info, index_info=index.info)
    registry = build_registry(collector)
    drift = drift or DriftWatcher(ledger, DriftConfig())
    registry.register(MonitoringCollector(drift))
    app = build_app(settings, ledger, checks, registry, routers, pages, drift)
    limits = HttpLimits(
        settings.web_read_timeout_s,
        settings.web_min_body_bytes_per_s,
        settings.web_max_connections,
        settings.web_max_connections_per_address,
    )
    return WebServer(app, settings.http_host, settings.http_port, limits, on_stop=[index.close])
