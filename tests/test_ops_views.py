"""The status page's views, probes and page as pure functions, no server: a real ledger (SQLite)
holding a study analysed from a real ultrasound file, one whose delivery failed and
one whose analysis failed for good. ``tests/test_web.py`` drives the same views over
HTTP in the integration tier."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from service.ledger import Ledger
from service.ops.pages import render_status
from service.ops.probes import CheckResult, disk_check, ledger_check, readiness
from service.ops.views import THUMBNAIL_PX, recent_views, retry_notice, study_heatmap_png
from service.settings import Settings
from tests.support.web import ACCESSION, PATIENT_NAME, populate, web_settings


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Settings, Ledger, str, str, str]]:
    settings = web_settings(tmp_path)
    ledger, analysed, undelivered, broken = populate(settings)
    yield settings, ledger, analysed, undelivered, broken
    ledger.close()


def test_each_study_has_its_view_and_the_page_no_patient_name(site: tuple[Settings, Ledger, str, str, str]) -> None:
    settings, ledger, analysed, undelivered, broken = site
    views = {view.study_uid: view for view in recent_views(ledger, settings.results_dir)}
    assert set(views) == {analysed, undelivered, broken}
    assert views[analysed].accession == ACCESSION and views[analysed].heatmap_url is not None
    assert "malignant" in views[analysed].result and not views[analysed].can_retry
    assert views[undelivered].can_retry and views[undelivered].failed_stage == "send"
    assert views[broken].can_retry and views[broken].heatmap_url is None
    page = render_status(list(views.values()), ledger.count_by_state(), "form-token-1").decode()
    assert ACCESSION in page and "form-token-1" in page and PATIENT_NAME not in page
    reviewer_page = render_status(list(views.values()), ledger.count_by_state(), "form-token-1", admin=False).decode()
    assert reviewer_page.count("<form") < page.count("<form")  # no resend buttons for a reviewer


def test_the_deciding_heatmap_is_a_thumbnail_red_where_high_blue_where_low(
    site: tuple[Settings, Ledger, str, str, str],
) -> None:
    settings, ledger, analysed, _, broken = site
    png = study_heatmap_png(ledger, settings.results_dir, analysed)
    assert png is not None and study_heatmap_png(ledger, settings.results_dir, broken) is None
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert max(image.size) <= THUMBNAIL_PX
    centre = image.getpixel((image.width // 2, image.height // 2))
    corner = image.getpixel((0, 0))
    assert centre[0] > centre[2] and corner[2] > corner[0]  # the Gaussian peaks in the middle


def test_readiness_is_every_check_and_names_the_failing_one(site: tuple[Settings, Ledger, str, str, str]) -> None:
    settings, ledger, *_ = site
    ready, document = readiness({"disk": disk_check(settings.data_dir, 0), "ledger": ledger_check(ledger)})
    assert ready and document["checks"]["ledger"] == {"ok": True, "detail": "3 studies"}
    ready, document = readiness(
        {"disk": disk_check(settings.data_dir, 10**12), "broker": lambda: CheckResult(True, "reachable")}
    )
    assert not ready and not document["checks"]["disk"]["ok"] and document["checks"]["broker"]["ok"]
    assert "watermark" in document["checks"]["disk"]["detail"]


@pytest.mark.parametrize(
    ("outcome", "study_uid", "notice"),
    [
        ("analysis", "1.2.3", "Study 1.2.3: the analysis was queued again."),
        ("results", "1.2.3", "Study 1.2.3: its results are being sent again (see its state below)."),
        ("shutdown", "1.2.3", ""),  # not an outcome the page sends itself
        ("analysis", "<script>alert(1)</script>", ""),  # a UID is digits and dots only
    ],
)
def test_a_retry_notice_only_for_what_the_page_sent(outcome: str, study_uid: str, notice: str) -> None:
    assert retry_notice(outcome, study_uid) == notice
