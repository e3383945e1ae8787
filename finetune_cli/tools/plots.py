"""The PNG plots ``finetune-cli-report`` writes: ``val_acc.png``, ``acc_vs_time.png`` and, for
runs whose layer groups train at different times or LRs, ``lr_groups.png``.

Each run is named by its number in the report's table (``#``) and by what differs between the
runs shown: its strategy and the overrides whose values vary. Accuracy is in percent, as in the
table. Legends and keys sit outside the axes; epochs are whole numbers.
"""

from __future__ import annotations

import io
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from finetune_cli.io_utils import atomic_write_bytes
from finetune_cli.tools.evaluate import text_colour
from finetune_cli.tools.table import SHOWN_APART, Run
from finetune_cli.ui import is_accuracy, metric_scale

STAGED = ("progressive", "ulmfit", "discriminative", "staged", "two_phase")
ACC_UNIT = "%"  # as the report's table prints accuracy
CELL_TEXT_UP_TO = 12  # epochs; with more, the LR of each cell is read from the colour bar only
MARKERS = "osD^vP"
KEY_TITLE = "# (as in the table): run"
KEY_ROWS = 40  # a longer key gets more columns
LINESTYLES = ("-", "--", ":", "-.")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


# --- labels ----------------------------------------------------------------------------------


def _short_keys(keys: Sequence[str]) -> Dict[str, str]:
    """Each dotted key by its last part (``optimizer.lr`` -> ``lr``), or by as many parts as
    keep it apart from the other keys."""
    short = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if sum(other == tail or other.endswith("." + tail) for other in keys) == 1:
                break
        short[key] = tail
    return short


def _short_value(value: str, width: int = 18) -> str:
    value = value.strip("'\"")
    if "/" in value.rstrip("/"):
        value = value.rstrip("/").rsplit("/", 1)[1]
    return value if len(value) <= width else value[: width - 1] + "…"


def _folder_tag(r: Run) -> str:
    name = Path(r.row["run"]).name
    job = re.match(r"(\d+)_", name)
    return f"job {job[1]}" if job else _short_value(name, 24)


def _distinct(labels: List[str], runs: Sequence[Run]) -> List[str]:
    """Labels shared by several runs get the run's folder (its job number in a sweep), then a count."""
    shared = Counter(labels)
    labels = [f"{label} ({_folder_tag(r)})" if shared[label] > 1 else label for label, r in zip(labels, runs)]
    shared, seen = Counter(labels), Counter()
    out = []
    for label in labels:
        seen[label] += 1
        out.append(f"{label} [{seen[label]}]" if shared[label] > 1 else label)
    return out


def run_labels(runs: Sequence[Run]) -> List[str]:
    """One short, distinct label per run: its strategy (and model, where models differ), then the
    overrides whose values differ between ``runs``, keys shortened: ``progressive lr=0.01``."""
    keys = sorted({k for r in runs for k in r.override_map if k not in SHOWN_APART and not k.startswith("hydra.")})
    varying = [k for k in keys if len({r.override_map.get(k) for r in runs}) > 1]
    short = _short_keys(varying)
    models = len({r.row.get("model") for r in runs}) > 1
    labels = []
    for r in runs:
        parts = [r.row.get("model") or "?"] if models else []
        parts.append(r.row.get("strategy") or r.override_map.get("strategy") or "run")
        parts += [f"{short[k]}={_short_value(r.override_map[k])}" for k in varying if k in r.override_map]
        labels.append(" ".join(parts))
    return _distinct(labels, runs)


def _style(i: int) -> Dict[str, Any]:
    """The same colour, marker and line style for the run in every plot."""
    return {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)], "linestyle": LINESTYLES[i % len(LINESTYLES)]}


def _figure(n_entries: int):
    """A figure with one axes, tall enough for a key of ``n_entries`` rows beside it."""
    rows = math.ceil(n_entries / math.ceil(max(n_entries, 1) / KEY_ROWS))
    return _pyplot().subplots(figsize=(8, max(5.0, 0.19 * rows + 1.0)))


def _legend_outside(ax, handles=None) -> None:
    kwargs = {"handles": handles} if handles is not None else {}
    n = len(handles if handles is not None else ax.get_legend_handles_labels()[0])
    ax.legend(**kwargs, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8,
              ncol=math.ceil(n / KEY_ROWS), title=KEY_TITLE, title_fontsize=8, alignment="left")


def _integer_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# --- val_acc.png -----------------------------------------------------------------------------


def _monitor_words(runs: Sequence[Run]) -> str:
    monitors = sorted({r.row.get("monitor") for r in runs if r.row.get("monitor")})
    return monitors[0] if len(monitors) == 1 else "each run's monitor"


def val_acc_figure(runs: Sequence[Run], numbers: Sequence[int], labels: Sequence[str]):
    from matplotlib.lines import Line2D

    shown = [(r, n, label) for r, n, label in zip(runs, numbers, labels) if r.metrics and "val_acc" in r.metrics[0]]
    fig, ax = _figure(len(shown) + 1)
    for r, n, label in shown:
        style = _style(n - 1)
        epochs = [m["epoch"] for m in r.metrics]
        accs = [metric_scale("val_acc") * m["val_acc"] if _number(m["val_acc"]) else math.nan for m in r.metrics]
        ax.plot(epochs, accs, label=f"{n}: {label}", markersize=7, markerfacecolor="none", markeredgewidth=1.5,
                linewidth=1.8, **style)
        if r.row.get("best_epoch") in epochs:
            ax.plot(r.row.get("best_epoch"), accs[epochs.index(r.row.get("best_epoch"))], marker="*", markersize=14,
                    color=style["color"], markeredgecolor="black", linestyle="none", zorder=3)
    ax.set(xlabel="epoch", ylabel=f"validation accuracy ({ACC_UNIT})", title="Validation accuracy per epoch")
    _integer_epochs(ax)
    ax.grid(alpha=0.3)
    if not shown:
        ax.text(0.5, 0.5, "no run has per-epoch metrics", ha="center", va="center", transform=ax.transAxes)
        return fig
    best = Line2D([], [], marker="*", markersize=12, color="grey", markeredgecolor="black", linestyle="none",
                  label=f"best epoch (by {_monitor_words([r for r, _, _ in shown])})")
    _legend_outside(ax, ax.get_legend_handles_labels()[0] + [best])
    return fig


# --- acc_vs_time.png -------------------------------------------------------------------------


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def time_points(runs: Sequence[Run]) -> Tuple[str, List[Tuple[int, float, float]]]:
    """``(what y is, [(index in runs, total seconds, y)])``: y is each run's best monitored value
    where the runs share a monitor, else its best validation accuracy over the epochs; an
    accuracy in percent."""
    timed = [(i, r) for i, r in enumerate(runs) if _number(r.row.get("total_seconds"))]
    monitors = {r.row.get("monitor") for _, r in timed if _number(r.row.get("best"))}
    if len(monitors) == 1:
        (monitor,) = monitors
        what = f"best {monitor} " + (f"({ACC_UNIT}, higher is better)" if is_accuracy(monitor) else "(lower is better)")
        scale = metric_scale(monitor)
        return what, [(i, r.row["total_seconds"], scale * r.row["best"]) for i, r in timed if _number(r.row.get("best"))]
    points = []
    for i, r in timed:
        accs = [m["val_acc"] for m in r.metrics if _number(m.get("val_acc"))]
        if accs:
            points.append((i, r.row["total_seconds"], metric_scale("val_acc") * max(accs)))
    return f"best val_acc over the epochs ({ACC_UNIT})", points


def _clusters(points: Sequence[Tuple[int, float, float]], near: float = 0.03) -> List[Tuple[float, float, List[int]]]:
    """Points closer than ``near`` of the axes' spans share one annotation."""
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    groups: List[Tuple[float, float, List[int]]] = []
    for i, x, y in points:
        for gx, gy, members in groups:
            if abs(gx - x) / span_x < near and abs(gy - y) / span_y < near:
                members.append(i)
                break
        else:
            groups.append((x, y, [i]))
    return groups


OFFSETS = ((5, 5), (5, -5), (-5, 5), (-5, -5), (9, 0), (-9, 0), (0, 9), (0, -9), (14, 14), (-14, -14))


def _number_points(ax, notes: Sequence[Tuple[float, float, str]]) -> None:
    """Write each note beside its point, at the first offset where it covers no other note or point."""
    from matplotlib.transforms import Bbox

    ax.set(xlim=ax.get_xlim(), ylim=ax.get_ylim())  # fixed, so positions measured now hold when saved
    renderer = ax.figure.canvas.get_renderer()
    taken = [ax.transData.transform((x, y)) for x, y, _ in notes]
    taken = [Bbox.from_bounds(px - 5, py - 5, 10, 10) for px, py in taken]
    for x, y, text in notes:
        for dx, dy in OFFSETS:
            note = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=9,
                               fontweight="bold", ha="left" if dx >= 0 else "right", va="bottom" if dy >= 0 else "top")
            box = note.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in taken) or (dx, dy) == OFFSETS[-1]:
                break
            note.remove()
        taken.append(box)


def time_figure(runs: Sequence[Run], numbers: Sequence[int], labels: Sequence[str]):
    what, points = time_points(runs)
    fig, ax = _figure(len(points))
    for i, x, y in points:
        style = _style(numbers[i] - 1)
        ax.plot(x, y, marker=style["marker"], color=style["color"], markersize=8, linestyle="none",
                label=f"{numbers[i]}: {labels[i]}")
    ax.margins(0.12)
    if points:
        _number_points(ax, [(x, y, ",".join(str(numbers[i]) for i in members)) for x, y, members in _clusters(points)])
    ax.set(xlabel="total run time (s): setup, training and validation, as the table's time column",
           ylabel=what, title=f"{what.split(' (')[0].capitalize()} against total run time")
    ax.grid(alpha=0.3)
    if points:
        _legend_outside(ax)
    else:
        ax.text(0.5, 0.5, "no run has a best metric and a run time", ha="center", va="center", transform=ax.transAxes)
    return fig


# --- lr_groups.png ---------------------------------------------------------------------------


def _lr_columns(r: Run) -> List[str]:
    return [k for k in r.metrics[0] if k.startswith("lr_")]


def _trains(index: int, n_groups: int, row: Dict[str, Any]) -> bool:
    """Whether group ``index`` of ``n_groups`` (the head last) trains in this metrics.csv row:
    ``trainable_groups`` counts the groups just below the head that train; the head always does."""
    k = row.get("trainable_groups")
    if not isinstance(k, float) or math.isnan(k):
        return True
    return index >= n_groups - 1 - int(k)


def lrs_vary(r: Run) -> bool:
    """Progressive or discriminative runs: LRs differ between groups, or events happened."""
    cols = _lr_columns(r)
    differ = any(len({m[c] for c in cols}) > 1 for m in r.metrics)
    events = any(m.get("events") not in (None, "") and not isinstance(m.get("events"), float) for m in r.metrics)
    return differ or events or r.row.get("strategy") in STAGED


@dataclass
class Band:
    """A layer group's row in the timeline: the epochs it trains and its LR at each one's start."""

    group: str
    epochs: List[int]
    lrs: List[float]

    @property
    def frozen_throughout(self) -> bool:
        return not self.epochs


def group_bands(r: Run) -> List[Band]:
    """One band per layer group, from the input side to the head, as metrics.csv lists them."""
    cols = _lr_columns(r)
    bands = []
    for i, col in enumerate(cols):
        rows = [m for m in r.metrics if _trains(i, len(cols), m) and _number(m.get(col)) and _number(m.get("epoch"))]
        bands.append(Band(col[3:], [int(m["epoch"]) for m in rows], [m[col] for m in rows]))
    return bands


def _lr_norm(bands: Sequence[Band]):
    from matplotlib.colors import LogNorm

    lrs = [lr for b in bands for lr in b.lrs if lr > 0] or [1e-3]
    low, high = min(lrs), max(lrs)
    return LogNorm(low / 2, high * 2) if low == high else LogNorm(low, high)


def _draw_bands(ax, bands: Sequence[Band], last_epoch: int):
    from matplotlib import colormaps

    cmap, norm = colormaps["viridis"], _lr_norm(bands)
    ax.barh(range(len(bands)), last_epoch, left=0.5, height=0.8, color="#eeeeee", edgecolor="none")
    for row, band in enumerate(bands):
        if band.frozen_throughout:
            ax.text((last_epoch + 1) / 2, row, "frozen throughout", ha="center", va="center", fontsize=8,
                    style="italic", color="#555555")
        for epoch, lr in zip(band.epochs, band.lrs):
            colour = cmap(norm(lr)) if lr > 0 else (0.8, 0.8, 0.8, 1.0)
            ax.barh(row, 1, left=epoch - 0.5, height=0.8, color=colour, edgecolor="white", linewidth=1)
            if last_epoch <= CELL_TEXT_UP_TO:
                ax.text(epoch, row, f"{lr:.2g}", ha="center", va="center", fontsize=8, color=text_colour(colour[:3]))
    return cmap, norm


def lr_figure(runs: Sequence[Run], numbers: Sequence[int], labels: Sequence[str]):
    """None where no run's groups train at different times or LRs."""
    plt = _pyplot()
    from matplotlib.cm import ScalarMappable

    chosen = [i for i, r in enumerate(runs) if r.metrics and _lr_columns(r) and lrs_vary(r)]
    if not chosen:
        return None
    heights = [0.45 * len(_lr_columns(runs[i])) + 1.2 for i in chosen]
    fig, axes = plt.subplots(len(chosen), 1, figsize=(9, sum(heights) + 0.6), squeeze=False, layout="constrained",
                             gridspec_kw={"height_ratios": heights})
    for ax, i in zip(axes[:, 0], chosen):
        bands = group_bands(runs[i])
        last = max([int(m["epoch"]) for m in runs[i].metrics if _number(m.get("epoch"))] or [1])
        cmap, norm = _draw_bands(ax, bands, last)
        ax.set_yticks(range(len(bands)), [b.group for b in bands])
        ax.set(xlim=(0.5, last + 0.5), ylim=(-0.6, len(bands) - 0.4), xlabel="epoch",
               title=f"{numbers[i]}: {labels[i]}")
        _integer_epochs(ax)
        fig.colorbar(ScalarMappable(norm, cmap), ax=ax, label="LR at epoch start", pad=0.02)
    fig.suptitle("When each layer group trains (coloured by its LR) and when it is frozen (grey)")
    return fig


# --- writing ---------------------------------------------------------------------------------


def report_figures(runs: Sequence[Run]) -> Dict[str, Any]:
    """The figures by file name; runs are numbered as in the report's table (1, 2, ... in order)."""
    numbers = list(range(1, len(runs) + 1))
    plotted = [i for i, r in enumerate(runs) if r.metrics or _number(r.row.get("best"))]
    named = dict(zip(plotted, run_labels([runs[i] for i in plotted])))
    labels = [named.get(i, r.row["run"]) for i, r in enumerate(runs)]
    figures = {"val_acc.png": val_acc_figure(runs, numbers, labels),
               "acc_vs_time.png": time_figure(runs, numbers, labels)}
    lrs = lr_figure(runs, numbers, labels)
    if lrs is not None:
        figures["lr_groups.png"] = lrs
    return figures


def save_png(fig, path: Path) -> Path:
    """``fig`` written to ``path`` at once (atomically), then closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_plots(runs: Sequence[Run], out: Path) -> List[Path]:
    return [save_png(fig, out / name) for name, fig in report_figures(runs).items()]
