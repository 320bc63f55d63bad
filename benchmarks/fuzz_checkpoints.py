"""Fuzz the checkpoint loader: damaged and crafted files must load or fail with one CheckpointError.

    python benchmarks/fuzz_checkpoints.py                  # 5000 cases, seed 0
    python benchmarks/fuzz_checkpoints.py --cases 300 --seed 1 --json   # what tests/test_safety.py runs

Seeds are valid files of a small MLP: safetensors (with and without deadscan's metadata, and a
compacted one), torch.save zips (a state dict, a Lightning-style nested dict), a legacy torch.save
file. Each case applies one seeded mutation to one seed, writes it, and calls
``deadscan.checkpoint.load_checkpoint`` on it:

- byte level: truncate, flip bytes, insert or duplicate a chunk, splice two files, write a huge
  64/32-bit integer at a random offset;
- structure aware: a safetensors header with huge shapes, wrong dtypes, offsets past the end, a
  length field claiming gigabytes, deep nesting, an architecture in the metadata asking for
  ``width=10**9`` or ``depth=10**8``; a torch.save zip whose data.pkl is mutated (ints made huge,
  bytes flipped) and re-zipped with valid CRCs, or whose records are cut or grown; legacy pickles
  with huge storage sizes.

Every outcome must be a loaded model or a ``CheckpointError``: any other exception, a case slower
than ``--case-timeout`` seconds, or peak memory growing more than ``--max-rss-mb`` fails the run
(exit 1). Prints counts per outcome (CheckpointErrors grouped by their reason) and the time.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import re
import resource
import signal
import struct
import sys
import tempfile
import time
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import torch

from deadscan.checkpoint import ARCH_KEY, load_checkpoint
from deadscan.errors import CheckpointError
from deadscan.zoo import SHAPES_KEY, build

SPEC = "mlp(depth=2, width=8, in_features=4, classes=3)"
HUGE = (2**31 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**64 - 1)


# ---------------------------------------------------------------------------------------------
# Seeds


def _safetensors_bytes(state: dict, metadata: dict | None) -> bytes:
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in state.items()}, metadata=metadata)
    header, body = _st_header(data)  # metadata order is a hash map's: sort it, so a seed gives the same cases
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return _st_pack(text + b" " * (-len(text) % 8), body)


def _torch_bytes(obj, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    if legacy:  # storage keys are object ids (memory addresses): number them instead
        from deadscan.checkpoint import scan_pickle

        data = buf.getvalue()
        keys = list(dict.fromkeys(str(pid[2]) for pid in scan_pickle(io.BytesIO(data), max_pickles=4).persistent_ids))
        for i, key in enumerate(keys):
            new = f"{i:016d}".encode()  # a fixed width: the bytes no longer depend on where objects lived
            data = data.replace(b"X" + struct.pack("<I", len(key)) + key.encode(),
                                b"X" + struct.pack("<I", len(new)) + new)
        return data
    # torch.save writes a random serialization id: fix it, so that a seed gives the same cases every run
    members = [(i, b"0" * len(b) if i.filename.endswith("serialization_id") else b)
               for i, b in _zip_members(buf.getvalue())]
    return _rezip(members)


def _one_storage(state: dict) -> dict:
    """The same tensors as views of one storage: legacy torch.save orders storages by memory address, so
    with one storage the file no longer depends on where the tensors happened to live."""
    flat = torch.cat([v.flatten() for v in state.values()])
    views, start = {}, 0
    for k, v in state.items():
        views[k] = flat[start:start + v.numel()].view(v.shape)
        start += v.numel()
    return views


def make_seeds() -> dict[str, tuple[bytes, str | None]]:
    """name -> (bytes, the --arch to load it with)."""
    torch.manual_seed(0)
    state = build(SPEC).state_dict()
    narrow = {k: v for k, v in state.items()}
    narrow["fc1.weight"], narrow["fc1.bias"] = state["fc1.weight"][:6], state["fc1.bias"][:6]
    narrow["fc2.weight"] = state["fc2.weight"][:, :6]
    return {
        "safetensors-meta": (_safetensors_bytes(state, {ARCH_KEY: SPEC}), None),
        "safetensors-plain": (_safetensors_bytes(state, None), SPEC),
        "safetensors-compact": (_safetensors_bytes(narrow, {ARCH_KEY: SPEC, SHAPES_KEY: json.dumps(
            {"fc1": {"out": 6}, "fc2": {"in": 6}})}), None),
        "torch-zip": (_torch_bytes(state), SPEC),
        "torch-zip-nested": (_torch_bytes({"state_dict": {"model." + k: v for k, v in state.items()}, "epoch": 3,
                                           "optimizer": {"param_groups": [{"lr": 0.1}]}}), SPEC),
        "torch-legacy": (_torch_bytes(_one_storage(state), legacy=True), SPEC),
    }


# ---------------------------------------------------------------------------------------------
# Mutations


def _flip(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if b:
            b[rng.randrange(len(b))] ^= rng.randint(1, 255)
    return bytes(b)


def _truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))]


def _insert(data: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(data) + 1)
    return data[:i] + rng.randbytes(rng.randint(1, 64)) + data[i:]


def _duplicate(data: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(data))
    j = min(len(data), i + rng.randint(1, 256))
    return data[:j] + data[i:j] * rng.randint(1, 4) + data[j:]


def _huge_int(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    i = rng.randrange(max(len(b) - 8, 1))
    value = rng.choice(HUGE)
    if rng.random() < 0.5:
        b[i:i + 8] = struct.pack("<Q", value % 2**64)
    else:
        b[i:i + 4] = struct.pack("<I", value % 2**32)
    return bytes(b)


def _splice(data: bytes, other: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data) + 1)] + other[rng.randrange(len(other)):]


def _st_header(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _st_pack(header, body: bytes, length: int | None = None) -> bytes:
    hb = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(hb) if length is None else length) + hb + body


def _safetensors_structured(data: bytes, rng: random.Random) -> bytes:
    header, body = _st_header(data)
    tensors = [k for k in header if k != "__metadata__"]
    name = rng.choice(tensors)
    kind = rng.randrange(9)
    if kind == 0:  # a shape that needs more bytes than exist (or overflows)
        header[name]["shape"] = [rng.choice(HUGE) for _ in header[name]["shape"]] or [rng.choice(HUGE)]
    elif kind == 1:  # shape and offsets agreeing on gigabytes the file does not hold
        header[name]["shape"] = [2**20, 2**10]
        header[name]["data_offsets"] = [0, 2**32]
    elif kind == 2:
        header[name]["dtype"] = rng.choice(["F64", "I8", "BOOL", "F4", "X99", "", 7])
    elif kind == 3:
        header[name]["data_offsets"] = [rng.choice([-1, 0, 2**63]), rng.choice([0, 2**64 - 1, len(body) + 1])]
    elif kind == 4:  # the length field claims far more than the file (up to 2**64 - 1)
        return _st_pack(header, body, length=rng.choice(HUGE))
    elif kind == 5:  # deeply nested JSON
        depth = rng.choice([100, 10_000, 100_000])
        header["__metadata__"] = {ARCH_KEY: SPEC}
        raw = json.dumps(header)[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}"
        return _st_pack(raw.encode(), body)
    elif kind == 6:  # the architecture in the metadata asks for far more than the file holds
        meta = header.setdefault("__metadata__", {})
        meta[ARCH_KEY] = rng.choice([
            "mlp(depth=2, width=1000000000, in_features=4, classes=3)",
            "mlp(depth=100000000, width=8, in_features=4, classes=3)",
            "mlp(depth=2, width=-5, in_features=4, classes=3)",
            "mlp(depth=2, width=8, in_features=4, classes=3" + ", x=" + "(" * 5000 + ")" * 5000 + ")",
            "vit-relu(img_size=100000, patch_size=1)",
            "torchvision:resnet18(weights='DEFAULT')",
            "os:system(command='touch PWNED')",
            "mlp(" + "depth=2, " * 20000 + ")",
        ])
    elif kind == 7:  # compacted-model shapes that are not what they should be
        meta = header.setdefault("__metadata__", {ARCH_KEY: SPEC})
        meta[SHAPES_KEY] = rng.choice(['{"fc1": {"out": 1000000000}}', '[1, 2]', '{"fc1": 5}', '{"nope": {"in": 2}}',
                                       '{"fc1": {"out": -3}}', "[" * 100000, '{"fc1": {"out": "6"}}'])
    else:  # metadata that is not str -> str
        header["__metadata__"] = rng.choice([{"a": 1}, [1], "x", {ARCH_KEY: None}])
    return _st_pack(header, body)


def _zip_members(data: bytes) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i, z.read(i)) for i in z.infolist()]


def _rezip(members: list[tuple[zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for info, b in members:
            z.writestr(info, b)
    return buf.getvalue()


def _zip_structured(data: bytes, rng: random.Random) -> bytes:
    members = _zip_members(data)
    kind = rng.randrange(5)
    if kind <= 2:  # mutate data.pkl and re-zip (valid CRCs: the unpickler sees the mutation)
        i = next(n for n, (info, _) in enumerate(members) if info.filename.endswith("data.pkl"))
        info, pkl = members[i]
        if kind == 0:  # every small int (BININT1) in turn may become huge (numel, sizes, strides, offsets)
            spots = [m.start() for m in re.finditer(rb"K", pkl)]
            b = bytearray(pkl)
            if spots:
                j = rng.choice(spots)
                b[j:j + 2] = b"J" + struct.pack("<i", rng.choice([2**31 - 1, -1, 2**30])) if rng.random() < 0.5 \
                    else b"\x8a\x08" + struct.pack("<q", rng.choice([2**62, 2**40, -2**40]))
            pkl = bytes(b)
        elif kind == 1:
            pkl = _flip(pkl, rng)
        else:
            pkl = _truncate(pkl, rng) if rng.random() < 0.5 else _duplicate(pkl, rng)
        members[i] = (info, pkl)
    elif kind == 3:  # cut or grow a tensor record
        i = next((n for n, (info, _) in enumerate(members) if "/data/" in info.filename), 0)
        info, rec = members[i]
        members[i] = (info, rec[: rng.randrange(len(rec) + 1)] if rng.random() < 0.5 else rec + rec)
    else:  # drop a member
        del members[rng.randrange(len(members))]
    return _rezip(members)


def _legacy_structured(data: bytes, rng: random.Random) -> bytes:
    """Make one storage size / tensor size int in the legacy pickle huge."""
    spots = [m.start() for m in re.finditer(rb"K", data[:4096])]
    if not spots:
        return _flip(data, rng)
    b = bytearray(data)
    j = rng.choice(spots)
    b[j:j + 2] = b"\x8a\x08" + struct.pack("<q", rng.choice([2**33, 2**40, 2**62, -5]))
    return bytes(b)


BYTE_MUTATIONS = {"truncate": _truncate, "flip": _flip, "insert": _insert, "duplicate": _duplicate,
                  "huge-int": _huge_int}


def mutate(name: str, data: bytes, seeds: dict, rng: random.Random) -> tuple[str, bytes]:
    """One seeded mutation of seed ``name``: (mutation name, bytes)."""
    r = rng.random()
    if r < 0.35:  # structure aware
        if name.startswith("safetensors"):
            return "safetensors-header", _safetensors_structured(data, rng)
        if name.startswith("torch-zip"):
            return "zip-structure", _zip_structured(data, rng)
        return "legacy-sizes", _legacy_structured(data, rng)
    if r < 0.45:
        other = seeds[rng.choice(sorted(seeds))][0]
        return "splice", _splice(data, other, rng)
    kind = rng.choice(sorted(BYTE_MUTATIONS))
    return kind, BYTE_MUTATIONS[kind](data, rng)


# ---------------------------------------------------------------------------------------------
# Running


class _Timeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Timeout


def _reason(message: str) -> str:
    """A CheckpointError grouped by what it says (the part after 'path: ')."""
    text = message.split(": ", 1)[-1]
    for key in ("damaged safetensors file", "damaged zip archive", "damaged torch.save file", "not a checkpoint",
                "file is empty", "needs code to load", "cannot load torch.save file", "holds only weights",
                "does not fit the architecture", "tensor shapes do not fit", "user code", "would download weights",
                "unknown --arch", "metadata", "holds a", "cannot build", "a zip archive but not", "cannot copy",
                "TorchScript", "torch.export"):
        if key in text:
            return {"user code": "metadata names user code", "would download weights": "metadata asks to download",
                    "unknown --arch": "metadata names an unknown arch", "metadata": "bad metadata"}.get(key, key)
    return text[:40]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(cases: int, seed: int, case_timeout: float, max_rss_mb: float, workdir: Path) -> dict:
    seeds = make_seeds()
    names = sorted(seeds)
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    by_mutation: Counter = Counter()
    failures: list[str] = []
    slowest = (0.0, "")
    path = workdir / "case.bin"
    for name in names:  # the seeds themselves load
        path.write_bytes(seeds[name][0])
        load_checkpoint(path, seeds[name][1])
    start_rss = rss_mb()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    start = time.perf_counter()
    try:
        for case in range(cases):
            name = rng.choice(names)
            data, arch = seeds[name]
            mutation, mutated = mutate(name, data, seeds, rng)
            path.write_bytes(mutated)
            label = f"case {case} ({name}, {mutation})"
            t0 = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, case_timeout)
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    load_checkpoint(path, arch)
                nonfinite = any("NaN or Inf" in str(w.message) for w in caught)
                outcome = "loaded (NaN/Inf warning)" if nonfinite else "loaded"
            except CheckpointError as e:
                msg = str(e)
                outcome = f"CheckpointError: {_reason(msg)}"
                if "\n" in msg:
                    failures.append(f"{label}: a CheckpointError of several lines: {msg[:200]!r}")
            except _Timeout:
                outcome = "FAIL timeout"
                failures.append(f"{label}: still running after {case_timeout}s")
            except Exception as e:  # noqa: BLE001 - that is what we are looking for
                outcome = f"FAIL {type(e).__name__}"
                failures.append(f"{label}: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            elapsed = time.perf_counter() - t0
            if elapsed > slowest[0]:
                slowest = (elapsed, label)
            outcomes[outcome] += 1
            by_mutation[f"{mutation} -> {'ok' if not outcome.startswith('FAIL') else 'FAIL'}"] += 1
            if failures and len(failures) >= 20:
                break
    finally:
        signal.signal(signal.SIGALRM, previous)
    seconds = time.perf_counter() - start
    growth = rss_mb() - start_rss
    if growth > max_rss_mb:
        failures.append(f"peak memory grew by {growth:.0f} MiB (limit {max_rss_mb:.0f})")
    return {"cases": sum(outcomes.values()), "seed": seed, "seconds": round(seconds, 2),
            "outcomes": dict(sorted(outcomes.items())), "mutations": dict(sorted(by_mutation.items())),
            "slowest_case": {"seconds": round(slowest[0], 4), "case": slowest[1]},
            "peak_rss_growth_mb": round(growth, 1), "failures": failures}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--case-timeout", type=float, default=10.0, help="seconds one case may take")
    ap.add_argument("--max-rss-mb", type=float, default=1024.0, help="allowed growth of peak memory (MiB)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="deadscan-fuzz-") as tmp:
        result = run(args.cases, args.seed, args.case_timeout, args.max_rss_mb, Path(tmp))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['cases']} cases (seed {result['seed']}) in {result['seconds']} s; "
              f"slowest {result['slowest_case']['seconds']} s ({result['slowest_case']['case']}); "
              f"peak memory +{result['peak_rss_growth_mb']} MiB")
        for outcome, n in result["outcomes"].items():
            print(f"  {n:>6}  {outcome}")
        print("by mutation:")
        for mutation, n in result["mutations"].items():
            print(f"  {n:>6}  {mutation}")
        for f in result["failures"]:
            print(f"FAIL {f}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
