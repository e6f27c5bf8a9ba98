"""Retention on a real spool, results and outbox and a real ledger on both backends:
what goes (done studies' files, by age per kind, and the longest done first below the
free-space watermark of a real tmpfs) and what never does (anything not yet done,
the similar-case index's copies)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.common.metrics import build_registry
from service.common.spool import free_disk_mb
from service.datasets.synthetic import synthetic_study
from service.delivery.recovery import NothingToRetry, retry_study
from service.delivery.retention import (
    DAY_S,
    due_by_age,
    finish_interrupted,
    for_space,
    plan,
    purge,
    tree_bytes,
)
from service.ledger import FILE_KINDS, Ledger, OutboxState, PurgeCandidate, Routing, StudyState
from service.ops.ledger_metrics import LedgerCollector
from service.ops.status import format_detail, study_detail
from service.pipeline.tasks import WorkerState, process_study
from service.reports.build import build_reports
from service.settings import Settings, SettingsError, load_settings
from service.similar.index import SimilarCaseIndex
from service.similar.references import ReferenceEmbedder
from tests.support.common import force_state, free_port
from tests.support.reports import analysed_study
from tests.support.worker import child_env, receive

DEST = "PACS@127.0.0.1:1104"


@pytest.fixture
def node(settings: Settings) -> Settings:
    """Results go to one destination; nothing is removed by age unless a test says so."""
    return settings.model_copy(
        update={
            "destinations": [DEST],
            "retention_spool_days": 1000.0,
            "retention_results_days": 1000.0,
            "retention_outbox_days": 1000.0,
            "purge_when_free_below_mb": 0,
        }
    )


def sent_study(settings: Settings, ledger: Ledger, sent_at: float, files: tuple[str, ...] = ("US1_UNCR.dcm",)) -> str:
    """A study analysed, reported and accepted by the destination at ``sent_at``."""
    study = analysed_study(settings, ledger, files=list(files), n_similar=0)
    assert build_reports(settings, ledger, study.uid)
    for row in ledger.outbox(study.uid):
        ledger.update_outbox(row.sop_instance_uid, row.destination, OutboxState.SENT, now=sent_at)
    assert ledger.transition(study.uid, StudyState.SENT, 1, now=sent_at)
    return study.uid


def files_of(settings: Settings, study_uid: str) -> dict[str, int]:
    return {
        kind: tree_bytes(folder / study_uid)
        for kind, folder in (
            ("spool", settings.spool_dir),
            ("results", settings.results_dir),
            ("outbox", settings.outbox_dir),
        )
    }


def test_pure_rules_per_kind_and_oldest_first() -> None:
    settings = load_settings(retention_spool_days=1, retention_results_days=2, retention_outbox_days=30)
    old = PurgeCandidate("1.1", 1, "sent", 0.0, FILE_KINDS, 100)
    new = PurgeCandidate("1.2", 2, "skipped", 2.5 * DAY_S, ("spool",), 50)
    due = due_by_age(settings, [old, new], now=3 * DAY_S)
    assert [(r.study_uid, r.kind) for r in due] == [("1.1", "spool"), ("1.1", "results")]
    assert due[0].reason == "kept 1 days after done"
    batches = list(for_space([old, new]))
    assert [[(r.study_uid, r.generation, r.kind) for r in batch] for batch in batches] == [
        [("1.1", 1, "spool"), ("1.1", 1, "results"), ("1.1", 1, "outbox")],
        [("1.2", 2, "spool")],
    ]


def test_watermarks_must_lie_above_the_refusal_watermark() -> None:
    with pytest.raises(SettingsError, match="PURGE_WHEN_FREE_BELOW_MB must lie above"):
        load_settings(min_free_disk_mb=500, purge_when_free_below_mb=400, purge_until_free_mb=1000)
    with pytest.raises(SettingsError, match="at most SONOCASE_PURGE_UNTIL_FREE_MB"):
        load_settings(purge_when_free_below_mb=3000, purge_until_free_mb=2000)
    assert load_settings(min_free_disk_mb=10**6, purge_when_free_below_mb=0).purge_when_free_below_mb == 0


@pytest.mark.heavy
def test_only_done_studies_are_candidates(node: Settings, ledger: Ledger) -> None:
    sent = sent_study(node, ledger, sent_at=1000.0)
    reported = analysed_study(node, ledger, files=["OBXXXX1A.dcm"], n_similar=0).uid
    assert build_reports(node, ledger, reported)  # queued, not yet accepted
    partly = sent_study(node, ledger, sent_at=1001.0, files=("US1_UNCR.dcm", "OBXXXX1A.dcm"))
    row = ledger.outbox(partly)[0]  # a row of an earlier try still pending: not fully delivered
    ledger.update_outbox(row.sop_instance_uid, row.destination, OutboxState.PENDING)
    failed = analysed_study(node, ledger, files=["US1_UNCR.dcm"], n_similar=0).uid
    force_state(ledger, failed, StudyState.FAILED, failed_stage="report", error="ReportError: x")
    receiving = receive(node, ledger, synthetic_study(1, "benign", seed=1), complete=False)
    skipped = receive(node, ledger, synthetic_study(1, "normal", seed=2), complete=False)
    ledger.complete_studies(
        [(skipped, ledger.study(skipped).last_received, Routing(False, "other-body-part"))], now=500.0
    )
    waiting = receive(node, ledger, synthetic_study(1, "normal", seed=3))
    assert [(c.study_uid, c.kinds) for c in ledger.purge_candidates()] == [(skipped, FILE_KINDS), (sent, FILE_KINDS)]
    everything = node.model_copy(update={f"retention_{kind}_days": 0.0 for kind in FILE_KINDS})
    purge(everything, ledger, now=2000.0)
    for uid in (reported, partly, failed, receiving, waiting):
        assert files_of(node, uid)["spool"] > 0 and ledger.purges(uid) == [], uid
    assert files_of(node, sent) == {"spool": 0, "results": 0, "outbox": 0}
    assert not (node.spool_dir / sent).exists() and not (node.outbox_dir / sent).exists()
    assert ledger.purge_candidates() == []


@pytest.mark.heavy
def test_each_kind_goes_after_its_own_days_and_is_recorded(node: Settings, ledger: Ledger) -> None:
    uid = sent_study(node, ledger, sent_at=1000.0, files=("US1_UNCR.dcm", "OBXXXX1A.dcm"))
    before = files_of(node, uid)
    spool_bytes = ledger.study(uid).spool_bytes
    assert spool_bytes == before["spool"] and all(before.values())
    days = node.model_copy(
        update={"retention_spool_days": 1.0, "retention_results_days": 2.0, "retention_outbox_days": 3.0}
    )
    assert purge(days, ledger, now=1000.0 + 0.5 * DAY_S) == {"spool": 0, "results": 0, "outbox": 0}
    assert purge(days, ledger, now=1000.0 + 1.5 * DAY_S) == {"spool": before["spool"], "results": 0, "outbox": 0}
    assert files_of(node, uid)["results"] == before["results"] and ledger.study(uid).spool_bytes == 0
    assert purge(days, ledger, now=1000.0 + 3.5 * DAY_S) == {
        "spool": 0,
        "results": before["results"],
        "outbox": before["outbox"],
    }
    assert [(p.kind, p.generation, p.bytes, p.reason) for p in ledger.purges(uid)] == [
        ("spool", 1, before["spool"], "kept 1 days after done"),
        ("outbox", 1, before["outbox"], "kept 3 days after done"),
        ("results", 1, before["results"], "kept 2 days after done"),
    ]
    registry = build_registry(LedgerCollector(ledger, node.data_dir))
    for kind in FILE_KINDS:
        assert registry.get_sample_value("sonocase_removed_bytes_total", {"kind": kind}) == before[kind]
    assert registry.get_sample_value("sonocase_spool_bytes", {"state": "sent"}) == 0
    with pytest.raises(NothingToRetry, match="removed by retention"):
        retry_study(node, ledger, uid)
    detail = format_detail(study_detail(ledger, uid))
    assert "removed spool files of generation 1 at" in detail and f"({before['spool']} bytes): kept 1 days" in detail


def test_a_reopened_study_keeps_its_new_files_until_it_is_done_again(node: Settings, ledger: Ledger) -> None:
    uid = sent_study(node, ledger, sent_at=1000.0)
    candidate = ledger.purge_candidates()[0]
    claimed = ledger.claim_purge(uid, candidate.generation, "spool", "test", now=time.time())
    assert claimed == [str(p) for p in sorted((node.spool_dir / uid).iterdir())]
    extra = synthetic_study(1, "benign", seed=9)[0]
    extra.StudyInstanceUID = uid
    receive(node, ledger, [extra], complete=False)
    assert ledger.study(uid).generation == 2
    assert ledger.claim_purge(uid, 1, "results", "test") is None  # no longer done at generation 1
    assert ledger.purge_paths(uid, ledger.purges(uid)[0].purged_at) == claimed  # not the new instance
    assert finish_interrupted(node, ledger) == 1  # the claimed spool removal, as after a crash
    remaining = [p.name for p in (node.spool_dir / uid).iterdir()]
    assert remaining == [f"{extra.SOPInstanceUID}.dcm"]
    assert ledger.purge_candidates() == []  # generation 2 is receiving
    assert ledger.study(uid).spool_bytes == (node.spool_dir / uid / remaining[0]).stat().st_size


def test_below_the_watermark_the_longest_done_go_first_until_enough_is_free(small_disk: Path) -> None:
    """A real 6 MiB tmpfs: done (skipped) studies of 0.8 MB each fill it; a purge
    round frees the longest done until the target is free, and leaves the study that
    waits for analysis alone."""
    settings = load_settings(
        data_dir=small_disk / "data",
        durability="none",
        http_port=0,
        min_free_disk_mb=1,
        purge_when_free_below_mb=3,
        purge_until_free_mb=4,
    )
    ledger = Ledger(settings.ledger_path, durable=False)
    try:
        uids = []
        for n in range(5):
            uid = receive(
                settings, ledger, synthetic_study(2, "normal", seed=n, size=512, variant="mono"), complete=False
            )
            ledger.complete_studies(
                [(uid, ledger.study(uid).last_received, Routing(False, "other-body-part"))],
                now=time.time() - 100 + n,
            )
            uids.append(uid)
        waiting = receive(settings, ledger, synthetic_study(1, "benign", seed=99, size=512, variant="mono"))
        free = free_disk_mb(settings.data_dir)
        assert free < 3, f"{free:.1f} MB free: the studies do not fill the disk"
        planned = plan(settings, ledger)
        assert {r.reason for r, _ in planned} == {"free disk below the watermark"}
        assert [r.study_uid for r, _ in planned if r.kind == "spool"] == uids[: len(planned) // 3]
        removed = purge(settings, ledger)
        assert free_disk_mb(settings.data_dir) >= 4
        gone = [uid for uid in uids if ledger.purges(uid)]
        assert gone == uids[: len(gone)] and 0 < len(gone) < len(uids)  # the longest done, and no more than needed
        assert len(gone) == len(planned) // 3  # as the dry run said
        assert sum(removed.values()) == sum(p.bytes for uid in gone for p in ledger.purges(uid)) > 0
        assert files_of(settings, waiting)["spool"] > 0 and not ledger.purges(waiting)
    finally:
        ledger.close()


@pytest.mark.integration
def test_purge_command_shows_then_removes(node: Settings, ledger: Ledger, tmp_path: Path) -> None:
    uid = sent_study(node, ledger, sent_at=time.time() - 3 * DAY_S)
    settings = node.model_copy(update={"retention_spool_days": 2.0})
    env = {**child_env(settings), "SONOCASE_HTTP_PORT": "0", "SONOCASE_PORT": str(free_port())}

    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "service", "purge", *args],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    dry = run("--dry-run")
    assert f"{uid}  spool" in dry and "kept 2 days after done" in dry and "would remove 1 file sets" in dry
    assert f"{uid}  results" not in dry and files_of(node, uid)["spool"] > 0
    done = run()
    assert "removed" in done and files_of(node, uid)["spool"] == 0 and files_of(node, uid)["outbox"] > 0


@pytest.mark.heavy
def test_the_index_keeps_its_copies_of_a_study_whose_spool_went(node: Settings, ledger: Ledger) -> None:
    """An analysed study joins the similar-case index before its report is built,
    so once it is sent and its spool removed, the index still shows and re-embeds it."""
    indexing = node.model_copy(update={"index_analysed_studies": True, "retention_spool_days": 0.0})
    uid = receive(indexing, ledger, synthetic_study(2, "malignant", seed=5))
    assert process_study(WorkerState(indexing), uid) == "analysed"
    for row in ledger.outbox(uid):
        ledger.update_outbox(row.sop_instance_uid, row.destination, OutboxState.SENT)
    ledger.transition(uid, StudyState.SENT, 1)
    purge(indexing, ledger)
    assert not (indexing.spool_dir / uid).exists()
    embedder = ReferenceEmbedder(indexing)
    with SimilarCaseIndex.from_settings(indexing, embedder.identity) as index:
        stored = [image for image in index.stored_images() if image.study_uid == uid]
        assert stored and all(image.path is not None and image.path.is_file() for image in stored)
        assert index.rebuild(embedder.embed_stored).failed == {}


@pytest.mark.parametrize("kind", ["results", "outbox"])
def test_removal_names_the_generation_it_takes(node: Settings, ledger: Ledger, kind: str) -> None:
    uid = sent_study(node, ledger, sent_at=1000.0)
    later = node.model_copy(update={"retention_results_days": 0.0, "retention_outbox_days": 0.0})
    newer = getattr(node, f"{kind}_dir") / uid / "2"
    newer.mkdir(parents=True)  # what a re-analysis would write next
    (newer / "x").write_bytes(b"12345")
    removed = purge(later, ledger, now=2000.0)
    assert removed[kind] > 0 and (newer / "x").read_bytes() == b"12345"
    assert os.listdir(getattr(node, f"{kind}_dir") / uid) == ["2"]
