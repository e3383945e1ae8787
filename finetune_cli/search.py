"""Checks for a hyperparameter search (``finetune-cli -m hparams_search=...``) before it starts:
the command itself, the settings each option of the search space gives, and that the study's
direction follows the monitored metric. (The sweeper: hydra_plugins/finetune_cli_launchers/search.py.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from finetune_cli.ui import is_accuracy

GROUP = "hparams_search"
SWEEPERS = ("hydra_plugins.finetune_cli_launchers.search.SearchSweeper",
            "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper")


def is_search(sweeper_target: Optional[str]) -> bool:
    return sweeper_target in SWEEPERS


def command_problem(argv: Sequence[str]) -> Optional[str]:
    """``hparams_search=NAME`` given without ``-m``, or without Optuna installed."""
    chosen = [a.split("=", 1)[1] for a in argv if a.startswith(f"{GROUP}=") or a.startswith(f"+{GROUP}=")]
    if not chosen or chosen[-1] in ("null", ""):
        return None
    if not any(a in ("-m", "--multirun") or a == "hydra.mode=MULTIRUN" for a in argv):
        return (f"{GROUP}={chosen[-1]} runs a search of many runs: add -m (finetune-cli -m {GROUP}={chosen[-1]} "
                "...). Without it one run would start, with the preset's search space unused.")
    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        return (f"{GROUP}={chosen[-1]} needs Optuna and its Hydra sweeper, which are not installed: "
                "pip install 'finetune-cli[search]'.")
    return None


def direction_problem(direction: Any, monitor: str) -> Optional[str]:
    """The study's direction against the metric its objective is: higher is better for an
    accuracy, lower for a loss."""
    direction = getattr(direction, "name", direction)  # the plugin's default is its Direction enum
    if not isinstance(direction, str) or direction not in ("maximize", "minimize"):
        return (f"hydra.sweeper.direction={direction}: a search has one objective, the run's best {monitor}; "
                "give maximize or minimize.")
    wanted = "maximize" if is_accuracy(monitor) else "minimize"
    if direction == wanted:
        return None
    kind = "an accuracy (higher is better)" if wanted == "maximize" else "a loss (lower is better)"
    other = "val_acc" if wanted == "minimize" else "val_loss"
    return (f"The search would {direction} its objective, the best trainer.monitor, but trainer.monitor={monitor} "
            f"is {kind}: add hydra.sweeper.direction={wanted}, or trainer.monitor={other}.")


def _values(override: Any) -> List[str]:
    """The values of one search-space entry worth checking ahead: every choice, a range's ends or an
    interval's ends; a fixed value as it is."""
    from hydra.core.override_parser.types import Transformer

    if override.is_interval_sweep():
        value = override.value()
        return [str(value.start), str(value.end)]
    if override.is_sweep_override():
        every = [str(v) for v in override.sweep_iterator(transformer=Transformer.encode)]
        return every if override.is_choice_sweep() else list(dict.fromkeys([every[0], every[-1]]))
    return [override.get_value_element_as_str()]


def representative_jobs(params: Mapping[str, str], overrides: Sequence[str]) -> List[List[str]]:
    """Jobs that together give every option of the search space once: the first value of each
    entry, then each other value of one entry at a time (the command's overrides win over the
    preset's ``params``, as in the sweeper)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + list(overrides))
    space: Dict[str, List[str]] = {}
    for override in parsed:
        space[override.get_key_element()] = _values(override)
    base = {key: values[0] for key, values in space.items()}
    jobs = [base]
    for key, values in space.items():
        jobs += [{**base, key: value} for value in values[1:]]
    return [[f"{k}={v}" for k, v in job.items()] for job in jobs]


def stored_trials(storage: Optional[str], study_name: Optional[str]) -> list:
    """The trials a stored study already holds: [] for a new study, or one kept in memory."""
    if storage is None or study_name is None:
        return []
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).is_file():
        return []  # (asking would make the file)
    from finetune_cli.tools.trials import quiet_optuna

    quiet_optuna()
    import optuna

    try:
        return optuna.load_study(study_name=study_name, storage=storage).trials
    except KeyError:  # no study of that name in this storage yet
        return []


def resume_problem(sweeper: Any, overrides: Sequence[str]) -> Optional[str]:
    """A stored study is resumed only for the task it searches: the settings that are not searched
    (data, model, epochs...) are kept with each of its trials and must be those of this command, and
    a parameter searched before keeps its kind (a choice stays a choice, a number a number)."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.distributions import check_distribution_compatibility

    trials = [t for t in stored_trials(sweeper.get("storage"), sweeper.get("study_name")) if t.state.is_finished()]
    if not trials:
        return None
    params = sweeper.get("params") or {}
    space, fixed = create_params_from_overrides([f"{k}={v}" for k, v in params.items()] + list(overrides))
    before, searched = dict(trials[-1].user_attrs), trials[-1].distributions
    changed = [f"{k}: {before.get(k, '(not given)')} then, {fixed.get(k, '(not given)')} now"
               for k in sorted(set(before) | set(fixed)) if before.get(k) != fixed.get(k)]
    for key in sorted(set(space) & set(searched)):
        try:
            check_distribution_compatibility(searched[key], space[key])
        except ValueError:
            changed.append(f"{key}: searched as {searched[key]} then, {space[key]} now")
    if not changed:
        return None
    return (f"The study '{sweeper.get('study_name')}' in {sweeper.get('storage')} was run with other settings "
            f"({'; '.join(changed)}). Its trials would not compare with new ones. Give the settings it was run "
            "with to add trials to it, or start another search (without hydra.sweep.dir, or with another "
            "hydra.sweeper.study_name).")
