"""Report, evaluate, predict and export, run as users run them, on one tiny sweep."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY, cli, done_summary, fake_job, make_image_folder, run_dirs

SMALL = ["data=synthetic", "data.synthetic.train_per_class=20", "data.synthetic.val_per_class=10", "model.weights=synthetic"]


def tool(module, *args, cwd):
    return subprocess.run([sys.executable, "-m", f"finetune_cli.tools.{module}", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=600)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("sweep")
    os.environ["FINETUNE_CLI_CACHE"] = str(cache_dir)
    proc = cli(["-m", "strategy=linear_probe,freeze_early,full", *SMALL, *TINY, "trainer.epochs=2"], root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (multirun,) = (root / "outputs" / "multirun").glob("*/*")
    yield multirun
    shutil.rmtree(root, ignore_errors=True)  # its checkpoints, once the module's tests are done


def _val_folder(run: Path) -> Path:
    return Path(json.loads((run / "summary.json").read_text())["dataset"]["root"]) / "val"


def test_report_ranks_runs_and_marks_the_unfinished(sweep, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(sweep, root)
    jobs = run_dirs(root)
    interrupted = root / "9_interrupted"
    shutil.copytree(jobs[0], interrupted)
    summary = json.loads((interrupted / "summary.json").read_text())
    summary["status"] = "running"
    (interrupted / "summary.json").write_text(json.dumps(summary))
    crashed = root / "10_crashed"
    (crashed / ".hydra").mkdir(parents=True)
    broken = root / "11_broken"
    shutil.copytree(jobs[1], broken)
    (broken / "summary.json").write_text("{not json")

    proc = tool("report", root, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for strategy in ("linear_probe", "freeze_early", "full"):
        assert strategy in proc.stdout
    assert "running or interrupted" in proc.stdout and "incomplete" in proc.stdout

    rows = list(csv.DictReader((root / "report.csv").open()))
    assert list(rows[0]) == ["run", "status", "model", "strategy", "overrides", "monitor", "best", "best_epoch",
                             "balanced_acc", "macro_f1", "final_train_acc", "final_val_acc", "train_val_gap", "epochs_run", "total_seconds",
                             "seconds_per_epoch", "images_per_s", "trainable_params", "total_params", "trainable_pct",
                             "peak_memory_mb", "grad_optimizer_mb", "feature_cache", "weights", "transfer_gain",
                             "target_val_acc", "adapt", "error"]
    assert len(rows) == 6
    completed = [r for r in rows if r["status"] == "completed"]
    assert sorted(r["strategy"] for r in completed) == ["freeze_early", "full", "linear_probe"]
    mem = {r["strategy"]: float(r["grad_optimizer_mb"]) for r in completed}
    assert mem["linear_probe"] < mem["freeze_early"] < mem["full"]
    bests = [float(r["best"]) for r in rows if r["best"]]
    assert bests == sorted(bests, reverse=True)  # ranked by the best metric
    for r in completed:
        gap = float(r["final_train_acc"]) - float(r["final_val_acc"])
        assert float(r["train_val_gap"]) == pytest.approx(gap)
        assert float(r["seconds_per_epoch"]) > 0 and int(r["epochs_run"]) == 2
    assert {r["status"] for r in rows if r["run"].startswith(("10_", "11_"))} == {"incomplete"}
    assert "unreadable summary.json" in (root / "report.md").read_text()
    for png in ("val_acc.png", "acc_vs_time.png"):
        with Image.open(root / png) as img:
            img.verify()
    with Image.open(root / "acc_vs_time.png") as img:
        assert img.format == "PNG" and img.size[0] > 300


@pytest.mark.slow  # 25 s; tests/test_report_plots.py covers the per-group plot of a progressive run
def test_report_plots_lr_per_group_for_discriminative_runs(tmp_path):
    proc = cli(["strategy=discriminative", *SMALL, *TINY, "trainer.epochs=2", "hydra.run.dir=runs/d"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert tool("report", tmp_path / "runs", cwd=tmp_path).returncode == 0
    with Image.open(tmp_path / "runs" / "lr_groups.png") as img:
        assert img.format == "PNG"
    assert tool("report", tmp_path / "nowhere", cwd=tmp_path).returncode == 2


def test_evaluate_matches_training_validation(sweep, tmp_path):
    run = run_dirs(sweep)[2]  # full fine-tuning
    val = _val_folder(run)
    proc = tool("evaluate", run, val, "--out-dir", tmp_path / "eval", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert result["accuracy"] == pytest.approx(best["metrics"]["val_acc"], abs=1e-6)
    assert result["images"] == 100 and result["top5_accuracy"] >= result["accuracy"]
    cm = np.array(result["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == 100 and cm.trace() / 100 == pytest.approx(result["accuracy"])
    assert set(result["per_class"]) == set(best["classes"])
    for name, m in result["per_class"].items():
        assert m["support"] == 10 and 0 <= m["f1"] <= 1
    with Image.open(tmp_path / "eval" / "confusion.png") as img:
        img.verify()
    assert "Per class" in proc.stdout


def test_evaluate_refuses_unknown_classes(sweep, tmp_path):
    folder = make_image_folder(tmp_path / "imgs", classes=("circle_solid", "zebra"), per_class=2, val=False) / "train"
    proc = tool("evaluate", run_dirs(sweep)[0], folder, cwd=tmp_path)
    assert proc.returncode == 2
    assert "class folders the model does not know: zebra" in proc.stderr and "Traceback" not in proc.stderr


def test_predict_top_k_agrees_with_evaluate(sweep, tmp_path):
    run = run_dirs(sweep)[2]
    val = _val_folder(run)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    proc = tool("predict", run, val, bad, "--top-k", "3", "--batch-size", "16", "--out-dir", tmp_path / "p", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "100 images predicted, 1 unreadable" in proc.stdout
    rows = list(csv.DictReader((tmp_path / "p" / "predictions.csv").open()))
    assert list(rows[0]) == ["path", "class1", "prob1", "class2", "prob2", "class3", "prob3", "error"]
    good = [r for r in rows if not r["error"]]
    assert len(good) == 100 and any(r["error"] for r in rows)
    for r in good:
        probs = [float(r[f"prob{k}"]) for k in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    hits = sum(Path(r["path"]).parent.name == r["class1"] for r in good)
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert hits / 100 == pytest.approx(best["metrics"]["val_acc"])  # the same preprocessing as validation
    data = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert len(data) == 101 and len(data[0]["top"]) == 3


def _two_class_checkpoint(sweep, dest: Path) -> Path:
    """The linear-probe checkpoint cut down to its first two classes, saved at ``dest``."""
    ckpt = torch.load(run_dirs(sweep)[0] / "checkpoints" / "best.pt", weights_only=True)
    ckpt["classes"] = ckpt["classes"][:2]
    for key in ("fc.weight", "fc.bias"):
        ckpt["model"][key] = ckpt["model"][key][:2].clone()
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dest)
    return dest


def test_predict_writes_into_the_run_folder_and_says_where(sweep, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for f in sorted((_val_folder(run_dirs(sweep)[0]) / "circle_solid").iterdir())[:2]:
        shutil.copy(f, images / f.name)
    run = tmp_path / "run"
    ckpt = _two_class_checkpoint(sweep, run / "checkpoints" / "best.pt")
    work = tmp_path / "work"
    work.mkdir()
    proc = tool("predict", ckpt, images, "--top-k", "3", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "--top-k 3 lowered to 2: the model has only 2 classes." in proc.stdout
    assert f"wrote {run / 'predictions.csv'} and {run / 'predictions.json'}" in proc.stdout
    assert list(work.iterdir()) == []
    rows = list(csv.DictReader((run / "predictions.csv").open()))
    assert len(rows) == 2 and list(rows[0]) == ["path", "class1", "prob1", "class2", "prob2", "error"]
    assert all(float(r["prob1"]) + float(r["prob2"]) == pytest.approx(1, abs=1e-5) for r in rows)

    # a checkpoint outside a run folder: the current folder, named in the output
    loose = tmp_path / "loose.pt"
    shutil.copy(ckpt, loose)
    proc = tool("predict", loose, images, "--top-k", "2", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "lowered" not in proc.stdout
    assert f"wrote {work / 'predictions.csv'} and {work / 'predictions.json'}" in proc.stdout
    assert len(json.loads((work / "predictions.json").read_text())) == 2


def test_predict_refuses_a_named_file_that_is_not_an_image(sweep, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(next((_val_folder(run_dirs(sweep)[0]) / "circle_solid").iterdir()), folder / "a.png")
    notes = folder / "notes.txt"
    notes.write_text("not an image")
    proc = tool("predict", run_dirs(sweep)[0], folder / "a.png", notes, "--out-dir", tmp_path / "p", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: {notes} is not an image file" in proc.stderr and ".png" in proc.stderr and ".jpg" in proc.stderr
    assert not (tmp_path / "p").exists()
    # inside a folder it is skipped, and counted
    proc = tool("predict", run_dirs(sweep)[0], folder, "--out-dir", tmp_path / "p", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Skipped 1 file(s) in the given folder(s) that are not images" in proc.stdout
    assert "1 images predicted, 0 unreadable" in proc.stdout


def test_export_onnx_and_torch_export_match_pytorch(sweep, tmp_path):
    import onnxruntime as ort

    from finetune_cli.tools.loading import load_for_inference

    run = run_dirs(sweep)[1]
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "model.onnx.data").write_bytes(b"weights of an earlier export")
    proc = tool("export", run, "--out-dir", tmp_path / "x", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ONNX (onnxruntime): max abs difference from PyTorch" in proc.stdout
    # one self-contained .onnx file: nothing beside it, so copying it alone is enough
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["model.onnx", "model.pt2", "model_card.json"]
    assert ".data" not in proc.stdout
    alone = tmp_path / "elsewhere" / "model.onnx"
    alone.parent.mkdir()
    shutil.copy(tmp_path / "x" / "model.onnx", alone)
    card = json.loads((tmp_path / "x" / "model_card.json").read_text())
    assert card["model"] == "resnet18" and card["num_classes"] == 10 and len(card["classes"]) == 10
    assert card["input"]["shape"] == ["batch", 3, 32, 32] and len(card["preprocessing"]["mean"]) == 3
    assert card["onnx"]["max_abs_diff"] <= 1e-4 and card["torch_export"]["max_abs_diff"] <= 1e-4
    assert card["source"]["run"] == str(run) and "external_data" not in card["onnx"]
    # an independent check: another batch size through onnxruntime against the checkpoint in PyTorch
    session = ort.InferenceSession(str(alone), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 32, 32)
    got = session.run(None, {"images": x.numpy()})[0]
    model = load_for_inference(str(run)).model
    with torch.inference_mode():
        want = model(x).numpy()
    assert got.shape == (5, 10) and np.abs(got - want).max() < 1e-4
    program = torch.export.load(str(tmp_path / "x" / "model.pt2"))
    with torch.inference_mode():
        assert torch.allclose(program.module()(x), torch.from_numpy(want), atol=1e-5)


def test_tensorboard_logger_writes_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc = cli(["logger=tensorboard", *SMALL, *TINY, "trainer.epochs=2", "hydra.run.dir=runs/tb"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    acc = EventAccumulator(str(tmp_path / "runs" / "tb" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/train", "loss/val", "accuracy/val", "lr/head", "lr/stem", "time/epoch_seconds"} <= tags
    assert [e.step for e in acc.Scalars("accuracy/val")] == [1, 2]
    rows = list(csv.DictReader((tmp_path / "runs" / "tb" / "metrics.csv").open()))
    assert [e.value for e in acc.Scalars("accuracy/val")] == pytest.approx([float(r["val_acc"]) for r in rows])


def test_overrides_are_read_as_yaml(tmp_path):
    from finetune_cli.tools.table import read_overrides

    written = ["strategy=full", "data.root='/my data'", "+tag=it's: here", "~trainer.seed", "hydra.run.dir=out/${now:%H}"]
    fake_job(tmp_path, written, None)
    assert read_overrides(tmp_path) == {"strategy": "full", "data.root": "'/my data'", "tag": "it's: here",
                                        "trainer.seed": "", "hydra.run.dir": "out/${now:%H}"}
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- [not closed\n")
    assert read_overrides(tmp_path) == {}


def test_sweep_ends_with_the_report_table_in_job_order(tmp_path, capsys):
    from finetune_cli.tools.sweep import show_sweep

    base = ["data=synthetic"]
    for num, lr, summary in ((0, "0.1", done_summary("full", 0.5)), (1, "0.01", done_summary("full", 0.9)),
                             (2, "1.0", {"status": "failed", "strategy": "full", "error": "ValueError: lr too high"}),
                             (10, "0.001", None)):
        fake_job(tmp_path / f"{num}_optimizer.lr={lr}", [*base, "strategy=full", f"optimizer.lr={lr}"], summary)
    show_sweep(tmp_path)
    out = capsys.readouterr().out
    assert out.startswith(f"Sweep: {tmp_path}")
    lines = out.splitlines()
    header = next(line for line in lines if "strategy" in line and "overrides" in line)
    for col in ("job", "model", "status", "best", "train acc", "gap", "epochs", "time s", "img/s", "trainable",
                "peak MB", "grad+opt MB"):
        assert col in header, col
    order = [line.split("│")[1].strip() for line in lines if line.startswith("│") and line.split("│")[1].strip()]
    assert order == ["0", "1", "2", "10"]  # job order, not ranked by the best metric
    assert "optimizer.lr=0.01" in out and "data=synthetic" not in out  # only what differs between the jobs
    assert "failed: ValueError: lr too high" in out and "incomplete: no summary.json" in out
    assert "90.0% (2)" in out and "10.0% -> 40.0%" in out
    assert "peak MB: peak RSS since the run started" in out


def test_report_says_what_each_peak_memory_figure_is(tmp_path):
    fake_job(tmp_path / "a", ["strategy=full"], done_summary("full", 0.9))
    fake_job(tmp_path / "b", ["strategy=linear_probe"],
              done_summary("linear_probe", 0.5, kind="process peak RSS, includes earlier jobs in this process"))
    proc = tool("report", tmp_path, "--no-plots", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    note = ("peak MB: [1] peak RSS since the run started; "
            "[2] process peak RSS, includes earlier jobs in this process")
    assert note in proc.stdout and "812 [1]" in proc.stdout and "812 [2]" in proc.stdout
    md = (tmp_path / "report.md").read_text()
    assert "812.4 [1]" in md and note.replace("peak MB", "peak_memory_mb") in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
@pytest.mark.parametrize("module", ["evaluate", "predict"])
def test_device_cuda_without_a_gpu_names_the_option(module, tmp_path):
    proc = tool(module, tmp_path / "run", tmp_path, "--device", "cuda", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--device=cuda, but no CUDA GPU is visible" in proc.stderr and "--device=cpu" in proc.stderr


def test_export_names_the_weights_file_an_onnx_model_keeps_beside_it(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from finetune_cli.tools.export import _external_files

    weight = numpy_helper.from_array(np.ones((64, 64), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight])
    model = helper.make_model(graph)
    onnx.save_model(model, tmp_path / "one.onnx")
    assert _external_files(tmp_path / "one.onnx") == []
    onnx.save_model(model, tmp_path / "big.onnx", save_as_external_data=True, location="big.onnx.data",
                    size_threshold=0)
    assert _external_files(tmp_path / "big.onnx") == ["big.onnx.data"]


def _cell_contrasts(result):
    from matplotlib import pyplot as plt
    from matplotlib.colors import to_rgb

    from finetune_cli.tools.evaluate import confusion_figure, contrast_ratio

    fig = confusion_figure(result)
    try:
        matrix_ax = next(ax for ax in fig.axes if ax.images)
        image = matrix_ax.images[0]
        ratios = {}
        for text in matrix_ax.texts:
            j, i = (round(c) for c in text.get_position())
            background = image.cmap(image.norm(result["confusion_matrix"][i][j]))
            ratios[i, j] = (contrast_ratio(to_rgb(text.get_color()), background[:3]), text.get_text())
        return len(fig.axes), ratios
    finally:
        plt.close(fig)


def test_confusion_png_text_contrasts_with_every_cell_and_has_a_colour_bar(tmp_path):
    from finetune_cli.tools.evaluate import confusion_png

    two = {"classes": ["cat", "dog"], "confusion_matrix": [[26, 1], [3, 30]], "accuracy": 56 / 60}
    n_axes, ratios = _cell_contrasts(two)
    assert n_axes == 2  # the matrix and its colour bar
    assert set(ratios) == {(0, 0), (0, 1), (1, 0), (1, 1)} and ratios[0, 0][1] == "26"
    assert min(r for r, _ in ratios.values()) >= 4.5, ratios

    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 6, size=(12, 12))
    np.fill_diagonal(matrix, rng.integers(10, 80, size=12))
    many = {"classes": [f"c{i}" for i in range(12)], "confusion_matrix": matrix.tolist(), "accuracy": 0.7}
    n_axes, ratios = _cell_contrasts(many)
    assert n_axes == 2
    assert set(ratios) == {(i, j) for i in range(12) for j in range(12) if matrix[i, j]}
    assert min(r for r, _ in ratios.values()) >= 4.5, ratios
    share = round(100 * matrix[3, 3] / matrix[3].sum())
    assert ratios[3, 3][1] == f"{matrix[3, 3]}\n{share}%"  # count with its share of the true class

    confusion_png(many, tmp_path / "confusion.png")
    with Image.open(tmp_path / "confusion.png") as img:
        assert img.format == "PNG" and img.size[0] > 600


def test_report_hide_failed_leaves_out_failed_and_unscored_runs(tmp_path):
    fake_job(tmp_path / "a", ["strategy=full"], done_summary("full", 0.9))
    fake_job(tmp_path / "b", ["strategy=linear_probe"], done_summary("linear_probe", 0.5))
    fake_job(tmp_path / "c", ["strategy=full", "data=broken"],
              {"status": "failed", "strategy": "full", "error": "DownloadError: no network"})
    fake_job(tmp_path / "d", ["strategy=full", "data=empty"], {"status": "completed", "strategy": "full"})
    fake_job(tmp_path / "e", ["strategy=full", "data=gone"], None)

    proc = tool("report", tmp_path, "--no-plots", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(list(csv.DictReader((tmp_path / "report.csv").open()))) == 5 and "Hid" not in proc.stdout

    proc = tool("report", tmp_path, "--hide-failed", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Hid 3 runs that failed or have no best metric" in proc.stdout
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert [r["run"] for r in rows] == ["a", "b"]
    md = (tmp_path / "report.md").read_text()
    assert "DownloadError" not in md and "Failed or incomplete runs" not in md
    assert "data=broken" not in proc.stdout and "incomplete" not in proc.stdout
    for png in ("val_acc.png", "acc_vs_time.png"):
        with Image.open(tmp_path / png) as img:
            img.verify()


def _with(summary, weights, root="/data/flowers", model="resnet18"):
    return {**summary, "weights": weights, "model": model, "dataset": {"root": root}}


def test_report_gives_the_gain_over_training_from_scratch_and_flags_negative_transfer(tmp_path):
    pre = "ResNet18_Weights.IMAGENET1K_V1"
    fake_job(tmp_path / "a", ["strategy=full"], _with(done_summary("full", 0.90), pre))
    fake_job(tmp_path / "b", ["strategy=linear_probe"], _with(done_summary("linear_probe", 0.55), pre))
    fake_job(tmp_path / "c", ["strategy=full", "model.weights=null"], _with(done_summary("full", 0.60), "random init"))
    fake_job(tmp_path / "d", ["strategy=linear_probe", "model.weights=null"],
              _with(done_summary("linear_probe", 0.20), "random init"))  # the best scratch run is the baseline
    fake_job(tmp_path / "e", ["strategy=full", "data.root=/other"], _with(done_summary("full", 0.70), pre, "/other"))
    proc = tool("report", tmp_path, "--no-plots", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {r["run"]: r for r in csv.DictReader((tmp_path / "report.csv").open())}
    assert float(rows["a"]["transfer_gain"]) == pytest.approx(0.30)
    assert float(rows["b"]["transfer_gain"]) == pytest.approx(-0.05)
    assert rows["c"]["transfer_gain"] == rows["d"]["transfer_gain"] == ""  # the scratch runs themselves
    assert rows["e"]["transfer_gain"] == ""  # other data: no scratch run to compare with
    assert "vs scratch" in proc.stdout and "+30.0 pp" in proc.stdout and "-5.0 pp worse" in proc.stdout
    note = "Negative transfer: 1 run did worse than training the same model from scratch on the same data: linear_probe"
    assert note in " ".join(proc.stdout.split())
    md = (tmp_path / "report.md").read_text()
    assert "vs_scratch" in md and "| scratch |" in md and note in md


def test_transfer_check_sweeps_pretrained_and_scratch_runs(tmp_path, cache_dir):
    """experiment=transfer_check in one command: the closing table compares against scratch."""
    proc = cli(["-m", "experiment=transfer_check", "debug=tiny", "model.weights=synthetic,null",
                "strategy=linear_probe,full"], tmp_path, env={"FINETUNE_CLI_CACHE": str(cache_dir)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (multirun,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    summaries = {str(run.relative_to(multirun)): json.loads((run / "summary.json").read_text())
                 for run in run_dirs(multirun)}
    assert sorted((s["weights"] == "random init", s["strategy"]) for s in summaries.values()) == [
        (False, "full"), (False, "linear_probe"), (True, "full"), (True, "linear_probe")]
    assert "vs scratch" in proc.stdout
    report = tool("report", multirun, "--no-plots", cwd=tmp_path)
    rows = {r["run"]: r for r in csv.DictReader((multirun / "report.csv").open())}
    scratch = max(s["best"]["value"] for s in summaries.values() if s["weights"] == "random init")
    for name, s in summaries.items():
        if s["weights"] != "random init":
            assert float(rows[name]["transfer_gain"]) == pytest.approx(s["best"]["value"] - scratch)
    worse = [s for s in summaries.values() if s["weights"] != "random init" and s["best"]["value"] < scratch]
    assert ("Negative transfer" in report.stdout) == bool(worse)


def test_a_summary_whose_dataset_is_not_a_mapping_still_reads(tmp_path):
    """Reading the dataset's root for the scratch comparison made such a run "unreadable"."""
    fake_job(tmp_path / "a", ["strategy=full"], {**done_summary("full", 0.9), "dataset": "flowers"})
    proc = tool("report", tmp_path, "--no-plots", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (row,) = csv.DictReader((tmp_path / "report.csv").open())
    assert row["status"] == "completed" and row["best"] == "0.9"
