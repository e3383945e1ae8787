"""``run``: one fine-tuning run, wired in plain order from typed config to files on disk."""

from __future__ import annotations

import json
import logging
import random
import resource
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
from torch import nn

from finetune_cli import ui
from finetune_cli.callbacks import Checkpointer, MetricsWriter, MetricTracker
from finetune_cli.checks import check
from finetune_cli.config import Amp, Config, DataSource, Device
from finetune_cli.data import Splits, image_folder_splits, make_loader, resolve_workers
from finetune_cli.engine import Precision, evaluate, train_one_epoch
from finetune_cli.errors import FinetuneError
from finetune_cli.io_utils import atomic_json
from finetune_cli.models import HeadSpec, count_params, create_model, resolve_weights
from finetune_cli.models.factory import preprocess_for
from finetune_cli.models.weights import WeightsChoice
from finetune_cli.optim import Schedule, build_optimizer, group_lrs, param_groups
from finetune_cli.paths import cache_dir
from finetune_cli.pretrain import synthetic_weights
from finetune_cli.strategies import apply_freezing, plan_rows, trainable_mask
from finetune_cli.synthetic import SyntheticSpec, generate
from finetune_cli.transforms import Preprocess, eval_transform, train_transform

log = logging.getLogger("finetune_cli")
CHECKPOINT_FORMAT = "finetune-cli/1"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(choice: Device) -> torch.device:
    if choice == Device.cuda and not torch.cuda.is_available():
        raise FinetuneError(
            "trainer.device=cuda, but no CUDA GPU is visible to PyTorch. Use trainer.device=auto "
            "(CUDA when present, else CPU) or trainer.device=cpu."
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


def peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS"


def load_data(cfg: Config, pre: Preprocess, cache: Path) -> Splits:
    train_tf = train_transform(pre, cfg.augment.name, hflip=cfg.augment.hflip, scale_min=cfg.augment.scale_min)
    if cfg.data.source == DataSource.synthetic:
        s = cfg.data.synthetic
        root = generate(
            SyntheticSpec("target", s.classes, s.train_per_class, s.val_per_class, s.image_size, s.seed), cache
        )
    else:
        root = Path(cfg.data.root)
    return image_folder_splits(
        root, train_tf, eval_transform(pre), val_fraction=cfg.data.val_fraction, seed=cfg.trainer.seed
    )


def run(cfg: Config, out_dir: Path, resolved: Dict[str, Any]) -> Dict[str, Any]:
    started = time.perf_counter()
    check(cfg)
    seed_everything(cfg.trainer.seed)
    device = pick_device(cfg.trainer.device)
    precision = pick_precision(cfg.trainer.amp, device)
    workers = resolve_workers(cfg.data.num_workers)
    cache = cache_dir(cfg.cache_dir)
    progress = ui.interactive()

    # weights and preprocessing, then data, then the model for its number of classes
    if cfg.model.weights == "synthetic":
        size = cfg.data.image_size or preprocess_for(cfg.model.name, WeightsChoice("none"), None).crop_size
        path = synthetic_weights(cfg.model.name, size, cache, device, precision, workers, progress)
        choice = WeightsChoice("file", path=path, label="synthetic: pretrained on the source task")
    else:
        choice = resolve_weights(cfg.model.name, cfg.model.weights)
    pre = preprocess_for(cfg.model.name, choice, cfg.data.image_size)
    splits = load_data(cfg, pre, cache)
    built = create_model(
        cfg.model.name,
        choice,
        len(splits.classes),
        head=HeadSpec(cfg.model.head, cfg.model.head_hidden, cfg.model.head_dropout),
        aux_logits=cfg.model.aux_logits,
        image_size=cfg.data.image_size,
        progress=progress,
    )
    model = built.model.to(device)
    atomic_json(splits.classes, out_dir / "classes.json")

    # strategy: what trains, and at which LR
    names = [g.name for g in built.groups]
    mask = trainable_mask(cfg.strategy.name, names, cfg.strategy.freeze_groups)
    apply_freezing(built.groups, mask, cfg.strategy.bn)
    lr = cfg.optimizer.lr * cfg.strategy.lr_scale
    optimizer = build_optimizer(
        cfg.optimizer, param_groups(built.groups, [lr] * len(names), cfg.optimizer.weight_decay)
    )
    trainable, total = count_params(model)
    rows = plan_rows(built.groups, mask, [lr] * len(names), cfg.strategy.bn)
    ui.show_plan(
        f"Plan: {cfg.model.name} ({built.weights}), strategy={cfg.strategy.name.value}, "
        f"{len(splits.classes)} classes, device={device.type}, precision={precision.name}",
        rows,
        trainable,
        total,
        built.notes + [f"Validation: {splits.val_source}; {len(splits.train)} train / {len(splits.val)} val images."],
    )
    summary: Dict[str, Any] = {
        "status": "planned" if cfg.plan else "running",
        "model": cfg.model.name,
        "weights": built.weights,
        "strategy": cfg.strategy.name.value,
        "dataset": {
            "name": cfg.data.source.value,
            "root": str(splits.root),
            "classes": len(splits.classes),
            "train_images": len(splits.train),
            "val_images": len(splits.val),
        },
        "device": device.type,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100.0 * trainable / max(total, 1),
        "groups": rows,
        "output_dir": str(out_dir),
    }
    if cfg.plan:
        atomic_json(summary, out_dir / "summary.json")
        return summary

    setup_seconds = time.perf_counter() - started
    pin = device.type == "cuda"
    bs = cfg.data.batch_size
    train_loader = make_loader(splits.train, batch_size=bs, num_workers=workers, train=True, seed=cfg.trainer.seed, pin_memory=pin)
    val_loader = make_loader(splits.val, batch_size=bs, num_workers=workers, train=False, seed=cfg.trainer.seed, pin_memory=pin)
    schedule = Schedule(
        cfg.schedule, optimizer, epochs=cfg.trainer.epochs, steps_per_epoch=len(train_loader), monitor=cfg.trainer.monitor
    )
    scaler = precision.scaler(device)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.trainer.label_smoothing)
    tracker = MetricTracker(cfg.trainer.monitor, cfg.trainer.patience, cfg.trainer.min_delta)
    metrics = MetricsWriter(out_dir / "metrics.csv")
    checkpoints = Checkpointer(out_dir / "checkpoints")
    identity = {  # what a checkpoint needs to be used on its own
        "model_name": cfg.model.name,
        "classes": splits.classes,
        "preprocess": pre.to_dict(),
        "config": resolved,
    }
    train_images = 0
    train_seconds = 0.0

    for epoch in range(1, cfg.trainer.epochs + 1):
        lrs = group_lrs(optimizer)  # the LRs this epoch starts with
        tr = train_one_epoch(
            model, train_loader, optimizer, criterion, device,
            step_schedule=schedule.step_batch, precision=precision, scaler=scaler,
            grad_clip=cfg.trainer.grad_clip, aux_weight=cfg.model.aux_weight,
            progress=progress, desc=f"epoch {epoch}/{cfg.trainer.epochs}",
        )
        va = evaluate(model, val_loader, criterion, device, precision=precision, progress=progress)
        monitored = va.acc if cfg.trainer.monitor.value == "val_acc" else va.loss
        schedule.step_epoch(monitored)
        improved = tracker.update(monitored, epoch)
        train_images += tr.images
        train_seconds += tr.seconds
        row: Dict[str, Any] = {
            "epoch": epoch,
            "train_loss": tr.loss,
            "train_acc": tr.acc,
            "val_loss": va.loss,
            "val_acc": va.acc,
            "lr": lrs[names[-1]],
            **{f"lr_{name}": value for name, value in lrs.items()},
            "epoch_seconds": tr.seconds + va.seconds,
            "train_images_per_s": tr.images_per_s,
            "trainable_params": trainable,
        }
        metrics.append(row)
        checkpoints.save(
            {
                "format": CHECKPOINT_FORMAT,
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "tracker": tracker.state_dict(),
                "metrics": row,
                **identity,
            },
            best=improved,
        )
        ui.show_epoch(row, cfg.trainer.epochs, improved)
        mem, mem_kind = peak_memory(device)
        summary.update(
            {
                "best": {"monitor": cfg.trainer.monitor.value, "value": tracker.best, "epoch": tracker.best_epoch},
                "epochs_run": epoch,
                "total_seconds": time.perf_counter() - started,
                "setup_seconds": setup_seconds,
                "train_seconds": train_seconds,
                "train_images_per_s": train_images / train_seconds if train_seconds else 0.0,
                "peak_memory_mb": mem,
                "peak_memory_kind": mem_kind,
            }
        )
        atomic_json(summary, out_dir / "summary.json")
        if tracker.should_stop:
            log.info(
                f"Early stopping: {cfg.trainer.monitor.value} did not improve by more than "
                f"{cfg.trainer.min_delta} for {tracker.patience} epochs."
            )
            summary["stopped_early"] = True
            break

    summary["status"] = "completed"
    summary["total_seconds"] = time.perf_counter() - started
    atomic_json(summary, out_dir / "summary.json")
    ui.show_result(summary)
    return summary


def mark_failed(out_dir: Path, error: BaseException) -> None:
    """Record a failure in summary.json, keeping whatever the run already wrote."""
    path = out_dir / "summary.json"
    summary: Dict[str, Any] = {}
    if path.is_file():
        try:
            summary = json.loads(path.read_text())
        except ValueError:
            summary = {}
    summary.update({"status": "failed", "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"})
    atomic_json(summary, path)


__all__: List[str] = ["run", "mark_failed"]
