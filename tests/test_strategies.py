"""The strategy controller: static masks, progressive and staged timelines, auto decisions;
layer-wise LRs and the LR gate under every schedule."""

import pytest
import torch
from torch import nn

from finetune_cli.config import Monitor, ScheduleConfig, ScheduleName, StageConfig, StrategyConfig, StrategyName, Trigger
from finetune_cli.errors import FinetuneError
from finetune_cli.train.optim import Schedule, layerwise_lrs
from finetune_cli.train.strategies import Controller

NAMES = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]


def ctl(epochs=10, ipc=None, **kw):
    return Controller(StrategyConfig(**kw), NAMES, epochs=epochs, images_per_class=ipc)


def test_static_strategies():
    assert ctl(name=StrategyName.linear_probe).mask() == [False] * 5 + [True]
    assert ctl(name=StrategyName.full).mask() == [True] * 6
    assert ctl(name=StrategyName.freeze_early, freeze_groups=2).mask() == [False, False, True, True, True, True]
    assert ctl(name=StrategyName.partial, train_groups=2).mask() == [False, False, False, True, True, True]
    assert ctl(name=StrategyName.partial, train_groups=0).mask() == ctl(name=StrategyName.linear_probe).mask()
    with pytest.raises(FinetuneError, match="strategy.train_groups=6 is out of range.*layer4"):
        ctl(name=StrategyName.partial, train_groups=6)


def test_progressive_by_epochs_unfreezes_top_down_until_the_limit():
    c = ctl(name=StrategyName.progressive, every=2, until=3)
    masks, events = [], []
    for epoch in range(1, 11):
        events.append(c.begin_epoch(epoch))
        masks.append(sum(c.mask()) - 1)
    assert masks == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
    assert events[2] == ["unfroze layer4 (1/5 groups below the head train)"]
    assert events[6] == ["unfroze layer2 (3/5 groups below the head train)"] and events[8] == []
    assert c.timeline() == ["epoch 1: head only", "epoch 3: +layer4", "epoch 5: +layer3", "epoch 7: +layer2"]
    assert [c.unfreeze_epoch(i) for i in range(6)] == [None, None, 7, 5, 3, None]
    # the phase is a function of the epoch: a fresh controller lands in the same phase
    fresh = ctl(name=StrategyName.progressive, every=2, until=3)
    fresh.begin_epoch(6)
    assert fresh.mask() == masks_at(6, every=2, until=3)


def masks_at(epoch, every, until):
    c = ctl(name=StrategyName.progressive, every=every, until=until)
    for e in range(1, epoch + 1):
        c.begin_epoch(e)
    return c.mask()


def test_progressive_on_plateau():
    c = ctl(name=StrategyName.progressive, trigger=Trigger.plateau, plateau_patience=2)
    model = nn.Linear(1, 1)
    assert c.begin_epoch(1) == [] and sum(c.mask()) == 1
    assert c.end_epoch(1, 0.5, model) == []
    assert c.end_epoch(2, 0.5, model) == []
    assert c.end_epoch(3, 0.4, model) == ["unfroze layer4 (1/5 groups below the head train)"]
    assert c.begin_epoch(4) == [] and sum(c.mask()) == 2  # the epoch count does not unfreeze
    state = c.state_dict()
    again = ctl(name=StrategyName.progressive, trigger=Trigger.plateau, plateau_patience=2)
    again.load_state_dict(state)
    assert again.mask() == c.mask() and again.bad == c.bad == 0


def test_staged_switches_stages_and_restores_the_stage_best():
    stages = [StageConfig(epochs=3, train_groups=1, lr_mult=1.0, patience=1), StageConfig(epochs=2, train_groups=-1, lr_mult=0.1)]
    c = ctl(name=StrategyName.staged, stages=stages, epochs=99)
    assert c.epochs == 5  # the stages set the length of the run
    assert c.mask() == [False] * 4 + [True, True] and c.lr_mult == 1.0
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    c.end_epoch(1, 0.7, model)  # best of stage 1
    with torch.no_grad():
        model.weight.fill_(2.0)
    events = c.end_epoch(2, 0.6, model)  # worse: patience 1 ends stage 1 early
    assert events[0].startswith("stage 1 stopped early")
    assert "restored the best weights of stage 1" in events[1]
    assert events[2] == "stage 2/2: all groups, lr x0.1"
    assert torch.all(model.weight == 1.0)  # weights of epoch 1 are back
    assert c.mask() == [True] * 6 and c.lr_mult == 0.1
    with pytest.raises(FinetuneError, match="needs strategy.stages"):
        ctl(name=StrategyName.staged)


@pytest.mark.parametrize(
    "ipc, chose, k, decay",
    [(20, "linear_probe", 0, 1.0), (300, "freeze_early", 3, 1.0), (5000, "full", 5, 2.6)],
)
def test_auto_chooses_by_images_per_class(ipc, chose, k, decay):
    c = ctl(name=StrategyName.auto, ipc=ipc)
    assert c.decision["chose"] == chose and c.decision["images_per_class"] == ipc
    assert f"{float(ipc):.1f} training images per class" in c.decision["reason"]
    assert sum(c.mask()) - 1 == k and c.lr_decay == decay


def test_layerwise_lrs():
    lrs = layerwise_lrs(1.0, 4, 2.0)
    assert lrs == [0.125, 0.25, 0.5, 1.0]
    assert layerwise_lrs(0.1, 3) == [0.1, 0.1, 0.1]
    assert layerwise_lrs(0.1, 3, 10.0, [1e-4, 1e-3, 1e-2]) == [1e-4, 1e-3, 1e-2]
    with pytest.raises(FinetuneError, match="has 2 values, but this model has 3 layer groups"):
        layerwise_lrs(0.1, 3, 1.0, [0.1, 0.2])


def _opt(lrs):
    params = [nn.Parameter(torch.zeros(1)) for _ in lrs]
    return torch.optim.SGD([{"params": [p], "lr": lr, "group": str(i)} for i, (p, lr) in enumerate(zip(params, lrs))])


@pytest.mark.parametrize("name", list(ScheduleName))
def test_gate_scales_every_group_and_leaves_the_schedule_untouched(name):
    lrs = layerwise_lrs(0.1, 3, 2.6)
    cfg = ScheduleConfig(name=name, warmup_epochs=1.0, step_epochs=1, plateau_patience=0)
    plain_opt, gated_opt = _opt(lrs), _opt(lrs)
    plain = Schedule(cfg, plain_opt, epochs=4, steps_per_epoch=3, monitor=Monitor.val_acc)
    gated = Schedule(cfg, gated_opt, epochs=4, steps_per_epoch=3, monitor=Monitor.val_acc)
    for epoch in range(4):
        gated.set_multiplier(0.5 if epoch % 2 else 0.25)
        for _ in range(3):
            plain_opt.step()
            gated_opt.step()
            plain.step_batch()
            gated.step_batch()
            for p, g in zip(plain_opt.param_groups, gated_opt.param_groups):
                assert g["lr"] == pytest.approx(p["lr"] * gated.factor, rel=1e-9)
            head = gated_opt.param_groups[-1]["lr"]
            ratios = [g["lr"] / head for g in gated_opt.param_groups] if head > 0 else [1 / 2.6**2, 1 / 2.6, 1.0]
            assert ratios == pytest.approx([1 / 2.6**2, 1 / 2.6, 1.0])  # layer-wise ratios survive
        plain.step_epoch(0.5)
        gated.step_epoch(0.5)


def test_rewarmup_ramps_back_to_the_schedule():
    opt = _opt([0.1])
    sched = Schedule(ScheduleConfig(name=ScheduleName.constant, warmup_start_factor=0.1), opt,
                     epochs=2, steps_per_epoch=4, monitor=Monitor.val_acc)
    sched.rewarmup(4)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step_batch()
    assert seen == pytest.approx([0.01, 0.0325, 0.055, 0.0775, 0.1])
