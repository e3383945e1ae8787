"""A procedurally generated image-classification dataset, written as an ImageFolder.

Each class is a (shape, texture) pair: the shape is drawn at a random position, scale and angle,
filled with its texture in two random colours, over a random noisy background. The pairs are
split into two disjoint pools: the *target* task (what users fine-tune on) and the *source* task
(what the ``synthetic`` weights are pretrained on). Both use the same shapes and textures, so
features learned on one transfer to the other — without a single shared class.

A *style* renders the same classes in another domain: ``plain`` (the default above) or
``shifted``, the same shapes and textures over photo-like backgrounds (smooth colour fields
crossed by a foreign texture), blended into the background by difference as in MNIST-M, with a
colour shift (a random gain per channel) and stronger noise. A model trained on one style and tested on the other sees a
domain shift: the exercise of domain adaptation (``adapt=``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Tuple

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon")
TEXTURES = ("solid", "hstripes", "vstripes", "checker", "dots", "diagonal")
STYLES = ("plain", "shifted")
FORMAT_VERSION = 1


def class_pool(task: str) -> List[Tuple[str, str]]:
    """The (shape, texture) pairs of a task: target and source pools are disjoint."""
    parity = {"target": 0, "source": 1}[task]
    pairs = [
        (s, t)
        for i, s in enumerate(SHAPES)
        for j, t in enumerate(TEXTURES)
        if (i + j) % 2 == parity
    ]
    # interleave so that the first N classes of a pool vary in both shape and texture
    order = sorted(range(len(pairs)), key=lambda k: ((k * 7) % len(pairs)))
    return [pairs[k] for k in order]


@dataclass(frozen=True)
class SyntheticSpec:
    task: str = "target"
    classes: int = 10
    train_per_class: int = 60
    val_per_class: int = 20
    image_size: int = 32
    seed: int = 0
    style: str = "plain"

    def key(self) -> str:
        fields = asdict(self)
        if self.style == "plain":  # the keys of datasets written before styles existed
            del fields["style"]
        blob = json.dumps({**fields, "v": FORMAT_VERSION}, sort_keys=True).encode()
        style = "" if self.style == "plain" else f"{self.style}-"
        return f"{self.task}-{style}c{self.classes}-s{self.image_size}-" + hashlib.sha1(blob).hexdigest()[:10]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> List[Tuple[float, float]]:
    if shape == "square":
        pts = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
        pts = [(x * 0.8, y * 0.8) for x, y in pts]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "diamond":
        pts = [(0, 1), (0.6, 0), (0, -1), (-0.6, 0)]
    elif shape == "hexagon":
        pts = [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)]
    elif shape == "star":
        pts = [
            ((1.0 if k % 2 == 0 else 0.42) * math.cos(math.pi / 2 + k * math.pi / 5),
             (1.0 if k % 2 == 0 else 0.42) * math.sin(math.pi / 2 + k * math.pi / 5))
            for k in range(10)
        ]
    elif shape == "cross":
        w = 0.33
        pts = [(w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w), (-w, -1), (w, -1),
               (w, -w), (1, -w), (1, w), (w, w)]
    else:
        raise ValueError(shape)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _mask(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    r = size * rng.uniform(0.24, 0.42)
    cx = rng.uniform(r * 0.8, size - r * 0.8)
    cy = rng.uniform(r * 0.8, size - r * 0.8)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        draw.ellipse([cx - r * 0.5, cy - r * 0.5, cx + r * 0.5, cy + r * 0.5], fill=0)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=255)
    return mask


def _texture(texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean pattern: True where the texture's second colour shows."""
    period = max(3, int(round(size / rng.uniform(5, 8))))
    yy, xx = np.mgrid[0:size, 0:size]
    ox, oy = rng.integers(0, period, size=2)
    xx, yy = xx + ox, yy + oy
    half = period / 2
    if texture == "solid":
        return np.zeros((size, size), bool)
    if texture == "hstripes":
        return (yy % period) < half
    if texture == "vstripes":
        return (xx % period) < half
    if texture == "diagonal":
        return ((xx + yy) % period) < half
    if texture == "checker":
        return ((xx // max(2, int(half))) + (yy // max(2, int(half)))) % 2 == 0
    if texture == "dots":
        dx = (xx % period) - period / 2
        dy = (yy % period) - period / 2
        return dx * dx + dy * dy < (period * 0.3) ** 2
    raise ValueError(texture)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _distinct(rng: np.random.Generator, *others: np.ndarray, min_dist: float = 120.0) -> np.ndarray:
    for _ in range(50):
        c = _colour(rng)
        if all(np.linalg.norm(c - o) >= min_dist for o in others):
            return c
    return 255.0 - others[0]


def render(shape: str, texture: str, size: int, rng: np.random.Generator) -> Image.Image:
    background = _colour(rng)
    fg1 = _distinct(rng, background)
    fg2 = _distinct(rng, fg1, min_dist=140.0)
    img = np.empty((size, size, 3), np.float32)
    img[:] = background
    img += rng.normal(0, 12, size=(size, size, 3))
    pattern = _texture(texture, size, rng)[..., None]
    fill = np.where(pattern, fg2, fg1)
    mask = np.asarray(_mask(shape, size, rng), np.float32)[..., None] / 255.0
    img = img * (1 - mask) + fill * mask
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _smooth_field(size: int, rng: np.random.Generator) -> np.ndarray:
    """A photo-like background: a coarse grid of random colours, smoothly interpolated."""
    cells = int(rng.integers(2, 5))
    grid = rng.integers(0, 256, size=(cells, cells, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(grid, "RGB").resize((size, size), Image.BICUBIC), np.float32)


def render_shifted(shape: str, texture: str, size: int, rng: np.random.Generator) -> Image.Image:
    """The same class in the ``shifted`` style (see the module's docstring)."""
    background = _smooth_field(size, rng)
    clutter = _texture(TEXTURES[int(rng.integers(1, len(TEXTURES)))], size, rng)[..., None]
    background = np.where(clutter, background * 0.6 + _colour(rng) * 0.4, background)
    fg1, fg2 = _colour(rng), _colour(rng)
    fill = np.where(_texture(texture, size, rng)[..., None], fg2, fg1)
    mask = np.asarray(_mask(shape, size, rng), np.float32)[..., None] / 255.0
    img = background * (1 - mask) + np.abs(background - fill) * mask  # blended by difference (MNIST-M)
    img = img * rng.uniform(0.6, 1.4, size=3)  # a colour shift: each channel's gain
    img += rng.normal(0, 16, size=(size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def generate(spec: SyntheticSpec, cache: Path) -> Path:
    """Write the dataset once under ``cache`` (keyed by its parameters) and return its root."""
    pool = class_pool(spec.task)
    if not 2 <= spec.classes <= len(pool):
        raise ValueError(f"classes must be between 2 and {len(pool)}")
    if spec.style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}")
    draw = render if spec.style == "plain" else render_shifted
    root = cache / "synthetic" / spec.key()
    if (root / "spec.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root.parent))
    try:
        streams = [spec.seed, 0 if spec.task == "target" else 1] + ([STYLES.index(spec.style)] if spec.style != "plain" else [])
        rng = np.random.default_rng(streams)
        for split, count in (("train", spec.train_per_class), ("val", spec.val_per_class)):
            for shape, texture in pool[: spec.classes]:
                folder = tmp / split / f"{shape}_{texture}"
                folder.mkdir(parents=True)
                for k in range(count):
                    draw(shape, texture, spec.image_size, rng).save(folder / f"{k:05d}.png")
        (tmp / "spec.json").write_text(json.dumps(asdict(spec), indent=2))
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first: keep its copy
            if not (root / "spec.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
