"""SIGTERM and Ctrl-C on a real training process, and resubmission with trainer.resume=auto."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import cli

pytestmark = pytest.mark.fault

# epochs long enough (200 images in batches of 32) that a signal sent after one epoch's line lands in the next
COMMON = ["debug=tiny", "model.weights=synthetic", "data.synthetic.train_per_class=20", "data.synthetic.val_per_class=10",
          "data.batch_size=32", "trainer.epochs=4", "strategy=full"]


def _start(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "finetune_cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_for(proc, needle, timeout=600):
    seen = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return "".join(seen)
        assert time.monotonic() < deadline, "".join(seen)
    raise AssertionError("process ended before printing " + repr(needle) + ":\n" + "".join(seen))


def test_sigterm_then_resubmit_with_resume_auto_matches_an_uninterrupted_run(tmp_path):
    assert cli([*COMMON, "hydra.run.dir=outputs/straight"], tmp_path).returncode == 0
    job = [*COMMON, "hydra.run.dir=outputs/job", "trainer.resume=auto"]
    proc = _start(job, tmp_path)
    _wait_for(proc, "epoch   2/4")  # checkpoints of epochs 1-2 are on disk; epoch 3 is under way
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, rest
    assert "SIGTERM received" in rest and "Resume with:" in rest
    assert "trainer.resume=" in rest and "hydra.run.dir=outputs/job" in rest  # the resubmission command
    last = torch.load(tmp_path / "outputs/job/checkpoints/last.pt", weights_only=True)
    assert last["epoch"] == 2

    again = cli(job, tmp_path)  # the batch scheduler resubmits the same command
    assert again.returncode == 0, again.stdout[-2000:]
    assert "Resumed from" in again.stdout and "after epoch 2" in again.stdout
    a = torch.load(tmp_path / "outputs/straight/checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "outputs/job/checkpoints/last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    rows_a = list(csv.DictReader((tmp_path / "outputs/straight/metrics.csv").open()))
    rows_b = list(csv.DictReader((tmp_path / "outputs/job/metrics.csv").open()))
    for col in ("epoch", "train_loss", "val_loss", "val_acc", "lr_head"):
        assert [r[col] for r in rows_a] == [r[col] for r in rows_b], col


def test_ctrl_c_stops_cleanly_and_records_the_interruption(tmp_path):
    import json

    proc = _start([*COMMON, "hydra.run.dir=outputs/run"], tmp_path)
    _wait_for(proc, "epoch   1/4")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    summary = json.loads((tmp_path / "outputs/run/summary.json").read_text())
    assert summary["status"] == "interrupted" and "SIGINT during epoch 2" in summary["error"]
    assert (tmp_path / "outputs/run/checkpoints/last.pt").is_file()
    assert len(list(csv.DictReader((tmp_path / "outputs/run/metrics.csv").open()))) == 1
    assert "Traceback" not in out


def test_a_second_signal_exits_at_once(tmp_path):
    code = (
        "import os, signal, time\n"
        "from finetune_cli.train.shutdown import GracefulStop\n"
        "with GracefulStop() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    assert stop.requested()\n"
        "    print('first signal noted', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(60)\n"
        "    print('not reached')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 130
    assert "first signal noted" in proc.stdout and "not reached" not in proc.stdout


def test_sigterm_during_synthetic_pretraining_stops_cleanly(tmp_path):
    """Pretraining obeys SIGTERM like training: a message, summary.json, exit 143, nothing cached."""
    cache = tmp_path / "fresh-cache"
    proc = subprocess.Popen([sys.executable, "-m", "finetune_cli", "debug=tiny", "model.weights=synthetic",
                             "hydra.run.dir=outputs/pre"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "FINETUNE_CLI_CACHE": str(cache)})
    _wait_for(proc, "source epoch  1/")
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, rest
    assert "SIGTERM during synthetic pretraining epoch" in rest and "Traceback" not in rest
    summary = json.loads((tmp_path / "outputs/pre/summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert not list(cache.rglob("synthetic-*.pt"))  # no half-trained weights are cached


RANDOM_INIT = [a for a in COMMON if a != "model.weights=synthetic"]  # no pretraining needed


@pytest.mark.parametrize("logger", ["none", "mlflow"])
def test_a_second_sigterm_quits_at_once_and_records_the_interruption(tmp_path, logger):
    """A second signal exits without waiting; summary.json once stayed "running", and the MLflow
    run RUNNING."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = [] if logger == "none" else ["logger=mlflow", f"logger.tracking_uri={store}"]
    if tracking:
        pytest.importorskip("mlflow")
    proc = _start([*RANDOM_INIT, *tracking, "hydra.run.dir=outputs/twice"], tmp_path)
    _wait_for(proc, "epoch   1/4")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    assert proc.returncode == 143
    summary = json.loads((tmp_path / "outputs/twice/summary.json").read_text())
    assert summary["status"] == "interrupted" and "SIGTERM twice" in summary["error"]
    if tracking:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=store)
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert run.info.status == "KILLED" and "SIGTERM twice" in run.data.tags["error"]


def test_a_tracking_store_that_does_not_answer_holds_a_forced_quit_for_seconds_only(tmp_path, monkeypatch, caplog):
    from finetune_cli import record

    class Hanging:
        def close(self, status, summary):
            time.sleep(60)

    monkeypatch.setattr(record, "FORCED_CLOSE_SECONDS", 0.2)
    rec = record.Recorder(tmp_path)
    rec.logger = Hanging()
    started = time.monotonic()
    rec.forced_out(signal.SIGTERM)
    assert time.monotonic() - started < 30
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "interrupted"
    assert "did not record the end within 0.2 s" in caplog.text


def test_a_second_process_in_a_busy_folder_is_refused(tmp_path):
    """Two processes on one hydra.run.dir with resume=auto once both ran and wrote the same files."""
    from finetune_cli.io_utils import folder_lock

    args = ["debug=tiny", "hydra.run.dir=outputs/shared"]
    assert cli(args, tmp_path).returncode == 0
    run = tmp_path / "outputs" / "shared"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"}
    with folder_lock(run):  # the lock a running process holds
        second = cli([*args, "trainer.resume=auto"], tmp_path)
    out = second.stdout + second.stderr
    assert second.returncode == 1 and "Another finetune-cli process is running in" in out
    assert "Traceback" not in out
    assert {p: p.read_bytes() for p in before} == before
