"""The same seed gives the same run, with loader workers and with deterministic algorithms."""

import csv

COMMON = ["debug=tiny", "model.weights=synthetic", "trainer.epochs=2", "strategy=partial", "augment=strong",
          "augment.mixup_alpha=0.2"]


def _metrics(finetune, *extra):
    summary, run = finetune(*COMMON, *extra)
    assert summary["status"] == "completed" and summary["epochs_run"] == 2
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    return [(r["train_loss"], r["train_acc"], r["val_loss"], r["val_acc"]) for r in rows]


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
