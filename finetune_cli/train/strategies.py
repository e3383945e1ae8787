"""The strategy controller: epoch by epoch, which layer groups train and at which LR multiplier.

``recipe.resolve`` turns the configuration into a ``Recipe``; the ``Controller`` follows it
during the run, applies its own mask to the layer groups, and reports every change as a typed
event. Its state goes into checkpoints, so a resumed run continues in the same phase.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from finetune_cli.config import BNMode, Monitor, StrategyConfig, StrategyName, Trigger
from finetune_cli.models.groups import LayerGroup
from finetune_cli.train.callbacks import MetricTracker
from finetune_cli.train.freezing import apply_freezing, mask_for
from finetune_cli.train.recipe import Recipe, resolve
from finetune_cli.ui import metric_text

# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """Something the strategy did. ``str(event)`` is how the log and metrics.csv say it."""

    changes_mask = False  # the trainable groups changed
    rewarm = False  # the LR may ramp up again (strategy.rewarmup_epochs)
    shown = True


@dataclass(frozen=True)
class Unfroze(Event):
    group: str
    trainable: int  # groups below the head that now train
    below: int
    changes_mask = True
    rewarm = True

    def __str__(self) -> str:
        return f"unfroze {self.group} ({self.trainable}/{self.below} groups below the head train)"


@dataclass(frozen=True)
class StageStopped(Event):
    stage: int  # 1-based
    flat_epochs: int

    def __str__(self) -> str:
        return f"stage {self.stage} stopped early: no improvement for {self.flat_epochs} epochs"


@dataclass(frozen=True)
class RestoreStageBest(Event):
    """Load the stage's best weights and optimizer state (checkpoints/stage_best.pt)."""

    stage: int
    value: float
    epoch: int  # the epoch whose weights are restored
    monitor: str  # what value is: val_acc or val_loss

    def __str__(self) -> str:
        return (f"restored the best weights of stage {self.stage} "
                f"({self.monitor} {metric_text(self.monitor, self.value)}, epoch {self.epoch})")


@dataclass(frozen=True)
class StageStarted(Event):
    stage: int
    stages: int
    trains: str
    lr_mult: float
    changes_mask = True
    rewarm = True

    def __str__(self) -> str:
        return f"stage {self.stage}/{self.stages}: {self.trains}, lr x{self.lr_mult:g}"


@dataclass(frozen=True)
class Finished(Event):
    flat_epochs: int

    def __str__(self) -> str:
        return f"last stage stopped early: no improvement for {self.flat_epochs} epochs"


@dataclass(frozen=True)
class KeepStageBest(Event):
    """This epoch is the best of a stage with patience: keep its checkpoint as the stage's best."""

    shown = False

    def __str__(self) -> str:
        return ""


def words(events: Sequence[Event]) -> List[str]:
    return [str(e) for e in events if e.shown]


# --- the controller --------------------------------------------------------------------------


class Controller:
    """Follows a ``Recipe``: sets ``k`` (groups below the head that train) and the LR multiplier,
    and applies the mask to the groups whenever it changes."""

    def __init__(self, recipe: Recipe, groups: Sequence[LayerGroup], bn: BNMode, monitor: Monitor):
        self.recipe = recipe
        self.groups = groups
        self.bn = bn
        self.monitor = monitor
        # state (saved in checkpoints)
        self.k = recipe.k
        self.stage = 0
        self.stage_start = 1
        self.stage_best_epoch: Optional[int] = None
        self.finished = False  # a staged run whose last stage stopped early
        self.tracker = self._new_tracker()

    def _new_tracker(self) -> MetricTracker:
        """The plateau counter: a stage's patience, or progressive unfreezing's."""
        if self.recipe.stages:
            patience = self.recipe.stages[self.stage].patience
        elif self.recipe.kind == StrategyName.progressive and self.recipe.trigger == Trigger.plateau:
            patience = self.recipe.plateau_patience
        else:
            patience = None
        return MetricTracker(self.monitor, patience)

    @property
    def epochs(self) -> int:
        return self.recipe.epochs

    @property
    def lr_mult(self) -> float:
        return self.recipe.stages[self.stage].lr_mult if self.recipe.stages else 1.0

    def mask(self) -> List[bool]:
        return mask_for(len(self.recipe.names), self.k)

    def apply(self) -> None:
        """Set ``requires_grad`` and the BatchNorm/dropout modes of every group for ``k``."""
        apply_freezing(self.groups, self.mask(), self.bn, self.recipe.also, self.recipe.only)

    def _set_k(self, k: int) -> None:
        self.k = k
        self.apply()

    # -- per epoch ----------------------------------------------------------------------------

    def begin_epoch(self, epoch: int) -> List[Event]:
        """Progressive unfreezing by epochs: the groups this epoch trains."""
        if not self.recipe.progressive_by_epochs:
            return []
        k = min(self.recipe.until, (epoch - 1) // self.recipe.every)
        if k == self.k:
            return []
        events = self._unfrozen(self.k, k)
        self._set_k(k)
        return events

    def end_epoch(self, epoch: int, metric: float) -> List[Event]:
        """After validation: plateau triggers and stage transitions."""
        improved = self.tracker.update(metric, epoch)
        events: List[Event] = []
        if self.recipe.stages:
            if improved and self.recipe.stages[self.stage].patience is not None:
                self.stage_best_epoch = epoch
                events.append(KeepStageBest())
            events += self._stage_end(epoch)
        elif self.tracker.should_stop and self.k < self.recipe.until:  # progressive, on a plateau
            events += self._unfrozen(self.k, self.k + 1)
            self._set_k(self.k + 1)
            self.tracker.bad_epochs = 0
        return events

    def _stage_end(self, epoch: int) -> List[Event]:
        stage = self.recipe.stages[self.stage]
        done = epoch - self.stage_start + 1 >= stage.epochs
        stalled = self.tracker.should_stop
        last = self.stage + 1 == len(self.recipe.stages)
        if last:
            if stalled:
                self.finished = True
                return [Finished(self.tracker.bad_epochs)]
            return []
        if not (done or stalled):
            return []
        events: List[Event] = []
        if stalled:
            events.append(StageStopped(self.stage + 1, self.tracker.bad_epochs))
        if self.stage_best_epoch is not None:
            events.append(RestoreStageBest(self.stage + 1, self.tracker.best, self.stage_best_epoch,
                                           Monitor(self.monitor).value))
        self.stage += 1
        self.stage_start = epoch + 1
        self.stage_best_epoch = None
        self.tracker = self._new_tracker()
        new = self.recipe.stages[self.stage]
        events.append(StageStarted(self.stage + 1, len(self.recipe.stages), self.recipe.describe_k(new.k), new.lr_mult))
        self._set_k(new.k)
        return events

    def _unfrozen(self, old: int, new: int) -> List[Event]:
        below, names = self.recipe.below, self.recipe.names
        return [Unfroze(names[below - j], j, below) for j in range(old + 1, new + 1)]

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        return {
            "k": self.k,
            "stage": self.stage,
            "stage_start": self.stage_start,
            "stage_best_epoch": self.stage_best_epoch,
            "finished": self.finished,
            "tracker": self.tracker.state_dict(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.k, self.stage, self.stage_start = state["k"], state["stage"], state["stage_start"]
        self.stage_best_epoch, self.finished = state.get("stage_best_epoch"), state["finished"]
        self.tracker = self._new_tracker()
        if "tracker" in state:
            self.tracker.load_state_dict(state["tracker"])
        else:  # checkpoints of earlier versions kept their own best/bad counter
            self.tracker.best, self.tracker.bad_epochs = state["best"], state["bad"]
            self.tracker.best_epoch = 0 if abs(state["best"]) != float("inf") else -1
        self.apply()


def trainable_mask(name: StrategyName, group_names: Sequence[str], freeze_groups: int) -> List[bool]:
    """The mask of a static strategy."""
    recipe = resolve(StrategyConfig(name=name, freeze_groups=freeze_groups), list(group_names), epochs=1)
    return mask_for(len(group_names), recipe.k)
