"""Resuming continues the checkpoint's run exactly, or is refused naming what differs, leaving
the run folder as it was; a new phase from the weights is an explicit new run."""

import json

import pytest

from finetune_cli.errors import Refused
from finetune_cli.train.checkpoint import changed_settings

from helpers import cli, make_image_folder, snapshot

TINY = ("debug=tiny",)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "override, needle",
    [
        ("strategy=full", "strategy.name: linear_probe -> full"),
        ("optimizer.lr=0.01", "optimizer.lr: 0.001 -> 0.01"),
        ("strategy.lr_scale=0.1", "strategy.lr_scale: 10.0 -> 0.1"),
        ("optimizer=sgd", "optimizer.name: adamw -> sgd"),
        ("model.head=mlp", "model.head: linear -> mlp"),
        ("trainer.epochs=4", "Its LR schedule was laid out for its own number of epochs"),
    ],
)
def test_resume_with_settings_that_change_training_is_refused_and_changes_nothing(finetune, kept, override, needle):
    """linear_probe for 1 epoch, then strategy=full trainer.resume=auto once trained the head
    only, at the old LR, while summary.json said "full"."""
    _, run = finetune(*TINY, "strategy=linear_probe", "trainer.epochs=2")
    before = snapshot(run)
    with pytest.raises(Refused) as info:
        finetune(*TINY, "strategy=linear_probe", "trainer.epochs=2", override, "trainer.resume=auto", out_dir=run)
    message = str(info.value)
    assert needle in message and "model.weights=" in message and "best.pt" in message
    kept(before, run)
    assert snapshot(run) == before  # not a timestamp changed either


def test_resume_may_change_where_and_how_fast(finetune):
    summary, run = finetune(*TINY, "trainer.epochs=2", "trainer.save_every=1")
    (run / "checkpoints" / "last.pt").replace(run / "checkpoints" / "keep.pt")
    (run / "checkpoints" / "epoch_001.pt").replace(run / "checkpoints" / "last.pt")
    again, _ = finetune(*TINY, "trainer.epochs=2", "trainer.save_every=0", "trainer.device=cpu",
                        "data.num_workers=0", "trainer.resume=auto", out_dir=run)
    assert again["status"] == "completed" and again["epochs_run"] == 2


def test_only_settings_both_sides_know_are_compared():
    saved = {"optimizer": {"lr": 0.1}, "trainer": {"device": "cuda", "epochs": 3}}
    now = {"optimizer": {"lr": 0.1, "new_key": 1}, "trainer": {"device": "cpu", "epochs": 3}}
    assert changed_settings(saved, now) == []
    assert changed_settings(saved, {**now, "optimizer": {"lr": 0.2}}) == ["optimizer.lr: 0.1 -> 0.2"]


@pytest.mark.bad_input
def test_cli_refused_resume_leaves_the_run_folder_exactly_as_it_was(tmp_path):
    """A refused resume once rewrote classes.json, flipped a completed summary.json to "failed"
    and replaced .hydra/config.yaml with the rejected config."""
    root = make_image_folder(tmp_path / "pets")
    base = ["debug=tiny", "data=imagefolder", f"data.root={root}", "hydra.run.dir=run"]
    first = cli(base, tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    run = tmp_path / "run"
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.suffix != ".log"}
    for extra in (["strategy=full"], [f"data.root={make_image_folder(tmp_path / 'other', classes=('ox', 'yak'))}"]):
        proc = cli(base + extra + ["trainer.resume=auto"], tmp_path)
        assert proc.returncode == 1
        out = proc.stdout + proc.stderr
        assert "Traceback" not in out and ("Cannot resume" in out or "was saved for resnet18" in out)
        assert {p: p.read_bytes() for p in files} == files  # .hydra/config.yaml, summary.json, classes.json...
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


@pytest.mark.bad_input
def test_a_run_saved_under_earlier_defaults_is_resumed_by_adding_them_back(finetune):
    """A run saved before strategy.bn and auto_lr_decay changed their defaults: the refusal told
    the user to "drop these overrides", who had given none, and named auto_lr_decay, which a
    freeze_early run never reads."""
    earlier = ("strategy.bn=frozen_eval", "strategy.auto_lr_decay=2.6")
    _, run = finetune(*TINY, "strategy=freeze_early", "trainer.epochs=2", *earlier)
    with pytest.raises(Refused) as info:
        finetune(*TINY, "strategy=freeze_early", "trainer.epochs=3", "trainer.resume=auto", out_dir=run)
    message = str(info.value)
    assert "strategy.bn: frozen_eval -> train" in message and "auto_lr_decay" not in message
    assert "add strategy.bn=frozen_eval trainer.epochs=2" in message
    again, _ = finetune(*TINY, "strategy=freeze_early", "trainer.epochs=2", "strategy.bn=frozen_eval",
                        "trainer.resume=auto", out_dir=run)
    assert again["status"] == "completed"
