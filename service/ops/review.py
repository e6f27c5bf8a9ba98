"""The review view: a radiologist, signed in on the status page, sees a study's AI
result (per image: class, probability, not assessed; the heatmap) and the verdicts
given so far, and gives or changes one with a plain form (no script: the page's
Content-Security-Policy allows none), its session's CSRF token in the form.

``GET /review/{study_uid}`` and ``POST /review/{study_uid}``; the JSON API's
``/api/v1/studies/{uid}/verdicts`` (service.ops.verdicts) takes the same verdicts
from a reporting system. Page routes of their own, mounted beside the status page's.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response

from service.ledger import VERDICTS, Ledger, Verdict, VerdictRow
from service.monitoring.verdicts import problems
from service.ops.views import _csrf_field, _page
from service.ops.web import CsrfField, PageAuth, StudyUid, csrf_problem


def _images_html(study_uid: str, result: Mapping[str, Any]) -> str:
    rows = []
    for image in result.get("images", []):
        if image.get("skipped"):
            shown = f"skipped: {image['skipped']}"
        elif image.get("out_of_distribution"):
            shown = "not assessed (outside the model's training domain)"
        else:
            shown = f"{image.get('predicted')} {image.get('probability') or 0:.2f}"
        rows.append(
            f"<tr><td><code>{html.escape(image['sop_instance_uid'])}</code></td>"
            f"<td class=result>{html.escape(shown)}</td></tr>"
        )
    summary = result.get("summary", {})
    answer = (
        f"{summary.get('predicted')} {summary.get('probability'):.2f}" if summary.get("predicted") else "not assessed"
    )
    return (
        f"<p>AI result (the SR's summary): <b id=summary>{html.escape(answer)}</b></p>"
        f"<img alt=heatmap class=heatmap src='/status/studies/{html.escape(study_uid)}/heatmap.png' width=160>"
        "<table id=images><tr><th>Image (SOP Instance UID)</th><th>AI result</th></tr>" + "".join(rows) + "</table>"
    )


def _role_html(role: str | None) -> str:
    """The role a verdict came with, after the reader's name; nothing for verdicts from before roles."""
    return f" ({html.escape(role)})" if role else ""


def _history_html(rows: Sequence[VerdictRow]) -> str:
    if not rows:
        return "<p>No verdict yet.</p>"
    return (
        "<table id=verdicts><tr><th>When (UTC)</th><th>Reader</th><th>Finding</th><th>Verdict</th>"
        "<th>Comment</th></tr>"
        + "".join(
            f"<tr><td>{datetime.fromtimestamp(r.recorded_at, UTC):%Y-%m-%d %H:%M:%S}</td>"
            f"<td>{html.escape(r.reader)}{_role_html(r.reader_role)}</td>"
            f"<td>{html.escape(r.finding or 'study')}</td>"
            f"<td class=verdict>{html.escape(r.verdict)}"
            f"{' ' + html.escape(r.corrected_class) if r.corrected_class else ''}</td>"
            f"<td>{html.escape(r.comment)}</td></tr>"
            for r in rows
        )
        + "</table>"
    )


def _form_html(study_uid: str, result: Mapping[str, Any], csrf: str) -> str:
    images = [i["sop_instance_uid"] for i in result.get("images", []) if i.get("frames")]
    classes = next((list(f["probabilities"]) for i in result.get("images", []) for f in i.get("frames", [])), [])
    findings = "".join(f"<option value='{html.escape(uid)}'>image {html.escape(uid)}</option>" for uid in images)
    choices = "".join(f"<label><input type=radio name=verdict value={v} required> {v}</label> " for v in VERDICTS)
    corrected = "".join(f"<option>{html.escape(c)}</option>" for c in classes)
    return (
        f"<form id=verdict method=post action='/review/{html.escape(study_uid)}'>{_csrf_field(csrf)}"
        f"<p><select name=finding><option value=''>the study</option>{findings}</select></p>"
        f"<p>{choices}</p><p>Corrected class (with 'corrected'): <select name=corrected_class>"
        f"<option value=''>-</option>{corrected}</select></p>"
        "<p><textarea name=comment rows=2 cols=60 maxlength=2000 placeholder=comment></textarea></p>"
        "<p>Reader: <input name=reader required maxlength=64></p>"
        "<button type=submit>Save verdict</button></form>"
    )


def review_router(ledger: Ledger) -> APIRouter:
    """The review page's routes, over ``ledger``."""
    router = APIRouter(include_in_schema=False)

    @router.get("/review/{study_uid}", response_class=HTMLResponse)
    def review(auth: PageAuth, study_uid: StudyUid, saved: str = "") -> Response:
        result = ledger.result(study_uid)
        if ledger.study(study_uid) is None or result is None:
            return PlainTextResponse(f"no analysed study {study_uid}\n", 404)
        csrf = auth.session.csrf if auth.session is not None else ""
        notice = "<p class=notice>Verdict saved.</p>" if saved else ""
        body = (
            f"{notice}<p>Study <code>{html.escape(study_uid)}</code> · <a href=/status>status</a></p>"
            + _images_html(study_uid, result)
            + "<h2>Verdicts</h2>"
            + _history_html(ledger.verdicts(study_uid))
            + "<h2>Your verdict</h2>"
            + _form_html(study_uid, result, csrf)
        )
        return HTMLResponse(_page("Sonocase review", body))

    @router.post("/review/{study_uid}")
    def give(
        request: Request,
        auth: PageAuth,
        study_uid: StudyUid,
        verdict: Annotated[str, Form()],
        reader: Annotated[str, Form()],
        csrf: CsrfField = "",
        finding: Annotated[str, Form()] = "",
        corrected_class: Annotated[str, Form()] = "",
        comment: Annotated[str, Form()] = "",
    ) -> Response:
        problem = csrf_problem(request, auth, csrf)
        if problem:
            return PlainTextResponse(f"{problem}\n", 403)
        if ledger.study(study_uid) is None:
            return PlainTextResponse(f"unknown study {study_uid}\n", 404)
        try:
            given = Verdict(
                study_uid=study_uid,
                finding=finding,
                verdict=verdict,
                corrected_class=(corrected_class or None) if verdict == "corrected" else None,
                comment=comment[:2000],
                reader=reader[:64],
                reader_role=auth.role,
            )
        except ValueError as exc:
            return PlainTextResponse(f"{exc}\n", 422)
        refused = problems(given, ledger.result(study_uid))
        if refused:
            return PlainTextResponse("; ".join(refused) + "\n", 422)
        ledger.record_verdict(given)
        return RedirectResponse(f"/review/{study_uid}?saved=1", 303)

    return router
