"""Console output: the plan table, one line per epoch, the result table; and how every tool
shows a metric to a person (``pct``, ``pp``, ``metric_text``).

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


def tolerant_streams() -> None:
    """Printing never fails on a file name that is not valid UTF-8: its odd bytes show as escapes
    (``\\udcff``) on the console, as they do in the log file."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):  # replaced by something that is not a text stream
            pass


# --- units ------------------------------------------------------------------------------------
# What a person reads: accuracy (and any other 0-1 score) in percent with one decimal, the
# difference between two accuracies in percentage points, a loss as a plain number. Files meant
# for programs (summary.json, metrics.csv, report.csv, evaluation JSON) keep fractions.


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_accuracy(metric: str) -> bool:
    """``val_acc``, ``train_acc``, ``accuracy``: a fraction, shown in percent. A loss is not."""
    return str(metric).endswith(("acc", "accuracy", "f1"))


def metric_scale(metric: str) -> float:
    """The factor from the stored value to the shown one (plots): 100 for an accuracy, else 1."""
    return 100.0 if is_accuracy(metric) else 1.0


def pct(fraction: Any, width: int = 0) -> str:
    """A 0-1 score in percent with one decimal: ``0.84`` -> ``84.0%``; ``-`` when missing.
    ``width`` pads the number, so columns of log lines stay aligned."""
    return f"{100 * fraction:{width}.1f}%" if _number(fraction) else "-"


def share(part: int, whole: int) -> str:
    """``part`` of ``whole`` in percent: one decimal, or two significant digits below 1%, so a
    linear probe's head (5,130 of 11.2M parameters) reads 0.046%, not 0.0%."""
    value = 100.0 * part / max(whole, 1)
    return f"{value:.2g}%" if 0 < value < 1 else f"{value:.1f}%"


def pp(difference: Any, signed: bool = True) -> str:
    """The difference between two 0-1 scores in percentage points: ``0.066`` -> ``+6.6 pp``
    (``6.6 pp`` unsigned, for a threshold)."""
    if not _number(difference):
        return "-"
    return f"{round(100 * difference, 1) + 0.0:{'+' if signed else ''}.1f} pp"


def metric_text(metric: str, value: Any) -> str:
    """A monitored metric by its name: ``val_acc`` 0.84 -> ``84.0%``, ``val_loss`` -> ``0.4090``."""
    if not _number(value):
        return "-"
    return pct(value) if is_accuracy(metric) else f"{value:.4f}"


# --- console -----------------------------------------------------------------------------------


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
    log.info(f"Trainable: {trainable:,} / {total:,} ({share(trainable, total)})")
    for note in notes:
        log.info(note)


def show_epoch(row: Dict[str, Any], epochs: int, best: bool) -> None:
    log.info(
        f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f} acc {pct(row['train_acc'], 5)}"
        f"  val loss {row['val_loss']:.4f} acc {pct(row['val_acc'], 5)}"
        + (f"  EMA acc {pct(row['ema_val_acc'], 5)}" if "ema_val_acc" in row else "")
        + (f"  target acc {pct(row['target_val_acc'], 5)}" if "target_val_acc" in row else "")
        + (f"  domain acc {pct(row['domain_acc'], 5)}" if "domain_acc" in row else "")
        + f"  lr {row['lr']:.2e}  {row['epoch_seconds']:.1f}s{'  *best' if best else ''}"
    )


def trainable_text(summary: Dict[str, Any]) -> str:
    """At the end of the run, and the range when the strategy changed it (progressive, staged)."""
    total = max(summary["total_params"], 1)
    start = summary["trainable_params"]
    end = summary.get("trainable_params_final", start)
    text = f"{end:,} / {summary['total_params']:,} ({share(end, total)}) at the end"
    if end != start:
        text += f"; {share(start, total)} -> {share(end, total)} during the run"
    return text


def class_rows(at_best: Dict[str, Any]) -> List[tuple]:
    """Balanced accuracy and macro-F1 at the best epoch, for the weights and their average."""
    rows = []
    for prefix, who in (("val", ""), ("ema_val", " (EMA)")):
        if f"{prefix}_balanced_acc" in at_best:
            rows.append((f"balanced acc / macro-F1{who}", f"{pct(at_best[f'{prefix}_balanced_acc'])} / "
                                                          f"{pct(at_best[f'{prefix}_macro_f1'])} (same epoch)"))
    return rows


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
        (f"best {best['monitor']}", f"{metric_text(best['monitor'], best['value'])} (epoch {best['epoch']})"),
        *class_rows(summary.get("at_best") or {}),
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
