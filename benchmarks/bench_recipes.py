"""Accuracy at equal epochs: each strategy preset of the tool, as shipped, against a plain
hand-written full fine-tuning loop (``plain_loop.plain_finetune``: AdamW 1e-3, cosine annealing,
random-resized-crop + flip), from the same pretrained weights, on the same data, over several seeds.

The task is the quickstart's: the synthetic target task (10 classes, 60 training and 20 validation
images each) at 64 px, from resnet18 pretrained on the synthetic source task (disjoint classes),
batch 32, 10 epochs. Prints, per preset, the mean and spread of the best validation accuracy over
the seeds, the training seconds per epoch, and the difference to the plain loop's mean.

    python benchmarks/bench_recipes.py                        # every preset, 3 seeds
    python benchmarks/bench_recipes.py --presets full ulmfit --set optimizer.lr=3e-4
    python benchmarks/bench_recipes.py --presets freeze_early discriminative --per-class 15   # smaller data
"""

from __future__ import annotations

import statistics

import torch
from common import machine, parser, synthetic_folder, synthetic_run, table, tool_run, workdir
from plain_loop import plain_finetune

from finetune_cli.models.pretrain import synthetic_weights
from finetune_cli.paths import cache_dir
from finetune_cli.train.engine import Precision

PRESETS = ["linear_probe", "freeze_early", "partial", "full", "discriminative", "progressive", "ulmfit", "two_phase",
           "staged", "auto", "bitfit", "norm", "lora"]


def spread(values):
    mean = statistics.mean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--presets", nargs="+", default=PRESETS, choices=PRESETS)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--per-class", type=int, default=60, help="training images per class")
    p.add_argument("--set", nargs="*", default=[], help="extra overrides for every tool run (not the plain loop)")
    p.add_argument("--no-plain", action="store_true", help="leave out the plain loop")
    p.add_argument("--plain-constant", action="store_true", help="the plain loop keeps its LR constant (no cosine)")
    a = p.parse_args()
    classes, per_class = 10, a.per_class
    if a.quick:
        a.presets, a.seeds, a.epochs, a.size, per_class = ["linear_probe", "full"], 1, 1, 32, 6
    out = workdir(a.workdir)
    val = 4 if a.quick else 20
    root = synthetic_folder(classes, per_class, val, a.size)
    weights = synthetic_weights("resnet18", cache_dir(None), torch.device("cpu"), Precision(None), 0, False)
    print(f"{machine()}\nsynthetic target task: {classes} classes x {per_class} training images, {a.size} px; resnet18 "
          f"from the synthetic source task's weights; batch {a.batch}, {a.epochs} epochs, seeds 0-{a.seeds - 1}"
          + (f"; tool overrides: {' '.join(a.set)}" if a.set else ""))
    rows, results = [], {}
    if not a.no_plain:
        runs = [plain_finetune(root, "resnet18", weights, size=a.size, batch_size=a.batch, epochs=a.epochs, seed=s,
                               cosine=not a.plain_constant)
                for s in range(a.seeds)]
        results["plain loop"] = ([max(r["val_acc"]) for r in runs],
                                 [statistics.mean(r["seconds"]) for r in runs])
    base = [o for o in synthetic_run(a.size, classes, per_class, "resnet18", a.epochs) if "val_per_class" not in o]
    base += [f"data.synthetic.val_per_class={val}", "model.weights=synthetic", f"data.batch_size={a.batch}",
             "trainer.device=cpu"]
    for preset in a.presets:
        accs, secs = [], []
        for s in range(a.seeds):
            summary, _ = tool_run([*base, f"strategy={preset}", f"trainer.seed={s}", *a.set],
                                  out / f"{preset}-{s}")
            assert summary["dataset"]["root"] == str(root), (summary["dataset"]["root"], root)  # the plain loop's data
            accs.append(summary["best"]["value"])
            secs.append(summary["train_seconds"] / max(1, summary["epochs_run"]))
        results[preset] = (accs, secs)
        print(f"  {preset}: " + ", ".join(f"{x:.1%}" for x in accs), flush=True)
    plain = statistics.mean(results["plain loop"][0]) if "plain loop" in results else None
    for name, (accs, secs) in results.items():
        mean, std = spread(accs)
        vs = "" if plain is None or name == "plain loop" else f"{100 * (mean - plain):+.1f}"
        rows.append([name, f"{mean:.1%}", f"{std:.1%}", f"{min(accs):.1%}", f"{statistics.mean(secs):.2f}", vs])
    print(table(["recipe", "mean best val acc", "std", "worst seed", "train s/epoch", "vs plain (points)"], rows))
    if plain is not None:
        level = [n for n, (accs, _) in results.items() if n != "plain loop" and statistics.mean(accs) >= plain]
        print(f"presets at or above the plain loop: {len(level)} of {len(results) - 1}")


if __name__ == "__main__":
    main()
