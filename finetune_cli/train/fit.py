"""``fit``: the epochs, from ``start`` to the end of the strategy's schedule or an early stop.

Each epoch: the strategy's phase -> train -> validate -> schedule, best metric and the strategy's
next phase -> the recorder writes metrics.csv, checkpoints and summary.json.
"""

from __future__ import annotations

import logging
import math
import signal
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from finetune_cli import ui, world
from finetune_cli.build import Parts
from finetune_cli.data.folders import make_loader
from finetune_cli.errors import FinetuneError
from finetune_cli.io_utils import atomic_torch_save, safe_torch_load
from finetune_cli.models import count_params
from finetune_cli.models.tail import find_tail
from finetune_cli.record import Recorder
from finetune_cli.train.adapt import DomainMetrics
from finetune_cli.train.checkpoint import Start, read_checkpoint
from finetune_cli.train.domain_view import domain_features, write_picture
from finetune_cli.train.engine import EpochResult, evaluate, train_one_epoch
from finetune_cli.train.features import FeatureLoader, TailMismatch, cache_key, extract, summary_of
from finetune_cli.train.memory import peak_memory, state_bytes
from finetune_cli.train.optim import group_lrs
from finetune_cli.train.shutdown import GracefulStop, Interrupted
from finetune_cli.train.strategies import Event, KeepStageBest, RestoreStageBest, words

log = logging.getLogger("finetune_cli")
VALIDATION_LOSS = nn.CrossEntropyLoss()  # plain: the training loss may smooth its labels


@dataclass
class Inputs:
    """What the epochs run on: the whole model over images, or the tail over cached features."""

    train_model: nn.Module
    train_batches: Any
    val_model: nn.Module
    val_batches: Any
    cache: Dict[str, Any]
    wrapped_for: Optional[Tuple[bool, ...]] = None  # the trainable mask the DDP wrapper was made for
    ema_val_model: Optional[nn.Module] = None  # trainer.ema: the average, over images or cached features


@dataclass
class Totals:
    images: int = 0
    seconds: float = 0.0
    held: Dict[str, int] = field(default_factory=dict)  # the most bytes of params/grads/optimizer state


def cached_features(parts: Parts, recorder: Recorder) -> Dict[str, Any]:
    """The frozen network's outputs for the splits the decision caches, from the run folder when
    they are there for the same weights, files and transform, else computed now."""
    env, store = parts.env, recorder.feature_store()
    splits = {"train": parts.splits.train} if parts.caching.train else {}
    splits["val"] = parts.splits.val
    found = {}
    for name, data in splits.items():
        loader = make_loader(data, batch_size=parts.settings.batch_size, num_workers=env.workers, train=False, seed=0,
                             pin_memory=env.device.type == "cuda")
        key = cache_key(parts.model, parts.tail, data, env.precision)
        compute = partial(extract, parts.model, parts.tail, loader, env.device, env.precision, env.progress,
                          f"features ({name})")
        found[name] = f = _features_once(env.world, partial(store.get, name, key, compute))
        how = "read back from" if f.seconds == 0 else f"computed in {f.seconds:.1f}s into"
        log.info(f"Feature cache: {len(f.targets)} {name} images x {tuple(f.features.shape[1:])} {how} {f.path}")
    return found


def _features_once(here: Any, get: Any) -> Any:
    """With several processes, rank 0 computes (or reads back) and stores the features, and the
    others read its file once it says how that went: its error, if any, is every process's."""
    if not here.distributed:
        return get()
    outcome, error = None, None
    if here.main:
        try:
            outcome = get()
        except (TailMismatch, FinetuneError) as exc:
            error = exc
    error = world.from_main(error)  # also the point every process waits for
    if error is not None:
        raise error
    return outcome if here.main else get()


def epoch_inputs(parts: Parts, recorder: Recorder) -> Inputs:
    model: nn.Module = torch.compile(parts.model) if parts.settings.compile else parts.model
    # with adaptation, training runs the model and the domain classifier as one module
    trains = parts.adaptation.module if parts.adaptation is not None else model
    inputs = Inputs(trains, parts.train_loader, model, parts.val_loader, summary_of(parts.caching, parts.tail, {}),
                    ema_val_model=parts.ema.module if parts.ema is not None else None)
    if not parts.caching.val:
        return inputs
    try:
        found = cached_features(parts, recorder)
    except TailMismatch as exc:
        why = f"this model's output is not a function of its head's input alone ({exc})"
        if parts.caching.demanded:
            raise FinetuneError(f"data.cache_features=true, but features cannot be cached: {why}. "
                                "Use data.cache_features=auto or false.") from None
        log.warning(f"Feature cache off: {why}.")
        parts.caching.train = parts.caching.val = False
        parts.caching.why_not.append(why)
        found = {}
    bs, device, loader = parts.settings.batch_size, parts.env.device, parts.train_loader
    if "train" in found:
        inputs.train_model = parts.tail.module
        inputs.train_batches = FeatureLoader(found["train"], device, batch_size=bs, sampler=loader.sampler,
                                             drop_last=loader.drop_last)
    if "val" in found:
        inputs.val_model = parts.tail.module
        if parts.ema is not None:  # the average's own tail, over the same features
            inputs.ema_val_model = find_tail(parts.ema.module, parts.built.family, parts.built.groups).module
        inputs.val_batches = FeatureLoader(found["val"], device, batch_size=bs, sampler=parts.val_loader.sampler)
    inputs.cache = summary_of(parts.caching, parts.tail, found)
    parts.model.train()
    return inputs


def wrap_for_processes(parts: Parts, inputs: Inputs) -> None:
    """With several processes, training runs through DistributedDataParallel, which averages the
    gradients of what trains now. Its gradient buckets hold only parameters that need a gradient,
    so frozen groups cost no communication; after an unfreeze the wrapper is made again."""
    if not parts.env.world.distributed:
        return
    from torch.nn.parallel import DistributedDataParallel

    module = parts.tail.module if inputs.train_batches is not parts.train_loader else parts.model
    if parts.adaptation is not None:
        module = parts.adaptation.module
    if not any(p.requires_grad for p in module.parameters()):
        inputs.train_model = module
        return
    device = parts.env.device
    inputs.train_model = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def apply_phase(parts: Parts, events: Sequence[Event]) -> None:
    """The LR side of a strategy's change: its multiplier, and a re-warmup after an unfreeze."""
    if not any(e.changes_mask for e in events):
        return
    parts.schedule.set_multiplier(parts.controller.lr_mult)
    if parts.settings.rewarmup_steps and any(e.rewarm for e in events):
        parts.schedule.rewarmup(parts.settings.rewarmup_steps)


def scores(prefix: str, result: EpochResult) -> Dict[str, float]:
    """``{prefix}_acc``, ``_loss``, ``_balanced_acc``, ``_macro_f1``: what trainer.monitor may watch."""
    return {f"{prefix}_loss": result.loss, f"{prefix}_acc": result.acc,
            **{f"{prefix}_{k}": v for k, v in result.class_metrics().items()}}


@dataclass
class Measured:
    """What one epoch measured: training, validation, and where they exist the weights' average
    (trainer.ema), the target domain and the domain loss (adapt=)."""

    train: EpochResult
    val: EpochResult
    ema: Optional[EpochResult] = None  # the moving average on the val set
    target: Optional[EpochResult] = None  # the target's labelled val/, evaluated only
    domain: Optional[DomainMetrics] = None  # the domain loss (adapt=dann|mmd)

    @property
    def interrupted(self) -> bool:
        return any(r is not None and r.interrupted for r in (self.train, self.val, self.ema, self.target))

    def scores(self) -> Dict[str, float]:
        return {**scores("val", self.val), **(scores("ema_val", self.ema) if self.ema is not None else {})}

    def columns(self) -> Dict[str, Any]:
        """metrics.csv's columns after the LRs: the average's, the target's and the domain's."""
        row: Dict[str, Any] = scores("ema_val", self.ema) if self.ema is not None else {}
        if self.target is not None:
            row.update(target_val_loss=self.target.loss, target_val_acc=self.target.acc)
        if self.domain is not None:
            row.update(domain_loss=self.domain.loss, domain_weight=self.domain.weight)
            if self.domain.acc is not None:
                row["domain_acc"] = self.domain.acc
        return row


def train_and_validate(parts: Parts, inputs: Inputs, epoch: int, stop: GracefulStop, totals: Totals) -> Measured:
    env, s = parts.env, parts.settings
    adapt, ema, classes = parts.adaptation, parts.ema, len(parts.splits.classes)
    if adapt is not None:
        adapt.begin_epoch(epoch, len(parts.train_loader))
    try:
        tr = train_one_epoch(
            inputs.train_model, inputs.train_batches, parts.optimizer, parts.criterion, env.device,
            step_schedule=parts.schedule.step_batch, precision=env.precision, scaler=parts.state.scaler,
            grad_clip=s.grad_clip, aux_weight=s.aux_weight, penalty=parts.penalty, mix=parts.mixer,
            should_stop=lambda: world.anyone(stop.requested()), progress=env.progress,
            desc=f"epoch {epoch}/{parts.controller.epochs}",
            channels_last=env.channels_last, check_every=50 if env.device.type == "cuda" else 1,
            across_processes=env.world.distributed, adapt=adapt, accumulate=s.accumulate,
            after_update=partial(ema.update, parts.model) if ema is not None else lambda: None,
        )
        now = state_bytes(parts.model, parts.optimizer)
        totals.held = {k: max(v, totals.held.get(k, 0)) for k, v in now.items()}
        world.same_as_main(parts.model, buffers_only=True)  # the BatchNorm statistics rank 0 saves
        check = partial(evaluate, criterion=VALIDATION_LOSS, device=env.device, precision=env.precision,
                        should_stop=stop.requested, progress=env.progress, channels_last=env.channels_last,
                        across_processes=env.world.distributed, classes=classes)
        found = Measured(tr, check(inputs.val_model, inputs.val_batches),
                         domain=adapt.epoch_metrics(env.world.distributed) if adapt is not None else None)
        if ema is not None and not found.interrupted:
            found.ema = check(inputs.ema_val_model, inputs.val_batches, desc="val (EMA)")
        if parts.target_val_loader is not None and not found.interrupted:
            found.target = evaluate(parts.model, parts.target_val_loader, VALIDATION_LOSS, env.device,
                                    precision=env.precision, should_stop=stop.requested, progress=env.progress,
                                    desc="target val", channels_last=env.channels_last,
                                    across_processes=env.world.distributed)
    except RuntimeError:
        if stop.requested():  # loader workers got the signal too
            raise Interrupted(stop.signum, epoch) from None
        raise
    if world.anyone(found.interrupted):
        raise Interrupted(stop.signum or signal.SIGTERM, epoch)  # every process stops at the same point
    totals.images += tr.images
    totals.seconds += tr.seconds
    return found


def restore_stage_best(parts: Parts, recorder: Recorder, event: RestoreStageBest, epoch: int) -> None:
    """Weights and optimizer moments of the stage's best epoch, from checkpoints/stage_best.pt."""
    path = recorder.stage_best
    ckpt = read_checkpoint(path) if path.is_file() else None
    if ckpt is None or int(ckpt["epoch"]) != event.epoch:
        found = "there is no such file" if ckpt is None else f"it holds epoch {ckpt['epoch']}"
        log.warning(f"Cannot restore the best weights of stage {event.stage}: {path} should hold epoch {event.epoch}, "
                    f"but {found}. The next stage starts from the weights of epoch {epoch} instead.")
        return
    parts.state.restore_weights(ckpt)


def stop_reason(parts: Parts) -> Optional[str]:
    """Why the run stops before its last epoch, or None."""
    tracker = parts.state.tracker
    if tracker.should_stop:
        monitor, delta = parts.settings.monitor.value, tracker.min_delta
        by = f"{ui.pp(delta, signed=False)} (trainer.min_delta={delta:g})" if ui.is_accuracy(monitor) else f"{delta:g}"
        return f"early stopping: {monitor} did not improve by more than {by} for {tracker.patience} epochs"
    if parts.controller.finished:
        return "the strategy's last stage stopped early"
    return None


def one_epoch(parts: Parts, inputs: Inputs, epoch: int, stop: GracefulStop, recorder: Recorder,
              totals: Totals) -> Optional[str]:
    """Run and record one epoch; returns why the run is finished early, or None."""
    controller, names = parts.controller, parts.recipe.names
    events = controller.begin_epoch(epoch)
    apply_phase(parts, events)
    if parts.env.world.distributed and inputs.wrapped_for != tuple(controller.mask()):
        wrap_for_processes(parts, inputs)
        inputs.wrapped_for = tuple(controller.mask())
    parts.train_loader.sampler.set_epoch(epoch)  # the epoch's order (the cached features share the sampler)
    lrs_now, trainable_now, k_now = group_lrs(parts.optimizer), count_params(parts.model)[0], controller.k
    for e in words(events):
        log.info(f"epoch {epoch}: {e}")

    measured = train_and_validate(parts, inputs, epoch, stop, totals)
    tr, va = measured.train, measured.val
    monitored = measured.scores()[parts.settings.monitor.value]
    if not math.isfinite(monitored):
        raise FinetuneError(
            f"The validation {parts.settings.monitor.value} became {monitored} at epoch {epoch}. Lower "
            "optimizer.lr or set trainer.grad_clip; the checkpoints of earlier epochs are kept."
        )

    parts.schedule.step_epoch(monitored)
    improved = parts.state.tracker.update(monitored, epoch)
    after = controller.end_epoch(epoch, monitored)
    for e in after:
        if isinstance(e, RestoreStageBest) and e.epoch != epoch:
            restore_stage_best(parts, recorder, e, epoch)
    apply_phase(parts, after)
    finished = stop_reason(parts)

    said = words(events) + words(after)
    row: Dict[str, Any] = {
        "epoch": epoch, "train_loss": tr.loss, "train_acc": tr.acc, **scores("val", va),
        "lr": lrs_now[names[-1]], **{f"lr_{name}": lrs_now[name] for name in names},
        "epoch_seconds": tr.seconds + va.seconds, "train_seconds": tr.seconds, "train_images_per_s": tr.images_per_s,
        "trainable_params": trainable_now, "trainable_groups": k_now, **measured.columns(), "events": "; ".join(said),
    }
    events_so_far = recorder.summary.get("events", []) + [{"epoch": epoch, "event": e} for e in said]
    save_every = parts.settings.save_every
    recorder.epoch(
        row,
        parts.state.checkpoint(epoch, metrics=row, history=recorder.rows + [row], events=events_so_far,
                               finished=finished, planned_epochs=controller.epochs, **parts.identity),
        best=improved,
        keep_as=f"epoch_{epoch:03d}.pt" if save_every and epoch % save_every == 0 else None,
        stage_best=any(isinstance(e, KeepStageBest) for e in after),
        summary=progress_summary(parts, epoch, trainable_now, totals, events_so_far, recorder.rows + [row]),
    )
    ui.show_epoch(row, controller.epochs, improved)
    for e in words(after):
        log.info(f"after epoch {epoch}: {e}")
    return finished


def progress_summary(parts: Parts, epoch: int, trainable: int, totals: Totals, events: List[Dict[str, Any]],
                     rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    tracker = parts.state.tracker
    mem, mem_kind = peak_memory(parts.env.device)
    held = totals.held
    return {
        "best": {"monitor": parts.settings.monitor.value, "value": tracker.best, "epoch": tracker.best_epoch},
        "epochs_run": epoch,
        "trainable_params_final": trainable,
        "train_seconds": totals.seconds,
        "train_images_per_s": totals.images / totals.seconds if totals.seconds else 0.0,
        "peak_memory_mb": mem,
        "peak_memory_kind": mem_kind,
        "memory_mb": {k: v / 2**20 for k, v in held.items()},
        "grad_optimizer_mb": (held["grads"] + held["optimizer_state"]) / 2**20,
        "events": events,
        **best_epoch_scores(rows, tracker.best_epoch),
        **target_summary(rows, tracker.best_epoch),
    }


def best_epoch_scores(rows: List[Dict[str, Any]], best_epoch: Optional[int]) -> Dict[str, Any]:
    """Every validation figure of the best epoch: accuracy, loss, balanced accuracy, macro-F1, and
    those of the weights' average (trainer.ema)."""
    at = next((r for r in rows if r["epoch"] == best_epoch), None)
    return {"at_best": {k: v for k, v in at.items() if k.startswith(("val_", "ema_val_"))}} if at else {}


def target_summary(rows: List[Dict[str, Any]], best_epoch: Optional[int]) -> Dict[str, Any]:
    """The target domain's accuracy at the best epoch (chosen on the labelled val set: the
    target's labels are never used to choose) and at the last, when there is a target val/."""
    if not rows or "target_val_acc" not in rows[-1]:
        return {}
    at_best = next((r for r in rows if r["epoch"] == best_epoch), rows[-1])
    found = {"target_val_acc": at_best["target_val_acc"], "target_val_acc_last": rows[-1]["target_val_acc"],
             "source_val_acc": at_best["val_acc"]}
    if "domain_acc" in rows[-1]:
        found["domain_acc_last"] = rows[-1]["domain_acc"]
    return {"target": found}


def _domains_now(parts: Parts, recorder: Recorder) -> Optional[Dict[str, Any]]:
    """The head-input features of both domains' val images now, where there is a labelled target
    val/ set (rank 0 alone: it draws the picture)."""
    target = parts.splits.target
    if target is None or target.val is None or not recorder.writes:
        return None
    env = parts.env
    try:
        return domain_features(parts.model, parts.tail, parts.splits.val, target.val, env.device, env.precision,
                               env.workers)
    except TailMismatch as exc:
        log.warning(f"No adapt_features.png: this model's output is not a function of its head's input alone ({exc}).")
        return None


def features_before(parts: Parts, recorder: Recorder, resumed: bool) -> Optional[Dict[str, Any]]:
    """Computed and kept in the run folder before the first epoch; a resumed run reads them back."""
    if resumed:
        path = recorder.features_before
        return safe_torch_load(path) if parts.splits.target is not None and path.is_file() else None
    found = _domains_now(parts, recorder)
    if found is not None:
        recorder.write(atomic_torch_save, found, recorder.features_before)
    return found


def draw_domains(parts: Parts, recorder: Recorder, before: Dict[str, Any]) -> None:
    """adapt_features.png: the features before training beside those now."""
    after = _domains_now(parts, recorder)
    if after is None:
        return
    adapt = parts.adaptation.method.value if parts.adaptation else "none"
    path = recorder.out_dir / "adapt_features.png"
    write_picture(path, before, after, parts.splits.classes,
                  f"{parts.identity['model_name']}: head-input features, PCA (adapt={adapt})")
    log.info(f"Source and target features before and after training: {path}")
    recorder.summary["adapt_features"] = str(path)


def fit(parts: Parts, start: Start, recorder: Recorder) -> Dict[str, Any]:
    """Train from ``start.epoch``; returns what the summary adds at the end."""
    before = features_before(parts, recorder, resumed=start.checkpoint is not None)
    inputs = epoch_inputs(parts, recorder)
    recorder.summary.update(feature_cache=inputs.cache, setup_seconds=recorder.seconds())
    totals, stop, finished = Totals(), GracefulStop(on_second=recorder.forced_out), None
    try:
        with stop:
            for epoch in range(start.epoch, parts.controller.epochs + 1):
                finished = one_epoch(parts, inputs, epoch, stop, recorder, totals)
                if finished:
                    log.info(f"{finished[0].upper()}{finished[1:]} (stopped after epoch {epoch}).")
                    break
    except Interrupted as exc:
        raise recorder.interrupted(exc) from None
    if before is not None:
        draw_domains(parts, recorder, before)
    return {"stopped_early": bool(finished)}
