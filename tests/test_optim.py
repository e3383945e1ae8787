"""LR schedules keep per-group LR ratios; warmup starts low; state survives weights_only loads."""

import io

import pytest
import torch

from finetune_cli.config import Monitor, ScheduleConfig, ScheduleName
from finetune_cli.errors import FinetuneError
from finetune_cli.models.groups import LayerGroup
from finetune_cli.train.optim import Schedule, param_groups


def _optimizer():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.SGD(
        [{"params": [a], "lr": 0.1, "group": "head"}, {"params": [b], "lr": 0.01, "group": "stem"}],
        lr=0.1, momentum=0.9,
    )


@pytest.mark.parametrize("name", list(ScheduleName))
@pytest.mark.parametrize("warmup", [0.0, 1.0])
def test_schedules_keep_group_ratios(name, warmup):
    opt = _optimizer()
    sched = Schedule(ScheduleConfig(name=name, warmup_epochs=warmup, step_epochs=1, plateau_patience=1), opt,
                     epochs=4, steps_per_epoch=5, monitor=Monitor.val_acc)
    seen = []
    for epoch in range(4):
        for _ in range(5):
            opt.step()
            sched.step_batch()
            head, stem = (g["lr"] for g in opt.param_groups)
            assert head == pytest.approx(10 * stem, rel=1e-6)
            seen.append(head)
        sched.step_epoch(0.5)  # a flat metric: plateau reduces after its patience
    if name != ScheduleName.constant:
        assert min(seen) < 0.1 * 0.999  # the schedule moved the LR
    if warmup and name not in (ScheduleName.onecycle, ScheduleName.stlr):  # these rise on their own
        assert seen[0] < 0.05  # first steps are warming up
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # checkpoints stay loadable without pickled code
    fresh = Schedule(ScheduleConfig(name=name, warmup_epochs=warmup, step_epochs=1), _optimizer(),
                     epochs=4, steps_per_epoch=5, monitor=Monitor.val_acc)
    fresh.load_state_dict(state)


def test_cosine_ends_at_floor():
    opt = _optimizer()
    sched = Schedule(ScheduleConfig(name=ScheduleName.cosine, min_lr_ratio=0.1), opt,
                     epochs=2, steps_per_epoch=10, monitor=Monitor.val_acc)
    for _ in range(20):
        opt.step()
        sched.step_batch()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.001)


def test_plateau_keeps_ratios_of_tiny_lrs_over_many_reductions():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a], "lr": 1e-3, "group": "head"}, {"params": [b], "lr": 1e-9, "group": "stem"}],
                          lr=1e-3)
    sched = Schedule(ScheduleConfig(name=ScheduleName.plateau, gamma=0.1, plateau_patience=0), opt,
                     epochs=10, steps_per_epoch=1, monitor=Monitor.val_acc)
    for epoch in range(6):
        opt.step()
        sched.step_batch()
        sched.step_epoch(0.5)  # no improvement after the first epoch: one reduction per epoch
    head, stem = (g["lr"] for g in opt.param_groups)
    assert head == pytest.approx(1e-3 * 0.1**5, rel=1e-9)  # five reductions
    assert stem == pytest.approx(1e-9 * 0.1**5, rel=1e-9)  # the tiny LR was reduced each time too
    assert head / stem == pytest.approx(1e6, rel=1e-9)


def _stlr(total=100, **kw):
    opt = _optimizer()
    sched = Schedule(ScheduleConfig(name=ScheduleName.stlr, **kw), opt, epochs=total // 10, steps_per_epoch=10,
                     monitor=Monitor.val_acc)
    return opt, sched


def test_stlr_shape_and_group_ratios():
    opt, sched = _stlr(100, cut_frac=0.1, ratio=32.0, warmup_epochs=2.0)  # warmup is ignored: stlr rises itself
    factors = [opt.param_groups[0]["lr"] / 0.1]
    for _ in range(100):
        opt.step()
        sched.step_batch()
        head, stem = (g["lr"] for g in opt.param_groups)
        assert head == pytest.approx(10 * stem, rel=1e-9)
        factors.append(head / 0.1)
    assert factors[0] == pytest.approx(1 / 32)
    assert factors[5] == pytest.approx((1 + 0.5 * 31) / 32)  # halfway up the rise
    assert factors[10] == pytest.approx(1.0)  # the peak, at step cut = floor(100 * 0.1)
    assert max(factors) == factors[10]
    assert factors[55] == pytest.approx((1 + 0.5 * 31) / 32)  # halfway down
    assert factors[100] == pytest.approx(1 / 32)
    assert all(x < y for x, y in zip(factors[:10], factors[1:11]))
    assert all(x > y for x, y in zip(factors[10:100], factors[11:]))


def test_stlr_gate_applies_on_top():
    opt, sched = _stlr(100)
    sched.set_multiplier(0.5)
    for _ in range(10):
        opt.step()
        sched.step_batch()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)  # peak x stage multiplier
    assert opt.param_groups[1]["lr"] == pytest.approx(0.005)


@pytest.mark.parametrize("kw", [{"cut_frac": 0.0}, {"cut_frac": 1.0}, {"cut_frac": -0.2}, {"ratio": 0.5}])
def test_stlr_rejects_bad_settings(kw):
    with pytest.raises(FinetuneError, match="schedule.cut_frac"):
        _stlr(100, **kw)


def _groups():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    return model, [LayerGroup("body", ["0"], list(model[0].named_parameters(prefix="0"))),
                   LayerGroup("head", ["1"], list(model[1].named_parameters(prefix="1")))]


def _decay_of(opt_groups):
    return {id(p): g["weight_decay"] for g in opt_groups for p in g["params"]}


@pytest.mark.parametrize("by", ["params", "names"])
def test_anchored_parameters_take_no_weight_decay(by):
    model, groups = _groups()
    anchored = [model[0].weight, model[0].bias] if by == "params" else ["0.weight", "0.bias"]
    out = param_groups(groups, [0.01, 0.1], 0.05, anchored=anchored)
    decay = _decay_of(out)
    assert decay[id(model[0].weight)] == 0.0  # the penalty replaces decay for the anchored backbone
    assert decay[id(model[1].weight)] == 0.05  # the new head keeps its decay
    assert decay[id(model[1].bias)] == 0.0  # biases never decay
    assert sorted(id(p) for g in out for p in g["params"]) == sorted(id(p) for p in model.parameters())
    assert {g["group"]: g["lr"] for g in out} == {"body": 0.01, "head": 0.1}
    # the optimizer really leaves an anchored weight alone when its gradient is zero
    opt = torch.optim.AdamW(out, lr=0.1)
    before = model[0].weight.detach().clone(), model[1].weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(model[0].weight, before[0])
    assert not torch.equal(model[1].weight, before[1])


def test_without_anchors_every_weight_decays():
    model, groups = _groups()
    decay = _decay_of(param_groups(groups, [0.01, 0.1], 0.05))
    assert decay[id(model[0].weight)] == 0.05 and decay[id(model[1].weight)] == 0.05
