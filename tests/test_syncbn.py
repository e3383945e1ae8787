"""trainer.sync_bn: every BatchNorm becomes a SyncBatchNorm over the same parameters and buffers,
before the strategy freezes anything; frozen ones stay in eval and exchange nothing."""

import pytest
import torch
import torchvision
from torch import nn

from finetune_cli.config import BNMode
from finetune_cli.models.families import family_of
from finetune_cli.models.groups import layer_groups
from finetune_cli.train.freezing import apply_freezing, mask_for
from finetune_cli.train.syncbn import sync_batchnorms

from helpers import cli


def _resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    with torch.no_grad():  # statistics that are not the identity, so eval outputs depend on them
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def test_every_batchnorm_becomes_synchronised_over_the_same_tensors():
    model = _resnet()
    before = dict(model.state_dict(keep_vars=True))
    plain = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(2, 3, 32, 32)
    expected = model.eval()(x)
    assert sync_batchnorms(model) == plain == 20
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == plain
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)  # the optimizer's tensors
    assert torch.equal(model.eval()(x), expected)  # in eval, SyncBatchNorm is the same function
    fresh = torchvision.models.resnet18(num_classes=3)
    fresh.load_state_dict(model.state_dict())  # checkpoints load into the plain model (export, predict)
    assert torch.equal(fresh.eval()(x), expected)


def test_frozen_synchronised_batchnorms_stay_in_eval_and_unfrozen_ones_train():
    model = _resnet()
    sync_batchnorms(model)
    family = family_of("resnet18")
    groups = layer_groups(model, family)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in groups[0].modules)  # the stem's bn1, held directly
    for k in (1, len(groups) - 1):  # a probe's neighbour, then everything after an unfreeze
        apply_freezing(groups, mask_for(len(groups), k), BNMode.frozen_eval)
        model.train()
        for group, on in zip(groups, mask_for(len(groups), k)):
            bns = [s for m in group.modules for s in m.modules() if isinstance(s, nn.SyncBatchNorm)]
            assert all(bn.training == on for bn in bns), (group.name, on)
    # one process on CPU: nothing to share, and training steps run as with plain BatchNorm
    loss = model(torch.randn(4, 3, 32, 32)).sum()
    loss.backward()
    assert model.layer4[0].bn1.weight.grad is not None


@pytest.mark.bad_input
def test_sync_bn_with_processes_on_cpu_is_refused_before_any_folder(tmp_path):
    proc = cli(["debug=tiny", "trainer.devices=2", "trainer.device=cpu", "trainer.sync_bn=true"], tmp_path)
    assert proc.returncode == 1
    assert "trainer.sync_bn=true" in proc.stderr and "trainer.sync_bn=false" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "outputs").exists()


def test_sync_bn_with_one_process_trains_and_says_it_changes_nothing(finetune, caplog):
    summary, _ = finetune("debug=tiny", "trainer.epochs=1", "trainer.sync_bn=true")
    assert summary["status"] == "completed"
    assert "trainer.sync_bn=true changes nothing with one process" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpu_processes_with_sync_bn_train_like_one_with_the_whole_batch(tmp_path):
    """BatchNorm trains (strategy=full, its default bn): without sync_bn each process normalizes
    its own half-batch; with it, both see the statistics of the whole batch, as one process does."""
    import csv

    common = ["debug=tiny", "trainer.epochs=2", "augment=none", "strategy=full", "trainer.amp=off",
              "trainer.deterministic=true", "trainer.channels_last=false"]
    one = cli([*common, "data.batch_size=16", "hydra.run.dir=outputs/one"], tmp_path)
    two = cli([*common, "data.batch_size=8", "trainer.devices=2", "trainer.sync_bn=true", "hydra.run.dir=outputs/two"],
              tmp_path)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert "BatchNorm synchronised: 20 layers" in two.stdout
    rows = [list(csv.DictReader((tmp_path / "outputs" / d / "metrics.csv").open())) for d in ("one", "two")]
    for a, b in zip(*rows):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), abs=1e-3)
    a, b = (torch.load(tmp_path / "outputs" / d / "checkpoints" / "last.pt", weights_only=True)["model"]
            for d in ("one", "two"))
    stats = [k for k in a if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.allclose(a[k], b[k], atol=1e-3) for k in stats)
