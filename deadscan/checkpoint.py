"""Checkpoints: detect the format from the bytes, load safely, save atomically.

Formats, by what the file holds (never by its extension):

- ``safetensors``: 8-byte header length + JSON header. Always safe.
- ``torch-zip``: ``torch.save`` zip archive (``*/data.pkl``); loaded with ``weights_only=True``.
- ``torch-legacy``: a bare pickle (old ``torch.save`` or ``pickle.dump``); ``weights_only=True``.
- ``torchscript`` / ``pt2``: archives that carry code; refused unless the caller trusts them.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .defaults import DEFAULTS
from .errors import ArchError, CheckpointError, OutputError
from .zoo import SHAPES_KEY, ArchSpec, apply_shapes, build, parse_spec

ARCH_KEY = "deadscan_arch"  # safetensors metadata key holding the arch spec
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
PREFIXES = ("module.", "model.", "_orig_mod.")
TRUST_FLAG = "--trust-pickle"


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    sha256: str
    format: str
    arch: str | None  # spec string, None for a pickled module


@dataclass
class Checkpoint:
    model: nn.Module
    info: CheckpointInfo


# ---------------------------------------------------------------------------------------------
# Format detection


def detect_format(path: str | os.PathLike) -> str:
    """Return ``safetensors``, ``torch-zip``, ``torchscript``, ``pt2`` or ``torch-legacy``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if size == 0:
        raise CheckpointError(f"{path}: file is empty")
    if head[:4] == b"PK\x03\x04":
        return _zip_kind(path)
    if head[:1] == b"\x80":  # pickle protocol >= 2
        return "torch-legacy"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= min(size - 8, DEFAULTS.max_header_bytes) and head[8:9] == b"{":
            return "safetensors"
    raise CheckpointError(
        f"{path}: not a checkpoint deadscan can read (first bytes {head[:8].hex()}); "
        "expected safetensors or a torch.save file"
    )


def _zip_kind(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: damaged zip archive ({e})") from None
    leaves = {n.split("/", 1)[-1] for n in names}
    if any(n.endswith("serialized_exported_program.json") or n.endswith("archive_format") for n in names):
        return "pt2"
    if "constants.pkl" in leaves or any(n.split("/", 1)[-1].startswith("code/") for n in names):
        return "torchscript"
    if "data.pkl" in leaves:
        return "torch-zip"
    raise CheckpointError(f"{path}: a zip archive but not a torch.save file (no data.pkl inside)")


# ---------------------------------------------------------------------------------------------
# Loading


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_checkpoint(path: str | os.PathLike, arch: str | None = None, *, trust_pickle: bool = False) -> Checkpoint:
    """Load ``path`` into a model (CPU, eval mode).

    ``arch`` is needed for state dicts that do not carry a deadscan spec in their metadata.
    ``trust_pickle=True`` allows full pickled modules and TorchScript, which run code from the file.
    """
    path = Path(path)
    fmt = detect_format(path)
    metadata: dict[str, str] = {}
    if fmt == "safetensors":
        state, metadata = _load_safetensors(path)
    elif fmt in ("torchscript", "pt2"):
        if not trust_pickle:
            raise CheckpointError(
                f"{path}: is a {'TorchScript' if fmt == 'torchscript' else 'torch.export (.pt2)'} archive, "
                f"which carries code; pass {TRUST_FLAG} to run it, or save a state dict / safetensors instead"
            )
        model = _load_code_archive(path, fmt)
        return Checkpoint(model.eval(), CheckpointInfo(str(path), sha256_of(path), fmt, arch))
    else:
        obj = _torch_load(path, trust_pickle)
        if isinstance(obj, nn.Module):
            model = obj.eval()
            if arch is not None:
                raise CheckpointError(f"{path}: holds a whole pickled module; drop --arch")
            return Checkpoint(model, CheckpointInfo(str(path), sha256_of(path), fmt, None))
        state = _find_state_dict(obj, path)

    spec = _choose_spec(path, arch, metadata)
    try:
        model = build(spec, allow_user_code=arch is not None)
        if SHAPES_KEY in metadata:  # a compacted model: narrower layers than the spec builds
            apply_shapes(model, json.loads(metadata[SHAPES_KEY]))
    except (ArchError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    load_into(model, state, path)
    return Checkpoint(model.eval(), CheckpointInfo(str(path), sha256_of(path), fmt, str(spec)))


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        state = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                state[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: damaged safetensors file ({_one_line(e)})") from None
    return state, metadata


def _torch_load(path: Path, trust_pickle: bool):
    try:
        # weights_only is passed explicitly whatever torch's default is: files are untrusted.
        # A file object, not the path: torch.load treats any path ending in .safetensors as safetensors,
        # whatever the bytes say; the format was already detected from the bytes.
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # torch raises many kinds for bad or unsafe pickles
        msg = _one_line(e)
        if not trust_pickle and ("weights_only" in msg or "Unsupported global" in msg or "GLOBAL" in msg):
            found = _pickle_globals_hint(" ".join(str(e).split()))  # untruncated: torch names the global late
            raise CheckpointError(
                f"{path}: the pickle needs code to load ({found}); it may be a whole pickled module. "
                f"If you trust the file pass {TRUST_FLAG} (runs code from it), or re-save it as a state dict"
            ) from None
        raise CheckpointError(f"{path}: cannot load torch.save file ({msg})") from None


def _pickle_globals_hint(msg: str) -> str:
    import re

    # torch: "Unsupported global: GLOBAL torch.nn.modules.container.Sequential was not an allowed global"
    m = re.search(r"Unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", msg) or re.search(r"GLOBAL\s+([\w.]+)", msg)
    return f"global {m.group(1)}" if m else "non-tensor objects"


def _load_code_archive(path: Path, fmt: str) -> nn.Module:
    try:
        if fmt == "torchscript":
            return torch.jit.load(str(path), map_location="cpu")
        return torch.export.load(str(path)).module()
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load {fmt} archive ({_one_line(e)})") from None


def _find_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    """Accept a flat state dict, or one nested under a common key (Lightning, training scripts)."""
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if isinstance(obj, dict):
            nested = next((obj[k] for k in NESTED_KEYS if isinstance(obj.get(k), dict)), None)
            if nested is not None:
                obj = nested
                continue
        break
    kind = type(obj).__name__
    keys = f" with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else ""
    raise CheckpointError(
        f"{path}: holds a {kind}{keys}, not a state dict of tensors "
        f"(looked under {', '.join(NESTED_KEYS)})"
    )


def _choose_spec(path: Path, arch: str | None, metadata: dict[str, str]) -> ArchSpec:
    if arch is not None:
        return parse_spec(arch)
    if ARCH_KEY in metadata:
        return parse_spec(metadata[ARCH_KEY])
    raise CheckpointError(
        f"{path}: holds only weights; pass --arch (e.g. --arch 'mlp(depth=2, width=256, in_features=64)' "
        "or --arch torchvision:resnet18)"
    )


def strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (``module.`` DDP, ``model.`` Lightning, ``_orig_mod.`` compile), stacked
    in any order (``module._orig_mod.``); keep the stripping that makes the most keys match the model."""
    best, best_hits = state, len(expected & state.keys())
    while state:
        # the prefixes are not prefixes of one another, so at most one is shared by every key
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            return best
        state = {k[len(prefix):]: v for k, v in state.items()}
        hits = len(expected & state.keys())
        if hits > best_hits:
            best, best_hits = state, hits
    return best


def load_into(model: nn.Module, state: dict[str, torch.Tensor], where: str | os.PathLike = "state dict") -> None:
    """``load_state_dict(strict=True)`` with errors that name the keys and the fix."""
    expected = model.state_dict()
    state = strip_prefixes(state, set(expected))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        raise CheckpointError(f"{where}: does not fit the architecture: {'; '.join(parts)}; check --arch")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(
            f"{where}: tensor shapes do not fit the architecture (file vs model): {_few(bad)}; check --arch sizes"
        )
    model.load_state_dict(state, strict=True)


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")


# ---------------------------------------------------------------------------------------------
# Saving (atomic: temp file in the same folder + rename)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"cannot write {path} ({e.strerror}); choose another --out") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_safetensors(model: nn.Module, path: str | os.PathLike, arch: str, metadata: dict[str, str] | None = None) -> None:
    """Save ``model``'s state dict with its arch spec in the metadata, so it loads without --arch."""
    from safetensors.torch import save_file

    # safetensors refuses shared storage; clone to contiguous CPU tensors.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {ARCH_KEY: arch, **(metadata or {})}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def read_json(path: str | os.PathLike) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from None


__all__ = [
    "Checkpoint", "CheckpointInfo", "detect_format", "load_checkpoint", "load_into", "save_safetensors",
    "strip_prefixes", "atomic_path", "write_text_atomic", "sha256_of",
]
