"""Which strip criterion revives more neurons per pruned weight? The sample models, side by side.

    python benchmarks/criterion_compare.py              # 5 epochs per run
    python benchmarks/criterion_compare.py --epochs 0   # one strip step and a re-scan, no training

``weight`` (the paper's) prunes a dead neuron's most negative incoming weights; ``contribution``
prunes those with the most negative w_i * E[x_i], E[x_i] measured on the validation split during
the scan. Each model is fine-tuned from its checkpoint with the same seed and settings (Adam
1e-3, batch 64, constant lr, rate 0.1) once per criterion. "revived" sums, over epochs, the
neurons dead at one detection and alive at the next.
"""

from __future__ import annotations

import argparse

import torch

import deadscan
from deadscan.data import resource_path
from deadscan.finetune import TrainConfig, finetune

MODELS = ("mlp_digits.safetensors", "vit_digits.safetensors")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--rate", type=float, default=0.1)
    args = p.parse_args()
    dev = torch.device("cpu")
    splits = {s: deadscan.load_data("digits", s) for s in ("train", "val", "test")}
    print(f"digits, {args.epochs} epochs, rate {args.rate}, CPU\n")
    print("| model | criterion | dead before | dead after | revived | pruned weights | revived per 1000 pruned | test acc |")
    print("|---|---|---|---|---|---|---|---|")
    for name in MODELS:
        for criterion in ("weight", "contribution"):
            model = deadscan.load(resource_path("sample_models", name))
            cfg = TrainConfig(epochs=args.epochs, lr=1e-3, batch_size=64, warmup=0, schedule="constant",
                              rate=args.rate, criterion=criterion, augment="none", train_seed=0,
                              optimizer="adam", weight_decay=0.0)
            res = finetune(model, splits["train"], splits["val"], cfg, device=dev, test=splits["test"])
            before = res.history[0]["dead"]
            after = deadscan.scan(model, splits["val"]).dead
            revived = sum(r["revived"] for r in res.history)
            pruned = res.history[-1]["pruned_weights"]
            per = 1000 * revived / pruned if pruned else float("nan")
            print(f"| {name} | {criterion} | {before} | {after} | {revived} | {pruned} | {per:.1f} | "
                  f"{res.test['acc']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
