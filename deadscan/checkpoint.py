"""Checkpoints: detect the format from the bytes, load safely, save atomically.

Formats, by what the file holds (never by its extension):

- ``safetensors``: 8-byte header length + JSON header. Always safe.
- ``torch-zip``: ``torch.save`` zip archive (``*/data.pkl``); loaded with ``weights_only=True``.
- ``torch-legacy``: a bare pickle (old ``torch.save`` or ``pickle.dump``); ``weights_only=True``.
- ``torchscript`` / ``pt2``: archives that carry code; refused unless the caller trusts them.

Untrusted bytes are checked before anything is allocated from what they declare: the safetensors
header length (every tensor's shape against its byte span: the safetensors library), zip members'
declared sizes, legacy pickles' declared storage sizes, compacted widths against the file's own
tensors, and an architecture named in a file's metadata (built on the meta device first, and stopped
as soon as it registers far more tensors or elements than the file holds). What a pickle would import
is read from its opcodes by :mod:`deadscan.pickles` (``list_globals``, re-exported here);
``allow_globals`` lets named ones through ``torch.serialization.safe_globals``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import struct
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from . import hf
from .defaults import DEFAULTS
from .errors import ArchError, CheckpointError, DeadscanNote, DeadscanWarning, one_line, printable
from .errors import few as _few  # hf.py imports it from here
from .outputs import atomic_path, check_out_dir, write_text_atomic  # re-exported: they lived here (no torch there)
from .pickles import (ALLOW_FLAG, TRUST_FLAG, GlobalsListing, PickleScan, list_globals,  # noqa: F401 (re-exported)
                      scan_pickle)
from .zoo import (SHAPES_KEY, ArchSpec, apply_shapes, build, check_file_spec, linear_chain, mlp_kwargs,
                  mlp_spec_text, paper_mlp, parse_spec)

ARCH_KEY = "deadscan_arch"  # safetensors metadata key holding the arch spec
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
PREFIXES = ("module.", "model.", "_orig_mod.")
ZIP_MAX_RATIO = DEFAULTS.max_expand_ratio  # deflate never expands data more than ~1032 times
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # all torch's zip reader (miniz) reads
MAX_METADATA_CHARS = 1 << 20  # longest arch spec / shapes text read from a file's metadata


def _error(text: str) -> CheckpointError:
    """A CheckpointError whose line carries no control characters from the file (key names, metadata, paths)."""
    return CheckpointError(printable(text))


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    sha256: str
    format: str
    arch: str | None  # spec string, None for a pickled module
    nonfinite: tuple[str, ...] = ()  # layers holding NaN or Inf weights (a warning, not an error)
    dtype: str | None = None  # the weights' dtype where the format records one (Hugging Face folders)


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
        raise _error(f"{path}: no such file")
    if path.is_dir():
        raise _error(f"{path}: is a folder, not a checkpoint file")
    if not path.is_file():  # a FIFO would block the read, a device never ends
        raise _error(f"{path}: not a regular file (a pipe, socket or device); give a checkpoint file")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise _error(f"{path}: cannot read ({e.strerror})") from None
    if size == 0:
        raise _error(f"{path}: file is empty")
    # safetensors first, by its whole header: the length's low byte may be anything (0x80 looks like a
    # pickle, 384 = 0x180); a zip's or a pickle's first 8 bytes read as a length exceed the file.
    n = struct.unpack("<Q", head[:8])[0] if len(head) >= 9 else 0
    if 2 <= n <= min(size - 8, DEFAULTS.max_header_bytes) and head[8:9] == b"{":
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return _zip_kind(path, size)
    if head[:1] == b"\x80":  # pickle protocol >= 2
        return "torch-legacy"
    if len(head) >= 9:
        if head[8:9] == b"{" and n > min(size - 8, DEFAULTS.max_header_bytes):
            limit = (f"the file holds {size - 8}" if n > size - 8
                     else f"deadscan reads at most {DEFAULTS.max_header_bytes}")
            raise _error(f"{path}: damaged safetensors file (its header claims {n} bytes; {limit}); "
                         "nothing was read from it")
    raise _error(
        f"{path}: not a checkpoint deadscan can read (first bytes {head[:8].hex()}); "
        "expected safetensors or a torch.save file"
    )


def _zip_kind(path: Path, size: int | None = None) -> str:
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as z:
            infos = z.infolist()
            mismatch = _zip_directory_mismatch(f, z.start_dir, len(infos))
    except Exception as e:  # zipfile raises BadZipFile, OSError, ValueError, struct.error... on crafted bytes
        raise _error(f"{path}: damaged zip archive ({one_line(e) or type(e).__name__})") from None
    if mismatch:  # torch's reader would list other members than zipfile (and these checks) see
        raise _error(f"{path}: damaged zip archive ({mismatch}); zip readers disagree on its members")
    size = path.stat().st_size if size is None else size
    _check_zip_members(path, infos, size)
    names = [i.filename for i in infos]
    leaves = {n.split("/", 1)[-1] for n in names}
    if any(n.endswith("serialized_exported_program.json") or n.endswith("archive_format") for n in names):
        kind = "pt2"
    elif "constants.pkl" in leaves or any(n.split("/", 1)[-1].startswith("code/") for n in names):
        kind = "torchscript"
    elif "data.pkl" in leaves:
        kind = "torch-zip"
    else:
        raise _error(f"{path}: a zip archive but not a torch.save file (no data.pkl inside)")
    tops = {n.split("/", 1)[0] if "/" in n else "" for n in names}
    if len(tops) > 1 or "" in tops:  # torch writes every record under one folder and finds records through it
        shown = ", ".join(sorted(t + "/" if t else "(top level)" for t in tops)[:4])
        raise _error(f"{path}: damaged or crafted zip archive (members lie in more than one top-level folder: "
                     f"{shown}); torch.save writes one")
    return kind


def _zip_directory_mismatch(f, start: int, entries: int) -> str | None:
    """How the end records (zip64 ones where present) disagree with the central directory Python's zipfile
    read (at ``start``, ``entries`` long), if they do. torch's reader (miniz) follows the declared offsets;
    zipfile looks just before the end record: data prepended to the archive or an offset pointing elsewhere
    would show the two readers different members. None also where zipfile's private end reader is gone."""
    read_end = getattr(zipfile, "_EndRecData", None)
    end = read_end(f) if read_end is not None else None
    if end is None:
        return None
    location = end[zipfile._ECD_LOCATION]
    f.seek(max(location - 20, 0))
    locator = f.read(20)  # zip64: it must point at the record zipfile reads, the 56 bytes before it
    if locator[:4] == b"PK\x06\x07" and struct.unpack("<Q", locator[8:16])[0] != location - 76:
        return f"its zip64 locator points at offset {struct.unpack('<Q', locator[8:16])[0]}, not {location - 76}"
    offset, on_disk, total = (end[zipfile._ECD_OFFSET], end[zipfile._ECD_ENTRIES_THIS_DISK],
                              end[zipfile._ECD_ENTRIES_TOTAL])
    if (offset, on_disk, total) != (start, entries, entries):
        return (f"its end record declares {total} entries ({on_disk} on this disk) at offset {offset}; "
                f"the central directory holds {entries} at offset {start}")
    return None


def _check_zip_members(path: Path, infos: list[zipfile.ZipInfo], size: int) -> None:
    """What a zip's central directory declares, checked before any member is read: torch's reader
    allocates a member's declared size, and picks members by name in its own way."""
    bad = f"{path}: damaged zip archive"
    seen: dict[str, str] = {}  # casefolded name -> name
    for info in infos:
        name = info.filename
        if name.casefold() in seen:  # Python's zipfile reads the last of two, torch's reader maybe the first
            other = seen[name.casefold()]
            what = (f"member {name} appears twice" if other == name
                    else f"members {other} and {name} differ only in case")
            raise _error(f"{bad} ({what}; tools disagree on which one they read); re-save it with torch.save")
        seen[name.casefold()] = name
        if info.compress_type not in ZIP_METHODS:
            raise _error(f"{bad} (member {name} uses compression method {info.compress_type}; torch reads "
                         "only stored or deflated members)")
        limit = size if info.compress_type == zipfile.ZIP_STORED else ZIP_MAX_RATIO * max(info.compress_size, 1)
        if info.file_size > limit:
            raise _error(f"{bad} (member {name} declares {info.file_size} bytes, more than the {size}-byte file "
                         "can hold)")
        if info.header_offset + info.compress_size > size:
            raise _error(f"{bad} (member {name} claims {info.compress_size} bytes at offset {info.header_offset}, "
                         f"past the end of the {size}-byte file)")
    # Members sharing compressed bytes: a small file that decompresses many times over (overlap zip bomb).
    spans = sorted((i.header_offset, i.header_offset + i.compress_size, i.filename) for i in infos)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if end > start:
            raise _error(f"{bad} (members {a} and {b} overlap)")
    total = sum(i.file_size for i in infos)
    if total > DEFAULTS.max_decoded_bytes:
        raise _error(f"{path}: its zip members declare {total} bytes in all, more than the "
                     f"{DEFAULTS.max_decoded_bytes} deadscan decodes from one file (set DEADSCAN_MAX_BYTES to "
                     "raise it)")


# ---------------------------------------------------------------------------------------------
# Loading


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_checkpoint(path: str | os.PathLike, arch: str | None = None, *, trust_pickle: bool = False,
                    allow_globals: tuple[str, ...] | list[str] = (), arch_source: str | None = None) -> Checkpoint:
    """Load ``path`` into a model (CPU, eval mode).

    ``arch`` is needed for state dicts that do not carry a deadscan spec in their metadata.
    ``arch_source``: where ``arch`` was read from when a file chose it (a run folder's summary.json), not
    the user: then it may name no code and build nothing bigger than the file's own tensors.
    ``trust_pickle=True`` allows full pickled modules and TorchScript, which run code from the file.
    ``allow_globals``: names (``module.Class``, as :func:`list_globals` shows them) the pickle may
    import; each is imported here, by the caller's choice, and may build objects of its kind.
    Weights holding NaN or Inf are loaded, named in ``info.nonfinite`` and warned about.
    """
    path = Path(path)
    if path.is_dir() and hf.is_folder(path):  # a Hugging Face folder: config.json names the architecture
        ck = hf.load_folder(path, arch)
    else:
        ck = _load(path, detect_format(path), arch, trust_pickle, tuple(allow_globals), arch_source)
    bad = nonfinite_layers(ck.model)
    if bad:
        ck.info = replace(ck.info, nonfinite=tuple(bad))
        warnings.warn(DeadscanWarning(
            f"{path}: NaN or Inf weights in {len(bad)} layer(s): {_few(bad)}; their neurons output NaN, which "
            "counts as dead, so the figures for those layers are not meaningful"), stacklevel=2)
    return ck


def _load(path: Path, fmt: str, arch: str | None, trust_pickle: bool, allow_globals: tuple[str, ...],
          arch_source: str | None = None) -> Checkpoint:
    metadata: dict[str, str] = {}
    if fmt == "safetensors":
        state, metadata = _load_safetensors(path)
    elif fmt in ("torchscript", "pt2"):
        if not trust_pickle:
            raise _error(
                f"{path}: is a {'TorchScript' if fmt == 'torchscript' else 'torch.export (.pt2)'} archive, "
                f"which carries code; pass {TRUST_FLAG} to run it, or save a state dict / safetensors instead"
            )
        model = _load_code_archive(path, fmt)
        return Checkpoint(model.eval(), CheckpointInfo(str(path), sha256_of(path), fmt, arch))
    else:
        _check_storage_sizes(path, fmt, strict=not trust_pickle)
        obj = _torch_load(path, trust_pickle, allow_globals)
        if isinstance(obj, nn.Module):
            model = obj.eval()
            if arch is not None:
                raise _error(f"{path}: holds a whole pickled module; drop --arch")
            return Checkpoint(model, CheckpointInfo(str(path), sha256_of(path), fmt, None))
        state = _find_state_dict(obj, path)

    spec = _choose_spec(path, arch, metadata, arch_source, state)
    # A file picked the architecture: it must name no code, nor sizes beyond the checkpoint's own tensors.
    from_file = arch is None or arch_source is not None
    try:
        shapes = _shapes_from(metadata[SHAPES_KEY], state) if SHAPES_KEY in metadata else None
        if from_file:  # first on the meta device (nothing allocated), stopped early if it outgrows the file
            with torch.device("meta"), _size_guard(state):
                try:
                    build(spec, allow_user_code=False)
                except (_TooBig, ArchError):
                    raise
                except Exception:  # a builder that needs real tensors (timm's .item()): the guard below still holds
                    pass
        with _size_guard(state) if from_file else _no_guard():
            model = build(spec, allow_user_code=not from_file)
        if shapes is not None:  # a compacted model: narrower layers than the spec builds (widths from the file)
            apply_shapes(model, shapes)
    except _TooBig as e:
        what = (f"{arch_source} names architecture {spec}" if arch_source else f"its metadata names architecture {spec}"
                if from_file else f"its {SHAPES_KEY} metadata resizes {spec}")
        raise _error(f"{path}: {what}, {e}; damaged or crafted metadata") from None
    except (ArchError, ValueError) as e:
        raise _error(f"{path}: {e}") from None
    except Exception as e:  # the builder rejected its arguments (negative widths, wrong types...)
        what = (f"the architecture {arch_source} names:" if arch_source else "its metadata names architecture"
                if from_file else "--arch")
        raise _error(f"{path}: cannot build {what} {spec} ({type(e).__name__}: {one_line(e)})") from None
    load_into(model, state, path, spec)
    return Checkpoint(model.eval(), CheckpointInfo(str(path), sha256_of(path), fmt, str(spec)))


def nonfinite_layers(model: nn.Module) -> list[str]:
    """Names of the layers (modules) holding a NaN or Inf in a floating-point parameter or buffer."""
    bad: dict[str, None] = {}
    with torch.no_grad():
        for name, t in model.state_dict().items():
            try:
                if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel() \
                        and t.device.type != "meta" and not _all_finite(t):
                    bad[name.rpartition(".")[0] or name] = None
            except (RuntimeError, NotImplementedError):  # layouts isfinite does not take (a trusted pickle's)
                continue
    return list(bad)


def _all_finite(t: torch.Tensor, chunk: int = 1 << 20) -> bool:
    """isfinite in slices of ``chunk`` elements: its temporaries (abs, masks) stay small for a large embedding."""
    if not t.is_contiguous() or t.numel() <= chunk:
        return bool(torch.isfinite(t).all())
    flat = t.view(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


class _TooBig(Exception):
    pass


@contextmanager
def _no_guard():
    yield


@contextmanager
def _size_guard(state: dict[str, torch.Tensor]):
    """While a file-named architecture is built: stop as soon as it registers far more modules, tensors
    or elements than the file holds, before a crafted ``width=10**9`` or ``depth=10**8`` allocates or
    loops. Tensors are registered empty, before their initialisation touches memory. Limits are loose
    (4x + slack): a mere mismatch is left to :func:`load_into`, which names the keys."""
    from torch.nn.modules import module as M

    tensors = len(state)
    elements = sum(int(t.numel()) for t in state.values())
    max_tensors, max_modules = 4 * tensors + 1000, 4 * tensors + 1000
    max_elements = 4 * elements + 2**24
    seen = {"tensors": 0, "modules": 0, "elements": 0}

    def on_tensor(_module, _name, t):
        if t is None:
            return None
        seen["tensors"] += 1
        seen["elements"] += int(t.numel())
        if seen["tensors"] > max_tensors or seen["elements"] > max_elements:
            raise _TooBig(f"which holds more than {seen['tensors']} tensors / {seen['elements']} elements; "
                          f"the file has {tensors} tensors / {elements} elements")
        return None

    def on_module(_module, _name, _sub):
        seen["modules"] += 1
        if seen["modules"] > max_modules:
            raise _TooBig(f"which has more than {max_modules} modules for the file's {tensors} tensors")
        return None

    handles = [M.register_module_parameter_registration_hook(on_tensor),
               M.register_module_buffer_registration_hook(on_tensor),
               M.register_module_module_registration_hook(on_module)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _shapes_from(text: str, state: dict[str, torch.Tensor]) -> dict:
    """The ``deadscan_shapes`` metadata of a compacted model, ``{layer: {"in": n, "out": n}}``, checked against
    the file's own tensors before any layer is resized (so the widths cannot exceed what the file holds)."""
    try:
        shapes = json.loads(text) if len(text) <= MAX_METADATA_CHARS else None
    except (ValueError, RecursionError):
        shapes = None
    ok = isinstance(shapes, dict) and all(
        isinstance(k, str) and isinstance(v, dict) and set(v) <= {"in", "out"}
        and all(type(n) is int and n > 0 for n in v.values()) for k, v in shapes.items())
    if not ok:
        raise ValueError(f"malformed {SHAPES_KEY} metadata (expected {{layer: {{\"in\": n, \"out\": n}}}})")
    for layer, size in shapes.items():
        t = state.get(f"{layer}.weight", state.get(f"{layer}.running_mean"))
        dims = {"out": 0, "in": 1}
        if t is None or any(t.ndim <= dims[k] or t.shape[dims[k]] != n for k, n in size.items()
                            if not (k == "in" and t.ndim == 1)):
            raise ValueError(f"{SHAPES_KEY} metadata resizes {layer} to {size}, which its tensors do not hold")
    return shapes


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The safetensors library checks the header (length, JSON, every shape against its byte span, the
    spans covering the file) before it maps any tensor, so a crafted header allocates nothing."""
    from safetensors import SafetensorError, safe_open

    try:
        state = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                state[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise _error(f"{path}: damaged safetensors file ({one_line(e)})") from None
    return state, metadata


def load_torch_file(path: str | os.PathLike, what: str = "torch.save file", mmap: bool = False) -> object:
    """``torch.load(weights_only=True)`` of an untrusted torch.save file (a checkpoint, a run folder's
    train-state.pt) after the checks a checkpoint gets: the format read from the bytes, the zip's members,
    every storage's declared size against the bytes that hold it. Returns what the pickle holds; any
    failure is one CheckpointError naming ``what``. ``mmap``: the tensors map the file instead of being read
    (cheap when only the other values are wanted; a zip file whose name does not end in .safetensors)."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt not in ("torch-zip", "torch-legacy"):
        raise _error(f"{path}: {what} is a {fmt} file, not a torch.save file")
    _check_storage_sizes(path, fmt)
    if mmap and (fmt != "torch-zip" or path.suffix == ".safetensors"):
        raise _error(f"{path}: {what} cannot be mapped (a legacy torch.save file, or named .safetensors)")
    return _torch_load(path, False, what=what, mmap=mmap)


def _torch_load(path: Path, trust_pickle: bool, allow_globals: tuple[str, ...] = (), what: str | None = None,
                mmap: bool = False):
    """``what``: name of a file that is not a checkpoint (then errors carry no flag hints)."""
    allowed = [_resolve_global(name) for name in allow_globals]  # before opening: a bad name is the user's error
    try:
        # weights_only is passed explicitly whatever torch's default is: files are untrusted.
        # A file object, not the path: torch.load treats any path ending in .safetensors as safetensors,
        # whatever the bytes say; the format was already detected from the bytes.
        with open(path, "rb") as f, torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # noise before a refusal
            if mmap:  # torch maps only a file given by its path
                return torch.load(os.fspath(path), map_location="cpu", weights_only=not trust_pickle, mmap=True)
            return torch.load(f, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # torch raises many kinds for bad or unsafe pickles
        msg = one_line(e)
        if what is not None:
            raise _error(f"{path}: cannot load {what} ({msg}); damaged, or not written by deadscan") from None
        if not trust_pickle and ("weights_only" in msg or "Unsupported global" in msg or "GLOBAL" in msg):
            full = one_line(e, limit=10**6)
            found = _pickle_globals_hint(full)  # untruncated: torch names the global late
            if found == "non-tensor objects":  # torch did not say which (an opcode it does not take): read them
                needed = [g for g in _needed_globals(path) if g not in allow_globals]
                if needed:
                    found = f"global {needed[0]}"
                else:
                    why = full.split("WeightsUnpickler error:", 1)[-1].split(" Check the documentation")[0].strip()
                    raise _error(f"{path}: cannot load torch.save file (a damaged or unsupported pickle: "
                                 f"{why[:200]})") from None
            raise _error(
                f"{path}: the pickle needs code to load ({found}); it may be a whole pickled module. "
                f"If you trust the file pass {TRUST_FLAG} (runs code from it), or re-save it as a state dict"
            ) from None
        raise _error(f"{path}: cannot load torch.save file ({msg or type(e).__name__})") from None


def _needed_globals(path: Path) -> list[str]:
    try:
        return list_globals(path).needs_allowing
    except CheckpointError:
        return []


def _resolve_global(name: str):
    """Import ``pkg.module.Qual.name`` for ``--allow-global``: the longest importable module prefix, then
    attributes. Returns ``(object, name)`` so torch matches exactly the name the pickle uses."""
    import importlib

    parts = name.split(".")
    if len(parts) < 2 or not all(p.isidentifier() for p in parts):
        raise _error(f"{ALLOW_FLAG} {name}: expected a dotted name such as "
                     "torch.nn.modules.linear.Linear (deadscan inspect --list-globals FILE shows them)")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        except Exception as e:  # the module the user named failed while importing
            raise _error(f"{ALLOW_FLAG} {name}: importing {'.'.join(parts[:i])} failed "
                         f"({type(e).__name__}: {one_line(e)})") from None
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return (obj, name)
    raise _error(f"{ALLOW_FLAG} {name}: no such class or function can be imported here")


def _check_storage_sizes(path: Path, fmt: str, strict: bool = True) -> None:
    """torch.load allocates each storage at the size its pickle declares (``('storage', type, key,
    location, numel)``) before reading its bytes: check every declared size against the bytes that hold
    it first (its ``data/<key>`` member in a zip, the whole file for a legacy one). The pickle is read by
    opcodes; one too damaged or too long to read to the end cannot be checked, so it is refused when
    ``strict`` (not for a trusted pickle, which may run code and allocate anything anyway)."""
    size = path.stat().st_size
    members = None
    try:
        if fmt == "torch-legacy":
            with open(path, "rb") as f:
                scan = scan_pickle(f, max_pickles=4)  # magic number, protocol, sys info, the object
        else:
            with zipfile.ZipFile(path) as z:
                members = {i.filename: i.file_size for i in z.infolist()}
                pkl = next(n for n in members if n.split("/", 1)[-1] == "data.pkl")  # one folder: checked
                folder = pkl[: -len("data.pkl")]
                with z.open(pkl) as f:
                    scan = scan_pickle(f)
    except Exception as e:  # zipfile on crafted bytes (CRC, bad deflate stream...)
        raise _error(f"{path}: damaged torch.save file ({one_line(e)})") from None
    if scan.error and strict:
        raise _error(f"{path}: damaged or crafted torch.save file: its pickle cannot be read to the end "
                     f"({scan.error}), so its storage sizes cannot be checked before loading")
    legacy: dict[str, tuple[int, int]] = {}  # key -> (elements, bytes); a shared storage is listed each time
    for pid in scan.persistent_ids:
        if not (len(pid) >= 5 and pid[0] == "storage"):
            continue  # torch refuses other persistent ids before allocating anything
        kind, key, numel = pid[1], pid[2], pid[4]
        itemsize = _element_size(kind)
        if not isinstance(key, str) or type(numel) is not int or numel < 0 or itemsize is None:
            raise _error(f"{path}: damaged torch.save file (a storage declared as {_describe_pid(pid)})")
        nbytes = numel * itemsize
        if members is None:
            seen = legacy.get(key, (0, 0))
            legacy[key] = (max(numel, seen[0]), max(nbytes, seen[1]))
            continue
        have = members.get(f"{folder}data/{key}")
        if have is None or nbytes > have:
            held = "has no such member" if have is None else f"holds {have}"
            raise _error(f"{path}: damaged or crafted torch.save file (storage {key} declares {nbytes} bytes; its "
                         f"member {folder}data/{key} {held}); nothing was allocated")
    elements, total = sum(n for n, _ in legacy.values()), sum(b for _, b in legacy.values())
    if total > size:
        what = f"{elements} elements" if elements > size else f"{total} bytes"
        raise _error(f"{path}: damaged torch.save file (its storages declare {what} but the file holds {size} "
                     "bytes); nothing was allocated")


def _element_size(kind) -> int | None:
    """Bytes per element of a storage type a pickle names (``torch.FloatStorage``); None if not one."""
    module, _, attr = str(kind).rpartition(".")
    if not isinstance(kind, str) or module not in ("torch", "torch.storage") or not attr.endswith("Storage"):
        return None
    if attr == "UntypedStorage":
        return 1
    cls = getattr(torch, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.storage.TypedStorage)):
        return None
    with warnings.catch_warnings():  # TypedStorage is deprecated, and says so on every use
        warnings.simplefilter("ignore")
        return cls.dtype.itemsize


def _describe_pid(pid: tuple) -> str:
    return repr(tuple(p if isinstance(p, (str, int)) else "?" for p in pid[:5]))[:200]


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
        raise _error(f"{path}: cannot load {fmt} archive ({one_line(e)})") from None


def _find_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    """Accept a flat state dict, or one nested under a common key (Lightning, training scripts)."""
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in obj.items()):
            return _dense(dict(obj), path)
        if isinstance(obj, dict):
            nested = next((obj[k] for k in NESTED_KEYS if isinstance(obj.get(k), dict)), None)
            if nested is not None:
                obj = nested
                continue
        break
    kind = type(obj).__name__
    keys = f" with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else ""
    raise _error(
        f"{path}: holds a {kind}{keys}, not a state dict of tensors "
        f"(looked under {', '.join(NESTED_KEYS)})"
    )


def _dense(state: dict[str, torch.Tensor], where) -> dict[str, torch.Tensor]:
    """Only plain tensors with bytes: a nested tensor has no shape to compare, and a sparse, quantized or
    meta one can declare any size without holding it."""
    for key, t in state.items():
        kind = ("nested" if t.is_nested else "sparse" if t.layout != torch.strided else "quantized"
                if t.is_quantized else "meta" if t.is_meta else None)
        if kind is not None:
            raise _error(f"{where}: tensor {key} is a {kind} tensor; deadscan reads dense weights only "
                         "(re-save the state dict with dense tensors)")
    return state


def _choose_spec(path: Path, arch: str | None, metadata: dict[str, str], arch_source: str | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> ArchSpec:
    if arch is not None:
        spec = parse_spec(arch)
        if arch_source is not None:
            try:
                check_file_spec(spec, arch_source)
            except ArchError as e:
                raise _error(str(e)) from None
        return spec
    if ARCH_KEY in metadata:
        text = metadata[ARCH_KEY]
        if len(text) > MAX_METADATA_CHARS:
            raise _error(f"{path}: its {ARCH_KEY} metadata is {len(text)} characters long; damaged or "
                         "crafted: pass --arch yourself")
        try:
            spec = parse_spec(text)
        except ArchError as e:
            raise _error(f"{path}: its {ARCH_KEY} metadata is not an architecture ({e}); "
                         "pass --arch") from None
        except (RecursionError, MemoryError, ValueError, SyntaxError):  # absurdly nested literals
            raise _error(f"{path}: its {ARCH_KEY} metadata cannot be parsed; damaged or crafted: "
                         "pass --arch yourself") from None
        try:
            check_file_spec(spec, f"{path}: its {ARCH_KEY} metadata")
        except ArchError as e:
            raise _error(str(e)) from None
        return spec
    shapes = _shapes_of(state or {})
    kw = mlp_kwargs(shapes)
    if kw is not None:  # the built-in mlp's keys and shapes, nothing else: no other spec builds this file
        spec = ArchSpec("mlp", kw)
        warnings.warn(DeadscanNote(f"{path}: no --arch given; its tensors are exactly the built-in mlp's: "
                                   f"loading it as {spec} (pass --arch to choose another)"), stacklevel=3)
        return spec
    chain = linear_chain(shapes)
    if chain is not None and len({out for _, _, out in chain[:-1]}) == 1 \
            and all(f"{n}.bias" in shapes for n, _, _ in chain):  # the built-in mlp's layers have biases
        # Shaped like the built-in mlp but named otherwise: the file does not say what runs between the layers.
        kw = {"depth": len(chain) - 1, "width": chain[0][2], "in_features": chain[0][1], "classes": chain[-1][2]}
        sizes = " -> ".join(str(n) for n in [chain[0][1], *(out for _, _, out in chain)])
        names = [*(f"fc{i}" for i in range(1, len(chain))), "head"]
        raise _error(f"{path}: holds only weights, of {len(chain)} Linear layers ({sizes}) named "
                     f"{_few([n for n, _, _ in chain])}, which do not say what runs between them; if it is a ReLU "
                     f"MLP, rename them {_few(names)} and pass --arch {mlp_spec_text(kw)}, else pass --arch "
                     "pkg.module:factory for the code that built it")
    raise _error(
        f"{path}: holds only weights; pass --arch (e.g. --arch 'mlp(depth=2, width=256, in_features=64)' "
        "or --arch torchvision:resnet18)"
    )


def _shapes_of(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Key -> shape, wrapper prefixes (``module.``...) dropped as :func:`load_into` drops them."""
    state = strip_prefixes(state, {"fc1.weight", "fc1.bias", "head.weight", "head.bias"})
    return {k: tuple(v.shape) for k, v in state.items()}


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


def load_into(model: nn.Module, state: dict[str, torch.Tensor], where: str | os.PathLike = "state dict",
              spec: ArchSpec | None = None) -> None:
    """``load_state_dict(strict=True)`` with errors that name the keys and the fix (for an ``mlp`` ``spec``
    whose sizes differ from the file's: the keywords to change and the --arch that fits)."""
    expected = model.state_dict()
    state = strip_prefixes(_dense(state, where), set(expected))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        fix = _mlp_fix(spec, state) or "check --arch"
        raise _error(f"{where}: does not fit the architecture: {'; '.join(parts)}; {fix}")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        fix = _mlp_fix(spec, state) or "check --arch sizes"
        raise _error(f"{where}: tensor shapes do not fit the architecture (file vs model): {_few(bad)}; {fix}")
    try:
        model.load_state_dict(state, strict=True)
    except Exception as e:  # tensors torch cannot copy into parameters (meta, sparse, odd dtypes)
        raise _error(f"{where}: cannot copy its tensors into the model ({type(e).__name__}: "
                     f"{one_line(e)})") from None


def _mlp_fix(spec: ArchSpec | None, state: dict[str, torch.Tensor]) -> str | None:
    """For an ``mlp`` spec and a file holding a built-in mlp of other sizes: which keywords to change, and
    the whole --arch that fits (from the file's shapes)."""
    if spec is None or spec.name != "mlp":
        return None
    kw = mlp_kwargs(_shapes_of(state))
    if kw is None:
        return None
    given = {k: p.default for k, p in inspect.signature(paper_mlp).parameters.items()} | spec.kwargs
    changes = [f"{k}={v} (not {given[k]!r})" for k, v in kw.items() if given.get(k) != v]
    return f"the file holds an mlp with {', '.join(changes)}: pass --arch {mlp_spec_text(kw)}"


# ---------------------------------------------------------------------------------------------
# Saving (atomic: temp file in the same folder + rename)


def save_safetensors(model: nn.Module, path: str | os.PathLike, arch: str, metadata: dict[str, str] | None = None) -> None:
    """Save ``model``'s state dict with its arch spec in the metadata, so it loads without --arch."""
    from safetensors.torch import save_file

    # safetensors refuses shared storage; clone to contiguous CPU tensors.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {ARCH_KEY: arch, **(metadata or {})}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def load_safetensors(path: str | os.PathLike, arch: str | None = None) -> nn.Module:
    """The model :func:`save_safetensors` wrote (its arch spec is in the file's metadata; ``arch`` overrides
    it), on the CPU in eval mode. Any other format is refused: :func:`load_checkpoint` reads them all."""
    ckpt = load_checkpoint(path, arch)
    if ckpt.info.format != "safetensors":
        raise CheckpointError(f"{path}: a {ckpt.info.format} checkpoint, not safetensors; use deadscan.load")
    return ckpt.model


def save_masks(masks: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Pruning masks (True = pruned), one bool tensor per layer name, beside a stripped model."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().to("cpu", torch.bool).contiguous() for k, v in masks.items()}, str(tmp),
                  metadata={"deadscan": "pruning masks, True = pruned"})


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Masks written by :func:`save_masks`; ``Masks.load_state_dict`` applies them to a model."""
    state, _ = _load_safetensors(Path(path))
    return {k: v.to(torch.bool) for k, v in state.items()}


__all__ = [
    "Checkpoint", "CheckpointInfo", "detect_format", "load_checkpoint", "load_into", "save_safetensors",
    "strip_prefixes", "atomic_path", "write_text_atomic", "sha256_of", "list_globals", "scan_pickle",
    "check_out_dir", "nonfinite_layers", "save_masks", "load_masks",
]
