"""``trainer.ema``: an exponential moving average of the weights (and of the BatchNorm statistics),
updated after every optimizer step through torch's ``AveragedModel``, evaluated each epoch beside
the weights themselves and saved in every checkpoint."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def decay_at(decay: float, updates: int, warmup: bool) -> float:
    """The decay of update ``updates`` (0 for the first average after the copy). With ``warmup``,
    min(decay, (1 + n) / (10 + n)): the early average forgets its starting weights fast, as
    TensorFlow's ExponentialMovingAverage(num_updates) does; a short run of a few hundred steps
    would otherwise report weights mostly from before training."""
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


class WeightAverage:
    """``module``: the averaged copy of the model (a deep copy: one more model's memory)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=True)
        self.averaged.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)

    def _average(self, averaged: Sequence[torch.Tensor], current: Sequence[torch.Tensor],
                 n_averaged: torch.Tensor) -> None:
        """One dtype's tensors: floats move towards the model's by 1 - decay; integer buffers
        (BatchNorm's batch counter) take the model's."""
        if not averaged[0].is_floating_point():
            for a, c in zip(averaged, current):
                a.copy_(c)
            return
        weight = 1.0 - decay_at(self.decay, int(n_averaged) - 1, self.warmup)
        torch._foreach_lerp_(list(averaged), list(current), weight)

    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

    def state_dict(self, leave_out: Sequence[str] = ()) -> Dict[str, Any]:
        """The averaged weights under the model's own names (``leave_out``: names a checkpoint
        does not hold, as for the model's), and the number of updates so far."""
        gone = set(leave_out)
        return {"model": {k: v for k, v in self.module.state_dict().items() if k not in gone}, "updates": self.updates}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        missing, unexpected = self.module.load_state_dict(state["model"], strict=False)
        if unexpected:
            raise KeyError(f"unexpected tensors in the saved average: {unexpected[:5]}")
        self.averaged.n_averaged.fill_(int(state["updates"]))


def ema_for(model: nn.Module, decay: Optional[float], warmup: bool) -> Optional[WeightAverage]:
    """The average of ``model``'s weights, starting from them now; None without trainer.ema."""
    if decay is None:
        return None
    ema = WeightAverage(model, decay, warmup)
    ema.update(model)  # the first update copies
    return ema
