"""Freezing strategies: which layer groups train in each epoch, and how BatchNorm behaves.

Every strategy is expressed as *how many groups below the head train*, counted from the top:
linear probe 0, full all, freeze_early all but the first K, partial K. Progressive and staged
strategies change that number during the run; ``Controller`` holds the little state they need
(and saves it in checkpoints, so a resumed run continues in the same phase).
"""

from __future__ import annotations

import copy
import math
import types
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torchvision.ops import StochasticDepth

from finetune_cli.config import BNMode, StrategyConfig, StrategyName, Trigger
from finetune_cli.errors import FinetuneError
from finetune_cli.models.groups import LayerGroup

# --- applying a mask -------------------------------------------------------------------------


def _frozen_train(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def hold_eval(module: nn.Module, frozen: bool) -> None:
    """A held module stays in eval mode through every later ``model.train()`` call (a frozen
    BatchNorm keeps its running statistics; a frozen dropout passes its input through)."""
    if frozen:
        module.train = types.MethodType(_frozen_train, module)
        nn.Module.train(module, False)
    else:
        module.__dict__.pop("train", None)


def is_stochastic(module: nn.Module) -> bool:
    """Dropout of any kind, or stochastic depth, with a non-zero rate."""
    return isinstance(module, (_DropoutNd, StochasticDepth)) and float(getattr(module, "p", 0.0)) > 0


def bn_frozen_for(mode: BNMode, trainable: bool) -> bool:
    return mode == BNMode.freeze_all or (mode == BNMode.frozen_eval and not trainable)


def apply_freezing(groups: Sequence[LayerGroup], mask: Sequence[bool], bn_mode: BNMode) -> None:
    """``requires_grad`` per group. A frozen group is a fixed function: its dropout and stochastic
    depth are off, and its BatchNorm statistics stay fixed unless ``bn=train``."""
    for group, on in zip(groups, mask):
        for _, p in group.params:
            p.requires_grad_(on)
        frozen_bn = bn_frozen_for(bn_mode, on)
        for module in group.modules:
            for sub in module.modules():
                if isinstance(sub, _BatchNorm):
                    hold_eval(sub, frozen_bn)
                elif is_stochastic(sub):
                    hold_eval(sub, not on)


def has_batchnorm(group: LayerGroup) -> bool:
    return any(isinstance(s, _BatchNorm) for m in group.modules for s in m.modules())


def mask_for(n_groups: int, k: int) -> List[bool]:
    """The head and the ``k`` groups just below it train."""
    below = n_groups - 1
    return [i >= below - k for i in range(below)] + [True]


def trainable_mask(name: StrategyName, group_names: Sequence[str], freeze_groups: int) -> List[bool]:
    """The mask of a static strategy (kept for callers that need no Controller)."""
    cfg = StrategyConfig(name=name, freeze_groups=freeze_groups)
    return Controller(cfg, list(group_names), epochs=1).mask()


# --- the controller ------------------------------------------------------------------------


@dataclass
class Stage:
    first_epoch: int
    epochs: int
    k: int
    lr_mult: float
    patience: Optional[int]


class Controller:
    """Decides, epoch by epoch, which groups train and the strategy's LR multiplier."""

    def __init__(
        self,
        cfg: StrategyConfig,
        group_names: List[str],
        *,
        epochs: int,
        images_per_class: Optional[float] = None,
        maximize: bool = True,
    ):
        self.cfg = cfg
        self.names = group_names
        self.below = len(group_names) - 1
        self.maximize = maximize
        self.decision: Optional[Dict[str, Any]] = None
        self.kind, self.static_k, self.lr_decay = self._resolve(cfg, images_per_class)
        self.until = self.below if cfg.until < 0 else cfg.until
        if not 0 <= self.until <= self.below:
            raise FinetuneError(
                f"strategy.until={cfg.until} is out of range: choose 0 to {self.below} groups below "
                f"the head ({', '.join(group_names[:-1])}), or -1 for all."
            )
        if cfg.every < 1:
            raise FinetuneError(f"strategy.every must be 1 or more (got {cfg.every}).")
        self.stages = self._stages() if self.kind == StrategyName.staged else []
        self.epochs = sum(s.epochs for s in self.stages) if self.stages else epochs
        # mutable state (saved in checkpoints)
        self.k = 0 if self.kind == StrategyName.progressive else self.static_k
        self.stage = 0
        self.stage_start = 1
        self.best = -math.inf if maximize else math.inf
        self.bad = 0
        self.stage_best_state: Optional[Dict[str, Any]] = None
        self.finished = False  # a staged run whose last stage stopped early
        if self.stages:
            self.k = self.stages[0].k

    # -- setup --------------------------------------------------------------------------------

    def _check_k(self, key: str, value: int) -> int:
        if not 0 <= value <= self.below:
            raise FinetuneError(
                f"{key}={value} is out of range: this model has {self.below} groups below the head "
                f"({', '.join(self.names[:-1])}); choose 0 to {self.below}."
            )
        return value

    def _resolve(self, cfg: StrategyConfig, images_per_class: Optional[float]):
        name, decay = cfg.name, cfg.lr_decay
        if name == StrategyName.auto:
            if images_per_class is None:
                raise ValueError("strategy=auto needs the number of images per class")
            if images_per_class < cfg.auto_small:
                name, why = StrategyName.linear_probe, f"< auto_small={cfg.auto_small}: few images, train the head only"
                k = 0
            elif images_per_class < cfg.auto_large:
                name = StrategyName.freeze_early
                k = self.below - self.below // 2
                why = (f"< auto_large={cfg.auto_large}: freeze the early half "
                       f"({self.below // 2} of {self.below} groups below the head)")
            else:
                name, k = StrategyName.full, self.below
                decay = cfg.lr_decay if cfg.lr_decay != 1.0 else cfg.auto_lr_decay
                why = f">= auto_large={cfg.auto_large}: full fine-tuning with LRs divided by {decay} per group"
            self.decision = {
                "images_per_class": round(images_per_class, 1),
                "auto_small": cfg.auto_small,
                "auto_large": cfg.auto_large,
                "chose": name.value,
                "reason": f"{images_per_class:.1f} training images per class {why}",
            }
            return name, k, decay
        if name == StrategyName.linear_probe:
            return name, 0, decay
        if name == StrategyName.full:
            return name, self.below, decay
        if name == StrategyName.freeze_early:
            return name, self.below - self._check_k("strategy.freeze_groups", cfg.freeze_groups), decay
        if name == StrategyName.partial:
            return name, self._check_k("strategy.train_groups", cfg.train_groups), decay
        return name, 0, decay  # progressive and staged set k as they go

    def _stages(self) -> List[Stage]:
        if not self.cfg.stages:
            raise FinetuneError(
                "strategy=staged needs strategy.stages: a list of {epochs, train_groups, lr_mult, "
                "patience}; see strategy=two_phase for an example."
            )
        stages, first = [], 1
        for i, s in enumerate(self.cfg.stages):
            if s.epochs < 1:
                raise FinetuneError(f"strategy.stages[{i}].epochs must be 1 or more (got {s.epochs}).")
            k = self.below if s.train_groups < 0 else self._check_k(f"strategy.stages[{i}].train_groups", s.train_groups)
            stages.append(Stage(first, s.epochs, k, s.lr_mult, s.patience))
            first += s.epochs
        return stages

    # -- per epoch ----------------------------------------------------------------------------

    def mask(self) -> List[bool]:
        return mask_for(len(self.names), self.k)

    @property
    def max_k(self) -> int:
        """The most groups below the head that train at any point of the run."""
        if self.stages:
            return max(s.k for s in self.stages)
        return self.until if self.kind == StrategyName.progressive else self.static_k

    @property
    def lr_mult(self) -> float:
        return self.stages[self.stage].lr_mult if self.stages else 1.0

    @property
    def progressive_by_epochs(self) -> bool:
        return self.kind == StrategyName.progressive and self.cfg.trigger == Trigger.epochs

    def begin_epoch(self, epoch: int) -> List[str]:
        """Set ``k`` for this epoch; returns what changed, in words."""
        events = []
        if self.progressive_by_epochs:
            k = min(self.until, (epoch - 1) // self.cfg.every)
            if k != self.k:
                events += self._unfreeze_events(self.k, k)
                self.k = k
        return events

    def end_epoch(self, epoch: int, metric: float, model: nn.Module) -> List[str]:
        """After validation: plateau triggers and stage transitions."""
        improved = metric > self.best if self.maximize else metric < self.best
        if improved:
            self.best, self.bad = metric, 0
            if self.stages and self.stages[self.stage].patience is not None:
                self.stage_best_state = copy.deepcopy(model.state_dict())
        else:
            self.bad += 1
        events: List[str] = []
        if self.kind == StrategyName.progressive and self.cfg.trigger == Trigger.plateau:
            if self.bad >= self.cfg.plateau_patience and self.k < self.until:
                events += self._unfreeze_events(self.k, self.k + 1)
                self.k += 1
                self.bad = 0
        if self.stages:
            stage = self.stages[self.stage]
            done = epoch - self.stage_start + 1 >= stage.epochs
            stalled = stage.patience is not None and self.bad >= stage.patience
            if (done or stalled) and self.stage + 1 < len(self.stages):
                if stalled:
                    events.append(f"stage {self.stage + 1} stopped early: no improvement for {self.bad} epochs")
                if self.stage_best_state is not None:
                    model.load_state_dict(self.stage_best_state)
                    events.append(f"restored the best weights of stage {self.stage + 1} (val {self.best:.4f})")
                self.stage += 1
                self.stage_start = epoch + 1
                self.stage_best_state = None
                self.best = -math.inf if self.maximize else math.inf
                self.bad = 0
                new = self.stages[self.stage]
                events.append(
                    f"stage {self.stage + 1}/{len(self.stages)}: {self.describe_k(new.k)}, lr x{new.lr_mult:g}"
                )
                self.k = new.k
            elif stalled and self.stage + 1 == len(self.stages):
                self.finished = True
                events.append(f"last stage stopped early: no improvement for {self.bad} epochs")
        return events

    # -- words --------------------------------------------------------------------------------

    def describe_k(self, k: int) -> str:
        if k == 0:
            return "head only"
        if k == self.below:
            return "all groups"
        return "head + " + ", ".join(self.names[self.below - k : self.below])

    def _unfreeze_events(self, old: int, new: int) -> List[str]:
        return [
            f"unfroze {self.names[self.below - j]} ({j}/{self.below} groups below the head train)"
            for j in range(old + 1, new + 1)
        ]

    def unfreeze_epoch(self, group_index: int) -> Optional[int]:
        """For epoch-triggered progressive runs: the epoch a group starts training."""
        if not self.progressive_by_epochs or group_index == self.below:
            return None
        j = self.below - group_index  # the j-th group from the top
        if j > self.until:
            return None
        return 1 + j * self.cfg.every

    def timeline(self) -> List[str]:
        if self.kind == StrategyName.progressive:
            if self.cfg.trigger == Trigger.epochs:
                steps = ["epoch 1: head only"] + [
                    f"epoch {1 + j * self.cfg.every}: +{self.names[self.below - j]}"
                    for j in range(1, self.until + 1)
                    if 1 + j * self.cfg.every <= self.epochs
                ]
            else:
                steps = ["head only at first"] + [
                    f"on a plateau of {self.cfg.plateau_patience} epoch(s): +{self.names[self.below - j]}"
                    for j in range(1, self.until + 1)
                ]
            return steps
        if self.stages:
            return [
                f"stage {i + 1} (epochs {s.first_epoch}-{s.first_epoch + s.epochs - 1}): {self.describe_k(s.k)}, "
                f"lr x{s.lr_mult:g}" + (f", early stop after {s.patience} flat epochs" if s.patience is not None else "")
                for i, s in enumerate(self.stages)
            ]
        return []

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        return {
            "k": self.k,
            "stage": self.stage,
            "stage_start": self.stage_start,
            "best": self.best,
            "bad": self.bad,
            "finished": self.finished,
            "stage_best_state": self.stage_best_state,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.k, self.stage, self.stage_start = state["k"], state["stage"], state["stage_start"]
        self.best, self.bad, self.finished = state["best"], state["bad"], state["finished"]
        self.stage_best_state = state.get("stage_best_state")


def plan_rows(
    groups: Sequence[LayerGroup],
    controller: Controller,
    lrs: Sequence[float],
    bn_mode: BNMode,
) -> List[dict]:
    """One row per layer group for the plan table and summary.json."""
    rows = []
    for i, (group, on, lr) in enumerate(zip(groups, controller.mask(), lrs)):
        later = controller.unfreeze_epoch(i)
        if on:
            status = "train"
        elif later is not None and later <= controller.epochs:
            status = f"from epoch {later}"
        else:
            status = "frozen"
        bn = "-" if not has_batchnorm(group) else ("eval" if bn_frozen_for(bn_mode, on) else "train")
        rows.append({"group": group.name, "params": group.num_params, "status": status, "lr": f"{lr:.2e}", "bn": bn})
    return rows
