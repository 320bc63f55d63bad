"""Regenerate every file in sample_models/, deterministically.

    python sample_models/generate.py

Writes, next to this script:

- ``digits.npz``: sklearn's 8x8 digits, ``x`` float32 (N, 1, 8, 8) in [0, 1], ``y`` int64.
- ``mlp_digits.safetensors``: the paper's MLP (Table I protocol: Adam lr 1e-3, batch 64,
  50 epochs) trained on the train split of digits; arch spec in its metadata.
- ``mlp_digits.pt``: the same weights as a plain ``torch.save(state_dict)`` (needs ``--arch``).
- ``vit_digits.safetensors``: a small ReLU ViT trained briefly on digits (AdamW); spec in metadata.
- ``README.md``: what each file is, with the figures this script prints.

Everything runs on one CPU thread with deterministic algorithms, fixed seeds and a seeded data
order, so two runs on the same machine and torch version give byte-identical files (check with
``sha256sum sample_models/*``). Another CPU or torch version may round differently.

scikit-learn is needed only here, to fetch the digits; deadscan never imports it at run time.
"""

from __future__ import annotations

import hashlib
import io
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import deadscan
from deadscan.checkpoint import atomic_path, write_text_atomic
from deadscan.zoo import build

HERE = Path(__file__).resolve().parent
SEED = 0

MLP_SPEC = "mlp(depth=4, width=256, in_features=64, classes=10)"
MLP_LR = 1e-3  # the paper's lr; at 50 epochs it already leaves ~18% of hidden neurons dead here
MLP_EPOCHS = 50
MLP_BATCH = 64

VIT_SPEC = "vit-relu(img_size=8, patch_size=2, in_chans=1, classes=10, depth=2, heads=4, dim=64, mlp_dim=128)"
VIT_LR = 1e-3  # the paper's AdamW settings (lr 1e-3, wd 5e-5), a short warm-up then cosine to 1e-5
VIT_WD = 5e-5
VIT_EPOCHS = 30
VIT_WARMUP_EPOCHS = 2
VIT_MIN_LR = 1e-5
VIT_BATCH = 64


def setup_determinism() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def write_digits(path: Path) -> None:
    from sklearn.datasets import load_digits  # only this script needs sklearn

    digits = load_digits()
    x = (digits.data / 16).astype(np.float32).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    # numpy writes the zip entries with a fixed 1980 timestamp: same arrays, same bytes.
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, x=x, y=y)


def load_split(split: str) -> deadscan.Dataset:
    # The digits.npz just written, cut by the same seeded split as ``--data digits``.
    return deadscan.load_data(str(HERE / "digits.npz"), split, seed=SEED)


def train(model: torch.nn.Module, data: deadscan.Dataset, opt: torch.optim.Optimizer, epochs: int,
          batch: int, lr_at=None) -> float:
    """Plain minibatch training on CPU; the data order comes from a seeded generator."""
    x, y = data.prepare(data.x), data.y
    g = torch.Generator().manual_seed(SEED)
    steps_per_epoch = math.ceil(len(x) / batch)
    base_lrs = [group["lr"] for group in opt.param_groups]
    step = 0
    loss = torch.tensor(float("nan"))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            if lr_at is not None:
                for group, base in zip(opt.param_groups, base_lrs):
                    group["lr"] = lr_at(step, steps_per_epoch * epochs, steps_per_epoch, base)
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    model.eval()
    return float(loss.detach())


def warmup_cosine(step: int, total: int, per_epoch: int, base: float) -> float:
    warm = VIT_WARMUP_EPOCHS * per_epoch
    if step < warm:
        return base * (step + 1) / warm
    t = (step - warm) / max(total - warm, 1)
    return VIT_MIN_LR + 0.5 * (base - VIT_MIN_LR) * (1 + math.cos(math.pi * t))


@torch.inference_mode()
def accuracy(model: torch.nn.Module, data: deadscan.Dataset) -> float:
    model.eval()
    return float((model(data.prepare(data.x)).argmax(1) == data.y).float().mean())


def evaluate(name: str, spec: str, model: torch.nn.Module, val: deadscan.Dataset, test: deadscan.Dataset) -> dict:
    result = deadscan.scan(model, val, device="cpu")
    info = {
        "name": name, "spec": spec,
        "params": sum(p.numel() for p in model.parameters()),
        "val_acc": accuracy(model, val), "test_acc": accuracy(model, test),
        "dead": result.dead, "neurons": result.neurons, "val_samples": result.samples,
        "sites": [(r.site.name, int(r.dead.sum()), r.neurons) for r in result.sites],
    }
    print(f"{name}: {spec}")
    print(f"  params {info['params']:,}  val acc {info['val_acc']:.4f}  test acc {info['test_acc']:.4f}")
    print(f"  dead on val ({info['val_samples']} samples): {info['dead']}/{info['neurons']} "
          f"({100 * info['dead'] / info['neurons']:.1f}%)")
    for site, dead, n in info["sites"]:
        print(f"    {site:<22} {dead:>4}/{n}")
    return info


def make_mlp(train_ds, val, test) -> dict:
    torch.manual_seed(SEED)
    model = build(MLP_SPEC)
    opt = torch.optim.Adam(model.parameters(), lr=MLP_LR)
    loss = train(model, train_ds, opt, MLP_EPOCHS, MLP_BATCH)
    info = evaluate("mlp_digits", MLP_SPEC, model, val, test)
    info["final_loss"] = loss
    deadscan.save_safetensors(model, HERE / "mlp_digits.safetensors", MLP_SPEC)
    # torch.save names the records inside its zip after the file; save to a buffer first so the
    # temp file's random name never reaches the bytes.
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    with atomic_path(HERE / "mlp_digits.pt") as tmp:
        tmp.write_bytes(buf.getvalue())
    return info


def make_vit(train_ds, val, test) -> dict:
    torch.manual_seed(SEED)
    model = build(VIT_SPEC)
    opt = torch.optim.AdamW(model.parameters(), lr=VIT_LR, weight_decay=VIT_WD)
    loss = train(model, train_ds, opt, VIT_EPOCHS, VIT_BATCH, lr_at=warmup_cosine)
    info = evaluate("vit_digits", VIT_SPEC, model, val, test)
    info["final_loss"] = loss
    deadscan.save_safetensors(model, HERE / "vit_digits.safetensors", VIT_SPEC)
    return info


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def site_table(info: dict) -> str:
    rows = ["| site | dead / neurons |", "|---|---|"]
    rows += [f"| `{site}` | {dead} / {n} |" for site, dead, n in info["sites"]]
    rows.append(f"| **total** | **{info['dead']} / {info['neurons']}** "
                f"({100 * info['dead'] / info['neurons']:.1f}%) |")
    return "\n".join(rows)


def readme(mlp: dict, vit: dict, n_train: int, n_val: int, n_test: int) -> str:
    return f"""# Sample models

Generated by `python sample_models/generate.py` (from the repository root); do not edit by hand:
change the script and rerun it. Every file here is regenerated deterministically (CPU, one
thread, `torch.use_deterministic_algorithms(True)`, seed {SEED}, seeded data order): two runs on
the same machine and torch version give byte-identical files. scikit-learn is needed only by
the script.

Data split: the seeded 80/10/10 split of `--data digits` (seed {SEED}): {n_train} train,
{n_val} val, {n_test} test samples. Dead neurons are counted on the val split, as
`deadscan inspect` does by default (a neuron is dead when its output is exactly zero on every
element of the scanned data).

## `digits.npz`

sklearn's `load_digits` (1797 8x8 grey images, 10 classes): `x` float32 (N, 1, 8, 8) = pixel / 16,
so in [0, 1]; `y` int64 labels. Used by `--data digits` and by `deadscan demo`.

## `mlp_digits.safetensors` and `mlp_digits.pt`

The paper's MLP (Table I) sized for 8x8 inputs:

    {MLP_SPEC}

Trained on the train split with the paper's Table I protocol: Adam lr {MLP_LR:g}, batch
{MLP_BATCH}, {MLP_EPOCHS} epochs, no stripping. Trained this way it loses many neurons (below),
which is what the sample is meant to show.

- val accuracy {mlp['val_acc']:.4f}, test accuracy {mlp['test_acc']:.4f}, {mlp['params']:,} parameters
- dead on val ({mlp['val_samples']} samples): **{mlp['dead']} of {mlp['neurons']}** hidden neurons

{site_table(mlp)}

`mlp_digits.safetensors` carries its arch spec in its metadata and loads without `--arch`:

    deadscan inspect sample_models/mlp_digits.safetensors --data digits

`mlp_digits.pt` holds the same weights as a plain `torch.save(model.state_dict())`, so it needs
the spec:

    deadscan inspect sample_models/mlp_digits.pt --arch '{MLP_SPEC}' --data digits

## `vit_digits.safetensors`

A small ReLU ViT (the paper's ViT design: pre-norm blocks, ReLU after both MLP linears) with
2x2 patches on the 8x8 images (16 patches + a class token):

    {VIT_SPEC}

Trained briefly: AdamW lr {VIT_LR:g}, weight decay {VIT_WD:g}, batch {VIT_BATCH}, {VIT_EPOCHS} epochs,
{VIT_WARMUP_EPOCHS} linear warm-up epochs then cosine to {VIT_MIN_LR:g}.

- val accuracy {vit['val_acc']:.4f}, test accuracy {vit['test_acc']:.4f}, {vit['params']:,} parameters
- dead on val ({vit['val_samples']} samples): **{vit['dead']} of {vit['neurons']}** neurons

{site_table(vit)}

    deadscan inspect sample_models/vit_digits.safetensors --data digits
"""


def main() -> int:
    start = time.perf_counter()
    setup_determinism()
    write_digits(HERE / "digits.npz")
    train_ds, val, test = (load_split(s) for s in ("train", "val", "test"))
    print(f"digits: {len(train_ds)} train / {len(val)} val / {len(test)} test samples\n")
    mlp = make_mlp(train_ds, val, test)
    print()
    vit = make_vit(train_ds, val, test)
    write_text_atomic(HERE / "README.md", readme(mlp, vit, len(train_ds), len(val), len(test)))
    print()
    names = ("digits.npz", "mlp_digits.safetensors", "mlp_digits.pt", "vit_digits.safetensors", "README.md")
    total = 0
    for name in names:
        p = HERE / name
        total += p.stat().st_size
        print(f"{sha256(p)}  {p.stat().st_size:>9,}  {name}")
    print(f"total {total / 2**20:.2f} MiB, {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
