"""Hyperparameter search: ``finetune-cli -m hparams_search=strategy_lr`` (Optuna's TPE through
hydra-optuna-sweeper), its study kept in the sweep folder, resumed, and its trials reported."""

import csv
import json
import shutil
import sqlite3
import sys

import pytest
import yaml

from finetune_cli.search import command_problem, direction_problem, representative_jobs

from helpers import cli

pytest.importorskip("optuna")

SEARCH = ["-m", "hparams_search=strategy_lr", "debug=tiny"]


def _trials(folder):
    """(number, state, value) of every trial in the sweep's optuna.db, read with SQLite alone."""
    with sqlite3.connect(folder / "optuna.db") as db:
        rows = db.execute("SELECT t.number, t.state, v.value FROM trials t LEFT JOIN trial_values v "
                          "ON v.trial_id = t.trial_id ORDER BY t.number").fetchall()
    return [(n, state, value) for n, state, value in rows]


def _params(folder):
    import optuna

    study = optuna.load_study(study_name="strategy_lr", storage=f"sqlite:///{folder / 'optuna.db'}")
    return {t.number: t.params for t in study.trials}


def _job(folder, number):
    (job,) = folder.glob(f"{number}_*")
    return job


def _summary(job):
    return json.loads((job / "summary.json").read_text())


@pytest.fixture(scope="module")
def search(tmp_path_factory, cache_dir):
    """A 3-trial search on tiny synthetic data; the folder is copied by the tests that change it."""
    root = tmp_path_factory.mktemp("search")
    proc = cli([*SEARCH, "hydra.sweeper.n_trials=3", "hydra.sweep.dir=search"], root,
               env={"FINETUNE_CLI_CACHE": str(cache_dir)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    yield root / "search", proc
    shutil.rmtree(root, ignore_errors=True)


def test_each_trial_is_a_run_whose_best_metric_is_the_objective(search):
    folder, proc = search
    trials = _trials(folder)
    assert [(n, state) for n, state, _ in trials] == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "COMPLETE")]
    params = _params(folder)
    for number, _, value in trials:
        job = _job(folder, number)  # trial N ran in job folder N_
        summary = _summary(job)
        assert summary["status"] == "completed" and value == summary["best"]["value"]
        assert summary["best"]["monitor"] == "val_acc"
        sampled = params[number]
        assert set(sampled) == {"optimizer.lr", "optimizer.weight_decay", "strategy"}
        assert summary["strategy"] == sampled["strategy"]
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        assert config["optimizer"]["lr"] == sampled["optimizer.lr"]
        assert config["optimizer"]["weight_decay"] == sampled["optimizer.weight_decay"]
        assert 1e-4 <= sampled["optimizer.lr"] <= 1e-2 and 1e-5 <= sampled["optimizer.weight_decay"] <= 1e-1
    best = yaml.safe_load((folder / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(value for _, _, value in trials)
    # the closing tables: the jobs, then the trials with the best one marked
    out = proc.stdout
    assert out.count("Sweep: ") == 1 and "Trials of study 'strategy_lr'" in out and out.count("<- best") == 1
    assert "3 trials: 3 completed, 0 failed" in out and "Traceback" not in proc.stderr


def test_the_report_lists_the_trials(search, tmp_path, report):
    folder, _ = search
    copy = shutil.copytree(folder, tmp_path / "search")
    proc = report(copy, "--no-plots")
    assert proc.returncode == 0, proc.stderr
    assert "Trials of study 'strategy_lr'" in proc.stdout and "<- best" in proc.stdout
    rows = list(csv.DictReader((copy / "trials.csv").open()))
    assert [r["trial"] for r in rows] == ["0", "1", "2"]
    assert list(rows[0]) == ["study", "trial", "state", "value", "best", "optimizer.lr", "optimizer.weight_decay",
                             "strategy"]
    values = {r["trial"]: float(r["value"]) for r in rows}
    assert [r["best"] for r in rows].count("True") == 1
    best = next(r for r in rows if r["best"] == "True")
    assert values[best["trial"]] == max(values.values())
    assert all(float(r["value"]) == _summary(_job(copy, r["trial"]))["best"]["value"] for r in rows)
    assert "trials.csv" in proc.stdout


def test_the_same_command_in_the_same_folder_adds_trials_to_the_study(search, tmp_path, cache_dir):
    folder, _ = search
    copy = shutil.copytree(folder, tmp_path / "search")
    before = _trials(copy)
    proc = cli([*SEARCH, "hydra.sweeper.n_trials=2", "hydra.sweep.dir=search"], tmp_path,
               env={"FINETUNE_CLI_CACHE": str(cache_dir)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Resuming study 'strategy_lr': 3 trials so far" in proc.stdout + proc.stderr
    after = _trials(copy)
    assert after[:3] == before and [(n, s) for n, s, _ in after[3:]] == [(3, "COMPLETE"), (4, "COMPLETE")]
    assert sorted(p.name.split("_")[0] for p in copy.iterdir() if p.is_dir()) == ["0", "1", "2", "3", "4"]
    assert not list(tmp_path.glob("search-*"))  # the same folder, not a new one beside it
    for number, _, value in after[3:]:
        assert _summary(_job(copy, number))["best"]["value"] == value
    assert "5 trials: 5 completed" in proc.stdout


@pytest.mark.bad_input
def test_a_study_is_resumed_only_with_the_settings_it_was_run_with(search, tmp_path, cache_dir):
    folder, _ = search
    copy = shutil.copytree(folder, tmp_path / "search")
    before = sorted(p.name for p in copy.iterdir())
    proc = cli([*SEARCH, "hydra.sweeper.n_trials=1", "hydra.sweep.dir=search", "trainer.epochs=2"], tmp_path,
               env={"FINETUNE_CLI_CACHE": str(cache_dir)})
    assert proc.returncode == 1
    assert "was run with other settings (trainer.epochs: (not given) then, 2 now)" in proc.stderr
    assert "Traceback" not in proc.stderr and len(_trials(copy)) == 3 and sorted(p.name for p in copy.iterdir()) == before


@pytest.mark.fault
def test_a_failed_trial_does_not_stop_the_search(tmp_path, cache_dir):
    """optimizer.lr=1e9 gives full fine-tuning a NaN loss: that trial is failed in the study and the
    next ones run. (With sampler seed 5 the first trial draws 1e9 and the next two 0.001.)"""
    proc = cli([*SEARCH, "hydra.sweeper.n_trials=3", "hydra.sweep.dir=search", "hydra.sweeper.sampler.seed=5",
                "optimizer.lr=choice(0.001,1e9)", "strategy=full"], tmp_path, env={"FINETUNE_CLI_CACHE": str(cache_dir)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = tmp_path / "search"
    trials = _trials(folder)
    assert [(n, s) for n, s, _ in trials] == [(0, "FAIL"), (1, "COMPLETE"), (2, "COMPLETE")]
    assert _params(folder)[0]["optimizer.lr"] == 1e9
    failed = _summary(_job(folder, 0))
    assert failed["status"] == "failed" and "nan" in failed["error"].lower()
    assert [_summary(_job(folder, n))["best"]["value"] for n in (1, 2)] == [trials[1][2], trials[2][2]]
    assert "3 trials: 2 completed, 1 failed" in proc.stdout and "Traceback" not in proc.stderr


@pytest.mark.slow  # 12 s; a failed trial's handling is tested in the default suite above
@pytest.mark.fault
def test_a_search_none_of_whose_trials_completed_exits_1_in_one_paragraph(tmp_path, cache_dir):
    proc = cli([*SEARCH, "hydra.sweeper.n_trials=1", "hydra.sweep.dir=search", "optimizer.lr=1e9",
                "strategy=full"], tmp_path,
               env={"FINETUNE_CLI_CACHE": str(cache_dir)})
    assert proc.returncode == 1
    assert "No trial of this search completed" in proc.stderr and "Traceback" not in proc.stderr
    assert [s for _, s, _ in _trials(tmp_path / "search")] == ["FAIL"]
    assert "1 trials: 0 completed, 1 failed" in proc.stdout


@pytest.mark.bad_input
def test_a_search_whose_direction_does_not_follow_the_monitor_is_refused_before_any_folder(tmp_path, cache_dir):
    proc = cli([*SEARCH, "trainer.monitor=val_loss", "hydra.sweep.dir=search"], tmp_path,
               env={"FINETUNE_CLI_CACHE": str(cache_dir)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "add hydra.sweeper.direction=minimize" in proc.stderr and "all jobs" in proc.stderr
    assert not (tmp_path / "search").exists()


def test_what_a_search_checks_ahead():
    assert direction_problem("maximize", "val_acc") is None and direction_problem("minimize", "val_loss") is None
    assert "hydra.sweeper.direction=maximize" in direction_problem("minimize", "val_acc")
    assert "give maximize or minimize" in direction_problem(["maximize", "minimize"], "val_acc")
    jobs = representative_jobs({"optimizer.lr": "tag(log, interval(1e-4, 1e-2))", "strategy": "choice(full, lora)"},
                               ["debug=tiny", "strategy=choice(linear_probe,full,bitfit)"])
    assert jobs == [["optimizer.lr=0.0001", "strategy=linear_probe", "debug=tiny"],
                    ["optimizer.lr=0.01", "strategy=linear_probe", "debug=tiny"],
                    ["optimizer.lr=0.0001", "strategy=full", "debug=tiny"],
                    ["optimizer.lr=0.0001", "strategy=bitfit", "debug=tiny"]]
    assert command_problem(["hparams_search=strategy_lr"]).startswith("hparams_search=strategy_lr runs a search")
    assert command_problem(["-m", "hparams_search=strategy_lr"]) is None
    assert command_problem(["strategy=full"]) is None


def test_without_optuna_the_report_still_reports_the_runs(search, tmp_path, report, monkeypatch):
    folder, _ = search
    copy = shutil.copytree(folder, tmp_path / "search")
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if the extra were not installed
    proc = report(copy, "--no-plots")
    assert proc.returncode == 0, proc.stderr
    assert "Trials not listed" in proc.stdout and "pip install 'finetune-cli[search]'" in proc.stdout
    assert len(list(csv.DictReader((copy / "report.csv").open()))) == 3 and not (copy / "trials.csv").exists()
