"""The run's data: the synthetic task or an image folder, checked image by image, split into
training and validation sets with their transforms."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from finetune_cli.config import AugmentConfig, BadImage, DataConfig, DataSource
from finetune_cli.data.checks import check_images, describe
from finetune_cli.data.csv_labels import Listing, csv_splits, read_listing
from finetune_cli.data.domains import target_domain, unlabelled_files, val_files
from finetune_cli.data.folders import Splits, class_files, image_folder_splits, split_dirs
from finetune_cli.data.synthetic import SyntheticSpec, generate
from finetune_cli.data.transforms import Preprocess, decode_side, eval_transform, train_transform
from finetune_cli.errors import FinetuneError

log = logging.getLogger("finetune_cli")


def data_root(cfg: DataConfig, cache: Path) -> Path:
    if cfg.source == DataSource.synthetic:
        s = cfg.synthetic
        return generate(SyntheticSpec("target", s.classes, s.train_per_class, s.val_per_class, s.image_size, s.seed), cache)
    root = Path(cfg.root).expanduser()
    if not (root / "train").is_dir():
        image_folder_splits(root, None, None, val_fraction=0.5, seed=0)  # raises the layout error
    return root


def listed_in_csv(cfg: DataConfig) -> Optional[Listing]:
    """data=csv: the CSV's rows, checked (None for the other sources)."""
    if cfg.source != DataSource.csv:
        return None
    return read_listing(Path(cfg.csv).expanduser(), Path(cfg.root).expanduser() if cfg.root else None)


def target_root(cfg: DataConfig, cache: Path) -> Optional[Path]:
    """The target domain's folder (data.target_root, or the synthetic task in
    data.synthetic.target_style), or None."""
    s = cfg.synthetic
    if cfg.source == DataSource.synthetic and s.target_style is not None:
        spec = SyntheticSpec("target", s.classes, s.train_per_class, s.val_per_class, s.image_size, s.seed,
                             style=s.target_style.value)
        return generate(spec, cache)
    return Path(cfg.target_root).expanduser() if cfg.target_root else None


def listed_files(root: Path) -> List[str]:
    """Every image of the labelled splits' folders."""
    return [f for d in split_dirs(root) for fs in class_files(d).values() for f in fs]


def target_files(target: Optional[Path]) -> List[str]:
    """Every image of the target domain (none without one)."""
    return unlabelled_files(target) + val_files(target) if target is not None else []


def bad_images(cfg: DataConfig, files: List[str], where: str, cache: Path,
               write_skipped: Callable[[Dict[str, str]], Path]) -> frozenset:
    """Check every image in ``files`` (found under ``where``) before training; stop, or leave the
    bad ones out (data.on_bad_image)."""
    if not cfg.check_images:
        return frozenset()
    started = time.perf_counter()
    result = check_images(files, cfg.max_image_pixels, cache)
    if not result.bad:
        log.info(f"Data check: {result.checked} images readable ({time.perf_counter() - started:.1f}s).")
        return frozenset()
    listing = describe(result.bad)
    if cfg.on_bad_image == BadImage.error:
        raise FinetuneError(
            f"{len(result.bad)} of {result.checked} images under {where} cannot be used:\n{listing}\n"
            "Fix or delete them, or set data.on_bad_image=skip to train without them. Nothing was trained."
        )
    path = write_skipped(result.bad)
    log.warning(f"Skipping {len(result.bad)} of {result.checked} images (data.on_bad_image=skip; listed in {path}):\n{listing}")
    return frozenset(result.bad)


def load_data(cfg: DataConfig, augment: AugmentConfig, pre: Preprocess, seed: int, cache: Path,
              write_skipped: Callable[[Dict[str, str]], Path]) -> Splits:
    listing = listed_in_csv(cfg)
    root = listing.file if listing is not None else data_root(cfg, cache)
    labelled = listing.files() if listing is not None else listed_files(root)
    target = target_root(cfg, cache)
    where = f"{root} and {target}" if target is not None else str(root)
    exclude = bad_images(cfg, labelled + target_files(target), where, cache, write_skipped)
    sides = (decode_side(pre, augment), decode_side(pre)) if cfg.reduced_decode else (None, None)
    train_tf, val_tf = train_transform(pre, augment), eval_transform(pre)
    split = csv_splits if listing is not None else image_folder_splits
    splits = split(listing if listing is not None else root, train_tf, val_tf, val_fraction=cfg.val_fraction,
                   seed=seed, exclude=exclude, decode_sides=sides, max_pixels=cfg.max_image_pixels)
    if target is not None:
        splits.target = target_domain(target, splits.classes, train_tf, val_tf, exclude=exclude,
                                      max_pixels=cfg.max_image_pixels)
    return splits
