"""``run``: one fine-tuning run, top to bottom: build -> resume -> fit -> record."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Dict, Optional

from finetune_cli import world
from finetune_cli.build import Parts, build
from finetune_cli.checks import check
from finetune_cli.config import Config, PreviewMode, Task
from finetune_cli.data.loading import load_data
from finetune_cli.data.preview import write_preview
from finetune_cli.io_utils import folder_lock, remove_stale_temporaries
from finetune_cli.models import resolve_weights
from finetune_cli.models.factory import preprocess_for
from finetune_cli.models.weights import WeightsChoice
from finetune_cli.paths import cache_dir
from finetune_cli.plan import show_plan
from finetune_cli.record import Recorder, read_summary
from finetune_cli.runtime import seed_everything
from finetune_cli.train.checkpoint import finished_before_build, read_resume, refuse_changed_settings, resume
from finetune_cli.train.fit import fit
from finetune_cli.train.lr_find import LRUnits, SweepSettings, run_lr_find
from finetune_cli.train.mixing import make_mixer
from finetune_cli.train.shutdown import Interrupted, StopAtOnce

log = logging.getLogger("finetune_cli")


def run(
    cfg: Config,
    out_dir: Path,
    resolved: Dict[str, Any],
    label: Optional[str] = None,
    command: str = "finetune-cli",
) -> Dict[str, Any]:
    """Returns the run's summary (also in ``out_dir/summary.json``). One process at a time runs
    in a folder; what an earlier one left half-saved is cleared first."""
    check(cfg)
    main = world.from_env().main  # with several processes, rank 0 alone writes in the folder
    with StopAtOnce(), folder_lock(out_dir) if main else contextlib.nullcontext():
        recorder = Recorder(out_dir, command, writes=main)
        try:
            stale = remove_stale_temporaries(out_dir) if main else []
            if stale:
                log.info(f"Removed {len(stale)} temporary file(s) of a save that never finished: "
                         f"{', '.join(p.name for p in stale[:3])}{' ...' if len(stale) > 3 else ''}")
            return _run(cfg, resolved, label, recorder)
        except Interrupted as exc:  # a signal before the epochs (the epoch loop records its own)
            raise recorder.interrupted(exc) from None
        except Exception as exc:
            recorder.failed(exc)
            raise


def _run(cfg: Config, resolved: Dict[str, Any], label: Optional[str], recorder: Recorder) -> Dict[str, Any]:
    out_dir = recorder.out_dir
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)  # every process builds the same model
    if cfg.preview == PreviewMode.augment:
        return preview_augmentation(cfg, recorder)
    ckpt = None if cfg.plan else read_resume(cfg.trainer.resume, out_dir)
    refuse_changed_settings(ckpt, resolved)
    done = finished_before_build(ckpt, resolved)
    if done:
        return already_finished(done.checkpoint, done.finished)

    parts = build(cfg, recorder, resolved, training=not cfg.plan)
    summary = show_plan(cfg, parts, label, out_dir)
    if cfg.plan:
        return recorder.planned(summary, parts.splits.classes)
    if cfg.task == Task.lr_find:
        return find_learning_rate(cfg, parts, summary, recorder)

    start = resume(parts.state, ckpt, parts.controller.epochs, cfg.model.name, parts.splits.classes)
    here = parts.env.world
    if here.distributed:
        world.same_as_main(parts.model)  # whatever each process drew or read, rank 0's weights
        saved = len(ckpt.get("rng_ranks") or [ckpt["rng"]]) if start.checkpoint and ckpt else 0
        if not here.main and here.rank >= saved:  # each draws its own augmentations from here on (a resumed
            # process the saved run had continues its saved streams)
            seed_everything(cfg.trainer.seed + here.rank + 7919 * start.saved_epoch, cfg.trainer.deterministic)
    if start.finished:
        return already_finished(start.checkpoint, start.finished)

    recorder.begin(summary, parts.splits.classes, logger=cfg.logger, config=resolved)
    if start.checkpoint:
        recorder.resumed(start.checkpoint, start.saved_epoch, start.history, start.events)
    ending = fit(parts, start, recorder)
    return recorder.completed(**ending)


def already_finished(checkpoint: Path, why: str) -> Dict[str, Any]:
    """A resubmitted job whose run is complete: say so, write nothing, succeed."""
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    log.info(
        f"Nothing to train: {checkpoint} is from a finished run ({why}); its files are left as they are. "
        f"To train further from its weights, start a new run with model.weights={run_dir / 'checkpoints' / 'best.pt'}."
    )
    return read_summary(run_dir) or {"status": "completed", "output_dir": str(run_dir)}


def preview_augmentation(cfg: Config, recorder: Recorder) -> Dict[str, Any]:
    """Write the augmentation preview and stop: no model, no download, no pretraining."""
    synthetic = cfg.model.weights == "synthetic"
    choice = WeightsChoice("none") if synthetic else resolve_weights(cfg.model.name, cfg.model.weights)
    pre = preprocess_for(cfg.model.name, choice, cfg.data.image_size)
    splits = load_data(cfg.data, cfg.augment, pre, cfg.trainer.seed, cache_dir(cfg.cache_dir), recorder.skipped_images)
    if not recorder.writes:  # several processes (torchrun): rank 0 draws the picture
        return {"status": "previewed"}
    path = write_preview(
        splits.train, splits.classes, pre, recorder.out_dir / "augment_preview.png",
        count=cfg.preview_images, seed=cfg.trainer.seed, mixer=make_mixer(cfg.augment, len(splits.classes)),
    )
    log.info(f"augment={cfg.augment.name.value}: {cfg.preview_images} training images as the model sees them "
             f"({pre.crop_size}px) written to {path}")
    return recorder.preview({"status": "previewed", "preview": str(path), "augment": cfg.augment.name.value})


def find_learning_rate(cfg: Config, parts: Parts, summary: Dict[str, Any], recorder: Recorder) -> Dict[str, Any]:
    """task=lr_find: an exponential LR sweep on the run's parts, which are left as they were."""
    lf, mult = cfg.lr_find, parts.controller.lr_mult
    units = LRUnits(cfg.optimizer.lr, parts.lrs[-1] * mult, cfg.strategy.group_lrs, cfg.strategy.lr_scale, mult)
    return run_lr_find(parts, SweepSettings(lf.start_lr, lf.end_lr, lf.steps, lf.diverge, lf.smoothing), lf.rule, units,
                       summary, recorder, f"{cfg.model.name}, strategy={summary['strategy']}: LR finder")
