"""The monitoring page and its data: ``GET /monitoring`` (HTML, signed in as for the
status page, or with the Bearer token), ``GET /api/v1/monitoring/performance`` (JSON)
and ``.../performance.csv``.

Shows each scanner's input drift (the alarm first), the real-world performance of
the malignant call per month and per scanner with 95 % intervals, the agreement
with radiologists, the reliability diagram, the ROC curve and, per metric, each
scanner's months, drawn on the server as inline SVG (no script: the page's
Content-Security-Policy allows none). A router of its own, mounted like STOW-RS
behind the node's credential check (service.ops.web.ExtraRouter).
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from markupsafe import Markup

from service.ledger import Ledger
from service.monitoring.drift import WindowDrift
from service.monitoring.registry import inferences, site_performance, write_performance_csv
from service.monitoring.watcher import DriftWatcher
from service.ops.pages import interval_text, render

POSITIVE = "malignant"
_METRICS = ("sensitivity", "specificity", "ppv", "npv", "roc_auc", "ece")
_SVG = 240


def _svg(attributes: str, width: int, height: int, label: str) -> str:
    """An inline chart's opening tag: its size, and the role and name a screen reader announces."""
    return (
        f"<svg {attributes} width={width} height={height} viewBox='0 0 {width} {height}' role=img "
        f"aria-label='{html.escape(label)}'>"
    )


def reliability_svg(points: Sequence[Mapping[str, float]]) -> str:
    """Accuracy against confidence per bin (dot area: share of cases), the diagonal
    where a calibrated model lies."""
    side = _SVG - 30  # the plot's square, 20 px in from the left and bottom
    dots = "".join(
        f"<circle class=bin cx={20 + p['confidence'] * side:.1f} cy={_SVG - 20 - p['accuracy'] * side:.1f}"
        f" r={2 + 10 * p['share'] ** 0.5:.1f} />"
        for p in points
    )
    return (
        _svg("id=reliability", _SVG, _SVG, "reliability diagram")
        + "<rect x=20 y=10 width=210 height=210 fill=none stroke=#999 />"
        f"<line x1=20 y1=220 x2=230 y2=10 stroke=#999 stroke-dasharray=3 />"
        "<text x=110 y=236 font-size=11>confidence</text>"
        "<text x=2 y=120 font-size=11 transform='rotate(-90 10 120)'>accuracy</text>"
        f"<g fill=#2a6fb0>{dots}</g></svg>"
    )


def roc_svg(roc: Mapping[str, Sequence[float]]) -> str:
    """True- against false-positive rate of the positive call, the chance diagonal."""
    side = _SVG - 30
    line = " ".join(
        f"{20 + x * side:.1f},{_SVG - 20 - y * side:.1f}" for x, y in zip(roc["fpr"], roc["tpr"], strict=True)
    )
    return (
        _svg("id=roc", _SVG, _SVG, "ROC curve") + "<rect x=20 y=10 width=210 height=210 fill=none stroke=#999 />"
        "<line x1=20 y1=220 x2=230 y2=10 stroke=#999 stroke-dasharray=3 />"
        "<text x=70 y=236 font-size=11>false-positive rate</text>"
        "<text x=2 y=150 font-size=11 transform='rotate(-90 10 150)'>true-positive rate</text>"
        f"<polyline points='{line}' fill=none stroke=#b03a2e stroke-width=2 /></svg>"
    )


#: The trend charts' layout (px): the room each month takes (a chart is at least four
#: months wide), the plot's height, the margins for the title, the y ticks and the
#: months; one colour per scanner (repeating past six).
_TREND = {"month": 52, "height": 120, "left": 34, "top": 20, "bottom": 22}
_COLOURS = ("#2a6fb0", "#b03a2e", "#1e8449", "#7d3c98", "#b9770e", "#566573")


def trend_svg(metric: str, trends: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]]) -> str:
    """``metric`` per month (x, in order) for each scanner (``{scanner: {month:
    {metric: estimate}}}``): a dot at the estimate, a bar over its 95 % interval, the
    scanners side by side within a month, so a scanner that slips shows as it happens."""
    label = metric.replace("_", " ").upper()
    points = {
        scanner: {month: m[metric] for month, m in months.items() if m[metric]["value"] is not None}
        for scanner, months in trends.items()
    }
    months = sorted({month for shown in points.values() for month in shown})
    t = _TREND
    step = t["month"]
    plot_width = step * max(len(months), 4)
    width, height = t["left"] + plot_width + 10, t["top"] + t["height"] + t["bottom"] + 14 * len(points)
    head = _svg(f"class=trend data-metric='{html.escape(metric)}'", width, height, f"{label} per month and scanner")
    title = f"<text x={t['left']} y={t['top'] - 6} font-size=11>{html.escape(label)}</text>"
    if not months:
        return f"{head}{title}<text x={t['left']} y={t['top'] + 20} font-size=12>no outcomes yet</text></svg>"

    def y(value: float) -> str:
        return f"{t['top'] + (1 - value) * t['height']:.1f}"

    spread = min(8.0, step / (len(points) + 1))  # the scanners' offsets within a month
    ticks = "".join(f"<text x=4 y={y(v)} font-size=10 dominant-baseline=middle>{v:.1f}</text>" for v in (0.0, 0.5, 1.0))
    month_labels = "".join(
        f"<text class=month x={t['left'] + (i + 0.5) * step} y={t['top'] + t['height'] + 14}"
        f" font-size=10 text-anchor=middle>{html.escape(month)}</text>"
        for i, month in enumerate(months)
    )
    series = []
    for j, (scanner, shown) in enumerate(points.items()):
        colour = _COLOURS[j % len(_COLOURS)]
        marks = []
        for month, e in shown.items():
            x = f"{t['left'] + (months.index(month) + 0.5) * step + (j - (len(points) - 1) / 2) * spread:.1f}"
            if e["low"] is not None and e["high"] is not None:
                marks.append(f"<line class=interval x1={x} x2={x} y1={y(e['low'])} y2={y(e['high'])} />")
            marks.append(
                f"<circle class=point data-month='{html.escape(month)}' cx={x} cy={y(e['value'])} r=3>"
                f"<title>{html.escape(f'{scanner} {month}: {interval_text(e)}')}</title></circle>"
            )
        legend_y = t["top"] + t["height"] + t["bottom"] + 14 * j + 8
        series.append(
            f"<g class=series data-scanner='{html.escape(scanner)}' stroke={colour} fill={colour}>"
            + "".join(marks)
            + f"<text x={t['left']} y={legend_y} font-size=11 stroke=none>"
            f"{html.escape(scanner)}</text></g>"
        )
    return (
        f"{head}{title}"
        f"<rect x={t['left']} y={t['top']} width={plot_width} height={t['height']} fill=none stroke=#999 />"
        f"{ticks}{month_labels}{''.join(series)}</svg>"
    )


def render_monitoring(
    drift: Mapping[str, tuple[int, WindowDrift | None]], classes: Sequence[str], report: Mapping[str, Any] | None
) -> bytes:
    """The page: each scanner's input drift, then the performance tables and charts
    (``report`` None: no assessed study with an outcome yet)."""
    charts = (
        {
            "reliability": Markup(reliability_svg(report["reliability"])),
            "roc": Markup(roc_svg(report["roc"])),
            "trends": [Markup(trend_svg(metric, report["trends"])) for metric in _METRICS],
        }
        if report
        else {}
    )
    return render("monitoring.html", drift=drift, classes=classes, report=report, metrics=_METRICS, charts=charts)


def monitoring_router(ledger: Ledger, watcher: DriftWatcher, api_prefix: str) -> APIRouter:
    """The page and the performance data, from ``ledger`` and ``watcher``."""
    router = APIRouter(tags=["monitoring"])

    def report() -> dict[str, Any] | None:
        try:
            return site_performance(inferences(ledger), POSITIVE)
        except ValueError:  # nothing assessed yet
            return None

    @router.get("/monitoring", include_in_schema=False)
    async def page() -> HTMLResponse:
        drift = await run_in_threadpool(watcher.latest)
        figures = await run_in_threadpool(report)
        return HTMLResponse(render_monitoring(drift, watcher.classes, figures))

    @router.get(f"{api_prefix}/monitoring/performance", summary="Real-world performance and agreement (JSON)")
    def performance_json() -> JSONResponse:
        figures = report()
        if figures is None:
            raise HTTPException(404, "no assessed study yet")
        return JSONResponse(figures)

    @router.get(f"{api_prefix}/monitoring/performance.csv", summary="Real-world performance as CSV rows")
    def performance_csv() -> Response:
        figures = report()
        if figures is None:
            raise HTTPException(404, "no assessed study yet")
        out = io.StringIO()
        write_performance_csv(figures, out)
        return Response(out.getvalue(), media_type="text/csv")

    return router
