"""The family table: every torchvision classifier maps to a family, and for one model per
family the layer groups cover every parameter exactly once, in forward order, head last."""

import pytest
import torch

from finetune_cli.models import FAMILIES, WeightsChoice, create_model, family_of
from finetune_cli.models.factory import classification_models

# one small model per family, with the smallest input it accepts
REPRESENTATIVES = {
    "resnet": ("resnet18", 32),
    "vgg": ("vgg11", 32),
    "alexnet": ("alexnet", 64),
    "squeezenet": ("squeezenet1_1", 48),
    "googlenet": ("googlenet", 32),
    "inception_v3": ("inception_v3", 75),
    "efficientnet": ("efficientnet_b0", 32),
    "efficientnet_v2": ("efficientnet_v2_s", 32),
    "mobilenet_v2": ("mobilenet_v2", 32),
    "mobilenet_v3": ("mobilenet_v3_small", 32),
    "mnasnet": ("mnasnet0_5", 32),
    "convnext": ("convnext_tiny", 32),
    "swin": ("swin_t", 32),
    "maxvit": ("maxvit_t", 224),
    "vit": ("vit_b_16", 32),
    "densenet": ("densenet121", 32),
    "regnet": ("regnet_x_400mf", 32),
    "shufflenet": ("shufflenet_v2_x0_5", 32),
}


def test_every_torchvision_classifier_has_a_family():
    names = classification_models()
    assert len(names) > 50
    assert [n for n in names if family_of(n) is None] == []


def test_every_family_has_a_representative():
    assert sorted(REPRESENTATIVES) == sorted(f.name for f in FAMILIES)


@pytest.mark.parametrize("family", sorted(REPRESENTATIVES))
def test_groups_cover_parameters_once_in_forward_order(family):
    name, size = REPRESENTATIVES[family]
    torch.manual_seed(0)
    built = create_model(name, WeightsChoice("none"), num_classes=3, image_size=size)
    model, groups = built.model, built.groups
    assert built.family.name == family
    assert groups[-1].name == "head" and len(groups) >= 3

    # unfreezing group by group, head first, reaches every parameter exactly once
    reached = []
    for group in reversed(groups):
        reached.extend(id(p) for _, p in group.params)
    assert sorted(reached) == sorted(id(p) for p in model.parameters())
    assert len(reached) == len(set(reached))

    # groups run in order: record which group's modules the forward pass enters first
    first_call = {}

    def recorder(idx):
        def hook(module, args):
            first_call.setdefault(idx, len(first_call))  # returns None: input unchanged

        return hook

    handles = [
        module.register_forward_pre_hook(recorder(idx))
        for idx, group in enumerate(groups)
        for module in group.modules
    ]
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    for h in handles:
        h.remove()
    assert out.shape == (1, 3)
    order = [idx for idx, _ in sorted(first_call.items(), key=lambda kv: kv[1])]
    assert order == sorted(order), f"groups entered out of order: {order}"
    assert order[-1] == len(groups) - 1  # the head runs last


def test_aux_heads_replaced_and_trained_with_the_head():
    built = create_model("googlenet", WeightsChoice("none"), num_classes=4, image_size=64)
    assert built.model.aux1.fc2.out_features == 4 and built.model.aux2.fc2.out_features == 4
    head = built.groups[-1]
    assert {"fc", "aux1", "aux2"} == set(head.paths)
    built.model.train()
    out = built.model(torch.randn(2, 3, 64, 64))
    assert [o.shape for o in out] == [(2, 4)] * 3  # logits and two auxiliary outputs

    inc = create_model("inception_v3", WeightsChoice("none"), num_classes=5, image_size=80)
    assert inc.model.AuxLogits.fc.out_features == 5
    inc.model.eval()
    assert inc.model(torch.randn(1, 3, 80, 80)).shape == (1, 5)  # aux ignored in eval


def test_mlp_head_and_dropout_head():
    from finetune_cli.config import HeadType
    from finetune_cli.models import HeadSpec

    mlp = create_model("resnet18", WeightsChoice("none"), 6, head=HeadSpec(HeadType.mlp, 32, 0.2), image_size=32)
    kinds = [type(m).__name__ for m in mlp.model.fc]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    assert mlp.model.fc[-1].out_features == 6
    drop = create_model("resnet18", WeightsChoice("none"), 6, head=HeadSpec(HeadType.linear, 0, 0.5), image_size=32)
    assert isinstance(drop.model.fc[0], torch.nn.Dropout) and drop.model.fc[1].out_features == 6


def test_too_small_input_is_a_clear_error():
    from finetune_cli.errors import FinetuneError

    with pytest.raises(FinetuneError, match="at least 75 px"):
        create_model("inception_v3", WeightsChoice("none"), 3, image_size=32)
    with pytest.raises(FinetuneError, match="multiple of 16"):
        create_model("vit_b_16", WeightsChoice("none"), 3, image_size=40)


def test_vit_pretrained_at_one_size_is_resized_for_another():
    from torchvision.models import get_model

    from finetune_cli.models.factory import _resize_vit

    torch.manual_seed(0)
    model = get_model("vit_b_16", weights=None, image_size=64, num_classes=4)
    resized = _resize_vit(model, "vit_b_16", 32)
    assert resized.image_size == 32
    assert resized.encoder.pos_embedding.shape == (1, 1 + 2 * 2, 768)
    # everything but the positional embedding carries over unchanged
    assert torch.equal(resized.conv_proj.weight, model.conv_proj.weight)
    assert torch.equal(resized.encoder.pos_embedding[:, 0], model.encoder.pos_embedding[:, 0])  # class token slot
    resized.eval()
    assert resized(torch.randn(1, 3, 32, 32)).shape == (1, 4)


@pytest.mark.parametrize("family", ["squeezenet", "efficientnet", "vit", "googlenet"])
def test_a_file_head_becomes_a_source_head_that_swaps_in(tmp_path, family):
    from finetune_cli.models import swapped_head

    name, size = REPRESENTATIVES[family]
    torch.manual_seed(0)
    source = create_model(name, WeightsChoice("none"), num_classes=7, image_size=size)
    path = tmp_path / "source.pt"
    torch.save(source.model.state_dict(), path)
    built = create_model(name, WeightsChoice("file", path=path), num_classes=3, image_size=size)
    assert built.source_head is not None
    model, x = built.model.eval(), torch.randn(1, 3, size, size)
    with torch.no_grad():
        with swapped_head(model, built.family, built.source_head):
            swapped = model(x)
        assert model(x).shape == (1, 3)  # the target head is back
        expected = source.model.eval()(x)
    assert swapped.shape == (1, 7)
    assert torch.allclose(swapped, expected, atol=1e-5)  # the source model's own predictions


@pytest.mark.parametrize("model", ["mobilenet_v3_small", "shufflenet_v2_x0_5"])
def test_a_model_chosen_by_its_torchvision_name_trains(finetune, model):
    """model=<name> for classifiers that had no option file of their own."""
    summary, run = finetune(f"model={model}", "debug=tiny")
    assert summary["status"] == "completed" and summary["model"] == model
    assert (run / "checkpoints" / "best.pt").is_file()
