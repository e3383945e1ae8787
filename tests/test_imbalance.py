"""Imbalanced classes: the plan's counts, data.sampler=balanced, trainer.class_weights, and
balanced accuracy / macro-F1 in metrics.csv, the summary and the report."""

import csv
from collections import Counter

import pytest
import torch
from PIL import Image

from finetune_cli.config import ClassWeights
from finetune_cli.data.folders import make_loader
from finetune_cli.train.balance import loss_weights
from finetune_cli.train.engine import class_metrics


def test_balanced_accuracy_and_macro_f1_match_their_definitions():
    # true a: 8 right, 2 called b; true b: 1 right, 1 called a; c never true, once predicted (for a)
    confusion = torch.tensor([[7, 2, 1], [1, 1, 0], [0, 0, 0]])
    found = class_metrics(confusion)
    assert found["balanced_acc"] == pytest.approx((7 / 10 + 1 / 2) / 2)  # classes present only
    f1_a, f1_b, f1_c = 2 * 7 / (10 + 8), 2 * 1 / (2 + 3), 0.0  # 2 tp / (support + predicted)
    assert found["macro_f1"] == pytest.approx((f1_a + f1_b + f1_c) / 3)  # c was predicted: it counts
    assert class_metrics(torch.eye(3, dtype=torch.long) * 4) == {"balanced_acc": 1.0, "macro_f1": 1.0}


def test_class_weights_are_inverse_frequency_with_mean_one_when_balanced():
    assert loss_weights([30, 10], ClassWeights.none) is None
    assert loss_weights([30, 10], ClassWeights.auto).tolist() == pytest.approx([40 / 60, 40 / 20])
    assert loss_weights([30, 10], ClassWeights.sqrt).tolist() == pytest.approx([(2 / 3) ** 0.5, 2 ** 0.5])
    assert loss_weights([5, 5, 5], ClassWeights.auto).tolist() == [1.0, 1.0, 1.0]


class Labels(torch.utils.data.Dataset):
    def __init__(self, targets):
        self.targets = targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.tensor(i), self.targets[i]


def test_the_balanced_sampler_draws_each_class_about_equally_and_again_for_the_same_epoch():
    data = Labels([0] * 90 + [1] * 10)
    loader = make_loader(data, batch_size=10, num_workers=0, train=True, seed=3, balanced=True)
    drawn = Counter()
    orders = []
    for epoch in range(1, 11):
        loader.sampler.set_epoch(epoch)
        order = [int(i) for batch, _ in loader for i in batch]
        orders.append(order)
        drawn.update(data.targets[i] for i in order)
    assert len(orders[0]) == 100 and 400 < drawn[1] < 600  # 500 expected of 1000 draws; 100 without it
    loader.sampler.set_epoch(3)
    assert [int(i) for batch, _ in loader for i in batch] == orders[2]  # (seed, epoch) alone decide
    plain = make_loader(data, batch_size=10, num_workers=0, train=True, seed=3)
    assert sorted(int(i) for batch, _ in plain for i in batch) == list(range(100))


def _imbalanced(root, counts=(("common", 24), ("rare", 4))):
    for split, scale in (("train", 1), ("val", 2)):
        for c, (name, n) in enumerate(counts):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(max(2, n // scale)):
                Image.new("RGB", (36 + i, 36), ((200, 40, 40), (40, 40, 200))[c]).save(folder / f"{i}.png")
    return root


BASE = ["debug=tiny", "data=imagefolder", "strategy=full"]


def test_an_imbalanced_run_reports_counts_and_class_scores_and_can_monitor_them(finetune, tmp_path, caplog):
    root = _imbalanced(tmp_path / "data")
    summary, run = finetune(*BASE, f"data.root={root}", "trainer.epochs=2", "trainer.monitor=val_balanced_acc")
    assert "Images per class (train/val): common 24/12, rare 4/2; largest/smallest 6.0:1. The classes are " \
           "imbalanced: consider data.sampler=balanced" in caplog.text
    assert summary["dataset"]["class_counts"] == {"train": {"common": 24, "rare": 4}, "val": {"common": 12, "rare": 2}}
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert {"val_balanced_acc", "val_macro_f1"} <= set(rows[0])
    best = summary["best"]
    assert best["monitor"] == "val_balanced_acc" and best["value"] == max(float(r["val_balanced_acc"]) for r in rows)
    assert summary["at_best"]["val_balanced_acc"] == best["value"] and "val_macro_f1" in summary["at_best"]


def test_the_balanced_sampler_and_class_weights_change_training_and_the_plan_says_so(finetune, tmp_path, caplog):
    root = _imbalanced(tmp_path / "data")
    _, plain = finetune(*BASE, f"data.root={root}", name="plain")
    caplog.clear()
    _, both = finetune(*BASE, f"data.root={root}", "data.sampler=balanced", "trainer.class_weights=auto", name="both")
    assert "data.sampler=balanced draws every class equally often" in caplog.text
    assert "trainer.class_weights=auto weighs the loss" in caplog.text and "over-correct" in caplog.text
    a = torch.load(plain / "checkpoints" / "last.pt", weights_only=True)["model"]["fc.weight"]
    b = torch.load(both / "checkpoints" / "last.pt", weights_only=True)["model"]["fc.weight"]
    assert not torch.allclose(a, b)


def test_the_report_shows_balanced_accuracy_and_macro_f1(finetune, report, tmp_path):
    root = _imbalanced(tmp_path / "data")
    summary, run = finetune(*BASE, f"data.root={root}")
    (run / ".hydra").mkdir()  # a run folder as the CLI leaves it
    (run / ".hydra" / "overrides.yaml").write_text("[]\n")
    shown = report(run.parent)
    assert shown.returncode == 0, shown.stderr
    assert "bal acc / F1" in shown.stdout  # shown where a run's classes are imbalanced (6:1 here)
    row = next(csv.DictReader((run.parent / "report.csv").open()))
    assert float(row["balanced_acc"]) == summary["at_best"]["val_balanced_acc"]
    assert float(row["macro_f1"]) == summary["at_best"]["val_macro_f1"]
