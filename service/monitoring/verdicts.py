"""Radiologists' verdicts on the model's results: which are allowed, which counts.

A verdict is given on a study's result (finding empty) or on one analysed image's
(its SOP Instance UID); changing it adds a verdict, and the newest counts
(:func:`current`). For agreement (service.monitoring.performance.agreement) a
reader who agrees gives the model's class, one who corrects gives the corrected
class, and a bare "disagree" names no class, so it is left out of kappa.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from service.ledger import Verdict, VerdictRow
from service.results import StudyResult


def problems(verdict: Verdict, result: StudyResult | None) -> list[str]:
    """Why ``verdict`` cannot be taken for a study whose stored result is ``result``
    (None: not analysed yet); empty when it can. The classes are the model's, as its
    probabilities in the result name them."""
    frames = [(image.sop_instance_uid, frame) for image in (result.images if result else []) for frame in image.frames]
    if not frames:
        return ["the study has no analysed image yet: there is nothing to agree or disagree with"]
    found = []
    images = {uid for uid, _ in frames}
    classes: Sequence[str] = list(frames[0][1].probabilities)
    if verdict.finding and verdict.finding not in images:
        found.append(f"finding {verdict.finding!r} is not an analysed image of this study")
    if verdict.corrected_class is not None and verdict.corrected_class not in classes:
        found.append(f"corrected class {verdict.corrected_class!r} is not one of {', '.join(classes)}")
    return found


def current(rows: Iterable[VerdictRow]) -> dict[tuple[str, str], VerdictRow]:
    """The verdict that counts per (study, finding): the newest of the history."""
    return {(row.study_uid, row.finding): row for row in sorted(rows, key=lambda r: r.verdict_id)}


def reader_class(row: VerdictRow, model_class: str | None) -> str | None:
    """The class the reader gives: the model's when agreeing, the corrected one when
    correcting, none for a bare disagreement."""
    if row.verdict == "agree":
        return model_class
    return row.corrected_class if row.verdict == "corrected" else None
