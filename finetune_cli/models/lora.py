"""LoRA through peft: low-rank matrices injected beside chosen layers of a torchvision model, which
train while those layers' own weights stay frozen, and are merged back into the weights for
inference (the merged model is the plain torchvision model again).

Which layers: the family table's ``lora`` entry (``families.py``), below the head, in every group
or in the upper half of the groups (``strategy.lora_targets``). The LoRA matrices of a layer join
the layer group of the layer they adapt, so a strategy's mask gates them with their group.
peft is imported only when a model is adapted or merged: a run without LoRA does not pay for it.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import nn

from finetune_cli.errors import FinetuneError
from finetune_cli.models.factory import BuiltModel, head_prefixes
from finetune_cli.models.families import Family
from finetune_cli.models.groups import LayerGroup, layer_groups

ADAPTER = "default"  # peft's adapter name: one adapter per model


@dataclass(frozen=True)
class LoraSettings:
    """strategy.lora_* as typed values."""

    rank: int
    alpha: float
    dropout: float
    where: str  # "all" | "last"


@dataclass
class Adapted:
    """How a model was adapted: what a checkpoint needs to rebuild the same LoRA layers."""

    rank: int
    alpha: float
    dropout: float
    where: str
    modules: List[str] = field(default_factory=list)  # layers peft wraps
    parameters: List[str] = field(default_factory=list)  # weights peft adapts in place

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> "Adapted":
        return cls(int(saved["rank"]), float(saved["alpha"]), float(saved["dropout"]), str(saved["where"]),
                   list(saved["modules"]), list(saved["parameters"]))


def is_lora_param(name: str) -> bool:
    """A LoRA matrix (peft names them ``...lora_A.default.weight`` and ``...lora_B.default.weight``)."""
    return ".lora_A." in name or ".lora_B." in name


def _group_of(name: str, groups: Sequence[LayerGroup]) -> Optional[int]:
    """The index of the group holding the layer or parameter ``name``."""
    for i, group in enumerate(groups):
        if any(p == name or p.startswith(name + ".") for p, _ in group.params):
            return i
    return None


def last_groups(below: int) -> int:
    """strategy.lora_targets=last: how many groups below the head, counted from the top, get LoRA."""
    return max(1, below // 2)


def choose_targets(model: nn.Module, family: Family, groups: Sequence[LayerGroup], settings: LoraSettings) -> Adapted:
    """The family's LoRA layers below the head, in every group or in the upper half of them."""
    modules, parameters = family.lora(model)
    heads = head_prefixes(family)
    below = len(groups) - 1
    first = 0 if settings.where == "all" else below - last_groups(below)

    def kept(names: Iterable[str]) -> List[str]:
        out = []
        for name in names:
            if any((name + ".").startswith(h) for h in heads):
                continue
            index = _group_of(name, groups)
            if index is not None and first <= index < below:
                out.append(name)
        return out

    adapted = Adapted(settings.rank, settings.alpha, settings.dropout, settings.where, kept(modules), kept(parameters))
    if not adapted.modules and not adapted.parameters:
        raise FinetuneError(
            f"strategy.lora_targets={settings.where}: this {family.name} model has no layer for LoRA below its head. "
            "Use strategy.lora_targets=all, or another strategy (bitfit, norm, partial)."
        )
    if adapted.parameters and settings.dropout > 0:
        raise FinetuneError(
            f"strategy.lora_dropout={settings.dropout:g}: in this {family.name} model LoRA also adapts the attention's "
            "query/key/value weights in place (the attention reads them without calling a layer), where there is no "
            "layer input to drop out. Set strategy.lora_dropout=0."
        )
    return adapted


def _config(adapted: Adapted) -> Any:
    from peft import LoraConfig

    pattern = "^(?:" + "|".join(re.escape(m) for m in adapted.modules) + ")$" if adapted.modules else []
    return LoraConfig(r=adapted.rank, lora_alpha=adapted.alpha, lora_dropout=adapted.dropout,
                      target_modules=pattern, target_parameters=list(adapted.parameters) or None)


def inject(model: nn.Module, adapted: Adapted) -> Any:
    """Wrap the layers of ``adapted`` with peft's LoRA layers, in place (B starts at zero: the model
    computes what it computed before). Returns peft's tuner, whose ``merge_and_unload`` merges."""
    from peft.tuners.lora import LoraModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on models that are not transformers
        try:
            tuner = LoraModel(model, _config(adapted), ADAPTER)
        except ValueError as exc:  # settings peft refuses for one of the layers
            raise FinetuneError(
                f"peft could not add LoRA with strategy.lora_rank={adapted.rank}, strategy.lora_alpha={adapted.alpha:g} "
                f"and strategy.lora_dropout={adapted.dropout:g} ({str(exc).splitlines()[0]}). Change the setting it "
                "names, or leave the layer out with strategy.lora_targets=last."
            ) from None
    return tuner


def merge(tuner: Any) -> nn.Module:
    """The torchvision model with every LoRA update added into the weights it adapts (peft's
    ``merge_and_unload``): no peft layer is left."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tuner.merge_and_unload()
    model.__dict__.pop("peft_config", None)
    return model


def adapt(built: BuiltModel, settings: LoraSettings) -> Adapted:
    """Add LoRA layers to the model (in place), and make its layer groups again: the LoRA matrices
    join the group of the layer they adapt."""
    adapted = choose_targets(built.model, built.family, built.groups, settings)
    inject(built.model, adapted)
    built.groups = layer_groups(built.model, built.family)
    built.lora = adapted
    return adapted


def check_reach(groups: Sequence[LayerGroup], max_k: int) -> None:
    """LoRA trains something: the groups the strategy trains below the head hold LoRA matrices."""
    below = len(groups) - 1
    reached = groups[below - max_k: below]
    if not any(lora_count(g) for g in reached):
        raise FinetuneError(
            f"No LoRA layer is in the groups this strategy trains below the head ({', '.join(g.name for g in reached)}): "
            f"the LoRA layers are in {', '.join(g.name for g in groups[:below] if lora_count(g)) or 'no group'}. "
            "Let the strategy train those groups (strategy=lora, or a higher strategy.train_groups or strategy.until), "
            "or set strategy.lora_targets=all."
        )


def lora_count(group: LayerGroup) -> int:
    """How many LoRA parameters ``group`` holds."""
    return sum(p.numel() for name, p in group.params if is_lora_param(name))


def shapes(model: nn.Module) -> List[str]:
    """The LoRA matrices by the shape of the weight they adapt: ``12 x 3072x768: A 8x768 + B 3072x8 = 30,720 each``."""
    found: Counter = Counter()
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or ADAPTER not in getattr(module, "lora_A", {}):
            continue
        a, b = module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight
        base = getattr(module, "get_param", None)
        weight = base() if callable(base) else module.get_base_layer().weight
        found[("x".join(map(str, weight.shape)), "x".join(map(str, a.shape)), "x".join(map(str, b.shape)),
               a.numel() + b.numel())] += 1
    return [f"{n} x {w}: A {a} + B {b} = {count:,} each" for (w, a, b, count), n in found.most_common()]


def left_out_keys(model: nn.Module, groups: Sequence[LayerGroup]) -> List[str]:
    """The weights a LoRA run never trains (every parameter below the head but the LoRA matrices):
    what an adapter-only checkpoint leaves out, to be read again from model.weights."""
    names = {n for g in groups[:-1] for n, _ in g.params if not is_lora_param(n)}
    return sorted(k for k in model.state_dict() if k in names)


def digest(state: Mapping[str, torch.Tensor], keys: Sequence[str]) -> str:
    """A SHA-256 of the tensors under ``keys``: says whether the base weights read again are the
    ones an adapter was trained on."""
    h = hashlib.sha256()
    for key in keys:
        t = state[key].detach().to("cpu").contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
