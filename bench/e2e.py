"""End-to-end latency: from the last C-STORE of a study to its SR arriving at the
receiving PACS, against a plain DICOM peer measured in the same run.

Starts DCMTK's storescp as the receiving PACS and `sonocase serve` (one worker, the
shipped model, a small synthetic reference index) in a temporary folder, then sends
synthetic 4-image studies one at a time with DCMTK's storescu and times, for each,
the moment storescu finished (its last C-STORE answered) to the moment the SR file
appears in storescp's folder. The quiet period is subtracted: it is a configured
wait for more images, not work. Everything else counts: completion polling,
queueing, analysis, reports, the validation gate, the outbox and the C-STORE back.

The peer: the same study sent storescu -> storescp directly (one association, the
cost of the DICOM transfer alone). Prints median and p95 of both and their ratio.

    python bench/e2e.py [--studies 20] [--images 4] [--quiet 1.0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from service.settings import Settings, load_settings
from tests.support.common import free_port
from tests.support.reports import Storescp, start_storescp
from tests.support.worker import Process, serve, storescu, write_study

LABELS = ("normal", "benign", "malignant")
#: Issue 13's targets for a 4-image study, quiet period excluded.
TARGET_MEDIAN_S = 0.5
TARGET_P95_S = 1.0


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else values[0]


#: storescp runs this once a file is completely written (``--exec-on-reception``):
#: its folder shows a file as soon as the first byte is written, the marker only
#: once the whole object is there.
DONE = ".done"
ON_RECEPTION = ("--exec-on-reception", f"/usr/bin/touch #p/#f{DONE}")


def wait_for_sr(pacs: Storescp, study_uid: str, seen: set[str], timeout: float = 300.0) -> float:
    """Poll storescp's folder (5 ms) until a complete SR of ``study_uid`` is there;
    the time it was complete."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for marker in pacs.folder.iterdir():
            if marker.name in seen or not (marker.name.startswith("SR") and marker.name.endswith(DONE)):
                continue
            arrived = time.perf_counter()
            seen.add(marker.name)
            path = marker.with_name(marker.name.removesuffix(DONE))
            if pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID == study_uid:
                return arrived
        time.sleep(0.005)
    raise TimeoutError(f"no SR for {study_uid} within {timeout:.0f} s (see the node log)")


def measure(
    settings: Settings, pacs: Storescp, peer: Storescp, work: Path, studies: int, images: int, quiet: float
) -> tuple[list[float], list[float]]:
    """(ours, peer) seconds per study; the first study warms up and is not counted."""
    ours, theirs, seen = [], [], set()
    for n in range(studies + 1):
        study_uid, paths = write_study(work / f"study-{n}", images, LABELS[n % 3], seed=100 + n)
        start = time.perf_counter()
        storescu(settings, paths)
        sent = time.perf_counter()
        latency = wait_for_sr(pacs, study_uid, seen) - sent - quiet
        peer_settings = settings.model_copy(update={"port": peer.port, "ae_title": "STORESCP"})
        peer_start = time.perf_counter()
        storescu(peer_settings, paths)
        peer_time = time.perf_counter() - peer_start
        if n == 0:
            print(f"warm-up study: {latency:.2f} s (not counted; send took {sent - start:.2f} s)")
            continue
        ours.append(latency)
        theirs.append(peer_time)
        print(f"study {n:2d}: last C-STORE -> SR {latency:6.3f} s   storescu -> storescp {peer_time:6.3f} s")
    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--quiet", type=float, default=1.0, help="quiet period (s), subtracted")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (logs, objects)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="sonocase-bench-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    pacs_port = free_port()
    settings = load_settings(
        data_dir=work / "data",
        host="127.0.0.1",
        port=free_port(),
        http_port=0,
        quiet_period_s=args.quiet,
        workers=1,
        destinations=f"STORESCP@127.0.0.1:{pacs_port}",
    )
    index = Process(settings, "index", "build", "--synthetic", "2", log=work / "index.log")
    if index.proc.wait(600) != 0:
        raise SystemExit(f"index build failed:\n{index.log()[-3000:]}")
    pacs = start_storescp(work / "pacs", pacs_port, *ON_RECEPTION)
    peer = start_storescp(work / "peer", free_port(), "+xa")  # takes the JPEG images as sent
    node = serve(settings, work / "node.log")
    try:
        ours, theirs = measure(settings, pacs, peer, work, args.studies, args.images, args.quiet)
    finally:
        node.stop()
        pacs.stop()
        peer.stop()
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.studies} studies of {args.images} images, quiet period {args.quiet} s excluded")
    print(f"  last C-STORE -> SR at the PACS: median {statistics.median(ours):.3f} s, p95 {p95(ours):.3f} s")
    print(f"  peer storescu -> storescp:      median {statistics.median(theirs):.3f} s, p95 {p95(theirs):.3f} s")
    print(f"  ratio (ours / peer), median:    {statistics.median(ours) / statistics.median(theirs):.1f}x")
    median_ok, p95_ok = statistics.median(ours) <= TARGET_MEDIAN_S, p95(ours) <= TARGET_P95_S
    print(
        f"  target: median <= {TARGET_MEDIAN_S} s: {'met' if median_ok else 'NOT met'}; "
        f"p95 <= {TARGET_P95_S} s: {'met' if p95_ok else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
