"""deadscan.data: every source read from tiny fixtures in its real on-disk format, through the same
``load_data`` users run; seeded splits; exact normalisation; the clear errors; batched augmentation.

Fixtures are written by the tests (nothing is downloaded); pixel values encode (sample, channel, row,
column) so that every check is exact.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from deadscan import data as D
from deadscan.data import dataset as data_dataset
from deadscan.data import sources as data_sources
from deadscan.data import (AutoAugment, Dataset, TokenDataset, check_fits, load_data, random_crop_flip,
                           read_cifar_batch, split_indices)
from deadscan.errors import DataError


# ---------------------------------------------------------------------------------------------
# Fixture writers (the real layouts)


def pattern(n: int, c: int = 3, h: int = 32, w: int = 32, start: int = 0) -> np.ndarray:
    """uint8 (n, c, h, w) whose values identify the sample: deterministic, distinct per sample."""
    base = np.arange(c * h * w, dtype=np.int64).reshape(c, h, w)
    return ((base[None] + 7 * np.arange(start, start + n)[:, None, None, None]) % 256).astype(np.uint8)


def write_cifar(root, name: str = "cifar10", n: int = 4) -> dict:
    """CIFAR python batches as torchvision downloads them: dict with b'data' (N, 3072) uint8 and labels."""
    if name == "cifar10":
        folder, train, test, key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], \
            ["test_batch"], b"labels"
    else:
        folder, train, test, key = root / "cifar-100-python", ["train"], ["test"], b"fine_labels"
    folder.mkdir(parents=True)
    images, labels, start = {}, {}, 0
    for fname in train + test:
        count = n if name == "cifar10" else 5 * n
        x = pattern(count, start=start)
        y = [(start + i) % (10 if name == "cifar10" else 100) for i in range(count)]
        batch = {b"batch_label": fname.encode(), key: y, b"data": x.reshape(count, 3072),
                 b"filenames": [f"{fname}_{i}.png".encode() for i in range(count)]}
        if name == "cifar100":
            batch[b"coarse_labels"] = [v % 20 for v in y]
        with open(folder / fname, "wb") as f:  # protocol 2 (the real files' own) for CIFAR-10, 5 for CIFAR-100
            pickle.dump(batch, f, protocol=2 if name == "cifar10" else 5)
        images[fname], labels[fname], start = x, y, start + count
    return {"x_train": np.concatenate([images[f] for f in train]), "y_train": sum((labels[f] for f in train), []),
            "x_test": np.concatenate([images[f] for f in test]), "y_test": sum((labels[f] for f in test), [])}


def write_idx(path, arr: np.ndarray, compress: bool = False) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + arr.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_mnist(root, folder: str = "MNIST", n_train: int = 20, n_test: int = 6, compress: bool = False) -> tuple:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    xtr = pattern(n_train, 1, 28, 28)[:, 0]
    xte = pattern(n_test, 1, 28, 28, start=100)[:, 0]
    ytr, yte = np.arange(n_train) % 10, (np.arange(n_test) + 3) % 10
    write_idx(raw / "train-images-idx3-ubyte", xtr, compress)
    write_idx(raw / "train-labels-idx1-ubyte", ytr, compress)
    write_idx(raw / "t10k-images-idx3-ubyte", xte, compress)
    write_idx(raw / "t10k-labels-idx1-ubyte", yte, compress)
    return xtr, ytr, xte, yte


def save_png(path, arr_chw: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = arr_chw[0] if arr_chw.shape[0] == 1 else arr_chw.transpose(1, 2, 0)
    Image.fromarray(a).save(path)


def write_folder(folder, classes=("cat", "dog", "emu"), per: int = 3, size: int = 8, c: int = 3, start: int = 0):
    """PATH/<class>/<i>.png; returns {path: (pixels, label)}."""
    out = {}
    k = start
    for label, name in enumerate(classes):
        for i in range(per):
            img = pattern(1, c, size, size, start=k)[0]
            p = folder / name / f"{i:03d}.png"
            save_png(p, img)
            out[p] = (img, label)
            k += 1
    return out


def write_tiny(root, wnids=("n02", "n01"), per: int = 3, val: int = 4):
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        (base / "train" / w / "images").mkdir(parents=True)
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
        for i in range(per):
            Image.fromarray(pattern(1, 3, 64, 64, start=i)[0].transpose(1, 2, 0)).save(
                base / "train" / w / "images" / f"{w}_{i}.JPEG", format="JPEG")
    lines = []
    for i in range(val):
        Image.fromarray(pattern(1, 3, 64, 64, start=50 + i)[0].transpose(1, 2, 0)).save(
            base / "val" / "images" / f"val_{i}.JPEG", format="JPEG")
        lines.append(f"val_{i}.JPEG\t{wnids[i % len(wnids)]}\t0\t0\t10\t10")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


def write_cifar_c(root, folder="CIFAR-10-C", corruptions=("fog", "gaussian_noise"), per: int = 4):
    base = root / folder
    base.mkdir(parents=True)
    labels = np.tile(np.arange(per) % 10, 5)
    np.save(base / "labels.npy", labels)
    for ci, c in enumerate(corruptions):
        x = np.zeros((5 * per, 32, 32, 3), np.uint8)
        for s in range(5):
            for i in range(per):
                x[s * per + i] = 100 * ci + 10 * (s + 1) + i  # corruption, severity, image
        np.save(base / f"{c}.npy", x)
    return base, labels


# ---------------------------------------------------------------------------------------------
# Sources


def test_cifar10_python_batches(tmp_path):
    ref = write_cifar(tmp_path)
    train = load_data("cifar10", "train", root=tmp_path, seed=0)
    val = load_data("cifar10", "val", root=tmp_path, seed=0)
    test = load_data("cifar10", "test", root=tmp_path)
    assert (len(train), len(val), len(test)) == (18, 2, 4)  # 20 train images, 10% val; official test
    assert train.x.dtype == torch.uint8 and tuple(train.x.shape[1:]) == (3, 32, 32)
    assert torch.equal(test.x, torch.from_numpy(ref["x_test"]))
    assert test.y.tolist() == ref["y_test"]
    for ds in (train, val):
        assert torch.equal(ds.x, torch.from_numpy(ref["x_train"][ds.indices]))
        assert ds.y.tolist() == [ref["y_train"][i] for i in ds.indices]
    assert train.mean == (0.4914, 0.4822, 0.4465) and train.std == (0.2023, 0.1994, 0.2010)  # the paper's
    assert train.classes == 10 and train.augment_default == "crop+flip"


def test_cifar100_python_batches(tmp_path):
    ref = write_cifar(tmp_path, "cifar100")
    ds = load_data("cifar100", "all", root=tmp_path)
    assert torch.equal(ds.x, torch.from_numpy(ref["x_train"])) and ds.y.tolist() == ref["y_train"]
    test = load_data("cifar100", "test", root=tmp_path)
    assert test.y.tolist() == ref["y_test"] and test.classes == 100
    assert test.mean == (0.5071, 0.4867, 0.4408) and test.std == (0.2675, 0.2565, 0.2761)


def test_svhn_mat(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    x = pattern(6)  # (N, C, H, W)
    y = np.array([[10], [1], [2], [10], [9], [5]], dtype=np.uint8)  # 10 is the digit 0
    scipy_io.savemat(tmp_path / "train_32x32.mat", {"X": x.transpose(2, 3, 1, 0), "y": y})
    scipy_io.savemat(tmp_path / "test_32x32.mat", {"X": x[:2].transpose(2, 3, 1, 0), "y": y[:2]})
    ds = load_data("svhn", "all", root=tmp_path)
    assert torch.equal(ds.x, torch.from_numpy(x))
    assert ds.y.tolist() == [0, 1, 2, 0, 9, 5]
    assert len(load_data("svhn", "test", root=tmp_path)) == 2
    assert ds.augment_default == "crop" and ds.autoaugment_policy == "svhn"


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_idx_files(tmp_path, name, folder):
    xtr, ytr, xte, yte = write_mnist(tmp_path, folder)
    ds = load_data(name, "all", root=tmp_path)
    assert tuple(ds.x.shape) == (20, 1, 28, 28) and torch.equal(ds.x[:, 0], torch.from_numpy(xtr))
    assert ds.y.tolist() == ytr.tolist()
    test = load_data(name, "test", root=tmp_path)
    assert torch.equal(test.x[:, 0], torch.from_numpy(xte)) and test.y.tolist() == yte.tolist()
    assert len(ds.mean) == 1


def test_mnist_gzipped_idx(tmp_path):
    xtr, ytr, _, _ = write_mnist(tmp_path, compress=True)
    ds = load_data("mnist", "all", root=tmp_path)
    assert torch.equal(ds.x[:, 0], torch.from_numpy(xtr))


def test_imagefolder_pngs(tmp_path):
    files = write_folder(tmp_path / "imgs", per=10)
    ds = load_data(f"imagefolder:{tmp_path / 'imgs'}", "all")
    paths = sorted(files)  # classes sorted by name, files sorted within
    assert len(ds) == 30 and ds.classes == 3
    for i, p in enumerate(paths):
        assert torch.equal(ds.x[i], torch.from_numpy(files[p][0])) and int(ds.y[i]) == files[p][1]
    parts = [load_data(str(tmp_path / "imgs"), s, seed=1) for s in ("train", "val", "test")]  # a bare folder
    assert [len(p) for p in parts] == [24, 3, 3]  # no test folder: 80/10/10
    assert ds.mean == (0.485, 0.456, 0.406)


def test_imagefolder_train_val_layout_and_grey(tmp_path):
    write_folder(tmp_path / "set" / "train", classes=("a", "b"), per=5, c=1)
    val = write_folder(tmp_path / "set" / "val", classes=("b",), per=2, c=1, start=40)
    test = load_data(f"imagefolder:{tmp_path / 'set'}", "test")
    assert tuple(test.x.shape) == (2, 1, 8, 8) and test.y.tolist() == [1, 1]  # "b" is class 1 of train
    assert torch.equal(test.x[0], torch.from_numpy(val[sorted(val)[0]][0]))
    assert len(load_data(f"imagefolder:{tmp_path / 'set'}", "val")) == 1
    assert len(test.mean) == 1  # the ImageNet preset made grey


def test_imagefolder_nested_like_tiny_train(tmp_path):
    base = write_tiny(tmp_path)
    ds = load_data(f"imagefolder:{base / 'train'}", "all")
    assert len(ds) == 6 and ds.y.tolist() == [0, 0, 0, 1, 1, 1]


def test_tiny_imagenet_layout(tmp_path):
    write_tiny(tmp_path)
    ds = load_data("tiny-imagenet", "all", root=tmp_path)
    assert tuple(ds.x.shape) == (6, 3, 64, 64) and ds.classes == 2
    assert ds.y.tolist() == [0, 0, 0, 1, 1, 1]  # sorted wnids: n01 is 0 though wnids.txt lists n02 first
    test = load_data("tiny-imagenet", "test", root=tmp_path)
    assert test.y.tolist() == [1, 0, 1, 0]  # from val_annotations.txt
    small = load_data("tiny-imagenet", "test", root=tmp_path, resize=32)
    assert tuple(small.x.shape) == (4, 3, 32, 32) and small.describe()["resize"] == 32


def test_cifar10_c(tmp_path):
    base, labels = write_cifar_c(tmp_path)
    ds = load_data("cifar10-c", "test", root=tmp_path, corruption="gaussian_noise", severity="2")
    assert len(ds) == 4 and tuple(ds.x.shape[1:]) == (3, 32, 32)
    assert ds.x[:, 0, 0, 0].tolist() == [120, 121, 122, 123]  # corruption 1, severity 2, images 0-3
    assert ds.y.tolist() == labels[4:8].tolist()
    every = load_data("cifar10-c", "test", root=tmp_path)  # default: every corruption, every severity
    assert len(every) == 40 and every.describe()["corruption"] == ["fog", "gaussian_noise"]
    assert every.describe()["severity"] == [1, 2, 3, 4, 5] and every.mean == D.NORMALISATION["cifar10"][0]
    two = load_data("cifar10-c", "test", root=base, severity=[1, 5], corruption="fog")  # root = the folder
    assert two.x[:, 0, 0, 0].tolist() == [10, 11, 12, 13, 50, 51, 52, 53]


def test_cifar_c_is_test_only_and_checks_names(tmp_path):
    write_cifar_c(tmp_path)
    with pytest.raises(DataError, match="test-only.*--split test"):
        load_data("cifar10-c", "val", root=tmp_path)
    with pytest.raises(DataError, match="--corruption snow not in .*found fog, gaussian_noise"):
        load_data("cifar10-c", "test", root=tmp_path, corruption="snow")
    with pytest.raises(DataError, match="--severity"):
        load_data("cifar10-c", "test", root=tmp_path, severity="6")
    with pytest.raises(DataError, match="cifar10-c and cifar100-c only"):
        load_data("digits", "val", corruption="fog")


def test_npz_and_h5_arrays(tmp_path):
    x = pattern(10, 1, 4, 4)
    y = np.arange(10) % 3
    np.savez(tmp_path / "a.npz", x=x, y=y)
    ds = load_data(str(tmp_path / "a.npz"), "all")
    assert torch.equal(ds.x, torch.from_numpy(x)) and ds.y.tolist() == y.tolist() and ds.mean is None
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["x"] = x.astype(np.float32) / 255
        f["y"] = y
    h = load_data(str(tmp_path / "a.h5"), "all")
    assert h.x.dtype == torch.float32 and torch.equal(h.prepare(h.x), torch.from_numpy(x.astype(np.float32) / 255))


def test_digits_unchanged():
    ds = load_data("digits", "val")
    assert tuple(ds.x.shape) == (180, 1, 8, 8) and ds.x.dtype == torch.float32 and ds.mean is None
    assert [len(load_data("digits", s)) for s in ("train", "val", "test", "all")] == [1437, 180, 180, 1797]
    assert torch.equal(torch.cat(list(ds.batches(64, "cpu"))), ds.x)  # floats pass through untouched
    assert ds.augment_default == "none"


def test_fake_spec():
    ds = load_data("fake:1x12x10:4:50", "all")
    assert tuple(ds.x.shape) == (50, 1, 12, 10) and ds.x.dtype == torch.uint8 and ds.classes == 4
    again = load_data("fake:1x12x10:4:50", "all")
    assert torch.equal(ds.x, again.x) and torch.equal(ds.y, again.y)  # FakeData is deterministic
    default = load_data("fake::5:40", "val")  # default shape; plain "fake" is 3x32x32:10:1000
    assert tuple(default.x.shape) == (4, 3, 32, 32) and default.classes == 5
    assert D.parse_spec("fake") == ("fake", None) and D.parse_spec("FAKE:1x2x2") == ("fake", "1x2x2")
    for bad in ("fake:3x32:10", "fake:2x8x8", "fake:3x8x8:0", "fake:a"):
        with pytest.raises(DataError, match="fake:CxHxW:CLASSES:N"):
            load_data(bad, "all")


# ---------------------------------------------------------------------------------------------
# Splits


@pytest.mark.parametrize("n,has_test", [(1797, False), (20, True), (1000, False), (7, False)])
def test_splits_disjoint_cover_and_seeded(n, has_test):
    parts = {s: split_indices(n, s, seed=5, has_test=has_test) for s in ("train", "val", "test")}
    joined = np.concatenate(list(parts.values()))
    assert len(joined) == len(set(joined.tolist())) == n  # disjoint and covering
    assert sorted(joined.tolist()) == list(range(n))
    for s, idx in parts.items():
        assert np.array_equal(idx, split_indices(n, s, seed=5, has_test=has_test))
    if n >= 20:
        assert not np.array_equal(parts["val"], split_indices(n, "val", seed=6, has_test=has_test))
    if has_test:
        assert len(parts["test"]) == 0 and len(parts["val"]) == round(0.1 * n)
    else:
        assert len(parts["test"]) == len(parts["val"]) == round(0.1 * n)  # 80/10/10


def test_val_is_recorded_with_fingerprint(tmp_path):
    write_cifar(tmp_path, n=20)  # 100 training images
    a = load_data("cifar10", "val", root=tmp_path, seed=1)
    b = load_data("cifar10", "val", root=tmp_path, seed=1)
    c = load_data("cifar10", "val", root=tmp_path, seed=2)
    d = a.describe()
    assert d["seed"] == 1 and d["val_fraction"] == 0.1 and d["test_fraction"] is None and d["samples"] == 10
    assert d["indices_sha256"] == b.describe()["indices_sha256"] == D.fingerprint(a.indices)
    assert d["indices_sha256"] != c.describe()["indices_sha256"]
    train = load_data("cifar10", "train", root=tmp_path, seed=1)
    assert not set(train.indices) & set(a.indices) and len(train) + len(a) == 100
    wide = load_data("cifar10", "val", root=tmp_path, seed=1, val_fraction=0.25)
    assert len(wide) == 25 and wide.describe()["val_fraction"] == 0.25
    assert len(load_data("cifar10", "train", root=tmp_path, limit=7)) == 7


# ---------------------------------------------------------------------------------------------
# Normalisation and load-time transforms


def test_normalisation_exact_values():
    x = torch.full((1, 3, 2, 2), 128, dtype=torch.uint8)
    x[0, 1] = 0
    x[0, 2] = 255
    ds = Dataset("t", "all", x, torch.zeros(1, dtype=torch.long), *D.NORMALISATION["cifar10"])
    out = ds.prepare(x.clone())
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    expect = [(f32(128) / 255 - f32(0.4914)) / f32(0.2023), (f32(0) / 255 - f32(0.4822)) / f32(0.1994),
              (f32(255) / 255 - f32(0.4465)) / f32(0.2010)]
    for ch in range(3):
        assert torch.equal(out[0, ch], expect[ch].expand(2, 2))
    from torchvision import transforms as T
    ref = T.Normalize(*D.NORMALISATION["cifar10"])(T.ToTensor()(x[0].permute(1, 2, 0).numpy()))
    assert torch.equal(out[0], ref)  # bit-identical to torchvision's ToTensor + Normalize


def test_mean_std_override(tmp_path):
    write_cifar(tmp_path)
    ds = load_data("cifar10", "test", root=tmp_path, mean="0.5", std="0.25")
    assert ds.mean == (0.5,) * 3 and ds.std == (0.25,) * 3
    xb = ds.prepare(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8))
    assert torch.equal(xb, torch.full((1, 3, 1, 1), 2.0))  # (1 - 0.5) / 0.25
    ds = load_data("cifar10", "test", root=tmp_path, mean=[0, 0, 0], std=[1, 1, 1])
    assert ds.describe()["mean"] == [0.0, 0.0, 0.0]
    with pytest.raises(DataError, match="--mean has 2 values but --data cifar10 has 3 channels"):
        load_data("cifar10", "test", root=tmp_path, mean="0.1,0.2", std="1")
    with pytest.raises(DataError, match="both --mean and --std"):
        load_data("cifar10", "test", root=tmp_path, mean="0.1")
    with pytest.raises(DataError, match="above 0"):
        load_data("cifar10", "test", root=tmp_path, mean="0", std="0")


def test_channels_and_resize(tmp_path):
    write_cifar(tmp_path)
    grey = load_data("cifar10", "test", root=tmp_path, channels=1)
    rgb = load_data("cifar10", "test", root=tmp_path)
    pil = np.asarray(Image.fromarray(rgb.x[0].permute(1, 2, 0).numpy()).convert("L"))
    assert tuple(grey.x.shape) == (4, 1, 32, 32) and np.array_equal(grey.x[0, 0].numpy(), pil)  # PIL's luma
    assert len(grey.mean) == 1 and grey.describe()["channels"] == 1
    write_mnist(tmp_path)
    m = load_data("mnist", "test", root=tmp_path, channels=3, resize=32)
    assert tuple(m.x.shape) == (6, 3, 32, 32) and m.x.dtype == torch.uint8
    assert torch.equal(m.x[:, 0], m.x[:, 2]) and m.mean == (0.1307,) * 3
    same = load_data("mnist", "test", root=tmp_path, resize=28)  # already 28: untouched
    assert torch.equal(same.x, load_data("mnist", "test", root=tmp_path).x)
    flat = tmp_path / "flat.npz"
    np.savez(flat, x=np.zeros((4, 5), np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(DataError, match="need images"):
        load_data(str(flat), "all", resize=8)
    with pytest.raises(DataError, match="--channels"):
        load_data("digits", "val", channels=2)


def test_imagefolder_mixed_sizes_need_resize(tmp_path):
    save_png(tmp_path / "f" / "a" / "0.png", pattern(1, 3, 8, 8)[0])
    save_png(tmp_path / "f" / "a" / "1.png", pattern(1, 3, 9, 8)[0])
    with pytest.raises(DataError, match=r"1.png: image is 8x9 but the first one is 8x8; pass --resize N"):
        load_data(f"imagefolder:{tmp_path / 'f'}", "all")
    ds = load_data(f"imagefolder:{tmp_path / 'f'}", "all", resize=6)
    assert tuple(ds.x.shape) == (2, 3, 6, 6)


# ---------------------------------------------------------------------------------------------
# Clear errors


@pytest.mark.parametrize("name,where", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                                        ("svhn", "train_32x32.mat"), ("mnist", "MNIST/raw"),
                                        ("fashion-mnist", "FashionMNIST/raw")])
def test_missing_files_name_the_folder_and_download(tmp_path, name, where):
    with pytest.raises(DataError) as e:
        load_data(name, "val", root=tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and where in msg and "--download" in msg and "\n" not in msg


@pytest.mark.parametrize("name,where,url", [("tiny-imagenet", "tiny-imagenet-200", "tiny-imagenet-200.zip"),
                                            ("cifar10-c", "CIFAR-10-C", "zenodo"),
                                            ("cifar100-c", "CIFAR-100-C", "zenodo")])
def test_missing_manual_sets_say_how_to_get_them(tmp_path, name, where, url):
    with pytest.raises(DataError) as e:
        load_data(name, "test", root=tmp_path)
    msg = str(e.value)
    assert where in msg and url in msg and str(tmp_path) in msg and "--download" in msg


def test_failed_download_is_one_line(tmp_path, monkeypatch, capsys):
    class Offline:
        def __init__(self, *a, **k):
            print("Downloading https://example.invalid/cifar.tar.gz")
            raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(data_sources, "_tv_class", lambda name: Offline)
    with pytest.raises(DataError) as e:
        load_data("cifar10", "val", root=tmp_path, download=True)
    assert "cannot download cifar10" in str(e.value) and "name resolution" in str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__
    assert capsys.readouterr().out == ""  # torchvision's chatter goes to stderr, not stdout


def test_malicious_cifar_batch_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(tmp_path)
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(DataError, match="refused.*not allowed"):
        load_data("cifar10", "train", root=tmp_path)
    with pytest.raises(DataError, match="posix.system|os.system|nt.system"):
        read_cifar_batch(folder / "data_batch_1")
    assert not marker.exists()


def test_npz_wrong_keys_and_bad_labels(tmp_path):
    np.savez(tmp_path / "k.npz", images=np.zeros((3, 4), np.float32), labels=np.zeros(3, np.int64))
    with pytest.raises(DataError, match=r"expected arrays 'x' .* and 'y' .*found \['images', 'labels'\]"):
        load_data(str(tmp_path / "k.npz"), "all")
    np.savez(tmp_path / "neg.npz", x=np.zeros((3, 4), np.float32), y=np.array([0, -1, 2]))
    with pytest.raises(DataError, match="labels must be 0 or more"):
        load_data(str(tmp_path / "neg.npz"), "all")
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "k.h5", "w") as f:
        f["inputs"] = np.zeros((3, 4), np.float32)
    with pytest.raises(DataError, match=r"found \['inputs'\]"):
        load_data(str(tmp_path / "k.h5"), "all")


def test_empty_dataset(tmp_path):
    np.savez(tmp_path / "e.npz", x=np.zeros((0, 4), np.float32), y=np.zeros(0, np.int64))
    with pytest.raises(DataError, match="split 'all' is empty"):
        load_data(str(tmp_path / "e.npz"), "all")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found in"):
        load_data(f"imagefolder:{tmp_path / 'empty'}", "all")
    with pytest.raises(DataError, match="split 'val' is empty"):
        load_data("digits", "val", val_fraction=0)


@pytest.mark.parametrize("spec, hint", [
    ("digitz", " (did you mean digits?)"), ("Fashion_MNST", " (did you mean fashion-mnist?)"),
    ("cifar-100c", " (did you mean cifar100-c or cifar100?)"), ("imagenet", " (did you mean tiny-imagenet?)"),
    ("coco", ""),
])
def test_misspelt_data_name_suggests_the_closest(spec, hint):
    with pytest.raises(DataError) as e:
        load_data(spec, "val")
    assert str(e.value) == (f"unknown --data {spec!r}{hint}: use digits, cifar10, cifar100, svhn, mnist, "
                            "fashion-mnist, tiny-imagenet, cifar10-c, cifar100-c, fake[:CxHxW[:CLASSES[:N]]], "
                            "imagefolder:PATH, or a .npz/.h5 file")


def test_every_data_kind_has_one_loader():
    from deadscan.data.load import SOURCES

    assert set(SOURCES) == {*D.NAMES, "imagefolder", "arrays"}
    assert [D.parse_spec(s)[0] for s in ("digits", "CIFAR-10", "fake:1x8x8", "imagefolder:x", "a.npz")] == [
        "digits", "cifar10", "fake", "imagefolder", "arrays"]


def test_unknown_spec_and_split():
    with pytest.raises(DataError, match="unknown --data 'cifar11'.*imagefolder:PATH"):
        load_data("cifar11", "val")
    with pytest.raises(DataError, match="unknown split"):
        load_data("digits", "dev")
    with pytest.raises(DataError, match="no such folder"):
        load_data("imagefolder:/nonexistent/deadscan", "all")


def conv_net(in_channels: int, classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, classes))


def test_check_fits_shape_mismatch_names_both_shapes(tmp_path):
    write_cifar(tmp_path)
    ds = load_data("cifar10", "test", root=tmp_path)
    check_fits(conv_net(3), ds, torch.device("cpu"))  # fits
    with pytest.raises(DataError) as e:
        check_fits(conv_net(1), ds, torch.device("cpu"))
    msg = str(e.value)
    assert msg.startswith("the model cannot take --data cifar10 inputs of shape (3, 32, 32) (3x32x32; ")
    assert "first layer 0 takes 1 input channels, the data has 3" in msg and msg.endswith("; pass --channels 1")
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(DataError, match=r"first layer 1 takes 784 input features, the data has 3072 per sample; "
                                        r".*\); pass --channels 1 --resize 28$"):
        check_fits(mlp, ds, torch.device("cpu"))


def test_check_fits_labels_out_of_range(tmp_path):
    write_cifar(tmp_path, "cifar100")
    ds = load_data("cifar100", "test", root=tmp_path)
    with pytest.raises(DataError, match="labels up to 99 but the model outputs 10 classes"):
        check_fits(conv_net(3, 10), ds, torch.device("cpu"))
    model = conv_net(3, 100).train()
    check_fits(model, ds, torch.device("cpu"))
    assert model.training  # mode restored


# ---------------------------------------------------------------------------------------------
# Batched augmentation


def reference_crop_flip(x: torch.Tensor, pad: int, seed: int, flip: bool = True) -> torch.Tensor:
    """Per-sample loop over the same draws random_crop_flip makes, with F.pad and slicing."""
    g = torch.Generator().manual_seed(seed)
    b, _, h, w = x.shape
    dy = torch.randint(-pad, pad + 1, (b, 1), generator=g)[:, 0]
    dx = torch.randint(-pad, pad + 1, (b, 1), generator=g)[:, 0]
    f = torch.randint(0, 2, (b, 1), generator=g)[:, 0] if flip else torch.zeros(b, dtype=torch.long)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    out = []
    for i in range(b):
        crop = padded[i, :, pad + dy[i]:pad + dy[i] + h, pad + dx[i]:pad + dx[i] + w]
        out.append(crop.flip(-1) if f[i] else crop)
    return torch.stack(out)


def test_crop_flip_matches_per_sample_reference():
    x = torch.from_numpy(pattern(64, 3, 6, 5)).add(1)  # no zero pixels: padding is recognisable
    out = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(3))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, reference_crop_flip(x, 2, 3))
    again = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again)  # deterministic for a fixed generator
    other = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(out, other)
    assert (out == 0).any() and not torch.equal(out, x)


def test_flip_only_on_a_known_pattern():
    row = torch.arange(1, 9, dtype=torch.uint8)
    x = row.view(1, 1, 1, 8).expand(32, 2, 3, 8).contiguous()
    out = random_crop_flip(x, padding=0, flip=True, generator=torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, x[0].flip(-1)) for o in out]
    kept = [torch.equal(o, x[0]) for o in out]
    assert all(a != b for a, b in zip(flipped, kept))  # each sample exactly one of the two
    assert 0 < sum(flipped) < 32
    assert out[flipped.index(True), 0, 0].tolist() == [8, 7, 6, 5, 4, 3, 2, 1]


def test_crop_shift_on_a_known_image():
    x = torch.arange(1, 17, dtype=torch.float32).view(1, 1, 4, 4).repeat(16, 1, 1, 1)
    out = random_crop_flip(x, padding=1, flip=False, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x[0], (1, 1, 1, 1))
    windows = [padded[:, r:r + 4, c:c + 4] for r in range(3) for c in range(3)]
    for o in out:
        assert sum(torch.equal(o, wdw) for wdw in windows) == 1


def test_crop_flip_index_equals_gather_first():
    x = torch.from_numpy(pattern(10, 3, 8, 8))
    idx = torch.tensor([7, 2, 2, 9])
    a = random_crop_flip(x, idx, padding=2, generator=torch.Generator().manual_seed(5))
    b = random_crop_flip(x[idx], padding=2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def id_dataset(n: int = 50, dtype=torch.uint8) -> Dataset:
    """Sample i has every pixel equal to i, label i % 7."""
    x = torch.arange(n).view(n, 1, 1, 1).expand(n, 3, 4, 4).to(dtype).contiguous()
    return Dataset("ids", "train", x, torch.arange(n) % 7)


def test_train_batches_cover_epoch_and_are_seeded():
    ds = id_dataset()
    batches = list(ds.train_batches(16, "cpu", generator=7, augment="none"))
    assert [len(b[1]) for b in batches] == [16, 16, 16, 2]
    seen = torch.cat([(xb[:, 0, 0, 0] * 255).round().long() for xb, _ in batches])
    assert sorted(seen.tolist()) == list(range(50))  # every sample once
    assert torch.equal(torch.cat([yb for _, yb in batches]), seen % 7)  # labels follow their images
    again = torch.cat([xb for xb, _ in ds.train_batches(16, "cpu", generator=7, augment="none")])
    assert torch.equal(again, torch.cat([xb for xb, _ in batches]))
    other = torch.cat([xb for xb, _ in ds.train_batches(16, "cpu", generator=8, augment="none")])
    assert not torch.equal(other, again)
    assert len(list(ds.train_batches(16, "cpu", generator=1, drop_last=True))) == 3
    g = torch.Generator().manual_seed(0)
    first = torch.cat([xb for xb, _ in ds.train_batches(50, "cpu", g, augment="none")])
    second = torch.cat([xb for xb, _ in ds.train_batches(50, "cpu", g, augment="none")])
    assert not torch.equal(first, second)  # the generator advances: a new order each epoch


def test_train_batches_default_augment_and_normalisation(tmp_path):
    write_cifar(tmp_path)
    ds = load_data("cifar10", "all", root=tmp_path)
    xb, yb = next(ds.train_batches(20, "cpu", generator=0))
    plain = ds.prepare(ds.x)
    assert xb.shape == (20, 3, 32, 32) and xb.dtype == torch.float32
    pad = ds.prepare(torch.zeros(1, 3, 1, 1, dtype=torch.uint8))[0, :, 0, 0]  # a zero pixel, normalised
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(20, generator=g)
    expect = ds.prepare(random_crop_flip(ds.x, perm, padding=4, flip=True, generator=g))
    assert torch.equal(xb, expect) and torch.equal(yb, ds.y[perm])
    assert not torch.equal(xb, plain[perm]) and torch.isclose(xb, pad.view(1, 3, 1, 1)).any()


def test_augment_choices_and_errors():
    # the text alone (no data needed)
    assert D.parse_augment("default", default=("crop", "flip")) == D.Augment(True, True)
    assert D.parse_augment("crop+flip+autoaugment", policy="cifar10") == D.Augment(True, True, "cifar10")
    assert D.parse_augment("autoaugment-svhn") == D.Augment(False, False, "svhn")
    with pytest.raises(DataError, match="unknown --augment"):
        D.parse_augment("mixup")
    # checked against the data
    ds = id_dataset()
    assert ds.augmentation("default") == D.Augment()  # Dataset() without a source: none
    assert ds.augmentation("crop+flip+autoaugment") == D.Augment(True, True, "cifar10")
    with pytest.raises(DataError, match="needs uint8 images"):
        id_dataset(dtype=torch.float32).augmentation("autoaugment")
    flat = Dataset("flat", "train", torch.zeros(4, 6), torch.zeros(4, dtype=torch.long))
    with pytest.raises(DataError, match=r"needs images \(N, C, H, W\)"):
        flat.augmentation("crop")
    assert flat.augmentation("default") == D.Augment()
    assert D.default_padding(32) == 4 and D.default_padding(64) == 8 and D.default_padding(28) == 4


def test_autoaugment_per_image_and_deterministic():
    x = torch.from_numpy(pattern(1, 3, 16, 16)).expand(64, 3, 16, 16).contiguous()
    aa = AutoAugment("cifar10")
    out = aa(x, np.random.default_rng(0))
    assert out.shape == x.shape and out.dtype == torch.uint8 and torch.equal(x[0], x[63])  # input untouched
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) > 5  # one batch, many different sub-policies: drawn per image, not per batch
    assert torch.equal(out, aa(x, np.random.default_rng(0)))
    assert not torch.equal(out, aa(x, np.random.default_rng(1)))


def test_autoaugment_batched_groups_equal_per_image_application():
    x = torch.from_numpy(pattern(40, 3, 16, 16))
    for policy in AutoAugment.POLICIES:
        aa = AutoAugment(policy)
        out = aa(x, np.random.default_rng(11))
        ref = x.clone()
        for op, magnitude, members in aa._groups(40, 16, 16, np.random.default_rng(11)):
            for i in members:
                ref[i] = aa._tv._apply_image_or_video_transform(ref[i:i + 1], op, magnitude, interpolation=
                                                                aa._tv.interpolation, fill=aa._tv._fill)[0]
        assert torch.equal(out, ref), policy


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-image-fallback"])
def test_autoaugment_of_a_share_is_that_share_of_the_batch(grouped):
    x = torch.from_numpy(pattern(11, 3, 16, 16))
    aa = AutoAugment("imagenet")
    aa._grouped = aa._grouped and grouped  # the fallback: torchvision's public call per image
    whole = aa(x, np.random.default_rng(4))
    for cut in ((0, 6, 11), (0, 3, 7, 11), (0, 0, 11)):  # an empty share too
        parts = [aa(x[a:b], np.random.default_rng(4), of_batch=(a, 11)) for a, b in zip(cut, cut[1:])]
        assert torch.equal(torch.cat(parts), whole), cut
    assert not torch.equal(whole, x)


def test_train_batches_autoaugment_seeded(tmp_path):
    write_cifar(tmp_path)
    ds = load_data("cifar10", "all", root=tmp_path)
    a = [xb for xb, _ in ds.train_batches(8, "cpu", generator=3, augment="default+autoaugment")]
    b = [xb for xb, _ in ds.train_batches(8, "cpu", generator=3, augment="default+autoaugment")]
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and a[0].dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Device paths: resident (one copy) and streamed (DataLoader workers)


def test_batches_in_order_match_prepare(tmp_path):
    write_cifar(tmp_path)
    ds = load_data("cifar10", "all", root=tmp_path)
    assert torch.equal(torch.cat(list(ds.batches(7, "cpu"))), ds.prepare(ds.x))


def test_streamed_image_files(tmp_path, monkeypatch):
    write_folder(tmp_path / "imgs", per=10)
    resident = load_data(f"imagefolder:{tmp_path / 'imgs'}", "all")
    monkeypatch.setenv("DEADSCAN_HOST_BYTES", "0")  # too big for memory: decode batch by batch
    monkeypatch.setattr(data_dataset, "STREAM_WORKERS", 2)
    lazy = load_data(f"imagefolder:{tmp_path / 'imgs'}", "all")
    assert isinstance(lazy.x, D.LazyImages) and lazy.x.shape == resident.x.shape and len(lazy) == 30
    assert torch.equal(torch.cat(list(lazy.batches(8, "cpu"))), torch.cat(list(resident.batches(8, "cpu"))))
    xs, ys = zip(*lazy.train_batches(8, "cpu", generator=0, augment="none"))
    order = torch.cat(ys)
    assert len(order) == 30 and sorted(order.tolist()) == sorted(resident.y.tolist())
    # streamed or resident, one epoch is the same batches: the same draws from the generator
    for a, b in zip(lazy.train_batches(8, "cpu", generator=2, augment="crop+flip+autoaugment-cifar10"),
                    resident.train_batches(8, "cpu", generator=2, augment="crop+flip+autoaugment-cifar10"),
                    strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(lazy.x[3:5].to("cpu"), resident.x[3:5]) and torch.equal(lazy.x[4], resident.x[4])
    check_fits(conv_net(3, 3), lazy, torch.device("cpu"))
    assert lazy.describe()["samples"] == 30


@pytest.mark.parametrize("streamed", [False, True], ids=["resident", "streamed"])
def test_torchrun_shares_of_each_batch_make_up_the_one_process_batch(tmp_path, monkeypatch, streamed):
    """Each process reads, decodes and augments only its rows of a batch (train_batches(share=(rank, world))),
    with the whole batch's draws: the shares, in rank order, are exactly the one-process batch."""
    write_folder(tmp_path / "imgs", per=9, size=12)  # 27 images: batches of 10, 10, 7 split unevenly
    if streamed:
        monkeypatch.setenv("DEADSCAN_HOST_BYTES", "0")
        monkeypatch.setattr(data_dataset, "STREAM_WORKERS", 0)  # decoded in this process: counted
    ds = load_data(f"imagefolder:{tmp_path / 'imgs'}", "all")
    assert isinstance(ds.x, D.LazyImages) == streamed
    decoded = []
    if streamed:
        real = D.LazyImages.decode
        monkeypatch.setattr(D.LazyImages, "decode", lambda self, idx=None: decoded.append(len(idx)) or real(self, idx))

    def epoch(share=None, batch=10):
        g = torch.Generator().manual_seed(5)
        return list(ds.train_batches(batch, "cpu", g, augment="crop+flip+autoaugment-cifar10", share=share))

    whole = epoch()
    assert [len(y) for _, y in whole] == [10, 10, 7]
    last = [epoch((rank, 2), batch=13)[-1] for rank in range(2)]  # a last batch of 1: process 0's share is empty
    assert [len(y) for _, y in last] == [0, 1] and torch.equal(last[1][0], epoch(batch=13)[-1][0])
    for world in (2, 3):
        decoded.clear()
        shares = [epoch((rank, world)) for rank in range(world)]
        for i, (x, y) in enumerate(whole):
            assert torch.equal(torch.cat([s[i][0] for s in shares]), x), (world, i)
            assert torch.equal(torch.cat([s[i][1] for s in shares]), y), (world, i)
        if streamed:  # every image once over the processes: none decoded by two
            assert sum(decoded) == 27 and max(decoded) == -(-10 // world), decoded
    toks = TokenDataset("t", "all", torch.arange(60, dtype=torch.int32).view(20, 3),
                        torch.ones(20, 3, dtype=torch.bool))
    full = list(toks.train_batches(8, "cpu", 1))
    parts = [list(toks.train_batches(8, "cpu", 1, share=(rank, 3))) for rank in range(3)]
    for i, b in enumerate(full):
        for key in b:
            assert torch.equal(torch.cat([p[i][key] for p in parts]), b[key])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_resident_batches_match_cpu(tmp_path):
    write_cifar(tmp_path)
    ds = load_data("cifar10", "all", root=tmp_path)
    cpu = torch.cat([xb for xb, _ in ds.train_batches(8, "cpu", generator=0, augment="none")])
    gpu = [xb for xb, _ in ds.train_batches(8, "cuda", generator=torch.Generator("cuda").manual_seed(0))]
    assert gpu[0].device.type == "cuda" and cpu.shape == torch.cat(gpu).cpu().shape
    assert torch.equal(torch.cat(list(ds.batches(8, "cuda"))).cpu(), ds.prepare(ds.x))


# ---------------------------------------------------------------------------------------------
# CLI flags reach load_data


def test_cli_lists_data_flags():
    from click.testing import CliRunner

    from deadscan.cli import main

    out = CliRunner().invoke(main, ["inspect", "--help"]).output
    for flag in ("--val-fraction", "--mean", "--std", "--resize", "--channels", "--corruption", "--severity"):
        assert flag in out


def test_cli_missing_dataset_is_one_error_line(tmp_path):
    from click.testing import CliRunner

    from deadscan.cli import main

    model = D.resource_path("sample_models", "mlp_digits.safetensors")
    if not model.exists():
        pytest.skip("sample model not generated")
    r = CliRunner().invoke(main, ["inspect", str(model), "--data", "cifar10", "--data-root", str(tmp_path),
                                  "--out", str(tmp_path / "out")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "cifar-10-batches-py" in r.output and "--download" in r.output
    r = CliRunner().invoke(main, ["inspect", str(model), "--data", "digits", "--val-fraction", "0.2", "--json",
                                  "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    import json

    assert json.loads(r.output)["data"]["samples"] == 359


@pytest.mark.parametrize("raw", ["abc", "-1", "4GiB"])
def test_a_bad_host_bytes_setting_is_one_error_line(tmp_path, monkeypatch, raw):
    from click.testing import CliRunner

    from deadscan.cli import main

    import deadscan
    from deadscan.zoo import build

    write_folder(tmp_path / "imgs")
    spec = "mlp(depth=2, width=8, in_features=192, classes=3)"
    deadscan.save_safetensors(build(spec), tmp_path / "mlp.safetensors", spec)
    monkeypatch.setenv("DEADSCAN_HOST_BYTES", raw)
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "mlp.safetensors"), "--data",
                                  f"imagefolder:{tmp_path / 'imgs'}", "--split", "all", "--out", str(tmp_path / "out")])
    assert (r.exit_code, r.stdout) == (1, "")
    assert r.stderr == (f"Error: DEADSCAN_HOST_BYTES={raw!r}: expected a number of bytes (0: decode every set of "
                        "image files batch by batch)\n")
    assert not (tmp_path / "out").exists()
