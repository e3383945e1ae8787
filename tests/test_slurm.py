"""``hydra/launcher=slurm`` against a real SLURM: the one-node cluster of scripts/local-slurm.sh
(Debian's slurm-wlm and munge; started here when this runs as root and it is installed). Skipped
where there is no SLURM."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, run_dirs

pytestmark = pytest.mark.slow


def _up() -> bool:
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("sbatch") is None:
        pytest.skip("no SLURM here (Debian: apt-get install slurm-wlm munge; then scripts/local-slurm.sh)")
    if not _up():
        if os.geteuid() != 0:
            pytest.skip("SLURM is installed but not running; scripts/local-slurm.sh starts it (as root)")
        started = subprocess.run(["bash", str(REPO / "scripts" / "local-slurm.sh")], capture_output=True, text=True)
        if started.returncode != 0:
            pytest.skip(f"scripts/local-slurm.sh could not start SLURM: {started.stderr[-500:]}")


def _sweep(args, cwd, **popen):
    return subprocess.Popen([sys.executable, "-m", "finetune_cli", "-m", "hydra/launcher=slurm",
                             "hydra.sweep.dir=sweep", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, **popen)


def _summary(run):
    return json.loads((run / "summary.json").read_text())


def test_a_two_job_sweep_runs_as_slurm_jobs_each_in_its_folder(slurm, tmp_path):
    proc = _sweep(["strategy=linear_probe,full", "debug=tiny", "model.weights=synthetic"], tmp_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    runs = run_dirs(tmp_path / "sweep")
    assert len(runs) == 2
    assert {_summary(r)["strategy"] for r in runs} == {"linear_probe", "full"}
    assert all(_summary(r)["status"] == "completed" for r in runs)
    assert "Submitted 2 SLURM job(s)" in out and out.count("Sweep: ") == 1 and "Traceback" not in out


def test_a_slurm_job_of_two_tasks_trains_data_parallel_in_one_folder(slurm, tmp_path):
    """srun starts two processes of one run: one folder, one .hydra record, rank 0's files."""
    proc = _sweep(["hydra.launcher.tasks_per_node=2", "strategy=full", "debug=tiny", "model.weights=synthetic"],
                  tmp_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    (run,) = [p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(list((tmp_path / "sweep").rglob(".hydra"))) == 1
    summary = _summary(run)
    assert summary["status"] == "completed" and summary["processes"] == 2
    assert summary["global_batch_size"] == 2 * 16


def test_the_warning_signal_requeues_the_job_and_it_resumes_exactly(slurm, tmp_path, finetune):
    """SIGUSR2 (SLURM's warning before a time limit, or a preemption) mid-run: the run keeps its
    last checkpoint, the job requeues itself, and the new job resumes in the same folder. Its
    metrics equal those of the same run left alone, to the bit."""
    args = ["strategy=full", "debug=tiny", "model.weights=synthetic", "trainer.epochs=6"]
    proc = _sweep(args, tmp_path)
    last = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((tmp_path / "sweep").glob("0_*/checkpoints/last.pt"))
        if found:
            last = found[0]
            break
        time.sleep(0.2)
    assert last is not None, "the job saved no checkpoint"
    job = [p.name for p in (tmp_path / "sweep" / ".submitit").iterdir() if p.name.isdigit()]  # this sweep's job
    assert len(job) == 1, job
    subprocess.run(["scancel", f"--signal={signal.SIGUSR2.name[3:]}", job[0]], check=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    run = last.parent.parent
    log = (run / "finetune.log").read_text()
    assert "SIGUSR2 received" in log and "Resumed from" in log
    requeued = _summary(run)
    assert requeued["status"] == "completed" and requeued["epochs_run"] == 6

    _, alone = finetune(*args, name="alone")
    assert _learning(run) == _learning(alone)


def _learning(run):
    """metrics.csv without its times: losses, accuracies, learning rates, trainable parameters."""
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    return [{k: v for k, v in row.items() if "seconds" not in k and "per_s" not in k and k != "events"} for row in rows]
