"""Scan throughput in 1 and 2 torchrun processes (gloo, CPU, one thread each), measured side by side.

    python benchmarks/scan_distributed.py              # the paper MLP, 8192 CIFAR-sized inputs
    python benchmarks/scan_distributed.py --quick      # tiny sizes: a smoke run in seconds
    python benchmarks/scan_distributed.py --repeats 5 --samples 16384

Each repeat launches ``torchrun --nproc-per-node 1`` then ``--nproc-per-node 2`` (alternating, so drift
on a shared machine hits both alike). Every process builds the same model and the same seeded inputs
(a float tensor in memory), runs one warm-up scan, then a timed ``deadscan.scan`` of the whole set
between two barriers: its shard's forwards plus the all-reduce of the statistics. Process start-up,
model building and the warm-up are not timed. Throughput = samples / the slowest process's time.
Reported: the median throughput of each, and the speed-up (2-process / 1-process, ratio of medians;
target >= 1.7). Printed beside it: the same ratio from the slowest process's CPU time (time spent
descheduled does not count), an estimate of what an idle machine would give. With two processes on a
two-core machine every core is busy: anything else running there shows up in the 2-process figure first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 1.7


def worker(out: str, spec: str, samples: int, batch: int) -> None:
    """Runs in each torchrun process; process 0 writes its timing to ``out``."""
    import torch
    import torch.distributed as dist

    import deadscan
    from deadscan import distributed

    torch.set_num_threads(1)
    group = distributed.setup("cpu")
    model = deadscan.build(spec).eval()
    x = torch.randn(samples, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sitemap = deadscan.find_sites(model)
    deadscan.scan(model, x[: 2 * batch * group.world], sitemap=sitemap, batch_size=batch)  # warm-up
    if group.active:
        dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    result = deadscan.scan(model, x, sitemap=sitemap, batch_size=batch)
    cpu = torch.tensor([time.process_time() - cpu], dtype=torch.float64)
    if group.active:
        dist.barrier()  # the slowest process's time
    elapsed = time.perf_counter() - start
    group.all_reduce(cpu, "max")
    if group.is_main:
        Path(out).write_text(json.dumps({"seconds": elapsed, "cpu_seconds": cpu.item(), "samples": result.samples,
                                         "processes": result.processes, "dead": result.dead}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, args, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), __file__, "--worker", str(out),
           "--spec", args.spec, "--samples", str(args.samples), "--batch", str(args.batch)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        sys.exit(f"torchrun --nproc-per-node {nproc} failed:\n{res.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--spec", default="mlp(depth=2, width=1024, in_features=3072)")
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the benchmark runs, measures nothing")
    p.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.spec, args.samples, args.batch)
        return 0
    if args.quick:
        args.spec, args.samples, args.batch, args.repeats = "mlp(depth=2, width=64, in_features=3072)", 256, 64, 1

    import torch

    import deadscan

    print(f"deadscan {deadscan.__version__}, torch {torch.__version__}, python {platform.python_version()}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs (os.cpu_count), gloo on CPU, 1 thread per process")
    print(f"{args.spec}, {args.samples} inputs (3, 32, 32), batch {args.batch}, {args.repeats} repeats (median)")
    rates: dict[int, list[float]] = {1: [], 2: []}
    cpu_rates: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for nproc in (1, 2):
                r = launch(nproc, args, Path(tmp) / f"{nproc}-{i}.json")
                assert (r["samples"], r["processes"]) == (args.samples, nproc), r
                rates[nproc].append(r["samples"] / r["seconds"])
                cpu_rates[nproc].append(r["samples"] / r["cpu_seconds"])
                print(f"  repeat {i + 1}: {nproc} process{'es' if nproc > 1 else ''}  {r['seconds']:.3f} s  "
                      f"{rates[nproc][-1]:,.0f} samples/s  (CPU time {r['cpu_seconds']:.3f} s; dead {r['dead']})")
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    ratio = two / one
    print(f"1 process   {one:,.0f} samples/s")
    print(f"2 processes {two:,.0f} samples/s")
    verdict = "(quick: sizes too small to mean anything)" if args.quick else (
        "meets" if ratio >= TARGET else "BELOW") + f" the target {TARGET}x"
    print(f"speed-up {ratio:.2f}x {verdict}")
    cpu_ratio = statistics.median(cpu_rates[2]) / statistics.median(cpu_rates[1])
    print(f"speed-up by CPU time {cpu_ratio:.2f}x (the slowest process's CPU time: time spent descheduled "
          "by other work on the machine does not count; an estimate, not the target's measure)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
