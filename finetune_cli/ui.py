"""Console output: the plan table, one line per epoch, the result table.

Everything goes through logging, so the run's log file holds the same text as the console.
Tables are rendered by rich as plain text: readable in a terminal and in a batch job's log.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Dict, List, Sequence

from rich.console import Console
from rich.table import Table

log = logging.getLogger("finetune_cli")


def interactive() -> bool:
    """Progress bars only when a person watches: stdout and stderr are both terminals."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def render(table: Table) -> str:
    console = Console(width=110, force_terminal=False, color_system=None, record=True, file=None)
    with console.capture() as cap:
        console.print(table)
    return cap.get().rstrip()


def fmt_params(n: int) -> str:
    for unit, div in (("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def show_plan(title: str, rows: Sequence[Dict[str, Any]], trainable: int, total: int, notes: Sequence[str]) -> None:
    log.info(title)
    table = Table()
    for col, justify in (("group", "left"), ("params", "right"), ("status", "left"), ("lr", "right"), ("batchnorm", "left")):
        table.add_column(col, justify=justify)
    for r in rows:
        table.add_row(r["group"], fmt_params(r["params"]), r["status"], r["lr"], r["bn"])
    log.info(render(table))
    pct = 100.0 * trainable / max(total, 1)
    log.info(f"Trainable: {trainable:,} / {total:,} ({pct:.1f}%)")
    for note in notes:
        log.info(note)


def show_epoch(row: Dict[str, Any], epochs: int, best: bool) -> None:
    log.info(
        f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:5.1f}%"
        f"  val loss {row['val_loss']:.4f} acc {100 * row['val_acc']:5.1f}%"
        f"  lr {row['lr']:.2e}  {row['epoch_seconds']:.1f}s{'  *best' if best else ''}"
    )


def trainable_text(summary: Dict[str, Any]) -> str:
    """At the end of the run, and the range when the strategy changed it (progressive, staged)."""
    total = max(summary["total_params"], 1)
    start = summary["trainable_params"]
    end = summary.get("trainable_params_final", start)
    text = f"{end:,} / {summary['total_params']:,} ({100 * end / total:.1f}%) at the end"
    if end != start:
        text += f"; {100 * start / total:.1f}% -> {100 * end / total:.1f}% during the run"
    return text


def show_result(summary: Dict[str, Any]) -> None:
    log.info("Result")
    table = Table(show_header=False)
    table.add_column("key")
    table.add_column("value")
    best = summary["best"]
    rows: List[tuple] = [
        ("model", f"{summary['model']} ({summary['weights']})"),
        ("strategy", summary["strategy"]),
        ("data", f"{summary['dataset']['name']}: {summary['dataset']['classes']} classes, "
                 f"{summary['dataset']['train_images']} train / {summary['dataset']['val_images']} val"),
        (f"best {best['monitor']}", f"{best['value']:.4f} (epoch {best['epoch']})"),
        ("epochs run", str(summary["epochs_run"])),
        ("time", f"{summary['total_seconds']:.1f}s in all: {summary['train_seconds']:.1f}s training "
                 f"({summary['train_images_per_s']:.0f} img/s), {summary['setup_seconds']:.1f}s setup"),
        ("trainable", trainable_text(summary)),
        ("peak memory", f"{summary['peak_memory_mb']:.0f} MB ({summary['peak_memory_kind']})"),
        ("outputs", summary["output_dir"]),
    ]
    for k, v in rows:
        table.add_row(k, v)
    log.info(render(table))
