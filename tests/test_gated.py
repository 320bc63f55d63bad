"""Gated ReLU sites: relu(gate(x)) * up(x) read by down (Llama/Mistral with hidden_act relu).

A hand-written GatedMLP with hand-set weights and dead gate neurons planted through a -1e4 bias: the site
found by plain fx with gate (feeding), up (partner) and down (consumer); dead indices, %A, strip masks and
compaction against hand computations. Then a tiny LlamaForCausalLM with planted dead gate rows: dead
indices equal a forward-hook count, consumer down_proj, partner up_proj, compaction keeps the logits."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadscan
from deadscan.capacity import capacity
from deadscan.compact import compact
from deadscan.report import build_summary
from deadscan.runfolder import check_summary
from deadscan.scan import scan
from deadscan.strip import Masks, strip
from deadscan.trace import Consumer, Feeding, GatePartner, find_sites

GATED_SPEC = "test_gated:gated_net"  # built through deadscan's pkg.module:factory path (tests/ is on sys.path)
DEAD = [1, 4]
# gate rows by hand: row 1's two most negative weights are at 0 and 3; row 4 ties three at -0.2 (lowest two win)
GATE_W = [[0.1, 0.2, -0.1, 0.3],
          [-0.3, 0.2, -0.1, -0.2],
          [0.2, -0.2, 0.1, 0.1],
          [0.0, 0.1, 0.2, -0.1],
          [-0.2, 0.1, -0.2, -0.2],
          [0.3, 0.1, -0.3, 0.2]]
GATE_B = [2.0, -1e4, 2.0, 2.0, -1e4, 2.0]  # |W x| <= 1.2 on x in [0, 1): alive rows stay > 0, dead rows < 0


class GatedMLP(nn.Module):
    def __init__(self, d: int = 4, hidden: int = 6, out: int = 3):
        super().__init__()
        self.gate = nn.Linear(d, hidden)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, out)

    def forward(self, x):
        return self.down(F.relu(self.gate(x)) * self.up(x))


def gated_net() -> nn.Module:
    return GatedMLP()


def hand_gated() -> GatedMLP:
    m = GatedMLP()
    with torch.no_grad():
        m.gate.weight.copy_(torch.tensor(GATE_W))
        m.gate.bias.copy_(torch.tensor(GATE_B))
        m.up.weight.copy_(torch.arange(24, dtype=torch.float32).view(6, 4) / 10 - 1)
        m.up.bias.copy_(torch.arange(6, dtype=torch.float32) / 5 - 0.5)
        m.down.weight.copy_(torch.arange(18, dtype=torch.float32).view(3, 6) / 7 - 1)
        m.down.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return m.eval()


def _x(n: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 4, generator=torch.Generator().manual_seed(seed))


SITE = "(root):relu"


def test_gated_mlp_found_by_plain_fx():
    sm = find_sites(hand_gated())
    assert sm.opaque == [] and len(sm.sites) == 1
    s = sm[SITE]
    assert not s.hooked
    assert s.feeding == Feeding("gate", "linear", (), True)
    assert s.consumer == Consumer("down", "linear", 1, True)
    assert s.gate == GatePartner("up", "linear", True)
    assert s.form == "gated" and "up" in s.note and "down" in s.note


def test_gated_site_found_by_following_tensors():
    class Opaque(nn.Module):  # data-dependent control flow: fx cannot trace it, its ReLU module is hooked
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)
            self.act = nn.ReLU()

        def forward(self, x):
            if x.sum() > -1e9:
                x = x + 0
            return self.down(self.act(self.gate(x)) * self.up(x))

    s = find_sites(Opaque(), {"x": _x(2)})["act"]
    assert s.hooked
    assert s.feeding.layer == "gate" and s.consumer == Consumer("down", "linear", 1, True)
    assert s.gate == GatePartner("up", "linear", True) and "gated" in s.note


def test_not_gated_when_partner_reads_another_input():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.down(F.relu(self.gate(x)) * self.up(x * 2))

    s = find_sites(Two()).sites[0]
    assert s.gate is None and s.consumer is None and s.form == "plain"


def test_dead_indices_and_capacity_by_hand():
    model = hand_gated()
    x = _x()
    r = scan(model, x, device="cpu")[SITE]
    with torch.no_grad():
        oracle = (F.relu(model.gate(x)) > 0).sum(0).numpy()
    assert r.dead_indices == np.flatnonzero(oracle == 0).tolist() == DEAD
    cap = capacity(model, scan(model, x, device="cpu"))
    # P: gate 6*4 + 6, up 6*4 + 6, down's columns 3*6 (its bias is not hidden)
    hidden = 30 + 30 + 18
    # per dead neuron: gate row + bias (5), up row + bias (5), down column (3)
    inactive = 2 * (5 + 5 + 3)
    assert (cap.hidden_params, cap.inactive_params) == (hidden, inactive)
    assert cap.sites[SITE].hidden_params == hidden and cap.sites[SITE].inactive_params == inactive
    assert cap.active_percent == pytest.approx(100 * (hidden - inactive) / hidden)
    # the reference figure: gate weights only
    assert (cap.feeding_weights, cap.inactive_feeding_weights) == (24, 8)


def test_capacity_counts_pruned_weights_once():
    model = hand_gated()
    res = scan(model, _x(), device="cpu")
    gate = torch.zeros(6, 4, dtype=torch.bool)
    gate[1, 0] = gate[0, 2] = True  # dead row (already inactive), alive row (+1)
    up = torch.zeros(6, 4, dtype=torch.bool)
    up[4, 1] = up[2, 2] = True  # dead row, alive row (+1)
    down = torch.zeros(3, 6, dtype=torch.bool)
    down[0, 1] = down[0, 0] = True  # dead neuron's column, alive column (+1)
    cap = capacity(model, res, {"gate": gate, "up": up, "down": down})
    assert cap.inactive_params == 26 + 3
    assert cap.pruned_weights == 6
    assert cap.inactive_feeding_weights == 8 + 1


def test_strip_prunes_gate_weights_by_hand():
    model = hand_gated()
    masks = Masks(model)
    res = scan(model, _x(), device="cpu")
    stats = strip(model, res, masks, rate=0.5)
    want = torch.zeros(6, 4, dtype=torch.bool)
    # rate 0.5 of 4 remaining: 2 per dead neuron, most negative first, ties to the lower index
    want[1, [0, 3]] = True
    want[4, [0, 2]] = True
    assert set(masks.masks) == {"gate"}  # up is never stripped: the gate alone decides dead or alive
    assert torch.equal(masks.masks["gate"], want)
    assert stats.pruned == {"gate": 4} and stats.dead_targeted == 2
    expected = torch.tensor(GATE_W).masked_fill(want, 0)
    assert torch.equal(model.gate.weight.detach(), expected)
    # second step: 2 remaining -> 1 each: row 1's last negative (index 2), row 4's (index 3)
    strip(model, scan(model, _x(), device="cpu"), masks, rate=0.5)
    want[1, 2] = want[4, 3] = True
    assert torch.equal(masks.masks["gate"], want)
    # pruned weights all sit in dead rows: counted once
    assert capacity(model, res, masks.masks).inactive_params == 26


def test_compact_removes_gate_up_rows_and_down_columns(tmp_path):
    model = hand_gated()
    x = _x(64, seed=1)
    res = scan(model, x, device="cpu")
    c = compact(model, res)
    assert c.removed == {SITE: 2} and c.skipped == {}
    assert c.shapes == {"gate": {"in": 4, "out": 4}, "up": {"in": 4, "out": 4}, "down": {"in": 4, "out": 3}}
    assert c.params_before - c.params_after == 2 * (5 + 5 + 3)
    keep = [0, 2, 3, 5]
    assert torch.equal(c.model.gate.weight, model.gate.weight[keep])
    assert torch.equal(c.model.up.weight, model.up.weight[keep]) and torch.equal(c.model.up.bias, model.up.bias[keep])
    assert torch.equal(c.model.down.weight, model.down.weight[:, keep])
    with torch.inference_mode():
        a, b = model(x), c.model.eval()(x)
    diff = float((a - b).abs().max())
    assert diff <= 1e-5, f"max abs diff {diff}"
    path = tmp_path / "compact.safetensors"
    deadscan.save_safetensors(c.model, path, GATED_SPEC, c.metadata())
    loaded = deadscan.load(path, GATED_SPEC)
    assert (loaded.gate.out_features, loaded.up.out_features, loaded.down.in_features) == (4, 4, 4)
    with torch.inference_mode():
        assert torch.equal(loaded(x), b)
    # the compacted model has nothing dead left: a second compaction removes nothing
    assert compact(loaded, scan(loaded, x, device="cpu")).removed == {}


def test_compact_skips_a_partner_read_elsewhere():
    class Shared(GatedMLP):
        def forward(self, x):
            u = self.up(x)
            return self.down(F.relu(self.gate(x)) * u) + u.sum(-1, keepdim=True)

    model = Shared()
    model.load_state_dict(hand_gated().state_dict())
    s = find_sites(model).sites[0]
    assert s.gate == GatePartner("up", "linear", False)
    c = compact(model, scan(model, _x(), device="cpu"))
    assert c.removed == {} and "partner" in c.skipped[SITE]


def test_summary_row_names_partner_and_consumer():
    model = hand_gated()
    res = scan(model, _x(), device="cpu")
    summary = build_summary(res, capacity(model, res), command="", checkpoint=None,
                            data={"name": "rand", "split": "all", "samples": 32}, elapsed=0.0)
    row = summary["sites"][0]
    assert (row["feeding_layer"], row["consumer_layer"], row["gate_partner"]) == ("gate", "down", "up")
    check_summary(summary, "summary.json")  # the schema takes the new field


# ---------------------------------------------------------------------------------------------
# A tiny Llama with hidden_act relu


def _llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"
    cfg = transformers.LlamaConfig(hidden_act="relu", vocab_size=64, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # a zero gate row: pre-activation exactly 0 everywhere (no bias in Llama)
        for i in range(2):
            model.model.layers[i].mlp.gate_proj.weight[[3, 7, 20]] = 0.0
    folder = tmp_path / "llama"
    model.save_pretrained(folder)
    return folder


def test_llama_gated_site(tmp_path):
    from deadscan.data import load_data
    from deadscan.data.tokens import model_kwargs

    folder = _llama(tmp_path)
    model = deadscan.load(str(folder))
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 64, (12, 10))
    np.savez(tmp_path / "tokens.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    ds = load_data(str(tmp_path / "tokens.npz"), "all")
    sm = find_sites(model)
    acts = [f"model.layers.{i}.mlp.act_fn" for i in range(2)]
    for i, a in enumerate(acts):
        s = sm[a]
        p = f"model.layers.{i}.mlp"
        assert s.feeding.layer == f"{p}.gate_proj" and s.consumer.layer == f"{p}.down_proj"
        assert s.gate.layer == f"{p}.up_proj" and s.gate.exclusive and s.form == "gated"
    result = scan(model, ds, sitemap=sm, batch_size=4, device="cpu")

    counts = {}
    handles = [model.get_submodule(a).register_forward_hook(
        lambda _m, _i, out, a=a: counts.__setitem__(a, counts.get(a, 0) + (out.reshape(-1, 32) > 0).sum(0)))
        for a in acts]
    batches = list(ds.batches(4, "cpu"))
    try:
        with torch.no_grad():
            for b in batches:
                model(**model_kwargs(model, b))
    finally:
        for h in handles:
            h.remove()
    for a in acts:
        want = np.flatnonzero(counts[a].numpy() == 0).tolist()
        assert result[a].dead_indices == want and {3, 7, 20} <= set(want), (a, want)

    c = compact(model, result)
    assert set(c.removed) == set(acts) and c.skipped == {}
    for i in range(2):
        p = f"model.layers.{i}.mlp"
        n = 32 - c.removed[acts[i]]
        assert c.shapes[f"{p}.gate_proj"]["out"] == c.shapes[f"{p}.up_proj"]["out"] == n
        assert c.shapes[f"{p}.down_proj"]["in"] == n
    diff = 0.0
    with torch.no_grad():
        for b in batches:
            kw = model_kwargs(model, b)
            diff = max(diff, float((model(**kw).logits - c.model.eval()(**kw).logits).abs().max()))
    assert diff <= 1e-5, f"max abs diff of logits {diff}"
