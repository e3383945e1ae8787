"""Preprocessing and augmentation presets (torchvision transforms v2)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from finetune_cli.config import AugmentName

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """What a model expects as input: sizes, normalization, interpolation."""

    crop_size: int
    resize_size: int
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    @classmethod
    def from_weights(cls, weights: Any) -> "Preprocess":
        """Read the eval preprocessing a torchvision weights entry carries (no download)."""
        t = weights.transforms()
        return cls(
            crop_size=int(t.crop_size[0]),
            resize_size=int(t.resize_size[0]),
            mean=tuple(float(v) for v in t.mean),
            std=tuple(float(v) for v in t.std),
            interpolation=InterpolationMode(t.interpolation).value,
        )

    def with_size(self, image_size: Optional[int]) -> "Preprocess":
        """Train/evaluate at another size, keeping the weights' resize-to-crop ratio."""
        if not image_size or image_size == self.crop_size:
            return self
        ratio = self.resize_size / self.crop_size
        return Preprocess(
            crop_size=image_size,
            resize_size=int(round(image_size * ratio)),
            mean=self.mean,
            std=self.std,
            interpolation=self.interpolation,
        )

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _tensor_tail(pre: Preprocess) -> list:
    return [
        T.ToImage(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean=list(pre.mean), std=list(pre.std)),
    ]


def eval_transform(pre: Preprocess) -> T.Compose:
    """Deterministic: resize, centre crop, normalize. Used for validation in every run."""
    interp = InterpolationMode(pre.interpolation)
    return T.Compose(
        [
            T.Resize(pre.resize_size, interpolation=interp, antialias=True),
            T.CenterCrop(pre.crop_size),
            *_tensor_tail(pre),
        ]
    )


def train_transform(pre: Preprocess, name: AugmentName, *, hflip: bool, scale_min: float) -> T.Compose:
    if name == AugmentName.none:
        return eval_transform(pre)
    interp = InterpolationMode(pre.interpolation)
    steps = [
        T.RandomResizedCrop(
            pre.crop_size, scale=(scale_min, 1.0), interpolation=interp, antialias=True
        )
    ]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps + _tensor_tail(pre))
