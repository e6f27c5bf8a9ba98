"""Routing: which complete studies are analysed, and where their results go.

The setting ``routing_rules`` is a list of :class:`~service.settings.RoutingRule`.
When a study falls quiet, :class:`Router` reads what the rules look at (one header
per series, no pixels) and :func:`decide` applies them: the first rule that holds
and has an ``action`` decides whether the study is analysed, the first that holds
and has ``destinations`` where its results go. No rule: analysed, results to the
``destinations`` setting. The defaults make a breast node: a study that names the
breast is analysed, one that names another body part (an echocardiogram, a thyroid,
an obstetric scan ...) is stored and skipped, and one that names no body part is
analysed. The decision goes into the ledger with the study (``routing_rule``,
``routing_reason``: the attribute keywords that matched, never their values;
``destinations``), where ``sonocase status`` and the status page show it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from service.common.spool import instance_path
from service.ledger import InstanceRecord, Ledger, Routing
from service.settings import RoutingRule, Settings

LOG = logging.getLogger(__name__)

#: The calling AE title is not in the data set: the ledger has it per instance.
CALLING_AE = "calling AE title"
#: Where a study names its body part, besides the anatomic region codes.
BODY_PART_TEXTS = (
    "BodyPartExamined",
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "RequestedProcedureDescription",
    "PerformedProcedureStepDescription",
)
#: A rule's condition -> the attributes it is searched in.
CONDITIONS: dict[str, tuple[str, ...]] = {
    "body_part": (*BODY_PART_TEXTS, "AnatomicRegionSequence"),
    "modality": ("Modality",),
    "body_part_examined": ("BodyPartExamined",),
    "study_description": ("StudyDescription",),
    "series_description": ("SeriesDescription",),
    "protocol_name": ("ProtocolName",),
    "calling_ae": (CALLING_AE,),
    "anatomic_region": ("AnatomicRegionSequence",),
}
#: What is read from each series' first instance.
_TAGS = ["SpecificCharacterSet", "Modality", *BODY_PART_TEXTS, "AnatomicRegionSequence"]

#: attribute keyword -> the distinct values the study has for it.
StudyFacts = Mapping[str, frozenset[str]]


def facts_of(headers: Iterable[Dataset], calling_aes: Iterable[str] = (), modalities: Iterable[str] = ()) -> StudyFacts:
    """What the rules look at, from some of a study's headers and its ledger records."""
    found: dict[str, set[str]] = {CALLING_AE: set(calling_aes), "Modality": set(modalities)}
    for ds in headers:
        for keyword in ("Modality", *BODY_PART_TEXTS):
            value = ds.get(keyword)
            if value:
                found.setdefault(keyword, set()).add(str(value))
        for item in ds.get("AnatomicRegionSequence", []):
            for keyword in ("CodeValue", "CodeMeaning"):
                if item.get(keyword):
                    found.setdefault("AnatomicRegionSequence", set()).add(str(item.get(keyword)))
    return {keyword: frozenset(v for v in values if v.strip()) for keyword, values in found.items()}


def matches(rule: RoutingRule, facts: StudyFacts) -> list[str] | None:
    """The attribute keywords through which every condition of ``rule`` holds, or
    None when one does not."""
    matched: list[str] = []
    for condition, keywords in CONDITIONS.items():
        pattern = getattr(rule, condition)
        if pattern is None:
            continue
        regex = re.compile(pattern, re.IGNORECASE)
        hits = [k for k in keywords if any(regex.search(value) for value in facts.get(k, ()))]
        if not hits:
            return None
        matched += [k for k in hits if k not in matched]
    return matched


def decide(rules: Sequence[RoutingRule], facts: StudyFacts) -> Routing:
    """Apply the rules to a study (see the module's docstring)."""
    action: tuple[RoutingRule, list[str]] | None = None
    destinations: RoutingRule | None = None
    for rule in rules:
        wanted = (rule.action is not None and action is None) or (
            rule.destinations is not None and destinations is None
        )
        if not wanted:
            continue
        matched = matches(rule, facts)
        if matched is None:
            continue
        if rule.action is not None and action is None:
            action = (rule, matched)
        if rule.destinations is not None and destinations is None:
            destinations = rule
        if action is not None and destinations is not None:
            break
    reasons = []
    if action is not None:
        reasons.append(f"{action[0].action} by rule {action[0].name}: " + (", ".join(action[1]) or "every study"))
    if destinations is not None:
        reasons.append(f"destinations by rule {destinations.name}")
    return Routing(
        analyse=action is None or action[0].action == "analyse",
        rule=action[0].name if action is not None else None,
        reason="; ".join(reasons) or None,
        destinations=tuple(str(d) for d in destinations.destinations or ()) if destinations is not None else None,
    )


def _first_of_each_series(instances: Sequence[InstanceRecord]) -> list[InstanceRecord]:
    seen: dict[str, InstanceRecord] = {}
    for rec in instances:
        seen.setdefault(rec.series_uid, rec)
    return list(seen.values())


def read_headers(spool_dir: Path, instances: Sequence[InstanceRecord]) -> list[Dataset]:
    """The routing attributes of each series' first instance; an unreadable file is
    left out here (the analysis says why it cannot use it)."""
    headers: list[Dataset] = []
    for rec in _first_of_each_series(instances):
        path = instance_path(spool_dir, rec.study_uid, rec.sop_instance_uid)
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS))
        except (OSError, InvalidDicomError, ValueError, EOFError):
            continue
    return headers


@dataclass(frozen=True)
class Router:
    """The node's routing: the rules of its settings over its spool and ledger."""

    settings: Settings
    ledger: Ledger

    def route(self, study_uid: str) -> Routing:
        instances = self.ledger.instances(study_uid)
        facts = facts_of(
            read_headers(self.settings.spool_dir, instances),
            (r.calling_ae for r in instances),
            (r.modality for r in instances),
        )
        return decide(self.settings.routing_rules, facts)
