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
    path = pretrain.synthetic_weights("resnet18", 32, tmp_path, torch.device("cpu"), Fp16(), 0, False)
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
    path = pretrain.synthetic_weights("resnet18", 32, tmp_path, torch.device("cuda"), Precision(torch.float16), 0, False)
    assert len(calls) == 1 and isinstance(calls[0], torch.amp.GradScaler)
    assert calls[0]._scale is not None  # it scaled the loss (the scale is set up on first use)
    saved = torch.load(path, weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
