"""Config composition through Hydra's compose API: every group option composes into the typed
schema; wrong types, misspelled keys and unknown choices fail during composition."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from finetune_cli.checks import problems
from finetune_cli.cli import unique_dir  # noqa: F401  (registers the resolver and the schema)
from finetune_cli.config import Config, StrategyName
from finetune_cli.paths import conf_dir

GROUPS = ["model", "strategy", "optimizer", "schedule", "augment", "data", "trainer", "regularizer", "experiment",
          "hparams_search"]


def _compose(overrides=()):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _options(group):
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def test_every_group_exists_with_options():
    for group in GROUPS:
        assert _options(group), group


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes_into_the_schema(group):
    for option in _options(group):
        cfg = _compose([f"{group}={option}"])
        typed = OmegaConf.to_object(cfg)
        assert isinstance(typed, Config)


def test_model_options_are_every_torchvision_classifier():
    """Users typed model=mobilenet_v3_large and got "Could not find 'model/...'": 9 of 80 had a file."""
    from finetune_cli.models.factory import classification_models
    from finetune_cli.models.model_options import out_of_date

    assert out_of_date(conf_dir() / "model") == ([], [], []), "python -m finetune_cli.models.model_options"
    assert _options("model") == classification_models() and len(_options("model")) >= 80


def test_model_options_are_written_again_after_a_torchvision_upgrade(tmp_path):
    from finetune_cli.models.model_options import option_text, out_of_date, write_options

    (tmp_path / "resnet18.yaml").write_text(option_text("resnet18"))
    (tmp_path / "resnet18.yaml").write_text("name: resnet18\n")  # an older text
    (tmp_path / "gone_net.yaml").write_text("name: gone_net\n")  # a model torchvision dropped
    missing, extra, changed = out_of_date(tmp_path)
    assert "swin_t" in missing and extra == ["gone_net"] and changed == ["resnet18"]
    written = write_options(tmp_path)
    assert "resnet18" in written and "swin_t" in written
    assert out_of_date(tmp_path) == ([], [], []) and write_options(tmp_path) == []


def test_model_files_name_their_model():
    for option in _options("model"):
        assert OmegaConf.to_object(_compose([f"model={option}"])).model.name == option


def test_defaults_and_user_keys():
    cfg = OmegaConf.to_object(
        _compose(
            [
                "model=resnet50", "model.weights=IMAGENET1K_V2", "data.root=/x", "data.image_size=64",
                "data.batch_size=8", "data.num_workers=3", "optimizer.lr=0.5", "optimizer.weight_decay=0",
                "trainer.epochs=2", "trainer.device=cpu", "trainer.seed=7", "strategy=freeze_early",
            ]
        )
    )
    assert cfg.model.name == "resnet50" and cfg.model.weights == "IMAGENET1K_V2"
    assert (cfg.data.root, cfg.data.image_size, cfg.data.batch_size, cfg.data.num_workers) == ("/x", 64, 8, "3")
    assert (cfg.optimizer.lr, cfg.trainer.epochs, cfg.trainer.seed) == (0.5, 2, 7)
    assert cfg.strategy.name == StrategyName.freeze_early


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.epochs=abc", "trainer.epochs"),
        ("trainer.epoch=3", "trainer.epoch"),
        ("optimizer.lr=fast", "optimizer.lr"),
        ("trainer.device=gpu", "trainer.device"),
        ("strategy.name=magic", "strategy.name"),
    ],
)
def test_bad_overrides_fail_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException) as info:
        _compose([override])
    text = str(info.value) + str(info.value.__cause__)
    assert key.split(".")[-1] in text


@pytest.mark.bad_input
def test_appended_keys_outside_the_schema_are_rejected():
    from finetune_cli.checks import typed_config
    from finetune_cli.errors import FinetuneError

    with pytest.raises(FinetuneError, match=r"Unknown config key\(s\): data.extra, trainer.foo"):
        typed_config(_compose(["+data.extra=1", "+trainer.foo=2"]))


@pytest.mark.bad_input
def test_unknown_group_option_fails():
    with pytest.raises(Exception, match="Could not find 'model/resnet9000'"):
        _compose(["model=resnet9000"])


def test_quickstart_experiment_is_offline():
    cfg = OmegaConf.to_object(_compose(["experiment=quickstart"]))
    assert cfg.model.weights == "synthetic" and cfg.data.source.value == "synthetic"
    assert problems(cfg) == []


@pytest.mark.bad_input
def test_semantic_problems_are_all_reported(tmp_path):
    cfg = OmegaConf.to_object(
        _compose(["model.name=resnet19", "data.root=" + str(tmp_path / "missing"), "optimizer.lr=0", "data.num_workers=many"])
    )
    found = "\n".join(problems(cfg))
    for needle in ("Unknown model 'resnet19'", "Did you mean resnet18", "does not exist", "optimizer.lr", "data.num_workers=many"):
        assert needle in found


def test_unique_dir_never_reuses_a_folder(tmp_path):
    base = str(tmp_path / "2026-01-01" / "10-00-00")
    first, second, third = unique_dir(base), unique_dir(base), unique_dir(base)
    assert len({first, second, third}) == 3
    assert all(Path(p).is_dir() for p in (first, second, third))
    assert Path(second).name == "10-00-00-2"


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "override, needle",
    [
        ("trainer.grad_clip=-1", "trainer.grad_clip=-1.0 is out of range: the largest gradient norm"),
        ("schedule.gamma=-1", "schedule.gamma=-1.0 is out of range"),
        ("optimizer.weight_decay=-1", "optimizer.weight_decay=-1.0 is out of range"),
        ("schedule.min_lr_ratio=5", "schedule.min_lr_ratio=5.0 is out of range: the cosine floor"),
        ("augment.mixup_alpha=nan", "augment.mixup_alpha must be 0 or more"),
        ("optimizer.betas=[0.9,1.5]", "optimizer.betas=[0.9, 1.5] is out of range"),
        ("optimizer.betas=[0.9]", "optimizer.betas needs two numbers"),
        ("schedule.pct_start=2", "schedule.pct_start=2.0 is out of range"),
        ("schedule.restart_mult=0", "schedule.restart_mult=0 is out of range"),
        ("model.head_hidden=0", "model.head_hidden=0 is out of range"),
        ("optimizer.lr=inf", "optimizer.lr must be greater than 0"),
        ("strategy.lr_decay=0.5", "strategy.lr_decay=0.5 is out of range"),
        ("trainer.min_delta=nan", "trainer.min_delta=nan is out of range"),
    ],
)
def test_nonsense_numbers_are_refused_naming_key_and_range(override, needle):
    """Each of these once trained the wrong way and exited 0 (grad_clip=-1 took the loss from
    22.9 to 182; gamma=-1 gave a negative LR)."""
    found = "\n".join(problems(OmegaConf.to_object(_compose(["data=synthetic", override]))))
    assert needle in found, found


def test_a_mistyped_number_is_answered_without_importing_torch(tmp_path):
    """torch and torchvision take about 5 s to import: the settings' own checks need neither."""
    code = (
        "import sys\n"
        "from finetune_cli.cli import ready_to_run\n"
        "from finetune_cli.checks import typed_config\n"
        "from finetune_cli.errors import FinetuneError\n"
        "from hydra import compose, initialize_config_dir\n"
        "from finetune_cli.paths import conf_dir\n"
        "with initialize_config_dir(config_dir=str(conf_dir()), version_base='1.3'):\n"
        "    cfg = compose(config_name='config', overrides=['data=synthetic', 'trainer.epochs=0'])\n"
        "try:\n"
        "    ready_to_run(typed_config(cfg))\n"
        "except FinetuneError as exc:\n"
        "    print('refused:', exc)\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path).stdout
    assert "refused: Invalid configuration: trainer.epochs must be greater than 0" in out
    assert "torch imported: False" in out
