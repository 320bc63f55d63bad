"""Peak memory of loading a Hugging Face folder with deadscan, against the checkpoint's size.

    python benchmarks/hf_load_memory.py                # OPT, ~520 MB float32, sharded 100MB
    python benchmarks/hf_load_memory.py --layers 2     # smaller (faster) run
    python benchmarks/hf_load_memory.py --reference    # also transformers' from_pretrained, for comparison

An OPT model (hidden 1024, ffn 4096, vocab 50272, 6 layers: ~130M parameters, ~520 MB in float32) is
built from a config with random weights and saved with ``save_pretrained`` in shards, into a temporary
folder (in a process of its own). Then, in a fresh Python process each: ``import deadscan, transformers``,
read the resident set size (VmRSS), ``deadscan.load(folder)``, and read the peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which counts touched pages of memory-mapped files too).
The figure is (peak - RSS after import) / the size of the weight files. Target: <= 1.3 (weights held
once; the load reads every weight, for the NaN/Inf check, so ~1.0 is expected).

This script itself imports neither torch nor transformers: Linux carries a process's peak RSS across
exec into the children it starts, so a parent holding the model would inflate every child's peak.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAVE = r"""
import sys, time, platform, torch, transformers
folder, layers, shard = sys.argv[1], int(sys.argv[2]), sys.argv[3]
config = transformers.OPTConfig(vocab_size=50272, hidden_size=1024, ffn_dim=4096, num_hidden_layers=layers,
                                num_attention_heads=16, max_position_embeddings=2048, word_embed_proj_dim=1024)
torch.manual_seed(0)
transformers.OPTForCausalLM(config).save_pretrained(folder, max_shard_size=shard)
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")
"""

CHILD = r"""
import resource, sys, time
import deadscan, transformers  # noqa: F401
folder, how = sys.argv[1], sys.argv[2]

def rss():
    try:
        with open("/proc/self/status") as f:  # resident now, in KiB
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

base = rss()
transformers.OPTForCausalLM  # transformers imports a model's code on first use: a fixed cost, not the weights'
code = rss()
t = time.perf_counter()
if how == "deadscan":
    model = deadscan.load(folder)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = sum(p.numel() for p in model.parameters())
print(base * 1024, code * 1024, peak * 1024, seconds, n)
"""


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def measure(folder: Path, how: str) -> tuple[int, int, int, float, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), how], env=ENV, check=True,
                         capture_output=True, text=True).stdout.split()
    return int(out[0]), int(out[1]), int(out[2]), float(out[3]), int(out[4])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--shard", default="100MB", help="save_pretrained max_shard_size")
    ap.add_argument("--reference", action="store_true", help="also measure transformers' from_pretrained")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="deadscan-hf-") as tmp:
        folder = Path(tmp) / "opt"
        t = time.perf_counter()
        versions = subprocess.run([sys.executable, "-c", SAVE, str(folder), str(args.layers), args.shard], env=ENV,
                                  check=True, capture_output=True, text=True).stdout.strip()
        print(f"saved in {time.perf_counter() - t:.1f}s: {folder}", file=sys.stderr)
        weights = [f for f in folder.iterdir() if f.suffix == ".safetensors"]
        size = sum(f.stat().st_size for f in weights)
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}; "
              f"{versions}")
        print(f"checkpoint: OPT {args.layers} layers, {len(weights)} shards, {size / 2**20:.0f} MiB")
        for how in ["deadscan"] + (["from_pretrained"] if args.reference else []):
            base, code, peak, seconds, n = measure(folder, how)
            ratio = (peak - code) / size
            verdict = "" if how != "deadscan" else f"  (target <= 1.3: {'ok' if ratio <= 1.3 else 'MISSED'})"
            print(f"{how:>15}: {n / 1e6:.0f}M params loaded in {seconds:.1f}s; "
                  f"RSS after import {base / 2**20:.0f} MiB, "
                  f"+ OPT's model code {(code - base) / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB; "
                  f"(peak - RSS with the code) / checkpoint = {ratio:.2f}{verdict}; "
                  f"counting the code import too: {(peak - base) / size:.2f}")


if __name__ == "__main__":
    main()
