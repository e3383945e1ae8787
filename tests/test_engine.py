"""The training step: auxiliary losses, mixed precision on CPU, non-finite loss, tracking."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune_cli.config import Monitor
from finetune_cli.errors import FinetuneError
from finetune_cli.models import WeightsChoice, create_model
from finetune_cli.train.callbacks import MetricTracker
from finetune_cli.train.engine import Precision, evaluate, train_one_epoch


def _loader(n=8, size=32, classes=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def test_auxiliary_heads_add_their_weighted_loss():
    torch.manual_seed(0)
    model = create_model("googlenet", WeightsChoice("none"), 3, image_size=64).model
    loader = _loader(n=4, size=64)
    ce = nn.CrossEntropyLoss()
    torch.manual_seed(1)  # same RNG use (loader iterator, dropout masks) in both passes
    model.train()
    x, y = next(iter(loader))
    logits, aux2, aux1 = model(x)
    expected = (ce(logits, y) + 0.3 * (ce(aux1, y) + ce(aux2, y))).item()
    torch.manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    got = train_one_epoch(model, loader, opt, ce, torch.device("cpu"), aux_weight=0.3).loss
    assert got == pytest.approx(expected, rel=1e-5)
    assert got > ce(logits, y).item() + 1e-3


def test_bf16_autocast_on_cpu_trains():
    model = create_model("resnet18", WeightsChoice("none"), 3, image_size=32).model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    res = train_one_epoch(model, _loader(), opt, nn.CrossEntropyLoss(), torch.device("cpu"),
                          precision=Precision(torch.bfloat16))
    assert res.images == 8 and res.loss > 0
    ev = evaluate(model, _loader(), nn.CrossEntropyLoss(), torch.device("cpu"), precision=Precision(torch.bfloat16))
    assert 0 <= ev.acc <= 1 and ev.images == 8


def test_non_finite_loss_stops_with_a_clear_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(FinetuneError, match="loss became nan at step 0"):
        train_one_epoch(model, _loader(), opt, nn.CrossEntropyLoss(), torch.device("cpu"), desc="epoch 1/1")


def test_metric_tracker_best_and_patience():
    t = MetricTracker(Monitor.val_acc, patience=2, min_delta=0.01)
    assert t.update(0.5, 1) and not t.update(0.505, 2) and t.update(0.6, 3)
    assert not t.update(0.6, 4) and not t.should_stop and not t.update(0.59, 5) and t.should_stop
    assert (t.best, t.best_epoch) == (0.6, 3)
    loss = MetricTracker(Monitor.val_loss)
    assert loss.update(1.0, 1) and loss.update(0.9, 2) and not loss.update(0.95, 3)


def test_non_finite_loss_checked_every_n_steps_names_the_window():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(FinetuneError, match="nan or inf in the 50 steps up to step 1 of epoch 1/1"):
        train_one_epoch(model, _loader(), opt, nn.CrossEntropyLoss(), torch.device("cpu"), desc="epoch 1/1",
                        check_every=50)


def test_channels_last_inputs_and_weights_train_on_cpu():
    torch.manual_seed(0)
    model = create_model("resnet18", WeightsChoice("none"), 3, image_size=32).model
    reference = create_model("resnet18", WeightsChoice("none"), 3, image_size=32).model
    reference.load_state_dict(model.state_dict())
    model.to(memory_format=torch.channels_last)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    model.conv1.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    losses = []
    for net in (model, reference):
        torch.manual_seed(1)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        losses.append(train_one_epoch(net, _loader(), opt, nn.CrossEntropyLoss(), torch.device("cpu"),
                                      channels_last=net is model).loss)
    assert seen and all(seen)
    # the same computation in another layout (kernels sum in another order: tiny float differences)
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    for (n, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-2), n
