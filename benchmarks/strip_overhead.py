"""Cost of Synaptic Stripping, measured side by side in one run.

    python benchmarks/strip_overhead.py            # both parts
    python benchmarks/strip_overhead.py --quick    # tiny sizes: a smoke run

(a) The strip step (``deadscan.strip.strip_layer``, one vectorised op per layer) vs a per-neuron
    Python loop with ``torch.quantile`` like the paper's reference code, on the paper ViT's MLP
    layer shapes (7 blocks: fc1 1536x384, fc2 384x1536) with ~1500 dead neurons spread over them.
    Both produce masks; the benchmark checks they prune the same number of weights per neuron where
    the two rules agree (every dead row has >= k negative weights). Target: >= 50x faster.
(b) A fine-tuning epoch with detection + stripping (scan the validation split, strip) vs the same
    epoch without, same model, data and device. Target: <= 1.05.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import deadscan
from deadscan.scan import resolve_device
from deadscan.strip import Stripper, strip_layer


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def reference_strip(weight: torch.Tensor, mask: torch.Tensor, rows: list[int], rate: float) -> None:
    """Per-neuron loop in the style of the reference code: a quantile threshold per dead neuron."""
    for i in rows:
        w = weight[i]
        remaining = w[~mask[i]]
        threshold = torch.quantile(remaining, rate)
        mask[i] |= (w <= threshold) & (w < 0)


def part_a(dev: torch.device, dead_total: int, repeats: int, rate: float) -> dict:
    gen = torch.Generator().manual_seed(0)
    shapes = [(1536, 384), (384, 1536)] * 7  # fc1, fc2 of 7 blocks
    layers = [(torch.randn(s, generator=gen) * 0.05 - 0.02).to(dev) for s in shapes]
    per_layer = dead_total // len(layers)
    rows = [torch.randperm(w.shape[0], generator=gen)[:per_layer].sort().values.to(dev) for w in layers]

    def ours():
        masks = [torch.zeros_like(w, dtype=torch.bool) for w in layers]
        for w, m, r in zip(layers, masks, rows):
            strip_layer(w, m, r, rate)
        _sync(dev)
        return masks

    def reference():
        masks = [torch.zeros_like(w, dtype=torch.bool) for w in layers]
        for w, m, r in zip(layers, masks, rows):
            reference_strip(w, m, r.tolist(), rate)
        _sync(dev)
        return masks

    ours(), reference()  # warm-up
    t_ours, t_ref = [], []
    for _ in range(repeats):
        t = time.perf_counter(); mo = ours(); t_ours.append(time.perf_counter() - t)
        t = time.perf_counter(); mr = reference(); t_ref.append(time.perf_counter() - t)
    pruned_ours = sum(int(m.sum()) for m in mo)
    pruned_ref = sum(int(m.sum()) for m in mr)
    return {"dead": per_layer * len(layers), "ours_s": statistics.median(t_ours), "ref_s": statistics.median(t_ref),
            "pruned_ours": pruned_ours, "pruned_ref": pruned_ref}


def part_b(dev: torch.device, train_n: int, val_n: int, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = deadscan.build("mlp(depth=2, width=512, in_features=3072)").to(dev)
    x = torch.rand(train_n, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (train_n,), device=dev)
    val = torch.rand(val_n, 3, 32, 32, device=dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    stripper = Stripper(model, opt, rate=0.1, batch_size=512, device=dev)

    def epoch(detect: bool) -> float:
        t = time.perf_counter()
        model.train()
        perm = torch.randperm(train_n, device=dev)
        for i in range(0, train_n, batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if detect:
            stripper.step(val)
        _sync(dev)
        return time.perf_counter() - t

    epoch(True), epoch(False)  # warm-up
    plain, with_strip = [], []
    for _ in range(repeats):
        plain.append(epoch(False))
        with_strip.append(epoch(True))
    return {"plain_s": statistics.median(plain), "strip_s": statistics.median(with_strip)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    dev = resolve_device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"device: {dev} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}")

    a = part_a(dev, 140 if args.quick else 1500, 1 if args.quick else args.repeats, 0.1)
    speed = a["ref_s"] / a["ours_s"]
    print(f"\n(a) strip step, {a['dead']} dead neurons over 14 ViT MLP layers (rate 0.1)")
    print(f"    per-neuron quantile loop {a['ref_s'] * 1000:9.2f} ms   pruned {a['pruned_ref']}")
    print(f"    deadscan strip_layer     {a['ours_s'] * 1000:9.2f} ms   pruned {a['pruned_ours']}")
    print(f"    speed-up {speed:.1f}x   (target >= 50x: {'met' if speed >= 50 else 'MISSED'})")

    if args.quick:
        b = part_b(dev, 2048, 256, 128, 1)
    else:
        b = part_b(dev, 18000, 2000, 128, args.repeats)
    ratio = b["strip_s"] / b["plain_s"]
    print("\n(b) fine-tuning epoch, paper MLP (depth 2, width 512) on CIFAR-shaped data, batch 128")
    print(f"    epoch without detection   {b['plain_s']:8.3f} s")
    print(f"    epoch with scan + strip   {b['strip_s']:8.3f} s")
    print(f"    ratio {ratio:.3f}   (target <= 1.05: {'met' if ratio <= 1.05 else 'MISSED'})")


if __name__ == "__main__":
    main()
