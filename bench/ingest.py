"""Ingest benchmark: how fast the receiver takes ultrasound instances, against peers
measured in the same run.

Sends the same N (default 500) ~0.9 MB ultrasound instances with unique UIDs over
one association, round after round, to

  (a) DCMTK storescp writing to disk (TCP_NODELAY=1: DCMTK at its best),
  (b) `sonocase serve` with durability "none",
  (c) `sonocase serve` with durability "fsync" (the default),
  (d) a tight Python loop that only writes and fsyncs the same files (the disk's ceiling),

(b) and (c) on each receiver engine (fast, stock), and again with several associations
at once. Prints images/s (median over rounds) and, per engine, the ratios (b)/(a)
(target >= 0.5), (c)/(d), and with several associations (c)/(b) (target >= 0.8: the
flush hidden by group commit).

    python bench/ingest.py [--rounds 3] [--instances 500] [--associations 4] [--engines fast,stock]
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
from functools import partial
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.support.common import free_port
from tests.support.dicom_peers import NodeProcess

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
SOURCE = "US1_UNCR.dcm"  # 640x480 RGB ultrasound, explicit VR little endian, 0.92 MB
STUDY_SIZE = 50


def make_instances(out: Path, count: int) -> list[Path]:
    """``count`` copies of a real ultrasound image with unique instance UIDs, in
    studies of ``STUDY_SIZE`` (a breast ultrasound study has tens of images)."""
    ds = dcmread(get_testdata_file(SOURCE))
    paths = []
    for n in range(count):
        if n % STUDY_SIZE == 0:
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = out / f"{n:04d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def storescu(port: int, called: str, files: list[Path], associations: int) -> float:
    """Send ``files`` split over ``associations`` concurrent storescu runs; seconds taken."""
    groups = [files[i::associations] for i in range(associations)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["/usr/bin/storescu", "-xe", "-aec", called, "127.0.0.1", str(port), *map(str, group)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for group in groups
    ]
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - start
    failed = [e.decode() for p, e in zip(procs, errors, strict=True) if p.returncode]
    if failed:
        raise RuntimeError(f"storescu failed: {failed[0][-2000:]}")
    return elapsed


def run_storescp(work: Path, files: list[Path]) -> float:
    out, port = work / "storescp", free_port()
    out.mkdir()
    proc = subprocess.Popen(["/usr/bin/storescp", "-od", str(out), str(port)], env=DCMTK_ENV)
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(
            ["/usr/bin/echoscu", "127.0.0.1", str(port)], env=DCMTK_ENV, capture_output=True, check=False
        ).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError("storescp did not start")
            time.sleep(0.05)
        elapsed = storescu(port, "STORESCP", files, 1)
        if len(list(out.iterdir())) != len(files):
            raise RuntimeError("storescp did not store every file")
        return elapsed
    finally:
        proc.terminate()
        proc.wait()


def run_node(work: Path, *, files: list[Path], engine: str, durability: str, associations: int) -> float:
    port, data = free_port(), work / f"node-{durability}"
    node = NodeProcess(
        {
            "SONOCASE_HOST": "127.0.0.1",
            "SONOCASE_PORT": str(port),
            "SONOCASE_DATA_DIR": str(data),
            "SONOCASE_DURABILITY": durability,
            "SONOCASE_HTTP_PORT": "0",
            "SONOCASE_WORKERS": "0",
            "SONOCASE_MAX_PENDING_STUDIES": str(len(files) + 1),
            "SONOCASE_LOG_LEVEL": "WARNING",
            "SONOCASE_RECEIVER_ENGINE": engine,
        },
        log=work / f"node-{durability}.log",
    )
    try:
        elapsed = storescu(port, "SONOCASE", files, associations)
    finally:
        code, log = node.stop()
    stored = sum(1 for _ in (data / "spool").glob("*/*.dcm"))
    if code or stored != len(files):
        raise RuntimeError(f"node stored {stored} of {len(files)} (exit {code}):\n{log[-2000:]}")
    return elapsed


def run_fsync_loop(work: Path, files: list[Path]) -> float:
    """The disk's ceiling for our durability promise: write each file and fsync it."""
    blobs = [f.read_bytes() for f in files]
    out = work / "loop"
    out.mkdir()
    start = time.perf_counter()
    for n, blob in enumerate(blobs):
        fd = os.open(out / f"{n}.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, blob)
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - start


def node_row(label: str, engine: str, associations: int) -> str:
    durability = "fsync off" if label == "(b)" else "fsync on"
    return f"{label} node {engine}, {durability}" + (f", {associations} assoc" if associations > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--engines", default="fast,stock")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: system temp)")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="sonocase-bench-", dir=args.work))
    try:
        source = base / "instances"
        source.mkdir()
        files = make_instances(source, args.instances)
        size_mb = sum(f.stat().st_size for f in files) / len(files) / 2**20
        n, engines = args.associations, args.engines.split(",")
        targets: dict[str, Callable[[Path], float]] = {
            "(a) storescp": lambda w: run_storescp(w, files),
            "(d) write+fsync loop": lambda w: run_fsync_loop(w, files),
        }
        for engine in engines:
            for label, durability in (("(b)", "none"), ("(c)", "fsync")):
                for assocs in (1, n):
                    name = node_row(label, engine, assocs)
                    targets[name] = partial(
                        run_node, files=files, engine=engine, durability=durability, associations=assocs
                    )
        rates: dict[str, list[float]] = {name: [] for name in targets}
        for round_no in range(args.rounds):
            for name, target in targets.items():
                work = Path(tempfile.mkdtemp(dir=base))
                os.sync()  # the previous target's dirty pages must not slow this one
                rates[name].append(args.instances / target(work))
                shutil.rmtree(work)
                print(f"round {round_no + 1}: {name:36s} {rates[name][-1]:7.1f} images/s", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"\n{args.instances} instances of {size_mb:.2f} MB, {args.rounds} rounds, median images/s")
    for name, value in median.items():
        spread = f"{min(rates[name]):.1f}-{max(rates[name]):.1f}"
        print(f"  {name:36s} {value:7.1f}   ({spread})")
    a, d = median["(a) storescp"], median["(d) write+fsync loop"]
    for engine in engines:

        def row(label: str, assocs: int, engine: str = engine) -> float:
            return median[node_row(label, engine, assocs)]

        print(f"\n{engine} engine:")
        print(f"  (b)/(a) = {row('(b)', 1) / a:.2f}  (target >= 0.5)")
        print(f"  (c)/(d) = {row('(c)', 1) / d:.2f}")
        print(
            f"  {n} associations: (c)/(b) = {row('(c)', n) / row('(b)', n):.2f}  (target >= 0.8), "
            f"(b)/(a) = {row('(b)', n) / a:.2f}"
        )


if __name__ == "__main__":
    main()
