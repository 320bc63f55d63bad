"""Training-batch throughput: deadscan's device-resident path vs torchvision Dataset + DataLoader.

    python benchmarks/data_throughput.py                       # CIFAR-shaped fake data, 10000 images
    python benchmarks/data_throughput.py --n 50000 --device cuda --workers 8
    python benchmarks/data_throughput.py --autoaugment         # also time AutoAugment on both paths

Both paths produce the same thing: shuffled batches of normalised float (B, 3, 32, 32) images on the
device, augmented with a random crop (32, padding 4) and a horizontal flip, plus their labels.

- ``torchvision``: a map-style Dataset over uint8 HWC images that makes a PIL image per sample, as
  ``torchvision.datasets.CIFAR10`` does, with ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``,
  ``ToTensor()``, ``Normalize(mean, std)`` (CIFAR-10's), in a ``DataLoader(shuffle=True,
  num_workers=--workers, pin_memory=<on CUDA>)``; each batch is copied to the device.
- ``deadscan``: ``Dataset.train_batches(augment="crop+flip")`` on the same images: the uint8 set is
  copied to the device once (timed separately, not in the rate), then randperm, one gather for
  crop+flip, and normalisation run as batched tensor ops there.

On CPU the main process runs one torch thread unless ``--threads`` says otherwise: the deadscan path
then uses one core while the DataLoader uses ``--workers`` processes (the comparison favours the
DataLoader). Data: ``--n`` random uint8 images (no download). Each path runs one warm-up epoch (worker start-up,
allocator) and then ``--epochs`` timed epochs; on CUDA the clock stops after a synchronize. The
figure reported is images/s over the timed epochs and the ratio deadscan / torchvision. Target on a
GPU: >= 5x. On CPU the "device" is host memory, so the figure only indicates.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deadscan.data import NORMALISATION, Dataset  # noqa: E402

MEAN, STD = NORMALISATION["cifar10"]


class CifarLike(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per item: uint8 HWC -> PIL image -> transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.data, self.targets, self.transform = images, labels.tolist(), transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_torchvision(images, labels, args, dev: torch.device, autoaugment: bool) -> float:
    from torchvision import transforms as T

    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    if autoaugment:
        steps.append(T.AutoAugment(T.AutoAugmentPolicy.CIFAR10))
    tf = T.Compose(steps + [T.ToTensor(), T.Normalize(MEAN, STD)])
    loader = torch.utils.data.DataLoader(CifarLike(images, labels, tf), batch_size=args.batch_size, shuffle=True,
                                         num_workers=args.workers, pin_memory=dev.type == "cuda",
                                         persistent_workers=args.workers > 0)
    total, start = 0, None
    for epoch in range(args.epochs + 1):
        if epoch == 1:
            sync(dev)
            start = time.perf_counter()
        for xb, yb in loader:
            xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
            if epoch:
                total += len(yb)
    sync(dev)
    return total / (time.perf_counter() - start)


def time_deadscan(images, labels, args, dev: torch.device, autoaugment: bool) -> tuple[float, float]:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW, still uint8
    ds = Dataset("fake-cifar", "train", x, torch.from_numpy(labels), MEAN, STD)
    t0 = time.perf_counter()
    ds._on(dev)  # the one copy to the device (kept for later epochs)
    sync(dev)
    copy_s = time.perf_counter() - t0
    g = torch.Generator(device=dev).manual_seed(0)
    augment = "crop+flip+autoaugment" if autoaugment else "crop+flip"
    total, start = 0, None
    for epoch in range(args.epochs + 1):
        if epoch == 1:
            sync(dev)
            start = time.perf_counter()
        for xb, yb in ds.train_batches(args.batch_size, dev, g, augment=augment):
            if epoch:
                total += len(yb)
    sync(dev)
    return total / (time.perf_counter() - start), copy_s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10000, help="images (default 10000)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=1, help="timed epochs after one warm-up epoch")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--autoaugment", action="store_true", help="also time both paths with AutoAugment (CIFAR-10)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the main process (default: 1 on CPU, where intra-op threads fight the "
                        "DataLoader workers and other load for the cores; torch's default on CUDA)")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if args.threads or dev.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.n).astype(np.int64)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {dev} ({name}), {os.cpu_count()} CPUs, torch {torch.__version__}; {args.n} CIFAR-shaped "
          f"images, batch {args.batch_size}, {args.epochs} timed epoch(s) after 1 warm-up, "
          f"{args.workers} DataLoader workers, {torch.get_num_threads()} torch thread(s) in the main process")
    for autoaugment in ([False, True] if args.autoaugment else [False]):
        label = "crop+flip+autoaugment" if autoaugment else "crop+flip"
        tv = time_torchvision(images, labels, args, dev, autoaugment)
        ours, copy_s = time_deadscan(images, labels, args, dev, autoaugment)
        print(f"{label:>22}: torchvision DataLoader {tv:10,.0f} img/s | deadscan device-resident {ours:10,.0f} img/s "
              f"| ratio {ours / tv:6.1f}x  (one-off copy to {dev.type}: {copy_s * 1000:.0f} ms)")
    if dev.type != "cuda":
        print("note: on CPU the device is host memory; the >= 5x target is for a GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
