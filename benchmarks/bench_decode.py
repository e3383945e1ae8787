"""Data loading of large JPEGs: full decoding against reduced-scale decoding (data.reduced_decode).

Writes a folder of photo-sized JPEGs (4032 x 3024, 12 MP, phone-camera size) and reads it through
the tool's loader — decode, training or validation transform, collate — at small training sizes,
with JPEG draft decoding off and on. Prints loader images/s and the gain.

    python benchmarks/bench_decode.py
"""

from __future__ import annotations

import time
from pathlib import Path

from common import machine, parser, photo_folder, table, workdir


def loader_rate(root: Path, size: int, train: bool, reduced: bool, workers: int, passes: int) -> float:
    from finetune_cli.config import AugmentConfig
    from finetune_cli.data.folders import image_folder, make_loader
    from finetune_cli.data.transforms import Preprocess, decode_side, eval_transform, train_transform

    pre = Preprocess(size, int(round(size * 256 / 224)))
    aug = AugmentConfig() if train else None
    tf = train_transform(pre, aug) if train else eval_transform(pre)
    data = image_folder(root / "train", tf, min_side=decode_side(pre, aug) if reduced else None)
    loader = make_loader(data, batch_size=8, num_workers=workers, train=train, seed=0)
    seen, start = 0, time.perf_counter()
    for _ in range(passes):
        for x, _ in loader:
            seen += x.size(0)
    return seen / (time.perf_counter() - start)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--sizes", default="64,224")
    p.add_argument("--workers", default="auto")
    a = p.parse_args()
    width, height, passes = 4032, 3024, 2
    if a.quick:
        a.images, a.sizes, width, height, passes = 4, "64", 1024, 768, 1
    from finetune_cli.data.folders import resolve_workers

    workers = resolve_workers(a.workers)
    root = photo_folder(workdir(a.workdir) / "photos", a.images, width, height)
    print(f"{machine()}\n{a.images} JPEGs of {width}x{height}, {workers} loader workers, batch 8")
    rows = []
    for size in (int(s) for s in a.sizes.split(",")):
        for train in (True, False):
            full = loader_rate(root, size, train, False, workers, passes)
            reduced = loader_rate(root, size, train, True, workers, passes)
            rows.append([f"{size} px", "train (random resized crop)" if train else "val (resize + centre crop)",
                         f"{full:.1f}", f"{reduced:.1f}", f"{reduced / full:.1f}x"])
    print(table(["size", "transform", "full decode img/s", "reduced decode img/s", "gain"], rows))


if __name__ == "__main__":
    main()
