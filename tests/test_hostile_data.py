"""Hostile data files: what --data, --data-root and imagefolder: may be handed by someone else.

None of them may hang deadscan (a FIFO, a device, a link loop), crash it (a CIFAR pickle whose dtype
reads raw bytes as pointers), make it allocate what a small file merely declares, hand bytes to a
decoder the user did not mean (an EPS named .png), or end in a traceback. The command-line cases run
as a user would, in their own process with a memory limit and a timeout (tests/hostile.py); the rest
call ``load_data`` directly. Valid files of each format must still load.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest
import torch

import deadscan
from deadscan import files
from deadscan.data import load_data, read_cifar_batch, sources
from deadscan.errors import DataError
from deadscan.zoo import build

from hostile import assert_refused, files_under, run_deadscan
from test_data import pattern, write_cifar, write_cifar_c, write_folder, write_idx, write_mnist

h5py = pytest.importorskip("h5py")

SPEC = "mlp(depth=2, width=8, in_features=4, classes=3)"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m.safetensors"
    deadscan.save_safetensors(build(SPEC), path, SPEC)
    return path


class Hung(Exception):
    """Not an OSError: readers that retry a failed open (scipy's loadmat does) must not swallow it."""


@pytest.fixture
def deadline():
    """Fail, rather than hang the suite, if a read blocks (a FIFO opened by mistake)."""
    def hung(*_):
        raise Hung("the read blocked")
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------------------------
# Builders of hostile (and valid) files


def npy_bytes(shape, descr: str = "|u1", payload: bytes = b"") -> bytes:
    """A .npy header declaring ``shape`` of ``descr``, followed by ``payload`` (whatever its length)."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue() + payload


def write_npz_members(path, members: dict, method=zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", method) as z:
        for name, data in members.items():
            z.writestr(name + ".npy", data)


def good_y(n: int = 6) -> bytes:
    return npy_bytes((n,), "<i8", (np.arange(n, dtype="<i8") % 3).tobytes())


def make_fifo(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def png_bytes(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB; the pixel data is a few bytes (never decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + \
        chunk(b"IEND", b"")


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nnewpath 0 0 moveto showpage\n%%EOF\n"


def _s(b: bytes) -> bytes:
    """A Python 2 str in a pickle (SHORT_BINSTRING or BINSTRING)."""
    return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b


def py2_cifar_batch(x: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR-10 batch pickled as Python 2 and numpy 1 wrote the real files: protocol 2, str (bytes)
    names, ``numpy.core.multiarray._reconstruct`` with a ``(1, shape, dtype, fortran, raw)`` state."""
    dims = b"".join(b"J" + struct.pack("<i", d) for d in x.shape)
    dtype = b"cnumpy\ndtype\n" + _s(b"u1") + b"K\x00K\x01\x87R" + \
        b"(K\x03" + _s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _s(b"b") + b"\x87R" + \
        b"(K\x01(" + dims + b"t" + dtype + b"\x89" + _s(x.tobytes()) + b"tb"
    names = b"](" + b"".join(_s(f"img_{i}.png".encode()) for i in range(len(labels))) + b"e"
    return b"\x80\x02}(" + _s(b"data") + array + _s(b"labels") + b"](" + \
        b"".join(b"K" + bytes([v]) for v in labels) + b"e" + _s(b"batch_label") + \
        _s(b"training batch 1 of 5") + _s(b"filenames") + names + b"u."


class _Dtype:
    """Pickles as ``numpy.dtype(name)`` with a hand-made ``__setstate__`` state."""

    def __init__(self, name, state):
        self.name, self.state = name, state

    def __reduce__(self):
        return np.dtype, (self.name, False, True), self.state


class _Array:
    """Pickles as numpy's protocol-2 array: ``_reconstruct(cls, (0,), b'b')`` then ``(1, shape, dtype, F, raw)``."""

    def __init__(self, dtype, raw: bytes, shape=(1,), cls=np.ndarray):
        self.dtype, self.raw, self.shape, self.cls = dtype, raw, shape, cls

    def __reduce__(self):
        return RECONSTRUCT, (self.cls, (0,), b"b"), (1, self.shape, self.dtype, False, self.raw)


RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy.(_)core.multiarray._reconstruct
PLAIN = (3, "|", None, None, None, -1, -1, 0)  # numpy's state of uint8


def object_struct_dtype():
    """A structured dtype with an object field, flags 0: numpy would take raw bytes as object pointers."""
    return _Dtype("V8", (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0))


def cifar_attacks() -> dict:
    """Crafted CIFAR batches -> what the refusal must say."""
    big = "A" * (1 << 20)

    class Encode:  # _codecs.encode of one memoised string, again and again
        def __reduce__(self):
            import _codecs
            return _codecs.encode, (big, "latin1")
    return {
        "object_field": ({b"data": _Array(object_struct_dtype(), b"A" * 8), b"labels": [0]}, "'V8' is not allowed"),
        "reflagged_u8": ({b"data": _Array(_Dtype("u8", (3, "|", None, None, None, -1, -1, 0x3F)), b"A" * 8),
                          b"labels": [0]}, "not a plain integer type"),
        "object_dtype": ({b"data": _Array(_Dtype("O8", PLAIN), b"A" * 8), b"labels": [0]}, "'O8' is not allowed"),
        "float_dtype": ({b"data": _Array(_Dtype("f8", (3, "<", None, None, None, -1, -1, 0)), b"A" * 8),
                         b"labels": [0]}, "'f8' is not allowed"),
        "fields_in_state": ({b"data": _Array(_Dtype("u1", (3, "|", None, ("a",), {"a": (np.dtype("u1"), 0)},
                                                            1, 1, 0)), b"A"), b"labels": [0]}, "not a plain"),
        "not_ndarray": ({b"data": _Array(_Dtype("u1", PLAIN), b"A", cls=np.dtype), b"labels": [0]},
                        "only plain numpy arrays"),
        "declared_huge": ({b"data": _Array(_Dtype("u1", PLAIN), b"A" * 3072, shape=(10**9, 3072)), b"labels": [0]},
                          "holds 3072 bytes"),
        "encode_again": ({b"data": [Encode() for _ in range(300)], b"labels": [0]}, "within the file's size"),
    }


def run_cifar_reads(tmp_path, files: dict) -> dict:
    """read_cifar_batch on each file, in a child process (a crash is a failure, not the end of pytest)."""
    script = ("import json, sys\nfrom deadscan.data import read_cifar_batch\nfrom deadscan.errors import DataError\n"
              "out = {}\nfor name, path in json.loads(sys.argv[1]).items():\n"
              "    try:\n        read_cifar_batch(path)\n        out[name] = 'LOADED'\n"
              "    except DataError as e:\n        out[name] = str(e)\nprint(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps({k: str(v) for k, v in files.items()})],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr}"
    return json.loads(proc.stdout)


def multi_member_gzip_bomb(path, header: bytes, gigabytes: float = 1.5) -> None:
    """header + zeros, gzipped as many repeated members: ~1 MB on disk, ``gigabytes`` inflated."""
    zeros = gzip.compress(bytes(16 << 20), 9)
    with open(path, "wb") as f:
        f.write(gzip.compress(header))
        for _ in range(int(gigabytes * 64)):
            f.write(zeros)


# ---------------------------------------------------------------------------------------------
# The command a user types: one Error line, nothing written outside --out, no hang, no memory


def _cifar_root(tmp_path, batch: dict | None = None, raw: bytes | None = None):
    root = tmp_path / "cifar"
    write_cifar(root)
    target = root / "cifar-10-batches-py" / "data_batch_1"
    if batch is not None:
        target.write_bytes(pickle.dumps(batch, protocol=2))
    if raw is not None:
        target.write_bytes(raw)
    return ["--data", "cifar10", "--data-root", str(root)]


def _imagefolder_with(tmp_path, name: str, content: bytes):
    folder = tmp_path / "imgs"
    write_folder(folder, classes=("cat", "dog"), per=2, size=8)
    (folder / "cat" / name).write_bytes(content)
    return ["--data", f"imagefolder:{folder}", "--split", "all", "--resize", "2", "--channels", "1"]


def _fifo_in_tree(tmp_path):
    folder = tmp_path / "tree"
    write_folder(folder, classes=("cat", "dog"), per=2, size=8)
    (folder / "cat" / "loop").symlink_to(folder / "cat")  # a folder loop: not followed
    make_fifo(folder / "dog" / "pipe.png")
    return ["--data", f"imagefolder:{folder}", "--split", "all", "--resize", "2", "--channels", "1"]


def _h5_unwritten(tmp_path):
    path = tmp_path / "fill.h5"
    with h5py.File(path, "w") as f:  # 3 GB of fill values, nothing stored
        f.create_dataset("x", shape=(10**6, 3, 32, 32), dtype="u1", chunks=(1000, 3, 32, 32), compression="gzip")
        f["y"] = np.zeros(10**6, np.int64)
    return ["--data", str(path)]


def _h5_external_link(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros((6, 4), np.float32)
    with h5py.File(tmp_path / "link.h5", "w") as f:
        f["x"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/x")
        f["y"] = np.zeros(6, np.int64)
    return ["--data", str(tmp_path / "link.h5")]


def _npz(tmp_path, members: dict, method=zipfile.ZIP_STORED):
    write_npz_members(tmp_path / "d.npz", members, method)
    return ["--data", str(tmp_path / "d.npz")]


def _truncated_npz(tmp_path):
    np.savez_compressed(tmp_path / "t.npz", x=np.random.default_rng(0).random((50, 4)).astype(np.float32),
                        y=np.zeros(50, np.int64))
    data = (tmp_path / "t.npz").read_bytes()
    (tmp_path / "t.npz").write_bytes(data[: len(data) // 2])
    return ["--data", str(tmp_path / "t.npz")]


def _mnist_bomb(tmp_path):
    root = tmp_path / "mn"
    write_mnist(root, compress=True)
    multi_member_gzip_bomb(root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz",
                           bytes([0, 0, 8, 3]) + struct.pack(">3I", 20, 28, 28))
    return ["--data", "mnist", "--data-root", str(root)]


def _fifo_cifar(tmp_path):
    args = _cifar_root(tmp_path)
    batch = tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_1"
    batch.unlink()
    make_fifo(batch)
    return args


CLI_CASES = {
    "fifo_cifar_batch": (_fifo_cifar, "data_batch_1: not a regular file"),
    "fifo_npz": (lambda t: ["--data", str(make_fifo(t / "x.npz"))], "not a regular file"),
    "cifar_object_dtype": (lambda t: _cifar_root(t, {b"data": _Array(object_struct_dtype(), b"A" * 8),
                                                     b"labels": [0]}), "refused or damaged CIFAR batch"),
    "npz_stored_huge_shape": (lambda t: _npz(t, {"x": npy_bytes((10**6, 3, 1000, 1000), payload=b"\0" * 64),
                                                 "y": good_y()}), "declares 3,000,000,000,000 bytes"),
    "npz_deflated_huge_shape": (lambda t: _npz(t, {"x": npy_bytes((2000, 1000, 1000), "<f4", b"\0" * 4096),
                                                   "y": good_y()}, zipfile.ZIP_DEFLATED), "stores"),
    "npz_truncated": (_truncated_npz, "cannot read arrays"),
    "h5_unwritten_chunks": (_h5_unwritten, "unwritten chunks"),
    "h5_external_link": (_h5_external_link, "is a ExternalLink"),
    "mnist_gzip_bomb": (_mnist_bomb, "file holds more values"),
    "eps_named_png": (lambda t: _imagefolder_with(t, "a.png", EPS), "a.png: cannot read image (cannot identify"),
    "png_30000_squared": (lambda t: _imagefolder_with(t, "000.png", png_bytes(30000, 30000)), "decompression bomb"),
    "fifo_and_loop_in_tree": (_fifo_in_tree, "pipe.png: not a regular file"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_refuses_hostile_data(tmp_path, model, case):
    make, expected = CLI_CASES[case]
    data_args = make(tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = files_under(tmp_path)
    run = run_deadscan(["inspect", str(model), *data_args, "--out", str(tmp_path / "out")], cwd)
    line = assert_refused(run, codes=(1,), contains=expected)
    assert line.startswith("Error: ")
    out = tmp_path / "out"
    assert {p for p in files_under(tmp_path) if out not in p.parents and p != out} == before


# ---------------------------------------------------------------------------------------------
# CIFAR pickles: the crafted-dtype crash, in a child process; real batches still load


def test_crafted_cifar_pickles_are_refused_in_a_child(tmp_path):
    files, expected = {}, {}
    for name, (batch, words) in cifar_attacks().items():
        files[name] = tmp_path / name
        files[name].write_bytes(pickle.dumps(batch, protocol=2))
        expected[name] = words
    files["object_field_p5"] = tmp_path / "p5"
    files["object_field_p5"].write_bytes(pickle.dumps({b"data": _Array(object_struct_dtype(), b"A" * 8)}, protocol=5))
    expected["object_field_p5"] = "'V8' is not allowed"
    got = run_cifar_reads(tmp_path, files)
    for name, words in expected.items():
        assert got[name].startswith(f"{files[name]}: refused or damaged CIFAR batch (") and words in got[name], \
            (name, got[name])
    assert "encode_again" in got and os.path.getsize(files["encode_again"]) < 2 << 20


def test_real_format_cifar_batches_load(tmp_path):
    ref = write_cifar(tmp_path)  # protocol 2 from Python 3 (_codecs.encode for bytes)
    ds = load_data("cifar10", "test", root=tmp_path)
    assert torch.equal(ds.x, torch.from_numpy(ref["x_test"])) and ds.y.tolist() == ref["y_test"]
    write_cifar(tmp_path, "cifar100")  # protocol 5 (_frombuffer)
    assert len(load_data("cifar100", "test", root=tmp_path)) == 20

    x = pattern(3).reshape(3, 3072)
    raw = py2_cifar_batch(x, [7, 0, 9])
    assert np.array_equal(pickle.loads(raw, encoding="bytes")[b"data"], x)  # numpy itself reads it the same
    (tmp_path / "py2").write_bytes(raw)
    batch = read_cifar_batch(tmp_path / "py2")
    assert np.array_equal(batch[b"data"], x) and batch[b"labels"] == [7, 0, 9]
    assert batch[b"batch_label"] == b"training batch 1 of 5" and batch[b"filenames"][2] == b"img_2.png"

    folder = tmp_path / "cifar-10-batches-py"  # labels as an int64 array, big-endian data: still fine
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": x, b"labels": np.array([1, 2, 3])}, protocol=5))
    assert load_data("cifar10", "test", root=tmp_path).y.tolist() == [1, 2, 3]
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": x, b"labels": np.array([1, 2, 3], ">i4")}, protocol=2))
    assert load_data("cifar10", "test", root=tmp_path).y.tolist() == [1, 2, 3]


@pytest.mark.parametrize("batch,words", [
    ({b"data": np.zeros((2, 3072), np.int64), b"labels": [0, 1]}, "b'data' must be uint8 (N, 3072), got int64"),
    ({b"data": np.zeros((2, 3071), np.uint8), b"labels": [0, 1]}, "got uint8 (2, 3071)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 2**31]}, "labels 0 to 2**31-1"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, -1]}, "labels 0 to 2**31-1"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1.0]}, "entry b'labels' holds a list of float"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]}, "2 images, 3 labels"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [[0], [1]]}, "entry b'labels' holds a list of list"),
])
def test_cifar_batch_contents_are_checked(tmp_path, batch, words):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError) as e:
        load_data("cifar10", "test", root=tmp_path)
    assert str(e.value).startswith(str(tmp_path / "cifar-10-batches-py" / "test_batch")) and words in str(e.value)


# ---------------------------------------------------------------------------------------------
# Not regular files: refused before they are opened, by every reader


def _fifo_cases():
    def npz(t):
        return str(make_fifo(t / "x.npz")), {}

    def h5(t):
        return str(make_fifo(t / "x.h5")), {}

    def device(t):
        (t / "zero.npz").symlink_to("/dev/zero")
        return str(t / "zero.npz"), {}

    def cifar(t):
        write_cifar(t)
        (t / "cifar-10-batches-py" / "test_batch").unlink()
        make_fifo(t / "cifar-10-batches-py" / "test_batch")
        return "cifar10", {"root": t, "split": "test"}

    def mnist(t, compress):
        write_mnist(t, compress=compress)
        name = "t10k-labels-idx1-ubyte" + (".gz" if compress else "")
        (t / "MNIST" / "raw" / name).unlink()
        make_fifo(t / "MNIST" / "raw" / name)
        return "mnist", {"root": t, "split": "test"}

    def svhn(t):
        make_fifo(t / "test_32x32.mat")
        return "svhn", {"root": t, "split": "test"}

    def cifar_c(t, which):
        base, _ = write_cifar_c(t)
        (base / which).unlink()
        make_fifo(base / which)
        return "cifar10-c", {"root": t, "split": "test"}

    def image(t):
        write_folder(t / "f", classes=("a", "b"), per=2)
        make_fifo(t / "f" / "a" / "z.png")
        return f"imagefolder:{t / 'f'}", {}

    def wnids(t):
        from test_data import write_tiny
        base = write_tiny(t)
        (base / "wnids.txt").unlink()
        make_fifo(base / "wnids.txt")
        return "tiny-imagenet", {"root": t}

    def annotations(t):
        from test_data import write_tiny
        base = write_tiny(t)
        (base / "val" / "val_annotations.txt").unlink()
        make_fifo(base / "val" / "val_annotations.txt")
        return "tiny-imagenet", {"root": t, "split": "test"}

    def val_image(t):
        from test_data import write_tiny
        base = write_tiny(t)
        (base / "val" / "images" / "val_0.JPEG").unlink()
        make_fifo(base / "val" / "images" / "val_0.JPEG")
        return "tiny-imagenet", {"root": t, "split": "test"}
    return {"npz": (npz, "x.npz"), "h5": (h5, "x.h5"), "device": (device, "zero.npz"),
            "cifar": (cifar, "test_batch"), "mnist": (lambda t: mnist(t, False), "t10k-labels-idx1-ubyte"),
            "mnist_gz": (lambda t: mnist(t, True), "t10k-labels-idx1-ubyte.gz"), "svhn": (svhn, "test_32x32.mat"),
            "cifar_c_labels": (lambda t: cifar_c(t, "labels.npy"), "labels.npy"),
            "cifar_c_images": (lambda t: cifar_c(t, "fog.npy"), "fog.npy"), "image": (image, "z.png"),
            "wnids": (wnids, "wnids.txt"), "annotations": (annotations, "val_annotations.txt"),
            "val_image": (val_image, "val_0.JPEG")}


FIFO_CASES = _fifo_cases()


@pytest.mark.parametrize("case", sorted(FIFO_CASES))
def test_non_regular_files_are_refused_without_blocking(tmp_path, deadline, case):
    make, name = FIFO_CASES[case]
    spec, kw = make(tmp_path)
    with pytest.raises(DataError) as e:
        load_data(spec, kw.pop("split", "all"), **kw)
    assert f"{name}: not a regular file (a FIFO, device, socket, folder or broken link); give a regular file" \
        in str(e.value)


def test_link_loops_in_an_image_tree(tmp_path, deadline):
    write_folder(tmp_path / "f", classes=("a", "b"), per=2)
    (tmp_path / "f" / "a" / "up").symlink_to(tmp_path / "f")  # folder loop: not followed, no duplicates
    ds = load_data(f"imagefolder:{tmp_path / 'f'}", "all")
    assert len(ds) == 4
    (tmp_path / "f" / "b" / "self.png").symlink_to(tmp_path / "f" / "b" / "self.png")  # ELOOP
    with pytest.raises(DataError, match=r"self\.png: not a regular file"):
        load_data(f"imagefolder:{tmp_path / 'f'}", "all")


# ---------------------------------------------------------------------------------------------
# Declared sizes against stored sizes, before allocating


def _h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for name, make in datasets.items():
            make(f, name)
    return str(path)


def test_npz_declared_sizes(tmp_path, monkeypatch):
    write_npz_members(tmp_path / "s.npz", {"x": npy_bytes((6, 4), "<f4", b"\0" * 95), "y": good_y()})
    with pytest.raises(DataError, match=r"'x' \(6, 4\) float32 declares 96 bytes but the file stores 95;"):
        load_data(str(tmp_path / "s.npz"), "all")  # one byte short: stored members must hold every byte
    write_npz_members(tmp_path / "d.npz", {"x": npy_bytes((10**5, 1000), "<f8", b"\0" * 1000), "y": good_y()},
                      zipfile.ZIP_DEFLATED)
    with pytest.raises(DataError, match=r"declares 800,000,000 bytes but the file stores \d+ compressed"):
        load_data(str(tmp_path / "d.npz"), "all")
    np.savez_compressed(tmp_path / "ok.npz", x=np.zeros((6, 4), np.float32), y=np.zeros(6, np.int64))
    monkeypatch.setattr(files, "DEFAULTS", files.DEFAULTS.__class__(max_decoded_bytes=64))
    with pytest.raises(DataError, match=r"'x' \(6, 4\) float32 declares 96 bytes, above the 64-byte limit; "
                                        r"if the file is trusted, raise it with DEADSCAN_MAX_BYTES"):
        load_data(str(tmp_path / "ok.npz"), "all")


def test_h5_declared_sizes(tmp_path, monkeypatch):
    def contiguous_unwritten(f, n):
        f.create_dataset(n, shape=(10**5, 3072), dtype="u1")

    def chunked_unwritten(f, n):
        f.create_dataset(n, shape=(100, 4), dtype="f4", chunks=(10, 4))
        f[n][:50] = 1  # half the chunks written

    def y(f, n):
        f[n] = np.zeros(100, np.int64)
    with pytest.raises(DataError, match=r"'x' \(100000, 3072\) uint8 declares 307,200,000 bytes but the file "
                                        r"stores 0;"):
        load_data(_h5(tmp_path / "c.h5", x=contiguous_unwritten, y=y), "all")
    with pytest.raises(DataError, match=r"'x' \(100, 4\) has unwritten chunks"):
        load_data(_h5(tmp_path / "k.h5", x=chunked_unwritten, y=y), "all")
    monkeypatch.setattr(files, "DEFAULTS", files.DEFAULTS.__class__(max_decoded_bytes=1000))
    with pytest.raises(DataError, match="declares 1,600 bytes, above the 1,000-byte limit"):
        load_data(_h5(tmp_path / "ok.h5", x=lambda f, n: f.create_dataset(n, data=np.ones((100, 4), np.float32),
                                                                             chunks=(10, 4), compression="gzip"), y=y),
                  "all")


def test_idx_declared_sizes(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_mnist(tmp_path)
    (raw / "t10k-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 60000, 28, 28) + b"\0" * 99)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: the header \(60000x28x28\) declares 47,040,000 bytes "
                                        r"but the file stores 99;"):
        load_data("mnist", "test", root=tmp_path)
    (raw / "t10k-images-idx3-ubyte").unlink()
    with gzip.open(raw / "t10k-images-idx3-ubyte.gz", "wb") as f:  # a header no gzip stream of this size can fill
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2**31, 2**16, 2**16))
    with pytest.raises(DataError, match=r"declares 9,223,372,036,854,775,808 bytes, above the"):
        load_data("mnist", "test", root=tmp_path)
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: cannot read idx file"):
        load_data("mnist", "test", root=tmp_path)


def test_gzip_bomb_stops_at_the_declared_size(tmp_path):
    path = tmp_path / "bomb-idx1-ubyte.gz"
    multi_member_gzip_bomb(path, bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"\1" * 5, gigabytes=0.25)
    inflated = []
    real = gzip.GzipFile.read

    def counting(self, size=-1):
        out = real(self, size)
        inflated.append(len(out))
        return out
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gzip.GzipFile, "read", counting)
        with pytest.raises(DataError, match="header says \\(5,\\), file holds more values"):
            sources.read_idx(tmp_path / "bomb-idx1-ubyte")
    assert sum(inflated) == 4 + 4 + 5 + 1  # header, dims, the 5 declared values, one more byte: no further


def test_npy_and_mat_declared_sizes(tmp_path):
    base, _ = write_cifar_c(tmp_path)
    data = (base / "fog.npy").read_bytes()
    (base / "fog.npy").write_bytes(data[:-1])
    with pytest.raises(DataError, match=r"fog.npy: the header \(uint8 \(20, 32, 32, 3\)\) declares 61,440 bytes but "
                                        r"the file stores 61,439;"):
        load_data("cifar10-c", "test", root=tmp_path)
    (base / "fog.npy").write_bytes(npy_bytes((5, 32, 32, 3), "|O", b"\0" * 8))
    with pytest.raises(DataError, match="fog.npy: holds object, not plain numbers"):
        load_data("cifar10-c", "test", root=tmp_path)

    scipy_io = pytest.importorskip("scipy.io")
    x = pattern(2).transpose(2, 3, 1, 0)  # (32, 32, 3, 2)
    scipy_io.savemat(tmp_path / "test_32x32.mat", {"X": x, "y": np.array([[1], [2]], np.uint8)})
    mat = (tmp_path / "test_32x32.mat").read_bytes()
    dims = struct.pack("<4i", 32, 32, 3, 2)
    assert mat.count(dims) == 1
    (tmp_path / "test_32x32.mat").write_bytes(mat.replace(dims, struct.pack("<4i", 32, 32, 3, 2**30)))
    with pytest.raises(DataError, match=r"test_32x32.mat: 'X' \(32, 32, 3, 1073741824\) declares "
                                        r"3,298,534,883,328 bytes"):
        load_data("svhn", "test", root=tmp_path)
    (tmp_path / "test_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\0" * 200)
    with pytest.raises(DataError, match="test_32x32.mat: not an SVHN .mat file"):
        load_data("svhn", "test", root=tmp_path)


# ---------------------------------------------------------------------------------------------
# Arrays of the wrong kind, damaged files, odd HDF5: one line each


@pytest.mark.parametrize("x,y,words", [
    (np.zeros((6, 4), np.longdouble), None, "'x' must be uint8 or float (16, 32 or 64 bit), got float128"),
    (np.zeros((6, 4), np.complex64), None, "got complex64"),
    (np.zeros((6, 4), object), None, "got object"),
    (np.zeros((6, 4), [("a", "f4")]), None, "got [('a', '<f4')]"),
    (np.zeros((6, 1, 1, 2, 2), np.float32), None, "got (6, 1, 1, 2, 2)"),
    (np.zeros(6, np.float32), None, "got (6,)"),
    (np.zeros((6, 0), np.float32), None, "'x' samples are empty (shape (6, 0))"),
    (None, np.zeros(6, np.float32), "'y' must be integer labels of shape (N,), got float32 (6,)"),
    (None, np.zeros((6, 1), np.int64), "got int64 (6, 1)"),
    (None, np.array([0, 1, 2, 2**31, 0, 1]), "labels must be below 2**31, found 2147483648"),
    (None, np.array([0, 1, 2, -3, 0, 1]), "labels must be 0 or more, found -3"),
    (None, np.array([0, 1, 2, 2**64 - 1, 0, 1], np.uint64), "labels must be 0 or more"),
])
def test_wrong_arrays_are_one_line(tmp_path, x, y, words):
    x = np.zeros((6, 4), np.float32) if x is None else x
    y = np.arange(6) % 3 if y is None else y
    np.savez(tmp_path / "a.npz", x=x, y=y)
    with pytest.raises(DataError) as e:
        load_data(str(tmp_path / "a.npz"), "all")
    assert words in str(e.value) and "\n" not in str(e.value)
    if x.dtype != object and x.dtype.fields is None:
        with h5py.File(tmp_path / "a.h5", "w") as f:
            f["x"], f["y"] = x, y
        with pytest.raises(DataError) as e:
            load_data(str(tmp_path / "a.h5"), "all")
        assert words in str(e.value)


def test_damaged_and_odd_files_are_one_line(tmp_path):
    def refused(path, words):
        with pytest.raises(DataError) as e:
            load_data(str(path), "all")
        assert str(e.value).startswith(str(path)) and words in str(e.value) and "\n" not in str(e.value), e.value
    (tmp_path / "t.npz").write_bytes(b"PK\x03\x04" + b"\0" * 40)
    refused(tmp_path / "t.npz", "cannot read arrays (")
    (tmp_path / "n.h5").write_bytes(b"this is not HDF5 at all" * 10)
    refused(tmp_path / "n.h5", "cannot read arrays (")
    y = np.zeros(4, np.int64)
    with h5py.File(tmp_path / "g.h5", "w") as f:
        f.create_group("x")
        f["y"] = y
    refused(tmp_path / "g.h5", "'x' is a group, not a dataset")
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["real"] = np.zeros((4, 2), np.float32)
        f["x"] = h5py.SoftLink("/real")
        f["y"] = y
    refused(tmp_path / "s.h5", "'x' is a SoftLink")
    (tmp_path / "raw.bin").write_bytes(b"\0" * 32)
    with h5py.File(tmp_path / "e.h5", "w") as f:
        f.create_dataset("x", shape=(4, 2), dtype="f4", external=[(str(tmp_path / "raw.bin"), 0, 32)])
        f["y"] = y
    refused(tmp_path / "e.h5", "keeps its data in other files")
    with h5py.File(tmp_path / "src.h5", "w") as f:
        f["x"] = np.zeros((4, 2), np.float32)
    layout = h5py.VirtualLayout(shape=(4, 2), dtype="f4")
    layout[:] = h5py.VirtualSource(str(tmp_path / "src.h5"), "x", shape=(4, 2))
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f.create_virtual_dataset("x", layout)
        f["y"] = y
    refused(tmp_path / "v.h5", "keeps its data in other files")
    with h5py.File(tmp_path / "str.h5", "w") as f:
        f["x"] = np.array([b"ab"] * 4).reshape(4, 1)
        f["y"] = y
    refused(tmp_path / "str.h5", "'x' must be uint8 or float")



def test_a_garbled_npy_header_is_one_line(tmp_path):
    """numpy reads a header that is not a literal again with Python's tokenizer, which raises its own errors
    (a NUL byte and an open bracket here): still one Error line (npy_header, which every .npy reader uses)."""
    import io

    header = b"{'descr': '<i8', 'fortran_order': False, 'shape': (\x00".ljust(117) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 64
    with pytest.raises(ValueError, match="damaged .npy header"):
        files.npy_header(io.BytesIO(npy))
    path = tmp_path / "t.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("input_ids.npy", npy)
    with pytest.raises(DataError) as e:
        load_data(str(path), "all")
    assert str(e.value).startswith(f"{path}: ") and "damaged .npy header" in str(e.value), e.value
    assert "\n" not in str(e.value)

# ---------------------------------------------------------------------------------------------
# Images: raster decoders only, bombs refused


def test_images_use_raster_decoders_only(tmp_path):
    write_folder(tmp_path / "f", classes=("a", "b"), per=2)
    (tmp_path / "f" / "a" / "000.png").write_bytes(EPS)  # the first image: read by the probe
    with pytest.raises(DataError) as e:
        load_data(f"imagefolder:{tmp_path / 'f'}", "all")
    assert str(e.value).startswith(f"{tmp_path / 'f' / 'a' / '000.png'}: cannot read image (cannot identify image "
                                   "file") and "PNG, JPEG, BMP, GIF, WEBP, TIFF, PPM" in str(e.value)


@pytest.mark.parametrize("side", [10000, 30000])  # above PIL's warning limit; above its error limit
def test_decompression_bombs_are_one_line(tmp_path, side):
    write_folder(tmp_path / "f", classes=("a", "b"), per=2)
    (tmp_path / "f" / "b" / "001.png").write_bytes(png_bytes(side, side))
    with pytest.raises(DataError) as e:
        load_data(f"imagefolder:{tmp_path / 'f'}", "all")
    assert str(e.value).startswith(f"{tmp_path / 'f' / 'b' / '001.png'}: image has more than ") and \
        "decompression bomb" in str(e.value)


def test_tiny_imagenet_annotations_name_files_only(tmp_path):
    from test_data import write_tiny
    base = write_tiny(tmp_path)
    notes = base / "val" / "val_annotations.txt"
    notes.write_text("../../train/n01/images/n01_0.JPEG\tn01\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="is not a file name in"):
        load_data("tiny-imagenet", "test", root=tmp_path)


# ---------------------------------------------------------------------------------------------
# Valid files of every format still load


def test_valid_files_still_load(tmp_path):
    x = pattern(12, 1, 4, 4)
    y = np.arange(12) % 3
    np.savez_compressed(tmp_path / "c.npz", x=x, y=y)
    ds = load_data(str(tmp_path / "c.npz"), "all")
    assert torch.equal(ds.x, torch.from_numpy(x)) and ds.y.tolist() == y.tolist()
    np.savez(tmp_path / "f.npz", x=np.asfortranarray(x.reshape(12, 16).astype(np.float64)), y=y.astype(np.uint8))
    assert torch.equal(load_data(str(tmp_path / "f.npz"), "all").x, torch.from_numpy(x.reshape(12, 16) * 1.0))
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.create_dataset("x", data=x, chunks=(5, 1, 4, 4), compression="gzip")  # edge chunk, compressed
        f.create_dataset("y", data=y, chunks=(4,), compression="gzip", shuffle=True)
    ds = load_data(str(tmp_path / "c.h5"), "all")
    assert torch.equal(ds.x, torch.from_numpy(x)) and ds.y.tolist() == y.tolist()
    with h5py.File(tmp_path / "k.h5", "w") as f:
        f.create_dataset("x", data=x.astype(np.float16), compression="lzf")
        f["y"] = y.astype(np.int32)
    assert load_data(str(tmp_path / "k.h5"), "all").x.dtype == torch.float16

    imgs = write_folder(tmp_path / "png", classes=("a", "b"), per=3, size=8)
    ds = load_data(f"imagefolder:{tmp_path / 'png'}", "all")
    assert len(ds) == len(imgs) and tuple(ds.x.shape) == (6, 3, 8, 8)

    xtr, ytr, _, _ = write_mnist(tmp_path / "m", compress=True)
    ds = load_data("mnist", "all", root=tmp_path / "m")
    assert torch.equal(ds.x[:, 0], torch.from_numpy(xtr)) and ds.y.tolist() == ytr.tolist()
    write_idx(tmp_path / "m" / "MNIST" / "raw" / "plain-idx1-ubyte", np.arange(7, dtype=np.uint8))
    assert sources.read_idx(tmp_path / "m" / "MNIST" / "raw" / "plain-idx1-ubyte").tolist() == list(range(7))

    base, labels = write_cifar_c(tmp_path / "c")
    ds = load_data("cifar10-c", "test", root=tmp_path / "c", corruption="fog", severity="2")
    assert ds.y.tolist() == labels[4:8].tolist() and int(ds.x[1, 0, 0, 0]) == 21

    scipy_io = pytest.importorskip("scipy.io")
    sx = pattern(3)
    scipy_io.savemat(tmp_path / "test_32x32.mat", {"X": sx.transpose(2, 3, 1, 0), "y": np.array([[10], [1], [2]])},
                     do_compression=True)
    ds = load_data("svhn", "test", root=tmp_path)
    assert torch.equal(ds.x, torch.from_numpy(sx)) and ds.y.tolist() == [0, 1, 2]
