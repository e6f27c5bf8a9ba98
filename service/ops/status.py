"""``sonocase status``: what the ledger says about recent studies, or about one.

Reads the ledger only (never the spool), so it is safe beside a running node. The
ledger holds UIDs, states and times, not patient names or IDs, so neither can show.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import click

from service.cli import settings_from
from service.ledger import InstanceRecord, Ledger, OutboxRow, PurgeRow, StudyRow, StudyState, open_ledger
from service.results import NOT_ASSESSED, StudyResult

_TIME_COLUMNS = (
    "first_received",
    "last_received",
    "completed_at",
    "queued_at",
    "analysis_started",
    "lease_until",
    "analysed_at",
    "reported_at",
    "sent_at",
    "next_attempt_at",
    "updated_at",
)


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "-"


@dataclass(frozen=True, slots=True)
class StudySummary:
    """A study's row with how many instances it has."""

    study: StudyRow
    instances: int

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self.study), "instances": self.instances}


@dataclass(frozen=True, slots=True)
class StudyDetail:
    """Everything the ledger knows about one study."""

    study: StudyRow
    instances: list[InstanceRecord]
    result: StudyResult | None
    outbox: list[OutboxRow]
    removed: list[PurgeRow]

    def as_json(self) -> dict[str, Any]:
        return {
            "study": asdict(self.study),
            "instances": [asdict(i) for i in self.instances],
            "result": None if self.result is None else self.result.model_dump(mode="json"),
            "outbox": [asdict(o) for o in self.outbox],
            "removed": [asdict(p) for p in self.removed],
        }


def study_summaries(ledger: Ledger, limit: int, states: tuple[str, ...] = ()) -> list[StudySummary]:
    """The newest ``limit`` studies with their instance counts."""
    return [
        StudySummary(row, len(ledger.instances(row.study_uid))) for row in ledger.studies(states=states, limit=limit)
    ]


def study_detail(ledger: Ledger, study_uid: str) -> StudyDetail | None:
    """Everything the ledger knows about one study: state, instances, result, outbox."""
    study = ledger.study(study_uid)
    if study is None:
        return None
    return StudyDetail(
        study,
        ledger.instances(study_uid),
        ledger.result(study_uid),
        ledger.outbox(study_uid),
        ledger.purges(study_uid),
    )


def format_table(summaries: list[StudySummary]) -> str:
    """A fixed-width table of study summaries, newest first."""
    header = ("STUDY UID", "STATE", "INST", "FIRST RECEIVED", "LAST RECEIVED", "UPDATED", "RULE", "ERROR")
    lines = [
        (
            r.study_uid,
            r.state,
            str(summary.instances),
            _when(r.first_received),
            _when(r.last_received),
            _when(r.updated_at),
            r.routing_rule or "-",
            (f"{r.failed_stage}: " if r.failed_stage else "") + (r.error or ""),
        )
        for summary in summaries
        for r in (summary.study,)
    ]
    widths = [max([len(col), *(len(line[i]) for line in lines)]) for i, col in enumerate(header[:-1])]
    out = []
    for line in (header, *lines):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True)) + "  " + line[-1])
    return "\n".join(text.rstrip() for text in out)


def format_detail(detail: StudyDetail) -> str:
    """One study in readable form: each image not assessed named first, then the
    stored result as indented JSON."""
    study = detail.study
    lines = [f"study {study.study_uid}"]
    for key, value in asdict(study).items():
        if key == "study_uid" or value is None:
            continue
        lines.append(f"  {key:18s} {_when(value) if key in _TIME_COLUMNS else value}")
    lines.append(f"instances ({len(detail.instances)})")
    for inst in detail.instances:
        note = f"  ignored: {inst.ignored_reason}" if inst.ignored_reason else ""
        lines.append(
            f"  {inst.sop_instance_uid}  {inst.modality or '-'}  {inst.transfer_syntax}"
            f"  {inst.size} bytes  from {inst.calling_ae}{note}"
        )
    if detail.result is None:
        lines.append("result: none yet")
    else:
        lines.extend(
            f"image {image.sop_instance_uid}: {NOT_ASSESSED}"
            for image in detail.result.images
            if image.out_of_distribution
        )
        lines.append("result:")
        lines.extend("  " + line for line in json.dumps(detail.result.model_dump(mode="json"), indent=2).splitlines())
    lines.append(f"outbox ({len(detail.outbox)})")
    for row in detail.outbox:
        error = f"  {row.error}" if row.error else ""
        lines.append(
            f"  {row.sop_instance_uid} -> {row.destination}: {row.state} after {row.attempts} attempt(s){error}"
        )
    for purge in detail.removed:
        done = f"{purge.bytes} bytes" if purge.bytes is not None else "not finished"
        lines.append(
            f"removed {purge.kind} files of generation {purge.generation} at {_when(purge.purged_at)}"
            f" ({done}): {purge.reason}"
        )
    return "\n".join(lines)


@click.command()
@click.argument("study_uid", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--limit", type=click.IntRange(1, 100000), default=50, show_default=True, help="How many recent studies to list."
)
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice([s.value for s in StudyState]),
    help="List only studies in this state (repeatable).",
)
@click.pass_context
def status(ctx: click.Context, study_uid: str | None, as_json: bool, limit: int, states: tuple[str, ...]) -> None:
    """Show recent studies (state, instances, times, error), or STUDY_UID in detail
    with its stored result and outbox."""
    settings = settings_from(ctx)
    if not settings.ledger_url and not settings.ledger_path.is_file():
        raise click.ClickException(f"no ledger at {settings.ledger_path}: has the node run with this data_dir?")
    ledger = open_ledger(settings, durable=False)
    if not settings.destinations and not as_json:
        click.echo(f"no destination configured (SONOCASE_DESTINATIONS): results stay in {settings.outbox_dir}")
    try:
        if study_uid is None:
            rows = study_summaries(ledger, limit, states)
            click.echo(json.dumps([r.as_json() for r in rows], indent=2) if as_json else format_table(rows))
            return
        detail = study_detail(ledger, study_uid)
        if detail is None:
            raise click.ClickException(f"study {study_uid} is not in the ledger")
        click.echo(json.dumps(detail.as_json(), indent=2) if as_json else format_detail(detail))
    finally:
        ledger.close()
