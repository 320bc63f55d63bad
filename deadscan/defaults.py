"""Every default deadscan uses, in one visible place, with units."""

import os
from dataclasses import dataclass

MAX_BYTES_ENV = "DEADSCAN_MAX_BYTES"  # raises (or lowers) max_decoded_bytes for one run


@dataclass(frozen=True)
class Defaults:
    batch_size: int = 256  # samples per scan batch
    tau: float = 0.025  # ReDo dormancy threshold on the normalised score s_i (unitless)
    split: str = "val"  # the paper detects dead neurons on the validation split
    val_fraction: float = 0.1  # of the training set held out as validation (paper: 80/10/10)
    test_fraction: float = 0.1  # of a single-file array dataset kept as test
    seed: int = 0  # seed of the train/val/test split permutation
    out_dir: str = "deadscan-out"  # where outputs go
    plotlyjs: str = "inline"  # report.html: plotly.js inlined (works offline) | cdn | directory
    strip_dir: str = "strip"  # strip's default --out: this folder inside --from, beside the inspect it starts from
    max_header_bytes: int = 100 * 2**20  # largest safetensors JSON header read (bytes)
    # Untrusted files: what one file may make deadscan allocate or decompress, checked against what the
    # file declares before anything is allocated. Raise with the DEADSCAN_MAX_BYTES environment variable.
    max_decoded_bytes: int = 64 * 2**30  # bytes one input file may decode to (arrays, images, members)
    max_expand_ratio: int = 1100  # decompressed / compressed bytes (deflate never exceeds ~1032)
    # torch.save keeps tensor bytes outside its pickles (~30 opcodes, ~100 bytes per tensor): 5M opcodes is
    # ~160k tensors and a few seconds of reading; the byte cap bounds what one opcode argument may take.
    max_pickle_ops: int = 5_000_000  # opcodes read from one pickle before stopping
    max_pickle_bytes: int = 256 * 2**20  # bytes read from one pickle before stopping
    max_json_bytes: int = 64 * 2**20  # largest summary.json read (bytes)
    max_json_depth: int = 64  # nesting of summary.json (lists and objects)


def _from_environment() -> Defaults:
    text = os.environ.get(MAX_BYTES_ENV, "").strip()
    if text.isdigit() and int(text) > 0:
        return Defaults(max_decoded_bytes=int(text))
    return Defaults()


DEFAULTS = _from_environment()
