"""Runs over seeds aggregated by ``finetune-cli-report --group-by``: the statistics (checked against
printed tables and closed forms), the groups of fake and real run folders, the marks, the files."""

import csv
import json
import math

import pytest
from PIL import Image

from finetune_cli.tools.stats import betainc, ci_half_width, sample_std, t_cdf, t_quantile, two_sided_p, welch

from helpers import cli, done_summary, fake_job, run_dirs

# --- statistics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("df, quantile", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (9, 2.262),
                                          (10, 2.228), (20, 2.086), (30, 2.042), (120, 1.980), (math.inf, 1.960)])
def test_t_quantiles_match_the_printed_table(df, quantile):
    assert t_quantile(0.975, df) == pytest.approx(quantile, abs=5e-4)
    assert t_quantile(0.025, df) == pytest.approx(-quantile, abs=5e-4)


def test_t_distribution_matches_its_closed_forms():
    for t in (-20.0, -2.5, -0.3, 0.0, 0.7, 1.96, 4.0, 50.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)  # Cauchy
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
        x = t * t / (4 + t * t)
        assert t_cdf(t, 4) == pytest.approx(0.5 + math.copysign(0.75 * math.sqrt(x) * (1 - x / 3), t), abs=1e-12)
    for p in (0.6, 0.9, 0.975, 0.999):  # df 2 inverts in closed form: (2p - 1) / sqrt(2p(1 - p))
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    assert two_sided_p(0.0, 7) == pytest.approx(1.0) and two_sided_p(1e6, 7) < 1e-30
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)  # 1 - (0.6^4 + 4 * 0.4 * 0.6^3): a binomial sum


def test_welch_and_the_interval_by_hand():
    # means 2 and 5, variances 1 and 1, n 3 and 3: t = -3 / sqrt(2/3), df = 4, p from the closed form of df 4
    test = welch([1, 2, 3], [4, 5, 6])
    assert test.t == pytest.approx(-3 / math.sqrt(2 / 3)) and test.df == pytest.approx(4.0)
    x = test.t ** 2 / (4 + test.t ** 2)
    assert test.p == pytest.approx(1 - 1.5 * math.sqrt(x) * (1 - x / 3), rel=1e-9)
    assert test.p == pytest.approx(0.02131, abs=1e-5)
    # unequal sizes and spreads: the Welch-Satterthwaite degrees of freedom
    a, b = [0.80, 0.82, 0.84], [0.70, 0.75, 0.80, 0.85]
    va, vb = 0.0004 / 3, (0.0125 / 3) / 4
    test = welch(a, b)
    assert test.t == pytest.approx(0.045 / math.sqrt(va + vb)) and test.t == pytest.approx(1.3128, abs=1e-4)
    assert test.df == pytest.approx((va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)) and test.df == pytest.approx(3.7256,
                                                                                                               abs=1e-4)
    scipy_stats = pytest.importorskip("scipy.stats")
    assert test.p == pytest.approx(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-9)
    # no spread: different means are certain, equal ones are not different; one value: no test
    assert welch([0.5, 0.5], [0.6, 0.6]).p == 0.0 and welch([0.5, 0.5], [0.5, 0.5]).p == 1.0
    assert welch([0.5], [0.6, 0.7]) is None
    assert sample_std([0.80, 0.82, 0.84]) == pytest.approx(0.02)
    assert ci_half_width([0.80, 0.82, 0.84]) == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-6)
    assert ci_half_width([0.8]) is None and sample_std([0.8]) is None


# --- groups of run folders -----------------------------------------------------------------------

# three seeds each: full and linear_probe far apart; freeze_early's spread covers full's mean
SEEDS = {"full": [0.90, 0.91, 0.92], "linear_probe": [0.80, 0.81, 0.82], "freeze_early": [0.85, 0.91, 0.94]}
HALF = 4.302653 * 0.01 / math.sqrt(3)  # t(0.975, 2) x s / sqrt(n), s = 1 pp


def _seed_runs(root, seeds=SEEDS, extra=()):
    for strategy, values in seeds.items():
        for seed, value in enumerate(values):
            summary = {**done_summary(strategy, value), "total_seconds": 10.0 + seed}
            fake_job(root / f"{strategy}_{seed}", [f"strategy={strategy}", f"trainer.seed={seed}", *extra], summary)


def test_groups_over_seeds_mark_the_difference_larger_than_seed_noise(tmp_path, report):
    _seed_runs(tmp_path)
    fake_job(tmp_path / "linear_probe_3", ["strategy=linear_probe", "trainer.seed=3"],
             {"status": "failed", "strategy": "linear_probe", "error": "FinetuneError: loss became nan"})
    proc = report(tmp_path, "--group-by", "strategy")
    assert proc.returncode == 0, proc.stderr
    rows = {r["group"]: r for r in csv.DictReader((tmp_path / "report_groups.csv").open())}
    assert list(rows) == ["strategy=full", "strategy=freeze_early", "strategy=linear_probe"]  # best mean first
    full, freeze, probe = rows.values()
    assert full["strategy"] == "full" and full["n"] == "3" and full["monitor"] == "val_acc"
    assert float(full["mean"]) == pytest.approx(0.91) and float(full["std"]) == pytest.approx(0.01)
    assert float(full["ci95_low"]) == pytest.approx(0.91 - HALF) and float(full["ci95_high"]) == pytest.approx(0.91 + HALF)
    assert float(full["min"]) == 0.90 and float(full["max"]) == 0.92 and float(full["mean_total_seconds"]) == 11.0
    assert float(full["trainable_pct"]) == 40.0 and float(full["mean_peak_memory_mb"]) == pytest.approx(812.4)
    assert full["delta_vs_best"] == "0.0" and full["p_vs_best"] == "" and full["larger_than_seed_noise"] == ""
    # linear_probe: 10 pp below, t = 0.1 / sqrt(2 x 0.0001 / 3) with 4 degrees of freedom
    assert float(probe["delta_vs_best"]) == pytest.approx(-0.10) and probe["larger_than_seed_noise"] == "True"
    assert float(probe["p_vs_best"]) == pytest.approx(two_sided_p(0.1 / math.sqrt(0.0002 / 3), 4), rel=1e-6)
    assert probe["n"] == "3"  # the failed fourth run is left out
    # freeze_early: 1 pp below, but its seeds spread over 9 pp
    assert float(freeze["mean"]) == pytest.approx(0.90) and float(freeze["std"]) == pytest.approx(math.sqrt(0.0021))
    assert freeze["larger_than_seed_noise"] == "False" and float(freeze["p_vs_best"]) > 0.5
    out = " ".join(proc.stdout.split())
    assert "Groups by strategy" in out and "91.0% ± 2.5 pp" in out and "* larger than seed noise" in out
    assert "within seed noise" in out and "Welch's t-test" in out and "Left out (not completed, or no best metric): 1 failed" in out
    md = (tmp_path / "report_groups.md").read_text()
    assert "| strategy=linear_probe | 3 | 81.0% ± 2.5 pp | 1.0 pp | 80.0% - 82.0% | -10.0 pp | <0.001 |" in md and "* larger than seed noise" in md
    assert "p < 0.05" in md
    with Image.open(tmp_path / "groups.png") as img:
        assert img.format == "PNG" and img.size[0] > 400
    assert "report_groups.csv" in proc.stdout and "groups.png" in proc.stdout


def test_a_sweep_over_seeds_is_grouped_without_asking_and_a_lone_run_concludes_nothing(tmp_path, report):
    _seed_runs(tmp_path, {"full": [0.90, 0.91, 0.92], "partial": [0.70]}, extra=["optimizer.lr=0.001"])
    fake_job(tmp_path / "full_lr", ["strategy=full", "trainer.seed=3", "optimizer.lr=0.01"], done_summary("full", 0.5))
    proc = report(tmp_path, "--no-plots")  # no --group-by: the seeds vary, so every other varying key groups
    assert proc.returncode == 0, proc.stderr
    rows = {r["group"]: r for r in csv.DictReader((tmp_path / "report_groups.csv").open())}
    assert set(rows) == {"optimizer.lr=0.001 strategy=full", "optimizer.lr=0.01 strategy=full",
                         "optimizer.lr=0.001 strategy=partial"}
    lone = rows["optimizer.lr=0.001 strategy=partial"]
    assert lone["n"] == "1" and lone["std"] == lone["ci95_low"] == lone["p_vs_best"] == lone["larger_than_seed_noise"] == ""
    out = " ".join(proc.stdout.split())
    assert "no conclusion (n=1)" in out and "A group of one run has no interval" in out
    assert not (tmp_path / "groups.png").exists()
    # grouped by strategy alone, full's runs also differ in their LR: said under the table
    proc = report(tmp_path, "--no-plots", "--group-by", "strategy")
    assert "Runs within a group also differ in optimizer.lr" in " ".join(proc.stdout.split())
    proc = report(tmp_path, "--no-plots", "--group-by", "none")
    assert "Groups by" not in proc.stdout


@pytest.mark.bad_input
def test_group_by_a_key_no_run_has_names_the_keys_that_vary(tmp_path, report):
    _seed_runs(tmp_path, {"full": [0.9, 0.91], "partial": [0.8, 0.81]})
    proc = report(tmp_path, "--group-by", "optimizer.lrr")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--group-by optimizer.lrr: no run has this key. Keys that vary between the runs: strategy." in proc.stderr
    assert not (tmp_path / "report.csv").exists()


def test_the_closing_table_of_a_sweep_over_seeds_shows_its_groups(tmp_path, capsys):
    from finetune_cli.tools.sweep import show_sweep

    _seed_runs(tmp_path, {"full": [0.90, 0.91, 0.92], "linear_probe": [0.80, 0.81, 0.82]})
    show_sweep(tmp_path)
    out = " ".join(capsys.readouterr().out.split())
    assert "Groups by strategy" in out and "* larger than seed noise" in out


def test_a_real_sweep_over_seeds_and_its_groups(tmp_path, cache_dir, report):
    """Two strategies x two seeds of tiny runs: the closing table groups them; the report's means
    are those of the runs' summaries."""
    proc = cli(["-m", "strategy=linear_probe,full", "trainer.seed=0,1", "debug=tiny", "hydra.sweep.dir=sweep"],
               tmp_path, env={"FINETUNE_CLI_CACHE": str(cache_dir)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Groups by strategy" in proc.stdout
    report = report(tmp_path / "sweep", "--group-by", "strategy")
    assert report.returncode == 0, report.stderr
    bests = {}
    for run in run_dirs(tmp_path / "sweep"):
        summary = json.loads((run / "summary.json").read_text())
        bests.setdefault(summary["strategy"], []).append(summary["best"]["value"])
    rows = {r["strategy"]: r for r in csv.DictReader((tmp_path / "sweep" / "report_groups.csv").open())}
    assert set(rows) == {"linear_probe", "full"}
    for strategy, values in bests.items():
        assert rows[strategy]["n"] == "2" and float(rows[strategy]["mean"]) == pytest.approx(sum(values) / 2)
    with Image.open(tmp_path / "sweep" / "groups.png") as img:
        img.verify()
