"""conf/model/: one option per torchvision classification model, so that ``model=<name>`` works
for every one of them (``model.name=<name>`` works too). The files are generated from the
installed torchvision; after upgrading it, write them again (a test fails until then):

    python -m finetune_cli.models.model_options
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Tuple

from torchvision.models import get_model_weights

from finetune_cli.models.factory import check_model_name, classification_models, smallest_input


def option_text(name: str) -> str:
    """The YAML of ``model=<name>``: the name, torchvision's best weights, and a comment on what it is."""
    family = check_model_name(name)
    default = get_model_weights(name).DEFAULT
    return (
        f"# torchvision.models.{name} ({family.name} family): inputs of at least {smallest_input(name)} px;\n"
        f"# weights: DEFAULT is torchvision's {default.name}; also another of its weights by name, a weights\n"
        f"# file, synthetic (pretrained here on a synthetic task), or null (random init).\n"
        f"name: {name}\n"
        f"weights: DEFAULT\n"
    )


def wanted_options() -> Dict[str, str]:
    return {name: option_text(name) for name in classification_models()}


def out_of_date(folder: Path) -> Tuple[List[str], List[str], List[str]]:
    """(missing, extra, changed) option names of ``folder`` against the installed torchvision."""
    wanted = wanted_options()
    have = {p.stem: p.read_text() for p in Path(folder).glob("*.yaml")}
    missing = sorted(set(wanted) - set(have))
    extra = sorted(set(have) - set(wanted))
    changed = sorted(n for n in set(wanted) & set(have) if have[n] != wanted[n])
    return missing, extra, changed


def write_options(folder: Path) -> List[str]:
    """Write every option, remove options of models torchvision no longer has; the names written
    (a file already as wanted is left alone)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wanted = wanted_options()
    for stale in folder.glob("*.yaml"):
        if stale.stem not in wanted:
            stale.unlink()
    written = []
    for name, text in wanted.items():
        path = folder / f"{name}.yaml"
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            written.append(name)
    return written


def main() -> int:
    from finetune_cli.paths import conf_dir

    folder = conf_dir() / "model"
    written = write_options(folder)
    print(f"{folder}: {len(list(folder.glob('*.yaml')))} model options, {len(written)} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
