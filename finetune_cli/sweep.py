"""The table printed at the end of a sweep: one row per job, from each job's summary.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List

from rich.table import Table

from finetune_cli.ui import _render

log = logging.getLogger("finetune_cli")


def read_summaries(sweep_dir: Path) -> List[Dict[str, Any]]:
    rows = []
    for path in sorted(sweep_dir.glob("*/summary.json"), key=lambda p: p.parent.name):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {"status": "unreadable"}
        data["job"] = path.parent.name
        rows.append(data)
    return rows


def show_sweep(sweep_dir: Path) -> None:
    rows = read_summaries(sweep_dir)
    if not rows:
        return
    table = Table(title=f"Sweep: {sweep_dir}", title_justify="left")
    for col in ("job", "status", "best", "epoch", "time s", "trainable"):
        table.add_column(col)
    for r in rows:
        best = r.get("best") or {}
        table.add_row(
            r["job"],
            r.get("status", "?") + (f" ({r['error']})" if r.get("error") else ""),
            f"{best['monitor']} {best['value']:.4f}" if best else "-",
            str(best.get("epoch", "-")),
            f"{r['total_seconds']:.1f}" if "total_seconds" in r else "-",
            f"{r['trainable_pct']:.1f}%" if "trainable_pct" in r else "-",
        )
    log.info(_render(table))
