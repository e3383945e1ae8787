"""The monitored metric across epochs: which epoch is best, and when patience runs out."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from finetune_cli.config import Monitor


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
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be 1 or more, or None (got {self.patience})")
        self.best = -math.inf if self.maximize else math.inf

    @property
    def maximize(self) -> bool:
        return self.monitor.maximize

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
