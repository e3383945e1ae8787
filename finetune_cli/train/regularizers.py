"""Penalties that keep fine-tuned weights near their pretrained values.

Both act on the backbone (every group but the new head), on parameters that currently train:

* L2-SP (Li et al., 2018): ``strength / 2 * sum ||w - w0||^2``.
* EWC (Kirkpatrick et al., 2017): ``strength / 2 * sum F * (w - w0)^2`` with ``F`` a diagonal
  Fisher information estimate: the mean squared per-image gradient of the log-likelihood of a
  label drawn from the model's own prediction (no labels needed), at the pretrained weights.
  The prediction is the pretrained model's: the source task's classifier (``source_head``) is
  put in place of the new, untrained target head while the Fisher is estimated. It is estimated
  on images of the source task when ``regularizer.fisher_root`` is given, else on the target
  training images, before training starts.

Both replace weight decay on the anchored parameters: give ``backbone_params`` to
``param_groups(..., anchored=...)`` so decay does not pull them towards 0 at the same time.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from finetune_cli.errors import FinetuneError
from finetune_cli.models.factory import head_prefixes, swapped_head
from finetune_cli.models.families import Family
from finetune_cli.models.groups import LayerGroup
from finetune_cli.train.engine import split_outputs

Named = Sequence[Tuple[str, nn.Parameter]]


class AnchorPenalty:
    """``strength / 2 * sum weight * (w - w0)^2`` over the given parameters (weight 1: L2-SP)."""

    def __init__(self, params: Named, strength: float, weights: Optional[List[torch.Tensor]] = None):
        self.names = [n for n, _ in params]
        self.params = [p for _, p in params]
        self.anchors = [p.detach().clone() for p in self.params]
        self.weights = weights
        self.strength = strength

    def __call__(self) -> torch.Tensor:
        total = None
        for i, (p, a) in enumerate(zip(self.params, self.anchors)):
            if not p.requires_grad:
                continue  # frozen: it cannot move, and costs nothing
            sq = (p - a).pow(2)
            if self.weights is not None:
                sq = sq * self.weights[i]
            term = sq.sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros((), device=self.anchors[0].device if self.anchors else "cpu")
        return 0.5 * self.strength * total


def estimate_fisher(
    model: nn.Module,
    params: Named,
    images: Iterable[torch.Tensor],
    device: torch.device,
    max_samples: int,
    seed: int = 0,
) -> List[torch.Tensor]:
    """Diagonal Fisher: the mean over images of the squared gradient of ``log p(y|x)`` with
    ``y`` sampled from the model's prediction. Runs in eval mode (BatchNorm statistics fixed)."""
    tensors = [p for _, p in params]
    was_training = model.training
    flags = [p.requires_grad for p in tensors]
    for p in tensors:
        p.requires_grad_(True)
    model.eval()
    fisher = [torch.zeros_like(p) for p in tensors]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    seen = 0
    try:
        for batch in images:
            for x in batch:
                if seen >= max_samples:
                    break
                logits, _ = split_outputs(model(x.unsqueeze(0).to(device)))
                log_probs = torch.log_softmax(logits.float(), dim=1)
                y = torch.multinomial(log_probs.exp().detach().cpu(), 1, generator=generator).item()
                grads = torch.autograd.grad(log_probs[0, y], tensors, allow_unused=True)
                for f, g in zip(fisher, grads):
                    if g is not None:
                        f += g.detach().pow(2)
                seen += 1
            if seen >= max_samples:
                break
    finally:
        for p, flag in zip(tensors, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return [f / max(seen, 1) for f in fisher]


def backbone_params(groups: Sequence[LayerGroup], family: Family) -> List[Tuple[str, nn.Parameter]]:
    """The parameters a penalty anchors: every group but the head, without any classifier."""
    heads = head_prefixes(family)
    return [(n, p) for g in groups[:-1] for n, p in g.params if not any(n.startswith(h) for h in heads)]


def fisher_with_source_head(
    model: nn.Module,
    family: Family,
    source_head: Optional[nn.Module],
    backbone: Named,
    images: Iterable[torch.Tensor],
    device: torch.device,
    max_samples: int,
    seed: int = 0,
    weights: str = "as given",
) -> List[torch.Tensor]:
    """``estimate_fisher`` through the pretrained classifier: ``source_head`` (moved to
    ``device``) replaces the model's head while the Fisher is estimated, then the target head
    is put back. ``weights`` names the weights in the error raised when there is no source head."""
    if source_head is None:
        raise FinetuneError(
            f"regularizer=ewc estimates its Fisher information through the pretrained classifier "
            f"of the source task, but model.weights ({weights}) comes without one (random init, "
            "or a weights file saved without its classifier), and through a new untrained head "
            "the estimate would be meaningless. Use regularizer=l2sp, which needs no classifier, or weights that include "
            "their classifier (a torchvision weights name, model.weights=synthetic, or a file "
            "saved with its head)."
        )
    with swapped_head(model, family, source_head.to(device)):
        return estimate_fisher(model, backbone, images, device, max_samples, seed=seed)
