"""``finetune-cli-report PATH``: compare every run below PATH.

Reads each run folder (one holding Hydra's ``.hydra/``): its ``summary.json``, ``metrics.csv``
and ``.hydra/overrides.yaml``. Prints a table ranked by the chosen metric and writes, into PATH,
``report.csv``, ``report.md`` and PNG plots. Runs still going, interrupted or failed appear
marked as such; a broken file never stops the report.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from rich.console import Console
from rich.table import Table

from finetune_cli.tools.loading import tool_main
from finetune_cli.errors import FinetuneError
from finetune_cli.io_utils import atomic_write_bytes

COLUMNS = [
    "run", "status", "model", "strategy", "overrides", "monitor", "best", "best_epoch",
    "final_train_acc", "final_val_acc", "train_val_gap", "epochs_run", "total_seconds",
    "seconds_per_epoch", "images_per_s", "trainable_params", "total_params", "trainable_pct",
    "peak_memory_mb", "grad_optimizer_mb", "feature_cache", "error",
]
SORT_KEYS = {
    "best": ("best", True),  # direction flips for loss monitors
    "gap": ("train_val_gap", False),
    "time": ("total_seconds", False),
    "speed": ("images_per_s", True),
    "trainable": ("trainable_pct", False),
}


@dataclass
class Run:
    path: Path
    row: Dict[str, Any]
    metrics: List[Dict[str, float]] = field(default_factory=list)
    override_map: Dict[str, str] = field(default_factory=dict)


def find_runs(root: Path) -> List[Path]:
    runs = {p.parent for p in root.rglob(".hydra") if p.is_dir()}
    return sorted(runs, key=lambda p: str(p))


def _read_overrides(run: Path) -> Dict[str, str]:
    path = run / ".hydra" / "overrides.yaml"
    found: Dict[str, str] = {}
    try:
        for line in path.read_text().splitlines():
            line = line.strip()
            if line.startswith("- "):
                key, _, value = line[2:].strip().strip("'\"").partition("=")
                found[key.lstrip("+~")] = value
    except OSError:
        pass
    return found


def _read_metrics(run: Path) -> List[Dict[str, float]]:
    rows: List[Dict[str, float]] = []
    try:
        with (run / "metrics.csv").open() as f:
            for raw in csv.DictReader(f):
                row = {}
                for k, v in raw.items():
                    try:
                        row[k] = float(v)
                    except (TypeError, ValueError):
                        row[k] = v  # type: ignore[assignment]
                rows.append(row)
    except (OSError, csv.Error):
        pass
    return rows


def read_run(path: Path, root: Path) -> Run:
    summary: Dict[str, Any] = {}
    problem = None
    try:
        summary = json.loads((path / "summary.json").read_text())
    except FileNotFoundError:
        problem = "no summary.json (stopped before its first epoch)"
    except (OSError, ValueError) as exc:
        problem = f"unreadable summary.json ({type(exc).__name__})"
    metrics = _read_metrics(path)
    status = summary.get("status", "unknown")
    if status == "running":
        status = "running or interrupted"
    if problem and status == "unknown":
        status = "incomplete"
    best = summary.get("best") or {}
    last = metrics[-1] if metrics else {}
    epoch_seconds = [m["epoch_seconds"] for m in metrics if isinstance(m.get("epoch_seconds"), float)]
    train_acc, val_acc = last.get("train_acc"), last.get("val_acc")
    row: Dict[str, Any] = {
        "run": str(path.relative_to(root)) if path != root else path.name,
        "status": status,
        "model": summary.get("model", ""),
        "strategy": summary.get("strategy", ""),
        "overrides": "",
        "monitor": best.get("monitor", ""),
        "best": best.get("value"),
        "best_epoch": best.get("epoch"),
        "final_train_acc": train_acc,
        "final_val_acc": val_acc,
        "train_val_gap": (train_acc - val_acc) if isinstance(train_acc, float) and isinstance(val_acc, float) else None,
        "epochs_run": summary.get("epochs_run", len(metrics) or None),
        "total_seconds": summary.get("total_seconds"),
        "seconds_per_epoch": sum(epoch_seconds) / len(epoch_seconds) if epoch_seconds else None,
        "images_per_s": summary.get("train_images_per_s"),
        "trainable_params": summary.get("trainable_params_final", summary.get("trainable_params")),
        "total_params": summary.get("total_params"),
        "trainable_pct": None,
        "peak_memory_mb": summary.get("peak_memory_mb"),
        "grad_optimizer_mb": summary.get("grad_optimizer_mb"),
        "feature_cache": _cache_label(summary.get("feature_cache")),
        "error": summary.get("error") or problem or "",
    }
    if row["trainable_params"] is not None and row["total_params"]:
        row["trainable_pct"] = 100.0 * row["trainable_params"] / row["total_params"]
    return Run(path, row, metrics, _read_overrides(path))


def _cache_label(cache: Optional[Dict[str, Any]]) -> str:
    if not cache:
        return ""
    return "train+val" if cache.get("train") else "val" if cache.get("val") else "off"


SHOWN_APART = ("model", "model.name", "strategy")  # these have columns of their own


def _differing(runs: List[Run]) -> None:
    keys = sorted({k for r in runs for k in r.override_map if k not in SHOWN_APART})
    varying = [k for k in keys if len({r.override_map.get(k) for r in runs}) > 1]
    for r in runs:
        r.row["overrides"] = " ".join(f"{k}={r.override_map[k]}" for k in varying if k in r.override_map)


def _sort(runs: List[Run], key: str) -> List[Run]:
    column, descending = SORT_KEYS[key]

    def value(r: Run) -> float:
        v = r.row.get(column)
        if not isinstance(v, (int, float)):
            return math.inf
        flip = descending
        if key == "best" and r.row.get("monitor") == "val_loss":
            flip = False
        return -v if flip else v

    return sorted(runs, key=value)


def _fmt(value: Any, kind: str = "") -> str:
    if value is None or value == "":
        return "-"
    if kind == "pct":
        return f"{100 * value:.1f}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _label(r: Run) -> str:
    return r.row["overrides"] or r.row["strategy"] or r.row["run"]


def _num(value: Any, digits: int, signed: bool = False) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:,.{digits}f}"


def render_table(runs: List[Run]) -> Table:
    monitor = next((r.row["monitor"] for r in runs if r.row["monitor"]), "val_acc")
    table = Table(title=f"Runs ranked; best = best {monitor} (epoch)", title_justify="left")
    for col in ("#", "model", "strategy", "overrides", "status", "best", "train acc", "gap", "epochs", "time s",
                "s/epoch", "img/s", "trainable", "peak MB", "grad+opt MB"):
        table.add_column(col, no_wrap=col not in ("overrides", "status"))
    for i, r in enumerate(runs, 1):
        row = r.row
        best = f"{row['best']:.3f} ({row['best_epoch']})" if isinstance(row["best"], float) else "-"
        status = row["status"] + (f": {row['error']}" if row["error"] else "")
        table.add_row(
            str(i), row["model"] or "-", row["strategy"] or "-", row["overrides"] or "-", status, best,
            _num(row["final_train_acc"], 3), _num(row["train_val_gap"], 3, signed=True), _num(row["epochs_run"], 0),
            _num(row["total_seconds"], 1), _num(row["seconds_per_epoch"], 2), _num(row["images_per_s"], 0),
            "-" if row["trainable_pct"] is None else f"{row['trainable_pct']:.1f}%", _num(row["peak_memory_mb"], 0),
            _num(row["grad_optimizer_mb"], 1),
        )
    return table


def write_tables(runs: List[Run], out: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    for r in runs:
        writer.writerow({k: ("" if r.row.get(k) is None else r.row.get(k)) for k in COLUMNS})
    atomic_write_bytes(out / "report.csv", buf.getvalue().encode())
    shown = ["run", "status", "model", "strategy", "overrides", "best", "best_epoch", "final_train_acc",
             "train_val_gap", "epochs_run", "total_seconds", "seconds_per_epoch", "images_per_s", "trainable_pct",
             "peak_memory_mb", "grad_optimizer_mb", "feature_cache"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for r in runs:
        lines.append("| " + " | ".join(_fmt(r.row.get(k)).replace("|", "\\|") for k in shown) + " |")
    failed = [r for r in runs if r.row["error"]]
    if failed:
        lines += ["", "Failed or incomplete runs:", ""]
        lines += [f"- `{r.row['run']}`: {r.row['error']}" for r in failed]
    atomic_write_bytes(out / "report.md", ("\n".join(lines) + "\n").encode())


def write_plots(runs: List[Run], out: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    written: List[Path] = []

    def save(fig, name: str) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(out / name, buf.getvalue())
        written.append(out / name)

    with_metrics = [r for r in runs if r.metrics and "val_acc" in r.metrics[0]]
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in with_metrics:
        ax.plot([m["epoch"] for m in r.metrics], [m["val_acc"] for m in r.metrics], marker="o", label=_label(r))
    ax.set(xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy per epoch")
    ax.grid(alpha=0.3)
    if with_metrics:
        ax.legend(fontsize=8)
    save(fig, "val_acc.png")

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in runs:
        if isinstance(r.row.get("best"), float) and isinstance(r.row.get("total_seconds"), float):
            ax.scatter(r.row["total_seconds"], r.row["best"], s=50)
            ax.annotate(_label(r), (r.row["total_seconds"], r.row["best"]), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")
    ax.set(xlabel="total time (s)", ylabel="best validation metric", title="Accuracy against training time")
    ax.grid(alpha=0.3)
    save(fig, "acc_vs_time.png")

    varied = [r for r in with_metrics if _lr_columns(r) and _lrs_vary(r)]
    if varied:
        fig, axes = plt.subplots(len(varied), 1, figsize=(8, 3 * len(varied)), squeeze=False)
        for ax, r in zip(axes[:, 0], varied):
            cols = _lr_columns(r)
            for i, col in enumerate(cols):
                # a group's LR is drawn only in epochs where it trains (metrics.csv: trainable_groups)
                ys = [m[col] if _trains(i, len(cols), m) else float("nan") for m in r.metrics]
                ax.plot([m["epoch"] for m in r.metrics], ys, marker=".", label=col[3:])
            ax.set(yscale="log", xlabel="epoch", ylabel="LR at epoch start (trained groups)", title=_label(r))
            ax.legend(fontsize=7, ncol=3)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        save(fig, "lr_groups.png")
    return written


def _trains(index: int, n_groups: int, row: Dict[str, Any]) -> bool:
    k = row.get("trainable_groups")
    return not isinstance(k, float) or index >= n_groups - 1 - int(k)


def _lr_columns(r: Run) -> List[str]:
    return [k for k in r.metrics[0] if k.startswith("lr_")]


def _lrs_vary(r: Run) -> bool:
    """Progressive or discriminative runs: LRs differ between groups, or events happened."""
    cols = _lr_columns(r)
    differ = any(len({m[c] for c in cols}) > 1 for m in r.metrics)
    events = any(m.get("events") not in (None, "") and not isinstance(m.get("events"), float) for m in r.metrics)
    return differ or events or r.row["strategy"] in ("progressive", "ulmfit", "discriminative", "staged", "two_phase")


def build_report(root: Path, sort: str = "best") -> List[Run]:
    if not root.exists():
        raise FinetuneError(f"{root} does not exist: give a run folder, a multirun folder, or outputs/.")
    paths = find_runs(root)
    if not paths:
        raise FinetuneError(f"No runs below {root}: a run folder holds a .hydra/ folder written by finetune-cli.")
    runs = [read_run(p, root) for p in paths]
    _differing(runs)
    return _sort(runs, sort)


@tool_main
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="finetune-cli-report",
        description="Compare finetune-cli runs: a ranked table, report.csv, report.md and plots written into PATH.",
    )
    parser.add_argument("path", type=Path, help="a run folder, a multirun folder, or outputs/")
    parser.add_argument("--sort", choices=sorted(SORT_KEYS), default="best", help="ranking (default: best metric)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = parser.parse_args(argv)
    runs = build_report(args.path, args.sort)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # logs and pipes: no folding
    console.print(render_table(runs))
    out = args.path if args.path.is_dir() else args.path.parent
    write_tables(runs, out)
    plots = [] if args.no_plots else write_plots(runs, out)
    print(f"Wrote {out / 'report.csv'}, {out / 'report.md'}" + "".join(f", {p}" for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
