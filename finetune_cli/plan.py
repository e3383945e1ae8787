"""The plan printed before training: layer groups with their status, LR and BatchNorm mode,
the strategy's timeline, and the run's first summary."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from finetune_cli import ui
from finetune_cli.build import Parts
from finetune_cli.config import AdaptName, BNMode, Config, Monitor, RegularizerName, StrategyName
from finetune_cli.models import count_params
from finetune_cli.models.lora import is_lora_param, lora_count, shapes
from finetune_cli.train.balance import balance_note
from finetune_cli.train.freezing import also_trained, bn_frozen_for, has_batchnorm
from finetune_cli.train.recipe import Recipe


def unfreeze_epoch(recipe: Recipe, group_index: int) -> Optional[int]:
    """For epoch-triggered progressive runs: the epoch a group starts training."""
    if not recipe.progressive_by_epochs or group_index == recipe.below:
        return None
    j = recipe.below - group_index  # the j-th group from the top
    if j > recipe.until:
        return None
    return 1 + j * recipe.every


def timeline(recipe: Recipe) -> List[str]:
    below, names = recipe.below, recipe.names
    if recipe.kind == StrategyName.progressive:
        if recipe.progressive_by_epochs:
            return ["epoch 1: head only"] + [
                f"epoch {1 + j * recipe.every}: +{names[below - j]}"
                for j in range(1, recipe.until + 1)
                if 1 + j * recipe.every <= recipe.epochs
            ]
        return ["head only at first"] + [
            f"on a plateau of {recipe.plateau_patience} epoch(s): +{names[below - j]}" for j in range(1, recipe.until + 1)
        ]
    return [
        f"stage {i + 1} (epochs {s.first_epoch}-{s.last_epoch}): {recipe.describe_k(s.k)}, lr x{s.lr_mult:g}"
        + (f", early stop after {s.patience} flat epochs" if s.patience is not None else "")
        for i, s in enumerate(recipe.stages)
    ]


def plan_rows(parts: Parts, bn_mode: BNMode) -> List[dict]:
    """One row per layer group for the plan table and summary.json."""
    recipe, mask = parts.recipe, parts.controller.mask()
    lrs = [lr * parts.controller.lr_mult for lr in parts.lrs]
    rows = []
    last = len(mask) - 1
    for i, (group, on, lr) in enumerate(zip(parts.built.groups, mask, lrs)):
        later = unfreeze_epoch(recipe, i)
        extra = set() if on else also_trained(group, recipe.also)
        lora = lora_count(group) if recipe.only == "lora" and i < last else None
        if lora == 0:
            status, on = "frozen (no LoRA layer)", False
        elif on and lora:
            status = f"LoRA only ({lora:,})"
        elif on:
            status = "train"
        elif extra:
            count = sum(p.numel() for _, p in group.params if id(p) in extra)
            status = f"{'biases' if recipe.also == 'bias' else 'norm layers'} only ({count:,})"
            on = True  # for its BatchNorm mode
        elif later is not None and later <= recipe.epochs:
            status = f"{'LoRA ' if lora else ''}from epoch {later}"
        else:
            status = "frozen"
        bn = "-" if not has_batchnorm(group) else ("eval" if bn_frozen_for(bn_mode, on, head=i == last) else "train")
        rows.append({"group": group.name, "params": group.num_params, "status": status, "lr": f"{lr:.2e}", "bn": bn})
    return rows


def notes(cfg: Config, parts: Parts) -> List[str]:
    recipe, splits = parts.recipe, parts.splits
    out = list(parts.built.notes)
    if recipe.decision:
        out.insert(0, f"auto strategy: {recipe.decision['reason']} -> {recipe.decision['chose']}")
    out += [f"Timeline: {step}" for step in timeline(recipe)]
    out += lora_notes(parts, cfg.strategy.bn)
    unused = " (data.val_fraction is not used: the val/ folder is the validation set)" if splits.val_source.startswith("val/") else ""
    out.append(f"Validation: {splits.val_source}; {len(splits.train)} train / {len(splits.val)} val images{unused}.")
    t = cfg.trainer
    out.append(balance_note(splits.classes, parts.counts["train"], parts.counts["val"], cfg.data.sampler,
                            t.class_weights, t.monitor.value))
    if parts.ema is not None:
        out.append(ema_text(t.ema, t.ema_warmup, t.monitor, recipe.epochs * -(-len(parts.train_loader) // parts.settings.accumulate),
                            parts.model))
    if splits.target is not None:
        out.append(adapt_text(cfg, parts))
    if cfg.regularizer.name != RegularizerName.none:
        out.append(f"Regularizer: {cfg.regularizer.name.value} (strength {cfg.regularizer.strength:g}) on the backbone, "
                   "in place of its weight decay (the head keeps optimizer.weight_decay)")
    out += parts.notes
    out.append(parts.caching.describe(parts.tail))
    return out


def ema_text(decay: float, warmup: bool, monitor: Monitor, updates: int, model: Any) -> str:
    """What trainer.ema does in this run, and whether its decay suits the run's length."""
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    span = 1 / (1 - decay)
    text = (f"EMA of the weights (trainer.ema={decay:g}): updated after each of the run's {updates} optimizer steps, "
            f"averaging over about the last {span:.0f}"
            + (", its decay ramped in as min(ema, (1+n)/(10+n))" if warmup else "")
            + f"; evaluated every epoch as ema_val_*; {size:.0f} MB more memory. "
            + (f"best.pt is chosen by {monitor.value} and serves the average's weights."
               if monitor.of_ema else f"best.pt is chosen by {monitor.value} (the weights, not the average); "
               f"trainer.monitor=ema_{monitor.value} chooses and serves the average."))
    if span > updates / 2:
        text += (f" The average spans more steps than half the run: it lags behind training; a decay near "
                 f"{1 - 10 / max(updates, 20):.3g} suits {updates} steps.")
    return text


def adapt_text(cfg: Config, parts: Parts) -> str:
    """The target domain, and what adapt= does with it."""
    a, adapting = cfg.adapt, parts.adaptation
    where = f"Target domain: {parts.splits.target.describe()}"
    if adapting is None:
        return f"{where}. adapt=none: training sees the labelled data alone (the source-only baseline)."
    ramp = ", ramped in by 2/(1+exp(-10p))-1" if a.ramp else ""
    if a.name == AdaptName.dann:
        critic = sum(p.numel() for p in adapting.critic.parameters())
        how = (f"adapt=dann: a domain classifier ({a.hidden}-{a.hidden}-1, {critic:,} params, at the head's LR) on the "
               f"head's input through a gradient reversal layer (weight {a.weight:g}{ramp})")
    else:
        how = f"adapt=mmd: multi-kernel MMD (5 Gaussian kernels) on the head's input, weight {a.weight:g}{ramp}"
    return f"{where}. {how}. Each batch: {cfg.data.batch_size} labelled + {cfg.data.batch_size} target images."


def lora_summary(parts: Parts) -> Optional[Dict[str, Any]]:
    """The LoRA layers of the run, for the plan and summary.json; None without LoRA."""
    adapted = parts.built.lora
    if adapted is None:
        return None
    params = sum(p.numel() for n, p in parts.model.named_parameters() if is_lora_param(n))
    total = sum(p.numel() for p in parts.model.parameters())
    return {"rank": adapted.rank, "alpha": adapted.alpha, "scale": adapted.scale, "dropout": adapted.dropout,
            "targets": adapted.where, "layers": len(adapted.modules) + len(adapted.parameters), "params": params,
            "pct_of_model": 100.0 * params / max(total, 1), "base_params": total - params}


def lora_notes(parts: Parts, bn_mode: BNMode) -> List[str]:
    """What LoRA adds: rank, layers, parameters and their shapes, and what BatchNorm does."""
    info = lora_summary(parts)
    if info is None:
        return []
    where = "every group" if info["targets"] == "all" else "the upper half of the groups"
    out = [
        f"LoRA (peft): rank {info['rank']}, alpha {info['alpha']:g} (updates scaled by {info['scale']:g}), dropout "
        f"{info['dropout']:g}, on {info['layers']} layers in {where} below the head (strategy.lora_targets="
        f"{info['targets']}): {info['params']:,} parameters, {info['pct_of_model']:.2f}% of the model "
        f"({info['base_params']:,} without them). The weights they adapt stay frozen; the head trains fully.",
        "LoRA matrices by adapted weight: " + "; ".join(shapes(parts.model)),
    ]
    if any(has_batchnorm(g) for g in parts.built.groups[:-1]):
        how = {BNMode.train: "follow the target data (as the adapted layers change)",
               BNMode.frozen_eval: "follow the target data in groups whose LoRA trains, and stay as pretrained elsewhere",
               BNMode.freeze_all: "stay as pretrained"}[bn_mode]
        out.append(f"BatchNorm with LoRA: scale and shift stay as pretrained; the running statistics {how} "
                   f"(strategy.bn={bn_mode.value}).")
    return out


def batch_text(world: Any, batch_size: int, accumulate: int = 1, scaling: Any = None) -> str:
    """With several processes or accumulated batches: the batch each process takes, the batch of
    one optimizer step (the effective batch), and whether the LRs were scaled for several
    processes (optimizer.scale_lr)."""
    if not world.distributed and accumulate == 1:
        return ""
    effective = batch_size * world.size * accumulate
    each = f"batch {batch_size} per process" if world.distributed else f"batch {batch_size}"
    summed = f" x {accumulate} accumulated (trainer.accumulate)" if accumulate > 1 else ""
    out = f", {world.size} processes" if world.distributed else ""
    out += f", {each}{summed}, effective batch {effective} per optimizer step"
    if world.distributed:
        out += f", LRs x{world.size} (optimizer.scale_lr=linear)" if getattr(scaling, "value", scaling) == "linear" \
            else ", LRs as given (optimizer.scale_lr=none)"
    return out


def show_plan(cfg: Config, parts: Parts, label: Optional[str], out_dir: Any) -> Dict[str, Any]:
    """Print the plan and return the run's first summary."""
    env, splits, recipe = parts.env, parts.splits, parts.recipe
    trainable, total = count_params(parts.model)
    rows = plan_rows(parts, cfg.strategy.bn)
    ui.show_plan(
        f"Plan: {cfg.model.name} ({parts.built.weights}), strategy={label or recipe.kind.value}, "
        f"{len(splits.classes)} classes, {recipe.epochs} epochs, device={env.device.type}, precision={env.precision.name}"
        + (", channels_last" if env.channels_last else "") + batch_text(env.world, cfg.data.batch_size, cfg.trainer.accumulate,
                                                                  cfg.optimizer.scale_lr),
        rows, trainable, total, notes(cfg, parts),
    )
    return {
        "model": cfg.model.name,
        "weights": parts.built.weights,
        "strategy": label or cfg.strategy.name.value,
        "strategy_kind": recipe.kind.value,
        "auto": recipe.decision,
        "timeline": timeline(recipe),
        "regularizer": cfg.regularizer.name.value,
        "adapt": cfg.adapt.name.value,
        "schedule": parts.schedule_name,
        "dataset": {
            "name": cfg.data.source.value,
            "root": str(splits.root),
            "classes": len(splits.classes),
            "train_images": len(splits.train),
            "val_images": len(splits.val),
            "class_counts": {split: dict(zip(splits.classes, counts)) for split, counts in parts.counts.items()},
            **({"target_root": str(splits.target.root), "target_train_images": len(splits.target.train),
                "target_val_images": len(splits.target.val) if splits.target.val is not None else 0}
               if splits.target is not None else {}),
        },
        "device": env.device.type,
        "placement": placement(),
        "processes": env.world.size,
        "global_batch_size": cfg.data.batch_size * env.world.size,
        "effective_batch_size": cfg.data.batch_size * env.world.size * cfg.trainer.accumulate,
        "precision": env.precision.name,
        "channels_last": env.channels_last,
        "compiled": cfg.trainer.compile,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100.0 * trainable / max(total, 1),
        "groups": rows,
        "lora": lora_summary(parts),
        "output_dir": str(out_dir),
    }


def placement() -> Dict[str, Any]:
    """Where this process ran: the GPUs it could see, its cores and torch threads (a sweep's
    parallel jobs each get their own)."""
    import os

    import torch

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "cores": cores,
            "threads": torch.get_num_threads()}

