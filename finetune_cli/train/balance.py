"""Imbalanced classes: the training loss's class weights (trainer.class_weights) and the plan's
account of the counts. The balanced sampler is ``data.sharding.BalancedDraw``."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from finetune_cli.config import ClassWeights, SamplerName


def loss_weights(counts: Sequence[int], mode: ClassWeights) -> Optional[torch.Tensor]:
    """auto: n / (classes x count) per class (inverse frequency, 1 for every class when balanced);
    sqrt: the square root of that. A class without training images gets weight 0 (never a target)."""
    if mode == ClassWeights.none:
        return None
    n, k = sum(counts), len(counts)
    weights = [n / (k * c) if c else 0.0 for c in counts]
    if mode == ClassWeights.sqrt:
        weights = [math.sqrt(w) for w in weights]
    return torch.tensor(weights, dtype=torch.float32)


def imbalance(counts: Sequence[int]) -> float:
    """The largest class's count over the smallest's (inf when a class has none)."""
    low = min(counts)
    return max(counts) / low if low else math.inf


def counts_text(classes: Sequence[str], train: Sequence[int], val: Sequence[int], shown: int = 12) -> str:
    """``name train/val`` per class, the smallest and largest where there are many classes."""
    order = sorted(range(len(classes)), key=lambda i: (train[i], classes[i]))
    if len(order) > shown:
        half = shown // 2
        picked: List[Optional[int]] = [*order[:half], None, *order[-half:]]
    else:
        picked = sorted(order)
    return ", ".join("..." if i is None else f"{classes[i]} {train[i]}/{val[i]}" for i in picked)


def balance_note(classes: Sequence[str], train: Sequence[int], val: Sequence[int], sampler: SamplerName,
                 weights: ClassWeights, monitor: str) -> str:
    """The plan's line on the class counts and what the run does about an imbalance."""
    ratio = imbalance(train)
    if len(set(train)) == 1 and len(set(val)) == 1:
        line = f"Images per class: {train[0]} train / {val[0]} val, every class alike."
    else:
        line = f"Images per class (train/val): {counts_text(classes, train, val)}; largest/smallest {ratio:.1f}:1."
    doing = []
    if sampler == SamplerName.balanced:
        doing.append("data.sampler=balanced draws every class equally often (with replacement)")
    if weights != ClassWeights.none:
        doing.append(f"trainer.class_weights={weights.value} weighs the loss by inverse class frequency"
                     + (" (square root)" if weights == ClassWeights.sqrt else ""))
    if len(doing) == 2:
        doing.append("both together over-correct: the rare classes count twice over")
    if doing:
        return f"{line} {'; '.join(doing)}."
    if ratio >= 3:
        return (f"{line} The classes are imbalanced: consider data.sampler=balanced or trainer.class_weights=auto, "
                f"and trainer.monitor=val_balanced_acc (now {monitor}), which counts every class the same.")
    return line
