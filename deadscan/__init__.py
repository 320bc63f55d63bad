"""deadscan: find dead ReLU neurons in any PyTorch model, measure the capacity they waste, and
revive them with Synaptic Stripping."""

__version__ = "0.1.0"

from .capacity import Capacity, capacity  # noqa: E402
from .checkpoint import load_checkpoint, load_masks, save_masks, save_safetensors  # noqa: E402
from .data import Dataset, load_data  # noqa: E402
from .errors import ArchError, CheckpointError, DataError, DeadscanError, OutputError, TraceError  # noqa: E402
from .scan import ScanResult, SiteResult, merge, scan  # noqa: E402
from .strip import Masks, StepReport, Stripper, strip  # noqa: E402
from .trace import Site, SiteMap, find_sites  # noqa: E402
from .zoo import build  # noqa: E402


def load(path, arch=None, *, trust_pickle=False, allow_globals=()):
    """Load a checkpoint into a model (CPU, eval mode). ``arch`` for plain state dicts; ``allow_globals``:
    names a pickle may import (see ``deadscan inspect --list-globals FILE``)."""
    return load_checkpoint(path, arch, trust_pickle=trust_pickle, allow_globals=allow_globals).model


__all__ = [
    "__version__", "load", "load_checkpoint", "save_safetensors", "build", "find_sites", "scan", "merge",
    "capacity", "load_data", "Dataset", "Site", "SiteMap", "ScanResult", "SiteResult", "Capacity",
    "Stripper", "StepReport", "Masks", "strip", "save_masks", "load_masks",
    "DeadscanError", "CheckpointError", "ArchError", "TraceError", "DataError", "OutputError",
]
