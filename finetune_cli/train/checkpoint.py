"""Checkpoints: the file format, finding and reading one, and the training state it holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from finetune_cli.errors import FinetuneError
from finetune_cli.io_utils import safe_torch_load

CHECKPOINT_FORMAT = "finetune-cli/1"


def read_checkpoint(path: Path) -> Dict[str, Any]:
    """A checkpoint's contents, read with ``weights_only=True``: a file that would run code when
    unpickled is refused, naming what it tried to load."""
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise FinetuneError(
            f"{path} is not a finetune-cli checkpoint (no '{CHECKPOINT_FORMAT}' marker). To start training "
            f"from its weights, use model.weights={path}."
        )
    return ckpt


def resolve_checkpoint(spec: str, prefer: str = "best.pt") -> Path:
    path = Path(spec).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / prefer, path / prefer, path / "checkpoints" / "last.pt"):
            if candidate.is_file():
                return candidate
    if not path.is_file():
        raise FinetuneError(f"No checkpoint at {spec}: give a .pt file or a run folder holding checkpoints/{prefer}.")
    return path
