"""``lr_find.png``: the LR finder's training loss against the head's LR (log scale), each step's
and smoothed, with every rule's pick marked and the suggestion drawn as a line; a second axis on
top reads the same LRs as ``optimizer.lr``. The key sits beside the axes."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Dict

from finetune_cli.io_utils import atomic_write_bytes

MARKERS = {"valley": "o", "steepest": "v", "minimum": "s"}


def _limits(losses: list, smoothed: list) -> tuple:
    """The loss axis: from the lowest loss to a little above the smoothed curve's highest (a
    diverging step's loss may be far above it)."""
    low = min(min(losses), min(smoothed))
    high = max(smoothed)
    pad = 0.05 * max(high - low, 1e-6)
    return low - pad, high + 4 * pad


def picture(rows: list, found: Dict[str, Any], optimizer_lr_per_head: float, title: str) -> bytes:
    """``rows``: lr_find.csv's; ``found``: lr_find.json's; ``optimizer_lr_per_head``: optimizer.lr
    over the head's LR (0: the LRs come from strategy.group_lrs, no second axis)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    kept = [r for r in rows if math.isfinite(r["loss"]) and math.isfinite(r["smoothed"])]
    lrs = [r["lr"] for r in kept]
    fig, ax = plt.subplots(figsize=(9, 5))
    ax.plot(lrs, [r["loss"] for r in kept], color="0.65", lw=0.8, label="loss, each step")
    ax.plot(lrs, [r["smoothed"] for r in kept], color="C0", lw=2,
            label=f"smoothed (moving average, {found['smoothing']:g})")
    for rule, pick in found["rules"].items():
        row = rows[pick["step"] - 1]
        chosen = rule == found["rule"]
        ax.plot([row["lr"]], [row["smoothed"]], ls="", marker=MARKERS.get(rule, "D"), ms=9 if chosen else 7,
                color="C3" if chosen else "C1", label=f"{rule}: head LR {pick['head_lr']:.1e}"
                + (" (the lowest point's / 10)" if rule == "minimum" else "") + (" (suggested)" if chosen else ""))
    ax.axvline(found["head_lr"], color="C3", ls="--", lw=1, label=found["override"])
    ax.set_xscale("log")
    ax.set_ylim(*_limits([r["loss"] for r in kept], [r["smoothed"] for r in kept]))
    ax.set_xlabel("head LR")
    ax.set_ylabel("training loss")
    if optimizer_lr_per_head:
        top = ax.secondary_xaxis("top", functions=(lambda x: x * optimizer_lr_per_head,
                                                   lambda x: x / optimizer_lr_per_head))
        top.set_xlabel("optimizer.lr")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    stopped = f"; stopped early: {found['stopped']}" if found["stopped"] else ""
    ax.set_title(f"{title}\n{found['steps_run']} of {found['steps']} steps{stopped}", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_picture(path: Path, rows: list, found: Dict[str, Any], optimizer_lr_per_head: float, title: str) -> None:
    atomic_write_bytes(path, picture(rows, found, optimizer_lr_per_head, title))
