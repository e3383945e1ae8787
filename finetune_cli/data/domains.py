"""The target domain of domain adaptation: unlabelled training images, and optionally a labelled
val/ set that is only ever evaluated.

A target folder holds its training images in ``DIR/train/`` or, without one, in ``DIR`` itself
(``DIR/val/`` left out), in class folders or not: whatever their folders, their labels are never
read. ``DIR/val/<class>/*`` is the target's labelled validation set; its class folders must be
classes of the labelled (source) data, and they take the source's class indices.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from torch.utils.data import Dataset

from finetune_cli.data.folders import image_folder, is_image, load_rgb
from finetune_cli.errors import FinetuneError, unreadable_image


@dataclass
class TargetDomain:
    root: Path
    train: Dataset  # (image, -1): no labels
    val: Optional[Dataset]  # labelled with the source's class indices, evaluated only

    def describe(self) -> str:
        val = f"{len(self.val)} labelled val images (evaluated only)" if self.val is not None else "no val/ (no target accuracy)"
        return f"{len(self.train)} unlabelled images in {self.root}, {val}"


class UnlabelledImages(Dataset):
    """Images without labels: each item is (image, -1)."""

    def __init__(self, files: Sequence[str], transform: Callable, loader: Callable = load_rgb):
        self.files, self.transform, self.loader = list(files), transform, loader

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        try:
            image = self.loader(path)
        except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError...
            raise unreadable_image(path, exc) from None
        return self.transform(image), -1


def train_folder(root: Path) -> Path:
    return root / "train" if (root / "train").is_dir() else root


def unlabelled_files(root: Path) -> List[str]:
    """Every image under the target's training folder (``DIR/val`` left out), sorted."""
    folder, val = train_folder(root), os.path.realpath(root / "val")
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) != val
                             and not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if is_image(f)]
    return found


def val_files(root: Path) -> List[str]:
    val = root / "val"
    if not val.is_dir():
        return []
    return [os.path.join(dp, f) for dp, _, fs in os.walk(val) for f in fs if is_image(f)]


def missing_target(root: Path) -> Optional[str]:
    """Why ``root`` cannot be a target domain, or None."""
    if not root.is_dir():
        return (f"data.target_root={root} does not exist. Point it at a folder of target-domain images "
                "(DIR/train/ or DIR itself; DIR/val/<class>/* for the target's accuracy).")
    return None


def target_domain(root: Path, classes: List[str], train_tf: Callable, val_tf: Callable, *,
                  exclude: frozenset = frozenset(), max_pixels: Optional[int] = None) -> TargetDomain:
    problem = missing_target(root)
    if problem:
        raise FinetuneError(problem)
    files = [f for f in unlabelled_files(root) if f not in exclude]
    if not files:
        raise FinetuneError(
            f"data.target_root={root} holds no images to adapt to (looked in {train_folder(root)}, recursively). "
            "Put the target domain's images there, with or without class folders."
        )
    loader = functools.partial(load_rgb, max_pixels=max_pixels) if max_pixels else load_rgb
    return TargetDomain(root, UnlabelledImages(files, train_tf, loader), _labelled_val(root, classes, val_tf, exclude, max_pixels))


def _labelled_val(root: Path, classes: List[str], transform: Callable, exclude: frozenset,
                  max_pixels: Optional[int]) -> Optional[Dataset]:
    if not (root / "val").is_dir():
        return None
    val = image_folder(root / "val", transform, exclude, None, max_pixels)
    foreign = [c for c in val.classes if c not in classes]
    if foreign:
        raise FinetuneError(
            f"{root / 'val'} has class folders the labelled data does not: {', '.join(foreign)} (its classes: "
            f"{', '.join(classes)}). The target's val/ is scored by the source's classifier, so name its folders "
            "after the source's classes, or leave out the foreign ones."
        )
    index = {c: i for i, c in enumerate(classes)}
    val.samples = [(path, index[val.classes[t]]) for path, t in val.samples]  # the source's class indices
    val.targets = [t for _, t in val.samples]
    val.imgs = val.samples
    val.classes, val.class_to_idx = list(classes), dict(index)
    return val
