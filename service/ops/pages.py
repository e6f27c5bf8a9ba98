"""The HTML pages, written as Jinja2 templates (``service/ops/templates/``, autoescaped:
a value shown on a page is never markup) and rendered through Starlette's
:class:`~starlette.templating.Jinja2Templates`.

Each ``render_*`` is a pure function, data in, the page's bytes out; the routes in
:mod:`service.ops.web`, :mod:`service.ops.review` and :mod:`service.ops.monitoring_page`
gather the data. Studies are named by UID and accession number only; patient names
and IDs never reach a page.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
from starlette.templating import Jinja2Templates

from service.ledger import VERDICTS, StudyState, VerdictRow
from service.model_card import DISCLAIMER
from service.ops.views import THUMBNAIL_PX, StudyView
from service.results import ImageResult, StudyResult


def _utc(ts: float, fmt: str = "%Y-%m-%d %H:%M:%SZ") -> str:
    """A ledger time stamp (Unix seconds) as UTC text."""
    return time.strftime(fmt, time.gmtime(ts))


def interval_text(estimate: Mapping[str, Any]) -> str:
    """An estimate and its interval as plain text (a table cell, a chart point's tooltip)."""
    if estimate["value"] is None:
        return "-"
    interval = (
        f" [{estimate['low']:.2f}-{estimate['high']:.2f}]"
        if estimate["low"] is not None and estimate["high"] is not None
        else ""
    )
    return f"{estimate['value']:.2f}{interval}"


def _zip(first: Sequence[Any], second: Sequence[Any]) -> list[tuple[Any, Any]]:
    """Pairs of two sequences of the same length (a ValueError where they differ)."""
    return list(zip(first, second, strict=True))


TEMPLATES = Jinja2Templates(
    env=jinja2.Environment(
        loader=jinja2.PackageLoader("service.ops"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,  # a misspelt name fails the page's test, not silently blank
    )
)
TEMPLATES.env.filters.update(utc=_utc, interval=interval_text, percent="{:.0%}".format, zip=_zip)


def render(name: str, **context: Any) -> bytes:
    """The template ``name`` with ``context``, as the response body."""
    return TEMPLATES.get_template(name).render(**context).encode()


def login_page(message: str = "") -> bytes:
    """The sign-in form, with why the last try failed (if it did)."""
    return render("login.html", message=message)


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
    return render(
        "status.html",
        disclaimer=DISCLAIMER,
        notice=notice,
        drifting=drifting,
        counts=[(state.value, counts.get(state, 0)) for state in StudyState],
        csrf=csrf,
        failed=[view for view in views if view.can_retry],
        views=views,
        admin=admin,
        skipped=StudyState.SKIPPED.value,
        thumbnail_px=THUMBNAIL_PX,
    )


def _image_text(image: ImageResult) -> str:
    """One image's AI result in a few words."""
    if image.skipped:
        return f"skipped: {image.skipped}"
    if image.out_of_distribution:
        return "not assessed (outside the model's training domain)"
    return f"{image.predicted} {image.probability or 0:.2f}"


def render_review(study_uid: str, result: StudyResult, verdicts: Sequence[VerdictRow], csrf: str, saved: bool) -> bytes:
    """The review page of an analysed study: its AI result per image, the verdicts
    given so far, and the form for one more."""
    images, summary = result.images, result.summary
    return render(
        "review.html",
        study_uid=study_uid,
        saved=saved,
        answer=f"{summary.predicted} {summary.probability:.2f}" if summary.predicted else "not assessed",
        images=[(image.sop_instance_uid, _image_text(image)) for image in images],
        verdicts=verdicts,
        csrf=csrf,
        findings=[image.sop_instance_uid for image in images if image.frames],
        verdict_choices=VERDICTS,
        classes=next((list(f.probabilities) for i in images for f in i.frames), []),
    )
