"""``finetune-cli-report PATH``: compare every run below PATH.

Reads each run folder (one holding Hydra's ``.hydra/``): its ``summary.json``, ``metrics.csv``
and ``.hydra/overrides.yaml``. Prints a table ranked by the chosen metric and writes, into PATH,
``report.csv``, ``report.md`` and PNG plots; for a hyperparameter search, its trials and
``trials.csv``; for runs over several seeds, their groups (tools/groups.py). Runs still going, interrupted or failed appear
marked as such, unless ``--hide-failed`` leaves out those that failed or have no best metric;
a broken file never stops the report.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from finetune_cli.errors import FinetuneError
from finetune_cli.io_utils import atomic_write_bytes, text_bytes
from finetune_cli.tools.groups import chosen_keys, group_runs, show_groups, write_groups
from finetune_cli.tools.loading import tool_main
from finetune_cli.tools.plots import write_plots
from finetune_cli.tools.sweep import show_trials
from finetune_cli.tools.table import (
    Run,
    finder_outcome,
    is_scratch,
    memory_footnote,
    memory_kinds,
    memory_mark,
    negative_transfer_note,
    read_runs,
    render_table,
    task_of,
    transfer_text,
    wide_console,
)
from finetune_cli.tools.trials import find_studies, write_trials_csv
from finetune_cli.ui import metric_text, pct, pp

COLUMNS = [
    "run", "status", "model", "strategy", "overrides", "monitor", "best", "best_epoch", "balanced_acc", "macro_f1",
    "final_train_acc", "final_val_acc", "train_val_gap", "epochs_run", "total_seconds",
    "seconds_per_epoch", "images_per_s", "trainable_params", "total_params", "trainable_pct",
    "peak_memory_mb", "grad_optimizer_mb", "feature_cache", "weights", "transfer_gain",
    "target_val_acc", "adapt", "error",
]
SORT_KEYS = {
    "best": ("best", True),  # direction flips for loss monitors
    "gap": ("train_val_gap", False),
    "time": ("total_seconds", False),
    "speed": ("images_per_s", True),
    "trainable": ("trainable_pct", False),
}


def find_runs(root: Path) -> List[Path]:
    runs = {p.parent for p in root.rglob(".hydra") if p.is_dir()}
    return sorted(runs, key=lambda p: str(p))


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


def _fmt(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _cell(row: Dict[str, Any], key: str) -> str:
    """A report.md cell: accuracy in percent, the train - val gap in percentage points, the best
    value by its monitor; report.csv keeps the fractions."""
    if key == "best":
        return metric_text(row.get("monitor") or "val_acc", row.get(key))
    if key in ("final_train_acc", "balanced_acc", "macro_f1"):
        return pct(row.get(key))
    if key == "train_val_gap":
        return pp(row.get(key))
    return _fmt(row.get(key))


def _md_cell(run: Run, key: str) -> str:
    return transfer_text(run) if key == "vs_scratch" else _cell(run.row, key)


def write_tables(runs: List[Run], out: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    for r in runs:
        writer.writerow({k: ("" if r.row.get(k) is None else r.row.get(k)) for k in COLUMNS})
    atomic_write_bytes(out / "report.csv", text_bytes(buf.getvalue()))
    shown = ["run", "status", "model", "strategy", "overrides", "best", "best_epoch", "balanced_acc", "macro_f1",
             *(["vs_scratch"] if any(is_scratch(r) for r in runs) else []), "final_train_acc",
             "train_val_gap", "epochs_run", "total_seconds", "seconds_per_epoch", "images_per_s", "trainable_pct",
             "peak_memory_mb", "grad_optimizer_mb", "feature_cache"]
    kinds = memory_kinds(runs)
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for r in runs:
        cells = {k: _md_cell(r, k) for k in shown}
        if r.row["peak_memory_mb"] is not None:
            cells["peak_memory_mb"] += memory_mark(r, kinds)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells.values()) + " |")
    if kinds:
        lines += ["", memory_footnote(kinds, "peak_memory_mb")]
    note = negative_transfer_note(runs)
    if note:
        lines += ["", f"**{note}**"]
    failed = [r for r in runs if r.row["error"]]
    if failed:
        lines += ["", "Failed or incomplete runs:", ""]
        lines += [f"- `{r.row['run']}`: {r.row['error']}" for r in failed]
    atomic_write_bytes(out / "report.md", text_bytes("\n".join(lines) + "\n"))


def failed_or_unscored(r: Run) -> bool:
    """A run that failed, or has no best metric to rank (failed download, bad data, stopped early)."""
    best = r.row.get("best")
    return r.row["status"] == "failed" or isinstance(best, bool) or not isinstance(best, (int, float))


def build_report(root: Path, sort: str = "best") -> Tuple[List[Run], List[Path]]:
    """The training runs below ``root``, ranked, and the LR finder's folders (task=lr_find), left out."""
    if not root.exists():
        raise FinetuneError(f"{root} does not exist: give a run folder, a multirun folder, or outputs/.")
    paths = find_runs(root)
    if not paths:
        raise FinetuneError(f"No runs below {root}: a run folder holds a .hydra/ folder written by finetune-cli.")
    finders = [p for p in paths if task_of(p) == "lr_find"]
    runs = [p for p in paths if p not in finders]
    return _sort(read_runs(runs, root), sort) if runs else [], finders


def finders_note(finders: List[Path], root: Path) -> str:
    """The LR finder's folders, which are not training runs: named, with their suggestions."""
    shown = "; ".join(f"{p.relative_to(root) if p != root else p.name}: {finder_outcome(p)}" for p in finders)
    one = len(finders) == 1
    return (f"Left out {len(finders)} LR finder folder{'' if one else 's'} (task=lr_find sweeps the LR and trains "
            f"nothing; lr_find.json holds the suggestion): {shown}")


@tool_main
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="finetune-cli-report",
        description="Compare finetune-cli runs: a ranked table, report.csv, report.md and plots written into PATH.",
    )
    parser.add_argument("path", type=Path, help="a run folder, a multirun folder, or outputs/")
    parser.add_argument("--sort", choices=sorted(SORT_KEYS), default="best", help="ranking (default: best metric)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--group-by", metavar="KEYS",
                        help="aggregate runs that differ by seed: each group's mean, std and 95%% CI, compared with "
                             "the best group by Welch's t-test (report_groups.csv, report_groups.md, groups.png). "
                             "Config keys (strategy, optimizer.lr; comma-separated), auto (every override that varies "
                             "but trainer.seed) or none. Default: auto where the runs' trainer.seed varies")
    parser.add_argument("--hide-failed", action="store_true",
                        help="leave out runs that failed or have no best metric (table, CSV, Markdown and plots)")
    args = parser.parse_args(argv)
    runs, finders = build_report(args.path, args.sort)
    if finders:
        print(finders_note(finders, args.path))
    if not runs:
        print(f"No training runs below {args.path} to compare.")
        return 0
    if args.hide_failed:
        hidden = [r for r in runs if failed_or_unscored(r)]
        runs = [r for r in runs if not failed_or_unscored(r)]
        if hidden:
            one = len(hidden) == 1
            print(f"Hid {len(hidden)} run{'' if one else 's'} that failed or {'has' if one else 'have'} no best "
                  f"metric (run without --hide-failed to list {'it' if one else 'them'}).")
    keys = chosen_keys(args.group_by, runs)  # (a key no run has is said before anything is written)
    grouping = group_runs(runs, keys) if keys is not None else None
    wide_console().print(render_table(runs))
    out = args.path if args.path.is_dir() else args.path.parent
    write_tables(runs, out)
    written = [out / "report.csv", out / "report.md"]
    try:
        studies = find_studies(args.path)
    except FinetuneError as exc:  # a search's study, and no Optuna to read it: the rest of the report stands
        studies = []
        print(f"Trials not listed: {exc}")
    if studies:
        show_trials(studies, runs)
        write_trials_csv(studies, out / "trials.csv")
        written.append(out / "trials.csv")
    written += [] if args.no_plots else write_plots(runs, out)
    if grouping is not None:
        show_groups(grouping)
        written += write_groups(grouping, out, plot=not args.no_plots)
    print("Wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
