"""Datasets by name or path, the paper's seeded splits, normalisation, device-resident batches.

Sources: ``digits`` (sklearn's 8x8 digits, bundled), array files (``.npz``/``.h5`` with ``x`` and
``y``), and torchvision datasets by name (cifar10, cifar100, svhn, mnist, fashion-mnist).
Images stay uint8 until a batch is on the device; then they are scaled to [0, 1] and normalised
with tensor ops on the whole batch.
"""

from __future__ import annotations

import importlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .defaults import DEFAULTS
from .errors import DataError

SPLITS = ("train", "val", "test", "all")

# Per-dataset normalisation (mean, std per channel). CIFAR values are the paper's.
NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}
TORCHVISION = {"cifar10", "cifar100", "svhn", "mnist", "fashion-mnist"}


@dataclass
class Dataset:
    """One split of a dataset, held on the host until batched on a device."""

    name: str
    split: str
    x: torch.Tensor  # uint8 images (N, C, H, W) scaled /255 when batched, or float inputs
    y: torch.Tensor  # int64 labels (N,)
    mean: tuple | None = None
    std: tuple | None = None
    seed: int = DEFAULTS.seed

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def classes(self) -> int:
        return int(self.y.max()) + 1 if len(self.y) else 0

    def describe(self) -> dict:
        return {"name": self.name, "split": self.split, "samples": len(self), "seed": self.seed}

    def prepare(self, xb: torch.Tensor) -> torch.Tensor:
        """uint8 -> float in [0, 1] -> normalised, as whole-batch tensor ops on xb's device."""
        xb = xb.float().div_(255) if xb.dtype == torch.uint8 else xb.float()
        if self.mean is not None:
            shape = (1, -1) + (1,) * (xb.ndim - 2)
            mean = torch.tensor(self.mean, device=xb.device).view(shape)
            std = torch.tensor(self.std, device=xb.device).view(shape)
            xb = (xb - mean) / std
        return xb

    def batches(self, batch_size: int, device: torch.device | str):
        """Model-ready input batches in order. The raw data moves to the device once."""
        x = self.x.to(device, non_blocking=True)
        for i in range(0, len(x), batch_size):
            yield self.prepare(x[i:i + batch_size])


# ---------------------------------------------------------------------------------------------
# Loading


def default_root() -> Path:
    return Path(os.environ.get("DEADSCAN_DATA", Path.home() / ".cache" / "deadscan" / "data"))


def load_data(spec: str, split: str = DEFAULTS.split, *, root: str | os.PathLike | None = None,
              download: bool = False, limit: int | None = None, seed: int = DEFAULTS.seed) -> Dataset:
    """Load one split of a dataset named by ``spec`` (a name or a file path)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    root = Path(root) if root else default_root()
    name = spec.lower()
    if name == "digits":
        x, y = _read_arrays(resource_path("sample_models", "digits.npz"))
        ds = _split_arrays("digits", x, y, split, seed)
    elif name in TORCHVISION:
        ds = _torchvision(name, split, root, download, seed)
    elif Path(spec).suffix.lower() in (".npz", ".h5", ".hdf5") or Path(spec).exists():
        x, y = _read_arrays(Path(spec))
        ds = _split_arrays(str(spec), x, y, split, seed)
    else:
        raise DataError(
            f"unknown --data {spec!r}: use digits, {', '.join(sorted(TORCHVISION))}, or a .npz/.h5 file"
        )
    if limit is not None:
        ds.x, ds.y = ds.x[:limit], ds.y[:limit]
    if len(ds) == 0:
        raise DataError(f"--data {spec} split {split!r} is empty")
    return ds


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
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: 'y' must be integer labels of shape (N,), got {y.dtype} {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{path}: 'x' has {len(x)} samples but 'y' has {len(y)}")
    return x, y


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


def _split_arrays(name: str, x: np.ndarray, y: np.ndarray, split: str, seed: int,
                  mean=None, std=None) -> Dataset:
    idx = split_indices(len(x), split, seed)
    return Dataset(name, split, torch.from_numpy(np.ascontiguousarray(x[idx])),
                   torch.from_numpy(y[idx].astype(np.int64)), mean, std, seed)


# ---------------------------------------------------------------------------------------------
# torchvision datasets (files on disk; downloads only with --download)


def _torchvision(name: str, split: str, root: Path, download: bool, seed: int) -> Dataset:
    train = split != "test"
    if download:
        _download(name, root, train)
    if name in ("cifar10", "cifar100"):
        x, y = _read_cifar(name, root, train)
    else:
        x, y = _read_torchvision(name, root, train)
    mean, std = NORMALISATION[name]
    if split == "test":
        return Dataset(name, split, torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)), mean, std, seed)
    idx = split_indices(len(x), split, seed, has_test=True) if split != "all" else np.arange(len(x))
    return Dataset(name, split, torch.from_numpy(np.ascontiguousarray(x[idx])),
                   torch.from_numpy(y[idx].astype(np.int64)), mean, std, seed)


def _tv_class(name: str):
    import torchvision.datasets as tvd

    return {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "svhn": tvd.SVHN,
            "mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}[name]


def _download(name: str, root: Path, train: bool) -> None:
    cls = _tv_class(name)
    try:
        if name == "svhn":
            cls(str(root), split="train" if train else "test", download=True)
        else:
            cls(str(root), train=train, download=True)
    except Exception as e:  # network errors come in many types
        raise DataError(f"cannot download {name} to {root} ({' '.join(str(e).split())[:200]}); "
                        f"copy the files there by hand and drop --download") from None


def _missing(name: str, root: Path, where: str) -> DataError:
    return DataError(f"{name} not found under {root} (looked for {where}); pass --download, or --data-root "
                     "pointing at the folder that holds it")


CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


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
    return np.concatenate(xs), np.concatenate(ys)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other global (no code runs)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

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


def _read_torchvision(name: str, root: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    cls = _tv_class(name)
    try:
        if name == "svhn":
            ds = cls(str(root), split="train" if train else "test", download=False)
            return np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.labels, dtype=np.int64)
        ds = cls(str(root), train=train, download=False)
    except ImportError as e:
        raise DataError(f"{name} needs an extra package ({e}); e.g. pip install scipy") from None
    except RuntimeError:
        raise _missing(name, root, f"{cls.__name__}/raw") from None
    x = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
    y = ds.targets.numpy() if isinstance(ds.targets, torch.Tensor) else np.asarray(ds.targets)
    return x[:, None].astype(np.uint8), y.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Data vs model


def check_fits(model: nn.Module, ds: Dataset, device: torch.device) -> None:
    """One forward on two samples: a clear line if the data's shape or labels do not fit."""
    xb = ds.prepare(ds.x[:2].to(device))
    try:
        with torch.inference_mode():
            out = model.eval()(xb)
    except Exception as e:  # any failure here is a data/model mismatch to explain
        raise DataError(
            f"the model cannot take --data {ds.name} inputs of shape {tuple(ds.x.shape[1:])} "
            f"({' '.join(str(e).split())[:200]}); check --arch, or the data's shape"
        ) from None
    if isinstance(out, torch.Tensor) and out.ndim == 2 and ds.classes > out.shape[1]:
        raise DataError(
            f"--data {ds.name} has labels up to {ds.classes - 1} but the model outputs {out.shape[1]} classes"
        )
