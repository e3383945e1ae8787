"""What the real CLI says to a newcomer: its help, and a misspelled key."""

import pytest

from helpers import cli


def test_help_names_the_tool_and_shows_how_to_start(tmp_path):
    proc = cli(["--help"], tmp_path)
    assert proc.returncode == 0
    assert "finetune-cli: fine-tune a pretrained torchvision classifier" in proc.stdout
    assert "finetune-cli experiment=quickstart" in proc.stdout and "debug: tiny" in proc.stdout
    assert "finetune is powered by Hydra" not in proc.stdout
    listed = " ".join(proc.stdout.split())  # every torchvision classifier, compactly
    assert "model (80 torchvision classifiers): alexnet, convnext_{base,large,small,tiny}," in listed
    assert "resnet{18,34,50,101,152}" in listed and "vgg{11,11_bn,13,13_bn,16,16_bn,19,19_bn}" in listed
    assert max(len(line) for line in proc.stdout.splitlines() if line.startswith("strategy")) <= 100


def test_compact_names_share_a_leading_word_and_never_split_a_number():
    from finetune_cli.cli import compact_names

    assert compact_names(["resnet50", "resnet18", "alexnet", "resnet101"]) == "alexnet, resnet{18,50,101}"
    assert compact_names(["vgg11", "vgg13_bn", "vit_b_16"]) == "vgg{11,13_bn}, vit_b_16"


def test_a_misspelled_key_is_named_with_the_key_meant(tmp_path):
    proc = cli(["trainer.epoch=3"], tmp_path)
    assert proc.returncode == 1
    assert "Unknown config key 'trainer.epoch'. Did you mean trainer.epochs?" in proc.stderr
    assert "+trainer.epoch" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()  # stopped before any run folder
    proc = cli(["trainr.epochs=3"], tmp_path)
    assert proc.returncode == 1 and "Did you mean trainer.epochs?" in proc.stderr


def test_group_choices_hydra_keys_and_additions_pass_through(tmp_path):
    from finetune_cli.cli import unknown_key

    assert unknown_key(["-m", "strategy=full,linear_probe", "debug=tiny", "hydra.run.dir=x", "hydra/launcher=basic",
                        "+extra=1", "data.synthetic.classes=3", "strategy.stages=[{epochs:1}]", "--cfg", "job"]) is None
    assert "optimizer.lr" in unknown_key(["optimizer.lrr=1"])


@pytest.mark.bad_input
def test_an_unknown_group_option_is_named_with_the_options_meant(tmp_path):
    proc = cli(["model=resnet5", "debug=tiny"], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "Unknown model option 'resnet5'. Did you mean resnet50" in proc.stderr
    assert "any of the 80 torchvision classification models" in proc.stderr
    proc = cli(["-m", "strategy=full,progresive", "debug=tiny"], tmp_path)  # one bad choice of a sweep
    assert proc.returncode == 1 and "Unknown strategy option 'progresive'. Did you mean progressive?" in proc.stderr
    assert "strategy= takes one of: auto, bitfit, discriminative," in proc.stderr
    assert not (tmp_path / "outputs").exists()  # stopped before any run folder


def test_group_choices_hydra_reads_as_valid_are_not_refused():
    """The option check read `strategy=full, linear_probe` as an option named ' linear_probe'."""
    from finetune_cli.cli import unknown_key

    for args in (["strategy=full, linear_probe"], ["strategy=NULL"], ['strategy="full"'], ["model= resnet18"],
                 ["model=glob(res*)"], ["-cd", "mine", "model=mynet"], ["--config-dir=mine", "model=mynet"],
                 ["hydra.searchpath=[file://mine]", "model=mynet"]):
        assert unknown_key(args) is None, args
    assert "Unknown strategy option 'x'" in unknown_key(["strategy=choice(full, x)"])
