"""Inference benchmark: what Grad-CAM costs, in PyTorch and in ONNX Runtime.

One model (same weights everywhere), batch sizes 1 and 8, five ways measured in
the same run, interleaved round by round so a busy machine slows all alike:

  torch forward    eager PyTorch, the forward pass (no_grad): probabilities +
                   embedding (+ lesion mask where the model has a segmentation head)
  torch grad-cam   eager PyTorch, the same + Grad-CAM (autograd)
  ort classify     ONNX Runtime, probabilities + embedding only (no mask, no heatmap)
  ort forward      ONNX Runtime, the forward pass: the shipped graph's outputs less the
                   heatmap (probabilities + embedding + lesion mask)
  ort grad-cam     ONNX Runtime, the shipped export with Grad-CAM in the graph

Prints median ms/image and the ratios against the targets: ORT Grad-CAM at most
1.15x ORT forward, and at least 1.3x faster than PyTorch Grad-CAM; ORT Grad-CAM over
ORT classify is printed beside them (for a segmenting model it includes the mask).

    python bench/inference.py                      # architecture of the shipped card
    python bench/inference.py --model runs/x/model.pt --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.model_card import ModelCard
from training.export import Forward, export_onnx, fold_batch_norm
from training.gradcam import ExplainedModel
from training.models import ModelConfig, SonoModel, build_model
from training.train import load_trained

SHIPPED = Path(__file__).resolve().parents[1] / "onnx_models" / "sonocase-hybrid.onnx"
TARGET_GRADCAM_OVER_FORWARD = 1.15
TARGET_SPEEDUP_OVER_TORCH = 1.3


def model_from_card(card_path: Path) -> SonoModel:
    """The shipped card's architecture with fresh (Kaiming) weights: timing does not
    depend on the weight values, and the trained PyTorch weights are not shipped."""
    card = ModelCard.load(card_path)
    fields = set(ModelConfig.__dataclass_fields__)
    config = ModelConfig(**{k: v for k, v in card.hyperparameters.items() if k in fields})  # type: ignore[arg-type]
    torch.manual_seed(0)
    return build_model(config).eval()


def measure(runners: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each runner, interleaved round by round."""
    for run in runners.values():  # warm-up: first calls allocate and plan
        run()
        run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def without_mask(model: SonoModel) -> SonoModel:
    """The same weights without the segmentation head: the classification-only pass."""
    bare = build_model(dataclasses.replace(model.config, segmentation=False))
    bare.load_state_dict(model.state_dict(), strict=False)
    return bare.eval()


def _runners(
    eager: SonoModel,
    explained: ExplainedModel,
    sessions: dict[str, ort.InferenceSession],
    x: torch.Tensor,
) -> dict[str, Callable[[], object]]:
    """The five ways to get one batch's results (see the module docstring)."""
    target = torch.full((len(x),), -1, dtype=torch.int64)
    image = {"image": x.numpy()}
    feeds = {**image, "target_class": target.numpy()}
    forward = Forward(eager)

    def torch_forward() -> object:
        with torch.inference_mode():
            return forward(x)

    return {
        "torch forward": torch_forward,
        "torch grad-cam": lambda: explained(x, target),
        "ort classify": lambda: sessions["classify"].run(None, image),
        "ort forward": lambda: sessions["forward"].run(None, image),
        "ort grad-cam": lambda: sessions["grad-cam"].run(None, feeds),
    }


def bench(model: SonoModel, batch_sizes: list[int], rounds: int, threads: int) -> list[dict[str, float]]:
    torch.set_num_threads(threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Runners take turns: a session's pool threads spinning after its run would take the
    # cores from the next runner (another session, or PyTorch) and charge it their time.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    size = model.config.size
    # eager PyTorch runs the BN-folded model too: both sides compute the same graph
    eager = fold_batch_norm(model)
    explained = ExplainedModel(eager)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: Path(tmp) / f"{name}.onnx" for name in ("classify", "forward", "grad-cam")}
        export_onnx(without_mask(model), paths["classify"], explain=False)
        export_onnx(model, paths["forward"], explain=False)
        export_onnx(model, paths["grad-cam"])
        sessions = {
            name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for name, path in paths.items()
        }
        rows = []
        for batch in batch_sizes:
            x = torch.from_numpy(
                np.random.default_rng(batch).standard_normal((batch, 1, size, size)).astype(np.float32)
            )
            seconds = measure(_runners(eager, explained, sessions, x), rounds)
            rows.append({"batch": batch, **{name: s * 1000 / batch for name, s in seconds.items()}})
    return rows


def report(rows: list[dict[str, float]], description: str, threads: int) -> str:
    names = ["torch forward", "torch grad-cam", "ort classify", "ort forward", "ort grad-cam"]
    lines = [
        f"# inference benchmark: {description}; {threads} thread(s); median ms/image",
        "",
        "| batch | "
        + " | ".join(names)
        + " | ort cam / ort fwd | ort cam / ort classify | torch cam / ort cam | torch fwd / ort fwd |",
        "|---" * 10 + "|",
    ]
    verdicts = []
    for row in rows:
        overhead = row["ort grad-cam"] / row["ort forward"]
        speedup = row["torch grad-cam"] / row["ort grad-cam"]
        lines.append(
            f"| {int(row['batch'])} | "
            + " | ".join(f"{row[n]:.2f}" for n in names)
            + f" | {overhead:.3f} | {row['ort grad-cam'] / row['ort classify']:.3f} | {speedup:.2f}"
            + f" | {row['torch forward'] / row['ort forward']:.2f} |"
        )
        verdicts.append(
            f"batch {int(row['batch'])}: ORT Grad-CAM {overhead:.3f}x ORT forward "
            f"(target <= {TARGET_GRADCAM_OVER_FORWARD}: {'met' if overhead <= TARGET_GRADCAM_OVER_FORWARD else 'MISSED'}), "
            f"{speedup:.2f}x faster than PyTorch Grad-CAM "
            f"(target >= {TARGET_SPEEDUP_OVER_TORCH}: {'met' if speedup >= TARGET_SPEEDUP_OVER_TORCH else 'MISSED'})"
        )
    return "\n".join([*lines, "", *verdicts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        type=Path,
        help="model.pt from 'sonocase train' (default: the shipped card's architecture with fresh weights)",
    )
    parser.add_argument("--card", type=Path, default=SHIPPED, help="ONNX file whose card names the architecture")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    model = load_trained(args.model).model if args.model else model_from_card(args.card)
    c = model.config
    description = f"{c.arch} width {c.width:g}, {c.size}x{c.size}" + ("" if args.model else " (shipped architecture)")
    rows = bench(model, args.batch, args.rounds, args.threads)
    print(report(rows, description, args.threads))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"description": description, "threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
