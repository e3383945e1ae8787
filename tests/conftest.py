import logging
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence, Tuple

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `helpers` for tests in sub-folders too

# The reliability figures (README, "Resuming and failures"): every test marked `fault` or
# `bad_input` is one case; it passes only when the run survived with its files whole, or the input
# was refused in one paragraph with no traceback. `kept` adds the bytes it compared.
FIGURES = {"fault": [0, 0], "bad_input": [0, 0], "bytes_checked": 0, "bytes_lost": 0, "not_run": []}


def pytest_runtest_logreport(report):
    for name, value in report.user_properties if report.when == "call" else ():  # `kept`'s, from any worker
        if name in ("bytes_checked", "bytes_lost"):
            FIGURES[name] += value
    kind = next((k for k in ("fault", "bad_input") if k in report.keywords), None)
    if kind is None:
        return
    if report.skipped:
        FIGURES["not_run"].append(report.nodeid)
    elif report.when == "call":
        FIGURES[kind][0] += 1
        FIGURES[kind][1] += report.passed


def pytest_terminal_summary(terminalreporter):
    (faults, survived), (inputs, rejected) = FIGURES["fault"], FIGURES["bad_input"]
    if not faults and not inputs:
        return
    write = terminalreporter.write_line
    write("")
    write("Reliability figures")
    write(f"  faults injected: {faults}; survived with nothing lost: {survived}")
    write(f"  bad inputs tried: {inputs}; rejected with a clear message and no traceback: {rejected}")
    write(f"  bytes of earlier files compared after a fault or a refusal: {FIGURES['bytes_checked']:,}; "
          f"bytes lost: {FIGURES['bytes_lost']:,}")
    if FIGURES["not_run"]:
        write(f"  not run here ({len(FIGURES['not_run'])}): {', '.join(FIGURES['not_run'])}")


@pytest.fixture
def kept(request):
    """``kept(before, run_dir)``: asserts that every file of ``before`` (``helpers.snapshot``) still
    holds the same bytes, and counts them in the reliability figures."""
    from helpers import snapshot

    def check(before, run_dir):
        after = snapshot(run_dir)
        changed = [name for name, (data, _) in before.items() if name not in after or after[name][0] != data]
        request.node.user_properties.append(("bytes_checked", sum(len(data) for data, _ in before.values())))
        request.node.user_properties.append(("bytes_lost", sum(len(before[name][0]) for name in changed)))
        assert not changed, f"changed or lost: {changed}"

    return check


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache (synthetic datasets and weights) shared by every test of the session, and by
    the session's parallel workers (pytest -n): pretraining waits on the cache's own lock."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "cache"
        shared.mkdir(exist_ok=True)
        return shared
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
def refused(tmp_path, monkeypatch):
    """``refused(*overrides) -> message``: the settings as the CLI checks them before any folder
    exists (``cli.ready_to_run``), in this process; asserts they are refused with a FinetuneError
    (which the CLI prints as one paragraph, exit 1) and that no folder was made."""
    from finetune_cli.checks import typed_config
    from finetune_cli.cli import ready_to_run
    from finetune_cli.errors import FinetuneError

    monkeypatch.chdir(tmp_path)

    def _refused(*overrides: str) -> str:
        cfg, _ = compose_config(overrides)
        with pytest.raises(FinetuneError) as err:
            ready_to_run(typed_config(cfg))
        assert not (tmp_path / "outputs").exists()
        return str(err.value)

    return _refused


@pytest.fixture
def finetune(tmp_path, monkeypatch, caplog):
    """Run ``finetune_cli.run.run`` in this process, as ``finetune-cli OVERRIDES`` would.

    ``finetune(*overrides, name="run", out_dir=None) -> (summary, run_dir)``: composes the config with Hydra's
    compose API, checks it (before any folder exists, as the CLI does), creates a fresh folder
    ``tmp_path/runs/<name>`` (``<name>-2``, ... when taken) and runs there; ``out_dir`` runs in an
    existing folder instead (a resubmitted job). On an error the run's
    summary.json is marked failed and the exception propagates, so use ``pytest.raises``.
    The run's log lines are in ``caplog.text`` (INFO and up); the working directory is ``tmp_path``.
    """
    from omegaconf import OmegaConf

    from finetune_cli.checks import check, typed_config
    from finetune_cli.cli import unique_dir
    from finetune_cli.record import mark_failed
    from finetune_cli.run import run

    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="finetune_cli")

    def _run(*overrides: str, name: str = "run", out_dir: Optional[Path] = None) -> Tuple[dict, Path]:
        cfg, label = compose_config(overrides)
        typed = typed_config(cfg)
        check(typed)
        out_dir = out_dir or Path(unique_dir(str(tmp_path / "runs" / name)))
        resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        command = " ".join(["finetune-cli", *(shlex.quote(o) for o in overrides)])
        try:
            summary = run(typed, out_dir, resolved, label=label, command=command)
        except Exception as exc:
            mark_failed(out_dir, exc)
            raise
        return summary, out_dir

    return _run


@pytest.fixture
def report(capsys):
    """``report(PATH, *args)``: finetune-cli-report in this process; its exit code and output."""
    import subprocess

    from finetune_cli.tools.report import main

    def run(root, *args):
        code = main([str(root), *args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["finetune-cli-report", str(root), *args], code, out, err)

    return run
