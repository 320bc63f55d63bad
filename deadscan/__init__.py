"""deadscan: find dead ReLU neurons in any PyTorch model, measure the capacity they waste, and
revive them with Synaptic Stripping."""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# Public name -> the module defining it. Imported on first use (PEP 562): `import deadscan`, and with it
# the command line's help and --version, never pay for importing torch.
_LAZY = {
    "Capacity": "capacity", "capacity": "capacity",
    "load_checkpoint": "checkpoint", "load_masks": "checkpoint", "save_masks": "checkpoint",
    "save_safetensors": "checkpoint", "load_safetensors": "checkpoint",
    "Dataset": "data", "load_data": "data",
    "ArchError": "errors", "CheckpointError": "errors", "DataError": "errors", "DeadscanError": "errors",
    "OutputError": "errors", "TraceError": "errors",
    "Run": "runs", "read_run": "runs",
    "ScanResult": "scan", "SiteResult": "scan", "merge": "scan", "scan": "scan",
    "Masks": "strip", "StepReport": "strip", "Stripper": "strip", "strip": "strip",
    "Site": "trace", "SiteMap": "trace", "find_sites": "trace",
    "build": "zoo",
}


def load(path, arch=None, *, trust_pickle=False, allow_globals=()):
    """Load a checkpoint into a model (CPU, eval mode). ``arch`` for plain state dicts; ``allow_globals``:
    names a pickle may import (see ``deadscan inspect --list-globals FILE``)."""
    from .checkpoint import load_checkpoint

    return load_checkpoint(path, arch, trust_pickle=trust_pickle, allow_globals=allow_globals).model


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:  # a submodule (deadscan.data, deadscan.zoo, ...), as eager imports used to bind them
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'deadscan' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    # Importing a submodule binds it on the package ("strip", "scan", "capacity" share the names of
    # their modules), so the public function must be bound after the import, replacing the module.
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # The import system binds a newly imported submodule on its package: deadscan.scan, .strip and
        # .capacity would then be modules; the public names are the functions, as with eager imports.
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__", "load", "load_checkpoint", "save_safetensors", "load_safetensors", "build", "find_sites", "scan", "merge",
    "capacity", "load_data", "read_run", "Run", "Dataset", "Site", "SiteMap", "ScanResult", "SiteResult", "Capacity",
    "Stripper", "StepReport", "Masks", "strip", "save_masks", "load_masks",
    "DeadscanError", "CheckpointError", "ArchError", "TraceError", "DataError", "OutputError",
]
