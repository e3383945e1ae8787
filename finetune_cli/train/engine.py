"""``train_one_epoch`` and ``evaluate``. Device moves, AMP and clipping live here only."""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm import tqdm

from finetune_cli import world
from finetune_cli.errors import FinetuneError
from finetune_cli.train.mixing import hard_labels


@dataclass
class EpochResult:
    loss: float
    acc: float
    images: int
    seconds: float
    interrupted: bool = False  # a stop was requested: the epoch was abandoned
    confusion: Optional[torch.Tensor] = None  # evaluation: [true class, predicted class] counts

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def class_metrics(self) -> Dict[str, float]:
        """Balanced accuracy and macro-F1, from the confusion counts (empty without them)."""
        return class_metrics(self.confusion) if self.confusion is not None else {}


def class_metrics(confusion: torch.Tensor) -> Dict[str, float]:
    """``balanced_acc``: the mean of the recalls of the classes present; ``macro_f1``: the mean F1
    over the classes present or predicted (an F1 of 0 where nothing of it was right), as
    scikit-learn's balanced_accuracy_score and f1_score(average="macro") compute them."""
    c = confusion.double()
    hits, support, predicted = c.diagonal(), c.sum(1), c.sum(0)
    present = support > 0
    if not bool(present.any()):
        return {}
    recall = hits[present] / support[present]
    counted = present | (predicted > 0)
    f1 = 2 * hits[counted] / (support[counted] + predicted[counted])
    return {"balanced_acc": float(recall.mean()), "macro_f1": float(f1.mean())}


@dataclass(frozen=True)
class Precision:
    """Autocast dtype (None: full precision) and whether a gradient scaler is needed (fp16)."""

    dtype: Optional[torch.dtype] = None

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def scaler(self, device: torch.device) -> Optional[torch.amp.GradScaler]:
        if self.dtype == torch.float16 and device.type == "cuda":
            return torch.amp.GradScaler("cuda")
        return None


def split_outputs(out) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """GoogLeNet / InceptionV3 return named tuples with auxiliary logits in training mode."""
    if isinstance(out, tuple):
        return out[0], [o for o in out[1:] if o is not None]
    return out, []


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    if channels_last and x.dim() == 4:
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device, non_blocking=True)


def _bar(loader, progress: bool, desc: str):
    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not progress)


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    criterion: Callable,
    device: torch.device,
    *,
    step_schedule: Callable[[], None] = lambda: None,
    precision: Precision = Precision(),
    scaler: Optional[torch.amp.GradScaler] = None,
    grad_clip: Optional[float] = None,
    aux_weight: float = 0.0,
    penalty: Optional[Callable[[], torch.Tensor]] = None,
    mix: Optional[Callable] = None,
    should_stop: Callable[[], bool] = lambda: False,
    progress: bool = False,
    desc: str = "train",
    channels_last: bool = False,
    check_every: int = 1,
    across_processes: bool = False,
    adapt: Optional[Any] = None,
    accumulate: int = 1,
    after_update: Callable[[], None] = lambda: None,
) -> EpochResult:
    """One pass over ``loader``. ``accumulate``: the optimizer steps once every N batches, on the
    gradients of all N (each loss divided by the batches of its update): the update of one batch N
    times larger, except for BatchNorm statistics, which each batch computes on its own. The
    schedule steps with the optimizer; ``after_update`` runs after each step (the weights' EMA).
    Under DDP, the batches that do not step skip the gradient all-reduce. ``adapt`` (an ``adapt.Adaptation``; ``model`` is then its
    ``Adapted`` module): each source batch goes through with a target batch, and the domain loss
    joins the classification loss. The loss is checked for NaN/inf every ``check_every`` steps
    (each check waits for the device; on CUDA the tool checks every 50 steps).
    ``across_processes``: the run's processes decide the check together and sum the metrics (only
    for what every process runs in step: not for one process's synthetic pretraining)."""
    model.train()
    params = _trained(optimizer)
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)
    seen = 0
    batches = len(loader)
    start = time.perf_counter()
    for step, (images, targets) in enumerate(_bar(loader, progress, desc)):
        images, targets = _inputs(images, targets, device, channels_last, mix)
        n = images.size(0)
        if adapt is not None:
            images = torch.cat([images, to_device(adapt.next_target(n), device, channels_last)])
        with precision.autocast(device):
            out = model(images)
            domain_loss = None
            if adapt is not None:
                out, domain_loss = adapt.split(out, n)
            logits, loss = batch_loss(out, targets, criterion, aux_weight, penalty)
            task_loss = loss  # what train_loss reports (the domain loss is reported on its own)
            if domain_loss is not None:
                loss = loss + domain_loss
        finite &= torch.isfinite(loss.detach())
        if (step + 1) % check_every == 0:
            _check_finite(finite, loss, step, check_every, desc, across_processes)
        window = update_window(step, batches, accumulate)
        if step % accumulate == 0:  # an update's first batch (the last update's gradients stay until then)
            optimizer.zero_grad(set_to_none=True)
        steps_now = (step + 1) % accumulate == 0 or step + 1 == batches
        with contextlib.nullcontext() if steps_now or not hasattr(model, "no_sync") else model.no_sync():
            _backward(loss / window if window > 1 else loss, scaler)
        if steps_now:
            _step(optimizer, params, scaler, grad_clip)
            step_schedule()
            after_update()
        total_loss += task_loss.detach() * n
        correct += (logits.detach().argmax(1) == hard_labels(targets)).sum()
        seen += n
        if should_stop():
            break
    if seen:
        _check_finite(finite, loss, step, check_every, desc, across_processes)
    seconds = time.perf_counter() - start
    loss_sum, hits, count = _summed(total_loss, correct, seen, across_processes)
    return EpochResult(
        loss=loss_sum / max(count, 1),
        acc=hits / max(count, 1),
        images=int(count),
        seconds=seconds,
        interrupted=should_stop(),
    )


def train_steps(
    model: nn.Module,
    batches: Iterable,
    optimizer: torch.optim.Optimizer,
    criterion: Callable,
    device: torch.device,
    *,
    before_step: Callable[[int], None],
    precision: Precision = Precision(),
    scaler: Optional[torch.amp.GradScaler] = None,
    grad_clip: Optional[float] = None,
    aux_weight: float = 0.0,
    penalty: Optional[Callable[[], torch.Tensor]] = None,
    mix: Optional[Callable] = None,
    channels_last: bool = False,
    accumulate: int = 1,
) -> Iterator[float]:
    """Training updates as ``train_one_epoch`` makes them, for a caller that watches every update's
    loss (the LR finder): ``before_step(i)`` runs first (it sets the LRs), then the update's
    ``accumulate`` batches go forward and backward (each loss divided by ``accumulate``), and their
    mean loss, the loss of one batch ``accumulate`` times larger, is yielded before the optimizer
    steps. A loss that is not finite is yielded like any other, for the caller to judge; the caller
    stops by asking for no more. An update whose batches run out is not taken."""
    model.train()
    params = _trained(optimizer)
    batches = iter(batches)
    for step in itertools.count():
        before_step(step)
        optimizer.zero_grad(set_to_none=True)
        total, taken = torch.zeros((), device=device), 0
        for images, targets in itertools.islice(batches, accumulate):
            images, targets = _inputs(images, targets, device, channels_last, mix)
            with precision.autocast(device):
                _, loss = batch_loss(model(images), targets, criterion, aux_weight, penalty)
            total += loss.detach().float()
            taken += 1
            _backward(loss / accumulate if accumulate > 1 else loss, scaler)
        if taken < accumulate:
            return
        yield float(total) / accumulate  # one wait for the device per update
        _step(optimizer, params, scaler, grad_clip)


def _trained(optimizer: torch.optim.Optimizer) -> Sequence[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]


def _inputs(images: torch.Tensor, targets: torch.Tensor, device: torch.device, channels_last: bool,
            mix: Optional[Callable]) -> Tuple[torch.Tensor, torch.Tensor]:
    """A batch on the device, mixed when MixUp/CutMix is on (soft targets from then on)."""
    images = to_device(images, device, channels_last)
    targets = targets.to(device, non_blocking=True)
    return mix(images, targets) if mix is not None else (images, targets)


def batch_loss(out: Any, targets: torch.Tensor, criterion: Callable, aux_weight: float,
               penalty: Optional[Callable[[], torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The logits and the training loss of a forward pass: the criterion, the auxiliary heads'
    weighted losses, and the regularizer's penalty."""
    logits, aux = split_outputs(out)
    loss = criterion(logits, targets)
    for a in aux:
        loss = loss + aux_weight * criterion(a, targets)
    if penalty is not None:
        loss = loss + penalty()
    return logits, loss


def _summed(total_loss: torch.Tensor, correct: torch.Tensor, seen: int, across_processes: bool
            ) -> Tuple[float, float, float]:
    """The loss sum, the hits and the count: this process's, or every process's."""
    sums = torch.stack([total_loss.float(), correct.float(), torch.tensor(float(seen), device=total_loss.device)])
    return tuple((world.total(sums) if across_processes else sums).tolist())  # type: ignore[return-value]


def update_window(step: int, batches: int, accumulate: int) -> int:
    """How many batches share the update that batch ``step`` (from 0) of ``batches`` belongs to:
    ``accumulate``, or fewer for the remainder at the end of the epoch."""
    if accumulate <= 1:
        return 1
    whole = batches - batches % accumulate
    return accumulate if step < whole else batches - whole


def _backward(loss: torch.Tensor, scaler: Optional[torch.amp.GradScaler]) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _step(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
          scaler: Optional[torch.amp.GradScaler], grad_clip: Optional[float]) -> None:
    """Optional clipping (of unscaled gradients), and the optimizer step."""
    if scaler is not None:
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()


def _check_finite(finite: torch.Tensor, loss: torch.Tensor, step: int, every: int, desc: str,
                  across_processes: bool = False) -> None:
    """``across_processes``: every process decides together (one stopping alone would leave the
    others waiting)."""
    bad = not bool(finite)
    if world.anyone(bad) if across_processes else bad:
        what = f"{loss.item()} at step {step}" if every == 1 else f"nan or inf in the {every} steps up to step {step}"
        raise FinetuneError(
            f"The training loss became {what} of {desc}. Lower "
            "optimizer.lr, set trainer.grad_clip (e.g. 1.0), or check the data. The checkpoints written so "
            "far are kept."
        )


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader,
    criterion: Callable,
    device: torch.device,
    *,
    precision: Precision = Precision(),
    should_stop: Callable[[], bool] = lambda: False,
    progress: bool = False,
    desc: str = "val",
    channels_last: bool = False,
    across_processes: bool = False,
    classes: Optional[int] = None,
) -> EpochResult:
    """``across_processes``: each process has its share of the set; the sums are every process's.
    ``classes``: also count the confusion matrix (for balanced accuracy and macro-F1)."""
    model.eval()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    confusion = torch.zeros(classes * classes if classes else 1, dtype=torch.long, device=device)
    seen = 0
    start = time.perf_counter()
    for images, targets in _bar(loader, progress, desc):
        images = to_device(images, device, channels_last)
        targets = targets.to(device, non_blocking=True)
        with precision.autocast(device):
            logits, _ = split_outputs(model(images))
            loss = criterion(logits.float(), targets)
        total_loss += loss * targets.size(0)
        predicted = logits.argmax(1)
        correct += (predicted == targets).sum()
        if classes:
            confusion += torch.bincount(targets * classes + predicted, minlength=classes * classes)
        seen += targets.size(0)
        if should_stop():
            break
    loss_sum, hits, count = _summed(total_loss, correct, seen, across_processes)
    if classes and across_processes:
        confusion = world.total(confusion)
    return EpochResult(
        loss=loss_sum / max(count, 1),
        acc=hits / max(count, 1),
        images=int(count),
        seconds=time.perf_counter() - start,
        interrupted=should_stop(),
        confusion=confusion.view(classes, classes).cpu() if classes else None,
    )
