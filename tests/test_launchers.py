"""Sweep launchers: ``hydra/launcher=parallel`` (jobs at once, each on its own GPUs and cores) and
the sharing of a machine behind it. (SLURM: tests/test_slurm.py.)"""

import json
import re

import pytest

from finetune_cli.launching import Box, Share, _ranges, gpus_wanted

from helpers import cli, make_image_folder, run_dirs


def _summary(run):
    return json.loads((run / "summary.json").read_text())


def _spans(stdout):
    """Each job's process life in the launcher's own order of events: from the line that starts it
    to the line that reports it finished (its share goes back only then). Two jobs ran at once when
    each started before the other finished; this holds whatever the machine's load, unlike the
    wall-clock times of the jobs' own logs (a job slow to import may begin training after its
    neighbour has finished)."""
    events = re.findall(r"#(\d+) (?:.*: (started) on |(finished) in )", stdout)
    spans = {}
    for order, (job, started, _) in enumerate(events):
        spans.setdefault(job, [None, None])[0 if started else 1] = order
    return {job: tuple(span) for job, span in spans.items()}


# -- the machine dealt out ----------------------------------------------------------------------


def test_eight_gpus_run_four_two_gpu_jobs_at_once_and_a_bigger_job_waits():
    box = Box([str(i) for i in range(8)], list(range(16)), at_once=4)
    shares = [box.take(2) for _ in range(4)]
    assert all(shares) and box.take(1) is None  # four jobs: every GPU and every core share in use
    gpus = [g for s in shares for g in s.gpus]
    cores = [c for s in shares for c in s.cpus]
    assert sorted(gpus, key=int) == [str(i) for i in range(8)] and len(set(cores)) == 16
    assert all(len(s.cpus) == 4 for s in shares)
    box.give_back(shares[1])
    assert box.take(4) is None  # a 4-GPU job waits for two shares to come back
    box.give_back(shares[3])
    big = box.take(4)
    assert big is not None and sorted(big.gpus) == sorted(shares[1].gpus + shares[3].gpus)


def test_cpu_jobs_get_disjoint_cores_and_more_jobs_than_cores_share_them():
    box = Box([], [0, 1, 2, 3], at_once=2)
    a, b = box.take(0), box.take(0)
    assert set(a.cpus).isdisjoint(b.cpus) and len(a.cpus) == len(b.cpus) == 2 and a.gpus == ()
    assert box.take(0) is None
    crowded = Box([], [0, 1], at_once=3)
    assert [crowded.take(0).cpus for _ in range(3)] == [(0,), (1,), (0,)]


def test_a_jobs_gpus_follow_its_trainer_devices():
    assert gpus_wanted("1", "auto", 8) == 1
    assert gpus_wanted("2", "cuda", 8) == 2
    assert gpus_wanted("auto", "auto", 8) == 8
    assert gpus_wanted("4", "cpu", 8) == 0  # a CPU job takes no GPU
    assert gpus_wanted("2", "auto", 0) == 0  # no GPU here: CPU jobs
    assert gpus_wanted("16", "auto", 8) == 8  # too many: it gets all and says so when it starts


def test_share_descriptions():
    assert Share(("0", "1"), (0, 1, 2, 3, 6)).describe() == "GPU 0,1; 5 cores (0-3,6)"
    assert _ranges([5]) == "5" and _ranges([]) == ""


# -- a real parallel sweep ------------------------------------------------------------------------


def test_a_parallel_sweep_runs_its_jobs_at_once_each_on_its_own_gpu_and_core(tmp_path):
    """Three jobs, two GPU names dealt out (hydra.launcher.gpus: this machine has none, so the jobs
    train on the CPU, but each sees only its own CUDA_VISIBLE_DEVICES): at most two at once, never
    two on one GPU or core, one folder and one summary per job, one closing table."""
    proc = cli(["-m", "hydra/launcher=parallel", "hydra.launcher.gpus=[0,1]", "hydra.sweep.dir=sweep",
                "strategy=linear_probe,freeze_early,full", "debug=tiny", "model.weights=synthetic",
                "trainer.epochs=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = run_dirs(tmp_path / "sweep")
    assert len(runs) == 3
    summaries = {s["strategy"]: s for s in map(_summary, runs)}
    assert set(summaries) == {"linear_probe", "freeze_early", "full"}
    assert all(s["status"] == "completed" and s["epochs_run"] == 2 for s in summaries.values())
    places = {r.name[0]: _summary(r)["placement"] for r in runs}
    assert all(p["cuda_visible_devices"] in ("0", "1") and len(p["cores"]) == 1 for p in places.values())
    spans = _spans(proc.stdout)
    assert set(spans) == set(places) and all(None not in span for span in spans.values()), proc.stdout
    overlapping = [(a, b) for a in spans for b in spans if a < b
                   and spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]]
    assert overlapping, f"no two jobs ran at once: {spans}"
    for a, b in overlapping:  # jobs at once never share a GPU or a core
        assert places[a]["cuda_visible_devices"] != places[b]["cuda_visible_devices"]
        assert set(places[a]["cores"]).isdisjoint(places[b]["cores"])
    assert proc.stdout.count("Sweep: ") == 1 and "Traceback" not in proc.stderr
    assert "up to 2 at once" in proc.stdout


@pytest.mark.fault
def test_a_failed_parallel_job_stops_no_other_and_the_table_still_closes_the_sweep(tmp_path):
    """A job whose data holds a broken image fails mid-run; the other job completes, the closing
    table lists both, and the sweep exits non-zero with the failure named, no traceback."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    make_image_folder(good)
    make_image_folder(bad)
    (bad / "train" / "cat" / "0.png").write_bytes(b"not an image")
    proc = cli(["-m", "hydra/launcher=parallel", "hydra.sweep.dir=sweep", "debug=tiny", "data=imagefolder",
                f"data.root={bad},{good}", "data.check_images=false", "strategy=full"], tmp_path)
    assert proc.returncode == 1
    jobs = {r.name[0]: _summary(r) for r in run_dirs(tmp_path / "sweep")}  # job 0: bad, job 1: good
    assert jobs["1"]["status"] == "completed" and jobs["1"]["dataset"]["root"] == str(good)
    assert jobs["0"]["status"] == "failed" and "0.png" in jobs["0"]["error"]
    assert "#0 failed" in proc.stdout and "#1 finished" in proc.stdout
    assert proc.stdout.count("Sweep: ") == 1 and "completed" in proc.stdout and "failed" in proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.fault
def test_sigterm_to_a_parallel_sweep_stops_its_running_job_cleanly_and_starts_no_more(tmp_path):
    """The running job saves and records its interruption; the jobs not started never start; the
    sweep exits 143 with its table."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "finetune_cli", "-m", "hydra/launcher=parallel",
                             "hydra.launcher.jobs=1", "hydra.sweep.dir=sweep", "debug=tiny", "strategy=full",
                             "trainer.epochs=30", "trainer.seed=1,2,3"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "sweep").glob("0_*/checkpoints/last.pt")) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-3000:]
    (run,) = run_dirs(tmp_path / "sweep")  # job 0 alone started
    summary = _summary(run)
    assert summary["status"] == "interrupted" and (run / "checkpoints" / "last.pt").is_file()
    assert "no more jobs start" in out and "2 not started" in out
    assert out.count("Sweep: ") == 1 and "Traceback" not in out
