import logging
import shlex
import sys
from pathlib import Path
from typing import Sequence, Tuple

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `helpers` for tests in sub-folders too


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache (synthetic datasets and weights) shared by every test of the session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _isolated_cache(cache_dir, monkeypatch):
    monkeypatch.setenv("FINETUNE_CLI_CACHE", str(cache_dir))


def compose_config(overrides: Sequence[str] = ()):
    """The config the CLI would compose for ``overrides``, and the strategy option chosen.

    Returns ``(cfg, strategy_choice)`` with the ``hydra`` node removed, as the CLI's task sees it.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    import finetune_cli.cli  # noqa: F401  (registers the schema and the unique_dir resolver)
    from finetune_cli.paths import conf_dir

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    label = cfg.hydra.runtime.choices.get("strategy")
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, label


@pytest.fixture
def finetune(tmp_path, monkeypatch, caplog):
    """Run ``finetune_cli.run.run`` in this process, as ``finetune-cli OVERRIDES`` would.

    ``finetune(*overrides, name="run") -> (summary, run_dir)``: composes the config with Hydra's
    compose API, checks it (before any folder exists, as the CLI does), creates a fresh folder
    ``tmp_path/runs/<name>`` (``<name>-2``, ... when taken) and runs there. On an error the run's
    summary.json is marked failed and the exception propagates, so use ``pytest.raises``.
    The run's log lines are in ``caplog.text`` (INFO and up); the working directory is ``tmp_path``.
    """
    from omegaconf import OmegaConf

    from finetune_cli.checks import check, typed_config
    from finetune_cli.cli import unique_dir
    from finetune_cli.run import mark_failed, run

    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="finetune_cli")

    def _run(*overrides: str, name: str = "run") -> Tuple[dict, Path]:
        cfg, label = compose_config(overrides)
        typed = typed_config(cfg)
        check(typed)
        out_dir = Path(unique_dir(str(tmp_path / "runs" / name)))
        resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        command = " ".join(["finetune-cli", *(shlex.quote(o) for o in overrides)])
        try:
            summary = run(typed, out_dir, resolved, label=label, command=command)
        except Exception as exc:
            mark_failed(out_dir, exc)
            raise
        return summary, out_dir

    return _run

