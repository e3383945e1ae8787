"""``data=csv``: images listed in a CSV file of ``path,label[,split]`` rows, as many Kaggle-style
sets come. Paths are relative to ``data.root`` when it is set, else to the CSV file's folder (or
absolute). The first row is a header when it names the columns (path/file/filename/image/image_id,
label/class/target/category, split/subset/set); its names then choose the columns, in any order.
Split values: train, val (also valid, validation), test (left out of training and validation);
without a split column, or without val rows, validation is a stratified split of the train rows."""

from __future__ import annotations

import csv
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from torch.utils.data import Subset

from finetune_cli.data.folders import ListedImageFolder, Splits, is_image, load_rgb, stratified_split, warn_unvalidated
from finetune_cli.errors import FinetuneError

PATH_NAMES = ("path", "file", "filename", "file_name", "filepath", "image", "image_path", "image_id", "img")
LABEL_NAMES = ("label", "class", "target", "category", "labels")
SPLIT_NAMES = ("split", "subset", "set")
SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
          "test": "test", "testing": "test"}
SHOWN = 8  # problems listed one by one; the rest are counted


@dataclass
class Listing:
    """The CSV's rows, checked: each split's images by class (classes sorted)."""

    file: Path
    base: Path  # where relative paths start
    classes: List[str]
    train: Dict[str, List[str]]
    val: Dict[str, List[str]] = field(default_factory=dict)  # empty: no val rows
    test_rows: int = 0

    def files(self) -> List[str]:
        return [f for split in (self.train, self.val) for fs in split.values() for f in fs]


def _fail(listing: str, what: str, rows: Sequence[str], remedy: str) -> FinetuneError:
    shown = "\n".join(f"  {r}" for r in rows[:SHOWN])
    more = f"\n  ... and {len(rows) - SHOWN} more" if len(rows) > SHOWN else ""
    return FinetuneError(f"{listing}: {len(rows)} {what}:\n{shown}{more}\n{remedy} Nothing was trained.")


def _columns(header: List[str], where: str) -> Tuple[int, int, Optional[int]]:
    names = [h.strip().lower() for h in header]

    def find(wanted: Sequence[str]) -> Optional[int]:
        return next((i for i, n in enumerate(names) if n in wanted), None)

    path, label, split = find(PATH_NAMES), find(LABEL_NAMES), find(SPLIT_NAMES)
    if path is None or label is None:
        raise FinetuneError(
            f"{where}: the header row ({','.join(header)}) names no {'path' if path is None else 'label'} column. "
            f"Name the columns path,label[,split] (or one of {', '.join(PATH_NAMES)} and one of "
            f"{', '.join(LABEL_NAMES)}), or leave the header out and put them in that order."
        )
    return path, label, split


def _is_header(row: List[str]) -> bool:
    """A first row that names a known column, and whose first cell is no image file name."""
    names = {c.strip().lower() for c in row}
    return bool(names & {*PATH_NAMES, *LABEL_NAMES, *SPLIT_NAMES}) and not is_image(row[0].strip())


def read_rows(csv_file: Path) -> Tuple[List[Tuple[int, str, str, str]], str]:
    """``(line, path, label, split)`` per data row (split "" where there is no split column)."""
    where = f"data.csv={csv_file}"
    try:
        with open(csv_file, newline="", encoding="utf-8-sig") as f:
            rows = [(n, r) for n, r in enumerate(csv.reader(f), 1) if any(c.strip() for c in r)]
    except UnicodeDecodeError as exc:
        raise FinetuneError(f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8 CSV.") from None
    except OSError as exc:
        raise FinetuneError(f"Cannot read {where} ({exc.strerror}): give the path of a CSV file of path,label rows.") from None
    except csv.Error as exc:
        raise FinetuneError(f"{where} is not a readable CSV file ({exc}): give a CSV file of path,label rows.") from None
    if not rows:
        raise FinetuneError(f"{where} holds no rows: list one image per row as path,label[,split].")
    path, label, split = 0, 1, None
    if _is_header(rows[0][1]):
        path, label, split = _columns(rows[0][1], where)
        rows = rows[1:]
    elif len(rows[0][1]) >= 3:
        split = 2
    wanted = max(c for c in (path, label, split) if c is not None) + 1
    short = [f"line {n}: {','.join(r)}" for n, r in rows if len(r) < wanted]
    if short:
        raise _fail(where, f"rows have fewer than {wanted} columns", short,
                    "Give every row path,label" + (",split" if split is not None else "") + ".")
    found = [(n, r[path].strip(), r[label].strip(), r[split].strip().lower() if split is not None else "")
             for n, r in rows]
    empty = [f"line {n}: {','.join(r)}" for (n, p, lab, _), (_, r) in zip(found, rows) if not p or not lab]
    if empty:
        raise _fail(where, "rows have an empty path or label", empty, "Fill them in, or delete those rows.")
    return found, where


def read_listing(csv_file: Path, image_dir: Optional[Path]) -> Listing:
    """Read and check the CSV: splits known, files present and images, one label per image, two
    classes or more, val classes among the train classes."""
    rows, where = read_rows(csv_file)
    base = image_dir if image_dir is not None else csv_file.parent
    unknown = [f"line {n}: split '{s}'" for n, _, _, s in rows if s and s not in SPLITS]
    if unknown:
        raise _fail(where, "rows have a split other than train, val or test", unknown,
                    "Use train, val (or valid, validation) or test in the split column.")
    labels: Dict[str, Tuple[int, str]] = {}
    twice, missing, not_images = [], [], []
    by_split: Dict[str, Dict[str, List[str]]] = {"train": {}, "val": {}, "test": {}}
    for n, rel, label, split in rows:
        full = os.path.normpath(base / rel)
        if full in labels:
            first, first_label = labels[full]
            twice.append(f"line {n}: {rel} ({label}), already on line {first} ({first_label})")
            continue
        labels[full] = (n, label)
        if not os.path.isfile(full):
            missing.append(f"line {n}: {full}")
        elif not is_image(full):
            not_images.append(f"line {n}: {full}")
        by_split[SPLITS.get(split, "train")].setdefault(label, []).append(full)
    if twice:
        raise _fail(where, "images are listed more than once", twice,
                    "List each image once, with one label (a multi-label set needs another tool).")
    if missing:
        start = f"data.root={image_dir}" if image_dir is not None else f"the CSV's folder, {base}"
        raise _fail(where, f"listed files do not exist (relative paths start at {start})", missing,
                    "Fix the paths, or set data.root to the folder they start from.")
    if not_images:
        raise _fail(where, "listed files are not images by their extension", not_images,
                    "List image files (.jpg, .png, ...), or remove those rows.")
    train, val = by_split["train"], by_split["val"]
    classes = sorted(train)
    if len(classes) < 2:
        raise FinetuneError(
            f"{where}: the train rows have {len(classes)} label{'' if len(classes) == 1 else 's'} "
            f"({', '.join(classes) or 'none'}): a classifier needs two classes or more. Add rows of other classes "
            "(rows without a split, or with split train, are training rows)."
        )
    only_val = sorted(set(val) - set(train))
    if only_val:
        raise FinetuneError(f"{where}: labels only in val rows, never trained on: {', '.join(only_val)}. Add train "
                            "rows of these classes, or drop their val rows.")
    return Listing(csv_file, base, classes, {c: sorted(train[c]) for c in classes},
                   {c: sorted(val.get(c, [])) for c in classes} if val else {},
                   sum(len(v) for v in by_split["test"].values()))


def csv_splits(listing: Listing, train_tf: Callable, val_tf: Callable, *, val_fraction: float, seed: int,
               exclude: frozenset = frozenset(), decode_sides: Tuple[Optional[int], Optional[int]] = (None, None),
               max_pixels: Optional[int] = None) -> Splits:
    """The listed images as datasets, leaving out ``exclude`` (bad images)."""
    def dataset(files: Dict[str, List[str]], transform: Callable, side: Optional[int]) -> ListedImageFolder:
        kept = {c: [f for f in files.get(c, []) if f not in exclude] for c in listing.classes}
        load = functools.partial(load_rgb, min_side=side, max_pixels=max_pixels) if side or max_pixels else load_rgb
        return ListedImageFolder(listing.base, kept, transform, load)

    train_side, val_side = decode_sides
    train = dataset(listing.train, train_tf, train_side)
    empty = [c for c in listing.classes if not train.targets.count(listing.classes.index(c))]
    if empty:
        raise FinetuneError(f"data.csv={listing.file}: no usable train image left for {', '.join(empty)} after leaving "
                            "out bad images. Add images of these classes, or fix the bad ones.")
    left = f"; {listing.test_rows} test rows left out" if listing.test_rows else ""
    if listing.val:
        val = dataset(listing.val, val_tf, val_side)
        warn_unvalidated(listing.classes, val.targets, range(len(val)), why="have no val rows in the CSV,",
                         remedy="Add val rows of these classes, or drop the split column to split the train rows.")
        return Splits(train, val, listing.classes, listing.file, f"the CSV's val rows{left}")
    train_idx, val_idx = stratified_split(train.targets, val_fraction, seed)
    warn_unvalidated(listing.classes, train.targets, val_idx)
    if not val_idx:
        raise FinetuneError(f"data.csv={listing.file} has too few train rows to split off a validation set: add "
                            "rows, or mark some as val in a split column.")
    return Splits(Subset(train, train_idx), Subset(dataset(listing.train, val_tf, val_side), val_idx), listing.classes,
                  listing.file, f"stratified split of the CSV's train rows (val_fraction={val_fraction}, seed={seed}){left}")
