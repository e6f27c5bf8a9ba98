"""``sonocase monitoring export FILE | performance``: the registry file, and how the
model does at this site, from the ledger."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from service.cli import settings_from
from service.ledger import open_ledger
from service.monitoring.registry import (
    Inference,
    inferences,
    site_performance,
    write_csv,
    write_jsonl,
    write_performance_csv,
)


@click.group()
def monitoring() -> None:
    """Post-market monitoring: registry export, real-world performance."""


def _load(ctx: click.Context) -> list[Inference]:
    settings = settings_from(ctx)
    ledger = open_ledger(settings, durable=False)
    try:
        return inferences(ledger)
    finally:
        ledger.close()


@monitoring.command("export")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def export(ctx: click.Context, out: Path) -> None:
    """Write one record per inference to OUT: JSON Lines (.jsonl) or CSV (.csv).
    No patient name, ID or birth date; the patient as a keyed hash at most."""
    if out.suffix not in (".jsonl", ".csv"):
        raise click.BadParameter("the file name must end in .jsonl or .csv", param_hint="OUT")
    found = _load(ctx)
    partial = out.with_name(out.name + ".part")
    with partial.open("w", newline="") as fh:
        (write_jsonl if out.suffix == ".jsonl" else write_csv)(found, fh)
    partial.replace(out)
    click.echo(f"{len(found)} records written to {out}")


@monitoring.command("performance")
@click.option("--positive", default="malignant", show_default=True, help="The class whose call is measured.")
@click.option("--csv", "as_csv", is_flag=True, help="Flat CSV rows instead of JSON.")
@click.pass_context
def performance_command(ctx: click.Context, positive: str, as_csv: bool) -> None:
    """Sensitivity, specificity, PPV, NPV, ROC AUC and ECE against outcomes, per month
    and per scanner, and Cohen's kappa against the radiologists, with 95 % intervals."""
    try:
        report = site_performance(_load(ctx), positive)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if as_csv:
        write_performance_csv(report, sys.stdout)
    else:
        json.dump(report, sys.stdout, indent=1)
        click.echo()
