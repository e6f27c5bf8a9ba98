"""The HTTP side: health, readiness, metrics and the status page, over a real socket,
with a real ledger holding a study analysed from a real ultrasound file, and the
page driven in headless Chromium."""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.routing import iter_route_contexts
from kombu import Connection
from markupsafe import escape
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.common.metrics import observe_cstore
from service.delivery.recovery import (
    NothingToRetry,
    RetryKind,
    UnknownStudy,
    retry_study,
)
from service.ledger import Ledger, OutboxState, StudyState
from service.model_card import ModelCard
from service.node import node_services
from service.ops.probes import CheckResult, IndexProbe, ModelProbe, broker_check
from service.ops.server import HttpLimits, Progress, WebServer, body_deadline, choose_protocol, furthest_behind
from service.ops.sessions import LoginThrottle, SessionStore
from service.ops.web import SAFE_METHODS, SESSION_COOKIE, ExtraRouter, build_web_server, throttle_keys
from service.results import (
    ModelIdentity,
)
from service.settings import SettingsError
from service.similar.index import SimilarCaseIndex
from tests.support import attacks
from tests.support.chromium import Chromium
from tests.support.common import free_port
from tests.support.dicomweb import MULTIPART, multipart
from tests.support.web import (
    ACCESSION,
    BEARER,
    PATIENT_NAME,
    REVIEW_TOKEN,
    REVIEWER,
    TOKEN,
    Node,
    login,
    populate,
    probe_model,
    record_analysis,
    store_instance,
    web_request,
    web_settings,
)
from tests.support.worker import serve, study_state


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    settings = web_settings(tmp_path)
    ledger, analysed, undelivered, broken = populate(settings)
    server = build_web_server(settings, ledger)
    server.start()
    yield Node(settings, ledger, analysed, undelivered, broken, f"http://127.0.0.1:{server.port}")
    server.stop()
    ledger.close()


@pytest.fixture
def whole_node(tmp_path: Path) -> Iterator[tuple[Node, FastAPI]]:
    """The HTTP side as the node builds it, every stage's routes mounted, and its app."""
    settings = web_settings(tmp_path)
    ledger, analysed, undelivered, broken = populate(settings)
    server = next(s for s in node_services(settings, ledger) if isinstance(s, WebServer))
    server.start()
    yield Node(settings, ledger, analysed, undelivered, broken, f"http://127.0.0.1:{server.port}"), server.app
    server.stop()
    ledger.close()


@pytest.mark.integration
def test_health_ready_and_metrics(node: Node) -> None:
    status, _, body = web_request(node.url, "/healthz")
    assert (status, body) == (200, b"ok\n")

    status, headers, body = web_request(node.url, "/readyz")
    doc = json.loads(body)
    assert status == 200, doc
    assert headers["content-type"] == "application/json"
    assert set(doc["checks"]) == {"broker", "disk", "ledger", "model", "index"} and doc["ready"] is True
    assert "filesystem" in doc["checks"]["broker"]["detail"]  # the embedded broker
    assert doc["checks"]["model"]["detail"] == "sonocase-hybrid 7"

    observe_cstore(0xA700)
    status, _, body = web_request(node.url, "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert values[("sonocase_instances_received_total", ())] == 3
    assert values[("sonocase_studies_received_total", ())] == 3
    assert values[("sonocase_studies", (("state", "analysed"),))] == 1
    assert values[("sonocase_studies", (("state", "failed"),))] == 2
    assert values[("sonocase_queue_depth", ())] == 0
    assert values[("sonocase_cstore_responses_total", (("status", "0xA700"),))] >= 1
    assert values[("sonocase_outbox_objects", (("state", "failed"),))] == 1
    assert values[("sonocase_send_retries", ())] == 1
    assert values[("sonocase_images_analysed_total", ())] == 2
    assert values[("sonocase_images_not_assessed_total", ())] == 0
    # Two studies were analysed 3 s after they completed (see record_analysis).
    stage = (("stage", "complete_to_analysed"),)
    assert values[("sonocase_stage_latency_seconds_count", stage)] == 2
    assert values[("sonocase_stage_latency_seconds_sum", stage)] == pytest.approx(6.0)
    assert values[("sonocase_stage_latency_seconds_bucket", (("le", "2"), *stage))] == 0
    assert values[("sonocase_stage_latency_seconds_bucket", (("le", "5"), *stage))] == 2
    info = next(s for f in families.values() for s in f.samples if s.name == "sonocase_model_info")
    assert info.labels["version"] == "7" and info.labels["name"] == "sonocase-hybrid" and info.value == 1


@pytest.mark.integration
def test_not_ready_names_the_failing_check(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    settings = web_settings(
        tmp_path, min_free_disk_mb=10**9, purge_when_free_below_mb=0, broker_url=f"redis://127.0.0.1:{closed}/0"
    )
    (tmp_path / "model" / "probe.onnx").write_bytes(b"another model, card not updated")
    ledger = Ledger(settings.ledger_path, durable=False)
    server = build_web_server(settings, ledger)
    server.start()
    try:
        status, _, body = web_request(f"http://127.0.0.1:{server.port}", "/readyz")
    finally:
        server.stop()
        ledger.close()
    doc = json.loads(body)
    assert status == 503 and doc["ready"] is False
    assert not doc["checks"]["disk"]["ok"] and "watermark" in doc["checks"]["disk"]["detail"]
    assert not doc["checks"]["model"]["ok"] and "sha256" in doc["checks"]["model"]["detail"]
    assert not doc["checks"]["broker"]["ok"] and "unreachable" in doc["checks"]["broker"]["detail"]
    assert doc["checks"]["ledger"]["ok"]


@pytest.mark.integration
def test_broker_check_against_real_redis(redis_url: str) -> None:
    result = broker_check(lambda: Connection(redis_url + "/0"))()
    assert result == CheckResult(True, result.detail) and "redis" in result.detail


def test_model_probe_follows_file_changes(tmp_path: Path) -> None:
    path = probe_model(tmp_path)
    probe = ModelProbe(path)
    assert probe.check().ok and probe.info()["version"] == "7"
    path.write_bytes(b"replaced by hand")
    assert not probe.check().ok and probe.info() == {}
    path.unlink()
    assert "unreadable" in probe.check().detail


def test_index_probe(tmp_path: Path) -> None:
    model_path = probe_model(tmp_path)
    model = ModelProbe(model_path)
    probe = IndexProbe(tmp_path / "index", model)
    assert probe.check().ok and "similar cases are off" in probe.check().detail and probe.info() == {}

    card = ModelCard.load(model_path)
    identity = ModelIdentity(name=card.name, version=card.version, sha256=card.sha256)
    SimilarCaseIndex(tmp_path / "index", identity).close()
    result = probe.check()
    assert result.ok and probe.info()["version"] in result.detail

    other = IndexProbe(tmp_path / "other-index", model)
    SimilarCaseIndex(tmp_path / "other-index", ModelIdentity(name="old", version="1", sha256="f" * 64)).close()
    assert not other.check().ok and "sonocase index rebuild" in other.check().detail
    probe.close()
    other.close()


@pytest.mark.integration
def test_status_page_is_off_without_a_token(tmp_path: Path) -> None:
    settings = web_settings(tmp_path, web_token="", web_review_token="")
    ledger = Ledger(settings.ledger_path, durable=False)
    server = build_web_server(settings, ledger)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        status, _, body = web_request(url, "/status", headers={"Authorization": "Bearer "})
        assert status == 404 and b"SONOCASE_WEB_TOKEN" in body
        assert web_request(url, "/healthz")[0] == 200
    finally:
        server.stop()
        ledger.close()


@pytest.mark.integration
def test_status_page_needs_the_token_and_shows_no_patient_name(node: Node) -> None:
    status, headers, body = web_request(node.url, "/status")
    assert status == 401 and headers["www-authenticate"].startswith("Bearer") and b"name=token" in body
    assert web_request(node.url, "/status", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert web_request(node.url, f"/status/studies/{node.analysed}/heatmap.png")[0] == 401

    status, headers, body = web_request(node.url, "/status", headers=BEARER)
    page = body.decode()
    assert status == 200 and "default-src 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-store" and headers["referrer-policy"] == "no-referrer"
    assert node.analysed in page and ACCESSION in page and "malignant 0.87" in page
    assert "not for primary diagnosis" in page
    assert PATIENT_NAME not in page
    assert "PACS refused the SR" in page and "no pixel data" in page
    assert page.count("class=resend") == 2


@pytest.mark.integration
def test_heatmap_thumbnail(node: Node) -> None:
    status, headers, body = web_request(node.url, f"/status/studies/{node.analysed}/heatmap.png", headers=BEARER)
    assert status == 200 and headers["content-type"] == "image/png"
    image = np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype(int)
    assert max(image.shape[:2]) <= 96
    centre, corner = image[image.shape[0] // 2, image.shape[1] // 2], image[0, 0]
    assert centre[0] > centre[2] and corner[2] > corner[0]  # hot centre red, cold corner blue
    assert web_request(node.url, f"/status/studies/{node.broken}/heatmap.png", headers=BEARER)[0] == 404


@pytest.mark.integration
def test_heatmap_outside_the_results_folder_is_not_served(node: Node, tmp_path: Path) -> None:
    rec = store_instance(node.settings, node.ledger, generate_uid(), time.time())
    record_analysis(node.settings, node.ledger, rec, time.time(), heat_root=tmp_path / "elsewhere")
    assert web_request(node.url, f"/status/studies/{rec.study_uid}/heatmap.png", headers=BEARER)[0] == 404
    status, _, body = web_request(node.url, "/status", headers=BEARER)
    assert status == 200 and f"/studies/{rec.study_uid}/heatmap.png" not in body.decode()


@pytest.mark.integration
def test_an_image_outside_the_training_domain_is_shown_not_assessed_and_counted(node: Node) -> None:
    rec = store_instance(node.settings, node.ledger, generate_uid(), time.time())
    record_analysis(node.settings, node.ledger, rec, time.time(), ood=True)
    _status, studies = _json(node.url, "/api/v1/studies", headers=BEARER)
    (shown,) = [s for s in studies if s["study_uid"] == rec.study_uid]
    assert shown["result"] == "not assessed: outside the model's training domain"
    assert shown["heatmap_url"] is None  # no heatmap posing as an explanation
    assert web_request(node.url, f"/status/studies/{rec.study_uid}/heatmap.png", headers=BEARER)[0] == 404
    page = web_request(node.url, "/status", headers=BEARER)[2].decode()
    assert escape("not assessed: outside the model's training domain") in page  # as the page escapes it
    families = text_string_to_metric_families(web_request(node.url, "/metrics")[2].decode())
    values = {s.name: s.value for f in families for s in f.samples}
    assert (values["sonocase_images_analysed_total"], values["sonocase_images_not_assessed_total"]) == (3, 1)


@pytest.mark.integration
def test_login_cookie_and_resend_need_the_form_token(node: Node) -> None:
    assert web_request(node.url, "/login", "POST", form={"token": "nope"})[0] == 401
    status, headers, _ = web_request(node.url, "/login", "POST", form={"token": TOKEN})
    assert status == 303 and headers["location"] == "/status"
    cookie = headers["set-cookie"].split(";")[0]
    assert cookie.startswith(SESSION_COOKIE + "=") and TOKEN not in cookie
    assert "httponly" in headers["set-cookie"].lower() and "samesite=strict" in headers["set-cookie"].lower()

    path = f"/status/studies/{node.undelivered}/resend"
    assert web_request(node.url, path, "POST", headers={"Cookie": cookie}, form={})[0] == 403
    page = web_request(node.url, "/status", headers={"Cookie": cookie})[2].decode()
    csrf = page.split("name=csrf value='")[1].split("'")[0]
    status, headers, _ = web_request(node.url, path, "POST", headers={"Cookie": cookie}, form={"csrf": csrf})
    assert status == 303 and "retried=results" in headers["location"]
    assert [r.state for r in node.ledger.outbox(node.undelivered)] == [OutboxState.PENDING]
    assert node.ledger.study(node.undelivered).state == StudyState.REPORTED

    # A Bearer client needs no form token; the study has not failed any more.
    status, _, body = web_request(node.url, f"/status/studies/{node.analysed}/resend", "POST", headers=BEARER, form={})
    assert status == 409 and b"no results to send" in body
    assert web_request(node.url, "/status/studies/1.2.3/resend", "POST", headers=BEARER, form={})[0] == 404


@pytest.mark.integration
def test_retry_study_requeues_a_failed_analysis(node: Node) -> None:
    assert retry_study(node.settings, node.ledger, node.broken).kind is RetryKind.ANALYSIS
    study = node.ledger.study(node.broken)
    assert study.state == StudyState.COMPLETE and study.attempts == 0 and study.error is None
    assert node.broken in node.ledger.due_for_queue()
    with pytest.raises(NothingToRetry, match="no results to send"):
        retry_study(node.settings, node.ledger, node.analysed)
    with pytest.raises(UnknownStudy):
        retry_study(node.settings, node.ledger, "1.2.3.4")


# --- headless Chromium ---------------------------------------------------------------
@pytest.mark.integration
def test_status_page_in_headless_chromium(node: Node, tmp_path: Path) -> None:
    browser = Chromium(tmp_path / "chromium-profile")
    try:
        browser.open(node.url + "/status")
        browser.wait_for("document.querySelector('input[name=token]') !== null")
        browser.evaluate(
            f"document.querySelector('input[name=token]').value = {json.dumps(TOKEN)};"
            "document.querySelector('form[action=\"/login\"]').submit()"
        )
        browser.wait_for("document.querySelector('table#studies') !== null")
        row = f"document.querySelector('#studies tr[data-study=\"{node.analysed}\"]')"
        assert browser.evaluate(f"{row}.querySelector('.result').textContent") == "malignant 0.87"
        assert browser.evaluate(f"{row}.textContent").count(ACCESSION) == 1
        # The thumbnail is a real decoded PNG in the page, not a broken image.
        assert browser.wait_for(f"{row}.querySelector('img.heatmap').naturalWidth") > 0
        assert PATIENT_NAME not in browser.evaluate("document.documentElement.outerHTML")

        button = f'#failed tr[data-study="{node.undelivered}"] button.resend'
        browser.evaluate(f"document.querySelector('{button}').click()")
        browser.wait_for("location.search.includes('retried=results')")
        assert node.undelivered in browser.evaluate("document.querySelector('.notice').textContent")
    finally:
        browser.close()
    assert [r.state for r in node.ledger.outbox(node.undelivered)] == [OutboxState.PENDING]
    assert node.ledger.study(node.undelivered).state == StudyState.REPORTED


# --- sessions, CSRF, throttling ---------------------------------------------------------
def test_session_expiry_idle_and_absolute() -> None:
    store = SessionStore(idle_s=30, max_age_s=100)
    session = store.create("reviewer", now=1000)
    assert store.get(session.id, now=1029) is session  # used: the idle clock restarts
    assert store.get(session.id, now=1058) is session
    assert store.get(session.id, now=1089) is None  # 31 s unused
    assert store.get(session.id, now=1058) is None  # and gone for good

    kept_busy = store.create("admin", now=2000)
    for now in range(2000, 2100, 20):
        assert store.get(kept_busy.id, now=now) is kept_busy
    assert store.get(kept_busy.id, now=2101) is None  # max_age_s after sign-in, however busy
    assert store.get("not-a-session", now=2000) is None


@pytest.mark.integration
def test_each_sign_in_is_its_own_session(node: Node) -> None:
    """Two sign-ins: two cookies and two CSRF tokens, none derived from the token
    (each is random), so none can be computed offline."""
    (cookie_a, csrf_a), (cookie_b, csrf_b) = login(node.url), login(node.url)
    assert cookie_a != cookie_b and csrf_a != csrf_b
    for value in (cookie_a, cookie_b, csrf_a, csrf_b):
        assert TOKEN not in value and len(value.split("=")[-1]) >= 40


@pytest.mark.integration
def test_sign_out_revokes_the_session_on_the_server(node: Node) -> None:
    cookie, csrf = login(node.url)
    other_cookie, _ = login(node.url)
    assert web_request(node.url, "/logout", "POST", headers={"Cookie": cookie}, form={})[0] == 403  # no form token
    assert web_request(node.url, "/status", headers={"Cookie": cookie})[0] == 200
    status, headers, _ = web_request(node.url, "/logout", "POST", headers={"Cookie": cookie}, form={"csrf": csrf})
    assert status == 303 and "max-age=0" in headers["set-cookie"].lower()
    # The old cookie, replayed (a copy kept by anyone), is refused from now on...
    status, _, body = web_request(node.url, "/status", headers={"Cookie": cookie})
    assert status == 401 and b"name=token" in body
    assert web_request(node.url, f"/status/studies/{node.analysed}/heatmap.png", headers={"Cookie": cookie})[0] == 401
    # ... while another sign-in goes on.
    assert web_request(node.url, "/status", headers={"Cookie": other_cookie})[0] == 200


@pytest.mark.integration
def test_forms_need_their_own_session_s_csrf_token(node: Node) -> None:
    cookie_a, csrf_a = login(node.url)
    _, csrf_b = login(node.url)
    path = f"/status/studies/{node.undelivered}/resend"
    for form in ({}, {"csrf": "guess"}, {"csrf": csrf_b}):  # none, wrong, another session's
        status, _, body = web_request(node.url, path, "POST", headers={"Cookie": cookie_a}, form=form)
        assert status == 403 and b"CSRF token" in body
    # A cross-site post is refused even with the right token (Fetch Metadata).
    cross = {"Cookie": cookie_a, "Sec-Fetch-Site": "cross-site"}
    assert web_request(node.url, path, "POST", headers=cross, form={"csrf": csrf_a})[0] == 403
    assert (
        web_request(node.url, "/login", "POST", headers={"Sec-Fetch-Site": "cross-site"}, form={"token": TOKEN})[0]
        == 403
    )
    assert [r.state for r in node.ledger.outbox(node.undelivered)] == [OutboxState.FAILED]
    assert web_request(node.url, path, "POST", headers={"Cookie": cookie_a}, form={"csrf": csrf_a})[0] == 303


@pytest.mark.integration
def test_wrong_tokens_are_throttled_but_the_right_one_never_is(node: Node) -> None:
    """Issue 24, attack 3: one address sending wrong tokens (behind an ingress, the
    address of every client) is answered 429 past the limit, and the right token from
    that same address is still served: the sign-in form and the Bearer token."""
    attempts = node.settings.web_login_attempts
    for i in range(attempts):
        if i % 2:
            assert web_request(node.url, "/login", "POST", form={"token": f"guess-{i}"})[0] == 401
        else:
            assert web_request(node.url, "/api/v1/studies", headers={"Authorization": f"Bearer guess-{i}"})[0] == 401
    status, headers, body = web_request(node.url, "/login", "POST", form={"token": "guess-again"})
    assert status == 429 and 0 < int(headers["retry-after"]) <= node.settings.web_login_window_s
    assert b"Too many wrong tokens" in body
    assert web_request(node.url, "/api/v1/studies", headers={"Authorization": "Bearer guess-again"})[0] == 429
    assert web_request(node.url, "/login", "POST", form={"token": TOKEN})[0] == 303
    assert web_request(node.url, "/api/v1/studies", headers=BEARER)[0] == 200
    assert web_request(node.url, "/login", "POST", form={"token": REVIEW_TOKEN})[0] == 303
    assert web_request(node.url, "/api/v1/studies", headers=REVIEWER)[0] == 200
    assert web_request(node.url, "/healthz")[0] == 200  # health and metrics are not behind it
    metrics = web_request(node.url, "/metrics")[2].decode()
    assert 'sonocase_web_logins_refused_total{reason="throttled"} ' in metrics


def test_a_wrong_token_is_throttled_from_any_address() -> None:
    """Failures count per address and per token: a stale token repeated from many
    addresses is throttled as a token; another address with another token is not."""
    throttle = LoginThrottle(attempts=2, window_s=60)
    for now, address in ((0, "10.0.0.1"), (1, "10.0.0.2")):
        for key in throttle_keys(address, "stale"):
            throttle.failed(key, now=now)
    assert [throttle.retry_after(k, now=2) for k in throttle_keys("10.0.0.3", "stale")] == [0, 58]
    assert [throttle.retry_after(k, now=2) for k in throttle_keys("10.0.0.3", "typo")] == [0, 0]


def test_login_throttle_window() -> None:
    throttle = LoginThrottle(attempts=3, window_s=60)
    for now in (0, 10, 20):
        assert throttle.retry_after("10.0.0.1", now=now) == 0
        throttle.failed("10.0.0.1", now=now)
    assert throttle.retry_after("10.0.0.1", now=30) == 30  # until the first failure is 60 s old
    assert throttle.retry_after("10.0.0.2", now=30) == 0  # another key is not affected
    assert throttle.retry_after("10.0.0.1", now=60) == 0
    throttle.failed("10.0.0.1", now=61)
    assert throttle.retry_after("10.0.0.1", now=62) == 8  # failures at 10, 20, 61: wait for 10 + 60


# --- the JSON API ---------------------------------------------------------------------------
def _json(url: str, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, _, body = web_request(url, path, method, headers=headers)
    return status, json.loads(body)


@pytest.mark.integration
def test_json_api_lists_shows_and_retries_studies(node: Node) -> None:
    status, doc = _json(node.url, "/api/v1/studies")
    assert status == 401 and "Bearer" in doc["detail"]
    status, studies = _json(node.url, "/api/v1/studies", headers=BEARER)
    assert status == 200
    by_uid = {s["study_uid"]: s for s in studies}
    assert set(by_uid) == {node.analysed, node.undelivered, node.broken}
    analysed = by_uid[node.analysed]
    assert analysed["result"] == "malignant 0.87" and analysed["accession"] == ACCESSION
    assert analysed["heatmap_url"] == f"/status/studies/{node.analysed}/heatmap.png"
    assert by_uid[node.broken]["error"] == "no pixel data" and by_uid[node.broken]["can_retry"]
    assert PATIENT_NAME not in json.dumps(studies)
    assert web_request(node.url, analysed["heatmap_url"], headers=BEARER)[0] == 200

    status, one = _json(node.url, f"/api/v1/studies/{node.undelivered}", headers=BEARER)
    assert status == 200 and one["outbox"] == {"failed": 1} and one["failed_stage"] == "send"
    assert _json(node.url, "/api/v1/studies/1.2.3", headers=BEARER)[0] == 404
    assert _json(node.url, "/api/v1/studies/not-a-uid", headers=BEARER)[0] == 422

    status, retried = _json(node.url, f"/api/v1/studies/{node.undelivered}/retry", "POST", headers=BEARER)
    assert status == 200 and retried["kind"] == "results" and retried["message"]
    assert [r.state for r in node.ledger.outbox(node.undelivered)] == [OutboxState.PENDING]
    status, refused = _json(node.url, f"/api/v1/studies/{node.analysed}/retry", "POST", headers=BEARER)
    assert status == 409 and "no results to send" in refused["detail"]
    assert _json(node.url, "/api/v1/studies/1.2.3/retry", "POST", headers=BEARER)[0] == 404


@pytest.mark.integration
def test_api_changes_from_a_session_need_its_csrf_token(node: Node) -> None:
    """Issue 24, attack 4: a signed-in browser's POST to the API needs its session's
    token in X-CSRF-Token and must not be cross-site; a Bearer client needs neither."""
    cookie, csrf = login(node.url)
    path = f"/api/v1/studies/{node.undelivered}/retry"
    for headers in (
        {},
        {"X-CSRF-Token": "guess"},
        {"Content-Type": "text/plain"},
        {"X-CSRF-Token": csrf, "Sec-Fetch-Site": "cross-site"},
    ):
        status, doc = _json(node.url, path, "POST", headers={"Cookie": cookie} | headers)
        assert status == 403 and ("CSRF" in doc["detail"] or "cross-site" in doc["detail"]), (headers, doc)
    assert [r.state for r in node.ledger.outbox(node.undelivered)] == [OutboxState.FAILED]
    assert _json(node.url, "/api/v1/studies", headers={"Cookie": cookie})[0] == 200  # reading needs no token
    assert _json(node.url, path, "POST", headers={"Cookie": cookie, "X-CSRF-Token": csrf})[0] == 200
    assert _json(node.url, path, "POST", headers=BEARER | {"Sec-Fetch-Site": "cross-site"})[0] == 403
    assert _json(node.url, path, "POST", headers=BEARER)[0] in (200, 409)


@pytest.mark.integration
def test_openapi_is_behind_the_token_unless_made_public(node: Node, tmp_path: Path) -> None:
    assert web_request(node.url, "/api/openapi.json")[0] == 401
    public = tmp_path / "public"
    public.mkdir()
    server = build_web_server(web_settings(public, web_openapi_public=True), node.ledger)
    server.start()
    try:
        assert _json(f"http://127.0.0.1:{server.port}", "/api/openapi.json")[0] == 200
    finally:
        server.stop()


@pytest.mark.integration
def test_openapi_describes_the_api_and_its_bearer_scheme(node: Node) -> None:
    status, doc = _json(node.url, "/api/openapi.json", headers=BEARER)
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {"/api/v1/studies", "/api/v1/studies/{study_uid}", "/api/v1/studies/{study_uid}/retry"} <= set(doc["paths"])
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    retry = doc["paths"]["/api/v1/studies/{study_uid}/retry"]["post"]
    assert retry["security"] == [{"HTTPBearer": []}] and {"404", "409"} <= set(retry["responses"])
    assert not any(p.startswith("/status") or p == "/login" for p in doc["paths"])  # the page is not API


# --- limits: bodies, lengths, idle connections ----------------------------------------------
def _raw(url: str, request: bytes, timeout: float = 15) -> bytes:
    """Send ``request`` as it is; everything the server answers until it closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def strict_node(tmp_path: Path) -> Iterator[Node]:
    """A node whose HTTP side closes stalled connections after 1 s and holds 16."""
    settings = web_settings(tmp_path, web_read_timeout_s=1.0, web_max_connections=16)
    ledger, analysed, undelivered, broken = populate(settings)
    router = APIRouter()

    @router.post("/echo-size")
    async def echo_size(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    server = build_web_server(settings, ledger, routers=[ExtraRouter(router, max_body_bytes=1 << 20)])
    server.start()
    yield Node(settings, ledger, analysed, undelivered, broken, f"http://127.0.0.1:{server.port}")
    server.stop()
    ledger.close()


@pytest.mark.integration
def test_body_limits_and_lengths(strict_node: Node) -> None:
    url, limit = strict_node.url, strict_node.settings.web_max_body_bytes
    # Announced too large: refused before a byte of it is read.
    answer = _raw(
        url,
        b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 1000000000\r\nConnection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 413")
    # Chunked, no length announced: refused once it passes the limit (the client
    # stops there, so that the answer is not lost to a reset).
    chunk = b"a" * 8192
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(limit // len(chunk) + 1))
    answer = _raw(
        url,
        b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body,
    )
    assert answer.startswith(b"HTTP/1.1 413")
    # A negative or non-numeric length is a bad request, answered at once.
    for length in (b"-1", b"12abc"):
        answer = _raw(url, b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n", timeout=5)
        assert answer.startswith(b"HTTP/1.1 400"), answer
    # A mounted router has its own, larger limit (and the Bearer check).
    big = b"x" * (4 * limit)
    request = b"POST /echo-size HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n" % len(big)
    assert _raw(url, b"POST /echo-size HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nxx").startswith(b"HTTP/1.1 401")
    answer = _raw(url, request + f"Authorization: Bearer {TOKEN}\r\n\r\n".encode() + big)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"bytes":%d}' % len(big))


@pytest.mark.integration
def test_a_body_shorter_than_its_length_does_not_hold_a_handler(strict_node: Node) -> None:
    """Content-Length: 100, 10 bytes sent, then silence: the connection is closed
    after web_read_timeout_s, and the server goes on answering."""
    started = time.monotonic()
    answer = _raw(
        strict_node.url,
        b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded"
        b"\r\nContent-Length: 100\r\n\r\ntoken=abcd",
    )
    assert answer == b"" and time.monotonic() - started < 10
    assert web_request(strict_node.url, "/healthz")[0] == 200


@pytest.mark.integration
def test_idle_connections_hold_no_thread_and_are_closed(strict_node: Node) -> None:
    threads_before = threading.active_count()
    host, port = strict_node.url.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port)), timeout=15) for _ in range(200)]
    try:
        # Past web_max_connections each new connection closes the one waiting longest;
        # the last ones live until web_read_timeout_s. Either way every one ends, and no
        # thread was made.
        assert threading.active_count() - threads_before <= 2
        started = time.monotonic()
        for sock in idle:
            assert sock.recv(1) == b""
        assert time.monotonic() - started < 10
        half_sent = socket.create_connection((host, int(port)), timeout=15)
        half_sent.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # headers that never end
        assert half_sent.recv(1) == b""
        half_sent.close()
    finally:
        for sock in idle:
            sock.close()
    assert web_request(strict_node.url, "/healthz")[0] == 200
    assert threading.active_count() - threads_before <= 2


def _port(node: Node) -> int:
    return int(node.url.rsplit(":", 1)[1])


@pytest.mark.integration
def test_health_is_answered_while_idle_connections_are_reopened(strict_node: Node) -> None:
    """Twice web_max_connections idle connections, each opened again as soon as the
    node closes it (issue 24, attack 1): a probe still gets in, by closing the
    connection that waited longest."""
    port = _port(strict_node)
    with attacks.http_flood(port, 2 * strict_node.settings.web_max_connections) as opened:
        time.sleep(0.5)
        answered = attacks.health_answered(port, 30, 0.1)
    assert opened[0] > 2 * strict_node.settings.web_max_connections  # the node closed some, they came back
    assert answered >= 0.9, f"/healthz answered {answered:.0%} of probes"


@pytest.mark.integration
def test_health_is_answered_while_forms_arrive_a_byte_at_a_time(strict_node: Node) -> None:
    port = _port(strict_node)
    with attacks.http_flood(port, 2 * strict_node.settings.web_max_connections, attacks.SLOW_FORM, drip_s=0.3):
        time.sleep(0.5)
        answered = attacks.health_answered(port, 30, 0.1)
    assert answered >= 0.9, f"/healthz answered {answered:.0%} of probes"


@pytest.mark.integration
def test_a_body_sent_a_byte_at_a_time_is_closed_on_its_first_deadline(strict_node: Node) -> None:
    """A byte every 0.3 s does not move the deadline on (web_min_body_bytes_per_s)."""
    held = attacks.drip_until_closed(_port(strict_node), attacks.SLOW_FORM, 0.3, 8)
    assert held < strict_node.settings.web_read_timeout_s + 1.0


def test_a_new_connection_closes_the_one_furthest_behind() -> None:
    limits = HttpLimits(read_timeout_s=10, min_body_rate=1000, max_connections=3, max_per_address=2)
    served = ("served", Progress("10.0.0.1", since=0, busy=True))
    waiting = ("waiting", Progress("10.0.0.2", since=50))
    on_time = ("on-time", Progress("10.0.0.3", since=90, body_bytes=20_000))  # 20 kB in 10 s: ahead
    dripping = ("dripping", Progress("10.0.0.3", since=40, body_bytes=100))  # 100 bytes in 60 s
    assert furthest_behind("10.0.0.9", [served, waiting], limits, now=100) == (True, None)  # room left
    assert furthest_behind("10.0.0.9", [served, waiting, on_time], limits, now=100) == (True, "waiting")
    assert furthest_behind("10.0.0.9", [served, waiting, dripping], limits, now=100) == (True, "dripping")
    # Its own address is full: one of that address's goes, even with room in all.
    assert furthest_behind("10.0.0.3", [on_time, dripping], limits, now=100) == (True, "dripping")
    # Nobody to close: every connection is being served or on time; the new one goes.
    assert furthest_behind(
        "10.0.0.9", [served, on_time, ("b", Progress("10.0.0.4", 0, busy=True))], limits, now=100
    ) == (False, None)
    assert body_deadline(dripping[1], limits) == 40 + 10 + 0.1


def test_the_guard_runs_only_on_the_uvicorn_it_was_written_for(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    limits = HttpLimits(read_timeout_s=10, min_body_rate=1000, max_connections=3, max_per_address=2)
    protocol, cap = choose_protocol(limits)  # the installed uvicorn: the one the guard was written for
    assert issubclass(protocol, H11Protocol) and protocol is not H11Protocol and cap is None
    monkeypatch.setattr(uvicorn, "__version__", "0.99.0")  # what unsupported_reason() reads
    with caplog.at_level("WARNING", logger="service.ops.server"):
        assert choose_protocol(limits) == ("h11", 3)  # uvicorn's own protocol, one plain cap
    assert "HTTP guard unavailable (uvicorn 0.99.0 is installed" in caplog.text


# --- routers of other stages, mounted by sonocase serve ----------------------------------------
@pytest.mark.integration
@pytest.mark.slow
def test_serve_mounts_stow_rs_behind_the_bearer_check(tmp_path: Path) -> None:
    """`sonocase serve` mounts the STOW-RS router (service/ingest) through ExtraRouter:
    a real ultrasound file POSTed to /studies is stored like a C-STORE; without the
    token it is refused, and a body announced over stow_max_request_mb gets 413."""
    settings = web_settings(tmp_path, workers=0, stow_max_request_mb=1)
    node = serve(settings, tmp_path / "node.log")
    try:
        path = Path(get_testdata_file("US1_UNCR.dcm", download=False))
        body = multipart([path.read_bytes()])
        url = f"http://127.0.0.1:{settings.http_port}"
        headers = {"Content-Type": MULTIPART, "Accept": "application/dicom+json"}
        conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
        conn.request("POST", "/studies", body=body, headers=headers)
        assert conn.getresponse().status == 401
        conn.close()
        conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
        conn.request("POST", "/studies", body=body, headers=headers | BEARER)
        response = conn.getresponse()
        assert response.status == 200, response.read()
        conn.close()
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert study_state(settings, ds.StudyInstanceUID) == StudyState.RECEIVING
        over = _raw(
            url,
            b"POST /studies HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nAuthorization: Bearer %s\r\n\r\n"
            % ((1 << 20) + 1, TOKEN.encode()),
        )
        assert over.startswith(b"HTTP/1.1 413")
    finally:
        assert node.stop() == 0


# --- roles ---------------------------------------------------------------------------------
#: The state-changing routes a reviewer may use: signing in and out, and verdicts.
REVIEWER_MAY = {
    ("POST", "/login"),
    ("POST", "/logout"),
    ("POST", "/review/{study_uid}"),
    ("POST", "/api/v1/studies/{study_uid}/verdicts"),
}


def _routes(app: FastAPI) -> set[tuple[str, str]]:
    """Every (method, path template) the app serves, included routers' too."""
    return {(method, str(route.path)) for route in iter_route_contexts(app.routes) for method in route.methods or ()}


@pytest.mark.integration
def test_a_reviewer_reads_what_the_admin_reads(whole_node: tuple[Node, FastAPI]) -> None:
    """Every page and API route that only reads answers a reviewer as it answers the
    admin; the status page shows a reviewer the failed studies but no Resend button."""
    node, app = whole_node
    reads = sorted((m, p) for m, p in _routes(app) if m in SAFE_METHODS)
    assert ("GET", "/status") in reads and ("GET", "/api/v1/studies/{study_uid}") in reads
    for method, path in reads:
        concrete = path.replace("{study_uid}", node.analysed)
        admin, reviewer = (web_request(node.url, concrete, method, headers=h)[0] for h in (BEARER, REVIEWER))
        assert reviewer == admin and reviewer not in (401, 403), (method, path, admin, reviewer)
    admin_page, reviewer_page = (web_request(node.url, "/status", headers=h)[2].decode() for h in (BEARER, REVIEWER))
    assert "class=resend" in admin_page and node.undelivered in admin_page
    assert "class=resend" not in reviewer_page and node.undelivered in reviewer_page


@pytest.mark.integration
def test_a_reviewer_is_refused_every_administrative_route(whole_node: tuple[Node, FastAPI]) -> None:
    """Every state-changing route of the node but sign-in, sign-out and verdicts (found
    by listing the app's routes, so a new one is covered) answers a reviewer 403, by
    Bearer and by a session with its CSRF token, and changes nothing; the admin's
    same requests are not refused."""
    node, app = whole_node
    changes = {(m, p) for m, p in _routes(app) if m not in SAFE_METHODS}
    assert changes >= REVIEWER_MAY
    administrative = sorted(changes - REVIEWER_MAY)
    assert {
        ("POST", "/api/v1/studies/{study_uid}/retry"),
        ("POST", "/status/studies/{study_uid}/resend"),
        ("POST", "/studies"),
        ("POST", "/studies/{study_uid}"),
    } <= set(administrative)
    cookie, csrf = login(node.url, REVIEW_TOKEN)
    for method, path in administrative:
        concrete = path.replace("{study_uid}", node.undelivered)
        for headers in (REVIEWER, {"Cookie": cookie, "X-CSRF-Token": csrf}):
            status, _, body = web_request(node.url, concrete, method, headers=headers, form={"csrf": csrf})
            assert status == 403 and b"reviewers may not" in body, (method, path, headers, body)
    assert [r.state for r in node.ledger.outbox(node.undelivered)] == [OutboxState.FAILED]
    for method, path in administrative:
        status, _, body = web_request(
            node.url, path.replace("{study_uid}", node.undelivered), method, headers=BEARER, form={}
        )
        assert b"reviewers may not" not in body and status != 401, (method, path, status)
    assert [r.state for r in node.ledger.outbox(node.undelivered)] == [OutboxState.PENDING]


@pytest.mark.integration
def test_a_reviewer_session_remembers_its_role_and_needs_its_csrf_token(node: Node) -> None:
    cookie, csrf = login(node.url, REVIEW_TOKEN)
    path = f"/api/v1/studies/{node.undelivered}/retry"
    status, doc = _json(node.url, path, "POST", headers={"Cookie": cookie})
    assert status == 403 and "CSRF" in doc["detail"]
    status, doc = _json(node.url, path, "POST", headers={"Cookie": cookie, "X-CSRF-Token": csrf})
    assert status == 403 and doc["detail"].startswith("reviewers may not")
    assert web_request(node.url, "/logout", "POST", headers={"Cookie": cookie}, form={"csrf": csrf})[0] == 303
    assert web_request(node.url, "/status", headers={"Cookie": cookie})[0] == 401


def test_a_review_token_needs_the_web_token_and_differs_from_it(tmp_path: Path) -> None:
    for name, overrides, refusal in (
        ("off", {"web_token": ""}, "WEB_REVIEW_TOKEN needs"),
        ("same", {"web_review_token": TOKEN}, "must differ"),
    ):
        (tmp_path / name).mkdir()
        with pytest.raises(SettingsError, match=refusal):
            web_settings(tmp_path / name, **overrides)
