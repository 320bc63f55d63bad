"""The paper's Table I protocol, with and without Synaptic Stripping, on real data available offline.

    python benchmarks/paper_table1.py                      # digits, the full 3 x 3 grid, 50 epochs, seeds 0,1,2
    python benchmarks/paper_table1.py --quick              # 2 epochs, L in {2}, N in {256}, seed 0: a smoke run
    python benchmarks/paper_table1.py --depths 2,4 --widths 256,512 --json benchmarks/results.json
    python benchmarks/paper_table1.py --data cifar10 --data-root ~/data   # where the files exist

Protocol (paper, Table I): MLP with L in {2, 4, 8} hidden layers of N in {256, 512, 1024} ReLU
neurons, Adam lr 1e-3 (no weight decay), batch 64, 50 epochs, constant lr, no augmentation,
80/10/10 split, dead neurons detected on the validation split after every epoch; stripping prunes
10% of each dead neuron's remaining incoming weights. Both runs of a configuration and seed start
from the same initialisation and data order; the seed sets both (the data split is always the
loader's fixed one).

Reported per configuration, over the seeds, as mean (min-max):
  Acc   peak validation accuracy over the epochs (the paper's Acc)
  Test  held-out test accuracy of the final model
  #D    dead neurons at the end: a scan of the validation split after the last strip step
  %A    active parameters at the end: deadscan.capacity on that scan, pruned weights counted inactive

The claims checked: dead neurons grow with width and depth; stripping removes nearly all of them
and raises %A on every configuration; accuracy is not hurt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import deadscan
from deadscan.capacity import capacity
from deadscan.finetune import TrainConfig, finetune
from deadscan.scan import resolve_device
from deadscan.zoo import build

METRICS = ("acc", "test_acc", "dead", "active_percent")


def run(spec: str, splits: dict, strip: bool, epochs: int, seed: int, device) -> dict:
    """One training run; the end state is a scan after the last strip step (not the last history row)."""
    torch.manual_seed(seed)
    model = build(spec)
    cfg = TrainConfig(epochs=epochs, lr=1e-3, batch_size=64, warmup=0, schedule="constant", rate=0.1,
                      strip=strip, augment="none", train_seed=seed, optimizer="adam", weight_decay=0.0)
    t = time.perf_counter()
    res = finetune(model, splits["train"], splits["val"], cfg, device=device, test=splits["test"])
    final = deadscan.scan(model, splits["val"], sitemap=res.stripper.sitemap, device=device)
    cap = capacity(model, final, res.stripper.masks.masks)
    return {"seed": seed, "acc": max(r["val_acc"] for r in res.history), "test_acc": res.test["acc"],
            "dead": final.dead, "active_percent": round(cap.active_percent, 4),
            "last_row_dead": res.history[-1]["dead"], "pruned_weights": cap.pruned_weights,
            "seconds": round(time.perf_counter() - t, 1)}


def summarize(runs: list[dict]) -> dict:
    """metric -> {mean, min, max} over the seeds."""
    return {m: {"mean": statistics.fmean(r[m] for r in runs), "min": min(r[m] for r in runs),
                "max": max(r[m] for r in runs)} for m in METRICS}


def cell(s: dict, digits: int) -> str:
    if s["min"] == s["max"]:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--depths", default="2,4,8")
    p.add_argument("--widths", default="256,512,1024")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated; each seeds the initialisation and data order")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write every run and the summaries to this file "
                                                "(rewritten after each configuration)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.depths, args.widths, args.seeds = 2, "2", "256", "0"
    seeds = [int(s) for s in args.seeds.split(",")]
    dev = resolve_device(args.device)
    splits = {s: deadscan.load_data(args.data, s, root=args.data_root) for s in ("train", "val", "test")}
    in_features = int(torch.tensor(splits["train"].x.shape[1:]).prod())
    classes = splits["train"].classes
    header = (f"{args.data}: {len(splits['train'])} train / {len(splits['val'])} val / {len(splits['test'])} test, "
              f"{args.epochs} epochs, seeds {','.join(map(str, seeds))}, device {dev}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} thread(s)")
    print(header)
    print("Each cell: mean (min-max) over the seeds. Acc: peak val acc; Test: test acc at the end; "
          "#D, %A: a scan after the last strip step.\n")
    print("| L | N | Acc (base) | Test (base) | #D (base) | %A (base) "
          "| Acc (SS) | Test (SS) | #D (SS) | %A (SS) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows, start = [], time.perf_counter()
    for depth in map(int, args.depths.split(",")):
        for width in map(int, args.widths.split(",")):
            spec = f"mlp(depth={depth}, width={width}, in_features={in_features}, classes={classes})"
            row = {"depth": depth, "width": width}
            for name, strip in (("baseline", False), ("stripping", True)):
                runs = [run(spec, splits, strip, args.epochs, seed, dev) for seed in seeds]
                row[name] = {"runs": runs, "summary": summarize(runs)}
            rows.append(row)
            cells = [cell(row[n]["summary"][m], d) for n in ("baseline", "stripping")
                     for m, d in zip(METRICS, (2, 2, 1, 2))]
            print(f"| {depth} | {width} | " + " | ".join(cells) + " |", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(
                    {"header": header, "data": args.data, "epochs": args.epochs, "seeds": seeds,
                     "spread": "min-max over seeds", "seconds": round(time.perf_counter() - start, 1),
                     "rows": rows}, indent=1) + "\n")
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
