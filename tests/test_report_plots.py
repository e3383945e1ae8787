"""The report's PNG plots: who each line or point is, where the key sits, the units, and when
each layer group of a progressive run trains."""

from pathlib import Path

import pytest
from PIL import Image

from finetune_cli.tools.plots import group_bands, report_figures, run_labels, time_figure, write_plots
from finetune_cli.tools.table import Run, read_runs


def _run(folder, overrides, strategy="full", best=0.5, seconds=10.0, monitor="val_acc", metrics=None):
    row = {"run": folder, "strategy": strategy, "model": "resnet18", "monitor": monitor, "best": best,
           "best_epoch": 1, "total_seconds": seconds}
    metrics = metrics if metrics is not None else [{"epoch": 1.0, "val_acc": 0.4}, {"epoch": 2.0, "val_acc": best}]
    return Run(Path(folder), row, metrics, dict(overrides))


def _progressive_metrics():
    """stem, layer1, layer2 below the head; one more group trains each epoch, up to two."""
    rows = []
    for epoch, k, lr in ((1, 0, 1e-3), (2, 1, 5e-4), (3, 2, 1e-4)):
        rows.append({"epoch": float(epoch), "val_acc": 0.1 * epoch, "lr": lr, "lr_stem": lr, "lr_layer1": lr,
                     "lr_layer2": lr, "lr_head": lr, "trainable_groups": float(k), "events": ""})
    return rows


def _legend_is_right_of_axes(fig, ax):
    fig.canvas.draw()
    legend = ax.get_legend()
    renderer = fig.canvas.get_renderer()
    return legend is not None and legend.get_window_extent(renderer).x0 > ax.get_window_extent(renderer).x1


def _integer_ticks(ax):
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    return len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    from matplotlib import pyplot as plt

    plt.close("all")


def test_run_labels_name_only_what_differs_and_stay_distinct():
    common = {"debug": "tiny", "trainer.epochs": "4"}
    runs = [
        _run("0_a", {**common, "strategy": "progressive", "optimizer.lr": "0.01"}, "progressive"),
        _run("1_b", {**common, "strategy": "progressive", "optimizer.lr": "0.001"}, "progressive"),
        _run("2_c", {**common, "strategy": "full", "optimizer.lr": "0.01"}, "full"),
        _run("7_copy", {**common, "strategy": "progressive", "optimizer.lr": "0.01"}, "progressive"),
    ]
    labels = run_labels(runs)
    assert labels == ["progressive lr=0.01 (job 0)", "progressive lr=0.001", "full lr=0.01",
                      "progressive lr=0.01 (job 7)"]
    assert not any("debug" in label or "epochs" in label for label in labels)

    keys = [_run("x", {"model.dropout": "0.1", "head.dropout": "0.2", "data.root": "/data/long/path/birds"}),
            _run("y", {"model.dropout": "0.3", "head.dropout": "0.4", "data.root": "/data/long/path/cars/"})]
    assert run_labels(keys) == ["full root=birds head.dropout=0.2 model.dropout=0.1",
                                "full root=cars head.dropout=0.4 model.dropout=0.3"]
    same = [_run("runs/a", {}), _run("runs/b", {})]
    assert run_labels(same) == ["full (a)", "full (b)"]


def test_group_bands_show_when_each_group_trains():
    bands = group_bands(_run("p", {}, "progressive", metrics=_progressive_metrics()))
    assert [b.group for b in bands] == ["stem", "layer1", "layer2", "head"]
    assert [b.epochs for b in bands] == [[], [3], [2, 3], [1, 2, 3]]
    assert bands[2].lrs == [5e-4, 1e-4]
    assert [b.frozen_throughout for b in bands] == [True, False, False, False]
    without = [{k: v for k, v in m.items() if k != "trainable_groups"} for m in _progressive_metrics()]
    assert all(b.epochs == [1, 2, 3] for b in group_bands(_run("d", {}, "discriminative", metrics=without)))


def test_lr_groups_figure_draws_a_row_per_group_and_says_which_never_trained():
    runs = [_run("p", {"optimizer.lr": "0.001"}, "progressive", metrics=_progressive_metrics()),
            _run("f", {"optimizer.lr": "0.01"}, "linear_probe")]
    fig = report_figures(runs)["lr_groups.png"]
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["stem", "layer1", "layer2", "head"]
    assert ax.get_title() == "1: progressive lr=0.001"
    frozen = [t for t in ax.texts if t.get_text() == "frozen throughout"]
    assert [t.get_position()[1] for t in frozen] == [0]  # the stem's row only
    cells = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text() for t in ax.texts if t not in frozen}
    assert cells == {(1, 3): "0.001", (2, 3): "0.0005", (2, 2): "0.0005", (3, 3): "0.0001", (3, 2): "0.0001",
                     (3, 1): "0.0001"}
    assert _integer_ticks(ax)
    assert any(a.get_ylabel() == "LR at epoch start" for a in fig.axes)  # the colour bar


def test_val_acc_plot_keys_runs_outside_the_axes_in_the_table_unit():
    runs = [_run("0_a", {"optimizer.lr": "0.01"}, best=0.9), _run("1_b", {"optimizer.lr": "0.1"}, best=0.7)]
    fig = report_figures(runs)["val_acc.png"]
    ax = fig.axes[0]
    entries = [t.get_text() for t in ax.get_legend().get_texts()]
    assert entries == ["1: full lr=0.01", "2: full lr=0.1", "best epoch (by val_acc)"]
    assert ax.get_ylabel() == "validation accuracy (%)" and ax.get_xlabel() == "epoch"
    assert list(ax.get_lines()[0].get_ydata()) == pytest.approx([40.0, 90.0])  # percent, as in the table
    assert _integer_ticks(ax)
    assert _legend_is_right_of_axes(fig, ax)


def test_acc_vs_time_numbers_the_points_and_names_the_time_it_plots():
    runs = [_run("0_a", {"optimizer.lr": "0.01"}, best=0.9, seconds=30.0),
            _run("1_b", {"optimizer.lr": "0.1"}, best=0.7, seconds=10.0),
            _run("2_c", {"optimizer.lr": "1.0"}, best=0.7, seconds=10.0)]
    fig = time_figure(runs, [1, 2, 3], run_labels(runs))
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("total run time (s)") and ax.get_title().endswith("against total run time")
    assert sorted(t.get_text() for t in ax.texts) == ["1", "2,3"]  # the same point: one note
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["1: full lr=0.01", "2: full lr=0.1", "3: full lr=1.0"]
    assert _legend_is_right_of_axes(fig, ax)
    assert ax.get_ylabel() == "best val_acc (%, higher is better)"
    assert sorted(y for line in ax.get_lines() for y in line.get_ydata()) == pytest.approx([70.0, 70.0, 90.0])

    losses = [_run("a", {}, best=0.4, monitor="val_loss"), _run("b", {"x": "1"}, best=0.6, monitor="val_loss")]
    ax = time_figure(losses, [1, 2], run_labels(losses)).axes[0]
    assert ax.get_ylabel() == "best val_loss (lower is better)" and ax.get_title().startswith("Best val_loss")
    assert sorted(y for line in ax.get_lines() for y in line.get_ydata()) == pytest.approx([0.4, 0.6])  # as stored


def test_report_plots_a_progressive_run(finetune, tmp_path):
    _, run_dir = finetune("debug=tiny", "strategy=progressive", "trainer.epochs=2")
    runs = read_runs([run_dir], run_dir.parent)
    written = write_plots(runs, tmp_path)
    assert [p.name for p in written] == ["val_acc.png", "acc_vs_time.png", "lr_groups.png"]
    for path in written:
        with Image.open(path) as img:
            assert img.format == "PNG"
    bands = {b.group: b.epochs for b in group_bands(runs[0])}
    assert bands["head"] == [1, 2] and bands["layer4"] == [2] and bands["stem"] == []
    ax = report_figures(runs)["lr_groups.png"].axes[0]
    frozen_rows = {round(t.get_position()[1]) for t in ax.texts if t.get_text() == "frozen throughout"}
    names = [t.get_text() for t in ax.get_yticklabels()]
    assert {names[i] for i in frozen_rows} == {g for g, epochs in bands.items() if not epochs}
