"""Readers for each named source and for array files; none of them runs code from the files."""

from __future__ import annotations

import contextlib
import gzip
import importlib
import math
import os
import pickle
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import DataError, one_line
from .presets import CORRUPTED, LUMA, NUM_CLASSES


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


def _tv_class(name: str):
    import torchvision.datasets as tvd

    return {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "svhn": tvd.SVHN,
            "mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}[name]


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
        raise DataError(f"cannot download {name} into {root} ({one_line(e, 200)}); copy the files there by hand "
                        "and drop --download") from None


def _fetch_archive(name: str, url: str, root: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        with contextlib.redirect_stdout(sys.stderr):
            download_and_extract_archive(url, str(root))
    except Exception as e:  # network and archive errors come in many types
        raise DataError(f"cannot download {name} from {url} into {root} ({one_line(e, 200)}); download and extract "
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
            raise DataError(f"{path}: not an SVHN .mat file ({one_line(e, 200)})") from None
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
        raise DataError(f"{path}: cannot read idx file ({one_line(e, 200)})") from None
    return arr.reshape(dims)


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
        raise DataError(f"{base}: cannot read the corrupted set ({one_line(e, 200)})") from None
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
