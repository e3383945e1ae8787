"""The table printed at the end of a sweep: the report's run table, one row per job in job order;
for a hyperparameter search, its trials after it; for a sweep over seeds, its groups
(``finetune-cli-report --group-by``)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

from rich.markup import escape

from finetune_cli.errors import FinetuneError
from finetune_cli.tools.groups import chosen_keys, group_runs, show_groups
from finetune_cli.tools.table import Run, read_runs, render_table, wide_console
from finetune_cli.tools.trials import Study, read_studies, study_monitor, trials_header, trials_notes, trials_table


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
    runs = read_runs(jobs, sweep_dir)
    wide_console().print(render_table(runs, job_numbers=[str(_job_number(p)) for p in jobs]))
    show_trials(read_studies(sweep_dir), runs)
    keys = chosen_keys(None, runs)  # a sweep over seeds: its groups too
    if keys is not None:
        try:
            show_groups(group_runs(runs, keys))
        except FinetuneError as exc:
            print(f"No groups over seeds: {exc}")


def show_trials(studies: Sequence[Study], runs: Sequence[Run]) -> None:
    """A search's trials (its Optuna study), after the table of its runs."""
    monitors = [r.row.get("monitor") for r in runs]
    console = wide_console()
    for study in studies:
        monitor = study_monitor(study, monitors)
        console.print(escape(trials_header(study, monitor)))
        console.print(trials_table(study, monitor))
        console.print(escape("\n".join(trials_notes(study, monitor))))
