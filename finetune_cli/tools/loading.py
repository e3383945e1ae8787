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
from finetune_cli.models import HeadSpec, WeightsChoice, create_model
from finetune_cli.train.checkpoint import read_checkpoint, resolve_checkpoint


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
    ckpt = read_checkpoint(path)
    pre_dict = dict(ckpt["preprocess"])
    pre = Preprocess(**{**pre_dict, "mean": tuple(pre_dict["mean"]), "std": tuple(pre_dict["std"])})
    model_cfg = (ckpt.get("config") or {}).get("model", {})
    head = HeadSpec(
        HeadType(model_cfg.get("head", "linear")),
        int(model_cfg.get("head_hidden", 512)),
        float(model_cfg.get("head_dropout", 0.0)),
    )
    built = create_model(
        ckpt["model_name"],
        WeightsChoice("none"),
        len(ckpt["classes"]),
        head=head,
        aux_logits=bool(model_cfg.get("aux_logits", True)),
        image_size=pre.crop_size,
    )
    model = built.model
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return Loaded(model, ckpt["model_name"], list(ckpt["classes"]), pre, path, int(ckpt.get("epoch", 0)),
                  dict(ckpt.get("metrics") or {}), run_dir_of(path))


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
