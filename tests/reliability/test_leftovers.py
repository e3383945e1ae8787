"""What an interrupted save leaves, file modes, truncated checkpoints, and the run-folder lock."""

import os
import stat

import pytest
import torch

from finetune_cli.errors import FinetuneError, Refused
from finetune_cli.io_utils import atomic_json, folder_lock, safe_torch_load

from helpers import snapshot

TINY = ("debug=tiny",)


def test_files_follow_the_umask(tmp_path):
    """mkstemp made every output file 0600 whatever the umask."""
    old = os.umask(0o022)
    try:
        atomic_json({"a": 1}, tmp_path / "summary.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "summary.json").stat().st_mode) == 0o644


@pytest.mark.fault
def test_stale_temporaries_of_an_unfinished_save_are_removed_at_the_next_start(finetune, caplog):
    _, run = finetune(*TINY, "trainer.epochs=2")
    stale = run / "checkpoints" / ".last.pt.k3j2l1.tmp"
    stale.write_bytes(b"\0" * 4096)
    finetune(*TINY, "trainer.epochs=2", "trainer.resume=auto", out_dir=run)
    assert not stale.exists() and "Removed 1 temporary file(s) of a save that never finished" in caplog.text


@pytest.mark.fault
def test_a_truncated_checkpoint_is_named_as_such(tmp_path, finetune):
    _, run = finetune(*TINY)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:5000])
    with pytest.raises(FinetuneError, match="is truncated or corrupt") as info:
        safe_torch_load(last)
    assert "Refused" not in str(info.value)


def test_a_runs_checkpoints_of_the_same_epoch_are_one_file(finetune):
    summary, run = finetune(*TINY, "trainer.epochs=3", "trainer.save_every=1")
    ckpts = run / "checkpoints"
    inode = {p.name: p.stat().st_ino for p in ckpts.glob("*.pt")}
    assert inode["epoch_003.pt"] == inode["last.pt"]
    best = summary["best"]["epoch"]
    assert inode["best.pt"] == inode[f"epoch_{best:03d}.pt"]
    assert len(set(inode.values())) == 3  # three epochs saved, three files stored
    for epoch in (1, 2, 3):
        assert torch.load(ckpts / f"epoch_{epoch:03d}.pt", weights_only=True)["epoch"] == epoch
    assert torch.load(ckpts / "best.pt", weights_only=True)["epoch"] == best


@pytest.mark.fault
def test_resume_auto_falls_back_from_a_truncated_last_checkpoint(finetune, caplog):
    summary, run = finetune(*TINY, "trainer.epochs=3", "trainer.save_every=1")
    ckpts = run / "checkpoints"
    (ckpts / "epoch_003.pt").unlink()
    (ckpts / "best.pt").unlink()
    (ckpts / "last.pt").write_bytes((ckpts / "last.pt").read_bytes()[:5000])
    again, _ = finetune(*TINY, "trainer.epochs=3", "trainer.save_every=1", "trainer.resume=auto", out_dir=run)
    assert "last.pt is truncated or corrupt" in caplog.text and "epoch_002.pt instead (epoch 2)" in caplog.text
    assert again["status"] == "completed" and again["epochs_run"] == 3


@pytest.mark.fault
def test_a_run_in_a_locked_folder_is_refused_and_changes_nothing(finetune, kept):
    _, run = finetune(*TINY)
    before = snapshot(run)
    with folder_lock(run):  # another process holding the folder
        with pytest.raises(Refused, match="Another finetune-cli process is running in"):
            finetune(*TINY, "trainer.resume=auto", out_dir=run)
    kept(before, run)
    assert snapshot(run) == before
