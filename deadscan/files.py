"""Untrusted files opened and sized safely; no torch.

Every reader of a file someone else may have written starts here: only regular files are opened (a
FIFO or device would block or never end), and a size a file declares is checked against the bytes it
stores before anything is allocated. Array files (.npz, HDF5) are read key by key the same way.
"""

from __future__ import annotations

import math
import os
import stat
import tokenize
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from .defaults import DEFAULTS, MAX_BYTES_ENV
from .errors import DataError, one_line


def shown(path) -> str:
    """A path for an error line: quoted and escaped if it holds control characters (names come from files)."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def not_regular(path) -> DataError:
    return DataError(f"{shown(path)}: not a regular file (a FIFO, device, socket, folder or broken link); "
                     "give a regular file")


def regular_size(path) -> int:
    """The size of ``path`` if it is a regular file (checked without opening it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{shown(path)}: no such file") from None
    except OSError as e:
        raise DataError(f"{shown(path)}: cannot read ({one_line(e, 200)})") from None
    if not stat.S_ISREG(st.st_mode):
        raise not_regular(path)
    return st.st_size


def open_regular(path):
    """Open ``path`` for binary reading if it is a regular file: a FIFO or device would block or never end.

    Checked by stat before opening, and again on the open descriptor (O_NONBLOCK: a FIFO swapped in
    between cannot block the open)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise not_regular(path)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise DataError(f"{shown(path)}: no such file") from None
    except OSError as e:
        raise DataError(f"{shown(path)}: cannot open ({one_line(e, 200)})") from None
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise not_regular(path)
    return f


def check_declared(path, what: str, nbytes: int, stored: int, compressed: bool) -> None:
    """Refuse a declared size before allocating it: above the limit, or more than ``stored`` bytes can hold
    (as they are, or inflated by at most ``max_expand_ratio``)."""
    if nbytes > DEFAULTS.max_decoded_bytes:
        raise DataError(f"{shown(path)}: {what} declares {nbytes:,} bytes, above the "
                        f"{DEFAULTS.max_decoded_bytes:,}-byte limit; if the file is trusted, raise it with "
                        f"{MAX_BYTES_ENV}")
    if nbytes > stored * (DEFAULTS.max_expand_ratio if compressed else 1):
        raise DataError(f"{shown(path)}: {what} declares {nbytes:,} bytes but the file stores {stored:,}"
                        f"{' compressed' if compressed else ''}; the file is truncated or crafted, write it again")


def plain_dtype(dtype: np.dtype, kinds: str) -> bool:
    """A plain number type of ``kinds`` ('u', 'i', 'f', 'b'), at most 8 bytes: no objects, fields or subarrays."""
    return dtype.fields is None and dtype.subdtype is None and dtype.kind in kinds and dtype.itemsize <= 8


def npy_header(f) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream ``f``, left at the first data byte."""
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"unsupported .npy version {version}")
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    try:
        shape, fortran, dtype = read(f)
    except (SyntaxError, tokenize.TokenError, IndexError) as e:  # numpy re-parses a garbled header as Python
        raise ValueError(f"damaged .npy header ({one_line(e, 80)})") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"negative size in shape {shape}")
    return shape, fortran, dtype


# ---------------------------------------------------------------------------------------------
# Array files: .npz or HDF5, named arrays checked from their headers before they are read

CheckMeta = Callable[[Path, str, tuple, np.dtype], None]  # (path, key, shape, dtype): raise DataError if wrong
Rows = Callable[[str, tuple], np.ndarray]  # (key, shape) -> the rows (first-axis indices) to keep, in order
BLOCK_BYTES = 4 * 2**20  # rows are gathered from a file this many bytes at a time


def read_array_file(path: Path, keys: tuple[str, ...], required: tuple[str, ...], check_meta: CheckMeta,
                    expected: str, what: str = "arrays", rows: Rows | None = None) -> dict[str, np.ndarray]:
    """The arrays ``keys`` (those present; ``required`` must be) of a .npz or HDF5 file. ``expected`` says
    what the file should hold, for the message when a required key is missing. ``rows``: asked with each
    array's key and shape (after its header is checked), it names the rows to keep; they are gathered a
    block at a time, so a split of a large file never holds the whole file."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            reader = _read_npz if path.suffix.lower() == ".npz" else _read_h5
            return reader(path, f, size, keys, required, check_meta, expected, rows)
        except DataError:
            raise
        except MemoryError:
            raise DataError(f"{shown(path)}: not enough memory to load the {what}; use a smaller file") from None
        except (OSError, ValueError, TypeError, KeyError, RuntimeError, EOFError, NotImplementedError,
                zipfile.BadZipFile, zlib.error) as e:  # damaged files fail in many ways
            raise DataError(f"{shown(path)}: cannot read {what} ({one_line(e, 200)}); write the file again") from None


def _read_npz(path: Path, f, size: int, keys, required, check_meta: CheckMeta, expected: str,
              rows: Rows | None = None) -> dict:
    out = {}
    with zipfile.ZipFile(f) as zf:
        members = {n[:-4] if n.endswith(".npy") else n: zf.getinfo(n) for n in zf.namelist()}
        if any(k not in members for k in required):
            raise DataError(f"{shown(path)}: expected arrays {expected}, found {list(members)}")
        for key in keys:
            if key not in members:
                continue
            info = members[key]
            with zf.open(info) as m:
                shape, fortran, dtype = npy_header(m)
                header = m.tell()
            check_meta(path, key, shape, dtype)
            packed = info.compress_type != zipfile.ZIP_STORED
            stored = info.compress_size if info.compress_size <= size else 0  # a size the archive cannot hold
            check_declared(path, f"'{key}' {shape} {dtype}", math.prod(shape) * dtype.itemsize,
                           stored if packed else max(stored - header, 0), packed)
            want = None if rows is None else rows(key, shape)
            with zf.open(info) as m:
                if want is None or fortran:  # Fortran order keeps no row together: read it whole
                    a = np.lib.format.read_array(m, allow_pickle=False)
                    out[key] = a if want is None else a[want]
                else:
                    npy_header(m)  # to the first data byte
                    out[key] = gather_rows(_stream_reader(m, shape, dtype), shape, dtype, want)
                    while m.read(BLOCK_BYTES):  # to the end, where zipfile checks the member's CRC
                        pass
    return out


def _stream_reader(m, shape: tuple, dtype: np.dtype):
    """``read(start, stop)``: rows [start, stop) of the C-order array whose bytes ``m`` streams from its first
    row on; called with increasing ranges, it reads past the rows between them."""
    row = math.prod(shape[1:]) * dtype.itemsize
    at = [0]

    def take(nbytes: int) -> bytes:
        data = m.read(nbytes)
        if len(data) != nbytes:
            raise ValueError(f"the array's data ends early ({len(data)} of {nbytes} bytes)")
        return data

    def read(start: int, stop: int) -> np.ndarray:
        skip = (start - at[0]) * row
        while skip:
            skip -= len(take(min(skip, BLOCK_BYTES)))
        at[0] = stop
        return np.frombuffer(take((stop - start) * row), dtype).reshape(stop - start, *shape[1:])
    return read


def gather_rows(read, shape: tuple, dtype: np.dtype, want: np.ndarray) -> np.ndarray:
    """``a[want]`` of an array ``a`` of ``shape`` that ``read(start, stop)`` hands out a block of rows at a
    time (increasing ranges; blocks holding none of ``want`` are skipped): peak memory is the result plus
    one block."""
    n = shape[0]
    want = np.asarray(want, dtype=np.int64)
    if want.size and (want.min() < 0 or want.max() >= n):
        raise ValueError(f"rows outside 0..{n - 1}")
    out = np.empty((len(want), *shape[1:]), dtype=dtype.newbyteorder("="))
    order = np.argsort(want, kind="stable")
    ranked = want[order]
    step = max(1, BLOCK_BYTES // max(1, math.prod(shape[1:]) * dtype.itemsize))
    for start in range(0, n, step):
        lo, hi = np.searchsorted(ranked, [start, start + step])
        if lo == len(ranked):
            break
        if lo < hi:
            out[order[lo:hi]] = read(start, min(start + step, n))[ranked[lo:hi] - start]
    return out


def _read_h5(path: Path, f, size: int, keys, required, check_meta: CheckMeta, expected: str,
             rows: Rows | None = None) -> dict:
    import h5py

    out = {}
    with h5py.File(f, "r") as h:
        names = list(h.keys())
        if any(k not in names for k in required):
            raise DataError(f"{shown(path)}: expected datasets {expected}, found {names}")
        for key in keys:
            if key not in names:
                continue
            link = h.get(key, getlink=True)
            if not isinstance(link, h5py.HardLink):  # soft and external links lead to other places or files
                raise DataError(f"{shown(path)}: '{key}' is a {type(link).__name__}, not data stored under that "
                                "name; store the dataset itself in the file")
            d = h[key]
            if not isinstance(d, h5py.Dataset):
                raise DataError(f"{shown(path)}: '{key}' is a group, not a dataset; store the array itself as "
                                f"'{key}'")
            if d.is_virtual or d.external:
                raise DataError(f"{shown(path)}: '{key}' keeps its data in other files (a virtual or external "
                                "dataset); store the array in the file itself")
            if d.shape is None:
                raise DataError(f"{shown(path)}: '{key}' is an empty (null) dataset; store an array")
            check_meta(path, key, d.shape, d.dtype)
            _check_h5_storage(path, key, d, size)
            want = None if rows is None else rows(key, d.shape)
            if want is None:
                out[key] = d[()]
            else:
                out[key] = gather_rows(lambda start, stop: d[start:stop], d.shape, d.dtype, want)
    return out


def _check_h5_storage(path: Path, key: str, d, size: int) -> None:
    """What ``d`` declares against what the file stores: unwritten data (fill values) costs memory for nothing."""
    stored = d.id.get_storage_size()
    stored = stored if stored <= size else 0
    shape = d.shape
    if d.chunks is None:
        nbytes = math.prod(shape) * d.dtype.itemsize
        compressed = False
    else:  # whole chunks are decoded: count their padded size
        per_dim = [math.ceil(s / c) for s, c in zip(shape, d.chunks)]
        nbytes = math.prod(n * c for n, c in zip(per_dim, d.chunks)) * d.dtype.itemsize
        compressed = True
        if nbytes and d.id.get_num_chunks() < math.prod(per_dim):
            raise DataError(f"{shown(path)}: '{key}' {shape} has unwritten chunks (fill values only); "
                            "write every sample into the file")
    check_declared(path, f"'{key}' {shape} {d.dtype}", nbytes, stored, compressed)
