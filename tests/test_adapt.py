"""Domain adaptation (adapt=dann|mmd) and the target domain (data.target_root,
data.synthetic.target_style)."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from finetune_cli.config import AdaptConfig, AdaptName
from finetune_cli.data.domains import target_domain
from finetune_cli.errors import FinetuneError
from finetune_cli.tools.table import read_run, render_table
from finetune_cli.train.adapt import Adaptation, mk_mmd, ramp, reverse_gradient

from helpers import assert_same_runs, cli, make_image_folder

# a few images per class, both domains, two epochs: seconds
SHIFT = ["debug=tiny", "data.synthetic.classes=3", "data.synthetic.target_style=shifted", "strategy=full",
         "trainer.epochs=2"]


def rows(run):
    return list(csv.DictReader((run / "metrics.csv").open()))


# --- the pieces ------------------------------------------------------------------------------


def test_ramp_follows_ganin_et_al():
    assert ramp(0.0) == 0.0
    assert ramp(0.25) == pytest.approx(2 / (1 + math.exp(-2.5)) - 1)
    assert 0.99 < ramp(1.0) < 1.0
    assert ramp(2.0) == ramp(1.0)  # progress past the end counts as the end


def test_gradient_reversal_is_identity_forward_and_negated_backward():
    x = torch.randn(4, 3, requires_grad=True)
    y = reverse_gradient(x, 0.3)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, -0.3))


def test_mmd_is_near_zero_for_one_distribution_and_grows_with_the_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
    same = mk_mmd(a, b).item()
    shifted = mk_mmd(a, b + 1.0).item()
    far = mk_mmd(a, b + 3.0).item()
    assert 0 < same < shifted / 5 and shifted < far  # two samples of one distribution: the estimate's bias only
    assert mk_mmd(a, a).item() == pytest.approx(0.0, abs=1e-6)


def test_dann_trains_the_domain_classifier_and_reverses_the_gradient_into_the_features():
    torch.manual_seed(0)
    body, head = torch.nn.Linear(4, 6), torch.nn.Linear(6, 2)
    model = torch.nn.Sequential(body, head)
    adapt = Adaptation(AdaptConfig(name=AdaptName.dann, ramp=False), model, head, 6, target_loader=None,
                       total_steps=10, seed=0)
    images = torch.randn(8, 4)  # 4 source, then 4 target
    logits, domain_loss = adapt.split(adapt.module(images), 4)
    assert logits.shape == (4, 2)
    domain_loss.backward()
    reversed_body, critic_grad = body.weight.grad.clone(), adapt.critic[0].weight.grad.clone()
    body.zero_grad()
    adapt.critic.zero_grad()
    labels = torch.tensor([0.0] * 4 + [1.0] * 4)
    torch.nn.functional.binary_cross_entropy_with_logits(adapt.critic(body(images)).squeeze(1), labels).backward()
    assert critic_grad.abs().sum() > 0 and torch.allclose(critic_grad, adapt.critic[0].weight.grad)
    assert torch.allclose(reversed_body, -body.weight.grad)  # the features are trained to fool it


# --- the target domain's data ----------------------------------------------------------------


def test_a_flat_target_folder_is_read_without_labels_and_val_takes_the_source_indices(tmp_path):
    root = tmp_path / "target"
    flat = root / "train" / "somewhere"
    flat.mkdir(parents=True)
    from PIL import Image

    for i in range(5):
        Image.new("RGB", (20, 20), (10 * i, 0, 0)).save(flat / f"{i}.png")
    make_image_folder(root / "tmp", ["b"], per_class=2, size=20)  # a val/ with only class b
    (root / "tmp" / "train").rename(root / "val")
    tf = lambda image: torch.zeros(1)  # noqa: E731
    domain = target_domain(root, ["a", "b", "c"], tf, tf)
    assert len(domain.train) == 5 and domain.train[0][1] == -1
    assert [y for _, y in domain.val] == [1, 1]  # class b is the source's index 1


def test_a_target_val_class_the_source_lacks_is_refused(tmp_path):
    make_image_folder(tmp_path / "target", ["a", "zebra"], per_class=2, size=20, val=True)
    with pytest.raises(FinetuneError, match="zebra"):
        target_domain(tmp_path / "target", ["a", "b"], lambda i: i, lambda i: i)


# --- runs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dann", "mmd"])
def test_an_adapted_run_reports_both_domains_and_draws_the_features(finetune, method):
    summary, run = finetune(*SHIFT, f"adapt={method}")
    table = rows(run)
    assert {"target_val_acc", "target_val_loss", "domain_loss", "domain_weight"} <= set(table[0])
    assert ("domain_acc" in table[0]) == (method == "dann")
    assert 0 <= float(table[-1]["target_val_acc"]) <= 1
    assert float(table[0]["domain_weight"]) < float(table[-1]["domain_weight"])  # the ramp rises
    t = summary["target"]
    best = summary["best"]["epoch"]
    assert t["target_val_acc"] == pytest.approx(float(table[best - 1]["target_val_acc"]))
    assert summary["adapt"] == method and summary["dataset"]["target_val_images"] == 3 * 4
    assert (run / "adapt_features.png").stat().st_size > 10_000
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ("domain_classifier" in ckpt) == (method == "dann")
    assert not any(k.startswith("critic") for k in ckpt["model"])  # the exported model is the classifier alone
    reported = read_run(run, run.parent)  # the report's row (report.csv) and its table's column
    assert reported.row["target_val_acc"] == pytest.approx(t["target_val_acc"]) and reported.row["adapt"] == method
    assert "target acc" in [c.header for c in render_table([reported]).columns]


def test_source_only_with_a_target_domain_measures_it_and_trains_as_without_one(finetune):
    plain, a = finetune("debug=tiny", "data.synthetic.classes=3", "strategy=full", "trainer.epochs=2", name="plain")
    measured, b = finetune(*SHIFT, "adapt=none", name="measured")
    assert "target_val_acc" in rows(b)[0] and "domain_loss" not in rows(b)[0]
    for col in ("train_loss", "val_loss", "val_acc"):  # the target's images play no part in training
        assert [r[col] for r in rows(a)] == [r[col] for r in rows(b)], col


def test_the_target_labels_are_never_used_in_training(finetune, tmp_path):
    """The same target images in class folders, and in one flat folder without any label, train
    the very same model."""
    make_image_folder(tmp_path / "src", ["a", "b"], per_class=6, size=32, val=True)
    make_image_folder(tmp_path / "t1", ["b", "a"], per_class=6, size=32)
    flat = tmp_path / "t2" / "train"
    flat.mkdir(parents=True)
    for image in sorted((tmp_path / "t1" / "train").rglob("*.png")):  # a/0.png -> a-0.png: the same order
        (flat / f"{image.parent.name}-{image.name}").write_bytes(image.read_bytes())
    common = ["debug=tiny", "data=imagefolder", f"data.root={tmp_path / 'src'}", "strategy=full", "adapt=dann",
              "trainer.epochs=2"]
    _, one = finetune(*common, f"data.target_root={tmp_path / 't1'}", name="one")
    _, two = finetune(*common, f"data.target_root={tmp_path / 't2'}", name="two")
    assert_same_runs(one, two, ("train_loss", "val_acc", "domain_loss", "domain_acc"),
                     states=("model", "domain_classifier"))


def test_an_adapted_run_resumes_exactly(finetune):
    common = [*SHIFT, "adapt=dann", "trainer.epochs=3", "model.weights=synthetic"]
    _, straight = finetune(*common, "trainer.save_every=1", name="straight")
    _, resumed = finetune(*common, f"trainer.resume={straight / 'checkpoints' / 'epoch_001.pt'}", name="resumed")
    assert_same_runs(straight, resumed, ("train_loss", "val_acc", "target_val_acc", "domain_loss", "domain_acc"),
                     states=("model", "domain_classifier"))
    assert (resumed / "adapt_features.png").is_file()  # the "before" features came from the first run's folder


def test_adapting_with_a_frozen_backbone_says_the_features_cannot_move(finetune, caplog):
    finetune(*SHIFT, "adapt=mmd", "strategy=linear_probe", "trainer.epochs=1")
    assert "nothing below the head trains" in caplog.text


@pytest.mark.bad_input
def test_adapt_without_a_target_domain_is_a_clear_error(tmp_path):
    res = cli(["debug=tiny", "adapt=dann"], cwd=tmp_path)
    assert res.returncode != 0
    assert "adapt=dann adapts to a target domain, but none is given" in res.stderr
    assert "data.synthetic.target_style=shifted" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("metrics.csv"))


@pytest.mark.bad_input
def test_a_missing_target_folder_is_a_clear_error(finetune, tmp_path):
    with pytest.raises(FinetuneError, match="data.target_root=.*is not a folder"):
        finetune("debug=tiny", "data=imagefolder", f"data.root={tmp_path}", "adapt=mmd",
                 f"data.target_root={tmp_path / 'nope'}")


@pytest.mark.slow  # 40 s: two CLI runs, one of them two processes
def test_dann_under_two_processes_trains_like_one_process_with_twice_the_batch(tmp_path):
    """Each process takes its share of the source and the target batch; the domain classifier runs
    inside the one DDP wrapper, so its gradients are averaged with the network's."""
    common = [*SHIFT, "adapt=dann", "strategy.bn=freeze_all", "augment=none", "strategy.lr_scale=0.1"]
    one = cli([*common, "data.batch_size=16", "hydra.run.dir=outputs/one"], tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = cli([*common, "data.batch_size=8", "trainer.devices=2", "hydra.run.dir=outputs/two"], tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = rows(tmp_path / "outputs" / "one"), rows(tmp_path / "outputs" / "two")
    for ra, rb in zip(a, b):
        for k in ("train_loss", "val_acc", "target_val_acc", "domain_loss", "domain_acc"):
            assert float(ra[k]) == pytest.approx(float(rb[k]), abs=1e-5), (k, ra["epoch"])


@pytest.mark.bad_input
def test_a_broken_target_image_is_found_by_the_data_check_and_named_under_the_target(finetune, tmp_path):
    make_image_folder(tmp_path / "src", ["a", "b"], per_class=4, size=32, val=True)
    (tmp_path / "tgt").mkdir()
    (tmp_path / "tgt" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(FinetuneError, match=r"1 of 17 images under .*src and .*tgt cannot be used:\n.*broken.png"):
        finetune("debug=tiny", "data=imagefolder", f"data.root={tmp_path / 'src'}", "adapt=dann",
                 f"data.target_root={tmp_path / 'tgt'}")
