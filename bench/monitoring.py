"""Monitoring simulation: does the drift alarm catch a probe swap, and only that?

A site sends 20 synthetic studies a day for 60 days; on day 30 its probe is swapped
for one of lower frequency with its own preset (service.datasets.phantom.Scanner:
coarser speckle, wider dynamic range, more gain), the Manufacturer and Model Name
unchanged. Each study (1-3 views of one breast) goes through the shipped ONNX model;
service.monitoring.drift tests every 10 studies the latest 40 against the first 100
(whitened MMD, permutation p-value). Outcomes (the phantom's truth) arrive two weeks
after each study: at the end, service.monitoring.performance's figures on the studies
whose outcome arrived, before and after the swap, are checked against the
simulation's truth (the same figure on the whole pool of that scanner).

Rendering and the model are the slow part, so each scanner's studies are made once
as a pool, the model's outputs cached per pool under .cache/bench-monitoring (keyed
by the model card, which holds the model's hash, and the pool's parameters), and
each seed draws its days from the pools without replacement and runs its own
permutations.

Prints, per seed, the first alarm, the out-of-domain rate and predicted-class mix
before and after the swap and the real-world figures, then how many intervals hold
the truth and the summary line::

    detection delay median N studies (max M), false alarms K of 10 seeds

The issue's targets: an alarm within 60 studies of the change, and a false alarm
(before it) in at most 1 seed of 10.

    python bench/monitoring.py            # 60 days, 10 seeds
    python bench/monitoring.py --quick    # 12 days, swap on day 9, 1 seed (the test)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.datasets.phantom import DEFAULT_SCANNER, Scanner
from service.datasets.records import CLASSES
from service.datasets.synthetic import patient_views
from service.model.imaging import model_input
from service.model.inference import OnnxModel
from service.monitoring.drift import DriftConfig, WindowDrift, guard_unit, study_embeddings, watch
from service.monitoring.performance import Report, performance

SHIPPED = ROOT / "onnx_models" / "sonocase-hybrid.onnx"
CACHE = ROOT / ".cache" / "bench-monitoring"
#: A lower-frequency linear probe and its preset: speckle grain 1.3x coarser, 6 dB
#: more dynamic range, 2 dB more gain. The domain guard flags about one image in six.
PROBE_SWAP = Scanner(speckle_scale=1.3, dynamic_range_db=6.0, gain_db=2.0)
#: Share of normal, benign and malignant studies (a diagnostic, not a screening, clinic).
PREVALENCE = (0.5, 0.35, 0.15)
MALIGNANT = CLASSES.index("malignant")
#: Rendered as the phantom's default, then resized to the model's input by the node's code.
RENDER_SIZE = 256
TARGET_DELAY = 60
TARGET_FALSE_ALARMS = 1


@dataclass(frozen=True)
class Scenario:
    days: int
    per_day: int
    change_day: int  # first day (1-based) on the new probe
    outcome_delay_days: int
    seeds: int
    spare: float  # pools this much larger than one history needs, so seeds draw different studies

    @property
    def change_index(self) -> int:
        """Index of the first study on the new probe."""
        return (self.change_day - 1) * self.per_day

    @property
    def studies(self) -> int:
        return self.days * self.per_day


FULL = Scenario(days=60, per_day=20, change_day=30, outcome_delay_days=14, seeds=10, spare=1 / 3)
#: Three windows before the swap (reference 100, window 40), four days after it;
#: outcomes after two days, so some arrive.
QUICK = Scenario(days=12, per_day=20, change_day=9, outcome_delay_days=2, seeds=1, spare=0.0)


@dataclass(frozen=True)
class Pool:
    """Per study of one scanner: mean embedding, share of images out of domain, the
    study's result by service.results.SUMMARY_RULE (the most suspicious image the
    domain guard passed decides: its class and calibrated probabilities; -1 and NaN
    when none passed) and the truth."""

    embedding: np.ndarray  # float64 [S, D]
    guard: np.ndarray  # float64 [S]: service.monitoring.drift.guard_unit of its images
    out_of_domain: np.ndarray  # float64 [S]
    predicted: np.ndarray  # int64 [S], -1: not assessed
    probabilities: np.ndarray  # float64 [S, C]
    truth: np.ndarray  # int64 [S]

    def take(self, rows: np.ndarray) -> Pool:
        return Pool(*(getattr(self, name)[rows] for name in self.__dataclass_fields__))


def model_outputs(model: OnnxModel, scanner: Scanner, size: int, pool_seed: int, cache: Path) -> dict[str, np.ndarray]:
    """The model's outputs per rendered image of ``size`` studies on ``scanner``
    (``study`` says whose), from the cache when there."""
    key = json.dumps(
        {
            "card": model.card.model_dump(mode="json"),
            "scanner": asdict(scanner),
            "size": size,
            "seed": pool_seed,
            "prevalence": PREVALENCE,
            "render": RENDER_SIZE,
            "outputs": 2,
        },
        sort_keys=True,
    )
    path = cache / f"outputs-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        with np.load(path) as saved:
            return dict(saved)
    labels = np.random.default_rng([pool_seed, 0]).choice(len(CLASSES), size=size, p=PREVALENCE)
    batch, study = [], []
    for index, label in enumerate(labels):
        for view in patient_views(pool_seed, int(label), index, RENDER_SIZE, scanner=scanner):
            batch.append(model_input(view.image, model.card.input))
            study.append(index)
    prediction = model.run(np.stack(batch))
    outputs = {
        "embedding": prediction.embedding,
        "probabilities": prediction.probabilities,
        "out_of_domain": prediction.out_of_distribution,
        "guard_score": prediction.ood_distance,
        "study": np.asarray(study),
        "labels": labels,
    }
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part.npz")
    np.savez(partial, **outputs)
    partial.replace(path)
    return outputs


def make_pool(model: OnnxModel, scanner: Scanner, size: int, pool_seed: int, cache: Path) -> Pool:
    """``size`` studies on ``scanner`` through ``model``, summarised per study."""
    out = model_outputs(model, scanner, size, pool_seed, cache)
    study, probabilities, ood = out["study"], out["probabilities"].astype(np.float64), out["out_of_domain"]
    predicted = np.full(size, -1, np.int64)
    decisive = np.full((size, len(CLASSES)), np.nan)
    # Most suspicious first (class index = suspicion), then the more probable; only
    # images the domain guard passed decide.
    rank = np.where(ood, -np.inf, probabilities.argmax(axis=1) * 2.0 + probabilities.max(axis=1))
    for s in range(size):
        images = np.flatnonzero(study == s)
        best = images[np.argmax(rank[images])]
        if np.isfinite(rank[best]):
            predicted[s], decisive[s] = probabilities[best].argmax(), probabilities[best]
    return Pool(
        embedding=study_embeddings(out["embedding"], study),
        guard=np.array([guard_unit(out["guard_score"][study == s]) for s in range(size)]),
        out_of_domain=np.bincount(study, weights=ood) / np.bincount(study),
        predicted=predicted,
        probabilities=decisive,
        truth=out["labels"].astype(np.int64),
    )


def concatenate(a: Pool, b: Pool) -> Pool:
    return Pool(*(np.concatenate([getattr(a, n), getattr(b, n)]) for n in Pool.__dataclass_fields__))


@dataclass(frozen=True)
class SeedResult:
    seed: int
    false_alarm_at: int | None  # study index (end of window) of the first alarm before the change
    delay: int | None  # studies on the new probe when the first alarm after the change fired
    windows: list[WindowDrift]
    stream: Pool


def run_seed(seed: int, scenario: Scenario, before: Pool, after: Pool, config: DriftConfig) -> SeedResult:
    """One site history: pre-change days drawn from ``before``, the rest from ``after``."""
    rng = np.random.default_rng(seed)
    change = scenario.change_index
    stream = concatenate(
        before.take(rng.choice(len(before.truth), change, replace=False)),
        after.take(rng.choice(len(after.truth), scenario.studies - change, replace=False)),
    )
    windows = watch(stream.embedding, stream.guard, stream.out_of_domain, stream.predicted, len(CLASSES), config, rng)
    early = [w.end for w in windows if w.alarm and w.end <= change]
    late = [w.end - change for w in windows if w.alarm and w.end > change]
    return SeedResult(seed, early[0] if early else None, late[0] if late else None, windows, stream)


def summary_line(results: list[SeedResult]) -> str:
    """The bench's last line; the median is over the seeds whose alarm fired, the
    maximum says "never" when one did not."""
    delays = [r.delay for r in results if r.delay is not None]
    median = statistics.median(delays) if delays else float("nan")
    worst = str(max(delays)) if len(delays) == len(results) else "never"
    false_alarms = sum(r.false_alarm_at is not None for r in results)
    return (
        f"detection delay median {median:g} studies (max {worst}), false alarms {false_alarms} of {len(results)} seeds"
    )


def phase_report(result: SeedResult, change: int) -> str:
    """Out-of-domain rate and predicted-class mix before and after the swap."""
    parts = []
    for name, rows in (("before", slice(0, change)), ("after", slice(change, None))):
        predicted = result.stream.predicted[rows]
        mix = np.bincount(predicted[predicted >= 0], minlength=len(CLASSES)) / len(predicted)
        parts.append(
            f"{name}: out-of-domain {result.stream.out_of_domain[rows].mean():.1%}, predicted "
            + "/".join(f"{v:.0%}" for v in mix)
        )
    return "; ".join(parts)


#: The figures checked against the simulation's truth (Wilson intervals, and AUC's bootstrap one).
CHECKED = ("sensitivity", "specificity", "ppv", "npv", "roc_auc")


def assessed_report(pool: Pool, rng: np.random.Generator) -> Report:
    """service.monitoring.performance of the malignant call on a pool's assessed studies."""
    assessed = pool.predicted >= 0
    return performance(pool.probabilities[assessed], pool.truth[assessed], MALIGNANT, rng)


def real_world(
    result: SeedResult, scenario: Scenario, truth: dict[str, Report], rng: np.random.Generator
) -> tuple[str, int, int]:
    """The real-world figures the node would show at the end of the history (only
    studies whose outcome has arrived), before and after the swap; how many of
    their intervals hold the simulation's truth (the figure on the whole pool)."""
    change = scenario.change_index
    known = (scenario.days - scenario.outcome_delay_days) * scenario.per_day
    parts, covered, checked = [], 0, 0
    for name, rows in (("before", np.arange(0, min(change, known))), ("after", np.arange(change, known))):
        if len(rows) == 0:
            continue
        got = assessed_report(result.stream.take(rows), rng)
        for metric in CHECKED:
            estimate, true = got[metric], truth[name][metric].value
            if estimate.low is not None and estimate.high is not None and true is not None:
                checked += 1
                covered += estimate.low <= true <= estimate.high
        sens, spec = got["sensitivity"], got["specificity"]
        parts.append(
            f"{name} ({len(rows)} outcomes): sensitivity {sens.value:.2f} [{sens.low:.2f}, {sens.high:.2f}] "
            f"(truth {truth[name]['sensitivity'].value:.2f}), specificity {spec.value:.2f} "
            f"[{spec.low:.2f}, {spec.high:.2f}] (truth {truth[name]['specificity'].value:.2f})"
        )
    return "; ".join(parts), covered, checked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="12 days, swap on day 9, one seed")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 10, 1 with --quick)")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the model's outputs per pool are kept")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    args = parser.parse_args(argv)
    scenario = QUICK if args.quick else FULL
    seeds = args.seeds or scenario.seeds
    config = DriftConfig()
    started = time.perf_counter()
    model = OnnxModel(SHIPPED, provider="cpu", threads=args.threads)
    change = scenario.change_index
    before = make_pool(model, DEFAULT_SCANNER, int(change * (1 + scenario.spare)), 1, args.cache)
    after = make_pool(model, PROBE_SWAP, int((scenario.studies - change) * (1 + scenario.spare)), 2, args.cache)
    print(
        f"pools: {len(before.truth)} studies before, {len(after.truth)} after the swap "
        f"({time.perf_counter() - started:.0f} s); {scenario.days} days x {scenario.per_day} studies, "
        f"swap on day {scenario.change_day} (study {change}); reference {config.reference_size}, "
        f"window {config.window_size} every {config.step}, alpha {config.alpha}, {config.permutations} permutations"
    )
    truth = {
        "before": assessed_report(before, np.random.default_rng(0)),
        "after": assessed_report(after, np.random.default_rng(0)),
    }
    results, covered, checked = [], 0, 0
    for seed in range(seeds):
        result = run_seed(seed, scenario, before, after, config)
        results.append(result)
        fired = "none" if result.delay is None else f"{result.delay} studies after the swap"
        early = "" if result.false_alarm_at is None else f", FALSE ALARM at study {result.false_alarm_at}"
        print(f"seed {seed}: alarm {fired}{early}; {phase_report(result, change)}")
        shown, hits, count = real_world(result, scenario, truth, np.random.default_rng(seed))
        covered, checked = covered + hits, checked + count
        print(f"  real-world {shown}")
    print(f"real-world 95 % intervals holding the simulation's truth ({', '.join(CHECKED)}): {covered} of {checked}")
    print(f"runtime {time.perf_counter() - started:.0f} s")
    print(summary_line(results))
    ok = all(r.delay is not None and r.delay <= TARGET_DELAY for r in results)
    return 0 if ok and sum(r.false_alarm_at is not None for r in results) <= TARGET_FALSE_ALARMS else 1


if __name__ == "__main__":
    sys.exit(main())
