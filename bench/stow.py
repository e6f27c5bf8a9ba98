"""STOW-RS receiving against the C-STORE receiver, on the same files, in the same run.

The node's receiving side (the C-STORE receiver and the STOW-RS router on uvicorn,
sharing one store, as `sonocase serve` wires them) takes the same N (default 500)
~0.9 MB ultrasound instances with unique UIDs, round after round:

  (a) over DIMSE: DCMTK storescu, one association;
  (b) over STOW-RS: curl, one request per study of 50 instances, one connection.

Both are stored the same way (spool, ledger, durability as chosen). Prints
images/s (median over rounds) and the ratio (b)/(a).

    python bench/stow.py [--rounds 3] [--instances 500] [--durability fsync]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from ingest import STUDY_SIZE, make_instances, storescu

from service.ledger import open_ledger
from service.settings import load_settings
from tests.support.common import free_port
from tests.support.dicomweb import MULTIPART, TOKEN, ReceivingNode, multipart


def stow_bodies(files: list[Path], out: Path) -> list[Path]:
    """One multipart/related body per study (the files are in studies of STUDY_SIZE)."""
    bodies = []
    for start in range(0, len(files), STUDY_SIZE):
        body = out / f"study-{start // STUDY_SIZE:03d}.body"
        body.write_bytes(multipart([f.read_bytes() for f in files[start : start + STUDY_SIZE]]))
        bodies.append(body)
    return bodies


def curl_stow(url: str, bodies: list[Path]) -> float:
    """POST every body with one curl (one kept-alive connection); seconds taken."""
    args: list[str] = []
    for body in bodies:
        args += [
            "--next",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n",
            "-H",
            f"Content-Type: {MULTIPART}",
            "-H",
            f"Authorization: Bearer {TOKEN}",
            "--data-binary",
            f"@{body}",
            f"{url}/studies",
        ]
    start = time.perf_counter()
    proc = subprocess.run(["curl", *args[1:]], capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    codes = proc.stdout.split()
    if proc.returncode or codes != ["200"] * len(bodies):
        raise RuntimeError(f"curl: exit {proc.returncode}, HTTP {codes}: {proc.stderr[-2000:]}")
    return elapsed


def run_node(work: Path, count: int, durability: str, send: Callable[[ReceivingNode], float]) -> float:
    """A fresh receiving side in ``work``; ``send`` to it; seconds taken, checked
    that every instance was stored."""
    settings = load_settings(
        data_dir=work / "node",
        host="127.0.0.1",
        port=free_port(),
        http_port=0,
        durability=durability,
        web_token=TOKEN,
        max_pending_studies=count + 1,
        min_free_disk_mb=100,
        log_level="WARNING",
    )
    ledger = open_ledger(settings)
    node = ReceivingNode(settings, ledger)
    try:
        elapsed = send(node)
        stored = ledger.instance_count()
    finally:
        node.stop()
        ledger.close()
    if stored != count:
        raise RuntimeError(f"the node stored {stored} of {count} instances")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--durability", choices=("fsync", "none"), default="fsync")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: system temp)")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="sonocase-bench-stow-", dir=args.work))
    try:
        source = base / "instances"
        source.mkdir()
        files = make_instances(source, args.instances)
        bodies = stow_bodies(files, base)
        size_mb = sum(f.stat().st_size for f in files) / len(files) / 2**20
        targets: dict[str, Callable[[ReceivingNode], float]] = {
            "(a) C-STORE, storescu": lambda node: storescu(node.settings.port, "SONOCASE", files, 1),
            "(b) STOW-RS, curl": lambda node: curl_stow(node.url, bodies),
        }
        rates: dict[str, list[float]] = {name: [] for name in targets}
        for round_no in range(args.rounds):
            for name, send in targets.items():
                work = Path(tempfile.mkdtemp(dir=base))
                os.sync()  # the previous target's dirty pages must not slow this one
                rates[name].append(args.instances / run_node(work, args.instances, args.durability, send))
                shutil.rmtree(work)
                print(f"round {round_no + 1}: {name:24s} {rates[name][-1]:7.1f} images/s", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    median = {name: statistics.median(values) for name, values in rates.items()}
    print(
        f"\n{args.instances} instances of {size_mb:.2f} MB, durability {args.durability}, "
        f"{args.rounds} rounds, median images/s"
    )
    for name, value in median.items():
        print(f"  {name:24s} {value:7.1f}   ({min(rates[name]):.1f}-{max(rates[name]):.1f})")
    print(
        f"\n(b)/(a) = {median['(b) STOW-RS, curl'] / median['(a) C-STORE, storescu']:.2f}  "
        "(STOW-RS receiving against C-STORE receiving, same node, same files)"
    )


if __name__ == "__main__":
    main()
