"""Model creation, the architecture family table and layer groups."""

from finetune_cli.models.factory import BuiltModel, HeadSpec, count_params, create_model, swapped_head
from finetune_cli.models.families import FAMILIES, Family, family_of
from finetune_cli.models.groups import LayerGroup, layer_groups
from finetune_cli.models.weights import WeightsChoice, resolve_weights

__all__ = [
    "BuiltModel", "FAMILIES", "Family", "HeadSpec", "LayerGroup", "WeightsChoice",
    "count_params", "create_model", "family_of", "layer_groups", "resolve_weights", "swapped_head",
]
