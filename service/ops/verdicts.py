"""The verdicts API: ``POST`` and ``GET /api/v1/studies/{study_uid}/verdicts``.

A RIS or reporting system posts a radiologist's verdict on a study's result, or on
one image's: agree, disagree, or the corrected class, with an optional comment and
the reader's name (the role of the credential it came with is recorded beside
it). A changed verdict is posted again; every change is kept and
``GET`` returns the history, oldest first (the newest per finding counts). A router
of its own, mounted behind the node's Bearer check like STOW-RS
(service.ops.web.ExtraRouter), so the page and API code stays as it is.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from service.ledger import Ledger, Verdict
from service.monitoring.verdicts import problems
from service.ops.web import ApiAuth, StudyUid


class VerdictIn(BaseModel):
    """A verdict as a reporting system posts it."""

    model_config = ConfigDict(extra="forbid")

    verdict: Literal["agree", "disagree", "corrected"]
    corrected_class: str | None = Field(None, description="with 'corrected' only: the class the reader gives")
    finding: str = Field(
        "",
        max_length=64,
        pattern=r"^[0-9.]*$",
        description="SOP Instance UID of the image judged; empty: the study's result",
    )
    comment: str = Field("", max_length=2000)
    reader: str = Field(min_length=1, max_length=64, description="who gave the verdict")


class VerdictOut(BaseModel):
    verdict_id: int
    study_uid: str
    finding: str
    verdict: str
    corrected_class: str | None
    comment: str
    reader: str
    reader_role: str | None = Field(description="admin or reviewer: the token it came with; null before roles")
    recorded_at: float


def verdict_router(ledger: Ledger, prefix: str) -> APIRouter:
    """The routes, under ``prefix`` (the API's)."""
    router = APIRouter(prefix=prefix, tags=["verdicts"], responses={404: {"description": "Unknown study"}})

    def known(study_uid: str) -> None:
        if ledger.study(study_uid) is None:
            raise HTTPException(404, f"unknown study {study_uid}")

    @router.post(
        "/studies/{study_uid}/verdicts",
        status_code=201,
        summary="Give or change a verdict",
        responses={422: {"description": "Not a verdict this study's result can take"}},
    )
    def give(study_uid: StudyUid, body: VerdictIn, auth: ApiAuth) -> VerdictOut:
        known(study_uid)
        try:
            verdict = Verdict(
                study_uid=study_uid,
                finding=body.finding,
                verdict=body.verdict,
                corrected_class=body.corrected_class,
                comment=body.comment,
                reader=body.reader,
                reader_role=auth.role,
            )
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        refused = problems(verdict, ledger.result(study_uid))
        if refused:
            raise HTTPException(422, "; ".join(refused))
        return VerdictOut.model_validate(ledger.record_verdict(verdict), from_attributes=True)

    @router.get("/studies/{study_uid}/verdicts", summary="Every verdict on a study, oldest first")
    def history(study_uid: StudyUid) -> list[VerdictOut]:
        known(study_uid)
        return [VerdictOut.model_validate(row, from_attributes=True) for row in ledger.verdicts(study_uid)]

    return router
