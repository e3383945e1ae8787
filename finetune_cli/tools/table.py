"""The run table: one row per run folder, from its ``summary.json``, ``metrics.csv`` and
``.hydra/overrides.yaml``. ``finetune-cli-report`` prints it ranked; a sweep prints it at its
end in job order. Also the console the tools print their tables to."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml
from omegaconf import ListConfig, OmegaConf
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from finetune_cli.ui import is_accuracy, metric_text, pct, pp, share


@dataclass
class Run:
    path: Path
    row: Dict[str, Any]
    metrics: List[Dict[str, float]] = field(default_factory=list)
    override_map: Dict[str, str] = field(default_factory=dict)


def wide_console() -> Console:
    """The terminal's console; in logs and pipes one 200 columns wide, so tables do not fold."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


def read_overrides(run: Path) -> Dict[str, str]:
    """``key: value`` of the command-line overrides Hydra recorded for ``run`` (``+``/``~`` dropped)."""
    try:
        loaded = OmegaConf.load(run / ".hydra" / "overrides.yaml")
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(loaded, ListConfig):
        return {}
    found: Dict[str, str] = {}
    for item in OmegaConf.to_container(loaded, resolve=False):
        key, _, value = str(item).partition("=")
        found[key.lstrip("+~")] = value
    return found


def _read_metrics(run: Path) -> List[Dict[str, float]]:
    rows: List[Dict[str, float]] = []
    try:
        with (run / "metrics.csv").open() as f:
            for raw in csv.DictReader(f):
                row = {}
                for k, v in raw.items():
                    try:
                        row[k] = float(v)
                    except (TypeError, ValueError):
                        row[k] = v  # type: ignore[assignment]
                rows.append(row)
    except (OSError, csv.Error, ValueError):  # missing, or not text (binary, NUL bytes): the rows read so far
        pass
    return rows


def _read_summary(path: Path) -> Tuple[Dict[str, Any], Optional[str]]:
    """summary.json as a mapping whose numbers are numbers, and what was wrong with it."""
    try:
        loaded = json.loads((path / "summary.json").read_text())
    except FileNotFoundError:
        return {}, "no summary.json (stopped before its first epoch)"
    except (OSError, ValueError) as exc:
        return {}, f"unreadable summary.json ({type(exc).__name__})"
    if not isinstance(loaded, dict):
        return {}, f"summary.json holds a {type(loaded).__name__}, not a mapping"
    summary = {k: v for k, v in loaded.items() if k not in NUMBERS or _is_number(v)}
    if not isinstance(summary.get("best"), dict):
        summary.pop("best", None)
    return summary, None


NUMBERS = ("total_seconds", "train_images_per_s", "trainable_params_final", "trainable_params", "total_params",
           "peak_memory_mb", "grad_optimizer_mb", "epochs_run")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _job_choice(path: Path, key: str) -> str:
    """``model.name`` or ``strategy.name`` from the job's own config (a run that failed early
    has no summary to say it)."""
    try:
        return str(OmegaConf.select(OmegaConf.load(path / ".hydra" / "config.yaml"), key, default="") or "")
    except Exception:  # a missing or broken config: the column stays empty
        return ""


def task_of(path: Path, summary: Optional[Dict[str, Any]] = None) -> str:
    """``lr_find`` for an LR finder's folder (a sweep, not a training run), else ``train``."""
    summary = _read_summary(path)[0] if summary is None else summary
    return str(summary.get("task") or _job_choice(path, "task") or "train")


def finder_outcome(path: Path) -> str:
    """What an LR finder's folder suggested, or how it ended."""
    summary = _read_summary(path)[0]
    status, found = summary.get("status", "incomplete"), summary.get("lr_find")
    if status == "completed" and isinstance(found, dict):
        return f"suggested {found.get('override')}"
    return f"{status}: {summary['error']}" if summary.get("error") else str(status)


def read_run(path: Path, root: Path) -> Run:
    summary, problem = _read_summary(path)
    metrics = _read_metrics(path)
    status = summary.get("status", "unknown")
    if status == "running":
        status = "running or interrupted"
    if problem and status == "unknown":
        status = "incomplete"
    if task_of(path, summary) == "lr_find":
        status, problem = f"LR finder (task=lr_find), not a training run: {finder_outcome(path)}", None
    best = summary.get("best") or {}
    last = metrics[-1] if metrics else {}
    epoch_seconds = [m["epoch_seconds"] for m in metrics if isinstance(m.get("epoch_seconds"), float)]
    train_acc, val_acc = last.get("train_acc"), last.get("val_acc")
    row: Dict[str, Any] = {
        "run": str(path.relative_to(root)) if path != root else path.name,
        "status": status,
        "model": str(summary.get("model") or _job_choice(path, "model.name")),
        "strategy": str(summary.get("strategy") or _job_choice(path, "strategy.name")),
        "overrides": "",
        "monitor": best.get("monitor", ""),
        "best": best.get("value"),
        "best_epoch": best.get("epoch"),
        # at the best epoch: the mean of the classes' recalls, and of their F1 scores
        "balanced_acc": at_best.get("val_balanced_acc") if isinstance(at_best := summary.get("at_best"), dict) else None,
        "macro_f1": at_best.get("val_macro_f1") if isinstance(at_best, dict) else None,
        "final_train_acc": train_acc,
        "final_val_acc": val_acc,
        "train_val_gap": (train_acc - val_acc) if isinstance(train_acc, float) and isinstance(val_acc, float) else None,
        "epochs_run": summary.get("epochs_run", len(metrics) or None),
        "total_seconds": summary.get("total_seconds"),
        "seconds_per_epoch": sum(epoch_seconds) / len(epoch_seconds) if epoch_seconds else None,
        "images_per_s": summary.get("train_images_per_s"),
        "trainable_params": summary.get("trainable_params_final", summary.get("trainable_params")),
        "total_params": summary.get("total_params"),
        "trainable_pct": None,
        "peak_memory_mb": summary.get("peak_memory_mb"),
        "grad_optimizer_mb": summary.get("grad_optimizer_mb"),
        "feature_cache": _cache_label(summary.get("feature_cache")),
        "weights": str(summary.get("weights") or ""),
        "transfer_gain": None,  # best minus the best from-scratch run's of the same model and data
        # a target domain's val accuracy at the best epoch (chosen on the labelled val set)
        "target_val_acc": target.get("target_val_acc") if isinstance(target := summary.get("target"), dict) else None,
        "adapt": str(summary.get("adapt") or ""),
        "error": str(summary.get("error") or problem or ""),
        # shown in the printed table, not written to report.csv
        "data_root": str(dataset.get("root") or "") if isinstance(dataset := summary.get("dataset"), dict) else "",
        "initial_trainable_pct": None,
        "peak_memory_kind": summary.get("peak_memory_kind") or "",
        "imbalance": _imbalance(dataset),
    }
    if row["trainable_params"] is not None and row["total_params"]:
        row["trainable_pct"] = 100.0 * row["trainable_params"] / row["total_params"]
        if summary.get("trainable_params") is not None:
            row["initial_trainable_pct"] = 100.0 * summary["trainable_params"] / row["total_params"]
    return Run(path, row, metrics, read_overrides(path))


def _imbalance(dataset: Any) -> Optional[float]:
    """The largest training class's count over the smallest's, from summary.json."""
    counts = ((dataset or {}).get("class_counts") or {}).get("train") if isinstance(dataset, dict) else None
    if not isinstance(counts, dict) or not counts or not all(isinstance(v, int) for v in counts.values()):
        return None
    low = min(counts.values())
    return max(counts.values()) / low if low else math.inf


IMBALANCED = 1.5  # from this ratio on, the printed table shows balanced accuracy and macro-F1


def _cache_label(cache: Optional[Dict[str, Any]]) -> str:
    if not cache:
        return ""
    return "train+val" if cache.get("train") else "val" if cache.get("val") else "off"


SHOWN_APART = ("model", "model.name", "strategy")  # these have columns of their own


def _differing(runs: List[Run]) -> None:
    keys = sorted({k for r in runs for k in r.override_map if k not in SHOWN_APART})
    varying = [k for k in keys if len({r.override_map.get(k) for r in runs}) > 1]
    for r in runs:
        r.row["overrides"] = " ".join(f"{k}={r.override_map[k]}" for k in varying if k in r.override_map)


def _read_or_describe(path: Path, root: Path) -> Run:
    """One broken run folder never stops a report: it becomes a row that says what is wrong."""
    try:
        return read_run(path, root)
    except Exception as exc:
        row = {k: None for k in ("best", "best_epoch", "final_train_acc", "final_val_acc", "train_val_gap",
                                 "epochs_run", "total_seconds", "seconds_per_epoch", "images_per_s",
                                 "trainable_params", "total_params", "trainable_pct", "peak_memory_mb",
                                 "grad_optimizer_mb", "initial_trainable_pct")}
        row.update(run=str(path.relative_to(root)) if path != root else path.name, status="unreadable",
                   model=_job_choice(path, "model.name"), strategy=_job_choice(path, "strategy.name"),
                   overrides="", monitor="", feature_cache="", peak_memory_kind="", weights="", data_root="",
                   transfer_gain=None, target_val_acc=None, adapt="",
                   error=f"unreadable run folder ({type(exc).__name__}: {exc})")
        return Run(path, row, [], {})


SCRATCH = "random init"  # summary.json's weights of a run trained from scratch (model.weights=null)


def is_scratch(run: Run) -> bool:
    return run.row.get("weights") == SCRATCH


def _scored(run: Run) -> bool:
    return _is_number(run.row.get("best"))


def transfer_gains(runs: Sequence[Run]) -> None:
    """Does transfer help? Each pretrained run's ``transfer_gain``: its best metric minus that of
    the best from-scratch run with the same model, data and monitor (for a loss, the scratch
    run's minus its own), so that a gain is always positive and a loss of transfer negative."""
    for r in runs:
        if is_scratch(r) or not _scored(r):
            continue
        same = [s for s in runs if is_scratch(s) and _scored(s) and all(
            s.row.get(k) == r.row.get(k) for k in ("model", "data_root", "monitor"))]
        if not same:
            continue
        loss = not is_accuracy(r.row["monitor"] or "val_acc")
        baseline = (min if loss else max)(s.row["best"] for s in same)
        r.row["transfer_gain"] = baseline - r.row["best"] if loss else r.row["best"] - baseline


def worse_than_scratch(run: Run) -> bool:
    """Below the same model trained from scratch on the same data, by a shown amount (-0.0 pp is not)."""
    text = transfer_text(run)
    return text != "-" and text.startswith("-")


def transfer_text(run: Run) -> str:
    """``+12.5 pp`` (a loss: ``+0.1234``), ``scratch`` for a from-scratch run, ``-`` without one."""
    if is_scratch(run):
        return "scratch"
    gain = run.row.get("transfer_gain")
    if not _is_number(gain):
        return "-"
    return pp(gain) if is_accuracy(run.row["monitor"] or "val_acc") else f"{gain:+.4f}"


def negative_transfer_note(runs: Sequence[Run]) -> str:
    worse = [r for r in runs if worse_than_scratch(r)]
    if not worse:
        return ""
    names = ", ".join(f"{r.row['strategy'] or '?'} ({transfer_text(r)}, {r.row['run']})" for r in worse)
    return (f"Negative transfer: {len(worse)} run{'s' if len(worse) > 1 else ''} did worse than training the same "
            f"model from scratch on the same data: {names}. The pretrained features hurt here; consider training "
            "more of the network, a lower LR for the pretrained layers, or other weights.")


def read_runs(paths: Sequence[Path], root: Path) -> List[Run]:
    """The runs in ``paths``, in that order; their ``overrides`` column holds the overrides
    whose values differ between them, and ``transfer_gain`` the gain over training from scratch
    where a from-scratch run of the same model and data is among them."""
    runs = [_read_or_describe(p, root) for p in paths]
    _differing(runs)
    transfer_gains(runs)
    return runs


def _num(value: Any, digits: int) -> str:
    return f"{value:,.{digits}f}" if isinstance(value, (int, float)) else "-"


def memory_kinds(runs: Sequence[Run]) -> List[str]:
    """What the peak memory figures are (summary.json's ``peak_memory_kind``), each kind once."""
    return list(dict.fromkeys(r.row["peak_memory_kind"] for r in runs if r.row["peak_memory_kind"]))


def memory_mark(run: Run, kinds: Sequence[str]) -> str:
    """`` [n]``, the footnote for the run's kind of peak memory, where the runs' kinds differ."""
    kind = run.row["peak_memory_kind"]
    return f" [{kinds.index(kind) + 1}]" if len(kinds) > 1 and kind in kinds else ""


def memory_footnote(kinds: Sequence[str], name: str = "peak MB") -> str:
    """What the peak memory column holds: one kind, or each kind with its footnote number."""
    if len(kinds) <= 1:
        return f"{name}: {kinds[0]}" if kinds else ""
    return f"{name}: " + "; ".join(f"[{i}] {kind}" for i, kind in enumerate(kinds, 1))


def _trainable(row: Dict[str, Any]) -> str:
    end, start = row["trainable_pct"], row["initial_trainable_pct"]
    if end is None:
        return "-"
    end_text = share(end, 100)
    return end_text if start is None or share(start, 100) == end_text else f"{share(start, 100)} -> {end_text}"


def render_table(runs: List[Run], job_numbers: Optional[Sequence[str]] = None) -> Table:
    """The runs as given, numbered 1, 2, ... as ranked, or by ``job_numbers`` (a sweep's jobs)."""
    monitors = list(dict.fromkeys(r.row["monitor"] for r in runs if r.row["monitor"])) or ["val_acc"]
    order = "Runs ranked" if job_numbers is None else "Jobs"
    kinds = memory_kinds(runs)
    table = Table(title=f"{order}; best = best {' or '.join(monitors)} (epoch)", title_justify="left",
                  caption_justify="left")
    scratch = any(is_scratch(r) for r in runs)
    target = any(r.row.get("target_val_acc") is not None for r in runs)
    classes = any((r.row.get("imbalance") or 0) >= IMBALANCED for r in runs)
    for col in ("#" if job_numbers is None else "job", "model", "strategy", "overrides", "status", "best",
                *(("bal acc / F1",) if classes else ()),
                *(("vs scratch",) if scratch else ()), *(("target acc",) if target else ()), "train acc",
                "gap", "epochs", "time s", "s/epoch", "img/s", "trainable", "peak MB", "grad+opt MB"):
        table.add_column(col, no_wrap=col not in ("overrides", "status"))
    notes = [n for n in (memory_footnote(kinds), negative_transfer_note(runs)) if n]
    table.caption = escape("\n".join(notes)) or None
    for i, r in enumerate(runs):
        row = r.row
        best = metric_text(row["monitor"] or monitors[0], row["best"])
        best += f" ({row['best_epoch']})" if best != "-" else ""
        status = row["status"] + (f": {row['error']}" if row["error"] else "")
        peak = _num(row["peak_memory_mb"], 0)
        gain = f"[bold red]{transfer_text(r)} worse[/]" if worse_than_scratch(r) else transfer_text(r)
        table.add_row(
            str(i + 1) if job_numbers is None else job_numbers[i], row["model"] or "-", row["strategy"] or "-",
            row["overrides"] or "-", status, best,
            *((f"{pct(row.get('balanced_acc'))} / {pct(row.get('macro_f1'))}",) if classes else ()),
            *((gain,) if scratch else ()),
            *((pct(row.get("target_val_acc")),) if target else ()), pct(row["final_train_acc"]),
            pp(row["train_val_gap"]), _num(row["epochs_run"], 0), _num(row["total_seconds"], 1),
            _num(row["seconds_per_epoch"], 2), _num(row["images_per_s"], 0), _trainable(row),
            peak + (memory_mark(r, kinds) if peak != "-" else ""), _num(row["grad_optimizer_mb"], 1),
        )
    return table
