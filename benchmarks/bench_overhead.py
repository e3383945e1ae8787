"""Overhead: finetune-cli's full fine-tuning epoch against the hand-written loop in plain_loop.py.

Same model (random init), same generated 64 px ImageFolder, batch size, transforms (random resized
crop + flip), optimizer (AdamW), worker count and number of epochs, in one process, alternating
tool and plain runs. Prints the ratio of median training-epoch times (first epoch left out), and
next to it what bounds the run: loader-only images/s against model-step images/s.

    python benchmarks/bench_overhead.py            # target: tool / plain <= 1.05
"""

from __future__ import annotations

import time

import torch
from common import machine, median_after_first, parser, synthetic_folder, table, tool_run, workdir
from plain_loop import plain_train
from torch import nn


def loader_only(root, size: int, batch: int, workers: int) -> float:
    """Images/s of the tool's training loader alone (decode + transforms + collate)."""
    from finetune_cli.config import AugmentConfig
    from finetune_cli.data.folders import image_folder, make_loader
    from finetune_cli.data.transforms import Preprocess
    from finetune_cli.data.transforms import train_transform as tool_transform

    data = image_folder(root / "train", tool_transform(Preprocess(size, int(size * 1.14)), AugmentConfig()))
    loader = make_loader(data, batch_size=batch, num_workers=workers, train=True, seed=0)
    for _ in loader:  # start the workers
        break
    start, seen = time.perf_counter(), 0
    for x, _ in loader:
        seen += x.size(0)
    return seen / (time.perf_counter() - start)


def step_only(model_name: str, size: int, batch: int, classes: int, steps: int) -> float:
    """Images/s of forward + backward + AdamW step on one batch already in memory."""
    import torchvision

    model = torchvision.models.get_model(model_name, num_classes=classes).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch,))
    for i in range(steps + 2):
        if i == 2:
            start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=64)
    p.add_argument("--workers", default="auto")
    a = p.parse_args()
    if a.quick:
        a.size, a.epochs, a.rounds, a.classes, a.per_class, a.batch = 32, 2, 1, 2, 8, 8
    from finetune_cli.data.folders import resolve_workers

    workers = resolve_workers(a.workers)
    root = synthetic_folder(a.classes, a.per_class, 4, a.size)
    out = workdir(a.workdir)
    print(f"{machine()}\n{a.model}, {a.size} px, batch {a.batch}, {a.classes * a.per_class} training images, "
          f"{a.epochs} epochs x {a.rounds} rounds, {workers} loader workers")
    tool_times, plain_times = [], []
    for r in range(a.rounds):
        _, rows = tool_run([
            f"data.root={root}", f"model.name={a.model}", "model.weights=null", "strategy=full",
            f"data.image_size={a.size}", f"data.batch_size={a.batch}", f"trainer.epochs={a.epochs}",
            f"data.num_workers={workers}", "augment=basic", "optimizer=adamw",
        ], out / f"tool-{r}")
        tool_times.append(median_after_first(float(row["train_seconds"]) for row in rows))
        plain_times.append(median_after_first(plain_train(root, a.model, size=a.size, batch_size=a.batch,
                                                          epochs=a.epochs, workers=workers)))
        print(f"round {r + 1}: tool {tool_times[-1]:.2f}s/epoch, plain {plain_times[-1]:.2f}s/epoch")
    tool, plain = min(tool_times), min(plain_times)
    images = (a.classes * a.per_class // a.batch) * a.batch
    print(table(["", "s/epoch", "img/s"], [["plain loop", plain, images / plain], ["finetune-cli", tool, images / tool]]))
    print(f"overhead: tool / plain = {tool / plain:.3f}   (target <= 1.05)")
    loader = loader_only(root, a.size, a.batch, workers)
    step = step_only(a.model, a.size, a.batch, a.classes, 3 if a.quick else 20)
    bound = "the model step" if step < loader else "the data loader"
    print(f"loader only: {loader:.0f} img/s ({workers} workers); model step only: {step:.0f} img/s -> bound by {bound}")


if __name__ == "__main__":
    main()
