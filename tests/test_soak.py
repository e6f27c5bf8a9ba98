"""Months in a hospital, compressed: a node whose data folder is a small real tmpfs
takes thousands of instances, study after study, from DCMTK's storescu. Done studies'
files are removed below the free-space watermark, so the receiver never refuses an
instance because of what the node keeps, and nothing not yet delivered is lost:
every analysed study's SR reaches the DCMTK storescp PACS, every other is skipped by
its rule, and every instance is in the ledger.

Figures (printed with -s): instances, studies, disk size, bytes removed, refusals,
the lowest free space seen, seconds taken.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from service.common.spool import free_disk_mb
from service.datasets.synthetic import synthetic_study
from service.ledger import Ledger, StudyState
from service.settings import load_settings
from tests.support.common import dcmtk, free_port, tmpfs, wait_for
from tests.support.reports import start_storescp
from tests.support.worker import serve

pytestmark = [pytest.mark.integration, pytest.mark.heavy, pytest.mark.timeout(1200)]

DISK_MB = 32
STUDIES = 600
IMAGES = 5
#: Every ANALYSED-th study is a breast study (analysed, results sent); the others name
#: the thyroid (stored, skipped by the default rules): both become done and may go.
ANALYSED = 15
#: Analysed studies not yet sent before the next push waits: the PACS does not
#: outrun the workers by more than this (their files cannot be removed).
UNSENT_AHEAD = 3


def _push(folder: Path, images: list[pydicom.Dataset], thyroid: bool, ae: str, port: int) -> str:
    """One study with fresh UIDs, written and sent by storescu; returns its UID."""
    study_uid, series_uid = generate_uid(), generate_uid()
    paths = []
    for n, ds in enumerate(images):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.BodyPartExamined = "THYROID" if thyroid else "BREAST"
        ds.StudyDescription = "US THYROID" if thyroid else "US BREAST"
        paths.append(folder / f"{n}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    sent = subprocess.run(
        [dcmtk("storescu"), "-xy", "-aec", ae, "127.0.0.1", str(port), *map(str, paths)],
        check=False,
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr
    return study_uid


def _metric(port: int, name: str) -> dict[str, float]:
    """The value of each label of a one-label metric, from the node's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        family.split('"')[1]: float(value)
        for family, value in (line.split(" ") for line in text.splitlines() if line.startswith(name + "{"))
    }


def test_a_small_disk_takes_thousands_of_instances_and_never_refuses_for_its_own_leftovers(tmp_path: Path) -> None:
    start = time.monotonic()
    pacs_port = free_port()
    pacs = start_storescp(tmp_path / "pacs", pacs_port, "+xa")  # takes the JPEG heatmaps as they are
    with tmpfs(tmp_path / "disk", DISK_MB) as disk:
        # The default (fast) receiver engine: hundreds of back-to-back pushes are also
        # what found its dropped response to a C-STORE sent right after the accept.
        settings = load_settings(
            data_dir=disk / "data",
            host="127.0.0.1",
            port=free_port(),
            http_host="127.0.0.1",
            http_port=free_port(),
            quiet_period_s=0.5,
            durability="none",
            workers=1,
            destinations=f"PACS@127.0.0.1:{pacs_port}",
            sc_transfer_syntax="jpeg-baseline",
            similar_studies=0,
            min_free_disk_mb=4,
            purge_when_free_below_mb=12,
            purge_until_free_mb=16,
            retention_spool_days=3650,
            retention_results_days=3650,
            retention_outbox_days=3650,
        )
        node = serve(settings, tmp_path / "node.log")
        base = synthetic_study(IMAGES, "benign", seed=5, size=256)
        scratch = tmp_path / "push"
        scratch.mkdir()
        ledger = Ledger(settings.ledger_path, durable=False)
        analysed: list[str] = []
        skipped: list[str] = []
        lowest = free_disk_mb(settings.data_dir)
        try:
            for n in range(STUDIES):
                breast = n % ANALYSED == 0
                if breast:
                    wait_for(
                        "the workers to catch up",
                        lambda: sum(ledger.study(uid).state != StudyState.SENT for uid in analysed) <= UNSENT_AHEAD,
                        300,
                    )
                uid = _push(scratch, base, not breast, settings.ae_title, settings.port)
                (analysed if breast else skipped).append(uid)
                lowest = min(lowest, free_disk_mb(settings.data_dir))

            def settled() -> bool:
                states = Counter(ledger.study(uid).state for uid in analysed + skipped)
                assert states[StudyState.FAILED] == 0, states
                return states == Counter({StudyState.SENT: len(analysed), StudyState.SKIPPED: len(skipped)})

            wait_for("every study to be sent or skipped", settled, timeout=600, interval=0.5)
            responses = _metric(settings.http_port, "sonocase_cstore_responses_total")
            removed = _metric(settings.http_port, "sonocase_removed_bytes_total")
            instances = ledger.instance_count()
            received = sum(rec.size for uid in analysed + skipped for rec in ledger.instances(uid))
            purged_studies = len({p.study_uid for uid in analysed + skipped for p in ledger.purges(uid)})
        finally:
            ledger.close()
            node.stop()
            pacs.stop()
    assert responses == {"0x0000": STUDIES * IMAGES}, responses  # no refusal, of any kind
    assert instances == STUDIES * IMAGES
    srs = Counter(ds.StudyInstanceUID for ds in pacs.received() if ds.Modality == "SR")
    assert srs == Counter(analysed), "one SR per analysed study reached the PACS"
    assert sum(removed.values()) > received - DISK_MB * 2**20, "the disk only held it because files went"
    assert "refused C-STORE" not in node.log()
    print(
        f"\nsoak: {instances} instances in {STUDIES} studies ({len(analysed)} analysed and sent, {len(skipped)} "
        f"skipped), {received / 2**20:.1f} MiB received, through a {DISK_MB} MiB tmpfs; removed {sum(removed.values()) / 2**20:.1f} MiB "
        f"({', '.join(f'{k} {v / 2**20:.1f}' for k, v in removed.items())}) of {purged_studies} studies; "
        f"refusals 0; lowest free {lowest:.1f} MiB; {time.monotonic() - start:.0f} s"
    )
