"""``build``: every object a run needs, made from the typed config in plain order —
runtime, weights, data, model, strategy, optimizer, schedule, loaders, regularizer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from finetune_cli import ui
from finetune_cli.config import (
    AdaptConfig,
    AdaptName,
    AugmentName,
    Config,
    LoraSave,
    LRScaling,
    Monitor,
    RegularizerConfig,
    RegularizerName,
    SamplerName,
    ScheduleConfig,
    StrategyConfig,
)
from finetune_cli.data.folders import Splits, class_counts, image_folder, make_loader, resolve_workers
from finetune_cli.data.loading import load_data
from finetune_cli.data.transforms import Preprocess, eval_transform
from finetune_cli.errors import FinetuneError
from finetune_cli.models import BuiltModel, HeadSpec, create_model, resolve_weights
from finetune_cli.models.factory import load_weights_file, preprocess_for
from finetune_cli.models.groups import head_paths, layer_groups
from finetune_cli.models.lora import LoraSettings, adapt, check_reach, digest, left_out_keys
from finetune_cli.models.pretrain import estimate_seconds, synthetic_weights, synthetic_weights_path
from finetune_cli.models.tail import Tail, find_tail
from finetune_cli.models.weights import WeightsChoice, hub_file
from finetune_cli.paths import cache_dir
from finetune_cli.record import Recorder
from finetune_cli.runtime import pick_device, pick_precision, speed_switches
from finetune_cli.train.adapt import Adaptation
from finetune_cli.train.balance import loss_weights
from finetune_cli.train.callbacks import MetricTracker
from finetune_cli.train.checkpoint import TrainState
from finetune_cli.train.ema import WeightAverage, ema_for
from finetune_cli.train.engine import Precision
from finetune_cli.train.features import CacheDecision, decide, parse_switch, train_blockers, updating_batchnorms
from finetune_cli.train.memory import reset_peak_memory
from finetune_cli.train.mixing import BatchMixer, make_mixer
from finetune_cli.train.optim import Schedule, build_optimizer, layerwise_lrs, param_groups
from finetune_cli.train.recipe import Recipe, resolve
from finetune_cli.train.regularizers import AnchorPenalty, backbone_params, fisher_with_source_head
from finetune_cli.train.strategies import Controller
from finetune_cli.train.syncbn import sync_batchnorms, sync_bn_problem
from finetune_cli.world import World, from_env, join

log = logging.getLogger("finetune_cli")


@dataclass(frozen=True)
class Env:
    """Where and how the run computes."""

    device: torch.device
    precision: Precision
    channels_last: bool
    workers: int
    progress: bool
    cache: Path
    world: World = World()  # this process among the run's processes (data-parallel training)


@dataclass(frozen=True)
class FitSettings:
    """The trainer's settings that the epoch loop reads."""

    monitor: Monitor
    grad_clip: Optional[float]
    aux_weight: float
    rewarmup_steps: int
    save_every: int
    compile: bool
    batch_size: int
    accumulate: int = 1  # batches per optimizer step

    @property
    def maximize(self) -> bool:
        return self.monitor.maximize


@dataclass
class Parts:
    env: Env
    splits: Splits
    built: BuiltModel
    pre: Preprocess
    recipe: Recipe
    controller: Controller
    lrs: List[float]  # each group's LR before the strategy's multiplier, stem first
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    state: TrainState
    tail: Tail
    caching: CacheDecision
    criterion: nn.Module  # training loss (label smoothing); validation uses plain cross-entropy
    mixer: Optional[BatchMixer]
    penalty: Optional[AnchorPenalty]
    settings: FitSettings
    identity: Dict[str, Any]  # what every checkpoint says about the run
    notes: List[str] = field(default_factory=list)
    schedule_name: str = ""
    adaptation: Optional[Adaptation] = None  # adapt=dann|mmd: the target batches and the domain loss
    target_val_loader: Optional[torch.utils.data.DataLoader] = None  # the target domain's labelled val/
    ema: Optional[WeightAverage] = None  # trainer.ema: the weights' moving average
    counts: Dict[str, List[int]] = field(default_factory=dict)  # images per class: {"train": [...], "val": [...]}

    @property
    def model(self) -> nn.Module:
        return self.built.model


def environment(cfg: Config) -> Env:
    world = from_env()
    device = pick_device(cfg.trainer.device)
    if device.type == "cuda" and world.distributed:
        device = torch.device("cuda", world.local_rank)
    join(world, device.type)
    reset_peak_memory(device)  # this run's peak, not the process's (a sweep runs jobs in one process)
    return Env(
        device=device,
        precision=pick_precision(cfg.trainer.amp, device),
        channels_last=speed_switches(device, cfg.trainer.deterministic, cfg.trainer.channels_last),
        workers=resolve_workers(cfg.data.num_workers),
        progress=ui.interactive() and world.main,
        cache=cache_dir(cfg.cache_dir),
        world=world,
    )


def weights_choice(cfg: Config, env: Env) -> WeightsChoice:
    """model.weights resolved; ``synthetic`` pretrains once on the source task (cached)."""
    name = cfg.model.name
    if cfg.model.weights != "synthetic":
        return resolve_weights(name, cfg.model.weights)
    path = synthetic_weights(name, env.cache, env.device, env.precision, env.workers, env.progress)
    return WeightsChoice("file", path=path, label="synthetic: pretrained on the source task")


def planned_weights(cfg: Config, env: Env) -> WeightsChoice:
    """For a plan, which never trains or downloads: the weights when they are already here, else
    random init of the same architecture, labelled with what a run would do first."""
    name, spec = cfg.model.name, cfg.model.weights
    if spec == "synthetic":
        path = synthetic_weights_path(env.cache, name)
        if path.is_file():
            return WeightsChoice("file", path=path, label="synthetic: pretrained on the source task")
        seconds = estimate_seconds(name, env.device, env.precision)
        return WeightsChoice("none", label=f"synthetic, not pretrained yet: a run pretrains them first, about "
                                           f"{seconds:.0f}s here, once (cached in {path.parent})")
    choice = resolve_weights(name, spec)
    if choice.kind == "torchvision" and not hub_file(choice.torchvision).is_file():
        size = choice.torchvision.meta.get("_file_size")
        return WeightsChoice("none", label=f"{choice.describe()}, not downloaded yet: a run downloads them first"
                                           + (f" ({size:.0f} MB)" if size else ""))
    return choice


def lora_settings(st: StrategyConfig) -> Optional[LoraSettings]:
    """strategy.lora_*, or None without LoRA."""
    return LoraSettings(st.lora_rank, st.lora_alpha, st.lora_dropout, st.lora_targets.value) if st.lora else None


def model_for(cfg: Config, choice: WeightsChoice, classes: List[str], env: Env) -> BuiltModel:
    m = cfg.model
    built = create_model(m.name, choice, len(classes), head=HeadSpec(m.head, m.head_hidden, m.head_dropout),
                         aux_logits=m.aux_logits, image_size=cfg.data.image_size, progress=env.progress)
    lora = lora_settings(cfg.strategy)
    if lora is not None:
        adapt(built, lora)
    built.model.to(env.device)
    if env.channels_last:
        built.model.to(memory_format=torch.channels_last)
    if cfg.trainer.sync_bn:
        synchronise_batchnorms(built, env)
    return built


def synchronise_batchnorms(built: BuiltModel, env: Env) -> None:
    """trainer.sync_bn=true: with several processes, every BatchNorm computes its statistics over
    the global batch (before the strategy freezes anything; those held in eval, strategy.bn=frozen_eval
    or freeze_all, exchange nothing). With one process there is nothing to share, and the note says so."""
    if not env.world.distributed:
        built.notes.append("trainer.sync_bn=true changes nothing with one process: BatchNorm already sees the "
                           "whole batch.")
        return
    problem = sync_bn_problem(env.world.size, env.device.type)
    if problem:
        raise FinetuneError(problem)
    count = sync_batchnorms(built.model)
    built.groups = layer_groups(built.model, built.family)  # the groups hold the new modules
    built.notes.append(f"BatchNorm synchronised: {count} layers compute their training statistics over the global "
                       f"batch of {env.world.size} processes (trainer.sync_bn=true); those held in eval keep their statistics.")


def regularizer(reg: RegularizerConfig, built: BuiltModel, backbone: list, splits: Splits, pre: Preprocess,
                env: Env) -> Optional[AnchorPenalty]:
    """L2-SP or EWC on the backbone. EWC's Fisher is estimated through the source task's own
    classifier (the pretrained head before replacement), as the method defines it."""
    if reg.name == RegularizerName.none:
        return None
    if reg.name == RegularizerName.l2sp:
        return AnchorPenalty(backbone, reg.strength)
    if reg.fisher_root:
        data = image_folder(Path(reg.fisher_root).expanduser(), eval_transform(pre))
        where = f"source images in {reg.fisher_root}"
    else:
        data, where = splits.train, "the target training images"
    loader = make_loader(data, batch_size=32, num_workers=env.workers, train=False, seed=0)
    started = time.perf_counter()
    fisher = fisher_with_source_head(built.model, built.family, built.source_head, backbone, (x for x, _ in loader),
                                     env.device, reg.fisher_samples, weights=built.weights)
    log.info(f"EWC: diagonal Fisher through the source head from {min(reg.fisher_samples, len(data))} of {where} "
             f"in {time.perf_counter() - started:.1f}s (mean {torch.cat([f.flatten() for f in fisher]).mean():.3e})")
    return AnchorPenalty(backbone, reg.strength, fisher)


def schedule_config(cfg: Config) -> Tuple[ScheduleConfig, str]:
    """The schedule, with the strategy's own where it needs one (strategy.schedule), and in words."""
    sc, wanted = cfg.schedule, cfg.strategy.schedule
    if wanted is None or wanted == sc.name:
        return sc, f"Schedule: {sc.name.value}."
    return replace(sc, name=wanted), (
        f"Schedule: {wanted.value}, which the strategy needs (strategy.schedule={wanted.value}); it replaces "
        f"schedule={sc.name.value}. Set strategy.schedule=null to run with schedule={sc.name.value} instead."
    )


def feature_size(model: nn.Module, entry: nn.Module, image_size: int, device: torch.device) -> int:
    """The length of the head's input, flattened (one image through the network, no statistics kept)."""
    seen: List[int] = []
    hook = entry.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0].numel()))
    was = model.training
    try:
        with torch.no_grad():
            model.eval()
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        hook.remove()
        model.train(was)
    return seen[0]


def adaptation(cfg: AdaptConfig, built: BuiltModel, tail: Tail, recipe: Recipe, splits: Splits, env: Env,
               image_size: int, *, batch_size: int, seed: int, steps_per_epoch: int) -> Optional[Adaptation]:
    """adapt=dann|mmd: the target domain's training images, batch by batch beside the source's."""
    if cfg.name == AdaptName.none:
        return None
    w = env.world
    loader = make_loader(splits.target.train, batch_size=batch_size, num_workers=env.workers, train=True,
                         seed=seed + 17, pin_memory=env.device.type == "cuda", rank=w.rank, size=w.size)
    found = Adaptation(cfg, built.model, tail.entry, feature_size(built.model, tail.entry, image_size, env.device),
                       loader, total_steps=recipe.epochs * steps_per_epoch, seed=seed)
    if found.critic is not None:
        found.critic.to(env.device)
    if recipe.max_k == 0:
        built.notes.append(
            f"adapt={cfg.name.value} aligns the head's input features, but nothing below the head trains in this "
            f"run (strategy={recipe.kind.value}){' but biases or norm layers' if recipe.also else ''}: the features "
            "can hardly move. Choose a strategy that trains layers below the head (freeze_early, full, progressive).")
    return found


def cache_plan(cfg: Config, built: BuiltModel, tail: Tail, recipe: Recipe, tail_ok: bool = True) -> CacheDecision:
    """What data.cache_features gives this run (call with the freezing applied)."""
    model = built.model
    model.train()  # the modes training will see; frozen layers stay in eval
    aug = cfg.augment
    return decide(
        parse_switch(cfg.data.cache_features, "data.cache_features"),
        frozen_below_head=recipe.head_only,
        tail_ok=tail_ok,
        bn_updating=updating_batchnorms(model, tail),
        bn_mode=cfg.strategy.bn,
        aux=len(head_paths(model, built.family)) > 1 and cfg.model.aux_logits,
        blockers=train_blockers(model, tail, random_augment=aug.name.value if aug.name != AugmentName.none else None,
                                mixing=aug.mixup_alpha > 0 or aug.cutmix_alpha > 0)
        + ([f"adapt={cfg.adapt.name.value} runs target images through the network with every batch"]
           if cfg.adapt.name != AdaptName.none else []),
    )


def base_lr(cfg: Config, processes: int) -> float:
    """optimizer.lr times the strategy's scale, and times the number of processes with
    optimizer.scale_lr=linear (the global batch is data.batch_size times that number)."""
    lr = cfg.optimizer.lr * cfg.strategy.lr_scale
    return lr * processes if cfg.optimizer.scale_lr == LRScaling.linear else lr


def check_against_model(cfg: Config) -> None:
    """What can be checked against the architecture alone, before a run folder exists: the input
    size, the strategy's group counts and group LRs, and whether a weights file fits the model.
    The model is built on the meta device (no memory, no initialisation, no weights read)."""
    m = cfg.model
    with torch.device("meta"):
        built = create_model(m.name, WeightsChoice("none"), 2, head=HeadSpec(m.head, m.head_hidden, m.head_dropout),
                             aux_logits=m.aux_logits, image_size=cfg.data.image_size)
        lora = lora_settings(cfg.strategy)
        if lora is not None:
            adapt(built, lora)
    names = [g.name for g in built.groups]
    recipe = resolve(cfg.strategy, names, epochs=cfg.trainer.epochs, images_per_class=1.0)
    if lora is not None:
        check_reach(built.groups, recipe.max_k)
    layerwise_lrs(cfg.optimizer.lr * cfg.strategy.lr_scale, len(names), cfg.strategy.lr_decay, cfg.strategy.group_lrs)
    if m.weights not in (None, "synthetic"):
        choice = resolve_weights(m.name, m.weights)
        if choice.kind == "file":
            load_weights_file(built.model, built.family, choice)


def adapter_only(built: BuiltModel, save: LoraSave) -> Dict[str, Any]:
    """With LoRA and strategy.lora_save=adapter: the weights checkpoints leave out (every weight the
    run never trains, read again from model.weights) and their digest, to know them again."""
    if built.lora is None or save != LoraSave.adapter:
        return {}
    keys = left_out_keys(built.model, built.groups)
    return {"left_out": tuple(keys), "base_digest": digest(built.model.state_dict(), keys)}


def build(cfg: Config, recorder: Recorder, resolved: Dict[str, Any], *, training: bool = True) -> Parts:
    """``resolved``: the config as saved in checkpoints. ``training=False`` (a plan) skips what
    only training needs: the regularizer's estimates."""
    env = environment(cfg)
    choice = weights_choice(cfg, env) if training else planned_weights(cfg, env)
    # the weights' own preprocessing, also when a plan stands in random init for missing weights
    named = choice if cfg.model.weights == "synthetic" else resolve_weights(cfg.model.name, cfg.model.weights)
    pre = preprocess_for(cfg.model.name, named, cfg.data.image_size)
    splits = load_data(cfg.data, cfg.augment, pre, cfg.trainer.seed, env.cache, recorder.skipped_images)
    built = model_for(cfg, choice, splits.classes, env)
    groups, t = built.groups, cfg.trainer

    recipe = resolve(cfg.strategy, [g.name for g in groups], epochs=t.epochs, images_per_class=splits.images_per_class)
    if built.lora is not None:
        check_reach(groups, recipe.max_k)
    controller = Controller(recipe, groups, cfg.strategy.bn, t.monitor)
    controller.apply()
    lrs = layerwise_lrs(base_lr(cfg, env.world.size), len(groups), recipe.lr_decay, cfg.strategy.group_lrs)
    backbone = backbone_params(groups, built.family) if cfg.regularizer.name != RegularizerName.none else []
    bs, pin, w = cfg.data.batch_size, env.device.type == "cuda", env.world
    train_loader = make_loader(splits.train, batch_size=bs, num_workers=env.workers, train=True, seed=t.seed,
                               pin_memory=pin, rank=w.rank, size=w.size,
                               balanced=cfg.data.sampler == SamplerName.balanced)
    counts = {"train": class_counts(splits.train, len(splits.classes)),
              "val": class_counts(splits.val, len(splits.classes))}
    val_loader = make_loader(splits.val, batch_size=bs, num_workers=env.workers, train=False, seed=t.seed,
                             pin_memory=pin, rank=w.rank, size=w.size)
    target_val = splits.target.val if splits.target is not None else None
    target_val_loader = make_loader(target_val, batch_size=bs, num_workers=env.workers, train=False, seed=t.seed,
                                    pin_memory=pin, rank=w.rank, size=w.size) if target_val is not None else None
    tail = find_tail(built.model, built.family, groups)
    adapting = adaptation(cfg.adapt, built, tail, recipe, splits, env, pre.crop_size, batch_size=bs, seed=t.seed,
                          steps_per_epoch=len(train_loader))
    # an anchoring penalty replaces weight decay on what it anchors; the new head keeps its decay
    groups_for_optimizer = param_groups(groups, lrs, cfg.optimizer.weight_decay, anchored=[p for _, p in backbone])
    if adapting is not None and adapting.critic is not None:  # the domain classifier learns at the head's LR
        groups_for_optimizer.append({"params": list(adapting.critic.parameters()), "lr": lrs[-1],
                                     "weight_decay": cfg.optimizer.weight_decay, "group": "domain_classifier"})
    optimizer = build_optimizer(cfg.optimizer, groups_for_optimizer, fused=env.device.type == "cuda")
    schedule_cfg, schedule_note = schedule_config(cfg)
    updates = -(-len(train_loader) // t.accumulate)  # optimizer steps per epoch
    schedule = Schedule(schedule_cfg, optimizer, epochs=recipe.epochs, steps_per_epoch=updates, monitor=t.monitor)
    schedule.set_multiplier(controller.lr_mult)  # the first stage's
    tracker = MetricTracker(t.monitor, t.patience, t.min_delta)
    ema = ema_for(built.model, t.ema, t.ema_warmup)
    state = TrainState(built.model, optimizer, schedule, env.precision.scaler(env.device), tracker, controller,
                       train_loader.generator, critic=adapting.critic if adapting is not None else None,
                       ema=ema, serve_ema=t.monitor.of_ema, **adapter_only(built, cfg.strategy.lora_save))
    weights = loss_weights(counts["train"], t.class_weights)
    penalty = regularizer(cfg.regularizer, built, backbone, splits, pre, env) if training else None
    settings = FitSettings(t.monitor, t.grad_clip, cfg.model.aux_weight,
                           int(round(cfg.strategy.rewarmup_epochs * updates)), t.save_every, t.compile, bs,
                           t.accumulate)
    return Parts(
        env=env, splits=splits, built=built, pre=pre, recipe=recipe, controller=controller, lrs=lrs,
        optimizer=optimizer, schedule=schedule, train_loader=train_loader, val_loader=val_loader, state=state,
        tail=tail, caching=cache_plan(cfg, built, tail, recipe),
        criterion=nn.CrossEntropyLoss(weight=weights.to(env.device) if weights is not None else None,
                                      label_smoothing=t.label_smoothing),
        mixer=make_mixer(cfg.augment, len(splits.classes)), penalty=penalty, settings=settings,
        identity={"model_name": cfg.model.name, "classes": splits.classes, "preprocess": pre.to_dict(), "config": resolved,
                  **({"lora": built.lora.to_dict()} if built.lora is not None else {})},
        notes=[schedule_note], schedule_name=schedule_cfg.name.value,
        adaptation=adapting, target_val_loader=target_val_loader, ema=ema, counts=counts,
    )
