"""The layer registry (deadscan/layers.py): every layer kind, with dead neurons known by construction.

One hand-set network, written once in "rows" layout (neuron, input), is built from each layer kind:
nn.Linear, nn.Conv1d/2d/3d (kernel 1, so the same numbers hold) and the transposed Conv1D of
Hugging Face's GPT-2 (weight (in, out): a neuron is a COLUMN), both a hand-written one and, if
transformers is installed, the real one. Each must give the same scan, strip masks (in its own
weight layout), %A and compaction.

    fc1 (3 -> 4) -> act1 -> fc2 (4 -> 3) -> act2 -> fc3 (3 -> 2), inputs in [0, 1)

act1: neurons 0 and 2 dead (bias far below what their weights can reach), not provably (fc1 reads
the model input). act2: neuron 1 dead and provably dead (all its weights and bias <= 0 on ReLU
outputs). Every other neuron has positive weights and bias: alive on every input.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from deadscan import layers
from deadscan.capacity import capacity
from deadscan.compact import compact
from deadscan.errors import ArchError, TraceError
from deadscan.reportdata import collect
from deadscan.scan import scan
from deadscan.strip import Masks, redo, strip
from deadscan.trace import find_sites, is_leaf
from deadscan.zoo import apply_shapes, resized, widths

W1 = [[0.5, -1.0, -2.0], [1.0, 1.0, 1.0], [-0.5, 1.0, -3.0], [0.2, 0.3, 0.4]]
B1 = [-10.0, 0.1, -5.0, 0.5]
W2 = [[0.3, 0.4, 0.5, 0.6], [-1.0, -0.5, -0.25, -2.0], [0.5, 1.0, 0.5, 1.0]]
B2 = [0.1, -0.1, 0.0]
W3 = [[1.0, 2.0, 3.0], [-1.0, 0.5, 0.25]]
B3 = [0.1, -0.2]


class HandConv1D(nn.Module):
    """The layout of transformers.pytorch_utils.Conv1D, written here: weight (nx, nf), y = x @ W + b."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(x.shape[:-1] + (self.nf,))


HandConv1D.__name__ = "Conv1D"  # what the duck typing looks for


def _hf_conv1d_class():
    return pytest.importorskip("transformers.pytorch_utils", reason="transformers is not installed").Conv1D


# kind -> (layer factory (in, out), input shape, registry name)
KINDS = {
    "linear": (lambda i, o: nn.Linear(i, o), (16, 5, 3), "linear"),
    "conv1d": (lambda i, o: nn.Conv1d(i, o, 1), (16, 3, 5), "conv1d"),
    "conv2d": (lambda i, o: nn.Conv2d(i, o, 1), (16, 3, 2, 3), "conv2d"),
    "conv3d": (lambda i, o: nn.Conv3d(i, o, 1), (16, 3, 2, 2, 2), "conv3d"),
    "hand_conv1d": (lambda i, o: HandConv1D(o, i), (16, 5, 3), "hf_conv1d"),
    "hf_conv1d": (lambda i, o: _hf_conv1d_class()(o, i), (16, 5, 3), "hf_conv1d"),
}
TRANSPOSED = {"hand_conv1d", "hf_conv1d"}


def _set(layer: nn.Module, rows: list, bias: list) -> None:
    """Write a (neurons, inputs) matrix into the layer in its own layout."""
    w = torch.tensor(rows)
    with torch.no_grad():
        if type(layer).__name__ == "Conv1D":
            layer.weight.copy_(w.t())  # (in, out): neuron j is column j
        else:
            layer.weight.copy_(w.view(layer.weight.shape))
        layer.bias.copy_(torch.tensor(bias))


def _model(kind: str) -> tuple[nn.Module, torch.Tensor]:
    make, shape, _ = KINDS[kind]
    m = nn.Sequential(OrderedDict(fc1=make(3, 4), act1=nn.ReLU(), fc2=make(4, 3), act2=nn.ReLU(), fc3=make(3, 2)))
    for name, w, b in (("fc1", W1, B1), ("fc2", W2, B2), ("fc3", W3, B3)):
        _set(getattr(m, name), w, b)
    return m.eval(), torch.rand(shape, generator=torch.Generator().manual_seed(0))


def _weight_layout(kind: str, cells: list[tuple[int, int]], rows_shape: tuple[int, int]) -> torch.Tensor:
    """A bool tensor in the kind's weight layout, True at (neuron, input) cells."""
    m = torch.zeros(rows_shape, dtype=torch.bool)
    for n, i in cells:
        m[n, i] = True
    if kind in TRANSPOSED:
        return m.t().contiguous()
    return m if kind == "linear" else m.view(rows_shape + (1,) * (len(KINDS[kind][1]) - 2))  # conv: 1-cell kernel


@pytest.fixture(params=list(KINDS))
def kind(request) -> str:
    return request.param


def test_registry_entry_per_kind(kind):
    m, _ = _model(kind)
    k = layers.entry(m.fc1)
    assert k.name == KINDS[kind][2]
    assert (k.out_dim, k.in_dim, k.feature_axis) == ((1, 0, -1) if kind in TRANSPOSED
                                                     else (0, 1, -1 if kind == "linear" else 1))
    rows = k.rows(m.fc1.weight)
    assert torch.equal(rows.flatten(1), torch.tensor(W1))  # rows read the same whatever the stored layout
    assert rows.data_ptr() == m.fc1.weight.data_ptr()  # a view, not a copy
    assert k.fan_in(m.fc1) == 3 and k.widths(m.fc1) == {"in": 3, "out": 4} == widths(m.fc1)
    s, t = k.affine(m.fc1)
    assert torch.equal(s, torch.ones(4)) and torch.equal(t, torch.tensor(B1))


def test_trace_sees_every_kind_as_feeding_and_consumer(kind):
    m, _ = _model(kind)
    assert is_leaf(m.fc1)  # HF Conv1D: one call_module node, not an addmm traced through
    sm = find_sites(m)
    name = KINDS[kind][2]
    assert [s.name for s in sm.sites] == ["act1", "act2"]
    a1, a2 = sm.sites
    assert (a1.feeding.layer, a1.feeding.kind, a1.consumer.layer, a1.consumer.kind) == ("fc1", name, "fc2", name)
    assert (a2.feeding.layer, a2.consumer.layer) == ("fc2", "fc3")
    assert a1.axis == a2.axis == layers.entry(m.fc1).feature_axis
    assert not a1.input_nonneg and a2.input_nonneg
    nodes = [n for n in sm.parts[0].graph.nodes if n.op == "call_module"]
    assert [n.target for n in nodes] == ["fc1", "act1", "fc2", "act2", "fc3"]


def test_scan_dead_and_provably_dead(kind):
    m, x = _model(kind)
    r = scan(m, x, device="cpu", input_means=True)
    assert r["act1"].dead_indices == [0, 2] and r["act2"].dead_indices == [1]
    assert r["act1"].provably_dead.tolist() == [False] * 4
    assert r["act2"].provably_dead.tolist() == [False, True, False]
    assert r["act1"].mean_input.shape == (3,) and r["act2"].mean_input.shape == (4,)  # per input feature
    assert r["act2"].mean_input[[0, 2]].tolist() == [0.0, 0.0]  # fc2 reads act1's dead neurons as zeros


def test_strip_masks_prune_a_dead_neurons_most_negative_weights(kind):
    """rate 0.5: fc1's dead neurons (3 inputs) lose 1 weight per step, fc2's dead neuron (4 inputs) 2.
    For HF Conv1D the pruned entries lie in the dead neuron's COLUMN."""
    m, x = _model(kind)
    masks = Masks(m)
    r = scan(m, x, device="cpu")
    st = strip(m, r, masks, rate=0.5)
    assert st.pruned == {"fc1": 2, "fc2": 2} and st.dead_targeted == 3 and st.without_negative == 0
    # fc1 neuron 0: -2.0 at input 2; neuron 2: -3.0 at input 2. fc2 neuron 1: -2.0 (input 3), -1.0 (input 0)
    assert torch.equal(masks.masks["fc1"], _weight_layout(kind, [(0, 2), (2, 2)], (4, 3)))
    assert torch.equal(masks.masks["fc2"], _weight_layout(kind, [(1, 3), (1, 0)], (3, 4)))
    rows = layers.entry(m.fc1).rows(m.fc1.weight).flatten(1)
    assert rows[0].tolist() == [0.5, -1.0, 0.0] and rows[2].tolist() == [-0.5, 1.0, 0.0]
    assert torch.equal(rows[[1, 3]], torch.tensor(W1)[[1, 3]])
    # next step: 2 remaining -> 1 more each: fc1 neuron 0 -> -1.0 (input 1), neuron 2 -> -0.5 (input 0)
    strip(m, scan(m, x, device="cpu"), masks, rate=0.5)
    assert torch.equal(masks.masks["fc1"], _weight_layout(kind, [(0, 2), (2, 2), (0, 1), (2, 0)], (4, 3)))
    # then neuron 0 has only its positive weight left: nothing to prune, counted as such
    st = strip(m, scan(m, x, device="cpu"), masks, rate=0.5)
    assert st.pruned["fc1"] == 0  # fc1 neurons 0 and 2: nothing negative left
    assert st.without_negative == 0  # fc1 reads raw inputs: not counted as held by bias


def test_strip_contribution_criterion_reads_inputs_along_the_right_axis(kind):
    """w * E[x]: fc2's dead neuron reads act1's dead neurons 0 and 2 as zero inputs, so its -1.0 and
    -0.25 weights contribute nothing; the two picked are -2.0 * E[h3] and -0.5 * E[h1] (inputs 3, 1)."""
    m, x = _model(kind)
    masks = Masks(m)
    strip(m, scan(m, x, device="cpu", input_means=True), masks, rate=0.5, criterion="contribution")
    assert torch.equal(masks.masks["fc2"], _weight_layout(kind, [(1, 3), (1, 1)], (3, 4)))


def test_capacity_numbers_by_hand(kind):
    """Hidden P: fc1 12 w + 4 b, fc2 12 w + 3 b (feeds act2, consumes act1), fc3 6 w (consumes) = 37.
    Inactive: fc1 dead rows 0, 2: 2 x 3 w + 2 b = 8; fc2 dead row 1 (4 w + 1 b) and dead columns 0, 2
    (2 x 3 w) sharing 2 cells: 4 + 6 - 2 + 1 = 9; fc3 dead column 1: 2 w. 19 in all."""
    m, x = _model(kind)
    r = scan(m, x, device="cpu")
    cap = capacity(m, r)
    assert (cap.hidden_params, cap.inactive_params, cap.pruned_weights) == (37, 19, 0)
    assert cap.active_percent == pytest.approx(100 * 18 / 37)
    assert (cap.feeding_weights, cap.inactive_feeding_weights) == (24, 10)  # fc1 2 x 3, fc2 1 x 4
    assert cap.active_percent_feeding_weights == pytest.approx(100 * 14 / 24)
    # act1: fc1 16 + fc2 weights 12 = 28, inactive 2 x (3 + 1) + 2 columns x 3 = 14
    # act2: fc2 15 + fc3 weights 6 = 21, inactive 1 x (4 + 1) + 1 column x 2 = 7
    assert {k: (v.hidden_params, v.inactive_params) for k, v in cap.sites.items()} == {"act1": (28, 14),
                                                                                        "act2": (21, 7)}
    assert cap.sites["act1"].active_percent == 50.0
    assert cap.sites["act2"].active_percent == pytest.approx(100 * 14 / 21)

    # Masks in each kind's own weight layout: fc1 (1, 0) live -> +1; fc2 (0, 2) reads a dead neuron
    # (already inactive), (2, 1) live -> +1; pruned 3.
    masks = {"fc1": _weight_layout(kind, [(1, 0)], (4, 3)), "fc2": _weight_layout(kind, [(0, 2), (2, 1)], (3, 4))}
    cap = capacity(m, r, masks)
    assert (cap.hidden_params, cap.inactive_params, cap.pruned_weights) == (37, 21, 3)
    # feeding weights alone know no dead columns: fc1 6 + 1, fc2 4 + 2
    assert cap.inactive_feeding_weights == 13
    assert {k: v.inactive_params for k, v in cap.sites.items()} == {"act1": 15, "act2": 9}


def test_compact_removes_dead_neurons_outputs_unchanged(kind):
    m, x = _model(kind)
    r = scan(m, x, device="cpu")
    c = compact(m, r)
    assert c.removed == {"act1": 2, "act2": 1} and c.skipped == {}
    assert c.shapes == {"fc1": {"in": 3, "out": 2}, "fc2": {"in": 2, "out": 2}, "fc3": {"in": 2, "out": 2}}
    assert (c.params_before, c.params_after) == (39, 20)  # 16 + 15 + 8 -> (6 + 2) + (4 + 2) + (4 + 2)
    k = layers.entry(c.model.fc2)
    assert type(c.model.fc2) is type(m.fc2)
    # fc2 keeps neurons 0, 2 and reads act1's neurons 1, 3
    assert torch.equal(k.rows(c.model.fc2.weight).flatten(1), torch.tensor([[0.4, 0.6], [1.0, 1.0]]))
    assert torch.equal(c.model.fc2.bias, torch.tensor([B2[0], B2[2]]))
    with torch.no_grad():
        diff = float((m(x) - c.model(x)).abs().max())
    assert diff <= 1e-6, f"max abs diff {diff:.3g}"
    # the recorded widths rebuild the architecture so the compacted state dict loads strictly
    fresh, _ = _model(kind)
    apply_shapes(fresh, c.shapes)
    fresh.load_state_dict(c.model.state_dict(), strict=True)


def test_redo_reinitialises_a_column_for_hf_conv1d(kind):
    m, x = _model(kind)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    redo(m, scan(m, x, device="cpu"), generator=torch.Generator().manual_seed(0))
    k = layers.entry(m.fc1)
    new1, old1 = k.rows(m.fc1.weight).flatten(1), k.rows(before["fc1.weight"]).flatten(1)
    assert torch.equal(new1[[1, 3]], old1[[1, 3]]) and not torch.equal(new1[[0, 2]], old1[[0, 2]])
    assert new1[[0, 2]].abs().max() <= 1 / 3**0.5  # U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert torch.equal(m.fc1.bias, torch.tensor([0.0, B1[1], 0.0, B1[3]]))
    # fc2 reads act1's dead neurons 0, 2 through zeroed inputs; its own dead neuron 1 is re-drawn
    cols = layers.entry(m.fc2).rows(m.fc2.weight).flatten(1)
    assert cols[[0, 2]][:, [0, 2]].abs().sum() == 0 and cols[0, 1] == W2[0][1]
    f3 = layers.entry(m.fc3).rows(m.fc3.weight).flatten(1)
    assert f3[:, 1].abs().sum() == 0 and torch.equal(f3[:, [0, 2]], torch.tensor(W3)[:, [0, 2]])


def test_report_histograms_read_rows(kind):
    """collect's dead/healthy weight histograms count each neuron's own incoming weights."""
    m, x = _model(kind)
    r = scan(m, x, device="cpu")
    summary = {"sites": [{"name": s.site.name} for s in r.sites]}
    masks = {"fc1": _weight_layout(kind, [(0, 2)], (4, 3))}
    data = collect(summary, r, m, masks=masks, bins=8)
    h1 = data.sites[0].weights
    assert (h1.series["dead"].sum(), h1.series["healthy"].sum()) == (5, 6)  # 2 x 3 - 1 pruned; 2 x 3
    h2 = data.sites[1].weights
    assert (h2.series["dead"].sum(), h2.series["healthy"].sum()) == (4, 8)
    assert h2.edges[0] == -2.0 and h2.edges[-1] == 1.0  # fc2's weights: -2 .. 1, whatever the layout


# ---------------------------------------------------------------------------------------------
# Unknown kinds and mismatches fail, never skip


def test_duck_typing_is_strict():
    class Conv1D(nn.Module):  # right name, no nf
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(3, 4))

    assert layers.kind_of(Conv1D()) is None
    wrong = HandConv1D(4, 3)
    wrong.nf = 5  # weight (3, 4) does not end in nf
    assert layers.kind_of(wrong) is None
    assert layers.kind_of(HandConv1D(4, 3)) is layers.HF_CONV1D
    assert layers.kind_of(nn.Linear(2, 2)) is layers.LINEAR


def test_unknown_kind_raises_a_clear_error():
    with pytest.raises(TraceError, match="layer blk is a Bilinear, whose weight layout deadscan does not know"):
        layers.entry(nn.Bilinear(2, 2, 3), "blk")
    with pytest.raises(ArchError, match="cannot resize a Bilinear"):
        resized(nn.Bilinear(2, 2, 3), out_features=2)


@pytest.mark.parametrize("swap", ["unknown", "wider"])
def test_a_layer_that_no_longer_fits_the_scan_fails_everywhere(swap):
    """The old code skipped a feeding layer whose weight rows did not match the site's neurons."""
    m, x = _model("linear")
    r = scan(m, x, device="cpu")
    m.fc1 = nn.Bilinear(3, 3, 4) if swap == "unknown" else nn.Linear(3, 5)
    match = "does not know" if swap == "unknown" else "4 neurons: the scan does not match"
    with pytest.raises(TraceError, match=match):
        capacity(m, r)
    with pytest.raises(TraceError, match=match):
        strip(m, r, Masks(m), rate=0.5)
    with pytest.raises(TraceError, match=match):
        redo(m, r)
    with pytest.raises(TraceError, match=match):
        compact(m, r)


def test_prune_and_resize_keep_device_dtype_and_layout():
    conv = HandConv1D(4, 3).double()
    with torch.no_grad():
        conv.weight.copy_(torch.arange(12.0).view(3, 4))
        conv.bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    k = layers.entry(conv)
    out = k.prune_out(conv, torch.tensor([3, 1]))
    assert type(out) is HandConv1D and out.weight.dtype == torch.float64 and (out.nf, out.nx) == (2, 3)
    assert out.weight.tolist() == [[3.0, 1.0], [7.0, 5.0], [11.0, 9.0]] and out.bias.tolist() == [4.0, 2.0]
    inp = k.prune_in(conv, torch.tensor([0, 2]))
    assert inp.weight.tolist() == [[0.0, 1.0, 2.0, 3.0], [8.0, 9.0, 10.0, 11.0]] and inp.bias.tolist() == [1, 2, 3, 4]
    assert widths(inp) == {"in": 2, "out": 4}
    assert isinstance(resized(nn.BatchNorm1d(4), out_features=2), nn.BatchNorm1d)


# ---------------------------------------------------------------------------------------------
# A real GPT-2 (transformers optional)


def test_gpt2_mlp_dead_neurons_scanned_stripped_and_compacted():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=16, vocab_size=32,
                                  activation_function="relu", bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    c_fc = model.transformer.h[0].mlp.c_fc  # weight (8, 32): neuron j is column j
    with torch.no_grad():
        c_fc.weight[:, [3, 17]] = -0.01
        c_fc.weight[0, 3] = -1.0  # the most negative of neuron 3's column
        c_fc.bias[[3, 17]] = -100.0

    class Logits(nn.Module):  # compact compares tensors, and HF models return dataclasses
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(ids).logits

    wrapped = Logits(model).eval()  # scan restores the training flag: a training wrapper would turn dropout on
    ids = torch.randint(0, 32, (4, 10), generator=torch.Generator().manual_seed(0))
    r = scan(wrapped, [ids], device="cpu")
    site = r["m.transformer.h.0.mlp.act"]
    assert site.site.feeding.kind == "hf_conv1d" and site.site.consumer.layer == "m.transformer.h.0.mlp.c_proj"
    assert site.dead_indices == [3, 17]

    c = compact(wrapped, r)
    assert c.removed == {"m.transformer.h.0.mlp.act": 2}
    assert c.model.m.transformer.h[0].mlp.c_fc.weight.shape == (8, 30)
    assert c.model.m.transformer.h[0].mlp.c_proj.weight.shape == (30, 8)
    with torch.no_grad():
        diff = float((wrapped(ids) - c.model(ids)).abs().max())
    assert diff <= 1e-6, f"max abs diff {diff:.3g}"

    masks = Masks(wrapped)
    strip(wrapped, r, masks, rate=0.1)
    pruned = masks.masks["m.transformer.h.0.mlp.c_fc"].nonzero().tolist()
    assert pruned == [[0, 3], [0, 17]]  # one weight per dead COLUMN: (input 0, neuron 3), then neuron 17's
