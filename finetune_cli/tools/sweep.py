"""The table printed at the end of a sweep: one row per job, from each job's summary.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from rich.table import Table

from finetune_cli.ui import render


def _job_number(path: Path) -> int:
    head = path.parent.name.split("_", 1)[0]
    return int(head) if head.isdigit() else 0


def read_summaries(sweep_dir: Path) -> List[Dict[str, Any]]:
    rows = []
    for path in sorted(sweep_dir.glob("*/summary.json"), key=_job_number):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {"status": "unreadable"}
        data["job"] = str(_job_number(path))
        rows.append(data)
    return rows


def show_sweep(sweep_dir: Path) -> None:
    rows = read_summaries(sweep_dir)
    if not rows:
        return
    # printed, not logged: at the end of a sweep the loggers carry Hydra's own line prefix
    print(f"Sweep: {sweep_dir}")
    table = Table()
    for col in ("job", "model", "strategy", "status", "best", "epoch", "train s", "trainable %"):
        table.add_column(col)
    for r in rows:
        best = r.get("best") or {}
        start, end = r.get("trainable_params"), r.get("trainable_params_final", r.get("trainable_params"))
        total = r.get("total_params") or 1
        table.add_row(
            r["job"],
            r.get("model", "?"),
            r.get("strategy", "?"),
            r.get("status", "?") + (f": {r['error']}" if r.get("error") else ""),
            f"{best['monitor']} {best['value']:.4f}" if best else "-",
            str(best.get("epoch", "-")),
            f"{r['train_seconds']:.1f}" if "train_seconds" in r else "-",
            "-" if start is None else (f"{100 * start / total:.1f}" + ("" if end == start else f" -> {100 * end / total:.1f}")),
        )
    print(render(table), flush=True)
