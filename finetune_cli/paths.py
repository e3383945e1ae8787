"""Where the tool finds its configuration and keeps its caches."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Optional


def conf_dir() -> Path:
    """The directory holding the Hydra config groups.

    An installed package carries them as ``finetune_cli/conf``; a source checkout keeps them in
    ``conf/`` beside the package.
    """
    checkout = Path(__file__).resolve().parent.parent / "conf"
    if (checkout / "config.yaml").is_file():
        return checkout
    installed = Path(str(resources.files("finetune_cli") / "conf"))
    return installed


def cache_dir(override: Optional[str] = None) -> Path:
    """Cache for generated datasets and synthetic weights."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("FINETUNE_CLI_CACHE"):
        return Path(os.environ["FINETUNE_CLI_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "finetune-cli"
