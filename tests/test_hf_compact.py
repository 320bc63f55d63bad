"""`deadscan strip HF_FOLDER --compact` (issue 12): a tiny OPT and a tiny Llama (relu, gated) with planted dead
neurons; compact/ holds config.json unchanged, model.safetensors with narrower FFN tensors under the original
names and the per-layer widths in its deadscan_shapes metadata; deadscan.load rebuilds it (same logits as the
stripped model), inspect scans it again, and widths wider than the file's tensors are refused in one line."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # never the hub: everything here is built locally
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import deadscan  # noqa: E402
from deadscan.data.tokens import model_kwargs  # noqa: E402
from deadscan.errors import CheckpointError  # noqa: E402
from deadscan.finetune import _logits  # noqa: E402
from deadscan.layers import entry  # noqa: E402
from deadscan.zoo import SHAPES_KEY  # noqa: E402

from conftest import invoke_cli, write_token_file  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_tokens import _save_tokenizer  # noqa: E402

VOCAB, FFN, HIDDEN = 64, 32, 16
DEAD = [1, 5, 17]


def _opt(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, ffn_dim=FFN,
                                 num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=HIDDEN,
                                 dropout=0.0, attention_dropout=0.0)
    model = transformers.OPTForCausalLM(cfg)
    with torch.no_grad():
        for i in range(2):
            model.model.decoder.layers[i].fc1.bias[DEAD] = -1e4
    folder = tmp_path / "opt"
    model.save_pretrained(folder)
    return _save_tokenizer(folder), [f"model.decoder.layers.{i}.fc1" for i in range(2)]


def _llama(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_act="relu", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=64, mlp_bias=True)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for i in range(2):
            model.model.layers[i].mlp.gate_proj.bias[DEAD] = -1e4
    folder = tmp_path / "llama"
    model.save_pretrained(folder)
    return _save_tokenizer(folder), [f"model.layers.{i}.mlp.gate_proj" for i in range(2)]


def _gpt2(tmp_path):  # Hugging Face's Conv1D: weights stored (in, out)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=64, n_inner=FFN,
                                  activation_function="relu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for i in range(2):
            model.transformer.h[i].mlp.c_fc.bias[DEAD] = -1e4
    folder = tmp_path / "gpt2"
    model.save_pretrained(folder)
    return _save_tokenizer(folder), [f"transformer.h.{i}.mlp.c_fc" for i in range(2)]


def _tokens(tmp_path, n=24, t=10):
    return write_token_file(tmp_path / "tokens.npz", n=n, t=t, vocab=VOCAB, low=3)


def _run(*args):
    return invoke_cli(*args)


def _logits_of(model, ids, mask):
    with torch.inference_mode():
        out = _logits(model(**model_kwargs(model, {"input_ids": ids, "attention_mask": mask})))
    return out[mask.bool()]


def _widths(model, name):
    m = model.get_submodule(name)
    return entry(m).widths(m)


@pytest.mark.parametrize("make", [_opt, _llama, _gpt2], ids=["opt", "llama", "gpt2"])
def test_strip_compact_writes_a_folder_deadscan_loads(tmp_path, make):
    folder, feeding = make(tmp_path)
    data = _tokens(tmp_path)
    out = tmp_path / "run"
    res, err = _run("strip", folder, "--data", data, "--finetune", 0, "--compact", "--out", out)
    assert res.exit_code == 0 and not err, res.output
    compact = out / "compact"
    assert compact.is_dir() and (out / "stripped").is_dir()
    assert "compact: removed" in res.output
    assert json.loads((compact / "config.json").read_text()) == json.loads((out / "stripped" / "config.json").read_text())
    assert (compact / "tokenizer.json").exists()
    assert not list(out.glob(".compact.*"))  # the temp folder is gone

    summary = json.loads((out / "summary.json").read_text())
    c = summary["compact"]
    assert c["path"] == str(compact) and summary["outputs"]["compact"] == str(compact)
    assert "deadscan.load(folder)" in c["loads"]
    assert c["max_abs_diff"] <= c["tolerance"]
    dead = {s["feeding_layer"]: s["dead"] for s in summary["sites"]}
    for layer in feeding:
        assert dead[layer] >= len(DEAD)

    # the file: original tensor names, narrower FFN tensors, widths in its metadata
    stripped_t = load_file(str(out / "stripped" / "model.safetensors"))
    compact_t = load_file(str(compact / "model.safetensors"))
    assert set(compact_t) == set(stripped_t)
    with safe_open(str(compact / "model.safetensors"), "pt") as f:
        shapes = json.loads(f.metadata()[SHAPES_KEY])
    for layer in feeding:
        assert shapes[layer]["out"] == FFN - dead[layer]
        assert compact_t[f"{layer}.weight"].numel() < stripped_t[f"{layer}.weight"].numel()

    stripped = deadscan.load(str(out / "stripped"))
    small = deadscan.load(str(compact))
    sites = {s["feeding_layer"]: s for s in summary["sites"]}
    for layer in feeding:  # the FFN width of each layer: neurons minus dead (feeding, gate partner, consumer)
        width = FFN - dead[layer]
        assert _widths(small, layer)["out"] == width and _widths(stripped, layer)["out"] == FFN
        assert _widths(small, sites[layer]["consumer_layer"])["in"] == width
        if sites[layer]["gate_partner"]:
            assert _widths(small, sites[layer]["gate_partner"])["out"] == width
    assert sum(p.numel() for p in small.parameters()) == c["params_after"]

    z = np.load(data)
    ids, mask = torch.from_numpy(z["input_ids"]), torch.from_numpy(z["attention_mask"])
    a, b = _logits_of(stripped, ids, mask), _logits_of(small, ids, mask)
    assert (a - b).abs().max().item() <= 1e-5

    # transformers cannot load it (one FFN width in config.json): the README says so
    with pytest.raises(Exception):
        type(stripped).from_pretrained(str(compact))

    # the chain: inspect scans the compact folder; its sites hold no dead neurons of the planted ones
    res, err = _run("inspect", compact, "--data", data, "--out", tmp_path / "again")
    assert res.exit_code == 0 and not err, res.output
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert {s["feeding_layer"]: s["neurons"] for s in again["sites"]} == \
        {layer: FFN - dead[layer] for layer in feeding}
    assert all(s["dead"] == 0 for s in again["sites"])


def test_crafted_shapes_are_refused_in_one_line(tmp_path):
    folder, feeding = _opt(tmp_path)
    data = _tokens(tmp_path)
    out = tmp_path / "run"
    res, err = _run("strip", folder, "--data", data, "--finetune", 0, "--compact", "--out", out)
    assert res.exit_code == 0, res.output
    path = out / "compact" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    shapes = json.loads(meta[SHAPES_KEY])
    shapes[feeding[0]]["out"] = FFN + 8  # wider than the tensors the file holds
    save_file(tensors, str(path), metadata={**meta, SHAPES_KEY: json.dumps(shapes)})
    with pytest.raises(CheckpointError, match="do not hold|does not hold|its tensors"):
        deadscan.load(str(out / "compact"))
    res, err = _run("inspect", out / "compact", "--data", data, "--out", tmp_path / "bad")
    assert res.exit_code != 0 and len(err) == 1 and SHAPES_KEY in err[0], res.output
    assert "Traceback" not in res.output

    # a layer the model does not have, and JSON that is no widths map: one line each as well
    for bad in ({"model.nothing.here": {"out": 4}}, ["not", "a", "map"]):
        save_file(tensors, str(path), metadata={**meta, SHAPES_KEY: json.dumps(bad)})
        res, err = _run("inspect", out / "compact", "--data", data, "--out", tmp_path / "bad2")
        assert res.exit_code != 0 and len(err) == 1 and SHAPES_KEY in err[0], res.output
