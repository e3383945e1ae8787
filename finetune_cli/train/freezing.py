"""Applying a trainable mask to layer groups: ``requires_grad``, and the modes of BatchNorm,
dropout and stochastic depth in frozen groups."""

from __future__ import annotations

import types
from typing import List, Optional, Sequence, Set

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torchvision.ops import StochasticDepth

from finetune_cli.config import BNMode
from finetune_cli.models.groups import LayerGroup
from finetune_cli.models.lora import is_lora_param


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


def bn_frozen_for(mode: BNMode, trainable: bool, head: bool = False) -> bool:
    """Whether a group's BatchNorm statistics stay fixed. ``freeze_all`` concerns the pretrained
    layers: the new head has no statistics worth keeping, so its BatchNorm always trains with it."""
    if head:
        return not trainable
    return mode == BNMode.freeze_all or (mode == BNMode.frozen_eval and not trainable)


NORMS = (_BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
         nn.LocalResponseNorm)


def _is_bias(name: str) -> bool:
    """``bias``, and biases by other names: attention's ``in_proj_bias`` (query, key and value)."""
    return name == "bias" or name.endswith("_bias")


def also_trained(group: LayerGroup, also: Optional[str]) -> Set[int]:
    """The ids of ``group``'s parameters that train although the group is frozen: every bias
    (``bias``: BitFit), or the scale and shift of every normalization layer (``norm``)."""
    if also == "bias":
        return {id(p) for name, p in group.params if _is_bias(name.rsplit(".", 1)[-1])}
    if also == "norm":
        return {id(p) for m in group.modules for sub in m.modules() if isinstance(sub, NORMS)
                for p in sub.parameters(recurse=False)}
    return set()


def only_trained(group: LayerGroup, only: Optional[str]) -> Set[int]:
    """The ids of the parameters a training group below the head trains: all of them, or with
    ``lora`` its LoRA matrices alone (the weights they adapt stay frozen)."""
    if only == "lora":
        return {id(p) for name, p in group.params if is_lora_param(name)}
    return {id(p) for _, p in group.params}


def trained_ids(group: LayerGroup, on: bool, head: bool, also: Optional[str] = None,
                only: Optional[str] = None) -> Set[int]:
    """The ids of ``group``'s parameters that train: the head's all; a training group's all, or
    only some (``only``); a frozen group's none, or some (``also``)."""
    if head:
        return {id(p) for _, p in group.params} if on else set()
    return only_trained(group, only) if on else also_trained(group, also)


def apply_freezing(groups: Sequence[LayerGroup], mask: Sequence[bool], bn_mode: BNMode,
                   also: Optional[str] = None, only: Optional[str] = None) -> None:
    """``requires_grad`` per group. A frozen group is a fixed function: its dropout and stochastic
    depth are off, and its BatchNorm statistics stay fixed unless ``bn=train``. With ``also``,
    a frozen group's biases or normalization parameters train all the same; with ``only``, a
    training group below the head trains its LoRA matrices alone. A group counts as training when
    any of its parameters trains (for its dropout, stochastic depth and statistics)."""
    last = len(groups) - 1
    for i, (group, on) in enumerate(zip(groups, mask)):
        trains = trained_ids(group, on, i == last, also, only)
        for _, p in group.params:
            p.requires_grad_(id(p) in trains)
        if only if on else also:  # the group trains some of its parameters: does it train any?
            on = bool(trains)
        frozen_bn = bn_frozen_for(bn_mode, on, head=i == last)
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
