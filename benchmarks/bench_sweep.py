"""A sweep's wall time: its jobs one after another (Hydra's basic launcher) against the same jobs
at once (hydra/launcher=parallel), as real commands on the same generated data and weights.

On a GPU box the parallel jobs each get their own GPU(s); on CPU each gets an equal share of the
cores (and one thread per core), where the serial jobs use every core in turn. Prints each
sweep's wall time, and serial / parallel.

    python benchmarks/bench_sweep.py             # 4 jobs: the strategies below
    python benchmarks/bench_sweep.py --jobs 2    # at most 2 at once (default: one per GPU, or per core)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import machine, parser, synthetic_run, table, workdir

STRATEGIES = "linear_probe,freeze_early,partial,full"


def sweep(overrides, folder: Path) -> float:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("OMP_NUM_THREADS", None)  # each sweep decides its own threads
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "finetune_cli", "-m", *overrides, f"hydra.sweep.dir={folder}"],
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode:
        sys.exit(f"sweep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    summaries = [json.loads(p.read_text()) for p in folder.glob("*/summary.json")]
    if not summaries or any(s["status"] != "completed" for s in summaries):
        sys.exit(f"the sweep in {folder} did not complete every job")
    return seconds


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--jobs", type=int, default=None, help="hydra.launcher.jobs: at most this many at once")
    a = p.parse_args()
    per_class, classes = (8, 3) if a.quick else (30, 10)
    if a.quick:
        a.epochs, a.size = 1, 32
    common = [*synthetic_run(a.size, classes, per_class, a.model, a.epochs), "model.weights=synthetic"]
    out = workdir(a.workdir)
    print(f"{machine()}\n{a.model}, {a.size} px, {classes * per_class} training images, {a.epochs} epochs; "
          f"jobs: {STRATEGIES}")
    sweep([*common, "strategy=linear_probe"], out / "warm-up")  # synthetic weights and data made once, here
    common.append(f"strategy={STRATEGIES}")
    serial = sweep(common, out / "serial")
    limit = [f"hydra.launcher.jobs={a.jobs}"] if a.jobs else []
    parallel = sweep([*common, "hydra/launcher=parallel", *limit], out / "parallel")
    print(table(["launcher", "wall s"], [["basic (one after another)", f"{serial:.1f}"],
                                         ["parallel", f"{parallel:.1f}"]]))
    print(f"serial / parallel: {serial / parallel:.2f}")


if __name__ == "__main__":
    main()
