"""GPU throughput: finetune-cli's CUDA defaults against a plain fp32 loop, full fine-tuning.

Model-bound: one batch of random 224 px tensors already on the GPU, trained on repeatedly, through
the tool's own training step (bf16 autocast, channels_last, cuDNN autotuning, TF32, fused AdamW;
optionally torch.compile) and through the plain loop (fp32, contiguous, foreach AdamW).
Loader-bound: a generated JPEG folder trained by the whole tool and by plain_loop.py.
Reference: NVIDIA's ResNet-50 AMP training recipe reports about 2,470 img/s on one A100 80GB.

    python benchmarks/bench_gpu.py                       # resnet50 and vit_b_16, needs CUDA
    python benchmarks/bench_gpu.py --compile             # adds trainer.compile=true
    python benchmarks/bench_gpu.py --quick --device cpu  # checks the script runs
"""

from __future__ import annotations

import time

import torch
from common import machine, parser, photo_folder, table, tool_run, workdir
from plain_loop import plain_train
from torch import nn

NVIDIA_A100_RESNET50_AMP = 2470.0  # img/s, NVIDIA DeepLearningExamples, ResNet-50 v1.5 AMP, 1x A100 80GB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_rate(name: str, batch: tuple, steps: int, device: torch.device) -> float:
    import torchvision

    model = torchvision.models.get_model(name, num_classes=1000).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = batch
    for i in range(steps + 3):
        if i == 3:
            _sync(device)
            start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _sync(device)
    return steps * x.size(0) / (time.perf_counter() - start)


def tool_rate(name: str, batch: tuple, steps: int, device: torch.device, compile_model: bool) -> float:
    """The tool's model, switches, optimizer and ``train_one_epoch`` over an in-memory batch."""
    from finetune_cli.config import Amp, BNMode, OptimizerConfig
    from finetune_cli.models import WeightsChoice, create_model
    from finetune_cli.runtime import pick_precision, speed_switches
    from finetune_cli.train.engine import train_one_epoch
    from finetune_cli.train.freezing import apply_freezing
    from finetune_cli.train.optim import build_optimizer, param_groups

    built = create_model(name, WeightsChoice("none"), 1000, image_size=batch[0].size(-1))
    channels_last = speed_switches(device, False, "auto")
    model = built.model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    apply_freezing(built.groups, [True] * len(built.groups), BNMode.frozen_eval)
    precision = pick_precision(Amp.auto, device)
    opt = build_optimizer(OptimizerConfig(lr=1e-4), param_groups(built.groups, [1e-4] * len(built.groups), 0.01),
                          fused=device.type == "cuda")
    step_model = torch.compile(model) if compile_model else model
    kwargs = dict(precision=precision, scaler=precision.scaler(device), channels_last=channels_last,
                  check_every=50 if device.type == "cuda" else 1)
    train_one_epoch(step_model, [batch] * 3, opt, nn.CrossEntropyLoss(), device, **kwargs)  # warm-up
    _sync(device)
    start = time.perf_counter()
    train_one_epoch(step_model, [batch] * steps, opt, nn.CrossEntropyLoss(), device, **kwargs)
    _sync(device)
    return steps * batch[0].size(0) / (time.perf_counter() - start)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--models", default="resnet50:256,vit_b_16:128", help="name:batch,...")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--folder-images", type=int, default=2048, help="JPEGs in the loader-bound folder")
    a = p.parse_args()
    if a.quick:
        a.models, a.size, a.steps, a.folder_images = "resnet18:4", 32, 2, 8
    device = torch.device(a.device)
    print(machine())
    rows = []
    for spec in a.models.split(","):
        name, bs = spec.split(":")
        x = torch.randn(int(bs), 3, a.size, a.size, device=device)
        y = torch.randint(0, 1000, (int(bs),), device=device)
        plain = plain_rate(name, (x, y), a.steps, device)
        tool = tool_rate(name, (x, y), a.steps, device, a.compile)
        ref = f"{tool / NVIDIA_A100_RESNET50_AMP:.2f}" if name == "resnet50" else "-"
        rows.append([name, "in-memory tensors", bs, f"{plain:.0f}", f"{tool:.0f}", f"{tool / plain:.2f}", ref])
        del x, y
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # loader-bound: the whole tool against plain_loop.py on a folder of ImageNet-sized JPEGs
    name, bs = a.models.split(",")[0].split(":")
    out = workdir(a.workdir)
    root = photo_folder(out / "jpegs", a.folder_images, 500, 375)
    _, metrics = tool_run([f"data.root={root}", f"model.name={name}", "model.weights=null", "strategy=full",
                           "data.val_fraction=0.1",
                           f"data.image_size={a.size}", f"data.batch_size={bs}", "trainer.epochs=2",
                           f"trainer.device={a.device}"] + (["trainer.compile=true"] if a.compile else []), out / "tool")
    from finetune_cli.data.folders import resolve_workers

    images = (a.folder_images // int(bs)) * int(bs) or a.folder_images
    tool = float(metrics[-1]["train_images_per_s"])
    plain_s = plain_train(root, name, size=a.size, batch_size=int(bs), epochs=2, workers=resolve_workers("auto"),
                          device=a.device)[-1]
    rows.append([name, "JPEG folder 500x375", bs, f"{images / plain_s:.0f}", f"{tool:.0f}",
                 f"{tool * plain_s / images:.2f}", "-"])
    print(table(["model", "input", "batch", "plain fp32 img/s", "finetune-cli img/s", "x plain", "x A100 recipe"], rows))
    print("targets: resnet50 in-memory >= 2.5x the plain fp32 loop; reference 2,470 img/s (A100, NVIDIA AMP recipe)")


if __name__ == "__main__":
    main()
