"""One unit wherever a person reads accuracy: percent with one decimal, gaps in percentage
points, losses as plain numbers; the files meant for programs keep fractions."""

import csv
import logging
from pathlib import Path

import pytest
from rich.console import Console

from finetune_cli.config import Monitor
from finetune_cli.tools.report import write_tables
from finetune_cli.tools.table import Run, render_table
from finetune_cli.train.strategies import RestoreStageBest
from finetune_cli.ui import metric_scale, metric_text, pct, pp, show_epoch, show_result


def test_the_shared_formatter():
    assert pct(0.84) == "84.0%" and pct(1) == "100.0%" and pct(0.8449) == "84.5%"
    assert pct(0.84, 5) == " 84.0%"  # padded for aligned log lines
    assert pp(0.066) == "+6.6 pp" and pp(-0.1234) == "-12.3 pp" and pp(-0.0001) == "+0.0 pp"
    assert pp(0.005, signed=False) == "0.5 pp"
    assert metric_text("val_acc", 0.84) == "84.0%" and metric_text(Monitor.val_acc, 0.84) == "84.0%"
    assert metric_text("val_loss", 0.409) == "0.4090" and metric_text(Monitor.val_loss, 0.409) == "0.4090"
    for missing in (None, "", True, "0.5"):
        assert pct(missing) == pp(missing) == metric_text("val_acc", missing) == "-"
    assert metric_scale("val_acc") == 100 and metric_scale("val_loss") == 1


def _summary(monitor, value):
    return {"model": "resnet18", "weights": "random", "strategy": "full",
            "dataset": {"name": "synthetic", "classes": 10, "train_images": 80, "val_images": 40},
            "best": {"monitor": monitor, "value": value, "epoch": 6}, "epochs_run": 6, "total_seconds": 12.0,
            "train_seconds": 9.0, "train_images_per_s": 80.0, "setup_seconds": 3.0, "total_params": 100,
            "trainable_params": 100, "peak_memory_mb": 800.0, "peak_memory_kind": "peak RSS",
            "output_dir": "outputs/x"}


def test_result_box_and_epoch_lines_show_accuracy_in_percent(caplog):
    with caplog.at_level(logging.INFO, logger="finetune_cli"):
        show_result(_summary("val_acc", 0.84))
        show_result(_summary("val_loss", 0.409))
        show_epoch({"epoch": 6, "train_loss": 0.3, "train_acc": 0.906, "val_loss": 0.409, "val_acc": 0.84,
                    "lr": 1e-3, "epoch_seconds": 1.5}, 6, best=True)
    assert "84.0% (epoch 6)" in caplog.text and "0.8400" not in caplog.text
    assert "0.4090 (epoch 6)" in caplog.text  # a loss stays a plain number
    assert "train loss 0.3000 acc  90.6%  val loss 0.4090 acc  84.0%" in caplog.text


def test_stage_restore_words_name_the_monitor_in_its_unit():
    assert str(RestoreStageBest(1, 0.84, 3, "val_acc")) == "restored the best weights of stage 1 (val_acc 84.0%, epoch 3)"
    assert str(RestoreStageBest(2, 0.409, 5, "val_loss")) == "restored the best weights of stage 2 (val_loss 0.4090, epoch 5)"


def _run(name, monitor, best, train_acc, val_acc, balanced=None):
    row = {"run": name, "status": "completed", "model": "resnet18", "strategy": "full", "overrides": "",
           "monitor": monitor, "best": best, "best_epoch": 6, "balanced_acc": balanced, "macro_f1": balanced,
           "final_train_acc": train_acc, "final_val_acc": val_acc,
           "train_val_gap": train_acc - val_acc, "epochs_run": 6, "total_seconds": 12.0, "seconds_per_epoch": 2.0,
           "images_per_s": 80.0, "trainable_params": 100, "total_params": 100, "trainable_pct": 100.0,
           "peak_memory_mb": 800.0, "grad_optimizer_mb": 1.0, "feature_cache": "", "error": "",
           "initial_trainable_pct": 100.0, "peak_memory_kind": "peak RSS"}
    return Run(Path(name), row)


def test_run_table_and_report_md_show_percent_and_points_while_report_csv_keeps_fractions(tmp_path):
    runs = [_run("a", "val_acc", 0.84, 0.906, 0.84, balanced=0.795), _run("b", "val_loss", 0.409, 0.75, 0.8)]
    console = Console(width=200, color_system=None)
    with console.capture() as cap:
        console.print(render_table(runs))
    text = cap.get()
    assert "best = best val_acc or val_loss (epoch)" in text
    cells = [[c.strip() for c in line.split("│")] for line in text.splitlines() if line.startswith("│")]
    a, b = (next(c for c in cells if c[1] == n) for n in ("1", "2"))
    assert a[6:9] == ["84.0% (6)", "90.6%", "+6.6 pp"]
    assert b[6:9] == ["0.4090 (6)", "75.0%", "-5.0 pp"]

    write_tables(runs, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| 84.0% | 6 | 79.5% | 79.5% | 90.6% | +6.6 pp |" in md and "| 0.4090 | 6 | - | - | 75.0% | -5.0 pp |" in md
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert float(rows[0]["best"]) == 0.84 and float(rows[0]["final_train_acc"]) == 0.906
    assert float(rows[0]["train_val_gap"]) == pytest.approx(0.066)


def test_evaluate_prints_scores_in_percent():
    from finetune_cli.tools.evaluate import show

    result = {"accuracy": 0.84, "images": 100, "top5_accuracy": 0.97, "balanced_accuracy": 0.85, "macro_f1": 0.8312,
              "classes": ["a", "b"],
              "per_class": {"a": {"precision": 0.9, "recall": 0.8, "f1": 0.847, "support": 50},
                            "b": {"precision": 0.8, "recall": 0.9, "f1": 0.847, "support": 50}},
              "confusion_matrix": [[40, 10], [5, 45]]}
    console = Console(width=120, record=True, color_system=None)
    with console.capture() as cap:
        show(result, console)
    out = cap.get()
    assert "accuracy 84.0% on 100 images, top-5 97.0%, balanced accuracy 85.0%, macro F1 83.1%" in out
    assert "90.0%" in out and "84.7%" in out and "0.847" not in out
