"""Regenerate every file in sample_models/, deterministically.

    python sample_models/generate.py

Writes, next to this script:

- ``digits.npz``: sklearn's 8x8 digits, ``x`` float32 (N, 1, 8, 8) in [0, 1], ``y`` int64.
- ``mlp_digits.safetensors``: the paper's MLP (Table I protocol: Adam lr 1e-3, batch 64,
  50 epochs) trained on the train split of digits; arch spec in its metadata.
- ``mlp_digits.pt``: the same weights as a plain ``torch.save(state_dict)`` (needs ``--arch``).
- ``vit_digits.safetensors``: a small ReLU ViT trained briefly on digits (AdamW); spec in metadata.
- ``opt_pydoc/``: a small OPT-style ReLU language model (Hugging Face folder: config.json,
  model.safetensors, byte-level BPE tokenizer files) trained on the standard library's pydoc topics.
- ``pydoc_val.txt``: the pydoc topics held out from that training; ``deadscan demo --lm`` scans it.
- ``README.md``: what each file is, with the figures this script prints.

Everything runs on one CPU thread with deterministic algorithms, fixed seeds and a seeded data
order, so two runs on the same machine and torch version give byte-identical files (check with
``sha256sum sample_models/*``). Another CPU or torch version may round differently.

scikit-learn is needed only here, to fetch the digits; deadscan never imports it at run time. The
language model needs transformers and tokenizers (``pip install 'deadscan[hf]'``). Its text comes from
the running Python's ``pydoc_data.topics`` (it differs between Python versions: the committed files were
made with Python 3.11).
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


# --- The sample language model (issue 12) ---------------------------------------------------------------
# Text: the standard library's pydoc topics (``pydoc_data.topics.topics``, the help() pages of the Python
# reference: PSF-licensed Python documentation), which every Python install carries. These topics are held
# out (never trained on) and written to pydoc_val.txt; all the others are the training text.
LM_FOLDER = "opt_pydoc"
LM_VAL_FILE = "pydoc_val.txt"
LM_VAL_TOPICS = ("calls", "exceptions", "for", "import", "naming", "raise", "while", "with")
LM_VOCAB = 768  # byte-level BPE (256 byte tokens + merges + 4 specials)
LM_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0-3, OPT's own layout: pad 1, bos = eos = 2
LM_CONFIG = dict(hidden_size=64, ffn_dim=256, num_hidden_layers=3, num_attention_heads=4,
                 max_position_embeddings=128, word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0,
                 activation_dropout=0.0, layerdrop=0.0, activation_function="relu")
LM_SEQ_LEN = 64
LM_BATCH = 32
LM_EPOCHS = 12
LM_LR = 1e-2  # high for its size on purpose, no warm-up: AdamW so leaves FFN neurons dead (counted, never planted)
LM_WD = 0.01
LM_WARMUP_STEPS = 0


def pydoc_topics() -> tuple[str, str]:
    """(training text, held-out text): one line per line of the topics, topics in sorted order."""
    from pydoc_data.topics import topics

    missing = [t for t in LM_VAL_TOPICS if t not in topics]
    if missing:
        raise SystemExit(f"this Python's pydoc topics lack {missing}; change LM_VAL_TOPICS")

    def text(names):
        lines = []
        for name in names:
            lines += [line.rstrip() for line in topics[name].splitlines() if line.strip()]
        return "\n".join(lines) + "\n"

    return text(k for k in sorted(topics) if k not in LM_VAL_TOPICS), text(LM_VAL_TOPICS)


def make_tokenizer(train_text: str, folder: Path):
    """A byte-level BPE tokenizer trained on the training text, saved as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=LM_VOCAB, special_tokens=list(LM_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train_text.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=LM_CONFIG["max_position_embeddings"])
    fast.save_pretrained(folder)
    return fast


def lm_lr(step: int, total: int) -> float:
    """Linear warm-up over LM_WARMUP_STEPS (none by default), then cosine decay to zero."""
    if step < LM_WARMUP_STEPS:
        return LM_LR * (step + 1) / LM_WARMUP_STEPS
    t = (step - LM_WARMUP_STEPS) / max(total - LM_WARMUP_STEPS, 1)
    return 0.5 * LM_LR * (1 + math.cos(math.pi * t))


def make_lm() -> dict:
    """Train the small OPT-style ReLU LM on the pydoc topics and save it as a Hugging Face folder."""
    import os
    import shutil
    import tempfile

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    from deadscan.data.tokens import load_tokens

    train_text, val_text = pydoc_topics()
    folder = HERE / LM_FOLDER
    tmp = Path(tempfile.mkdtemp(prefix="opt_pydoc-"))
    try:
        make_tokenizer(train_text, tmp)
        (tmp / "train.txt").write_text(train_text, encoding="utf-8")
        # The training text packed exactly as `--data FILE.txt --seq-len 64` packs the held-out text.
        train = load_tokens(tmp / "train.txt", "all", seq_len=LM_SEQ_LEN, tokenizer=tmp)
        (tmp / "train.txt").unlink()
        torch.manual_seed(SEED)
        config = transformers.OPTConfig(vocab_size=LM_VOCAB, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                                        **LM_CONFIG)
        model = transformers.OPTForCausalLM(config)
        opt = torch.optim.AdamW(model.parameters(), lr=LM_LR, weight_decay=LM_WD)
        ids, mask = train.input_ids, train.attention_mask
        g = torch.Generator().manual_seed(SEED)
        total = LM_EPOCHS * math.ceil(len(ids) / LM_BATCH)
        step = 0
        model.train()
        for epoch in range(LM_EPOCHS):
            perm = torch.randperm(len(ids), generator=g)
            for i in range(0, len(ids), LM_BATCH):
                idx = perm[i:i + LM_BATCH]
                x, m = ids[idx], mask[idx]
                labels = x.masked_fill(m == 0, -100)
                for group in opt.param_groups:
                    group["lr"] = lm_lr(step, total)
                loss = model(input_ids=x, attention_mask=m, labels=labels, use_cache=False).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
            print(f"  epoch {epoch + 1}/{LM_EPOCHS}: train loss {float(loss.detach()):.3f}", flush=True)
        model.eval()
        model.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_text_atomic(HERE / LM_VAL_FILE, val_text)

    # Dead neurons on the held-out text, as `deadscan demo --lm` counts them (--split all --seq-len 64).
    loaded = deadscan.load(folder)
    val = load_tokens(HERE / LM_VAL_FILE, "all", seq_len=LM_SEQ_LEN, model_folder=folder)
    result = deadscan.scan(loaded, val, device="cpu")
    with torch.inference_mode():
        nll = tokens = 0.0
        for i in range(0, len(val), LM_BATCH):
            x, m = val.input_ids[i:i + LM_BATCH], val.attention_mask[i:i + LM_BATCH]
            out = loaded(input_ids=x, attention_mask=m, labels=x.masked_fill(m == 0, -100), use_cache=False)
            n = int((m[:, 1:] * m[:, :-1]).sum())
            nll += float(out.loss) * n
            tokens += n
    info = {
        "name": LM_FOLDER, "params": sum(p.numel() for p in loaded.parameters()),
        "train_sequences": len(ids), "train_tokens": int(mask.sum()), "steps": step,
        "val_sequences": len(val), "val_tokens": result.tokens, "val_bytes": len(val_text.encode()),
        "val_ppl": math.exp(nll / tokens), "final_loss": float(loss.detach()),
        "dead": result.dead, "neurons": result.neurons,
        "sites": [(r.site.name, int(r.dead.sum()), r.neurons) for r in result.sites],
    }
    print(f"{LM_FOLDER}: OPT {LM_CONFIG['num_hidden_layers']} layers, hidden {LM_CONFIG['hidden_size']}, "
          f"ffn {LM_CONFIG['ffn_dim']}, vocab {LM_VOCAB}; {info['params']:,} params")
    print(f"  trained on {info['train_tokens']:,} tokens ({info['steps']} steps); held-out perplexity "
          f"{info['val_ppl']:.2f} on {info['val_tokens']:,} tokens")
    print(f"  dead on held-out: {info['dead']}/{info['neurons']}")
    for site, dead, n in info["sites"]:
        print(f"    {site:<40} {dead:>4}/{n}")
    return info


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def site_table(info: dict) -> str:
    rows = ["| site | dead / neurons |", "|---|---|"]
    rows += [f"| `{site}` | {dead} / {n} |" for site, dead, n in info["sites"]]
    rows.append(f"| **total** | **{info['dead']} / {info['neurons']}** "
                f"({100 * info['dead'] / info['neurons']:.1f}%) |")
    return "\n".join(rows)


def readme(mlp: dict, vit: dict, lm: dict, n_train: int, n_val: int, n_test: int) -> str:
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

## `{LM_FOLDER}/` and `{LM_VAL_FILE}`

A small OPT-style ReLU language model, a Hugging Face folder (`config.json`, `model.safetensors`,
`generation_config.json`, and the tokenizer saved by `PreTrainedTokenizerFast.save_pretrained`):
OPT, {LM_CONFIG['num_hidden_layers']} decoder layers, hidden {LM_CONFIG['hidden_size']}, FFN {LM_CONFIG['ffn_dim']} (ReLU), \
{LM_CONFIG['num_attention_heads']} heads, {LM_CONFIG['max_position_embeddings']} positions, tied embeddings, no dropout; {lm['params']:,} parameters. The tokenizer
is a byte-level BPE of {LM_VOCAB} tokens (4 specials: `<s>`, `<pad>` = 1, `</s>` = 2 as bos/eos,
`<unk>`) trained with the `tokenizers` library on the training text.

**Text**: the help() pages of the Python language reference that every Python install carries, the
standard library's `pydoc_data.topics.topics` (a dict of topic name -> text). It is the Python
documentation, copyright the Python Software Foundation, under the PSF License (Python Software
Foundation License Version 2). Non-empty lines, right-stripped, topics in sorted order; each line is a
document (joined by `</s>`, as `--data FILE.txt` does). The topics {', '.join(f'`{t}`' for t in LM_VAL_TOPICS)}
are held out: never trained on, written to `{LM_VAL_FILE}` ({lm['val_bytes']:,} bytes). The text differs between
Python versions; these files were made with Python 3.11.

**Training**: the other topics ({lm['train_tokens']:,} tokens, {lm['train_sequences']} blocks of {LM_SEQ_LEN}), next-token loss,
AdamW lr {LM_LR:g} (high for this size, no warm-up) with cosine decay to 0, weight decay {LM_WD:g}, batch {LM_BATCH},
{LM_EPOCHS} epochs ({lm['steps']} steps), a few CPU minutes on one thread. Nothing is planted: the dead
neurons below are the ones training left.

- held-out perplexity {lm['val_ppl']:.2f} ({lm['val_tokens']:,} tokens, {lm['val_sequences']} blocks of {LM_SEQ_LEN})
- dead on the held-out text: **{lm['dead']} of {lm['neurons']}** FFN neurons

{site_table(lm)}

`deadscan demo --lm` scans it (all of `{LM_VAL_FILE}`, `--seq-len {LM_SEQ_LEN}`); the same by hand:

    deadscan inspect sample_models/{LM_FOLDER} --data sample_models/{LM_VAL_FILE} --seq-len {LM_SEQ_LEN} --split all
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
    print()
    lm = make_lm()
    write_text_atomic(HERE / "README.md", readme(mlp, vit, lm, len(train_ds), len(val), len(test)))
    print()
    names = ("digits.npz", "mlp_digits.safetensors", "mlp_digits.pt", "vit_digits.safetensors", LM_VAL_FILE,
             *(f"{LM_FOLDER}/{p.name}" for p in sorted((HERE / LM_FOLDER).iterdir())), "README.md")
    total = 0
    for name in names:
        p = HERE / name
        total += p.stat().st_size
        print(f"{sha256(p)}  {p.stat().st_size:>9,}  {name}")
    print(f"total {total / 2**20:.2f} MiB, {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
