"""The tail: the head plus the parameter-free modules right before it (a dropout, an activation)
that belong to no layer group. When only the head trains, everything before the tail is a fixed
function, so its output — the tail's input — can be computed once and reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

from torch import nn

from finetune_cli.models.families import Family
from finetune_cli.models.groups import LayerGroup


@dataclass
class Tail:
    paths: List[str]  # dotted paths of the tail's modules; the first one's input is the feature
    entry: nn.Module  # that first module (a forward pre-hook on it captures the features)
    module: nn.Module  # features -> logits, sharing its parameters with the model

    @property
    def path(self) -> str:
        return self.paths[0]

    def contains(self, name: str) -> bool:
        """Whether the model's submodule ``name`` is part of the tail."""
        return any(name == p or name.startswith(p + ".") for p in self.paths)


def _in_groups(path: str, groups: Sequence[LayerGroup]) -> bool:
    return any(path == p or path.startswith(p + ".") for g in groups for p in g.paths)


def find_tail(model: nn.Module, family: Family, groups: Sequence[LayerGroup]) -> Tail:
    """The head, extended backwards over parameter-free, ungrouped siblings in its Sequential
    (EfficientNet's dropout, MobileNetV3's activation and dropout), and forwards over the siblings
    after it (SqueezeNet's activation and pooling). The output is flattened to (N, classes)."""
    parent_path, _, last = family.head.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if not isinstance(parent, nn.Sequential):
        head = model.get_submodule(family.head)
        return Tail([family.head], head, nn.Sequential(head, nn.Flatten(1)))
    names = [n for n, _ in parent.named_children()]
    at = names.index(last)
    start = at
    while start > 0:
        prev = f"{parent_path}.{names[start - 1]}"
        module = parent[start - 1]
        if any(True for _ in module.parameters()) or _in_groups(prev, groups):
            break
        start -= 1
    paths = [f"{parent_path}.{n}" for n in names[start:]]
    return Tail(paths, parent[start], nn.Sequential(*list(parent)[start:], nn.Flatten(1)))
