"""``sonocase outcomes import FILE.csv | list``: outcomes from a file, and what came back."""

from __future__ import annotations

import json
from pathlib import Path

import click

from service.cli import settings_from
from service.ledger import open_ledger
from service.outcomes.records import parse_csv

#: What ``list`` shows of an outcome (the HL7 message it came in stays in the ledger).
_SHOWN = (
    "outcome_id",
    "source",
    "accession_number",
    "study_uid",
    "finding",
    "laterality",
    "clock_position",
    "outcome_date",
    "matched_study_uid",
)


@click.group()
def outcomes() -> None:
    """Outcomes (pathology, follow-up) matched to the studies the model judged."""


@outcomes.command("import")
@click.argument("csv_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_context
def import_csv(ctx: click.Context, csv_file: Path) -> None:
    """Import outcomes from CSV_FILE (columns: accession_number, study_instance_uid,
    outcome, laterality, clock_position, outcome_date); a file with a bad row imports
    nothing. Prints how many were new and how many outcomes still wait for their study."""
    settings = settings_from(ctx)
    try:
        text = csv_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"cannot read {csv_file}: {exc}") from None
    parsed, problems = parse_csv(text)
    if problems:
        for problem in problems:
            click.echo(f"{csv_file}:{problem.line}: {problem.message}", err=True)
        raise click.ClickException(f"{len(problems)} bad rows in {csv_file}: nothing imported")
    ledger = open_ledger(settings)
    try:
        new = ledger.record_outcomes(parsed)
        unmatched = ledger.outcomes(unmatched=True)
    finally:
        ledger.close()
    click.echo(
        f"{sum(new)} new outcomes of {len(parsed)} rows ({len(parsed) - sum(new)} already there); "
        f"{len(unmatched)} outcomes wait for their study"
    )


@outcomes.command("list")
@click.option("--unmatched", is_flag=True, help="Only outcomes no study matched yet.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@click.pass_context
def list_outcomes(ctx: click.Context, unmatched: bool, as_json: bool) -> None:
    """List the outcomes received (CSV and HL7), oldest first."""
    settings = settings_from(ctx)
    ledger = open_ledger(settings, durable=False)
    try:
        rows = [{k: getattr(row, k) for k in _SHOWN} for row in ledger.outcomes(unmatched=unmatched)]
    finally:
        ledger.close()
    for row in rows:
        click.echo(json.dumps(row) if as_json else "  ".join(str(row[k] or "-") for k in _SHOWN[1:]))
