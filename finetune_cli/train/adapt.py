"""Unsupervised domain adaptation: the labelled (source) batch and an unlabelled target batch go
through the network together, and a domain loss on the head's input features pulls the two
domains' features together.

- ``dann`` (Ganin et al., 2016): a domain classifier learns to tell the domains apart; between it
  and the features sits a gradient reversal layer, so the network is trained to fool it. The
  reversed gradient ramps in with 2 / (1 + exp(-10 p)) - 1 over the run's progress p.
- ``mmd`` (Long et al., 2015, DAN): the multi-kernel maximum mean discrepancy between the two
  batches' features, five Gaussian kernels at the mean pairwise distance times 2^-2 .. 2^2.

The features are the head's input (the tail's entry, found through the family table), captured by
a forward pre-hook. The classifier and the domain classifier run as one module (``Adapted``), so
one DistributedDataParallel wrapper averages the gradients of both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from finetune_cli import world
from finetune_cli.config import AdaptConfig, AdaptName


def ramp(progress: float) -> float:
    """Ganin et al.'s schedule: 0 at the start, about 0.76 a quarter of the way, near 1 at the end."""
    return 2.0 / (1.0 + math.exp(-10.0 * min(max(progress, 0.0), 1.0))) - 1.0


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return -ctx.coeff * grad, None


def reverse_gradient(x: torch.Tensor, coeff: float) -> torch.Tensor:
    """Identity forward; the gradient multiplied by ``-coeff`` backward."""
    return _ReverseGradient.apply(x, coeff)


def domain_classifier(features: int, hidden: int) -> nn.Module:
    """Two hidden ReLU layers, one logit: > 0 says target."""
    return nn.Sequential(
        nn.Linear(features, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, 1),
    )


def mk_mmd(source: torch.Tensor, target: torch.Tensor, kernels: int = 5, mult: float = 2.0) -> torch.Tensor:
    """Squared multi-kernel MMD (biased estimate) between two feature batches."""
    x = torch.cat([source, target]).float()
    d2 = torch.cdist(x, x).pow(2)
    n = x.size(0)
    base = d2.detach().sum() / max(n * n - n, 1)  # the mean pairwise squared distance
    base = base.clamp_min(1e-12) / mult ** (kernels // 2)
    k = sum(torch.exp(-d2 / (base * mult**i)) for i in range(kernels))
    s = source.size(0)
    return k[:s, :s].mean() + k[s:, s:].mean() - 2 * k[:s, s:].mean()


class Adapted(nn.Module):
    """The classifier and, for dann, the domain classifier as one module. ``forward`` returns the
    classifier's output and the domain term's input: the features (mmd) or the domain logits (dann)."""

    def __init__(self, model: nn.Module, entry: nn.Module, critic: Optional[nn.Module]):
        super().__init__()
        self.model, self.critic = model, critic
        self._entry = [entry]  # not a submodule: it is part of ``model``
        self.coeff = 1.0  # dann: the gradient reversal's factor now

    def forward(self, images: torch.Tensor) -> Tuple[Any, torch.Tensor]:
        captured: List[torch.Tensor] = []
        hook = self._entry[0].register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            out = self.model(images)
        finally:
            hook.remove()
        features = captured[0].flatten(1)
        if self.critic is None:
            return out, features
        return out, self.critic(reverse_gradient(features, self.coeff)).squeeze(1)


@dataclass
class DomainMetrics:
    loss: float
    acc: Optional[float]  # dann: how often the domain classifier is right (0.5: the features are aligned)
    weight: float  # the ramped weight at the epoch's end


class Adaptation:
    """One run's adaptation: the target batches, the domain loss of each step, its metrics."""

    def __init__(self, cfg: AdaptConfig, model: nn.Module, entry: nn.Module, features: int,
                 target_loader: Any, total_steps: int, seed: int):
        self.method, self.weight, self.ramps = cfg.name, cfg.weight, cfg.ramp
        critic = domain_classifier(features, cfg.hidden) if cfg.name == AdaptName.dann else None
        self.module = Adapted(model, entry, critic)
        self.loader, self.total, self.seed = target_loader, max(1, total_steps), seed
        self.step = 0
        self._batches: Optional[Iterator] = None
        self._epoch = 0
        self._sums: Optional[torch.Tensor] = None

    @property
    def critic(self) -> Optional[nn.Module]:
        return self.module.critic

    def begin_epoch(self, epoch: int, steps_per_epoch: int) -> None:
        """The target images' order is a function of the epoch alone, so a resumed run draws the
        same target batches as an uninterrupted one."""
        self._epoch = epoch
        self.step = (epoch - 1) * steps_per_epoch
        self._batches = None
        self._sums = None

    def next_target(self, count: int) -> torch.Tensor:
        """The next target batch (unlabelled), of at most ``count`` images; the step's gradient
        reversal factor is set here, before the forward pass that records it."""
        self.module.coeff = self.factor()
        if self._batches is not None:
            try:
                return next(self._batches)[0][:count]
            except StopIteration:
                pass
        self.loader.sampler.set_epoch(self._epoch * 1000 + self.step)  # a new order for each pass
        self.loader.generator.manual_seed(self.seed * 7919 + self._epoch * 1000 + self.step)
        self._batches = iter(self.loader)
        return next(self._batches)[0][:count]

    def factor(self) -> float:
        return ramp(self.step / self.total) if self.ramps else 1.0

    def split(self, out: Tuple[Any, torch.Tensor], n: int) -> Tuple[Any, torch.Tensor]:
        """The classifier's output for the ``n`` source images, and the weighted domain loss."""
        model_out, domain = out
        if self.method == AdaptName.dann:  # the reversal carries the ramp; the classifier learns at full weight
            labels = torch.zeros_like(domain, dtype=torch.float32)
            labels[n:] = 1.0
            loss = F.binary_cross_entropy_with_logits(domain.float(), labels)
            hits = ((domain.detach() > 0).float() == labels).sum()
            weighted = self.weight * loss
        else:
            loss = mk_mmd(domain[:n], domain[n:])
            hits = torch.zeros((), device=domain.device)
            weighted = self.weight * self.factor() * loss
        step = torch.stack([loss.detach().float() * domain.size(0), hits.float(),
                            torch.tensor(float(domain.size(0)), device=domain.device)])
        self._sums = step if self._sums is None else self._sums + step
        self.step += 1
        return _first(model_out, n), weighted

    def epoch_metrics(self, across_processes: bool) -> DomainMetrics:
        sums = self._sums if self._sums is not None else torch.zeros(3)
        loss, hits, count = (world.total(sums) if across_processes else sums).tolist()
        acc = hits / count if count and self.method == AdaptName.dann else None
        return DomainMetrics(loss / count if count else float("nan"), acc, self.weight * self.factor())


def _first(out: Any, n: int) -> Any:
    """The first ``n`` rows of a model's output (a tensor, or GoogLeNet's named tuple with aux logits)."""
    if not isinstance(out, tuple):
        return out[:n]
    rows = [o[:n] if o is not None else None for o in out]
    return type(out)(*rows) if hasattr(out, "_fields") else tuple(rows)
