"""``safe_torch_load`` refuses pickles that would import anything beyond tensors and plain
containers, naming exactly what the file asked for."""

import pickle

import pytest
import torch

from finetune_cli.errors import FinetuneError
from finetune_cli.io_utils import refused_globals, safe_torch_load


class _Opens:
    def __reduce__(self):
        return (open, ("/nonexistent/never-created", "w"))


def test_a_saved_module_is_refused_naming_its_class(tmp_path):
    """A whole module (not its state dict) is refused for its class, not for the containers
    around it that weights_only allows."""
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(FinetuneError) as err:
        safe_torch_load(path)
    message = str(err.value)
    assert "it would import torch.nn.modules.linear.Linear" in message
    assert "builtin" not in message  # set / OrderedDict are allowed: not named as the problem
    assert "state_dict()" in message  # the remedy


@pytest.mark.parametrize("kind", ["zip", "plain"])
def test_refused_globals_of_zip_and_plain_pickles(tmp_path, kind):
    path = tmp_path / "evil.pt"
    payload = {"model": {"w": torch.zeros(2), "x": _Opens()}}
    if kind == "zip":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=4)
    assert refused_globals(path) == ["io.open"]
    with pytest.raises(FinetuneError, match="it would import io.open"):
        safe_torch_load(path)


def test_a_plain_state_dict_loads(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save({"model": torch.nn.Linear(2, 2).state_dict(), "epoch": 3}, path)
    assert refused_globals(path) == []
    assert safe_torch_load(path)["epoch"] == 3
