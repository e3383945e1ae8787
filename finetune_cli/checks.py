"""Checks on a composed config that the schema's types cannot express.

They run before the run folder is created; every problem found is reported at once.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import typing
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf

from finetune_cli.config import RANDOM_NAMES, Config, DataSource, Device, RegularizerName
from finetune_cli.errors import FinetuneError
from finetune_cli.tracking import logger_problems

# The settings' own checks import neither torch nor torchvision (about 5 s): a mistyped number is
# answered at once. Only what needs them (model and weights names, the GPU) imports them.


def unknown_keys(node: Any, schema: type, prefix: str = "") -> List[str]:
    """Keys in a composed config that the dataclass schema does not declare (``+key=value``
    can append them past Hydra's checks)."""
    declared = {f.name: f.type for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    found = []
    for key in node.keys():
        if key not in declared:
            found.append(f"{prefix}{key}")
            continue
        sub = hints.get(key)
        if dataclasses.is_dataclass(sub) and isinstance(node[key], DictConfig):
            found += unknown_keys(node[key], sub, f"{prefix}{key}.")
    return found


def typed_config(cfg: DictConfig) -> Config:
    """The composed config as a ``Config`` instance; unknown keys are an error."""
    extra = unknown_keys(cfg, Config)
    if extra:
        raise FinetuneError(
            f"Unknown config key(s): {', '.join(extra)}. Check the spelling; "
            "`finetune-cli --cfg job` prints every valid key with its current value."
        )
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def problems(cfg: Config) -> List[str]:
    """Every problem found in the config, each a sentence naming the key and the remedy."""
    return _setup_problems(cfg) + settings_problems(cfg)


def settings_problems(cfg: Config) -> List[str]:
    """The problems found without torch: paths, ranges, probabilities, patiences."""
    return (_data_problems(cfg) + _augment_problems(cfg) + _training_problems(cfg) + patience_problems(cfg)
            + range_problems(cfg) + lr_find_problems(cfg))


INF = math.inf
# (key, low, high, bounds, meaning): the values each number may take; "[)" is low <= v < high.
RANGES = [
    ("model.head_hidden", 1, INF, "[)", "the hidden layer's width"),
    ("model.aux_weight", 0, INF, "[)", "the weight of each auxiliary loss"),
    ("adapt.weight", 0, INF, "[)", "the domain loss's weight"),
    ("adapt.hidden", 1, INF, "[)", "the domain classifier's width"),
    ("strategy.train_groups", 0, INF, "[)", "layer groups below the head that train"),
    ("strategy.lr_decay", 1, INF, "[)", "the LR divisor from one group to the next one down (1: equal LRs)"),
    ("strategy.auto_lr_decay", 1, INF, "[)", "the LR divisor from one group to the next one down"),
    ("strategy.every", 1, INF, "[)", "epochs between unfreezes"),
    ("strategy.until", -1, INF, "[)", "groups below the head that end up training; -1 = all"),
    ("strategy.lora_rank", 1, INF, "[)", "the rank of the LoRA matrices"),
    ("strategy.lora_alpha", 0, INF, "()", "LoRA's alpha (its update is scaled by alpha / rank)"),
    ("strategy.lora_dropout", 0, 1, "[)", "the dropout on LoRA's input"),
    ("optimizer.weight_decay", 0, INF, "[)", "the decoupled weight decay"),
    ("optimizer.momentum", 0, 1, "[)", "SGD momentum"),
    ("optimizer.betas", 0, 1, "[)", "Adam's moving-average factors"),
    ("schedule.warmup_epochs", 0, INF, "[)", "epochs of linear warm-up"),
    ("schedule.warmup_start_factor", 0, 1, "(]", "the warm-up's first LR as a fraction of the LR"),
    ("schedule.min_lr_ratio", 0, 1, "[]", "the cosine floor as a fraction of the LR"),
    ("schedule.step_epochs", 1, INF, "[)", "epochs between step decays"),
    ("schedule.gamma", 0, 1, "(]", "the LR decay factor"),
    ("schedule.restart_epochs", 1, INF, "[)", "the first cosine cycle's epochs"),
    ("schedule.restart_mult", 1, INF, "[)", "the cycle length multiplier"),
    ("schedule.pct_start", 0, 1, "()", "the share of steps spent rising"),
    ("schedule.plateau_patience", 0, INF, "[)", "epochs without improvement before the LR drops"),
    ("schedule.cut_frac", 0, 1, "()", "the share of steps spent rising"),
    ("schedule.ratio", 1, INF, "[)", "how much smaller the lowest LR is than the peak"),
    ("trainer.grad_clip", 0, INF, "()", "the largest gradient norm; null = no clipping"),
    ("trainer.accumulate", 1, INF, "[)", "batches per optimizer step (1: every batch steps)"),
    ("trainer.ema", 0, 1, "()", "the moving average's decay per update (e.g. 0.999); null = off"),
    ("trainer.min_delta", 0, INF, "[)", "the smallest change that counts as an improvement"),
    ("trainer.save_every", 0, INF, "[)", "epochs between kept checkpoints; 0 = last and best only"),
]


def _in_range(value: Any, low: float, high: float, bounds: str) -> bool:
    """NaN is in no range, and infinity in none ("[0, inf)" excludes it too)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return False
    above = low < value if bounds[0] == "(" else low <= value
    below = value < high if bounds[1] == ")" else value <= high
    return above and below


def range_problems(cfg: Config, ranges: Optional[list] = None) -> List[str]:
    """Numbers outside the values they may take (NaN and infinity included), each with its range
    (``ranges``: RANGES as it is when called, unless given)."""
    found = []
    for key, low, high, bounds, meaning in RANGES if ranges is None else ranges:
        value = operator.attrgetter(key)(cfg)
        if value is None:
            continue
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if key == "optimizer.betas" and len(values) != 2:
            found.append(f"optimizer.betas needs two numbers, [beta1, beta2] (got {values}).")
        elif not all(_in_range(v, low, high, bounds) for v in values):
            shown = "inf" if high == INF else high
            found.append(f"{key}={value if len(values) > 1 else values[0]} is out of range: {meaning} must be in "
                         f"{bounds[0]}{low}, {shown}{bounds[1]}.")
    return found


def _setup_problems(cfg: Config) -> List[str]:
    """What needs torch or torchvision: model and weights names, loader workers, the GPU."""
    import torch

    from finetune_cli.data.folders import resolve_workers
    from finetune_cli.models.factory import check_model_name
    from finetune_cli.models.weights import resolve_weights
    from finetune_cli.train.features import parse_switch

    found: List[str] = []

    def attempt(fn) -> None:
        try:
            fn()
        except FinetuneError as exc:
            found.append(str(exc))

    attempt(lambda: check_model_name(cfg.model.name))
    if not found and cfg.model.weights != "synthetic":
        attempt(lambda: resolve_weights(cfg.model.name, cfg.model.weights))
    attempt(lambda: resolve_workers(cfg.data.num_workers))
    attempt(lambda: parse_switch(cfg.data.cache_features, "data.cache_features"))
    attempt(lambda: parse_switch(cfg.trainer.channels_last, "trainer.channels_last"))
    found += logger_problems(cfg.logger)
    if cfg.trainer.resume and cfg.trainer.resume != "auto" and not Path(cfg.trainer.resume).expanduser().exists():
        found.append(f"trainer.resume={cfg.trainer.resume} does not exist: give a checkpoint file or a run folder.")
    if cfg.trainer.device == Device.cuda and not torch.cuda.is_available():
        found.append("trainer.device=cuda, but no CUDA GPU is visible to PyTorch; use trainer.device=auto or cpu.")
    if cfg.preview_images < 1:
        found.append(f"preview_images must be 1 or more (got {cfg.preview_images}).")
    return found


def _data_problems(cfg: Config) -> List[str]:
    found: List[str] = []
    data = cfg.data
    if data.source == DataSource.imagefolder:
        if not data.root:
            found.append(
                "data.root is not set. Point it at your images (data.root=DIR with DIR/train/<class>/*), "
                "or try data=synthetic, or `finetune-cli experiment=quickstart` for the offline demo."
            )
        elif Path(data.root).expanduser().is_file():
            found.append(f"data.root={data.root} is a file; point it at the folder holding train/<class>/* "
                         "(and optionally val/<class>/*).")
        elif not Path(data.root).expanduser().is_dir():
            found.append(f"data.root={data.root} does not exist (relative paths start at {Path.cwd()}).")
    elif data.source == DataSource.csv:
        if not data.csv:
            found.append("data=csv needs data.csv=FILE: a CSV file of path,label[,split] rows (paths relative to the "
                         "file's folder, or to data.root).")
        elif not Path(data.csv).expanduser().is_file():
            found.append(f"data.csv={data.csv} is not a file (relative paths start at {Path.cwd()}): give the CSV "
                         "file of path,label[,split] rows.")
        if data.root and not Path(data.root).expanduser().is_dir():
            found.append(f"data.root={data.root} is not a folder: with data=csv it is where the CSV's relative paths "
                         "start (leave it unset to start at the CSV file's folder).")
    else:
        from finetune_cli.data.synthetic import class_pool

        limit = len(class_pool("target"))
        if not 2 <= data.synthetic.classes <= limit:
            found.append(f"data.synthetic.classes must be between 2 and {limit} (got {data.synthetic.classes}).")
    if data.target_root and data.source == DataSource.synthetic and data.synthetic.target_style is not None:
        found.append("Both data.target_root and data.synthetic.target_style name a target domain; keep one "
                     "(data.synthetic.target_style=null to adapt to the folder).")
    elif data.target_root and not Path(data.target_root).expanduser().is_dir():
        found.append(f"data.target_root={data.target_root} is not a folder (relative paths start at {Path.cwd()}). "
                     "Point it at the target domain's images: DIR/train/ or DIR itself, and DIR/val/<class>/* "
                     "for the target's accuracy.")
    if data.synthetic.target_style is not None and data.source != DataSource.synthetic:
        found.append("data.synthetic.target_style only applies to data=synthetic; with your own images give the "
                     "target domain's folder as data.target_root=DIR.")
    if data.batch_size <= 0:
        found.append(f"data.batch_size must be greater than 0 (got {data.batch_size}).")
    if data.image_size is not None and data.image_size < 16:
        found.append(f"data.image_size={data.image_size} is too small; use 16 or more (or null for the weights' size).")
    if not 0 < data.val_fraction < 1:
        found.append(f"data.val_fraction must be between 0 and 1 (got {data.val_fraction}).")
    if data.max_image_pixels < 1:
        found.append(f"data.max_image_pixels must be 1 or more (got {data.max_image_pixels}).")
    return found


def _augment_problems(cfg: Config) -> List[str]:
    found: List[str] = []
    aug = cfg.augment
    for key in ("grayscale_p", "blur_p", "erasing_p", "mix_prob", "switch_prob"):
        if not 0 <= getattr(aug, key) <= 1:
            found.append(f"augment.{key} is a probability: give a value in [0, 1] (got {getattr(aug, key)}).")
    if not 0 < aug.scale_min <= aug.scale_max <= 1:
        found.append(f"augment.scale_min and augment.scale_max need 0 < min <= max <= 1 (got {aug.scale_min}, {aug.scale_max}).")
    if not 0 <= aug.hue <= 0.5:
        found.append(f"augment.hue must be in [0, 0.5] (got {aug.hue}).")
    for key in ("rotation", "color_jitter", "mixup_alpha", "cutmix_alpha"):
        if not 0 <= getattr(aug, key) < math.inf:
            found.append(f"augment.{key} must be 0 or more (got {getattr(aug, key)}).")
    if not 0.1 <= aug.blur_sigma < math.inf:
        found.append(f"augment.blur_sigma must be at least 0.1 (got {aug.blur_sigma}).")
    return found


def _training_problems(cfg: Config) -> List[str]:
    found: List[str] = []
    positive = {"trainer.epochs": cfg.trainer.epochs, "optimizer.lr": cfg.optimizer.lr, "strategy.lr_scale": cfg.strategy.lr_scale}
    found += [f"{k} must be greater than 0 (got {v})." for k, v in positive.items() if not 0 < v < math.inf]
    for key, value in (("trainer.label_smoothing", cfg.trainer.label_smoothing), ("model.head_dropout", cfg.model.head_dropout)):
        if not 0 <= value < 1:
            found.append(f"{key} must be in [0, 1) (got {value}).")
    st, reg = cfg.strategy, cfg.regularizer
    if st.auto_small > st.auto_large:
        found.append(f"strategy.auto_small ({st.auto_small}) must not exceed strategy.auto_large ({st.auto_large}).")
    if not 0 <= st.rewarmup_epochs < math.inf:
        found.append(f"strategy.rewarmup_epochs must be 0 or more (got {st.rewarmup_epochs}).")
    if st.freeze_groups < 0:
        found.append(f"strategy.freeze_groups must be 0 or more (got {st.freeze_groups}).")
    if reg.name == RegularizerName.ewc and (cfg.model.weights is None or cfg.model.weights.strip().lower() in RANDOM_NAMES):
        found.append(
            "regularizer=ewc weighs each weight by how much the pretrained model's own predictions depend on it, "
            f"which needs pretrained weights with their classifier; model.weights={cfg.model.weights} is random init. "
            "Give pretrained weights (DEFAULT, a file, synthetic), or use regularizer=l2sp."
        )
    if st.lora and st.lora_save.value == "adapter" and (cfg.model.weights is None
                                                         or cfg.model.weights.strip().lower() in RANDOM_NAMES):
        found.append(
            "strategy.lora_save=adapter keeps only what trains in each checkpoint and reads the frozen weights again "
            f"from model.weights, but model.weights={cfg.model.weights} is random init, which cannot be read again. "
            "Use strategy.lora_save=full, or pretrained weights (DEFAULT, a file, synthetic)."
        )
    devices = str(cfg.trainer.devices).strip().lower()
    if devices != "auto" and not (devices.isdigit() and int(devices) >= 1):
        found.append(f"trainer.devices={cfg.trainer.devices}: give the number of processes (1 or more, one per GPU), "
                     "or auto for every visible GPU.")
    if not 0 <= reg.strength < math.inf:
        found.append(f"regularizer.strength must be 0 or more (got {reg.strength}).")
    found += _adapt_problems(cfg)
    if cfg.trainer.monitor.of_ema and cfg.trainer.ema is None:
        found.append(f"trainer.monitor={cfg.trainer.monitor.value} watches the weights' moving average, but "
                     "trainer.ema is off: set trainer.ema (e.g. 0.999), or monitor "
                     f"{cfg.trainer.monitor.value.removeprefix('ema_')}.")
    if reg.fisher_root and not Path(reg.fisher_root).expanduser().is_dir():
        found.append(f"regularizer.fisher_root={reg.fisher_root} does not exist: give a folder of source-task images (DIR/<class>/*).")
    return found


def _adapt_problems(cfg: Config) -> List[str]:
    a, data = cfg.adapt, cfg.data
    has_target = bool(data.target_root) or (data.source == DataSource.synthetic and data.synthetic.target_style is not None)
    if a.name.value != "none" and not has_target:
        return [f"adapt={a.name.value} adapts to a target domain, but none is given. Set data.target_root=DIR (the target's "
                "images, unlabelled; DIR/val/<class>/* labelled for evaluation), or on synthetic data "
                "data.synthetic.target_style=shifted; or use experiment=domain_shift."]
    return []


def patience_problems(cfg: Config) -> List[str]:
    """Every patience counts epochs without improvement before something happens: 0 would mean
    "at once, every epoch", so it is refused rather than read one way or the other."""
    found = []
    settings = [("trainer.patience", cfg.trainer.patience, "early stopping", True),
                ("strategy.plateau_patience", cfg.strategy.plateau_patience, "the next group unfreezes", False)]
    settings += [(f"strategy.stages[{i}].patience", s.patience, "the stage ends early", True)
                 for i, s in enumerate(cfg.strategy.stages)]
    for key, value, what, nullable in settings:
        if value is not None and value < 1:
            off = " or null to turn it off" if nullable else ""
            found.append(f"{key}={value}: give the number of epochs without improvement before {what}, "
                         f"1 or more{off}.")
    return found


def check(cfg: Config) -> None:
    """Raise one ``FinetuneError`` listing every problem: the settings' own first, without
    importing torch, then (when those pass) what needs it."""
    found = settings_problems(cfg) or _setup_problems(cfg)
    if len(found) == 1:
        raise FinetuneError(f"Invalid configuration: {found[0]}")
    if found:
        raise FinetuneError("Invalid configuration:\n" + "\n".join(f"  - {p}" for p in found))


LR_FIND_RANGES = [
    ("lr_find.start_lr", 0, INF, "()", "the sweep's first LR"),
    ("lr_find.end_lr", 0, INF, "()", "the sweep's last LR"),
    ("lr_find.steps", 10, INF, "[)", "the sweep's steps (enough to smooth the loss and read an LR off it; 100 is usual)"),
    ("lr_find.diverge", 1, INF, "()", "the multiple of the lowest smoothed loss that stops the sweep (4 is usual; "
     "null: never)"),
    ("lr_find.smoothing", 0, 1, "[)", "the loss's moving-average factor (0.98 is usual)"),
]


def lr_find_problems(cfg: Config) -> List[str]:
    """The LR finder's settings (checked whatever the task), and what task=lr_find cannot do."""
    lf = cfg.lr_find
    found = range_problems(cfg, LR_FIND_RANGES)
    if not found and lf.start_lr >= lf.end_lr:
        found.append(f"lr_find.start_lr={lf.start_lr:g} must be below lr_find.end_lr={lf.end_lr:g}: the sweep's LR rises "
                     "from the one to the other (e.g. lr_find.start_lr=1e-7 lr_find.end_lr=10).")
    if cfg.task.value == "lr_find" and cfg.trainer.resume:
        found.append(f"trainer.resume={cfg.trainer.resume} with task=lr_find: the LR finder trains nothing and continues "
                     "no run. To sweep from a run's weights, give them as model.weights=RUN/checkpoints/best.pt "
                     "(without trainer.resume).")
    return found
