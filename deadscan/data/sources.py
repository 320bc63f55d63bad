"""Readers for each named source and for array files; none of them runs code from the files."""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import pickle
import re
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import DataError, one_line
from ..files import check_declared, npy_header, open_regular, plain_dtype, read_array_file, shown
from .presets import CORRUPTED, LUMA, NUM_CLASSES


def default_root() -> Path:
    return Path(os.environ.get("DEADSCAN_DATA", Path.home() / ".cache" / "deadscan" / "data"))


@dataclass(frozen=True)
class Adapt:
    """Load-time changes the user asked for."""

    resize: int | None = None
    channels: int | None = None


@dataclass
class Pool:
    """A set of samples: labels now, inputs on demand (``take(indices)``)."""

    y: np.ndarray
    take: Callable[[np.ndarray], torch.Tensor]


@dataclass
class Source:
    """What every source's loader returns (``load.SOURCES`` maps a --data kind to its loader): the pools
    are read only when called, so a split reads only the files it needs."""

    name: str
    kind: str  # key into NORMALISATION, AUGMENT_DEFAULTS, ...
    train: Callable[[], Pool]  # the training set (or the whole file)
    test: Callable[[], Pool] | None  # the official test set, if any
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


def _array_pool(x: np.ndarray, y: np.ndarray, adapt: Adapt, where: str) -> Pool:
    def take(idx: np.ndarray) -> torch.Tensor:
        return adapt_images(torch.from_numpy(np.ascontiguousarray(x[idx])), adapt.resize, adapt.channels, where)
    return Pool(np.asarray(y, dtype=np.int64), take)


def arrays_source(name: str, path: Path, adapt: Adapt, kind: str = "arrays") -> Source:
    x, y = _read_arrays(path)
    return Source(name, kind, lambda: _array_pool(x, y, adapt, str(path)), None, str(path),
                   NUM_CLASSES.get(kind))


def _read_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``y`` of a .npz or HDF5 file; shapes, types and sizes checked before anything is read."""
    found = read_array_file(path, ("x", "y"), ("x", "y"), _check_meta, "'x' (inputs) and 'y' (labels)")
    return _check_arrays(path, found["x"], found["y"])


def _check_meta(path, key: str, shape: tuple, dtype: np.dtype) -> None:
    """Type and rank of ``x`` or ``y``, from a header: checked before the data is read."""
    if key == "x":
        if not (plain_dtype(dtype, "f") or plain_dtype(dtype, "u") and dtype.itemsize == 1):
            raise DataError(f"{path}: 'x' must be uint8 or float (16, 32 or 64 bit), got {dtype}")
        if not 2 <= len(shape) <= 4:
            raise DataError(f"{path}: 'x' must be shaped (N, C, H, W) or (N, D), got {shape}")
        if 0 in shape[1:]:
            raise DataError(f"{path}: 'x' samples are empty (shape {shape}); store non-empty samples")
    elif len(shape) != 1 or not plain_dtype(dtype, "iu"):
        raise DataError(f"{path}: 'y' must be integer labels of shape (N,), got {dtype} {shape}")


def _check_arrays(path, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _check_meta(path, "x", x.shape, x.dtype)
    _check_meta(path, "y", y.shape, y.dtype)
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


def cifar_source(name: str, root: Path, download: bool, adapt: Adapt) -> Source:
    folder = CIFAR_FILES[name][0]
    if download and not all((root / folder / f).exists() for f in CIFAR_FILES[name][1] + CIFAR_FILES[name][2]):
        _download(name, root)

    def pool(train: bool) -> Pool:
        x, y = _read_cifar(name, root, train)
        return _array_pool(x, y, adapt, str(root / folder))
    return Source(name, name, lambda: pool(True), lambda: pool(False), str(root / folder), NUM_CLASSES[name])


def _read_cifar(name: str, root: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    folder, train_files, test_files, label_key = CIFAR_FILES[name]
    base = root / folder
    xs, ys = [], []
    for fname in train_files if train else test_files:
        path = base / fname
        if not path.exists():
            raise _missing(name, root, f"{folder}/{fname}")
        batch = read_cifar_batch(path)
        data, labels = batch.get(b"data"), batch.get(label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DataError(f"{path}: not a CIFAR batch (b'data' must be uint8 (N, 3072), got {got})")
        y = _labels(labels)
        if y is None:
            raise DataError(f"{path}: not a CIFAR batch ({label_key!r} must be a list of labels 0 to 2**31-1)")
        if len(data) != len(y):
            raise DataError(f"{path}: not a CIFAR batch ({len(data)} images, {len(y)} labels)")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def _labels(labels) -> np.ndarray | None:
    """int64 labels from a list of ints or a 1-D integer array, each 0 to 2**31-1; else None."""
    if isinstance(labels, list) and all(type(v) is int and 0 <= v < 2**31 for v in labels):
        return np.array(labels, dtype=np.int64)
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        y = labels.astype(np.int64)  # uint64 above 2**63 turns negative: refused below
        return y if not len(y) or 0 <= y.min() and y.max() < 2**31 else None
    return None


class _Dtype:
    """A numpy dtype as a pickle describes it, made here from a checked name: numpy's ``dtype.__setstate__``
    never runs (a crafted state can declare object fields, which would read raw bytes as pointers)."""

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype

    def __setstate__(self, state) -> None:
        # numpy's state of a plain number type: (3, byte order, None, None, None, -1, -1, 0)
        if not (type(state) is tuple and len(state) == 8 and state[0] == 3
                and state[2:] == (None, None, None, -1, -1, 0) and _text(state[1]) in ("<", ">", "|", "=")):
            raise pickle.UnpicklingError("a dtype that is not a plain integer type is not allowed in a CIFAR batch")
        if _text(state[1]) in "<>":
            self.dtype = self.dtype.newbyteorder(_text(state[1]))


class _Array:
    """An ndarray a protocol-2 pickle fills in by ``__setstate__``: checked, then a view of the pickle's bytes."""

    array = None

    def __setstate__(self, state) -> None:
        if self.array is not None or type(state) is not tuple or len(state) != 5 or state[0] != 1:
            raise pickle.UnpicklingError("malformed numpy array")
        _, shape, dtype, fortran, raw = state
        self.array = _array_from(raw, dtype, shape, "F" if fortran else "C")


_NDARRAY = object()  # stands for numpy.ndarray in a pickle: only ever compared with
_INT_DTYPES = ("u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8")


def _text(v) -> str | None:
    return v.decode("latin1") if type(v) is bytes else v if type(v) is str else None


def _array_from(raw, dtype, shape, order) -> np.ndarray:
    """An integer ndarray over ``raw``, once its byte count matches the declared shape (no copy is made)."""
    if not (isinstance(dtype, _Dtype) and type(raw) in (bytes, bytearray) and type(shape) is tuple
            and all(type(d) is int and d >= 0 for d in shape) and len(shape) <= 4 and _text(order) in ("C", "F")):
        raise pickle.UnpicklingError("malformed numpy array")
    if len(raw) != math.prod(shape) * dtype.dtype.itemsize:
        raise pickle.UnpicklingError(f"array of shape {shape} {dtype.dtype} holds {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype.dtype).reshape(shape, order=_text(order))


class _ArraysOnly(pickle.Unpickler):
    """Unpickles what a CIFAR batch holds: a dict of integer arrays, lists of ints and strings.

    numpy's names are mapped to small constructors here that check type, shape and byte count before an
    array exists (a view of the pickle's bytes); every other global is refused, so no code runs.
    ``_codecs.encode`` (protocol 2 pickles written by Python 3 use it for bytes) may only make latin-1
    bytes, no more in all than the file's size (a memoised string encoded again and again)."""

    def __init__(self, f, budget: int):
        super().__init__(f, encoding="bytes")
        self.budget = budget
        self.names = {"_reconstruct": self._reconstruct, "ndarray": _NDARRAY, "dtype": self._dtype,
                      "_frombuffer": self._frombuffer}

    def find_class(self, module: str, name: str):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct" \
                or module == "numpy" and name in ("ndarray", "dtype") \
                or module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
            return self.names[name]
        if (module, name) == ("_codecs", "encode"):
            return self._encode
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")

    @staticmethod
    def _dtype(name, align=False, copy=True) -> _Dtype:
        if _text(name) not in _INT_DTYPES:
            raise pickle.UnpicklingError(f"dtype {name!r} is not allowed in a CIFAR batch (integers only)")
        return _Dtype(np.dtype(_text(name)))

    @staticmethod
    def _reconstruct(cls, shape, typecode) -> _Array:
        if cls is not _NDARRAY:
            raise pickle.UnpicklingError("only plain numpy arrays are allowed in a CIFAR batch")
        return _Array()

    @staticmethod
    def _frombuffer(buf, dtype, shape, order) -> np.ndarray:
        return _array_from(buf, dtype, shape, order)

    def _encode(self, text, encoding="latin1") -> bytes:
        if type(text) is not str or encoding not in ("latin1", "latin-1") or len(text) > self.budget:
            raise pickle.UnpicklingError("_codecs.encode is allowed only for latin-1 bytes within the file's size")
        self.budget -= len(text)
        return text.encode("latin1")


def read_cifar_batch(path: Path) -> dict:
    """Read a CIFAR python batch (a pickled dict of arrays, lists and strings) without running code.

    Keys come back as bytes; values are integer ndarrays, ints, bytes, str or lists of ints and strings."""
    with open_regular(path) as f:
        try:
            obj = _ArraysOnly(f, os.fstat(f.fileno()).st_size).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError,
                OverflowError, MemoryError, RecursionError, OSError) as e:
            raise DataError(f"{path}: refused or damaged CIFAR batch ({one_line(e, 200)})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR batch (holds {type(obj).__name__})")
    out = {}
    for k, v in obj.items():
        if isinstance(v, _Array):
            v = v.array
        odd = [type(e).__name__ for e in v if type(e) not in (int, bytes, str)] if type(v) is list else \
            [] if type(v) in (int, bytes, str) or isinstance(v, np.ndarray) else [type(v).__name__]
        if type(k) not in (bytes, str) or odd:
            what = f"key {k!r:.40}" if type(k) not in (bytes, str) else \
                f"entry {k!r:.40} holds {'a list of ' if type(v) is list else ''}{odd[0]}"
            raise DataError(f"{path}: refused CIFAR batch ({what}; a batch holds arrays, numbers and strings)")
        out[k.encode("latin1", "replace") if type(k) is str else k] = v
    return out


def svhn_source(root: Path, download: bool, adapt: Adapt) -> Source:
    files = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
    if download and not all((root / f).exists() for f in files.values()):
        _download("svhn", root)

    def pool(split: str) -> Pool:
        path = root / files[split]
        if not path.exists():
            raise _missing("svhn", root, files[split])
        try:
            import scipy.io
        except ImportError:
            raise DataError("svhn's .mat files need scipy: pip install scipy") from None
        try:
            with open_regular(path) as f:
                _check_mat(path, f, scipy.io.whosmat(f))
                f.seek(0)
                mat = scipy.io.loadmat(f, variable_names=["X", "y"])
            x = np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1)), dtype=np.uint8)  # HWCN -> NCHW
            y = mat["y"].astype(np.int64).reshape(-1)
        except DataError:
            raise
        except MemoryError:
            raise DataError(f"{path}: not enough memory to load it") from None
        except Exception as e:  # scipy's MatReadError and friends: a damaged or foreign file
            raise DataError(f"{path}: not an SVHN .mat file ({one_line(e, 200)})") from None
        y[y == 10] = 0
        if len(x) != len(y):
            raise DataError(f"{path}: {len(x)} images but {len(y)} labels")
        return _array_pool(x, y, adapt, str(path))
    return Source("svhn", "svhn", lambda: pool("train"), lambda: pool("test"), str(root), 10)


_MAT_ITEMSIZE = {"uint8": 1, "int8": 1, "uint16": 2, "int16": 2, "uint32": 4, "int32": 4, "uint64": 8,
                 "int64": 8, "single": 4, "double": 8}


def _check_mat(path: Path, f, variables: list) -> None:
    """SVHN's X (32, 32, 3, N) uint8 and y (N, 1) numbers, sizes checked against the file before loading."""
    size = os.fstat(f.fileno()).st_size
    found = {name: (shape, cls) for name, shape, cls in variables}
    for key in ("X", "y"):
        if key not in found:
            raise DataError(f"{path}: not an SVHN .mat file (no variable {key!r}; found {sorted(found)})")
        shape, cls = found[key]
        if cls not in _MAT_ITEMSIZE or (key == "X") != (cls == "uint8" and len(shape) == 4):
            raise DataError(f"{path}: not an SVHN .mat file ({key!r} is {cls} {shape})")
        # the variable may be stored zlib-compressed (MAT 5): allow the ratio deflate can reach
        check_declared(path, f"{key!r} {shape}", math.prod(shape) * _MAT_ITEMSIZE[cls], size, compressed=True)


MNIST_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def mnist_source(name: str, root: Path, download: bool, adapt: Adapt) -> Source:
    raw = root / MNIST_FOLDERS[name] / "raw"
    files = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

    def present(f: str) -> bool:
        return (raw / f).exists() or (raw / (f + ".gz")).exists()
    if download and not all(present(f) for pair in files.values() for f in pair):
        _download(name, root)

    def pool(split: str) -> Pool:
        for f in files[split]:
            if not present(f):
                raise _missing(name, root, f"{MNIST_FOLDERS[name]}/raw/{f}")
        x = read_idx(raw / files[split][0])
        y = read_idx(raw / files[split][1])
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{raw}: idx files hold images {x.shape} and labels {y.shape}; expected (N, H, W), (N,)")
        return _array_pool(x[:, None], y, adapt, str(raw))
    return Source(name, name, lambda: pool("train"), lambda: pool("test"), str(raw), 10)


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST's format: big-endian header, unsigned bytes), plain or ``.gz``.

    The header's dimensions are checked against the file's size (a ``.gz`` is inflated only as far as the
    header declares, within the expansion limit: a gzip bomb stops there)."""
    path = path if path.exists() else path.with_name(path.name + ".gz")
    zipped = path.suffix == ".gz"
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            with (gzip.GzipFile(fileobj=f, mode="rb") if zipped else contextlib.nullcontext(f)) as s:
                head = s.read(4)
                if len(head) < 4 or head[:3] != b"\0\0\x08" or head[3] == 0:
                    raise ValueError("not an idx file of unsigned bytes")
                ndim = head[3]
                dims = struct.unpack(f">{ndim}I", s.read(4 * ndim))
                count = math.prod(dims)
                check_declared(path, f"the header ({'x'.join(map(str, dims))})", count,
                               size if zipped else size - 4 - 4 * ndim, zipped)
                data = s.read(count)
                if len(data) != count or s.read(1):
                    raise ValueError(f"header says {dims}, file holds {'more' if len(data) == count else len(data)} "
                                     "values")
        except (OSError, ValueError, struct.error, EOFError, zlib.error) as e:
            raise DataError(f"{path}: cannot read idx file ({one_line(e, 200)})") from None
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def corrupted_source(kind: str, root: Path, download: bool, adapt: Adapt, corruption, severity) -> Source:
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
    labels = load_npy(base / "labels.npy")
    arrays = {c: load_npy(base / f"{c}.npy", mmap=True) for c in names}
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
    return Source(kind, kind, lambda: Pool(y, take), None, str(base), NUM_CLASSES[kind], info, test_only=True)


def load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    """A plain-number .npy file, its header checked against its size first; ``mmap``: mapped, not read."""
    with open_regular(path) as f:
        try:
            shape, fortran, dtype = npy_header(f)
            if not plain_dtype(dtype, "uif"):
                raise DataError(f"{shown(path)}: holds {dtype}, not plain numbers; write it with numpy.save")
            count, offset = math.prod(shape), f.tell()
            stored = os.fstat(f.fileno()).st_size - offset
            check_declared(path, f"the header ({dtype} {shape})", count * dtype.itemsize, stored, False)
            order = "F" if fortran else "C"
            if mmap and count:
                return np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
            return np.fromfile(f, dtype=dtype, count=count).reshape(shape, order=order)
        except (OSError, ValueError) as e:
            raise DataError(f"{shown(path)}: cannot read .npy file ({one_line(e, 200)})") from None


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


def fake_source(arg: str | None, adapt: Adapt) -> Source:
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
    return Source(name, "fake", lambda: _array_pool(x, y, adapt, name), None, "torchvision FakeData", classes)
