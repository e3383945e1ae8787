"""Torchvision downloads are hash-checked and read once; every source of weights keeps its own
classifier as the source head; synthetic pretraining saves its head and scales fp16 losses.
No test touches the network: torch hub's ``urlopen`` is replaced by a local server of bytes."""

import email.message
import hashlib
import io

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import ResNet18_Weights

from finetune_cli.config import HeadType
from finetune_cli.errors import FinetuneError
from finetune_cli.models import HeadSpec, WeightsChoice, create_model
from finetune_cli.models.weights import ensure_downloaded, hub_file


class _Response(io.BytesIO):
    def info(self):
        headers = email.message.Message()
        headers["Content-Length"] = str(len(self.getvalue()))
        return headers


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline torch hub: $TORCH_HOME in tmp_path, and ``serve[url] = bytes`` answers downloads
    (``requests`` lists the URLs asked for)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    served, requests = {}, []

    def urlopen(req, *args, **kwargs):
        requests.append(req.full_url)
        if req.full_url not in served:
            raise OSError("network is off in tests")
        return _Response(served[req.full_url])

    monkeypatch.setattr(torch.hub, "urlopen", urlopen)
    return served, requests


def _bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_a_download_whose_hash_does_not_match_is_refused(hub):
    served, requests = hub
    weights = ResNet18_Weights.IMAGENET1K_V1  # its file name carries the first digits of its SHA-256
    served[weights.url] = _bytes(torchvision.models.resnet18().state_dict())  # not the published file
    with pytest.raises(FinetuneError) as err:
        ensure_downloaded(weights, progress=False)
    message = str(err.value)
    assert "invalid hash value" in message and "not the published one" in message
    for remedy in ("connect to the internet", str(hub_file(weights)), "model.weights=/path/to/weights.pth",
                   "model.weights=synthetic", "model.weights=null"):
        assert remedy in message
    assert requests == [weights.url]
    assert not hub_file(weights).exists()  # nothing corrupt is left in the cache
    assert list(hub_file(weights).parent.iterdir()) == []


def test_offline_download_names_the_remedies(hub):
    with pytest.raises(FinetuneError, match="Could not download pretrained weights ResNet18_Weights.IMAGENET1K_V1"):
        ensure_downloaded(ResNet18_Weights.IMAGENET1K_V1, progress=False)


def test_a_checked_download_is_read_by_the_model_without_a_second_download(hub, monkeypatch):
    served, requests = hub
    torch.manual_seed(3)
    published = torchvision.models.resnet18().state_dict()
    data = _bytes(published)
    url = f"https://download.invalid/resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    monkeypatch.setattr(ResNet18_Weights, "url", property(lambda self: url))
    served[url] = data

    built = create_model("resnet18", WeightsChoice("torchvision", ResNet18_Weights.IMAGENET1K_V1), 3, image_size=32)
    assert requests == [url]  # one download; the builder read the cached file
    assert hub_file(ResNet18_Weights.IMAGENET1K_V1).read_bytes() == data
    assert torch.equal(built.model.layer4[1].conv2.weight, published["layer4.1.conv2.weight"])
    assert built.model.fc.out_features == 3
    # the source head is torchvision's own 1000-way classifier, as published
    assert isinstance(built.source_head, nn.Linear) and built.source_head.out_features == 1000
    assert torch.equal(built.source_head.weight, published["fc.weight"])
    assert all(built.source_head is not m for m in built.model.modules())

    create_model("resnet18", WeightsChoice("torchvision", ResNet18_Weights.IMAGENET1K_V1), 3, image_size=32)
    assert requests == [url]  # cached: no download at all


def _file(tmp_path, obj, name="w.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return WeightsChoice("file", path=path)


def test_a_weights_file_head_of_other_classes_becomes_the_source_head(tmp_path):
    torch.manual_seed(0)
    state = torchvision.models.resnet18(num_classes=7).state_dict()
    built = create_model("resnet18", _file(tmp_path, state), 3, image_size=32)
    assert built.model.fc.out_features == 3  # the target head is fresh
    assert isinstance(built.source_head, nn.Linear) and built.source_head.out_features == 7
    assert torch.equal(built.source_head.weight, state["fc.weight"])
    assert torch.equal(built.source_head.bias, state["fc.bias"])


def test_an_mlp_head_in_a_checkpoint_becomes_the_source_head(tmp_path):
    torch.manual_seed(0)
    spec = HeadSpec(HeadType.mlp, 16, 0.1)
    old = create_model("resnet18", WeightsChoice("none"), 5, head=spec, image_size=32)
    state = old.model.state_dict()
    built = create_model("resnet18", _file(tmp_path, {"model": state}), 3, head=spec, image_size=32)
    assert built.source_head[-1].out_features == 5 and built.source_head[0].out_features == 16
    assert torch.equal(built.source_head[1].running_var, state["fc.1.running_var"])


def test_a_headless_file_has_no_source_head(tmp_path):
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    built = create_model("resnet18", _file(tmp_path, state), 3, image_size=32)
    assert built.source_head is None
    assert create_model("resnet18", WeightsChoice("none"), 3, image_size=32).source_head is None


def test_a_source_head_kept_apart_never_loads_into_the_target_head(tmp_path):
    """Synthetic weights: the source task has other classes, even when their number matches."""
    torch.manual_seed(0)
    full = torchvision.models.resnet18(num_classes=3).state_dict()
    backbone = {k: v for k, v in full.items() if not k.startswith("fc.")}
    head = {k: v for k, v in full.items() if k.startswith("fc.")}
    built = create_model("resnet18", _file(tmp_path, {"model": backbone, "source_head": head}), 3, image_size=32)
    assert not torch.equal(built.model.fc.weight, head["fc.weight"])  # fresh target head
    assert torch.equal(built.source_head.weight, head["fc.weight"])
    assert torch.equal(built.model.layer1[0].conv1.weight, full["layer1.0.conv1.weight"])


class _Scaler:
    """Stands in for a GradScaler: records that training got it."""


def _small_pretraining(monkeypatch, calls):
    from finetune_cli.models import pretrain
    from finetune_cli.train import engine

    monkeypatch.setattr(pretrain, "SOURCE", dict(classes=3, train_per_class=4, val_per_class=2, seed=1234))
    monkeypatch.setattr(pretrain, "EPOCHS", 1)

    def recording(*args, **kwargs):
        calls.append(kwargs.get("scaler"))
        if isinstance(kwargs.get("scaler"), _Scaler):
            kwargs["scaler"] = None
        return engine.train_one_epoch(*args, **kwargs)

    monkeypatch.setattr(pretrain, "train_one_epoch", recording)
    return pretrain


def test_synthetic_pretraining_uses_the_precision_scaler_and_saves_its_head(tmp_path, monkeypatch):
    from finetune_cli.train.engine import Precision

    scaler = _Scaler()

    class Fp16(Precision):  # the scaler fp16 would give on CUDA, here on CPU
        def scaler(self, device):
            return scaler

    calls = []
    pretrain = _small_pretraining(monkeypatch, calls)
    path = pretrain.synthetic_weights("resnet18", tmp_path, torch.device("cpu"), Fp16(), 0, False)
    assert calls == [scaler]

    saved = torch.load(path, weights_only=True)
    assert not any(k.startswith("fc.") for k in saved["model"])
    assert saved["source_head"]["fc.weight"].shape == (3, 512)
    built = create_model("resnet18", WeightsChoice("file", path=path), 4, image_size=32)
    assert built.source_head.out_features == 3
    assert torch.equal(built.source_head.weight, saved["source_head"]["fc.weight"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_synthetic_pretraining_in_fp16_on_cuda_scales_the_loss(tmp_path, monkeypatch):
    from finetune_cli.train.engine import Precision

    calls = []
    pretrain = _small_pretraining(monkeypatch, calls)
    path = pretrain.synthetic_weights("resnet18", tmp_path, torch.device("cuda"), Precision(torch.float16), 0, False)
    assert len(calls) == 1 and isinstance(calls[0], torch.amp.GradScaler)
    assert calls[0]._scale is not None  # it scaled the loss (the scale is set up on first use)
    saved = torch.load(path, weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_synthetic_weights_are_pretrained_once_at_the_smallest_size_and_serve_every_size(tmp_path, monkeypatch):
    from finetune_cli.train.engine import Precision

    calls = []
    pretrain = _small_pretraining(monkeypatch, calls)
    path = pretrain.synthetic_weights("resnet18", tmp_path, torch.device("cpu"), Precision(None), 0, False)
    assert "-32px-" in path.name and calls == [None]
    again = pretrain.synthetic_weights("resnet18", tmp_path, torch.device("cpu"), Precision(None), 0, False)
    assert again == path and len(calls) == 1  # cached: no second pretraining
    saved = torch.load(path, weights_only=True)["model"]
    for size in (32, 64):
        built = create_model("resnet18", WeightsChoice("file", path=path), 4, image_size=size)
        assert torch.equal(built.model.layer4[0].conv1.weight, saved["layer4.0.conv1.weight"])


def test_smallest_sizes_follow_the_family_table():
    from finetune_cli.models.pretrain import pretrain_size

    assert pretrain_size("resnet18") == 32
    assert pretrain_size("inception_v3") == 75
    assert pretrain_size("maxvit_t") == 224
    assert pretrain_size("vit_b_16") == 32
    assert pretrain_size("vit_h_14") == 42  # a whole number of 14-px patches


def test_vit_weights_saved_at_one_size_load_at_another(tmp_path):
    small = create_model("vit_b_32", WeightsChoice("none"), 3, image_size=32).model
    path = tmp_path / "vit.pt"
    torch.save(small.state_dict(), path)
    built = create_model("vit_b_32", WeightsChoice("file", path=path), 3, image_size=96)
    assert built.model.encoder.pos_embedding.shape == (1, 1 + 3 * 3, 768)
    assert torch.equal(built.model.encoder.layers[0].mlp[0].weight, small.encoder.layers[0].mlp[0].weight)
    assert built.model(torch.zeros(1, 3, 96, 96)).shape == (1, 3)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mnasnet0_5"])
def test_pretraining_lets_batchnorm_statistics_follow_a_short_run(name):
    """These families ship BatchNorm momenta of 0.01 or 0.0003: after a few hundred steps from
    random init their running statistics were still near init, and the source task's validation
    accuracy sat at chance (6.2% of 16 classes) while training accuracy rose."""
    from torchvision.models import get_model

    from finetune_cli.models.pretrain import BN_MOMENTUM, _quicker_norm_statistics

    model = get_model(name)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert min(m.momentum for m in norms) < BN_MOMENTUM
    _quicker_norm_statistics(model)
    assert min(m.momentum for m in norms) == BN_MOMENTUM


@pytest.mark.slow
def test_mobilenet_v3_pretraining_learns_above_chance(tmp_path):
    from finetune_cli.models.pretrain import SOURCE, synthetic_weights
    from finetune_cli.train.engine import Precision

    path = synthetic_weights("mobilenet_v3_small", tmp_path, torch.device("cpu"), Precision(None), 0, False)
    assert torch.load(path, weights_only=True)["source_val_acc"] > 2 / SOURCE["classes"]
