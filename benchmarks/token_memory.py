"""Host memory of a token dataset: what ``load_data`` holds per token, and its peak while loading.

    python benchmarks/token_memory.py                  # 40M tokens (40,000 sequences of 1,000), uint16 ids
    python benchmarks/token_memory.py --sequences 4000 # smaller (faster) run

Every torchrun process holds the split it scans or trains on, so at billions of tokens the bytes per token
decide whether a machine's processes fit. A token file (``input_ids`` uint16, as GPT-2-sized vocabularies
store them, and an ``attention_mask`` of uint8) is written to a temporary folder; then, in a fresh Python
process: ``import deadscan``, load a tiny file (the modules a load imports), read the resident set size
(VmRSS), ``load_data(file, "all")``, read the peak
(``ru_maxrss``). Printed side by side: the bytes per token the dataset's tensors hold against int64 ids and
mask (the layout every batch has, and what deadscan held before), and the peak over the import's RSS per
token. Targets: held <= 5 bytes a token (int32 ids, bool mask); peak <= 9 (the file's arrays, 3 bytes a
token here, are read before they are converted).

Then the "val" split (a tenth), the same way in two fresh processes side by side: ``load_data(file,
"val")``, which reads only the split's rows from the file a block at a time, against reading the whole
file's arrays and then taking the split's rows (how deadscan read token files before). Printed: each
peak over the split's tokens and their ratio (target >= 2x less; a torchrun process scanning its share
holds a split, not a file).

This script imports neither torch nor numpy at the top: Linux carries a process's peak RSS across exec into
the children it starts.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

WRITE = r"""
import sys, numpy as np
path, n, t = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
ids = rng.integers(0, 50272, size=(n, t), dtype=np.uint16)
mask = np.ones((n, t), np.uint8)
mask[-1, t // 2:] = 0  # a padded last block, as packed text has
np.savez(path, input_ids=ids, attention_mask=mask)
"""

CHILD = r"""
import resource, sys
import torch
from deadscan.data import load_data

def rss():
    with open("/proc/self/status") as f:  # resident now, in KiB
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

split = sys.argv[3]
load_data(sys.argv[2], "all")  # a tiny file first: the modules a load imports are not the data's bytes
base = rss()
if sys.argv[4] == "whole":  # the file's arrays read whole, then the split's rows taken
    from pathlib import Path
    from deadscan.data import tokens
    from deadscan.defaults import DEFAULTS
    from deadscan.files import read_array_file
    found = read_array_file(Path(sys.argv[1]), tokens.KEYS, ("input_ids",), tokens._check_meta, "ids")
    idx = tokens._split_rows(len(found["input_ids"]), split, DEFAULTS.seed, DEFAULTS.val_fraction, None)
    ds = tokens.TokenDataset(sys.argv[1], split, torch.from_numpy(tokens._take(found["input_ids"], idx, "int32")),
                             torch.from_numpy(tokens._take(found["attention_mask"], idx, bool)))
else:
    ds = load_data(sys.argv[1], split)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
held = ds.input_ids.nbytes + ds.attention_mask.nbytes
wide = ds.input_ids.long().nbytes + ds.attention_mask.long().nbytes  # the int64 layout of the same split
print(ds.input_ids.numel(), held, wide, (peak - base) * 1024, ds.input_ids.dtype, ds.attention_mask.dtype,
      torch.__version__)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=40_000)
    ap.add_argument("--seq-len", type=int, default=1_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokens.npz"
        subprocess.run([sys.executable, "-c", WRITE, str(path), str(args.sequences), str(args.seq_len)], check=True)
        tiny = Path(tmp) / "tiny.npz"
        subprocess.run([sys.executable, "-c", WRITE, str(tiny), "4", "8"], check=True)
        def child(split: str, how: str) -> list[str]:
            return subprocess.run([sys.executable, "-c", CHILD, str(path), str(tiny), split, how], check=True,
                                  capture_output=True, text=True).stdout.split()

        out = child("all", "rows")
        split_rows, split_whole = child("val", "rows"), child("val", "whole")
        size = path.stat().st_size
    tokens, held, wide, peak, ids_dtype, mask_dtype, torch_version = out
    tokens, held, wide, peak = int(tokens), int(held), int(wide), int(peak)
    print(f"python {platform.python_version()}, torch {torch_version}, {platform.machine()}")
    print(f"{tokens:,} tokens, file {size / 2**20:.0f} MiB ({size / tokens:.1f} bytes a token: uint16 ids, uint8 mask)")
    print(f"held:  {held / tokens:.1f} bytes a token ({ids_dtype}, {mask_dtype}); int64 layout {wide / tokens:.1f}; "
          f"ratio {wide / held:.2f}x less (target <= 5 bytes a token)")
    print(f"peak while loading: {peak / tokens:.1f} bytes a token over the import (target <= 9)")
    val_tokens, rows_peak, whole_peak = int(split_rows[0]), int(split_rows[3]), int(split_whole[3])
    assert int(split_whole[0]) == val_tokens
    print(f"val split ({val_tokens:,} tokens), peak while loading: {rows_peak / val_tokens:.1f} bytes a split token "
          f"reading only its rows vs {whole_peak / val_tokens:.1f} reading the whole file first; ratio "
          f"{whole_peak / rows_peak:.2f}x less (target >= 2x)")
    return 0 if held / tokens <= 5 and peak / tokens <= 9 and whole_peak >= 2 * rows_peak else 1


if __name__ == "__main__":
    sys.exit(main())
