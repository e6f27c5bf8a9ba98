"""Where a worker's time goes: cProfile over ``process_study`` (analysis, the
similar-case index, reports, the validation gate, the outbox) on synthetic studies,
in this process with the shipped model, as one worker process runs them.

Not a benchmark with a peer: a profile to read before changing a stage. Prints
the wall time of each stage (from the ledger's timestamps and the result's own
timings) and the functions with the most cumulative time.

    python bench/profile_worker.py [--studies 6] [--images 4] [--top 40] [--sort cumulative] [--no-profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from service.datasets.synthetic import synthetic_study
from service.pipeline.tasks import WorkerState, process_study
from service.settings import load_settings
from tests.support.worker import receive

LABELS = ("normal", "benign", "malignant")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--sort", default="cumulative")
    parser.add_argument("--no-profile", action="store_true", help="stage times only (cProfile slows Python code)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sonocase-profile-"))
    try:
        settings = load_settings(data_dir=work, http_port=0, durability="fsync", destinations="PACS@127.0.0.1:11113")
        state = WorkerState(settings)
        state.open()
        ledger = state.ledger
        uids = [
            receive(settings, ledger, synthetic_study(args.images, LABELS[k % 3], seed=700 + k, index=k))
            for k in range(args.studies + 1)
        ]
        process_study(state, uids[0])  # warm-up: ONNX Runtime arenas, imports, fonts
        profile = cProfile.Profile()
        stages: dict[str, list[float]] = {"analysis": [], "reports": [], "total": []}
        for uid in uids[1:]:
            start = time.perf_counter()
            if not args.no_profile:
                profile.enable()
            outcome = process_study(state, uid)
            profile.disable()
            total = time.perf_counter() - start
            row = ledger.study(uid)
            assert outcome == "analysed" and row is not None and row.state == "reported", (outcome, row)
            assert row.analysed_at is not None and row.analysis_started is not None
            analysis = row.analysed_at - row.analysis_started
            stages["analysis"].append(analysis)
            stages["reports"].append(total - analysis)
            stages["total"].append(total)
        print(f"{args.studies} studies of {args.images} images, one process, model {settings.model_path.name}")
        for stage, values in stages.items():
            print(
                f"  {stage:9s} median {statistics.median(values) * 1000:7.1f} ms per study "
                f"({statistics.median(values) * 1000 / args.images:6.1f} ms per image)"
            )
        if not args.no_profile:
            pstats.Stats(profile).sort_stats(args.sort).print_stats(args.top)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
