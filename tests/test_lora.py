"""strategy=lora: LoRA through peft, gated by the layer groups; the plan, what trains, resume,
adapter-only checkpoints, and the tools that merge LoRA into the weights."""

from pathlib import Path

import pytest
import torch
import torchvision
from test_families import REPRESENTATIVES
from torch import nn

from finetune_cli.errors import FinetuneError
from finetune_cli.models import WeightsChoice, create_model
from finetune_cli.models.lora import Adapted, LoraSettings, adapt, choose_targets, inject, is_lora_param, merge

from helpers import assert_same_runs, cli

TINY = ["debug=tiny", "strategy=lora"]


def _state(run: Path, name: str = "last.pt") -> dict:
    return torch.load(run / "checkpoints" / name, weights_only=True)


def _plain(key: str) -> str:
    """The key of the torchvision model's own weight that a LoRA layer wraps."""
    return key.replace(".base_layer.", ".")


def test_the_plan_lists_the_lora_parameters_and_their_shapes(finetune, caplog):
    summary, _ = finetune(*TINY, "strategy.lr_decay=2", "plan=true")
    rows, lora = summary["groups"], summary["lora"]
    built = create_model("resnet18", WeightsChoice("none"), num_classes=10, image_size=32)
    adapt(built, LoraSettings(16, 32.0, 0.0, "all"))
    per_group = {g.name: sum(p.numel() for n, p in g.params if is_lora_param(n)) for g in built.groups}
    assert lora["params"] == sum(per_group.values()) > 0 and lora["rank"] == 16 and lora["layers"] == 20
    for row in rows[:-1]:
        assert row["status"] == f"LoRA only ({per_group[row['group']]:,})", row
    assert rows[-1]["status"] == "train"
    head = sum(p.numel() for g in built.groups[-1:] for _, p in g.params)
    assert summary["trainable_params"] == lora["params"] + head
    assert lora["pct_of_model"] == pytest.approx(100 * lora["params"] / summary["total_params"])
    lrs = [float(r["lr"]) for r in rows]
    assert lrs == sorted(lrs) and lrs[-2] == pytest.approx(lrs[-1] / 2, rel=0.01)  # discriminative LRs hold
    assert "LoRA (peft): rank 16, alpha 32 (updates scaled by 2)" in caplog.text
    assert "3 x 512x512x3x3: A 16x512x3x3 + B 512x16x1x1 = 81,920 each" in caplog.text


def test_a_vision_transformer_gets_lora_on_its_mlp_and_attention_projection(finetune, caplog):
    summary, _ = finetune(*TINY, "model=vit_b_16", "strategy.lora_targets=last", "plan=true")
    status = {r["group"]: r["status"] for r in summary["groups"]}
    assert status["embed"] == status["blocks1"] == status["blocks2"] == "frozen (no LoRA layer)"
    assert status["blocks3"].startswith("LoRA only") and status["blocks4"].startswith("LoRA only")
    assert summary["lora"]["layers"] == 18  # 6 blocks: two MLP linears and the query/key/value weights each
    assert "6 x 2304x768: A 16x768 + B 2304x16 = 49,152 each" in caplog.text


def _changed(a: dict, b: dict, key: str) -> bool:
    return not torch.equal(a[key], b[key])


def built_params(name: str) -> list:
    return [n for n, _ in create_model(name, WeightsChoice("none"), num_classes=10, image_size=32).model.named_parameters()]


def test_a_lora_run_trains_the_lora_matrices_and_the_head_only(finetune):
    """Every other weight stays as it was, bit for bit; with strategy.bn=frozen_eval the BatchNorm
    statistics of groups without LoRA layers (strategy.lora_targets=last) stay too."""
    common = ["debug=tiny", "trainer.epochs=2", "strategy.bn=frozen_eval"]
    _, probe_run = finetune(*common, "strategy=linear_probe", name="probe")  # the same start, nothing below the head moves
    summary, run = finetune(*common, "strategy=lora", "strategy.lora_targets=last", name="lora")
    start, tuned = _state(probe_run)["model"], _state(run)["model"]
    lora = [k for k in tuned if is_lora_param(k)]
    assert lora and all(k.startswith(("layer3.", "layer4.")) for k in lora)
    assert any(tuned[k].any() for k in lora if ".lora_B." in k)  # B starts at zero: it learned
    below = [k for k in tuned if not is_lora_param(k) and not k.startswith("fc.") and "running" not in k
             and "num_batches" not in k]
    assert len(below) == len(built_params("resnet18")) - 2  # every weight and bias below the head
    for key in below:
        assert torch.equal(tuned[key], start[_plain(key)]), f"{key} changed although frozen"
    assert _changed(tuned, start, "fc.weight")
    assert torch.equal(tuned["bn1.running_mean"], start["bn1.running_mean"])  # no LoRA in the stem: held
    assert _changed(tuned, start, "layer4.0.bn1.running_mean")  # the adapted groups follow the data
    built = create_model("resnet18", WeightsChoice("none"), num_classes=10, image_size=32)
    adapt(built, LoraSettings(16, 32.0, 0.0, "last"))
    counted = sum(p.numel() for n, p in built.model.named_parameters() if is_lora_param(n) or n.startswith("fc."))
    assert summary["trainable_params"] == counted
    assert not summary["feature_cache"]["train"]


@pytest.mark.parametrize("save", ["full", "adapter"])
def test_progressive_lora_resumes_exactly(finetune, caplog, save):
    """LoRA matrices start training group by group; a run resumed from its epoch-2 checkpoint ends
    bit-identical to the straight run, from a checkpoint of every weight or of the adapters alone."""
    common = ["debug=tiny", "model.weights=synthetic", "trainer.epochs=4", "strategy=progressive", "strategy.lora=true",
              "strategy.lr_scale=10", f"strategy.lora_save={save}", "strategy.lr_decay=1.5"]
    _, straight = finetune(*common, "trainer.save_every=1", name="straight")
    middle = straight / "checkpoints" / "epoch_002.pt"
    caplog.clear()
    _, resumed = finetune(*common, f"trainer.resume={middle}", name="resumed")
    assert f"Resumed from {middle} after epoch 2: head + LoRA in layer4 train" in caplog.text
    a, b, rows_a, _ = assert_same_runs(straight, resumed, ("train_loss", "val_loss", "val_acc", "lr_head", "lr_layer4",
                                                             "trainable_params", "events"))
    trainable = [int(r["trainable_params"]) for r in rows_a]
    assert trainable == sorted(trainable) and len(set(trainable)) == 4  # one more group's LoRA each epoch
    assert rows_a[1]["events"] == "unfroze layer4 (1/5 groups below the head train)"
    lora_keys = [k for k in a["model"] if is_lora_param(k)]
    if save == "adapter":
        assert a["base"]["left_out"] > 0 and not any(".base_layer." in k for k in a["model"])
        assert set(lora_keys) and {k.split(".")[0] for k in a["model"]} >= {"fc", "layer4"}
        assert middle.stat().st_size * 5 < 45e6  # resnet18's weights alone are 45 MB
    else:
        assert "base" not in a and any(".base_layer." in k for k in a["model"])


def _unmerged(ckpt: dict) -> nn.Module:
    """The trained model with its LoRA layers still apart: the weights as the run trained them."""
    built = create_model(ckpt["model_name"], WeightsChoice("none"), len(ckpt["classes"]), image_size=32)
    inject(built.model, Adapted.from_dict(ckpt["lora"]))
    built.model.load_state_dict(ckpt["model"])
    return built.model.eval()


@pytest.mark.parametrize("save", ["full", "adapter"])
def test_the_tools_merge_lora_into_the_weights_of_a_plain_model(finetune, tmp_path, save):
    from finetune_cli.tools.export import export
    from finetune_cli.tools.loading import load_for_inference

    _, run = finetune("debug=tiny", "model.weights=synthetic", "strategy=lora", "trainer.epochs=2",
                      f"strategy.lora_save={save}", name=save)
    loaded = load_for_inference(str(run))
    merged = loaded.model
    assert type(merged) is torchvision.models.ResNet
    assert not [m for m in merged.modules() if type(m).__module__.startswith("peft")]
    assert merged.state_dict().keys() == torchvision.models.resnet18(num_classes=10).state_dict().keys()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if save == "full":
            reference = _unmerged(torch.load(run / "checkpoints" / "best.pt", weights_only=True))(x)
        else:  # the adapters on the weights they were trained on, merged: as the full checkpoint of the same run
            reference = load_for_inference(str(run)).model(x)
        got = merged(x)
    assert reference.abs().max() > 0.1 and (got - reference).abs().max() <= 1e-5
    # model.weights=RUN/checkpoints/best.pt starts another run from the merged weights
    from finetune_cli.models.weights import read_state_dict

    state = read_state_dict(run / "checkpoints" / "best.pt")
    assert state.keys() == merged.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in merged.state_dict().items())
    card = export(str(run), tmp_path / "export", opset=18, tolerance=1e-4)
    program = torch.export.load(str(tmp_path / "export" / "model.pt2"))
    assert not [k for k in program.state_dict if "lora" in k or "base_layer" in k]
    import onnx

    graph = onnx.load(str(tmp_path / "export" / "model.onnx"))
    assert not [t.name for t in graph.graph.initializer if "lora" in t.name or "base_layer" in t.name]
    assert card["torch_export"]["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("family", sorted(REPRESENTATIVES))
def test_merged_lora_equals_unmerged_and_every_lora_layer_learns(family):
    """The family table's LoRA layers are layers the forward pass calls (a layer the model reads
    weights from without calling it would take no update), and merging them changes no output."""
    name, size = REPRESENTATIVES[family]
    torch.manual_seed(0)
    built = create_model(name, WeightsChoice("none"), num_classes=3, image_size=size)
    tuner = inject(built.model, choose_targets(built.model, built.family, built.groups, LoraSettings(4, 8.0, 0.0, "all")))
    model = built.model.eval()
    for n, p in model.named_parameters():
        if ".lora_B." in n:
            nn.init.normal_(p, std=0.02)
    x = torch.randn(2, 3, size, size)
    model(x).sum().backward()
    idle = sorted({n.split(".lora_")[0] for n, p in model.named_parameters()
                   if is_lora_param(n) and (p.grad is None or not p.grad.any())})
    assert not idle, f"LoRA layers that never run: {idle[:4]}"
    with torch.no_grad():
        want = model(x)
        got = merge(tuner)(x)
    assert not [m for m in model.modules() if type(m).__module__.startswith("peft")]
    assert (got - want).abs().max() / want.abs().max().clamp(min=1.0) <= 1e-5


def test_an_adapter_checkpoint_refuses_other_base_weights():
    from finetune_cli.train.checkpoint import load_model_state

    model = nn.Linear(2, 2)
    ckpt = {"path": "x.pt", "model": {}, "base": {"left_out": 2, "sha256": "aaa"},
            "config": {"model": {"weights": "synthetic"}}}
    with pytest.raises(FinetuneError, match="not the ones it was trained on"):
        load_model_state(model, ckpt, "bbb")
    load_model_state(model, ckpt, "aaa")  # the same weights: the two it left out are the model's own


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "overrides, needle",
    [
        ("strategy=lora strategy.lora_rank=0", "strategy.lora_rank=0 is out of range"),
        ("strategy=lora strategy.lora_dropout=1.5", "strategy.lora_dropout=1.5 is out of range"),
        ("strategy=lora strategy.lora_targets=first", "strategy.lora_targets"),
        ("strategy=lora strategy.lora_save=adapter model.weights=null",
         "strategy.lora_save=adapter keeps only what trains"),
        ("strategy=linear_probe strategy.lora=true", "strategy.name=linear_probe trains none there"),
        ("strategy=auto strategy.lora=true", "choose it yourself"),
        ("strategy=partial strategy.lora=true strategy.lora_targets=last strategy.train_groups=1 model=vit_b_16 "
         "data.image_size=32 strategy.lora_dropout=0.1", "Set strategy.lora_dropout=0"),
        ("strategy=progressive strategy.lora=true strategy.until=0", "trains none there (strategy.until=0)"),
    ],
)
def test_bad_lora_settings_stop_before_any_folder_without_a_traceback(tmp_path, refused, overrides, needle):
    """The first two through the real CLI (exit code, no traceback, no folder); the rest through the
    same check in this process."""
    if "lora_targets=first" in overrides or "lora_rank=0" in overrides:
        proc = cli(["debug=tiny", *overrides.split()], tmp_path)
        assert proc.returncode != 0
        assert needle in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr + proc.stdout
        assert not (tmp_path / "outputs").exists()
    else:
        assert needle in refused("debug=tiny", *overrides.split())


def test_groups_that_train_without_a_lora_layer_are_refused():
    from finetune_cli.models.lora import check_reach

    built = create_model("vit_b_16", WeightsChoice("none"), num_classes=3, image_size=32)
    adapt(built, LoraSettings(4, 8.0, 0.0, "last"))
    check_reach(built.groups, 1)  # blocks4 holds LoRA layers
    embed, blocks1, _, blocks3, _, head = built.groups
    with pytest.raises(FinetuneError, match=r"No LoRA layer is in the groups this strategy trains below the head "
                                            r"\(blocks1\): the LoRA layers are in blocks3"):
        check_reach([embed, blocks3, blocks1, head], 1)  # a strategy that would train blocks1 alone
