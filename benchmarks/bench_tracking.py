"""What a logger costs a run: logger=none, tensorboard and mlflow on the same small runs, in this
process. Each logger call is timed where the Recorder makes it: opening (MLflow: the import, the
store, the run and its params), each epoch, and the end (MLflow: the summary, the artifacts, the
status). Also what a new process pays to open the store that exists by then (the cost of each
command-line run: the import, the store, the run and its params), and the store's size on disk.

    python benchmarks/bench_tracking.py            # resnet18, 10 epochs, 3 runs per logger
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

from common import machine, parser, synthetic_run, table, tool_run, workdir

import finetune_cli.record as record


class Timed:
    """A logger whose every call is timed into ``calls``."""

    def __init__(self, logger: Any, calls: Dict[str, List[float]]) -> None:
        self.logger, self.calls = logger, calls

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.logger, name)

        def timed(*args: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kw)
            finally:
                self.calls.setdefault(name, []).append(time.perf_counter() - start)

        return timed


OPEN_IN_NEW_PROCESS = """
import sys, time
from finetune_cli.mlflowlog import MLflowLogger  # and torch, which a run has imported by then
start = time.perf_counter()
import mlflow
imported = time.perf_counter()
logger = MLflowLogger(__import__("pathlib").Path(sys.argv[1]), {"a": {"b": 1}})
assert logger.run_id, logger.broken
print(imported - start, time.perf_counter() - imported)
"""


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    if a.quick:
        a.epochs, a.runs = 2, 1
    out = workdir(a.workdir)
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # the local MLflow store goes in ./outputs
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    common = [*synthetic_run(32, 10, 8 if a.quick else 20, "resnet18", a.epochs), "model.weights=null"]
    print(f"{machine()}\nresnet18, 32 px, linear probe, {a.epochs} epochs, {a.runs} run(s) per logger")
    real_open = record.open_logger
    calls: Dict[str, List[float]] = {}

    def opening(*args: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        logger = real_open(*args, **kw)
        calls.setdefault("open", []).append(time.perf_counter() - start)
        return Timed(logger, calls) if logger is not None else None

    record.open_logger = opening
    tool_run(common, out / "warm-up")  # data made and torch warmed up once, here
    rows = []
    for logger in ("none", "tensorboard", "mlflow"):
        calls.clear()
        walls, epochs = [], []
        for i in range(a.runs):
            start = time.perf_counter()
            summary, metrics = tool_run([*common, f"logger={logger}"], out / logger / str(i))
            walls.append(time.perf_counter() - start)
            epochs.append(statistics.median(float(r["epoch_seconds"]) for r in metrics))
        opens = calls.get("open", [])
        rows.append([logger, f"{statistics.median(walls):.2f}", f"{statistics.median(epochs) * 1000:.0f}",
                     f"{opens[0]:.2f}" if opens else "-",
                     f"{statistics.median(opens[1:]):.2f}" if len(opens) > 1 else "-",
                     f"{statistics.median(calls['log_epoch']) * 1000:.1f}" if "log_epoch" in calls else "-",
                     f"{statistics.median(calls['close']):.2f}" if "close" in calls else "-"])
    record.open_logger = real_open
    print(table(["logger", "run s", "epoch ms", "open s (first)", "open s (later)", "logger ms / epoch", "end s"],
                rows))
    db, artifacts = out / "outputs" / "mlflow.db", out / "outputs" / "mlartifacts"
    print(f"MLflow store after {a.runs} run(s) of {a.epochs} epochs: mlflow.db {db.stat().st_size / 1e6:.2f} MB, "
          f"artifacts {folder_bytes(artifacts) / 1e3:.0f} kB")
    opens = []
    for i in range(a.runs):
        folder = out / "open" / str(i)
        folder.mkdir(parents=True)
        done = subprocess.run([sys.executable, "-c", OPEN_IN_NEW_PROCESS, str(folder)], capture_output=True, text=True,
                              check=True)
        opens.append([float(x) for x in done.stdout.split()])
    imports, rest = statistics.median(o[0] for o in opens), statistics.median(o[1] for o in opens)
    print(f"opening the store in a new process: {imports + rest:.2f} s ({imports:.2f} s importing mlflow, "
          f"{rest:.2f} s the store, the run and its params; median of {a.runs})")
    print(f"mlflow per epoch: {rows[-1][5]} ms")


if __name__ == "__main__":
    main()
