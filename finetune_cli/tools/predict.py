"""``finetune-cli-predict CHECKPOINT PATH...``: top-k classes for images or folders of images.

Uses the checkpoint's own preprocessing, in batches. Prints a table and writes
``predictions.csv`` and ``predictions.json`` into the run folder the checkpoint belongs to (the
current folder for a checkpoint outside a run folder), or ``--out-dir``. An image that cannot be
read gets an error row; the others are still predicted. A file named on the command line must be an
image; files in a given folder that are not images are skipped and counted.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from rich.table import Table
from torch.utils.data import DataLoader, Dataset

from finetune_cli.data.folders import EXTENSIONS, is_image, load_rgb
from finetune_cli.data.transforms import decode_side, eval_transform
from finetune_cli.errors import FinetuneError
from finetune_cli.io_utils import atomic_json, atomic_write_bytes, text_bytes
from finetune_cli.runtime import pick_device
from finetune_cli.tools.loading import load_for_inference, run_dir_of, tool_main, tool_parser
from finetune_cli.tools.table import wide_console
from finetune_cli.train.engine import split_outputs


def collect(paths: List[Path]) -> List[Path]:
    """The images to predict: files named as given (each must have an image extension), and the
    images found in folders, searched recursively; other files in those folders are skipped and counted."""
    files: List[Path] = []
    skipped = 0
    accepted = ", ".join(EXTENSIONS)
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file())
            images = [f for f in found if is_image(str(f))]
            skipped += len(found) - len(images)
            files += images
        elif p.is_file():
            if not str(p).lower().endswith(EXTENSIONS):
                raise FinetuneError(
                    f"{p} is not an image file: the accepted extensions are {accepted}. Give image files "
                    "or folders of images."
                )
            files.append(p)
        else:
            raise FinetuneError(f"{p} does not exist: give image files or folders of images.")
    if skipped:
        print(f"Skipped {skipped} file(s) in the given folder(s) that are not images ({accepted}).")
    if not files:
        raise FinetuneError(f"No images found in {', '.join(map(str, paths))} (accepted extensions: {accepted}).")
    return files


class _Images(Dataset):
    def __init__(self, files: List[Path], transform, min_side: int):
        self.files, self.transform, self.min_side = files, transform, min_side

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return self.transform(load_rgb(str(self.files[i]), self.min_side)), i, ""
        except Exception as exc:  # one bad file must not stop the others
            return torch.zeros(0), i, f"{type(exc).__name__}: {exc}"


def _collate(batch):
    good = [(x, i) for x, i, err in batch if not err]
    bad = [(i, err) for _, i, err in batch if err]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, [i for _, i in good], bad


def predict(checkpoint: str, paths: List[Path], *, top_k: int, batch_size: int, device: torch.device) -> List[Dict[str, Any]]:
    if top_k < 1:
        raise FinetuneError(f"--top-k {top_k}: give 1 or more.")
    loaded = load_for_inference(checkpoint, device)
    files = collect(paths)
    k = min(top_k, len(loaded.classes))
    if k < top_k:
        print(f"--top-k {top_k} lowered to {k}: the model has only {k} classes.")
    loader = DataLoader(_Images(files, eval_transform(loaded.preprocess), decode_side(loaded.preprocess)), batch_size=batch_size, collate_fn=_collate)
    rows: List[Optional[Dict[str, Any]]] = [None] * len(files)
    with torch.inference_mode():
        for images, idx, bad in loader:
            for i, err in bad:
                rows[i] = {"path": str(files[i]), "top": [], "error": err}
            if images is None:
                continue
            logits, _ = split_outputs(loaded.model(images.to(device)))
            probs, classes = torch.softmax(logits.float(), 1).topk(k, dim=1)
            for j, i in enumerate(idx):
                rows[i] = {
                    "path": str(files[i]),
                    "top": [{"class": loaded.classes[int(c)], "prob": float(p)} for p, c in zip(probs[j], classes[j])],
                    "error": "",
                }
    return [r for r in rows if r is not None]


def write_outputs(rows: List[Dict[str, Any]], out: Path, k: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_json(rows, out / "predictions.json")
    buf = io.StringIO()
    fields = ["path"] + [f"{name}{r}" for r in range(1, k + 1) for name in ("class", "prob")] + ["error"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        flat = {"path": row["path"], "error": row["error"]}
        for r, t in enumerate(row["top"], 1):
            flat[f"class{r}"], flat[f"prob{r}"] = t["class"], f"{t['prob']:.6f}"
        writer.writerow(flat)
    atomic_write_bytes(out / "predictions.csv", text_bytes(buf.getvalue()))


@tool_main
def main(argv: Optional[List[str]] = None) -> int:
    parser = tool_parser("finetune-cli-predict", __doc__, device=True)
    parser.add_argument("paths", type=Path, nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out-dir", type=Path,
                        help="where predictions.csv/json go (default: the checkpoint's run folder, else .)")
    args = parser.parse_args(argv)
    device = pick_device(args.device, option="--device")
    rows = predict(args.checkpoint, args.paths, top_k=args.top_k, batch_size=args.batch_size, device=device)
    k = max((len(r["top"]) for r in rows), default=1)
    table = Table()
    table.add_column("image", overflow="fold")
    for r in range(1, min(k, 3) + 1):
        table.add_column(f"#{r}")
    for row in rows:
        cells = [f"{t['class']} {t['prob']:.3f}" for t in row["top"][:3]] or [f"error: {row['error']}"]
        table.add_row(row["path"], *cells, *[""] * (min(k, 3) - len(cells)))
    wide_console().print(table)
    out = args.out_dir
    if out is None:
        from finetune_cli.train.checkpoint import resolve_checkpoint

        out = run_dir_of(resolve_checkpoint(args.checkpoint)) or Path.cwd()
    write_outputs(rows, out, k)
    failed = sum(1 for r in rows if r["error"])
    print(f"{len(rows) - failed} images predicted, {failed} unreadable; wrote {out / 'predictions.csv'} and "
          f"{out / 'predictions.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
