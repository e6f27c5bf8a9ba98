"""The review view: a radiologist, signed in on the status page, sees a study's AI
result (per image: class, probability, not assessed; the heatmap) and the verdicts
given so far, and gives or changes one with a plain form (no script: the page's
Content-Security-Policy allows none), its session's CSRF token in the form.

``GET /review/{study_uid}`` and ``POST /review/{study_uid}``; the JSON API's
``/api/v1/studies/{uid}/verdicts`` (service.ops.verdicts) takes the same verdicts
from a reporting system. Page routes of their own, mounted beside the status page's.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response

from service.ledger import Ledger, Verdict
from service.monitoring.verdicts import problems
from service.ops.pages import render_review
from service.ops.web import CsrfField, PageAuth, StudyUid, csrf_problem


def review_router(ledger: Ledger) -> APIRouter:
    """The review page's routes, over ``ledger``."""
    router = APIRouter(include_in_schema=False)

    @router.get("/review/{study_uid}", response_class=HTMLResponse)
    def review(auth: PageAuth, study_uid: StudyUid, saved: str = "") -> Response:
        result = ledger.result(study_uid)
        if ledger.study(study_uid) is None or result is None:
            return PlainTextResponse(f"no analysed study {study_uid}\n", 404)
        csrf = auth.session.csrf if auth.session is not None else ""
        return HTMLResponse(render_review(study_uid, result, ledger.verdicts(study_uid), csrf, bool(saved)))

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
