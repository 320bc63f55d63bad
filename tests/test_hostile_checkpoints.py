"""Hostile checkpoint files: zips and pickles built to mislead, exhaust or crash the loader, and the
valid files an earlier format check refused.

Every file is built here, at test time. A few cases run the command a user would type, in its own
process with a memory limit and a timeout (tests/hostile.py); the rest call the library directly.
"""

from __future__ import annotations

import io
import struct
import warnings
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from deadscan.checkpoint import (ARCH_KEY, detect_format, list_globals, load_checkpoint, load_torch_file)
from deadscan.errors import CheckpointError, printable
from deadscan.pickles import scan_pickle
from deadscan.scan import scan
from deadscan.trace import find_sites

from conftest import MLP_SPEC, _hand_mlp
from hostile import assert_refused, run_deadscan

MiB = 2**20


def _state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _hand_mlp().state_dict().items()}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def npz(folder):
    rng = np.random.default_rng(0)
    path = folder / "data.npz"
    np.savez(path, x=rng.random((100, 4)).astype(np.float32), y=(np.arange(100) % 3).astype(np.int64))
    return path


def members(path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def write_zip(path, items, method=zipfile.ZIP_STORED) -> None:
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w", method) as z:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names some cases need
        for name, data in items:
            z.writestr(name, data)


def torch_zip(tmp_path, name="m.pt", state=None):
    p = tmp_path / name
    torch.save(_state() if state is None else state, p)
    return p


def central_entry(data: bytes, name: str) -> int:
    """Offset of ``name``'s central directory entry."""
    pos = data.index(b"PK\x01\x02")
    while data[pos:pos + 4] == b"PK\x01\x02":
        nlen, xlen, clen = struct.unpack("<HHH", data[pos + 28:pos + 34])
        if data[pos + 46:pos + 46 + nlen] == name.encode():
            return pos
        pos += 46 + nlen + xlen + clen
    raise KeyError(name)


def with_numel(pkl: bytes, numel: int) -> bytes:
    """The hand MLP's data.pkl with fc1.weight's storage (32 floats, BININT1 32 after 'cpu') claiming ``numel``."""
    j = pkl.index(b"K\x20", pkl.index(b"cpu"))
    return pkl[:j] + b"\x8a\x05" + numel.to_bytes(5, "little") + pkl[j + 2:]


# ---------------------------------------------------------------------------------------------
# Valid files load, bit for bit


def safetensors_with_header(path, state, target: int, metadata=None) -> None:
    """A file written by the safetensors library whose header length is exactly ``target``."""
    for pad in range(4096):
        save_file(state, str(path), metadata={**(metadata or {}), "pad": "x" * pad})
        n = struct.unpack("<Q", path.read_bytes()[:8])[0]
        if n == target:
            return
        assert n < target, f"cannot reach a {target}-byte header"
    raise AssertionError("unreachable")


def test_safetensors_with_a_384_byte_header_is_not_taken_for_a_pickle(tmp_path):
    p = tmp_path / "small.safetensors"
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1.5, -2.0])}
    safetensors_with_header(p, state, 384)
    assert p.read_bytes()[0] == 0x80  # pickle's PROTO opcode
    assert detect_format(p) == "safetensors"
    assert list_globals(p).format == "safetensors"


@pytest.mark.parametrize("k", [2, 3, 4])
def test_safetensors_with_header_length_128_plus_256k_loads(tmp_path, k):
    p = tmp_path / "m.safetensors"
    safetensors_with_header(p, _state(), 128 + 256 * k, {ARCH_KEY: MLP_SPEC})
    assert p.read_bytes()[0] == 0x80
    ck = load_checkpoint(p)
    assert ck.info.format == "safetensors"
    assert_same(ck.model.state_dict(), _state())


def test_torch_zip_and_legacy_still_load(tmp_path):
    zp = torch_zip(tmp_path)
    lp = tmp_path / "legacy.pt"
    torch.save(_state(), lp, _use_new_zipfile_serialization=False)
    for p, fmt in ((zp, "torch-zip"), (lp, "torch-legacy")):
        ck = load_checkpoint(p, MLP_SPEC)
        assert ck.info.format == fmt
        assert_same(ck.model.state_dict(), _state())
        assert_same(load_torch_file(p), _state())


def test_cli_inspects_the_384_byte_header_file(tmp_path):
    p = tmp_path / "m.safetensors"
    safetensors_with_header(p, _state(), 640, {ARCH_KEY: MLP_SPEC})
    run = run_deadscan(["inspect", str(p), "--data", str(npz(tmp_path)), "--out", str(tmp_path / "out")], tmp_path)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert (tmp_path / "out" / "summary.json").exists()


# ---------------------------------------------------------------------------------------------
# Zip archives whose members mislead: every reader must see the same thing


def test_duplicate_member_is_refused_by_list_globals_cli(tmp_path):
    p = tmp_path / "dup.pt"  # Python's zipfile reads the second data.pkl, torch's reader maybe the first
    write_zip(p, members(torch_zip(tmp_path)) + [("m/data.pkl", pickle_global(b"os", b"system"))])
    line = assert_refused(run_deadscan(["inspect", "--list-globals", str(p)], tmp_path))
    assert line == (f"Error: {p}: damaged zip archive (member m/data.pkl appears twice; tools disagree on which one "
                    "they read); re-save it with torch.save")


def pickle_global(module: bytes, name: bytes) -> bytes:
    return b"\x80\x02c" + module + b"\n" + name + b"\n."


@pytest.mark.parametrize("extra, message", [
    (("m/DATA.pkl", b"x"), "members m/data.pkl and m/DATA.pkl differ only in case"),
    (("m/data/0", b"x" * 128), "member m/data/0 appears twice"),
    (("other/x", b"x"), "members lie in more than one top-level folder: m/, other/"),
    (("version", b"3"), r"members lie in more than one top-level folder: \(top level\), m/"),
])
def test_colliding_or_scattered_members_are_refused(tmp_path, extra, message):
    p = tmp_path / "bad.pt"
    write_zip(p, members(torch_zip(tmp_path)) + [extra])
    for call in (detect_format, list_globals, lambda q: load_checkpoint(q, MLP_SPEC), load_torch_file):
        with pytest.raises(CheckpointError, match=message):
            call(p)


def test_central_directory_tricks_are_refused(tmp_path):
    src = torch_zip(tmp_path)
    data = bytearray(src.read_bytes())

    past_end = bytearray(data)  # a stored member whose compressed size runs past the file
    e = central_entry(past_end, "m/data/1")
    past_end[e + 20:e + 24] = struct.pack("<I", 10**9)
    (tmp_path / "past.pt").write_bytes(past_end)
    with pytest.raises(CheckpointError, match=r"damaged zip archive \(member m/data/1 claims 1000000000 bytes at "
                                              r"offset \d+, past the end of the \d+-byte file\)"):
        detect_format(tmp_path / "past.pt")

    overlap = bytearray(data)  # two central entries pointing at the same bytes (overlap zip bomb)
    first = struct.unpack("<I", overlap[central_entry(overlap, "m/data/0") + 42:][:4])[0]
    e = central_entry(overlap, "m/data/1")
    overlap[e + 42:e + 46] = struct.pack("<I", first)
    (tmp_path / "overlap.pt").write_bytes(overlap)
    with pytest.raises(CheckpointError, match=r"damaged zip archive \(members m/data/[01] and m/data/[01] overlap\)"):
        load_checkpoint(tmp_path / "overlap.pt", MLP_SPEC)

    # torch writes zip64 end records, which both readers prefer: make them point elsewhere than zipfile reads
    z64 = data.rfind(b"PK\x06\x06")
    n = len(zipfile.ZipFile(src).infolist())
    cases = {z64 + 48: rf"its end record declares {n} entries \({n} on this disk\) at offset 4611686018427387904; "
                       rf"the central directory holds {n} at offset \d+\); zip readers disagree on its members",
             z64 + 32: rf"its end record declares 4611686018427387904 entries \({n} on this disk\) at offset \d+;",
             data.rfind(b"PK\x06\x07") + 8: r"its zip64 locator points at offset 4611686018427387904, not \d+\)"}
    for pos, message in cases.items():
        bad = bytearray(data)
        bad[pos:pos + 8] = struct.pack("<Q", 2**62)
        (tmp_path / "end.pt").write_bytes(bad)
        with pytest.raises(CheckpointError, match=message):
            detect_format(tmp_path / "end.pt")


def test_zip64_sizes_and_foreign_compression_are_refused(tmp_path):
    src = members(torch_zip(tmp_path))
    p = tmp_path / "zip64.pt"
    with zipfile.ZipFile(p, "w") as z:
        for name, data in src:
            z.writestr(name, data)
        z.filelist[-1].file_size = 2**40  # written at close as a zip64 extra field in the central directory
    with pytest.raises(CheckpointError, match=rf"member {src[-1][0]} declares 1099511627776 bytes, more than the "
                                              r"\d+-byte file can hold"):
        load_torch_file(p)

    p = tmp_path / "bz2.pt"
    write_zip(p, src, zipfile.ZIP_BZIP2)
    with pytest.raises(CheckpointError, match=r"uses compression method 12; torch reads only stored or deflated"):
        list_globals(p)


def test_nested_zip_as_data_pkl_is_refused(tmp_path):
    inner = io.BytesIO()
    torch.save(_state(), inner)
    p = tmp_path / "nested.pt"
    write_zip(p, [(n, inner.getvalue() if n.endswith("data.pkl") else d) for n, d in members(torch_zip(tmp_path))])
    with pytest.raises(CheckpointError, match=r"its pickle cannot be read to the end \(.+\), so its storage sizes "
                                              r"cannot be checked before loading$"):
        load_checkpoint(p, MLP_SPEC)
    assert "could not be read to the end" in list_globals(p).describe()


# ---------------------------------------------------------------------------------------------
# Declared sizes checked before torch allocates


@pytest.fixture
def no_torch_load(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("torch.load was reached")
    monkeypatch.setattr(torch, "load", refuse)


def test_storage_numel_beyond_its_member_is_refused_before_torch_load(tmp_path, no_torch_load):
    src = members(torch_zip(tmp_path))
    p = tmp_path / "numel.pt"
    write_zip(p, [(n, with_numel(d, 10**11) if n.endswith("data.pkl") else d) for n, d in src])
    expected = (r"storage 0 declares 400000000000 bytes; its member m/data/0 holds 128\); nothing was allocated")
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(p, MLP_SPEC)
    with pytest.raises(CheckpointError, match=expected):
        load_torch_file(p, "train state")

    p = tmp_path / "missing.pt"
    write_zip(p, [(n, d) for n, d in src if n != "m/data/0"])
    with pytest.raises(CheckpointError, match=r"storage 0 declares 128 bytes; its member m/data/0 has no such member"):
        load_checkpoint(p, MLP_SPEC)


def test_storage_one_element_too_many_is_refused(tmp_path, no_torch_load):
    src = members(torch_zip(tmp_path))
    p = tmp_path / "numel.pt"
    write_zip(p, [(n, with_numel(d, 33) if n.endswith("data.pkl") else d) for n, d in src])
    with pytest.raises(CheckpointError, match=r"storage 0 declares 132 bytes; its member m/data/0 holds 128\)"):
        load_torch_file(p)


def test_legacy_storage_bytes_beyond_the_file_are_refused(tmp_path, no_torch_load):
    buf = io.BytesIO()
    torch.save(_state(), buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    p = tmp_path / "legacy.pt"
    p.write_bytes(with_numel(data, len(data) // 4 + 1))  # fewer elements than bytes, more bytes than the file
    with pytest.raises(CheckpointError, match=rf"its storages declare \d+ bytes but the file holds {p.stat().st_size} "):
        load_checkpoint(p, MLP_SPEC)


def test_cli_numel_bomb_is_refused_within_memory(tmp_path):
    src = members(torch_zip(tmp_path))
    p = tmp_path / "numel.pt"
    write_zip(p, [(n, with_numel(d, 10**11) if n.endswith("data.pkl") else d) for n, d in src])
    run = run_deadscan(["inspect", str(p), "--arch", MLP_SPEC, "--data", str(npz(tmp_path)),
                        "--out", str(tmp_path / "out")], tmp_path)
    assert_refused(run, contains="storage 0 declares 400000000000 bytes; its member m/data/0 holds 128")
    assert not (tmp_path / "out").exists()


def deflate_bomb(tmp_path, pkl: bytes):
    src = members(torch_zip(tmp_path))
    p = tmp_path / "bomb.pt"
    write_zip(p, [(n, pkl if n.endswith("data.pkl") else d) for n, d in src], zipfile.ZIP_DEFLATED)
    info = next(i for i in zipfile.ZipFile(p).infolist() if i.filename.endswith("data.pkl"))
    assert info.file_size > 500 * info.compress_size  # a bomb, yet within deflate's own ratio
    return p


def test_cli_list_globals_on_a_deflate_bomb_stops_early(tmp_path):
    p = deflate_bomb(tmp_path, b"\x80\x02" + b"N" * (20 * MiB))  # 20M opcodes in ~20 KB
    run = run_deadscan(["inspect", "--list-globals", str(p)], tmp_path, timeout=45)
    assert not run.timed_out and run.returncode == 0, run.stderr
    assert run.max_rss_mb < 1200
    assert "m/data.pkl: 0 global(s); reading stopped early (more than the 5000000 opcodes deadscan reads from " \
           "one pickle)" in run.stdout
    assert run.stdout.rstrip().endswith("m/data.pkl could not be read to the end, so this list may be incomplete; "
                                        "deadscan does not load a pickle it cannot read through (without "
                                        "--trust-pickle)")


def test_pickle_declaring_a_huge_argument_is_refused_before_reading_it(tmp_path, no_torch_load):
    p = deflate_bomb(tmp_path, b"\x80\x02\x8e" + struct.pack("<Q", 2**40) + b"\0" * (100 * MiB))
    with pytest.raises(CheckpointError, match=r"its pickle cannot be read to the end \(larger than the 268435456 "
                                              r"bytes deadscan reads from one pickle\)"):
        load_checkpoint(p, MLP_SPEC)


def test_scan_pickle_limits():
    assert scan_pickle(io.BytesIO(b"\x80\x02" + b"N" * 50 + b"."), max_ops=10).error == \
        "more than the 10 opcodes deadscan reads from one pickle"
    assert scan_pickle(io.BytesIO(b"c" + b"x" * 1000), max_bytes=100).error == \
        "larger than the 100 bytes deadscan reads from one pickle"
    ok = scan_pickle(io.BytesIO(pickle_global(b"os", b"system")), max_ops=4, max_bytes=16)
    assert (ok.error, ok.globals, ok.pickles) == (None, ["os.system"], 1)


# ---------------------------------------------------------------------------------------------
# Tensors that are not plain dense weights: one line, never a traceback


LAYOUTS = {
    "nested": lambda: torch.nested.nested_tensor([torch.zeros(8), torch.zeros(5)]),
    "sparse": lambda: torch.ones(8, 4).to_sparse(),
    "quantized": lambda: torch.quantize_per_tensor(torch.ones(8, 4), 0.1, 0, torch.qint8),
    "meta": lambda: torch.empty(10**6, 10**6, device="meta"),
}


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_non_dense_tensors_are_refused(tmp_path, kind):
    state = _state()
    state["fc1.weight"] = LAYOUTS[kind]()
    p = torch_zip(tmp_path, state=state)
    with pytest.raises(CheckpointError, match=rf"tensor fc1.weight is a {kind} tensor; deadscan reads dense weights"):
        load_checkpoint(p, MLP_SPEC)


def test_cli_nested_tensor_checkpoint_is_refused(tmp_path):
    state = _state()
    state["fc1.weight"] = LAYOUTS["nested"]()
    p = torch_zip(tmp_path, state=state)
    run = run_deadscan(["inspect", str(p), "--arch", MLP_SPEC, "--data", str(npz(tmp_path)),
                        "--out", str(tmp_path / "out")], tmp_path)
    assert_refused(run, contains="tensor fc1.weight is a nested tensor")


# ---------------------------------------------------------------------------------------------
# load_torch_file: one checked torch.load for files that are not checkpoints (train-state.pt)


def test_load_torch_file_round_trips_a_training_state(tmp_path):
    model = _hand_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    state = {"epoch": 3, "history": [{"acc": 0.5}], "model": model.state_dict(), "optimizer": opt.state_dict(),
             "torch_rng": torch.get_rng_state()}
    torch.save(state, tmp_path / "train-state.pt")
    got = load_torch_file(tmp_path / "train-state.pt", "train state")
    assert (got["epoch"], got["history"]) == (3, [{"acc": 0.5}])
    assert_same(got["model"], state["model"])
    assert torch.equal(got["torch_rng"], state["torch_rng"])
    for k, v in state["optimizer"]["state"].items():
        assert torch.equal(got["optimizer"]["state"][k]["momentum_buffer"], v["momentum_buffer"])


def test_load_torch_file_refusals(tmp_path):
    p = tmp_path / "train-state.pt"
    save_file(_state(), str(p))
    with pytest.raises(CheckpointError, match=rf"^{p}: train state is a safetensors file, not a torch.save file$"):
        load_torch_file(p, "train state")
    p.write_bytes(pickle_global(b"os", b"system"))
    with pytest.raises(CheckpointError) as e:
        load_torch_file(p, "train state")
    msg = str(e.value)
    assert msg.startswith(f"{p}: cannot load train state (") and msg.endswith("); damaged, or not written by deadscan")
    assert "\n" not in msg


# ---------------------------------------------------------------------------------------------
# Text from a file reaches the terminal escaped


def test_printable():
    assert printable("a\x1b[31mb\x07\x9b\u202ec\nd") == "a\\x1b[31mb\\x07\\x9b\\u202ec\\x0ad"
    assert printable("plain é ü 日本", 5) == "plain..."


def test_control_characters_in_key_names_and_metadata_are_escaped(tmp_path):
    state = _state()
    state["fc1.weight\x1b[2J"] = state.pop("fc1.weight")
    p = tmp_path / "keys.safetensors"
    save_file(state, str(p))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p, MLP_SPEC)
    assert "missing fc1.weight; unexpected fc1.weight\\x1b[2J;" in str(e.value)
    assert "\x1b" not in str(e.value)

    p = tmp_path / "meta.safetensors"
    save_file(_state(), str(p), metadata={ARCH_KEY: "mlp(\x1b]0;pwned\x07"})
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    assert "\\x1b]0;pwned\\x07" in str(e.value)
    assert not any(ord(c) < 32 for c in str(e.value))


def test_list_globals_escapes_global_names(tmp_path):
    p = tmp_path / "evil.pt"
    p.write_bytes(pickle_global(b"os\x1b[8m", b"system\r"))
    text = list_globals(p).describe()
    assert "  os\\x1b[8m.system\\x0d  " in text
    assert not any(ord(c) < 32 and c != "\n" for c in text)


# ---------------------------------------------------------------------------------------------
# Module names fx cannot write in its generated code


def _named(name: str) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module(name, nn.Linear(4, 8))
    m.add_module("act", nn.ReLU())
    m.add_module("out", nn.Linear(8, 3))
    with torch.no_grad():  # inputs in [0, 1): exactly the first three neurons are dead
        m.get_submodule(name).weight.fill_(0.1)
        m.get_submodule(name).bias.fill_(0.1)
        m.get_submodule(name).bias[:3] = -10.0
    return m.eval()


@pytest.mark.parametrize("name, writable", [("a'b", True), ("a b", True), ('a"b', False), ("a\\b", False),
                                            ("a\nb", False), ("for", False), ("\ufb01", False)])
def test_odd_module_names_scan_like_plain_ones(name, writable):
    odd, plain = _named(name), _named("fc")
    sitemap = find_sites(odd)
    assert [s.name for s in sitemap.sites] == ["act"]
    if writable:
        assert sitemap.opaque == [] and sitemap.sites[0].feeding.layer == name
    else:
        assert [o.module for o in sitemap.opaque] == ["(root)"]
        assert sitemap.opaque[0].reason.startswith(f"fx cannot write the name {printable(repr(name.split('.')[0]))}")
        assert sitemap.sites[0].hooked
    x = torch.rand(64, 4)
    a, b = scan(odd, x, sitemap=sitemap)["act"], scan(plain, x)["act"]
    assert np.array_equal(a.active, b.active) and a.elements == b.elements == 64
    assert int(a.dead.sum()) == 3
