"""The registry export and the cases real-world performance is measured on.

One record per inference (a study's stored result), as registries of AI results
such as the American College of Radiology's Assess-AI collect them: the model
(name, version, file hash), its answer (class, calibrated probability, out of
domain), the radiologists' current verdict, the outcome, the scanner and the dates.
No patient name, ID or birth date ever: the patient only as the similar-case
index's keyed hash (HMAC-SHA256 under the site's own key, empty without an index),
the study as a hash of its UID and the model's, so re-exports can be de-duplicated
but the file names nobody.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import IO, Any

import numpy as np

from service.ledger import Ledger, OutcomeRow
from service.monitoring.classification import ECE_BINS, reliability_bins, roc_curve
from service.monitoring.performance import Case, Report, agreement, grouped, trends
from service.monitoring.verdicts import current, reader_class
from service.pipeline.analysis import decisive_frame
from service.results import StudyResult

FIELDS = (
    "record_id",
    "model_name",
    "model_version",
    "model_sha256",
    "result",
    "probability",
    "out_of_domain",
    "verdict",
    "verdict_class",
    "outcome",
    "outcome_date",
    "scanner_manufacturer",
    "scanner_model",
    "study_date",
    "analysed_at",
    "patient_key",
)
#: Which outcome of a study's several (one per lesion) speaks for the study.
_SEVERITY = {"stable": 0, "benign": 1, "malignant": 2}
#: The class an outcome stands for: stable at follow-up counts as benign (not malignant).
OUTCOME_CLASS = {"malignant": "malignant", "benign": "benign", "stable": "benign"}


def _study_outcomes(outcomes: Iterable[OutcomeRow]) -> dict[str, OutcomeRow]:
    """The most severe matched outcome per study."""
    chosen: dict[str, OutcomeRow] = {}
    for row in outcomes:
        study = row.matched_study_uid
        if study is not None and (study not in chosen or _SEVERITY[row.finding] > _SEVERITY[chosen[study].finding]):
            chosen[study] = row
    return chosen


def decisive_probabilities(result: StudyResult) -> dict[str, float] | None:
    """The calibrated class probabilities of the frame that decided the study's
    class (service.results.SUMMARY_RULE); None when no image was assessed."""
    for image in result.images:
        if image.sop_instance_uid == result.summary.decisive_sop_instance_uid:
            frame = decisive_frame(image.frames, list(image.frames[0].probabilities))
            return dict(frame.probabilities) if frame else None
    return None


@dataclass(frozen=True)
class Inference:
    """One registry record (FIELDS) and the decisive class probabilities behind it
    (None: not assessed), which performance needs and the registry does not."""

    record: dict[str, Any]
    probabilities: dict[str, float] | None


def inferences(ledger: Ledger) -> list[Inference]:
    """Every study's latest result as a registry record, oldest inference first."""
    outcomes = _study_outcomes(ledger.outcomes())
    verdicts = current(ledger.verdicts())
    out = []
    for row in ledger.latest_results():
        result = StudyResult.model_validate_json(row.result)
        outcome = outcomes.get(row.study_uid)
        verdict = verdicts.get((row.study_uid, ""))
        probabilities = decisive_probabilities(result)
        predicted = result.summary.predicted
        out.append(
            Inference(
                {
                    "record_id": hashlib.sha256(
                        f"{result.model.sha256}/{row.study_uid}/{row.generation}".encode()
                    ).hexdigest()[:24],
                    "model_name": result.model.name,
                    "model_version": result.model.version,
                    "model_sha256": result.model.sha256,
                    "result": predicted or ("not assessed" if result.summary.out_of_distribution else "none"),
                    "probability": probabilities[predicted] if probabilities and predicted else None,
                    "out_of_domain": result.summary.out_of_distribution,
                    "verdict": verdict.verdict if verdict else None,
                    "verdict_class": reader_class(verdict, predicted) if verdict else None,
                    "outcome": outcome.finding if outcome else None,
                    "outcome_date": (outcome.outcome_date if outcome else "") or None,
                    "scanner_manufacturer": result.study.manufacturer,
                    "scanner_model": result.study.model_name,
                    "study_date": result.study.study_date or None,
                    "analysed_at": datetime.fromtimestamp(row.created_at, UTC).isoformat(timespec="seconds"),
                    "patient_key": result.study.patient_key or None,
                },
                probabilities,
            )
        )
    return out


def cases(found_in: Iterable[Inference], classes: Sequence[str]) -> list[Case]:
    """The inferences whose truth is known and which the model assessed, as cases
    for service.monitoring.performance (month from the study date, else the
    analysis date)."""
    found = []
    for inference in found_in:
        entry, probabilities = inference.record, inference.probabilities
        if entry["outcome"] is None or probabilities is None:
            continue
        date = entry["study_date"] or entry["analysed_at"].replace("-", "")
        found.append(
            Case(
                probabilities=tuple(probabilities[c] for c in classes),
                truth=list(classes).index(OUTCOME_CLASS[entry["outcome"]]),
                month=f"{date[:4]}-{date[4:6]}",
                scanner=f"{entry['scanner_manufacturer']} {entry['scanner_model']}".strip() or "unknown",
            )
        )
    return found


def site_performance(found: Sequence[Inference], positive: str, seed: int = 0) -> dict[str, Any]:
    """Real-world performance of the ``positive`` call per month, per scanner and per
    scanner and month (``trends``, for the page's charts), Cohen's kappa against the
    radiologists' verdicts, the reliability diagram's points and the ROC curve of
    all cases, as JSON-ready data; bootstrap resamples from ``seed`` (same ledger, same
    intervals). ValueError when nothing was assessed or ``positive`` is no class."""
    assessed = [i for i in found if i.probabilities is not None]
    if not assessed:
        raise ValueError("no assessed study in the ledger yet")
    classes = list(assessed[0].probabilities or ())
    if positive not in classes:
        raise ValueError(f"{positive!r} is not one of the model's classes {classes}")
    rng = np.random.default_rng(seed)
    known = cases(found, classes)
    report = grouped(known, classes.index(positive), rng)
    rated = [(i.record["result"], i.record["verdict_class"]) for i in assessed if i.record["verdict_class"]]
    kappa = agreement(
        np.array([classes.index(m) for m, _ in rated], dtype=np.int64),
        np.array([classes.index(r) for _, r in rated], dtype=np.int64),
        len(classes),
        rng,
    )
    per_scanner_month = trends(known, classes.index(positive), rng)  # after kappa: its interval stays as it was
    probabilities = np.array([c.probabilities for c in known]).reshape(len(known), len(classes))
    truth = np.array([c.truth for c in known], dtype=np.int64)
    points = reliability_bins(probabilities, truth, ECE_BINS) if known else []
    actual = truth == classes.index(positive)
    fpr, tpr = (
        roc_curve(actual, probabilities[:, classes.index(positive)])
        if actual.any() and not actual.all()
        else (np.zeros(0), np.zeros(0))
    )
    return {
        "positive": positive,
        "performance": {kind: _as_json(groups) for kind, groups in report.items()},
        "agreement_with_radiologists": asdict(kappa),
        "trends": {scanner: _as_json(months) for scanner, months in per_scanner_month.items()},
        "reliability": [{"share": share, "confidence": conf, "accuracy": acc} for share, conf, acc in points],
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
    }


def _as_json(groups: Mapping[str, Report]) -> dict[str, dict[str, dict[str, Any]]]:
    """Named reports with their estimates as plain dicts, as JSON and CSV carry them."""
    return {name: {metric: asdict(e) for metric, e in metrics.items()} for name, metrics in groups.items()}


def performance_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """:func:`site_performance`'s figures as flat rows (group, name, metric, value,
    low, high, n): the CSV a spreadsheet reads. The trends are the group
    ``scanner_month``, named "<scanner> <YYYY-MM>"."""
    by_scanner_month = {
        f"{scanner} {month}": metrics
        for scanner, months in report["trends"].items()
        for month, metrics in months.items()
    }
    rows = [
        {"group": kind, "name": name, "metric": metric, **estimate}
        for kind, groups in {**report["performance"], "scanner_month": by_scanner_month}.items()
        for name, metrics in groups.items()
        for metric, estimate in metrics.items()
    ]
    rows.append(
        {"group": "all", "name": "all", "metric": "kappa_with_radiologists", **report["agreement_with_radiologists"]}
    )
    return rows


def write_performance_csv(report: Mapping[str, Any], out: IO[str]) -> None:
    writer = csv.DictWriter(out, fieldnames=("group", "name", "metric", "value", "low", "high", "n"))
    writer.writeheader()
    writer.writerows(performance_rows(report))


def write_jsonl(found: Iterable[Inference], out: IO[str]) -> None:
    for inference in found:
        out.write(json.dumps(inference.record) + "\n")


def write_csv(found: Iterable[Inference], out: IO[str]) -> None:
    writer = csv.DictWriter(out, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(inference.record for inference in found)
