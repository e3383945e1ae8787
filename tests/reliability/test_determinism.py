"""The same seed gives the same run, with loader workers and with deterministic algorithms."""

import csv

import pytest

COMMON = ["debug=tiny", "model.weights=synthetic", "trainer.epochs=2", "strategy=partial", "augment=strong",
          "augment.mixup_alpha=0.2"]


def _metrics(finetune, *extra):
    summary, run = finetune(*COMMON, *extra)
    assert summary["status"] == "completed" and summary["epochs_run"] == 2
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    return [(r["train_loss"], r["train_acc"], r["val_loss"], r["val_acc"]) for r in rows]


@pytest.mark.slow  # 50 s; the default suite checks 2 workers through the resume test below
def test_same_seed_with_two_workers_gives_identical_metrics(finetune):
    a = _metrics(finetune, "data.num_workers=2", "trainer.seed=5")
    b = _metrics(finetune, "data.num_workers=2", "trainer.seed=5")
    c = _metrics(finetune, "data.num_workers=2", "trainer.seed=6")
    assert len(a) == 2
    assert a == b
    assert a != c  # the seed matters: augmentation, mixing and shuffling changed


def test_deterministic_algorithms_mode_runs(finetune):
    a = _metrics(finetune, "data.num_workers=0", "trainer.deterministic=true")
    b = _metrics(finetune, "data.num_workers=0", "trainer.deterministic=true")
    assert a == b


@pytest.mark.fault
def test_resume_with_two_loader_workers_matches_the_uninterrupted_run(finetune):
    """Resumed after epoch 1 with 2 loader workers, epoch 2's train loss once came out 0.8269
    against 0.8070 uninterrupted: the workers' random augmentation state was not the same."""
    import csv
    import shutil

    args = ("debug=tiny", "data.num_workers=2", "strategy=full", "trainer.epochs=3", "trainer.save_every=1",
            "augment=strong")
    _, straight = finetune(*args, name="straight")
    resumed = straight.parent / "resumed"
    shutil.copytree(straight, resumed)
    ckpts = resumed / "checkpoints"
    for name in ("last.pt", "best.pt", "epoch_002.pt", "epoch_003.pt"):
        (ckpts / name).unlink(missing_ok=True)
    shutil.copy(ckpts / "epoch_001.pt", ckpts / "last.pt")
    finetune(*args, "trainer.resume=auto", out_dir=resumed)

    def losses(run):
        with open(run / "metrics.csv") as f:
            return [(r["epoch"], r["train_loss"], r["val_loss"]) for r in csv.DictReader(f)]

    assert losses(resumed) == losses(straight)
