"""Faults that once ended in a raw traceback, or lost what a run had written: file names that are
not UTF-8, images broken after their check, Pillow's own size limit, a full disk, read-only
folders, damaged weights files, signals before the first epoch, mistakes only the architecture
reveals. Each is counted in the reliability figures (tests/conftest.py)."""

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

from finetune_cli.errors import FinetuneError, UnreadableImage

from helpers import REPO, cli, make_image_folder, run_dirs, snapshot

ODD = os.fsdecode(b"\xfe\xff")  # a name that is not UTF-8 (Latin-1 media, old archives)


def _data(tmp_path, per_class=4):
    return make_image_folder(tmp_path / "data", classes=("ants", "bees"), per_class=per_class, size=36)


def _run_args(root, *more):
    return ("debug=tiny", "data=imagefolder", f"data.root={root}", *more)


# -- file names that are not UTF-8 ---------------------------------------------------------------


@pytest.mark.bad_input
def test_file_names_that_are_not_utf8_are_logged_listed_and_cached(tmp_path):
    """The feature-cache key, skipped_images.txt and the log once raised UnicodeEncodeError."""
    root = _data(tmp_path)
    shutil.copy(root / "train" / "ants" / "0.png", root / "train" / "ants" / f"{ODD}.png")
    (root / "train" / "bees" / f"{ODD}-bad.png").write_bytes(b"not an image")
    proc = cli([*_run_args(root, "augment=none", "data.on_bad_image=skip"), "hydra.run.dir=outputs/run"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]
    assert "Traceback" not in proc.stdout + proc.stderr
    run = tmp_path / "outputs" / "run"
    assert b"bees/\xfe\xff-bad.png\t" in (run / "skipped_images.txt").read_bytes()  # the name's own bytes
    assert "\\udcfe\\udcff-bad.png" in (run / "finetune.log").read_text()
    assert (run / "features" / "train.pt").is_file()  # the cache key hashed the odd name


@pytest.mark.bad_input
def test_predict_writes_file_names_that_are_not_utf8(tmp_path, finetune):
    from finetune_cli.tools import predict

    _, run = finetune("debug=tiny")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(images / f"{ODD}.png")
    assert predict.main([str(run), str(images), "--out-dir", str(tmp_path / "out")]) == 0
    assert b"\xfe\xff.png" in (tmp_path / "out" / "predictions.csv").read_bytes()


# -- images that fail to load after the check -----------------------------------------------------


@pytest.mark.fault
def test_an_image_broken_mid_run_is_named_and_the_saved_epoch_stays(tmp_path, finetune, monkeypatch, kept):
    """A file made unreadable after its (cached) check once crashed training with a raw traceback."""
    from finetune_cli.data import folders

    root = _data(tmp_path)
    run = tmp_path / "runs" / "broken"
    victim = str(root / "train" / "bees" / "2.png")
    real, calls, saved = folders.load_rgb, [0], {}

    def load_then_break(path, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 17:  # epoch 2 begins (8 training + 8 validation images an epoch)
            saved["before"] = snapshot(run)
            with open(victim, "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\n broken by a copy that went wrong")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(folders, "load_rgb", load_then_break)
    with pytest.raises(UnreadableImage) as info:
        finetune(*_run_args(root, "strategy=full", "trainer.epochs=2"), out_dir=run)
    assert victim in str(info.value) and "trainer.resume" in str(info.value)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    kept({k: v for k, v in saved["before"].items() if k != "summary.json"}, run)
    assert "UnreadableImage" in (run / "summary.json").read_text()


@pytest.mark.bad_input
def test_an_image_changed_after_its_cached_check_is_checked_again(tmp_path, finetune):
    """Verdicts were cached by size and modification time: a file rewritten with its old mtime
    (a restore, a copy keeping times) passed as checked and crashed training."""
    root = _data(tmp_path)
    finetune(*_run_args(root))
    victim = root / "train" / "ants" / "1.png"
    st = victim.stat()
    victim.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * (st.st_size - 8))  # same size, not an image
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(FinetuneError, match="cannot be used") as info:
        finetune(*_run_args(root))
    assert str(victim) in str(info.value)


@pytest.mark.bad_input
def test_a_bad_image_with_the_check_off_is_named_without_a_traceback(tmp_path, finetune):
    """With data.check_images=false a bad image crashed a loader worker with a raw traceback."""
    root = _data(tmp_path)
    (root / "train" / "ants" / "9.png").write_bytes(b"garbage")
    with pytest.raises(UnreadableImage) as info:
        finetune(*_run_args(root, "data.check_images=false", "strategy=full", "data.num_workers=2"))
    message = str(info.value)
    assert "9.png" in message and "Traceback" not in message and "DataLoader worker" not in message


@pytest.mark.bad_input
def test_images_over_pillows_own_limit_open_when_max_image_pixels_allows_them(tmp_path, finetune, monkeypatch):
    """Raising data.max_image_pixels past Pillow's limit passed the check, then Pillow's
    DecompressionBombError stopped training. (Pillow's limit is lowered here to the test's
    40-px images, as a 200-megapixel file would be for its default.)"""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    root = _data(tmp_path)
    summary, _ = finetune(*_run_args(root, "data.max_image_pixels=100000"))
    assert summary["status"] == "completed"


# -- storage: a full disk, read-only folders (real file systems, in a private mount namespace) ----

# A tmpfs of 60 MB holds one epoch's last.pt of resnet18 (45 MB; best.pt is the same file), not the next save.
SANDBOX = r"""
set -u
mount -t tmpfs -o size=60m tmpfs "$FS" || exit 99
mkdir -p "$FS/work" && cd "$FS/work"
{prepare}
"$PY" -m finetune_cli debug=tiny {args} > "$OUT/stdout" 2> "$OUT/stderr"
echo $? > "$OUT/rc"
cp -a "$FS/work/." "$OUT/files/" 2>/dev/null
exit 0
"""


def _in_sandbox(tmp_path, args, prepare=""):
    """Run the CLI with its working directory on a fresh tmpfs, in a private mount namespace
    (``unshare``; as root, or through a user namespace). Skips where neither is allowed."""
    fs, out = tmp_path / "fs", tmp_path / "out"
    fs.mkdir()
    (out / "files").mkdir(parents=True)
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-r", "-m"]
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here to mount a small or read-only file system")
    env = {**os.environ, "FS": str(fs), "OUT": str(out), "PY": sys.executable, "PYTHONPATH": str(REPO),
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([*unshare, "bash", "-c", SANDBOX.format(args=args, prepare=prepare)], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 99 or not (out / "rc").is_file():
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}")
    return int((out / "rc").read_text()), (out / "stdout").read_text() + (out / "stderr").read_text(), out / "files"


@pytest.mark.fault
def test_a_full_disk_is_named_and_the_saved_epoch_stays_whole(tmp_path):
    rc, text, files = _in_sandbox(tmp_path, "trainer.epochs=3 hydra.run.dir=run")
    assert rc == 1, text[-2000:]
    assert "Traceback" not in text
    assert "the disk is full" in text and "Free some space" in text
    checkpoints = files / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.pt", "last.pt"]  # no partial file left
    assert torch.load(checkpoints / "last.pt", weights_only=True)["epoch"] == 1  # whole, and loadable
    assert '"status": "failed"' in (files / "run" / "summary.json").read_text()


@pytest.mark.fault
@pytest.mark.parametrize("where", ["working directory", "run folder", "earlier run"])
def test_a_read_only_folder_is_named_and_changes_nothing(tmp_path, where):
    """A read-only working directory (the default dated folder) or hydra.run.dir once raised
    OSError from inside Hydra; a resume in a read-only run folder is refused, its files as they were."""
    args = {"working directory": "", "run folder": "hydra.run.dir=run", "earlier run": "hydra.run.dir=run trainer.resume=auto"}
    prepare = 'mount -o remount,ro "$FS"'
    if where == "earlier run":  # a finished run's folder, then the file system goes read-only
        prepare = '"$PY" -m finetune_cli debug=tiny trainer.epochs=1 hydra.run.dir=run > /dev/null 2>&1; ' + \
            'cp -a run "$OUT/before"; ' + prepare
    rc, text, files = _in_sandbox(tmp_path, args[where], prepare)
    assert rc == 1, text[-2000:]
    assert "Traceback" not in text
    assert "read-only" in text and "Nothing was run" in text
    if where == "earlier run":
        before, after = snapshot(tmp_path / "out" / "before"), snapshot(files / "run")
        assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}
    else:
        assert not any(files.iterdir())


# -- damaged files and mistakes only the architecture shows, refused before any folder ------------


def _weights_files(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\xff" * 64)
    other = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(3, 7)}, other)  # not a resnet18's state dict
    return {"text": text, "safetensors": damaged, "other": other}


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["strategy=progressive", "strategy.until=99"], "strategy.until=99 is out of range"),
        (["strategy=freeze_early", "strategy.freeze_groups=9"], "strategy.freeze_groups=9 is out of range"),
        (["strategy=partial", "strategy.train_groups=9"], "strategy.train_groups=9 is out of range"),
        (["strategy=discriminative", "strategy.group_lrs=[0.1,0.2]"], "strategy.group_lrs has 2 values"),
        (["strategy=staged", "strategy.stages=[{epochs:1,train_groups:7}]"], "strategy.stages[0].train_groups=7"),
        (["model.weights={text}"], "is not a PyTorch file"),
        (["model.weights={safetensors}"], "is not a readable .safetensors file"),
        (["model.weights={other}"], "does not fit"),
        (["model=vit_b_16", "data.image_size=40"], "multiple of 16"),
    ],
)
def test_mistakes_the_architecture_reveals_are_refused_before_any_folder(tmp_path, overrides, needle):
    """These were found only after the run folder was made (and a data check run)."""
    from conftest import compose_config

    from finetune_cli.checks import typed_config
    from finetune_cli.cli import ready_to_run

    files = _weights_files(tmp_path)
    for name, path in files.items():
        overrides = [o.replace(f"{{{name}}}", str(path)) for o in overrides]
    cfg, _ = compose_config(["debug=tiny", *overrides])
    with pytest.raises(FinetuneError) as info:
        ready_to_run(typed_config(cfg))  # what the CLI does before Hydra makes the folder
    assert needle in str(info.value)


@pytest.mark.bad_input
def test_the_cli_refuses_a_damaged_weights_file_before_making_a_folder(tmp_path):
    files = _weights_files(tmp_path)
    proc = cli(["debug=tiny", f"model.weights={files['safetensors']}"], tmp_path)
    assert proc.returncode == 1 and "not a readable .safetensors file" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert run_dirs(tmp_path) == [] and not (tmp_path / "outputs").exists()


@pytest.mark.bad_input
def test_eval_names_a_bad_image_or_leaves_it_out_when_asked(tmp_path, finetune, capsys):
    from finetune_cli.tools import evaluate

    _, run = finetune("debug=tiny")
    folder = make_image_folder(tmp_path / "eval", classes=("circle_solid", "cross_dots"), per_class=2, val=False) / "train"
    (folder / "cross_dots" / "broken.png").write_bytes(b"garbage")
    assert evaluate.main([str(run), str(folder), "--out-dir", str(tmp_path / "e1")]) == 2
    assert "broken.png" in capsys.readouterr().err and not (tmp_path / "e1").exists()
    assert evaluate.main([str(run), str(folder), "--out-dir", str(tmp_path / "e2"), "--skip-bad-images"]) == 0
    assert '"images_left_out": 1' in (tmp_path / "e2" / "metrics.json").read_text()


# -- a signal before the first epoch --------------------------------------------------------------


@pytest.mark.fault
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_before_the_first_epoch_records_the_interruption(tmp_path, finetune, monkeypatch, signum):
    """SIGTERM during setup (data check, model, feature extraction) once killed the process with
    summary.json unwritten; Ctrl-C printed a KeyboardInterrupt traceback."""
    import finetune_cli.run as run_module

    real = run_module.build

    def build_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signum)  # arrives while the model and data are being built
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "build", build_then_signal)
    run, handler = tmp_path / "runs" / "setup", signal.getsignal(signum)
    with pytest.raises(SystemExit) as info:
        finetune("debug=tiny", out_dir=run)
    assert info.value.code == 128 + signum
    summary = (run / "summary.json").read_text()
    assert '"status": "interrupted"' in summary and "during setup" in summary
    assert signal.getsignal(signum) is handler  # the process's own handler is back
