"""GPU benchmark: images/s of the model on ONNX Runtime's CUDA provider, with the CPU
provider of the same machine beside it.

Two models, each with Grad-CAM in the graph (the node's interface): the shipped one
(onnx_models/, its card's input size) and a full-width (1.0) 224x224 hybrid with
fresh weights (speed does not depend on their values), exported here with the
project's own exporter. Batches of 1, 8 and 64.

The CUDA provider must really run the graph: ONNX Runtime quietly falls back to the
CPU for any operator its CUDA provider lacks, so the sessions are made with that
fall-back switched off (``session.disable_cpu_ep_fallback``) and the benchmark stops
if CUDA is not the session's first provider. Run through bench/gpu.sh, which
installs onnxruntime-gpu first.

    python bench/gpu.py [--batches 1 8 64] [--rounds 20] [--cpu-rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--cpu-rounds", type=int, default=3)
    args = parser.parse_args()
    if CUDA not in ort.get_available_providers():
        raise SystemExit(
            f"ONNX Runtime {ort.__version__} has no CUDA provider here ({ort.get_available_providers()}): "
            "install onnxruntime-gpu on a machine with an NVIDIA GPU (bench/gpu.sh does)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        models = [
            ("shipped", SHIPPED, ModelCard.load(SHIPPED).input.height),
            ("hybrid w1.0 224", full_width_model(Path(tmp)), 224),
        ]
        print(f"onnxruntime {ort.__version__}, device {ort.get_device()}")
        print(f"{'model':<18}{'batch':>6}{'CUDA img/s':>12}{'CPU img/s':>11}{'CUDA/CPU':>10}")
        for name, path, size in models:
            gpu, cpu = session(path, CUDA), session(path, CPU)
            for batch in args.batches:
                on_gpu = images_per_second(gpu, size, batch, args.rounds)
                on_cpu = images_per_second(cpu, size, batch, args.cpu_rounds)
                print(f"{name:<18}{batch:>6}{on_gpu:>12.1f}{on_cpu:>11.1f}{on_gpu / on_cpu:>10.1f}")


if __name__ == "__main__":
    main()
