"""Recovery: what a person asks for when a study failed or its results must go out again.

One policy for every door (``sonocase resend``, the status page's button, the JSON
API): a failed analysis is queued again, a failed report is built again, and a
study with results has them queued for every destination again. Errors are domain
errors (:class:`UnknownStudy`, :class:`NothingToRetry`) that each door turns into
its own answer (an exit status, an HTTP status).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum

import click
from pydicom import dcmread

from service.cli import settings_from
from service.ledger import Ledger, StudyRow, StudyState, open_ledger
from service.reports.build import DEFAULT_SR_CLASS, build_reports, outbox_folder
from service.reports.sr import SR_CLASSES
from service.settings import Settings

LOG = logging.getLogger(__name__)


class UnknownStudy(LookupError):
    """The ledger has no such study."""


class NothingToRetry(ValueError):
    """The study has not failed and has no results to send (yet)."""


class RetryKind(StrEnum):
    """What a retry did."""

    ANALYSIS = "analysis"
    REPORT = "report"
    RESULTS = "results"


@dataclass(frozen=True)
class Retried:
    """A retry's outcome: what was done, and a sentence for people."""

    kind: RetryKind
    message: str


def retry_study(settings: Settings, ledger: Ledger, study_uid: str) -> Retried:
    """Give a study another go (see the module's docstring for what that means).

    Raises :class:`UnknownStudy` or :class:`NothingToRetry`.
    """
    study = ledger.study(study_uid)
    if study is None:
        raise UnknownStudy(f"unknown study {study_uid}")
    state, stage = study.state, study.failed_stage
    if state == StudyState.FAILED and stage not in ("report", "send"):
        ledger.transition(study_uid, StudyState.COMPLETE, study.generation)
        LOG.info("analysis queued again after failure", extra={"study_uid": study_uid})
        return Retried(RetryKind.ANALYSIS, "the analysis was queued again")
    if state == StudyState.FAILED and stage == "report":
        paths = build_reports(settings, ledger, study_uid)
        if not paths:
            again = ledger.study(study_uid)
            raise NothingToRetry(f"the report failed again: {again.error if again else 'the study is gone'}")
        LOG.info("reported again after failure", extra={"study_uid": study_uid})
        return Retried(
            RetryKind.REPORT, f"reported again: {len(paths)} object(s) written" + _destination_note(settings)
        )
    if state == StudyState.SKIPPED:
        raise NothingToRetry(f"study {study_uid} is not analysed ({study.routing_reason}): it has no results")
    if state not in (StudyState.REPORTED, StudyState.SENT, StudyState.FAILED):
        raise NothingToRetry(f"study {study_uid} is {state}: it has no results to send")
    generation = study.generation
    gone = [p for p in ledger.purges(study_uid) if p.kind == "outbox" and p.generation == generation]
    if gone:
        raise NothingToRetry(
            f"study {study_uid} was sent, and its result objects were removed by retention ({gone[0].reason})"
        )
    queued = _queue_outbox_files(settings, ledger, study, generation)
    due = ledger.reset_outbox(study_uid)
    if state == StudyState.FAILED:
        ledger.transition(study_uid, StudyState.REPORTED, generation, sources=(StudyState.FAILED,))
    LOG.info("results queued again: %d object(s) due", due, extra={"study_uid": study_uid})
    if not settings.destinations:
        where = outbox_folder(settings, study_uid, generation)
        return Retried(RetryKind.RESULTS, f"no destination configured: {queued} object(s) stay in {where}")
    return Retried(
        RetryKind.RESULTS,
        f"{due} object(s) due for sending now; the node's sender delivers them" + _destination_note(settings),
    )


def _queue_outbox_files(settings: Settings, ledger: Ledger, study: StudyRow, generation: int) -> int:
    """Queue the generation's objects for configured destinations that have none of
    them yet (destinations added after the study was reported); return how many
    objects the generation has. SRs rebuilt for another destination are not queued:
    a new destination gets the default class and falls back by itself."""
    study_uid = study.study_uid
    items = []
    for path in sorted(outbox_folder(settings, study_uid, generation).glob("*.dcm")):
        header = dcmread(path, stop_before_pixels=True)
        if header.SOPClassUID in SR_CLASSES and header.SOPClassUID != DEFAULT_SR_CLASS:
            continue
        items.append((header.SOPInstanceUID, header.SOPClassUID, str(path)))
    served = {r.destination for r in ledger.outbox(study_uid) if r.generation == generation}
    new = [d for d in study.destinations_or([str(d) for d in settings.destinations]) if d not in served]
    if new:
        ledger.enqueue_outbox(study_uid, generation, items, new)
    return len(items)


def _destination_note(settings: Settings) -> str:
    if not settings.destinations:
        return f" (no destination configured: they stay in {settings.outbox_dir})"
    return " to " + ", ".join(str(d) for d in settings.destinations)


@click.command()
@click.argument("study_uid")
@click.pass_context
def resend(ctx: click.Context, study_uid: str) -> None:
    """Give a failed study another go, or send a study's results again.

    A failed analysis is queued again, a failed report is built again; otherwise
    unaccepted objects become due at once for the running node's sender (objects
    already accepted are not sent again).
    """
    settings = settings_from(ctx)
    ledger = open_ledger(settings)
    try:
        click.echo(retry_study(settings, ledger, study_uid).message)
    except (UnknownStudy, NothingToRetry) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        ledger.close()
