"""MixUp and CutMix on whole batches, with soft targets (torchvision transforms v2).

Targets always come back as class probabilities, mixed or not, so the loss (with or without
label smoothing) treats every batch alike. Training accuracy under mixing is counted against
the dominant label: the class with the larger share of the mixed target.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.nn import functional as F
from torchvision.transforms import v2 as T

from finetune_cli.config import AugmentConfig


class BatchMixer:
    def __init__(self, aug: AugmentConfig, num_classes: int):
        self.num_classes = num_classes
        self.mix_prob = aug.mix_prob
        self.switch_prob = aug.switch_prob
        self.mixup = T.MixUp(alpha=aug.mixup_alpha, num_classes=num_classes) if aug.mixup_alpha > 0 else None
        self.cutmix = T.CutMix(alpha=aug.cutmix_alpha, num_classes=num_classes) if aug.cutmix_alpha > 0 else None

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if float(torch.rand(())) >= self.mix_prob:
            return images, F.one_hot(targets, self.num_classes).to(images.dtype)
        if self.mixup is not None and self.cutmix is not None:
            op = self.cutmix if float(torch.rand(())) < self.switch_prob else self.mixup
        else:
            op = self.mixup or self.cutmix
        return op(images, targets)


def make_mixer(aug: AugmentConfig, num_classes: int) -> Optional[BatchMixer]:
    if aug.mixup_alpha <= 0 and aug.cutmix_alpha <= 0:
        return None
    return BatchMixer(aug, num_classes)


def hard_labels(targets: torch.Tensor) -> torch.Tensor:
    """Class indices: as given, or the dominant class of soft targets."""
    return targets.argmax(1) if targets.ndim == 2 else targets
