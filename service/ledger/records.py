"""What callers hand the ledger (routing decisions, outcomes, verdicts) and the
retention view it answers with; each validated when made."""

from __future__ import annotations

import re
from dataclasses import dataclass

#: The kinds of files a study has under data_dir, each with its own retention.
FILE_KINDS = ("spool", "results", "outbox")
#: What an outcome may say (service.outcomes): pathology, or stable at follow-up.
FINDINGS = ("benign", "malignant", "stable")
#: What a radiologist may say of a result (service.monitoring.verdicts).
VERDICTS = ("agree", "disagree", "corrected")
#: The roles a verdict's credential may have (service.ops.sessions.Role).
READER_ROLES = ("admin", "reviewer")


@dataclass(frozen=True, slots=True)
class Routing:
    """What the routing rules decided for a study when it became complete: analyse
    it or not, the rule that decided (None: none matched), which attributes matched
    (keywords, never values), and where its results go (None: the ``destinations``
    setting)."""

    analyse: bool = True
    rule: str | None = None
    reason: str | None = None
    destinations: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class PurgeCandidate:
    """A done study whose files of some kinds are still there."""

    study_uid: str
    generation: int
    state: str
    done_at: float
    kinds: tuple[str, ...]  # kinds not removed yet, in FILE_KINDS order
    spool_bytes: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """What turned out to be true for a study, as a CSV row or an HL7 message said.

    The study is named by ``accession_number`` and/or ``study_uid`` (at least one);
    ``reference`` is unique within ``source`` (file name and row, HL7 message
    control ID and observation), so receiving it again adds nothing. Empty strings
    stand for what was not given."""

    source: str
    reference: str
    finding: str  # one of FINDINGS
    accession_number: str = ""
    study_uid: str = ""
    laterality: str = ""  # L or R
    clock_position: str = ""  # 1..12, or 0 for retroareolar
    outcome_date: str = ""  # YYYYMMDD

    def __post_init__(self) -> None:
        if self.finding not in FINDINGS:
            raise ValueError(f"outcome {self.finding!r} is not one of {', '.join(FINDINGS)}")
        if not (self.accession_number or self.study_uid):
            raise ValueError("an outcome needs an accession number or a Study Instance UID")
        if self.laterality not in ("", "L", "R"):
            raise ValueError(f"laterality {self.laterality!r} is not L or R")
        if self.clock_position and self.clock_position not in {str(h) for h in range(13)}:
            raise ValueError(f"clock position {self.clock_position!r} is not 1..12 (0: retroareolar)")
        if self.outcome_date and not re.fullmatch(r"\d{8}", self.outcome_date):
            raise ValueError(f"outcome date {self.outcome_date!r} is not YYYYMMDD")


@dataclass(frozen=True, slots=True)
class Verdict:
    """A radiologist's verdict on a study's result (``finding`` empty) or on one
    image's (its SOP Instance UID): agree, disagree, or the corrected class;
    ``reader_role`` the role of the credential it came with (None: not known)."""

    study_uid: str
    finding: str
    verdict: str  # one of VERDICTS
    corrected_class: str | None
    comment: str
    reader: str
    reader_role: str | None = None  # one of READER_ROLES

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {', '.join(VERDICTS)}")
        if (self.verdict == "corrected") != (self.corrected_class is not None):
            raise ValueError("a corrected class goes with the verdict 'corrected', and only with it")
        if not self.reader.strip():
            raise ValueError("a verdict needs its reader")
        if self.reader_role is not None and self.reader_role not in READER_ROLES:
            raise ValueError(f"reader role {self.reader_role!r} is not one of {', '.join(READER_ROLES)}")
