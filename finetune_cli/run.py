"""``run``: one fine-tuning run, wired in plain order from typed config to files on disk."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from finetune_cli import ui
from finetune_cli.train.callbacks import Checkpointer, MetricsWriter, MetricTracker
from finetune_cli.train.checkpoint import CHECKPOINT_FORMAT, read_checkpoint, resolve_checkpoint
from finetune_cli.checks import check
from finetune_cli.config import (
    Amp, AugmentName, BadImage, Config, DataSource, Device, LoggerName, Monitor, PreviewMode, RegularizerName,
)
from finetune_cli.data.checks import check_images, describe
from finetune_cli.data.folders import (
    Splits, class_files, image_folder, image_folder_splits, make_loader, resolve_workers, split_dirs,
)
from finetune_cli.train.engine import Precision, evaluate, train_one_epoch
from finetune_cli.train.features import (
    CacheDecision, FeatureLoader, FeatureStore, TailMismatch, cache_key, decide, extract, parse_switch, summary_of,
    train_blockers, updating_batchnorms,
)
from finetune_cli.train.memory import peak_memory, state_bytes
from finetune_cli.errors import FinetuneError
from finetune_cli.io_utils import atomic_json, atomic_write_bytes
from finetune_cli.train.mixing import make_mixer
from finetune_cli.models import BuiltModel, HeadSpec, count_params, create_model, resolve_weights
from finetune_cli.models.factory import head_prefixes, preprocess_for
from finetune_cli.models.groups import head_paths
from finetune_cli.models.tail import Tail, find_tail
from finetune_cli.models.weights import WeightsChoice
from finetune_cli.train.optim import Schedule, build_optimizer, group_lrs, layerwise_lrs, param_groups
from finetune_cli.paths import cache_dir
from finetune_cli.models.pretrain import synthetic_weights
from finetune_cli.data.preview import write_preview
from finetune_cli.train.regularizers import AnchorPenalty, estimate_fisher
from finetune_cli.train.strategies import Controller, apply_freezing, plan_rows
from finetune_cli.train.shutdown import GracefulStop, Interrupted
from finetune_cli.tblog import TensorBoardLogger
from finetune_cli.data.synthetic import SyntheticSpec, generate
from finetune_cli.data.transforms import Preprocess, decode_side, eval_transform, train_transform

log = logging.getLogger("finetune_cli")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (DataLoader workers derive their seeds from the loader's
    seeded generator); optionally demand deterministic algorithms."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic and torch.backends.cudnn.benchmark


def rng_state(loader_generator: torch.Generator) -> Dict[str, Any]:
    """Every random stream a run draws from, in a form ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)),
        "loader": loader_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any], loader_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    loader_generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def bad_images(cfg: Config, root: Path, cache: Path, out_dir: Path) -> frozenset:
    """Check every image before training; stop, or leave the bad ones out (data.on_bad_image)."""
    if not cfg.data.check_images:
        return frozenset()
    files = [f for d in split_dirs(root) for fs in class_files(d).values() for f in fs]
    started = time.perf_counter()
    result = check_images(files, cfg.data.max_image_pixels, cache)
    if not result.bad:
        log.info(f"Data check: {result.checked} images readable ({time.perf_counter() - started:.1f}s).")
        return frozenset()
    listing = describe(result.bad)
    if cfg.data.on_bad_image == BadImage.error:
        raise FinetuneError(
            f"{len(result.bad)} of {result.checked} images under {root} cannot be used:\n{listing}\n"
            "Fix or delete them, or set data.on_bad_image=skip to train without them. Nothing was trained."
        )
    lines = "".join(f"{path}\t{why}\n" for path, why in sorted(result.bad.items()))
    atomic_write_bytes(out_dir / "skipped_images.txt", lines.encode())
    log.warning(
        f"Skipping {len(result.bad)} of {result.checked} images (data.on_bad_image=skip; listed in "
        f"{out_dir / 'skipped_images.txt'}):\n{listing}"
    )
    return frozenset(result.bad)


def load_data(cfg: Config, pre: Preprocess, cache: Path, out_dir: Path) -> Splits:
    train_tf = train_transform(pre, cfg.augment)
    if cfg.data.source == DataSource.synthetic:
        s = cfg.data.synthetic
        root = generate(
            SyntheticSpec("target", s.classes, s.train_per_class, s.val_per_class, s.image_size, s.seed), cache
        )
    else:
        root = Path(cfg.data.root).expanduser()
        if not (root / "train").is_dir():
            image_folder_splits(root, None, None, val_fraction=0.5, seed=0)  # raises the layout error
    exclude = bad_images(cfg, root, cache, out_dir)
    sides = (decode_side(pre, cfg.augment), decode_side(pre)) if cfg.data.reduced_decode else (None, None)
    return image_folder_splits(
        root, train_tf, eval_transform(pre), val_fraction=cfg.data.val_fraction, seed=cfg.trainer.seed,
        exclude=exclude, decode_sides=sides,
    )


def load_resume(spec: str, model_name: str, classes: List[str]) -> Dict[str, Any]:
    path = resolve_checkpoint(spec, prefer="last.pt")
    ckpt = read_checkpoint(path)
    if ckpt["model_name"] != model_name or ckpt["classes"] != classes:
        raise FinetuneError(
            f"{path} was saved for {ckpt['model_name']} with classes {ckpt['classes'][:5]}..., but this run has "
            f"{model_name} with classes {classes[:5]}...: resume with the run's own model and data."
        )
    ckpt["path"] = str(path)
    return ckpt


@dataclass
class Setup:
    device: torch.device
    precision: Precision
    workers: int
    progress: bool
    splits: Splits
    built: BuiltModel
    pre: Preprocess
    channels_last: bool = False


def speed_switches(device: torch.device, deterministic: bool, channels_last: str) -> bool:
    """On CUDA: cuDNN autotuning (unless deterministic) and TF32 matmuls. Returns whether
    inputs and weights use the channels-last layout (trainer.channels_last; auto = on CUDA)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    choice = parse_switch(channels_last, "trainer.channels_last")
    return device.type == "cuda" if choice is None else choice


def prepare(cfg: Config, out_dir: Path) -> Setup:
    """Weights and preprocessing, then data, then the model sized for its classes."""
    device = pick_device(cfg.trainer.device)
    precision = pick_precision(cfg.trainer.amp, device)
    channels_last = speed_switches(device, cfg.trainer.deterministic, cfg.trainer.channels_last)
    workers = resolve_workers(cfg.data.num_workers)
    cache = cache_dir(cfg.cache_dir)
    progress = ui.interactive()
    if cfg.model.weights == "synthetic":
        size = cfg.data.image_size or preprocess_for(cfg.model.name, WeightsChoice("none"), None).crop_size
        path = synthetic_weights(cfg.model.name, size, cache, device, precision, workers, progress)
        choice = WeightsChoice("file", path=path, label="synthetic: pretrained on the source task")
    else:
        choice = resolve_weights(cfg.model.name, cfg.model.weights)
    pre = preprocess_for(cfg.model.name, choice, cfg.data.image_size)
    splits = load_data(cfg, pre, cache, out_dir)
    built = create_model(
        cfg.model.name,
        choice,
        len(splits.classes),
        head=HeadSpec(cfg.model.head, cfg.model.head_hidden, cfg.model.head_dropout),
        aux_logits=cfg.model.aux_logits,
        image_size=cfg.data.image_size,
        progress=progress,
    )
    built.model.to(device)
    if channels_last:
        built.model.to(memory_format=torch.channels_last)
    return Setup(device, precision, workers, progress, splits, built, pre, channels_last)


def build_regularizer(cfg: Config, s: Setup) -> Optional[AnchorPenalty]:
    reg = cfg.regularizer
    if reg.name == RegularizerName.none:
        return None
    heads = head_prefixes(s.built.family)
    backbone = [
        (n, p) for g in s.built.groups[:-1] for n, p in g.params if not any(n.startswith(h) for h in heads)
    ]
    if reg.name == RegularizerName.l2sp:
        return AnchorPenalty(backbone, reg.strength)
    if reg.fisher_root:
        data = image_folder(Path(reg.fisher_root).expanduser(), eval_transform(s.pre))
        where = f"source images in {reg.fisher_root}"
    else:
        data = s.splits.train
        where = "the target training images"
    loader = make_loader(data, batch_size=32, num_workers=s.workers, train=False, seed=0)
    started = time.perf_counter()
    fisher = estimate_fisher(s.built.model, backbone, (x for x, _ in loader), s.device, reg.fisher_samples)
    log.info(f"EWC: diagonal Fisher from {min(reg.fisher_samples, len(data))} of {where} "
             f"in {time.perf_counter() - started:.1f}s (mean {torch.cat([f.flatten() for f in fisher]).mean():.3e})")
    return AnchorPenalty(backbone, reg.strength, fisher)


def preview_augmentation(cfg: Config, out_dir: Path) -> Dict[str, Any]:
    """Write the augmentation preview and stop: no model, no download, no pretraining."""
    synthetic = cfg.model.weights == "synthetic"
    choice = WeightsChoice("none") if synthetic else resolve_weights(cfg.model.name, cfg.model.weights)
    pre = preprocess_for(cfg.model.name, choice, cfg.data.image_size)
    splits = load_data(cfg, pre, cache_dir(cfg.cache_dir), out_dir)
    path = write_preview(
        splits.train, splits.classes, pre, out_dir / "augment_preview.png",
        count=cfg.preview_images, seed=cfg.trainer.seed, mixer=make_mixer(cfg.augment, len(splits.classes)),
    )
    log.info(f"augment={cfg.augment.name.value}: {cfg.preview_images} training images as the model sees them "
             f"({pre.crop_size}px) written to {path}")
    summary = {"status": "previewed", "preview": str(path), "augment": cfg.augment.name.value, "output_dir": str(out_dir)}
    atomic_json(summary, out_dir / "summary.json")
    return summary


def interrupted(exc: Interrupted, summary: Dict[str, Any], out_dir: Path, command: str, started: float) -> Dict[str, Any]:
    """Record the interruption, say how to resume, and exit 130 (SIGINT) or 143 (SIGTERM)."""
    last = out_dir / "checkpoints" / "last.pt"
    summary.update({"status": "interrupted", "error": str(exc), "total_seconds": time.perf_counter() - started})
    atomic_json(summary, out_dir / "summary.json")
    if last.is_file():
        done = summary.get("epochs_run", 0)
        log.warning(
            f"Interrupted ({exc}); that epoch is abandoned. Epochs 1-{done} are saved in {last}. Resume with:\n"
            f"  {command} trainer.resume={last}"
        )
    else:
        log.warning(f"Interrupted ({exc}) before the first epoch ended: nothing to resume. Run again: {command}")
    raise SystemExit(exc.exit_code)


def show_plan(cfg: Config, s: Setup, controller: Controller, lrs: List[float], label: Optional[str],
              out_dir: Path, more_notes: List[str]) -> Dict[str, Any]:
    """Print the plan (groups, trainable, LRs, BN, timeline) and return the run's first summary."""
    splits = s.splits
    trainable, total = count_params(s.built.model)
    rows = plan_rows(s.built.groups, controller, [lr * controller.lr_mult for lr in lrs], cfg.strategy.bn)
    notes = list(s.built.notes)
    if controller.decision:
        notes.insert(0, f"auto strategy: {controller.decision['reason']} -> {controller.decision['chose']}")
    notes += [f"Timeline: {step}" for step in controller.timeline()]
    notes.append(f"Validation: {splits.val_source}; {len(splits.train)} train / {len(splits.val)} val images.")
    if cfg.regularizer.name != RegularizerName.none:
        notes.append(f"Regularizer: {cfg.regularizer.name.value} (strength {cfg.regularizer.strength:g}) on the backbone")
    notes += more_notes
    ui.show_plan(
        f"Plan: {cfg.model.name} ({s.built.weights}), strategy={label or controller.kind.value}, "
        f"{len(splits.classes)} classes, {controller.epochs} epochs, device={s.device.type}, precision={s.precision.name}"
        + (", channels_last" if s.channels_last else ""),
        rows, trainable, total, notes,
    )
    return {
        "status": "planned" if cfg.plan else "running",
        "model": cfg.model.name,
        "weights": s.built.weights,
        "strategy": label or cfg.strategy.name.value,
        "strategy_kind": controller.kind.value,
        "auto": controller.decision,
        "timeline": controller.timeline(),
        "regularizer": cfg.regularizer.name.value,
        "dataset": {
            "name": cfg.data.source.value,
            "root": str(splits.root),
            "classes": len(splits.classes),
            "train_images": len(splits.train),
            "val_images": len(splits.val),
        },
        "device": s.device.type,
        "precision": s.precision.name,
        "channels_last": s.channels_last,
        "compiled": cfg.trainer.compile,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100.0 * trainable / max(total, 1),
        "groups": rows,
        "events": [],
        "output_dir": str(out_dir),
    }


@dataclass
class TrainState:
    """Everything a checkpoint saves and a resume restores, in one place."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: Optional[torch.amp.GradScaler]
    tracker: MetricTracker
    controller: Controller
    loader_generator: torch.Generator

    def checkpoint(self, epoch: int, **extra: Any) -> Dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "tracker": self.tracker.state_dict(),
            "strategy": self.controller.state_dict(),
            "rng": rng_state(self.loader_generator),
            **extra,
        }

    def restore(self, ckpt: Dict[str, Any]) -> int:
        """Load a checkpoint; returns the first epoch still to run. The optimizer goes before the
        schedule, whose gate sits on the optimizer's LRs; the random streams go last."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["schedule"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.tracker.load_state_dict(ckpt["tracker"])
        self.controller.load_state_dict(ckpt["strategy"])
        set_rng_state(ckpt["rng"], self.loader_generator)
        return int(ckpt["epoch"]) + 1


def find_resume(cfg: Config, out_dir: Path, classes: List[str]) -> Optional[Dict[str, Any]]:
    """The checkpoint to continue from: trainer.resume, or with ``auto`` this folder's last.pt."""
    resume = cfg.trainer.resume
    if resume == "auto":
        own = out_dir / "checkpoints" / "last.pt"
        if not own.is_file():
            log.info(f"trainer.resume=auto: no checkpoint in {out_dir} yet, starting from epoch 1. (A resubmitted "
                     "job finds its own checkpoint when its folder is fixed: hydra.run.dir=...)")
            return None
        resume = str(own)
    return load_resume(resume, cfg.model.name, classes) if resume else None


def plan_cache(cfg: Config, s: Setup, tail: Tail, controller: Controller, tail_ok: bool = True) -> CacheDecision:
    """What data.cache_features gives this run (call with the freezing applied)."""
    model = s.built.model
    model.train()  # the modes training will see; frozen layers stay in eval
    random_augment = cfg.augment.name.value if cfg.augment.name != AugmentName.none else None
    mixing = cfg.augment.mixup_alpha > 0 or cfg.augment.cutmix_alpha > 0
    return decide(
        parse_switch(cfg.data.cache_features, "data.cache_features"),
        frozen_below_head=controller.max_k == 0,
        tail_ok=tail_ok,
        bn_updating=updating_batchnorms(model, tail),
        aux=len(head_paths(model, s.built.family)) > 1 and cfg.model.aux_logits,
        blockers=train_blockers(model, tail, random_augment=random_augment, mixing=mixing),
    )


def cached_features(s: Setup, tail: Tail, decision: CacheDecision, out_dir: Path, batch_size: int) -> Dict[str, Any]:
    """The frozen network's outputs for the splits the decision caches, from the run folder when
    they are there for the same weights, files and transform, else computed now."""
    store = FeatureStore(out_dir / "features")
    splits = {"train": s.splits.train} if decision.train else {}
    splits["val"] = s.splits.val
    parts = {}
    for name, data in splits.items():
        loader = make_loader(data, batch_size=batch_size, num_workers=s.workers, train=False, seed=0,
                             pin_memory=s.device.type == "cuda")
        key = cache_key(s.built.model, tail, data, s.precision)
        parts[name] = store.get(name, key, lambda: extract(s.built.model, tail, loader, s.device, s.precision,
                                                           s.progress, f"features ({name})"))
        f = parts[name]
        how = "read back from" if f.seconds == 0 else f"computed in {f.seconds:.1f}s into"
        log.info(f"Feature cache: {len(f.targets)} {name} images x {tuple(f.features.shape[1:])} {how} {f.path}")
    return parts


def run(
    cfg: Config,
    out_dir: Path,
    resolved: Dict[str, Any],
    label: Optional[str] = None,
    command: str = "finetune-cli",
) -> Dict[str, Any]:
    started = time.perf_counter()
    check(cfg)
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)
    if cfg.preview == PreviewMode.augment:
        return preview_augmentation(cfg, out_dir)
    s = prepare(cfg, out_dir)
    model, groups, splits = s.built.model, s.built.groups, s.splits
    atomic_json(splits.classes, out_dir / "classes.json")

    # strategy: which groups train when, and at which LR
    names = [g.name for g in groups]
    maximize = cfg.trainer.monitor == Monitor.val_acc
    controller = Controller(cfg.strategy, names, epochs=cfg.trainer.epochs,
                            images_per_class=splits.images_per_class, maximize=maximize)
    lrs = layerwise_lrs(cfg.optimizer.lr * cfg.strategy.lr_scale, len(groups), controller.lr_decay,
                        cfg.strategy.group_lrs)
    apply_freezing(groups, controller.mask(), cfg.strategy.bn)
    optimizer = build_optimizer(cfg.optimizer, param_groups(groups, lrs, cfg.optimizer.weight_decay),
                                fused=s.device.type == "cuda")
    tail = find_tail(model, s.built.family, groups)
    caching = plan_cache(cfg, s, tail, controller)
    summary = show_plan(cfg, s, controller, lrs, label, out_dir, [caching.describe(tail)])
    if cfg.plan:
        atomic_json(summary, out_dir / "summary.json")
        return summary

    # the loop's parts
    penalty = build_regularizer(cfg, s)
    tensorboard = TensorBoardLogger(out_dir / "tensorboard") if cfg.logger.name == LoggerName.tensorboard else None
    bs, pin, seed = cfg.data.batch_size, s.device.type == "cuda", cfg.trainer.seed
    train_loader = make_loader(splits.train, batch_size=bs, num_workers=s.workers, train=True, seed=seed, pin_memory=pin)
    val_loader = make_loader(splits.val, batch_size=bs, num_workers=s.workers, train=False, seed=seed, pin_memory=pin)
    schedule = Schedule(cfg.schedule, optimizer, epochs=controller.epochs, steps_per_epoch=len(train_loader),
                        monitor=cfg.trainer.monitor)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.trainer.label_smoothing)
    mixer = make_mixer(cfg.augment, len(splits.classes))
    tracker = MetricTracker(cfg.trainer.monitor, cfg.trainer.patience, cfg.trainer.min_delta)
    state = TrainState(model, optimizer, schedule, s.precision.scaler(s.device), tracker, controller,
                       train_loader.generator)
    metrics = MetricsWriter(out_dir / "metrics.csv")
    checkpoints = Checkpointer(out_dir / "checkpoints")
    identity = {"model_name": cfg.model.name, "classes": splits.classes, "preprocess": s.pre.to_dict(), "config": resolved}
    rewarmup_steps = int(round(cfg.strategy.rewarmup_epochs * len(train_loader)))

    start = 1
    ckpt = find_resume(cfg, out_dir, splits.classes)
    if ckpt:
        start = state.restore(ckpt)
        apply_freezing(groups, controller.mask(), cfg.strategy.bn)
        for row in ckpt.get("history", []):
            metrics.append(row)
        summary["events"] = ckpt.get("events", [])
        summary["resumed_from"] = ckpt["path"]
        log.info(f"Resumed from {ckpt['path']} after epoch {ckpt['epoch']}: {controller.describe_k(controller.k)} train.")

    # what the epochs run on: the whole model over images, or the tail over cached features
    step_model: nn.Module = torch.compile(model) if cfg.trainer.compile else model
    train_iter: Any = train_loader
    val_model, val_iter = step_model, val_loader
    if caching.val:
        try:
            parts = cached_features(s, tail, caching, out_dir, bs)
        except TailMismatch as exc:
            log.warning(f"Feature cache off: {exc}.")
            caching = plan_cache(cfg, s, tail, controller, tail_ok=False)
            parts = {}
        if "train" in parts:
            step_model = tail.module
            train_iter = FeatureLoader(parts["train"], s.device, batch_size=bs, shuffle=True,
                                       generator=train_loader.generator, drop_last=train_loader.drop_last)
        if "val" in parts:
            val_model = tail.module
            val_iter = FeatureLoader(parts["val"], s.device, batch_size=bs, shuffle=False,
                                     generator=torch.Generator(), drop_last=False)
        summary["feature_cache"] = summary_of(caching, tail, parts)
    else:
        summary["feature_cache"] = summary_of(caching, tail, {})
    model.train()
    setup_seconds = time.perf_counter() - started
    train_images, train_seconds = 0, 0.0
    held: Dict[str, int] = {}
    check_every = 50 if s.device.type == "cuda" else 1

    stop = GracefulStop()
    try:
        with stop:
            for epoch in range(start, controller.epochs + 1):
                # the strategy's phase for this epoch
                events = controller.begin_epoch(epoch)
                if events:
                    apply_freezing(groups, controller.mask(), cfg.strategy.bn)
                    if rewarmup_steps:
                        schedule.rewarmup(rewarmup_steps)
                schedule.set_multiplier(controller.lr_mult)
                lrs_now = group_lrs(optimizer)  # the LRs this epoch starts with
                trainable_now = count_params(model)[0]
                for event in events:
                    log.info(f"epoch {epoch}: {event}")

                # train and validate
                try:
                    tr = train_one_epoch(
                        step_model, train_iter, optimizer, criterion, s.device,
                        step_schedule=schedule.step_batch, precision=s.precision, scaler=state.scaler,
                        grad_clip=cfg.trainer.grad_clip, aux_weight=cfg.model.aux_weight, penalty=penalty, mix=mixer,
                        should_stop=stop.requested, progress=s.progress, desc=f"epoch {epoch}/{controller.epochs}",
                        channels_last=s.channels_last, check_every=check_every,
                    )
                    now = state_bytes(model, optimizer)
                    held = {k: max(v, held.get(k, 0)) for k, v in now.items()}
                    va = evaluate(val_model, val_iter, criterion, s.device, precision=s.precision,
                                  should_stop=stop.requested, progress=s.progress, channels_last=s.channels_last)
                except RuntimeError:
                    if stop.requested():  # loader workers got the signal too
                        raise Interrupted(stop.signum, epoch) from None
                    raise
                if tr.interrupted or va.interrupted:
                    raise Interrupted(stop.signum, epoch)
                monitored = va.acc if maximize else va.loss
                if not math.isfinite(monitored):
                    raise FinetuneError(
                        f"The validation {cfg.trainer.monitor.value} became {monitored} at epoch {epoch}. Lower "
                        "optimizer.lr or set trainer.grad_clip; the checkpoints of earlier epochs are kept."
                    )

                # bookkeeping: schedule, best metric, the strategy's next phase
                schedule.step_epoch(monitored)
                improved = tracker.update(monitored, epoch)
                after = controller.end_epoch(epoch, monitored, model)
                if after:
                    apply_freezing(groups, controller.mask(), cfg.strategy.bn)
                    schedule.set_multiplier(controller.lr_mult)
                    if rewarmup_steps and any(e.startswith(("unfroze", "stage")) for e in after):
                        schedule.rewarmup(rewarmup_steps)
                train_images += tr.images
                train_seconds += tr.seconds

                # files: metrics.csv, checkpoints, summary.json
                row: Dict[str, Any] = {
                    "epoch": epoch,
                    "train_loss": tr.loss,
                    "train_acc": tr.acc,
                    "val_loss": va.loss,
                    "val_acc": va.acc,
                    "lr": lrs_now[names[-1]],
                    **{f"lr_{name}": lrs_now[name] for name in names},
                    "epoch_seconds": tr.seconds + va.seconds,
                    "train_seconds": tr.seconds,
                    "train_images_per_s": tr.images_per_s,
                    "trainable_params": trainable_now,
                    "trainable_groups": controller.k,
                    "events": "; ".join(events + after),
                }
                metrics.append(row)
                if tensorboard is not None:
                    tensorboard.log_epoch(row)
                summary["events"] += [{"epoch": epoch, "event": e} for e in events + after]
                saved = state.checkpoint(epoch, metrics=row, history=metrics.rows, events=summary["events"], **identity)
                checkpoints.save(saved, best=improved)
                if cfg.trainer.save_every and epoch % cfg.trainer.save_every == 0:
                    checkpoints.keep_as(f"epoch_{epoch:03d}.pt")
                ui.show_epoch(row, controller.epochs, improved)
                for event in after:
                    log.info(f"after epoch {epoch}: {event}")
                mem, mem_kind = peak_memory(s.device)
                summary.update(
                    {
                        "best": {"monitor": cfg.trainer.monitor.value, "value": tracker.best, "epoch": tracker.best_epoch},
                        "epochs_run": epoch,
                        "trainable_params_final": trainable_now,
                        "total_seconds": time.perf_counter() - started,
                        "setup_seconds": setup_seconds,
                        "train_seconds": train_seconds,
                        "train_images_per_s": train_images / train_seconds if train_seconds else 0.0,
                        "peak_memory_mb": mem,
                        "peak_memory_kind": mem_kind,
                        "memory_mb": {k: v / 2**20 for k, v in held.items()},
                        "grad_optimizer_mb": (held["grads"] + held["optimizer_state"]) / 2**20,
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
                if controller.finished:
                    summary["stopped_early"] = True
                    break
    except Interrupted as exc:
        if tensorboard is not None:
            tensorboard.close()
        return interrupted(exc, summary, out_dir, command, started)

    if tensorboard is not None:
        tensorboard.close()
    if "best" not in summary:
        raise FinetuneError(
            f"Nothing to train: the checkpoint is from epoch {start - 1} of {controller.epochs}. "
            "Raise trainer.epochs to train further."
        )
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
