"""Outcomes from a CSV file, as a pathology system or a spreadsheet exports them.

Columns (a header row; names as below, any order, extra columns ignored)::

    accession_number, study_instance_uid, outcome, laterality, clock_position, outcome_date

``outcome`` is ``benign`` or ``malignant`` (pathology) or ``stable`` (at follow-up);
``laterality`` L/R (or left/right); ``clock_position`` 1-12 (0: retroareolar, as
"12:00" or "12 o'clock" also reads); ``outcome_date`` YYYY-MM-DD or YYYYMMDD. Each
row needs an accession number or a Study Instance UID. A file is read whole before
anything is stored: a bad row is reported with its line number and nothing of the
file is imported; a file imported again (or a longer export holding its rows) adds
only the rows not stored yet.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass

from service.ledger import Outcome

COLUMNS = ("accession_number", "study_instance_uid", "outcome", "laterality", "clock_position", "outcome_date")
_LATERALITY = {"l": "L", "left": "L", "r": "R", "right": "R", "": ""}


@dataclass(frozen=True)
class CsvProblem:
    line: int
    message: str


def laterality(text: str) -> str:
    """``L``/``R`` from the ways a report writes it; ValueError otherwise."""
    try:
        return _LATERALITY[text.strip().lower()]
    except KeyError:
        raise ValueError(f"laterality {text!r} is not L, R, left or right") from None


def clock_position(text: str) -> str:
    """The hour of a clock-face position ("3", "3:00", "3 o'clock"), as 1-12 or 0."""
    match = re.fullmatch(r"\s*(\d{1,2})\s*(?::00|o'?clock|h)?\s*", text.lower())
    if not text.strip():
        return ""
    if not match or int(match[1]) > 12:
        raise ValueError(f"clock position {text!r} is not an hour 1-12 (0: retroareolar)")
    return str(int(match[1]))


def outcome_date(text: str) -> str:
    """YYYYMMDD from YYYY-MM-DD or YYYYMMDD (or the leading date of an HL7 time stamp)."""
    digits = text.strip().replace("-", "")[:8]
    if text.strip() and not re.fullmatch(r"\d{8}", digits):
        raise ValueError(f"date {text!r} is not YYYY-MM-DD or YYYYMMDD")
    return digits


def parse_csv(text: str) -> tuple[list[Outcome], list[CsvProblem]]:
    """The outcomes of a CSV file's text, or the problems of its rows (line numbers
    as an editor shows them). An outcome's reference is its content, so the same row
    in another file (a later, longer export) is stored once."""
    reader = csv.DictReader(io.StringIO(text))
    header = [name.strip().lower() for name in reader.fieldnames or ()]
    missing = [name for name in ("outcome",) if name not in header]
    if missing or not {"accession_number", "study_instance_uid"} & set(header):
        return [], [
            CsvProblem(
                1,
                f"the header must name outcome and accession_number or study_instance_uid "
                f"(columns: {', '.join(COLUMNS)})",
            )
        ]
    reader.fieldnames = header
    outcomes, problems = [], []
    for row in reader:
        line = reader.line_num
        value = {name: (row.get(name) or "").strip() for name in COLUMNS}
        try:
            outcomes.append(
                Outcome(
                    source="csv",
                    reference=f"{value['accession_number']}|{value['study_instance_uid']}|"
                    f"{value['laterality']}|{value['clock_position']}|{value['outcome']}|{value['outcome_date']}",
                    finding=value["outcome"].lower(),
                    accession_number=value["accession_number"],
                    study_uid=value["study_instance_uid"],
                    laterality=laterality(value["laterality"]),
                    clock_position=clock_position(value["clock_position"]),
                    outcome_date=outcome_date(value["outcome_date"]),
                )
            )
        except ValueError as exc:
            problems.append(CsvProblem(line, str(exc)))
    return outcomes, problems
