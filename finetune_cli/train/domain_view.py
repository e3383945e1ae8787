"""``adapt_features.png``: the head's input features of the source and the target val images,
projected to 2-D by PCA, before training and after it, coloured by domain and marked by class.
Aligned domains overlap; a domain gap shows as two clouds."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from torch.utils.data import Dataset, Subset

from finetune_cli.data.folders import make_loader
from finetune_cli.io_utils import atomic_write_bytes
from finetune_cli.models.tail import Tail
from finetune_cli.train.engine import Precision
from finetune_cli.train.features import extract

MARKERS = "os^vDPX*h<>p"
PER_DOMAIN = 300  # images drawn from each domain's val set


def spread(dataset: Dataset, limit: int) -> Dataset:
    """At most ``limit`` items, evenly spaced over the set (so every class shows)."""
    n = len(dataset)
    if n <= limit:
        return dataset
    return Subset(dataset, [round(i * (n - 1) / (limit - 1)) for i in range(limit)])


def domain_features(model: torch.nn.Module, tail: Tail, source: Dataset, target: Dataset, device: torch.device,
                    precision: Precision, workers: int) -> Dict[str, torch.Tensor]:
    """The head's input for up to ``PER_DOMAIN`` val images of each domain, and their classes."""
    found: Dict[str, torch.Tensor] = {}
    for name, data in (("source", source), ("target", target)):
        loader = make_loader(spread(data, PER_DOMAIN), batch_size=64, num_workers=workers, train=False, seed=0)
        feats, labels = extract(model, tail, loader, device, precision, desc=f"features ({name} val)")
        found[f"{name}_features"], found[f"{name}_labels"] = feats.flatten(1).float(), labels
    return found


def project(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Both domains on the first two principal axes of their features taken together."""
    x = torch.cat([source, target]).double()
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return (x @ v[:2].T).float()


def picture(before: Dict[str, torch.Tensor], after: Dict[str, torch.Tensor], classes: Sequence[str],
            title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    for ax, (when, f) in zip(axes, (("before training", before), ("after training", after))):
        n = len(f["source_features"])
        xy = project(f["source_features"], f["target_features"])
        for domain, rows, labels, colour in (("source", xy[:n], f["source_labels"], "tab:blue"),
                                             ("target", xy[n:], f["target_labels"], "tab:orange")):
            for c in sorted(set(labels.tolist())):
                pts = rows[labels == c]
                ax.scatter(pts[:, 0], pts[:, 1], s=14, c=colour, marker=MARKERS[c % len(MARKERS)], alpha=0.6,
                           linewidths=0)
        ax.set_title(when)
        ax.set_xticks([])
        ax.set_yticks([])
    handles: List[Line2D] = [Line2D([], [], ls="", marker="o", color=c, label=d)
                             for d, c in (("source", "tab:blue"), ("target", "tab:orange"))]
    handles += [Line2D([], [], ls="", marker=MARKERS[i % len(MARKERS)], color="grey", label=name)
                for i, name in enumerate(classes)]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_picture(path: Path, before: Dict[str, torch.Tensor], after: Dict[str, torch.Tensor],
                  classes: Sequence[str], title: str) -> None:
    atomic_write_bytes(path, picture(before, after, classes, title))
