"""The trials of a hyperparameter search (``finetune-cli -m hparams_search=...``), read back from
the Optuna study the sweep keeps in its folder (``optuna.db``): one row per trial with its sampled
parameters, its objective (the run's best monitored value) and its state, the best one marked.
Printed at the end of a search and by ``finetune-cli-report``, which also writes ``trials.csv``.

Trial N ran in the sweep's job folder ``N_<overrides>``. Optuna is an optional extra
(``finetune-cli[search]``), imported only where a study is found."""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from rich.table import Table

from finetune_cli.io_utils import atomic_write_bytes, text_bytes
from finetune_cli.ui import metric_text

STUDY_FILE = "optuna.db"
STATES = {"COMPLETE": "completed", "FAIL": "failed", "RUNNING": "running or interrupted", "PRUNED": "pruned",
          "WAITING": "waiting"}


@dataclass(frozen=True)
class Trial:
    number: int
    state: str  # completed, failed, running or interrupted, pruned, waiting
    params: Dict[str, Any]
    value: Optional[float]  # the objective: the run's best monitored value; None unless completed


@dataclass(frozen=True)
class Study:
    name: str
    folder: Path
    maximize: bool
    trials: List[Trial] = field(default_factory=list)

    @property
    def best(self) -> Optional[Trial]:
        scored = [t for t in self.trials if t.state == "completed" and t.value is not None and math.isfinite(t.value)]
        if not scored:
            return None
        return (max if self.maximize else min)(scored, key=lambda t: t.value)

    @property
    def param_names(self) -> List[str]:
        return sorted({k for t in self.trials for k in t.params})


def quiet_optuna() -> None:
    """Optuna's lines go to the log like any other (not through its own coloured handler); alembic,
    which sets up the study's database, says nothing unless something is wrong."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import optuna

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()


def read_studies(folder: Path) -> List[Study]:
    """Every study kept in ``folder/optuna.db`` ([] without one). Without Optuna installed a study
    cannot be read: the error says how to install it."""
    from finetune_cli.errors import FinetuneError

    db = folder / STUDY_FILE
    if not db.is_file():
        return []
    try:
        quiet_optuna()
        import optuna
    except ImportError:
        raise FinetuneError(f"{db} holds a hyperparameter search's trials; reading it needs Optuna: "
                            "pip install 'finetune-cli[search]'.") from None
    storage = f"sqlite:///{db.resolve()}"
    studies = []
    for summary in optuna.study.get_all_study_summaries(storage=storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        trials = [Trial(t.number, STATES.get(t.state.name, t.state.name.lower()), dict(t.params), t.value)
                  for t in study.trials]
        studies.append(Study(summary.study_name, folder, study.direction.name == "MAXIMIZE", trials))
    return studies


def find_studies(root: Path) -> List[Study]:
    """The studies of every search below ``root`` (a sweep folder, or outputs/)."""
    folders = sorted({p.parent for p in root.rglob(STUDY_FILE)}) if root.is_dir() else []
    return [s for folder in folders for s in read_studies(folder)]


def param_text(value: Any) -> str:
    """A sampled value as a person reads it: 3 significant digits for a float."""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _short(name: str, names: Sequence[str]) -> str:
    """``optimizer.lr`` -> ``lr`` where no other parameter ends the same."""
    tail = name.rsplit(".", 1)[-1]
    return tail if sum(n.rsplit(".", 1)[-1] == tail for n in names) == 1 else name


def trials_table(study: Study, monitor: str) -> Table:
    """One row per trial in trial order; the best marked with ``<- best``."""
    names = study.param_names
    best = study.best
    table = Table()
    for col in ("trial", *(_short(n, names) for n in names), "objective", "status"):
        table.add_column(col, no_wrap=True)
    for t in study.trials:
        mark = " <- best" if best is not None and t.number == best.number else ""
        table.add_row(str(t.number), *(param_text(t.params[n]) if n in t.params else "-" for n in names),
                      metric_text(monitor, t.value) + mark, t.state)
    return table


def trials_header(study: Study, monitor: str) -> str:
    return (f"Trials of study '{study.name}' ({study.folder / STUDY_FILE}); objective: the run's best {monitor}, "
            f"{'highest' if study.maximize else 'lowest'} best")


def trials_notes(study: Study, monitor: str) -> List[str]:
    """What the table holds in all, where each trial ran, and the best trial's settings."""
    done = sum(t.state == "completed" for t in study.trials)
    failed = sum(t.state == "failed" for t in study.trials)
    notes = [f"{len(study.trials)} trials: {done} completed, {failed} failed. Trial N ran in job folder N_... ."]
    if failed:
        notes.append("A failed trial stays in the study as failed (the sampler leaves it out); its error is in its "
                     "run's summary.json.")
    best = study.best
    if best is not None:
        settings = " ".join(f"{n}={param_text(best.params[n])}" for n in study.param_names if n in best.params)
        notes.append(f"Best: trial {best.number}, {settings}: {metric_text(monitor, best.value)}.")
    return notes


def study_monitor(study: Study, monitors: Sequence[str]) -> str:
    """The metric the objective is: the runs' monitor, else the one the direction suggests."""
    known = [m for m in monitors if m]
    if known:
        return known[0]
    return "val_acc" if study.maximize else "val_loss"


def write_trials_csv(studies: Sequence[Study], path: Path) -> None:
    """``trials.csv``: study, trial, state, value (a fraction for an accuracy), best, then one
    column per sampled parameter."""
    names = sorted({n for s in studies for n in s.param_names})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["study", "trial", "state", "value", "best", *names])
    for s in studies:
        best = s.best
        for t in s.trials:
            writer.writerow([s.name, t.number, t.state, "" if t.value is None else t.value,
                             best is not None and t.number == best.number, *(t.params.get(n, "") for n in names)])
    atomic_write_bytes(path, text_bytes(buf.getvalue()))
