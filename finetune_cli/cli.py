"""The ``finetune-cli`` entrypoint (Hydra)."""

from __future__ import annotations

import copy
import logging
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from finetune_cli.config import register_configs
from finetune_cli.errors import FinetuneError
from finetune_cli.paths import conf_dir

log = logging.getLogger("finetune_cli")


def unique_dir(path: str) -> str:
    """Create ``path`` — or ``path-2``, ``path-3``... if taken — and return the name created.

    Registered with caching, so a run (and every job of a sweep) resolves it once.
    """
    base = Path(path)
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return str(candidate)
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")


class RunHooks(Callback):
    """Checks the config before any folder exists; lists a sweep's results at its end."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra turns exceptions raised in callbacks into warnings, so exit here directly.
        # (A sweep is checked job by job instead: its base config lacks the swept values.)
        from finetune_cli.checks import check, typed_config

        try:
            check(typed_config(_without_hydra(config)))
        except FinetuneError as exc:
            print(str(exc), file=sys.stderr)
            raise SystemExit(1) from None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from finetune_cli.tools.sweep import show_sweep

        show_sweep(Path(config.hydra.sweep.dir))


def _without_hydra(config: DictConfig) -> DictConfig:
    cfg = copy.deepcopy(config)
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True, replace=True)
register_configs()


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    from finetune_cli.checks import typed_config
    from finetune_cli.record import mark_failed
    from finetune_cli.run import run

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    overrides = " ".join(hc.overrides.task) or "(none)"
    log.info(f"finetune-cli: overrides {overrides}; output {out_dir}")
    try:
        summary = run(
            typed_config(cfg),
            out_dir,
            OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
            label=hc.runtime.choices.get("strategy"),
            command=" ".join(
                ["finetune-cli"]
                + [shlex.quote(o) for o in hc.overrides.hydra if not o.startswith("hydra.mode=")]
                + [shlex.quote(o) for o in hc.overrides.task if not o.startswith("trainer.resume=")]
            ),
        )
    except FinetuneError as exc:
        log.error(str(exc))
        mark_failed(out_dir, exc)
        if hc.mode == RunMode.MULTIRUN:
            raise  # the sweep records the failure and goes on with the other jobs
        raise SystemExit(1) from None
    except Exception as exc:
        mark_failed(out_dir, exc)
        raise
    best = summary.get("best")
    return best["value"] if best else None


__all__ = ["main", "RunHooks", "unique_dir"]
