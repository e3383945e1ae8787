"""Where and how a run computes: device, precision, seeds and random streams, speed switches."""

from __future__ import annotations

import os
import random
from typing import Any, Dict, Union

import numpy as np
import torch

from finetune_cli.config import Amp, Device
from finetune_cli.errors import FinetuneError
from finetune_cli.train.engine import Precision
from finetune_cli.train.features import parse_switch


def pick_device(choice: Union[Device, str], option: str = "trainer.device") -> torch.device:
    """``auto``: CUDA when present, else CPU. ``cuda`` without a GPU is a user error naming
    ``option`` (the key or flag the user set)."""
    choice = Device(choice)
    if choice == Device.cuda and not torch.cuda.is_available():
        raise FinetuneError(
            f"{option}=cuda, but no CUDA GPU is visible to PyTorch. Use {option}=auto "
            f"(CUDA when present, else CPU) or {option}=cpu."
        )
    if choice == Device.cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def pick_precision(amp: Amp, device: torch.device) -> Precision:
    if amp == Amp.off or (amp == Amp.auto and device.type != "cuda"):
        return Precision(None)
    if amp == Amp.fp16:
        return Precision(torch.float16)
    if amp == Amp.auto and not torch.cuda.is_bf16_supported():
        return Precision(torch.float16)
    return Precision(torch.bfloat16)


def speed_switches(device: torch.device, deterministic: bool, channels_last: str) -> bool:
    """On CUDA: cuDNN autotuning (unless deterministic) and TF32 matmuls. Returns whether
    inputs and weights use the channels-last layout (trainer.channels_last; auto = on CUDA)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    choice = parse_switch(channels_last, "trainer.channels_last")
    return device.type == "cuda" if choice is None else choice


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (DataLoader workers derive their seeds from the loader's
    seeded generator); optionally demand deterministic algorithms."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic and torch.backends.cudnn.benchmark


def rng_state(loader_generator: torch.Generator) -> Dict[str, Any]:
    """Every random stream a run draws from, in a form ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)),
        "loader": loader_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any], loader_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    loader_generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
