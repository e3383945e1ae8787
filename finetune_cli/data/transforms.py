"""Preprocessing and augmentation presets (torchvision transforms v2)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from finetune_cli.config import AugmentConfig, AugmentName

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


def _to_float(pre: Preprocess) -> list:
    return [T.ToDtype(torch.float32, scale=True), T.Normalize(mean=list(pre.mean), std=list(pre.std))]


def eval_transform(pre: Preprocess) -> T.Compose:
    """Deterministic: resize, centre crop, normalize. Used for validation in every run."""
    interp = InterpolationMode(pre.interpolation)
    return T.Compose(
        [
            T.ToImage(),
            T.Resize(pre.resize_size, interpolation=interp, antialias=True),
            T.CenterCrop(pre.crop_size),
            *_to_float(pre),
        ]
    )


def _policy(aug: AugmentConfig, interp: InterpolationMode) -> list:
    if aug.name == AugmentName.randaugment:
        return [T.RandAugment(num_ops=aug.randaugment_ops, magnitude=aug.randaugment_magnitude, interpolation=interp)]
    if aug.name == AugmentName.trivialaugment:
        return [T.TrivialAugmentWide(interpolation=interp)]
    if aug.name == AugmentName.autoaugment:
        policy = T.AutoAugmentPolicy(aug.autoaugment_policy.value)
        return [T.AutoAugment(policy=policy, interpolation=interp)]
    return []


def decode_side(pre: Preprocess, aug: Optional[AugmentConfig] = None) -> int:
    """The smallest image side a transform needs to see full detail: the resize target of the
    eval transform; for a random resized crop, the side at which its smallest crop still holds
    ``crop_size`` pixels across."""
    if aug is None or aug.name == AugmentName.none:
        return pre.resize_size
    return max(pre.resize_size, math.ceil(pre.crop_size / math.sqrt(aug.scale_min)))


def train_transform(pre: Preprocess, aug: AugmentConfig) -> T.Compose:
    """The training transform of a preset: every extra is on when its key is non-zero.

    Works on PIL images and uint8 tensors alike; returns normalized float32 CHW tensors.
    """
    if aug.name == AugmentName.none:
        return eval_transform(pre)
    interp = InterpolationMode(pre.interpolation)
    steps: list = [
        T.ToImage(),
        T.RandomResizedCrop(pre.crop_size, scale=(aug.scale_min, aug.scale_max), interpolation=interp, antialias=True),
    ]
    if aug.hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += _policy(aug, interp)
    if aug.rotation > 0:
        steps.append(T.RandomRotation(aug.rotation, interpolation=interp))
    if aug.color_jitter > 0 or aug.hue > 0:
        cj = aug.color_jitter
        steps.append(T.ColorJitter(brightness=cj, contrast=cj, saturation=cj, hue=aug.hue))
    if aug.grayscale_p > 0:
        steps.append(T.RandomGrayscale(p=aug.grayscale_p))
    if aug.blur_p > 0:
        kernel = max(3, int(0.1 * pre.crop_size) // 2 * 2 + 1)  # about a tenth of the image, odd
        steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, aug.blur_sigma))], p=aug.blur_p))
    steps += _to_float(pre)
    if aug.erasing_p > 0:
        steps.append(T.RandomErasing(p=aug.erasing_p, value=0))
    return T.Compose(steps)
