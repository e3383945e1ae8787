"""Peak memory per run: several jobs of a sweep share one process, each must get its own figure."""

import os

import pytest
import torch

from finetune_cli.train import memory
from finetune_cli.train.memory import peak_memory, reset_peak_memory

MB = 2**20


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _give_back_freed_memory() -> None:
    """glibc keeps freed heap pages unless asked (allocations made earlier in the process can
    pin the 300 MB below the heap's top)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _touch(mb: int) -> torch.Tensor:
    return torch.ones(mb * MB // 4)  # float32, every page written


@pytest.mark.skipif(not os.access(memory.CLEAR_REFS, os.W_OK), reason="/proc/self/clear_refs is not writable here")
def test_cpu_peak_starts_afresh_at_each_reset():
    cpu = torch.device("cpu")
    assert reset_peak_memory(cpu)
    big = _touch(300)
    first, kind = peak_memory(cpu)
    del big
    _give_back_freed_memory()
    if _rss_mb() > first - 250:  # what ran before in this process keeps the pages: nothing to tell apart
        pytest.skip(f"the freed 300 MB stayed in this process (RSS {_rss_mb():.0f} MB, peak {first:.0f} MB)")
    assert reset_peak_memory(cpu)
    second, kind_after = peak_memory(cpu)
    assert kind == kind_after == "peak RSS since the run started"
    assert first - second > 200, (first, second)  # the 300 MB of the first "job" are not counted again


def test_cpu_peak_without_a_reset_says_it_covers_the_whole_process(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    cpu = torch.device("cpu")
    assert reset_peak_memory(cpu) is False
    big = _touch(50)
    mb, kind = peak_memory(cpu)
    del big
    assert kind == "process peak RSS, includes earlier jobs in this process"
    assert mb >= 50


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_starts_afresh_at_each_reset():
    gpu = torch.device("cuda")
    reset_peak_memory(gpu)
    big = torch.ones(300 * MB // 4, device=gpu)
    first, kind = peak_memory(gpu)
    del big
    torch.cuda.empty_cache()
    reset_peak_memory(gpu)
    small = torch.ones(10 * MB // 4, device=gpu)
    second, _ = peak_memory(gpu)
    del small
    assert kind == "CUDA max allocated since the run started"
    assert first >= 300 and second < 100, (first, second)
