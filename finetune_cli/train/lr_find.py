"""``task=lr_find``: the LR range test (Smith, 2017), as fastai's ``lr_find`` and Lightning's
Tuner run it, on the run's own parts.

The run is built as for training: the model with the strategy's freezing as at epoch 1, the
optimizer's parameter groups, the training loss (label smoothing, MixUp/CutMix, auxiliary heads,
the regularizer's penalty), AMP, gradient clipping, gradient accumulation and the device. Over
``steps`` training steps (each an update of ``trainer.accumulate`` batches, as training makes
them) the head's LR rises exponentially from ``start_lr`` to ``end_lr``; every other parameter
group keeps its ratio to the head (discriminative LRs), and frozen groups stay frozen. The loss is
smoothed by an exponential moving average with bias correction; the sweep ends early once the
smoothed loss passes ``diverge`` times its lowest, or a loss is not finite. Three rules read a
suggestion off the smoothed curve (``LRRule``). Everything the sweep changes (weights, BatchNorm
statistics, optimizer state and LRs, random streams, the data order) is put back afterwards.
"""

from __future__ import annotations

import bisect
import copy
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from finetune_cli.build import Parts
from finetune_cli.config import LRRule
from finetune_cli.data.folders import make_loader
from finetune_cli.errors import FinetuneError
from finetune_cli.runtime import rng_state, set_rng_state
from finetune_cli.train.engine import train_steps
from finetune_cli.train.features import FeatureLoader, Features, TailMismatch, extract
from finetune_cli.train.optim import group_lrs

log = logging.getLogger("finetune_cli")


@dataclass(frozen=True)
class SweepSettings:
    start_lr: float  # the head's LR at the first step
    end_lr: float  # ... and at the last
    steps: int
    diverge: Optional[float] = 4.0  # stop once the smoothed loss passes this multiple of its lowest; None: never
    smoothing: float = 0.98  # the moving average's factor (beta)


def exponential(start: float, end: float, steps: int) -> List[float]:
    """``steps`` LRs from ``start`` to ``end``, each the one before times the same factor."""
    return [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]


@dataclass
class Sweep:
    """What the sweep saw, step by step."""

    lrs: List[float] = field(default_factory=list)  # the head's LR
    losses: List[float] = field(default_factory=list)  # the step's training loss
    smoothed: List[float] = field(default_factory=list)  # bias-corrected moving average of the losses
    group_lrs: List[Dict[str, float]] = field(default_factory=list)  # each layer group's LR
    stopped: str = ""  # why it ended before its last step; "" when it ran every step
    seconds: float = 0.0
    features: bool = False  # the head trained on cached features
    batches_per_step: int = 1  # each step one update of this many batches (trainer.accumulate)

    def rows(self) -> List[Dict[str, Any]]:
        """lr_find.csv: one row per step."""
        return [{"step": i + 1, "lr": lr, "loss": loss, "smoothed": s, **{f"lr_{k}": v for k, v in groups.items()}}
                for i, (lr, loss, s, groups) in enumerate(zip(self.lrs, self.losses, self.smoothed, self.group_lrs))]


def sweep(steps_of: Callable[[Callable[[int], None]], Iterator[float]], optimizer: torch.optim.Optimizer,
          ratios: Sequence[float], settings: SweepSettings) -> Sweep:
    """Run the sweep. ``steps_of(before_step)`` yields one training loss per step (``train_steps``
    with everything but ``before_step`` given); ``ratios``: each optimizer group's LR over the head's."""
    lrs = exponential(settings.start_lr, settings.end_lr, settings.steps)
    beta, average, lowest = settings.smoothing, 0.0, math.inf
    found = Sweep()

    def set_lrs(step: int) -> None:
        for group, ratio in zip(optimizer.param_groups, ratios):
            group["lr"] = lrs[step] * ratio

    started = time.perf_counter()
    losses = steps_of(set_lrs)
    for step, loss in zip(range(settings.steps), losses):  # range first: no step past the last
        found.lrs.append(lrs[step])
        found.losses.append(loss)
        found.group_lrs.append(group_lrs(optimizer))
        if not math.isfinite(loss):
            found.smoothed.append(math.nan)
            found.stopped = f"the loss became {loss} at step {step + 1}"
            break
        average = beta * average + (1 - beta) * loss
        smoothed = average / (1 - beta ** (step + 1))
        found.smoothed.append(smoothed)
        lowest = min(lowest, smoothed)
        if settings.diverge and smoothed > settings.diverge * lowest and step + 1 < settings.steps:
            found.stopped = (f"the smoothed loss passed {settings.diverge:g}x its lowest ({smoothed:.3g} against "
                             f"{lowest:.3g}) at step {step + 1}, LR {lrs[step]:.2e}")
            break
    losses.close()  # the loader's workers, if any, end here
    found.seconds = time.perf_counter() - started
    return found


# --- the rules -------------------------------------------------------------------------------


def window(n: int) -> range:
    """The points the rules read: not the first tenth (the average still settles), nor the last
    five (where a diverging sweep shoots up), when enough remain."""
    inner = range(n // 10, n - 5)
    return inner if len(inner) >= 3 else range(n)


def valley(values: Sequence[float]) -> int:
    """The middle of the longest valley: the longest run of steps, not necessarily consecutive,
    over which the values keep falling (fastai's default rule)."""
    tails: List[float] = []  # tails[k]: the highest last value of a falling run of k + 1 steps
    ends: List[int] = []  # ... and that step
    before: List[int] = [-1] * len(values)
    for i, v in enumerate(values):
        k = bisect.bisect_left(tails, -v)  # strictly falling: compare negated values
        before[i] = ends[k - 1] if k else -1
        if k == len(tails):
            tails.append(-v)
            ends.append(i)
        else:
            tails[k], ends[k] = -v, i
    last = first = ends[-1]
    while before[first] >= 0:
        first = before[first]
    return (first + last) // 2


def steepest(values: Sequence[float]) -> int:
    """Where the values fall fastest (the LRs are evenly spaced in log: index steps are log steps)."""
    slopes = [(values[min(i + 1, len(values) - 1)] - values[max(i - 1, 0)]) for i in range(len(values))]
    return min(range(len(values)), key=slopes.__getitem__)


RULES: Dict[LRRule, str] = {
    LRRule.steepest: "the steepest descent of the smoothed loss",
    LRRule.valley: "the middle of the longest valley of the smoothed loss",
    LRRule.minimum: "a tenth of the LR at the lowest smoothed loss",
}


@dataclass(frozen=True)
class Pick:
    rule: LRRule
    step: int  # 0-based, into the sweep's lists
    head_lr: float


def picks(found: Sweep) -> Dict[LRRule, Pick]:
    """Each rule's head LR, read off the smoothed loss (finite points only)."""
    finite = [i for i, s in enumerate(found.smoothed) if math.isfinite(s)]
    if len(finite) < 3:
        raise FinetuneError(
            f"The LR finder has {len(finite)} steps with a finite loss ({found.stopped or 'too few steps'}): too few "
            "to read an LR from. Lower lr_find.start_lr (and lr_find.end_lr), or give lr_find.steps more steps."
        )
    inner = [finite[i] for i in window(len(finite))]
    values = [found.smoothed[i] for i in inner]
    lowest = inner[min(range(len(values)), key=values.__getitem__)]
    chosen = {LRRule.steepest: inner[steepest(values)], LRRule.valley: inner[valley(values)], LRRule.minimum: lowest}
    return {rule: Pick(rule, i, found.lrs[i] / (10 if rule == LRRule.minimum else 1)) for rule, i in chosen.items()}


# --- from the head's LR back to the settings -------------------------------------------------


@dataclass(frozen=True)
class LRUnits:
    """How this run's head LR follows from the settings, to give a head LR back as an override."""

    optimizer_lr: float  # optimizer.lr
    head_lr: float  # the head's LR this run trains at first: optimizer.lr x lr_scale x the first stage's lr_mult
    group_lrs: Optional[Sequence[float]] = None  # strategy.group_lrs: these, not optimizer.lr, set the LRs
    lr_scale: float = 1.0
    lr_mult: float = 1.0

    def value(self, head_lr: float) -> float:
        """optimizer.lr for that head LR (or the factor on strategy.group_lrs)."""
        return head_lr / self.head_lr * (1.0 if self.group_lrs else self.optimizer_lr)

    def override(self, head_lr: float) -> str:
        if self.group_lrs:
            scale = self.value(head_lr)
            return "strategy.group_lrs=[" + ",".join(f"{lr * scale:.2g}" for lr in self.group_lrs) + "]"
        return f"optimizer.lr={self.value(head_lr):.1e}"

    def words(self) -> str:
        """How a head LR becomes the override."""
        if self.group_lrs:
            return "strategy.group_lrs set every LR: each scaled by the same factor"
        by = [f"strategy.lr_scale {self.lr_scale:g}"] if self.lr_scale != 1 else []
        by += [f"the first stage's lr_mult {self.lr_mult:g}"] if self.lr_mult != 1 else []
        factor = self.head_lr / self.optimizer_lr
        return f"optimizer.lr = head LR / {factor:g} ({' x '.join(by)})" if by else "optimizer.lr is the head's LR"


# --- on the run's parts ----------------------------------------------------------------------


def ratios(optimizer: torch.optim.Optimizer, names: Sequence[str], lrs: Sequence[float]) -> List[float]:
    """Each optimizer group's LR over the head's, as the run built them (a group of no layer group,
    the domain classifier, learns at the head's LR)."""
    by_name, head = dict(zip(names, lrs)), lrs[-1]
    return [by_name.get(g.get("group"), head) / head for g in optimizer.param_groups]


def endless(batches: Iterable) -> Iterator:
    """Pass after pass over ``batches`` (a sweep may take more steps than an epoch has batches;
    each pass draws the next epoch's order)."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise FinetuneError("The training set gives no batch: the LR finder needs at least one.")


def cached_inputs(parts: Parts, settings: SweepSettings) -> Optional[Tuple[nn.Module, FeatureLoader]]:
    """When only the head trains on inputs that are the same every epoch (a linear probe with
    augment=none: its training features can be cached), and the sweep sees more images than the
    training set holds, the head sweeps over the frozen network's outputs, computed once, in memory."""
    env, loader = parts.env, parts.train_loader
    seen = settings.steps * parts.settings.batch_size * parts.settings.accumulate
    if not parts.caching.train or seen <= len(parts.splits.train):
        return None
    once = make_loader(parts.splits.train, batch_size=parts.settings.batch_size, num_workers=env.workers,
                       train=False, seed=0, pin_memory=env.device.type == "cuda")
    try:
        feats, targets = extract(parts.model, parts.tail, once, env.device, env.precision, env.progress,
                                 "features (train)")
    except TailMismatch as exc:
        log.info(f"LR finder: the whole network runs each step ({exc}).")
        return None
    batches = FeatureLoader(Features(feats, targets, 0.0, None), env.device,  # type: ignore[arg-type]
                            batch_size=parts.settings.batch_size, sampler=loader.sampler, drop_last=loader.drop_last)
    return parts.tail.module, batches


def sweep_parts(parts: Parts, settings: SweepSettings) -> Sweep:
    """The sweep on the run's parts, which it changes (``find_lr`` puts them back)."""
    env, s = parts.env, parts.settings
    cached = cached_inputs(parts, settings)
    model, batches = cached if cached is not None else (parts.model, parts.train_loader)
    steps_of = partial(train_steps, model, endless(batches), parts.optimizer, parts.criterion, env.device,
                       precision=env.precision, scaler=env.precision.scaler(env.device), grad_clip=s.grad_clip,
                       aux_weight=s.aux_weight, penalty=parts.penalty, mix=parts.mixer,
                       channels_last=env.channels_last, accumulate=s.accumulate)
    found = sweep(lambda before: steps_of(before_step=before), parts.optimizer,
                  ratios(parts.optimizer, parts.recipe.names, parts.lrs), settings)
    found.features = cached is not None
    found.batches_per_step = s.accumulate
    return found


@contextmanager
def left_as_found(model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any) -> Iterator[None]:
    """Whatever happens inside, the model (weights, buffers, modes, gradients), the optimizer (state
    and LRs), every random stream and the loader's data order end as they were."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    streams = rng_state(loader.generator)
    epoch = getattr(loader.sampler, "epoch", None)
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        model.load_state_dict(weights)
        optimizer.load_state_dict(optimizer_state)
        set_rng_state(streams, loader.generator)
        if epoch is not None:
            loader.sampler.epoch = epoch
        for m, mode in modes:
            m.training = mode
        for p in model.parameters():
            p.grad = None


def find_lr(parts: Parts, settings: SweepSettings) -> Sweep:
    """The sweep on the run's parts; the model and the optimizer are left as they were."""
    with left_as_found(parts.model, parts.optimizer, parts.train_loader):
        return sweep_parts(parts, settings)


# --- the result ------------------------------------------------------------------------------


def result(found: Sweep, chosen: Dict[LRRule, Pick], rule: LRRule, units: LRUnits,
           settings: SweepSettings) -> Dict[str, Any]:
    """lr_find.json: the suggestion, every rule's value, and the sweep's settings and course."""
    pick = chosen[rule]
    return {
        "suggestion": units.value(pick.head_lr) if not units.group_lrs else None,
        "override": units.override(pick.head_lr),
        "rule": rule.value,
        "rule_words": RULES[rule],
        "head_lr": pick.head_lr,
        "how": units.words(),
        "rules": {r.value: {"head_lr": p.head_lr, "override": units.override(p.head_lr), "step": p.step + 1}
                  for r, p in chosen.items()},
        "start_lr": settings.start_lr,
        "end_lr": settings.end_lr,
        "steps": settings.steps,
        "steps_run": len(found.lrs),
        "stopped": found.stopped,
        "diverge": settings.diverge,
        "smoothing": settings.smoothing,
        "cached_features": found.features,
        "batches_per_step": found.batches_per_step,
        "seconds": found.seconds,
    }


def sentence(found: Dict[str, Any]) -> str:
    """The console's line: the override to paste, the rule, and the other rules' values."""
    others = "; ".join(f"{r}: {v['override']}" for r, v in found["rules"].items() if r != found["rule"])
    return (f"LR finder: suggested {found['override']} ({found['rule']}: {found['rule_words']}, head LR "
            f"{found['head_lr']:.1e}; {found['how']}). Other rules: {others}.")


def run_lr_find(parts: Parts, settings: SweepSettings, rule: LRRule, units: LRUnits, summary: Dict[str, Any],
                recorder: Any, title: str) -> Dict[str, Any]:
    """task=lr_find on built parts: sweep (leaving them as they were), suggest, and have the
    recorder write lr_find.csv, lr_find.json, lr_find.png and summary.json."""
    from finetune_cli.train.lr_find_view import write_picture

    per_step = parts.settings.accumulate
    each = f" (each step one update of {per_step} batches (trainer.accumulate))" if per_step > 1 else ""
    log.info(f"LR finder: the head's LR from {settings.start_lr:.1e} to {settings.end_lr:.1e} over {settings.steps} "
             f"steps{each}, every group at its ratio to the head, frozen groups frozen; the weights and the optimizer are "
             "put back afterwards, and nothing is saved.")
    if parts.adaptation is not None:
        log.info("LR finder: the sweep follows the classification loss alone; the domain loss (adapt=) is left out.")
    found = find_lr(parts, settings)
    if found.features:
        log.info("LR finder: the head swept over its input features, computed once.")
    outcome = result(found, picks(found), rule, units, settings)
    rows = found.rows()
    per_head = 0.0 if units.group_lrs else units.optimizer_lr / units.head_lr
    done = recorder.lr_found({**summary, "task": "lr_find", "lr_find": outcome}, rows,
                             lambda path: write_picture(path, rows, outcome, per_head, title))
    if found.stopped:
        log.info(f"LR finder: stopped after {len(found.lrs)} of {settings.steps} steps: {found.stopped}.")
    log.info(sentence(outcome))
    if recorder.writes:
        log.info(f"Loss against LR: {recorder.out_dir / 'lr_find.png'}; each step in lr_find.csv, the suggestion "
                 "in lr_find.json")
    return done
