"""One split of a dataset and its batches (device-resident, or streamed)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from ..defaults import DEFAULTS
from ..distributed import span
from ..errors import DataError
from .augment import Augment, AutoAugment, default_padding, parse_augment, random_crop_flip
from .images import LazyImages
from .presets import DEVICE_FRACTION, STREAM_WORKERS


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
            for xb, _, _ in self._stream(None, batch_size, dev):
                yield self.prepare(xb)

    def augmentation(self, augment) -> Augment:
        """The augmentation plan ``augment`` names (see :func:`parse_augment`), checked against this data:
        images (N, C, H, W) for any of them (``default`` on other data: none), uint8 for AutoAugment."""
        plan = parse_augment(augment, default=self.augment_default, policy=self.autoaugment_policy)
        if not (plan.crop or plan.flip or plan.autoaugment):
            return plan
        if len(self.x.shape) != 4:
            if augment is None or str(augment).strip().lower() == "default":
                return Augment()
            raise DataError(f"--augment {augment} needs images (N, C, H, W); --data {self.name} holds "
                            f"{tuple(self.x.shape)}")
        if plan.autoaugment and self.x.dtype != torch.uint8:
            raise DataError(f"--augment autoaugment needs uint8 images; --data {self.name} holds {self.x.dtype} "
                            "inputs")
        return plan

    def train_batches(self, batch_size: int, device: torch.device | str,
                      generator: torch.Generator | int | None = None, augment: str | Augment | None = "default",
                      drop_last: bool = False, share=None):
        """One epoch of shuffled, augmented, model-ready ``(x, y)`` batches for a training loop.

        ``generator``: a ``torch.Generator`` on ``device`` (or an int seed for a fresh one) that draws the
        permutation, crops and flips; the same generator state gives the same epoch. (A generator on
        another device seeds one on ``device``, once per epoch.) ``None`` uses torch's
        default generator. ``augment``: ``"default"`` (the dataset's, ``AUGMENT_DEFAULTS``), ``"none"``, or
        a ``+``-joined combination of ``crop``, ``flip``, ``autoaugment`` (the dataset's policy) or
        ``autoaugment-cifar10|svhn|imagenet``, e.g. ``"crop+flip+autoaugment"``.

        Device-resident data: randperm, gather, crop/flip, AutoAugment and normalisation all run on the
        device; the only host read is one seed per epoch for AutoAugment's choices, outside the batch loop.

        ``share``: ``(rank, world)`` of a torchrun process: of each batch only its rows
        (``distributed.span``) are read, decoded and augmented, with the whole batch's draws, so the processes'
        shares make up the one-process batch.
        """
        dev = torch.device(device)
        plan = self.augmentation(augment)
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
                start, stop = _rows(len(idx), share)
                mine = idx[start:stop]
                yield self._augment(x, mine, plan, g, augmenter, rng, (start, len(idx))), y.index_select(0, mine)
        else:
            # the resident path's very draws: under torchrun a process that streams (its GPU had less room)
            # still takes its share of the same batches as one that does not
            order = torch.randperm(n, generator=g, device=dev).cpu()  # sync point: once per epoch
            for xb, yb, part in self._stream(order, batch_size, dev, drop_last, share):
                yield self._augment(xb, None, plan, g, augmenter, rng, part), yb

    def release(self) -> None:
        """Drop the device copy kept for repeated epochs."""
        self._device_copy = None
        self._norm_cache.clear()

    # -- internals -------------------------------------------------------------------------------

    def _augment(self, x, idx, plan: Augment, g, augmenter, rng, part: tuple[int, int]) -> torch.Tensor:
        """``part``: (first row, size) of the batch these rows are of (the draws are the whole batch's)."""
        if plan.crop or plan.flip:
            pad = plan.padding if plan.padding is not None else default_padding(x.shape[-2])
            xb = random_crop_flip(x, idx, padding=pad if plan.crop else 0, flip=plan.flip, generator=g,
                                  of_batch=part)
        else:
            xb = x if idx is None else x.index_select(0, idx)
        if augmenter is not None:
            xb = augmenter(xb, rng, of_batch=part)
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

    def _stream(self, order: torch.Tensor | None, batch_size: int, dev: torch.device, drop_last: bool = False,
                share=None):
        """Batches read (and decoded) by DataLoader workers, pinned, copied to the device asynchronously, with
        (first row, size) of the batch they are (of ``share``: this process's rows only)."""
        from torch.utils.data import DataLoader

        order = torch.arange(len(self)) if order is None else order
        workers = STREAM_WORKERS if isinstance(self.x, LazyImages) or dev.type == "cuda" else 0
        loader = DataLoader(_BatchSource(self.x, self.y, order, batch_size, drop_last, share), batch_size=None,
                            num_workers=workers, pin_memory=dev.type == "cuda",
                            prefetch_factor=4 if workers else None)
        for xb, yb, part in loader:
            yield xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True), tuple(part)


def _rows(size: int, share: tuple[int, int] | None) -> tuple[int, int]:
    """The rows of a batch of ``size`` that process ``share=(rank, world)`` takes (all of them: None)."""
    return (0, size) if share is None else span(size, *share)


class _BatchSource(torch.utils.data.Dataset):
    """Item i is batch i of ``order``: what each DataLoader worker reads (and decodes)."""

    def __init__(self, x, y, order: torch.Tensor, batch_size: int, drop_last: bool, share=None):
        self.x, self.y, self.order, self.batch_size, self.share = x, y, order, batch_size, share
        n = len(order)
        self.n = n // batch_size if drop_last else -(-n // batch_size)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        idx = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        start, stop = _rows(len(idx), self.share)
        part, idx = (start, len(idx)), idx[start:stop]  # only this process's rows are decoded
        x = self.x.decode(idx.numpy()) if isinstance(self.x, LazyImages) else self.x.index_select(0, idx)
        return x, self.y.index_select(0, idx), part


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
