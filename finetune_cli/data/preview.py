"""``preview=augment``: a PNG grid of training images as the model sees them.

Each tile is one training image after the run's augmentation (and batch mixing, when on),
un-normalized for display, with its label underneath; a mixed image shows its two largest
class shares. Small images are enlarged (nearest neighbour) to at least ``MIN_TILE`` pixels.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import ImageDraw
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid

from finetune_cli.data.transforms import Preprocess
from finetune_cli.io_utils import atomic_write_bytes
from finetune_cli.train.mixing import BatchMixer

MIN_TILE = 128
LABEL_HEIGHT = 26  # two lines: a mixed image shows its two largest class shares


def grid_size(n: int, crop: int) -> Tuple[int, int, int]:
    """(columns, rows, tile side) of a grid of ``n`` images of side ``crop``."""
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    tile = crop * math.ceil(MIN_TILE / crop) if crop < MIN_TILE else crop
    return cols, rows, tile


def _to_pixels(x: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """Normalized images (N, 3, H, W) back to uint8 pixels."""
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    return ((x.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


def _label(target: torch.Tensor, classes: Sequence[str]) -> List[str]:
    if target.ndim == 0:
        return [classes[int(target)]]
    shares, idx = target.topk(min(2, len(classes)))
    lines = [f"{100 * float(s):.0f}% {classes[int(i)]}" for s, i in zip(shares, idx) if float(s) > 0.005]
    return lines if len(lines) > 1 else [classes[int(idx[0])]]


def write_preview(
    dataset,
    classes: List[str],
    pre: Preprocess,
    path: Path,
    *,
    count: int,
    seed: int,
    mixer: Optional[BatchMixer] = None,
) -> Path:
    count = max(1, min(count, len(dataset)))
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(dataset), generator=generator)[:count].tolist()
    samples = [dataset[i] for i in indices]
    images = torch.stack([x for x, _ in samples])
    targets = torch.tensor([y for _, y in samples])
    if mixer is not None:
        images, targets = mixer(images, targets)
    cols, rows, tile = grid_size(count, pre.crop_size)
    tiles = F.interpolate(_to_pixels(images, pre), size=(tile, tile), mode="nearest-exact")
    tiles = F.pad(tiles, (0, 0, 0, LABEL_HEIGHT), value=255)  # white room for the label under each tile
    sheet = to_pil_image(make_grid(tiles, nrow=cols, padding=0, pad_value=255))
    draw = ImageDraw.Draw(sheet)
    for k in range(count):
        r, c = divmod(k, cols)
        x0, y0 = c * tile, r * (tile + LABEL_HEIGHT)
        for line_no, line in enumerate(_label(targets[k], classes)):
            draw.text((x0 + 2, y0 + tile + 1 + 12 * line_no), line[: tile // 6], fill="black")
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path
