"""LR schedules keep per-group LR ratios; warmup starts low; state survives weights_only loads."""

import io

import pytest
import torch

from finetune_cli.config import Monitor, ScheduleConfig, ScheduleName
from finetune_cli.train.optim import Schedule


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
    if warmup and name != ScheduleName.onecycle:
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
