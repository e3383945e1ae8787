"""Whole runs: in this process through the ``finetune`` fixture, and through the real CLI in a
subprocess where its exit code, console output or Hydra folders are what is checked."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

from finetune_cli.cli import path_safe

from helpers import REPO, assert_same_runs, cli, make_image_folder, run_dirs


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_quickstart_end_to_end(tmp_path):
    proc = cli(["experiment=quickstart"], tmp_path)
    _ok(proc)
    (run,) = run_dirs(tmp_path / "outputs")
    assert run.parent.parent == tmp_path / "outputs"  # outputs/<date>/<time>
    assert str(run) in proc.stdout and "Result" in proc.stdout
    for name in (".hydra/config.yaml", "finetune.log", "classes.json", "metrics.csv", "summary.json",
                 "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (run / name).is_file(), name

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert len(rows) == 6  # trainer.epochs of the quickstart
    for col in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr_stem", "lr_layer4", "lr_head",
                "epoch_seconds", "trainable_params"):
        assert col in rows[0], col

    summary = _summary(run)
    assert summary["status"] == "completed" and summary["strategy"] == "freeze_early"
    assert summary["dataset"]["classes"] == 10 and summary["epochs_run"] == 6
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["peak_memory_mb"] > 0 and summary["train_images_per_s"] > 0
    best = summary["best"]
    assert best["value"] == max(float(r["val_acc"]) for r in rows)
    assert best["value"] > 0.5  # 10 classes: chance is 0.1

    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["epoch"] == best["epoch"]
    assert ckpt["classes"] == json.loads((run / "classes.json").read_text())
    assert ckpt["config"]["model"]["name"] == "resnet18"
    assert {"model", "optimizer", "schedule"} <= set(ckpt)
    log = (run / "finetune.log").read_text()
    assert "Trainable:" in log and "epoch   6/6" in log


def test_debug_tiny_shrinks_the_chosen_experiment(finetune):
    """`debug=tiny` comes after the experiment: the experiment's choices stay, its size shrinks."""
    summary, run = finetune("experiment=quickstart", "debug=tiny")
    assert summary["status"] == "completed" and summary["strategy"] == "freeze_early"
    assert summary["epochs_run"] == 1 and summary["weights"] == "random init"
    assert summary["dataset"]["classes"] == 10
    assert (summary["dataset"]["train_images"], summary["dataset"]["val_images"]) == (80, 40)
    assert len(list(csv.DictReader((run / "metrics.csv").open()))) == 1
    config = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["config"]
    assert config["strategy"]["freeze_groups"] == 2  # from the experiment
    assert (config["data"]["image_size"], config["data"]["batch_size"], config["data"]["num_workers"]) == (32, 16, "0")


def test_linear_probe_transfers_from_synthetic_weights(finetune):
    """Synthetic pretraining must beat random weights clearly on the disjoint target classes."""
    accs = {}
    for weights in ("synthetic", "null"):
        summary, run = finetune("data=synthetic", "strategy=linear_probe", f"model.weights={weights}",
                                "trainer.epochs=8", "optimizer.lr=0.01", "data.num_workers=0", name=weights)
        accs[weights] = _summary(run)["best"]["value"]
        assert summary["best"]["value"] == accs[weights]
    print(f"linear probe val acc: synthetic weights {accs['synthetic']:.3f}, random weights {accs['null']:.3f}")
    assert accs["synthetic"] - accs["null"] >= 0.3, accs


def test_strategy_sweep_lands_in_multirun_folders(tmp_path):
    proc = cli(
        ["-m", "strategy=linear_probe,freeze_early,full", "debug=tiny", "model.weights=synthetic"],
        tmp_path,
    )
    _ok(proc)
    runs = run_dirs(tmp_path / "outputs" / "multirun")
    assert len(runs) == 3
    summaries = {s["strategy"]: s for s in map(_summary, runs)}
    assert set(summaries) == {"linear_probe", "freeze_early", "full"}
    assert all(s["status"] == "completed" for s in summaries.values())
    pct = [summaries[k]["trainable_pct"] for k in ("linear_probe", "freeze_early", "full")]
    assert pct[0] < pct[1] < pct[2] == 100.0
    assert all((r / "checkpoints" / "last.pt").is_file() for r in runs)
    assert "Sweep:" in proc.stdout  # the closing table of the sweep


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "args, needle",
    [
        (["data.root=does/not/exist"], "all jobs: Invalid configuration: data.root=does/not/exist does not exist"),
        (["debug=tiny", "trainer.epochs=0,1"], "2 of its 4 jobs cannot run"),
    ],
)
def test_a_sweep_with_jobs_that_cannot_run_stops_before_any_folder(tmp_path, args, needle):
    proc = cli(["-m", "strategy=linear_probe,full", *args], tmp_path)
    assert proc.returncode == 1
    assert "The sweep was not started" in proc.stderr and needle in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "outputs").exists()


def test_sweep_job_folders_stay_flat_when_values_hold_slashes(tmp_path):
    make_image_folder(tmp_path / "data" / "pets")
    proc = cli(["-m", "debug=tiny", "data.source=imagefolder", f"data.root={tmp_path / 'data' / 'pets'}",
                "strategy=linear_probe", "hydra.sweep.dir=sweep"], tmp_path)
    _ok(proc)
    (job,) = [p for p in (tmp_path / "sweep").iterdir() if p.is_dir()]
    assert job.name.startswith("0_data.root=_") and "data_pets" in job.name
    assert (job / ".hydra").is_dir() and (job / "summary.json").is_file()


def test_folder_names_are_path_safe_and_short():
    assert path_safe("data.root=/a/b,strategy=full") == "data.root=_a_b,strategy=full"
    long = ",".join(f"optimizer.lr{i}=0.00{i}" for i in range(30))
    short = path_safe(long)
    assert len(short.encode()) <= 120 and short != path_safe(long + "x")


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "override, needle",
    [
        ("trainer.epochs=abc", "trainer.epochs"),
        ("trainer.epoch=3", "trainer.epoch"),
        ("strategy=nonsense", "Unknown strategy option 'nonsense'"),
        ("+data.extra=1", "data.extra"),
        ("data=synthetic model.name=resnet19", "Did you mean resnet18"),
        ("data.root=does/not/exist", "does not exist"),
    ],
)
def test_bad_input_exits_before_any_folder(tmp_path, override, needle):
    proc = cli(override.split(), tmp_path)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "outputs").exists()


def test_image_folder_with_gif_and_grayscale(tmp_path, finetune):
    root = make_image_folder(tmp_path / "images", classes=("ants", "bees", "wasps"), per_class=4)
    Image.new("L", (50, 35), 90).save(root / "train" / "ants" / "gray.png")
    Image.new("P", (45, 45), 3).save(root / "train" / "bees" / "anim.gif")
    Image.new("RGBA", (45, 45), (9, 9, 9, 0)).save(root / "val" / "wasps" / "clear.png")
    summary, run = finetune("debug=tiny", "data=imagefolder", f"data.root={root}")
    assert json.loads((run / "classes.json").read_text()) == ["ants", "bees", "wasps"]
    assert summary["status"] == "completed" and _summary(run)["status"] == "completed"
    assert summary["dataset"]["train_images"] == 14 and summary["dataset"]["val_images"] == 13


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_local_weights_file_with_a_different_head(tmp_path, finetune, caplog, fmt):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = torchvision.models.resnet18(num_classes=7)
    path = tmp_path / f"seven_classes.{fmt}"
    if fmt == "pt":
        torch.save(source.state_dict(), path)
    else:
        save_file(source.state_dict(), str(path))
    root = make_image_folder(tmp_path / "images")
    _, run = finetune("debug=tiny", "data=imagefolder", f"data.root={root}", f"model.weights={path}",
                      "strategy=linear_probe")
    assert "head initialised fresh" in caplog.text
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert torch.equal(state["conv1.weight"], source.conv1.weight)  # backbone came from the file
    assert state["fc.weight"].shape == (2, 512)  # head sized for the two classes


@pytest.mark.bad_input
def test_weights_file_of_another_architecture_names_the_keys(tmp_path):
    import torchvision

    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    root = make_image_folder(tmp_path / "images")
    proc = cli(["debug=tiny", "data=imagefolder", f"data.root={root}", "model=resnet50", f"model.weights={path}"],
               tmp_path)
    assert proc.returncode == 1
    assert "does not fit" in proc.stderr and "shape mismatch: conv1.weight" not in proc.stderr
    assert "layer1.0.conv3.weight" in proc.stderr  # a resnet50 key the file lacks
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "outputs").exists()  # found before the run folder was made


@pytest.mark.fault
def test_failed_download_names_the_remedies(tmp_path):
    """No silent fallback to random weights when the download fails (a closed proxy port
    makes it fail on any machine)."""
    env = {
        "TORCH_HOME": str(tmp_path / "torch"),
        "https_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "no_proxy": "",
        "NO_PROXY": "",
    }
    proc = cli(["debug=tiny", "model.weights=DEFAULT"], tmp_path, env=env)
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert "Could not download pretrained weights ResNet18_Weights" in out
    for remedy in ("model.weights=/path/to/weights.pth", "model.weights=null", str(tmp_path / "torch")):
        assert remedy in out
    assert "Traceback" not in out
    assert not (tmp_path / "outputs").exists()  # the download comes before the run folder


@pytest.mark.fault
def test_a_sweep_whose_weights_fail_to_download_makes_no_folder(tmp_path):
    env = {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    proc = cli(["-m", "debug=tiny", "model.weights=DEFAULT", "strategy=linear_probe,full"], tmp_path, env=env)
    assert proc.returncode == 1
    assert "all jobs: Could not download pretrained weights ResNet18_Weights" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_plan_mode_and_unique_folders(tmp_path):
    args = ["plan=true", "debug=tiny", "strategy=freeze_early", "strategy.freeze_groups=2",
            "hydra.run.dir=${unique_dir:outputs/same}"]
    first, second = cli(args, tmp_path), cli(args, tmp_path)
    _ok(first)
    _ok(second)
    assert (tmp_path / "outputs" / "same").is_dir() and (tmp_path / "outputs" / "same-2").is_dir()
    for group in ("stem", "layer1", "layer2", "layer3", "layer4", "head"):
        assert group in first.stdout
    assert "Trainable: 11,024," in first.stdout  # stem and layer1 frozen
    assert not (tmp_path / "outputs" / "same" / "checkpoints").exists()
    assert _summary(tmp_path / "outputs" / "same")["status"] == "planned"


def test_installed_wheel_ships_its_config(tmp_path):
    """A non-editable install carries conf/ inside the package and runs from any directory."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"),
         str(REPO)],
        check=True, capture_output=True,
    )
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    assert (target / "finetune_cli" / "conf" / "config.yaml").is_file()
    (entry_points,) = target.glob("finetune_cli-*.dist-info/entry_points.txt")
    for script in ("finetune-cli = finetune_cli.cli:main", "finetune-cli-report = finetune_cli.tools.report:main",
                   "finetune-cli-eval = finetune_cli.tools.evaluate:main", "finetune-cli-predict = finetune_cli.tools.predict:main",
                   "finetune-cli-export = finetune_cli.tools.export:main"):
        assert script in entry_points.read_text()
    assert (target / "finetune_cli" / "conf" / "strategy" / "linear_probe.yaml").is_file()
    assert (target / "finetune_cli" / "conf" / "debug" / "tiny.yaml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    where = subprocess.run([sys.executable, "-c", "import finetune_cli.paths as p; print(p.conf_dir())"],
                           cwd=elsewhere, capture_output=True, text=True, env=env)
    assert where.stdout.strip() == str(target / "finetune_cli" / "conf"), where.stderr
    proc = subprocess.run([sys.executable, "-m", "finetune_cli", "--help"], cwd=elsewhere, capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    listed = " ".join(proc.stdout.split())
    assert "strategy: auto, bitfit, discriminative, freeze_early, full, linear_probe, lora, norm, partial, progressive, staged, two_phase, ulmfit" in listed


def test_early_stopping_with_label_smoothing_and_clipping(finetune, caplog):
    summary, run = finetune("debug=tiny", "trainer.epochs=6", "optimizer.lr=1e-12", "trainer.patience=1",
                            "trainer.monitor=val_loss", "trainer.label_smoothing=0.1", "trainer.grad_clip=1.0",
                            "schedule=constant")
    # with a vanishing LR the validation loss cannot improve by more than rounding: stop after epoch 2
    assert summary["stopped_early"] is True and summary["epochs_run"] == 2
    assert _summary(run)["stopped_early"] is True and _summary(run)["status"] == "completed"
    assert "Early stopping" in caplog.text
    assert len(list(csv.DictReader((run / "metrics.csv").open()))) == 2


@pytest.mark.parametrize(
    "strategy",
    [
        ["strategy=progressive", "strategy.every=1", "strategy.rewarmup_epochs=0.5", "strategy.lr_decay=2.6"],
        ["strategy=staged", "strategy.stages=[{epochs:2,train_groups:1},{epochs:2,train_groups:-1,lr_mult:0.1}]"],
    ],
    ids=["progressive", "staged"],
)
def test_checkpoint_from_a_middle_phase_continues_that_phase_exactly(finetune, caplog, strategy):
    """All optimizer groups exist from the start, so a checkpoint taken in phase 2 loads into a
    fresh run, which continues phase 2 and ends bit-identical to the uninterrupted run."""
    common = ["debug=tiny", "model.weights=synthetic", "trainer.epochs=4", *strategy]
    _, straight = finetune(*common, "trainer.save_every=1", name="straight")
    middle = straight / "checkpoints" / "epoch_002.pt"
    caplog.clear()
    summary, resumed = finetune(*common, f"trainer.resume={middle}", name="resumed")
    assert f"Resumed from {middle} after epoch 2" in caplog.text
    assert summary["resumed_from"] == str(middle)
    a, b, rows_a, _ = assert_same_runs(straight, resumed, ("train_loss", "val_loss", "val_acc", "lr_head", "lr_stem",
                                                             "trainable_params", "events"))
    assert a["epoch"] == b["epoch"] == 4
    # phase 2 really differs from phase 1: more parameters train after the checkpoint
    assert int(rows_a[3]["trainable_params"]) > int(rows_a[0]["trainable_params"])


@pytest.mark.parametrize(
    "model, size, strategy",
    [
        ("vgg16", 32, "progressive"),
        ("vit_b_16", 32, "ulmfit"),
        ("inception_v3", 75, "two_phase"),
        ("efficientnet_b0", 32, "discriminative"),
    ],
)
def test_plan_for_any_model_and_strategy(finetune, caplog, model, size, strategy):
    summary, run = finetune("debug=tiny", f"model={model}", f"strategy={strategy}", f"data.image_size={size}",
                            "trainer.epochs=10", "plan=true")
    assert summary["status"] == "planned" and summary["strategy"] == strategy
    assert _summary(run)["status"] == "planned" and _summary(run)["groups"] == summary["groups"]
    rows = summary["groups"]
    assert rows[-1]["group"] == "head" and rows[-1]["status"] == "train"
    for row in rows:
        assert row["group"] in caplog.text
    assert sum(r["params"] for r in rows) == summary["total_params"]
    if strategy in ("progressive", "ulmfit"):
        assert any(r["status"].startswith("from epoch") for r in rows)
        assert "Timeline: epoch 2: +" in caplog.text
    if strategy in ("ulmfit", "discriminative"):
        lrs = [float(r["lr"]) for r in rows]
        assert lrs == sorted(lrs) and lrs[-2] == pytest.approx(lrs[-1] / 1.5, rel=0.01)
    if strategy == "two_phase":
        assert "Timeline: stage 2 (epochs 4-10): all groups, lr x1" in caplog.text
    assert not (run / "checkpoints").exists()


def test_auto_strategy_reports_its_decision(finetune, caplog):
    summary, run = finetune("debug=tiny", "strategy=auto", "data.synthetic.train_per_class=20",
                            "strategy.auto_small=10", "strategy.auto_large=15", "plan=true")
    auto = _summary(run)["auto"]
    assert summary["auto"] == auto
    # the synthetic data has a val/ folder, so all 20 images per class are training images
    assert auto["images_per_class"] == 20.0 and auto["chose"] == "full"
    assert "auto strategy: 20.0 training images per class >= auto_large=15" in caplog.text


@pytest.mark.parametrize("reg", ["l2sp", "ewc"])
def test_regularizers_run_end_to_end(tmp_path, finetune, caplog, reg):
    source = make_image_folder(tmp_path / "source", classes=("x", "y", "z"), per_class=3, val=False) / "train"
    extra = [f"regularizer.fisher_root={source}", "regularizer.fisher_samples=6"] if reg == "ewc" else []
    weights = tmp_path / "source.pt"  # EWC needs pretrained weights with their classifier
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), weights)
    summary, run = finetune("debug=tiny", f"regularizer={reg}", "strategy=full", f"model.weights={weights}", *extra)
    assert f"Regularizer: {reg}" in caplog.text
    if reg == "ewc":
        assert f"EWC: diagonal Fisher through the source head from 6 of source images in {source}" in caplog.text
    assert summary["regularizer"] == reg and summary["status"] == "completed"
    assert _summary(run)["regularizer"] == reg and _summary(run)["status"] == "completed"


def test_augment_preview_writes_a_labelled_grid_without_training(tmp_path, finetune, caplog, monkeypatch):
    from finetune_cli.data.preview import LABEL_HEIGHT, grid_size

    empty_cache = tmp_path / "cache"
    monkeypatch.setenv("FINETUNE_CLI_CACHE", str(empty_cache))  # no synthetic weights to find there
    summary, run = finetune("debug=tiny", "preview=augment", "preview_images=10", "augment=strong",
                            "augment.mixup_alpha=0.2", "model.weights=synthetic")
    path = run / "augment_preview.png"
    assert summary["preview"] == str(path)
    assert str(path) in caplog.text
    assert "Pretraining" not in caplog.text  # a preview builds no model
    assert not (empty_cache / "weights").exists()
    cols, rows, tile = grid_size(10, 32)
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (cols * tile, rows * (tile + LABEL_HEIGHT)) == (512, 462)
    assert not (run / "checkpoints").exists()
    assert _summary(run)["status"] == "previewed"


def test_strong_augmentation_with_mixup_and_cutmix_trains(finetune):
    _, run = finetune("debug=tiny", "augment=strong", "augment.mixup_alpha=0.2", "augment.cutmix_alpha=1.0",
                      "trainer.label_smoothing=0.1", "model.head_dropout=0.2", "model.weights=synthetic",
                      "strategy=linear_probe", "trainer.epochs=2")
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert len(rows) == 2 and all(0 <= float(r["train_acc"]) <= 1 for r in rows)
    assert _summary(run)["status"] == "completed"
