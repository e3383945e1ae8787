"""What the sweep launchers (``hydra/launcher=parallel`` and ``hydra/launcher=slurm``) decide
outside Hydra: how a machine's GPUs and cores are dealt out to the jobs of a sweep running at
once, and how a job process takes its share. The launchers themselves are Hydra plugins
(``hydra_plugins/finetune_cli_launchers``) over submitit, which starts, watches and requeues the
job processes."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

GPUS_VAR = "FINETUNE_CLI_JOB_GPUS"  # a job's GPUs and cores, from the launcher to the job process
CPUS_VAR = "FINETUNE_CLI_JOB_CPUS"
STOP_SIGNAL = signal.SIGUSR2  # submitit's (and SLURM's --signal=USR2@...) warning before a time limit or preemption


@dataclass(frozen=True)
class Share:
    """One running job's part of the machine: GPU ids (as CUDA_VISIBLE_DEVICES names them) and cores."""

    gpus: Tuple[str, ...]
    cpus: Tuple[int, ...]

    def describe(self) -> str:
        gpus = f"GPU {','.join(self.gpus)}; " if self.gpus else ""
        return f"{gpus}{len(self.cpus)} core{'s' if len(self.cpus) != 1 else ''} ({_ranges(self.cpus)})"


class Box:
    """The GPUs and cores of this machine, dealt out to at most ``at_once`` jobs at a time: each
    job gets the GPUs it asks for (none on CPU) and an equal part of the cores."""

    def __init__(self, gpus: Sequence[str], cpus: Sequence[int], at_once: int) -> None:
        if at_once < 1:
            raise ValueError("at_once must be at least 1")
        self.free_gpus: List[str] = list(gpus)
        self.total_gpus = len(self.free_gpus)
        cpus = sorted(cpus) or [0]
        per = max(1, len(cpus) // at_once)
        self.free_cpus: List[Tuple[int, ...]] = [
            tuple(cpus[(i * per) % len(cpus):(i * per) % len(cpus) + per]) for i in range(at_once)
        ]

    def take(self, gpus: int) -> Optional[Share]:
        """A share with ``gpus`` GPUs, or None while they (or a part of the cores) are in use."""
        if not self.free_cpus or gpus > len(self.free_gpus):
            return None
        share = Share(tuple(self.free_gpus[:gpus]), self.free_cpus.pop(0))
        del self.free_gpus[:gpus]
        return share

    def give_back(self, share: Share) -> None:
        self.free_gpus = sorted(self.free_gpus + list(share.gpus), key=_gpu_order)
        self.free_cpus.append(share.cpus)
        self.free_cpus.sort()


def visible_gpus(chosen: Optional[Sequence] = None) -> List[str]:
    """The GPUs a sweep may use: ``chosen`` (hydra.launcher.gpus), else every GPU this process
    sees, named as CUDA_VISIBLE_DEVICES names them (so that a job's share names the same cards)."""
    if chosen is not None:
        return [str(g) for g in chosen]
    import torch

    count = torch.cuda.device_count()  # counts without starting CUDA here
    named = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return named[:count] if named else [str(i) for i in range(count)]


def usable_cpus() -> List[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def gpus_wanted(devices: str, device: str, gpus: int) -> int:
    """How many of the machine's ``gpus`` a job with ``trainer.devices``/``trainer.device`` needs:
    none on CPU, every one for ``auto``. A job that asks for more than there are gets them all and
    says so itself when it starts (trainer.devices=N, but M GPU(s) are visible)."""
    if device == "cpu" or gpus == 0:
        return 0
    text = str(devices).strip().lower()
    return gpus if text == "auto" or not text.isdigit() else min(int(text), gpus)


def enter_share() -> None:
    """In a job process, before anything starts CUDA: see only the share's GPUs, run on its cores.
    torch then uses one thread per core of the share, and ``trainer.devices=N`` divides them."""
    gpus = os.environ.pop(GPUS_VAR, None)
    if gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus
    cpus = os.environ.pop(CPUS_VAR, None)
    if cpus and hasattr(os, "sched_setaffinity"):
        chosen = {int(c) for c in cpus.split(",")}
        os.sched_setaffinity(0, chosen)
        if "torch" in sys.modules and "OMP_NUM_THREADS" not in os.environ:
            sys.modules["torch"].set_num_threads(len(chosen))


def share_env(share: Share) -> dict:
    return {GPUS_VAR: ",".join(share.gpus), CPUS_VAR: ",".join(map(str, share.cpus))}


def _gpu_order(name: str) -> Tuple[int, str]:
    return (int(name), "") if name.isdigit() else (1 << 30, name)


def _ranges(numbers: Sequence[int]) -> str:
    """0,1,2,3,6 -> '0-3,6'."""
    out, start, prev = [], None, None
    for n in list(numbers) + [None]:
        if start is not None and (n is None or n != prev + 1):
            out.append(f"{start}-{prev}" if prev != start else str(start))
            start = None
        if n is not None and start is None:
            start = n
        prev = n
    return ",".join(out)
