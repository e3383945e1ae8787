"""Checkpoints: the file format, finding and reading one, and the training state it holds."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from finetune_cli import world
from finetune_cli.data.folders import class_names
from finetune_cli.errors import FinetuneError, Refused, Truncated
from finetune_cli.io_utils import safe_torch_load
from finetune_cli.runtime import rng_state, set_rng_state
from finetune_cli.train.callbacks import MetricTracker
from finetune_cli.train.optim import Schedule
from finetune_cli.train.strategies import Controller

log = logging.getLogger("finetune_cli")

CHECKPOINT_FORMAT = "finetune-cli/1"


def read_checkpoint(path: Path) -> Dict[str, Any]:
    """A checkpoint's contents, read with ``weights_only=True``: a file that would run code when
    unpickled is refused, naming what it tried to load."""
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise FinetuneError(
            f"{path} is not a finetune-cli checkpoint (no '{CHECKPOINT_FORMAT}' marker). To start training "
            f"from its weights, use model.weights={path}."
        )
    return ckpt


def resolve_checkpoint(spec: str, prefer: str = "best.pt") -> Path:
    path = Path(spec).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / prefer, path / prefer, path / "checkpoints" / "last.pt"):
            if candidate.is_file():
                return candidate
    if not path.is_file():
        raise FinetuneError(f"No checkpoint at {spec}: give a .pt file or a run folder holding checkpoints/{prefer}.")
    return path


# --- the training state a checkpoint holds ---------------------------------------------------


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
    critic: Optional[nn.Module] = None  # adapt=dann: the domain classifier
    ema: Optional[Any] = None  # trainer.ema: ema.WeightAverage
    serve_ema: bool = False  # the monitor watches the average: inference takes its weights (models.weights.serving)
    # LoRA with strategy.lora_save=adapter: the weights the run never trains, left out of every
    # checkpoint (read again from model.weights), and their digest
    left_out: Tuple[str, ...] = ()
    base_digest: Optional[str] = None

    def model_state(self) -> Dict[str, torch.Tensor]:
        state = self.model.state_dict()
        if not self.left_out:
            return state
        gone = set(self.left_out)
        return {k: v for k, v in state.items() if k not in gone}

    def checkpoint(self, epoch: int, **extra: Any) -> Dict[str, Any]:
        base = {"base": {"left_out": len(self.left_out), "sha256": self.base_digest}} if self.left_out else {}
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "model": self.model_state(),
            **base,
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "tracker": self.tracker.state_dict(),
            "strategy": self.controller.state_dict(),
            **({"domain_classifier": self.critic.state_dict()} if self.critic is not None else {}),
            **({"ema": self.ema.state_dict(self.left_out)} if self.ema is not None else {}),
            **({"serve": "ema"} if self.serve_ema else {}),
            **self._random_streams(),
            **extra,
        }

    def _random_streams(self) -> Dict[str, Any]:
        """Rank 0's random streams, and with several processes each one's (a collective call)."""
        mine = rng_state(self.loader_generator)
        if not world.from_env().distributed:
            return {"rng": mine}
        every = world.gathered(mine)
        return {"rng": every[0], "rng_ranks": every}

    def restore(self, ckpt: Dict[str, Any]) -> int:
        """Load a checkpoint; returns the first epoch still to run. The optimizer goes before the
        schedule, whose gate sits on the optimizer's LRs; the random streams go last."""
        load_model_state(self.model, ckpt, self.base_digest)
        if self.critic is not None:
            self.critic.load_state_dict(ckpt["domain_classifier"])
        if self.ema is not None:
            self.restore_ema(ckpt)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["schedule"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.tracker.load_state_dict(ckpt["tracker"])
        self.controller.load_state_dict(ckpt["strategy"])
        here = world.from_env()
        ranks = ckpt.get("rng_ranks") or [ckpt["rng"]]
        if here.rank < len(ranks):  # (a process the saved run did not have keeps its own seeded streams)
            set_rng_state(ranks[here.rank], self.loader_generator)
        return int(ckpt["epoch"]) + 1

    def restore_ema(self, ckpt: Dict[str, Any]) -> None:
        """The saved average; a checkpoint of a run without trainer.ema starts it from the weights."""
        if "ema" in ckpt:
            self.ema.load_state_dict(ckpt["ema"])
            return
        log.warning(f"{ckpt.get('path', 'The checkpoint')} holds no moving average of the weights (its run had "
                    "trainer.ema off): the average starts from the weights it holds.")
        self.ema.averaged.n_averaged.zero_()
        self.ema.update(self.model)

    def restore_weights(self, ckpt: Dict[str, Any]) -> None:
        """Weights and optimizer moments from an earlier epoch (a stage's best), keeping the
        LRs, the schedule and everything else where the run is now."""
        load_model_state(self.model, ckpt, self.base_digest)
        if self.ema is not None:
            self.restore_ema(ckpt)
        current = self.optimizer.state_dict()
        current["state"] = ckpt["optimizer"]["state"]
        self.optimizer.load_state_dict(current)


def load_model_state(model: nn.Module, ckpt: Dict[str, Any], base_digest: Optional[str]) -> None:
    """The checkpoint's weights into ``model``. A checkpoint of LoRA adapters alone
    (strategy.lora_save=adapter) loads into a model whose other weights were read from the run's
    model.weights: those must be the ones it was trained on (their digest), and exactly the keys it left out."""
    base = ckpt.get("base")
    if not base:
        model.load_state_dict(ckpt["model"])
        return
    if base.get("sha256") != base_digest:
        weights = ((ckpt.get("config") or {}).get("model") or {}).get("weights")
        raise FinetuneError(
            f"{ckpt.get('path', 'The checkpoint')} holds LoRA adapters only (strategy.lora_save=adapter): its other "
            f"weights come from model.weights={weights}, and the weights read from there now are not the ones it was "
            "trained on (another file, or synthetic weights pretrained again). Give the same weights, or train with "
            "strategy.lora_save=full, whose checkpoints hold every weight."
        )
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if unexpected or len(missing) != base.get("left_out"):
        raise FinetuneError(
            f"{ckpt.get('path', 'The checkpoint')} holds LoRA adapters that do not fit this model "
            f"({len(unexpected)} unexpected tensors, {len(missing)} missing where {base.get('left_out')} were left out): "
            "use the model, strategy.lora_* settings and head it was saved with."
        )


def finished_reason(ckpt: Dict[str, Any], epochs: int, patience: Optional[int] = None) -> Optional[str]:
    """Why the run that saved ``ckpt`` has nothing left to train, or None. ``epochs`` and
    ``patience``: this run's settings (checkpoints of earlier versions carry no ``finished``)."""
    if ckpt.get("finished"):
        return str(ckpt["finished"])
    if int(ckpt["epoch"]) >= epochs:
        return f"all {epochs} epochs ran"
    if (ckpt.get("strategy") or {}).get("finished"):
        return "the strategy's last stage stopped early"
    if patience is not None and (ckpt.get("tracker") or {}).get("bad_epochs", 0) >= patience:
        return f"early stopping after {patience} epochs without improvement"
    return None


def _setting(config: Optional[Dict[str, Any]], *keys: str) -> Any:
    for key in keys:
        config = (config or {}).get(key)
    return config


def finished_before_build(ckpt: Optional[Dict[str, Any]], resolved: Dict[str, Any]) -> Optional[Start]:
    """Whether ``ckpt``'s run is complete under the same model, data and length settings, decided before
    anything is built (no download, no data check): a resubmitted finished job does no work."""
    if ckpt is None:
        return None
    same = [("model", "name"), ("data",), ("trainer", "epochs"), ("strategy", "name"), ("strategy", "stages")]
    if any(_setting(ckpt.get("config"), *k) != _setting(resolved, *k) for k in same):
        return None  # decided after the build, against the run's own plan
    planned = ckpt.get("planned_epochs")
    why = ckpt.get("finished") or (f"all {planned} epochs ran" if planned and ckpt["epoch"] >= planned else None)
    return Start(int(ckpt["epoch"]) + 1, Path(ckpt["path"]), finished=why) if why else None


# --- resuming --------------------------------------------------------------------------------

# Settings a resumed run may change: where files are, which device and how fast, what is shown.
# Any other difference from the checkpoint's run would train something else than that run.
FREE_TO_CHANGE = (
    "trainer.resume", "trainer.device", "trainer.save_every", "trainer.amp", "trainer.channels_last",
    "trainer.compile", "trainer.deterministic", "data.root", "data.csv", "data.num_workers", "data.check_images",
    "data.on_bad_image", "data.max_image_pixels", "data.cache_features", "data.reduced_decode", "logger",
    "plan", "preview", "preview_images", "cache_dir",
)


def _flat(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(saved: Optional[Dict[str, Any]], now: Dict[str, Any]) -> List[str]:
    """``key: saved -> now`` for each setting that differs and changes what trains (keys that one
    side lacks, from another version of the tool, are not compared)."""
    before, after = _flat(saved or {}), _flat(now)

    auto = "auto" in (before.get("strategy.name"), after.get("strategy.name"))

    def free(key: str) -> bool:
        if key.startswith("strategy.auto_") and not auto:
            return True  # strategy=auto's own settings: no other strategy reads them
        return any(key == f or key.startswith(f + ".") for f in FREE_TO_CHANGE)

    changes = {k: f"{k}: {before[k]} -> {after[k]}" for k in sorted(set(before) & set(after))
               if not free(k) and before[k] != after[k]}
    batch_keys = ("trainer.devices", "data.batch_size", "trainer.accumulate")
    if set(batch_keys) & set(changes):
        was, now_ = _global_batch(before), _global_batch(after)
        if was is not None and was == now_:  # the same batch per update, over other processes or accumulated
            for key in batch_keys:
                changes.pop(key, None)
        elif was is not None and "trainer.devices" in changes and now_ is not None:
            per = was / max(1, int(str(after["trainer.devices"])))
            hint = f"data.batch_size={int(per)}" if per == int(per) else "a number of processes that divides it"
            changes["trainer.devices"] += (f" (the global batch was {was}, now {now_}: with another number of "
                                           f"processes keep it, {hint})")
    return list(changes.values())


def _global_batch(flat: Dict[str, Any]) -> Optional[int]:
    """The images of one optimizer step: data.batch_size x trainer.devices x trainer.accumulate,
    where the first two are numbers."""
    devices, batch = str(flat.get("trainer.devices", "1")).strip(), flat.get("data.batch_size")
    accumulate = int(flat.get("trainer.accumulate", 1))
    return int(batch) * int(devices) * accumulate if devices.isdigit() and isinstance(batch, int) else None


def settings_check(spec: Optional[str], run_dir: Path, resolved: Dict[str, Any]) -> None:
    """The changed-settings refusal, before the run folder is touched (the CLI calls it before
    Hydra writes the folder's .hydra/config.yaml)."""
    path = checkpoint_path(spec, run_dir)
    if path is None:
        return
    ckpt = read_or_fall_back(path, spec, run_dir)
    refuse_changed_settings(ckpt, resolved)
    data = resolved.get("data") or {}
    train = Path(str(data.get("root"))).expanduser() / "train"
    if data.get("source") == "imagefolder" and train.is_dir():
        refuse_other_run(ckpt, (resolved.get("model") or {}).get("name"), class_names(train))


def refuse_other_run(ckpt: Dict[str, Any], model_name: str, classes: List[str]) -> None:
    if ckpt["model_name"] != model_name or ckpt["classes"] != classes:
        raise Refused(
            f"{ckpt['path']} was saved for {ckpt['model_name']} with classes {ckpt['classes'][:5]}..., but this run "
            f"has {model_name} with classes {classes[:5]}...: resume with the run's own model and data. Nothing "
            "was changed."
        )


def _restoring(saved: Optional[Dict[str, Any]], changes: List[str]) -> str:
    """The overrides that give back the checkpoint's own settings, such as ``strategy.bn=frozen_eval``
    (a default of an earlier version differs as much as an override does)."""
    before = _flat(saved or {})
    words, rest = [], []
    for key in (c.split(":", 1)[0] for c in changes):
        value = before.get(key)
        if isinstance(value, (list, dict)):
            rest.append(key)  # a list of stages, say: not one word on a command line
        else:
            words.append(f"{key}={'null' if value is None else str(value).lower() if isinstance(value, bool) else value}")
    parts = (["add " + " ".join(words)] if words else []) + ([f"its {', '.join(rest)} as saved"] if rest else [])
    return ", and ".join(parts)


def refuse_changed_settings(ckpt: Optional[Dict[str, Any]], resolved: Dict[str, Any]) -> None:
    """Resuming continues the checkpoint's run exactly, or does not happen: never a mix of its
    state (mask, optimizer, schedule) with other settings."""
    changes = changed_settings((ckpt or {}).get("config"), resolved)
    if not changes:
        return
    path = Path(ckpt["path"])
    best = path.parent / "best.pt"
    epochs = any(c.startswith("trainer.epochs:") for c in changes)
    raise Refused(
        f"Cannot resume {path}: resuming continues that run exactly, and these settings differ from the "
        f"ones it trained with: {'; '.join(changes[:8])}{' ...' if len(changes) > 8 else ''}."
        + (" (Its LR schedule was laid out for its own number of epochs: a longer or shorter run needs "
           "a schedule of its own.)" if epochs else "")
        + f" To continue it, resume with its settings ({_restoring(ckpt.get('config'), changes)}). To train on from its weights "
        f"with the new settings, start a new run in a new folder: model.weights={best if best.is_file() else path}, "
        "without trainer.resume. Nothing was changed."
    )


@dataclass
class Start:
    """Where ``fit`` begins: epoch 1, or after a checkpoint's epoch."""

    epoch: int = 1
    checkpoint: Optional[Path] = None
    history: List[Dict[str, Any]] = field(default_factory=list)
    events: List[Dict[str, Any]] = field(default_factory=list)
    finished: Optional[str] = None  # the checkpoint's run is complete: nothing to train

    @property
    def saved_epoch(self) -> int:
        return self.epoch - 1


def checkpoint_path(spec: Optional[str], out_dir: Path) -> Optional[Path]:
    """trainer.resume as a file: the given checkpoint or run folder, or with ``auto`` this
    folder's last.pt when there is one."""
    if not spec:
        return None
    if spec == "auto":
        own = out_dir / "checkpoints" / "last.pt"
        return own if own.is_file() else None
    return resolve_checkpoint(spec, prefer="last.pt")


def read_resume(spec: Optional[str], out_dir: Path) -> Optional[Dict[str, Any]]:
    """The checkpoint to continue from (trainer.resume, or with ``auto`` this folder's last.pt),
    read once; its ``path`` is added."""
    path = checkpoint_path(spec, out_dir)
    if path is None:
        if spec == "auto":
            log.info(f"trainer.resume=auto: no checkpoint in {out_dir} yet, starting from epoch 1. (A resubmitted "
                     "job finds its own checkpoint when its folder is fixed: hydra.run.dir=...)")
        return None
    return read_or_fall_back(path, spec, out_dir)


def read_or_fall_back(path: Path, spec: str, out_dir: Path) -> Dict[str, Any]:
    """The checkpoint at ``path``; with ``auto``, when last.pt is truncated or corrupt, the newest
    intact one of the folder (epoch_NNN.pt, best.pt) instead. Its ``path`` is added."""
    try:
        ckpt = read_checkpoint(path)
    except Truncated as exc:
        if spec != "auto":
            raise
        intact = []
        for candidate in sorted(path.parent.glob("*.pt")):
            if candidate != path:
                try:
                    intact.append((read_checkpoint(candidate), candidate))
                except FinetuneError:
                    continue
        if not intact:
            raise FinetuneError(f"{exc} No other checkpoint in {path.parent} is intact: start again without "
                                "trainer.resume, in a new folder.") from None
        ckpt, path = max(intact, key=lambda found: int(found[0].get("epoch", 0)))
        log.warning(f"{exc} Resuming from {path} instead (epoch {ckpt['epoch']}), the newest intact checkpoint.")
    ckpt["path"] = str(path)
    return ckpt


def resume(state: TrainState, ckpt: Optional[Dict[str, Any]], epochs: int, model_name: str, classes: List[str]
           ) -> Start:
    """Restore ``ckpt`` into ``state`` (the strategy's mask included), or start at epoch 1."""
    if ckpt is None:
        return Start()
    refuse_other_run(ckpt, model_name, classes)
    finished = finished_reason(ckpt, epochs, state.tracker.patience)
    if finished:
        return Start(int(ckpt["epoch"]) + 1, Path(ckpt["path"]), finished=finished)
    first = state.restore(ckpt)
    log.info(f"Resumed from {ckpt['path']} after epoch {ckpt['epoch']}: "
             f"{state.controller.recipe.describe_k(state.controller.k)} train.")
    return Start(first, Path(ckpt["path"]), list(ckpt.get("history", [])), list(ckpt.get("events", [])))
