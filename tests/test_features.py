"""Cached frozen features: the tail, the decision, the store, and runs that match uncached ones."""

import json
import shutil

import pytest
import torch
from torch.utils.data import DataLoader

from finetune_cli.config import BNMode, StrategyName
from finetune_cli.data.folders import image_folder
from finetune_cli.data.transforms import Preprocess, eval_transform
from finetune_cli.errors import FinetuneError
from finetune_cli.models import WeightsChoice, create_model
from finetune_cli.models.tail import find_tail
from finetune_cli.train.engine import Precision
from finetune_cli.train.features import (
    FeatureLoader,
    Features,
    FeatureStore,
    cache_key,
    decide,
    extract,
    parse_switch,
    train_blockers,
    updating_batchnorms,
)
from finetune_cli.train.freezing import apply_freezing
from finetune_cli.train.strategies import trainable_mask

from helpers import cli, make_image_folder

CPU = torch.device("cpu")


def _probe(name, size=32, bn=BNMode.frozen_eval):
    torch.manual_seed(0)
    built = create_model(name, WeightsChoice("none"), num_classes=3, image_size=size)
    names = [g.name for g in built.groups]
    apply_freezing(built.groups, trainable_mask(StrategyName.linear_probe, names, 0), bn)
    return built, find_tail(built.model, built.family, built.groups)


@pytest.mark.parametrize("name,size,entry", [
    ("resnet18", 32, "fc"),
    ("mobilenet_v3_small", 32, "classifier.1"),  # Hardswish and Dropout sit between the hidden layer and the head
    ("efficientnet_b0", 32, "classifier.0"),  # the dropout before the head belongs to the tail
    ("squeezenet1_1", 48, "classifier.0"),  # a 1x1-conv head followed by ReLU and pooling
    ("vgg11", 32, "classifier.6"),  # its dropouts belong to the frozen fc group
])
def test_tail_reproduces_the_model_output_and_nothing_random_runs_below_it(name, size, entry):
    built, tail = _probe(name, size)
    assert tail.path == entry
    built.model.train()
    assert train_blockers(built.model, tail, random_augment=None, mixing=False) == []
    assert updating_batchnorms(built.model, tail) == []
    x = torch.randn(5, 3, size, size)
    loader = DataLoader(list(zip(x, torch.arange(5) % 3)), batch_size=5)
    feats, targets = extract(built.model, tail, loader, CPU, Precision())
    built.model.eval()
    with torch.no_grad():
        assert torch.allclose(tail.module.eval()(feats), built.model(x), atol=1e-5)
    assert targets.tolist() == [0, 1, 2, 0, 1]


def test_blockers_name_what_makes_training_features_change():
    built, tail = _probe("resnet18", bn=BNMode.train)
    built.model.train()
    assert updating_batchnorms(built.model, tail)  # frozen BN updating its statistics
    blockers = train_blockers(built.model, tail, random_augment="basic", mixing=True)
    assert any("augment=basic" in b for b in blockers) and any("MixUp" in b for b in blockers)
    d = decide(None, frozen_below_head=True, tail_ok=True, bn_updating=["bn1"], aux=False, blockers=[],
               bn_mode=BNMode.train)
    assert not d.val and not d.train and "bn1" in d.why_not[0] and "strategy.bn=train" in d.why_not[0]


def test_batchnorm_note_names_the_real_cause():
    """A BatchNorm outside every layer group updates whatever strategy.bn says: the note must not
    blame strategy.bn=train."""
    d = decide(None, frozen_below_head=True, tail_ok=True, bn_updating=["extra.bn"], aux=False, blockers=[],
               bn_mode=BNMode.frozen_eval)
    assert "strategy.bn=train" not in d.why_not[0] and "no layer group" in d.why_not[0]


def test_decisions():
    ok = dict(frozen_below_head=True, tail_ok=True, bn_updating=[], aux=False)
    assert decide(None, **ok, blockers=[]).train
    d = decide(None, **ok, blockers=["augment=basic draws random crops"])
    assert d.val and not d.train and d.why_not == ["augment=basic draws random crops"]
    assert not decide(None, **{**ok, "frozen_below_head": False}, blockers=[]).val
    assert not decide(False, **ok, blockers=[]).val
    with pytest.raises(FinetuneError, match="cache_features=true.*augment=basic"):
        decide(True, **ok, blockers=["augment=basic draws random crops"])
    assert [parse_switch(v, "k") for v in ("auto", "True", "false", "on")] == [None, True, False, True]
    with pytest.raises(FinetuneError, match="k=maybe: use auto, true or false"):
        parse_switch("maybe", "k")


def test_feature_loader_draws_the_batches_the_image_loader_would():
    from finetune_cli.data.folders import make_loader

    feats = Features(torch.arange(10.0).unsqueeze(1), torch.arange(10), 0.0, None)
    plain = make_loader(list(zip(torch.arange(10.0).unsqueeze(1), torch.arange(10))), batch_size=4, num_workers=0,
                        train=True, seed=3)
    cached = FeatureLoader(feats, CPU, batch_size=4, sampler=plain.sampler, drop_last=plain.drop_last)
    assert len(cached) == len(plain) == 2
    for epoch in (1, 2, 1):  # the order is the epoch's, whenever it is drawn (a resumed run)
        plain.sampler.set_epoch(epoch)
        images = [y.tolist() for _, y in plain]
        plain.sampler.set_epoch(epoch)
        assert [y.tolist() for _, y in cached] == images
    plain.sampler.set_epoch(1)
    assert [y.tolist() for _, y in cached] != [y.tolist() for _, y in cached]  # each pass: the next epoch


def test_store_reuses_only_a_matching_key(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=3)
    built, tail = _probe("resnet18")
    data = image_folder(root / "train", eval_transform(Preprocess(32, 36)))
    key = cache_key(built.model, tail, data, Precision())
    loader = DataLoader(data, batch_size=4)
    calls = []

    def compute():
        calls.append(1)
        return extract(built.model, tail, loader, CPU, Precision())

    store = FeatureStore(tmp_path / "features")
    first = store.get("train", key, compute)
    again = store.get("train", key, compute)
    assert len(calls) == 1 and again.seconds == 0.0 and torch.equal(first.features, again.features)
    # another image, other weights below the tail, or another transform: another key
    (root / "train" / "cat" / "0.png").write_bytes((root / "train" / "dog" / "0.png").read_bytes())
    assert cache_key(built.model, tail, data, Precision()) != key
    key2 = cache_key(built.model, tail, data, Precision())
    saved = built.model.conv1.weight.detach().clone()
    with torch.no_grad():
        built.model.conv1.weight.add_(1.0)
    assert cache_key(built.model, tail, data, Precision()) != key2
    with torch.no_grad():
        built.model.fc.weight.add_(1.0)  # the head is not part of the key: it trains
        built.model.conv1.weight.copy_(saved)
    assert cache_key(built.model, tail, data, Precision()) == key2
    other = image_folder(root / "train", eval_transform(Preprocess(32, 40)))
    assert cache_key(built.model, tail, other, Precision()) != key2


# --- runs ---------------------------------------------------------------------------------

PROBE = ["data=synthetic", "data.synthetic.classes=4", "data.synthetic.train_per_class=12",
         "data.synthetic.val_per_class=6", "model.weights=null", "strategy=linear_probe", "trainer.epochs=3",
         "data.num_workers=0", "optimizer.lr=0.05"]


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    res = cli([*PROBE, f"hydra.run.dir={out}", *extra], cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    metrics = (out / "metrics.csv").read_text().splitlines()
    return out, json.loads((out / "summary.json").read_text()), metrics, res.stdout + res.stderr


def _weights(out):
    return torch.load(out / "checkpoints" / "last.pt", weights_only=False)["model"]


def test_cached_probe_matches_the_uncached_probe(tmp_path):
    cached, s1, m1, log1 = _run(tmp_path, "cached", "augment=none")
    plain, s2, m2, _ = _run(tmp_path, "plain", "augment=none", "data.cache_features=false")
    assert s1["feature_cache"]["train"] and s1["feature_cache"]["val"] and "Feature cache: on" in log1
    assert not s2["feature_cache"]["train"] and not s2["feature_cache"]["val"]
    assert (cached / "features" / "train.pt").is_file() and not (plain / "features").exists()
    w1, w2 = _weights(cached), _weights(plain)
    assert all(torch.allclose(w1[k].float(), w2[k].float(), atol=1e-5) for k in w1)
    val = lambda rows: [r.split(",")[3:5] for r in rows[1:]]  # noqa: E731  (val_loss, val_acc)
    assert [float(a) for a, _ in val(m1)] == pytest.approx([float(a) for a, _ in val(m2)], abs=1e-5)
    assert s1["best"]["value"] == s2["best"]["value"]


def test_random_augmentation_caches_validation_only_and_says_why(tmp_path):
    cached, s1, m1, log1 = _run(tmp_path, "cached", "augment=basic")
    _, s2, m2, _ = _run(tmp_path, "plain", "augment=basic", "data.cache_features=false")
    fc = s1["feature_cache"]
    assert fc["val"] and not fc["train"] and any("augment=basic" in w for w in fc["why_not"])
    assert "Feature cache: validation only" in log1 and "augment=basic" in log1
    assert m1[0] == m2[0]
    col = m1[0].split(",").index("val_acc")
    assert [r.split(",")[col] for r in m1[1:]] == [r.split(",")[col] for r in m2[1:]]


def test_cache_demanded_but_impossible_is_a_clear_error(tmp_path):
    res = cli([*PROBE, f"hydra.run.dir={tmp_path / 'r'}", "augment=basic", "data.cache_features=true"], cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 1 and "Traceback" not in out
    assert "data.cache_features=true, but training features cannot be cached" in out and "augment=basic" in out
    res = cli([*PROBE, f"hydra.run.dir={tmp_path / 's'}", "data.cache_features=sometimes"], cwd=tmp_path)
    assert res.returncode == 1 and "data.cache_features=sometimes: use auto, true or false" in res.stdout + res.stderr


def test_strategies_that_train_below_the_head_never_cache(tmp_path):
    _, s, _, log = _run(tmp_path, "prog", "augment=none", "strategy=progressive")
    assert not s["feature_cache"]["val"] and "layers below the head train" in log


def test_resume_reads_the_features_back(tmp_path):
    out, s1, _, _ = _run(tmp_path, "r", "augment=none", "trainer.epochs=3", "trainer.save_every=1")
    assert not s1["feature_cache"]["reused"]
    shutil.copy(out / "checkpoints" / "epoch_002.pt", out / "checkpoints" / "last.pt")  # as if stopped after epoch 2
    _, s2, rows, _ = _run(tmp_path, "r", "augment=none", "trainer.epochs=3", "trainer.save_every=1", "trainer.resume=auto")
    assert s2["feature_cache"]["reused"] and s2["epochs_run"] == 3 and len(rows) == 4
