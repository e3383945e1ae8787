"""A run's life in this process: finishing, stopping early, resuming a finished run, stage
snapshots, the per-epoch record, and validation that ignores the training loss's smoothing."""

import csv
import re
import signal

import pytest
import torch

from finetune_cli.errors import FinetuneError
from finetune_cli.train import fit as fit_module
from finetune_cli.train.engine import EpochResult

from helpers import snapshot

TINY = ("debug=tiny",)


def rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def scripted_validation(monkeypatch):
    """Validation reports the given accuracies, epoch after epoch, while training runs for real."""

    def script(accs):
        values = iter(accs)

        def fake_evaluate(model, loader, criterion, device, **kw):
            return EpochResult(loss=1.0, acc=next(values), images=1, seconds=0.0)

        monkeypatch.setattr(fit_module, "evaluate", fake_evaluate)

    return script


def test_resuming_a_completed_run_changes_nothing(finetune, monkeypatch):
    summary, run = finetune(*TINY, "trainer.epochs=2")
    assert summary["status"] == "completed"
    before = snapshot(run)
    import finetune_cli.run

    def no_build(*args, **kw):
        raise AssertionError("a finished run builds nothing: no download, no data check")

    monkeypatch.setattr(finetune_cli.run, "build", no_build)
    again, same = finetune(*TINY, "trainer.epochs=2", "trainer.resume=auto", out_dir=run)
    assert same == run
    assert again["status"] == "completed" and again["best"] == summary["best"]
    assert snapshot(run) == before  # not a byte, not a timestamp


def test_resuming_an_early_stopped_run_trains_no_more(finetune, scripted_validation, caplog):
    scripted_validation([0.5, 0.4, 0.3])
    summary, run = finetune(*TINY, "trainer.epochs=5", "trainer.patience=1")
    assert summary["epochs_run"] == 2 and summary["stopped_early"]
    assert "Early stopping" in caplog.text
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["finished"].startswith("early stopping")
    before = snapshot(run)
    again, _ = finetune(*TINY, "trainer.epochs=5", "trainer.patience=1", "trainer.resume=auto", out_dir=run)
    assert again["epochs_run"] == 2 and snapshot(run) == before


def test_a_finished_last_stage_ends_the_run_for_good(finetune, scripted_validation):
    stages = "strategy.stages=[{epochs:1,train_groups:0},{epochs:4,train_groups:1,patience:1}]"
    scripted_validation([0.5, 0.6, 0.6])
    summary, run = finetune(*TINY, "strategy=staged", stages)
    assert summary["epochs_run"] == 3 and summary["stopped_early"]
    before = snapshot(run)
    finetune(*TINY, "strategy=staged", stages, "trainer.resume=auto", out_dir=run)
    assert snapshot(run) == before


def test_stage_best_comes_back_from_its_checkpoint_file(finetune, scripted_validation):
    """Stage 1 peaks at epoch 1 and stalls at epoch 2: stage 2 starts from epoch 1's weights and
    optimizer moments, read from checkpoints/stage_best.pt, at stage 2's LR."""
    stages = "strategy.stages=[{epochs:3,train_groups:1,patience:1},{epochs:1,train_groups:-1,lr_mult:0.1}]"
    scripted_validation([0.5, 0.4, 0.6, 0.6])
    summary, run = finetune(*TINY, "strategy=staged", stages, "trainer.save_every=1", "schedule=constant")
    ck = run / "checkpoints"
    first, second = (torch.load(ck / f"epoch_00{i}.pt", weights_only=True) for i in (1, 2))
    assert "restored the best weights of stage 1" in second["metrics"]["events"]
    for key, value in first["model"].items():
        assert torch.equal(second["model"][key], value), key
    for index, state in first["optimizer"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(second["optimizer"]["state"][index][name], tensor), (index, name)
    assert [g["lr"] for g in second["optimizer"]["param_groups"]] == pytest.approx(
        [0.1 * g["lr"] for g in first["optimizer"]["param_groups"]])
    # the snapshot is a file, not a copy of the weights inside every checkpoint
    assert not any(torch.is_tensor(v) or isinstance(v, dict) and "model" in v for v in second["strategy"].values())
    assert (ck / "epoch_002.pt").stat().st_size < 1.05 * (ck / "epoch_001.pt").stat().st_size


def test_the_first_stages_lr_multiplier_applies_from_the_first_step(finetune):
    stages = "strategy.stages=[{epochs:1,train_groups:0,lr_mult:0.1},{epochs:1,train_groups:1,lr_mult:1.0}]"
    summary, run = finetune(*TINY, "strategy=staged", stages, "schedule=constant", "optimizer.lr=0.01")
    assert [float(r["lr_head"]) for r in rows(run)] == pytest.approx([0.001, 0.01])
    assert summary["groups"][-1]["lr"] == "1.00e-03"  # the plan says what runs


def test_a_missing_stage_snapshot_is_said_and_does_not_stop_the_run(finetune, scripted_validation, monkeypatch, caplog):
    from finetune_cli.record import Recorder

    real = Recorder.epoch

    def epoch_without_snapshot(self, *args, **kw):
        real(self, *args, **kw)
        self.stage_best.unlink(missing_ok=True)  # as after a copy of last.pt alone to another machine

    monkeypatch.setattr(Recorder, "epoch", epoch_without_snapshot)
    stages = "strategy.stages=[{epochs:3,train_groups:1,patience:1},{epochs:1,train_groups:-1,lr_mult:0.1}]"
    scripted_validation([0.5, 0.4, 0.6, 0.6])
    summary, _ = finetune(*TINY, "strategy=staged", stages)
    assert summary["status"] == "completed" and summary["epochs_run"] == 4
    assert "Cannot restore the best weights of stage 1" in caplog.text and "there is no such file" in caplog.text


def test_metrics_row_describes_the_epoch_it_ran(finetune, scripted_validation):
    """A plateau unfreezes a group after epoch 2: that row still reports the head-only epoch."""
    scripted_validation([0.5, 0.5, 0.5])
    _, run = finetune(*TINY, "strategy=progressive", "strategy.trigger=plateau", "strategy.plateau_patience=1",
                      "trainer.epochs=3")
    r = rows(run)
    assert [int(x["trainable_groups"]) for x in r] == [0, 0, 1]
    assert r[0]["trainable_params"] == r[1]["trainable_params"] < r[2]["trainable_params"]
    assert "unfroze layer4" in r[1]["events"]


def test_validation_loss_does_not_move_with_label_smoothing(finetune):
    losses = {}
    for smoothing in (0.0, 0.4):
        summary, run = finetune(*TINY, f"trainer.label_smoothing={smoothing}", "strategy=linear_probe",
                                "optimizer.lr=1e-12", name=f"ls{smoothing}")
        losses[smoothing] = (float(rows(run)[0]["train_loss"]), float(rows(run)[0]["val_loss"]))
    assert losses[0.0][0] != pytest.approx(losses[0.4][0], rel=1e-4)  # training smooths its labels (near-uniform logits: a small change)
    assert losses[0.0][1] == pytest.approx(losses[0.4][1], rel=1e-6)  # validation does not


@pytest.mark.parametrize("override, key", [
    ("trainer.patience=0", "trainer.patience=0"),
    ("strategy.plateau_patience=0", "strategy.plateau_patience=0"),
    ("strategy.stages=[{epochs:2,patience:0}]", "strategy.stages[0].patience=0"),
])
def test_a_patience_of_zero_is_refused(finetune, override, key):
    with pytest.raises(FinetuneError, match=re.escape(key) + ": give the number of epochs"):
        finetune(*TINY, "strategy=staged" if "stages" in override else "strategy=progressive", override)


def test_ulmfit_keeps_its_schedule_under_an_experiment_preset(finetune, caplog):
    summary, run = finetune("experiment=quickstart", *TINY, "strategy=ulmfit", "plan=true")
    assert summary["schedule"] == "stlr" and (run / "classes.json").is_file()
    assert "it replaces schedule=cosine" in caplog.text
    summary, _ = finetune("experiment=quickstart", *TINY, "strategy=ulmfit", "strategy.schedule=null", "plan=true")
    assert summary["schedule"] == "cosine"


def test_anchoring_penalty_replaces_weight_decay_on_the_backbone(tmp_path):
    from conftest import compose_config

    from finetune_cli.build import build
    from finetune_cli.checks import typed_config
    from finetune_cli.record import Recorder

    cfg, _ = compose_config([*TINY, "regularizer=l2sp", "strategy=full", "optimizer.weight_decay=0.05"])
    parts = build(typed_config(cfg), Recorder(tmp_path), {}, training=True)
    decay = {g["group"]: g["weight_decay"] for g in parts.optimizer.param_groups if g["weight_decay"] > 0}
    assert decay == {"head": 0.05}  # weight matrices of the head only; the anchored backbone has none


def test_ewc_without_pretrained_weights_is_refused_before_anything_runs(finetune):
    with pytest.raises(FinetuneError, match="regularizer=ewc .* random init.*regularizer=l2sp"):
        finetune(*TINY, "regularizer=ewc", "model.weights=null")


def test_interrupted_in_the_first_resumed_epoch_names_the_saved_epochs(tmp_path, caplog):
    from finetune_cli.record import Recorder
    from finetune_cli.train.shutdown import Interrupted

    source = tmp_path / "old" / "checkpoints" / "last.pt"
    source.parent.mkdir(parents=True)
    source.write_bytes(b"x")
    rec = Recorder(tmp_path / "new", command="finetune-cli x=1")
    rec.resumed(source, 3, history=[], events=[])
    with caplog.at_level("WARNING", logger="finetune_cli"):
        exit_ = rec.interrupted(Interrupted(signal.SIGTERM, 4))
    assert exit_.code == 143
    assert "Epochs 1-3 are saved in" in caplog.text and f"trainer.resume={source}" in caplog.text
    assert "1-0" not in caplog.text
    # resumed in its own folder from an older checkpoint: that one holds the saved epochs, not last.pt
    older = tmp_path / "new" / "checkpoints" / "epoch_002.pt"
    older.parent.mkdir(parents=True, exist_ok=True)
    older.write_bytes(b"x")
    (older.parent / "last.pt").write_bytes(b"y")
    rec = Recorder(tmp_path / "new", command="finetune-cli x=1")
    rec.resumed(older, 2, history=[], events=[])
    caplog.clear()
    with caplog.at_level("WARNING", logger="finetune_cli"):
        rec.interrupted(Interrupted(signal.SIGTERM, 3))
    assert f"Epochs 1-2 are saved in {older}" in caplog.text


def test_peak_memory_is_the_runs_own_in_a_process_that_ran_more(finetune):
    """Jobs of a sweep share a process: an earlier job's peak must not count as this one's."""
    from pathlib import Path

    status = Path("/proc/self/status")
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs")

    def rss_mb():
        line = next(x for x in status.read_text().splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    big = torch.ones(1536 * 2**20 // 4)  # an earlier job's 1.5 GB, touched
    with_big = rss_mb()
    del big
    summary, _ = finetune(*TINY)
    assert summary["peak_memory_kind"] == "peak RSS since the run started"
    assert summary["peak_memory_mb"] < with_big - 500, (summary["peak_memory_mb"], with_big)


def test_ewc_runs_its_fisher_through_the_classifier_the_weights_came_with(finetune, tmp_path, caplog, monkeypatch):
    import torchvision

    from finetune_cli import build as build_module

    torch.manual_seed(0)
    path = tmp_path / "source.pt"
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), path)  # a 7-way source task
    seen = {}
    real = build_module.fisher_with_source_head

    def spy(model, family, source_head, *args, **kw):
        seen["head"] = source_head
        seen["outputs"] = model.fc.out_features
        return real(model, family, source_head, *args, **kw)

    monkeypatch.setattr(build_module, "fisher_with_source_head", spy)
    summary, _ = finetune(*TINY, "regularizer=ewc", f"model.weights={path}", "regularizer.fisher_samples=8")
    assert summary["status"] == "completed" and "through the source head" in caplog.text
    assert seen["head"].out_features == 7 and seen["outputs"] == 10  # source head 7-way, target head 10-way


def test_resuming_with_other_classes_is_refused(finetune):
    _, run = finetune(*TINY)
    with pytest.raises(FinetuneError, match="these settings differ .* data.synthetic.classes: 10 -> 3"):
        finetune(*TINY, "data.synthetic.classes=3", f"trainer.resume={run}", name="other")
