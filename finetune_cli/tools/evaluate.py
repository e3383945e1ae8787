"""``finetune-cli-eval CHECKPOINT DIR``: evaluate a checkpoint on a labelled folder (DIR/<class>/*).

Accuracy, top-5 accuracy (when there are more than 5 classes), balanced accuracy (the mean of the
classes' recalls), macro-F1, per-class precision, recall and F1, and the confusion matrix (rows: true class, columns: predicted), printed (scores in percent)
and written to ``metrics.json`` (scores as fractions from 0 to 1) and ``confusion.png``. Class
names come from the checkpoint; a class folder the model does not know is an error.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from rich.console import Console
from rich.table import Table

from finetune_cli.config import DataConfig
from finetune_cli.data.checks import check_images, describe
from finetune_cli.data.folders import class_files, image_folder, make_loader
from finetune_cli.data.transforms import decode_side, eval_transform
from finetune_cli.errors import FinetuneError
from finetune_cli.io_utils import atomic_json, atomic_write_bytes
from finetune_cli.paths import cache_dir
from finetune_cli.runtime import pick_device
from finetune_cli.tools.loading import Loaded, load_for_inference, tool_main, tool_parser
from finetune_cli.tools.table import wide_console
from finetune_cli.train.engine import class_metrics, split_outputs
from finetune_cli.ui import pct


def checked_out(folder: Path, skip_bad: bool) -> frozenset:
    """Every image of ``folder`` opened once, as a training run's data check does: the bad ones
    are refused by path, or left out with ``skip_bad`` (and counted in the result)."""
    files = [f for fs in class_files(folder).values() for f in fs]
    result = check_images(files, DataConfig.max_image_pixels, cache_dir())
    if result.bad and not skip_bad:
        raise FinetuneError(
            f"{len(result.bad)} of {result.checked} images under {folder} cannot be used:\n{describe(result.bad)}\n"
            "Fix or delete them, or pass --skip-bad-images to evaluate without them. Nothing was written."
        )
    if result.bad:
        print(f"Leaving out {len(result.bad)} of {result.checked} images that cannot be used:\n{describe(result.bad)}",
              file=sys.stderr)
    return frozenset(result.bad)


def evaluate_folder(loaded: Loaded, folder: Path, *, batch_size: int, workers: int, device: torch.device,
                    skip_bad: bool = False) -> Dict[str, Any]:
    if not folder.is_dir():
        raise FinetuneError(f"{folder} does not exist: give a folder holding one sub-folder of images per class.")
    left_out = checked_out(folder, skip_bad)
    data = image_folder(folder, eval_transform(loaded.preprocess), left_out, min_side=decode_side(loaded.preprocess))
    unknown = sorted(set(data.classes) - set(loaded.classes))
    if unknown:
        raise FinetuneError(
            f"{folder} has class folders the model does not know: {', '.join(unknown)}. The checkpoint's classes are: "
            f"{', '.join(loaded.classes)}. Rename or remove those folders."
        )
    to_model = torch.tensor([loaded.classes.index(c) for c in data.classes])  # folder index -> model index
    loader = make_loader(data, batch_size=batch_size, num_workers=workers, train=False, seed=0)
    n = len(loaded.classes)
    confusion = torch.zeros(n, n, dtype=torch.long)
    top5_hits = 0
    with torch.inference_mode():
        for images, targets in loader:
            logits, _ = split_outputs(loaded.model(images.to(device)))
            truth = to_model[targets]
            ranked = logits.float().cpu().topk(min(5, n), dim=1).indices
            confusion += torch.bincount(truth * n + ranked[:, 0], minlength=n * n).view(n, n)
            top5_hits += int((ranked == truth[:, None]).any(1).sum())
    total = int(confusion.sum())
    tp = confusion.diag().float()
    predicted = confusion.sum(0).float()
    support = confusion.sum(1).float()
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), torch.zeros_like(tp))
    scores = class_metrics(confusion)
    result: Dict[str, Any] = {
        "checkpoint": str(loaded.path),
        "folder": str(folder),
        "images": total,
        "images_left_out": len(left_out),
        "accuracy": float(tp.sum() / max(total, 1)),
        "top5_accuracy": top5_hits / max(total, 1) if n > 5 else None,
        "balanced_accuracy": scores.get("balanced_acc", 0.0),
        "macro_f1": scores.get("macro_f1", 0.0),
        "classes": loaded.classes,
        "per_class": {
            c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, c in enumerate(loaded.classes)
        },
        "confusion_matrix": confusion.tolist(),
    }
    return result


def _luminance(rgb: Sequence[float]) -> float:
    """WCAG relative luminance of an sRGB colour given as 0..1 floats."""
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb[:3]]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """WCAG contrast ratio between two sRGB colours (1 to 21; 4.5 is the minimum for normal text)."""
    hi, lo = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def text_colour(background: Sequence[float]) -> str:
    """Black or white, whichever contrasts more with the background (always at least 4.58:1)."""
    return "black" if contrast_ratio(background, (0, 0, 0)) >= contrast_ratio(background, (1, 1, 1)) else "white"


SHARE_ABOVE = 6  # more classes than this: each cell also shows its share of the true class (row)


def confusion_figure(result: Dict[str, Any]):
    """The confusion matrix as a matplotlib figure: cells coloured by count from 0 to the largest
    cell, a colour bar, each count written in black or white from the luminance of its own cell
    and, with more than SHARE_ABOVE classes, the row share in percent under the count."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.colors import Normalize

    classes = result["classes"]
    matrix = result["confusion_matrix"]
    n = len(classes)
    peak = max((max(row) for row in matrix if row), default=0) or 1
    norm = Normalize(vmin=0, vmax=peak)
    cmap = plt.get_cmap("Blues")
    side = max(4.5, 0.62 * n + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(matrix, cmap=cmap, norm=norm)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("images", fontsize=10)
    bar.ax.tick_params(labelsize=9)
    tick_size = min(11.0, max(7.0, 12 - 0.25 * n))
    ax.set_xticks(range(n), classes, rotation=90 if n > 6 else 0, fontsize=tick_size)
    ax.set_yticks(range(n), classes, fontsize=tick_size)
    ax.set_xlabel("predicted", fontsize=11)
    ax.set_ylabel("true", fontsize=11)
    ax.set_title(f"Confusion matrix (accuracy {pct(result['accuracy'])})", fontsize=12)
    if n <= 30:
        share = n > SHARE_ABOVE
        cell_size = max(7.0, min(16.0, 16 - 0.5 * n if share else 18 - n))  # cells are about 0.6 inch
        for i, row in enumerate(matrix):
            total = sum(row) or 1
            for j, v in enumerate(row):
                if share and not v:
                    continue  # many classes: blank means none, which keeps the errors easy to spot
                label = f"{v}\n{100 * v / total:.0f}%" if share else str(v)
                ax.text(j, i, label, ha="center", va="center", fontsize=cell_size, linespacing=1.1,
                        color=text_colour(cmap(norm(v))))
    if n > SHARE_ABOVE:
        fig.text(0.01, 0.005, "each cell: count and its share of the true class (row); blank: 0", fontsize=9)
    fig.tight_layout()
    return fig


def confusion_png(result: Dict[str, Any], path: Path) -> None:
    from matplotlib import pyplot as plt

    fig = confusion_figure(result)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def show(result: Dict[str, Any], console: Console) -> None:
    head = f"accuracy {pct(result['accuracy'])} on {result['images']} images"
    if result["top5_accuracy"] is not None:
        head += f", top-5 {pct(result['top5_accuracy'])}"
    console.print(head + f", balanced accuracy {pct(result['balanced_accuracy'])}, macro F1 {pct(result['macro_f1'])}")
    table = Table(title="Per class", title_justify="left")
    for col in ("class", "precision", "recall", "f1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for c, m in result["per_class"].items():
        table.add_row(c, pct(m["precision"]), pct(m["recall"]), pct(m["f1"]), str(m["support"]))
    console.print(table)
    if len(result["classes"]) <= 12:
        cm = Table(title="Confusion matrix (rows: true class, columns: predicted, by number)", title_justify="left")
        cm.add_column("true")
        for i in range(len(result["classes"])):
            cm.add_column(str(i), justify="right")
        for i, (c, row) in enumerate(zip(result["classes"], result["confusion_matrix"])):
            cm.add_row(f"{i} {c}", *[str(v) for v in row])
        console.print(cm)


@tool_main
def main(argv: Optional[List[str]] = None) -> int:
    parser = tool_parser("finetune-cli-eval", __doc__, device=True)
    parser.add_argument("folder", type=Path, help="DIR/<class>/* images")
    parser.add_argument("--out-dir", type=Path, help="where metrics.json and confusion.png go (default: RUN/eval-<DIR name>)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave out images that cannot be read (default: refuse the folder, naming them)")
    args = parser.parse_args(argv)
    device = pick_device(args.device, option="--device")
    loaded = load_for_inference(args.checkpoint, device)
    result = evaluate_folder(loaded, args.folder, batch_size=args.batch_size, workers=args.workers, device=device,
                             skip_bad=args.skip_bad_images)
    out = args.out_dir or (loaded.run_dir or Path.cwd()) / f"eval-{args.folder.resolve().name}"
    out.mkdir(parents=True, exist_ok=True)
    atomic_json(result, out / "metrics.json")
    confusion_png(result, out / "confusion.png")
    show(result, wide_console())
    print(f"Wrote {out / 'metrics.json'} and {out / 'confusion.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


