"""The sweeper of ``hparams_search=...`` (conf/hparams_search/): hydra-optuna-sweeper's Optuna study,
asked and told in this process, each trial a finetune-cli run whose best monitored value is the
objective. What is added to the plugin's sweeper:

- a study stored in the sweep folder is resumed (``hydra.sweep.dir=<that folder>``): the new
  trials' job folders are numbered after the study's trials, so job N is trial N and no new trial
  lands in an earlier trial's folder (finetune_cli/search.py checks ahead that the resumed study
  searched the same task);
- a search none of whose trials completed exits 1 with one paragraph, not optuna's traceback.

A failed trial (a NaN loss at a huge LR, say) is told to the study as failed and the search goes
on: the presets set ``max_failure_rate: 1.0``. Optuna is an optional extra
(``pip install 'finetune-cli[search]'``), imported only when a search starts: Hydra imports this
module at every start."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, List

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

log = logging.getLogger(__name__)
# alembic, which sets up the study's database, lists its plugins at INFO when optuna first imports it
logging.getLogger("alembic").setLevel(logging.WARNING)


class SearchSweeper(Sweeper):
    """Takes hydra-optuna-sweeper's settings (conf/hparams_search/*.yaml sets them)."""

    def __init__(self, **settings: Any) -> None:
        from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl

        self.impl = OptunaSweeperImpl(**settings)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)
        Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)  # the study is stored in it
        from finetune_cli.tools.trials import quiet_optuna

        quiet_optuna()

    def sweep(self, arguments: List[str]) -> None:
        from finetune_cli.search import stored_trials

        earlier = stored_trials(self.impl.storage, self.impl.study_name)
        if earlier:
            log.info(f"Resuming study '{self.impl.study_name}': {len(earlier)} trials so far; the new ones are "
                     f"numbered from {len(earlier)}.")
        self.impl.job_idx = len(earlier)
        try:
            self.impl.sweep(arguments)
        except ValueError:  # optuna's "No trials are completed yet." when every trial failed
            if not self._all_failed_since(len(earlier)):
                raise
        if self._all_failed_since(len(earlier)):
            print("No trial of this search completed: each one's error is in its summary.json and in the table "
                  "below. Fix what they name, then run the search again.", file=sys.stderr)
            raise SystemExit(1)

    def _all_failed_since(self, first: int) -> bool:
        """Every trial numbered from ``first`` failed (and there is one)."""
        from finetune_cli.search import stored_trials

        new = [t for t in stored_trials(self.impl.storage, self.impl.study_name) if t.number >= first]
        return bool(new) and all(t.state.name == "FAIL" for t in new)
