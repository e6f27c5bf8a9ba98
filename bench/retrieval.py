"""Benchmark the similar-case index against exact numpy search, in the same run.

For each size (10k, 100k, and 1M with ``--sizes``), N clustered 256-d unit vectors
(:class:`Clusters`: a few hundred Gaussian clusters on the unit sphere, by default
shaped like the shipped model's embeddings; ``--shape isotropic`` is a near worst
case) are added to a :class:`~service.similar.index.SimilarCaseIndex`, and 1,000 new
queries from the same distribution are answered three ways:

* hnswlib, the index's saved graph, one query at a time on one thread, at each ef
  of ``--ef`` (the index's default ef marked ``*``): recall@10 of the image ids
  against exact search (and counting ties with the 10th, see TIE_EPSILON), latency
  p50/p99;
* exact numpy search, one query at a time (matrix-vector product + argpartition,
  one BLAS thread; timed on the first 200 queries): latency p50/p99, and batched
  (matmul of 100 queries at a time): time per query;
* the whole ``SimilarCaseIndex.query`` (5 studies, own study excluded, SQLite side
  table), p50/p99; its file column is the side table's size.

Also build time (ours: the real ``add``, graph build on all cores + side table +
fsynced save; exact: writing the .npy), memory (ours: what a fresh process holds
after loading the graph; exact: the matrix) and file size.
Run: ``python bench/retrieval.py [--sizes 10000,100000,1000000]``.

``--quality MODEL.onnx`` measures retrieval quality through the node's whole path
instead (DICOM -> pixel preparation -> ONNX Runtime -> index -> studies): synthetic
reference studies (seed 1) are indexed with ``sonocase index``'s own code, and every
image of held-out synthetic studies (seed 2; the shipped model trained on seed 0)
asks for its 5 nearest studies. Relevant = same class; AP@5 is divided by
min(5, relevant studies in the index), as training/evaluate.py does per image.
"""

from __future__ import annotations

import os

# One BLAS thread: the exact search is timed per query on one thread, like hnswlib.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import hnswlib
import numpy as np
import pydicom

from service.results import ModelIdentity
from service.similar.index import DEFAULT_EF, IndexEntry, SimilarCaseIndex

MODEL = ModelIdentity(name="bench", version="0", sha256="0" * 64)
US_CLASS = "1.2.840.10008.5.1.4.1.1.6.1"
IMAGES_PER_STUDY = 4
K = 10
#: A returned neighbour within this distance of the true k-th one counts as found in
#: the tie-aware recall (ann-benchmarks' convention): with a million images, the
#: 10th and 11th nearest are often equally near, and which one comes back is luck.
TIE_EPSILON = 1e-3
#: Exact one-query latency is timed on this many queries (each costs ~0.2 s at 1M).
EXACT_TIMED = 200


#: Directions a low-rank cluster spreads along, and its isotropic share of the spread.
RANK = 32
ISOTROPIC_SHARE = 0.1


@dataclass(frozen=True)
class Clusters:
    """Gaussian clusters around random unit centres; samples are normalised.

    ``lowrank``: each cluster spreads along its own RANK random directions with
    standard deviations falling as 1/i, plus a little isotropic noise. That is the
    shape of the shipped model's embeddings of synthetic images: 90 % of a class's
    variance lies in about 7 principal components and 95 % in about 11 (1/i over 32
    directions gives 7 and 12); image embeddings have a low intrinsic dimension.
    ``isotropic``: the spread fills all dimensions, so within a cluster the points
    are as hard to tell apart as uniform random vectors. ``spread`` is the expected
    norm of a point's offset from its centre.
    """

    centres: np.ndarray  # [C, D]
    bases: np.ndarray  # [C, RANK, D] orthonormal rows (unused when isotropic)
    scales: np.ndarray  # [RANK] standard deviation along each direction
    noise: float  # standard deviation per dimension of the isotropic part

    @classmethod
    def make(cls, shape: str, clusters: int, dim: int, spread: float, rng: np.random.Generator) -> Clusters:
        centres = rng.standard_normal((clusters, dim))
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        if shape == "isotropic":
            return cls(centres, np.zeros((clusters, 0, dim)), np.zeros(0), spread / np.sqrt(dim))
        bases = np.stack([np.linalg.qr(rng.standard_normal((dim, RANK)))[0].T for _ in range(clusters)])
        falling = 1.0 / np.arange(1, RANK + 1)
        scales = spread * np.sqrt(1 - ISOTROPIC_SHARE**2) * falling / np.linalg.norm(falling)
        return cls(centres, bases, scales, spread * ISOTROPIC_SHARE / np.sqrt(dim))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        dim = self.centres.shape[1]
        which = rng.integers(len(self.centres), size=n)
        rows = self.centres[which] + self.noise * rng.standard_normal((n, dim))
        if self.scales.size:
            order = np.argsort(which, kind="stable")
            starts = np.searchsorted(which[order], np.arange(len(self.centres) + 1))
            for c in range(len(self.centres)):
                members = order[starts[c] : starts[c + 1]]
                rows[members] += (rng.standard_normal((len(members), self.scales.size)) * self.scales) @ self.bases[c]
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


_LOAD_RSS = """
import sys, hnswlib
def rss():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')) / 1024
before = rss()
graph = hnswlib.Index(space='l2', dim=int(sys.argv[2]))
graph.load_index(sys.argv[1])
print(rss() - before)
"""


def graph_memory_mb(path: Path, dim: int) -> float:
    """Resident memory a fresh process needs to hold the loaded graph."""
    out = subprocess.run(
        [sys.executable, "-c", _LOAD_RSS, str(path), str(dim)], check=True, capture_output=True, text=True
    )
    return float(out.stdout)


def exact_top(data: np.ndarray, queries: np.ndarray, k: int, batch: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest ids (largest dot product = smallest distance for unit vectors)
    and the Euclidean distance of each query's k-th neighbour."""
    ids = np.empty((len(queries), k), dtype=np.int64)
    kth = np.empty(len(queries))
    for start in range(0, len(queries), batch):
        sims = queries[start : start + batch] @ data.T
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        top = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-top, axis=1)
        ids[start : start + batch] = np.take_along_axis(part, order, axis=1)
        kth[start : start + batch] = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * top.min(axis=1).astype(np.float64)))
    return ids, kth


def percentiles_ms(seconds: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.asarray(seconds) * 1000, [50, 99])
    return float(p50), float(p99)


@dataclass
class Row:
    method: str
    recall: float | None
    recall_ties: float | None
    p50_ms: float
    p99_ms: float
    build_s: float | None = None
    memory_mb: float | None = None
    file_mb: float | None = None


def bench_size(n: int, args: argparse.Namespace, workdir: Path) -> list[Row]:
    rng = np.random.default_rng(args.seed)
    clusters = Clusters.make(args.shape, args.clusters, args.dim, args.spread, rng)
    data = clusters.sample(n, rng)
    queries = clusters.sample(args.queries, rng)
    rows: list[Row] = []

    # --- exact numpy search ---------------------------------------------------
    truth, kth = exact_top(data, queries, K)
    exact_times = []
    for q in queries[:EXACT_TIMED]:
        t = time.perf_counter()
        sims = data @ q
        part = np.argpartition(-sims, K)[:K]
        part[np.argsort(-sims[part])]
        exact_times.append(time.perf_counter() - t)
    t = time.perf_counter()
    exact_top(data, queries, K)
    batched_per_query = (time.perf_counter() - t) / len(queries)
    npy = workdir / f"exact-{n}.npy"
    t = time.perf_counter()
    np.save(npy, data)
    save_s = time.perf_counter() - t
    rows.append(
        Row(
            "exact numpy, 1 query",
            1.0,
            1.0,
            *percentiles_ms(exact_times),
            build_s=save_s,
            memory_mb=data.nbytes / 2**20,
            file_mb=npy.stat().st_size / 2**20,
        )
    )
    rows.append(Row("exact numpy, batch of 100", 1.0, 1.0, batched_per_query * 1000, batched_per_query * 1000))
    npy.unlink()

    # --- our index: build through the real add() --------------------------------
    directory = workdir / f"index-{n}"
    entries = [
        IndexEntry(
            embedding=v,
            sop_instance_uid=f"2.25.{i}",
            series_uid=f"2.25.1{i // IMAGES_PER_STUDY}",
            study_uid=f"2.25.2{i // IMAGES_PER_STUDY}",
            sop_class_uid=US_CLASS,
            label="benign",
            label_source="radiologist",
            confirmed=True,
        )
        for i, v in enumerate(data)
    ]
    index = SimilarCaseIndex(directory, MODEL)
    t = time.perf_counter()
    index.add(entries)
    build_s = time.perf_counter() - t
    del entries
    info = index.info()
    graph_file = next(directory.glob("vectors-*.hnsw"))

    graph_mb = graph_memory_mb(graph_file, args.dim)
    graph = hnswlib.Index(space="l2", dim=args.dim)
    graph.load_index(str(graph_file))
    for ef in args.ef:
        graph.set_ef(ef)
        labels, squared = graph.knn_query(queries, k=K, num_threads=1)
        recall = float(
            np.mean([len(set(a) & set(b)) / K for a, b in zip(labels.tolist(), truth.tolist(), strict=True)])
        )
        recall_ties = float(np.mean(np.sqrt(np.maximum(squared, 0)) <= kth[:, None] + TIE_EPSILON))
        times = []
        for q in queries:
            t = time.perf_counter()
            graph.knn_query(q, k=K, num_threads=1)
            times.append(time.perf_counter() - t)
        mark = "*" if ef == DEFAULT_EF else ""
        rows.append(
            Row(
                f"hnswlib ef={ef}{mark}",
                recall,
                recall_ties,
                *percentiles_ms(times),
                build_s=build_s,
                memory_mb=graph_mb,
                file_mb=info.vectors_bytes / 2**20,
            )
        )
    del graph

    times = []
    for i, q in enumerate(queries):
        t = time.perf_counter()
        found = index.query(q, 5, exclude_study_uid=f"2.25.2{i}")
        times.append(time.perf_counter() - t)
        assert len(found) == 5
    rows.append(
        Row(
            f"SimilarCaseIndex.query ef={DEFAULT_EF}, 5 studies",
            None,
            None,
            *percentiles_ms(times),
            file_mb=sum(p.stat().st_size for p in directory.glob("index.sqlite3*")) / 2**20,
        )
    )
    index.close()
    return rows


def retrieval_quality(model: Path, per_class: int, workdir: Path) -> dict[str, float]:
    """mAP@5, precision@5 and ACC@1 of held-out synthetic images against the index."""
    from service.datasets.synthetic import write_dicom_dataset
    from service.settings import load_settings
    from service.similar.references import (
        ReferenceEmbedder,
        dicom_files,
        fill_index,
        read_labels_csv,
    )

    settings = load_settings(data_dir=workdir / "data", model_path=model, execution_provider="cpu", durability="none")
    embedder = ReferenceEmbedder(settings)
    _, reference_csv = write_dicom_dataset(workdir / "reference", per_class, seed=1)
    _, query_csv = write_dicom_dataset(workdir / "queries", per_class, seed=2)
    reference = read_labels_csv(reference_csv, embedder.card.classes)
    truth = read_labels_csv(query_csv, embedder.card.classes)
    studies_of = {label: sum(d.label == label for d in reference.values()) for label in embedder.card.classes}
    ap, precision, top1 = [], [], []
    with SimilarCaseIndex.from_settings(settings, embedder.identity) as index:
        fill_index(index, embedder.embed, dicom_files(workdir / "reference"), reference)
        for path in dicom_files(workdir / "queries"):
            ds = pydicom.dcmread(path)
            result = embedder.embed([ds])[0]
            if isinstance(result, str):
                raise ValueError(f"{path}: {result}")
            label = truth[ds.StudyInstanceUID].label
            found = index.query(result[0], 5, exclude_study_uid=ds.StudyInstanceUID)
            relevant = np.array([hit.label == label for hit in found], dtype=float)
            precision_at_i = np.cumsum(relevant) / np.arange(1, len(relevant) + 1)
            ap.append(float((precision_at_i * relevant).sum() / max(1, min(5, studies_of[label]))))
            precision.append(float(relevant.sum() / 5))
            top1.append(float(relevant[0]))
    return {
        "images": len(ap),
        "reference studies": len(reference),
        "map@5": float(np.mean(ap)),
        "precision@5": float(np.mean(precision)),
        "acc@1": float(np.mean(top1)),
    }


def _cell(value: float | None, width: int, spec: str) -> str:
    return format(value, spec).rjust(width) if value is not None else "-".rjust(width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated; add 1000000 for the 1M run")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=300)
    parser.add_argument(
        "--shape", choices=("lowrank", "isotropic"), default="lowrank", help="how clusters spread (see Clusters)"
    )
    parser.add_argument("--spread", type=float, default=0.3, help="offset norm around a centre (centres have norm 1)")
    parser.add_argument(
        "--ef", type=lambda s: [int(v) for v in s.split(",")], default=sorted({32, 64, DEFAULT_EF, 256})
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where indexes are built (default: a temp dir)")
    parser.add_argument(
        "--quality",
        type=Path,
        default=None,
        metavar="MODEL.onnx",
        help="measure retrieval quality with this model instead of speed",
    )
    parser.add_argument("--per-class", type=int, default=100, help="--quality: synthetic images per class")
    args = parser.parse_args()
    if args.quality is not None:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            quality = retrieval_quality(args.quality, args.per_class, Path(tmp))
        print(f"retrieval quality of {args.quality} (held-out synthetic images -> 5 nearest reference studies):")
        for name, value in quality.items():
            print(f"  {name:20} {value:.4f}" if isinstance(value, float) else f"  {name:20} {value}")
        return
    print(
        f"{args.queries} queries, {args.dim}-d, {args.clusters} {args.shape} clusters (spread {args.spread}), "
        f"recall@{K} of image ids against exact search; latencies on one thread; "
        f"{os.cpu_count()} CPU cores for the build"
    )
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            rows = bench_size(n, args, Path(tmp))
            exact_p50 = rows[0].p50_ms
            print(f"\n== {n:,} stored embeddings ==")
            print(
                f"{'method':40} {'recall@10':>9} {'with ties':>9} {'p50 ms':>9} {'p99 ms':>9} {'x exact p50':>11} "
                f"{'build s':>8} {'memory MB':>9} {'file MB':>8}"
            )
            for r in rows:
                print(
                    f"{r.method:40} {_cell(r.recall, 9, '.4f')} {_cell(r.recall_ties, 9, '.4f')} "
                    f"{r.p50_ms:9.3f} {r.p99_ms:9.3f} "
                    f"{exact_p50 / r.p50_ms:11.1f} {_cell(r.build_s, 8, '.1f')} {_cell(r.memory_mb, 9, '.0f')} "
                    f"{_cell(r.file_mb, 8, '.1f')}"
                )
            chosen = next((r for r in rows if r.method.endswith("*")), None)
            if chosen is None:
                continue
            print(
                f"ef={DEFAULT_EF}: recall@10 {chosen.recall:.4f} ({chosen.recall_ties:.4f} with ties; target >= 0.99), "
                f"p50 {exact_p50 / chosen.p50_ms:.0f}x faster than exact one-query search, "
                f"{rows[1].p50_ms / chosen.p50_ms:.0f}x faster than batched exact (target >= 50x at 1M)"
            )


if __name__ == "__main__":
    main()
