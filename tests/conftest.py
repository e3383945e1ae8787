import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `helpers` for tests in sub-folders too


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache (synthetic datasets and weights) shared by every test of the session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _isolated_cache(cache_dir, monkeypatch):
    monkeypatch.setenv("FINETUNE_CLI_CACHE", str(cache_dir))
