"""Image files: ImageNet-style class folders and Tiny ImageNet, decoded once or on demand."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, one_line
from ..files import not_regular, open_regular, shown
from .presets import IMAGE_SUFFIXES, TINY_IMAGENET_URL, host_bytes_limit
from .sources import Adapt, Pool, Source, _fetch_archive, _missing

# The decoders an image file may reach: raster formats only, whatever its bytes say (PIL would hand an EPS
# to Ghostscript). PPM also reads .pgm.
RASTER_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
_TEXT_LIMIT = 64 * 2**20  # wnids.txt and val_annotations.txt are well under 1 MB
_OPEN_LOCK = threading.Lock()  # warnings.catch_warnings is process-wide: one opener at a time


@contextlib.contextmanager
def _open_image(path):
    """A PIL image of a regular file, by a raster decoder; too many pixels (a decompression bomb) is refused.

    Only the header is read here; decoding happens on first use, inside the ``with``."""
    from PIL import Image

    with open_regular(path) as f:
        try:
            with _OPEN_LOCK, warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(f, formats=RASTER_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise DataError(f"{shown(path)}: image has more than {Image.MAX_IMAGE_PIXELS:,} pixels (a "
                            "decompression bomb?); shrink it or remove it from the folder") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"{shown(path)}: cannot read image ({one_line(e, 200)}); deadscan reads "
                            f"{', '.join(RASTER_FORMATS)} images") from None
        with im:
            yield im


def _read_text(path: Path) -> str:
    with open_regular(path) as f:
        text = f.read(_TEXT_LIMIT + 1)
    if len(text) > _TEXT_LIMIT:
        raise DataError(f"{shown(path)}: larger than {_TEXT_LIMIT:,} bytes; is it the right file?")
    return text.decode("utf-8", "replace")


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


def _image_pool(paths: list, labels: list, adapt: Adapt) -> Pool:
    def take(idx: np.ndarray):
        chosen = [paths[i] for i in idx]
        shape, mode = _probe(chosen[0], adapt)
        if len(chosen) * math.prod(shape) > host_bytes_limit():
            return LazyImages(chosen, shape, mode, adapt.resize)
        return _decode_all(chosen, shape, mode, adapt.resize)
    return Pool(np.asarray(labels, dtype=np.int64), take)


def _probe(path: Path, adapt: Adapt) -> tuple[tuple[int, int, int], str]:
    """Shape (C, H, W) and PIL mode every image gets: the first image's, unless --channels/--resize say."""
    with _open_image(path) as im:
        grey = im.mode in ("1", "L", "LA", "I", "I;16", "F")
        w, h = im.size
    c = adapt.channels or (1 if grey else 3)
    if adapt.resize:
        h = w = adapt.resize
    return (c, h, w), ("L" if c == 1 else "RGB")


def _decode_one(path, mode: str, resize: int | None, shape: tuple) -> np.ndarray:
    from PIL import Image

    with _open_image(path) as im:
        try:
            im = im.convert(mode)
            if resize:
                im = im.resize((resize, resize), Image.Resampling.BILINEAR)
            a = np.asarray(im)
        except (OSError, ValueError, SyntaxError) as e:  # damaged pixel data
            raise DataError(f"{shown(path)}: cannot read image ({one_line(e, 200)})") from None
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    if a.shape != tuple(shape):
        raise DataError(f"{shown(path)}: image is {a.shape[2]}x{a.shape[1]} but the first one is "
                        f"{shape[2]}x{shape[1]}; pass --resize N to bring every image to N x N")
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
    """Image files under ``folder`` (symlinked folders inside are not followed: no loops). A name with an
    image suffix that is no regular file (a FIFO, device, broken or looping link) is refused here."""
    out = []
    for p in folder.rglob("*"):
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir():
            if not p.is_file():
                raise not_regular(p)
            out.append(p)
    return sorted(out)


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


def imagefolder_source(path: str | None, adapt: Adapt) -> Source:
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

        def test() -> Pool:
            _, tpaths, tlabels = _class_folders(test_dir, classes, hint)
            return _image_pool(tpaths, tlabels, adapt)
        has_test = test_dir.is_dir()
        return Source(name, "imagefolder", lambda: _image_pool(paths, labels, adapt), test if has_test else None,
                       str(folder), len(classes))
    classes, paths, labels = _class_folders(folder)
    return Source(name, "imagefolder", lambda: _image_pool(paths, labels, adapt), None, str(folder),
                   len(classes))


def tiny_imagenet_source(root: Path, download: bool, adapt: Adapt) -> Source:
    base = root / "tiny-imagenet-200"
    if not base.is_dir() and (root / "wnids.txt").exists():
        base = root  # --data-root is the folder itself
    if download and not (base / "train").is_dir():
        _fetch_archive("tiny-imagenet", TINY_IMAGENET_URL, root)
    if not (base / "train").is_dir():
        raise _missing("tiny-imagenet", root, "tiny-imagenet-200/train",
                       f"download {TINY_IMAGENET_URL} and unzip it there (or pass --download)")
    if (base / "wnids.txt").exists():
        wnids = sorted(w for w in _read_text(base / "wnids.txt").split() if w)
    else:
        wnids = sorted(d.name for d in (base / "train").iterdir() if d.is_dir())
    _, paths, labels = _class_folders(base / "train", wnids)
    index = {w: i for i, w in enumerate(wnids)}

    def test() -> Pool:
        notes = base / "val" / "val_annotations.txt"
        if not notes.exists():
            raise _missing("tiny-imagenet", root, "tiny-imagenet-200/val/val_annotations.txt",
                           f"download {TINY_IMAGENET_URL} and unzip it there")
        tpaths, tlabels = [], []
        for line in _read_text(notes).splitlines():
            parts = line.split("\t") if "\t" in line else line.split()
            if len(parts) < 2:
                continue
            if Path(parts[0]).name != parts[0] or parts[0] in (".", ".."):  # a file of val/images, no path
                raise DataError(f"{notes}: {parts[0]!r} is not a file name in {base / 'val' / 'images'}")
            if parts[1] not in index:
                raise DataError(f"{notes}: class {parts[1]!r} of {parts[0]!r} is not in wnids.txt")
            tpaths.append(base / "val" / "images" / parts[0])
            tlabels.append(index[parts[1]])
        if not tpaths:
            raise DataError(f"{notes}: no annotations")
        return _image_pool(tpaths, tlabels, adapt)
    return Source("tiny-imagenet", "tiny-imagenet", lambda: _image_pool(paths, labels, adapt), test, str(base),
                   len(wnids))
