"""Untrusted checkpoints and bad input: a corpus of crafted files that would run code if unpickled
(none may), ``inspect --list-globals`` / ``--allow-global``, guards against sizes a file declares,
a fuzz run, and one clear line (exit 1, nothing written) for each kind of bad input.

Complements tests/test_checkpoint.py (format detection, the basic refusals) and tests/test_cli.py
(the first bad-input cases); the fault tests (kills, Ctrl-C, out of memory, determinism) are in
tests/test_faults.py.
"""

from __future__ import annotations

import builtins
import collections
import io
import json
import operator
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import threading
import time
import warnings
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import deadscan
from deadscan.checkpoint import ARCH_KEY, list_globals, load_checkpoint, scan_pickle
from deadscan.cli import main
from deadscan.errors import CheckpointError, DataError, DeadscanWarning
from deadscan.zoo import SHAPES_KEY, build

from conftest import MLP_SPEC, _hand_mlp

ROOT = pathlib.Path(__file__).resolve().parent.parent



def _one_error_line(res, code: int = 1, stdout: bool = False) -> str:
    """The run failed cleanly: exit ``code``, nothing on stdout, exactly one ``Error:`` line on stderr
    (besides the progress bar, which stderr carries while a scan runs)."""
    assert res.exit_code == code, res.output
    assert isinstance(res.exception, SystemExit), res.exception  # handled, not a traceback
    assert stdout or res.stdout == ""
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("scan:")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------
# The payload corpus: pickles whose unpickling would write a file or call a function

class Payload:
    """Unpickling calls ``func(*args)``; every payload's effect is to create ``marker``."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _actions(marker: pathlib.Path) -> dict:
    """Different ways a pickle runs code, each creating ``marker`` (harmless stand-ins for real attacks)."""
    m = str(marker)
    return {
        "path-touch": Payload(pathlib.Path.touch, (marker,)),  # a method: GLOBAL getattr + pathlib.Path
        "os-system": Payload(os.system, (f"touch '{m}'",)),
        "exec": Payload(builtins.exec, (f"open({m!r}, 'w').close()",)),
        "eval": Payload(builtins.eval, (f"__import__('pathlib').Path({m!r}).touch()",)),
        "open-for-write": Payload(builtins.open, (m, "w")),
        "methodcaller": Payload(operator.methodcaller("touch"), (marker,)),  # a gadget object, not a function
        "subprocess": Payload(subprocess.call, (["touch", m],)),
    }


def _nest(evil, how: str):
    """The payload inside the containers a training script would save."""
    tensors = {"fc1.weight": torch.zeros(2)}
    if how == "top":
        return evil
    if how == "dict-value":
        return {**tensors, "payload": evil}
    if how == "nested":  # a Lightning-style checkpoint with the payload deep in its callbacks
        return {"state_dict": tensors, "callbacks": [1, {"x": (2, [evil])}], "epoch": 3}
    if how == "ordered-dict":
        return collections.OrderedDict([("fc1.weight", torch.zeros(2)), ("x", evil)])
    if how == "dict-key":
        return {"state_dict": tensors, "hparams": {evil: 1}}
    if how == "deep":
        obj = evil
        for _ in range(60):
            obj = [obj]
        return {"state_dict": tensors, "deep": obj}
    if how == "tensor-attribute":  # torch pickles a tensor's __dict__ with it
        t = torch.zeros(2)
        t.note = evil
        return {"fc1.weight": t}
    raise AssertionError(how)


NESTINGS = ["top", "dict-value", "nested", "ordered-dict", "dict-key", "deep", "tensor-attribute"]
ACTIONS = list(_actions(pathlib.Path("x")))
CONTAINERS = ["torch-zip", "torch-legacy", "torch-zip-protocol4", "pickle-2", "pickle-3", "pickle-4", "pickle-5",
              "pickle-0", "pickle-1"]


def _write(container: str, obj, p: pathlib.Path) -> None:
    if container == "torch-zip":
        torch.save(obj, p)
    elif container == "torch-legacy":
        torch.save(obj, p, _use_new_zipfile_serialization=False)
    elif container == "torch-zip-protocol4":
        torch.save(obj, p, pickle_protocol=4)
    else:
        with open(p, "wb") as f:
            pickle.dump(obj, f, protocol=int(container.rsplit("-", 1)[1]))


def _unpickle_for_real(container: str, p: pathlib.Path) -> None:
    """What an unsafe loader would do (the control: the payload is live)."""
    if container.startswith("torch"):
        torch.load(p, weights_only=False)
    else:
        with open(p, "rb") as f:
            pickle.load(f)


# Every (action, nesting, container) combination where pickle can write the object. A dict key must
# be hashable (Payload is); the tensor-attribute nesting only exists for torch.save.
CORPUS = [(a, n, c) for a in ACTIONS for n in NESTINGS for c in CONTAINERS
          if not (n == "tensor-attribute" and not c.startswith("torch"))]


@pytest.mark.parametrize("action, nesting, container", CORPUS)
def test_payload_is_refused_without_running_it(tmp_path, action, nesting, container, monkeypatch):
    marker = tmp_path / "PWNED"
    p = tmp_path / "evil.pt"
    _write(container, _nest(_actions(marker)[action], nesting), p)
    assert not marker.exists()

    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p, MLP_SPEC)
    msg = str(e.value)
    assert not marker.exists(), "the payload ran"
    assert "\n" not in msg and msg.startswith(f"{p}: ")
    if container in ("pickle-0", "pickle-1"):  # not even recognised as a checkpoint (no \x80 protocol header)
        assert "not a checkpoint deadscan can read" in msg
    else:
        assert "needs code to load" in msg and "--trust-pickle (runs code from it)" in msg, msg

    listing = list_globals(p) if container not in ("pickle-0", "pickle-1") else None  # reads names only
    assert not marker.exists()
    if listing is not None:
        assert listing.needs_allowing, listing.describe()

    _unpickle_for_real(container, p)  # control: the same bytes do run code when unpickled
    assert marker.exists()


def test_corpus_size_and_nothing_ran(tmp_path, capsys):
    """All payloads in one go (the number quoted in the closing note): none ran code."""
    tried = ran = 0
    for i, (action, nesting, container) in enumerate(CORPUS):
        marker = tmp_path / f"PWNED-{i}"
        p = tmp_path / f"evil-{i}.pt"
        _write(container, _nest(_actions(marker)[action], nesting), p)
        tried += 1
        try:
            load_checkpoint(p, MLP_SPEC)
        except CheckpointError:
            pass
        list_globals_ok = container in ("pickle-0", "pickle-1") or list_globals(p)
        assert list_globals_ok
        ran += marker.exists()
    with capsys.disabled():
        print(f"\npayload corpus: {tried} pickles tried, {ran} ran code")
    assert tried == len(CORPUS) >= 399  # 7 actions x 7 nestings x 9 containers, less the impossible ones
    assert ran == 0


def test_payload_through_the_cli_is_one_error_line(runner, tmp_path, npz_data):
    marker = tmp_path / "PWNED"
    p = tmp_path / "evil.pt"
    torch.save(_nest(_actions(marker)["os-system"], "nested"), p)
    out = tmp_path / "out"
    line = _one_error_line(runner.invoke(main, ["inspect", str(p), "--data", str(npz_data), "--arch", MLP_SPEC,
                                                "--out", str(out)]))
    assert "--trust-pickle" in line
    assert not marker.exists() and not out.exists()


# Hand-written pickles: names hidden from naive scanners, opcodes torch's unpickler never sees


def _protocol4_system_call(command: str) -> bytes:
    """os.system(command) through STACK_GLOBAL whose module and name come back from the memo (BINGET)."""
    return (b"\x80\x04"
            + b"\x8c\x02os\x94" + b"\x8c\x06system\x94"  # push 'os', memo 0; push 'system', memo 1
            + b"\x8c\x05dummy\x940"                       # noise: push + memoize + POP
            + b"h\x00h\x01\x93"                           # BINGET 0, BINGET 1, STACK_GLOBAL -> os.system
            + b"\x8c" + bytes([len(command)]) + command.encode() + b"\x85R.")  # (command,) REDUCE STOP


def _inst_system_call(command: str) -> bytes:
    """Protocol-0 INST opcode behind a protocol-2 header: ``(S'cmd' ios\\nsystem``."""
    return b"\x80\x02(S'" + command.encode() + b"'\nios\nsystem\n."


def _zip_with_data_pkl(pkl: bytes, p: pathlib.Path) -> None:
    """A torch.save archive whose data.pkl is replaced (CRCs valid)."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        members = [(i, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_STORED) as z:
        for info, data in members:
            z.writestr(info, pkl if info.filename.endswith("data.pkl") else data)


@pytest.mark.parametrize("build_pickle", [_protocol4_system_call, _inst_system_call])
@pytest.mark.parametrize("wrap", ["bare", "zip"])
def test_hand_written_pickles_are_refused_and_listed(tmp_path, build_pickle, wrap):
    marker = tmp_path / "PWNED"
    pkl = build_pickle(f"touch {marker}")
    p = tmp_path / "evil.pt"
    if wrap == "bare":
        p.write_bytes(pkl)
    else:
        _zip_with_data_pkl(pkl, p)
    with pytest.raises(CheckpointError, match="needs code to load"):
        load_checkpoint(p, MLP_SPEC)
    assert not marker.exists()
    listing = list_globals(p)
    assert listing.globals == ["os.system"]
    assert "DANGEROUS" in listing.describe()
    pickle.loads(pkl)  # control: live
    assert marker.exists()


def test_code_archives_are_refused_before_any_loader_runs(tmp_path, monkeypatch, hand_mlp):
    """TorchScript and torch.export archives carry code: torch.jit.load / torch.export.load are never called."""
    script, exported = tmp_path / "scripted.safetensors", tmp_path / "exported.pt"  # names lie; bytes decide
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(hand_mlp).save(str(script))
    torch.export.save(torch.export.export(hand_mlp, (torch.zeros(2, 4),)), str(exported))
    calls = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: calls.append("jit"))
    monkeypatch.setattr(torch.export, "load", lambda *a, **k: calls.append("export"))
    for p, kind in ((script, "TorchScript"), (exported, r"torch.export (.pt2)")):
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(p)
        assert kind in str(e.value) and "pass --trust-pickle to run it" in str(e.value)
        assert list_globals(p).carries_code
    assert calls == []


def test_cifar_batch_with_a_payload_is_refused(tmp_path):
    """CIFAR python batches are pickles: a doctored one is refused by the data loader, unrun."""
    marker = tmp_path / "PWNED"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    good = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batch = dict(good)
        if i == 2:
            batch[b"batch_label"] = _actions(marker)["exec"]
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with pytest.raises(DataError) as e:
        deadscan.load_data("cifar10", "train", root=tmp_path)
    assert "data_batch_3: refused or damaged CIFAR batch" in str(e.value)
    assert not marker.exists()
    with open(folder / "data_batch_3", "rb") as f:  # control
        pickle.load(f)
    assert marker.exists()


def test_npz_with_a_pickled_object_array_is_refused(tmp_path, runner, mlp_file):
    marker = tmp_path / "PWNED"
    data = tmp_path / "evil.npz"
    np.savez(data, x=np.array([_actions(marker)["path-touch"]] * 4, dtype=object), y=np.zeros(4, np.int64))
    line = _one_error_line(runner.invoke(main, ["inspect", str(mlp_file), "--data", str(data),
                                                "--out", str(tmp_path / "out")]))
    assert str(data) in line
    assert not marker.exists()
    np.load(data, allow_pickle=True)["x"]  # control
    assert marker.exists()


# ---------------------------------------------------------------------------------------------
# inspect --list-globals, --allow-global


def test_list_globals_reads_names_without_importing(tmp_path, runner):
    """A pickle naming a module that does not exist: listed, never imported."""
    name = "deadscan_test_never_imported"
    pkl = b"\x80\x02c" + name.encode() + b"\nThing\n)R."
    p = tmp_path / "odd.pt"
    p.write_bytes(pkl)
    res = runner.invoke(main, ["inspect", "--list-globals", str(p)])
    assert res.exit_code == 0, res.output
    assert f"{name}.Thing" in res.stdout and "not allowed: needs --allow-global" in res.stdout
    assert "nothing was imported or run" in res.stdout
    assert name not in sys.modules


def test_list_globals_of_a_whole_module_then_allow_them(tmp_path, runner, hand_mlp, npz_data):
    p = tmp_path / "whole.pt"
    torch.save(hand_mlp, p)
    res = runner.invoke(main, ["inspect", "--list-globals", str(p)])
    assert res.exit_code == 0, res.output
    needed = ["torch.nn.modules.container.Sequential", "torch.nn.modules.flatten.Flatten",
              "torch.nn.modules.linear.Linear", "torch.nn.modules.activation.ReLU"]
    assert list_globals(p).needs_allowing == needed
    hint = res.stdout.splitlines()[-1]
    assert hint.startswith("to load it without --trust-pickle: " + " ".join(f"--allow-global {g}" for g in needed))
    assert "collections.OrderedDict" in res.stdout and "allowed by torch.load(weights_only=True)" in res.stdout

    out = tmp_path / "out"
    refused = runner.invoke(main, ["inspect", str(p), "--data", str(npz_data), "--out", str(out),
                                   "--allow-global", needed[0]])
    assert "needs code to load (global torch.nn.modules.flatten.Flatten)" in _one_error_line(refused)
    args = [a for g in needed for a in ("--allow-global", g)]
    res = runner.invoke(main, ["inspect", str(p), "--data", str(npz_data), "--out", str(out), "--json", *args])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert (s["checkpoint"]["format"], s["checkpoint"]["arch"], s["totals"]["dead"]) == ("torch-zip", None, 5)


def test_allow_global_does_not_help_a_dangerous_payload_unless_named(tmp_path):
    marker = tmp_path / "PWNED"
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": _actions(marker)["path-touch"]}, p)
    with pytest.raises(CheckpointError):
        load_checkpoint(p, allow_globals=["torch.nn.modules.linear.Linear"])
    assert not marker.exists()
    assert list_globals(p).needs_allowing == ["builtins.getattr", "pathlib.Path", "pathlib.PosixPath"]


@pytest.mark.parametrize("name, expected", [
    ("nosuchmodule_xyz.Thing", "--allow-global nosuchmodule_xyz.Thing: no such class or function can be imported"),
    ("torch.nn.NoSuchLayer", "--allow-global torch.nn.NoSuchLayer: no such class or function"),
    ("Linear", "--allow-global Linear: expected a dotted name"),
])
def test_allow_global_bad_names(tmp_path, runner, npz_data, hand_mlp, name, expected):
    p = tmp_path / "whole.pt"
    torch.save(hand_mlp, p)
    line = _one_error_line(runner.invoke(main, ["inspect", str(p), "--data", str(npz_data),
                                                "--out", str(tmp_path / "o"), "--allow-global", name]))
    assert expected in line


def test_list_globals_of_safetensors_and_missing_file(runner, tmp_path, mlp_file):
    res = runner.invoke(main, ["inspect", "--list-globals", str(mlp_file)])
    assert res.exit_code == 0 and "no pickle, nothing to import" in res.stdout
    missing = tmp_path / "nope.pt"
    assert _one_error_line(runner.invoke(main, ["inspect", "--list-globals", str(missing)])) == \
        f"Error: {missing}: no such file"


def test_scan_pickle_follows_memo_and_persistent_ids():
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(3), "b": torch.ones(2, dtype=torch.float64)}, buf,
               _use_new_zipfile_serialization=False)
    buf.seek(0)
    scan = scan_pickle(buf, max_pickles=5)
    assert scan.error is None and scan.pickles == 5
    storages = sorted((pid[1], pid[4]) for pid in scan.persistent_ids)
    assert storages == [("torch.DoubleStorage", 2), ("torch.FloatStorage", 3)]
    assert sorted(scan.globals) == ["collections.OrderedDict", "torch.DoubleStorage", "torch.FloatStorage",
                                    "torch._utils._rebuild_tensor_v2"]


# ---------------------------------------------------------------------------------------------
# Sizes a file declares are checked before anything is allocated


def _fast_and_small(fn):
    """Run fn; it must finish quickly without a large allocation touching memory."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    fn()
    assert time.perf_counter() - t0 < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 512 * 1024  # KiB


def _st_with_header(header, body: bytes, length: int | None = None) -> bytes:
    hb = json.dumps(header).encode()
    return struct.pack("<Q", len(hb) if length is None else length) + hb + body


@pytest.fixture
def st_parts(tmp_path, hand_mlp):
    p = tmp_path / "m.safetensors"
    deadscan.save_safetensors(hand_mlp, p, MLP_SPEC)
    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


@pytest.mark.parametrize("case", ["length-2**63", "length-past-end", "shape-huge", "shape-overflow",
                                  "offsets-past-end"])
def test_safetensors_header_claims_are_refused(tmp_path, st_parts, case):
    header, body = st_parts
    length = None
    if case == "length-2**63":
        length = 2**63
    elif case == "length-past-end":
        length = len(json.dumps(header)) + len(body) + 1
    elif case == "shape-huge":
        header["fc1.weight"]["shape"] = [2**20, 2**20]
        header["fc1.weight"]["data_offsets"] = [0, 4 * 2**40]
    elif case == "shape-overflow":
        header["fc1.weight"]["shape"] = [2**62, 2**62]
    else:
        header["fc1.weight"]["data_offsets"][1] = len(body) + 10**12
    p = tmp_path / "crafted.safetensors"
    p.write_bytes(_st_with_header(header, body, length))

    def load():
        with pytest.raises(CheckpointError, match=r"crafted\.safetensors: (damaged safetensors file|not a checkpoint)"):
            load_checkpoint(p)
    _fast_and_small(load)


@pytest.mark.parametrize("arch, expected", [
    ("mlp(depth=2, width=1000000000, in_features=4, classes=3)", "metadata names architecture mlp(depth=2, "
                                                                "width=1000000000"),
    ("mlp(depth=100000000, width=8, in_features=4, classes=3)", "more than"),
    ("mlp(depth=2, width=-5, in_features=4, classes=3)", "cannot build its metadata names architecture"),
    ("mlp(x=" + "(" * 3000 + ")" * 3000 + ")", "metadata"),
])
def test_architecture_named_by_a_file_cannot_ask_for_more_than_the_file_holds(tmp_path, hand_mlp, arch, expected):
    p = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in hand_mlp.state_dict().items()}, str(p), metadata={ARCH_KEY: arch})

    def load():
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(p)
        assert expected in str(e.value) and "\n" not in str(e.value)
    _fast_and_small(load)


@pytest.mark.parametrize("shapes", ['{"fc1": {"out": 1000000000}}', '{"fc1": {"out": -1}}', '[1]', "[" * 50000])
def test_compacted_shapes_from_a_file_are_checked(tmp_path, hand_mlp, shapes):
    """Resized widths come from the file even when the user gives --arch."""
    p = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in hand_mlp.state_dict().items()}, str(p), metadata={SHAPES_KEY: shapes})

    def load():
        with pytest.raises(CheckpointError, match=SHAPES_KEY):
            load_checkpoint(p, MLP_SPEC)
    _fast_and_small(load)


def test_legacy_storage_sizes_are_checked_before_torch_allocates(tmp_path, hand_mlp, monkeypatch):
    buf = io.BytesIO()
    torch.save(hand_mlp.state_dict(), buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    i = data.index(b"cpu")
    j = data.index(b"K\x20", i)  # fc1.weight's storage: 32 elements (BININT1 32) after its location
    p = tmp_path / "legacy.pt"
    p.write_bytes(data[:j] + b"\x8a\x08" + struct.pack("<q", 2**40) + data[j + 2:])
    allocations = []
    real = torch.UntypedStorage
    monkeypatch.setattr(torch, "UntypedStorage", lambda *a, **k: allocations.append(a) or real(*a, **k))
    with pytest.raises(CheckpointError, match=r"damaged torch\.save file \(its storages declare \d+ elements but "
                                              r"the file holds \d+ bytes\); nothing was allocated"):
        load_checkpoint(p, MLP_SPEC)
    assert allocations == []


def test_zip_member_declaring_more_than_the_file_is_refused(tmp_path, hand_mlp):
    p = tmp_path / "m.pt"
    torch.save(hand_mlp.state_dict(), p)
    data = bytearray(p.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    (cd_offset,) = struct.unpack("<I", data[end + 16:end + 20])
    pos = cd_offset
    while data[pos:pos + 4] == b"PK\x01\x02":  # central directory: grow every data/ record's declared size
        nlen, xlen, clen = struct.unpack("<HHH", data[pos + 28:pos + 34])
        if b"/data/" in data[pos + 46:pos + 46 + nlen]:
            data[pos + 20:pos + 28] = struct.pack("<II", 0xFFFFFF00, 0xFFFFFF00)
        pos += 46 + nlen + xlen + clen
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"damaged zip archive \(member .*/data/\d+ declares 4294967040 bytes"):
        load_checkpoint(p, MLP_SPEC)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    result = {}

    def load():
        try:
            load_checkpoint(fifo)
        except CheckpointError as e:
            result["msg"] = str(e)
    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "blocked reading a FIFO"
    assert result["msg"] == f"{fifo}: not a regular file (a pipe, socket or device); give a checkpoint file"


def test_fuzzed_files_load_or_fail_with_one_checkpoint_error(tmp_path):
    """A seeded mutation run (truncate, flip, splice, huge ints, crafted headers and pickles) in a child
    process, so that a crash could not take pytest down with it; benchmarks/fuzz_checkpoints.py runs
    thousands of cases the same way."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fuzz_checkpoints.py"), "--cases", "600",
                           "--seed", "1", "--json", "--case-timeout", "20"], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["failures"] == []
    assert result["cases"] == 600
    outcomes = result["outcomes"]
    assert all(k.startswith(("loaded", "CheckpointError")) for k in outcomes), outcomes
    assert sum(v for k, v in outcomes.items() if k.startswith("loaded")) > 0
    assert sum(v for k, v in outcomes.items() if k.startswith("CheckpointError")) > 300
    for kind in ("safetensors-header", "zip-structure", "legacy-sizes", "splice", "truncate", "flip"):
        assert any(m.startswith(kind) for m in result["mutations"]), kind


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line each


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_unreadable_checkpoint(runner, tmp_path, npz_data, mlp_file, monkeypatch):
    real_open = builtins.open

    def deny(file, *a, **k):
        if str(file) == str(mlp_file):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **k)
    monkeypatch.setattr(builtins, "open", deny)  # root reads anything, whatever chmod says
    line = _one_error_line(runner.invoke(main, ["inspect", str(mlp_file), "--data", str(npz_data),
                                                "--out", str(tmp_path / "out")]))
    assert line == f"Error: {mlp_file}: cannot read (Permission denied)"


@pytest.mark.parametrize("case", ["empty", "text", "png", "truncated-zip", "truncated-safetensors", "missing-keys",
                                  "unexpected-keys", "negative-labels", "empty-split", "channels", "bad-device"])
def test_bad_input_is_one_line(runner, tmp_path, hand_mlp, mlp_file, npz_data, case):
    ckpt, data, extra = mlp_file, npz_data, []
    p = tmp_path / "model.pt"
    if case == "empty":
        p.write_bytes(b"")
        ckpt, expect = p, f"{p}: file is empty"
    elif case == "text":
        p.write_text("hello, I am not a model\n")
        ckpt, expect = p, f"{p}: not a checkpoint deadscan can read"
    elif case == "png":
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
        ckpt, expect = p, f"{p}: not a checkpoint deadscan can read (first bytes 89504e470d0a1a0a)"
    elif case == "truncated-zip":
        torch.save(hand_mlp.state_dict(), p)
        p.write_bytes(p.read_bytes()[:300])
        ckpt, extra, expect = p, ["--arch", MLP_SPEC], f"{p}: damaged zip archive"
    elif case == "truncated-safetensors":
        p.write_bytes(mlp_file.read_bytes()[:-7])
        ckpt, expect = p, f"{p}: damaged safetensors file"
    elif case == "missing-keys":
        torch.save(hand_mlp.state_dict(), p)
        ckpt, extra = p, ["--arch", "mlp(depth=3, width=8, in_features=4, classes=3)"]
        expect = (f"{p}: does not fit the architecture: missing fc3.weight, fc3.bias; the file holds an mlp with "
                  'depth=2 (not 3): pass --arch "mlp(depth=2, width=8, in_features=4, classes=3)"')
    elif case == "unexpected-keys":
        torch.save(hand_mlp.state_dict(), p)
        ckpt, extra = p, ["--arch", "mlp(depth=1, width=8, in_features=4, classes=3)"]
        expect = (f"{p}: does not fit the architecture: unexpected fc2.weight, fc2.bias; the file holds an mlp "
                  'with depth=2 (not 1): pass --arch "mlp(depth=2, width=8, in_features=4, classes=3)"')
    elif case == "negative-labels":
        data = _npz(tmp_path / "neg.npz", x=np.zeros((30, 4), np.float32), y=np.full(30, -1, np.int64))
        expect = "labels must be 0 or more, found -1"
    elif case == "empty-split":
        data = _npz(tmp_path / "tiny.npz", x=np.zeros((3, 4), np.float32), y=np.zeros(3, np.int64))
        expect = f"--data {data} split 'val' is empty"
    elif case == "channels":
        torch.manual_seed(0)
        ckpt = tmp_path / "cnn.pt"
        torch.save(small_cnn().state_dict(), ckpt)
        extra = ["--arch", "test_safety:small_cnn"]
        data = _npz(tmp_path / "grey.npz", x=np.zeros((40, 1, 8, 8), np.uint8), y=np.zeros(40, np.int64))
        expect = "the model's first layer conv takes 3 input channels, the data has 1"
    else:
        extra, expect = ["--device", "tpu:7"], "unknown --device 'tpu:7'"
    out = tmp_path / "out"
    line = _one_error_line(runner.invoke(main, ["inspect", str(ckpt), "--data", str(data), "--out", str(out), *extra]))
    assert expect in line, line
    assert not out.exists()


def test_nonfinite_weights_warn_and_are_recorded(runner, tmp_path, npz_data):
    m = _hand_mlp()
    with torch.no_grad():
        m.fc2.weight[5, 1] = float("nan")
        m.head.bias[0] = float("inf")
    p = tmp_path / "nan.safetensors"
    deadscan.save_safetensors(m, p, MLP_SPEC)

    with pytest.warns(DeadscanWarning, match=r"NaN or Inf weights in 2 layer\(s\): fc2, head"):
        ck = load_checkpoint(p)
    assert ck.info.nonfinite == ("fc2", "head")

    out = tmp_path / "out"
    res = runner.invoke(main, ["inspect", str(p), "--data", str(npz_data), "--out", str(out)])
    assert res.exit_code == 0, res.output
    warns = [ln for ln in res.stderr.splitlines() if ln.startswith("Warning:")]
    assert warns == [f"Warning: {p}: NaN or Inf weights in 2 layer(s): fc2, head; their neurons output NaN, which "
                     "counts as dead, so the figures for those layers are not meaningful"]
    assert json.loads((out / "summary.json").read_text())["checkpoint"]["nonfinite"] == ["fc2", "head"]


def test_finite_checkpoint_records_an_empty_list(runner, tmp_path, mlp_file, npz_data):
    out = tmp_path / "out"
    res = runner.invoke(main, ["inspect", str(mlp_file), "--data", str(npz_data), "--out", str(out)])
    assert res.exit_code == 0 and "Warning" not in res.stderr
    assert json.loads((out / "summary.json").read_text())["checkpoint"]["nonfinite"] == []


# Models the CLI builds from these factories (--arch test_safety:NAME): tests/ is on sys.path.

class _Boom(nn.Module):
    def forward(self, x):
        if x.shape[0] > 2:  # passes deadscan's two-sample fit check, fails in the scan
            raise ValueError("this layer refuses batches of more than 2")
        return x


def raising_mlp() -> nn.Module:
    m = build(MLP_SPEC)
    return nn.Sequential(collections.OrderedDict(body=nn.Sequential(collections.OrderedDict(
        fc1=m.fc1, relu1=m.relu1, boom=_Boom())), head=nn.Linear(8, 3)))


class _ReluFirst(nn.Module):
    """ReLU on the raw input, then a Linear: one site, nothing feeds it, nothing to strip."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(x))


def relu_first() -> nn.Module:
    return _ReluFirst()


def small_cnn() -> nn.Module:
    return nn.Sequential(collections.OrderedDict(conv=nn.Conv2d(3, 4, 3), relu=nn.ReLU(), flat=nn.Flatten(),
                                                 head=nn.Linear(4 * 6 * 6, 3)))


def test_model_raising_in_forward_names_the_module(runner, tmp_path, npz_data):
    torch.manual_seed(0)
    p = tmp_path / "sd.pt"
    torch.save(raising_mlp().state_dict(), p)
    line = _one_error_line(runner.invoke(main, ["inspect", str(p), "--arch", "test_safety:raising_mlp",
                                                "--data", str(npz_data), "--out", str(tmp_path / "out")]))
    assert line.startswith("Error: the model raised during the scan in module body.boom (_Boom): ValueError: "
                           "this layer refuses batches of more than 2 (at "), line
    assert "test_safety.py" in line


def test_op_failing_inside_a_traced_module_names_it():
    """An op inlined into the traced graph (no frame of its own) is traced back to its module."""
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.w = nn.Linear(4, 8), nn.Parameter(torch.ones(5, 3))

        def forward(self, x):
            return torch.relu(self.fc(x)) @ self.w  # 8 vs 5: fails on real tensors only

    model = nn.Sequential(collections.OrderedDict(pre=nn.Linear(4, 4), act=nn.ReLU(), inner=Inner()))
    with pytest.raises(deadscan.TraceError) as e:
        deadscan.scan(model, torch.rand(6, 4))
    assert str(e.value).startswith("the model raised during the scan in module inner (Inner): RuntimeError: "
                                   "mat1 and mat2 shapes cannot be multiplied")


def test_no_relu_sites_inspect_exits_0_and_strip_says_nothing_to_strip(runner, tmp_path, gelu_case):
    p, d = gelu_case
    out = tmp_path / "out"
    line = _one_error_line(runner.invoke(main, ["strip", str(p), "--data", str(d), "--finetune", "1",
                                                "--out", str(out)]))
    assert line == (f"Error: {p}: nothing to strip: the model has no ReLU sites, so no neuron can die the ReLU way "
                    "(deadscan inspect reports it)")
    assert not out.exists()


def test_nothing_strippable_says_why(runner, tmp_path, npz_data):
    torch.manual_seed(0)
    p = tmp_path / "sd.pt"
    torch.save(relu_first().state_dict(), p)
    out = tmp_path / "out"
    line = _one_error_line(runner.invoke(main, ["strip", str(p), "--arch", "test_safety:relu_first",
                                                "--data", str(npz_data), "--finetune", "1", "--out", str(out)]))
    assert line == (f"Error: {p}: nothing to strip: none of its 1 ReLU sites is fed by a Linear or Conv through "
                    "per-feature ops only (reads the model input); deadscan inspect still scans and reports them")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Outputs: never over an earlier run unless asked, never over an input, a clear line when unwritable


def _inspect(runner, ckpt, data, out, *extra):
    return runner.invoke(main, ["inspect", str(ckpt), "--data", str(data), "--out", str(out), *map(str, extra)])


def test_existing_outputs_are_refused_unless_overwrite(runner, tmp_path, mlp_file, npz_data):
    out = tmp_path / "out"
    assert _inspect(runner, mlp_file, npz_data, out).exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    line = _one_error_line(_inspect(runner, mlp_file, npz_data, out))
    assert line == (f"Error: --out {out} already holds summary.json, stats.h5, report.html from an earlier run; "
                    "pass --overwrite to replace them, or choose another --out")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # untouched
    assert _inspect(runner, mlp_file, npz_data, out, "--overwrite").exit_code == 0


def test_out_that_is_a_file_or_under_a_file(runner, tmp_path, mlp_file, npz_data):
    f = tmp_path / "afile"
    f.write_text("x")
    assert _one_error_line(_inspect(runner, mlp_file, npz_data, f)) == \
        f"Error: --out {f} is a file, not a folder; choose another --out"
    assert _one_error_line(_inspect(runner, mlp_file, npz_data, f / "sub")) == \
        f"Error: --out {f / 'sub'} cannot be created: {f} is a file, not a folder; choose another --out"
    assert f.read_text() == "x"


def test_out_not_writable(runner, tmp_path, mlp_file, npz_data, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if pathlib.Path(p) == ro else real(p, mode, **k))
    assert _one_error_line(_inspect(runner, mlp_file, npz_data, ro / "out")) == \
        f"Error: --out {ro / 'out'}: {ro} is not writable; choose another --out"


def test_outputs_never_replace_the_input(runner, tmp_path, npz_data, hand_mlp):
    out = tmp_path / "out"
    out.mkdir()
    ckpt = out / "stripped.safetensors"  # the input sits where strip would write its output
    deadscan.save_safetensors(hand_mlp, ckpt, MLP_SPEC)
    before = ckpt.read_bytes()
    for extra in ([], ["--overwrite"]):
        line = _one_error_line(runner.invoke(main, ["strip", str(ckpt), "--data", str(npz_data), "--finetune", "0",
                                                    "--out", str(out), *extra]))
        assert line == f"Error: --out {out} would overwrite the input {ckpt} (as stripped.safetensors); choose another --out"
    data_in_out = out / "summary.json"  # an input named like an inspect output
    data_in_out.write_bytes(npz_data.read_bytes())
    line = _one_error_line(_inspect(runner, ckpt, data_in_out, out, "--overwrite"))
    assert "would overwrite the input" in line
    assert ckpt.read_bytes() == before


def test_strip_reuses_its_own_inspect_folder_but_not_an_earlier_strip(runner, tmp_path, mlp_file, npz_data):
    out = tmp_path / "run"
    assert _inspect(runner, mlp_file, npz_data, out).exit_code == 0
    strip = ["strip", "--from", str(out), "--out", str(out), "--finetune", "0"]
    res = runner.invoke(main, strip)  # the documented flow: strip into the inspect's own folder
    assert res.exit_code == 0, res.output
    assert "history" in json.loads((out / "summary.json").read_text())
    line = _one_error_line(runner.invoke(main, strip))  # the strip's own outputs are not thrown away
    assert "already holds summary.json, stats.h5, report.html, stripped.safetensors, masks.safetensors" in line
    assert runner.invoke(main, [*strip, "--overwrite"]).exit_code == 0


def test_strip_refuses_a_state_file_without_resume(runner, tmp_path, mlp_file, npz_data):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-state.pt").write_bytes(b"x")
    line = _one_error_line(runner.invoke(main, ["strip", str(mlp_file), "--data", str(npz_data), "--out", str(out)]))
    assert line == (f"Error: --out {out} holds train-state.pt from an earlier strip run; pass --resume to continue "
                    "it, --overwrite to start over, or choose another --out")


SAMPLE = deadscan.data.resource_path("sample_models", "mlp_digits.safetensors")


@pytest.mark.skipif(not SAMPLE.exists(), reason="sample model not generated")
def test_demo_may_redo_its_own_folder_only(runner, tmp_path, mlp_file, npz_data):
    out = tmp_path / "demo"
    for _ in range(2):
        res = runner.invoke(main, ["demo", "--out", str(out), "--device", "cpu"])
        assert res.exit_code == 0, res.output
    other = tmp_path / "inspected"
    assert _inspect(runner, mlp_file, npz_data, other).exit_code == 0
    line = _one_error_line(runner.invoke(main, ["demo", "--out", str(other), "--device", "cpu"]), stdout=True)
    assert "already holds summary.json" in line
