"""The LR finder (task=lr_find): the sweep's LRs, the group ratios and the frozen groups, the
smoothing and the stop, the rules, the weights and streams left as found, the files, the report,
the console, and bad settings."""

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from finetune_cli.config import LRRule
from finetune_cli.train.lr_find import (
    LRUnits,
    Sweep,
    SweepSettings,
    find_lr,
    picks,
    steepest,
    sweep,
    sweep_parts,
    valley,
)

from helpers import assert_same_runs, cli

TINY = ("debug=tiny", "task=lr_find")


def _rows(run: Path) -> list:
    return [{k: float(v) for k, v in r.items()} for r in csv.DictReader((run / "lr_find.csv").open())]


def _found(run: Path) -> dict:
    return json.loads((run / "lr_find.json").read_text())


def _parts(tmp_path: Path, *overrides: str):
    """The run's parts as ``finetune-cli debug=tiny OVERRIDES`` builds them, and their recorder."""
    from conftest import compose_config
    from omegaconf import OmegaConf

    from finetune_cli.build import build
    from finetune_cli.checks import check, typed_config
    from finetune_cli.record import Recorder
    from finetune_cli.runtime import seed_everything

    cfg, _ = compose_config(["debug=tiny", *overrides])
    typed = typed_config(cfg)
    check(typed)
    seed_everything(typed.trainer.seed, typed.trainer.deterministic)
    out = tmp_path / "parts"
    out.mkdir()
    recorder = Recorder(out)
    return build(typed, recorder, OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)), recorder


def test_the_sweep_rises_exponentially_keeps_the_group_ratios_and_writes_its_files(finetune):
    summary, run = finetune(*TINY, "strategy=full", "strategy.lr_decay=2.6", "lr_find.start_lr=1e-6",
                            "lr_find.end_lr=1", "lr_find.steps=20", "lr_find.diverge=null")
    rows = _rows(run)
    lrs = [r["lr"] for r in rows]
    assert len(rows) == 20 and lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    assert all(b / a == pytest.approx(10 ** (6 / 19)) for a, b in zip(lrs, lrs[1:]))  # one factor, step to step
    groups = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    for r in rows:  # the head at the swept LR, each group below it 2.6 times lower, at every step
        assert r["lr_head"] == pytest.approx(r["lr"])
        assert all(r[f"lr_{hi}"] / r[f"lr_{lo}"] == pytest.approx(2.6) for lo, hi in zip(groups, groups[1:]))
    # the smoothed column is the bias-corrected moving average of the loss column
    average = 0.0
    for i, r in enumerate(rows):
        average = 0.98 * average + 0.02 * r["loss"]
        assert r["smoothed"] == pytest.approx(average / (1 - 0.98 ** (i + 1)))

    found = _found(run)
    assert found["rule"] == "steepest" and found["steps_run"] == 20 and not found["stopped"]
    assert 1e-6 <= found["head_lr"] <= 1.0
    # strategy=full trains at optimizer.lr x 0.3: the suggestion is the optimizer.lr that gives the head LR found
    assert found["suggestion"] == pytest.approx(found["head_lr"] / 0.3)
    assert found["override"] == f"optimizer.lr={found['head_lr'] / 0.3:.1e}"
    assert set(found["rules"]) == {"valley", "steepest", "minimum"}
    assert summary["status"] == "completed" and summary["task"] == "lr_find" and summary["lr_find"] == found
    with Image.open(run / "lr_find.png") as image:
        assert image.size[0] > 600
    assert not (run / "metrics.csv").exists() and not (run / "checkpoints").exists()


@pytest.mark.parametrize("strategy, trains", [
    (("strategy=freeze_early", "strategy.freeze_groups=2"), [False, False, True, True, True, True]),
    (("strategy=progressive",), [False, False, False, False, False, True]),  # epoch 1: the head alone
])
def test_frozen_groups_get_no_update_while_the_rest_moves(tmp_path, strategy, trains):
    parts, _ = _parts(tmp_path, *strategy)
    groups = parts.built.groups
    before = [[p.detach().clone() for _, p in g.params] for g in groups]
    found = sweep_parts(parts, SweepSettings(1e-4, 1e-1, 12, diverge=None))
    assert len(found.lrs) == 12
    moved = [any(not torch.equal(a, p) for a, (_, p) in zip(old, g.params)) for old, g in zip(before, groups)]
    assert moved == trains


def test_a_staged_run_sweeps_its_first_stage_and_gives_the_lr_back_without_its_multiplier(finetune):
    stages = "strategy.stages=[{epochs:1,train_groups:1,lr_mult:0.5},{epochs:1,train_groups:-1}]"
    _, run = finetune(*TINY, "strategy=staged", stages, "strategy.lr_scale=2", "lr_find.steps=10")
    found = _found(run)
    assert found["suggestion"] == pytest.approx(found["head_lr"] / (2 * 0.5))
    assert "strategy.lr_scale 2 x the first stage's lr_mult 0.5" in found["how"]


def test_weights_optimizer_and_random_streams_end_as_found_and_a_run_after_is_unaffected(tmp_path, finetune):
    from finetune_cli.train.checkpoint import resume
    from finetune_cli.train.fit import fit

    _, plain = finetune("debug=tiny", "strategy=full", name="plain")
    parts, recorder = _parts(tmp_path, "strategy=full")
    weights = {k: v.clone() for k, v in parts.model.state_dict().items()}
    lrs = [g["lr"] for g in parts.optimizer.param_groups]
    streams = (torch.get_rng_state(), parts.train_loader.generator.get_state(), parts.train_loader.sampler.epoch)

    found = find_lr(parts, SweepSettings(1e-5, 1.0, 12, diverge=None))
    assert len(found.lrs) == 12 and found.losses[0] != found.losses[-1]  # it trained, on a copy of nothing
    after = parts.model.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights)  # BatchNorm statistics included
    assert [g["lr"] for g in parts.optimizer.param_groups] == lrs and not parts.optimizer.state
    assert all(p.grad is None for p in parts.model.parameters())
    assert torch.equal(torch.get_rng_state(), streams[0])
    assert torch.equal(parts.train_loader.generator.get_state(), streams[1])
    assert parts.train_loader.sampler.epoch == streams[2]

    # then the same run trains on these parts, and ends exactly as the run that never swept
    start = resume(parts.state, None, parts.controller.epochs, "resnet18", parts.splits.classes)
    recorder.begin({}, parts.splits.classes)
    fit(parts, start, recorder)
    assert_same_runs(plain, recorder.out_dir, columns=("train_loss", "val_loss", "val_acc"))


def test_a_huge_lr_stops_the_sweep_once_the_smoothed_loss_passes_four_times_its_lowest(finetune, caplog):
    _, run = finetune(*TINY, "strategy=full", "lr_find.start_lr=1e-4", "lr_find.end_lr=1e6", "lr_find.steps=30")
    found, rows = _found(run), _rows(run)
    assert found["stopped"] and found["steps_run"] == len(rows) < 30
    finite = [r["smoothed"] for r in rows if math.isfinite(r["smoothed"])]
    assert len(finite) < len(rows) or finite[-1] > 4 * min(finite)  # a non-finite loss, or past 4x the lowest
    assert all(s <= 4 * min(finite[: i + 1]) for i, s in enumerate(finite[:-1]))  # not one step earlier
    assert f"stopped after {len(rows)} of 30 steps" in caplog.text


def test_a_linear_probe_sweeps_cached_features_with_the_losses_of_the_whole_network(finetune):
    args = (*TINY, "strategy=linear_probe", "augment=none", "lr_find.steps=12", "lr_find.diverge=null")
    _, cached = finetune(*args, name="cached")
    _, whole = finetune(*args, "data.cache_features=false", name="whole")
    assert _found(cached)["cached_features"] and not _found(whole)["cached_features"]
    a, b = _rows(cached), _rows(whole)
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-4)
    # linear_probe trains at optimizer.lr x 10
    assert _found(cached)["suggestion"] == pytest.approx(_found(cached)["head_lr"] / 10)


def test_with_accumulation_each_step_is_one_update_of_the_accumulated_batches(finetune, caplog):
    """trainer.accumulate=2 over batches of 8 sweeps as training updates: each step one update of 16
    images, the same LRs and losses as batches of 16 (BatchNorm in eval, no augmentation, SGD: the
    same images give the same update), across epochs' ends (10 steps of 16 from 80 images)."""
    args = (*TINY, "strategy=full", "strategy.bn=freeze_all", "augment=none", "optimizer=sgd", "lr_find.steps=10",
            "lr_find.start_lr=1e-5", "lr_find.end_lr=0.1", "lr_find.diverge=null")
    _, sixteen = finetune(*args, "data.batch_size=16", name="sixteen")
    _, summed = finetune(*args, "data.batch_size=8", "trainer.accumulate=2", name="accumulated")
    a, b = _rows(sixteen), _rows(summed)
    assert len(a) == len(b) == 10 and [r["lr"] for r in a] == [r["lr"] for r in b]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], abs=1e-5)
    assert _found(summed)["batches_per_step"] == 2 and _found(sixteen)["batches_per_step"] == 1
    assert "each step one update of 2 batches (trainer.accumulate)" in caplog.text
    # and not the sweep of one batch of 8 per step
    _, each = finetune(*args, "data.batch_size=8", name="each")
    assert [r["loss"] for r in _rows(each)] != pytest.approx([r["loss"] for r in a], abs=1e-3)


def test_the_smoothing_is_bias_corrected_and_only_a_finite_loss_counts():
    def losses(values):
        return lambda before: (before(i) or v for i, v in enumerate(values))

    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "group": "head"}], lr=1.0)
    flat = sweep(losses([2.0] * 12), opt, [1.0], SweepSettings(1e-3, 1.0, 12))
    assert flat.smoothed == pytest.approx([2.0] * 12)  # without the correction the first would be 0.04
    assert not flat.stopped and opt.param_groups[0]["lr"] == pytest.approx(1.0)
    broken = sweep(losses([2.0] * 5 + [math.nan] + [2.0] * 6), opt, [1.0], SweepSettings(1e-3, 1.0, 12))
    assert len(broken.losses) == 6 and "nan at step 6" in broken.stopped


def test_the_rules_on_a_curve_of_known_shape():
    # flat, then falling (fastest around step 24), then climbing
    values = [3.0] * 10 + [3.0 - 2.0 / (1 + math.exp(-(i - 14) / 2)) for i in range(20)] + [1.3 + 0.3 * i for i in range(10)]
    lrs = [10 ** (-6 + 6 * i / 39) for i in range(40)]
    assert valley(values[10:30]) == pytest.approx(10, abs=1)  # the middle of the fall
    assert steepest(values) == 24
    found = Sweep(lrs=lrs, losses=values, smoothed=values, group_lrs=[{}] * 40)
    chosen = picks(found)
    assert chosen[LRRule.steepest].head_lr == lrs[24]
    assert chosen[LRRule.minimum].head_lr == pytest.approx(lrs[29] / 10)
    assert 10 <= chosen[LRRule.valley].step <= 29


def test_the_suggestion_is_given_back_in_the_settings_that_make_it():
    probe = LRUnits(optimizer_lr=1e-3, head_lr=1e-2, lr_scale=10)
    assert probe.override(3.2e-3) == "optimizer.lr=3.2e-04"
    staged = LRUnits(optimizer_lr=1e-3, head_lr=5e-4, lr_mult=0.5)
    assert staged.override(1e-3) == "optimizer.lr=2.0e-03" and "lr_mult 0.5" in staged.words()
    explicit = LRUnits(optimizer_lr=1e-3, head_lr=1e-3, group_lrs=[1e-5, 1e-4, 1e-3])
    assert explicit.override(3e-3) == "strategy.group_lrs=[3e-05,0.0003,0.003]"


def test_the_report_leaves_the_lr_finder_out_and_says_so(finetune, tmp_path, capsys):
    from finetune_cli.tools.report import main as report

    _, trained = finetune("debug=tiny", "strategy=full", name="trained")
    _, finder = finetune(*TINY, "lr_find.steps=10", name="finder")
    for run in (trained, finder):
        (run / ".hydra").mkdir()  # as the CLI makes them
    capsys.readouterr()
    assert report([str(tmp_path / "runs"), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "Left out 1 LR finder folder" in out and f"finder: suggested {_found(finder)['override']}" in out
    assert "Runs ranked" in out and "failed" not in out
    rows = list(csv.DictReader((tmp_path / "runs" / "report.csv").open()))
    assert [r["run"] for r in rows] == ["trained"]


def test_finetune_cli_lr_find_prints_the_override_to_paste(tmp_path):
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from finetune_cli.cli import lr_find_main; "
         "sys.argv = ['finetune-cli-lr-find', *sys.argv[1:]]; lr_find_main()",
         "debug=tiny", "strategy=linear_probe", "lr_find.steps=10"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("LR finder: suggested")]
    (run,) = [p.parent for p in (tmp_path / "outputs").rglob("lr_find.json")]
    found = _found(run)
    assert f"suggested {found['override']} (steepest" in line and "strategy.lr_scale 10" in line
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "args, needle",
    [
        (["lr_find.start_lr=1", "lr_find.end_lr=0.1"], "lr_find.start_lr=1 must be below lr_find.end_lr=0.1"),
        (["lr_find.steps=5"], "lr_find.steps=5 is out of range"),
        (["lr_find.start_lr=0"], "lr_find.start_lr=0.0 is out of range"),
        (["lr_find.diverge=1"], "lr_find.diverge=1.0 is out of range"),
        (["lr_find.smoothing=1"], "lr_find.smoothing=1.0 is out of range"),
        (["trainer.resume=auto"], "trainer.resume=auto with task=lr_find"),
        (["trainer.devices=2", "trainer.device=cpu"], "task=lr_find runs in one process"),
    ],
)
def test_bad_lr_finder_settings_are_refused_before_any_folder(tmp_path, refused, args, needle):
    """The first through the real CLI (exit 1, no traceback, no folder); the rest through the same
    check in this process."""
    if args[0] != "lr_find.start_lr=1":
        assert needle in refused(*TINY, *args)
        return
    proc = cli([*TINY, *args], tmp_path)
    assert proc.returncode == 1
    assert needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "outputs").exists()
