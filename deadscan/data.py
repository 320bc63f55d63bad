"""Datasets by name or path, the paper's seeded splits, normalisation, device-resident batches.

Sources (``--data``, i.e. ``load_data(spec, ...)``); named sets live under ``--data-root`` (default
``$DEADSCAN_DATA``, else ``~/.cache/deadscan/data``):

- ``digits``: sklearn's 8x8 digits, bundled with deadscan (float (N, 1, 8, 8), labels 0-9). No download.
- ``cifar10``, ``cifar100``: torchvision's layout, ``cifar-10-batches-py/{data_batch_1..5,test_batch}`` and
  ``cifar-100-python/{train,test}``. These are python pickles: they are read by an unpickler that refuses
  every global (``read_cifar_batch``), so a doctored batch cannot run code.
- ``svhn``: ``train_32x32.mat`` and ``test_32x32.mat`` (label 10 is the digit 0; ``extra`` is not used).
- ``mnist``, ``fashion-mnist``: ``MNIST/raw/`` and ``FashionMNIST/raw/`` holding ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (plain or ``.gz``).
  These five are fetched by torchvision with ``--download``. Nothing is downloaded without it.
- ``tiny-imagenet``: ``tiny-imagenet-200/`` as distributed (``wnids.txt``, ``train/<wnid>/images/*.JPEG``,
  ``val/images/*.JPEG`` + ``val/val_annotations.txt``). Labels follow the sorted wnids (as an image folder
  of ``train/`` would); the official val folder is the test split (the test folder has no labels).
- ``cifar10-c``, ``cifar100-c``: the corrupted test sets (Hendrycks & Dietterich), ``CIFAR-10-C/`` or
  ``CIFAR-100-C/`` with ``<corruption>.npy`` (uint8 (50000, 32, 32, 3): severities 1 to 5 of the 10000 test
  images, stacked) and ``labels.npy``. ``--corruption NAME[,NAME...]`` and ``--severity S[,S...]`` pick
  blocks (default: every corruption file present, every severity). Test-only: use ``--split test``.
- ``imagefolder:PATH`` (or just a folder path): ImageNet-style class folders ``PATH/<class>/**/<image>``
  (nested folders are searched, so Tiny ImageNet's ``train/`` works); labels are the sorted class names. If
  PATH holds only ``train/`` and ``val/`` or ``test/`` folders, ``train/`` is the training set and ``val/``
  (else ``test/``) the test split. Images are decoded once (PIL) into memory; a set bigger than
  ``$DEADSCAN_HOST_BYTES`` (default 4 GiB) stays on disk, decoded batch by batch by DataLoader workers.
- ``fake[:CxHxW[:K[:N]]]``: torchvision ``FakeData``, N images (default 1000) of shape C x H x W (default
  3x32x32; C is 1 or 3) in K classes (default 10), e.g. ``fake:1x28x28:10:500``. No files: smoke tests.
- ``FILE.npz`` / ``FILE.h5``: ``x`` the inputs, shaped as the model takes them ((N, C, H, W) or (N, D)),
  uint8 (scaled to [0, 1]) or float; ``y`` the integer labels (N,). Anything else is refused, naming the
  keys found.

Splits (``--split``): ``test`` is the official test set where there is one; ``train`` and ``val`` cut the
training set by a seeded permutation, ``val`` being ``--val-fraction`` of it (default 10%). A set without
its own test split (digits, arrays, fake, a single image folder) is cut 80/10/10 train/val/test. ``all`` is
the whole training set (or file). The same seed gives the same indices on every run, and
``Dataset.describe()`` records the seed, the fractions and a sha256 fingerprint of the indices used.

Transforms: images stay uint8 until a batch is on the device; then ``x / 255`` and ``(x - mean) / std``
with the dataset's preset (``NORMALISATION``; CIFAR's are the paper's) or ``--mean``/``--std``, exactly as
torchvision's ToTensor + Normalize compute it. ``--resize N`` (bilinear, antialiased, to N x N) and
``--channels 1|3`` (PIL's luma, or the grey channel repeated) are applied at load time, only when asked.

Training augmentation (``Dataset.train_batches(..., augment=)``): ``random_crop_flip`` (zero padding of
round(H / 8) pixels, 4 on 32x32, then a horizontal flip, both drawn per sample, one gather on the device)
and per-sample ``AutoAugment`` with torchvision's CIFAR-10 / SVHN / ImageNet policies on uint8 batches on
the device. Defaults (``AUGMENT_DEFAULTS``): crop+flip for natural images (CIFAR, Tiny ImageNet, image
folders, fake), crop only for digits photographed or drawn (SVHN, MNIST: a mirrored digit is another symbol
or none), nothing for the bundled digits, array files and the corrupted test sets.

Speed: a dataset that fits in half the device's free memory is copied there once as uint8 and batched
there: randperm, crop/flip, AutoAugment and normalisation are tensor ops on the device, with no host sync in
the batch loop. A larger one streams through a DataLoader with workers and pinned memory.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib
import math
import os
import pickle
import re
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .defaults import DEFAULTS
from .errors import DataError

SPLITS = ("train", "val", "test", "all")

# Per-dataset normalisation (mean, std per channel). CIFAR values are the paper's; override with --mean/--std.
NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "tiny-imagenet": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
}
NORMALISATION["cifar10-c"] = NORMALISATION["cifar10"]
NORMALISATION["cifar100-c"] = NORMALISATION["cifar100"]

# Training augmentation when train_batches(augment="default"); every other source: none.
AUGMENT_DEFAULTS = {
    "cifar10": "crop+flip", "cifar100": "crop+flip", "tiny-imagenet": "crop+flip", "imagefolder": "crop+flip",
    "fake": "crop+flip", "fashion-mnist": "crop+flip", "svhn": "crop", "mnist": "crop",
}
# AutoAugment policy per source for augment="autoaugment"; every other source: the CIFAR-10 policy (the
# paper used it for Tiny ImageNet too, at 32x32).
AUTOAUGMENT_POLICY = {"svhn": "svhn"}

TORCHVISION = {"cifar10", "cifar100", "svhn", "mnist", "fashion-mnist"}
CORRUPTED = {
    "cifar10-c": ("CIFAR-10-C", "https://zenodo.org/records/2535967/files/CIFAR-10-C.tar"),
    "cifar100-c": ("CIFAR-100-C", "https://zenodo.org/records/3555552/files/CIFAR-100-C.tar"),
}
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
NAMES = ("digits", "cifar10", "cifar100", "svhn", "mnist", "fashion-mnist", "tiny-imagenet", "cifar10-c",
         "cifar100-c", "fake")
ALIASES = {"cifar-10": "cifar10", "cifar-100": "cifar100", "fashionmnist": "fashion-mnist",
           "fashion_mnist": "fashion-mnist", "tinyimagenet": "tiny-imagenet", "tiny-imagenet-200": "tiny-imagenet",
           "cifar-10-c": "cifar10-c", "cifar-100-c": "cifar100-c"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, "mnist": 10, "fashion-mnist": 10, "digits": 10,
               "cifar10-c": 10, "cifar100-c": 100}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}

HOST_BYTES_LIMIT = int(os.environ.get("DEADSCAN_HOST_BYTES", 4 * 2**30))  # decoded image sets above: streamed
DEVICE_FRACTION = 0.5  # a dataset is kept on a GPU when it takes at most this share of its free memory
STREAM_WORKERS = min(8, os.cpu_count() or 1)  # DataLoader workers for data streamed to the device


# ---------------------------------------------------------------------------------------------
# The dataset


@dataclass
class Dataset:
    """One split of a dataset: uint8 images (or float inputs) on the host, batched on a device.

    ``x`` is a uint8 (N, C, H, W) tensor (scaled by 1/255 when batched), a float tensor of model inputs,
    or, for image files too many to decode into memory, a :class:`LazyImages` that decodes on demand.
    ``indices`` are the positions of these samples in their source (training set or file), recorded in
    ``describe()`` as a fingerprint.
    """

    name: str
    split: str
    x: torch.Tensor
    y: torch.Tensor  # int64 labels (N,)
    mean: tuple | None = None
    std: tuple | None = None
    seed: int = DEFAULTS.seed
    val_fraction: float | None = DEFAULTS.val_fraction
    test_fraction: float | None = None  # None: the source has its own test split
    indices: np.ndarray | None = None
    num_classes: int | None = None  # known for named sets; otherwise max label + 1
    source: str | None = None  # where the files are
    info: dict = field(default_factory=dict)  # more for describe(): corruption, severity, resize, channels
    augment_default: str = "none"
    autoaugment_policy: str = "cifar10"
    _device_copy: tuple | None = field(default=None, init=False, repr=False, compare=False)
    _norm_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def classes(self) -> int:
        if self.num_classes is not None:
            return self.num_classes
        return int(self.y.max()) + 1 if len(self.y) else 0

    def describe(self) -> dict:
        """What outputs record about the data: enough to take the same samples again."""
        d = {"name": self.name, "split": self.split, "samples": len(self), "seed": self.seed,
             "val_fraction": self.val_fraction, "test_fraction": self.test_fraction,
             "shape": [int(s) for s in self.x.shape[1:]], "classes": self.classes,
             "mean": None if self.mean is None else [float(v) for v in self.mean],
             "std": None if self.std is None else [float(v) for v in self.std]}
        if self.indices is not None:
            d["indices_sha256"] = fingerprint(self.indices)
        if self.source:
            d["source"] = self.source
        d.update(self.info)
        return d

    # -- batches ---------------------------------------------------------------------------------

    def prepare(self, xb: torch.Tensor) -> torch.Tensor:
        """uint8 -> float in [0, 1] -> normalised, as whole-batch tensor ops on xb's device.

        The same float32 operations as torchvision's ToTensor then Normalize, so the values are identical.
        A float batch is never modified in place.
        """
        if xb.dtype == torch.uint8:
            xb, fresh = xb.float().div_(255), True
        else:
            xb, fresh = xb.float(), False
        if self.mean is not None:
            mean, std = self._norm(xb.device, xb.ndim)
            xb = xb.sub_(mean).div_(std) if fresh else (xb - mean) / std
        return xb

    def batches(self, batch_size: int, device: torch.device | str):
        """Model-ready input batches in order (for scanning). Data that fits moves to the device once."""
        dev = torch.device(device)
        if self._resident(dev):
            x = self._on(dev)[0]
            for i in range(0, len(x), batch_size):
                yield self.prepare(x[i:i + batch_size])
        else:
            for xb, _ in self._stream(None, batch_size, dev):
                yield self.prepare(xb)

    def train_batches(self, batch_size: int, device: torch.device | str,
                      generator: torch.Generator | int | None = None, augment: str | Augment | None = "default",
                      drop_last: bool = False):
        """One epoch of shuffled, augmented, model-ready ``(x, y)`` batches for a training loop.

        ``generator``: a ``torch.Generator`` on ``device`` (or an int seed for a fresh one) that draws the
        permutation, crops and flips; the same generator state gives the same epoch. (A generator on
        another device seeds one on ``device``, once per epoch.) ``None`` uses torch's
        default generator. ``augment``: ``"default"`` (the dataset's, ``AUGMENT_DEFAULTS``), ``"none"``, or
        a ``+``-joined combination of ``crop``, ``flip``, ``autoaugment`` (the dataset's policy) or
        ``autoaugment-cifar10|svhn|imagenet``, e.g. ``"crop+flip+autoaugment"``.

        Device-resident data: randperm, gather, crop/flip, AutoAugment and normalisation all run on the
        device; the only host read is one seed per epoch for AutoAugment's choices, outside the batch loop.
        """
        dev = torch.device(device)
        plan = parse_augment(augment, self)
        g = _generator(generator, dev)
        augmenter = AutoAugment(plan.autoaugment) if plan.autoaugment else None
        rng = np.random.default_rng(_draw_seed(g, dev)) if augmenter else None
        n = len(self)
        if self._resident(dev):
            x, y = self._on(dev)
            perm = torch.randperm(n, generator=g, device=dev)
            for i in range(0, n, batch_size):
                if drop_last and i + batch_size > n:
                    break
                idx = perm[i:i + batch_size]
                yield self._augment(x, idx, plan, g, augmenter, rng), y.index_select(0, idx)
        else:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(_draw_seed(g, dev)))
            for xb, yb in self._stream(order, batch_size, dev, drop_last):
                yield self._augment(xb, None, plan, g, augmenter, rng), yb

    def release(self) -> None:
        """Drop the device copy kept for repeated epochs."""
        self._device_copy = None
        self._norm_cache.clear()

    # -- internals -------------------------------------------------------------------------------

    def _augment(self, x, idx, plan: Augment, g, augmenter, rng) -> torch.Tensor:
        if plan.crop or plan.flip:
            pad = plan.padding if plan.padding is not None else default_padding(x.shape[-2])
            xb = random_crop_flip(x, idx, padding=pad if plan.crop else 0, flip=plan.flip, generator=g)
        else:
            xb = x if idx is None else x.index_select(0, idx)
        if augmenter is not None:
            xb = augmenter(xb, rng)
        return self.prepare(xb)

    def _norm(self, device: torch.device, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (str(device), ndim)
        if key not in self._norm_cache:
            shape = (1, -1) + (1,) * (ndim - 2)
            self._norm_cache[key] = (torch.tensor(self.mean, dtype=torch.float32).view(shape).to(device),
                                     torch.tensor(self.std, dtype=torch.float32).view(shape).to(device))
        return self._norm_cache[key]

    def _resident(self, dev: torch.device) -> bool:
        if isinstance(self.x, LazyImages):
            return False
        if dev.type != "cuda":
            return True
        copy = self._device_copy
        if copy is not None and copy[0] is self.x and copy[1] is self.y and copy[2] == str(dev):
            return True
        free, _ = torch.cuda.mem_get_info(dev)
        return self.x.nbytes + self.y.nbytes <= DEVICE_FRACTION * free

    def _on(self, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if dev.type == "cpu":
            return self.x, self.y
        copy = self._device_copy
        if copy is None or copy[0] is not self.x or copy[1] is not self.y or copy[2] != str(dev):
            self._device_copy = copy = (self.x, self.y, str(dev), self.x.to(dev), self.y.to(dev))
        return copy[3], copy[4]

    def _stream(self, order: torch.Tensor | None, batch_size: int, dev: torch.device, drop_last: bool = False):
        """Batches read (and decoded) by DataLoader workers, pinned, copied to the device asynchronously."""
        from torch.utils.data import DataLoader

        order = torch.arange(len(self)) if order is None else order
        workers = STREAM_WORKERS if isinstance(self.x, LazyImages) or dev.type == "cuda" else 0
        loader = DataLoader(_BatchSource(self.x, self.y, order, batch_size, drop_last), batch_size=None,
                            num_workers=workers, pin_memory=dev.type == "cuda",
                            prefetch_factor=4 if workers else None)
        for xb, yb in loader:
            yield xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)


class _BatchSource(torch.utils.data.Dataset):
    """Item i is batch i of ``order``: what each DataLoader worker reads (and decodes)."""

    def __init__(self, x, y, order: torch.Tensor, batch_size: int, drop_last: bool):
        self.x, self.y, self.order, self.batch_size = x, y, order, batch_size
        n = len(order)
        self.n = n // batch_size if drop_last else -(-n // batch_size)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        idx = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        x = self.x.decode(idx.numpy()) if isinstance(self.x, LazyImages) else self.x.index_select(0, idx)
        return x, self.y.index_select(0, idx)


def fingerprint(indices) -> str:
    """Short sha256 of an index array (int64 little-endian): which samples a split holds."""
    return hashlib.sha256(np.ascontiguousarray(indices, dtype="<i8").tobytes()).hexdigest()[:16]


def _generator(generator, dev: torch.device) -> torch.Generator | None:
    if generator is None:
        return None
    if isinstance(generator, int):
        return torch.Generator(device=dev).manual_seed(generator)
    if generator.device.type != dev.type:  # e.g. a CPU generator for CUDA batches: seed one there, once
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        return torch.Generator(device=dev).manual_seed(seed)
    return generator


def _draw_seed(g: torch.Generator | None, dev: torch.device) -> int:
    """One host read per epoch (not per batch): a seed for host-side choices drawn from the device generator."""
    return int(torch.randint(0, 2**62, (1,), generator=g, device=dev).item())


# ---------------------------------------------------------------------------------------------
# Augmentation (batched, on the device)


@dataclass(frozen=True)
class Augment:
    """Which training augmentations to apply; see :func:`parse_augment`."""

    crop: bool = False
    flip: bool = False
    autoaugment: str | None = None  # policy: cifar10, svhn or imagenet
    padding: int | None = None  # crop padding; None: default_padding(H)


def default_padding(height: int) -> int:
    """round(H / 8): 4 pixels on 32x32 (the usual CIFAR crop), 8 on 64x64, 4 on 28x28."""
    return max(1, round(height / 8))


def parse_augment(augment: str | Augment | None, ds: Dataset) -> Augment:
    """``"default"``, ``"none"`` or ``crop``/``flip``/``autoaugment[-POLICY]`` joined with ``+``."""
    if isinstance(augment, Augment):
        plan, text = augment, "custom"
    else:
        text = "default" if augment is None else str(augment).strip().lower()
        crop = flip = False
        policy = None
        for token in filter(None, re.split(r"[+,\s]+", text)):
            if token == "default":
                crop |= "crop" in ds.augment_default
                flip |= "flip" in ds.augment_default
            elif token == "crop":
                crop = True
            elif token == "flip":
                flip = True
            elif token == "autoaugment":
                policy = ds.autoaugment_policy
            elif token.startswith("autoaugment-") and token[12:] in AutoAugment.POLICIES:
                policy = token[12:]
            elif token != "none":
                raise DataError(f"unknown --augment {augment!r}: combine default, none, crop, flip, "
                                "autoaugment (or autoaugment-cifar10|svhn|imagenet) with '+'")
        plan = Augment(crop, flip, policy)
    if not (plan.crop or plan.flip or plan.autoaugment):
        return plan
    if len(ds.x.shape) != 4:
        if text == "default":
            return Augment()
        raise DataError(f"--augment {text} needs images (N, C, H, W); --data {ds.name} holds "
                        f"{tuple(ds.x.shape)}")
    if plan.autoaugment and ds.x.dtype != torch.uint8:
        raise DataError(f"--augment autoaugment needs uint8 images; --data {ds.name} holds {ds.x.dtype} inputs")
    return plan


def random_crop_flip(x: torch.Tensor, index: torch.Tensor | None = None, *, padding: int = 4, flip: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random crop with zero padding, then random horizontal flip, as one gather on x's device.

    ``x``: (N, C, H, W), any dtype; ``index``: the (B,) samples of ``x`` to take (default: all). Returns a
    new (B, C, H, W) tensor. Per sample this is torchvision's ``RandomCrop((H, W), padding, fill=0)`` then
    ``RandomHorizontalFlip(0.5)``. Draws (in this order: row offsets, column offsets, flips) come from
    ``generator``, which must be on x's device, so a fixed generator state gives the same batch.
    ``x`` should be contiguous (a non-contiguous one is copied on every call).
    """
    dev = x.device
    n, c, h, w = x.shape
    idx = torch.arange(n, device=dev) if index is None else index
    b = idx.shape[0]
    rows = torch.arange(h, device=dev).expand(b, h)
    cols = torch.arange(w, device=dev).expand(b, w)
    if padding > 0:
        rows = rows + torch.randint(-padding, padding + 1, (b, 1), generator=generator, device=dev)
        shift = torch.randint(-padding, padding + 1, (b, 1), generator=generator, device=dev)
    if flip:
        flipped = torch.randint(0, 2, (b, 1), generator=generator, device=dev).bool()
        cols = torch.where(flipped, (w - 1) - cols, cols)
    if padding > 0:
        cols = cols + shift
        inside = ((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[:, None, None, :]
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    # One flat gather (torch.take): about 3x faster on CPU than 4-tensor advanced indexing, one kernel on GPU.
    starts = ((idx * (c * h * w))[:, None, None] + (torch.arange(c, device=dev) * (h * w))[None, :, None]
              + (rows * w)[:, None, :])  # (B, C, H): where each output row starts in x
    out = x.reshape(-1).take(starts[:, :, :, None] + cols[:, None, None, :])
    if padding > 0:
        out = out.mul_(inside)  # the zero padding
    return out


class AutoAugment:
    """AutoAugment (Cubuk et al.) with torchvision's policies, drawn per image, on a uint8 batch on its device.

    torchvision's ``transforms.v2.AutoAugment`` draws ONE sub-policy (and one set of coin flips) per call,
    so calling it on a batch gives every image of the batch the same operations. Here every image draws
    its own sub-policy, probabilities and signs (on the host, from ``rng``: no device sync); images that
    drew the same operation and magnitude are gathered and transformed together by torchvision's own
    operation code, then scattered back. The result has the distribution of per-image AutoAugment, at a
    cost of at most 2 x 25 x 2 batched calls per batch (about 30-60 for a batch of 128).
    """

    POLICIES = ("cifar10", "svhn", "imagenet")

    def __init__(self, policy: str = "cifar10"):
        from torchvision.transforms import v2

        if policy not in self.POLICIES:
            raise ValueError(f"AutoAugment policy {policy!r}: use one of {', '.join(self.POLICIES)}")
        self.policy = policy
        self._tv = v2.AutoAugment(v2.AutoAugmentPolicy(policy))
        self._policies = getattr(self._tv, "_policies", None)
        self._space = getattr(self._tv, "_AUGMENTATION_SPACE", None)
        self._grouped = (self._policies is not None and self._space is not None
                         and hasattr(self._tv, "_apply_image_or_video_transform"))
        self._magnitudes: dict = {}

    def __call__(self, xb: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if xb.dtype != torch.uint8 or xb.ndim != 4:
            raise ValueError(f"AutoAugment takes uint8 (B, C, H, W) batches, got {xb.dtype} {tuple(xb.shape)}")
        if not self._grouped:  # torchvision's internals moved: one public call per image (slower, same law)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(rng.integers(2**62)))
                return torch.stack([self._tv(img) for img in xb])
        groups = self._groups(len(xb), xb.shape[-2], xb.shape[-1], rng)
        if not groups:
            return xb
        pos = torch.from_numpy(np.concatenate([members for _, _, members in groups]))
        pos = pos.pin_memory().to(xb.device, non_blocking=True) if xb.device.type == "cuda" else pos.to(xb.device)
        out = xb.clone()
        start = 0
        for op, magnitude, members in groups:
            sel = pos[start:start + len(members)]
            start += len(members)
            done = self._tv._apply_image_or_video_transform(
                out.index_select(0, sel), op, magnitude, interpolation=self._tv.interpolation, fill=self._tv._fill)
            out.index_copy_(0, sel, done)
        return out

    def _groups(self, b: int, h: int, w: int, rng: np.random.Generator) -> list:
        """(operation, magnitude, image positions) in application order: all first operations, then all second."""
        pick = rng.integers(len(self._policies), size=b)
        apply = rng.random((b, 2))
        negative = rng.random((b, 2)) < 0.5
        groups = []
        for slot in (0, 1):
            for p in np.unique(pick):
                op, probability, level = self._policies[p][slot]
                chosen = (pick == p) & (apply[:, slot] <= probability)
                if not chosen.any():
                    continue
                magnitudes, signed = self._magnitude_table(op, h, w)
                if magnitudes is None:
                    groups.append((op, 0.0, np.flatnonzero(chosen)))
                    continue
                m = float(magnitudes[level])
                if not signed:
                    groups.append((op, m, np.flatnonzero(chosen)))
                    continue
                for sign, sel in ((1.0, chosen & ~negative[:, slot]), (-1.0, chosen & negative[:, slot])):
                    if sel.any():
                        groups.append((op, sign * m, np.flatnonzero(sel)))
        return groups

    def _magnitude_table(self, op: str, h: int, w: int):
        key = (op, h, w)
        if key not in self._magnitudes:
            fn, signed = self._space[op]
            self._magnitudes[key] = (fn(10, h, w), signed)
        return self._magnitudes[key]


# ---------------------------------------------------------------------------------------------
# Loading


def default_root() -> Path:
    return Path(os.environ.get("DEADSCAN_DATA", Path.home() / ".cache" / "deadscan" / "data"))


@dataclass(frozen=True)
class _Adapt:
    """Load-time changes the user asked for."""

    resize: int | None = None
    channels: int | None = None


@dataclass
class _Pool:
    """A set of samples: labels now, inputs on demand (``take(indices)``)."""

    y: np.ndarray
    take: Callable[[np.ndarray], torch.Tensor]


@dataclass
class _Source:
    name: str
    kind: str  # key into NORMALISATION, AUGMENT_DEFAULTS, ...
    train: Callable[[], _Pool]  # the training set (or the whole file)
    test: Callable[[], _Pool] | None  # the official test set, if any
    location: str
    num_classes: int | None = None
    info: dict = field(default_factory=dict)
    test_only: bool = False


def load_data(spec: str, split: str = DEFAULTS.split, *, root: str | os.PathLike | None = None,
              download: bool = False, limit: int | None = None, seed: int = DEFAULTS.seed,
              val_fraction: float = DEFAULTS.val_fraction, mean=None, std=None, resize: int | None = None,
              channels: int | None = None, corruption: str | None = None, severity=None) -> Dataset:
    """Load one split of a dataset named by ``spec`` (a name, ``imagefolder:PATH``, ``fake:...`` or a file).

    ``mean``/``std``: per-channel values (a sequence, or a comma-separated string; one value applies to
    every channel) replacing the dataset's preset. ``resize``: N for N x N images. ``channels``: 1 or 3.
    ``corruption``/``severity``: for cifar10-c / cifar100-c (comma-separated lists, default all).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction} must be at least 0 and below 1")
    if limit is not None and limit < 1:
        raise DataError(f"--limit {limit} must be at least 1")
    root = Path(root).expanduser() if root else default_root()
    kind, arg = parse_spec(spec)
    adapt = _Adapt(_positive(resize, "--resize"), _channel_count(channels))
    if kind not in CORRUPTED and (corruption is not None or severity is not None):
        raise DataError("--corruption and --severity apply to cifar10-c and cifar100-c only")
    if kind == "digits":
        src = _arrays_source("digits", resource_path("sample_models", "digits.npz"), adapt, kind="digits")
    elif kind in ("cifar10", "cifar100"):
        src = _cifar(kind, root, download, adapt)
    elif kind == "svhn":
        src = _svhn(root, download, adapt)
    elif kind in ("mnist", "fashion-mnist"):
        src = _mnist(kind, root, download, adapt)
    elif kind == "tiny-imagenet":
        src = _tiny_imagenet(root, download, adapt)
    elif kind in CORRUPTED:
        src = _corrupted(kind, root, download, adapt, corruption, severity)
    elif kind == "imagefolder":
        src = _imagefolder(arg, adapt)
    elif kind == "fake":
        src = _fake(arg, adapt)
    else:
        src = _arrays_source(str(spec), Path(arg).expanduser(), adapt)
    ds = _build(src, spec, split, seed, val_fraction, limit)
    ds.mean, ds.std = _normalisation(NORMALISATION.get(src.kind), mean, std, ds)
    ds.info.update({k: v for k, v in (("resize", adapt.resize), ("channels", adapt.channels)) if v})
    return ds


def parse_spec(spec: str) -> tuple[str, str | None]:
    """(kind, argument) of a --data spec; names win over files (write ./NAME for a file called like one)."""
    text = str(spec).strip()
    low = text.lower()
    name = ALIASES.get(low, low)
    if name in NAMES:
        return name, None
    for prefix in ("imagefolder:", "fake:"):
        if low.startswith(prefix):
            return prefix[:-1], text[len(prefix):]
    path = Path(text).expanduser()
    if path.suffix.lower() in (".npz", ".h5", ".hdf5"):
        return "arrays", text
    if path.is_dir():
        return "imagefolder", text
    if path.exists():
        return "arrays", text
    raise DataError(f"unknown --data {spec!r}: use {', '.join(n for n in NAMES if n != 'fake')}, "
                    "fake[:CxHxW[:CLASSES[:N]]], imagefolder:PATH, or a .npz/.h5 file")


def _build(src: _Source, spec, split: str, seed: int, val_fraction: float, limit: int | None) -> Dataset:
    test_fraction = None
    if src.test_only:
        if split in ("train", "val"):
            raise DataError(f"--data {spec} is a test-only set (no training images to hold out from): "
                            "use --split test")
        pool = src.train()
        idx = np.arange(len(pool.y))
        val_fraction = None
    elif src.test is not None and split == "test":
        pool = src.test()
        idx = np.arange(len(pool.y))
    elif src.test is not None:
        pool = src.train()
        idx = split_indices(len(pool.y), split, seed, val_fraction, has_test=True)
    else:
        pool = src.train()
        test_fraction = DEFAULTS.test_fraction
        idx = split_indices(len(pool.y), split, seed, val_fraction, test_fraction)
    if limit is not None:
        idx = idx[:limit]
    if len(idx) == 0:
        raise DataError(f"--data {spec} split {split!r} is empty ({len(pool.y)} samples in {src.location}); "
                        "check the files, --split and --val-fraction")
    y = pool.y[idx]
    if y.min() < 0:
        raise DataError(f"{src.location}: labels must be 0 or more, found {int(y.min())}")
    return Dataset(src.name, split, pool.take(idx), torch.from_numpy(y.astype(np.int64)), None, None, seed,
                   val_fraction, test_fraction, idx, src.num_classes, src.location, dict(src.info),
                   AUGMENT_DEFAULTS.get(src.kind, "none"), AUTOAUGMENT_POLICY.get(src.kind, "cifar10"))


def split_indices(n: int, split: str, seed: int, val_fraction: float = DEFAULTS.val_fraction,
                  test_fraction: float = DEFAULTS.test_fraction, has_test: bool = False) -> np.ndarray:
    """Seeded split of ``n`` samples: the same indices every run for the same seed.

    Without a separate test set (``has_test=False``) the data is cut 80/10/10 train/val/test;
    with one, the training set is cut 90/10 train/val.
    """
    if split == "all":
        return np.arange(n)
    perm = np.random.default_rng(seed).permutation(n)
    n_test = 0 if has_test else int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    parts = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
    return np.sort(parts[split])


def resource_path(folder: str, name: str) -> Path:
    """A file shipped with deadscan: inside the installed package, or the source checkout."""
    from importlib import resources

    try:
        p = Path(str(resources.files(f"deadscan.{folder}") / name))
        if p.exists():
            return p
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / folder / name


# -- options ----------------------------------------------------------------------------------


def _positive(value, flag: str) -> int | None:
    if value is None:
        return None
    try:
        v = int(value)
    except (TypeError, ValueError):
        v = 0
    if v < 1:
        raise DataError(f"{flag} {value!r} must be a positive whole number")
    return v


def _channel_count(value) -> int | None:
    if value is None:
        return None
    if str(value).strip() not in ("1", "3"):
        raise DataError(f"--channels {value!r}: use 1 (greyscale) or 3 (RGB)")
    return int(value)


def _floats(value, flag: str) -> tuple[float, ...]:
    parts = value.replace(",", " ").split() if isinstance(value, str) else list(np.atleast_1d(value))
    try:
        out = tuple(float(v) for v in parts)
    except (TypeError, ValueError):
        out = ()
    if not out or not all(math.isfinite(v) for v in out):
        raise DataError(f"{flag} {value!r}: give numbers separated by commas, e.g. 0.5,0.5,0.5")
    return out


LUMA = (0.299, 0.587, 0.114)


def _normalisation(preset, mean, std, ds: Dataset) -> tuple[tuple | None, tuple | None]:
    """The (mean, std) to use: --mean/--std, else the preset adapted to the data's channel count."""
    c = int(ds.x.shape[1]) if len(ds.x.shape) >= 2 else 1
    if mean is None and std is None:
        if preset is None:
            return None, None
        m, s = preset
        if len(m) == c:
            return tuple(m), tuple(s)
        if len(m) == 1:
            return tuple(m) * c, tuple(s) * c
        if len(m) == 3 and c == 1:  # greyscale made from RGB: the luma-weighted preset (approximate)
            return ((round(sum(w * v for w, v in zip(LUMA, m)), 4),),
                    (round(sum(w * v for w, v in zip(LUMA, s)), 4),))
        return None, None
    if mean is None or std is None:
        raise DataError("give both --mean and --std (or neither, for the dataset's preset)")
    m, s = _floats(mean, "--mean"), _floats(std, "--std")
    for values, flag in ((m, "--mean"), (s, "--std")):
        if len(values) not in (1, c):
            raise DataError(f"{flag} has {len(values)} values but --data {ds.name} has {c} channels: "
                            f"give 1 or {c}")
    if any(v <= 0 for v in s):
        raise DataError(f"--std {std!r}: every value must be above 0")
    return (m * c if len(m) == 1 else m), (s * c if len(s) == 1 else s)


# -- load-time transforms --------------------------------------------------------------------------


def adapt_images(x: torch.Tensor, resize: int | None = None, channels: int | None = None,
                 where: str = "the data") -> torch.Tensor:
    """Images (N, C, H, W) to ``channels`` channels and ``resize`` x ``resize`` pixels; dtype kept."""
    if resize is None and channels is None:
        return x
    if x.ndim != 4:
        raise DataError(f"{where}: --resize and --channels need images (N, C, H, W), got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        x = _convert_channels(x, channels, where)
    if resize is not None and tuple(x.shape[-2:]) != (resize, resize):
        x = _resize(x, resize)
    return x


def _convert_channels(x: torch.Tensor, channels: int, where: str) -> torch.Tensor:
    have = x.shape[1]
    if have == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    if have == 3 and channels == 1:
        if x.dtype == torch.uint8:  # PIL's convert("L"): fixed point, rounded
            r, g, b = (x[:, i].to(torch.int32) for i in range(3))
            return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)[:, None]
        return (LUMA[0] * x[:, 0] + LUMA[1] * x[:, 1] + LUMA[2] * x[:, 2])[:, None]
    raise DataError(f"{where}: cannot turn {have}-channel images into {channels} channels (only 1 <-> 3)")


def _resize(x: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    out = []
    for i in range(0, len(x), chunk):
        xb = torch.nn.functional.interpolate(x[i:i + chunk].float(), size=(size, size), mode="bilinear",
                                             antialias=True, align_corners=False)
        out.append(xb.round_().clamp_(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else xb.to(x.dtype))
    return torch.cat(out) if out else x.new_zeros((0, x.shape[1], size, size))


def _array_pool(x: np.ndarray, y: np.ndarray, adapt: _Adapt, where: str) -> _Pool:
    def take(idx: np.ndarray) -> torch.Tensor:
        return adapt_images(torch.from_numpy(np.ascontiguousarray(x[idx])), adapt.resize, adapt.channels, where)
    return _Pool(np.asarray(y, dtype=np.int64), take)


# -- array files ---------------------------------------------------------------------------------


def _arrays_source(name: str, path: Path, adapt: _Adapt, kind: str = "arrays") -> _Source:
    x, y = _read_arrays(path)
    return _Source(name, kind, lambda: _array_pool(x, y, adapt, str(path)), None, str(path),
                   NUM_CLASSES.get(kind))


def _read_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as f:
                keys = list(f.keys())
                if "x" not in keys or "y" not in keys:
                    raise DataError(f"{path}: expected arrays 'x' (inputs) and 'y' (labels), found {keys}")
                x, y = f["x"], f["y"]
        else:
            import h5py

            with h5py.File(path, "r") as f:
                keys = list(f.keys())
                if "x" not in keys or "y" not in keys:
                    raise DataError(f"{path}: expected datasets 'x' (inputs) and 'y' (labels), found {keys}")
                x, y = f["x"][()], f["y"][()]
    except DataError:
        raise
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read arrays ({e})") from None
    return _check_arrays(path, x, y)


def _check_arrays(path, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{path}: 'x' must be uint8 or float, got {x.dtype}")
    if x.ndim < 2:
        raise DataError(f"{path}: 'x' must be shaped (N, C, H, W) or (N, D), got {x.shape}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: 'y' must be integer labels of shape (N,), got {y.dtype} {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{path}: 'x' has {len(x)} samples but 'y' has {len(y)}")
    return x, y


# -- torchvision datasets (files on disk; downloads only with --download) -----------------------------


def _tv_class(name: str):
    import torchvision.datasets as tvd

    return {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "svhn": tvd.SVHN,
            "mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}[name]


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def _download(name: str, root: Path) -> None:
    """Fetch a torchvision dataset (train and test) into root; any failure is one DataError line."""
    cls = _tv_class(name)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # torchvision prints progress; stdout is for results
            if name == "svhn":
                for split in ("train", "test"):
                    cls(str(root), split=split, download=True)
            else:
                for train in (True, False):
                    cls(str(root), train=train, download=True)
    except Exception as e:  # network errors come in many types
        raise DataError(f"cannot download {name} into {root} ({_short(e)}); copy the files there by hand "
                        "and drop --download") from None


def _fetch_archive(name: str, url: str, root: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        with contextlib.redirect_stdout(sys.stderr):
            download_and_extract_archive(url, str(root))
    except Exception as e:  # network and archive errors come in many types
        raise DataError(f"cannot download {name} from {url} into {root} ({_short(e)}); download and extract "
                        "it there by hand and drop --download") from None


def _missing(name: str, root: Path, where: str, how: str | None = None) -> DataError:
    how = how or "pass --download to fetch it (needs internet)"
    return DataError(f"{name} not found: expected {root / where} under --data-root {root}; {how}, or give "
                     "--data-root the folder that holds it")


CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


def _cifar(name: str, root: Path, download: bool, adapt: _Adapt) -> _Source:
    folder = CIFAR_FILES[name][0]
    if download and not all((root / folder / f).exists() for f in CIFAR_FILES[name][1] + CIFAR_FILES[name][2]):
        _download(name, root)

    def pool(train: bool) -> _Pool:
        x, y = _read_cifar(name, root, train)
        return _array_pool(x, y, adapt, str(root / folder))
    return _Source(name, name, lambda: pool(True), lambda: pool(False), str(root / folder), NUM_CLASSES[name])


def _read_cifar(name: str, root: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    folder, train_files, test_files, label_key = CIFAR_FILES[name]
    base = root / folder
    xs, ys = [], []
    for fname in train_files if train else test_files:
        path = base / fname
        if not path.exists():
            raise _missing(name, root, f"{folder}/{fname}")
        batch = read_cifar_batch(path)
        try:
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[label_key], dtype=np.int64))
        except (KeyError, ValueError) as e:
            raise DataError(f"{path}: not a CIFAR batch ({e})") from None
        if len(xs[-1]) != len(ys[-1]):
            raise DataError(f"{path}: not a CIFAR batch ({len(xs[-1])} images, {len(ys[-1])} labels)")
    return np.concatenate(xs), np.concatenate(ys)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other global (no code runs).

    Allowed: numpy's array constructors (protocol 2 and protocol 5 forms) and ``_codecs.encode``, which
    protocol 2 pickles written by Python 3 use for bytes; none of them can run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def read_cifar_batch(path: Path) -> dict:
    """Read a CIFAR python batch (a pickled dict of arrays and lists) without running code."""
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnly(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, OSError) as e:
        raise DataError(f"{path}: refused or damaged CIFAR batch ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR batch (holds {type(obj).__name__})")
    return obj


def _svhn(root: Path, download: bool, adapt: _Adapt) -> _Source:
    files = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
    if download and not all((root / f).exists() for f in files.values()):
        _download("svhn", root)

    def pool(split: str) -> _Pool:
        path = root / files[split]
        if not path.exists():
            raise _missing("svhn", root, files[split])
        try:
            import scipy.io
        except ImportError:
            raise DataError("svhn's .mat files need scipy: pip install scipy") from None
        try:
            mat = scipy.io.loadmat(str(path), variable_names=["X", "y"])
            x = np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1)), dtype=np.uint8)  # HWCN -> NCHW
            y = mat["y"].astype(np.int64).reshape(-1)
        except (KeyError, ValueError, TypeError, NotImplementedError, OSError) as e:
            raise DataError(f"{path}: not an SVHN .mat file ({_short(e)})") from None
        y[y == 10] = 0
        if len(x) != len(y):
            raise DataError(f"{path}: {len(x)} images but {len(y)} labels")
        return _array_pool(x, y, adapt, str(path))
    return _Source("svhn", "svhn", lambda: pool("train"), lambda: pool("test"), str(root), 10)


MNIST_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def _mnist(name: str, root: Path, download: bool, adapt: _Adapt) -> _Source:
    raw = root / MNIST_FOLDERS[name] / "raw"
    files = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

    def present(f: str) -> bool:
        return (raw / f).exists() or (raw / (f + ".gz")).exists()
    if download and not all(present(f) for pair in files.values() for f in pair):
        _download(name, root)

    def pool(split: str) -> _Pool:
        for f in files[split]:
            if not present(f):
                raise _missing(name, root, f"{MNIST_FOLDERS[name]}/raw/{f}")
        x = read_idx(raw / files[split][0])
        y = read_idx(raw / files[split][1])
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{raw}: idx files hold images {x.shape} and labels {y.shape}; expected (N, H, W), (N,)")
        return _array_pool(x[:, None], y, adapt, str(raw))
    return _Source(name, name, lambda: pool("train"), lambda: pool("test"), str(raw), 10)


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST's format: big-endian header, unsigned bytes), plain or ``.gz``."""
    path = path if path.exists() else path.with_name(path.name + ".gz")
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
        if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
            raise ValueError("not an idx file of unsigned bytes")
        ndim = data[3]
        dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if arr.size != math.prod(dims):
            raise ValueError(f"header says {dims}, file holds {arr.size} values")
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise DataError(f"{path}: cannot read idx file ({_short(e)})") from None
    return arr.reshape(dims)


# -- corrupted CIFAR -------------------------------------------------------------------------------------


def _corrupted(kind: str, root: Path, download: bool, adapt: _Adapt, corruption, severity) -> _Source:
    folder, url = CORRUPTED[kind]
    base = root / folder
    if not (base / "labels.npy").exists() and (root / "labels.npy").exists():
        base = root  # --data-root is the folder itself
    if download and not (base / "labels.npy").exists():
        _fetch_archive(kind, url, root)
    if not (base / "labels.npy").exists():
        raise _missing(kind, root, f"{folder}/labels.npy",
                       f"download {url} and extract it there (or pass --download)")
    available = sorted(p.stem for p in base.glob("*.npy") if p.stem != "labels")
    if corruption is None or str(corruption).strip().lower() in ("", "all"):
        names = available
    else:
        names = [c for c in re.split(r"[,\s]+", str(corruption).strip()) if c]
        unknown = [c for c in names if c not in available]
        if unknown:
            raise DataError(f"--corruption {', '.join(unknown)} not in {base}: found {', '.join(available) or 'none'}")
    if not names:
        raise DataError(f"{base} holds labels.npy but no <corruption>.npy files")
    severities = _severities(severity)
    try:
        labels = np.load(base / "labels.npy", allow_pickle=False)
        arrays = {c: np.load(base / f"{c}.npy", mmap_mode="r", allow_pickle=False) for c in names}
    except (OSError, ValueError) as e:
        raise DataError(f"{base}: cannot read the corrupted set ({_short(e)})") from None
    total = len(labels)
    if labels.ndim != 1 or total % 5:
        raise DataError(f"{base / 'labels.npy'}: expected 5 severities of labels stacked, got shape {labels.shape}")
    per = total // 5
    for c, a in arrays.items():
        if a.ndim != 4 or a.shape[0] != total or a.shape[-1] not in (1, 3) or a.dtype != np.uint8:
            raise DataError(f"{base / (c + '.npy')}: expected uint8 ({total}, H, W, 3), got {a.dtype} {a.shape}")
    blocks = [(c, s) for c in names for s in severities]
    y = np.concatenate([labels[(s - 1) * per:s * per] for _, s in blocks]).astype(np.int64)

    def take(idx: np.ndarray) -> torch.Tensor:
        out = None
        for b in np.unique(idx // per):
            c, s = blocks[b]
            where = np.flatnonzero(idx // per == b)
            rows = np.asarray(arrays[c][(s - 1) * per + idx[where] % per]).transpose(0, 3, 1, 2)
            if out is None:
                out = np.empty((len(idx),) + rows.shape[1:], np.uint8)
            out[where] = rows
        return adapt_images(torch.from_numpy(out), adapt.resize, adapt.channels, str(base))
    info = {"corruption": names, "severity": severities}
    return _Source(kind, kind, lambda: _Pool(y, take), None, str(base), NUM_CLASSES[kind], info, test_only=True)


def _severities(severity) -> list[int]:
    if severity is None or str(severity).strip().lower() in ("", "all"):
        return [1, 2, 3, 4, 5]
    parts = re.split(r"[,\s]+", str(severity).strip()) if not isinstance(severity, (list, tuple)) else severity
    try:
        out = sorted({int(s) for s in parts if str(s)})
    except ValueError:
        out = []
    if not out or not all(1 <= s <= 5 for s in out):
        raise DataError(f"--severity {severity!r}: use 1 to 5, comma-separated (default all)")
    return out


# -- image files ---------------------------------------------------------------------------------------


class LazyImages:
    """Image files decoded on demand: stands in for a uint8 (N, C, H, W) tensor too big for host memory.

    Supports ``len``, ``shape``, ``ndim``, ``dtype``, indexing (a slice or index array gives another
    LazyImages), ``decode(indices)``/``load()`` (a tensor) and ``to(device)`` (decodes first).
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(self, paths: list, shape: tuple[int, int, int], mode: str, resize: int | None):
        self.paths, self.sample_shape, self.mode, self.resize = list(paths), tuple(shape), mode, resize

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.paths),) + self.sample_shape)

    @property
    def nbytes(self) -> int:
        return len(self.paths) * math.prod(self.sample_shape)

    def __getitem__(self, key):
        if isinstance(key, int):
            return torch.from_numpy(_decode_one(self.paths[key], self.mode, self.resize, self.sample_shape).copy())
        if isinstance(key, slice):
            paths = self.paths[key]
        else:
            paths = [self.paths[int(i)] for i in np.asarray(key).reshape(-1)]
        return LazyImages(paths, self.sample_shape, self.mode, self.resize)

    def decode(self, indices=None) -> torch.Tensor:
        paths = self.paths if indices is None else [self.paths[int(i)] for i in np.asarray(indices).reshape(-1)]
        return _decode_all(paths, self.sample_shape, self.mode, self.resize, threads=1)

    def load(self) -> torch.Tensor:
        return _decode_all(self.paths, self.sample_shape, self.mode, self.resize)

    def to(self, device, non_blocking: bool = False) -> torch.Tensor:
        return self.load().to(device, non_blocking=non_blocking)


def _image_pool(paths: list, labels: list, adapt: _Adapt) -> _Pool:
    def take(idx: np.ndarray):
        chosen = [paths[i] for i in idx]
        shape, mode = _probe(chosen[0], adapt)
        if len(chosen) * math.prod(shape) > HOST_BYTES_LIMIT:
            return LazyImages(chosen, shape, mode, adapt.resize)
        return _decode_all(chosen, shape, mode, adapt.resize)
    return _Pool(np.asarray(labels, dtype=np.int64), take)


def _probe(path: Path, adapt: _Adapt) -> tuple[tuple[int, int, int], str]:
    """Shape (C, H, W) and PIL mode every image gets: the first image's, unless --channels/--resize say."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            grey = im.mode in ("1", "L", "LA", "I", "I;16", "F")
            w, h = im.size
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({_short(e)})") from None
    c = adapt.channels or (1 if grey else 3)
    if adapt.resize:
        h = w = adapt.resize
    return (c, h, w), ("L" if c == 1 else "RGB")


def _decode_one(path, mode: str, resize: int | None, shape: tuple) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if resize:
                im = im.resize((resize, resize), Image.Resampling.BILINEAR)
            a = np.asarray(im)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({_short(e)})") from None
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    if a.shape != tuple(shape):
        raise DataError(f"{path}: image is {a.shape[2]}x{a.shape[1]} but the first one is {shape[2]}x{shape[1]}; "
                        "pass --resize N to bring every image to N x N")
    return a


def _decode_all(paths: list, shape: tuple, mode: str, resize: int | None, threads: int | None = None) -> torch.Tensor:
    out = np.empty((len(paths),) + tuple(shape), dtype=np.uint8)

    def work(i: int) -> None:
        out[i] = _decode_one(paths[i], mode, resize, shape)
    threads = threads or min(8, os.cpu_count() or 1)
    if threads == 1 or len(paths) < 64:
        for i in range(len(paths)):
            work(i)
    else:
        from tqdm.auto import tqdm

        with ThreadPoolExecutor(threads) as pool, tqdm(total=len(paths), disable=len(paths) < 5000, unit="img",
                                                       desc="decode", leave=False, file=sys.stderr) as bar:
            for _ in pool.map(work, range(len(paths)), chunksize=64):
                bar.update()
    return torch.from_numpy(out)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _class_folders(folder: Path, classes: list[str] | None = None, hint: str = "") -> tuple[list[str], list, list]:
    """(classes, image paths, labels) of ``folder/<class>/**/<image>``; classes sorted by name."""
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = found
    else:
        extra = [c for c in found if c not in classes]
        if extra:
            raise DataError(f"{folder}/{extra[0]} is not one of the {len(classes)} classes of the training folder"
                            f"{hint}")
    paths, labels = [], []
    for label, name in enumerate(classes):
        if (folder / name).is_dir():
            files = _image_files(folder / name)
            paths += files
            labels += [label] * len(files)
    if not paths:
        raise DataError(f"no images found in {folder}: expected {folder}/<class>/<image> "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    return classes, paths, labels


def _imagefolder(path: str | None, adapt: _Adapt) -> _Source:
    folder = Path(path or "").expanduser()
    if not path or not folder.is_dir():
        raise DataError(f"imagefolder:{path}: no such folder; give a folder of class folders, "
                        "imagefolder:PATH with PATH/<class>/<image>")
    subdirs = {d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")}
    name = f"imagefolder:{path}"
    if "train" in subdirs and subdirs <= {"train", "val", "test"}:
        classes, paths, labels = _class_folders(folder / "train")
        test_dir = folder / ("val" if "val" in subdirs else "test")
        hint = "; for Tiny ImageNet's own layout use --data tiny-imagenet" if test_dir.name == "val" else ""

        def test() -> _Pool:
            _, tpaths, tlabels = _class_folders(test_dir, classes, hint)
            return _image_pool(tpaths, tlabels, adapt)
        has_test = test_dir.is_dir()
        return _Source(name, "imagefolder", lambda: _image_pool(paths, labels, adapt), test if has_test else None,
                       str(folder), len(classes))
    classes, paths, labels = _class_folders(folder)
    return _Source(name, "imagefolder", lambda: _image_pool(paths, labels, adapt), None, str(folder),
                   len(classes))


def _tiny_imagenet(root: Path, download: bool, adapt: _Adapt) -> _Source:
    base = root / "tiny-imagenet-200"
    if not base.is_dir() and (root / "wnids.txt").exists():
        base = root  # --data-root is the folder itself
    if download and not (base / "train").is_dir():
        _fetch_archive("tiny-imagenet", TINY_IMAGENET_URL, root)
    if not (base / "train").is_dir():
        raise _missing("tiny-imagenet", root, "tiny-imagenet-200/train",
                       f"download {TINY_IMAGENET_URL} and unzip it there (or pass --download)")
    if (base / "wnids.txt").exists():
        wnids = sorted(w for w in (base / "wnids.txt").read_text().split() if w)
    else:
        wnids = sorted(d.name for d in (base / "train").iterdir() if d.is_dir())
    _, paths, labels = _class_folders(base / "train", wnids)
    index = {w: i for i, w in enumerate(wnids)}

    def test() -> _Pool:
        notes = base / "val" / "val_annotations.txt"
        if not notes.exists():
            raise _missing("tiny-imagenet", root, "tiny-imagenet-200/val/val_annotations.txt",
                           f"download {TINY_IMAGENET_URL} and unzip it there")
        tpaths, tlabels = [], []
        for line in notes.read_text().splitlines():
            parts = line.split("\t") if "\t" in line else line.split()
            if len(parts) < 2:
                continue
            if parts[1] not in index:
                raise DataError(f"{notes}: class {parts[1]} of {parts[0]} is not in wnids.txt")
            tpaths.append(base / "val" / "images" / parts[0])
            tlabels.append(index[parts[1]])
        if not tpaths:
            raise DataError(f"{notes}: no annotations")
        return _image_pool(tpaths, tlabels, adapt)
    return _Source("tiny-imagenet", "tiny-imagenet", lambda: _image_pool(paths, labels, adapt), test, str(base),
                   len(wnids))


# -- fake ------------------------------------------------------------------------------------------------


def _fake(arg: str | None, adapt: _Adapt) -> _Source:
    shape, classes, n = (3, 32, 32), 10, 1000
    parts = [p for p in (arg or "").split(":")]
    usage = f"bad --data fake:{arg}: use fake:CxHxW:CLASSES:N (C is 1 or 3), e.g. fake:3x32x32:10:1000"
    try:
        if len(parts) > 3:
            raise ValueError
        if parts[0]:
            shape = tuple(int(v) for v in parts[0].lower().split("x"))
        if len(parts) > 1 and parts[1]:
            classes = int(parts[1])
        if len(parts) > 2 and parts[2]:
            n = int(parts[2])
    except ValueError:
        raise DataError(usage) from None
    if len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1 or classes < 1 or n < 1:
        raise DataError(usage)
    from torchvision.datasets import FakeData

    fake = FakeData(size=n, image_size=shape, num_classes=classes, random_offset=0)
    x = np.empty((n,) + shape, dtype=np.uint8)
    y = np.empty(n, dtype=np.int64)
    for i in range(n):
        img, label = fake[i]
        a = np.asarray(img)
        x[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        y[i] = int(label)
    name = f"fake:{'x'.join(map(str, shape))}:{classes}:{n}"
    return _Source(name, "fake", lambda: _array_pool(x, y, adapt, name), None, "torchvision FakeData", classes)


# ---------------------------------------------------------------------------------------------
# Data vs model


def model_input(model: nn.Module) -> tuple[str, str, int] | None:
    """What the model's first weight layer (in registration order) takes, if it can tell:
    ``("channels", name, in_channels)`` for a Conv, ``("features", name, in_features)`` for a Linear."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return "channels", name, int(m.in_channels)
        if isinstance(m, nn.Linear) and int(m.in_features) > 0:
            return "features", name, int(m.in_features)
    return None


def _fix_hint(expect, shape: tuple) -> str:
    if expect is None or len(shape) != 3:
        return "check --arch, or the data's shape"
    kind, _, want = expect
    c, h, w = shape
    if kind == "channels":
        return f"pass --channels {want}" if want != c and want in (1, 3) else "check --arch, or --resize"
    for cc in (c, 1, 3):
        side = math.isqrt(want // cc) if want % cc == 0 else 0
        if side and side * side * cc == want and (cc, side, side) != (c, h, w):
            flags = ([f"--channels {cc}"] if cc != c else []) + ([f"--resize {side}"] if (side, side) != (h, w) else [])
            return "pass " + " ".join(flags)
    return "check --arch, or the data's shape"


def check_fits(model: nn.Module, ds: Dataset, device: torch.device) -> None:
    """One forward on two samples: a clear line if the data's shape or labels do not fit the model."""
    shape = tuple(int(s) for s in ds.x.shape[1:])
    shown = "x".join(map(str, shape))
    xb = ds.prepare(ds.x[:2].to(device))
    was_training = model.training
    try:
        with torch.inference_mode():
            out = model.eval()(xb)
    except Exception as e:  # any failure here is a data/model mismatch to explain
        expect = model_input(model)
        if expect is None:
            wants = "what the model takes is unknown"
        elif expect[0] == "channels":
            wants = f"the model's first layer {expect[1] or '(root)'} takes {expect[2]} input channels, " \
                    f"the data has {shape[0]}"
        else:
            wants = f"the model's first layer {expect[1] or '(root)'} takes {expect[2]} input features, " \
                    f"the data has {math.prod(shape)} per sample"
        raise DataError(
            f"the model cannot take --data {ds.name} inputs of shape {shape} ({shown}; {wants}; "
            f"{type(e).__name__}: {' '.join(str(e).split())[:160]}); {_fix_hint(expect, shape)}"
        ) from None
    finally:
        model.train(was_training)
    if isinstance(out, torch.Tensor) and out.ndim == 2 and ds.classes > out.shape[1]:
        raise DataError(
            f"--data {ds.name} has labels up to {ds.classes - 1} but the model outputs {out.shape[1]} classes"
        )
