"""``logger=``: what a run reports beyond its own files, to TensorBoard or MLflow.

Every logger takes the same calls from the Recorder (rank 0 only): each epoch's metrics row after
the epoch is saved, the history a resumed run carries, and the end with the run's status and
summary. The run folder's files stay the record; a logger only repeats them elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol

from finetune_cli.config import LoggerConfig, LoggerName

# LoggerConfig's keys that only logger=mlflow reads, with their schema defaults
MLFLOW_KEYS = {"tracking_uri": None, "experiment": None, "run_name": None, "tags": {}, "log_checkpoint": False}


class EpochLogger(Protocol):
    def log_epoch(self, row: Dict[str, Any]) -> None:
        """One epoch's metrics row (metrics.csv's columns), once the epoch is saved."""

    def resumed(self, rows: List[Dict[str, Any]], checkpoint: Path) -> None:
        """The run goes on from ``checkpoint``, whose run trained the epochs of ``rows``."""

    def close(self, status: str, summary: Dict[str, Any]) -> None:
        """The end: ``status`` is summary.json's (completed, interrupted or failed)."""


def open_logger(config: LoggerConfig, out_dir: Path, params: Dict[str, Any]) -> Optional[EpochLogger]:
    """The logger ``config`` names for the run in ``out_dir``; ``params``: the resolved config."""
    if config.name == LoggerName.tensorboard:
        from finetune_cli.tblog import TensorBoardLogger

        return TensorBoardLogger(out_dir / "tensorboard")
    if config.name == LoggerName.mlflow:
        from finetune_cli.mlflowlog import MLflowLogger

        return MLflowLogger(out_dir, params, tracking_uri=config.tracking_uri, experiment=config.experiment,
                            run_name=config.run_name, tags=dict(config.tags), log_checkpoint=config.log_checkpoint)
    return None


def logger_problems(config: LoggerConfig) -> List[str]:
    """Before anything runs: the logger's package is missing, or MLflow's keys are set for
    another logger (where nothing would read them)."""
    if config.name == LoggerName.mlflow:
        from finetune_cli.mlflowlog import missing_package

        missing = missing_package(config.tracking_uri)
        return [missing] if missing else []
    found = []
    stray = [f"logger.{k}" for k, default in MLFLOW_KEYS.items() if getattr(config, k) != default]
    if stray:
        found.append(f"{', '.join(stray)} {'is' if len(stray) == 1 else 'are'} set, but logger={config.name.value}: "
                     "only logger=mlflow reads them. Add logger=mlflow, or leave them out.")
    if config.name == LoggerName.tensorboard:
        from finetune_cli.tblog import HINT, available

        if not available():
            found.append(HINT)
    return found
