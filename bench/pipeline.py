"""Pipeline benchmark: from the last C-STORE of a study to its result in the ledger,
and analysis throughput with one and two worker processes.

Latency: `sonocase serve` (shipped model, one worker process) receives synthetic
4-image studies one at a time from DCMTK's storescu; for each, the time from the
receiver recording the last instance to the worker storing the result, both read
from the ledger, minus the configured quiet period (a wait for more images, not
work). Everything else counts: completion polling, the scheduler, the broker, the
worker's analysis. Run with the embedded broker and with Redis (a private
redis-server). The peer: the same studies analysed in this process by
service.pipeline.analysis.analyse_study with the same model (no receiver, ledger or queue);
the ratio is what the queue and the stages around it cost.

Throughput: N studies (48 by default) received and queued first, then images per
second in steady state: from the eighth study's objects in the outbox (reported)
to the last's (each process's first study builds the objects' prototypes, and a
second pool process may start a second after the first; the peer is timed warm
too), with
`workers` = 1 and = 2, with report lanes (setting report_processes "auto", the
default: a worker's objects built in processes of their own while it analyses the
next studies; none where a worker process has fewer than two cores) and without
(0) (embedded broker). The peer: the analysis stage alone on the same
studies in this process (analyse_study, no queue, no objects), after the runs.
Rounds (3 by default) each measure all four and the peer; the targets are judged
on the median of the rounds' ratios (a shared 2-core machine moves one run by up
to a fifth).
One worker (default settings) / the analysis stage alone says how close the
objects let a worker come to the model's speed. Workers scale with cores: two
workers / one is measured without lanes, one process per worker (on 2 cores one
worker with its lane uses both already).

    python bench/pipeline.py [--studies 20] [--images 4] [--throughput-studies 48] [--rounds 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from service.common.spool import instance_path
from service.ledger import Ledger, StudyRow
from service.model.inference import OnnxModel
from service.pipeline.analysis import analyse_study
from service.pipeline.report_lane import available_cores, lane_count
from service.settings import Settings, load_settings
from tests.support.common import free_port
from tests.support.worker import PrivateRedis, serve, storescu, write_study

LABELS = ("normal", "benign", "malignant")
QUIET_S = 0.5
#: Issue 13's targets, each a ratio against a peer measured in the same run.
TARGET_MODEL_SHARE = 0.5  # images/s with one worker >= this x images/s of the analysis stage alone
TARGET_SCALING = 1.6  # two worker processes >= this x one (2 cores)
TARGET_COMPLETION_LAG_S = 0.050  # last instance -> complete, beyond the quiet period


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def make_studies(folder: Path, count: int, images: int, first_seed: int) -> list[tuple[str, list[Path]]]:
    return [write_study(folder / str(k), images, LABELS[k % 3], seed=first_seed + k, index=k) for k in range(count)]


def node_settings(data_dir: Path, **overrides: Any) -> Settings:
    return load_settings(
        data_dir=data_dir,
        host="127.0.0.1",
        port=free_port(),
        http_port=0,
        quiet_period_s=QUIET_S,
        durability="fsync",
        **overrides,
    )


def ledger_rows(settings: Settings, study_uids: list[str]) -> list[StudyRow | None]:
    with Ledger(settings.ledger_path, durable=False) as ledger:
        return [ledger.study(uid) for uid in study_uids]


def wait_analysed(
    settings: Settings, study_uids: list[str], timeout: float = 600, stamp: str = "analysed_at"
) -> list[StudyRow]:
    """The studies' ledger rows once each has ``stamp`` (``reported_at``: its objects are in the outbox)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = [row for row in ledger_rows(settings, study_uids) if row is not None and getattr(row, stamp)]
        if len(rows) == len(study_uids):
            return rows
        time.sleep(0.05)
    raise TimeoutError(f"studies without {stamp} after {timeout} s")


def latencies(settings: Settings, studies: list[tuple[str, list[Path]]], log: Path) -> dict[str, list[float]]:
    """Send studies one at a time; per study, seconds of each hop from the ledger."""
    node = serve(settings, log)
    hops: dict[str, list[float]] = {"total": [], "last instance->complete": [], "complete->claimed": [], "analysis": []}
    try:
        warm_up, paths = studies[-1]  # the worker process starts and loads the model: not measured
        storescu(settings, paths)
        wait_analysed(settings, [warm_up])
        for study_uid, paths in studies[:-1]:
            storescu(settings, paths)
            row = wait_analysed(settings, [study_uid])[0]
            hops["total"].append(row.analysed_at - row.last_received - settings.quiet_period_s)
            hops["last instance->complete"].append(row.completed_at - row.last_received)
            # scheduler + broker (a fast worker may claim before queued_at is even written)
            hops["complete->claimed"].append(row.analysis_started - row.completed_at)
            hops["analysis"].append(row.analysed_at - row.analysis_started)
    finally:
        node.stop()
    return hops


def in_process(settings: Settings, studies: list[tuple[str, list[Path]]]) -> list[float]:
    """The peer: analyse_study on the same studies, model loaded once, no queue."""
    model = OnnxModel(settings.model_path, settings.execution_provider, settings.batch_size)
    ledger = Ledger(settings.ledger_path, durable=False)
    times = []
    try:
        for study_uid, _ in studies[:-1]:  # the same studies latencies() measured
            instances = ledger.instances(study_uid)
            assert instances and instance_path(settings.spool_dir, study_uid, instances[0].sop_instance_uid).is_file()
            analyse_study(settings, model, study_uid, 1, instances)  # warm: file cache, ONNX Runtime arenas
            start = time.perf_counter()
            analyse_study(settings, model, study_uid, 1, instances)
            times.append(time.perf_counter() - start)
    finally:
        ledger.close()
    return times


def wait_queued(settings: Settings, study_uids: list[str], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while any(row is None or row.state != "queued" for row in ledger_rows(settings, study_uids)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"studies not queued within {timeout} s")
        time.sleep(0.05)


def throughput(settings: Settings, studies: list[tuple[str, list[Path]]], log: Path) -> float:
    """Images per second in steady state, every study already waiting in the
    (embedded, persistent) queue: a node without workers receives and queues them,
    then a node with ``settings.workers`` processes drains it. The span runs from the
    :func:`warm_studies`-th study's objects in the outbox (reported: a worker with a
    report lane is done with a study only then) to the last's."""
    receiving = serve(settings.model_copy(update={"workers": 0}), log)
    try:
        for _, paths in studies:
            storescu(settings, paths)
        wait_queued(settings, [uid for uid, _ in studies])
    finally:
        receiving.stop()
    node = serve(settings, log)
    try:
        rows = wait_analysed(settings, [uid for uid, _ in studies], stamp="reported_at")
    finally:
        node.stop()
    reported = sorted(r.reported_at or 0.0 for r in rows)
    warm = warm_studies(len(studies))
    return (len(studies) - warm) * len(studies[0][1]) / (reported[-1] - reported[warm - 1])


def warm_studies(count: int) -> int:
    """The studies a throughput run leaves out as its start: each process's first
    study builds the objects' prototypes, and a second pool process may take its
    first study a second after the first does (the peer is timed warm too)."""
    return max(1, min(8, count // 4))


def throughput_round(folder: Path, studies: list[tuple[str, list[Path]]]) -> tuple[float, float]:
    """One round: each configuration's throughput on ``studies`` (a node of its own),
    then the analysis stage alone on them; prints them and returns one worker (default
    settings) / analysis alone and two workers / one (no lanes)."""
    folder.mkdir(parents=True)
    configs = {  # (worker processes, setting report_processes): the node's settings
        (n, lanes): node_settings(folder / f"{n}-{lanes}", workers=n, report_processes=lanes)
        for n, lanes in ((1, "auto"), (1, 0), (2, 0), (2, "auto"))
    }
    runs = {key: throughput(config, studies, folder / f"{key[0]}-{key[1]}.log") for key, config in configs.items()}
    alone = statistics.median(in_process(configs[(1, "auto")], studies)) / len(studies[0][1])
    print(
        f"  {folder.name}: analysis stage alone (in this process: no queue, no objects) {alone * 1000:5.1f} ms per image"
    )
    for (n, lanes), rate in runs.items():
        print(
            f"    {n} worker process{'es' if n > 1 else '':2s} report_processes {lanes!s:4s} "
            f"({lane_count(configs[(n, lanes)], n)} lane(s) each) {rate:7.1f} images/s   "
            f"{rate * alone:.2f} x the analysis stage alone"
        )
    return runs[(1, "auto")] * alone, runs[(2, 0)] / runs[(1, 0)]


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:7.0f} ms   p95 {np.percentile(values, 95) * 1000:7.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--throughput-studies", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds; the targets use their medians")
    parser.add_argument("--keep", type=Path, help="Keep the data folders and logs here.")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="sonocase-bench-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        studies = make_studies(work / "studies", args.studies + 1, args.images, first_seed=5000)  # +1 warm-up
        embedded = node_settings(work / "embedded")
        redis = PrivateRedis(work / "redis")
        try:
            distributed = node_settings(work / "redis-node", broker_url=redis.url)
            results = {
                "embedded broker": latencies(embedded, studies, work / "embedded.log"),
                "Redis broker": latencies(distributed, studies, work / "redis.log"),
            }
        finally:
            redis.stop()
        peer = in_process(embedded, studies)

        print(
            f"\nlast C-STORE -> result in ledger, {args.studies} studies of {args.images} images, "
            f"quiet period ({QUIET_S} s) excluded, model {embedded.model_path.name}, 1 worker process"
        )
        print(f"  {'in-process analyse_study (peer)':34s} {summary(peer)}")
        for mode, hops in results.items():
            print(
                f"  {mode:34s} {summary(hops['total'])}   ratio to peer (median) "
                f"{statistics.median(hops['total']) / statistics.median(peer):5.1f}x"
            )
            print(
                "      "
                + "   ".join(f"{hop} {statistics.median(v) * 1000:.0f} ms" for hop, v in hops.items() if hop != "total")
            )
        for mode, hops in results.items():
            lag = statistics.median(hops["last instance->complete"]) - QUIET_S
            print(
                f"  target: completion lag beyond the quiet period ({mode}) {lag * 1000:.0f} ms "
                f"<= {TARGET_COMPLETION_LAG_S * 1000:.0f} ms: {verdict(lag <= TARGET_COMPLETION_LAG_S)}"
            )

        bulk = make_studies(work / "bulk", args.throughput_studies, args.images, first_seed=9000)
        print(
            f"\nthroughput, {args.throughput_studies} studies of {args.images} images waiting in the queue, "
            f"from reported study {warm_studies(args.throughput_studies)} to the last "
            f"(embedded broker; analysis + all result objects per study; {available_cores()} cores)"
        )
        shares, scalings = [], []
        for r in range(1, args.rounds + 1):
            share, scaling = throughput_round(work / f"round-{r}", bulk)
            shares.append(share)
            scalings.append(scaling)
        share, scaling = statistics.median(shares), statistics.median(scalings)
        print(
            f"  target: one worker (the default settings) / analysis stage alone, median of {args.rounds} "
            f"round(s) {share:.2f} >= {TARGET_MODEL_SHARE}: {verdict(share >= TARGET_MODEL_SHARE)}"
        )
        print(
            f"  target: two workers / one, a process per worker (no lanes), median of {args.rounds} "
            f"round(s) {scaling:.2f} >= {TARGET_SCALING}: {verdict(scaling >= TARGET_SCALING)}"
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
