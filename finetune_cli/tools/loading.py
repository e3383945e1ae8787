"""Opening a finetune-cli checkpoint for inference (the model, its classes and preprocessing),
and the command line and error handling shared by the file tools' entry points."""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from finetune_cli.config import HeadType
from finetune_cli.data.transforms import Preprocess
from finetune_cli.errors import FinetuneError
from finetune_cli.models import HeadSpec, WeightsChoice, create_model, layer_groups, resolve_weights
from finetune_cli.models.lora import Adapted, digest, inject, left_out_keys, merge
from finetune_cli.models.pretrain import synthetic_weights_path
from finetune_cli.models.weights import serving
from finetune_cli.paths import cache_dir
from finetune_cli.train.checkpoint import load_model_state, read_checkpoint, resolve_checkpoint


@dataclass
class Loaded:
    model: nn.Module
    model_name: str
    classes: List[str]
    preprocess: Preprocess
    path: Path
    epoch: int
    metrics: Dict[str, Any]
    run_dir: Optional[Path]


def load_for_inference(spec: str, device: torch.device = torch.device("cpu")) -> Loaded:
    path = resolve_checkpoint(spec)
    ckpt = serving(read_checkpoint(path))
    ckpt["path"] = str(path)
    pre_dict = dict(ckpt["preprocess"])
    pre = Preprocess(**{**pre_dict, "mean": tuple(pre_dict["mean"]), "std": tuple(pre_dict["std"])})
    model = model_of(ckpt, pre.crop_size)
    model.to(device).eval()
    return Loaded(model, ckpt["model_name"], list(ckpt["classes"]), pre, path, int(ckpt.get("epoch", 0)),
                  dict(ckpt.get("metrics") or {}), run_dir_of(path))


def model_of(ckpt: Dict[str, Any], image_size: int) -> nn.Module:
    """The checkpoint's model as a plain torchvision model: a LoRA run's with its LoRA matrices
    merged into the weights they adapt (peft's merge_and_unload)."""
    model_cfg = (ckpt.get("config") or {}).get("model", {})
    head = HeadSpec(
        HeadType(model_cfg.get("head", "linear")),
        int(model_cfg.get("head_hidden", 512)),
        float(model_cfg.get("head_dropout", 0.0)),
    )
    built = create_model(
        ckpt["model_name"],
        base_weights(ckpt) if ckpt.get("base") else WeightsChoice("none"),
        len(ckpt["classes"]),
        head=head,
        aux_logits=bool(model_cfg.get("aux_logits", True)),
        image_size=image_size,
    )
    if not ckpt.get("lora"):
        built.model.load_state_dict(ckpt["model"])
        return built.model
    tuner = inject(built.model, Adapted.from_dict(ckpt["lora"]))
    known = None
    if ckpt.get("base"):
        keys = left_out_keys(built.model, layer_groups(built.model, built.family))
        known = digest(built.model.state_dict(), keys)
    load_model_state(built.model, ckpt, known)
    return merge(tuner)


def merged_state(ckpt: Dict[str, Any], path: Path) -> Dict[str, torch.Tensor]:
    """A LoRA run's checkpoint as the state dict of the plain model (model.weights=RUN/checkpoints/best.pt)."""
    ckpt = {**ckpt, "path": str(path)}
    return model_of(ckpt, int(ckpt["preprocess"]["crop_size"])).state_dict()


def base_weights(ckpt: Dict[str, Any]) -> WeightsChoice:
    """The weights an adapter-only checkpoint (strategy.lora_save=adapter) was trained on, from the
    run's model.weights: its LoRA matrices and head go on top of them."""
    config = ckpt.get("config") or {}
    name, spec = ckpt["model_name"], (config.get("model") or {}).get("weights")
    where = (f"{ckpt.get('path', 'This checkpoint')} holds LoRA adapters only (strategy.lora_save=adapter); the weights "
             f"they adapt come from its run's model.weights={spec}")
    if spec == "synthetic":
        path = synthetic_weights_path(cache_dir(config.get("cache_dir")), name)
        if not path.is_file():
            raise FinetuneError(f"{where}, which are not in {path.parent}: run the training command again to make them "
                                "(set FINETUNE_CLI_CACHE to the cache the run used), or train with strategy.lora_save=full.")
        return WeightsChoice("file", path=path)
    try:
        return resolve_weights(name, spec)
    except FinetuneError as exc:
        raise FinetuneError(f"{where}, which cannot be read here: {exc}") from None


def run_dir_of(checkpoint: Path) -> Optional[Path]:
    """The run folder a checkpoint was saved in (RUN/checkpoints/*.pt), or None."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def tool_parser(prog: str, doc: str, device: bool = False) -> argparse.ArgumentParser:
    """The command line shared by the checkpoint tools: a CHECKPOINT argument, optionally --device;
    the description is the first paragraph of the tool's docstring."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint .pt or a run folder (its checkpoints/best.pt)")
    if device:
        parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return parser


def tool_main(fn: Callable[..., int]) -> Callable[..., int]:
    """Entry points of the file tools: a user mistake prints one paragraph and exits 2."""

    @functools.wraps(fn)
    def wrapper(argv: Optional[List[str]] = None) -> int:
        from finetune_cli.errors import storage_problem
        from finetune_cli.ui import tolerant_streams

        tolerant_streams()
        try:
            return fn(argv)
        except FinetuneError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # a full disk, a read-only or forbidden folder
            problem = storage_problem(exc)
            if problem is None:
                raise
            print(f"error: {problem}", file=sys.stderr)
            return 2

    return wrapper
