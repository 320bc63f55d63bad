"""`deadscan demo --lm` (issue 12): the bundled small ReLU OPT (sample_models/opt_pydoc, trained on the
standard library's pydoc topics) on the bundled held-out topics (sample_models/pydoc_val.txt). Its dead
counts equal an independent forward-hook count (transformers' own loader, the same token batches); the
run folder feeds `strip --from`, whose stripped/ loads with AutoModelForCausalLM."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # never the hub: the sample is bundled
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from click.testing import CliRunner  # noqa: E402

from deadscan.cli import SAMPLE_LM, SAMPLE_LM_SEQ_LEN, SAMPLE_LM_TEXT, main  # noqa: E402
from deadscan.data import load_data  # noqa: E402
from deadscan.resources import resource_path  # noqa: E402

LAYERS = 3
FFN = 256


def _invoke(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, (res.output, res.exception)
    return res


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-lm") / "run"
    res = _invoke("demo", "--lm", "--out", out, "--device", "cpu")
    assert res.stdout.startswith("deadscan demo --lm: a small ReLU OPT trained on Python's pydoc topics (opt_pydoc)")
    assert "model.decoder.layers.0.activation_fn" in res.stdout  # the table, as `demo` prints it
    return out


def _hook_count(folder, text):
    """Per FFN site, the neurons whose ReLU output is > 0 on no real token: plain forward hooks on a model
    loaded by transformers itself, over the same token batches the scan reads."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    data = load_data(str(text), "all", seq_len=SAMPLE_LM_SEQ_LEN, model_folder=folder)
    alive = {i: torch.zeros(FFN, dtype=torch.bool) for i in range(LAYERS)}
    mask = {}
    hooks = []
    for i in range(LAYERS):
        def hook(module, args, output, i=i):
            real = mask["m"].reshape(-1).bool()  # OPT's FFN sees (batch * positions, ffn)
            alive[i] |= (output.reshape(-1, FFN)[real] > 0).any(0)
        hooks.append(model.model.decoder.layers[i].activation_fn.register_forward_hook(hook))
    with torch.inference_mode():
        for s in range(0, len(data), 16):
            ids, m = data.input_ids[s:s + 16], data.attention_mask[s:s + 16]
            mask["m"] = m
            model(input_ids=ids, attention_mask=m, use_cache=False)
    for h in hooks:
        h.remove()
    return {f"model.decoder.layers.{i}.activation_fn": sorted(torch.nonzero(~alive[i]).flatten().tolist())
            for i in range(LAYERS)}, data


def test_demo_lm_counts_equal_a_hook_count(demo_dir):
    summary = json.loads((demo_dir / "summary.json").read_text())
    folder = resource_path("sample_models", SAMPLE_LM)
    text = resource_path("sample_models", SAMPLE_LM_TEXT)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    data = summary["data"]
    assert data["kind"] == "tokens" and data["seq_len"] == SAMPLE_LM_SEQ_LEN
    sites = {s["name"]: s for s in summary["sites"]}
    assert sorted(sites) == [f"model.decoder.layers.{i}.activation_fn" for i in range(LAYERS)]
    for i in range(LAYERS):
        s = sites[f"model.decoder.layers.{i}.activation_fn"]
        assert s["feeding_layer"] == f"model.decoder.layers.{i}.fc1"
        assert s["consumer_layer"] == f"model.decoder.layers.{i}.fc2"
        assert s["neurons"] == FFN
    expected, ds = _hook_count(folder, text)
    assert data["sequences"] == len(ds) and data["tokens"] == int(ds.attention_mask.sum())
    for name, dead in expected.items():
        assert sites[name]["dead_indices"] == dead, name
        assert sites[name]["dead"] == len(dead)
    assert sum(len(d) for d in expected.values()) > 0  # the sample really has dead neurons (none planted)


def test_demo_lm_then_strip_then_from_pretrained(demo_dir, tmp_path):
    out = tmp_path / "stripped-run"
    _invoke("strip", "--from", demo_dir, "--finetune", 1, "--warmup", 0, "--device", "cpu", "--out", out)
    stripped = out / "stripped"
    model = transformers.AutoModelForCausalLM.from_pretrained(stripped).eval()
    assert model.config.ffn_dim == FFN and model.config.num_hidden_layers == LAYERS
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["kind"] == "tokens"
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 5, model.config.vocab_size) and torch.isfinite(logits).all()


def test_demo_lm_lists_the_tokens_that_fire_its_rarest_live_neurons(demo_dir):
    """Every row equals a forward-hook count on transformers' own model: the same rarest live neurons, the
    same firing positions per token, the tokens as the folder's tokenizer reads them."""
    summary = json.loads((demo_dir / "summary.json").read_text())
    rare = summary["rare_tokens"]
    folder = resource_path("sample_models", SAMPLE_LM)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    data = load_data(str(resource_path("sample_models", SAMPLE_LM_TEXT)), "all", seq_len=SAMPLE_LM_SEQ_LEN,
                     model_folder=folder)
    assert rare["sequences"] == len(data)  # fewer than the pass's limit: every sequence was read
    fired = {i: torch.zeros(FFN, dtype=torch.long) for i in range(LAYERS)}
    by_token = {i: {} for i in range(LAYERS)}
    mask = {}

    def hook(module, args, output, i):
        real = mask["m"].reshape(-1).bool()
        on = output.reshape(-1, FFN)[real] > 0
        fired[i] += on.sum(0)
        ids = mask["ids"].reshape(-1)[real]
        for t, n in on.nonzero().tolist():
            by_token[i][(n, ids[t].item())] = by_token[i].get((n, ids[t].item()), 0) + 1

    hooks = [model.model.decoder.layers[i].activation_fn.register_forward_hook(
        lambda m, a, o, i=i: hook(m, a, o, i)) for i in range(LAYERS)]
    with torch.inference_mode():
        for s in range(0, len(data), 16):
            mask["m"], mask["ids"] = data.attention_mask[s:s + 16], data.input_ids[s:s + 16]
            model(input_ids=mask["ids"], attention_mask=mask["m"], use_cache=False)
    for h in hooks:
        h.remove()
    assert sorted(rare["sites"]) == [f"model.decoder.layers.{i}.activation_fn" for i in range(LAYERS)]
    for i in range(LAYERS):
        counts = fired[i]
        live = [n for n in range(FFN) if counts[n] > 0]
        expected = sorted(live, key=lambda n: (int(counts[n]), n))[:5]
        rows = rare["sites"][f"model.decoder.layers.{i}.activation_fn"]
        assert [r["neuron"] for r in rows] == expected
        for r in rows:
            n = r["neuron"]
            assert r["fired"] == int(counts[n]) and r["frequency"] == int(counts[n]) / int(data.attention_mask.sum())
            mine = sorted(((k, t) for (m, t), k in by_token[i].items() if m == n), key=lambda kt: (-kt[0], kt[1]))
            shown = [[tok.decode([t]) if tok.decode([t]).strip() else repr(tok.decode([t])), k] for k, t in mine[:5]]
            assert r["tokens"] == shown
    assert 'class="ds-rare-table"' in (demo_dir / "report.html").read_text()
