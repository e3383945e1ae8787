"""Runs aggregated over seeds: ``finetune-cli-report PATH --group-by strategy`` (or ``auto``: every
override whose value varies between the runs, the seed aside). Per group: n, the mean of the
best monitored value, its sample standard deviation and 95% confidence interval (Student's t),
min and max, beside the cost (time, trainable share, peak memory). Each group is compared with
the best one by Welch's t-test, which marks differences larger than the seed noise.

Writes ``report_groups.csv``, ``report_groups.md`` and ``groups.png`` into the report folder."""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from rich.markup import escape
from rich.table import Table

from finetune_cli.errors import FinetuneError
from finetune_cli.io_utils import atomic_write_bytes, text_bytes
from finetune_cli.tools import stats
from finetune_cli.tools.table import Run
from finetune_cli.ui import is_accuracy, metric_scale, metric_text, pp, share

SEED = "trainer.seed"
ALPHA = 0.05  # a difference is larger than the seed noise where Welch's two-sided p is below this
MISSING = "-"


# --- what a run's key holds ---------------------------------------------------------------------


def _load(path: Path) -> Any:
    try:
        return _load_version(str(path), path.stat().st_mtime_ns)
    except OSError:  # missing: the key is looked up elsewhere
        return None


@functools.lru_cache(maxsize=1024)
def _load_version(path: str, mtime_ns: int) -> Any:
    """A run's YAML record, read once however many keys are asked of it."""
    try:
        return OmegaConf.load(path)
    except Exception:  # broken: the key is looked up elsewhere
        return None


def _text(value: Any) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, DictConfig):  # a config group's node: by its name (strategy -> strategy.name)
        name = value.get("name")
        return None if name is None else _text(name)
    return str(value)


def run_value(run: Run, key: str) -> str:
    """What ``key`` holds for ``run``: a config group's option (``strategy``, ``model``: Hydra's
    record of the choices), else the value in the run's composed config (``optimizer.lr``,
    ``strategy.name``), else the override as typed; ``-`` where the run has none."""
    hydra = _load(run.path / ".hydra" / "hydra.yaml")
    choices = OmegaConf.select(hydra, "hydra.runtime.choices", default=None) if hydra is not None else None
    if choices is not None and key in choices and choices[key] is not None:
        return str(choices[key])
    config = _load(run.path / ".hydra" / "config.yaml")
    found = _text(OmegaConf.select(config, key, default=None, throw_on_missing=False)) if config is not None else None
    if found is None:
        found = run.override_map.get(key)
    return MISSING if found is None or found == "" else found


def varying_overrides(runs: Sequence[Run]) -> List[str]:
    """The command-line keys whose values differ between ``runs``, the seed and Hydra's own aside."""
    keys = sorted({k for r in runs for k in r.override_map if k != SEED and not k.startswith("hydra.")})
    return [k for k in keys if len({r.override_map.get(k) for r in runs}) > 1]


def seeds_vary(runs: Sequence[Run]) -> bool:
    return len({run_value(r, SEED) for r in runs if scored(r)}) > 1


def scored(run: Run) -> bool:
    """A completed run with a best metric: the runs a group's statistics are made of."""
    best = run.row.get("best")
    return run.row.get("status") == "completed" and isinstance(best, (int, float)) and not isinstance(best, bool)


# --- the groups ---------------------------------------------------------------------------------


@dataclass
class Group:
    values: Dict[str, str]  # the group-by keys' values
    runs: List[Run]

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.values.items()) or "all runs"

    @property
    def bests(self) -> List[float]:
        return [float(r.row["best"]) for r in self.runs]

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def mean(self) -> float:
        return stats.mean(self.bests)

    @property
    def std(self) -> Optional[float]:
        return stats.sample_std(self.bests)

    @property
    def ci(self) -> Optional[float]:
        """Half the width of the 95% interval of the mean."""
        return stats.ci_half_width(self.bests)

    def cost(self, column: str) -> Optional[float]:
        """The mean of a run-table column over the group's runs that have it."""
        known = [r.row[column] for r in self.runs if isinstance(r.row.get(column), (int, float))]
        return stats.mean(known) if known else None


@dataclass
class Comparison:
    """A group against the best group: the difference of the means and Welch's test."""

    delta: Optional[float]
    p: Optional[float]
    verdict: str  # best, larger than seed noise, within seed noise, no conclusion (n=1)

    @property
    def larger(self) -> Optional[bool]:
        return None if self.p is None else self.p < ALPHA


@dataclass
class Grouping:
    keys: List[str]
    monitor: str
    groups: List[Group]  # the best first
    comparisons: List[Comparison]
    left_out: Dict[str, int] = field(default_factory=dict)  # status -> runs not aggregated
    mixed: List[str] = field(default_factory=list)  # other keys that vary inside a group

    @property
    def maximize(self) -> bool:
        return is_accuracy(self.monitor)


def _compare(best: Group, group: Group) -> Comparison:
    if group is best:
        return Comparison(0.0, None, "best")
    delta = group.mean - best.mean
    test = stats.welch(group.bests, best.bests)
    if test is None:
        return Comparison(delta, None, "no conclusion (n=1)")
    return Comparison(delta, test.p, "larger than seed noise" if test.p < ALPHA else "within seed noise")


def group_runs(runs: Sequence[Run], keys: Sequence[str]) -> Grouping:
    """The completed runs grouped by the values of ``keys``, best group first."""
    used = [r for r in runs if scored(r)]
    left_out: Dict[str, int] = {}
    for r in runs:
        if not scored(r):
            status = r.row.get("status") or "unknown"
            left_out[status] = left_out.get(status, 0) + 1
    if not used:
        raise FinetuneError("No completed run with a best metric to group: the groups need finished runs.")
    monitors = sorted({r.row.get("monitor") or "val_acc" for r in used})
    if len(monitors) > 1:
        raise FinetuneError(f"The runs monitor different metrics ({', '.join(monitors)}): their best values do not "
                            "compare. Report the runs of one trainer.monitor at a time.")
    for key in keys:
        if all(run_value(r, key) == MISSING for r in used):
            raise FinetuneError(f"--group-by {key}: no run has this key. Keys that vary between the runs: "
                                f"{', '.join(varying_overrides(used)) or 'none but the seed'}.")
    found: Dict[tuple, Group] = {}
    for r in used:
        values = {k: run_value(r, k) for k in keys}
        found.setdefault(tuple(values.values()), Group(values, [])).runs.append(r)
    maximize = is_accuracy(monitors[0])
    groups = sorted(found.values(), key=lambda g: -g.mean if maximize else g.mean)
    inside = [k for k in varying_overrides(used) if k not in keys
              and any(len({r.override_map.get(k) for r in g.runs}) > 1 for g in groups)]
    return Grouping(list(keys), monitors[0], groups, [_compare(groups[0], g) for g in groups], left_out, inside)


def chosen_keys(option: Optional[str], runs: Sequence[Run]) -> Optional[List[str]]:
    """The keys ``--group-by`` names: ``auto`` for every varying override but the seed, ``none``
    for no groups; without the option, ``auto`` where the runs' seeds differ, else no groups."""
    if option is None:
        return varying_overrides([r for r in runs if scored(r)]) if seeds_vary(runs) else None
    if option.strip() == "none":
        return None
    if option.strip() == "auto":
        return varying_overrides([r for r in runs if scored(r)])
    keys = [k.strip() for k in option.split(",") if k.strip()]
    if not keys:
        raise FinetuneError("--group-by takes config keys (strategy, optimizer.lr; comma-separated), auto or none.")
    return keys


# --- as text ------------------------------------------------------------------------------------


def _spread(monitor: str, value: Optional[float]) -> str:
    if value is None:
        return MISSING
    return pp(value, signed=False) if is_accuracy(monitor) else f"{value:.4f}"


def _delta(monitor: str, value: Optional[float]) -> str:
    if value is None:
        return MISSING
    return pp(value) if is_accuracy(monitor) else f"{value:+.4f}"


def p_text(p: Optional[float]) -> str:
    if p is None:
        return MISSING
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _cost(value: Optional[float], digits: int) -> str:
    return MISSING if value is None else f"{value:,.{digits}f}"


COLUMNS = ["group", "n", "mean ± 95% CI", "std", "min - max", "vs best", "p", "difference", "time s", "trainable",
           "peak MB"]
VERDICT = COLUMNS.index("difference")


def _cells(grouping: Grouping, group: Group, comparison: Comparison) -> List[str]:
    m = grouping.monitor
    ci = group.ci
    trainable = group.cost("trainable_pct")
    return [group.label, str(group.n), metric_text(m, group.mean) + (f" ± {_spread(m, ci)}" if ci is not None else ""),
            _spread(m, group.std), f"{metric_text(m, min(group.bests))} - {metric_text(m, max(group.bests))}",
            _delta(m, comparison.delta) if comparison.verdict != "best" else MISSING, p_text(comparison.p),
            ("* " if comparison.larger else "") + comparison.verdict, _cost(group.cost("total_seconds"), 1),
            MISSING if trainable is None else share(trainable, 100), _cost(group.cost("peak_memory_mb"), 0)]


def header(grouping: Grouping) -> str:
    by = ", ".join(grouping.keys) or "nothing (one group of every run)"
    goal = "higher" if grouping.maximize else "lower"
    return f"Groups by {by}: best {grouping.monitor} over each group's runs ({goal} is better), best group first"


def notes(grouping: Grouping) -> List[str]:
    """The table's footnotes: how the interval and the mark are made, and what limits them."""
    lines = ["mean ± half the width of the 95% confidence interval of the mean (Student's t, n - 1 degrees of "
             "freedom; report_groups.csv has its ends); std: sample standard deviation (n - 1).",
             f"* larger than seed noise: the group's mean differs from the best group's by Welch's t-test "
             f"(two-sided, unequal variances), p < {ALPHA}; not corrected for comparing several groups."]
    if any(g.n < 2 for g in grouping.groups):
        lines.append("A group of one run has no interval and allows no conclusion: run more seeds "
                     "(trainer.seed=0,1,2).")
    if grouping.mixed:
        lines.append(f"Runs within a group also differ in {', '.join(grouping.mixed)}: their spread is not seed "
                     "noise alone (--group-by those keys too).")
    if grouping.left_out:
        said = ", ".join(f"{n} {status}" for status, n in sorted(grouping.left_out.items()))
        lines.append(f"Left out (not completed, or no best metric): {said}.")
    return lines


def groups_table(grouping: Grouping) -> Table:
    table = Table()
    for col in COLUMNS:
        table.add_column(col, no_wrap=col != "group")
    for group, comparison in zip(grouping.groups, grouping.comparisons):
        cells = [escape(c) for c in _cells(grouping, group, comparison)]
        if comparison.larger:
            cells[VERDICT] = f"[bold]{cells[VERDICT]}[/]"
        table.add_row(*cells)
    return table


def groups_markdown(grouping: Grouping) -> str:
    lines = [f"**{header(grouping)}**", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for group, comparison in zip(grouping.groups, grouping.comparisons):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(grouping, group, comparison)) + " |")
    return "\n".join(lines + [""] + notes(grouping)) + "\n"


def groups_csv(grouping: Grouping) -> str:
    """One row per group; values as stored (an accuracy as a fraction from 0 to 1)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["group", *grouping.keys, "monitor", "n", "mean", "std", "ci95_low", "ci95_high", "min", "max",
                     "delta_vs_best", "p_vs_best", "larger_than_seed_noise", "mean_total_seconds", "trainable_pct",
                     "mean_peak_memory_mb", "runs"])
    for g, c in zip(grouping.groups, grouping.comparisons):
        ci = g.ci
        writer.writerow([g.label, *g.values.values(), grouping.monitor, g.n, g.mean, _blank(g.std),
                         _blank(None if ci is None else g.mean - ci), _blank(None if ci is None else g.mean + ci),
                         min(g.bests), max(g.bests), _blank(c.delta), _blank(c.p), _blank(c.larger),
                         _blank(g.cost("total_seconds")), _blank(g.cost("trainable_pct")),
                         _blank(g.cost("peak_memory_mb")), ";".join(r.row["run"] for r in g.runs)])
    return buf.getvalue()


def _blank(value: Any) -> Any:
    return "" if value is None else value


# --- groups.png ---------------------------------------------------------------------------------


def groups_figure(grouping: Grouping):
    """Each group's mean with its 95% interval as an error bar, and each run as a dot; the best
    group first (on top), groups whose difference is larger than the seed noise in bold."""
    from finetune_cli.tools.plots import _pyplot

    plt = _pyplot()
    scale = metric_scale(grouping.monitor)
    n = len(grouping.groups)
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.55 * n + 1.5)))
    for row, (group, comparison) in enumerate(zip(grouping.groups, grouping.comparisons)):
        y = n - 1 - row
        colour = "C2" if comparison.verdict == "best" else "C3" if comparison.larger else "C0"
        dots = [scale * v for v in group.bests]
        jitter = [y + 0.12 * ((i % 3) - 1) for i in range(len(dots))]
        ax.scatter(dots, jitter, s=18, color="grey", alpha=0.7, zorder=2)
        ci = group.ci
        ax.errorbar(scale * group.mean, y, xerr=None if ci is None else scale * ci, fmt="o", color=colour,
                    markersize=8, capsize=5, linewidth=2, zorder=3)
    labels = [f"{'* ' if c.larger else ''}{g.label} (n={g.n})" for g, c in zip(grouping.groups, grouping.comparisons)]
    ax.set_yticks(range(n - 1, -1, -1), labels)
    for tick, comparison in zip(ax.get_yticklabels(), grouping.comparisons):
        if comparison.larger or comparison.verdict == "best":
            tick.set_fontweight("bold")
    unit = " (%)" if is_accuracy(grouping.monitor) else ""
    ax.set(xlabel=f"best {grouping.monitor}{unit}: each run (grey), the group's mean and 95% CI",
           ylim=(-0.7, n - 0.3), title="Groups over seeds: mean and 95% confidence interval")
    ax.grid(axis="x", alpha=0.3)
    fig.text(0.01, 0.005, f"green: the best group; red, *: larger than seed noise (Welch's t-test against the best "
                          f"group, p < {ALPHA}); blue: within the noise, or one run (no conclusion)", fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def show_groups(grouping: Grouping) -> None:
    from finetune_cli.tools.table import wide_console

    console = wide_console()
    console.print(escape(header(grouping)))
    console.print(groups_table(grouping))
    console.print(escape("\n".join(notes(grouping))))


def write_groups(grouping: Grouping, out: Path, plot: bool = True) -> List[Path]:
    from finetune_cli.tools.plots import save_png

    written = [out / "report_groups.csv", out / "report_groups.md"]
    atomic_write_bytes(written[0], text_bytes(groups_csv(grouping)))
    atomic_write_bytes(written[1], text_bytes(groups_markdown(grouping)))
    if plot:
        written.append(save_png(groups_figure(grouping), out / "groups.png"))
    return written
