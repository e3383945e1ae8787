"""What a run holds in memory: the process or CUDA peak, and the bytes of parameters, gradients
and optimizer state (the part a freezing strategy saves)."""

from __future__ import annotations

import resource
from typing import Dict, Tuple

import torch
from torch import nn


def peak_memory(device: torch.device) -> Tuple[float, str]:
    """MB: CUDA max allocated on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, int]:
    """Bytes held right now by parameters, by gradients and by optimizer state."""
    return {
        "params": sum(_nbytes(p) for p in model.parameters()),
        "grads": sum(_nbytes(p.grad) for p in model.parameters() if p.grad is not None),
        "optimizer_state": sum(
            _nbytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)
        ),
    }
