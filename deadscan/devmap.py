"""Models bigger than one device: ``inspect --device-map`` through accelerate's big-model inference.

:class:`DeviceMap` is what ``--device-map`` and ``--max-memory`` say, parsed and checked without torch or
accelerate (the command line builds it). :func:`dispatch` places a loaded model's layers over the GPUs, CPU
memory and disk (accelerate's ``infer_auto_device_map`` and ``dispatch_model``; disk-offloaded layers are read
from a Hugging Face folder's safetensors files, other weights go to a temporary folder removed afterwards);
the scan's hooks then see every site, each site's statistics
stay on the device its activations are on and are brought to the host once at the end.
:meth:`Dispatched.restore` removes accelerate's hooks and puts the loaded weights back (the memory-mapped
tensors of the folder's files: holding them costs no memory beyond the page cache), so what reads weights
after the scan (capacity, report) sees the model as loaded.

accelerate is imported only when a model is dispatched (``pip install 'deadscan[hf]'``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import DeadscanError, one_line

MODES = ("auto", "balanced", "balanced_low_0", "sequential")
INSTALL = "pip install 'deadscan[hf]'"
SIZE_FORMS = "bytes, or a number with B, KB, MB, GB, TB, KiB, MiB, GiB or TiB (e.g. 500MB, 10GiB)"
MEMORY_FORMS = ("KEY=SIZE pairs joined by commas (e.g. cpu=2GiB or 0=10GiB,cpu=30GiB) or a JSON object "
                "(e.g. {\"0\": \"10GiB\", \"cpu\": \"30GiB\"}); KEY: cpu, mps, a GPU index N or cuda:N; SIZE: "
                + SIZE_FORMS)
MAP_FORMS = ("auto, balanced, balanced_low_0, sequential, a JSON object of module name to device (e.g. "
             "{\"model.decoder.layers.0\": 0, \"model.decoder.layers.1\": \"disk\", ...}) or a .json file holding "
             "one; a device: a GPU index N, cuda:N, mps, cpu or disk")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*$")


class DeviceMapError(DeadscanError):
    """--device-map or --max-memory cannot be parsed, or cannot be used for this run."""


@dataclass(frozen=True)
class DeviceMap:
    """Where a model's layers go. ``mode``: one of :data:`MODES` (accelerate infers the map within
    ``max_memory``), or None with ``layers`` naming each module's device (``"cpu"``, ``"disk"``, ``"mps"`` or
    a GPU index). ``max_memory``: device -> bytes (``"cpu"``, ``"mps"`` or a GPU index); None: what each
    device has free."""

    mode: str | None = "auto"
    layers: tuple[tuple[str, int | str], ...] | None = None
    max_memory: tuple[tuple[int | str, int], ...] | None = None

    @classmethod
    def parse(cls, device_map: str, max_memory: str | None = None) -> "DeviceMap":
        """From the text of ``--device-map`` and ``--max-memory``; one DeviceMapError line if either is bad."""
        text = device_map.strip()
        memory = None if max_memory is None else parse_max_memory(max_memory)
        if text in MODES:
            return cls(text, None, memory)
        if text.startswith(("{", "[")):
            obj, where = _json(text, "--device-map", MAP_FORMS), "--device-map"
        elif text.endswith(".json"):
            obj, where = _json_file(text), f"--device-map {text}"
        else:
            raise DeviceMapError(f"--device-map {device_map!r}: not a mode or a device map; accepted: {MAP_FORMS}")
        if memory is not None:
            raise DeviceMapError("--max-memory applies to --device-map auto, balanced, balanced_low_0 or sequential "
                                 "(accelerate fills the devices within it); a device map naming every module's "
                                 "device takes no --max-memory: drop one of them")
        if not obj:
            raise DeviceMapError(f"{where}: an empty device map; accepted: {MAP_FORMS}")
        layers = []
        for name, device in obj.items():
            if not isinstance(name, str):
                raise DeviceMapError(f"{where}: module name {name!r} is not a string")
            layers.append((name, _device(device, f"{where}: module {name!r}", MAP_FORMS, disk=True)))
        return cls(None, tuple(layers), None)

    def describe(self) -> str:
        return self.mode if self.mode is not None else "a device map of " + str(len(self.layers)) + " modules"


def parse_max_memory(text: str) -> dict[int | str, int]:
    """``cpu=2MB``, ``0=10GiB,cpu=30GiB`` or ``{"0": "10GiB", "cpu": "30GiB"}`` -> {0: bytes, "cpu": bytes}."""
    stripped = text.strip()
    if stripped.startswith(("{", "[")):
        obj = _json(stripped, "--max-memory", MEMORY_FORMS)
        pairs = list(obj.items())
    else:
        pairs = []
        for part in stripped.split(","):
            key, eq, value = part.partition("=")
            if not eq or not key.strip() or not value.strip():
                raise DeviceMapError(f"--max-memory {text!r}: {part.strip()!r} is not KEY=SIZE; accepted: "
                                     f"{MEMORY_FORMS}")
            pairs.append((key.strip(), value.strip()))
    if not pairs:
        raise DeviceMapError(f"--max-memory {text!r}: names no device; accepted: {MEMORY_FORMS}")
    out: dict[int | str, int] = {}
    for key, value in pairs:
        device = _device(key, f"--max-memory {text!r}: device {key!r}", MEMORY_FORMS, disk=False)
        if device in out:
            raise DeviceMapError(f"--max-memory {text!r}: device {key!r} is given twice")
        out[device] = _size(value, f"--max-memory {text!r}: size {value!r} of {key}")
    return out


def _size(value, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = _SIZE.match(value) if isinstance(value, str) else None
    if m is None or m.group(2).lower() not in _UNITS:
        raise DeviceMapError(f"{where} is not a size; accepted: {SIZE_FORMS}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _device(value, where: str, forms: str, disk: bool) -> int | str:
    """A GPU index (int), ``"cpu"``, ``"mps"`` or (``disk``) ``"disk"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        v = value.strip().lower()
        if v.isdigit():
            return int(v)
        if v.startswith("cuda:") and v[5:].isdigit():
            return int(v[5:])
        if v == "cuda":
            return 0
        if v in ("cpu", "mps") or (disk and v == "disk"):
            return v
    raise DeviceMapError(f"{where}: {value!r} is not a device; accepted: {forms}")


def _json(text: str, option: str, forms: str) -> dict:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise DeviceMapError(f"{option}: not valid JSON ({one_line(e, 120)}); accepted: {forms}") from None
    if not isinstance(obj, dict):
        raise DeviceMapError(f"{option}: a JSON {type(obj).__name__}, not an object; accepted: {forms}")
    return obj


def _json_file(path: str) -> dict:
    from .files import open_regular

    try:
        with open_regular(path) as f:
            raw = f.read(4 * 2**20 + 1)
    except (OSError, DeadscanError) as e:
        raise DeviceMapError(f"--device-map {path}: cannot read the device map file ({one_line(e, 160)})") from None
    if len(raw) > 4 * 2**20:
        raise DeviceMapError(f"--device-map {path}: larger than 4 MiB; not a device map")
    return _json(raw.decode("utf-8", "replace"), f"--device-map {path}", MAP_FORMS)


def device_name(device: int | str) -> str:
    """How summary.json records a device: cuda:N, mps, cpu or disk."""
    return f"cuda:{device}" if isinstance(device, int) else str(device)


# ---------------------------------------------------------------------------------------------
# Dispatching a loaded model


class Dispatched:
    """A model placed by :func:`dispatch`. ``device_map``: module -> device as summary.json records it;
    ``input_device``: where the inputs go (the device of the first module on an accelerator, else cpu)."""

    sitemap = None  # the sites to scan with: found before dispatch (see :func:`sites_for`)

    def __init__(self, model, device_map: dict, input_device, saved: list, offload_dir: Path | None):
        self.model = model
        self.device_map = {name: device_name(d) for name, d in device_map.items()}
        self.input_device = input_device
        self._saved = saved
        self._offload_dir = offload_dir

    def restore(self) -> None:
        """Remove accelerate's hooks, put the loaded weights back, delete the offload folder (idempotent)."""
        if self._saved is not None:
            from accelerate.hooks import remove_hook_from_module

            remove_hook_from_module(self.model, recurse=True)
            for module, kind, name, tensor in self._saved:
                getattr(module, kind)[name] = tensor
            self.model.__dict__.pop("hf_device_map", None)
            self._saved = None
        if self._offload_dir is not None:
            import shutil

            shutil.rmtree(self._offload_dir, ignore_errors=True)
            self._offload_dir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()


def dispatch(model, spec: DeviceMap, folder=None) -> Dispatched:
    """Place ``model`` (loaded, on the CPU) as ``spec`` says; use it as a context manager or call
    :meth:`Dispatched.restore` when done. Its ``sitemap`` is the one to scan with: the sites are found
    before dispatching (accelerate's hooks wrap forwards in code fx cannot trace through, which would hide
    functional relu calls), then adapted by :func:`sites_for`. ``folder``: the Hugging Face folder the model
    was loaded from, whose safetensors files disk-offloaded layers are then read from as they are (nothing
    copied); other weights on disk are written to a temporary folder."""
    try:
        from accelerate import dispatch_model, infer_auto_device_map
        from accelerate.utils import get_balanced_memory
    except ImportError:
        raise DeviceMapError(f"--device-map needs accelerate, which is not installed: {INSTALL}") from None
    import logging
    import tempfile

    import torch

    from .trace import find_sites

    sitemap = find_sites(model)
    device_map = _layers(model, spec) if spec.mode is None else None
    memory = None if spec.max_memory is None else dict(spec.max_memory)
    _check_devices((device_map or {}).values(), "--device-map")
    _check_devices(memory or {}, "--max-memory")
    no_split = sorted(getattr(model, "_no_split_modules", None) or ())
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    quiet = logging.getLogger("accelerate")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "Some parameters are on the meta device...": expected here
    try:
        if device_map is None:
            if spec.mode != "sequential":
                memory = get_balanced_memory(model, memory, no_split_module_classes=no_split, dtype=dtype,
                                             low_zero=spec.mode == "balanced_low_0")
            try:
                device_map = dict(infer_auto_device_map(model, memory, no_split_module_classes=no_split, dtype=dtype))
            except (ValueError, IndexError, KeyError, RuntimeError) as e:  # accelerate's own failures
                raise DeviceMapError(f"--device-map {spec.describe()}: accelerate cannot infer a device map for this "
                                     f"model ({type(e).__name__}: {one_line(e, 200)}); try another --max-memory or "
                                     "name each module's device in a JSON map") from None
        if device_map.get("") == "disk":  # nothing fits: every top-level module read from disk as it runs
            if next(model.parameters(recurse=False), None) is not None:
                raise DeviceMapError(f"--device-map {spec.describe()}: the whole model is on disk, and its own "
                                     "parameters (outside any module) cannot be offloaded: give a device memory "
                                     "for them")
            device_map = {name: "disk" for name, _ in model.named_children()}
        saved = [(m, kind, name, t) for m in model.modules() for kind in ("_parameters", "_buffers")
                 for name, t in getattr(m, kind).items() if t is not None]
        main = next((d for d in device_map.values() if d not in ("cpu", "disk")), "cpu")
        offload = Path(tempfile.mkdtemp(prefix="deadscan-offload-")) if "disk" in device_map.values() else None
        try:
            index = None if offload is None else _offload(model, device_map, folder, offload)
            dispatch_model(model, device_map, main_device=main, offload_dir=None if offload is None else str(offload),
                           offload_index=index)
        except BaseException as e:
            Dispatched(model, device_map, None, saved, offload).restore()
            if isinstance(e, (ValueError, RuntimeError, OSError)):  # a map accelerate refuses; a full disk
                raise DeviceMapError(f"--device-map {spec.describe()}: accelerate cannot place the model "
                                     f"({type(e).__name__}: {one_line(e, 300)})") from None
            raise
    finally:
        quiet.setLevel(level)
    placed = Dispatched(model, device_map, torch.device(device_name(main)), saved, offload)
    try:
        placed.sitemap = sites_for(sitemap, model, placed, spec)
    except BaseException:
        placed.restore()
        raise
    return placed


def _offload(model, device_map: dict, folder, offload: Path) -> dict:
    """accelerate's offload index of the disk-offloaded tensors: those the folder's safetensors files hold
    (under their own name or the one ``load_folder`` gave them, of the model's shape) are read from there, the
    others (a plain checkpoint's, tensors converted or made on load) are written to ``offload``."""
    from accelerate.utils import offload_weight
    from accelerate.utils.offload import extract_submodules_state_dict

    state = extract_submodules_state_dict(model.state_dict(), [n for n, d in device_map.items() if d == "disk"])
    index = _in_files(model, folder, state) if folder is not None else {}
    for key, tensor in state.items():
        if key not in index:
            offload_weight(tensor, key, str(offload), index)
    return index


def _in_files(model, folder, state: dict) -> dict:
    from safetensors import safe_open

    from .hf import plan

    p = plan(folder)
    if p.format not in ("hf-safetensors", "hf-sharded"):
        return {}
    prefix = getattr(model, "base_model_prefix", "") or ""
    index = {}
    for path in p.files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                key = name  # a base model's save read into a head model, or the other way round (hf._rename)
                if name not in state and prefix:
                    if f"{prefix}.{name}" in state:
                        key = f"{prefix}.{name}"
                    elif name.startswith(prefix + "."):
                        key = name[len(prefix) + 1:]
                t = state.get(key)
                if t is not None and key not in index and list(f.get_slice(name).get_shape()) == list(t.shape):
                    index[key] = {"safetensors_file": str(path), "weight_name": name,
                                  "dtype": str(t.dtype).removeprefix("torch.")}
    return index


def _layers(model, spec: DeviceMap) -> dict:
    out = {}
    for name, device in spec.layers:
        if name:
            try:
                model.get_submodule(name)
            except AttributeError:
                near = [n for n, _ in model.named_children()]
                raise DeviceMapError(f"--device-map: the model has no module {name!r} (its top-level modules: "
                                     f"{', '.join(near[:8])}; \"\" is the whole model)") from None
        out[name] = device
    if "" not in out:  # accelerate's own check names every tensor left out, however many: say it in one line
        left = [k for k in model.state_dict() if not any(k.startswith(name + ".") for name in out)]
        if left:
            raise DeviceMapError(f"--device-map: no device for {len(left)} of the model's tensors (e.g. {left[0]}); "
                                 "name a device for every module holding parameters, or a module above them")
    return out


def _check_devices(devices, option: str) -> None:
    import torch

    devices = list(devices)
    gpus = sorted({d for d in devices if isinstance(d, int)})
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and gpus[-1] >= have:
        there = f"GPUs 0 to {have - 1}" if have else "no CUDA GPU"
        others = "cpu, disk" if option == "--device-map" else "cpu"
        raise DeviceMapError(f"{option} names GPU {gpus[-1]} but this machine has {there}; name only the devices "
                             f"it has ({others})")
    if "mps" in devices and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceMapError(f"{option} names mps but Apple's MPS is not available on this machine")


def check_run(spec: DeviceMap, device: str | None, processes: int) -> None:
    """What ``inspect --device-map`` refuses before any work: another --device, torchrun."""
    if device is not None:
        raise DeviceMapError(f"--device {device} and --device-map {spec.describe()}: choose one (the device map "
                             "places the layers; inputs go to the device of the first layer on an accelerator)")
    if processes > 1:
        raise DeviceMapError("--device-map under torchrun is not supported: run deadscan inspect --device-map in "
                             "one process (it places the layers over every GPU itself)")


def sites_for(sitemap, model, placed: Dispatched, spec: DeviceMap):
    """The sitemap to scan a dispatched model with.

    A site in a traced part of the model is recorded by running an instrumented copy of that part's graph
    in its place, which calls its submodules (and so accelerate's hooks on them) but not the part's own
    hook, and reads tensors it fetches directly (e.g. a norm's weight traced through) as they were when it
    was built: wrong for offloaded ones. So a site that is an activation module (nn.ReLU, nn.ReLU6) called
    once is watched by a module hook instead, as in an opaque forward: the same statistics, nothing swapped.
    Other traced sites (functional relu calls) keep the graph, which is sound on one execution device with
    no offloaded tensor read directly; anything else is refused."""
    from dataclasses import replace

    from .trace import ACT_MODULES, SiteMap

    repeated = {s.name.partition("#")[0] for s in sitemap.sites if "#" in s.name}
    sites = []
    for s in sitemap.sites:
        if not s.hooked and s.name not in repeated and isinstance(_module(model, s.name), ACT_MODULES):
            s = replace(s, hooked=True)
        sites.append(s)
    sitemap = SiteMap(sites, sitemap.opaque, sitemap.parts)
    accelerators = sorted({d for d in placed.device_map.values() if d not in ("cpu", "disk")})
    for i in sorted({s.part for s in sitemap.sites if not s.hooked}):
        part = sitemap.parts[i]
        site = next(s.name for s in sitemap.sites if not s.hooked and s.part == i)
        what = f"the traced forward of {part.path}" if part.path else "the model's traced forward"
        if len(accelerators) > 1:
            raise DeviceMapError(f"--device-map {spec.describe()}: site {site} is recorded by running {what} in "
                                 f"its place, which cannot span devices (the map uses {', '.join(accelerators)}): "
                                 "place the layers on one GPU with cpu and disk offload")
        for node in part.graph.nodes:
            if node.op == "get_attr" and _meta_attr(part.module, str(node.target)):
                raise DeviceMapError(f"--device-map {spec.describe()}: site {site} is recorded by running {what} "
                                     f"in its place, which reads the offloaded tensor {_join(part.path, node.target)} "
                                     "directly: keep the module holding it off the disk (and off cpu offload)")
    return sitemap


def _module(model, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:  # a functional call's site (``owner:relu``) names no module
        return None


def refuse_strip(device_map: str) -> None:
    raise DeviceMapError(f"--device-map {device_map}: strip fine-tunes the model on one device; fine-tuning a model "
                         "dispatched over several devices is not supported: find its dead neurons with deadscan "
                         "inspect --device-map")


def _meta_attr(module, target: str) -> bool:
    obj = module
    for atom in target.split("."):
        obj = getattr(obj, atom, None)
    return getattr(obj, "is_meta", False) is True


def _join(path: str, name) -> str:
    return f"{path}.{name}" if path else str(name)


__all__ = ["DeviceMap", "DeviceMapError", "Dispatched", "dispatch", "check_run", "sites_for", "refuse_strip",
           "parse_max_memory", "MODES"]
