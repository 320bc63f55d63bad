"""End-to-end flows the CLI runs: load -> trace -> scan -> capacity -> summary."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .capacity import Capacity, capacity
from .checkpoint import Checkpoint, load_checkpoint
from .data import Dataset, check_fits, load_data
from .defaults import DEFAULTS
from .report import build_summary, write_summary
from .scan import ScanResult, resolve_device, scan
from .trace import find_sites


@dataclass
class Inspection:
    checkpoint: Checkpoint
    dataset: Dataset
    scan: ScanResult
    capacity: Capacity
    summary: dict
    summary_path: Path


def inspect(checkpoint: str | Path, data: str, *, out: str | Path = DEFAULTS.out_dir, arch: str | None = None,
            trust_pickle: bool = False, split: str = DEFAULTS.split, limit: int | None = None,
            batch_size: int = DEFAULTS.batch_size, device: str | None = None, tau: float = DEFAULTS.tau,
            data_root: str | None = None, download: bool = False, seed: int = DEFAULTS.seed,
            command: str = "", progress: bool = False) -> Inspection:
    start = time.perf_counter()
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint, arch, trust_pickle=trust_pickle)
    ds = load_data(data, split, root=data_root, download=download, limit=limit, seed=seed)
    model = ckpt.model.to(dev)
    check_fits(model, ds, dev)
    sitemap = find_sites(model)
    result = scan(model, ds, sitemap=sitemap, batch_size=batch_size, device=dev, tau=tau, progress=progress)
    cap = capacity(model, result)
    summary = build_summary(result, cap, command=command, checkpoint=ckpt.info, data=ds.describe(),
                            elapsed=time.perf_counter() - start)
    path = write_summary(summary, out)
    return Inspection(ckpt, ds, result, cap, summary, path)
