"""Report-building benchmark: a study's result objects (SR, SCs, SEGs, KOS) built,
encoded and gated with highdicom's own constructors (``fast_reports`` off, the
peer) and with the shortcuts of service/reports/construction.py and the lean
writer of service/reports/encoding.py (on), in this process, interleaved study by
study so both see the same load; beside them the analysis stage alone on the same
studies (analyse_study, shipped model).

Each round analyses its own studies, so no object is built twice: the gate's
memory of valid values (``fast_reports``) sees what a worker sees, the values every
study repeats and none of another study's UIDs.

Prints the median CPU ms per image (this process's CPU time: building reports is
single-threaded Python, and CPU time stays steady on a shared machine where wall
time does not) of each step on each path, and the speed-up; the analysis stage's
wall ms per image for scale (bench/pipeline.py measures the real worker against
it). No writing to the outbox (fsync) and no queue here.

    python bench/reports.py [--studies 6] [--images 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import service.reports.build as build
from service.datasets.synthetic import synthetic_study
from service.pipeline.analysis import analyse_study
from service.pipeline.tasks import WorkerState, process_study
from service.reports.template import load_template
from service.reports.validation import check_object
from service.settings import load_settings
from tests.support.worker import receive

LABELS = ("normal", "benign", "malignant")
#: The steps timed inside build_objects, by the name build.py calls them.
STEPS = ("build_sr", "build_heatmap_sc", "build_heatmap_seg", "build_kos", "_encode")


def timed(times: dict[str, float], name: str) -> None:
    """Wrap ``build.<name>`` so each call adds its CPU seconds to ``times[name]``."""
    inner = getattr(build, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        start = time.process_time()
        try:
            return inner(*args, **kwargs)
        finally:
            times[name] += time.process_time() - start

    setattr(build, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sonocase-bench-reports-"))
    try:
        library = load_settings(data_dir=work, http_port=0, fast_reports=False)
        settings = {"library": library, "fast": library.model_copy(update={"fast_reports": True})}
        state = WorkerState(library)
        state.open()
        ledger = state.ledger
        rounds = [
            [
                receive(library, ledger, synthetic_study(args.images, LABELS[n % 3], seed=300 + n, index=n))
                for n in range(r * args.studies, (r + 1) * args.studies)
            ]
            for r in range(args.rounds)
        ]
        for uid in (uid for uids in rounds for uid in uids):  # results in the ledger; warm-up of the model, fonts
            assert process_study(state, uid) == "analysed"
        template = load_template(library.sr_template)
        model = state.model()
        per_image: dict[str, list[float]] = defaultdict(list)
        for uids in rounds:
            for uid in uids:
                instances = ledger.instances(uid)
                start = time.perf_counter()
                analyse_study(library, model, uid, 1, instances)
                per_image["analysis"].append((time.perf_counter() - start) / args.images)
                result = ledger.result(uid)
                assert result is not None, f"study {uid} has no result"
                sources, paths = build.read_sources(ledger, result)
                for path, chosen in settings.items():
                    steps: dict[str, float] = defaultdict(float)
                    originals = {name: getattr(build, name) for name in STEPS}
                    for name in STEPS:
                        timed(steps, name)
                    try:
                        start = time.process_time()
                        objects = build.build_objects(chosen, template, result, sources, paths, lambda _uid: None)
                        built = time.process_time()
                        for obj in objects:
                            check_object(obj.data, template.disclaimer, chosen.fast_reports)
                        gated = time.process_time()
                    finally:
                        for name, original in originals.items():
                            setattr(build, name, original)
                    for name in STEPS:
                        per_image[f"{path} {name}"].append(steps[name] / args.images)
                    per_image[f"{path} gate"].append((gated - built) / args.images)
                    per_image[f"{path} reports"].append((gated - start) / args.images)
        median = {key: statistics.median(values) * 1000 for key, values in per_image.items()}
        print(
            f"{args.studies} studies of {args.images} images x {args.rounds} rounds, one process, "
            f"model {library.model_path.name}; median CPU ms per image"
        )
        print(f"  {'step':28s} {'library':>9s} {'fast':>9s} {'speed-up':>9s}")
        for step in (*STEPS, "gate", "reports"):
            lib, fast = median[f"library {step}"], median[f"fast {step}"]
            print(f"  {step:28s} {lib:9.1f} {fast:9.1f} {lib / fast:8.2f}x")
        print(f"  {'analysis stage alone (wall)':28s} {median['analysis']:9.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
