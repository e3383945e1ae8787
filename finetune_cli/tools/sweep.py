"""The table printed at the end of a sweep: the report's run table, one row per job in job order."""

from __future__ import annotations

from pathlib import Path
from typing import List

from finetune_cli.tools.table import read_runs, render_table, wide_console


def _job_number(path: Path) -> int:
    head = path.name.split("_", 1)[0]
    return int(head) if head.isdigit() else 0


def job_dirs(sweep_dir: Path) -> List[Path]:
    """The sweep's job folders (``<job number>_<overrides>``), in job order."""
    found = {p.parent for pattern in ("*/.hydra", "*/summary.json") for p in sweep_dir.glob(pattern)}
    return sorted(found, key=lambda p: (_job_number(p), p.name))


def show_sweep(sweep_dir: Path) -> None:
    jobs = job_dirs(sweep_dir)
    if not jobs:
        return
    # printed, not logged: at the end of a sweep the loggers carry Hydra's own line prefix
    print(f"Sweep: {sweep_dir}", flush=True)
    table = render_table(read_runs(jobs, sweep_dir), job_numbers=[str(_job_number(p)) for p in jobs])
    wide_console().print(table)
