"""Atomic writes, refused pickles, NaN losses: what is on disk stays usable."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from finetune_cli import io_utils
from finetune_cli.errors import FinetuneError
from finetune_cli.train.checkpoint import resolve_checkpoint

from helpers import cli


@pytest.mark.fault
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


def test_a_linked_checkpoint_keeps_its_bytes_when_the_original_is_saved_again(tmp_path):
    """best.pt was a second full copy of last.pt's bytes: two checkpoints on disk per run."""
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    io_utils.atomic_torch_save({"epoch": 1}, last)
    io_utils.atomic_link(last, best)
    assert best.stat().st_ino == last.stat().st_ino and last.stat().st_nlink == 2  # stored once
    io_utils.atomic_link(last, best)  # linking again onto its own file leaves no temporary behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
    io_utils.atomic_torch_save({"epoch": 2}, last)  # the next save renames a new file over last.pt
    assert torch.load(best, weights_only=True) == {"epoch": 1}
    assert torch.load(last, weights_only=True) == {"epoch": 2}
    assert best.stat().st_nlink == 1


def test_where_no_link_can_be_made_the_bytes_are_copied(tmp_path, monkeypatch):
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    io_utils.atomic_torch_save({"epoch": 1}, last)

    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    io_utils.atomic_link(last, best)
    assert best.stat().st_ino != last.stat().st_ino
    assert torch.load(best, weights_only=True) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


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


@pytest.mark.bad_input
@pytest.mark.parametrize("kind", ["torch.save", pytest.param("pickle", marks=pytest.mark.slow)])
def test_a_malicious_pickle_is_refused_everywhere(tmp_path, kind):
    path, sentinel = _malicious(tmp_path, kind)
    as_weights = cli(["debug=tiny", f"model.weights={path}", "hydra.run.dir=outputs/w"], tmp_path)
    as_resume = cli(["debug=tiny", f"trainer.resume={path}", "hydra.run.dir=outputs/r"], tmp_path)
    as_eval = subprocess.run([sys.executable, "-m", "finetune_cli.tools.evaluate", str(path), str(tmp_path)],
                             capture_output=True, text=True)
    for proc in (as_weights, as_resume, as_eval):
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert "Refused to load" in out and "it would import io.open" in out, out[-1500:]  # pickle names open as io.open
        assert "Traceback" not in out
    assert not sentinel.exists()


@pytest.mark.fault
def test_nan_loss_stops_naming_the_epoch_and_keeps_the_last_good_checkpoint(tmp_path, finetune, caplog, monkeypatch):
    from finetune_cli import checks

    # an LR that grows 1e30-fold after epoch 1: the checks refuse gamma > 1, so they are told to
    # let it through here, to reach the guard that stops a run whose loss stops being finite
    monkeypatch.setattr(checks, "RANGES", [r for r in checks.RANGES if r[0] != "schedule.gamma"])
    with pytest.raises(FinetuneError) as info:
        finetune("debug=tiny", "strategy=full", "optimizer=sgd", "optimizer.lr=0.01", "schedule=step",
                 "schedule.step_epochs=1", "schedule.gamma=1e30", "trainer.epochs=3", name="nan")
    error = str(info.value)
    assert "became nan" in error or "became inf" in error
    assert "epoch 2/3" in error  # epoch 1 ran at lr 0.01, epoch 2 at 1e28
    assert "epoch   1/3" in caplog.text and "epoch   2/3" not in caplog.text  # the failed epoch is not reported
    run = tmp_path / "runs" / "nan"
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert best["epoch"] == last["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in best["model"].values() if t.is_floating_point())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["best"]["epoch"] == 1
