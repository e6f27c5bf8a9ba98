"""What the HTTP side shows, as pure functions: readiness checks, the model and index
probes, a study's view, the heatmap thumbnail and the status page's HTML.

:mod:`service.ops.web` puts them on the network. Studies are named by UID and
accession number only; patient names and IDs never reach a view.
"""

from __future__ import annotations

import html
import io
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from kombu import Connection
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, computed_field

from service.common.metrics import STAGES
from service.common.spool import free_disk_mb
from service.delivery.recovery import RetryKind
from service.ledger import Ledger, OutboxState, StudyRow, StudyState
from service.model_card import DISCLAIMER, ModelCard
from service.results import NOT_ASSESSED, StudyResult
from service.similar.index import SimilarCaseIndex

logger = logging.getLogger(__name__)

#: Studies listed on the status page, newest change first.
PAGE_STUDIES = 50
THUMBNAIL_PX = 96


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


def readiness(checks: Mapping[str, Check]) -> tuple[bool, dict[str, Any]]:
    """Run every check: ready when all pass; the document ``/readyz`` answers."""
    results = {name: check() for name, check in checks.items()}
    ready = all(r.ok for r in results.values())
    return ready, {"ready": ready, "checks": {n: {"ok": r.ok, "detail": r.detail} for n, r in results.items()}}


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
                False,
                f"the index holds embeddings of model {bound.name} {bound.version}, not of the"
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
    stored = ledger.result(uid)
    result_text, heatmap = "", None
    if stored is not None:
        try:
            result = StudyResult.model_validate(stored)
        except ValidationError:
            result_text = "stored result unreadable"
        else:
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
    stored = ledger.result(study_uid)
    if stored is None:
        return None
    try:
        path = _decisive_heatmap(StudyResult.model_validate(stored), results_dir)
    except ValidationError:
        return None
    if path is None:
        return None
    try:
        return heatmap_png(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as exc:
        logger.warning("heatmap %s unreadable: %s", path, exc, extra={"study_uid": study_uid})
        return None


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


def _csrf_field(csrf: str) -> str:
    return f"<input type=hidden name=csrf value='{html.escape(csrf)}'>"


def _page(title: str, body: str) -> bytes:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{body}</body></html>"
    ).encode()


def login_page(message: str = "") -> bytes:
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


def _review_link(uid: str, result: str) -> str:
    """The AI result, linked to the study's review page (service.ops.review) once there is one."""
    return f"<a href='/review/{uid}'>{html.escape(result)}</a>" if result else ""


def _row_html(view: StudyView) -> str:
    uid = html.escape(view.study_uid)
    thumb = (
        f"<img alt='heatmap' class=heatmap src='{html.escape(view.heatmap_url)}' width={THUMBNAIL_PX}>"
        if view.heatmap_url
        else ""
    )
    outbox = ", ".join(f"{n} {html.escape(s)}" for s, n in sorted(view.outbox.items()))
    again = f" (analysis {view.generation})" if view.generation > 1 else ""  # re-opened by a late instance
    if view.state == StudyState.SKIPPED:  # not analysed: say which routing rule decided
        again += f" by rule {view.routing_rule}"
    return (
        f"<tr data-study='{uid}'><td><code>{uid}</code></td><td>{html.escape(view.accession)}</td>"
        f"<td class='state {html.escape(view.state)}'>{html.escape(view.state)}{again}</td>"
        f"<td>{view.instances}</td><td>{_utc(view.first_received)}</td>"
        f"<td>{_timings_html(view.timings)}</td><td class=result>{_review_link(uid, view.result)}</td>"
        f"<td>{thumb}</td><td>{outbox}</td></tr>"
    )


def _failed_html(view: StudyView, csrf: str, admin: bool) -> str:
    uid = html.escape(view.study_uid)
    resend = (
        f"<form method=post action='/status/studies/{uid}/resend'>{_csrf_field(csrf)}"
        "<button type=submit class=resend>Resend</button></form>"
        if admin
        else ""
    )
    return (
        f"<tr data-study='{uid}'><td><code>{uid}</code></td><td>{html.escape(view.accession)}</td>"
        f"<td>{html.escape(view.failed_stage or 'delivery')}</td>"
        f"<td class=failed>{html.escape(view.error or 'result objects not accepted by the destination')}</td>"
        f"<td>{resend}</td></tr>"
    )


def render_status(
    views: list[StudyView],
    counts: Mapping[str, int],
    csrf: str,
    notice: str = "",
    drifting: Sequence[str] = (),
    admin: bool = True,
) -> bytes:
    """The status page: the scanners whose input drifted (service.monitoring.drift),
    counts per state, failed studies with a resend button (for an ``admin``: a
    reviewer's would be refused), recent studies."""
    summary = " · ".join(f"{html.escape(s.value)}: {counts.get(s, 0)}" for s in StudyState)
    failed = [v for v in views if v.can_retry]
    parts = [
        f"<p class=disclaimer>{html.escape(DISCLAIMER)}</p>",
        f"<p class=notice>{html.escape(notice)}</p>" if notice else "",
        "".join(
            f"<p class='failed drift-alarm'>Input drift on scanner {html.escape(s)}: its images no longer look "
            "like its first studies (a probe, preset or software change?). See <a href=/monitoring>monitoring"
            "</a>.</p>"
            for s in drifting
        ),
        f"<p>Studies by state: {summary}</p>",
        f"<form method=post action=/logout>{_csrf_field(csrf)}<button type=submit>Sign out</button></form>",
        "<h2>Failed</h2>",
    ]
    if failed:
        parts.append(
            "<table id=failed><tr><th>Study UID</th><th>Accession</th><th>Stage</th><th>Reason</th><th></th></tr>"
            + "".join(_failed_html(v, csrf, admin) for v in failed)
            + "</table>"
        )
    else:
        parts.append("<p>None.</p>")
    parts.append(
        "<h2>Recent studies</h2><table id=studies><tr><th>Study UID</th><th>Accession</th><th>State</th>"
        "<th>Instances</th><th>First received</th><th>Timings</th><th>AI result</th><th>Heatmap</th>"
        "<th>Outbox</th></tr>" + "".join(_row_html(v) for v in views) + "</table>"
    )
    return _page("Sonocase status", "".join(parts))
