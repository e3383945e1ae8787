"""Shared by the benchmark scripts: data, an in-process tool run, timing and tables."""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

import finetune_cli.cli  # noqa: F401  (registers the config schema and resolvers)
from finetune_cli.data.synthetic import SyntheticSpec, generate
from finetune_cli.paths import cache_dir, conf_dir

HERE = Path(__file__).resolve().parent


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs, measures nothing")
    p.add_argument("--workdir", default=None, help="where run folders go (default: a temporary folder)")
    return p


def workdir(arg: str | None) -> Path:
    return Path(arg) if arg else Path(tempfile.mkdtemp(prefix="finetune-bench-"))


def synthetic_run(size: int, classes: int, per_class: int, model: str, epochs: int) -> List[str]:
    """The overrides of a run on generated data: ``classes`` x ``per_class`` training images (4
    per class to validate) of ``size`` px, ``model``, ``epochs`` epochs, no loader workers."""
    return ["data=synthetic", f"data.synthetic.image_size={size}", f"data.image_size={size}",
            f"data.synthetic.classes={classes}", f"data.synthetic.train_per_class={per_class}",
            "data.synthetic.val_per_class=4", f"model.name={model}", f"trainer.epochs={epochs}",
            "data.num_workers=0"]


def synthetic_folder(classes: int, train_per_class: int, val_per_class: int, size: int) -> Path:
    """A generated ImageFolder (train/ and val/), cached like the tool's own synthetic data."""
    return generate(SyntheticSpec("target", classes, train_per_class, val_per_class, size, 0), cache_dir(None))


def photo_folder(root: Path, count: int, width: int, height: int) -> Path:
    """``count`` JPEGs (quality 90) of smooth colour fields with fine grain, in two class folders
    under ``root/train``."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / "train" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:03d}.jpg"
        if path.exists():
            continue
        field = Image.fromarray(rng.integers(0, 255, (height // 64, width // 64, 3), dtype=np.uint8))
        base = np.asarray(field.resize((width, height), Image.BICUBIC), dtype=np.int16)
        grain = rng.integers(-10, 10, (height, width, 3), dtype=np.int16)
        Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8)).save(path, quality=90)
    return root


def tool_run(overrides: Sequence[str], out_dir: Path) -> Tuple[Dict[str, Any], List[Dict[str, str]]]:
    """One finetune-cli run in this process: Hydra's compose API, then the tool's ``run``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from finetune_cli.checks import typed_config
    from finetune_cli.run import run

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = run(typed_config(cfg), out_dir, OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    with open(out_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return summary, rows


def median_after_first(values: Iterable[float]) -> float:
    """The median of per-epoch times, leaving out the first epoch (worker start, allocator warm-up)."""
    values = list(values)
    return statistics.median(values[1:] if len(values) > 1 else values)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"torch {torch.__version__}, {cores} CPU cores, {torch.get_num_threads()} threads, {gpu}, python {sys.version.split()[0]}"


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
