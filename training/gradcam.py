"""Grad-CAM as part of the model's own forward pass.

:class:`ExplainedModel` returns, for a batch, exactly what the ONNX file returns
(``service.model_card``): probabilities, the L2-normalised embedding, the
Grad-CAM map of the target class and, for a model with a segmentation head, the
lesion mask. Keeping the gradient inside :class:`Explainer`'s ``forward`` is what
lets ``training.export`` trace forward and backward into one ONNX graph, and the
same module is the PyTorch reference in evaluation plots and the benchmark.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.models import CAM_METHODS, ModelConfig, SonoModel

#: Below this peak a map counts as all zero (and stays zero instead of being blown up).
CAM_EPS = 1e-12
#: The stabiliser of Grad-CAM++'s alpha denominator, as the ``grad-cam`` package has it.
GRADCAM_PP_EPS = 1e-6


def grad_cam(
    fmap: Tensor,
    logits: Tensor,
    target: Tensor,
    *,
    method: str = "gradcam",
    create_graph: bool = False,
    pooled: Tensor | None = None,
) -> Tensor:
    """The class activation map of class ``target`` [N] on ``fmap`` [N, C, h, w],
    unscaled: ReLU(sum over channels of weight * map), with the channel weights of

    * ``gradcam`` (Selvaraju et al. 2017): the spatial mean of d logit / d map;
    * ``gradcam++`` (Chattopadhay et al. 2018, eq. 19): the positive gradients
      weighted per position by alpha = g^2 / (2 g^2 + sum(map) g^3), exactly as the
      ``grad-cam`` package computes it (its eps included). Positive weights on a
      non-negative (ReLU'd) map: the map cannot cancel to all zero, as Grad-CAM's can
      when a class is recognised by what its evidence suppresses.

    ``create_graph`` keeps the gradient differentiable, so a training loss on the map
    (``training.train``'s localisation loss) can shape it; the exported graph and the
    reference maps use the plain gradient.

    ``pooled``: where the logits read ``fmap`` only through a 2x2 max-pool (kernel =
    stride; ``SonoModel.cam_pool``), that pool's output, from which they were computed;
    the gradient is then taken there. The pool hands each window's gradient to one
    position (its first maximum) and zero to the other three, and both weightings are
    sums over positions of terms that vanish where the gradient does, so summing over
    windows gives the same weights without the pool's backward pass (in the exported
    graph the costliest part of the gradient besides its convolutions)."""
    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {', '.join(CAM_METHODS)}")
    # d logit[target] as the product with the target's one-hot row: in the exported graph
    # three ops, where the gradient of a gather is a scatter into zeros built from shapes.
    selector = (target.unsqueeze(1) == torch.arange(logits.shape[1], device=logits.device)).to(logits.dtype)
    (grads,) = torch.autograd.grad(logits, fmap if pooled is None else pooled, selector, create_graph=create_graph)
    if method == "gradcam":
        weights = grads.sum(dim=(2, 3), keepdim=True) / (fmap.shape[2] * fmap.shape[3])
    else:
        squared = grads * grads
        # The package then zeroes alpha where the gradient is 0: it is 0 / eps there already.
        alpha = squared / (2 * squared + fmap.sum(dim=(2, 3), keepdim=True) * squared * grads + GRADCAM_PP_EPS)
        weights = (torch.relu(grads) * alpha).sum(dim=(2, 3), keepdim=True)
    n, c, h, w = fmap.shape
    # The weighted sum over channels as a matmul: ONNX Runtime reduces over channels slowly.
    return torch.relu((weights.view(n, 1, c) @ fmap.reshape(n, c, h * w)).view(n, h, w))


def cam_name(config: ModelConfig) -> str:
    """How a model's heatmap is made, for people: "Grad-CAM++ on conv4_3"."""
    method = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++"}[config.cam_method]
    return f"{method} on {config.cam_layer if config.arch == 'hybrid' else 'the last conv map'}"


class Explainer(nn.Module):
    """``(fmap [N,C,h,w], target_class [N]) -> (probabilities, embedding, gradcam)``:
    everything the model computes from the Grad-CAM layer's map on. The gradient needs
    only this part of the graph, so ``training.export`` traces it alone through
    autograd and exports the encoder and the segmentation head as plain modules.

    ``target_class`` -1 explains the predicted class; the map is :func:`grad_cam`
    (the model's ``cam_method``) scaled to [0, 1] per image.
    """

    def __init__(self, model: SonoModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, fmap: Tensor, target_class: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        fmap, pool = fmap.detach(), self.model.cam_pool
        with torch.enable_grad():
            # A fresh leaf: the gradient needs only the graph downstream of the map (or
            # of its pool, see grad_cam), whether or not the weights require grad.
            leaf = (fmap if pool is None else pool(fmap)).requires_grad_(True)
            embedding = self.model.embed(leaf) if pool is None else self.model.embed_pooled(leaf)
            logits = self.model.head(embedding)
            target = torch.where(target_class < 0, logits.argmax(dim=1), target_class)
            cam = grad_cam(
                fmap if pool is not None else leaf,
                logits,
                target,
                method=self.model.config.cam_method,
                pooled=None if pool is None else leaf,
            )
        cam = cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(CAM_EPS)
        return torch.softmax(logits, dim=1).detach(), F.normalize(embedding, dim=1).detach(), cam.detach()


class ExplainedModel(nn.Module):
    """``(image [N,1,H,W], target_class [N]) -> (probabilities, embedding, gradcam)``,
    and ``lesion_mask`` after them when the model has a segmentation head: the
    model's encoder, then ``explainer`` (an :class:`Explainer` of the model unless
    given, e.g. its traced graph) on the Grad-CAM layer's map; the mask is the head's
    per-pixel lesion probability [N, H/2, W/2].
    """

    def __init__(self, model: SonoModel, explainer: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.explainer = Explainer(model) if explainer is None else explainer

    def forward(self, image: Tensor, target_class: Tensor) -> tuple[Tensor, ...]:
        encoded, skips = self.model.encode(image)
        outputs = tuple(self.explainer(encoded, target_class))
        if not self.model.config.segmentation:
            return outputs
        return (*outputs, torch.sigmoid(self.model.segment(encoded, skips)).detach())
