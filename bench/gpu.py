"""GPU benchmark, three parts, each on CUDA with the CPU of the same machine beside it:

1. ``inference``: images/s of the model on ONNX Runtime's CUDA provider against its
   CPU provider, batches 1, 8 and 64. Two models, each with Grad-CAM in the graph
   (the node's interface): the shipped one (onnx_models/, its card's input size) and
   a full-width (1.0) 224x224 hybrid with fresh weights (speed does not depend on
   their values), exported here with the project's own exporter. The CUDA provider
   must really run the graph: ONNX Runtime quietly falls back to the CPU for any
   operator its CUDA provider lacks, so the sessions are made with that fall-back
   switched off (``session.disable_cpu_ep_fallback``) and the benchmark stops if CUDA
   is not the session's first provider.
2. ``pipeline``: the full pipeline's images/s (``sonocase serve`` with one worker
   process and its default report lanes: receive, queue, analysis, reports), studies
   waiting in the queue, with ``execution_provider = "cuda"`` against ``"cpu"``
   (bench/pipeline.py's throughput measurement), and each beside the analysis stage
   alone on the same provider: on a GPU the result objects set the pace.
3. ``training``: one epoch of the shipped model's architecture (its card's
   hyperparameters) on synthetic images, with torch on CUDA against the CPU.

A part whose CUDA side cannot run here (no CUDA provider in this ONNX Runtime, no
CUDA in this torch) prints ``skipped`` with the reason and runs its CPU side
anyway; the exit status is then 2, so a run without a GPU is never taken for a GPU
run. Run through bench/gpu.sh.

    python bench/gpu.py [--parts inference pipeline training] [--batches 1 8 64] [--rounds 20]
        [--cpu-rounds 3] [--studies 12] [--images 4] [--train-per-class 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from pipeline import in_process, make_studies, node_settings, throughput

from service.model_card import ModelCard

SHIPPED = ROOT / "onnx_models" / "sonocase-hybrid.onnx"
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def full_width_model(folder: Path) -> Path:
    """A VGG16 (width 1.0) + LSTM hybrid for 224x224 input, exported with Grad-CAM."""
    import torch  # training's exporter: only this script needs torch (CPU build is enough)

    from training.export import export_onnx, fold_batch_norm
    from training.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = fold_batch_norm(build_model(ModelConfig(width=1.0, size=224)).eval())
    path = folder / "hybrid-w1.0-224.onnx"
    export_onnx(model, path)
    return path


def session(path: Path, provider: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if provider == CUDA:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    made = ort.InferenceSession(str(path), options, providers=[provider])
    if made.get_providers()[0] != provider:
        raise SystemExit(f"{path.name}: asked for {provider}, ONNX Runtime gave {made.get_providers()}")
    return made


def images_per_second(sess: ort.InferenceSession, size: int, batch: int, rounds: int) -> float:
    rng = np.random.default_rng(0)
    feeds = {
        "image": rng.standard_normal((batch, 1, size, size), dtype=np.float32),
        "target_class": np.full(batch, -1, np.int64),
    }
    for _ in range(2):  # first calls allocate and plan (cuDNN picks its algorithms)
        sess.run(None, feeds)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def onnx_cuda_missing() -> str | None:
    """Why ONNX Runtime cannot run on CUDA here, or None when it can."""
    if CUDA in ort.get_available_providers():
        return None
    return (
        f"onnxruntime {ort.__version__} has no CUDA provider ({', '.join(ort.get_available_providers())}): "
        "install onnxruntime-gpu where there is an NVIDIA GPU"
    )


def row(*cells: Any) -> str:
    widths = (18, 6, 12, 11, 10)
    return "".join(f"{c:<{w}}" if k == 0 else f"{c:>{w}}" for k, (c, w) in enumerate(zip(cells, widths, strict=True)))


def ratio(on_gpu: float | None, on_cpu: float) -> str:
    return f"{on_gpu / on_cpu:.1f}" if on_gpu is not None else "-"


def rate(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "skipped"


def inference(args: argparse.Namespace, folder: Path) -> bool:
    """Part 1; True when its CUDA side ran."""
    missing = onnx_cuda_missing()
    print(f"\n1. inference: onnxruntime {ort.__version__}, device {ort.get_device()}")
    if missing:
        print(f"   CUDA skipped: {missing}")
    models = [
        ("shipped", SHIPPED, ModelCard.load(SHIPPED).input.height),
        ("hybrid w1.0 224", full_width_model(folder), 224),
    ]
    print(row("model", "batch", "CUDA img/s", "CPU img/s", "CUDA/CPU"))
    for name, path, size in models:
        gpu = session(path, CUDA) if not missing else None
        cpu = session(path, CPU)
        for batch in args.batches:
            on_gpu = images_per_second(gpu, size, batch, args.rounds) if gpu is not None else None
            on_cpu = images_per_second(cpu, size, batch, args.cpu_rounds)
            print(row(name, batch, rate(on_gpu), f"{on_cpu:.1f}", ratio(on_gpu, on_cpu)))
    return missing is None


def pipeline(args: argparse.Namespace, folder: Path) -> bool:
    """Part 2; True when its CUDA side ran."""
    missing = onnx_cuda_missing()
    print(f"\n2. full pipeline, {args.studies} studies of {args.images} images waiting, 1 worker process")
    if missing:
        print(f"   CUDA skipped: {missing}")
    studies = make_studies(folder / "studies", args.studies, args.images, first_seed=7000)
    measured: dict[str, tuple[float, float] | None] = {}  # images/s of the worker, analysis alone s/image
    for provider in ("cuda", "cpu"):
        if provider == "cuda" and missing:
            measured[provider] = None
            continue
        settings = node_settings(folder / provider, workers=1, execution_provider=provider)
        rate = throughput(settings, studies, folder / f"{provider}.log")
        alone = statistics.median(in_process(node_settings(folder / provider, execution_provider=provider), studies))
        measured[provider] = rate, alone / args.images
    print(f"   {'worker':<8}{'images/s':>10}{'analysis alone ms/image':>25}{'worker / analysis alone':>25}")
    for provider, found in measured.items():
        if found is None:
            print(f"   {provider:<8}{'skipped':>10}")
        else:
            print(f"   {provider:<8}{found[0]:>10.1f}{found[1] * 1000:>25.1f}{found[0] * found[1]:>25.2f}")
    cpu, gpu = measured["cpu"], measured["cuda"]
    assert cpu is not None
    print(f"   CUDA/CPU images/s: {ratio(gpu[0] if gpu else None, cpu[0])}")
    return missing is None


def training_epoch(args: argparse.Namespace, folder: Path) -> bool:
    """Part 3; True when its CUDA side ran."""
    import torch

    from training.models import ModelConfig
    from training.train import DataSource, TrainConfig, make_split, train

    missing = None if torch.cuda.is_available() else f"torch {torch.__version__} sees no CUDA device"
    hyper = ModelCard.load(SHIPPED).hyperparameters
    model_config = ModelConfig(**{f.name: hyper[f.name] for f in dataclasses.fields(ModelConfig) if f.name in hyper})
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"epochs", "initial_weights"}
    train_config = TrainConfig(epochs=1, **{k: v for k, v in hyper.items() if k in train_fields})
    source = DataSource(kind="synthetic", synthetic_per_class=args.train_per_class, seed=0)
    records = source.load()
    split = make_split(records, train_config.test_fraction, train_config.val_fraction, seed=0)
    print(
        f"\n3. one training epoch: {model_config.arch} width {model_config.width} at {model_config.size} px, "
        f"{len(split.fit)} synthetic images, batch {train_config.batch_size}"
    )
    if missing:
        print(f"   CUDA skipped: {missing}")
    seconds: dict[str, float | None] = {}
    for device in ("cuda", "cpu"):
        if device == "cuda" and missing:
            seconds[device] = None
            continue
        start = time.perf_counter()
        train(
            records,
            split,
            model_config,
            train_config,
            source,
            folder / device,
            progress=False,
            device=torch.device(device),
        )
        seconds[device] = time.perf_counter() - start
    print(f"   {'device':<8}{'epoch s':>9}{'images/s':>10}")
    for device, spent in seconds.items():
        if spent is None:
            print(f"   {device:<8}{'skipped':>9}")
        else:
            print(f"   {device:<8}{spent:>9.1f}{len(split.fit) / spent:>10.1f}")
    cpu, gpu = seconds["cpu"], seconds["cuda"]
    assert cpu is not None
    print(f"   CPU/CUDA epoch time: {cpu / gpu:.1f}" if gpu else "   CPU/CUDA epoch time: -")
    return missing is None


PARTS = {"inference": inference, "pipeline": pipeline, "training": training_epoch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--cpu-rounds", type=int, default=3)
    parser.add_argument("--studies", type=int, default=12, help="pipeline: studies waiting in the queue")
    parser.add_argument("--images", type=int, default=4, help="pipeline: images per study")
    parser.add_argument("--train-per-class", type=int, default=32, help="training: synthetic images per class")
    args = parser.parse_args()
    on_cuda = []
    with tempfile.TemporaryDirectory(prefix="sonocase-bench-gpu-") as tmp:
        for name in args.parts:
            started = time.perf_counter()
            on_cuda.append(PARTS[name](args, Path(tmp) / name))
            print(f"   ({name}: {time.perf_counter() - started:.0f} s)")
    if not all(on_cuda):
        print("\nbench/gpu.py: the CUDA side of some parts was skipped (see above): not a GPU run", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
