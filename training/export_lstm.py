"""The row LSTM as the exported Grad-CAM graph runs it.

Traced through autograd, an LSTM unrolls into a dozen small ops per row forward and
twice as many backward: at batch 1 it is those ops' count, not their arithmetic, that
makes most of the heatmap's cost in ONNX Runtime. :class:`ExportedRowLSTM` computes
the same function and gradient with few ops: the forward pass is one ONNX ``LSTM`` node
(the ``sonocase::lstm_hidden`` op, translated by :data:`TRANSLATIONS`) and its backward
pass is written by hand: the gates of all rows recomputed at once from the hidden
states, then the rows walked back with six small ops each, and the input gradient of
every row taken in one matmul.
"""

from __future__ import annotations

from typing import Any

import torch
from onnxscript import opset18 as op
from torch import Tensor, nn
from torch.nn import functional as F

from training.models import RowRNN

#: PyTorch's LSTM gate blocks (i, f, g, o) in ONNX's order (i, o, f, c): the three
#: sigmoid gates side by side, the cell's candidate last.
ONNX_GATES = (0, 3, 1, 2)
#: ONNX's gate blocks in PyTorch's order.
TORCH_GATES = (0, 2, 3, 1)


def _blocks(weight: Tensor, order: tuple[int, ...]) -> Tensor:
    """``weight``'s four gate blocks (rows) in ``order``."""
    blocks = weight.chunk(4)
    return torch.cat([blocks[k] for k in order])


@torch.library.custom_op("sonocase::lstm_hidden", mutates_args=())
def lstm_hidden(x: Tensor, w: Tensor, r: Tensor, b: Tensor) -> Tensor:
    """Every hidden state [T, N, H] of a one-layer LSTM reading ``x`` [T, N, F] from a
    zero state, with ONNX's weights: input ``w`` [4H, F], recurrent ``r`` [4H, H] and
    the two biases summed, ``b`` [4H], gates in ONNX's order."""
    w_ih, w_hh, b_ih = (_blocks(t, TORCH_GATES) for t in (w, r, b))
    zeros = x.new_zeros(1, x.shape[1], r.shape[1])
    weights = (w_ih, w_hh, b_ih, torch.zeros_like(b_ih))
    hidden: Tensor = torch.lstm(x, (zeros, zeros), weights, True, 1, 0.0, False, False, False)[0]
    return hidden


@lstm_hidden.register_fake
def _lstm_hidden_shape(x: Tensor, w: Tensor, r: Tensor, b: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], x.shape[1], r.shape[1])


def _onnx_lstm_hidden(x: Any, w: Any, r: Any, b: Any) -> Any:
    """``lstm_hidden`` as ONNX's LSTM node. Its extra dimensions and zero recurrent
    bias are ops on constants, folded when ONNX Runtime loads the file: the file keeps
    one copy of the weights, which the hand-written backward reads too."""
    size = r.shape[1]
    bias = op.Unsqueeze(op.Pad(b, [0, 4 * size]), [0])
    y, _, _ = op.LSTM(x, op.Unsqueeze(w, [0]), op.Unsqueeze(r, [0]), bias, hidden_size=size)
    return op.Squeeze(y, [1])  # [T, directions = 1, N, H]


#: The ONNX exporter's translation of the op this module adds.
TRANSLATIONS = {torch.ops.sonocase.lstm_hidden.default: _onnx_lstm_hidden}


class _LastHidden(torch.autograd.Function):
    """``x`` [T, N, F] -> the last hidden state [N, H], with the hand-written backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lstm: ExportedRowLSTM) -> Tensor:
        hidden = torch.ops.sonocase.lstm_hidden(x, lstm.w_x, lstm.w_h, lstm.bias)
        ctx.save_for_backward(x, hidden)
        ctx.lstm = lstm
        return hidden[-1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        x, hidden = ctx.saved_tensors
        return ctx.lstm.input_gradient(x, hidden, grad), None


class ExportedRowLSTM(nn.Module):
    """A :class:`RowRNN` over a one-directional LSTM, for export: the same forward, and
    the gradient of the last hidden state with respect to the rows as
    :func:`ExportedRowLSTM.input_gradient` computes it."""

    def __init__(self, rows: RowRNN) -> None:
        super().__init__()
        if not self.handles(rows):
            raise ValueError("only a one-layer, one-directional LSTM without projection has this backward")
        self.rows = rows
        rnn = rows.rnn
        with torch.no_grad():
            self.register_buffer("w_x", _blocks(rnn.weight_ih_l0, ONNX_GATES))
            self.register_buffer("w_h", _blocks(rnn.weight_hh_l0, ONNX_GATES))
            self.register_buffer("bias", _blocks(rnn.bias_ih_l0 + rnn.bias_hh_l0, ONNX_GATES))

    @staticmethod
    def handles(rows: RowRNN) -> bool:
        rnn = rows.rnn
        return isinstance(rnn, nn.LSTM) and not rnn.bidirectional and rnn.num_layers == 1 and not rnn.proj_size

    def forward(self, fmap: Tensor) -> Tensor:
        last: Tensor = _LastHidden.apply(self.rows.sequence(fmap, time_major=True), self)
        return last

    def input_gradient(self, x: Tensor, hidden: Tensor, grad: Tensor) -> Tensor:
        """d (grad . h_T) / d x [T, N, F] for the input ``x`` [T, N, F] whose hidden
        states were ``hidden`` [T, N, H]: LSTM backpropagation through time, with
        everything that does not depend on the step before done for all steps at once."""
        size, steps = self.rows.rnn.hidden_size, x.shape[0]
        before = F.pad(hidden[:-1], (0, 0, 0, 0, 1, 0))  # the state each step starts from
        weights = torch.cat([self.w_x, self.w_h], dim=1).t()
        z = torch.addmm(self.bias, torch.cat([x, before], dim=2).flatten(0, 1), weights).view(steps, -1, 4 * size)
        sig_z, g_z = z.split([3 * size, size], dim=2)
        gates, g = torch.sigmoid(sig_z), torch.tanh(g_z)
        i, o, f = gates.split(size, dim=2)
        ig = i * g
        forget, inflow = f.split(1), ig.split(1)
        cells = [inflow[0]]
        for t in range(1, steps):
            cells.append(forget[t] * cells[-1] + inflow[t])
        cell = torch.cat(cells)
        tanh_cell = torch.tanh(cell)
        # d z (i, o, f, g) = (dc, dh, dc, dc) * scale, and dc = dh * cell_gain + dc_next * f_next
        scale = torch.cat(
            [
                torch.cat([g, tanh_cell, F.pad(cell[:-1], (0, 0, 0, 0, 1, 0))], dim=2) * (gates - gates * gates),
                i - ig * g,
            ],
            dim=2,
        ).split(1)
        cell_gain = (o - hidden * tanh_cell).split(1)  # o (1 - tanh^2 c); hidden = o tanh c
        dh, dc = grad.unsqueeze(0), None
        dz = []
        for t in reversed(range(steps)):
            dc = dh * cell_gain[t] if dc is None else dh * cell_gain[t] + dc * forget[t + 1]
            dz.append(torch.cat([dc, dh, dc, dc], dim=2) * scale[t])
            if t:
                dh = torch.bmm(dz[-1], self.w_h.unsqueeze(0))  # [1, N, 4H] x [1, 4H, H]: no reshapes
        return torch.cat(dz[::-1]) @ self.w_x
