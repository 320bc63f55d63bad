"""Exact per-neuron statistics from deadscan.scan on models whose dead neurons are known by
construction.

All weights, biases and inputs are small integers or halves, so every sum is exact in float32 and
the expected figures below can be compared with ``==``.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import deadscan
from deadscan.scan import instrument


def linear(w, b) -> nn.Linear:
    """A Linear with the given weight rows and bias."""
    w = torch.tensor(w, dtype=torch.float32)
    layer = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(torch.tensor(b, dtype=torch.float32))
    return layer


def ref_linear_relu(x: list[list[float]], w, b, top: float = float("inf")):
    """Reference pre-activations and outputs of relu(x W^T + b), in plain Python."""
    pre = [[sum(wi * xi for wi, xi in zip(row, sample)) + bi for row, bi in zip(w, b)] for sample in x]
    out = [[min(max(p, 0.0), top) for p in sample] for sample in pre]
    return pre, out


def column_stats(pre, out):
    """(out_sum, active, pre_max) per neuron from per-sample rows."""
    cols = list(zip(*out))
    return (np.array([sum(c) for c in cols], dtype=np.float64),
            np.array([sum(v > 0 for v in c) for c in zip(*pre)], dtype=np.int64),
            np.array([max(c) for c in zip(*pre)], dtype=np.float32))


def assert_same_stats(r1, r2):
    assert [r.site.name for r in r1.sites] == [r.site.name for r in r2.sites]
    assert r1.samples == r2.samples
    for a, b in zip(r1.sites, r2.sites):
        np.testing.assert_array_equal(a.out_sum, b.out_sum)
        np.testing.assert_array_equal(a.active, b.active)
        np.testing.assert_array_equal(a.pre_max, b.pre_max)
        np.testing.assert_array_equal(a.provably_dead, b.provably_dead)
        assert a.elements == b.elements
        assert a.dead_indices == b.dead_indices


# ---------------------------------------------------------------------------------------------
# A hand-built Linear MLP

# Positive integer inputs; sample 5 is the only one with x0 = 5.
X = [[1, 2, 3], [2, 1, 1], [3, 3, 1], [1, 1, 2], [2, 2, 2], [5, 1, 3], [3, 1, 1]]
W1 = [[1, 0, 0],  # pre = x0: always active
      [-1, -1, -1],  # pre = -(x0 + x1 + x2) - 1: dead on positive inputs (not provably: raw input)
      [1, 0, 0],  # pre = x0 - 4: active on sample 5 only (5 - 4 = 1)
      [0, 1, -1]]  # pre = x1 - x2: sometimes active
B1 = [0, -1, -4, 0]
W2 = [[-1, 0, -2, -1],  # every weight and the bias <= 0 on relu outputs: provably dead
      [1, 0, 0, 0],  # pre = h0 - 2 = x0 - 2: sometimes active
      [0, -1, 0, 0]]  # pre = 1 - h1 = 1 (h1 is dead): weights <= 0 but bias > 0, always active
B2 = [0, -2, 1]


def hand_mlp() -> nn.Module:
    return nn.Sequential(OrderedDict(
        fc1=linear(W1, B1), relu1=nn.ReLU(), fc2=linear(W2, B2), relu2=nn.ReLU(),
    )).eval()


def x_tensor() -> torch.Tensor:
    return torch.tensor(X, dtype=torch.float32)


def test_hand_mlp_exact_statistics():
    r = deadscan.scan(hand_mlp(), x_tensor(), batch_size=7, device="cpu")
    assert [s.site.name for s in r.sites] == ["relu1", "relu2"]
    assert r.samples == 7 and r.device == "cpu"
    pre1, out1 = ref_linear_relu(X, W1, B1)
    pre2, out2 = ref_linear_relu(out1, W2, B2)

    r1 = r["relu1"]
    assert r1.neurons == 4 and r1.elements == 7
    assert r1.dead_indices == [1]
    np.testing.assert_array_equal(r1.dead, [False, True, False, False])
    s, a, m = column_stats(pre1, out1)
    np.testing.assert_array_equal(r1.out_sum, s)
    np.testing.assert_array_equal(r1.active, a)
    np.testing.assert_array_equal(r1.pre_max, m)
    # neuron 2 fires on sample 5 only, with output 5 - 4 = 1
    assert r1.active[2] == 1 and r1.out_sum[2] == 1.0 and r1.pre_max[2] == 1.0
    assert r1.frequency[2] == 1 / 7
    assert not r1.dead[2]
    # neuron 0 fires on every sample: active == its element count
    assert r1.active[0] == r1.elements == 7 and r1.frequency[0] == 1.0
    assert r1.out_sum[0] == sum(x[0] for x in X) == 17
    # neuron 3: x1 - x2 is -1, 0, 2, -1, 0, -2, 0: active on sample 2 only
    assert r1.active[3] == 1 and r1.out_sum[3] == 2
    # dead neuron: max pre-activation = -(smallest x0 + x1 + x2) - 1 = -(1 + 1 + 2) - 1
    assert r1.pre_max[1] == -5.0
    np.testing.assert_array_equal(r1.out_max, [5.0, 0.0, 1.0, 2.0])
    np.testing.assert_array_equal(r1.provably_dead, [False] * 4)  # fc1 reads the raw input

    r2 = r["relu2"]
    assert r2.dead_indices == [0]
    s, a, m = column_stats(pre2, out2)
    np.testing.assert_array_equal(r2.out_sum, s)
    np.testing.assert_array_equal(r2.active, a)
    np.testing.assert_array_equal(r2.pre_max, m)
    assert r2.active[2] == 7 and r2.out_sum[2] == 7.0
    # pre of neuron 0 = -h0 - 2 h2 - h3: largest when h0 is smallest (1) and h2 = h3 = 0
    assert r2.pre_max[0] == -1.0 and r2.out_max[0] == 0.0
    np.testing.assert_array_equal(r2.provably_dead, [True, False, False])
    assert r.dead == 2 and r.neurons == 7


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 6, 100])
def test_batch_size_does_not_change_results(batch_size):
    whole = deadscan.scan(hand_mlp(), x_tensor(), batch_size=7, device="cpu")
    split = deadscan.scan(hand_mlp(), x_tensor(), batch_size=batch_size, device="cpu")
    assert_same_stats(whole, split)


def test_merge_equals_scan_of_concatenation():
    model = hand_mlp()
    x = x_tensor()
    a = deadscan.scan(model, x[:3], batch_size=2, device="cpu")
    b = deadscan.scan(model, x[3:], batch_size=3, device="cpu")
    whole = deadscan.scan(model, torch.cat([x[:3], x[3:]]), batch_size=7, device="cpu")
    merged = deadscan.merge(a, b)
    assert_same_stats(merged, whole)
    # neuron 2 of relu1 is dead in shard a (no x0 = 5 there) but not after merging
    assert 2 in a["relu1"].dead_indices and 2 not in merged["relu1"].dead_indices
    for m, w in zip(merged.sites, whole.sites):
        np.testing.assert_array_equal(m.frequency, w.frequency)
        np.testing.assert_array_equal(m.score, w.score)


def test_merge_refuses_different_models():
    a = deadscan.scan(hand_mlp(), x_tensor(), device="cpu")
    b = deadscan.scan(deadscan.zoo.build("mlp(depth=1, width=2, in_features=3)"), x_tensor(), device="cpu")
    with pytest.raises(deadscan.TraceError):
        deadscan.merge(a, b)


# ---------------------------------------------------------------------------------------------
# Conv and token-dimension neurons


def test_conv_channel_dead_everywhere():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[0] = 1.0  # channel 0: weights 1, bias 1 -> > 0 everywhere on inputs >= 0
        conv.bias[0] = 1.0
        conv.weight[1] = -1.0  # channel 1: weights -1, bias -1 -> dead on inputs >= 0
        conv.bias[1] = -1.0
        conv.weight[2, 0, 1, 1] = 1.0  # channel 2: centre of input channel 0, minus 0.5
        conv.bias[2] = -0.5
    model = nn.Sequential(OrderedDict(conv=conv, act=nn.ReLU())).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2, (3, 2, 5, 5), generator=g).float()  # 0/1 inputs
    r = deadscan.scan(model, x, batch_size=2, device="cpu")["act"]
    assert r.site.axis == 1 and r.neurons == 3
    assert r.elements == 3 * 5 * 5
    assert r.dead_indices == [1]
    ones = int(x[:, 0].sum())  # channel 2 fires (0.5) exactly where input channel 0 is 1
    assert 0 < ones < 75
    assert r.active.tolist() == [75, 0, ones]
    assert r.out_sum[2] == 0.5 * ones
    assert r.pre_max[2] == 0.5
    # channel 0 output = 1 + sum of the 3x3x2 window
    ref0 = F.conv2d(x, torch.ones(1, 2, 3, 3), padding=1) + 1
    assert r.out_sum[0] == float(ref0.sum())
    # channel 1: the largest pre-activation is -1 - (smallest window sum)
    ref1 = -F.conv2d(x, torch.ones(1, 2, 3, 3), padding=1) - 1
    assert r.pre_max[1] == float(ref1.max())
    assert r.frequency.tolist() == [1.0, 0.0, ones / 75]


def test_token_dimension_linear():
    # [B=2, T=5, D=3] inputs in {0, 1, 2, 3}; token 3 of sample 1 has x0 = 11.
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 4, (2, 5, 3), generator=g).float()
    x[1, 3, 0] = 11.0
    w = [[1, 1, 1],  # always active (bias 1)
         [-1, 0, 0],  # dead
         [1, 0, 0],  # x0 - 10 > 0 on token (1, 3) only
         [0, 1, 0]]  # x1 - 1 > 0 where x1 >= 2
    b = [1, -1, -10, -1]
    model = nn.Sequential(OrderedDict(fc=linear(w, b), act=nn.ReLU())).eval()
    r = deadscan.scan(model, x, batch_size=1, device="cpu")["act"]
    assert r.site.axis == -1
    assert r.neurons == 4  # features, aggregated over batch and tokens
    assert r.elements == 2 * 5
    assert r.dead_indices == [1]
    assert r.active[2] == 1 and r.out_sum[2] == 1.0 and r.pre_max[2] == 1.0
    assert r.frequency[2] == 0.1
    assert r.active[0] == 10
    assert r.out_sum[0] == float((x.sum(-1) + 1).sum())
    assert r.active[3] == int((x[..., 1] >= 2).sum())
    assert r.out_sum[3] == float((x[..., 1] - 1).clamp(min=0).sum())


# ---------------------------------------------------------------------------------------------
# Provably dead


POS = torch.tensor([[1, 2], [2, 1], [3, 3], [1, 1]], dtype=torch.float32)  # positive inputs


def provable_model(relu_before: bool) -> nn.Module:
    layers = OrderedDict()
    if relu_before:
        layers["fc0"] = linear([[1, 0], [0, 1], [-1, -1]], [0, 0, -1])  # row 2 dead, not provably
        layers["relu0"] = nn.ReLU()
    layers["fc1"] = linear([[-1, 0, -0.5],  # all weights <= 0 and bias 0
                            [-1, -1, -1],  # weights <= 0 but bias 0.5 > 0
                            [1, 1, 1]], [0, 0.5, 0])
    layers["relu1"] = nn.ReLU()
    return nn.Sequential(layers).eval()


def test_provably_dead_after_relu():
    r = deadscan.scan(provable_model(True), POS, device="cpu")
    assert r["relu1"].site.input_nonneg
    np.testing.assert_array_equal(r["relu1"].provably_dead, [True, False, False])
    assert r["relu1"].dead_indices == [0, 1]  # row 1: 0.5 - (h0 + h1) <= 0 on this data
    # fc0 reads the raw input: dead, never provably
    assert r["relu0"].dead_indices == [2]
    np.testing.assert_array_equal(r["relu0"].provably_dead, [False] * 3)


def test_same_weights_without_relu_input_are_not_provable():
    x = torch.tensor([[1, 2, 1], [2, 1, 3]], dtype=torch.float32)
    r = deadscan.scan(provable_model(False), x, device="cpu")["relu1"]
    assert not r.site.input_nonneg
    assert r.dead_indices == [0, 1]
    np.testing.assert_array_equal(r.provably_dead, [False] * 3)


def bn_model() -> nn.Module:
    fc1 = linear([[1, 0.5, 0],  # w >= 0, b >= 0, gamma < 0: provably dead
                  [1, 0.5, 0],  # same with gamma > 0: alive
                  [-1, -1, -1],  # w <= 0, b = 0, but gamma < 0 flips the sign: alive
                  [1, 1, 1]],  # w >= 0, b = 0, gamma < 0, running mean 10: effective shift > 0
                 [0.5, 0.5, 0, 0])
    bn = nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([-1.0, 1.0, -1.0, -1.0]))
        bn.bias.zero_()
        bn.running_mean.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
        bn.running_var.fill_(1.0)
    return nn.Sequential(OrderedDict(
        fc0=linear([[1, 0], [0, 1], [1, 1]], [0, 0, 0]), relu0=nn.ReLU(), fc1=fc1, bn=bn, relu1=nn.ReLU(),
    )).eval()


def test_batchnorm_with_negative_gamma_flips_the_sign():
    model = bn_model()
    r = deadscan.scan(model, POS, device="cpu")["relu1"]
    assert r.site.feeding.chain == (("bn", "bn"),)
    assert r.site.input_nonneg
    np.testing.assert_array_equal(r.provably_dead, [True, False, False, False])
    # h = relu0 output = (x0, x1, x0 + x1) > 0, so rows 1 and 2 are active on every sample; row 3's
    # pre-activation is -(h0 + h1 + h2 - 10) / sqrt(1 + eps), with h0 + h1 + h2 = 2 (x0 + x1) =
    # 6, 6, 12, 4: active on 3 samples
    assert r.dead_indices == [0]
    assert r.active.tolist() == [0, 4, 4, 3]
    with torch.no_grad():
        ref = model.bn(model.fc1(model.relu0(model.fc0(POS))))
    np.testing.assert_array_equal(r.pre_max, ref.max(0).values.numpy())


def test_provably_dead_does_not_need_data_to_agree():
    """Provably dead is a property of the weights: it holds on any scanned data."""
    model = bn_model()
    r = deadscan.scan(model, POS[:1], device="cpu")["relu1"]
    np.testing.assert_array_equal(r.provably_dead, [True, False, False, False])


# ---------------------------------------------------------------------------------------------
# Max output, relu6


@pytest.mark.parametrize("functional", [False, True])
def test_relu6_out_max_and_sum_clipped_at_6(functional):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = linear([[3], [1], [-1]], [0, 0, 0])
            self.act = nn.ReLU6()

        def forward(self, x):
            return F.relu6(self.fc(x)) if functional else self.act(self.fc(x))

    x = torch.tensor([[1.0], [2.0], [4.0]])
    r = deadscan.scan(M().eval(), x, device="cpu").sites[0]
    assert r.site.activation == "relu6"
    # pre-activations: row 0: 3, 6, 12; row 1: 1, 2, 4; row 2: -1, -2, -4
    np.testing.assert_array_equal(r.pre_max, [12.0, 4.0, -1.0])
    np.testing.assert_array_equal(r.out_max, [6.0, 4.0, 0.0])
    np.testing.assert_array_equal(r.out_sum, [3 + 6 + 6, 1 + 2 + 4, 0])
    np.testing.assert_array_equal(r.active, [3, 3, 0])
    assert r.dead_indices == [2]


# ---------------------------------------------------------------------------------------------
# In-place forms; the model is left untouched


class Forms(nn.Module):
    """fc1 -> act -> fc2 -> act with the relu written as ``form``; weights of hand_mlp."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.fc1, self.fc2 = linear(W1, B1), linear(W2, B2)
        self.act = nn.ReLU(inplace=form == "module_inplace")

    def relu(self, h):
        f = self.form
        if f.startswith("module"):
            return self.act(h)
        if f == "F.relu":
            return F.relu(h)
        if f == "F.relu_inplace":
            return F.relu(h, inplace=True)
        if f == "torch.relu_":
            return torch.relu_(h)
        if f == "relu_":
            return h.relu_()
        return h.relu()

    def forward(self, x):
        return self.relu(self.fc2(self.relu(self.fc1(x))))


FORMS = ["module", "module_inplace", "F.relu", "F.relu_inplace", "torch.relu_", "relu_", "Tensor.relu"]


@pytest.mark.parametrize("form", FORMS)
def test_inplace_forms_give_the_same_statistics(form):
    ref = deadscan.scan(hand_mlp(), x_tensor(), batch_size=3, device="cpu")
    model = Forms(form).eval()
    x = x_tensor()
    x_before = x.clone()
    out_before = model(x)
    r = deadscan.scan(model, x, batch_size=3, device="cpu")
    assert len(r.sites) == 2
    expected_inplace = form in ("module_inplace", "F.relu_inplace", "torch.relu_", "relu_")
    assert all(s.site.inplace is expected_inplace for s in r.sites)
    for a, b in zip(r.sites, ref.sites):
        np.testing.assert_array_equal(a.out_sum, b.out_sum)
        np.testing.assert_array_equal(a.active, b.active)
        np.testing.assert_array_equal(a.pre_max, b.pre_max)
        np.testing.assert_array_equal(a.provably_dead, b.provably_dead)
        assert a.elements == b.elements
    assert torch.equal(x, x_before)  # the data is not modified
    assert torch.equal(model(x), out_before)


@pytest.mark.parametrize("form", FORMS)
def test_instrumented_model_gives_identical_outputs(form):
    model = Forms(form).eval()
    x = x_tensor()
    expected = model(x.clone())
    with instrument(model, deadscan.find_sites(model)) as (runner, stats), torch.inference_mode():
        got = runner(x.clone())
    assert torch.equal(got, expected)
    assert [st.calls for st in stats] == [1, 1]


def snapshot(model: nn.Module):
    return ([(n, id(m)) for n, m in model.named_modules()],
            [(n, id(p), p.detach().clone()) for n, p in model.named_parameters()],
            [(n, b.detach().clone()) for n, b in model.named_buffers()])


def assert_restored(model: nn.Module, snap, training: bool):
    mods, params, bufs = snapshot(model)
    assert mods == snap[0]  # same module objects under the same names: nothing left swapped
    assert [(n, i) for n, i, _ in params] == [(n, i) for n, i, _ in snap[1]]
    for (_, _, a), (_, _, b) in zip(params, snap[1]):
        assert torch.equal(a, b)
    for (_, a), (_, b) in zip(bufs, snap[2]):
        assert torch.equal(a, b)
    for _, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert model.training is training


# ---------------------------------------------------------------------------------------------
# Opaque parts: a data-dependent top-level branch


class Block(nn.Module):
    def __init__(self, w1, b1, w2, b2):
        super().__init__()
        self.fc1, self.fc2 = linear(w1, b1), linear(w2, b2)
        self.act = nn.ReLU()

    def forward(self, x):
        return F.relu(self.fc2(self.act(self.fc1(x))))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        # a: identity then negated identity -> a:relu provably dead
        self.a = Block([[1, 0], [0, 1]], [0, 0], [[-1, 0], [0, -1]], [0, 0])
        # b: negated identity then identity plus 1
        self.b = Block([[-1, 0], [0, -1]], [0, 0], [[1, 0], [0, 1]], [1, 1])
        self.relu = nn.ReLU(inplace=True)
        self.head = linear([[1, 1]], [0])

    def forward(self, x):
        if x.sum() > 0:
            x = self.a(x)
        else:
            x = self.b(x)
        return self.head(self.relu(x - 1))


BRANCH_X = [[1, 2], [3, -1], [-1, -1], [-3, 2], [0.5, -2]]  # sums 3, 2, -2, -1, -1.5


def test_data_dependent_branch_scans_exactly():
    model = Branchy().train()
    snap = snapshot(model)
    x = torch.tensor(BRANCH_X)
    out_before = model(x[:2])
    r = deadscan.scan(model, x, batch_size=1, device="cpu")
    assert [s.site.name for s in r.sites] == ["a.act", "a:relu", "b.act", "b:relu", "relu"]
    assert [o.module for o in r.sitemap.opaque] == ["(root)"]

    # Per sample, by hand: a for x with positive sum, b otherwise.
    ax = [s for s in BRANCH_X if sum(s) > 0]  # [1, 2], [3, -1]
    bx = [s for s in BRANCH_X if sum(s) <= 0]  # [-1, -1], [-3, 2], [0.5, -2]
    # a.act: pre = x
    assert r["a.act"].elements == 2
    np.testing.assert_array_equal(r["a.act"].out_sum, [1 + 3, 2 + 0])
    np.testing.assert_array_equal(r["a.act"].active, [2, 1])
    np.testing.assert_array_equal(r["a.act"].pre_max, [3, 2])
    # a:relu: pre = -relu(x) -> dead (and provably: weights <= 0, bias 0, input from a relu)
    assert r["a:relu"].dead_indices == [0, 1]
    np.testing.assert_array_equal(r["a:relu"].pre_max, [-1, 0])  # -relu(x) peaks at 0 where x1 = -1
    np.testing.assert_array_equal(r["a:relu"].provably_dead, [True, True])
    # b.act: pre = -x
    assert r["b.act"].elements == 3
    np.testing.assert_array_equal(r["b.act"].out_sum, [1 + 3 + 0, 1 + 0 + 2])
    np.testing.assert_array_equal(r["b.act"].active, [2, 2])
    np.testing.assert_array_equal(r["b.act"].pre_max, [3, 2])
    # b:relu: pre = relu(-x) + 1 >= 1
    np.testing.assert_array_equal(r["b:relu"].out_sum, [(1 + 1) + (3 + 1) + (0 + 1), (1 + 1) + (0 + 1) + (2 + 1)])
    np.testing.assert_array_equal(r["b:relu"].active, [3, 3])
    # the hooked root relu (in place) sees block output - 1:
    # through a: 0 - 1 for both neurons; through b: relu(-x) + 1 - 1 = relu(-x)
    hooked = r["relu"]
    assert hooked.site.hooked and hooked.elements == 5
    assert len(ax) == 2 and len(bx) == 3
    np.testing.assert_array_equal(hooked.out_sum, [1 + 3 + 0, 1 + 0 + 2])
    np.testing.assert_array_equal(hooked.active, [2, 2])
    np.testing.assert_array_equal(hooked.pre_max, [3, 2])

    assert_restored(model, snap, training=True)
    model.train()
    assert torch.equal(model(x[:2]), out_before)


def test_site_never_called_is_reported():
    model = Branchy()
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])  # every sample takes branch a
    r = deadscan.scan(model, x, batch_size=1, device="cpu")
    for name in ("b.act", "b:relu"):
        assert r[name].neurons == 0 and r[name].elements == 0
        assert "never called" in r[name].site.note
    assert r["a.act"].neurons == 2 and r["a.act"].elements == 2


class ShapeLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Block([[1, 0], [0, 1]], [0, 0], [[1, 1], [-1, -1]], [0, -1])
        self.act = nn.ReLU()

    def forward(self, x):
        n = 1
        for s in x.shape:
            n = n * s
        return self.act(self.inner(x) - 2)


class Parent(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = linear([[1, 0], [0, 1]], [0, 0])
        self.pre_act = nn.ReLU()
        self.child = ShapeLoop()
        self.post = linear([[1, 0], [0, -1]], [0, 0])

    def forward(self, x):
        return F.relu(self.post(self.child(self.pre_act(self.pre(x)))))


def test_untraceable_child_scans_exactly_and_model_is_restored():
    model = Parent().eval()
    snap = snapshot(model)
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0], [-2.0, 4.0]])
    out_before = model(x)
    r = deadscan.scan(model, x, batch_size=2, device="cpu")
    assert [s.site.name for s in r.sites] == ["pre_act", "child.inner.act", "child.inner:relu", "child.act",
                                              "(root):relu"]
    # pre_act = relu(x): [1, 2], [3, 0], [0, 4]
    np.testing.assert_array_equal(r["pre_act"].out_sum, [4, 6])
    # inner.act: pre = relu(x) >= 0, active where > 0
    np.testing.assert_array_equal(r["child.inner.act"].active, [2, 2])
    # inner:relu: pre = (h0 + h1, -(h0 + h1) - 1): [3, -4], [3, -4], [4, -5]
    np.testing.assert_array_equal(r["child.inner:relu"].out_sum, [10, 0])
    assert r["child.inner:relu"].dead_indices == [1]
    np.testing.assert_array_equal(r["child.inner:relu"].provably_dead, [False, True])
    # child.act (hooked): pre = inner - 2: [1, -2], [1, -2], [2, -2]
    np.testing.assert_array_equal(r["child.act"].out_sum, [4, 0])
    np.testing.assert_array_equal(r["child.act"].pre_max, [2, -2])
    # root relu: post = (c0, -c1) with c = [1, 0], [1, 0], [2, 0]
    np.testing.assert_array_equal(r["(root):relu"].out_sum, [4, 0])
    np.testing.assert_array_equal(r["(root):relu"].pre_max, [2, 0])
    assert r["(root):relu"].dead_indices == [1]
    assert_restored(model, snap, training=False)
    assert torch.equal(model(x), out_before)


def test_scan_restores_traced_model():
    model = hand_mlp().train()
    snap = snapshot(model)
    deadscan.scan(model, x_tensor(), batch_size=2, device="cpu")
    assert_restored(model, snap, training=True)


# ---------------------------------------------------------------------------------------------
# Dormant neurons (ReDo score)


def test_dormant_scores_by_hand():
    model = nn.Sequential(OrderedDict(fc=linear([[1], [2], [4], [-1]], [0, 0, 0, 0]), act=nn.ReLU())).eval()
    x = torch.tensor([[1.0], [3.0]])
    r = deadscan.scan(model, x, device="cpu", tau=0.6)["act"]
    # mean outputs: (1 + 3) / 2 = 2, (2 + 6) / 2 = 4, (4 + 12) / 2 = 8, 0; their mean: 14 / 4 = 3.5
    np.testing.assert_array_equal(r.score, [2 / 3.5, 4 / 3.5, 8 / 3.5, 0.0])
    np.testing.assert_array_equal(r.dormant, [True, False, False, True])  # 4/7 <= 0.6
    r0 = deadscan.scan(model, x, device="cpu", tau=0.0)["act"]
    np.testing.assert_array_equal(r0.dormant, [False, False, False, True])  # tau 0: dormant = dead
    rd = deadscan.scan(model, x, device="cpu")["act"]
    assert rd.tau == 0.025
    np.testing.assert_array_equal(rd.dormant, [False, False, False, True])


def test_dormant_when_every_neuron_is_dead():
    model = nn.Sequential(OrderedDict(fc=linear([[-1], [-2]], [0, 0]), act=nn.ReLU())).eval()
    r = deadscan.scan(model, torch.tensor([[1.0], [2.0]]), device="cpu")["act"]
    np.testing.assert_array_equal(r.score, [0.0, 0.0])
    np.testing.assert_array_equal(r.dormant, [True, True])


# ---------------------------------------------------------------------------------------------
# Data sources


def test_accepts_a_dataloader_of_xy_batches():
    x = x_tensor()
    y = torch.arange(7) % 2
    ref = deadscan.scan(hand_mlp(), x, batch_size=7, device="cpu")
    loader = DataLoader(TensorDataset(x, y), batch_size=3, shuffle=False)
    r = deadscan.scan(hand_mlp(), loader, device="cpu")
    assert_same_stats(r, ref)
    assert r.samples == 7


def test_accepts_an_iterable_of_input_batches():
    x = x_tensor()
    ref = deadscan.scan(hand_mlp(), x, batch_size=7, device="cpu")
    r = deadscan.scan(hand_mlp(), [x[:4], x[4:]], device="cpu")
    assert_same_stats(r, ref)


def test_accepts_a_deadscan_dataset():
    x = x_tensor()
    y = torch.arange(7) % 2
    ref = deadscan.scan(hand_mlp(), x, batch_size=7, device="cpu")
    ds = deadscan.data.Dataset("t", "all", x, y)
    r = deadscan.scan(hand_mlp(), ds, batch_size=2, device="cpu")
    assert_same_stats(r, ref)
    assert r.samples == 7
    assert torch.equal(ds.x, x_tensor())


def test_empty_data_is_a_clear_error():
    with pytest.raises(deadscan.DataError, match="no samples"):
        deadscan.scan(hand_mlp(), torch.zeros(0, 3), device="cpu")


def test_merge_with_a_site_called_in_one_shard_only():
    """Shard a only takes branch a, shard b only branch b: each shard never calls the other
    branch's sites, and the merged result equals the scan of both shards together."""
    model = Branchy()
    xa = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    xb = torch.tensor([[-1.0, -1.0], [-3.0, 2.0], [0.5, -2.0]])
    a = deadscan.scan(model, xa, batch_size=1, device="cpu")
    b = deadscan.scan(model, xb, batch_size=1, device="cpu")
    assert a["b.act"].neurons == 0 and b["a.act"].neurons == 0
    merged = deadscan.merge(a, b)
    whole = deadscan.scan(model, torch.cat([xa, xb]), batch_size=1, device="cpu")
    assert_same_stats(merged, whole)
    assert all("never called" not in r.site.note for r in merged.sites)


class WithEncoder(nn.Module):
    """nn.TransformerEncoderLayer is opaque to fx; a ReLU *module* as its activation is watched by
    a hook (which also keeps PyTorch off its fused fast path, so the module is really called)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=nn.ReLU(), batch_first=True)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.enc(self.inp(x)))


def test_transformer_encoder_layer_relu_module_is_scanned():
    torch.manual_seed(0)
    model = WithEncoder().eval()
    with torch.no_grad():
        # linear1 row 0: pre-activation -1 everywhere (dead); row 1: +2 everywhere.
        model.enc.linear1.weight[:2] = 0.0
        model.enc.linear1.bias[0] = -1.0
        model.enc.linear1.bias[1] = 2.0
    x = torch.randn(3, 5, 4)
    expected = model(x)
    r = deadscan.scan(model, x, batch_size=2, device="cpu")
    assert [o.module for o in r.sitemap.opaque] == ["enc"]
    site = r["enc.activation"]
    assert site.site.hooked
    assert site.neurons == 16 and site.elements == 3 * 5  # features over batch and tokens
    assert 0 in site.dead_indices and site.pre_max[0] == -1.0
    assert site.active[1] == 15 and site.out_sum[1] == 2.0 * 15 and site.pre_max[1] == 2.0
    assert torch.equal(model(x), expected)
    assert not model.enc.activation._forward_pre_hooks


def test_resnet18_instrumented_outputs_are_identical():
    """In-place relus, including the ones after residual adds, on a tiny input."""
    torch.manual_seed(0)
    model = deadscan.zoo.build("torchvision:resnet18(num_classes=10)").eval()
    snap = snapshot(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = model(x)
    sitemap = deadscan.find_sites(model)
    with instrument(model, sitemap) as (runner, stats), torch.inference_mode():
        got = runner(x)
    assert torch.equal(got, expected)
    assert len(stats) == 17 and all(st.calls == 1 for st in stats)
    r = deadscan.scan(model, x, batch_size=1, device="cpu")
    # conv1 (stride 2) -> 16x16, maxpool -> 8x8 in layer1, then 4x4, 2x2, 1x1
    assert r["relu"].elements == 2 * 16 * 16 and r["relu"].neurons == 64
    assert r["layer1.0.relu#2"].elements == 2 * 8 * 8
    assert r["layer4.1.relu#2"].elements == 2 * 1 * 1 and r["layer4.1.relu#2"].neurons == 512
    assert_restored(model, snap, training=False)
    with torch.inference_mode():
        assert torch.equal(model(x), expected)


def test_an_inputs_labels_pair_is_one_dataset_not_two_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    x = torch.rand(10, 3)
    y = torch.randint(0, 2, (10,))
    assert deadscan.scan(model, (x, y)).samples == 10
    assert deadscan.scan(model, x).sites[0].active.tolist() == deadscan.scan(model, (x, y)).sites[0].active.tolist()
