"""The strategy controller: static masks, progressive and staged timelines, auto decisions;
layer-wise LRs and the LR gate under every schedule."""

import pytest
import torch
from torch import nn

from finetune_cli.config import (
    BNMode,
    Monitor,
    ScheduleConfig,
    ScheduleName,
    StageConfig,
    StrategyConfig,
    StrategyName,
    Trigger,
)
from finetune_cli.errors import FinetuneError
from finetune_cli.models.groups import LayerGroup
from finetune_cli.plan import timeline, unfreeze_epoch
from finetune_cli.train.optim import Schedule, layerwise_lrs
from finetune_cli.train.recipe import resolve
from finetune_cli.train.strategies import (
    Controller,
    Finished,
    KeepStageBest,
    RestoreStageBest,
    StageStarted,
    StageStopped,
    Unfroze,
    words,
)

NAMES = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]


def fake_groups():
    groups = []
    for name in NAMES:
        module = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        groups.append(LayerGroup(name, [name], list(module.named_parameters(prefix=name)), [module]))
    return groups


def ctl(epochs=10, ipc=None, groups=None, **kw):
    recipe = resolve(StrategyConfig(**kw), NAMES, epochs=epochs, images_per_class=ipc)
    return Controller(recipe, groups or fake_groups(), BNMode.frozen_eval, Monitor.val_acc)


def trainable(groups):
    return [all(p.requires_grad for _, p in g.params) for g in groups]


def test_static_strategies():
    assert ctl(name=StrategyName.linear_probe).mask() == [False] * 5 + [True]
    assert ctl(name=StrategyName.full).mask() == [True] * 6
    assert ctl(name=StrategyName.freeze_early, freeze_groups=2).mask() == [False, False, True, True, True, True]
    assert ctl(name=StrategyName.partial, train_groups=2).mask() == [False, False, False, True, True, True]
    assert ctl(name=StrategyName.partial, train_groups=0).mask() == ctl(name=StrategyName.linear_probe).mask()
    with pytest.raises(FinetuneError, match="strategy.train_groups=6 is out of range.*layer4"):
        ctl(name=StrategyName.partial, train_groups=6)


def test_controller_applies_its_own_mask():
    groups = fake_groups()
    c = ctl(groups=groups, name=StrategyName.progressive, every=1)
    c.apply()
    assert trainable(groups) == [False] * 5 + [True]
    c.begin_epoch(2)
    assert trainable(groups) == [False] * 4 + [True, True]  # no separate apply needed


def test_progressive_by_epochs_unfreezes_top_down_until_the_limit():
    c = ctl(name=StrategyName.progressive, every=2, until=3)
    masks, events = [], []
    for epoch in range(1, 11):
        events.append(c.begin_epoch(epoch))
        masks.append(sum(c.mask()) - 1)
    assert masks == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
    assert events[2] == [Unfroze("layer4", 1, 5)]
    assert words(events[2]) == ["unfroze layer4 (1/5 groups below the head train)"]
    assert words(events[6]) == ["unfroze layer2 (3/5 groups below the head train)"] and events[8] == []
    assert timeline(c.recipe) == ["epoch 1: head only", "epoch 3: +layer4", "epoch 5: +layer3", "epoch 7: +layer2"]
    assert [unfreeze_epoch(c.recipe, i) for i in range(6)] == [None, None, 7, 5, 3, None]
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
    assert c.begin_epoch(1) == [] and sum(c.mask()) == 1
    assert c.end_epoch(1, 0.5) == []
    assert c.end_epoch(2, 0.5) == []
    assert words(c.end_epoch(3, 0.4)) == ["unfroze layer4 (1/5 groups below the head train)"]
    assert c.begin_epoch(4) == [] and sum(c.mask()) == 2  # the epoch count does not unfreeze
    state = c.state_dict()
    again = ctl(name=StrategyName.progressive, trigger=Trigger.plateau, plateau_patience=2)
    again.load_state_dict(state)
    assert again.mask() == c.mask() and again.tracker.bad_epochs == c.tracker.bad_epochs == 0
    assert again.tracker.best == c.tracker.best == 0.5


def test_staged_switches_stages_and_asks_for_the_stage_best():
    stages = [StageConfig(epochs=3, train_groups=1, lr_mult=1.0, patience=1), StageConfig(epochs=2, train_groups=-1, lr_mult=0.1)]
    c = ctl(name=StrategyName.staged, stages=stages, epochs=99)
    assert c.epochs == 5  # the stages set the length of the run
    assert c.mask() == [False] * 4 + [True, True] and c.lr_mult == 1.0
    assert c.end_epoch(1, 0.7) == [KeepStageBest()]  # best of stage 1: keep its checkpoint
    events = c.end_epoch(2, 0.6)  # worse: patience 1 ends stage 1 early
    assert events == [StageStopped(1, 1), RestoreStageBest(1, 0.7, 1, "val_acc"), StageStarted(2, 2, "all groups", 0.1)]
    assert words(events)[1] == "restored the best weights of stage 1 (val_acc 70.0%, epoch 1)"
    assert words(events)[2] == "stage 2/2: all groups, lr x0.1"
    assert c.mask() == [True] * 6 and c.lr_mult == 0.1
    assert c.stage_best_epoch is None and c.tracker.best_epoch == -1  # the new stage starts afresh
    with pytest.raises(FinetuneError, match="needs strategy.stages"):
        ctl(name=StrategyName.staged)


def test_last_stage_with_patience_finishes_the_run():
    stages = [StageConfig(epochs=1, train_groups=0), StageConfig(epochs=5, train_groups=-1, patience=1)]
    c = ctl(name=StrategyName.staged, stages=stages)
    assert isinstance(c.end_epoch(1, 0.5)[-1], StageStarted)
    assert c.end_epoch(2, 0.6) == [KeepStageBest()]
    assert c.end_epoch(3, 0.6) == [Finished(1)] and c.finished


@pytest.mark.parametrize(
    "ipc, small, chose, k, decay",
    [(5, None, "freeze_early", 3, 1.0), (49, None, "freeze_early", 3, 1.0), (50, None, "full", 5, 1.5),
     (5000, None, "full", 5, 1.5), (5, 10, "linear_probe", 0, 1.0)],
)
def test_auto_chooses_by_images_per_class(ipc, small, chose, k, decay):
    # the defaults (None): the linear probe is never chosen (auto_small=0), as it lost at every size
    # measured; below auto_large=50 the early half stays frozen
    c = ctl(name=StrategyName.auto, ipc=ipc, **({} if small is None else {"auto_small": small}))
    decision = c.recipe.decision
    assert decision["chose"] == chose and decision["images_per_class"] == ipc
    assert f"{float(ipc):.1f} training images per class" in decision["reason"]
    assert sum(c.mask()) - 1 == k and c.recipe.lr_decay == decay


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


def test_bitfit_and_norm_say_what_trains_below_the_head_and_are_never_head_only():
    names = ["stem", "layer1", "head"]
    for name, said in ((StrategyName.bitfit, "head + every bias"), (StrategyName.norm, "head + norm layers")):
        recipe = resolve(StrategyConfig(name=name), names, epochs=1)
        assert recipe.describe_k(recipe.k) == said and not recipe.head_only
    assert resolve(StrategyConfig(name=StrategyName.linear_probe), names, epochs=1).head_only
