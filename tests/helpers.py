"""Helpers shared by the test modules: run the CLI as a user would, find run folders, make data."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def cli(args, cwd, *, env=None, timeout=900) -> subprocess.CompletedProcess:
    """Run ``python -m finetune_cli ARGS`` in a subprocess, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "finetune_cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def snapshot(run_dir):
    """Every file the run wrote, with its bytes and modification time."""
    files = [p for p in run_dir.rglob("*") if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"]
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def run_dirs(root: Path):
    """Run folders under ``root`` (each holds Hydra's .hydra/ folder)."""
    return sorted(p.parent for p in Path(root).rglob(".hydra"))


def make_image_folder(root: Path, classes=("cat", "dog"), per_class=6, size=40, val=True):
    """A tiny ImageFolder: coloured squares, a different colour per class."""
    colours = [(220, 40, 40), (40, 40, 220), (40, 200, 40), (200, 200, 40)]
    splits = ("train", "val") if val else ("train",)
    for split in splits:
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = Image.new("RGB", (size + i, size), colours[c % len(colours)])
                img.save(folder / f"{i}.png")
    return root


TINY = [
    "data.num_workers=0",
    "trainer.epochs=1",
]


def assert_same_runs(a: Path, b: Path, columns, states=("model",)):
    """Two runs ended identical: every tensor of ``states`` in their last.pt, bit for bit, and the
    ``columns`` of every metrics.csv row. Returns both checkpoints and both metrics tables."""
    import torch

    ckpt_a = torch.load(a / "checkpoints" / "last.pt", weights_only=True)
    ckpt_b = torch.load(b / "checkpoints" / "last.pt", weights_only=True)
    for state in states:
        assert ckpt_a[state].keys() == ckpt_b[state].keys(), state
        assert all(torch.equal(ckpt_a[state][k], ckpt_b[state][k]) for k in ckpt_a[state]), f"{state} differs"
    rows_a = list(csv.DictReader((a / "metrics.csv").open()))
    rows_b = list(csv.DictReader((b / "metrics.csv").open()))
    for col in columns:
        assert [r[col] for r in rows_a] == [r[col] for r in rows_b], col
    return ckpt_a, ckpt_b, rows_a, rows_b


def fake_job(folder, overrides, summary):
    """A run folder as finetune-cli leaves it, for the report: ``.hydra/overrides.yaml`` and, unless
    ``summary`` is None, ``summary.json``."""
    from omegaconf import ListConfig, OmegaConf

    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(ListConfig(overrides), folder / ".hydra" / "overrides.yaml")
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))


def done_summary(strategy, best, kind="peak RSS since the run started"):
    """The summary.json of a completed 2-epoch run whose best val_acc is ``best``."""
    return {"status": "completed", "model": "resnet18", "strategy": strategy, "epochs_run": 2, "total_seconds": 3.0,
            "best": {"monitor": "val_acc", "value": best, "epoch": 2}, "trainable_params": 10,
            "trainable_params_final": 40, "total_params": 100, "peak_memory_mb": 812.4, "peak_memory_kind": kind}
