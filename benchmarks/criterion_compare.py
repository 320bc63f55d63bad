"""Which strip criterion revives more neurons per pruned weight? Three starting models, side by side.

    python benchmarks/criterion_compare.py                       # 5 epochs per run, seeds 0,1,2
    python benchmarks/criterion_compare.py --epochs 2 --seeds 0  # a smoke run
    python benchmarks/criterion_compare.py --json benchmarks/criterion_compare.json

Settings compared (each fine-tuned from the same starting model with Adam 1e-3, no weight decay,
batch 64, constant lr, no augmentation, rate 0.1):
  none                  no stripping: detection only (what training alone revives)
  weight                the paper's criterion: a dead neuron's most negative incoming weights, floor rule
  contribution          the most negative w_i * E[x_i] (E[x_i] measured on the validation split), floor rule
  weight + reference    the paper's criterion with the reference code's quantile rule (--prune-rule reference)

Starting models:
  mlp_digits    sample_models/mlp_digits.safetensors (186 dead of 1024)
  vit_digits    sample_models/vit_digits.safetensors (4 dead of 384)
  vit_planted   made here, the same every run: vit_digits' architecture built with seed 0, trained 8 epochs
                on digits with Adam at lr 3e-3 (high for it; constant, batch 64), which kills neurons after fc2;
                then 16 rows of each fc1 (chosen with seed 0) are planted dead: the bias is lowered so the
                row's largest pre-activation over the train and validation splits is -0.1.

A seed sets the data order (train_seed) and torch's generator; the starting model is the same for
all seeds. Per run: dead at the start (a scan before training) and at the end (a scan after the last
strip step); revived = DISTINCT neurons found dead at one detection and alive at the next (the
per-epoch scans and the final scan), so a neuron that dies and revives twice counts once; pruned
weights at the end; test accuracy at the end. Each cell: mean (min-max) over the seeds.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import deadscan
from deadscan.data import resource_path
from deadscan.finetune import TrainConfig, finetune

VIT = "vit-relu(img_size=8, patch_size=2, in_chans=1, classes=10, depth=2, heads=4, dim=64, mlp_dim=128)"
SETTINGS = {  # name -> TrainConfig fields
    "none": {"strip": False},
    "weight": {"criterion": "weight"},
    "contribution": {"criterion": "contribution"},
    "weight + reference": {"criterion": "weight", "prune_rule": "reference"},
}
METRICS = ("dead_start", "dead_end", "revived", "pruned", "per_1000", "test_acc")


def config(epochs: int, rate: float, seed: int, lr: float = 1e-3, **kw) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=lr, batch_size=64, warmup=0, schedule="constant", rate=rate,
                       augment="none", train_seed=seed, optimizer="adam", weight_decay=0.0, **kw)


def planted_vit(splits: dict, per_layer: int = 16) -> torch.nn.Module:
    """A small ReLU ViT trained fast enough to kill neurons, then ``per_layer`` fc1 rows per block planted dead."""
    torch.manual_seed(0)
    model = deadscan.build(VIT)
    cfg = config(8, 0.1, 0, strip=False, lr=3e-3)
    finetune(model, splits["train"], splits["val"], cfg, device=torch.device("cpu"))
    model.eval()
    gen = torch.Generator().manual_seed(0)
    inputs = torch.cat([splits[s].prepare(splits[s].x) for s in ("train", "val")])
    for block in model.blocks:
        fc1 = block.mlp.fc1
        seen = []
        hook = fc1.register_forward_hook(lambda m, i, o: seen.append(o.detach().amax(dim=(0, 1))))
        with torch.no_grad():
            model(inputs)
        hook.remove()
        rows = torch.randperm(fc1.out_features, generator=gen)[:per_layer]
        with torch.no_grad():
            fc1.bias[rows] -= seen[0][rows] + 0.1  # largest pre-activation becomes -0.1
    return model


def run(model: torch.nn.Module, splits: dict, cfg: TrainConfig) -> dict:
    start = deadscan.scan(model, splits["val"]).dead
    res = finetune(model, splits["train"], splits["val"], cfg, device=torch.device("cpu"), test=splits["test"])
    final = deadscan.scan(model, splits["val"], sitemap=res.stripper.sitemap)
    revived = {(site, i) for row in res.history for site, idx in row["revived_neurons"].items() for i in idx}
    for r in final.sites:  # the last strip step's revivals show only in the scan after it
        before = res.stripper.previous.get(r.site.name)
        if before is not None:
            revived |= {(r.site.name, int(i)) for i in np.flatnonzero(before & ~r.dead)}
    pruned = res.stripper.masks.pruned()
    return {"seed": cfg.train_seed, "dead_start": start, "dead_end": final.dead, "revived": len(revived),
            "pruned": pruned, "per_1000": 1000 * len(revived) / pruned if pruned else float("nan"),
            "test_acc": res.test["acc"]}


def cell(values: list[float], digits: int) -> str:
    values = [v for v in values if v == v]  # drop NaN (no weight pruned)
    if not values:
        return "-"
    lo, hi, mean = min(values), max(values), statistics.fmean(values)
    return f"{mean:.{digits}f}" if lo == hi else f"{mean:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--json", default=None, help="also write every run to this file")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    splits = {s: deadscan.load_data("digits", s) for s in ("train", "val", "test")}
    t0 = time.perf_counter()
    models = {name: deadscan.load(resource_path("sample_models", f"{name}.safetensors"))
              for name in ("mlp_digits", "vit_digits")}
    models["vit_planted"] = planted_vit(splits)
    print(f"digits, {args.epochs} epochs, rate {args.rate}, seeds {args.seeds}, CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); vit_planted made in {time.perf_counter() - t0:.0f} s")
    print("Each cell: mean (min-max) over the seeds.\n")
    print("| model | setting | dead at start | dead at end | revived (distinct) | pruned weights "
          "| revived per 1000 pruned | test acc |")
    print("|---|---|---|---|---|---|---|---|")
    out = []
    for name, start in models.items():
        for setting, kw in SETTINGS.items():
            runs = [run(copy.deepcopy(start), splits, config(args.epochs, args.rate, seed, **kw)) for seed in seeds]
            out.append({"model": name, "setting": setting, "runs": runs})
            cells = [cell([r[m] for r in runs], d) for m, d in zip(METRICS, (0, 1, 1, 0, 1, 2))]
            print(f"| {name} | {setting} | " + " | ".join(cells) + " |", flush=True)
    seconds = round(time.perf_counter() - t0, 1)
    print(f"\n{seconds:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"epochs": args.epochs, "rate": args.rate, "seeds": seeds,
                                               "spread": "min-max over seeds", "seconds": seconds,
                                               "torch": torch.__version__, "rows": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
