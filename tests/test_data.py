"""Image loading, folder layouts and splits."""

import numpy as np
import pytest
import torch
from PIL import Image

from finetune_cli.config import AugmentConfig, AugmentName
from finetune_cli.data.folders import image_folder_splits, load_rgb, resolve_workers, stratified_split
from finetune_cli.data.synthetic import SyntheticSpec, class_pool, generate
from finetune_cli.data.transforms import Preprocess, eval_transform, train_transform
from finetune_cli.errors import FinetuneError

from helpers import make_image_folder

PRE = Preprocess(crop_size=32, resize_size=36)


def _save_modes(folder):
    folder.mkdir(parents=True, exist_ok=True)
    base = Image.new("RGB", (30, 20), (200, 30, 30))
    base.convert("L").save(folder / "gray.png")
    base.convert("P").save(folder / "palette.gif")
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "alpha.png")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.full((20, 30), 40000, np.uint16)).save(folder / "sixteen.png")
    rotated = Image.new("RGB", (30, 20), (10, 200, 10))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    rotated.save(folder / "exif.jpg", exif=exif)


def test_every_image_mode_loads_as_rgb(tmp_path):
    _save_modes(tmp_path)
    for path in tmp_path.iterdir():
        img = load_rgb(str(path))
        assert img.mode == "RGB", path.name
    assert load_rgb(str(tmp_path / "exif.jpg")).size == (20, 30)  # EXIF orientation applied
    r, g, b = load_rgb(str(tmp_path / "gray.png")).getpixel((5, 5))
    assert r == g == b


def test_folder_with_mixed_modes_trains_through_transforms(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=3)
    _save_modes(root / "train" / "cat")
    tf = train_transform(PRE, AugmentConfig(name=AugmentName.basic, scale_min=0.5))
    splits = image_folder_splits(root, tf, eval_transform(PRE), val_fraction=0.2, seed=0)
    assert splits.classes == ["cat", "dog"] and splits.val_source == "val/ folder"
    for i in range(len(splits.train)):
        x, y = splits.train[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_stratified_split_without_val_folder(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=10, val=False)
    splits = image_folder_splits(root, eval_transform(PRE), eval_transform(PRE), val_fraction=0.2, seed=3)
    assert "stratified" in splits.val_source
    assert (len(splits.train), len(splits.val)) == (24, 6)
    val_labels = sorted(splits.val[i][1] for i in range(len(splits.val)))
    assert val_labels == [0, 0, 1, 1, 2, 2]
    again = image_folder_splits(root, eval_transform(PRE), eval_transform(PRE), val_fraction=0.2, seed=3)
    assert list(splits.val.indices) == list(again.val.indices)  # seeded: same split every time
    train_idx, val_idx = stratified_split([0, 0, 1], 0.5, 0)
    assert sorted(train_idx + val_idx) == [0, 1, 2] and 2 in train_idx  # a single image stays in train


@pytest.mark.bad_input
def test_layout_errors_name_the_problem(tmp_path):
    with pytest.raises(FinetuneError, match="does not exist"):
        image_folder_splits(tmp_path / "nope", None, None, val_fraction=0.2, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinetuneError, match="no train/ folder"):
        image_folder_splits(tmp_path / "empty", None, None, val_fraction=0.2, seed=0)
    root = make_image_folder(tmp_path / "d")
    (root / "val" / "dog").rename(root / "val" / "bird")
    with pytest.raises(FinetuneError, match=r"only in train: \['dog'\]; only in val: \['bird'\]"):
        image_folder_splits(root, None, None, val_fraction=0.2, seed=0)


def test_num_workers_auto_and_invalid():
    assert resolve_workers("auto") >= 0
    assert resolve_workers("3") == 3
    with pytest.raises(FinetuneError, match="num_workers"):
        resolve_workers("-2")


def test_synthetic_dataset_is_cached_and_source_target_disjoint(tmp_path):
    spec = SyntheticSpec(classes=4, train_per_class=3, val_per_class=2, image_size=24)
    root = generate(spec, tmp_path)
    files = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    assert len(files) == 4 * 5
    assert Image.open(root / files[0]).size == (24, 24)
    stamp = (root / "spec.json").stat().st_mtime_ns
    assert generate(spec, tmp_path) == root and (root / "spec.json").stat().st_mtime_ns == stamp
    assert not set(class_pool("target")) & set(class_pool("source"))
    # same shapes and textures on both sides, so features transfer
    assert {s for s, _ in class_pool("target")} == {s for s, _ in class_pool("source")}


def test_large_jpegs_decode_at_reduced_scale_with_the_same_result(tmp_path):
    from finetune_cli.config import AugmentConfig, AugmentName
    from finetune_cli.data.transforms import Preprocess, decode_side, eval_transform

    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).resize((1600, 1200), Image.BICUBIC)
    small.save(tmp_path / "photo.jpg", quality=90)
    small.save(tmp_path / "photo.png")
    pre = Preprocess(crop_size=64, resize_size=73)
    side = decode_side(pre)
    assert side == 73
    assert decode_side(pre, AugmentConfig(name=AugmentName.basic, scale_min=0.25)) == 128  # 64 / sqrt(0.25)
    assert decode_side(pre, AugmentConfig(name=AugmentName.none)) == 73
    full, reduced = load_rgb(str(tmp_path / "photo.jpg")), load_rgb(str(tmp_path / "photo.jpg"), side)
    assert full.size == (1600, 1200) and reduced.size == (200, 150)  # 1/8 scale, shorter side still >= 73
    assert load_rgb(str(tmp_path / "photo.png"), side).size == (1600, 1200)  # only JPEG has reduced decoding
    tf = eval_transform(pre)
    diff = (tf(full) - tf(reduced)).abs()
    assert diff.mean() < 0.02 and diff.max() < 0.2  # normalized units: the same picture at 64 px


def _linked_folder(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("ants", "bees"), per_class=3)
    return root, root / "train"


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "link, target, why",
    [
        ("ants/loop", "..", "a loop back into folders already read"),
        ("ants/self", ".", "a loop back into folders already read"),
        ("ants/more", "../bees", "outside its class folder"),
        ("ants/elsewhere", "OUTSIDE", "outside its class folder"),
        ("ants/bee.png", "../bees/0.png", "a file of another class"),
    ],
)
def test_links_that_would_relabel_images_are_refused(tmp_path, link, target, why):
    """A link train/ants/loop -> .. once made a 6-image set train on hundreds of copies, bee
    photos labelled "ants", while the data check, which did not follow links, counted 6."""
    root, train = _linked_folder(tmp_path)
    outside = make_image_folder(tmp_path / "outside", classes=("x",), per_class=2, val=False) / "train" / "x"
    (train / link).symlink_to(outside if target == "OUTSIDE" else target)
    with pytest.raises(FinetuneError) as info:
        image_folder_splits(root, lambda x: x, lambda x: x, val_fraction=0.2, seed=0)
    message = str(info.value)
    assert str(train / link) in message and why in message and "class 'ants'" in message


def test_the_check_and_the_dataset_list_the_same_files_through_allowed_links(tmp_path):
    from finetune_cli.data.folders import class_files

    root, train = _linked_folder(tmp_path)
    pool = make_image_folder(tmp_path / "pool", classes=("wasps",), per_class=4, val=False) / "train" / "wasps"
    (train / "wasps").symlink_to(pool)  # a class folder kept elsewhere
    (root / "val" / "wasps").symlink_to(pool)
    (train / "ants" / "sub").mkdir()
    (train / "ants" / "sub" / "again.png").symlink_to(train / "ants" / "0.png")  # a file link inside its class
    shared = make_image_folder(tmp_path / "shared", classes=("any",), per_class=2, val=False) / "train" / "any"
    (train / "bees" / "pooled.png").symlink_to(shared / "1.png")  # a file from a pool outside the root
    listed = class_files(train)
    splits = image_folder_splits(root, lambda x: x, lambda x: x, val_fraction=0.2, seed=0)
    assert splits.classes == ["ants", "bees", "wasps"]
    assert [path for path, _ in splits.train.samples] == [f for c in splits.classes for f in listed[c]]
    assert len(listed["ants"]) == 4 and len(listed["bees"]) == 4 and len(listed["wasps"]) == 4


@pytest.mark.bad_input
def test_a_bad_image_behind_a_linked_class_folder_is_caught_by_the_check(tmp_path, finetune):
    root, train = _linked_folder(tmp_path)
    pool = make_image_folder(tmp_path / "pool", classes=("wasps",), per_class=3, val=False) / "train" / "wasps"
    broken = pool / "2.png"
    broken.write_bytes(broken.read_bytes()[:40])  # truncated
    (train / "wasps").symlink_to(pool)
    (root / "val" / "wasps").symlink_to(pool)
    with pytest.raises(FinetuneError) as info:
        finetune("debug=tiny", "data=imagefolder", f"data.root={root}")
    assert "wasps/2.png" in str(info.value)


@pytest.mark.bad_input
def test_a_single_class_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "one", classes=("only",), per_class=4)
    with pytest.raises(FinetuneError, match="one class folder \\(only\\): a classifier needs two classes or more"):
        image_folder_splits(root, lambda x: x, lambda x: x, val_fraction=0.2, seed=0)


@pytest.mark.bad_input
def test_a_class_with_one_image_and_no_val_folder_is_named(tmp_path, caplog):
    root = make_image_folder(tmp_path / "few", classes=("ants", "bees", "wasps"), per_class=5, val=False)
    for extra in ("1.png", "2.png", "3.png", "4.png"):
        (root / "train" / "wasps" / extra).unlink()
    splits = image_folder_splits(root, lambda x: x, lambda x: x, val_fraction=0.2, seed=0)
    assert len(splits.val) == 2  # one of ants, one of bees, none of wasps
    assert "1 of 3 classes have a single image" in caplog.text and ": wasps." in caplog.text


@pytest.mark.bad_input
def test_an_unreadable_class_folder_is_named_not_called_empty(tmp_path, monkeypatch):
    import os

    root = make_image_folder(tmp_path / "d", classes=("ants", "bees"))
    locked = str(root / "train" / "bees")
    real_scandir = os.scandir

    def scandir(path="."):  # what chmod 000 does for a user other than root
        if str(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(FinetuneError, match=f"Cannot read {locked} \\(Permission denied\\)"):
        image_folder_splits(root, lambda x: x, lambda x: x, val_fraction=0.2, seed=0)


@pytest.mark.bad_input
def test_data_root_pointing_at_a_file_says_so(tmp_path):
    from omegaconf import OmegaConf

    from finetune_cli.checks import problems
    from finetune_cli.config import Config

    (tmp_path / "images.zip").write_bytes(b"PK")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config),
                                              {"data": {"source": "imagefolder", "root": str(tmp_path / "images.zip")}}))
    assert any("is a file; point it at the folder holding train/<class>/*" in p for p in problems(cfg))
