"""What a run holds in memory: the process or CUDA peak, and the bytes of parameters, gradients
and optimizer state (the part a freezing strategy saves).

Several jobs of a sweep run in one process, so a run calls :func:`reset_peak_memory` when it
starts and :func:`peak_memory` then gives that run's own peak. Where the peak cannot be reset
(no ``/proc/self/clear_refs``), the figure is the process's peak and its kind says so.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Dict, Optional, Set, Tuple

import torch
from torch import nn

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")

RSS_SINCE_RESET = "peak RSS since the run started"
RSS_PROCESS = "process peak RSS, includes earlier jobs in this process"
CUDA_SINCE_RESET = "CUDA max allocated since the run started"
CUDA_PROCESS = "CUDA max allocated since the process started, includes earlier jobs in this process"

_reset: Set[str] = set()  # device types whose peak was reset when the current run started


def _vm_hwm_mb() -> Optional[float]:
    """The peak resident set size (VmHWM) in MB, from /proc/self/status; None where unreadable."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_memory(device: torch.device) -> bool:
    """Start the peak memory figure of ``device`` afresh: call it when a run starts.

    CUDA: resets PyTorch's peak statistics. CPU on Linux: writing 5 to /proc/self/clear_refs
    resets the peak resident set size (VmHWM) to the current one. Returns False where that is
    not possible; :func:`peak_memory` then reports the process's peak and says so.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        done = True
    else:
        try:
            CLEAR_REFS.write_text("5")
            done = _vm_hwm_mb() is not None
        except OSError:
            done = False
    if done:
        _reset.add(device.type)
    else:
        _reset.discard(device.type)
    return done


def peak_memory(device: torch.device) -> Tuple[float, str]:
    """(MB, what the figure is): CUDA max allocated on a GPU, else the peak resident set size;
    since the last :func:`reset_peak_memory` where it succeeded, else since the process started."""
    if device.type == "cuda":
        mb = torch.cuda.max_memory_allocated(device) / 2**20
        return mb, CUDA_SINCE_RESET if "cuda" in _reset else CUDA_PROCESS
    if device.type in _reset:
        hwm = _vm_hwm_mb()
        if hwm is not None:
            return hwm, RSS_SINCE_RESET
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return maxrss / (2**20 if sys.platform == "darwin" else 1024), RSS_PROCESS


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
