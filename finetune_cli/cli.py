"""The ``finetune-cli`` entrypoint (Hydra)."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import logging
import os
import re
import shlex
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from finetune_cli.config import Config, register_configs
from finetune_cli.errors import FinetuneError, storage_problem
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
        except OSError as exc:  # Hydra resolves this before any task code: say it here, and stop
            problem = storage_problem(OSError(exc.errno, exc.strerror, str(candidate)), started=False)
            if problem is None:
                raise
            print(problem, file=sys.stderr)
            raise SystemExit(1) from None


def path_safe(name: str, limit: int = 120) -> str:
    """``name`` as one folder name: slashes in override values (``data.root=/data/x``) would
    nest folders, and a long sweep's overrides would pass the file system's 255-byte limit."""
    safe = name.replace("/", "_").replace("\\", "_")
    if len(safe.encode()) <= limit:
        return safe
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return safe.encode()[: limit - 9].decode(errors="ignore") + "-" + digest


class RunHooks(Callback):
    """Checks the config before any folder exists; lists a sweep's results at its end."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra turns exceptions raised in callbacks into warnings, so exit here directly.
        # (A sweep is checked job by job instead: its base config lacks the swept values.)
        from finetune_cli.checks import typed_config

        try:
            cfg = typed_config(_without_hydra(config))
            ready_to_run(cfg)
            refuse_unwritable(config)
            if cfg.trainer.resume and not cfg.plan:
                from finetune_cli.train.checkpoint import settings_check

                resolved = OmegaConf.to_container(_without_hydra(config), resolve=True, enum_to_str=True)
                run_dir = Path(config.hydra.run.dir) if cfg.trainer.resume == "auto" else Path.cwd()
                settings_check(cfg.trainer.resume, run_dir, resolved)
        except FinetuneError as exc:
            print(str(exc), file=sys.stderr)
            raise SystemExit(1) from None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A sweep's jobs are checked before the first one starts: no job folder is made for a
        sweep that would fail on its settings (Hydra's basic sweeper lists its jobs ahead; for a
        search, each option of its search space is checked once)."""
        from finetune_cli.search import is_search

        sweeper = config.hydra.sweeper
        problems = None
        if sweeper.get("_target_") == BASIC_SWEEPER:
            problems = sweep_problems(list(config.hydra.overrides.task), sweeper.get("params") or {},
                                      config.hydra.job.config_name)
        elif is_search(sweeper.get("_target_")):
            problems = search_problems(list(config.hydra.overrides.task), sweeper, config.hydra.job.config_name)
        if problems:
            print(problems, file=sys.stderr)
            raise SystemExit(1)
        SWEEP["dir"] = Path(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _show_sweep_once()


def ready_to_run(cfg: Config) -> None:
    """What can fail before a run folder exists, done before it is made: the settings' checks
    (against the architecture too: group counts, a weights file's fit), and the download of pretrained weights (never for a plan or a preview, which download nothing)."""
    from finetune_cli.checks import check

    check(cfg)  # the settings' own checks first: they need no torch, so a mistake is answered at once
    from finetune_cli import ui
    from finetune_cli.build import check_against_model
    from finetune_cli.models.weights import fetch_ahead

    check_against_model(cfg)
    from finetune_cli.world import from_env, wanted

    processes = max(wanted(cfg.trainer.devices, cfg.trainer.device.value), from_env().size)  # too many GPUs?
    if cfg.task.value == "lr_find" and processes > 1:
        raise FinetuneError(
            f"Invalid configuration: task=lr_find runs in one process, and this run would have {processes} "
            f"(trainer.devices={cfg.trainer.devices}). Set trainer.devices=1; to find the LR for {processes} processes "
            f"of data.batch_size={cfg.data.batch_size} each, sweep their global batch in one: "
            f"data.batch_size={processes * cfg.data.batch_size}.")
    if cfg.trainer.sync_bn:
        from finetune_cli.runtime import pick_device
        from finetune_cli.train.syncbn import sync_bn_problem

        problem = sync_bn_problem(processes, pick_device(cfg.trainer.device).type)
        if problem:
            raise FinetuneError(f"Invalid configuration: {problem}")
    if not cfg.plan and cfg.preview.value == "off":
        fetch_ahead(cfg.model.name, cfg.model.weights, progress=ui.interactive())


def refuse_unwritable(config: DictConfig) -> None:
    """A run folder given by name (hydra.run.dir=DIR) where nothing can be written is refused
    before Hydra tries to make it (the default, dated folder is checked as it is made)."""
    import errno
    import os

    raw = OmegaConf.to_container(config.hydra.run, resolve=False).get("dir", "")
    if "${" in str(raw):
        return
    existing = Path(str(raw)).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        code = errno.EROFS if os.statvfs(existing).f_flag & os.ST_RDONLY else errno.EACCES
        raise FinetuneError(f"hydra.run.dir={raw}: {storage_problem(OSError(code, os.strerror(code), str(existing)), False)}")


SWEEP: dict = {"dir": None}  # the sweep under way: its closing table is shown once, even when a job failed


def _show_sweep_once() -> None:
    from finetune_cli.tools.sweep import show_sweep

    folder, SWEEP["dir"] = SWEEP["dir"], None
    if folder is not None:
        show_sweep(folder)


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def sweep_problems(overrides: Sequence[str], params: Any, config_name: str) -> Optional[str]:
    """What stops any job of a basic sweep (its settings, or weights that fail to download),
    each distinct problem once with the jobs it affects; None when every job can start."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + list(overrides))
    jobs = BasicSweeper.split_arguments(parsed, None)[0]
    return _jobs_problems(jobs, config_name, "The sweep was not started: {bad} of its {all} jobs cannot run.")


def search_problems(overrides: Sequence[str], sweeper: Any, config_name: str) -> Optional[str]:
    """What stops a search's trials: a stored study resumed with other settings, the settings of
    each option of its search space (checked once each), a direction that does not follow
    trainer.monitor."""
    from finetune_cli.search import direction_problem, representative_jobs, resume_problem

    resumed = resume_problem(sweeper, overrides)
    if resumed:
        return resumed

    def direction(cfg: Config) -> None:
        problem = direction_problem(sweeper.get("direction"), cfg.trainer.monitor.value)
        if problem:
            raise FinetuneError(problem)

    jobs = representative_jobs(sweeper.get("params") or {}, overrides)
    return _jobs_problems(jobs, config_name, "The search was not started: {bad} of the {all} settings checked "
                          "ahead (each option of its search space once) cannot run.", direction)


def _jobs_problems(jobs: Sequence[Sequence[str]], config_name: str, header: str,
                   also: Optional[typing.Callable[[Config], None]] = None) -> Optional[str]:
    from hydra import compose

    from finetune_cli.checks import typed_config

    found: dict = {}
    for number, job in enumerate(jobs):
        try:
            cfg = typed_config(compose(config_name=config_name, overrides=list(job)))
            ready_to_run(cfg)
            if also is not None:
                also(cfg)
        except FinetuneError as exc:
            found.setdefault(str(exc), []).append(f"#{number} ({' '.join(job) or 'no overrides'})")
    if not found:
        return None
    lines = [header.format(bad=sum(map(len, found.values())), all=len(jobs))
             + " No job folder was made. Fix these and launch it again:"]
    for message, which in found.items():
        shown = ", ".join(which[:3]) + (f" and {len(which) - 3} more" if len(which) > 3 else "")
        lines.append(f"- {'all jobs' if len(which) == len(jobs) else shown}: {message}")
    return "\n".join(lines)


def _run_as_processes(n: int, hc: Any, out_dir: Path) -> dict:
    """trainer.devices=N: the same run as N processes in this run's folder (which Hydra made here,
    with its .hydra/ record): each runs this command with the folder named, and rank 0 writes.
    Returns the summary rank 0 wrote."""
    from finetune_cli import world
    from finetune_cli.record import read_summary

    own = [o for o in hc.overrides.hydra if not o.startswith(("hydra.run.dir=", "hydra.mode=", "hydra.output_subdir=",
                                                              "hydra.sweep.", "hydra.job.num="))]
    argv = [*_config_flags(sys.argv[1:]), *own, *hc.overrides.task, f"hydra.run.dir={_quoted(out_dir)}",
            "hydra.output_subdir=null"]
    log.info(f"Starting {n} processes (trainer.devices={n}); rank 0 writes the run's files.")
    code = world.launch(n, argv)
    summary = read_summary(out_dir)
    if code in (130, 143):
        raise SystemExit(code)  # interrupted: rank 0 recorded it and said how to resume
    if code:
        said = summary.get("error") if summary.get("status") == "failed" else None
        raise FinetuneError(said or f"The {n} training processes ended with exit code {code}; their errors are "
                            f"printed above. The run's files are in {out_dir}.")
    return summary


def _config_flags(argv: Sequence[str]) -> list:
    """The command's --config-name / --config-path / --config-dir flags (-cn/-cp/-cd), with their values."""
    flags, names = [], ("-cn", "-cp", "-cd", "--config-name", "--config-path", "--config-dir")
    for i, arg in enumerate(argv):
        if arg in names and i + 1 < len(argv):
            flags += [arg, argv[i + 1]]
        elif arg.startswith(tuple(f"{n}=" for n in names)):
            flags.append(arg)
    return flags


def _quoted(path: Any) -> str:
    """A path as one quoted Hydra override value (a sweep's folder names hold '=' and ',')."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _shared_folder(argv: Sequence[str]) -> list:
    """Under torchrun or srun, every process runs this command: rank 0 makes the dated run folder
    and tells the others, so that one run has one folder (Hydra would make one per process); the
    other ranks write no .hydra/ record."""
    from finetune_cli import world

    here = world.from_env()
    if not here.distributed or "-m" in argv or "--multirun" in argv:
        return list(argv)
    quiet = [] if here.main else ["hydra.output_subdir=null"]
    if any(a.startswith("hydra.run.dir=") for a in argv):
        return [*argv, *quiet]
    import time

    world.join(here)
    folder = unique_dir(time.strftime("outputs/%Y-%m-%d/%H-%M-%S")) if here.main else None
    folder = world.from_main(folder)
    return [*argv, f"hydra.run.dir={_quoted(folder)}", *quiet]


def _without_hydra(config: DictConfig) -> DictConfig:
    cfg = copy.deepcopy(config)
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def compact_names(names: Sequence[str]) -> str:
    """Names sharing a leading word, written once with their endings in braces:
    ``resnet18, resnet34, resnet50`` -> ``resnet{18,34,50}``."""
    families: dict = {}
    for name in names:
        families.setdefault(re.match(r"[a-z]*", name).group(0), []).append(name)
    parts = []
    for members in sorted(families.values(), key=lambda m: min(m)):
        if len(members) == 1:
            parts.append(members[0])
            continue
        prefix = os.path.commonprefix(members).rstrip("0123456789")  # never split a number: vgg{11,13}
        tails = sorted((m[len(prefix):] for m in members), key=_natural)
        parts.append(f"{prefix}{{{','.join(tails)}}}")
    return ", ".join(parts)


def config_groups() -> str:
    """The help's list of config groups and their options, the models' compacted."""
    lines = []
    for group in _groups():
        options = _options(group)
        if group == "model":
            lines.append(f"model ({len(options)} torchvision classifiers): {compact_names(options)}")
        else:
            lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(textwrap.fill(line, 100, subsequent_indent="    ", break_on_hyphens=False,
                                   break_long_words=False) for line in lines)


OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True, replace=True)
OmegaConf.register_new_resolver("config_groups", config_groups, replace=True)
OmegaConf.register_new_resolver("path_safe", path_safe, replace=True)
register_configs()


def unknown_key(args: Sequence[str]) -> Optional[str]:
    """The first ``key=value`` argument whose key the schema lacks, said with the closest keys.
    (Hydra's own message suggests ``+key=value``, which adds the typo to the config.)"""
    other_configs = any(a.split("=", 1)[0] in ("-cp", "-cd", "--config-path", "--config-dir")
                        or a.startswith("hydra.searchpath") for a in args)  # options beyond conf/
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        if "/" not in key and (conf_dir() / key).is_dir() and not other_configs:
            problem = unknown_option(key, value)
            if problem:
                return problem
            continue
        if key[:1] in "+~" or "/" in key or "@" in key or key.split(".")[0] == "hydra":
            continue  # additions, deletions, Hydra's own keys and group paths
        node, done, parts = Config, [], key.split(".")
        for i, part in enumerate(parts):
            if not dataclasses.is_dataclass(node):
                break  # below a leaf (a list or mapping value): Hydra decides
            fields = typing.get_type_hints(node)
            if part not in fields:
                where = ".".join(done)
                close = difflib.get_close_matches(part, list(fields), n=3, cutoff=0.6)
                hint = f" Did you mean {' or '.join('.'.join(done + [c] + parts[i + 1:]) for c in close)}?" if close else ""
                listing = ", ".join(sorted(set(fields) | (set() if where else set(_groups()))))
                return (f"Unknown config key '{key}'.{hint} Valid keys {'under ' + where if where else 'at the top'}: "
                        f"{listing}. `finetune-cli --cfg job` prints every key with its value.")
            done.append(part)
            node = fields[part]
    return None


def unknown_option(group: str, value: str) -> Optional[str]:
    """``group=value`` (or a sweep ``group=a,b``) naming an option the group lacks, said with the
    closest options; Hydra's own message lists every option one per line (80 for model)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    try:  # read as Hydra reads it: quotes, spaces, null, a, b and choice(a, b)
        parsed = OverridesParser.create().parse_override(f"{group}={value}").value()
    except Exception:
        return None  # Hydra names what is wrong with it
    choices = parsed.list if isinstance(parsed, ChoiceSweep) else [parsed]
    if not all(isinstance(c, str) and "${" not in c for c in choices):
        return None  # null (no option), ranges, globs, interpolations: Hydra decides
    options = _options(group)
    for choice in choices:
        if choice in options:
            continue
        close = difflib.get_close_matches(choice, options, n=4, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        if group == "model":
            listing = (f"model= takes the name of any of the {len(options)} torchvision classification models "
                       f"(`finetune-cli --help` lists them)")
        else:
            listing = f"{group}= takes one of: {', '.join(options)}"
        return f"Unknown {group} option '{choice}'.{hint} {listing}."
    return None


def _groups() -> list:
    return sorted(p.name for p in conf_dir().iterdir() if p.is_dir() and p.name != "hydra")


def _options(group: str) -> list:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def main() -> None:
    """The console script: a misspelled key is named with its closest match, then Hydra runs."""
    from finetune_cli.ui import tolerant_streams

    tolerant_streams()
    from finetune_cli.search import command_problem

    problem = unknown_key(sys.argv[1:]) or command_problem(sys.argv[1:])
    if problem:
        print(problem, file=sys.stderr)
        raise SystemExit(1)
    sys.argv[1:] = _shared_folder(sys.argv[1:])
    try:
        hydra_main()
    except KeyboardInterrupt:  # Ctrl-C before a run started (a run records its own interruption)
        print("Interrupted before the run started: nothing was written.", file=sys.stderr)
        raise SystemExit(130) from None
    finally:  # a failed job ends the sweep early (non-zero exit): its table still closes it
        _show_sweep_once()


def lr_find_main() -> None:
    """``finetune-cli-lr-find OVERRIDES``: ``finetune-cli task=lr_find OVERRIDES``."""
    sys.argv.insert(1, "task=lr_find")
    main()


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def hydra_main(cfg: DictConfig) -> Optional[float]:
    from finetune_cli import world
    from finetune_cli.checks import typed_config
    from finetune_cli.record import mark_failed
    from finetune_cli.run import run

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    here = world.from_env()
    world.quiet_unless_main(here)
    overrides = " ".join(hc.overrides.task) or "(none)"
    try:
        typed = typed_config(cfg)
        alone = here.distributed or typed.plan or typed.preview.value != "off"
        n = 1 if alone else world.wanted(typed.trainer.devices, typed.trainer.device.value)
        if n == 1:  # (with N processes, rank 0 says it)
            log.info(f"finetune-cli: overrides {overrides}; output {out_dir}")
        summary = _run_as_processes(n, hc, out_dir) if n > 1 else run(
            typed,
            out_dir,
            OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
            label=hc.runtime.choices.get("strategy"),
            command=" ".join(
                ["finetune-cli"]
                + [shlex.quote(o) for o in hc.overrides.hydra if not o.startswith(("hydra.mode=", "hydra.output_subdir="))]
                + [shlex.quote(o) for o in hc.overrides.task if not o.startswith("trainer.resume=")]
            ),
        )
    except Exception as exc:
        problem = exc if isinstance(exc, FinetuneError) else storage_problem(exc)  # a full disk, a read-only folder
        if problem is None:
            if here.main:
                mark_failed(out_dir, exc)
            raise
        log.error(str(problem))
        if here.main:
            mark_failed(out_dir, problem)
        if hc.mode == RunMode.MULTIRUN:
            raise problem from None  # the sweep records the failure and goes on with the other jobs
        raise SystemExit(1) from None
    finally:
        if here.distributed:
            world.leave()
    best = summary.get("best")
    return best["value"] if best else None


__all__ = ["main", "lr_find_main", "hydra_main", "RunHooks", "unique_dir", "path_safe"]
