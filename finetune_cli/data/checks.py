"""The data check run before any training: every image file is opened and decoded once.

Finds, by path: 0-byte files, files Pillow cannot read, truncated images, and images larger than
``data.max_image_pixels`` (decompression bombs; judged from the header, never decoded). Verdicts
are cached per file (path, size, modification and change times) so a sweep checks each file once.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

from PIL import Image

from finetune_cli.io_utils import atomic_json

CACHE_VERSION = 2  # 2: the stamp holds the change time (a chmod changes it, not the mtime)


@dataclass
class CheckResult:
    checked: int = 0
    bad: Dict[str, str] = field(default_factory=dict)  # path -> what is wrong


def _verdict(path: str, max_pixels: int) -> str:
    """'' for a good image, else a short reason."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
    except OSError as exc:
        return f"cannot stat: {exc.strerror}"
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > max_pixels:
                return f"{w}x{h} = {w * h:,} pixels, over data.max_image_pixels={max_pixels:,} (decompression bomb?)"
            img.load()  # full decode: catches truncated files
    except Exception as exc:
        message = str(exc).splitlines()[0] if str(exc) else ""
        return f"unreadable: {type(exc).__name__}: {message}"[:200]
    return ""


def _stamp(path: str) -> List[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def check_images(files: Iterable[str], max_pixels: int, cache: Path, workers: int = 0) -> CheckResult:
    files = sorted(set(files))
    key = hashlib.sha1(json.dumps([CACHE_VERSION, max_pixels, os.path.commonpath(files) if files else ""]).encode())
    cache_file = cache / "image-checks" / f"{key.hexdigest()[:16]}.json"
    try:
        known: Dict[str, Tuple[List[int], str]] = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}
    todo = []
    verdicts: Dict[str, str] = {}
    for f in files:
        try:
            stamp = _stamp(f)
        except OSError:
            verdicts[f] = "cannot stat"
            continue
        hit = known.get(f)
        if hit and hit[0] == stamp:
            verdicts[f] = hit[1]
        else:
            todo.append((f, stamp))
    threads = workers or min(8, os.cpu_count() or 1)
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # headers of huge files are read and judged, not refused
    try:
        with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=threads) as pool:  # decodes release the GIL
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            for (f, stamp), verdict in zip(todo, pool.map(lambda item: _verdict(item[0], max_pixels), todo)):
                verdicts[f] = verdict
                known[f] = (stamp, verdict)
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    if todo:
        try:
            atomic_json(known, cache_file)
        except OSError:
            pass  # a read-only cache only costs time
    return CheckResult(checked=len(files), bad={f: v for f, v in verdicts.items() if v})


def describe(bad: Dict[str, str], limit: int = 20) -> str:
    lines = [f"  {path}: {why}" for path, why in sorted(bad.items())[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)
