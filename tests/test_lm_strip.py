"""Fine-tuning a ReLU causal language model with Synaptic Stripping (issue 12): a tiny OPT saved with
save_pretrained, with planted dead fc1 neurons; the CLI chain inspect -> strip --from -> from_pretrained on
stripped/ -> inspect of stripped/; every strip step checked exactly; padding never in the loss; gradient
accumulation equal to one big batch."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # never the hub: everything here is built locally
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from safetensors.torch import load_file  # noqa: E402

from deadscan import finetune as ft  # noqa: E402
from deadscan.data import load_data  # noqa: E402
from deadscan.data.tokens import TokenDataset  # noqa: E402
from deadscan.errors import DataError  # noqa: E402
from deadscan.finetune import CausalLM, TrainConfig, accumulate, finetune  # noqa: E402
from deadscan.hf import load_folder  # noqa: E402

from conftest import invoke_cli, write_token_file  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_tokens import _save_tokenizer  # noqa: E402

VOCAB, FFN, HIDDEN = 64, 32, 16
DEAD = [1, 5, 17]  # bias -1e4: dead whatever stripping does
REVIVABLE = [9, 12]  # bias slightly negative, weights mixed: dead at first, close to waking
FC1 = [f"model.decoder.layers.{i}.fc1" for i in range(2)]
RATE = 0.25


def _config(**kw):
    # no dropout: the gradient-accumulation comparison needs the same forward for 8 sequences or 2 x 4
    return transformers.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, ffn_dim=FFN,
                                  num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=HIDDEN,
                                  dropout=0.0, attention_dropout=0.0, **kw)


def _opt(seed=0):
    torch.manual_seed(seed)
    model = transformers.OPTForCausalLM(_config())
    mixed = torch.tensor([-0.1, 0.02] * (HIDDEN // 2))  # 8 negative weights per planted row
    with torch.no_grad():
        for name in FC1:
            fc1 = model.get_submodule(name)
            fc1.weight[DEAD + REVIVABLE] = mixed
            fc1.bias[DEAD] = -1e4
            fc1.bias[REVIVABLE] = -4.0  # |w . x| <= 16 * 0.1 * |x|max: below 4 on layer-normed inputs
    return model.eval()


def _folder(tmp_path, tokenizer=False):
    folder = tmp_path / "opt"
    _opt().save_pretrained(folder)
    if tokenizer:
        _save_tokenizer(folder)
    return folder


def _tokens(tmp_path, n=40, t=12, seed=1):
    return write_token_file(tmp_path / "tokens.npz", n=n, t=t, vocab=VOCAB, seed=seed, pad_from=7)


def _run(*args):
    return invoke_cli(*args)


class _Steps:
    """Records every strip step: the dead sets it acted on and the masks before and after."""

    def __init__(self, monkeypatch):
        self.steps, self.model = [], None
        original = ft.Stripper.step

        def step(stripper, data):
            before = {k: v.clone() for k, v in stripper.masks.masks.items()}
            report = original(stripper, data)
            dead = {r.site.feeding.layer: np.flatnonzero(r.dead) for r in report.scan.sites if r.site.feeding}
            after = {k: v.clone() for k, v in stripper.masks.masks.items()}
            self.steps.append((stripper.enabled and stripper.epoch % stripper.every == 0, dead, before, after))
            self.model = stripper.model
            return report

        monkeypatch.setattr(ft.Stripper, "step", step)


def _check_steps(steps, model):
    """Per step: only dead neurons' fc1 rows gain masked weights, each max(1, floor(RATE * remaining)) of its
    most negative remaining ones (capped by the negative ones left); nothing else changes."""
    fc1 = {name: model.get_submodule(name).weight for name in FC1}
    start = _opt()  # the weights before training: a pruned weight was negative then (the data moves them)
    stripped_steps = 0
    for stripped, dead, before, after in steps:
        for name in FC1:
            assert set(DEAD) <= set(dead[name].tolist())  # planted: dead at every step
            old = before.get(name, torch.zeros_like(fc1[name], dtype=torch.bool))
            new = after.get(name, torch.zeros_like(old))
            assert not (old & ~new).any()  # masks only grow
            gained = (new & ~old).sum(1)
            if not stripped:
                assert int(gained.sum()) == 0
                continue
            for row in range(FFN):
                remaining = int((~old[row]).sum())
                if row in dead[name]:
                    # mask rows hold pruned weights at zero, so the candidates are the original negatives left
                    negatives = int(((start.get_submodule(name).weight[row] < 0) & ~old[row]).sum())
                    want = min(max(1, math.floor(RATE * remaining)), negatives)
                    assert int(gained[row]) == want, (name, row, remaining)
                else:
                    assert int(gained[row]) == 0, (name, row)
        stripped_steps += stripped
    return stripped_steps


def test_cli_chain_inspect_strip_reload_inspect(tmp_path, monkeypatch):
    folder, data = _folder(tmp_path), _tokens(tmp_path)
    res, err = _run("inspect", folder, "--data", data, "--out", tmp_path / "run")
    assert res.exit_code == 0, res.output
    first = json.loads((tmp_path / "run" / "summary.json").read_text())
    for site in first["sites"]:
        assert set(DEAD + REVIVABLE) <= set(site["dead_indices"])

    rec = _Steps(monkeypatch)
    res, err = _run("strip", "--from", tmp_path / "run", "--finetune", 2, "--warmup", 0, "--rate", RATE,
                    "--batch-size", 4, "--grad-accum", 2, "--optimizer", "adamw", "--out", tmp_path / "run2")
    assert res.exit_code == 0, res.output
    run2 = tmp_path / "run2"
    summary = json.loads((run2 / "summary.json").read_text())
    assert summary["config"]["task"] == "causal_lm" and summary["config"]["grad_accum"] == 2
    assert summary["outputs"]["stripped"] == str(run2 / "stripped")
    assert summary["checkpoint"]["arch"] == "hf:OPTForCausalLM"
    assert [row["epoch"] for row in summary["history"]] == [1, 2]
    losses = [row["train_loss"] for row in summary["history"]]
    assert all(math.isfinite(x) for x in losses) and losses[1] < losses[0]
    for row in summary["history"]:
        assert 0 <= row["val_acc"] <= 100 and row["val_perplexity"] == pytest.approx(math.exp(row["val_loss"]))
    assert summary["test"]["perplexity"] == pytest.approx(math.exp(summary["test"]["loss"]))
    assert not (run2 / "stripped.safetensors").exists()

    # every step exact, and the saved masks are the last step's
    assert _check_steps(rec.steps, rec.model) == 2
    masks = load_file(str(run2 / "masks.safetensors"))
    assert sorted(masks) == FC1
    for name in FC1:
        assert torch.equal(masks[name], rec.steps[-1][3][name])
        assert set(masks[name].any(1).nonzero().flatten().tolist()) <= set(rec.steps[0][1][name].tolist())
    assert summary["totals"]["pruned_weights"] == sum(int(m.sum()) for m in masks.values()) == 2 * 5 * (4 + 3)

    # stripped/ is a Hugging Face folder: transformers loads it, with the same logits as the stripped model
    stripped = run2 / "stripped"
    assert {"config.json", "model.safetensors"} <= set(os.listdir(stripped))
    assert not [p for p in os.listdir(run2) if p.endswith(".tmp")]
    umask = os.umask(0)
    os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in stripped.iterdir()} == \
        {p.name: 0o666 & ~umask for p in stripped.iterdir()}  # the umask's mode, not safetensors' 0600
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(stripped).eval()
    assert reloaded.lm_head.weight is reloaded.model.decoder.embed_tokens.weight  # tied again
    saved = load_file(str(stripped / "model.safetensors"))
    original = load_file(str(folder / "model.safetensors"))
    assert set(saved) == set(original)  # the original names, the tied weight once
    for name in FC1:
        w = reloaded.get_submodule(name).weight
        assert (w[masks[name]] == 0).all()
        assert torch.equal(w, rec.model.get_submodule(name).weight.detach().cpu())
    batch = next(load_data(str(data), "val").batches(8, "cpu"))
    mine = rec.model.eval()
    with torch.no_grad():
        a = reloaded(**batch).logits
        b = mine(**batch).logits
    assert (a - b).abs().max().item() <= 1e-6
    # deadscan loads it too, exactly as transformers does
    ck = load_folder(stripped)
    with torch.no_grad():
        assert torch.equal(ck.model(**batch).logits, a)

    # the chain: inspect the stripped folder again on the same data: the same scan as strip's final one
    res, err = _run("inspect", stripped, "--data", data, "--out", tmp_path / "run3")
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "run3" / "summary.json").read_text())
    assert again["totals"]["dead"] == summary["totals"]["dead"]
    assert [s["dead_indices"] for s in again["sites"]] == [s["dead_indices"] for s in summary["sites"]]


def test_text_corpus_strip_reuses_seq_len_and_copies_the_tokenizer(tmp_path):
    folder = _folder(tmp_path, tokenizer=True)
    corpus = tmp_path / "corpus.txt"
    words = "the cat sat on a mat dog ran far away big red sun".split()
    rng = np.random.default_rng(0)
    corpus.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(60)))
    res, err = _run("inspect", folder, "--data", corpus, "--seq-len", 8, "--out", tmp_path / "run")
    assert res.exit_code == 0, res.output
    res, err = _run("strip", "--from", tmp_path / "run", "--finetune", 1, "--warmup", 0, "--batch-size", 8,
                    "--out", tmp_path / "run2")
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "run2" / "summary.json").read_text())
    assert summary["data"]["seq_len"] == 8  # the inspect's blocks, not the default 512
    stripped = tmp_path / "run2" / "stripped"
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(stripped))
    tok = transformers.AutoTokenizer.from_pretrained(stripped)
    assert tok("the cat")["input_ids"] == transformers.AutoTokenizer.from_pretrained(folder)("the cat")["input_ids"]
    transformers.AutoModelForCausalLM.from_pretrained(stripped)
    # inspect of stripped/ tokenises the text with the copied tokenizer
    res, err = _run("inspect", stripped, "--data", corpus, "--seq-len", 8, "--out", tmp_path / "run3")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("left", [False, True])
def test_padded_positions_never_enter_the_loss(left):
    model = _opt()
    rng = np.random.default_rng(3)
    ids = torch.from_numpy(rng.integers(1, VOCAB, (4, 10)))
    mask = torch.ones_like(ids)
    if left:
        mask[1, :4] = 0
        mask[3, :7] = 0
    else:
        mask[1, 6:] = 0
        mask[3, 3:] = 0
    other = ids.clone()
    other[mask == 0] = torch.from_numpy(rng.integers(1, VOCAB, int((mask == 0).sum())))
    task = CausalLM()
    with torch.no_grad():
        a = task.loss(model, {"input_ids": ids, "attention_mask": mask})
        b = task.loss(model, {"input_ids": other, "attention_mask": mask})
    assert torch.equal(a, b)
    real = int(((mask[:, :-1] > 0) & (mask[:, 1:] > 0)).sum())
    assert int(task.weight({"input_ids": ids, "attention_mask": mask})) == real
    if not left:  # right padding: transformers' own loss (labels -100 on padding) is the same mean NLL
        labels = ids.masked_fill(mask == 0, -100)
        with torch.no_grad():
            theirs = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert a.item() == pytest.approx(theirs.item(), rel=1e-6)


def _token_split(n=16, t=9, seed=5):
    rng = np.random.default_rng(seed)
    ids = torch.from_numpy(rng.integers(1, VOCAB, (n, t)))
    mask = torch.ones_like(ids)
    for i in range(n):  # a different amount of padding per sequence: micro-batches weigh differently
        mask[i, t - (i % 5):] = 0
    ids[mask == 0] = 0
    return TokenDataset("mem", "all", ids, mask, val_fraction=None, test_fraction=None)


def test_grad_accum_gives_the_big_batch_gradient():
    ds = _token_split(8)
    task = CausalLM()
    grads = []
    for parts in ([slice(0, 8)], [slice(0, 4), slice(4, 8)]):
        model = _opt()
        model.train()
        group = [{"input_ids": ds.input_ids[s], "attention_mask": ds.attention_mask[s]} for s in parts]
        summed, terms = accumulate(model, task, group)
        grads.append(({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                      float(summed) / int(terms)))
    (big, loss_big), (acc, loss_acc) = grads
    assert big.keys() == acc.keys()
    for name in big:
        assert (big[name] - acc[name]).abs().max().item() <= 1e-6, name
    assert loss_acc == pytest.approx(loss_big, rel=1e-6)


def test_grad_accum_2_of_4_is_batch_8_through_finetune():
    train, val = _token_split(16), _token_split(6, seed=6)
    models = []
    for batch, accum in ((8, 1), (4, 2)):
        model = _opt()
        cfg = TrainConfig(epochs=2, warmup=0, rate=RATE, optimizer="adamw", lr=1e-2, batch_size=batch,
                          grad_accum=accum, task="causal_lm")
        res = finetune(model, train, val, cfg, device=torch.device("cpu"))
        models.append((model, res))
    (a, ra), (b, rb) = models
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if name.endswith("k_proj.bias"):
            # softmax ignores a key bias: its true gradient is 0, and Adam scales the rounding noise left in
            # it (~1e-10) up to steps of ~1e-5 that differ between any two summation orders
            continue
        assert (p - q).abs().max().item() <= 1e-6, name
    for x, y in zip(ra.history, rb.history):
        assert x["dead"] == y["dead"] and x["pruned_weights"] == y["pruned_weights"]
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-6)
    for name in FC1:
        assert torch.equal(ra.stripper.masks.masks[name], rb.stripper.masks.masks[name])


def test_train_batches_are_a_seeded_permutation_of_whole_sequences():
    ds = _token_split(10)
    first = list(ds.train_batches(4, "cpu", torch.Generator().manual_seed(0)))
    again = list(ds.train_batches(4, "cpu", torch.Generator().manual_seed(0)))
    assert [len(b["input_ids"]) for b in first] == [4, 4, 2]
    for x, y in zip(first, again):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["attention_mask"], y["attention_mask"])
    rows = torch.cat([b["input_ids"] for b in first])
    masks = torch.cat([b["attention_mask"] for b in first])
    order = [next(i for i in range(10) if torch.equal(ds.input_ids[i], r)) for r in rows]
    assert sorted(order) == list(range(10)) and order != list(range(10))
    assert torch.equal(masks, ds.attention_mask[order])
    with pytest.raises(DataError, match="no augmentation"):
        next(ds.train_batches(4, "cpu", 0, augment="crop+flip"))


def test_encoder_only_refused_in_one_line(tmp_path):
    data = _tokens(tmp_path)
    torch.manual_seed(0)
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, intermediate_size=32, num_attention_heads=2,
        max_position_embeddings=64, hidden_act="relu"))
    bert.save_pretrained(tmp_path / "bert")
    res, err = _run("strip", tmp_path / "bert", "--data", data, "--finetune", 1, "--out", tmp_path / "b")
    assert res.exit_code == 1 and len(err) == 1 and "not yet for encoder-only" in err[0], res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "b" / "summary.json").exists()
    # --compact on a Hugging Face folder: tests/test_hf_compact.py


def test_autocast_is_bf16_on_cuda_for_language_models_only(monkeypatch):
    from deadscan.finetune import Classification, autocast_context, autocast_dtype

    assert autocast_dtype(torch.device("cpu"), CausalLM()) is None  # float32 on CPU
    assert type(autocast_context(torch.device("cpu"), CausalLM())).__name__ == "nullcontext"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype(torch.device("cuda"), CausalLM()) is torch.bfloat16
    assert autocast_dtype(torch.device("cuda:0"), Classification()) is None  # images train as before
