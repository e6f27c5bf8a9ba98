"""Grad-CAM as part of the model's own forward pass.

:class:`ExplainedModel` returns, for a batch, exactly what the ONNX file returns
(``service.model_card``): probabilities, the L2-normalised embedding and the
Grad-CAM map of the target class. Keeping the gradient inside ``forward`` is what
lets ``training.export`` trace forward and backward into one ONNX graph, and the
same module is the PyTorch reference in evaluation plots and the benchmark.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.models import SonoModel

#: Below this peak a map counts as all zero (and stays zero instead of being blown up).
CAM_EPS = 1e-12


def grad_cam(fmap: Tensor, logits: Tensor, target: Tensor, *, create_graph: bool = False) -> Tensor:
    """Grad-CAM (Selvaraju et al.) of class ``target`` [N] on ``fmap`` [N, C, h, w],
    unscaled: ReLU(sum over channels of (spatial mean of d logit / d map) * map).

    ``create_graph`` keeps the gradient differentiable, so a training loss on the map
    (``training.train``'s localisation loss) can shape it; the exported graph and the
    reference maps use the plain gradient."""
    score = logits.gather(1, target.unsqueeze(1)).sum()
    (grads,) = torch.autograd.grad(score, fmap, create_graph=create_graph)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * fmap).sum(dim=1))


class ExplainedModel(nn.Module):
    """``(image [N,1,H,W], target_class [N]) -> (probabilities, embedding, gradcam)``.

    ``target_class`` -1 explains the predicted class; the map is :func:`grad_cam`
    scaled to [0, 1] per image.
    """

    def __init__(self, model: SonoModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor, target_class: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.enable_grad():
            # A fresh leaf: the gradient needs only the graph downstream of the map,
            # whether or not the weights require grad.
            fmap = self.model.features(image).detach().requires_grad_(True)
            embedding = self.model.embed(fmap)
            logits = self.model.head(embedding)
            target = torch.where(target_class < 0, logits.argmax(dim=1), target_class)
            cam = grad_cam(fmap, logits, target)
        cam = cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(CAM_EPS)
        return torch.softmax(logits, dim=1).detach(), F.normalize(embedding, dim=1).detach(), cam.detach()
