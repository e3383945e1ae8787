"""Augmentation presets, MixUp/CutMix with soft targets, and the loss under label smoothing."""

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from torch import nn
from torchvision.transforms import v2 as T

from finetune_cli.cli import unique_dir  # noqa: F401  (registers the schema)
from finetune_cli.config import AugmentConfig, AugmentName
from finetune_cli.data.transforms import Preprocess, train_transform
from finetune_cli.paths import conf_dir
from finetune_cli.train.mixing import BatchMixer, hard_labels, make_mixer

PRE = Preprocess(crop_size=40, resize_size=46)
PRESETS = sorted(p.stem for p in (conf_dir() / "augment").glob("*.yaml"))


def _preset(name) -> AugmentConfig:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"augment={name}"])
    return OmegaConf.to_object(cfg).augment


def _kinds(transform):
    kinds = set()
    for t in transform.transforms:
        kinds.add(type(t).__name__)
        for inner in getattr(t, "transforms", []):
            kinds.add(type(inner).__name__)
    return kinds


def test_all_presets_are_shipped():
    assert PRESETS == ["autoaugment", "basic", "none", "randaugment", "strong", "trivialaugment"]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_transforms_pil_and_uint8_tensors(name):
    tf = train_transform(PRE, _preset(name))
    rng = np.random.default_rng(0)
    pil = Image.fromarray(rng.integers(0, 256, (57, 71, 3), dtype=np.uint8))
    tensor = torch.from_numpy(rng.integers(0, 256, (3, 50, 64), dtype=np.uint8))
    for image in (pil, tensor):
        torch.manual_seed(0)
        out = tf(image)
        assert out.shape == (3, 40, 40) and out.dtype == torch.float32
    torch.manual_seed(1)
    a = tf(pil)
    torch.manual_seed(2)
    b = tf(pil)
    assert torch.equal(a, b) == (name == "none")  # only `none` is deterministic


def test_strong_and_policy_presets_contain_their_operations():
    assert {"RandomResizedCrop", "RandomHorizontalFlip", "RandomRotation", "ColorJitter", "RandomGrayscale",
            "GaussianBlur", "RandomErasing"} <= _kinds(train_transform(PRE, _preset("strong")))
    assert "RandAugment" in _kinds(train_transform(PRE, _preset("randaugment")))
    assert "TrivialAugmentWide" in _kinds(train_transform(PRE, _preset("trivialaugment")))
    assert "AutoAugment" in _kinds(train_transform(PRE, _preset("autoaugment")))
    basic = _kinds(train_transform(PRE, _preset("basic")))
    assert "RandomRotation" not in basic and "RandomErasing" not in basic
    tuned = train_transform(PRE, AugmentConfig(name=AugmentName.basic, rotation=15, erasing_p=0.2))
    rotation = next(t for t in tuned.transforms if isinstance(t, T.RandomRotation))
    assert list(rotation.degrees) == [-15.0, 15.0]
    assert next(t for t in tuned.transforms if isinstance(t, T.RandomErasing)).p == 0.2


def _batch(n=6, classes=6, size=16):
    images = torch.stack([torch.full((3, size, size), float(i)) for i in range(n)])
    return images, torch.arange(n) % classes


def test_mixup_targets_sum_to_one_and_match_the_blend():
    torch.manual_seed(0)
    mixer = BatchMixer(AugmentConfig(mixup_alpha=0.4), num_classes=6)
    images, labels = _batch()
    mixed, soft = mixer(images, labels)
    assert soft.shape == (6, 6) and torch.allclose(soft.sum(1), torch.ones(6))
    for i in range(6):
        lam = soft[i, labels[i]].item()
        other = [j for j in range(6) if j != labels[i] and soft[i, j] > 0]
        partner = other[0] if other else i
        expected = lam * i + (1 - lam) * partner
        assert torch.allclose(mixed[i], torch.full_like(mixed[i], expected), atol=1e-5)


def test_cutmix_share_matches_the_pasted_area():
    torch.manual_seed(3)
    mixer = BatchMixer(AugmentConfig(cutmix_alpha=1.0), num_classes=6)
    images, labels = _batch(size=32)
    mixed, soft = mixer(images, labels)
    assert torch.allclose(soft.sum(1), torch.ones(6))
    for i in range(6):
        own_pixels = (mixed[i, 0] == float(i)).float().mean().item()
        assert own_pixels == pytest.approx(soft[i, labels[i]].item(), abs=1e-6)
    assert (soft.max(1).values < 1).any()  # a box was pasted


def test_no_mixing_gives_one_hot_targets_and_switching_uses_both():
    images, labels = _batch()
    off = BatchMixer(AugmentConfig(mixup_alpha=0.4, mix_prob=0.0), num_classes=6)
    same, soft = off(images, labels)
    assert torch.equal(same, images) and torch.equal(soft, nn.functional.one_hot(labels, 6).float())
    assert make_mixer(AugmentConfig(), 6) is None
    both = BatchMixer(AugmentConfig(mixup_alpha=0.4, cutmix_alpha=1.0, switch_prob=0.5), num_classes=6)
    torch.manual_seed(0)
    kinds = set()
    for _ in range(20):
        mixed, _ = both(images, labels)
        flat = mixed[:, 0].flatten(1)
        uniform = bool((flat == flat[:, :1]).all())  # MixUp blends whole images; CutMix pastes boxes
        kinds.add("mixup" if uniform else "cutmix")
    assert kinds == {"cutmix", "mixup"}


def test_dominant_label_and_label_smoothing_with_soft_targets():
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.0, 0.8]])
    assert hard_labels(soft).tolist() == [0, 2] and hard_labels(torch.tensor([1, 2])).tolist() == [1, 2]
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    eps = 0.1
    loss = nn.CrossEntropyLoss(label_smoothing=eps)(logits, soft)
    smoothed = (1 - eps) * soft + eps / 3
    expected = -(smoothed * torch.log_softmax(logits, 1)).sum(1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # one-hot soft targets give the same loss as class indices
    hard = nn.CrossEntropyLoss(label_smoothing=eps)(logits, torch.tensor([0, 2]))
    onehot = nn.CrossEntropyLoss(label_smoothing=eps)(logits, nn.functional.one_hot(torch.tensor([0, 2]), 3).float())
    assert hard.item() == pytest.approx(onehot.item(), rel=1e-6)


def test_preview_grid_shows_each_image_enlarged_with_its_label_below(tmp_path):
    from finetune_cli.data.preview import LABEL_HEIGHT, grid_size, write_preview

    pre = Preprocess(crop_size=32, resize_size=32)
    colours = [(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0), (0, 255, 255)]
    mean, std = torch.tensor(pre.mean).view(3, 1, 1), torch.tensor(pre.std).view(3, 1, 1)
    data = [((torch.tensor(c).float().view(3, 1, 1) / 255 - mean) / std * torch.ones(3, 32, 32), i)
            for i, c in enumerate(colours)]
    path = write_preview(data, ["red", "blue", "green", "yellow", "cyan"], pre, tmp_path / "p.png", count=5, seed=0)
    cols, rows, tile = grid_size(5, 32)
    assert (cols, rows, tile) == (3, 2, 128)
    with Image.open(path) as img:
        sheet = np.array(img.convert("RGB"))
    assert sheet.shape == (rows * (tile + LABEL_HEIGHT), cols * tile, 3)
    seen = set()
    for k in range(5):
        r, c = divmod(k, cols)
        x0, y0 = c * tile, r * (tile + LABEL_HEIGHT)
        cell = sheet[y0:y0 + tile, x0:x0 + tile].reshape(-1, 3)
        (colour,) = {tuple(int(v) for v in px) for px in np.unique(cell, axis=0)}  # one solid, enlarged image
        seen.add(colour)
        label = sheet[y0 + tile:y0 + tile + LABEL_HEIGHT, x0:x0 + tile]
        assert (label < 128).all(-1).any() and (label == 255).all(-1).mean() > 0.8  # dark text on white
    assert seen == set(colours)
    assert (sheet[tile + LABEL_HEIGHT:, 2 * tile:] == 255).all()  # the sixth cell is empty and white
