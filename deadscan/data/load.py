"""``load_data``: a spec and a split in, a Dataset out; seeded splits and normalisation."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..defaults import DEFAULTS
from ..errors import DataError
from ..resources import resource_path
from .dataset import Dataset
from .images import imagefolder_source, tiny_imagenet_source
from .presets import ALIASES, AUGMENT_DEFAULTS, AUTOAUGMENT_POLICY, CORRUPTED, LUMA, NAMES, NORMALISATION, SPLITS
from .sources import (Adapt, Source, arrays_source, cifar_source, corrupted_source, default_root, fake_source,
                      mnist_source, svhn_source)


def load_data(spec: str, split: str = DEFAULTS.split, *, root: str | os.PathLike | None = None,
              download: bool = False, limit: int | None = None, seed: int = DEFAULTS.seed,
              val_fraction: float = DEFAULTS.val_fraction, mean=None, std=None, resize: int | None = None,
              channels: int | None = None, corruption: str | None = None, severity=None,
              seq_len: int | None = None, tokenizer=None, text_field: str | None = None, model_folder=None):
    """Load one split of a dataset named by ``spec`` (a name, ``imagefolder:PATH``, ``fake:...`` or a file).

    ``mean``/``std``: per-channel values (a sequence, or a comma-separated string; one value applies to
    every channel) replacing the dataset's preset. ``resize``: N for N x N images. ``channels``: 1 or 3.
    ``corruption``/``severity``: for cifar10-c / cifar100-c (comma-separated lists, default all).
    Token data (a text corpus, or an array file holding ``input_ids``) gives a :class:`TokenDataset`
    (``seq_len``, ``tokenizer``, ``text_field``, ``model_folder``: see ``deadscan.data.tokens``).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction} must be at least 0 and below 1")
    if limit is not None and limit < 1:
        raise DataError(f"--limit {limit} must be at least 1")
    from .tokens import is_token_data, load_tokens

    if is_token_data(spec):
        image_only = {"--mean": mean, "--std": std, "--resize": resize, "--channels": channels,
                      "--corruption": corruption, "--severity": severity}
        given = [flag for flag, v in image_only.items() if v is not None]
        if given:
            raise DataError(f"{', '.join(given)} apply to images; --data {spec} is token data")
        return load_tokens(spec, split, seed=seed, val_fraction=val_fraction, limit=limit, seq_len=seq_len,
                           tokenizer=tokenizer, text_field=text_field, model_folder=model_folder)
    if seq_len is not None or tokenizer is not None or text_field is not None:
        raise DataError("--seq-len, --tokenizer and --text-field apply to token data (a .txt/.jsonl/.parquet corpus, "
                        "or a .npz/.h5 file holding input_ids)")
    root = Path(root).expanduser() if root else default_root()
    kind, arg = parse_spec(spec)
    adapt = Adapt(_positive(resize, "--resize"), _channel_count(channels))
    if kind not in CORRUPTED and (corruption is not None or severity is not None):
        raise DataError("--corruption and --severity apply to cifar10-c and cifar100-c only")
    src = SOURCES[kind](SourceRequest(str(spec), kind, arg, root, download, adapt, corruption, severity))
    ds = _build(src, spec, split, seed, val_fraction, limit)
    ds.mean, ds.std = _normalisation(NORMALISATION.get(src.kind), mean, std, ds)
    ds.info.update({k: v for k, v in (("resize", adapt.resize), ("channels", adapt.channels)) if v})
    return ds


@dataclass(frozen=True)
class SourceRequest:
    """What a source's loader is given: the --data spec parsed, and the options that choose files and shapes."""

    spec: str
    kind: str  # a key of SOURCES (parse_spec's first value)
    arg: str | None  # what follows ``imagefolder:`` / ``fake:``, or the file path
    root: Path  # --data-root
    download: bool
    adapt: Adapt
    corruption: str | None = None
    severity: object = None


# --data kind -> loader. Every kind parse_spec returns has one entry.
SOURCES: dict[str, Callable[[SourceRequest], Source]] = {
    "digits": lambda r: arrays_source("digits", resource_path("sample_models", "digits.npz"), r.adapt, kind="digits"),
    "cifar10": lambda r: cifar_source(r.kind, r.root, r.download, r.adapt),
    "cifar100": lambda r: cifar_source(r.kind, r.root, r.download, r.adapt),
    "svhn": lambda r: svhn_source(r.root, r.download, r.adapt),
    "mnist": lambda r: mnist_source(r.kind, r.root, r.download, r.adapt),
    "fashion-mnist": lambda r: mnist_source(r.kind, r.root, r.download, r.adapt),
    "tiny-imagenet": lambda r: tiny_imagenet_source(r.root, r.download, r.adapt),
    **{k: (lambda r: corrupted_source(r.kind, r.root, r.download, r.adapt, r.corruption, r.severity))
       for k in CORRUPTED},
    "imagefolder": lambda r: imagefolder_source(r.arg, r.adapt),
    "fake": lambda r: fake_source(r.arg, r.adapt),
    "arrays": lambda r: arrays_source(r.spec, Path(r.arg).expanduser(), r.adapt),
}


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
    raise DataError(f"unknown --data {spec!r}{_did_you_mean(low)}: use {', '.join(n for n in NAMES if n != 'fake')}, "
                    "fake[:CxHxW[:CLASSES[:N]]], imagefolder:PATH, or a .npz/.h5 file")


def _did_you_mean(low: str) -> str:
    """`` (did you mean digits?)`` for a near miss of a dataset name or alias, else ``""``."""
    import difflib

    close = difflib.get_close_matches(low, [*NAMES, *ALIASES], n=2, cutoff=0.75)
    names = list(dict.fromkeys(ALIASES.get(c, c) for c in close))  # an alias suggests its dataset, once
    return f" (did you mean {' or '.join(names)}?)" if names else ""


def _build(src: Source, spec, split: str, seed: int, val_fraction: float, limit: int | None) -> Dataset:
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
    if y.max() >= 2**31:  # a class count nothing can allocate outputs for
        raise DataError(f"{src.location}: labels must be below 2**31, found {int(y.max())}")
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
