"""Atomic writes, refused pickles, NaN losses: what is on disk stays usable."""

import json
import os
import pickle

import pytest
import torch

from helpers import cli
from finetune_cli import io_utils
from finetune_cli.train.checkpoint import resolve_checkpoint


def test_a_save_failing_midway_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    io_utils.atomic_torch_save({"epoch": 1, "w": torch.ones(3)}, path)
    io_utils.atomic_csv([{"epoch": 1}], tmp_path / "metrics.csv")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")  # the disk fills up mid-save

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        io_utils.atomic_torch_save({"epoch": 2, "w": torch.zeros(3)}, path)
    with pytest.raises(OSError):
        io_utils.atomic_csv([{"epoch": 1}, {"epoch": 2}], tmp_path / "metrics.csv")
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["epoch", "1"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no partial file left behind
    assert resolve_checkpoint(str(tmp_path), prefer="last.pt") == path


class _Sentinel:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def _malicious(tmp_path, kind):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"model": {"fc.weight": _Sentinel(sentinel)}, "format": "finetune-cli/1"}
    if kind == "torch.save":
        torch.save(payload, path)  # a zip archive, as torch writes it
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=4)  # a plain pickle
    return path, sentinel


@pytest.mark.parametrize("kind", ["torch.save", "pickle"])
def test_a_malicious_pickle_is_refused_everywhere(tmp_path, kind):
    path, sentinel = _malicious(tmp_path, kind)
    small = ["data=synthetic", "data.synthetic.train_per_class=10", "data.synthetic.val_per_class=4", "trainer.epochs=1",
             "data.num_workers=0"]
    as_weights = cli([f"model.weights={path}", *small, "hydra.run.dir=outputs/w"], tmp_path)
    as_resume = cli(["model.weights=null", f"trainer.resume={path}", *small, "hydra.run.dir=outputs/r"], tmp_path)
    import subprocess
    import sys

    as_eval = subprocess.run([sys.executable, "-m", "finetune_cli.tools.evaluate", str(path), str(tmp_path)],
                             capture_output=True, text=True)
    for proc in (as_weights, as_resume, as_eval):
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert "Refused to load" in out and "it would import io.open" in out, out[-1500:]  # pickle names open as io.open
        assert "Traceback" not in out
    assert not sentinel.exists()


def test_nan_loss_stops_naming_the_epoch_and_keeps_the_last_good_checkpoint(tmp_path):
    proc = cli(["model.weights=null", "data=synthetic", "data.synthetic.train_per_class=16", "data.synthetic.val_per_class=4",
                "data.num_workers=0", "strategy=full", "optimizer=sgd", "optimizer.lr=0.01", "schedule=step",
                "schedule.step_epochs=1", "schedule.gamma=1e30", "trainer.epochs=3", "hydra.run.dir=outputs/nan"], tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-2000:]
    assert "became nan" in out or "became inf" in out
    assert "epoch 2/3" in out  # epoch 1 ran at lr 0.01, epoch 2 at 1e28
    run = tmp_path / "outputs" / "nan"
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert best["epoch"] == last["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in best["model"].values() if t.is_floating_point())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["best"]["epoch"] == 1
