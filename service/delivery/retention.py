"""Retention: the files of delivered studies go, oldest first; nothing else ever does.

A study's files are of three kinds, each kept for its own number of days after the
study was done (settings ``retention_spool_days``, ``retention_results_days``,
``retention_outbox_days``): the received instances (``spool/<study>/``), the
heatmaps of its analyses (``results/<study>/<generation>/``) and its result objects
(``outbox/<study>/<generation>/``). Done means sent (every result object accepted by
every destination) or skipped by a routing rule. When the data disk's free space
falls below ``purge_when_free_below_mb``, the done studies' files of every kind go,
the longest done first, until ``purge_until_free_mb`` is free, so the receiver never
refuses a study (A700) because of what the node itself keeps.

Never removed: anything of a study still receiving, waiting, being analysed,
reported but not yet accepted, or failed (a person may resend it), and the
similar-case index (its own copies of reference images, taken before a study's
report is built: service.pipeline.tasks). A re-opened study is a new generation:
its files wait for that generation to be done.

Each removal is claimed in the ledger first (``purges``: study, generation, kind,
reason), then the files go, then the bytes removed are recorded; a removal a crash
interrupted is finished when the node starts. ``sonocase purge --dry-run`` shows
what would go now and why.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import click

from service.cli import settings_from
from service.common.loop import PollingLoop
from service.common.spool import free_disk_mb
from service.ledger import FILE_KINDS, Ledger, PurgeCandidate, open_ledger
from service.settings import Settings

LOG = logging.getLogger(__name__)

#: How often the free disk space is looked at (a statvfs call).
DISK_CHECK_S = 1.0
#: How often studies are checked for their age.
AGE_CHECK_S = 60.0
DAY_S = 86400.0


@dataclass(frozen=True)
class Removal:
    """Files of one kind of one done study that are to go, and why."""

    study_uid: str
    generation: int
    kind: str
    reason: str
    done_at: float


def kept_days(settings: Settings, kind: str) -> float:
    return float(getattr(settings, f"retention_{kind}_days"))


def due_by_age(settings: Settings, candidates: Iterable[PurgeCandidate], now: float) -> list[Removal]:
    """The kinds of files each done study has kept for their retention period."""
    return [
        Removal(c.study_uid, c.generation, kind, f"kept {kept_days(settings, kind):g} days after done", c.done_at)
        for c in candidates
        for kind in c.kinds
        if now - c.done_at >= kept_days(settings, kind) * DAY_S
    ]


def for_space(candidates: Iterable[PurgeCandidate]) -> Iterator[list[Removal]]:
    """Every kind of files of each done study, the longest done first, study by study."""
    for c in candidates:
        yield [Removal(c.study_uid, c.generation, kind, "free disk below the watermark", c.done_at) for kind in c.kinds]


def _folder(settings: Settings, kind: str, study_uid: str) -> Path:
    return {"spool": settings.spool_dir, "results": settings.results_dir, "outbox": settings.outbox_dir}[
        kind
    ] / study_uid


def _unlink(path: Path) -> int:
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it is not there)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _remove_tree(path: Path) -> int:
    size = tree_bytes(path)
    shutil.rmtree(path, ignore_errors=True)
    return size


def _remove_files(settings: Settings, kind: str, study_uid: str, generation: int, spool_files: list[str]) -> int:
    """Remove what a claimed removal names; return the bytes it freed. The spool:
    the files the ledger lists (an instance that arrived since is not among them);
    results and outbox: the folders of generations up to the claimed one."""
    folder = _folder(settings, kind, study_uid)
    if kind == "spool":
        removed = sum(_unlink(Path(path)) for path in spool_files)
    else:
        generations = (
            [p for p in folder.iterdir() if p.name.isdigit() and int(p.name) <= generation] if folder.is_dir() else []
        )
        removed = sum(_remove_tree(p) for p in generations)
    with contextlib.suppress(OSError):  # only once empty: a folder still in use keeps its files
        folder.rmdir()
    return removed


def remove(settings: Settings, ledger: Ledger, removal: Removal, now: float | None = None) -> int | None:
    """Claim and carry out one removal; the bytes freed, or None when the study was
    not done any more (re-opened) or the files were claimed by another process."""
    spool_files = ledger.claim_purge(removal.study_uid, removal.generation, removal.kind, removal.reason, now)
    if spool_files is None:
        return None
    removed = _remove_files(settings, removal.kind, removal.study_uid, removal.generation, spool_files)
    ledger.finish_purge(removal.study_uid, removal.generation, removal.kind, removed)
    LOG.info(
        "removed the study's %s files of generation %d (%d bytes): %s",
        removal.kind,
        removal.generation,
        removed,
        removal.reason,
        extra={"study_uid": removal.study_uid},
    )
    return removed


def finish_interrupted(settings: Settings, ledger: Ledger) -> int:
    """Carry out removals that were claimed but not finished (the process died)."""
    rows = ledger.unfinished_purges()
    for row in rows:
        files = ledger.purge_paths(row["study_uid"], row["purged_at"]) if row["kind"] == "spool" else []
        removed = _remove_files(settings, row["kind"], row["study_uid"], row["generation"], files)
        ledger.finish_purge(row["study_uid"], row["generation"], row["kind"], removed)
    if rows:
        LOG.info("finished %d removals an earlier process had begun", len(rows))
    return len(rows)


def purge(settings: Settings, ledger: Ledger, now: float | None = None) -> dict[str, int]:
    """One round: what is due by age, then, below the free-space watermark, the
    longest done studies until enough is free. Returns bytes removed per kind."""
    now = time.time() if now is None else now
    removed = dict.fromkeys(FILE_KINDS, 0)
    candidates = ledger.purge_candidates()
    for removal in due_by_age(settings, candidates, now):
        removed[removal.kind] += remove(settings, ledger, removal, now) or 0
    if settings.purge_when_free_below_mb and free_disk_mb(settings.data_dir) < settings.purge_when_free_below_mb:
        for study in for_space(ledger.purge_candidates()):
            if free_disk_mb(settings.data_dir) >= settings.purge_until_free_mb:
                break
            for removal in study:
                removed[removal.kind] += remove(settings, ledger, removal, now) or 0
    return removed


def plan(settings: Settings, ledger: Ledger, now: float | None = None) -> list[tuple[Removal, int]]:
    """What :func:`purge` would remove now, with the bytes of each (measured on disk)."""
    now = time.time() if now is None else now
    candidates = ledger.purge_candidates()
    planned = {(r.study_uid, r.kind): r for r in due_by_age(settings, candidates, now)}
    spool_bytes = {c.study_uid: c.spool_bytes for c in candidates}

    def size(r: Removal) -> int:
        if r.kind == "spool":
            return spool_bytes[r.study_uid]
        return tree_bytes(_folder(settings, r.kind, r.study_uid))

    sized = [(r, size(r)) for r in planned.values()]
    free = free_disk_mb(settings.data_dir) + sum(b for _, b in sized) / 2**20
    if settings.purge_when_free_below_mb and free < settings.purge_when_free_below_mb:
        for study in for_space(candidates):
            if free >= settings.purge_until_free_mb:
                break
            for r in study:
                if (r.study_uid, r.kind) not in planned:
                    planned[(r.study_uid, r.kind)] = r
                    sized.append((r, size(r)))
                    free += sized[-1][1] / 2**20
    return sized


class RetentionService:
    """The node's retention thread: the free disk every DISK_CHECK_S, ages every
    AGE_CHECK_S; first it finishes removals a crash interrupted."""

    name = "retention"

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.ledger = ledger
        self._loop = PollingLoop(self.name, DISK_CHECK_S, self._round)
        self._next_age_check = time.monotonic()

    def start(self) -> None:
        finish_interrupted(self.settings, self.ledger)
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def _round(self) -> None:
        settings = self.settings
        low = (
            bool(settings.purge_when_free_below_mb)
            and free_disk_mb(settings.data_dir) < settings.purge_when_free_below_mb
        )
        if low or time.monotonic() >= self._next_age_check:
            self._next_age_check = time.monotonic() + AGE_CHECK_S
            purge(settings, self.ledger)


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))


@click.command("purge")
@click.option("--dry-run", is_flag=True, help="Only show what would be removed now, and why.")
@click.pass_context
def purge_command(ctx: click.Context, dry_run: bool) -> None:
    """Remove the files of done studies that retention says may go (the node does
    this by itself; this shows it, or does it while the node is stopped).

    Only studies sent (every result object accepted) or skipped by a routing rule;
    never one still receiving, waiting, being analysed, unsent or failed.
    """
    settings = settings_from(ctx)
    ledger = open_ledger(settings)
    try:
        planned = plan(settings, ledger)
        for removal, size in planned:
            click.echo(
                f"{removal.study_uid}  {removal.kind:7}  {size:>12,} bytes  done {_when(removal.done_at)}"
                f"  {removal.reason}"
            )
        total = sum(size for _, size in planned)
        free = free_disk_mb(settings.data_dir)
        if dry_run:
            click.echo(f"would remove {len(planned)} file sets, {total:,} bytes; {free:,.0f} MB free now")
            return
        removed = purge(settings, ledger)
        click.echo(
            f"removed {sum(removed.values()):,} bytes ("
            + ", ".join(f"{kind} {n:,}" for kind, n in removed.items())
            + f"); {free_disk_mb(settings.data_dir):,.0f} MB free now"
        )
    finally:
        ledger.close()
