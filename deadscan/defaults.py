"""Every default deadscan uses, in one visible place, with units."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Defaults:
    batch_size: int = 256  # samples per scan batch
    tau: float = 0.025  # ReDo dormancy threshold on the normalised score s_i (unitless)
    split: str = "val"  # the paper detects dead neurons on the validation split
    val_fraction: float = 0.1  # of the training set held out as validation (paper: 80/10/10)
    test_fraction: float = 0.1  # of a single-file array dataset kept as test
    seed: int = 0  # seed of the train/val/test split permutation
    out_dir: str = "deadscan-out"  # where outputs go
    max_header_bytes: int = 100 * 2**20  # largest safetensors JSON header read (bytes)


DEFAULTS = Defaults()
