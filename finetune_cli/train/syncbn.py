"""``trainer.sync_bn``: BatchNorm statistics computed over the global batch of every process.

Every BatchNorm becomes a ``SyncBatchNorm`` that shares its parameters and buffers, so checkpoints
keep the same keys and load into the plain model (export, predict, a one-process resume). The
conversion is done once, before the strategy freezes anything: a frozen group's BatchNorm is held
in eval mode, where ``SyncBatchNorm`` uses its running statistics and exchanges nothing, and when
the group unfreezes it syncs from the next step, with no module swapped mid-run.
"""

from __future__ import annotations

from typing import Optional

from torch import nn


def sync_batchnorms(model: nn.Module) -> int:
    """Replace, in place, every BatchNorm under ``model`` (a classifier, never a BatchNorm itself)
    by a ``SyncBatchNorm`` holding the same parameters and buffers; returns how many there are."""
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model, "the root module is not a BatchNorm, so it is changed in place"
    return sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


def sync_bn_problem(processes: int, device_type: str) -> Optional[str]:
    """Why ``trainer.sync_bn=true`` cannot run, or None. One process has nothing to sync with
    (that is allowed: a note says so); PyTorch's SyncBatchNorm trains on GPUs only."""
    if processes > 1 and device_type != "cuda":
        return (f"trainer.sync_bn=true shares BatchNorm statistics between processes on GPUs, and PyTorch's "
                f"SyncBatchNorm cannot train on {device_type}: this run has {processes} processes on {device_type}. "
                "Use trainer.sync_bn=false on CPU (each process then normalizes its own batch of data.batch_size "
                "images), or train on CUDA GPUs.")
    return None
