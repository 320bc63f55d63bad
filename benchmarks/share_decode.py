"""One torchrun process's data work per training epoch on image files: its share of each batch vs the batch.

    python benchmarks/share_decode.py                  # 512 PNG images of 160x160, batches of 64, 2 processes
    python benchmarks/share_decode.py --images 256 --repeats 3 --world 4

Under torchrun each process of `deadscan strip` reads, decodes and augments only its share of every global
batch (``Dataset.train_batches(share=(rank, world))``), with the whole batch's random draws; before, every
process prepared the whole batch and kept its share, so N processes decoded every image N times. Here, in
one process, on an image folder streamed from disk (``DEADSCAN_HOST_BYTES=0``: decoded batch by batch by
DataLoader workers, as a set bigger than host memory is), with crop+flip+AutoAugment: one epoch of the whole
batches (what each process did before) against one epoch of process 0's share and one of the last process's
(what each does now), alternating, ``--repeats`` times. Reported: the median seconds of each and the ratio
whole / slowest share (target >= 1.7 for 2 processes: decoding is divided, the draws and each batch's
fixed costs are not, so small images gain less: 1.40x at 64x64 on the development machine).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET = 1.7


def write_images(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        (folder / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"c{i % 4}" / f"{i}.png")


def epoch_seconds(ds, batch: int, share) -> float:
    import torch

    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in ds.train_batches(batch, "cpu", g, augment="crop+flip+autoaugment-cifar10", share=share):
        pass
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--size", type=int, default=160, help="image side in pixels")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--world", type=int, default=2, help="torchrun processes the batch is shared over")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    os.environ["DEADSCAN_HOST_BYTES"] = "0"  # streamed: decoded batch by batch, as a set bigger than memory
    import torch

    from deadscan.data import load_data

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        write_images(Path(tmp), args.images, args.size)
        ds = load_data(f"imagefolder:{tmp}", "all")
        epoch_seconds(ds, args.batch, None)  # warm-up: workers, file cache
        runs = {"whole": [], "first": [], "last": []}
        for _ in range(args.repeats):
            runs["whole"].append(epoch_seconds(ds, args.batch, None))
            runs["first"].append(epoch_seconds(ds, args.batch, (0, args.world)))
            runs["last"].append(epoch_seconds(ds, args.batch, (args.world - 1, args.world)))
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratio = med["whole"] / max(med["first"], med["last"])
    print(f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} cores, "
          f"{args.images} PNG images {args.size}x{args.size}, batch {args.batch}, {args.world} processes, "
          f"{args.repeats} repeats")
    print(f"whole batches (before): {med['whole']:.3f} s an epoch")
    print(f"process 0's share: {med['first']:.3f} s; process {args.world - 1}'s: {med['last']:.3f} s")
    print(f"ratio whole / slowest share: {ratio:.2f}x (target >= {TARGET} for 2 processes)")
    return 0 if args.world != 2 or ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
