"""Freezing strategies: which layer groups train, and how BatchNorm behaves in each."""

from __future__ import annotations

import types
from typing import List, Sequence

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from finetune_cli.config import BNMode, StrategyName
from finetune_cli.errors import FinetuneError
from finetune_cli.models.groups import LayerGroup


def trainable_mask(name: StrategyName, group_names: Sequence[str], freeze_groups: int) -> List[bool]:
    """One flag per layer group (head last): True where the group trains."""
    n = len(group_names)
    if name == StrategyName.linear_probe:
        return [False] * (n - 1) + [True]
    if name == StrategyName.full:
        return [True] * n
    if name == StrategyName.freeze_early:
        if not 0 <= freeze_groups <= n - 1:
            raise FinetuneError(
                f"strategy.freeze_groups={freeze_groups} is out of range: this model has {n - 1} "
                f"groups below the head ({', '.join(group_names[:-1])}); choose 0 to {n - 1} "
                f"({n - 1} freezes everything but the head, like strategy=linear_probe)."
            )
        return [i >= freeze_groups for i in range(n)]
    raise ValueError(name)


def _frozen_train(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def set_bn_frozen(bn: _BatchNorm, frozen: bool) -> None:
    """A frozen BatchNorm stays in eval mode through every later ``model.train()`` call, so its
    running statistics never change."""
    if frozen:
        bn.train = types.MethodType(_frozen_train, bn)
        nn.Module.train(bn, False)
    else:
        bn.__dict__.pop("train", None)


def bn_frozen_for(mode: BNMode, trainable: bool) -> bool:
    return mode == BNMode.freeze_all or (mode == BNMode.frozen_eval and not trainable)


def apply_freezing(groups: Sequence[LayerGroup], mask: Sequence[bool], bn_mode: BNMode) -> None:
    for group, on in zip(groups, mask):
        for _, p in group.params:
            p.requires_grad_(on)
        frozen_bn = bn_frozen_for(bn_mode, on)
        for module in group.modules:
            for sub in module.modules():
                if isinstance(sub, _BatchNorm):
                    set_bn_frozen(sub, frozen_bn)


def has_batchnorm(group: LayerGroup) -> bool:
    return any(isinstance(s, _BatchNorm) for m in group.modules for s in m.modules())


def plan_rows(
    groups: Sequence[LayerGroup], mask: Sequence[bool], lrs: Sequence[float], bn_mode: BNMode
) -> List[dict]:
    """One row per layer group for the plan table and summary.json."""
    rows = []
    for group, on, lr in zip(groups, mask, lrs):
        if not has_batchnorm(group):
            bn = "-"
        else:
            bn = "eval" if bn_frozen_for(bn_mode, on) else "train"
        rows.append(
            {
                "group": group.name,
                "params": group.num_params,
                "status": "train" if on else "frozen",
                "lr": f"{lr:.2e}" if on else "-",
                "bn": bn,
            }
        )
    return rows
