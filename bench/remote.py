"""What the HTTP data path costs a worker: images/s of one worker with
``data_access = "http"`` (instances by WADO-RS from the node, result, heatmaps and
objects posted back, the node writing them) against its peer with ``"shared"``
(spool read and outbox written directly), the same studies, in the same run.

Both run :func:`service.pipeline.tasks.process_study` (claim, analysis, reports,
hand-over) one study at a time in this process; the node's worker routes are served
by its real HTTP server on loopback, in a thread of this process, so the node's
share of the work (serving the instances, checking and writing the upload) counts
against the worker here, as it would against one host running both.

    python bench/remote.py [--studies 10] [--images 4]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.datasets.synthetic import synthetic_study
from service.ledger import StudyState, open_ledger
from service.ops.web import ExtraRouter, build_web_server
from service.ops.worker_api import worker_router
from service.pipeline.tasks import WorkerState, process_study
from service.settings import Settings, load_settings
from tests.support.common import free_port
from tests.support.worker import receive

LABELS = ("normal", "benign", "malignant")
TOKEN = "bench-worker-token-0123456789"


def run(state: WorkerState, study_uids: list[str]) -> float:
    """Seconds to take ``study_uids`` through one worker, one at a time."""
    start = time.perf_counter()
    for study_uid in study_uids:
        outcome = process_study(state, study_uid)
        if outcome != "analysed":
            raise SystemExit(f"study {study_uid}: {outcome}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sonocase-bench-remote-"))
    try:
        node: Settings = load_settings(
            data_dir=work / "node", host="127.0.0.1", http_port=free_port(), worker_token=TOKEN, durability="fsync"
        )
        ledger = open_ledger(node)
        server = build_web_server(
            node, ledger, routers=[ExtraRouter(worker_router(node, ledger), 1 << 30, own_auth=True)]
        )
        server.start()
        try:
            # +1 each: a warm-up study (model load, first session run) that is not timed
            batches = {
                access: [
                    receive(node, ledger, synthetic_study(args.images, LABELS[k % 3], seed=k, index=i))
                    for k in range(args.studies + 1)
                ]
                for i, access in enumerate(("shared", "http"))
            }
            http = node.model_copy(update={"data_access": "http", "node_url": f"http://127.0.0.1:{node.http_port}"})
            seconds = {}
            for access, settings in (("shared", node), ("http", http)):
                state = WorkerState(settings)
                run(state, batches[access][:1])
                seconds[access] = run(state, batches[access][1:])
            for uids in batches.values():
                assert all((ledger.study(uid) or {}).get("state") == StudyState.REPORTED for uid in uids)
        finally:
            server.stop()
            ledger.close()
        images = args.studies * args.images
        print(f"{args.studies} studies of {args.images} images, one worker, analysis + reports + hand-over")
        for access, spent in seconds.items():
            print(
                f"  data_access={access:<7} {images / spent:7.1f} images/s   {spent / args.studies * 1000:6.0f} ms/study"
            )
        print(f"  http / shared images/s: {seconds['shared'] / seconds['http']:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
