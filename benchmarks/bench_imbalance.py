"""Imbalanced classes: what data.sampler=balanced and trainer.class_weights do to balanced accuracy
and macro-F1, over several seeds.

The data: the quickstart's synthetic target task (10 classes, 20 validation images each, 64 px)
with its training set made imbalanced: half the classes keep 60 images, the other half keep
``--rare`` (6: a 10:1 imbalance); the validation set stays balanced. Each setting trains the
quickstart's recipe (resnet18 from the synthetic source task's weights, freeze_early, 10 epochs)
and reports, at the epoch of best val_balanced_acc (trainer.monitor=val_balanced_acc), the
balanced accuracy, the macro-F1 and the plain accuracy.

    python benchmarks/bench_imbalance.py               # 4 settings x 3 seeds
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

from common import machine, parser, synthetic_folder, table, tool_run, workdir

SETTINGS = {
    "none": [],
    "sampler=balanced": ["data.sampler=balanced"],
    "class_weights=auto": ["trainer.class_weights=auto"],
    "class_weights=sqrt": ["trainer.class_weights=sqrt"],
}


def imbalanced_copy(source: Path, out: Path, rare: int) -> Path:
    """``source``'s images with every second class's training set cut to ``rare`` images."""
    if out.exists():
        shutil.rmtree(out)
    for i, folder in enumerate(sorted((source / "train").iterdir())):
        keep = sorted(folder.iterdir())[: rare if i % 2 else None]
        (out / "train" / folder.name).mkdir(parents=True)
        for f in keep:
            shutil.copy(f, out / "train" / folder.name / f.name)
    shutil.copytree(source / "val", out / "val")
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--rare", type=int, default=6)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    a = p.parse_args()
    size, per_class, val = 64, 60, 20
    if a.quick:
        a.seeds, a.epochs, size, per_class, val, a.rare, a.settings = 1, 1, 32, 8, 4, 2, ["none", "sampler=balanced"]
    out = workdir(a.workdir)
    root = imbalanced_copy(synthetic_folder(10, per_class, val, size), out / "data", a.rare)
    print(f"{machine()}\nsynthetic target task, 5 classes x {per_class} and 5 x {a.rare} training images "
          f"({per_class / a.rare:.0f}:1), {val} validation images each, {size} px; quickstart recipe, {a.epochs} "
          f"epochs, seeds 0-{a.seeds - 1}; best epoch by val_balanced_acc")
    base = ["experiment=quickstart", "data=imagefolder", f"data.root={root}", f"data.image_size={size}",
            f"trainer.epochs={a.epochs}", "trainer.monitor=val_balanced_acc", "data.num_workers=0", "trainer.device=cpu"]
    rows = []
    for name in a.settings:
        found = {"val_balanced_acc": [], "val_macro_f1": [], "val_acc": []}
        for s in range(a.seeds):
            summary, _ = tool_run([*base, *SETTINGS[name], f"trainer.seed={s}"], out / f"{name}-{s}")
            for k in found:
                found[k].append(summary["at_best"][k])
        print(f"  {name}: balanced acc " + ", ".join(f"{x:.1%}" for x in found["val_balanced_acc"]), flush=True)
        rows.append([name, *(f"{statistics.mean(v):.1%} ± {statistics.stdev(v) if len(v) > 1 else 0:.1%}"
                             for v in found.values())])
    print(table(["setting", "balanced acc (mean ± std)", "macro-F1", "accuracy"], rows))
    print(f"settings measured: {len(rows)}")


if __name__ == "__main__":
    main()
