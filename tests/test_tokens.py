"""Token data and language models: tiny OPT, GPT-2 (relu), BERT (relu), T5 v1.0 and Llama (relu) built from
configs (random init, saved locally), with planted dead neurons; dead sets checked exactly against a plain
forward-hook count on the same batches, padded positions excluded; text corpora through a tokenizer saved in
the model folder; bad token data one Error line each."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # never the hub: everything here is built locally
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from click.testing import CliRunner  # noqa: E402
from torch import nn  # noqa: E402

import deadscan  # noqa: E402
from deadscan.cli import main  # noqa: E402
from deadscan.data import TokenDataset, load_data  # noqa: E402
from deadscan.data.tokens import model_kwargs  # noqa: E402
from deadscan.errors import DataError  # noqa: E402
from deadscan.scan import scan  # noqa: E402
from deadscan.trace import find_sites  # noqa: E402

from conftest import invoke_cli, write_token_file  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_hf import CONFIGS  # noqa: E402

VOCAB = 64
PLANTED = [1, 5, 17]  # neurons of every site made dead
# (activation module of layer i, feeding layer, consumer layer) per family; T5: encoder and decoder stacks
FAMILIES = {
    "OPTForCausalLM": [("model.decoder.layers.{i}.activation_fn", "model.decoder.layers.{i}.fc1",
                        "model.decoder.layers.{i}.fc2")],
    "GPT2LMHeadModel": [("transformer.h.{i}.mlp.act", "transformer.h.{i}.mlp.c_fc", "transformer.h.{i}.mlp.c_proj")],
    "BertForMaskedLM": [("bert.encoder.layer.{i}.intermediate.intermediate_act_fn",
                         "bert.encoder.layer.{i}.intermediate.dense", "bert.encoder.layer.{i}.output.dense")],
    "T5ForConditionalGeneration": [
        ("encoder.block.{i}.layer.1.DenseReluDense.act", "encoder.block.{i}.layer.1.DenseReluDense.wi",
         "encoder.block.{i}.layer.1.DenseReluDense.wo"),
        ("decoder.block.{i}.layer.2.DenseReluDense.act", "decoder.block.{i}.layer.2.DenseReluDense.wi",
         "decoder.block.{i}.layer.2.DenseReluDense.wo")],
    # gated: relu(gate_proj(x)) * up_proj(x) read by down_proj (tests/test_gated.py)
    "LlamaForCausalLM": [("model.layers.{i}.mlp.act_fn", "model.layers.{i}.mlp.gate_proj",
                          "model.layers.{i}.mlp.down_proj")],
}


def _ffn_sites(name):
    return [(a.format(i=i), f.format(i=i), c and c.format(i=i)) for a, f, c in FAMILIES[name] for i in range(2)]


def _plant(model, name):
    """Feeding rows of PLANTED made dead: bias far below any reachable pre-activation, or (no bias: T5, Llama)
    a zero row, whose pre-activation is exactly 0 everywhere."""
    with torch.no_grad():
        for _, feed, _ in _ffn_sites(name):
            layer = model.get_submodule(feed)
            if layer.bias is not None:
                layer.bias[PLANTED] = -1e4
                continue
            rows = layer.weight if type(layer).__name__ != "Conv1D" else layer.weight.T
            rows[PLANTED] = 0.0
    return model


def _folder(tmp_path, name, shard=None, seed=0):
    torch.manual_seed(seed)
    model = _plant(getattr(transformers, name)(CONFIGS[name]()), name)
    folder = tmp_path / (name + ("-sharded" if shard else ""))
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return folder


def _tokens_file(tmp_path, n=24, t=10, seed=1, pad_id=0):
    return write_token_file(tmp_path / "tokens.npz", n=n, t=t, vocab=VOCAB, seed=seed, pad_id=pad_id)


def _oracle(model, ds: TokenDataset, act_names, batch_size=8, device="cpu"):
    """Per activation module: count of real-token positions with output > 0, by plain forward hooks (on
    ``device``, in the model's own dtype)."""
    counts = {}
    current = {}

    def hook(name):
        def fn(_m, _args, out):
            y = out.reshape(-1, out.shape[-1])
            keep = current["mask"].reshape(-1).bool()
            c = (y[keep] > 0).sum(0)
            counts[name] = counts.get(name, 0) + c
        return fn
    handles = [model.get_submodule(a).register_forward_hook(hook(a)) for a in act_names]
    try:
        with torch.no_grad():
            for b in ds.batches(batch_size, device):
                current["mask"] = b["attention_mask"]
                model.eval()(**model_kwargs(model, b))
    finally:
        for h in handles:
            h.remove()
    return {k: v.cpu().numpy() for k, v in counts.items()}


# ---------------------------------------------------------------------------------------------
# Every family: sites found with feeding and consumer layers; dead sets exact


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_dead_neurons_exact(tmp_path, name):
    folder = _folder(tmp_path, name)
    model = deadscan.load(str(folder))
    ds = load_data(str(_tokens_file(tmp_path)), "all")
    sitemap = find_sites(model)
    ffn = _ffn_sites(name)
    for act, feed, cons in ffn:
        site = sitemap[act]
        assert site.feeding is not None and site.feeding.layer == feed, (act, site)
        assert (site.consumer.layer if site.consumer else None) == cons, (act, site)
    result = scan(model, ds, sitemap=sitemap, batch_size=8, device="cpu")
    oracle = _oracle(model, ds, [a for a, _, _ in ffn])
    for act, _, _ in ffn:
        r = result[act]
        np.testing.assert_array_equal(r.active, oracle[act])
        assert r.dead_indices == np.flatnonzero(oracle[act] == 0).tolist()
        assert set(PLANTED) <= set(r.dead_indices), (act, r.dead_indices)
        assert r.elements == ds.tokens  # one element per real token, padding never counted
    assert result.tokens == ds.tokens


def test_llama_gated_site_is_named():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(CONFIGS["LlamaForCausalLM"]())
    site = find_sites(model)["model.layers.0.mlp.act_fn"]
    assert site.feeding.layer == "model.layers.0.mlp.gate_proj"
    assert site.consumer.layer == "model.layers.0.mlp.down_proj" and site.gate.layer == "model.layers.0.mlp.up_proj"
    assert "model.layers.0.mlp.up_proj" in site.note and "model.layers.0.mlp.down_proj" in site.note


def test_opt_found_by_following_tensors():
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(CONFIGS["OPTForCausalLM"]())
    site = find_sites(model)["model.decoder.layers.0.activation_fn"]
    assert site.hooked and site.feeding.exclusive and site.axis == -1  # fc1's output goes to the relu alone
    assert site.consumer.layer == "model.decoder.layers.0.fc2" and site.consumer.keeps_zero


def test_sharded_and_single_file_agree(tmp_path):
    single = _folder(tmp_path, "OPTForCausalLM")
    sharded = _folder(tmp_path, "OPTForCausalLM", shard="20KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    ds = load_data(str(_tokens_file(tmp_path)), "val")
    a = scan(deadscan.load(str(single)), ds, batch_size=4, device="cpu")
    b = scan(deadscan.load(str(sharded)), ds, batch_size=4, device="cpu")
    for ra, rb in zip(a.sites, b.sites):
        assert ra.site.name == rb.site.name
        np.testing.assert_array_equal(ra.active, rb.active)
        np.testing.assert_array_equal(ra.out_sum, rb.out_sum)
        np.testing.assert_array_equal(ra.pre_max, rb.pre_max)


# ---------------------------------------------------------------------------------------------
# Padding is never part of the scanned data


class _PadProbe(nn.Module):
    """Embedding -> Linear -> ReLU -> Linear: neuron 0 fires only on token 0 (the pad token), neuron 1 never,
    neuron 2 on every token."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(8, 2)
        self.fc1 = nn.Linear(2, 3)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(3, 2)
        with torch.no_grad():
            self.emb.weight.zero_()
            self.emb.weight[0, 0] = 1.0  # only the pad token has feature 0
            self.emb.weight[:, 1] = 1.0
            self.fc1.weight.copy_(torch.tensor([[10.0, 0.0], [0.0, 0.0], [0.0, 1.0]]))
            self.fc1.bias.copy_(torch.tensor([-5.0, -1.0, 0.0]))

    def forward(self, input_ids, attention_mask=None):
        return self.fc2(self.act(self.fc1(self.emb(input_ids))))


def _pad_batches(mask_value):
    ids = torch.tensor([[3, 4, 0, 0], [5, 6, 7, 0]])
    mask = (ids != 0).long() if mask_value is None else torch.full_like(ids, mask_value)
    return [{"input_ids": ids, "attention_mask": mask}]


def test_neuron_firing_only_on_padding_is_dead():
    model = _PadProbe()
    r = scan(model, _pad_batches(None), device="cpu").sites[0]
    assert r.dead_indices == [0, 1]  # neuron 0 fires on padding alone: dead
    assert r.elements == 5 and r.active.tolist() == [0, 0, 5]
    np.testing.assert_allclose(r.out_sum, [0.0, 0.0, 5.0])
    assert r.pre_max[0] == -5.0  # the padded positions' +5 never reaches the maximum either
    counted = scan(model, _pad_batches(1), device="cpu").sites[0]  # the same tokens, no padding declared
    assert counted.dead_indices == [1] and counted.elements == 8 and counted.active.tolist() == [3, 0, 8]


def test_padding_only_neuron_in_opt(tmp_path):
    """In a real OPT: a fc1 neuron reading an embedding feature that only the pad token has."""
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(CONFIGS["OPTForCausalLM"]()).eval()
    with torch.no_grad():
        emb = model.model.decoder.embed_tokens.weight
        emb[:, 0] = -1.0  # feature 0: -1 for every token, +1 for the pad token 0
        emb[0, 0] = 1.0
        for layer in model.model.decoder.layers:
            layer.fc1.weight[3] = 0.0
            layer.fc1.weight[3, 0] = 1.0
            layer.fc1.bias[3] = -1.5  # after layer norm, feature 0 is about +-3.9: fires on the pad token only
    ds = load_data(str(_tokens_file(tmp_path, pad_id=0)), "all")
    assert (ds.input_ids[ds.attention_mask == 1] != 0).all()
    names = [f"model.decoder.layers.{i}.activation_fn" for i in range(2)]
    result = scan(model, ds, batch_size=8, device="cpu")
    everything = TokenDataset("same, padding counted", "all", ds.input_ids, torch.ones_like(ds.attention_mask))
    counted = _oracle(model, everything, names)
    for n in names:
        assert counted[n][3] > 0  # it does fire, on padded positions
        assert 3 in result[n].dead_indices  # and is dead on the scanned data
        np.testing.assert_array_equal(result[n].active, _oracle(model, ds, names)[n])


# ---------------------------------------------------------------------------------------------
# Text through a tokenizer, and the command line


WORDS = "the cat sat on a mat dog ran far away big red sun".split()


def _save_tokenizer(folder, words=WORDS):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                eos_token="[EOS]")
    fast.save_pretrained(folder)
    return folder


def _run(*args):
    return invoke_cli(*args)


def _corpus(tmp_path, lines=("the cat sat on a mat", "a big red dog ran far away", "", "the sun"), name="corpus.txt"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_text_corpus_end_to_end_through_the_cli(tmp_path):
    folder = _save_tokenizer(_folder(tmp_path, "OPTForCausalLM"))
    corpus = _corpus(tmp_path)
    res, err = _run("inspect", folder, "--data", corpus, "--seq-len", 4, "--split", "all", "--out", tmp_path / "out")
    assert res.exit_code == 0 and not err, res.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    d = summary["data"]
    # 6 + 7 + 2 words, joined by 2 EOS tokens: 17 tokens in 5 blocks of 4 (the last padded)
    assert d["kind"] == "tokens" and d["seq_len"] == 4 and d["sequences"] == 5 and d["tokens"] == 17
    assert "17 tokens (padding excluded)" in res.output
    sites = {s["name"]: s for s in summary["sites"]}
    s = sites["model.decoder.layers.0.activation_fn"]
    assert s["feeding_layer"] == "model.decoder.layers.0.fc1" and s["consumer_layer"] == "model.decoder.layers.0.fc2"
    assert set(PLANTED) <= set(s["dead_indices"])


def test_jsonl_text_field_and_tokenizer_option(tmp_path):
    model = _folder(tmp_path, "GPT2LMHeadModel")
    tok = _save_tokenizer(tmp_path / "tok")
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(["the cat sat", "a red sun"])))
    ds = load_data(str(path), "all", seq_len=3, tokenizer=str(tok), text_field="body")
    assert ds.input_ids.dtype == torch.int32 and ds.tokens == 7 and len(ds) == 3  # held compact
    with pytest.raises(DataError, match="--text-field"):
        load_data(str(path), "all", seq_len=3, tokenizer=str(tok))
    res, err = _run("inspect", model, "--data", path, "--tokenizer", tok, "--text-field", "body", "--seq-len", 3,
                    "--split", "all", "--out", tmp_path / "out")
    assert res.exit_code == 0 and not err, res.output


def test_splits_apply_to_sequences(tmp_path):
    path = str(_tokens_file(tmp_path, n=50))
    parts = {s: load_data(path, s) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [40, 5, 5]
    seen = np.concatenate([parts[s].indices for s in parts])
    assert sorted(seen.tolist()) == list(range(50))
    np.testing.assert_array_equal(load_data(path, "val").indices, parts["val"].indices)  # seeded
    b = next(parts["val"].batches(2, "cpu"))
    assert set(b) == {"input_ids", "attention_mask"} and all(v.dtype == torch.int64 for v in b.values())


@pytest.mark.parametrize("file_dtype, held", [(np.uint16, torch.int32), (np.int64, torch.int32),
                                               (np.uint64, torch.int64)])
def test_token_arrays_are_held_compact_and_handed_out_as_int64(tmp_path, file_dtype, held):
    """5 bytes a token on the host (int32 ids, bool mask), not int64's 16; every batch is int64 with the file's
    values. Ids beyond int32 keep int64; beyond int64 are refused."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 60000, size=(10, 6)).astype(file_dtype)
    if held == torch.int64:
        ids[3, 2] = 2**40
    mask = np.ones((10, 6), np.uint8)
    mask[9, 4:] = 0
    path = tmp_path / "tokens.npz"
    np.savez(path, input_ids=ids, attention_mask=mask)
    ds = load_data(str(path), "all")
    assert (ds.input_ids.dtype, ds.attention_mask.dtype, ds.tokens, ds.max_id) == (held, torch.bool, 58,
                                                                                   int(ids.max()))
    want_ids, want_mask = ids[ds.indices].astype(np.int64), mask[ds.indices].astype(np.int64)
    batches = list(ds.batches(4, "cpu"))
    shuffled = list(ds.train_batches(4, "cpu", generator=0))
    for b in [*batches, *shuffled, ds.example(3)]:
        assert b["input_ids"].dtype == b["attention_mask"].dtype == torch.int64
    np.testing.assert_array_equal(torch.cat([b["input_ids"] for b in batches]).numpy(), want_ids)
    np.testing.assert_array_equal(torch.cat([b["attention_mask"] for b in batches]).numpy(), want_mask)
    rows = sorted(map(tuple, torch.cat([b["input_ids"] for b in shuffled]).tolist()))
    assert rows == sorted(map(tuple, want_ids.tolist()))  # one epoch: every sequence once
    np.testing.assert_array_equal(ds.example(3)["input_ids"].numpy(), want_ids[:3])

    ids = ids.astype(np.uint64)
    ids[0, 0] = 2**63
    np.savez(path, input_ids=ids)
    with pytest.raises(DataError) as e:
        load_data(str(path), "all")
    assert str(e.value) == (f"{path}: 'input_ids' holds {2**63}, beyond int64; token ids index a vocabulary")


def _write_arrays(path, fmt: str, **arrays):
    if fmt == "npz":
        np.savez(path, **arrays)
    elif fmt == "npz-deflated":
        np.savez_compressed(path, **arrays)
    else:
        import h5py

        with h5py.File(path, "w") as h:
            for k, a in arrays.items():
                h.create_dataset(k, data=a, **({"chunks": (3, a.shape[1]), "compression": "gzip"}
                                               if fmt == "h5-chunked" else {}))
    return path


@pytest.mark.parametrize("fmt", ["npz", "npz-deflated", "h5", "h5-chunked", "npz-fortran", "npz-big-endian"])
def test_rows_are_gathered_a_block_at_a_time_as_fancy_indexing_gives(tmp_path, fmt, monkeypatch):
    """read_array_file(rows=...) keeps only the rows asked for, in their order (repeats too), reading the
    file a block at a time (a block of 3 rows here: skipped blocks, a last partial one); Fortran order is
    read whole and then indexed."""
    from deadscan import files

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, size=(20, 7)).astype(">i4" if fmt == "npz-big-endian" else np.int64)
    if fmt == "npz-fortran":
        ids = np.asfortranarray(ids)
    mask = rng.integers(0, 2, size=(20, 7)).astype(bool)
    path = _write_arrays(tmp_path / ("t.h5" if fmt.startswith("h5") else "t.npz"), fmt.split("-")[0] if
                         fmt in ("npz-fortran", "npz-big-endian") else fmt, input_ids=ids, attention_mask=mask)
    monkeypatch.setattr(files, "BLOCK_BYTES", 3 * 7 * ids.dtype.itemsize)
    want = np.array([19, 4, 5, 0, 4, 13, 18])  # not 6..12: whole blocks skipped
    asked = []

    def rows(key, shape):
        asked.append((key, shape))
        return want

    read = []
    real = files.gather_rows
    monkeypatch.setattr(files, "gather_rows", lambda r, *a: real(lambda lo, hi: read.append((lo, hi)) or r(lo, hi), *a))
    got = files.read_array_file(path, ("input_ids", "attention_mask"), ("input_ids",), lambda *a: None, "ids",
                                rows=rows)
    assert asked == [("input_ids", (20, 7)), ("attention_mask", (20, 7))]
    np.testing.assert_array_equal(got["input_ids"], ids[want])
    np.testing.assert_array_equal(got["attention_mask"], mask[want])
    assert got["input_ids"].dtype.isnative and got["attention_mask"].dtype == bool
    ids_blocks = [] if fmt == "npz-fortran" else [(0, 3), (3, 6), (12, 15), (18, 20)]  # Fortran: read whole
    mask_blocks = [(0, 12), (12, 20)] if ids.dtype.itemsize == 4 else [(0, 20)]  # 1-byte rows: more a block
    assert read == ids_blocks + mask_blocks


@pytest.mark.parametrize("fmt", ["npz-deflated", "h5-chunked"])
def test_a_split_of_a_token_file_equals_the_rows_of_the_whole_file(tmp_path, fmt, monkeypatch):
    """Only the split's rows are read (the file's other sequences never all sit in memory); the split, its
    order and --limit are those of the whole file's indices."""
    from deadscan import files

    monkeypatch.setattr(files, "BLOCK_BYTES", 5 * 6 * 8)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 60, size=(50, 6)).astype(np.int64)
    mask = np.ones((50, 6), np.uint8)
    mask[::7, 4:] = 0
    path = _write_arrays(tmp_path / ("t.h5" if fmt.startswith("h5") else "t.npz"), fmt, input_ids=ids,
                         attention_mask=mask)
    for split, limit in (("val", None), ("train", 11), ("all", None)):
        ds = load_data(str(path), split, limit=limit)
        assert len(ds) == (5 if split == "val" else 11 if limit else 50) == len(ds.indices)
        np.testing.assert_array_equal(ds.input_ids.numpy(), ids[ds.indices])
        np.testing.assert_array_equal(ds.attention_mask.numpy(), mask[ds.indices].astype(bool))
        assert ds.tokens == int(mask[ds.indices].sum())
    whole = load_data(str(path), "train")
    np.testing.assert_array_equal(load_data(str(path), "train", limit=11).indices, whole.indices[:11])


def test_a_damaged_row_outside_the_split_is_still_caught_by_the_crc(tmp_path, monkeypatch):
    """The split's rows are gathered, then the rest of the member is read through anyway: zipfile checks an
    .npz member's CRC at its end, so a damaged file is refused as it was when it was read whole."""
    from deadscan import files

    monkeypatch.setattr(files, "BLOCK_BYTES", 512)  # one row a block
    ids = (np.arange(2000 * 64, dtype=np.int64).reshape(2000, 64) * 7) % 1000
    ids[-1] = 999  # the last row's bytes are found nowhere else
    path = tmp_path / "t.npz"
    np.savez(path, input_ids=ids)
    rows = load_data(str(path), "val", limit=3).indices
    assert (1999 - rows.max()) * 512 > 64 * 1024  # far from the rows gathered: only reading on reaches it
    raw = bytearray(path.read_bytes())
    raw[raw.rfind(ids[-1].tobytes())] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as e:
        load_data(str(path), "val", limit=3)
    assert str(e.value) == (f"{path}: cannot read token arrays (Bad CRC-32 for file 'input_ids.npy'); write the "
                            "file again")


# ---------------------------------------------------------------------------------------------
# Bad token data: one Error line each


@pytest.fixture
def opt(tmp_path):
    return _folder(tmp_path, "OPTForCausalLM")


def _one_error(*args) -> str:
    """Run the CLI; it must fail with exactly one Error line (returned) and no traceback."""
    res, err = _run(*args)
    assert res.exit_code == 1 and len(err) == 1, res.output
    assert "Traceback" not in res.output
    return err[0]


def _npz(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


def test_ids_outside_the_vocabulary(tmp_path, opt):
    ids = np.ones((4, 5), np.int64)
    ids[2, 3] = VOCAB
    line = _one_error("inspect", opt, "--data", _npz(tmp_path, input_ids=ids), "--split", "all", "--out",
                      tmp_path / "o")
    assert "token id 64" in line, line
    assert "vocabulary of 64" in line, line
    ids[2, 3] = -1
    line = _one_error("inspect", opt, "--data", _npz(tmp_path, input_ids=ids), "--split", "all", "--out",
                      tmp_path / "o")
    assert "0 or more" in line, line


def test_float_ids_refused(tmp_path, opt):
    line = _one_error("inspect", opt, "--data", _npz(tmp_path, input_ids=np.ones((4, 5), np.float32)), "--out",
                      tmp_path / "o")
    assert "integers" in line, line


@pytest.mark.parametrize("mask, words", [(np.full((4, 5), 2), ("only 0",)), (np.ones((4, 6), np.int64), ("shape",))],
                         ids=["values", "shape"])
def test_bad_mask(tmp_path, opt, mask, words):
    data = _npz(tmp_path, input_ids=np.ones((4, 5), np.int64), attention_mask=mask)
    line = _one_error("inspect", opt, "--data", data, "--split", "all", "--out", tmp_path / "o")
    assert all(w in line for w in words), line


def test_empty_text(tmp_path, opt):
    _save_tokenizer(opt)
    line = _one_error("inspect", opt, "--data", _corpus(tmp_path, lines=("", "   ")), "--out", tmp_path / "o")
    assert "no text" in line, line


def test_tokenizer_of_another_model(tmp_path, opt):
    big = _save_tokenizer(tmp_path / "big", words=[f"w{i}" for i in range(100)])
    line = _one_error("inspect", opt, "--data", _corpus(tmp_path), "--tokenizer", big, "--seq-len", 4, "--split",
                      "all", "--out", tmp_path / "o")
    assert "does not belong" in line, line


def test_no_tokenizer_in_the_folder(tmp_path, opt):
    line = _one_error("inspect", opt, "--data", _corpus(tmp_path), "--out", tmp_path / "o")
    assert "--tokenizer" in line, line


def test_sequences_longer_than_the_model_takes(tmp_path, opt):
    _save_tokenizer(opt)
    line = _one_error("inspect", opt, "--data", _corpus(tmp_path), "--seq-len", 100, "--split", "all", "--out",
                      tmp_path / "o")
    assert "--seq-len 64" in line, line


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("name", ["corpus.txt", "tokens.npz"])
def test_fifo_as_data(tmp_path, opt, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    line = _one_error("inspect", opt, "--data", fifo, "--out", tmp_path / "o")
    assert "not a regular file" in line, line


def test_parquet_without_pandas(tmp_path, opt, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    path = tmp_path / "corpus.parquet"
    path.write_bytes(b"PAR1")
    _save_tokenizer(opt)
    line = _one_error("inspect", opt, "--data", path, "--out", tmp_path / "o")
    assert "pandas" in line, line


def test_image_options_refused_with_tokens(tmp_path, opt):
    line = _one_error("inspect", opt, "--data", _tokens_file(tmp_path), "--resize", 8, "--out", tmp_path / "o")
    assert "--resize" in line, line


def test_token_options_refused_with_images(tmp_path, mlp_file):
    line = _one_error("inspect", mlp_file, "--data", "digits", "--seq-len", 8, "--out", tmp_path / "o")
    assert "--seq-len" in line, line


def test_a_bf16_folder_scans_in_float32_on_the_cpu_and_says_so(tmp_path):
    """Half-precision weights keep their dtype when loaded; on the CPU the scan computes in float32 (the
    summary says which), so the dead sets equal a float32 forward-hook count of the same weights."""
    torch.manual_seed(0)
    model = _plant(transformers.OPTForCausalLM(CONFIGS["OPTForCausalLM"]()), "OPTForCausalLM").to(torch.bfloat16)
    folder = tmp_path / "opt-bf16"
    model.save_pretrained(folder)
    data = _tokens_file(tmp_path)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["inspect", str(folder), "--data", str(data), "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["checkpoint"]["dtype"], summary["scan_dtype"]) == ("bfloat16", "float32")
    ds = load_data(str(data), "val")
    acts = [a for a, _, _ in _ffn_sites("OPTForCausalLM")]
    counts = _oracle(deadscan.load(str(folder)).float(), ds, acts)
    for site in summary["sites"]:
        assert site["dead_indices"] == np.flatnonzero(counts[site["name"]] == 0).tolist()
    assert sum(s["dead"] for s in summary["sites"]) > 0  # the planted neurons
