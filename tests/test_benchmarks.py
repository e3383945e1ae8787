"""The benchmark scripts run end to end at tiny sizes (--quick); they measure nothing here."""

import subprocess
import sys

import pytest

from helpers import REPO


@pytest.mark.slow
@pytest.mark.parametrize("script,expect", [
    ("bench_overhead.py", "overhead: tool / plain ="),
    ("bench_freezing.py", "linear_probe = "),
    ("bench_cache.py", "speed-up: "),
    ("bench_decode.py", "reduced decode img/s"),
    ("bench_gpu.py", "x plain"),
    ("bench_ddp.py", "2 processes / 1 process: "),
    ("bench_sweep.py", "serial / parallel: "),
    ("bench_ddp_unfreeze.py", "wrap once / rewrap: "),
    ("bench_recipes.py", "presets at or above the plain loop: "),
    ("bench_probe_ceiling.py", "linear probe ceiling (best val acc): "),
    ("bench_imbalance.py", "settings measured: "),
    ("bench_tracking.py", "mlflow per epoch: "),
])
def test_benchmark_runs(script, expect, tmp_path):
    args = [sys.executable, script, "--quick", "--workdir", str(tmp_path)]
    if script == "bench_gpu.py":
        args += ["--device", "cpu"]
    res = subprocess.run(args, cwd=REPO / "benchmarks", capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert expect in res.stdout
