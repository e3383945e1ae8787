"""Optimizer parameter groups, optimizers and LR schedules.

Every layer group gets optimizer parameter groups up front — frozen ones too. A frozen parameter
has no gradient, so torch's optimizers skip it entirely: no update, no weight decay, no momentum.
Each group carries its own LR; schedules scale each group's LR by the same factor, so per-group
rates keep their ratios under every schedule.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.optim import lr_scheduler as sched

from finetune_cli.config import Monitor, OptimizerConfig, OptimizerName, ScheduleConfig, ScheduleName
from finetune_cli.models.groups import LayerGroup

# parameters that take no weight decay besides biases and norm weights (ndim <= 1)
NO_DECAY_SUFFIXES = ("pos_embedding", "class_token", "relative_position_bias_table", "cls_token")


def no_decay(name: str, param: torch.nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(NO_DECAY_SUFFIXES)


def param_groups(
    groups: Sequence[LayerGroup], lrs: Sequence[float], weight_decay: float
) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = []
    for group, lr in zip(groups, lrs):
        decay = [p for n, p in group.params if not no_decay(n, p)]
        plain = [p for n, p in group.params if no_decay(n, p)]
        for params, wd in ((decay, weight_decay), (plain, 0.0)):
            if params:
                out.append({"params": params, "lr": lr, "weight_decay": wd, "group": group.name})
    return out


def build_optimizer(cfg: OptimizerConfig, groups: List[Dict[str, Any]]) -> torch.optim.Optimizer:
    if cfg.name == OptimizerName.sgd:
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    cls = torch.optim.AdamW if cfg.name == OptimizerName.adamw else torch.optim.Adam
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def group_lrs(optimizer: torch.optim.Optimizer) -> Dict[str, float]:
    """The current LR of each layer group (first optimizer group of that name)."""
    lrs: Dict[str, float] = {}
    for g in optimizer.param_groups:
        lrs.setdefault(g["group"], g["lr"])
    return lrs


class _Cosine:
    """Cosine decay from 1 to ``floor`` over ``total`` steps (a factor on each group's LR)."""

    def __init__(self, total: int, floor: float):
        self.total, self.floor = max(1, total), floor

    def __call__(self, step: int) -> float:
        t = min(step, self.total) / self.total
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * t))


class Schedule:
    """One LR schedule, stepped after every batch (and once per epoch for plateau)."""

    def __init__(
        self,
        cfg: ScheduleConfig,
        optimizer: torch.optim.Optimizer,
        *,
        epochs: int,
        steps_per_epoch: int,
        monitor: Monitor,
    ):
        self.name = cfg.name
        total = max(1, epochs * steps_per_epoch)
        warm = int(round(cfg.warmup_epochs * steps_per_epoch))
        warm = min(warm, total - 1) if cfg.name != ScheduleName.onecycle else 0
        main_steps = total - warm
        if cfg.name == ScheduleName.constant:
            main: Any = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
        elif cfg.name == ScheduleName.step:
            main = sched.StepLR(optimizer, step_size=max(1, cfg.step_epochs * steps_per_epoch), gamma=cfg.gamma)
        elif cfg.name == ScheduleName.cosine:
            main = sched.LambdaLR(optimizer, _Cosine(main_steps, cfg.min_lr_ratio))
        elif cfg.name == ScheduleName.cosine_restarts:
            main = sched.CosineAnnealingWarmRestarts(
                optimizer, T_0=max(1, cfg.restart_epochs * steps_per_epoch), T_mult=cfg.restart_mult
            )
        elif cfg.name == ScheduleName.onecycle:
            main = sched.OneCycleLR(
                optimizer,
                max_lr=[g["lr"] for g in optimizer.param_groups],
                total_steps=total,
                pct_start=cfg.pct_start,
            )
        elif cfg.name == ScheduleName.plateau:
            main = sched.ReduceLROnPlateau(
                optimizer,
                mode="max" if monitor == Monitor.val_acc else "min",
                factor=cfg.gamma,
                patience=cfg.plateau_patience,
            )
        else:
            raise ValueError(cfg.name)
        self.plateau: Optional[sched.ReduceLROnPlateau] = main if cfg.name == ScheduleName.plateau else None
        self.per_batch: Optional[Any] = None
        if warm > 0:
            warmup = sched.LinearLR(optimizer, start_factor=cfg.warmup_start_factor, total_iters=warm)
            self.per_batch = (
                warmup if self.plateau else sched.SequentialLR(optimizer, [warmup, main], milestones=[warm])
            )
        elif not self.plateau:
            self.per_batch = main

    def step_batch(self) -> None:
        if self.per_batch is not None:
            self.per_batch.step()

    def step_epoch(self, metric: float) -> None:
        if self.plateau is not None:
            self.plateau.step(metric)

    def state_dict(self) -> Dict[str, Any]:
        return {
            "per_batch": self.per_batch.state_dict() if self.per_batch is not None else None,
            "plateau": self.plateau.state_dict() if self.plateau is not None else None,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self.per_batch is not None and state.get("per_batch"):
            self.per_batch.load_state_dict(state["per_batch"])
        if self.plateau is not None and state.get("plateau"):
            self.plateau.load_state_dict(state["plateau"])
