"""Memory accounting and the speed switches (channels_last, AMP, torch.compile) through the CLI."""

import json

import pytest
import torch

from helpers import cli

RUN = ["data=synthetic", "data.synthetic.classes=3", "data.synthetic.train_per_class=8",
       "data.synthetic.val_per_class=4", "model.weights=null", "trainer.epochs=1", "data.num_workers=0"]


def _summary(tmp_path, name, *extra):
    out = tmp_path / name
    res = cli([*RUN, f"hydra.run.dir={out}", *extra], cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads((out / "summary.json").read_text()), res.stdout + res.stderr


def test_summary_records_gradient_and_optimizer_memory(tmp_path):
    probe, _ = _summary(tmp_path, "probe", "strategy=linear_probe")
    full, _ = _summary(tmp_path, "full", "strategy=full")
    for s in (probe, full):
        assert s["peak_memory_mb"] > 0 and s["memory_mb"]["params"] > 40  # resnet18: 11.2M fp32 parameters
    # AdamW: one gradient and two moments per trainable parameter, nothing for frozen ones
    head_mb = 4 * (512 * 3 + 3) / 2**20
    assert probe["memory_mb"]["grads"] == pytest.approx(head_mb)
    assert probe["memory_mb"]["optimizer_state"] == pytest.approx(2 * head_mb, rel=0.01)  # + step counters
    assert full["memory_mb"]["grads"] == pytest.approx(full["memory_mb"]["params"])
    assert full["grad_optimizer_mb"] > 1000 * probe["grad_optimizer_mb"]


def test_channels_last_and_bf16_run_on_cpu(tmp_path):
    s, log = _summary(tmp_path, "cl", "strategy=full", "trainer.channels_last=true", "trainer.amp=bf16")
    assert s["status"] == "completed" and s["precision"] == "bf16" and s["channels_last"]
    assert "channels_last" in log
    s, _ = _summary(tmp_path, "default", "strategy=full")
    assert s["precision"] == "fp32" and not s["channels_last"]  # CPU defaults


@pytest.mark.slow
def test_compiled_model_trains_and_saves_plain_weights(tmp_path):
    s, _ = _summary(tmp_path, "compiled", "strategy=progressive", "trainer.epochs=2", "trainer.compile=true")
    assert s["status"] == "completed" and s["compiled"]
    state = torch.load(tmp_path / "compiled" / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert not any(k.startswith("_orig_mod") for k in state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_defaults(tmp_path):
    s, _ = _summary(tmp_path, "gpu", "strategy=full", "trainer.device=cuda")
    assert s["device"] == "cuda" and s["channels_last"] and s["precision"] in ("bf16", "fp16")
