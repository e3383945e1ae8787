"""Datasets and loaders: ImageFolder layouts, stratified splits, RGB conversion."""

from __future__ import annotations

import functools
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from finetune_cli.data.sharding import BalancedDraw, EpochShuffle, Shard
from finetune_cli.errors import FinetuneError, unreadable_image

log = logging.getLogger(__name__)

EXTENSIONS = tuple(sorted(set(IMG_EXTENSIONS) | {".gif"}))


def is_image(path: str) -> bool:
    return path.lower().endswith(EXTENSIONS) and not os.path.basename(path).startswith(".")


def allow_pixels(max_pixels: Optional[int]) -> None:
    """Let Pillow open images of up to ``max_pixels`` (data.max_image_pixels): Pillow refuses
    twice its own limit even where the data check, judging by data.max_image_pixels, passed them."""
    if max_pixels and Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def load_rgb(path: str, min_side: Optional[int] = None, max_pixels: Optional[int] = None) -> Image.Image:
    """Open any image mode (grayscale, palette/GIF, RGBA, CMYK, 16-bit) as upright RGB.

    ``min_side``: a JPEG larger than needed is decoded at 1/2, 1/4 or 1/8 scale (the smallest
    whose sides are still at least ``min_side``), which skips most of the decoding work.
    ``max_pixels``: the largest image accepted (see ``allow_pixels``)."""
    allow_pixels(max_pixels)
    with Image.open(path) as img:
        if min_side and img.format == "JPEG":
            img.draft("RGB", (min_side, min_side))
        img = ImageOps.exif_transpose(img)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "PA"):
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float32)
            span = max(float(arr.max() - arr.min()), 1.0)
            img = Image.fromarray(((arr - arr.min()) / span * 255).astype(np.uint8))
        return img.convert("RGB")


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    classes: List[str]
    root: Path
    val_source: str  # "val/ folder" or "stratified split of train/"
    target: Optional[Any] = None  # domains.TargetDomain: unlabelled images to adapt to (adapt=)

    @property
    def images_per_class(self) -> float:
        return len(self.train) / max(1, len(self.classes))


def class_names(root: Path) -> List[str]:
    """The class folders of ``root`` (a split folder such as train/), sorted."""
    return sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))


def class_files(root: Path) -> Dict[str, List[str]]:
    """``{class: [image paths]}`` for ``root/<class>/*``, searched recursively and following
    symbolic links. The data check and the datasets both read this listing, so they see the very
    same files. A link that would make a class hold what is not its own is refused: a folder
    link leading out of its class folder (a loop such as ``loop -> ..``, another class, a place
    outside), and a file link into another class's folder (one image, two labels)."""
    root = Path(root)
    classes = class_names(root)
    if not classes:
        raise FinetuneError(
            f"{root} has no class folders: put each class's images in its own sub-folder, {root}/<class>/*."
        )
    homes = {c: os.path.realpath(root / c) for c in classes}
    return {c: _listed(root / c, c, homes[c], [h for other, h in homes.items() if other != c]) for c in classes}


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _link_error(link: str, target: str, cls: str, why: str) -> FinetuneError:
    return FinetuneError(
        f"{link} is a symbolic link to {target}, {why}: following it would count those images as "
        f"class '{cls}'. Remove the link, or copy the images it should add into the class folder."
    )


def _listed(folder: Path, cls: str, home: str, other_homes: List[str]) -> List[str]:
    found, seen = [], set()

    def unreadable(error: OSError) -> None:
        raise FinetuneError(
            f"Cannot read {error.filename} ({error.strerror}): its images cannot be listed. Give the user running "
            f"finetune-cli read access (chmod -R a+rX {folder}), or move the folder out of data.root."
        )

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable, followlinks=True):
        real = os.path.realpath(dirpath)
        if not _inside(real, home) or real in seen:
            why = "a loop back into folders already read" if real in seen or _inside(home, real) else \
                "outside its class folder"
            raise _link_error(dirpath, real, cls, why)
        seen.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if not is_image(path) or not os.path.isfile(path):
                continue
            target = os.path.realpath(path)
            if any(_inside(target, other) for other in other_homes):
                raise _link_error(path, target, cls, "a file of another class")
            found.append(path)
    return sorted(found)


class ListedImageFolder(ImageFolder):
    """An ImageFolder over the files ``class_files`` listed (ImageFolder's own walk would follow
    links that the listing refuses)."""

    def __init__(self, root: Path, files: Dict[str, List[str]], transform: Callable, loader: Callable):
        self._files = files
        super().__init__(str(root), transform=transform, loader=loader)

    def find_classes(self, directory: str) -> Tuple[List[str], Dict[str, int]]:
        classes = list(self._files)
        return classes, {c: i for i, c in enumerate(classes)}

    def make_dataset(self, directory: str, class_to_idx: Dict[str, int], *args: Any, **kwargs: Any) -> list:
        return [(path, class_to_idx[c]) for c in class_to_idx for path in self._files[c]]

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        """An image that fails to load is named in one paragraph (``UnreadableImage``), also
        from a loader worker."""
        path, target = self.samples[index]
        try:
            sample = self.loader(path)
        except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError...
            raise unreadable_image(path, exc) from None
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target


def image_folder(root: Path, transform: Callable, exclude: frozenset = frozenset(),
                 min_side: Optional[int] = None, max_pixels: Optional[int] = None) -> ImageFolder:
    """``root/<class>/*`` images, read as RGB, leaving out the paths in ``exclude``; JPEGs are
    decoded at reduced scale down to ``min_side`` (None: full size); images of up to
    ``max_pixels`` open (None: Pillow's own limit)."""
    files = class_files(root)
    empty = [c for c, fs in files.items() if not [f for f in fs if f not in exclude]]
    if empty:
        skipped = " after leaving out bad images" if exclude else ""
        raise FinetuneError(
            f"Empty class folder(s) in {root}{skipped}: {', '.join(str(Path(root) / c) for c in empty)}. Add images "
            f"({', '.join(EXTENSIONS)}) or remove the folder(s)."
        )
    loader = functools.partial(load_rgb, min_side=min_side, max_pixels=max_pixels) if min_side or max_pixels else load_rgb
    kept = {c: [f for f in fs if f not in exclude] for c, fs in files.items()}
    return ListedImageFolder(root, kept, transform, loader)


def stratified_split(targets: Sequence[int], val_fraction: float, seed: int) -> tuple[list, list]:
    """Per class, a seeded shuffle puts round(n * val_fraction) images (at least one where the
    class has two or more) into validation."""
    by_class: dict = {}
    for idx, t in enumerate(targets):
        by_class.setdefault(t, []).append(idx)
    rng = random.Random(seed)
    train, val = [], []
    for t in sorted(by_class):
        idx = by_class[t][:]
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        else:
            n_val = 0
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return sorted(train), sorted(val)


def warn_unvalidated(classes: List[str], targets: Sequence[int], val_idx: Sequence[int],
                     why: str = "have a single image, kept for training,",
                     remedy: str = "Add images to these classes, or a val/ folder.") -> None:
    """Say which classes the validation set lacks (by default: a class with a single image keeps it
    for training)."""
    in_val = {targets[i] for i in val_idx}
    alone = [c for i, c in enumerate(classes) if i not in in_val]
    if alone:
        shown = ", ".join(alone[:10]) + (f" and {len(alone) - 10} more" if len(alone) > 10 else "")
        log.warning(
            f"{len(alone)} of {len(classes)} classes {why} so the validation set has none of them and validation "
            f"accuracy does not measure them: {shown}. {remedy}"
        )


def split_dirs(root: Path) -> List[Path]:
    """The folders a run reads images from: train/ and, when present, val/."""
    return [d for d in (Path(root) / "train", Path(root) / "val") if d.is_dir()]


def image_folder_splits(
    root: Path,
    train_tf: Callable,
    val_tf: Callable,
    *,
    val_fraction: float,
    seed: int,
    exclude: frozenset = frozenset(),
    decode_sides: Tuple[Optional[int], Optional[int]] = (None, None),
    max_pixels: Optional[int] = None,
) -> Splits:
    """``decode_sides``: the smallest image side the train and the val transform need (None:
    decode at full size). ``max_pixels``: the largest image that opens (data.max_image_pixels)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FinetuneError(
            f"data.root={root} does not exist. Point data.root at a folder holding train/<class>/* "
            "(and optionally val/<class>/*), or run `finetune-cli experiment=quickstart` for an "
            "offline demo on generated data."
        )
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise FinetuneError(
            f"{root} has no train/ folder. Expected {root}/train/<class>/* and optionally "
            f"{root}/val/<class>/*."
        )
    train_side, val_side = decode_sides
    train_full = image_folder(train_dir, train_tf, exclude, train_side, max_pixels)
    classes = list(train_full.classes)
    if len(classes) < 2:
        raise FinetuneError(
            f"{train_dir} has one class folder ({classes[0]}): a classifier needs two classes or more, "
            "since with one every prediction is right (loss 0, accuracy 100%) and nothing is learned. "
            f"Add a folder per class, {train_dir}/<class>/*."
        )
    val_dir = root / "val"
    if val_dir.is_dir():
        val = image_folder(val_dir, val_tf, exclude, val_side, max_pixels)
        if list(val.classes) != classes:
            only_train = sorted(set(classes) - set(val.classes))
            only_val = sorted(set(val.classes) - set(classes))
            raise FinetuneError(
                f"Class folders differ between {train_dir} and {val_dir}: only in train: "
                f"{only_train or '-'}; only in val: {only_val or '-'}. Give both the same class "
                "folders, or remove val/ to split train/ automatically."
            )
        return Splits(train_full, val, classes, root, "val/ folder")
    if not 0 < val_fraction < 1:
        raise FinetuneError(f"data.val_fraction must be between 0 and 1 (got {val_fraction}).")
    train_idx, val_idx = stratified_split(train_full.targets, val_fraction, seed)
    warn_unvalidated(classes, train_full.targets, val_idx)
    if not val_idx:
        raise FinetuneError(
            f"{train_dir} has too few images to split off a validation set; add a val/ folder or "
            "more images per class."
        )
    val_full = image_folder(train_dir, val_tf, exclude, val_side, max_pixels)
    return Splits(
        Subset(train_full, train_idx),
        Subset(val_full, val_idx),
        classes,
        root,
        f"stratified split of train/ (val_fraction={val_fraction}, seed={seed})",
    )


def labels_of(dataset: Dataset) -> List[int]:
    """Each image's class index, read from the listing (no image is opened)."""
    if isinstance(dataset, Subset):
        every = labels_of(dataset.dataset)
        return [every[i] for i in dataset.indices]
    return [int(t) for t in dataset.targets]


def class_counts(dataset: Dataset, classes: int) -> List[int]:
    counts = [0] * classes
    for t in labels_of(dataset):
        counts[t] += 1
    return counts


def balanced_weights(labels: Sequence[int]) -> List[float]:
    """One over the count of each image's class: each class is drawn equally often."""
    counts: Dict[int, int] = {}
    for t in labels:
        counts[t] = counts.get(t, 0) + 1
    return [1.0 / counts[t] for t in labels]


def resolve_workers(value: str) -> int:
    if str(value).strip().lower() == "auto":
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        return max(0, min(8, cores - 1))
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise FinetuneError(f"data.num_workers={value}: use 'auto' or a whole number >= 0.")
    return n


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    train: bool,
    seed: int,
    pin_memory: bool = False,
    rank: int = 0,
    size: int = 1,
    balanced: bool = False,
) -> DataLoader:
    """Training shuffles by epoch (``EpochShuffle``), or with ``balanced`` draws each class
    equally often (``BalancedDraw``); with ``size`` processes, each reads its share (``rank``) of
    the training and the validation images."""
    generator = torch.Generator()  # seeds the loader workers: each process draws its own augmentations
    generator.manual_seed(seed + 1_000_003 * rank)
    if not train:
        sampler: Sampler = Shard(len(dataset), rank, size)
    elif balanced:
        sampler = BalancedDraw(balanced_weights(labels_of(dataset)), seed, rank, size)
    else:
        sampler = EpochShuffle(len(dataset), seed, rank, size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train and len(sampler) > batch_size,  # no size-1 batch through BatchNorm
        num_workers=num_workers,
        pin_memory=pin_memory,
        # Training loaders start their workers afresh each epoch, seeded from ``generator`` (saved in
        # every checkpoint): a resumed run's augmentation then draws exactly what the uninterrupted
        # run's did. Persistent workers would carry their random state on from the first epoch.
        persistent_workers=num_workers > 0 and not train,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        generator=generator,
    )
