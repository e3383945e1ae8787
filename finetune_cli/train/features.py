"""Cached frozen features.

When only the head trains for the whole run, the network below it is a fixed function: its
output for each image is computed once (``extract``), kept in memory and in the run folder
(``FeatureStore``, keyed by the frozen weights, the image files and the transform), and the
epochs train and validate the tail alone on those tensors (``FeatureLoader``).

Training features can be cached only when the training input is the same every epoch (no random
augmentation, no MixUp/CutMix) and nothing random or stateful runs below the tail. Validation
always uses the deterministic eval transform and eval mode, so its features are cached whenever
the layers below the head stay frozen.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from finetune_cli.config import BNMode
from finetune_cli.errors import FinetuneError
from finetune_cli.io_utils import atomic_torch_save, safe_torch_load, text_bytes
from finetune_cli.models.tail import Tail
from finetune_cli.train.engine import Precision, split_outputs
from finetune_cli.train.freezing import is_stochastic

log = logging.getLogger("finetune_cli")


def parse_switch(value: Any, key: str) -> Optional[bool]:
    """``auto`` -> None, ``true``/``false`` -> bool (Hydra hands ``true`` over as "True")."""
    text = str(value).strip().lower()
    if text == "auto":
        return None
    if text in ("true", "on", "yes", "1"):
        return True
    if text in ("false", "off", "no", "0"):
        return False
    raise FinetuneError(f"{key}={value}: use auto, true or false.")


@dataclass
class CacheDecision:
    train: bool
    val: bool
    why_not: List[str] = field(default_factory=list)  # why each part that is off is off
    demanded: bool = False  # data.cache_features=true: caching is required, not just allowed

    def describe(self, tail: Tail) -> str:
        where = f"the input of {tail.path}"
        if self.train:
            return f"Feature cache: on: {where} is computed once for training and validation images."
        if self.val:
            return f"Feature cache: validation only ({where}); training runs the whole network because " + "; ".join(self.why_not)
        return "Feature cache: off (" + "; ".join(self.why_not) + ")"


def _outside(model: nn.Module, tail: Tail, kind) -> List[str]:
    """Modules below the tail, still in training mode, that ``kind`` picks out."""
    return [name for name, m in model.named_modules() if m.training and not tail.contains(name) and kind(m)]


def updating_batchnorms(model: nn.Module, tail: Tail) -> List[str]:
    """BatchNorm layers below the tail that update their statistics (call in train mode)."""
    return _outside(model, tail, lambda m: isinstance(m, _BatchNorm))


def train_blockers(model: nn.Module, tail: Tail, *, random_augment: Optional[str], mixing: bool) -> List[str]:
    """Why the input of the tail could differ between epochs (empty: it cannot). Call with the
    model in train mode and the freezing applied."""
    found = []
    if random_augment:
        found.append(f"augment={random_augment} draws random crops and flips, so each epoch sees different "
                     "pixels (augment=none makes training cacheable)")
    if mixing:
        found.append("MixUp/CutMix blends images before the network")
    random_layers = _outside(model, tail, is_stochastic)
    if random_layers:
        found.append(f"{', '.join(random_layers[:3])} (dropout or stochastic depth outside any layer group) "
                     "is random in training")
    return found


def decide(setting: Optional[bool], *, frozen_below_head: bool, tail_ok: bool, bn_updating: List[str],
           aux: bool, blockers: List[str], bn_mode: BNMode = BNMode.frozen_eval) -> CacheDecision:
    """``setting``: data.cache_features (None = auto). ``true`` demands the training cache."""
    if setting is False:
        return CacheDecision(False, False, ["data.cache_features=false"])
    why: List[str] = []
    if not frozen_below_head:
        why.append("layers below the head train at some point of this run")
    if not tail_ok:
        why.append("this model's output is not a function of its head's input alone")
    if bn_updating and frozen_below_head:  # otherwise the groups that train explain it
        cause = "strategy.bn=train" if bn_mode == BNMode.train else "they belong to no layer group, so no freezing reaches them"
        why.append(f"{', '.join(bn_updating[:3])} update their BatchNorm statistics ({cause})")
    val = not why
    if aux:
        why.append("auxiliary classifiers train on inner layers")
    why += blockers
    decision = CacheDecision(train=not why, val=val, why_not=why, demanded=setting is True)
    if setting is True and not decision.train:
        raise FinetuneError(
            "data.cache_features=true, but training features cannot be cached: " + "; ".join(why) +
            ". Use data.cache_features=auto to cache what can be cached, or change the setting named."
        )
    return decision


# --- the store -------------------------------------------------------------------------------


def _samples(dataset: Dataset) -> Tuple[List[Tuple[str, int]], str]:
    """The (path, class) list of an ImageFolder or a Subset of one, and how it reads images."""
    if isinstance(dataset, Subset):
        inner, how = _samples(dataset.dataset)
        return [inner[i] for i in dataset.indices], how
    loader = dataset.loader  # type: ignore[attr-defined]
    reads = f"{getattr(loader, 'func', loader).__name__}{getattr(loader, 'keywords', {})}"
    return list(dataset.samples), f"{reads}|{dataset.transform!r}"  # type: ignore[attr-defined]


def cache_key(model: nn.Module, tail: Tail, dataset: Dataset, precision: Precision) -> str:
    """A digest of everything the features depend on: the weights below the tail, every image
    file (path, size, modification time, class), the transform, and the precision."""
    h = hashlib.sha256()
    tail_tensors = {id(t) for t in (*tail.module.parameters(), *tail.module.buffers())}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in tail_tensors:
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    samples, how = _samples(dataset)
    for path, target in samples:
        st = os.stat(path)
        h.update(text_bytes(f"{path}|{st.st_size}|{st.st_mtime_ns}|{target}\n"))
    h.update(text_bytes(how))
    h.update(f"{type(model).__name__}|{tail.path}|{precision.name}".encode())
    return h.hexdigest()[:20]


@dataclass
class Features:
    features: torch.Tensor
    targets: torch.Tensor
    seconds: float  # time to compute (0 when read back from the run folder)
    path: Path


def extract(model: nn.Module, tail: Tail, loader: DataLoader, device: torch.device, precision: Precision,
            progress: bool = False, desc: str = "features") -> Tuple[torch.Tensor, torch.Tensor]:
    """Run the model in eval mode over ``loader`` and keep the tail's input for every image. The
    first batch checks that the tail alone reproduces the model's output from those features."""
    captured: List[torch.Tensor] = []
    hook = tail.entry.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    feats, targets = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for images, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not progress):
                captured.clear()
                with precision.autocast(device):
                    out, _ = split_outputs(model(images.to(device, non_blocking=True)))
                if len(captured) != 1:
                    raise RuntimeError(f"{tail.path} ran {len(captured)} times in one forward pass")
                if not feats:
                    with precision.autocast(device):
                        again = tail.module(captured[0])
                    if again.shape != out.shape or not torch.allclose(again.float(), out.float(), rtol=1e-3, atol=1e-4):
                        raise TailMismatch(f"the output of {tail.path} onwards differs from the model's output")
                feats.append(captured[0].cpu())
                targets.append(y)
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(feats), torch.cat(targets)


class TailMismatch(RuntimeError):
    pass


class FeatureStore:
    """``RUN/features/<split>.pt`` holding {key, features, targets}; reused when the key matches."""

    def __init__(self, folder: Path):
        self.folder = folder

    def get(self, split: str, key: str, compute) -> Features:
        path = self.folder / f"{split}.pt"
        if path.is_file():
            try:
                saved = safe_torch_load(path)
            except Exception:  # unreadable: computed again below
                saved = None
            if isinstance(saved, dict) and saved.get("key") == key:
                return Features(saved["features"], saved["targets"], 0.0, path)
        started = time.perf_counter()
        feats, targets = compute()
        seconds = time.perf_counter() - started
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"key": key, "features": feats, "targets": targets}, path)
        return Features(feats, targets, seconds, path)


class FeatureLoader:
    """Batches of cached features in the order the image loader's sampler draws images (give it
    that very sampler), so a cached run sees the same batches as an uncached one."""

    def __init__(self, feats: Features, device: torch.device, *, batch_size: int, sampler: Any = None,
                 drop_last: bool = False):
        self.features = feats.features.to(device)
        self.targets = feats.targets.to(device)
        self.index = DataLoader(range(len(self.targets)), batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                                generator=torch.Generator())  # its own stream: the global one stays the model's

    def __len__(self) -> int:
        return len(self.index)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for idx in self.index:
            idx = idx.to(self.features.device)
            yield self.features[idx], self.targets[idx]

    def nbytes(self) -> int:
        return self.features.element_size() * self.features.numel()


def summary_of(decision: CacheDecision, tail: Tail, parts: Dict[str, Features]) -> Dict[str, Any]:
    return {
        "train": decision.train,
        "val": decision.val,
        "why_not": decision.why_not,
        "feature": tail.path,
        "shape": list(next(iter(parts.values())).features.shape[1:]) if parts else None,
        "seconds": sum(f.seconds for f in parts.values()),
        "reused": bool(parts) and all(f.seconds == 0.0 for f in parts.values()),
        "files": {k: str(f.path) for k, f in parts.items()},
        "mb": sum(f.features.numel() * f.features.element_size() for f in parts.values()) / 2**20,
    }
