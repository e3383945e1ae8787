"""Optimizer parameter groups, optimizers and LR schedules.

Every layer group gets optimizer parameter groups up front — frozen ones too. A frozen parameter
has no gradient, so torch's optimizers skip it entirely: no update, no weight decay, no momentum.
Each group carries its own LR; schedules scale each group's LR by the same factor, so per-group
rates keep their ratios under every schedule.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch.optim import lr_scheduler as sched

from finetune_cli.config import Monitor, OptimizerConfig, OptimizerName, ScheduleConfig, ScheduleName
from finetune_cli.errors import FinetuneError
from finetune_cli.models.groups import LayerGroup

# parameters that take no weight decay besides biases and norm weights (ndim <= 1)
NO_DECAY_SUFFIXES = ("pos_embedding", "class_token", "relative_position_bias_table", "cls_token")


def no_decay(name: str, param: torch.nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(NO_DECAY_SUFFIXES)


def layerwise_lrs(
    head_lr: float, n_groups: int, lr_decay: float = 1.0, explicit: Optional[Sequence[float]] = None
) -> List[float]:
    """Discriminative LRs, stem first: the head at ``head_lr``, each group below at the LR of the
    group above divided by ``lr_decay``; or an explicit list of one LR per group."""
    if explicit:
        if len(explicit) != n_groups:
            raise FinetuneError(
                f"strategy.group_lrs has {len(explicit)} values, but this model has {n_groups} layer "
                "groups (stem first, head last): give one LR per group, or use strategy.lr_decay."
            )
        if any(not lr > 0 for lr in explicit):
            raise FinetuneError(f"strategy.group_lrs must all be greater than 0 (got {list(explicit)}).")
        return [float(lr) for lr in explicit]
    if not lr_decay > 0:
        raise FinetuneError(f"strategy.lr_decay must be greater than 0 (got {lr_decay}).")
    return [head_lr / lr_decay ** (n_groups - 1 - i) for i in range(n_groups)]


def param_groups(
    groups: Sequence[LayerGroup],
    lrs: Sequence[float],
    weight_decay: float,
    anchored: Iterable[Union[str, torch.Tensor]] = (),
) -> List[Dict[str, Any]]:
    """Optimizer parameter groups, one or two per layer group (with and without weight decay).

    ``anchored``: parameters (or their names) that a penalty pulls towards their pretrained
    values (L2-SP, EWC). They take no weight decay: the penalty replaces it, instead of decay
    pulling them towards 0 at the same time. Parameters not anchored (the new head) keep it.
    """
    anchored = list(anchored)
    anchored_ids = {id(a) for a in anchored if isinstance(a, torch.Tensor)}
    anchored_names = {a for a in anchored if isinstance(a, str)}

    def decays(name: str, param: torch.nn.Parameter) -> bool:
        return not (no_decay(name, param) or id(param) in anchored_ids or name in anchored_names)

    out: List[Dict[str, Any]] = []
    for group, lr in zip(groups, lrs):
        decay = [p for n, p in group.params if decays(n, p)]
        plain = [p for n, p in group.params if not decays(n, p)]
        for params, wd in ((decay, weight_decay), (plain, 0.0)):
            if params:
                out.append({"params": params, "lr": lr, "weight_decay": wd, "group": group.name})
    return out


def build_optimizer(cfg: OptimizerConfig, groups: List[Dict[str, Any]], fused: bool = False) -> torch.optim.Optimizer:
    """``fused``: one kernel per step for all parameters (CUDA); else PyTorch's default (foreach)."""
    extra = {"fused": True} if fused else {}
    if cfg.name == OptimizerName.sgd:
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **extra)
    cls = torch.optim.AdamW if cfg.name == OptimizerName.adamw else torch.optim.Adam
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), **extra)


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


class _Slanted:
    """ULMFiT's slanted triangular LR (Howard & Ruder, 2018) as a factor on each group's LR:
    a linear rise from ``1 / ratio`` to 1 over the first ``cut = floor(total * cut_frac)`` steps,
    then a linear fall back to ``1 / ratio`` at step ``total``."""

    def __init__(self, total: int, cut_frac: float, ratio: float):
        self.total, self.cut_frac, self.ratio = max(1, total), cut_frac, ratio
        self.cut = max(1, math.floor(self.total * cut_frac))

    def __call__(self, step: int) -> float:
        t = min(step, self.total)
        if t < self.cut:
            p = t / self.cut
        else:
            p = max(0.0, 1 - (t - self.cut) / (self.cut * (1 / self.cut_frac - 1)))
        return (1 + p * (self.ratio - 1)) / self.ratio


def main_scheduler(cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, *, total: int, warm: int,
                   steps_per_epoch: int, monitor: Monitor) -> Any:
    """The torch scheduler of ``schedule.name`` over ``total`` steps, ``warm`` of them warmup."""
    main_steps = total - warm
    if cfg.name == ScheduleName.constant:
        return sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if cfg.name == ScheduleName.step:
        return sched.StepLR(optimizer, step_size=max(1, cfg.step_epochs * steps_per_epoch), gamma=cfg.gamma)
    if cfg.name == ScheduleName.cosine:
        return sched.LambdaLR(optimizer, _Cosine(main_steps, cfg.min_lr_ratio))
    if cfg.name == ScheduleName.cosine_restarts:
        return sched.CosineAnnealingWarmRestarts(
            optimizer, T_0=max(1, cfg.restart_epochs * steps_per_epoch), T_mult=cfg.restart_mult
        )
    if cfg.name == ScheduleName.onecycle:
        return sched.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total,
            pct_start=cfg.pct_start,
        )
    if cfg.name == ScheduleName.plateau:
        return sched.ReduceLROnPlateau(
            optimizer,
            mode="max" if monitor.maximize else "min",
            factor=cfg.gamma,
            patience=cfg.plateau_patience,
            eps=0.0,
        )
    if cfg.name == ScheduleName.stlr:
        if not 0 < cfg.cut_frac < 1 or not cfg.ratio >= 1:
            raise FinetuneError(
                f"schedule=stlr needs 0 < schedule.cut_frac < 1 (the fraction of steps spent "
                f"rising; got {cfg.cut_frac}) and schedule.ratio >= 1 (how much lower the LR "
                f"starts and ends than its peak; got {cfg.ratio}). ULMFiT uses "
                "schedule.cut_frac=0.1 schedule.ratio=32."
            )
        return sched.LambdaLR(optimizer, _Slanted(total, cfg.cut_frac, cfg.ratio))
    raise ValueError(cfg.name)


class Schedule:
    """One LR schedule, stepped after every batch (and once per epoch for plateau).

    ``onecycle`` and ``stlr`` (slanted triangular) rise from a low LR on their own, so they
    ignore ``warmup_epochs``; every other schedule follows the linear warmup when it is set.
    ``plateau`` reduces every group's LR by the same factor however small it gets (``eps=0``),
    so per-group ratios hold after any number of reductions.

    On top of the schedule sits a *gate*: a factor on every group's LR (a stage's multiplier
    times an optional re-warmup ramp). The gate is taken off before each scheduler step and put
    back after it, so closed-form and chainable schedulers alike see only their own values.
    """

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
        warm = min(warm, total - 1) if cfg.name not in (ScheduleName.onecycle, ScheduleName.stlr) else 0
        main = main_scheduler(cfg, optimizer, total=total, warm=warm, steps_per_epoch=steps_per_epoch, monitor=monitor)
        self.plateau: Optional[sched.ReduceLROnPlateau] = main if cfg.name == ScheduleName.plateau else None
        self.per_batch: Optional[Any] = None
        if warm > 0:
            warmup = sched.LinearLR(optimizer, start_factor=cfg.warmup_start_factor, total_iters=warm)
            self.per_batch = (
                warmup if self.plateau else sched.SequentialLR(optimizer, [warmup, main], milestones=[warm])
            )
        elif not self.plateau:
            self.per_batch = main
        self.optimizer = optimizer
        self.mult = 1.0
        self.ramp_start = cfg.warmup_start_factor
        self.ramp_steps = 0
        self.ramp_pos = 0
        self._gate()

    # -- the gate -----------------------------------------------------------------------------

    @property
    def factor(self) -> float:
        if self.ramp_pos >= self.ramp_steps:
            return self.mult
        return self.mult * (self.ramp_start + (1 - self.ramp_start) * self.ramp_pos / self.ramp_steps)

    def _ungate(self) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = g.get("scheduled_lr", g["lr"])

    def _gate(self) -> None:
        f = self.factor
        for g in self.optimizer.param_groups:
            g["scheduled_lr"] = g["lr"]
            g["lr"] = g["lr"] * f

    def set_multiplier(self, mult: float) -> None:
        self._ungate()
        self.mult = mult
        self._gate()

    def rewarmup(self, steps: int) -> None:
        """Ramp every LR up again from the warmup start factor over ``steps`` batches."""
        self._ungate()
        self.ramp_steps, self.ramp_pos = max(0, steps), 0
        self._gate()

    def step_batch(self) -> None:
        self._ungate()
        if self.per_batch is not None:
            self.per_batch.step()
        if self.ramp_pos < self.ramp_steps:
            self.ramp_pos += 1
        self._gate()

    def step_epoch(self, metric: float) -> None:
        if self.plateau is not None:
            self._ungate()
            self.plateau.step(metric)
            self._gate()

    def state_dict(self) -> Dict[str, Any]:
        return {
            "per_batch": self.per_batch.state_dict() if self.per_batch is not None else None,
            "plateau": self.plateau.state_dict() if self.plateau is not None else None,
            "gate": {"mult": self.mult, "ramp_steps": self.ramp_steps, "ramp_pos": self.ramp_pos},
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore after the optimizer's own state (whose groups hold the gated LRs)."""
        if self.per_batch is not None and state.get("per_batch"):
            self.per_batch.load_state_dict(state["per_batch"])
        if self.plateau is not None and state.get("plateau"):
            self.plateau.load_state_dict(state["plateau"])
        gate = state.get("gate") or {}
        self.mult = gate.get("mult", 1.0)
        self.ramp_steps, self.ramp_pos = gate.get("ramp_steps", 0), gate.get("ramp_pos", 0)
