"""Layer groups: a model's parameters split into ordered groups (stem first, head last)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from torch import nn

from finetune_cli.models.families import Family


@dataclass
class LayerGroup:
    name: str
    paths: List[str]
    params: List[Tuple[str, nn.Parameter]] = field(default_factory=list)
    modules: List[nn.Module] = field(default_factory=list)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for _, p in self.params)


def _resolve(model: nn.Module, path: str) -> Tuple[List[Tuple[str, nn.Parameter]], List[nn.Module]]:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return [(path, model.get_parameter(path))], []
    return list(module.named_parameters(prefix=path)), [module]


def head_paths(model: nn.Module, family: Family) -> List[str]:
    paths = [family.head]
    for aux in family.aux_modules:
        try:
            model.get_submodule(aux)
        except AttributeError:  # auxiliary classifiers disabled (attribute is None)
            continue
        paths.append(aux)
    return paths


def layer_groups(model: nn.Module, family: Family) -> List[LayerGroup]:
    """Groups in order, head last; raises if they do not cover every parameter exactly once."""
    spec = family.groups(model) + [("head", head_paths(model, family))]
    groups: List[LayerGroup] = []
    for name, paths in spec:
        group = LayerGroup(name=name, paths=list(paths))
        for path in paths:
            params, modules = _resolve(model, path)
            group.params.extend(params)
            group.modules.extend(modules)
        groups.append(group)
    _check_coverage(model, groups, family)
    return groups


def _check_coverage(model: nn.Module, groups: List[LayerGroup], family: Family) -> None:
    seen: Dict[int, str] = {}
    for group in groups:
        for name, p in group.params:
            if id(p) in seen:
                raise RuntimeError(
                    f"family table error ({family.name}): parameter {name} is in both "
                    f"'{seen[id(p)]}' and '{group.name}'"
                )
            seen[id(p)] = group.name
    missing = [n for n, p in model.named_parameters() if id(p) not in seen]
    if missing:
        raise RuntimeError(
            f"family table error ({family.name}): parameters in no layer group: "
            + ", ".join(missing[:8])
        )
