"""The row LSTM the exported Grad-CAM graph runs: the same last hidden state as the
model's LSTM, and a hand-written backward equal to autograd's."""

from __future__ import annotations

import pytest
import torch

from training.export_lstm import ExportedRowLSTM
from training.models import ModelConfig, build_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.mark.parametrize(("arch", "height", "width"), [("hybrid", 4, 4), ("rnn", 64, 1)])
def test_the_exported_lstm_equals_autograd(arch: str, height: int, width: int) -> None:
    """The hybrid reads 4 rows of its last conv map; the pixel-row RNN 64 pixel rows."""
    torch.manual_seed(0)
    config = ModelConfig(arch=arch, width=0.125, size=32 * height if arch == "hybrid" else height, rnn_hidden=24)
    rows = build_model(config).eval().rows
    exported = ExportedRowLSTM(rows)
    # larger inputs than Kaiming init gives: some gates saturate, some do not
    fmap = 3 * torch.randn(3, rows.rnn.input_size // width, height, width)
    leaf, exported_leaf = fmap.clone().requires_grad_(True), fmap.clone().requires_grad_(True)
    expected, got = rows(leaf), exported(exported_leaf)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    grad = torch.randn_like(expected)
    (expected_input_grad,) = torch.autograd.grad(expected, leaf, grad)
    (input_grad,) = torch.autograd.grad(got, exported_leaf, grad)
    assert expected_input_grad[:, :, -2].abs().amax() > 1e-3  # it passes the recurrence back
    torch.testing.assert_close(input_grad, expected_input_grad, atol=1e-6, rtol=1e-4)


def test_a_gru_or_bidirectional_lstm_is_not_taken() -> None:
    for config in (ModelConfig(width=0.125, rnn_type="gru"), ModelConfig(width=0.125, bidirectional=True)):
        rows = build_model(config).rows
        assert not ExportedRowLSTM.handles(rows)
        with pytest.raises(ValueError, match="one-directional LSTM"):
            ExportedRowLSTM(rows)
