"""The monitoring page's server-drawn charts (service.ops.monitoring_page): where the
per-month points and their interval bars land, the months' order, the empty chart,
escaping of what a scanner's header may hold, and attributes as a browser reads them."""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any

import pytest

from service.ops.monitoring_page import _TREND, reliability_svg, roc_svg, trend_svg


class _Elements(HTMLParser):
    """The chart's elements as (tag, attributes, text inside) in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str | None], str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, dict(attrs), ""))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, dict(attrs), ""))

    def handle_data(self, data: str) -> None:
        if self.found:
            tag, attrs, text = self.found[-1]
            self.found[-1] = (tag, attrs, text + data)


def _parse(svg: str) -> list[tuple[str, dict[str, str | None], str]]:
    parser = _Elements()
    parser.feed(svg)
    return parser.found


def _est(value: float | None, low: float | None = None, high: float | None = None, n: int = 10) -> dict[str, Any]:
    return {"value": value, "low": low, "high": high, "n": n}


def _y(value: float) -> float:
    return _TREND["top"] + (1 - value) * _TREND["height"]


def test_points_and_interval_bars_sit_at_their_values_months_in_order() -> None:
    trends = {
        "ACME Sono 1": {
            "2026-12": {"sensitivity": _est(0.5, 0.25, 0.75)},
            "2026-10": {"sensitivity": _est(1.0, 0.6, 1.0)},
        }
    }
    elements = _parse(trend_svg("sensitivity", trends))
    months = [text for tag, a, text in elements if tag == "text" and a.get("class") == "month"]
    assert months == ["2026-10", "2026-12"]
    points = {a["data-month"]: a for tag, a, _ in elements if tag == "circle"}
    bars = [a for tag, a, _ in elements if tag == "line" and a.get("class") == "interval"]
    step = _TREND["month"]
    assert float(points["2026-10"]["cx"] or "") == pytest.approx(_TREND["left"] + 0.5 * step, abs=0.05)
    assert float(points["2026-12"]["cx"] or "") == pytest.approx(_TREND["left"] + 1.5 * step, abs=0.05)
    assert float(points["2026-12"]["cy"] or "") == pytest.approx(_y(0.5), abs=0.05)
    assert float(points["2026-10"]["cy"] or "") == pytest.approx(_y(1.0), abs=0.05)
    spans = sorted((float(b["x1"] or ""), float(b["y1"] or ""), float(b["y2"] or "")) for b in bars)
    assert spans == [
        pytest.approx((_TREND["left"] + 0.5 * step, _y(0.6), _y(1.0)), abs=0.05),
        pytest.approx((_TREND["left"] + 1.5 * step, _y(0.25), _y(0.75)), abs=0.05),
    ]


def test_scanners_sit_side_by_side_in_a_month_and_missing_values_are_left_out() -> None:
    trends = {
        "A": {"2026-11": {"specificity": _est(0.9, 0.8, 0.95)}},
        "B": {"2026-11": {"specificity": _est(0.7, 0.5, 0.85)}, "2026-12": {"specificity": _est(None, n=0)}},
        "C": {"2026-11": {"specificity": _est(0.8)}},
    }  # no interval: a point without a bar
    elements = _parse(trend_svg("specificity", trends))
    assert [text for tag, a, text in elements if tag == "text" and a.get("class") == "month"] == ["2026-11"]
    xs = [float(a["cx"] or "") for tag, a, _ in elements if tag == "circle"]
    centre = _TREND["left"] + 0.5 * _TREND["month"]
    assert len(xs) == 3 and xs[0] < xs[1] < xs[2] and xs[1] == pytest.approx(centre, abs=0.05)
    assert xs[0] + xs[2] == pytest.approx(2 * centre, abs=0.1)
    assert sum(1 for tag, a, _ in elements if tag == "line" and a.get("class") == "interval") == 2
    assert [a["data-scanner"] for tag, a, _ in elements if tag == "g"] == ["A", "B", "C"]


def test_a_chart_without_outcomes_says_so() -> None:
    for trends in ({}, {"A": {"2026-11": {"roc_auc": _est(None, n=3)}}}):
        svg = trend_svg("roc_auc", trends)
        elements = _parse(svg)
        assert elements[0][0] == "svg" and elements[0][1]["role"] == "img"
        assert elements[0][1]["aria-label"] == "ROC AUC per month and scanner"
        assert "no outcomes yet" in svg and "ROC AUC</text>" in svg and "<circle" not in svg


def test_scanner_names_are_escaped() -> None:
    name = "<ACME & 'Co'> Sono"
    svg = trend_svg("ppv", {name: {"2026-11": {"ppv": _est(0.5, 0.2, 0.8)}}})
    assert "<ACME" not in svg and "'Co'" not in svg
    elements = _parse(svg)
    assert [a["data-scanner"] for tag, a, _ in elements if tag == "g"] == [name]
    assert any(tag == "text" and text == name for tag, _, text in elements)  # the legend
    assert any(tag == "title" and text.startswith(f"{name} 2026-11: 0.50 [0.20-0.80]") for tag, _, text in elements)


def test_attribute_values_read_as_written() -> None:
    """An unquoted value runs into a following ``/>`` in HTML (``r=3/>`` is r="3/",
    which an SVG renderer drops): each chart's values must come out clean."""
    charts = (
        reliability_svg([{"share": 0.5, "confidence": 0.7, "accuracy": 0.6}]),
        roc_svg({"fpr": [0.0, 0.5, 1.0], "tpr": [0.0, 0.8, 1.0]}),
        trend_svg("npv", {"A": {"2026-11": {"npv": _est(0.9, 0.7, 0.97)}}}),
    )
    for chart in charts:
        values = [v for _, attrs, _ in _parse(chart) for v in attrs.values()]
        assert values and not any(v is None or v.endswith("/") for v in values)
