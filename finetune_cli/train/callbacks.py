"""Per-epoch bookkeeping: the best metric, early stopping, checkpoints and metrics files."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from finetune_cli.config import Monitor
from finetune_cli.io_utils import atomic_copy, atomic_csv, atomic_torch_save


@dataclass
class MetricTracker:
    """Tracks the monitored metric: which epoch is best, and when to stop early."""

    monitor: Monitor
    patience: Optional[int] = None
    min_delta: float = 0.0
    best: float = field(init=False)
    best_epoch: int = field(init=False, default=-1)
    bad_epochs: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.best = -math.inf if self.maximize else math.inf

    @property
    def maximize(self) -> bool:
        return self.monitor == Monitor.val_acc

    def update(self, value: float, epoch: int) -> bool:
        """Record an epoch's value; True when it is a new best."""
        gain = value - self.best if self.maximize else self.best - value
        if gain > self.min_delta or self.best_epoch < 0:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def state_dict(self) -> Dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


class MetricsWriter:
    """metrics.csv, one row per epoch, rewritten atomically after each epoch."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: List[Dict[str, Any]] = []

    def append(self, row: Dict[str, Any]) -> None:
        self.rows.append(row)
        atomic_csv(self.rows, self.path)


class Checkpointer:
    """checkpoints/last.pt after every epoch, checkpoints/best.pt when the metric improves."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)

    def save(self, state: Dict[str, Any], *, best: bool) -> None:
        atomic_torch_save(state, self.folder / "last.pt")
        if best:  # the same bytes: copied, not serialized again
            atomic_copy(self.folder / "last.pt", self.folder / "best.pt")

    def keep_as(self, name: str) -> None:
        """Keep a copy of the latest checkpoint under another name (trainer.save_every)."""
        atomic_copy(self.folder / "last.pt", self.folder / name)
