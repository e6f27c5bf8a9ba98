"""``sonocase monitoring export FILE | performance``: the registry file, and how the
model does at this site, from the ledger."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import click
import numpy as np

from service.cli import settings_from
from service.ledger import open_ledger
from service.monitoring.performance import agreement, grouped
from service.monitoring.registry import Inference, cases, inferences, write_csv, write_jsonl

#: Bootstrap resamples are drawn from this seed: the same ledger, the same intervals.
SEED = 0


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
@click.pass_context
def performance_command(ctx: click.Context, positive: str) -> None:
    """Sensitivity, specificity, PPV, NPV, ROC AUC and ECE against outcomes, per month
    and per scanner, and Cohen's kappa against the radiologists, with 95 % intervals (JSON)."""
    found = _load(ctx)
    assessed = [i for i in found if i.probabilities is not None]
    if not assessed:
        raise click.ClickException("no assessed study in the ledger yet")
    classes = list(assessed[0].probabilities or ())
    if positive not in classes:
        raise click.BadParameter(f"{positive!r} is not one of the model's classes {classes}", param_hint="--positive")
    rng = np.random.default_rng(SEED)
    report = grouped(cases(found, classes), classes.index(positive), rng)
    rated = [(i.record["result"], i.record["verdict_class"]) for i in assessed if i.record["verdict_class"]]
    kappa = agreement(np.array([classes.index(m) for m, _ in rated], dtype=np.int64),
                      np.array([classes.index(r) for _, r in rated], dtype=np.int64), len(classes), rng)
    json.dump({"positive": positive, "performance": {kind: {name: {metric: asdict(e) for metric, e in metrics.items()}
                                                            for name, metrics in groups.items()}
                                                     for kind, groups in report.items()},
               "agreement_with_radiologists": asdict(kappa)}, sys.stdout, indent=1)
    click.echo()
