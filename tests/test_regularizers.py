"""L2-SP and EWC: the penalty's value and gradient, and the Fisher estimate, on a tiny model."""

import pytest
import torch
from torch import nn

from finetune_cli.train.regularizers import AnchorPenalty, estimate_fisher


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def test_l2sp_value_and_gradient():
    model = _tiny()
    backbone = list(model[0].named_parameters(prefix="0"))
    penalty = AnchorPenalty(backbone, strength=0.2)
    assert penalty().item() == 0.0  # at the pretrained weights
    delta = [torch.randn_like(p) for _, p in backbone]
    with torch.no_grad():
        for (_, p), d in zip(backbone, delta):
            p.add_(d)
    value = penalty()
    assert value.item() == pytest.approx(0.5 * 0.2 * sum((d**2).sum().item() for d in delta), rel=1e-5)
    value.backward()
    for (_, p), d in zip(backbone, delta):
        assert torch.allclose(p.grad, 0.2 * d, atol=1e-6)  # d/dw of a/2 ||w - w0||^2 = a (w - w0)
    assert model[2].weight.grad is None  # the head is not anchored


def test_ewc_value_and_gradient_weighted_by_fisher():
    model = _tiny()
    backbone = list(model[0].named_parameters(prefix="0"))
    fisher = [torch.rand_like(p) for _, p in backbone]
    penalty = AnchorPenalty(backbone, strength=3.0, weights=fisher)
    delta = [torch.randn_like(p) for _, p in backbone]
    with torch.no_grad():
        for (_, p), d in zip(backbone, delta):
            p.add_(d)
    value = penalty()
    assert value.item() == pytest.approx(1.5 * sum((f * d**2).sum().item() for f, d in zip(fisher, delta)), rel=1e-5)
    value.backward()
    for (_, p), f, d in zip(backbone, fisher, delta):
        assert torch.allclose(p.grad, 3.0 * f * d, atol=1e-5)


def test_frozen_parameters_cost_nothing():
    model = _tiny()
    backbone = list(model[0].named_parameters(prefix="0"))
    penalty = AnchorPenalty(backbone, strength=1.0)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[0].weight.requires_grad_(False)
    assert penalty().item() == 0.0  # only the (unchanged) bias is trainable


def test_fisher_matches_a_per_image_computation():
    model = _tiny()
    backbone = list(model[0].named_parameters(prefix="0"))
    images = torch.randn(5, 3)
    fisher = estimate_fisher(model, backbone, [images[:3], images[3:]], torch.device("cpu"), max_samples=4, seed=7)
    gen = torch.Generator().manual_seed(7)
    expected = [torch.zeros_like(p) for _, p in backbone]
    for x in images[:4]:
        log_probs = torch.log_softmax(model(x.unsqueeze(0)), dim=1)
        y = torch.multinomial(log_probs.exp().detach(), 1, generator=gen).item()
        grads = torch.autograd.grad(log_probs[0, y], [p for _, p in backbone])
        for e, g in zip(expected, grads):
            e += g**2
    for f, e in zip(fisher, expected):
        assert torch.allclose(f, e / 4, atol=1e-7)
    assert all(p.requires_grad for _, p in backbone)  # flags restored


def _resnet():
    from finetune_cli.models import WeightsChoice, create_model

    torch.manual_seed(0)
    return create_model("resnet18", WeightsChoice("none"), num_classes=3, image_size=32)


def test_fisher_is_estimated_through_the_source_head():
    import copy

    from finetune_cli.train.regularizers import backbone_params, fisher_with_source_head

    built = _resnet()
    model, family = built.model, built.family
    torch.manual_seed(1)
    source_head = nn.Linear(512, 7)  # the pretrained classifier of a 7-class source task
    target_head = model.fc
    images = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    backbone = backbone_params(built.groups, family)
    assert backbone and not any(n.startswith("fc.") for n, _ in backbone)

    fisher = fisher_with_source_head(model, family, source_head, backbone, images, torch.device("cpu"), 3, seed=5)
    assert model.fc is target_head  # the target head is back in place

    pretrained = copy.deepcopy(model)  # the pretrained model as it was: source head in place
    pretrained.fc = copy.deepcopy(source_head)
    direct = estimate_fisher(pretrained, [(n, pretrained.get_parameter(n)) for n, _ in backbone],
                             images, torch.device("cpu"), 3, seed=5)
    for f, d in zip(fisher, direct):
        assert torch.allclose(f, d, rtol=1e-4, atol=1e-12)

    through_target = estimate_fisher(model, backbone, images, torch.device("cpu"), 3, seed=5)
    assert not all(torch.allclose(f, t, rtol=1e-2) for f, t in zip(fisher, through_target))


def test_swapped_head_puts_the_target_head_back_after_an_error():
    from finetune_cli.models import swapped_head

    built = _resnet()
    target = built.model.fc
    with pytest.raises(ValueError):
        with swapped_head(built.model, built.family, nn.Linear(512, 7)):
            assert built.model.fc.out_features == 7
            raise ValueError
    assert built.model.fc is target


def test_ewc_without_a_source_head_is_a_clear_error():
    from finetune_cli.errors import FinetuneError
    from finetune_cli.train.regularizers import backbone_params, fisher_with_source_head

    built = _resnet()
    assert built.source_head is None  # random init has no pretrained classifier
    with pytest.raises(FinetuneError, match="regularizer=l2sp") as err:
        fisher_with_source_head(built.model, built.family, built.source_head, backbone_params(built.groups, built.family),
                                [torch.randn(1, 3, 32, 32)], torch.device("cpu"), 1, weights="random init")
    assert "(random init) comes without one" in str(err.value) and "include their classifier" in str(err.value)
