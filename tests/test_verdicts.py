"""Radiologists' verdicts through the JSON API (service.ops.verdicts) on a real HTTP
server over a real ledger: given, changed (every change kept), refused when they do
not fit the study's result, and what counts for agreement."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.ledger import Verdict
from service.monitoring.verdicts import current, reader_class
from service.ops.review import review_router
from service.ops.verdicts import verdict_router
from service.ops.web import API_PREFIX, ExtraRouter, build_web_server
from tests.support.chromium import Chromium
from tests.support.web import BEARER, REVIEW_TOKEN, REVIEWER, TOKEN, Node, login, populate, web_request, web_settings


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    settings = web_settings(tmp_path)
    ledger, analysed, undelivered, broken = populate(settings)
    router = ExtraRouter(verdict_router(ledger, API_PREFIX), settings.web_max_body_bytes, reviewers=True)
    server = build_web_server(settings, ledger, routers=[router], pages=[review_router(ledger)])
    server.start()
    yield Node(settings, ledger, analysed, undelivered, broken, f"http://127.0.0.1:{server.port}")
    server.stop()
    ledger.close()


def _post(node: Node, study_uid: str, body: dict[str, Any], headers: dict[str, str] = BEARER) -> tuple[int, Any]:
    """POST a JSON verdict as a reporting system would."""
    conn = http.client.HTTPConnection(node.url.removeprefix("http://"), timeout=10)
    try:
        conn.request(
            "POST",
            f"{API_PREFIX}/studies/{study_uid}/verdicts",
            body=json.dumps(body).encode(),
            headers={**headers, "Content-Type": "application/json"},
        )
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.mark.integration
def test_verdicts_are_given_changed_and_every_change_kept(node: Node) -> None:
    study = node.analysed
    result = node.ledger.result(study)
    assert result is not None
    image = result.images[0].sop_instance_uid
    status, first = _post(node, study, {"verdict": "agree", "reader": "Dr A"})
    assert status == 201 and (first["verdict"], first["finding"], first["reader"]) == ("agree", "", "Dr A")
    status, changed = _post(
        node,
        study,
        {"verdict": "corrected", "corrected_class": "benign", "reader": "Dr A", "comment": "fibroadenoma on the prior"},
    )
    assert status == 201 and changed["recorded_at"] >= first["recorded_at"]
    assert _post(node, study, {"verdict": "disagree", "finding": image, "reader": "Dr B"})[0] == 201
    status, _, body = web_request(node.url, f"{API_PREFIX}/studies/{study}/verdicts", headers=BEARER)
    history = json.loads(body)
    assert status == 200 and [v["verdict"] for v in history] == ["agree", "corrected", "disagree"]
    rows = node.ledger.verdicts(study)
    assert [v["verdict_id"] for v in history] == [v.verdict_id for v in rows]
    counts = current(rows)
    assert counts[(study, "")].corrected_class == "benign" and counts[(study, image)].reader == "Dr B"
    assert reader_class(counts[(study, "")], "malignant") == "benign"
    assert reader_class(counts[(study, image)], "malignant") is None
    assert reader_class(rows[0], "malignant") == "malignant"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"verdict": "corrected", "reader": "Dr A"}, "corrected class goes with"),
        ({"verdict": "agree", "corrected_class": "benign", "reader": "Dr A"}, "corrected class goes with"),
        ({"verdict": "corrected", "corrected_class": "cyst", "reader": "Dr A"}, "'cyst' is not one of"),
        ({"verdict": "agree", "finding": "1.2.3", "reader": "Dr A"}, "not an analysed image"),
        ({"verdict": "agree", "reader": " "}, "needs its reader"),
    ],
)
def test_a_verdict_that_does_not_fit_is_refused(node: Node, body: dict[str, Any], message: str) -> None:
    status, answer = _post(node, node.analysed, body)
    assert status == 422 and message in answer["detail"]
    assert node.ledger.verdicts() == []


@pytest.mark.integration
def test_verdicts_need_the_token_a_known_study_and_a_result(node: Node) -> None:
    assert _post(node, node.analysed, {"verdict": "agree", "reader": "Dr A"}, headers={})[0] == 401
    assert _post(node, "1.2.3.4", {"verdict": "agree", "reader": "Dr A"})[0] == 404
    status, answer = _post(node, node.broken, {"verdict": "agree", "reader": "Dr A"})  # analysis failed
    assert status == 422 and "no analysed image" in answer["detail"]
    assert _post(node, node.analysed, {"verdict": "maybe", "reader": "Dr A"})[0] == 422  # not in the schema


def test_verdict_validation_in_the_ledger_contract() -> None:
    with pytest.raises(ValueError, match="not one of"):
        Verdict("1.2", "", "unsure", None, "", "Dr A")
    with pytest.raises(ValueError, match="reader role"):
        Verdict("1.2", "", "agree", None, "", "Dr A", "radiologist")


@pytest.mark.integration
def test_a_radiologist_gives_and_changes_a_verdict_on_the_review_page(node: Node, tmp_path: Path) -> None:
    """In headless Chromium: sign in on the status page as a reviewer, follow the AI
    result to the review page, correct it, then agree with one image; the history
    keeps both, with the reviewer's role."""
    browser = Chromium(tmp_path / "chromium-profile")
    study = node.analysed
    try:
        browser.open(node.url + "/status")
        browser.wait_for("document.querySelector('input[name=token]') !== null")
        browser.evaluate(
            f"document.querySelector('input[name=token]').value = {json.dumps(REVIEW_TOKEN)};"
            "document.querySelector('form[action=\"/login\"]').submit()"
        )
        browser.wait_for("document.querySelector('table#studies') !== null")
        browser.evaluate(f"document.querySelector('#studies tr[data-study=\"{study}\"] .result a').click()")
        browser.wait_for("document.querySelector('form#verdict') !== null")
        assert browser.evaluate("document.querySelector('#summary').textContent") == "malignant 0.87"
        assert browser.wait_for("document.querySelector('img.heatmap').naturalWidth") > 0
        browser.evaluate(
            "const f = document.querySelector('form#verdict');"
            "f.querySelector('input[value=corrected]').checked = true;"
            "f.querySelector('select[name=corrected_class]').value = 'benign';"
            "f.querySelector('textarea[name=comment]').value = 'fibroadenoma, stable since 2024';"
            "f.querySelector('input[name=reader]').value = 'Dr C'; f.submit()"
        )
        browser.wait_for("location.search.includes('saved=1') && document.querySelector('#verdicts') !== null")
        browser.evaluate(
            "const g = document.querySelector('form#verdict');"
            "g.querySelector('select[name=finding]').selectedIndex = 1;"
            "g.querySelector('input[value=agree]').checked = true;"
            "g.querySelector('input[name=reader]').value = 'Dr C'; g.submit()"
        )
        browser.wait_for("document.querySelectorAll('#verdicts tr').length === 3")
        shown = browser.evaluate("Array.from(document.querySelectorAll('#verdicts .verdict')).map(c => c.textContent)")
        assert shown == ["corrected benign", "agree"]
        browser.screenshot(tmp_path / "review.png")
    finally:
        browser.close()
    history = node.ledger.verdicts(study)
    assert [(v.verdict, v.corrected_class, v.reader, v.reader_role, bool(v.finding)) for v in history] == [
        ("corrected", "benign", "Dr C", "reviewer", False),
        ("agree", None, "Dr C", "reviewer", True),
    ]


@pytest.mark.integration
def test_the_review_form_needs_its_session_s_csrf_token(node: Node) -> None:
    status, headers, _ = web_request(node.url, "/login", "POST", form={"token": TOKEN})
    cookie = headers["set-cookie"].split(";")[0]
    form = {"verdict": "agree", "reader": "Dr D", "csrf": "not-the-token"}
    status, _, body = web_request(node.url, f"/review/{node.analysed}", "POST", headers={"Cookie": cookie}, form=form)
    assert status == 403 and b"CSRF" in body
    assert node.ledger.verdicts() == []


@pytest.mark.integration
def test_verdicts_record_the_role_they_came_with(node: Node) -> None:
    """A reviewer gives verdicts by Bearer and from a session (with its CSRF token, as
    the admin's session needs); each verdict records its credential's role."""
    study = node.analysed
    assert _post(node, study, {"verdict": "agree", "reader": "Dr R"}, headers=REVIEWER)[1]["reader_role"] == "reviewer"
    assert _post(node, study, {"verdict": "disagree", "reader": "Dr A"})[1]["reader_role"] == "admin"
    cookie, csrf = login(node.url, REVIEW_TOKEN)
    status, answer = _post(node, study, {"verdict": "agree", "reader": "Dr S"}, headers={"Cookie": cookie})
    assert status == 403 and "CSRF" in answer["detail"]
    status, answer = _post(
        node, study, {"verdict": "agree", "reader": "Dr S"}, headers={"Cookie": cookie, "X-CSRF-Token": csrf}
    )
    assert status == 201 and answer["reader_role"] == "reviewer"
    form = {"verdict": "agree", "reader": "Dr T"}
    assert web_request(node.url, f"/review/{study}", "POST", headers={"Cookie": cookie}, form=form)[0] == 403
    status, _, _ = web_request(
        node.url, f"/review/{study}", "POST", headers={"Cookie": cookie}, form=form | {"csrf": csrf}
    )
    assert status == 303
    assert [(v.reader, v.reader_role) for v in node.ledger.verdicts(study)] == [
        ("Dr R", "reviewer"),
        ("Dr A", "admin"),
        ("Dr S", "reviewer"),
        ("Dr T", "reviewer"),
    ]
    page = web_request(node.url, f"/review/{study}", headers=REVIEWER)[2].decode()
    assert "Dr T (reviewer)" in page and "Dr A (admin)" in page
