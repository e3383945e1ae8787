"""A strategy's configuration resolved for one model: how many groups below the head train,
the stages of a staged run, and the choice ``strategy=auto`` makes from the dataset size.

Every strategy is expressed as *how many groups below the head train*, counted from the top:
linear probe 0, full all, freeze_early all but the first K, partial K. Progressive and staged
strategies change that number during the run (see ``strategies.Controller``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from finetune_cli.config import StrategyConfig, StrategyName, Trigger
from finetune_cli.errors import FinetuneError


@dataclass(frozen=True)
class Stage:
    first_epoch: int
    epochs: int
    k: int
    lr_mult: float
    patience: Optional[int]

    @property
    def last_epoch(self) -> int:
        """As planned: a stage that stops early moves the later ones forward."""
        return self.first_epoch + self.epochs - 1


@dataclass(frozen=True)
class Recipe:
    """What a strategy does on a model whose groups are ``names`` (stem first, head last)."""

    kind: StrategyName  # never auto: auto resolves to the strategy it chose
    names: List[str]
    k: int  # groups below the head that train (the first stage's for staged runs; 0 for progressive)
    lr_decay: float
    epochs: int  # the run's length (a staged run's is the sum of its stages)
    until: int = 0  # progressive: how many groups below the head train at most
    every: int = 1  # progressive by epochs
    trigger: Trigger = Trigger.epochs
    plateau_patience: int = 1
    stages: List[Stage] = field(default_factory=list)
    decision: Optional[Dict[str, Any]] = None  # what strategy=auto chose and why
    also: Optional[str] = None  # parameters that train in frozen groups too: "bias" (bitfit) or "norm"
    only: Optional[str] = None  # what a training group below the head trains, if not all: "lora" (its LoRA matrices)

    @property
    def below(self) -> int:
        return len(self.names) - 1

    @property
    def max_k(self) -> int:
        """The most groups below the head that train at any point of the run."""
        if self.stages:
            return max(s.k for s in self.stages)
        return self.until if self.kind == StrategyName.progressive else self.k

    @property
    def head_only(self) -> bool:
        """Nothing below the head trains at any point of the run (its features can be cached)."""
        return self.max_k == 0 and self.also is None

    @property
    def progressive_by_epochs(self) -> bool:
        return self.kind == StrategyName.progressive and self.trigger == Trigger.epochs

    def describe_k(self, k: int) -> str:
        if k == 0:
            return {"bias": "head + every bias", "norm": "head + norm layers"}.get(self.also or "", "head only")
        lora = "LoRA in " if self.only == "lora" else ""
        if k == self.below:
            return "head + LoRA in every group" if lora else "all groups"
        return "head + " + lora + ", ".join(self.names[self.below - k : self.below])


def _check_k(key: str, value: int, names: Sequence[str]) -> int:
    below = len(names) - 1
    if not 0 <= value <= below:
        raise FinetuneError(
            f"{key}={value} is out of range: this model has {below} groups below the head "
            f"({', '.join(names[:-1])}); choose 0 to {below}."
        )
    return value


def choose_auto(cfg: StrategyConfig, below: int, images_per_class: float):
    """``strategy=auto``: the strategy, its k and LR decay, and the decision in words."""
    if images_per_class < cfg.auto_small:
        name, k, decay = StrategyName.linear_probe, 0, cfg.lr_decay
        why = f"< auto_small={cfg.auto_small}: few images, train the head only"
    elif images_per_class < cfg.auto_large:
        name, k, decay = StrategyName.freeze_early, below - below // 2, cfg.lr_decay
        why = f"< auto_large={cfg.auto_large}: freeze the early half ({below // 2} of {below} groups below the head)"
    else:
        name, k = StrategyName.full, below
        decay = cfg.lr_decay if cfg.lr_decay != 1.0 else cfg.auto_lr_decay
        why = f">= auto_large={cfg.auto_large}: full fine-tuning with LRs divided by {decay} per group"
    decision = {
        "images_per_class": round(images_per_class, 1),
        "auto_small": cfg.auto_small,
        "auto_large": cfg.auto_large,
        "chose": name.value,
        "reason": f"{images_per_class:.1f} training images per class {why}",
    }
    return name, k, decay, decision


def parse_stages(cfg: StrategyConfig, names: Sequence[str]) -> List[Stage]:
    if not cfg.stages:
        raise FinetuneError(
            "strategy=staged needs strategy.stages: a list of {epochs, train_groups, lr_mult, "
            "patience}; see strategy=two_phase for an example."
        )
    stages, first = [], 1
    for i, s in enumerate(cfg.stages):
        if s.epochs < 1:
            raise FinetuneError(f"strategy.stages[{i}].epochs must be 1 or more (got {s.epochs}).")
        k = len(names) - 1 if s.train_groups < 0 else _check_k(f"strategy.stages[{i}].train_groups", s.train_groups, names)
        stages.append(Stage(first, s.epochs, k, s.lr_mult, s.patience))
        first += s.epochs
    return stages


def resolve(cfg: StrategyConfig, names: List[str], *, epochs: int, images_per_class: Optional[float] = None) -> Recipe:
    below = len(names) - 1
    until = below if cfg.until < 0 else cfg.until
    if not 0 <= until <= below:
        raise FinetuneError(
            f"strategy.until={cfg.until} is out of range: choose 0 to {below} groups below "
            f"the head ({', '.join(names[:-1])}), or -1 for all."
        )
    if cfg.every < 1:
        raise FinetuneError(f"strategy.every must be 1 or more (got {cfg.every}).")
    name, decay, decision, stages = cfg.name, cfg.lr_decay, None, []
    if cfg.lora and name == StrategyName.auto:
        raise FinetuneError(
            "strategy=auto chooses its strategy from the dataset size, and strategy.lora=true needs one that trains "
            "groups below the head: choose it yourself, e.g. strategy=lora (LoRA in every group) or "
            "strategy=progressive strategy.lora=true."
        )
    if name == StrategyName.auto:
        if images_per_class is None:
            raise ValueError("strategy=auto needs the number of images per class")
        name, k, decay, decision = choose_auto(cfg, below, images_per_class)
    elif name == StrategyName.linear_probe:
        k = 0
    elif name == StrategyName.full:
        k = below
    elif name == StrategyName.freeze_early:
        k = below - _check_k("strategy.freeze_groups", cfg.freeze_groups, names)
    elif name == StrategyName.partial:
        k = _check_k("strategy.train_groups", cfg.train_groups, names)
    elif name in (StrategyName.bitfit, StrategyName.norm):
        k = 0  # every group below the head frozen but for its biases or normalization parameters
    elif name == StrategyName.staged:
        stages = parse_stages(cfg, names)
        k, epochs = stages[0].k, sum(s.epochs for s in stages)
    else:  # progressive starts with the head alone
        k = 0
    recipe = Recipe(kind=name, names=list(names), k=k, lr_decay=decay, epochs=epochs, until=until, every=cfg.every,
                    trigger=cfg.trigger, plateau_patience=cfg.plateau_patience, stages=stages, decision=decision,
                    also={StrategyName.bitfit: "bias", StrategyName.norm: "norm"}.get(name),
                    only="lora" if cfg.lora else None)
    if recipe.only and recipe.max_k == 0:
        raise FinetuneError(
            f"strategy.lora=true trains LoRA matrices in the groups a strategy trains below the head, and "
            f"strategy.name={name.value} trains none there{' (strategy.until=0)' if name == StrategyName.progressive else ''}: "
            "use strategy=lora (LoRA in every group), or progressive, partial, freeze_early or staged with "
            "strategy.lora=true."
        )
    return recipe
