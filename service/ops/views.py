"""What the status page and the JSON API show of a study, as pure functions: its
view (state, timings, result, outbox), the recent ones, the notice after a retry,
and the heatmap thumbnail.

:mod:`service.ops.web` puts them on the network; :mod:`service.ops.pages` renders
them as HTML. Studies are named by UID and accession number only; patient names
and IDs never reach a view.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, computed_field

from service.common.colour import jet
from service.delivery.recovery import RetryKind
from service.ledger import Ledger, OutboxState, StudyRow, StudyState
from service.ops.ledger_metrics import STAGES
from service.results import NOT_ASSESSED, StudyResult

logger = logging.getLogger(__name__)

#: Studies listed on the status page, newest change first.
PAGE_STUDIES = 50
THUMBNAIL_PX = 96


_RETRY_NOTICE = {
    RetryKind.ANALYSIS: "the analysis was queued again",
    RetryKind.REPORT: "its report was built again (see its state below)",
    RetryKind.RESULTS: "its results are being sent again (see its state below)",
}


# --- the status page's view of a study ------------------------------------------------
class StudyView(BaseModel):
    """What the status page and the JSON API show of one study: UIDs, accession,
    state, result (the heatmap's file stays inside; the API gives its URL)."""

    model_config = ConfigDict(frozen=True)

    study_uid: str
    accession: str
    state: str
    generation: int
    instances: int
    first_received: float
    timings: dict[str, float]
    result: str
    heatmap: Path | None = Field(exclude=True)
    failed_stage: str | None
    error: str | None
    routing_rule: str | None  # the rule that decided whether it is analysed (None: no rule matched)
    routing_reason: str | None  # which attributes matched (keywords, never values)
    outbox: dict[str, int]
    can_retry: bool

    @computed_field  # type: ignore[prop-decorator]  # pydantic's documented use
    @property
    def heatmap_url(self) -> str | None:
        return f"/status/studies/{self.study_uid}/heatmap.png" if self.heatmap else None


def _accession(path: str) -> str:
    """The Accession Number of a stored instance, read alone (no patient attribute)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["AccessionNumber"])
    except (OSError, pydicom.errors.InvalidDicomError):
        return ""
    return str(ds.get("AccessionNumber", "") or "")


def _result_text(result: StudyResult) -> str:
    """The study's answer in a few words, and how many images were not assessed."""
    summary = result.summary
    if summary.out_of_distribution:
        return NOT_ASSESSED
    if summary.predicted is None:
        return "no image analysed"
    probability = "" if summary.probability is None else f" {summary.probability:.2f}"
    flagged = sum(image.out_of_distribution for image in result.images)
    return f"{summary.predicted}{probability}" + (f"; {flagged} image(s) {NOT_ASSESSED}" if flagged else "")


def _decisive_heatmap(result: StudyResult, results_dir: Path) -> Path | None:
    """The heatmap of the image that decided the study, if it lies under results_dir;
    none for an image not assessed (a map there would pose as an explanation)."""
    images = sorted(result.images, key=lambda i: i.sop_instance_uid != result.summary.decisive_sop_instance_uid)
    for image in images:
        if image.frames and not image.out_of_distribution:
            path = Path(image.frames[0].heatmap_path).resolve()
            return path if path.is_relative_to(results_dir.resolve()) and path.is_file() else None
    return None


def study_view(ledger: Ledger, results_dir: Path, study: StudyRow) -> StudyView:
    """Build the page's view of one ledger row (reads the result and one file header)."""
    uid = study.study_uid
    instances = ledger.instances(uid)
    result_text, heatmap = "", None
    try:
        result = ledger.result(uid)
    except ValidationError:
        result_text = "stored result unreadable"
    else:
        if result is not None:
            result_text, heatmap = _result_text(result), _decisive_heatmap(result, results_dir)
    stamps = {stage: (getattr(study, start), getattr(study, end)) for stage, (start, end) in STAGES.items()}
    timings = {
        stage: ended - began
        for stage, (began, ended) in stamps.items()
        if began is not None and ended is not None and ended >= began
    }
    outbox: dict[str, int] = {}
    for row in ledger.outbox(uid):
        outbox[row.state] = outbox.get(row.state, 0) + 1
    return StudyView(
        study_uid=uid,
        accession=_accession(instances[0].path) if instances else "",
        state=study.state,
        generation=study.generation,
        instances=len(instances),
        first_received=study.first_received,
        timings=timings,
        result=result_text,
        heatmap=heatmap,
        failed_stage=study.failed_stage,
        error=study.error,
        routing_rule=study.routing_rule,
        routing_reason=study.routing_reason,
        outbox=outbox,
        can_retry=study.state == StudyState.FAILED or outbox.get(OutboxState.FAILED, 0) > 0,
    )


def recent_views(ledger: Ledger, results_dir: Path, limit: int = PAGE_STUDIES) -> list[StudyView]:
    """Recent studies, newest change first, plus failed ones that dropped off the recent list."""
    rows = {s.study_uid: s for s in ledger.studies((StudyState.FAILED,), limit=limit)}
    rows.update({s.study_uid: s for s in ledger.studies(limit=limit)})
    ordered = sorted(rows.values(), key=lambda row: -row.updated_at)
    return [study_view(ledger, results_dir, s) for s in ordered]


def retry_notice(outcome: str, study_uid: str) -> str:
    """The page's sentence after a retry ('' for anything it did not send itself)."""
    if outcome not in set(RetryKind) or not re.fullmatch(r"[0-9.]{1,64}", study_uid):
        return ""
    return f"Study {study_uid}: {_RETRY_NOTICE[RetryKind(outcome)]}."


def study_heatmap_png(ledger: Ledger, results_dir: Path, study_uid: str) -> bytes | None:
    """The thumbnail of the heatmap that decided the study; None when there is none."""
    try:
        result = ledger.result(study_uid)
    except ValidationError:
        return None
    path = None if result is None else _decisive_heatmap(result, results_dir)
    if path is None:
        return None
    try:
        return heatmap_png(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as exc:
        logger.warning("heatmap %s unreadable: %s", path, exc, extra={"study_uid": study_uid})
        return None


def heatmap_png(heatmap: np.ndarray, size: int = THUMBNAIL_PX) -> bytes:
    """A colour thumbnail of a [0, 1] Grad-CAM map, in the heatmap SC's colours."""
    image = Image.fromarray(jet(np.nan_to_num(heatmap.astype(np.float32))), "RGB")
    image.thumbnail((size, size), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
