"""``create_model``: a torchvision classifier with its head replaced and its layer groups."""

from __future__ import annotations

import difflib
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Tuple

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

from finetune_cli.config import HeadType
from finetune_cli.data.transforms import Preprocess
from finetune_cli.errors import FinetuneError
from finetune_cli.models.families import Family, family_of
from finetune_cli.models.groups import LayerGroup, layer_groups
from finetune_cli.models.weights import WeightsChoice, ensure_downloaded, read_weights

if TYPE_CHECKING:
    from finetune_cli.models.lora import Adapted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadSpec:
    kind: HeadType = HeadType.linear
    hidden: int = 512
    dropout: float = 0.0


@dataclass
class BuiltModel:
    model: nn.Module
    family: Family
    groups: List[LayerGroup]
    preprocess: Preprocess
    weights: str  # description of where the weights came from
    notes: List[str] = field(default_factory=list)
    # the pretrained classifier of the source task (torchvision's 1000-way head, the synthetic
    # source task's head, a weights file's own head), main head only; None when the weights
    # carry none (random init, a head-less file). Not part of ``model``: see ``swapped_head``.
    source_head: Optional[nn.Module] = None
    lora: Optional["Adapted"] = None  # the LoRA layers added (strategy.lora), None without


def classification_models() -> List[str]:
    return sorted(list_models(module=torchvision.models))


def check_model_name(name: str) -> Family:
    known = classification_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise FinetuneError(
            f"Unknown model '{name}'.{hint} Use any torchvision classification model name, e.g. "
            f"model=resnet50 or model.name=convnext_small ({len(known)} available: "
            f"{', '.join(known[:12])}, ...)."
        )
    family = family_of(name)
    if family is None:  # guarded by tests: every torchvision classifier maps to a family
        raise FinetuneError(f"Model '{name}' has no layer-group table entry; pick another model.")
    return family


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, module)


def _new_head(old: nn.Module, num_classes: int, spec: HeadSpec) -> nn.Module:
    if isinstance(old, nn.Conv2d):  # SqueezeNet classifies with a 1x1 convolution
        if spec.kind != HeadType.linear:
            raise FinetuneError("model.head=mlp is not available for SqueezeNet; use model.head=linear.")
        return nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
    if not isinstance(old, nn.Linear):
        raise RuntimeError(f"family table error: head is a {type(old).__name__}, not a Linear")
    if spec.kind == HeadType.mlp:
        return nn.Sequential(
            nn.Linear(old.in_features, spec.hidden),
            nn.BatchNorm1d(spec.hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(spec.dropout),
            nn.Linear(spec.hidden, num_classes),
        )
    if spec.dropout > 0:
        return nn.Sequential(nn.Dropout(spec.dropout), nn.Linear(old.in_features, num_classes))
    return nn.Linear(old.in_features, num_classes)


def replace_heads(model: nn.Module, family: Family, num_classes: int, spec: HeadSpec) -> None:
    _set_submodule(model, family.head, _new_head(model.get_submodule(family.head), num_classes, spec))
    for path in family.aux_heads:
        try:
            old = model.get_submodule(path)
        except AttributeError:
            continue  # auxiliary classifiers disabled
        _set_submodule(model, path, nn.Linear(old.in_features, num_classes))


def head_prefixes(family: Family) -> List[str]:
    return [p + "." for p in (family.head, *family.aux_modules, *family.aux_heads)]


@contextmanager
def swapped_head(model: nn.Module, family: Family, head: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` with ``head`` in place of its main head; the model's own head is put back
    on exit, also after an error."""
    own = model.get_submodule(family.head)
    _set_submodule(model, family.head, head)
    try:
        yield model
    finally:
        _set_submodule(model, family.head, own)


def _layer_index(key: str) -> int:
    first = key.split(".")[0]
    return int(first) if first.isdigit() else -1


def head_from_tensors(template: nn.Module, tensors: Dict[str, torch.Tensor]) -> Optional[nn.Module]:
    """A classifier holding ``tensors`` (keys relative to the head): a linear head, a dropout and
    linear head or an MLP head (the shapes ``model.head`` builds), for the features ``template``
    (the architecture's own head) takes. None when the tensors fit none of them."""
    weights = sorted((k for k, v in tensors.items() if k.endswith("weight") and v.ndim >= 2), key=_layer_index)
    if not weights:
        return None
    classes = tensors[weights[-1]].shape[0]
    specs = [HeadSpec(), HeadSpec(dropout=0.5), HeadSpec(HeadType.mlp, hidden=tensors[weights[0]].shape[0])]
    for spec in specs:
        try:
            with torch.random.fork_rng(devices=[]):  # its init is overwritten: leave the run's random stream alone
                head = _new_head(template, classes, spec)
        except FinetuneError:  # no MLP head for SqueezeNet
            continue
        own = head.state_dict()
        if own.keys() == tensors.keys() and all(own[k].shape == tensors[k].shape for k in own):
            head.load_state_dict(tensors)
            return head
    return None


def load_weights_file(
    model: nn.Module, family: Family, choice: WeightsChoice, template: Optional[nn.Module] = None
) -> Tuple[List[str], Optional[nn.Module]]:
    """Load a file into the model. Head tensors that are absent or of another shape (a different
    number of classes) keep their fresh init; any other mismatch is an error naming the keys.

    Also returns the file's classifier as a module of its own (the source head), from the head
    tensors of its state dict or from the ``source_head`` it keeps apart (synthetic weights, whose
    head never loads into the model); None without one. ``template``: the architecture's own
    head, which the source head is built for (default: the model's current head)."""
    state, apart = read_weights(choice.path)
    if family.input_size_kwarg and "encoder.pos_embedding" in state:  # a ViT saved at another size
        from torchvision.models.vision_transformer import interpolate_embeddings

        state = interpolate_embeddings(model.image_size, model.patch_size, state)
    main = family.head + "."
    file_head = apart if apart is not None else state
    source_head = head_from_tensors(
        template if template is not None else model.get_submodule(family.head),
        {k[len(main):]: v for k, v in file_head.items() if k.startswith(main)},
    )
    own = model.state_dict()
    heads = head_prefixes(family)

    def in_head(key: str) -> bool:
        return any(key.startswith(p) for p in heads)

    fresh, mismatched = [], []
    for key in list(state):
        if key in own and own[key].shape != state[key].shape:
            if in_head(key):
                fresh.append(key)
            else:
                mismatched.append(f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}")
            del state[key]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = []
    for label, keys in (
        ("shape mismatch", mismatched),
        ("missing from file", [k for k in missing if not in_head(k)]),
        ("not in model", [k for k in unexpected if not in_head(k)]),
    ):
        if keys:
            problems.append(f"{label}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}")
    if problems:
        raise FinetuneError(
            f"Weights file {choice.path} does not fit {family.name} model "
            f"{type(model).__name__} ({'; '.join(problems)}). Check that model.name is the "
            "architecture the file was saved from."
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    fresh += [k for k in missing if in_head(k)]
    if fresh:
        return [f"head initialised fresh, not from the file ({len(fresh)} tensors: new classes)"], source_head
    return ["all tensors loaded from the file, head included"], source_head


def preprocess_for(name: str, choice: WeightsChoice, image_size: Optional[int]) -> Preprocess:
    """The weights' own preprocessing (the model's DEFAULT weights' for other sources),
    at ``image_size`` when given."""
    source = choice.torchvision if choice.kind == "torchvision" else get_model_weights(name).DEFAULT
    return Preprocess.from_weights(source).with_size(image_size)


def _patch_size(name: str) -> int:
    """A vision transformer's patch side, from its torchvision name (vit_b_16 -> 16)."""
    return int(name.split("_")[-1])


def smallest_input(name: str) -> int:
    """The smallest image side ``name`` accepts (a whole number of patches for transformers)."""
    family = check_model_name(name)
    if not family.input_size_kwarg:
        return family.min_input
    patch = _patch_size(name)
    return -(-family.min_input // patch) * patch


def _resize_vit(model: nn.Module, name: str, image_size: int) -> nn.Module:
    """Rebuild a ViT for another input size, interpolating its positional embeddings."""
    from torchvision.models.vision_transformer import interpolate_embeddings

    state = interpolate_embeddings(image_size, model.patch_size, model.state_dict())
    resized = get_model(name, weights=None, image_size=image_size, num_classes=model.heads.head.out_features)
    resized.load_state_dict(state)
    return resized


def create_model(
    name: str,
    choice: WeightsChoice,
    num_classes: int,
    *,
    head: HeadSpec = HeadSpec(),
    aux_logits: bool = True,
    image_size: Optional[int] = None,
    progress: bool = False,
) -> BuiltModel:
    family = check_model_name(name)
    preprocess = preprocess_for(name, choice, image_size)
    if preprocess.crop_size < family.min_input:
        raise FinetuneError(
            f"{name} needs inputs of at least {family.min_input} px, but data.image_size="
            f"{preprocess.crop_size}. Set data.image_size={family.min_input} or more."
        )

    kwargs: dict = {}
    if family.accepts_aux_logits:
        kwargs["aux_logits"] = aux_logits
    if choice.kind != "torchvision":
        kwargs.update(family.random_init_kwargs)
        if family.input_size_kwarg:
            kwargs["image_size"] = preprocess.crop_size
    if family.input_size_kwarg:
        patch = _patch_size(name)
        if preprocess.crop_size % patch:
            raise FinetuneError(
                f"{name} cuts images into {patch}-px patches, so data.image_size must be a "
                f"multiple of {patch} (got {preprocess.crop_size})."
            )

    if choice.kind == "torchvision":
        ensure_downloaded(choice.torchvision, progress=progress)
    model = get_model(name, weights=choice.torchvision, **kwargs)
    if family.input_size_kwarg and model.image_size != preprocess.crop_size:
        model = _resize_vit(model, name, preprocess.crop_size)

    original = model.get_submodule(family.head)
    replace_heads(model, family, num_classes, head)
    notes: List[str] = []
    source_head: Optional[nn.Module] = None
    if choice.kind == "file":
        notes, source_head = load_weights_file(model, family, choice, original)
    elif choice.kind == "torchvision":
        notes = [f"head replaced for {num_classes} classes"]
        source_head = original
    return BuiltModel(
        model=model,
        family=family,
        groups=layer_groups(model, family),
        preprocess=preprocess,
        weights=choice.describe(),
        notes=notes,
        source_head=source_head,
    )


def count_params(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


__all__ = ["BuiltModel", "HeadSpec", "create_model", "count_params", "swapped_head"]
