"""Bad data and bad settings: a clear error naming the problem and the remedy, before training."""

import csv
import io
import json

import pytest
from PIL import Image

from helpers import cli, make_image_folder, run_dirs

RUN = ["debug=tiny", "data=imagefolder"]


def _jpeg_bytes(size=(40, 40)):
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 30, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def _dirty_folder(root):
    make_image_folder(root, classes=("ants", "bees"), per_class=4)
    train = root / "train"
    (train / "ants" / "truncated.jpg").write_bytes(_jpeg_bytes()[:300])
    (train / "ants" / "empty.png").write_bytes(b"")
    (train / "bees" / "notes.jpg").write_text("this is not an image")
    Image.new("L", (300, 300), 7).save(train / "bees" / "huge.png")  # over the limit set below
    return root


@pytest.mark.bad_input
def test_bad_images_are_listed_by_path_before_training(tmp_path):
    root = _dirty_folder(tmp_path / "data")
    proc = cli([*RUN, f"data.root={root}", "data.max_image_pixels=50000"], tmp_path)
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert "4 of 20 images" in out and "data.on_bad_image=skip" in out
    assert f"{root}/train/ants/empty.png: empty file (0 bytes)" in out
    assert f"{root}/train/ants/truncated.jpg: unreadable" in out
    assert f"{root}/train/bees/notes.jpg: unreadable" in out
    assert f"{root}/train/bees/huge.png: 300x300 = 90,000 pixels, over data.max_image_pixels=50,000" in out
    assert "Traceback" not in out
    (run,) = run_dirs(tmp_path / "outputs")
    assert not (run / "checkpoints").exists() and json.loads((run / "summary.json").read_text())["status"] == "failed"


@pytest.mark.bad_input
def test_skip_leaves_bad_images_out_and_lists_them(tmp_path, finetune, caplog):
    root = _dirty_folder(tmp_path / "data")
    _, run = finetune(*RUN, f"data.root={root}", "data.max_image_pixels=50000", "data.on_bad_image=skip")
    assert "Skipping 4 of 20 images" in caplog.text
    skipped = (run / "skipped_images.txt").read_text().splitlines()
    assert len(skipped) == 4 and all(line.startswith(str(root)) for line in skipped)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dataset"]["train_images"] == 8 and summary["status"] == "completed"


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "layout, needle",
    [
        ("no_classes", "has no class folders"),
        ("empty_class", "Empty class folder(s)"),
        ("class_mismatch", "only in train: ['bees']; only in val: ['wasps']"),
        ("no_train", "has no train/ folder"),
    ],
)
def test_folder_layout_errors(tmp_path, layout, needle):
    root = tmp_path / "data"
    if layout == "no_classes":
        (root / "train").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "train" / "loose.png")
    elif layout == "empty_class":
        make_image_folder(root, classes=("ants", "bees"), per_class=3)
        (root / "train" / "wasps").mkdir()
        (root / "val" / "wasps").mkdir()
    elif layout == "class_mismatch":
        make_image_folder(root, classes=("ants", "bees"), per_class=3)
        (root / "val" / "bees").rename(root / "val" / "wasps")
    else:
        (root / "images").mkdir(parents=True)
    proc = cli([*RUN, f"data.root={root}"], tmp_path)
    assert proc.returncode == 1
    assert needle in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.head=deep", "model.head"),
        ("model.aux_weight=heavy", "model.aux_weight"),
        ("data.batch_size=big", "data.batch_size"),
        ("data.on_bad_image=ignore", "data.on_bad_image"),
        ("strategy.bn=sometimes", "strategy.bn"),
        ("strategy.every=often", "strategy.every"),
        ("optimizer.name=lion", "optimizer.name"),
        ("schedule.name=linear", "schedule.name"),
        ("augment.rotation=lots", "augment.rotation"),
        ("trainer.amp=fp8", "trainer.amp"),
        ("regularizer.name=dropout", "regularizer.name"),
        ("logger.name=wandb", "logger.name"),
        ("experiment=nope", "Unknown experiment option 'nope'. experiment= takes one of: domain_shift, gradual"),
        ("model.weights=IMAGENET9K", "Valid choices: DEFAULT, IMAGENET1K_V1"),
        ("trainer.device=cuda", "no CUDA GPU"),
        ("augment.erasing_p=1.5", "augment.erasing_p is a probability"),
    ],
)
def test_bad_override_in_every_group_exits_before_any_folder(tmp_path, override, needle):
    proc = cli(["data=synthetic", override], tmp_path)
    if override == "trainer.device=cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present here")
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.fault
def test_one_failing_sweep_job_keeps_the_others_and_the_report_lists_it(tmp_path):
    import subprocess
    import sys

    # settings that cannot run stop the sweep before it starts; a job that fails once running
    # (an LR that overflows the loss) is recorded and the others go on
    proc = cli(["-m", "optimizer.lr=0.01,1e30,0.001", "optimizer=sgd", "strategy=full", "debug=tiny"], tmp_path)
    assert proc.returncode != 0
    assert "Sweep:" in proc.stdout and "failed" in proc.stdout  # the closing table, though a job failed
    (sweep,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    statuses = sorted(json.loads((r / "summary.json").read_text())["status"] for r in run_dirs(sweep))
    assert statuses == ["completed", "completed", "failed"]
    report = subprocess.run([sys.executable, "-m", "finetune_cli.tools.report", str(sweep)], capture_output=True, text=True)
    assert report.returncode == 0
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and ("became nan" in failed[0]["error"] or "became inf" in failed[0]["error"])


@pytest.mark.fault
def test_report_survives_broken_run_folders_and_names_failed_jobs_choices(tmp_path, finetune):
    """One bad run folder (a list or null summary.json, a binary metrics.csv) once made the
    report exit 1 with a traceback; failed jobs showed model and strategy as "-"."""
    import shutil
    import subprocess
    import sys

    _, good = finetune("debug=tiny", "strategy=linear_probe", out_dir=tmp_path / "all" / "good")
    (good / ".hydra").mkdir()
    (good / ".hydra" / "config.yaml").write_text("model:\n  name: resnet18\nstrategy:\n  name: linear_probe\n")
    (good / ".hydra" / "overrides.yaml").write_text("- strategy=linear_probe\n")
    for name, summary, metrics in (("as_list", b"[1, 2]", None), ("as_null", b"null", None),
                                   ("binary", None, bytes(range(256)) * 8), ("odd_types", b'{"best": "x", "total_seconds": "slow"}', None)):
        broken = tmp_path / "all" / name
        shutil.copytree(good, broken)
        if summary is not None:
            (broken / "summary.json").write_bytes(summary)
        if metrics is not None:
            (broken / "metrics.csv").write_bytes(metrics)
    early = tmp_path / "all" / "failed_early"
    shutil.copytree(good / ".hydra", early / ".hydra")  # a job that failed before writing anything
    proc = subprocess.run([sys.executable, "-m", "finetune_cli.tools.report", str(tmp_path / "all")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    rows = {r["run"]: r for r in csv.DictReader((tmp_path / "all" / "report.csv").open())}
    assert set(rows) == {"good", "as_list", "as_null", "binary", "odd_types", "failed_early"}
    assert "not a mapping" in rows["as_list"]["error"] and "not a mapping" in rows["as_null"]["error"]
    assert rows["failed_early"]["model"] == "resnet18" and rows["failed_early"]["strategy"] == "linear_probe"
    assert rows["as_list"]["strategy"] == "linear_probe"
