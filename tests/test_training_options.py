"""Trainer options that change how each update is made: gradient accumulation (trainer.accumulate)."""

import csv
from pathlib import Path

import pytest
import torch

from finetune_cli.train.engine import update_window

# every BatchNorm in eval and no random augmentation: the same images give the same gradients;
# SGD, whose update is linear in them (Adam divides by their root mean square, which turns
# differences of 1e-7 in gradients near zero into 1e-5 in the weights)
SAME_MATH = ["debug=tiny", "trainer.epochs=2", "strategy=full", "strategy.bn=freeze_all", "augment=none", "optimizer=sgd",
             "optimizer.lr=0.05"]


def _rows(run):
    return list(csv.DictReader((run / "metrics.csv").open()))


def test_the_update_window_is_the_accumulation_or_the_rest_at_the_end_of_the_epoch():
    assert [update_window(s, 5, 2) for s in range(5)] == [2, 2, 2, 2, 1]
    assert [update_window(s, 10, 3) for s in range(10)] == [3] * 9 + [1]
    assert [update_window(s, 4, 1) for s in range(4)] == [1] * 4
    assert [update_window(s, 2, 4) for s in range(2)] == [2, 2]  # fewer batches than the accumulation


def test_accumulating_two_batches_of_8_updates_as_one_batch_of_16(finetune):
    """80 training images: 5 updates an epoch either way, each on the same 16 images."""
    plain, one = finetune(*SAME_MATH, "data.batch_size=16", name="plain")
    summed, two = finetune(*SAME_MATH, "data.batch_size=8", "trainer.accumulate=2", name="accumulated")
    assert summed["effective_batch_size"] == plain["effective_batch_size"] == 16
    a = torch.load(one / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(two / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-5) for k in a["model"])
    assert a["schedule"]["per_batch"]["last_epoch"] == b["schedule"]["per_batch"]["last_epoch"] == 10
    for ra, rb in zip(_rows(one), _rows(two)):
        for k in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert float(ra[k]) == pytest.approx(float(rb[k]), abs=1e-5), k
    # and it is not the same as stepping on every batch of 8
    _, each = finetune(*SAME_MATH, "data.batch_size=8", name="each")
    c = torch.load(each / "checkpoints" / "last.pt", weights_only=True)
    assert not torch.allclose(a["model"]["fc.weight"], c["model"]["fc.weight"], atol=1e-4)


def test_a_resume_may_trade_processes_for_accumulation_when_the_effective_batch_stays():
    from finetune_cli.train.checkpoint import changed_settings

    def run(devices, batch, accumulate):
        return {"trainer": {"devices": devices, "accumulate": accumulate}, "data": {"batch_size": batch}}

    assert changed_settings(run("2", 8, 1), run("1", 8, 2)) == []  # 16 per optimizer step either way
    assert changed_settings(run("1", 16, 1), run("1", 4, 4)) == []
    assert changed_settings(run("1", 8, 2), run("1", 8, 1))[0].startswith("trainer.accumulate: 2 -> 1")


@pytest.mark.slow  # 40 s: two processes
def test_two_processes_accumulating_update_as_one_process_with_the_whole_batch(tmp_path):
    """2 processes x batch 4 x 2 accumulated = 1 process x batch 16: the batches that do not step
    skip DDP's all-reduce, the ones that step average every process's summed gradients."""
    from helpers import cli

    one = cli([*SAME_MATH, "data.batch_size=16", "hydra.run.dir=outputs/one"], tmp_path)
    two = cli([*SAME_MATH, "data.batch_size=4", "trainer.accumulate=2", "trainer.devices=2",
               "hydra.run.dir=outputs/two"], tmp_path)
    assert one.returncode == 0 and two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    assert "batch 4 per process x 2 accumulated (trainer.accumulate), effective batch 16" in two.stdout
    a = torch.load(tmp_path / "outputs/one/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "outputs/two/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


# --- the weights' moving average (trainer.ema) ----------------------------------------------------


def test_the_average_follows_the_ema_formula_with_its_warmup():
    from torch import nn

    from finetune_cli.train.ema import decay_at, ema_for

    assert [decay_at(0.999, n, True) for n in (0, 1, 90)] == [1 / 10, 2 / 11, 91 / 100]
    assert decay_at(0.9, 1000, True) == 0.9 and decay_at(0.9, 0, False) == 0.9
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ema_for(model, 0.5, warmup=False)
    expected = model[0].weight.detach().clone()
    for step in range(3):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model(torch.randn(4, 3))  # BatchNorm's running statistics and its integer batch counter move
        ema.update(model)
        expected = 0.5 * expected + 0.5 * model[0].weight.detach()
    assert torch.allclose(ema.module[0].weight, expected)
    assert int(ema.module[1].num_batches_tracked) == 3 and ema.updates == 4  # the copy, then 3 updates
    assert not torch.equal(ema.module[1].running_mean, model[1].running_mean)  # averaged too


EMA = ["debug=tiny", "model.weights=synthetic", "strategy=full", "strategy.lr_scale=10", "trainer.epochs=3",
       "trainer.ema=0.9"]


def test_the_average_is_evaluated_each_epoch_and_served_when_monitored(finetune, tmp_path):
    """ema_val_acc beside val_acc; with trainer.monitor=ema_val_acc, best.pt serves the average: the
    evaluation tool on the val set gives the best epoch's ema_val_acc."""
    from finetune_cli.tools.evaluate import evaluate_folder
    from finetune_cli.tools.loading import load_for_inference

    summary, run = finetune(*EMA, "trainer.monitor=ema_val_acc")
    rows = _rows(run)
    assert all({"ema_val_acc", "ema_val_loss", "ema_val_balanced_acc", "ema_val_macro_f1"} <= set(r) for r in rows)
    assert any(r["ema_val_loss"] != r["val_loss"] for r in rows)  # the average is not the weights
    best = summary["best"]
    assert best["monitor"] == "ema_val_acc" and best["value"] == max(float(r["ema_val_acc"]) for r in rows)
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["serve"] == "ema" and ckpt["ema"]["updates"] == 1 + 5 * int(ckpt["epoch"])  # 5 steps an epoch
    loaded = load_for_inference(str(run / "checkpoints" / "best.pt"))
    served = loaded.model.state_dict()
    assert all(torch.equal(served[k], ckpt["ema"]["model"][k]) for k in served)
    val = Path(summary["dataset"]["root"]) / "val"
    result = evaluate_folder(loaded, val, batch_size=16, workers=0, device=torch.device("cpu"))
    assert result["accuracy"] == pytest.approx(best["value"])
    assert summary["at_best"]["ema_val_acc"] == best["value"]


def test_a_run_with_an_average_resumes_exactly(finetune):
    _, straight = finetune(*EMA, "trainer.save_every=1", name="straight")
    _, resumed = finetune(*EMA, f"trainer.resume={straight / 'checkpoints' / 'epoch_001.pt'}", name="resumed")
    from helpers import assert_same_runs

    a, b, _, _ = assert_same_runs(straight, resumed, ("train_loss", "val_acc", "ema_val_acc", "ema_val_loss"))
    assert a["ema"]["updates"] == b["ema"]["updates"] == 16
    assert all(torch.equal(a["ema"]["model"][k], b["ema"]["model"][k]) for k in a["ema"]["model"])
    assert "serve" not in a  # monitored: the weights; inference takes them


@pytest.mark.bad_input
def test_monitoring_the_average_without_one_is_a_clear_error(tmp_path):
    from helpers import cli

    proc = cli(["debug=tiny", "trainer.monitor=ema_val_acc"], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "trainer.ema is off" in proc.stderr and "set trainer.ema" in proc.stderr
