"""The processes of one run (data-parallel training): who this process is, the process group,
and the few collective operations the run needs.

A run is one process by default. ``trainer.devices=N`` starts N itself (torch's elastic launcher,
as ``torchrun`` does); a run started by ``torchrun`` or by ``srun`` (SLURM) is already one of
several, and finds out from their environment variables. Rank 0 writes every file and prints the
plan, progress and tables; the other ranks log warnings and errors only.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import torch

log = logging.getLogger("finetune_cli")  # this module imports torch only where it is used: the CLI reads
# ``from_env`` before any check, and a mistyped setting is answered without importing torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def from_env() -> World:
    """This process's place: from torchrun/elastic (RANK, WORLD_SIZE, LOCAL_RANK), else from an
    ``srun`` step of several tasks (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), else alone."""
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) > 1:
        return World(int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"])), int(env["WORLD_SIZE"]))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        return World(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0")), int(env["SLURM_NTASKS"]))
    return World()


def _slurm_rendezvous(world: World) -> None:
    """torch's env:// rendezvous under srun: rank 0's node and a port from the job's id."""
    env = os.environ
    if "MASTER_ADDR" not in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        first = nodes.split(",")[0]
        if "[" in first:  # node[01-04] -> node01
            base, rest = first.split("[", 1)
            first = base + rest.split("-")[0].split(",")[0].rstrip("]")
        env["MASTER_ADDR"] = "127.0.0.1" if int(env.get("SLURM_NNODES", "1")) == 1 else first
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    env.setdefault("RANK", str(world.rank))
    env.setdefault("WORLD_SIZE", str(world.size))
    env.setdefault("LOCAL_RANK", str(world.local_rank))


def join(world: World, device_type: str = "cpu") -> Optional[str]:
    """Join the run's process group (once); returns the backend: NCCL for CUDA tensors, gloo for
    CPU ones (both where a GPU is visible, so that CPU objects can be exchanged too)."""
    if not world.distributed:
        return None
    import torch
    import torch.distributed as dist

    if device_type == "cuda":  # srun --gpus-per-task=1 shows each task one GPU
        torch.cuda.set_device(world.local_rank % max(1, torch.cuda.device_count()))
    if not dist.is_initialized():
        if "SLURM_PROCID" in os.environ and "MASTER_ADDR" not in os.environ:
            _slurm_rendezvous(world)
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", rank=world.rank, world_size=world.size)
    return dist.get_backend()


def wanted(devices: str, device: str) -> int:
    """``trainer.devices`` as a number of processes: ``auto`` is every visible GPU (1 on CPU)."""
    import torch

    text = str(devices).strip().lower()
    if text == "auto":
        return max(1, torch.cuda.device_count()) if device != "cpu" and torch.cuda.is_available() else 1
    n = int(text)
    if device != "cpu" and torch.cuda.is_available() and n > torch.cuda.device_count():
        from finetune_cli.errors import FinetuneError

        raise FinetuneError(f"trainer.devices={n}, but {torch.cuda.device_count()} GPU(s) are visible. Use "
                            "trainer.devices=auto for all of them, or a smaller number.")
    return n


def launch(n: int, argv: list) -> int:
    """Run ``python -m finetune_cli ARGV`` as ``n`` processes of one run, through torch's elastic
    launcher (what ``torchrun --standalone`` does); returns the exit code: 0, 130/143 when they
    were interrupted, else the first failure's."""
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads is None:  # the cores shared out: 2 processes x 2 threads on 2 cores ran 7.7x slower
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // n))
    try:
        return _launch(n, argv)
    finally:
        if threads is None:  # the next job of a sweep may start another number of processes
            os.environ.pop("OMP_NUM_THREADS", None)


def _launch(n: int, argv: list) -> int:
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2)
    from torch.distributed.elastic.multiprocessing.api import SignalException

    try:
        elastic_launch(config, sys.executable)("-m", "finetune_cli", *argv)
    except SignalException as exc:  # SIGTERM or Ctrl-C here: the processes got it too and stopped
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        codes = sorted({f.exitcode for f in exc.failures.values()})
        signalled = [c for c in codes if c in (130, 143)]
        return signalled[0] if signalled else next((c for c in codes if c > 0), 1)
    return 0


def leave() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _group_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def total(tensor: "torch.Tensor") -> "torch.Tensor":
    """The sum over every process of ``tensor`` (in place; itself when alone)."""
    if _group_ready():
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def same_as_main(module: "torch.nn.Module", buffers_only: bool = False) -> None:
    """Rank 0's parameters and buffers (or its buffers alone: BatchNorm statistics, which each
    process updates from its own share of the batch) in every process's ``module``."""
    if not _group_ready():
        return
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in [*([] if buffers_only else module.parameters()), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def wait_for_all() -> None:
    """A barrier: every process reaches this point before any goes on."""
    if _group_ready():
        import torch.distributed as dist

        dist.barrier()


def anyone(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (a stop requested on one rank)."""
    if not _group_ready():
        return flag
    import torch

    return bool(total(torch.tensor([int(flag)])).item())


def from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not _group_ready():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gathered(obj: Any) -> list:
    """Every process's ``obj``, in rank order (on every process)."""
    if not _group_ready():
        return [obj]
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def quiet_unless_main(world: World) -> None:
    """Ranks other than 0 log warnings and errors only, to the console only."""
    if world.main:
        return
    logging.getLogger("finetune_cli").setLevel(logging.WARNING)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
