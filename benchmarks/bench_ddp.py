"""Data-parallel scaling: one process with batch 2B against two processes (trainer.devices=2) with
batch B each, the same global batch, on the same generated data and weights.

Each configuration runs as a real command (the two processes are started by the tool itself), and
prints training images per second (the median epoch without the first) and the ratio. On a GPU box
the processes get a GPU each; on CPU they share the cores (gloo), so the ratio there measures the
cost of the gradient exchange rather than a speed-up.

    python benchmarks/bench_ddp.py   # prints images/s for 1 and 2 processes and 2-process / 1-process
"""

from __future__ import annotations

import csv
import os
import statistics
import subprocess
import sys

from common import machine, parser, synthetic_run, table, workdir


def run(overrides, out) -> float:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "finetune_cli", *overrides, f"hydra.run.dir={out}"], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    return statistics.median(float(r["train_images_per_s"]) for r in rows[1:] or rows)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="the global batch (each of two processes takes half)")
    p.add_argument("--epochs", type=int, default=4)
    a = p.parse_args()
    per_class, classes = (8, 3) if a.quick else (40, 10)
    if a.quick:
        a.epochs, a.size = 2, 32
    common = [*synthetic_run(a.size, classes, per_class, a.model, a.epochs), "model.weights=null", "strategy=full",
              "trainer.device=cpu" if a.quick else "trainer.device=auto"]
    out = workdir(a.workdir)
    print(f"{machine()}\n{a.model}, {a.size} px, full fine-tuning, global batch {a.batch}, "
          f"{classes * per_class} training images, {a.epochs} epochs")
    one = run([*common, f"data.batch_size={a.batch}"], out / "one")
    two = run([*common, f"data.batch_size={a.batch // 2}", "trainer.devices=2"], out / "two")
    print(table(["processes", "batch per process", "train images/s"],
                [["1", str(a.batch), f"{one:.1f}"], ["2", str(a.batch // 2), f"{two:.1f}"]]))
    print(f"2 processes / 1 process: {two / one:.2f}")


if __name__ == "__main__":
    main()
