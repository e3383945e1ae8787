"""Resolving ``model.weights`` and reading weight files safely."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple
from urllib.parse import urlparse

import torch
from torchvision.models import get_model_weights

from finetune_cli.config import RANDOM_NAMES
from finetune_cli.errors import FinetuneError, Truncated
from finetune_cli.io_utils import safe_torch_load

WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin", ".ckpt")


@dataclass(frozen=True)
class WeightsChoice:
    kind: str  # "none" | "torchvision" | "file"
    torchvision: Any = None  # a torchvision WeightsEnum member
    path: Optional[Path] = None
    label: Optional[str] = None  # how to name this choice to the user

    def describe(self) -> str:
        if self.label:
            return self.label
        if self.kind == "torchvision":
            return f"torchvision {type(self.torchvision).__name__}.{self.torchvision.name}"
        if self.kind == "file":
            return f"file {self.path}"
        return "random init"


def resolve_weights(model_name: str, spec: Optional[str]) -> WeightsChoice:
    if spec is None or spec.strip().lower() in RANDOM_NAMES:
        return WeightsChoice("none")
    looks_like_path = spec.endswith(WEIGHT_SUFFIXES) or os.sep in spec or Path(spec).exists()
    if looks_like_path:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FinetuneError(
                f"model.weights={spec}: no such file. Give the path of a state dict or a "
                f"finetune-cli checkpoint ({', '.join(WEIGHT_SUFFIXES)}), a torchvision weights "
                "name such as DEFAULT, or null for random init."
            )
        return WeightsChoice("file", path=path.resolve())
    enum_cls = get_model_weights(model_name)
    name = spec.split(".")[-1]  # accept "ResNet50_Weights.IMAGENET1K_V2" too
    if name == "DEFAULT":
        return WeightsChoice("torchvision", torchvision=enum_cls.DEFAULT)
    valid = [w.name for w in enum_cls]
    if name not in valid:
        raise FinetuneError(
            f"model.weights={spec} is not a weights name of {model_name}. Valid choices: "
            f"DEFAULT, {', '.join(valid)}; or a local file, 'synthetic', or null for random init."
        )
    return WeightsChoice("torchvision", torchvision=enum_cls[name])


def hub_file(weights: Any) -> Path:
    """Where torch hub keeps the file of torchvision ``weights`` ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def ensure_downloaded(weights: Any, progress: bool) -> None:
    """Fetch torchvision weights into the torch hub cache, or stop with the remedies.

    The download goes through torchvision (``get_state_dict(check_hash=True)``): the file's
    SHA-256 must start with the hash in its name, else it is deleted and refused. The model
    builder then finds the file in the cache and reads it from there, without downloading again.
    """
    target = hub_file(weights)
    if target.is_file():
        return
    try:
        weights.get_state_dict(progress=progress, check_hash=True, weights_only=True)
    except Exception as exc:  # network errors come in many types (URLError, OSError, ...)
        corrupt = "hash" in str(exc)
        raise FinetuneError(
            f"Could not download pretrained weights {type(weights).__name__}.{weights.name} "
            f"from {weights.url} ({type(exc).__name__}: {exc})"
            f"{'; the downloaded file is not the published one and was deleted' if corrupt else ''}. "
            f"Remedies: connect to the internet and rerun; or copy the file to {target} (the "
            "torch hub cache, set by $TORCH_HOME); or pass a local file with "
            "model.weights=/path/to/weights.pth; or model.weights=synthetic for offline demo "
            "weights; or model.weights=null to train from random init on purpose. Nothing was "
            "trained."
        ) from None


def fetch_ahead(model_name: str, spec: Optional[str], progress: bool) -> None:
    """Download a run's torchvision weights before its folder is made, so that a failed download
    leaves no run folder behind. Other weights (files, synthetic, none) need nothing here."""
    if spec is None or spec == "synthetic":
        return
    choice = resolve_weights(model_name, spec)
    if choice.kind == "torchvision":
        ensure_downloaded(choice.torchvision, progress=progress)


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """A state dict from a plain state-dict file, a finetune-cli checkpoint or safetensors.

    Pickle files load with ``weights_only=True``: a file that would run code is refused.
    """
    return read_weights(path)[0]


def serving(ckpt: Any) -> Any:
    """A checkpoint as inference takes it: where its run monitored the weights' moving average
    (trainer.monitor=ema_*), the average's weights are the model."""
    if isinstance(ckpt, dict) and ckpt.get("serve") == "ema" and isinstance(ckpt.get("ema"), dict):
        return {**ckpt, "model": ckpt["ema"]["model"]}
    return ckpt


def read_weights(path: Path) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, torch.Tensor]]]:
    """``read_state_dict``, plus the source task's classifier where the file keeps it apart from
    the model's state dict (a ``source_head`` entry, as synthetic weights do), else None."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), None
        except OSError:
            raise
        except Exception as exc:  # safetensors raises its own SafetensorError on a damaged header
            raise Truncated(
                f"{path} is not a readable .safetensors file ({str(exc).splitlines()[0][:100]}): it is corrupt, "
                "cut short, or another format under a .safetensors name. Use another copy, or save the weights "
                "again with safetensors.torch.save_file."
            ) from None
    obj = serving(safe_torch_load(path))
    if isinstance(obj, dict) and obj.get("lora"):  # a LoRA run's checkpoint: its LoRA merged into the weights
        from finetune_cli.tools.loading import merged_state

        return merged_state(obj, path), None
    apart = None
    if isinstance(obj, dict) and isinstance(obj.get("source_head"), dict):
        apart = {k.removeprefix("module."): v for k, v in obj["source_head"].items()}
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FinetuneError(
            f"Weights file {path} holds no state dict (a mapping of names to tensors). Save it "
            "with torch.save(model.state_dict(), path)."
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}, apart
