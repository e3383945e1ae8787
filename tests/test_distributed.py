"""Data-parallel training on CPU (gloo): trainer.devices=2 starts two processes of one run.

With every BatchNorm in eval (strategy.bn=freeze_all) and no random augmentation, two processes
with batch B/2 each compute the same updates as one process with batch B, up to the order of
floating-point sums: their metrics agree to 1e-5.
"""

import csv
import json

import pytest
import torch

from helpers import cli, run_dirs

SAME_MATH = ["debug=tiny", "trainer.epochs=2", "strategy.bn=freeze_all", "augment=none"]


def _metrics(run):
    return list(csv.DictReader((run / "metrics.csv").open()))


def _close(a, b, keys=("train_loss", "train_acc", "val_loss", "val_acc"), tolerance=1e-5):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for k in keys:
            assert float(ra[k]) == pytest.approx(float(rb[k]), abs=tolerance), (k, ra["epoch"])


def _pair(tmp_path, *args):
    one = cli([*SAME_MATH, *args, "data.batch_size=16", "hydra.run.dir=outputs/one"], tmp_path)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    two = cli([*SAME_MATH, *args, "data.batch_size=8", "trainer.devices=2", "hydra.run.dir=outputs/two"], tmp_path)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    return tmp_path / "outputs" / "one", tmp_path / "outputs" / "two", two


def test_two_processes_train_like_one_with_twice_the_batch_in_one_folder(tmp_path):
    one, two, proc = _pair(tmp_path, "strategy=full", "strategy.lr_scale=0.1")  # weights to 1e-5 after 2 epochs at 1e-4
    _close(_metrics(one), _metrics(two))
    assert proc.stdout.count("Plan: ") == 1 and proc.stdout.count("epoch   2/2") == 1  # rank 0 alone prints
    assert "2 processes" in proc.stdout and "batch 8 per process, effective batch 16 per optimizer step" in proc.stdout
    assert run_dirs(tmp_path) == [one, two]  # one folder (and one .hydra/) per run
    summary = json.loads((two / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["processes"] == 2
    a = torch.load(one / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(two / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


@pytest.mark.slow  # 45 s; the default suite checks two processes on full fine-tuning above
def test_frozen_groups_stay_frozen_and_unfreezing_works_under_two_processes(tmp_path):
    """progressive unfreezes a group each epoch: the wrapper is made again for what trains."""
    one, two, _ = _pair(tmp_path, "strategy=progressive", "strategy.every=1", "trainer.epochs=3")
    _close(_metrics(one), _metrics(two))
    a = torch.load(one / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(two / "checkpoints" / "last.pt", weights_only=True)["model"]
    groups = [int(r["trainable_groups"]) for r in _metrics(two)]
    assert groups == [int(r["trainable_groups"]) for r in _metrics(one)] and groups == sorted(set(groups))
    frozen = [k for k in a if k.startswith(("conv1.", "bn1.", "layer1.", "layer2."))]  # below what unfroze
    assert frozen and all(torch.equal(a[k], b[k]) for k in frozen)  # never trained: the seeded init


@pytest.mark.slow  # 20 s; the feature cache's own tests and the two tests above cover its parts
def test_the_cached_probe_under_two_processes_matches_one(tmp_path):
    one, two, proc = _pair(tmp_path, "strategy=linear_probe")
    _close(_metrics(one), _metrics(two))
    assert (two / "features" / "train.pt").is_file() and "Feature cache: on" in proc.stdout


@pytest.mark.slow  # 100 s: three runs of two processes
def test_sigterm_stops_both_processes_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path):
    import signal
    import subprocess
    import sys

    common = ["debug=tiny", "data.synthetic.train_per_class=20", "trainer.epochs=4", "strategy=full", "trainer.devices=2"]
    assert cli([*common, "hydra.run.dir=outputs/straight"], tmp_path).returncode == 0
    job = [*common, "hydra.run.dir=outputs/job", "trainer.resume=auto"]
    proc = subprocess.Popen([sys.executable, "-m", "finetune_cli", *job], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "epoch   2/4" in line:
            break
    proc.send_signal(signal.SIGTERM)  # to the launching process, as a batch system does
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, rest[-2000:]
    assert rest.count("Resume with:") == 1 and "hydra.output_subdir" not in rest
    assert torch.load(tmp_path / "outputs/job/checkpoints/last.pt", weights_only=True)["epoch"] == 2
    again = cli(job, tmp_path)
    assert again.returncode == 0, again.stdout[-2000:]
    straight, resumed = _metrics(tmp_path / "outputs/straight"), _metrics(tmp_path / "outputs/job")
    for col in ("train_loss", "train_acc", "val_loss", "val_acc"):  # each process's random streams restored
        assert [r[col] for r in straight] == [r[col] for r in resumed], col


def test_a_resume_may_change_the_number_of_processes_only_with_the_global_batch_kept():
    from finetune_cli.train.checkpoint import changed_settings

    def run(devices, batch):
        return {"trainer": {"devices": devices}, "data": {"batch_size": batch}}

    assert changed_settings(run("2", 8), run("1", 16)) == []  # 16 in all, either way
    assert changed_settings(run("1", 16), run("4", 4)) == []
    (said,) = changed_settings(run("2", 8), run("1", 8))
    assert said.startswith("trainer.devices: 2 -> 1") and "global batch was 16, now 8" in said
    assert "data.batch_size=16" in said
    assert changed_settings(run("2", 8), run("2", 16)) == ["data.batch_size: 8 -> 16"]
    assert changed_settings(run("auto", 8), run("1", 8)) == ["trainer.devices: auto -> 1"]  # unknown: refused


@pytest.mark.slow  # 70 s: two processes stopped by SIGTERM, resumed as one
def test_a_two_process_run_resumed_as_one_process_trains_on_like_one_process(tmp_path):
    """The same global batch over another number of processes holds the same images in each step
    (the epoch's order is dealt out): with BatchNorm in eval and no random augmentation, two
    processes of batch 8 stopped in epoch 2 and resumed as one of batch 16 follow one process of
    batch 16. Not to 1e-5 over 4 epochs of 200 images: there the two straight runs themselves part
    by 1.8e-4 in loss from epoch 2 (sums in another order, grown by training), one image in 192 in
    accuracy. Another order of images would part them by far more."""
    import signal
    import subprocess
    import sys

    common = [*SAME_MATH, "strategy=full", "trainer.epochs=4", "data.synthetic.train_per_class=20"]
    assert cli([*common, "data.batch_size=16", "hydra.run.dir=outputs/straight"], tmp_path).returncode == 0
    job = [*common, "hydra.run.dir=outputs/job", "trainer.resume=auto"]
    proc = subprocess.Popen([sys.executable, "-m", "finetune_cli", *job, "data.batch_size=8", "trainer.devices=2"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "epoch   2/4" in line:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, rest[-2000:]
    refused = cli([*job, "data.batch_size=8"], tmp_path)  # one process of 8: another global batch
    assert refused.returncode == 1 and "data.batch_size=16" in refused.stderr
    again = cli([*job, "data.batch_size=16"], tmp_path)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    resumed = _metrics(tmp_path / "outputs/job")
    _close(_metrics(tmp_path / "outputs/straight"), resumed, keys=("train_loss", "val_loss"), tolerance=1e-3)
    _close(_metrics(tmp_path / "outputs/straight"), resumed, keys=("train_acc",), tolerance=2.5 / 192)  # 2 images
    _close(_metrics(tmp_path / "outputs/straight"), resumed, keys=("val_acc",), tolerance=2.5 / 40)
    assert json.loads((tmp_path / "outputs/job/summary.json").read_text())["processes"] == 1


@pytest.mark.parametrize("env, expected", [
    ({}, (0, 0, 1)),
    ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}, (3, 1, 4)),  # torchrun, elastic
    ({"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}, (1, 1, 2)),  # srun
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, (0, 0, 1)),  # the batch script itself, not an srun step
])
def test_each_process_finds_its_place_from_its_launcher(monkeypatch, env, expected):
    from finetune_cli import world

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_STEP_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    here = world.from_env()
    assert (here.rank, here.local_rank, here.size) == expected


def test_forwarded_arguments_keep_the_config_choice_and_parse_as_one_folder():
    """The processes once lost -cn/--config-dir, and a sweep job's folder name (with '=' and ',')
    did not parse as hydra.run.dir."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from finetune_cli.cli import _config_flags, _quoted

    assert _config_flags(["-cn", "mine", "--config-dir=/c", "x=1", "-m"]) == ["-cn", "mine", "--config-dir=/c"]
    for path in ["/runs/0_optimizer.lr=0.1,trainer.devices=2", "/runs/it's [odd]"]:
        parsed = OverridesParser.create().parse_overrides([f"hydra.run.dir={_quoted(path)}"])[0]
        assert parsed.value() == path


def test_each_process_draws_its_own_augmentations_and_the_cache_keeps_the_global_stream():
    from finetune_cli.data.folders import make_loader
    from finetune_cli.train.features import FeatureLoader, Features

    data = list(range(8))
    seeds = [make_loader(data, batch_size=4, num_workers=0, train=True, seed=1, rank=r, size=2).generator.initial_seed()
             for r in (0, 1)]
    assert seeds[0] == 1 and seeds[1] != seeds[0]  # loader workers are seeded from these
    loader = FeatureLoader(Features(torch.zeros(8, 1), torch.arange(8), 0.0, None), torch.device("cpu"), batch_size=4)
    torch.manual_seed(0)
    list(loader)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))  # reading cached features drew nothing from the model's stream


def test_the_launcher_reads_its_place_without_importing_torch(tmp_path):
    """Every command reads its place among processes before any check: torch (about 5 s) waits."""
    import subprocess
    import sys

    code = ("import sys\nfrom finetune_cli.cli import _shared_folder\n"
            "print(_shared_folder(['trainer.epochs=0']), 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path).stdout
    assert out.strip() == "['trainer.epochs=0'] False"


@pytest.mark.slow  # 70 s: a sweep of two jobs, each two processes
def test_a_sweep_of_multi_process_jobs_records_each_job_and_its_objective(tmp_path):
    proc = cli(["-m", "optimizer.lr=0.01,0.001", "trainer.devices=2", "debug=tiny", "model.weights=synthetic"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (sweep,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    summaries = [json.loads((r / "summary.json").read_text()) for r in run_dirs(sweep)]
    assert [s["status"] for s in summaries] == ["completed", "completed"] and all(s["processes"] == 2 for s in summaries)
    assert "Sweep:" in proc.stdout


def test_linear_lr_scaling_multiplies_by_the_number_of_processes():
    from conftest import compose_config

    from finetune_cli.build import base_lr
    from finetune_cli.checks import typed_config

    plain = typed_config(compose_config(["debug=tiny", "optimizer.lr=0.01", "strategy.lr_scale=0.5"])[0])
    linear = typed_config(compose_config(["debug=tiny", "optimizer.lr=0.01", "strategy.lr_scale=0.5",
                                          "optimizer.scale_lr=linear"])[0])
    assert base_lr(plain, 4) == pytest.approx(0.005) and base_lr(linear, 1) == pytest.approx(0.005)
    assert base_lr(linear, 4) == pytest.approx(0.02)


@pytest.mark.slow  # 35 s
def test_the_plan_and_the_lrs_of_a_linearly_scaled_two_process_run(tmp_path):
    proc = cli(["debug=tiny", "trainer.devices=2", "optimizer.scale_lr=linear", "hydra.run.dir=outputs/run"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "LRs x2 (optimizer.scale_lr=linear)" in proc.stdout
    assert proc.stdout.count("finetune-cli: overrides") == 1
    assert float(_metrics(tmp_path / "outputs" / "run")[0]["lr_head"]) == pytest.approx(2e-2)  # linear_probe: 1e-3 x 10, x2
