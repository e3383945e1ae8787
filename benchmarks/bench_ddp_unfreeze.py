"""Data-parallel training through progressive unfreezing: making the DistributedDataParallel
wrapper again at each unfreeze (what the tool does: its buckets hold only what trains) against one
wrapper made at the start over every parameter with ``find_unused_parameters=True`` (frozen
parameters then sit in the buckets and are exchanged as zeros).

Two processes (gloo on CPU, NCCL with two GPUs), resnet18, the tool's layer groups and freezing;
the same seeds and batches in both modes. Prints the seconds of each stage (the wrapper's making
included), the ratio, and whether the two modes ended with the same weights (frozen ones untouched).
``static_graph=True`` is not a third mode: it assumes that the set of parameters that get a
gradient never changes, which an unfreeze breaks.

    python benchmarks/bench_ddp_unfreeze.py   # prints seconds per stage and wrap-once / rewrap
"""

from __future__ import annotations

import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from common import machine, parser, table, workdir
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from finetune_cli.config import BNMode
from finetune_cli.models.families import family_of
from finetune_cli.models.groups import layer_groups
from finetune_cli.train.freezing import apply_freezing, mask_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(rank: int, size: int, mode: str, a, out) -> None:
    cuda = torch.cuda.device_count() >= size
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // size))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=size)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).to(device)
    groups = layer_groups(model, family_of("resnet18"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(1 + rank)
    batches = [(torch.randn(a.batch, 3, a.size, a.size, generator=gen), torch.randint(0, 10, (a.batch,), generator=gen))
               for _ in range(4)]
    wrapped = DistributedDataParallel(model, find_unused_parameters=True) if mode == "once" else None
    seconds = []
    for stage in range(a.stages):
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        started = time.perf_counter()
        apply_freezing(groups, mask_for(len(groups), stage), BNMode.frozen_eval)
        if mode == "rewrap":
            wrapped = DistributedDataParallel(model)
        model.train()
        for step in range(a.steps):
            x, y = batches[step % len(batches)]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(wrapped(x.to(device)), y.to(device)).backward()
            opt.step()
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    if rank == 0:
        torch.save((seconds, {k: v.detach().cpu() for k, v in model.state_dict().items()}), out)
    dist.destroy_process_group()


def measure(mode: str, a, where):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    ctx = mp.get_context("spawn")
    out = where / f"{mode}.pt"
    procs = [ctx.Process(target=_train, args=(rank, 2, mode, a, out)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"{mode}: a process failed (exit {p.exitcode})")
    return torch.load(out, weights_only=True)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="per process")
    p.add_argument("--steps", type=int, default=12, help="training steps per stage")
    p.add_argument("--stages", type=int, default=5, help="head only, then one more group each stage")
    a = p.parse_args()
    if a.quick:
        a.size, a.batch, a.steps, a.stages = 32, 4, 2, 2
    torch.manual_seed(0)
    fresh = torchvision.models.resnet18(num_classes=10)
    start = fresh.state_dict()
    groups = layer_groups(fresh, family_of("resnet18"))
    never = {name for g in groups[:len(groups) - a.stages] for name, _ in g.params}  # frozen in every stage
    print(f"{machine()}\nresnet18, {a.size} px, 2 processes x batch {a.batch}, {a.stages} stages of {a.steps} steps, "
          "one more group trains each stage")
    where = workdir(a.workdir)
    where.mkdir(parents=True, exist_ok=True)
    rewrap, w1 = measure("rewrap", a, where)
    once, w2 = measure("once", a, where)
    print(table(["stage", "groups training", "rewrap s", "wrap once s", "once / rewrap"],
                [[str(i + 1), str(i + 1), f"{r:.2f}", f"{o:.2f}", f"{o / r:.2f}"]
                 for i, (r, o) in enumerate(zip(rewrap, once))]))
    diff = max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1)
    untouched = all(torch.equal(w[k], start[k]) for w in (w1, w2) for k in never)
    print(f"largest weight difference between the modes: {diff:.2e}; the {len(never)} parameters of groups "
          f"that never trained are untouched in both: {untouched and bool(never)}")
    print(f"wrap once / rewrap: {sum(once) / sum(rewrap):.2f}")


if __name__ == "__main__":
    main()
