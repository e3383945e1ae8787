"""What a newcomer meets first: a plan that never trains or downloads, and a result that says
what trained."""

import torch
import torchvision

from finetune_cli import build as build_module
from finetune_cli.ui import share, trainable_text


def _refuse(what):
    def fail(*args, **kw):
        raise AssertionError(f"a plan must not {what}")
    return fail


def test_plan_with_synthetic_weights_never_pretrains(finetune, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "empty-cache"
    monkeypatch.setenv("FINETUNE_CLI_CACHE", str(cache))
    monkeypatch.setattr(build_module, "synthetic_weights", _refuse("pretrain"))
    summary, run = finetune("debug=tiny", "model.weights=synthetic", "plan=true")
    assert summary["status"] == "planned"
    assert "synthetic, not pretrained yet: a run pretrains them first, about" in summary["weights"]
    assert not list(cache.rglob("synthetic-*.pt"))  # nothing pretrained, nothing cached
    assert "Pretraining" not in caplog.text


def test_plan_with_missing_torchvision_weights_never_downloads(finetune, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _refuse("download"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _refuse("download"))
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", _refuse("download"))
    summary, _ = finetune("debug=tiny", "model.weights=DEFAULT", "plan=true")
    assert "ResNet18_Weights.IMAGENET1K_V1, not downloaded yet: a run downloads them first (45 MB)" in summary["weights"]


def test_plan_says_val_fraction_is_unused_with_a_val_folder(finetune, caplog):
    finetune("debug=tiny", "data.val_fraction=0.1", "plan=true")
    assert "data.val_fraction is not used: the val/ folder is the validation set" in caplog.text


def test_result_box_gives_the_trainable_count_at_the_end_and_its_range():
    summary = {"total_params": 1000, "trainable_params": 10, "trainable_params_final": 1000}
    assert trainable_text(summary) == "1,000 / 1,000 (100.0%) at the end; 1.0% -> 100.0% during the run"
    assert trainable_text({**summary, "trainable_params_final": 10}) == "10 / 1,000 (1.0%) at the end"


def test_a_small_trainable_share_is_not_shown_as_zero():
    """A linear probe of resnet18 trains 5,130 of 11,181,642 parameters: 0.046%, not "0.0%"."""
    summary = {"total_params": 11_181_642, "trainable_params": 5_130}
    assert trainable_text(summary) == "5,130 / 11,181,642 (0.046%) at the end"
    assert share(0, 10) == "0.0%" and share(5, 10) == "50.0%" and share(1, 100) == "1.0%"
