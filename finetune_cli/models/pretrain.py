"""``model.weights=synthetic``: a backbone pretrained once on the synthetic *source* task.

The source task's classes are disjoint from the target task's (see ``synthetic.class_pool``),
so fine-tuning these weights on the target task shows real transfer without a download. Each
model is pretrained once, at the smallest image size it accepts, and the cached file serves every
image size: convolution weights do not depend on it, and a ViT's position embeddings are resized
when the file loads. The file's state dict holds no head, so fine-tuning
starts from a fresh target head; the source task's classifier is kept apart (``source_head``,
main head only) as the source head that EWC estimates its Fisher information through.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from finetune_cli.config import AugmentConfig, AugmentName, Monitor, ScheduleConfig, ScheduleName
from finetune_cli.data.folders import image_folder_splits, make_loader
from finetune_cli.data.synthetic import SyntheticSpec, generate
from finetune_cli.data.transforms import eval_transform, train_transform
from finetune_cli.io_utils import atomic_torch_save, waiting_lock
from finetune_cli.models.factory import create_model, head_prefixes, preprocess_for, smallest_input
from finetune_cli.models.weights import WeightsChoice
from finetune_cli.train.engine import Precision, evaluate, train_one_epoch
from finetune_cli.train.optim import Schedule, param_groups
from finetune_cli.train.shutdown import GracefulStop, Interrupted
from finetune_cli.ui import pct

log = logging.getLogger(__name__)

RECIPE_VERSION = 5  # 5: epochs shuffled by (seed, epoch), as fine-tuning now does
SOURCE = dict(classes=16, train_per_class=100, val_per_class=20, seed=1234)
EPOCHS = 8
LR = 2e-3
BATCH = 32
SCALE_MIN = 0.35
WARMUP = 1.0
BN_MOMENTUM = 0.1  # at least: several families ship 0.01 or less, too slow for a few hundred steps


def pretrain_size(model_name: str) -> int:
    """The image side the source task is rendered and trained at: the smallest the model takes."""
    return max(32, smallest_input(model_name))


def synthetic_weights_path(cache: Path, model_name: str) -> Path:
    recipe = json.dumps([RECIPE_VERSION, SOURCE, EPOCHS, LR, BATCH, SCALE_MIN, WARMUP, BN_MOMENTUM],
                        sort_keys=True).encode()
    digest = hashlib.sha1(recipe).hexdigest()[:8]
    return cache / "weights" / f"synthetic-{model_name}-{pretrain_size(model_name)}px-{digest}.pt"


def _quicker_norm_statistics(model: nn.Module) -> None:
    """BatchNorm running statistics that follow a short training run: a momentum of 0.01
    (MobileNetV3, EfficientNet-B5 to B7, MaxViT) or 0.0003 (MNASNet) leaves them near their initial
    values after a few hundred steps, so evaluation sits at chance while training learns."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is not None:
            module.momentum = max(module.momentum, BN_MOMENTUM)


def estimate_seconds(model_name: str, device: torch.device, precision: Precision) -> float:
    """About how long ``synthetic_weights`` would take here: one training step of a batch at
    the pretraining size is timed (after a warm-up step) and scaled to the whole recipe, validation included."""
    image_size = pretrain_size(model_name)
    with torch.random.fork_rng(devices=[]):
        built = create_model(model_name, WeightsChoice("none"), SOURCE["classes"], image_size=image_size)
        model = built.model.to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        x = torch.randn(BATCH, 3, image_size, image_size, device=device)
        y = torch.randint(0, SOURCE["classes"], (BATCH,), device=device)
        times = []
        for _ in range(2):
            started = time.perf_counter()
            with precision.autocast(device):
                out = model(x)
                logits = out[0] if isinstance(out, tuple) else out
                loss = nn.functional.cross_entropy(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - started)
    steps = EPOCHS * SOURCE["classes"] * SOURCE["train_per_class"] / BATCH
    return times[-1] * steps * 1.3  # validation and image decoding: about a third more


def synthetic_weights(
    model_name: str,
    cache: Path,
    device: torch.device,
    precision: Precision,
    num_workers: int,
    progress: bool,
) -> Path:
    path = synthetic_weights_path(cache, model_name)
    if path.is_file():
        return path
    with waiting_lock(path.with_name(path.name + ".lock"), f"Waiting for another process pretraining {model_name} "
                      f"(it holds {path}.lock); its weights will be used."):
        if path.is_file():
            return path
        return _pretrain(model_name, path, device, precision, num_workers, progress)


def _pretrain(model_name: str, path: Path, device: torch.device, precision: Precision, num_workers: int,
              progress: bool) -> Path:
    cache = path.parent.parent
    image_size = pretrain_size(model_name)
    spec = SyntheticSpec(task="source", image_size=image_size, **SOURCE)
    log.info(
        f"Pretraining {model_name} on the synthetic source task ({spec.classes} classes, disjoint "
        f"from the target task; {EPOCHS} epochs at {image_size}px, the smallest size it takes). This "
        f"happens once for every image size; the weights are cached at {path}."
    )
    root = generate(spec, cache)
    choice = WeightsChoice("none")
    pre = preprocess_for(model_name, choice, image_size)
    splits = image_folder_splits(
        root,
        train_transform(pre, AugmentConfig(name=AugmentName.basic, scale_min=SCALE_MIN)),
        eval_transform(pre),
        val_fraction=0.2,
        seed=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        built = create_model(model_name, choice, len(splits.classes), image_size=image_size)
        model = built.model.to(device)
        _quicker_norm_statistics(model)
        optimizer = torch.optim.AdamW(param_groups(built.groups, [LR] * len(built.groups), 0.05), lr=LR)
        # Small images decode faster than a worker process hands them over: at 32 px on 2 cores an
        # epoch took 4.7 s in the main process against 5.7 s with one worker.
        workers = 0 if image_size <= 64 else num_workers
        train_loader = make_loader(splits.train, batch_size=BATCH, num_workers=workers, train=True, seed=0)
        val_loader = make_loader(splits.val, batch_size=BATCH * 2, num_workers=workers, train=False, seed=0)
        schedule = Schedule(
            ScheduleConfig(name=ScheduleName.cosine, warmup_epochs=WARMUP),
            optimizer,
            epochs=EPOCHS,
            steps_per_epoch=len(train_loader),
            monitor=Monitor.val_acc,
        )
        criterion = nn.CrossEntropyLoss()
        scaler = precision.scaler(device)  # fp16 needs loss scaling, as in fine-tuning
        with GracefulStop() as stop:  # SIGTERM / Ctrl-C: stop after the current step, cache nothing
            for epoch in range(1, EPOCHS + 1):
                tr = train_one_epoch(
                    model, train_loader, optimizer, criterion, device,
                    step_schedule=schedule.step_batch, precision=precision, scaler=scaler,
                    aux_weight=0.3, progress=progress, desc=f"pretrain {epoch}/{EPOCHS}", should_stop=stop.requested,
                )
                va = evaluate(model, val_loader, criterion, device, precision=precision, should_stop=stop.requested)
                if stop.requested():
                    raise Interrupted(stop.signum, epoch, "synthetic pretraining epoch")
                log.info(
                    f"  source epoch {epoch:>2}/{EPOCHS}  train acc {pct(tr.acc, 5)}  "
                    f"val acc {pct(va.acc, 5)}  {tr.seconds + va.seconds:.1f}s"
                )
    heads = head_prefixes(built.family)
    full = {k: v.cpu() for k, v in model.state_dict().items()}
    state = {k: v for k, v in full.items() if not any(k.startswith(h) for h in heads)}
    source_head = {k: v for k, v in full.items() if k.startswith(built.family.head + ".")}
    atomic_torch_save({"model": state, "source_head": source_head, "source_val_acc": va.acc,
                       "source_classes": splits.classes}, path)
    return path
