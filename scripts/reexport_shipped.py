"""Re-export the shipped model with the current export code, from the weights in its
own ONNX file (the training run's model.pt is not kept in the repository).

The folded torch model is rebuilt from the card's architecture and the ONNX file's
initializers (:func:`rebuild`; the layout of files whose row LSTM is
``training.export_lstm``'s one ONNX node: files of the earlier layout, with autograd's
unrolled LSTM, are no longer read), checked to reproduce every output of the old
file, exported again, checked against PyTorch (``check_export``), and
the pointing game and Dice of both files are computed on the card's held-out split:
the card keeps its metrics only where both files give the same numbers. The card's
sha256 and opset are updated; everything else in it is left as it was.

    python scripts/reexport_shipped.py onnx_models/sonocase-hybrid.onnx
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.model_card import ModelCard, card_path_for, sha256_file
from training.export import check_export, export_onnx, onnx_opset, write_card
from training.export_lstm import TORCH_GATES
from training.localisation import localisation_metrics, segmentation_metrics
from training.models import ModelConfig, SonoModel, build_model
from training.train import DataSource, Normalisation, class_counts, make_split, resize_images, to_tensor

#: The shipped file's initializers: the encoder's and segmentation head's under their own
#: names (``model.<name>``); the explainer's (from the first layer after the Grad-CAM map
#: on, the LSTM's aside) as ``explainer._param_constant<i>`` for its i-th parameter,
#: except these (name, stored transposed?), which the exporter's optimiser renamed.
RENAMED = {
    6: ("t", True),
    8: ("t_2", False),
}
#: The LSTM's weights as :class:`training.export_lstm.ExportedRowLSTM` holds them
#: (gates in ONNX's order, the two biases summed): its buffers ``w_x``, ``w_h``, ``bias``.
LSTM_BUFFERS = {
    "weight_ih_l0": "explainer._tensor_constant0",
    "weight_hh_l0": "explainer._tensor_constant1",
    "bias_ih_l0": "explainer._tensor_constant2",
}


def _initializer(weights: dict[str, np.ndarray], name: str, explained: list[str]) -> np.ndarray:
    """The value of the folded model's parameter ``name``; ``explained``: the explainer's
    parameters that the file numbers, in order."""
    if f"model.{name}" in weights:
        return weights[f"model.{name}"]
    rnn_name = name.rpartition(".rnn.")[2]
    if rnn_name == "bias_hh_l0":  # summed into bias_ih_l0: the gates see the same sum
        return np.zeros_like(weights[LSTM_BUFFERS["bias_ih_l0"]])
    if rnn_name in LSTM_BUFFERS:  # ONNX's gate blocks back in PyTorch's order
        blocks = np.split(weights[LSTM_BUFFERS[rnn_name]], 4)
        return np.concatenate([blocks[k] for k in TORCH_GATES])
    index = explained.index(name)
    key, transposed = RENAMED.get(index, (f"explainer._param_constant{index}", False))
    return weights[key].T if transposed else weights[key]


def rebuild(path: Path, card: ModelCard) -> SonoModel:
    """The card's architecture (batch-norm folded, as exported) with the file's weights."""
    from training.export import fold_batch_norm

    fields = set(ModelConfig.__dataclass_fields__)
    config = ModelConfig(**{k: v for k, v in card.hyperparameters.items() if k in fields})  # type: ignore[arg-type]
    if (config.arch, config.rnn_type, config.bidirectional, config.segmentation) != ("hybrid", "lstm", False, True):
        raise ValueError("this rebuild knows the initializer layout of the segmenting hybrid with one LSTM only")
    model = fold_batch_norm(build_model(config))
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    explained = [n for n, _ in model.named_parameters() if f"model.{n}" not in weights and ".rnn." not in n]
    state = {}
    for name, parameter in model.named_parameters():
        value = _initializer(weights, name, explained)
        if value.shape != tuple(parameter.shape):
            raise ValueError(f"{path}: {name} has shape {value.shape} in the file, needs {tuple(parameter.shape)}")
        state[name] = torch.from_numpy(np.array(value))
    model.load_state_dict(state)
    return model.eval()


def outputs(path: Path, x: np.ndarray, batch: int = 32) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    target = np.full(len(x), -1, np.int64)
    parts = [
        session.run(None, {"image": x[i : i + batch], "target_class": target[i : i + batch]})
        for i in range(0, len(x), batch)
    ]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def held_out(card: ModelCard) -> tuple[np.ndarray, list[np.ndarray | None], np.ndarray]:
    """The card's test split, regenerated: normalised images, lesion masks, labels."""
    hyper, counts = card.hyperparameters, card.training_data["counts"]
    if card.training_data["source"] != "synthetic":
        raise ValueError("only a model trained on the built-in synthetic set can regenerate its split here")
    per_class = sum(n for key, n in counts.items() if key.endswith("_normal"))  # the generator is balanced
    records = DataSource(kind="synthetic", synthetic_per_class=per_class, seed=int(hyper["seed"])).load()
    labels = np.array([r.label for r in records], dtype=np.int64)
    split = make_split(records, float(hyper["test_fraction"]), float(hyper["val_fraction"]), int(hyper["seed"]))
    if class_counts(labels, split) != counts:
        raise ValueError("the regenerated synthetic split is not the card's")
    images = resize_images([records[i] for i in split.test], card.input.height)
    x = to_tensor(images, Normalisation(card.input.mean, card.input.std)).numpy()
    return x, [records[i].mask for i in split.test], labels[split.test]


def scores(
    card: ModelCard, got: list[np.ndarray], masks: list[np.ndarray | None], labels: np.ndarray
) -> dict[str, Any]:
    """Pointing game (heatmap) and Dice (lesion mask) as the evaluation report has them."""
    assert card.segmentation is not None
    return {
        "localisation": localisation_metrics(got[2], masks, labels, card.classes),
        "segmentation": segmentation_metrics(got[3], masks, labels, card.classes, card.segmentation.threshold),
    }


def same(a: Any, b: Any, tolerance: float = 1e-6) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k], tolerance) for k in a)
    if isinstance(a, float):
        return abs(a - b) <= tolerance
    return bool(a == b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("onnx", type=Path)
    path = parser.parse_args().onnx
    card = ModelCard.load(path)
    model = rebuild(path, card)
    x, masks, labels = held_out(card)
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old.onnx"
        shutil.copyfile(path, old)
        old_outputs = outputs(old, x)
        export_onnx(model, path)
        worst = check_export(model, path)
        new_outputs = outputs(path, x)
        before, after = scores(card, old_outputs, masks, labels), scores(card, new_outputs, masks, labels)
        differences = [float(np.abs(a - b).max()) for a, b in zip(old_outputs, new_outputs, strict=True)]
        print(json.dumps({"check_export": worst, "old_vs_new_max_abs": differences, "before": before, "after": after}))
        if not same(before, after):
            shutil.copyfile(old, path)
            raise SystemExit("the re-exported file scores differently on the held-out split; old file and card kept")
    raw = json.loads(card_path_for(path).read_text())
    write_card(ModelCard.model_validate({**raw, "sha256": sha256_file(path), "opset": onnx_opset(path)}), path)


if __name__ == "__main__":
    main()
