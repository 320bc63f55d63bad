"""The paper's Table I protocol, with and without Synaptic Stripping, on real data available offline.

    python benchmarks/paper_table1.py                      # digits, the full 3 x 3 grid, 50 epochs
    python benchmarks/paper_table1.py --quick              # 2 epochs, L in {2}, N in {256}: a smoke run
    python benchmarks/paper_table1.py --data cifar10 --data-root ~/data   # where the files exist

Protocol (paper, Table I): MLP with L in {2, 4, 8} hidden layers of N in {256, 512, 1024} ReLU
neurons, Adam lr 1e-3, batch 64, 50 epochs, constant lr, no augmentation, 80/10/10 split, dead
neurons detected on the validation split after every epoch; stripping prunes 10% of each dead
neuron's remaining incoming weights. Both runs of a configuration start from the same
initialisation and data order (same seed). Reported: peak validation accuracy (Acc), dead neurons
after the last epoch (#D), %A at the end (pruned weights counted inactive).

The claims checked: dead neurons grow with width and depth; stripping removes nearly all of them
and raises %A on every configuration; accuracy is not hurt.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import deadscan
from deadscan.finetune import TrainConfig, finetune
from deadscan.scan import resolve_device
from deadscan.zoo import build


def run(spec: str, splits: dict, strip: bool, epochs: int, seed: int, device) -> dict:
    torch.manual_seed(seed)
    model = build(spec)
    cfg = TrainConfig(epochs=epochs, lr=1e-3, batch_size=64, warmup=0, schedule="constant", rate=0.1,
                      strip=strip, augment="none", train_seed=seed, optimizer="adam", weight_decay=0.0)
    t = time.perf_counter()
    res = finetune(model, splits["train"], splits["val"], cfg, device=device, test=splits["test"])
    last = res.history[-1]
    return {"acc": max(r["val_acc"] for r in res.history), "dead": last["dead"],
            "active_percent": last["active_percent"], "test_acc": res.test["acc"],
            "seconds": round(time.perf_counter() - t, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--depths", default="2,4,8")
    p.add_argument("--widths", default="256,512,1024")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.depths, args.widths = 2, "2", "256"
    dev = resolve_device(args.device)
    splits = {s: deadscan.load_data(args.data, s, root=args.data_root) for s in ("train", "val", "test")}
    in_features = int(torch.tensor(splits["train"].x.shape[1:]).prod())
    classes = splits["train"].classes
    print(f"{args.data}: {len(splits['train'])} train / {len(splits['val'])} val / {len(splits['test'])} test, "
          f"{args.epochs} epochs, device {dev}, torch {torch.__version__}")
    print()
    print("| L | N | Acc (base) | #D (base) | %A (base) | Acc (SS) | #D (SS) | %A (SS) |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for depth in map(int, args.depths.split(",")):
        for width in map(int, args.widths.split(",")):
            spec = f"mlp(depth={depth}, width={width}, in_features={in_features}, classes={classes})"
            base = run(spec, splits, False, args.epochs, args.seed, dev)
            ss = run(spec, splits, True, args.epochs, args.seed, dev)
            rows.append({"depth": depth, "width": width, "baseline": base, "stripping": ss})
            print(f"| {depth} | {width} | {base['acc']:.2f} | {base['dead']} | {base['active_percent']:.2f} "
                  f"| {ss['acc']:.2f} | {ss['dead']} | {ss['active_percent']:.2f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"data": args.data, "epochs": args.epochs, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
