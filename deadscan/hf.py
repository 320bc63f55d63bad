"""Hugging Face model folders: ``config.json`` plus weights, loaded without running code from the folder.

- The architecture is ``config.architectures[0]``, looked up among transformers' own model classes only;
  ``auto_map`` (remote code) is refused, ``trust_remote_code`` is never used.
- Weights: ``model.safetensors``, a sharded ``model.safetensors.index.json``, ``pytorch_model.bin`` (or its
  sharded index), in that order of preference. Every file read is a regular file inside the folder (or, for
  a hub cache snapshot, in its ``blobs`` folder); an index names shards by plain file names only.
- Weights are held once: the model is built on the meta device, safetensors shards are memory-mapped and
  their tensors assigned as the parameters, tied weights re-tied. Non-persistent buffers (rotary
  ``inv_freq``, ``position_ids``) are then made by the model's own initialisation, as ``from_pretrained``
  makes them.
- The checkpoint's sha256 is that of a manifest: sorted ``name sha256 size`` lines of config.json and every
  weight file, so it changes with any byte of the folder that is read.

transformers is an optional extra (``pip install 'deadscan[hf]'``); nothing here imports it before a
folder is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError, one_line, printable

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
MAX_CONFIG_BYTES = 4 * 2**20  # real configs are a few KB
MAX_INDEX_BYTES = 32 * 2**20  # the index of a 400B-parameter model is a few MB
MAX_SHARDS = 100_000
INSTALL = "pip install 'deadscan[hf]'"
NO_CODE = "deadscan never runs code from a model folder (no trust_remote_code)"
ARCH_PREFIX = "hf:"


def _error(text: str) -> CheckpointError:
    return CheckpointError(printable(text))


def is_folder(path: str | os.PathLike) -> bool:
    """A folder holding a ``config.json`` (whatever kind of file it is: checked when loaded)."""
    path = Path(path)
    return path.is_dir() and os.path.lexists(path / CONFIG)


@dataclass(frozen=True)
class Plan:
    """What a folder holds, checked, before transformers or any weight is touched."""

    folder: Path
    config: dict
    arch: str  # class name, e.g. OPTForCausalLM
    format: str  # hf-safetensors, hf-sharded, hf-bin, hf-bin-sharded
    files: tuple[Path, ...]  # weight files, in load order
    index: Path | None  # the index file of a sharded save
    weight_map: dict[str, str] | None  # key -> shard file name (sharded saves)


# ---------------------------------------------------------------------------------------------
# Files in the folder


def _file(folder: Path, name: object, what: str) -> Path:
    """``folder/name`` if ``name`` is a plain file name and it is a regular file inside the folder: a name
    from an index must not walk out (``..``, absolute paths), a symlink must not point out of the folder
    (except a hub cache snapshot's links into its ``blobs``), and a FIFO or device would block or never end."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\x00" in name or len(name) > 255):
        raise _error(f"{folder}: {what} {name!r} is not a plain file name in the folder; damaged or crafted "
                     "folder: re-save it with save_pretrained")
    path = folder / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise _error(f"{folder}: {what} {name} is missing; the folder is incomplete: download or save it "
                     "again") from None
    except OSError as e:
        raise _error(f"{path}: cannot read {what} ({e.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        target = path.resolve()
        inside = _within(target, folder.resolve())
        # huggingface_hub's cache: snapshots/<rev>/<name> -> ../../blobs/<hash>
        hub = folder.resolve().parent.name == "snapshots" and _within(target, folder.resolve().parent.parent / "blobs")
        if not (inside or hub):
            raise _error(f"{path}: {what} is a link to {target}, outside the folder; deadscan reads only files "
                         "inside a model folder: copy the file in")
        try:
            st = os.stat(path)
        except OSError as e:
            raise _error(f"{path}: cannot read {what} ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _error(f"{path}: not a regular file (a folder, pipe, socket or device); a model folder holds "
                     "plain files")
    return path


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _read_json(path: Path, what: str, limit: int) -> dict:
    """A JSON object from a regular file of at most ``limit`` bytes (opened non-blocking and checked again
    once open, so a file swapped for a FIFO cannot hang the read)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise _error(f"{path}: cannot read {what} ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _error(f"{path}: not a regular file (a pipe, socket or device); a model folder holds plain files")
        if st.st_size > limit:
            raise _error(f"{path}: {what} is {st.st_size} bytes, more than the {limit} deadscan reads; damaged "
                         "or not a Hugging Face file")
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise _error(f"{path}: {what} grew past {limit} bytes while read")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _error(f"{path}: {what} is not valid JSON ({one_line(e, 120)}); damaged: re-save the folder") from None
    if not isinstance(obj, dict):
        raise _error(f"{path}: {what} holds a JSON {type(obj).__name__}, not an object; damaged: re-save the folder")
    return obj


def plan(folder: str | os.PathLike) -> Plan:
    """Read and check config.json and find the weight files; needs no transformers."""
    folder = Path(folder)
    config = _read_json(_file(folder, CONFIG, "config.json"), "config.json", MAX_CONFIG_BYTES)
    archs = config.get("architectures")
    name = archs[0] if isinstance(archs, list) and archs else None
    if "auto_map" in config:
        named = f" for {name}" if isinstance(name, str) else ""
        raise _error(f"{folder}: config.json has an auto_map{named}: model code shipped in the folder; {NO_CODE}: "
                     "use a model whose class ships with transformers")
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
        shown = "no architectures entry" if name is None else f"architecture {name!r}"
        raise _error(f"{folder}: config.json names {shown}, not a model class of transformers; {NO_CODE}: "
                     "name one there (e.g. \"architectures\": [\"OPTForCausalLM\"])")
    if config.get("quantization_config") is not None:
        raise _error(f"{folder}: a quantized model (config.json has a quantization_config); deadscan reads dense "
                     "weights only: use the unquantized checkpoint")
    fmt, files, index, weight_map = _weights(folder)
    return Plan(folder, config, name, fmt, files, index, weight_map)


def _weights(folder: Path) -> tuple[str, tuple[Path, ...], Path | None, dict[str, str] | None]:
    present = {n for n in (SAFETENSORS, SAFETENSORS_INDEX, BIN, BIN_INDEX) if os.path.lexists(folder / n)}
    if SAFETENSORS in present:
        return "hf-safetensors", (_file(folder, SAFETENSORS, "weights file"),), None, None
    if SAFETENSORS_INDEX in present:
        index, shards, weight_map = _read_index(folder, SAFETENSORS_INDEX)
        return "hf-sharded", shards, index, weight_map
    if BIN in present:
        return "hf-bin", (_file(folder, BIN, "weights file"),), None, None
    if BIN_INDEX in present:
        index, shards, weight_map = _read_index(folder, BIN_INDEX)
        return "hf-bin-sharded", shards, index, weight_map
    raise _error(f"{folder}: holds config.json but no weights ({SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or "
                 f"{BIN_INDEX}); download or save the weights into the folder")


def _read_index(folder: Path, name: str) -> tuple[Path, tuple[Path, ...], dict[str, str]]:
    index = _file(folder, name, "index")
    obj = _read_json(index, name, MAX_INDEX_BYTES)
    weight_map = obj.get("weight_map")
    if not (isinstance(weight_map, dict) and weight_map
            and all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
        raise _error(f"{index}: has no weight_map of tensor names to shard files; damaged: re-save the folder")
    names = list(dict.fromkeys(weight_map.values()))
    if len(names) > MAX_SHARDS:
        raise _error(f"{index}: names {len(names)} shards, more than the {MAX_SHARDS} deadscan reads")
    shards = tuple(_file(folder, n, f"shard of {name}") for n in names)
    return index, shards, dict(weight_map)


def manifest(p: Plan) -> str:
    """sha256 of the sorted ``name sha256 size`` lines of config.json, the index and every weight file."""
    from .checkpoint import sha256_of

    files = [p.folder / CONFIG, *([p.index] if p.index else []), *p.files]
    lines = sorted(f"{f.name} {sha256_of(f)} {f.stat().st_size}" for f in files)
    return hashlib.sha256(("\n".join(lines) + "\n").encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Loading


def model_class(p: Plan):
    """transformers' own class named by the config; nothing outside the transformers package."""
    try:
        import transformers
    except ImportError:
        raise _error(f"{p.folder}: a Hugging Face model folder needs transformers: {INSTALL}") from None
    try:
        cls = getattr(transformers, p.arch, None)
    except Exception:  # transformers' lazy import of the model's module failed
        cls = None
    ok = (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
          and (cls.__module__ or "").startswith("transformers."))
    if not ok:
        raise _error(f"{p.folder}: config.json names architecture {p.arch}, which is not a model class of "
                     f"transformers {transformers.__version__}; {NO_CODE}: upgrade transformers or use a "
                     "supported model")
    return cls


def load_folder(folder: str | os.PathLike, arch: str | None = None):
    """Load a Hugging Face model folder (CPU, eval mode) into a :class:`deadscan.checkpoint.Checkpoint`.

    ``arch``: only ``hf:<the config's class>`` (what a run folder records) is accepted; the folder's
    config.json chooses the architecture."""
    from .checkpoint import Checkpoint, CheckpointInfo, _size_guard, _TooBig

    p = plan(folder)
    if arch is not None and arch != ARCH_PREFIX + p.arch:
        raise _error(f"{p.folder}: a Hugging Face folder; its config.json names the architecture "
                     f"({ARCH_PREFIX}{p.arch}): drop --arch {arch}")
    cls = model_class(p)
    config = _config(p, cls)
    state, shapes = _read_weights(p)
    dtype = _dtype(p, config, state)
    try:
        # meta: nothing allocated; the guard stops a config far bigger than the files (layers=10**8) early
        with torch.device("meta"), _size_guard(state):
            model = cls._from_config(config, dtype=dtype)
    except _TooBig as e:
        raise _error(f"{p.folder}: config.json builds a {p.arch} {e}; damaged or crafted config") from None
    except Exception as e:  # a config transformers cannot build (bad sizes, wrong types)
        raise _error(f"{p.folder}: cannot build {p.arch} from config.json ({type(e).__name__}: {one_line(e)}); "
                     "check the config") from None
    if shapes is not None:  # a compacted folder: narrower layers than config.json builds
        state = _rename(state, model.state_dict(), model.base_model_prefix)
        _apply_shapes(model, shapes, state, p)
    _assign(model, state, p)
    info = CheckpointInfo(str(p.folder), manifest(p), p.format, ARCH_PREFIX + p.arch,
                          dtype=str(dtype).removeprefix("torch."))
    return Checkpoint(model.eval(), info)


def _apply_shapes(model, text: str, state: dict[str, torch.Tensor], p: Plan) -> None:
    """Resize the layers named by a compacted folder's ``deadscan_shapes`` metadata (on the meta device), after
    checking every width against the file's own tensors (so no layer can be made wider than the file holds)."""
    from .checkpoint import _shapes_from
    from .errors import ArchError
    from .layers import HF_CONV1D, kind_of
    from .zoo import SHAPES_KEY, apply_shapes

    # _shapes_from reads a weight as (out, in); Hugging Face's Conv1D (GPT-2) stores (in, out): seen transposed
    seen = dict(state)
    for key, t in state.items():
        layer = key.removesuffix(".weight")
        if key.endswith(".weight") and t.ndim == 2:
            try:
                m = model.get_submodule(layer)
            except AttributeError:
                continue
            if kind_of(m) is HF_CONV1D:
                seen[key] = t.t()
    try:
        shapes = _shapes_from(text, seen)
        with torch.device("meta"):
            apply_shapes(model, shapes)
    except (ValueError, ArchError) as e:
        raise _error(f"{p.folder}: {one_line(e)}; damaged or crafted {SHAPES_KEY} metadata") from None


def _config(p: Plan, cls):
    config_class = cls.config_class
    declared = p.config.get("model_type")
    expected = getattr(config_class, "model_type", "")
    if declared and expected and declared != expected:
        raise _error(f"{p.folder}: config.json's model_type {declared!r} does not match its architecture {p.arch} "
                     f"({expected!r}); damaged config")
    try:
        return config_class.from_dict(dict(p.config))
    except Exception as e:
        raise _error(f"{p.folder}: config.json does not describe a {p.arch} ({type(e).__name__}: {one_line(e)}); "
                     "check the config") from None


def _dtype(p: Plan, config, state: dict[str, torch.Tensor]) -> torch.dtype:
    """The config's dtype, else the weights' (as ``from_pretrained(dtype="auto")``): bf16/fp16 stay so."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype):
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    if not dtype.is_floating_point:
        raise _error(f"{p.folder}: config.json's dtype {dtype} is not a floating-point type; damaged config")
    return dtype


def _read_weights(p: Plan) -> tuple[dict[str, torch.Tensor], str | None]:
    """The tensors of every weight file, and the ``deadscan_shapes`` metadata of a compacted folder (None if
    the files hold none; every safetensors file of a compacted folder carries the same)."""
    from .zoo import SHAPES_KEY

    state: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    shapes: dict[str, str | None] = {}
    for path in p.files:
        if p.format in ("hf-safetensors", "hf-sharded"):
            part, metadata = _read_safetensors(path)
            shapes[path.name] = metadata.get(SHAPES_KEY)
        else:
            part = _read_bin(path)
        for key, t in part.items():
            if key in owner:
                raise _error(f"{p.folder}: tensor {key} is in both {owner[key]} and {path.name}; damaged folder")
            owner[key] = path.name
            state[key] = t
    if p.weight_map is not None:
        wrong = [f"{k} (in {owner.get(k, 'no shard')}, index says {v})" for k, v in p.weight_map.items()
                 if owner.get(k) != v]
        if wrong:
            from .checkpoint import _few

            raise _error(f"{p.index}: does not match its shards: {_few(wrong, 3)}; damaged folder: re-save it")
    if len(set(shapes.values())) > 1:
        raise _error(f"{p.folder}: its weight files disagree on the {SHAPES_KEY} metadata (the widths of a "
                     "compacted model); damaged or crafted folder")
    return state, next(iter(shapes.values()), None)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors memory-mapped from the file (the safetensors library checks the header against the file), and
    the file's metadata."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise _error(f"{path}: damaged safetensors file ({one_line(e)})") from None


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    from .checkpoint import _dense, load_torch_file

    obj = load_torch_file(path, what="Hugging Face weights file")
    if not (isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        raise _error(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors; damaged weights file")
    return _dense(dict(obj), path)


def _assign(model, state: dict[str, torch.Tensor], p: Plan) -> None:
    """Make the file's tensors the model's parameters (no copy unless the dtype differs), re-tie, then
    build what the file does not hold (non-persistent buffers) with the model's own initialisation."""
    from .checkpoint import _few

    expected = model.state_dict()
    state = _rename(state, expected, model.base_model_prefix)
    buffers = {name for name, _ in model.named_buffers()}
    ignored = [re.compile(r) for r in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
    # stale copies of buffers the model now computes (old saves kept position_ids / rotary inv_freq)
    unexpected = [k for k in state if k not in expected and not any(r.search(k) for r in ignored)
                  and not k.endswith((".position_ids", "rotary_emb.inv_freq"))]
    state = {k: v for k, v in state.items() if k in expected}
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    partners: dict[str, set[str]] = {}
    for a, b in tied.items():
        partners.setdefault(a, set()).add(b)
        partners.setdefault(b, set()).add(a)
    absent = {k for k in expected if k not in state}
    missing = [k for k in expected if k in absent and k not in buffers
               and not (partners.get(k, set()) - absent)]  # a tied weight whose partner is in the file
    if missing or unexpected:
        parts = ([f"missing {_few(missing)}"] if missing else []) + ([f"unexpected {_few(unexpected)}"]
                                                                      if unexpected else [])
        raise _error(f"{p.folder}: its weights do not fit {p.arch} from its config.json: {'; '.join(parts)}; "
                     "damaged or mismatched folder")
    bad = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
           if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise _error(f"{p.folder}: tensor shapes do not fit {p.arch} from its config.json (file vs model): "
                     f"{_few(bad)}; damaged or mismatched folder")
    # the model's dtype wins (fp32 modules kept so by transformers); a tensor of another dtype is converted
    state = {k: v if v.dtype == expected[k].dtype else v.to(expected[k].dtype) for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights(missing_keys=absent, recompute_mapping=False)
        _materialise_buffers(model)
    except CheckpointError:
        raise
    except Exception as e:
        raise _error(f"{p.folder}: cannot place its tensors in {p.arch} ({type(e).__name__}: {one_line(e)})") from None
    still = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still:
        raise _error(f"{p.folder}: {p.arch} has tensors the folder does not hold and transformers does not "
                     f"compute: {_few(still)}; damaged or mismatched folder")


def _materialise_buffers(model) -> None:
    """Buffers left on the meta device (the file holds no values for them) get CPU storage and the values
    the model's own ``_init_weights`` gives them (rotary inv_freq, position_ids), exactly as in
    ``from_pretrained``; every loaded tensor is flagged so that initialisation skips it."""
    pending = [(n, b) for n, b in model.named_buffers() if b.is_meta]
    if not pending:
        return
    made = set()
    for name, buf in pending:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner._buffers[attr] = torch.empty_like(buf, device="cpu")
        made.add(id(owner._buffers[attr]))
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in made:
            t._is_hf_initialized = True
    model.initialize_weights()


def _rename(state: dict[str, torch.Tensor], expected, prefix: str) -> dict[str, torch.Tensor]:
    """Keys saved from the base model (``decoder.layers.0...``) loaded into a head model (``model.decoder...``),
    or the other way round, as ``from_pretrained`` does with ``base_model_prefix``."""
    if not prefix:
        return state
    out = {}
    for k, v in state.items():
        if k not in expected:
            if f"{prefix}.{k}" in expected:
                k = f"{prefix}.{k}"
            elif k.startswith(prefix + ".") and k[len(prefix) + 1:] in expected:
                k = k[len(prefix) + 1:]
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# Saving


def save_folder(model, dest: str | os.PathLike, source: str | os.PathLike | None = None,
                metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` as a Hugging Face folder at ``dest``: config.json and model.safetensors by transformers'
    own ``save_pretrained`` (the original tensor names; tied weights stored once and tied again on load), plus
    the tokenizer files of ``source`` when it holds them. Atomic: written into a hidden temp folder beside
    ``dest``, then renamed over it; a run killed midway leaves only ``.stripped.*.tmp``. ``metadata`` (a
    compacted model's ``deadscan_shapes``) is added to every safetensors file written."""
    import shutil

    from .errors import OutputError
    from .files import open_regular
    from .outputs import atomic_path

    dest = Path(dest)
    try:
        with atomic_path(dest) as new:  # made by save_pretrained with the umask's mode
            _save_pretrained(model, new)
            if metadata:
                _add_metadata(new, metadata)
            if source is not None:
                from .data.tokens import TOKENIZER_FILES

                for name in TOKENIZER_FILES:
                    src = Path(source) / name
                    if os.path.lexists(src) and not os.path.lexists(new / name):
                        with open_regular(src) as f, open(new / name, "wb") as g:  # regular files only
                            shutil.copyfileobj(f, g)
    except OSError as e:
        raise OutputError(f"cannot write {dest} ({e.strerror or one_line(e)}); choose another --out") from None
    return dest


def _add_metadata(folder: Path, metadata: dict[str, str]) -> None:
    """Rewrite each safetensors file in ``folder`` with ``metadata`` added to its own (tensors unchanged)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            meta = {**(f.metadata() or {}), **metadata}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        del tensors
        os.replace(tmp, path)


def _save_pretrained(model, folder: Path) -> None:
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its shard bar is noise next to deadscan's own output
    try:
        model.save_pretrained(str(folder))  # safetensors (transformers 5 writes nothing else)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


__all__ = ["is_folder", "plan", "load_folder", "save_folder", "manifest", "Plan"]
