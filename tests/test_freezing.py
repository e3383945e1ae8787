"""Freezing strategies, BatchNorm policy and optimizer parameter groups on a real model."""

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from finetune_cli.config import BNMode, OptimizerConfig, OptimizerName, StrategyName
from finetune_cli.errors import FinetuneError
from finetune_cli.models import WeightsChoice, create_model
from finetune_cli.train.freezing import apply_freezing
from finetune_cli.train.optim import build_optimizer, param_groups
from finetune_cli.train.strategies import trainable_mask


def _setup(strategy, bn=BNMode.frozen_eval, freeze_groups=3, opt=OptimizerName.sgd):
    torch.manual_seed(0)
    built = create_model("resnet18", WeightsChoice("none"), num_classes=3, image_size=32)
    names = [g.name for g in built.groups]
    mask = trainable_mask(strategy, names, freeze_groups)
    apply_freezing(built.groups, mask, bn)
    cfg = OptimizerConfig(name=opt, lr=0.1, weight_decay=0.1)
    optimizer = build_optimizer(cfg, param_groups(built.groups, [0.1] * len(names), cfg.weight_decay))
    return built, mask, optimizer


def _bn_stats(modules):
    return [
        (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for mod in modules
        for m in mod.modules()
        if isinstance(m, _BatchNorm)
    ]


def _step(built, optimizer, steps=2):
    model = built.model
    model.train()
    for _ in range(steps):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_masks():
    names = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert trainable_mask(StrategyName.linear_probe, names, 0) == [False] * 5 + [True]
    assert trainable_mask(StrategyName.full, names, 0) == [True] * 6
    assert trainable_mask(StrategyName.freeze_early, names, 2) == [False, False, True, True, True, True]
    with pytest.raises(FinetuneError, match="out of range.*layer4"):
        trainable_mask(StrategyName.freeze_early, names, 6)


@pytest.mark.parametrize("strategy", [StrategyName.linear_probe, StrategyName.freeze_early])
def test_frozen_groups_get_no_grad_no_update_and_keep_bn_stats(strategy):
    built, mask, optimizer = _setup(strategy)
    frozen = [g for g, on in zip(built.groups, mask) if not on]
    trained = [g for g, on in zip(built.groups, mask) if on]
    before = {n: p.detach().clone() for g in frozen for n, p in g.params}
    stats_before = _bn_stats(m for g in frozen for m in g.modules)
    trained_stats_before = _bn_stats(m for g in trained for m in g.modules)

    _step(built, optimizer)

    for g in frozen:
        for n, p in g.params:
            assert not p.requires_grad and p.grad is None, n
            assert torch.equal(p, before[n]), f"{n} changed although frozen"
    for a, b in zip(stats_before, _bn_stats(m for g in frozen for m in g.modules)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))  # bit-identical running statistics
    # trainable groups did learn (weights and, where present, BN statistics)
    assert all(p.grad is not None for g in trained for _, p in g.params)
    if trained_stats_before:
        after = _bn_stats(m for g in trained for m in g.modules)
        assert any(not torch.equal(a[0], b[0]) for a, b in zip(trained_stats_before, after))
    # no optimizer state (momentum) was created for frozen parameters
    frozen_ids = {id(p) for g in frozen for _, p in g.params}
    assert not any(id(p) in frozen_ids for p in optimizer.state)


def test_frozen_bn_stays_in_eval_through_model_train():
    built, mask, _ = _setup(StrategyName.linear_probe)
    built.model.train()
    built.model.train(True)
    for g, on in zip(built.groups, mask):
        bns = [m for mod in g.modules for m in mod.modules() if isinstance(m, _BatchNorm)]
        assert all(bn.training == on for bn in bns), g.name


def test_bn_modes():
    built, _, optimizer = _setup(StrategyName.full, bn=BNMode.freeze_all)
    built.model.train()
    bns = [m for m in built.model.modules() if isinstance(m, _BatchNorm)]
    assert bns and not any(bn.training for bn in bns)
    stats = _bn_stats([built.model])
    _step(built, optimizer)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(stats, _bn_stats([built.model])))

    built, _, _ = _setup(StrategyName.linear_probe, bn=BNMode.train)
    built.model.train()
    assert all(m.training for m in built.model.modules() if isinstance(m, _BatchNorm))


def test_param_groups_no_decay_on_norm_and_bias_and_every_group_present():
    built, _, optimizer = _setup(StrategyName.linear_probe, opt=OptimizerName.adamw)
    names = {g["group"] for g in optimizer.param_groups}
    assert names == {g.name for g in built.groups}  # frozen groups are there too, gated
    by_id = {id(p): n for g in built.groups for n, p in g.params}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = by_id[id(p)]
            is_norm_or_bias = p.ndim <= 1
            assert (group["weight_decay"] == 0.0) == is_norm_or_bias, name
    counted = sum(len(g["params"]) for g in optimizer.param_groups)
    assert counted == len(list(built.model.parameters()))


def test_no_autograd_work_through_the_frozen_prefix():
    built, _, _ = _setup(StrategyName.linear_probe)
    seen = {}
    built.model.fc.register_forward_hook(lambda m, inp, out: seen.update(features=inp[0], logits=out))
    built.model.train()
    built.model(torch.randn(4, 3, 32, 32))
    assert not seen["features"].requires_grad and seen["features"].grad_fn is None  # no graph below the head
    assert seen["logits"].requires_grad


def test_frozen_groups_run_without_dropout_or_stochastic_depth_until_unfrozen():
    from torchvision.ops import StochasticDepth

    from finetune_cli.train.freezing import is_stochastic

    torch.manual_seed(0)
    built = create_model("efficientnet_b0", WeightsChoice("none"), num_classes=3, image_size=32)
    names = [g.name for g in built.groups]
    apply_freezing(built.groups, trainable_mask(StrategyName.linear_probe, names, 0), BNMode.frozen_eval)
    built.model.train()
    random_in_groups = [m for g in built.groups[:-1] for mod in g.modules for m in mod.modules() if is_stochastic(m)]
    assert any(isinstance(m, StochasticDepth) for m in random_in_groups)
    assert not any(m.training for m in random_in_groups)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(built.model.features(x), built.model.features(x))  # a fixed function
    apply_freezing(built.groups, [True] * len(names), BNMode.frozen_eval)
    built.model.train()
    assert all(m.training for m in random_in_groups)  # unfrozen: regularized as usual


def test_freeze_all_keeps_the_pretrained_batchnorm_fixed_but_trains_the_new_heads():
    """bn=freeze_all concerns the pretrained layers: the new MLP head's BatchNorm1d has no
    statistics worth keeping and must learn them."""
    from finetune_cli.config import HeadType
    from finetune_cli.models import HeadSpec

    torch.manual_seed(0)
    built = create_model("resnet18", WeightsChoice("none"), num_classes=3, image_size=32,
                         head=HeadSpec(HeadType.mlp, hidden=16))
    apply_freezing(built.groups, [True] * len(built.groups), BNMode.freeze_all)
    head_bn = [m for m in built.groups[-1].modules[0].modules() if isinstance(m, _BatchNorm)]
    backbone_before = _bn_stats(m for g in built.groups[:-1] for m in g.modules)
    head_before = _bn_stats(built.groups[-1].modules)
    optimizer = torch.optim.SGD(built.model.parameters(), lr=0.01)
    _step(built, optimizer)
    assert head_bn and all(m.training for m in head_bn)
    assert not torch.equal(_bn_stats(built.groups[-1].modules)[0][0], head_before[0][0])  # the head learns
    for (mean, var, n), (mean0, var0, n0) in zip(_bn_stats(m for g in built.groups[:-1] for m in g.modules),
                                                 backbone_before):
        assert torch.equal(mean, mean0) and torch.equal(var, var0) and torch.equal(n, n0)


def test_frozen_groups_follow_the_target_statistics_by_default_and_the_probe_keeps_them(finetune):
    """strategy.bn=train is the default: a frozen group's weights stay as pretrained while its
    BatchNorm statistics follow the target data; linear_probe keeps both as pretrained."""
    def stem(*overrides, name):
        _, run = finetune("debug=tiny", "trainer.epochs=1", *overrides, name=name)
        state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
        return state["conv1.weight"], state["bn1.running_mean"]

    probe_w, probe_mean = stem("strategy=linear_probe", name="probe")
    early_w, early_mean = stem("strategy=freeze_early", name="early")
    held_w, held_mean = stem("strategy=freeze_early", "strategy.bn=frozen_eval", name="held")
    assert torch.equal(probe_w, early_w) and torch.equal(probe_w, held_w)  # frozen: as pretrained
    assert torch.equal(probe_mean, held_mean)  # statistics held: as pretrained
    assert not torch.allclose(early_mean, probe_mean)  # the default: measured on the target images


@pytest.mark.parametrize("strategy, moved, held", [
    ("bitfit", ["bn1.bias", "layer4.1.bn2.bias"], ["conv1.weight", "bn1.weight", "layer4.1.conv2.weight"]),
    ("norm", ["bn1.bias", "bn1.weight", "layer4.1.bn2.weight"], ["conv1.weight", "layer4.1.conv2.weight"]),
])
def test_bitfit_and_norm_train_the_head_and_only_their_parameters_below_it(finetune, strategy, moved, held):
    def state(*overrides, name):
        summary, run = finetune("debug=tiny", "trainer.epochs=1", "strategy.bn=frozen_eval", *overrides, name=name)
        return summary, torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]

    _, probe = state("strategy=linear_probe", name="probe")  # the same start, below the head untouched
    summary, tuned = state(f"strategy={strategy}", name=strategy)
    for key in moved:
        assert not torch.equal(tuned[key], probe[key]), key
    for key in held:
        assert torch.equal(tuned[key], probe[key]), key
    built = create_model("resnet18", WeightsChoice("none"), num_classes=10, image_size=32)
    named = dict(built.model.named_parameters())
    norm_params = {f"{m}.{n}" for m, mod in built.model.named_modules() if isinstance(mod, nn.BatchNorm2d)
                   for n, _ in mod.named_parameters(recurse=False)}
    wanted = {k for k in named if (k.endswith(".bias") if strategy == "bitfit" else k in norm_params) or k.startswith("fc.")}
    assert summary["trainable_params"] == sum(named[k].numel() for k in wanted)
    assert not summary["feature_cache"]["train"]  # the layers below the head change


def test_norm_finds_layer_norms_and_bitfit_the_linear_biases_of_a_vision_transformer():
    from finetune_cli.train.freezing import also_trained

    built = create_model("vit_b_16", WeightsChoice("none"), num_classes=3, image_size=32)
    block = next(g for g in built.groups if g.name != "head" and any("encoder.layers" in n for n, _ in g.params))
    names = {id(p): n for n, p in block.params}
    norms = {names[i] for i in also_trained(block, "norm")}
    biases = {names[i] for i in also_trained(block, "bias")}
    assert norms and all(".ln_" in n for n in norms)
    assert any("mlp" in n for n in biases) and any("self_attention.out_proj" in n for n in biases)
    assert any(n.endswith("self_attention.in_proj_bias") for n in biases)  # query, key and value biases
    assert all(n.endswith("bias") for n in biases)
