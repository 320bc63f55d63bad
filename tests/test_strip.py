"""Synaptic Stripping: the strip step's arithmetic, exact masks through training, revival, the
Stripper API and the contribution criterion. Every model is hand-built with weights set by hand."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import deadscan
from deadscan.scan import scan
from deadscan.strip import Masks, Stripper, strip, strip_layer

# Stripper without an optimizer warns (its moments cannot be cleared); these tests do no training.
NO_OPTIMIZER = pytest.mark.filterwarnings("ignore:Stripper has no optimizer")


def _two_layer(in_features: int, hidden: int, out: int = 2, *, bn: bool = False) -> nn.Sequential:
    """Linear -> [BatchNorm1d] -> ReLU -> Linear; the ReLU site is named ``act``."""
    layers = [("fc1", nn.Linear(in_features, hidden))]
    if bn:
        layers.append(("bn", nn.BatchNorm1d(hidden)))
    layers += [("act", nn.ReLU()), ("fc2", nn.Linear(hidden, out))]
    return nn.Sequential(OrderedDict(layers)).eval()


def _mask_rows(weight: torch.Tensor, rows: list[int], rate: float, steps: int = 1,
               sign: torch.Tensor | None = None) -> tuple[torch.Tensor, list]:
    mask = torch.zeros_like(weight, dtype=torch.bool)
    results = []
    for _ in range(steps):
        results.append(strip_layer(weight, mask, torch.tensor(rows, dtype=torch.long), rate, sign))
    return mask, results


# ---------------------------------------------------------------------------------------------
# strip_layer arithmetic


def test_k_is_floor_of_rate_times_remaining_at_least_one():
    w = torch.tensor([[-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0, -10.0]])
    for rate, expected in [(0.1, 1), (0.25, 2), (0.5, 5), (0.05, 1), (1.0, 10), (0.99, 9)]:
        mask, [(k, none_left)] = _mask_rows(w, [0], rate)
        assert k.tolist() == [expected], rate
        assert none_left == 0
        # the most negative first: the last `expected` columns
        assert mask[0].tolist() == [False] * (10 - expected) + [True] * expected, rate


def test_k_is_capped_by_the_negative_weights_left_and_positives_are_never_pruned():
    w = torch.tensor([[0.5, -0.1, 2.0, -0.3, 0.0, 1.0, 3.0, 4.0]])
    mask, [(k, none_left)] = _mask_rows(w, [0], rate=1.0)  # k would be 8; only 2 negative weights
    assert k.tolist() == [2]
    assert none_left == 0
    assert torch.equal(mask[0], torch.tensor([False, True, False, True, False, False, False, False]))
    # a second step: nothing negative left, nothing pruned, the row is counted as without negatives
    k2, none_left2 = strip_layer(w, mask, torch.tensor([0]), 1.0)
    assert k2.tolist() == [0]
    assert none_left2 == 1
    assert int(mask.sum()) == 2
    # zero weights are not negative: never candidates
    assert not mask[0, 4]


def test_ties_go_to_the_lower_index():
    w = torch.tensor([[-1.0, -2.0, -2.0, 0.5, -2.0, -1.0, -2.0, 0.5]])
    mask, [(k, _)] = _mask_rows(w, [0], rate=0.25)  # floor(0.25 * 8) = 2 of the four -2.0
    assert k.tolist() == [2]
    assert torch.nonzero(mask[0]).flatten().tolist() == [1, 2]
    # deterministic: the same answer every time
    for _ in range(5):
        again, _ = _mask_rows(w, [0], rate=0.25)
        assert torch.equal(again, mask)


def test_rows_without_negative_weights_are_counted_and_untouched():
    w = torch.tensor([
        [-1.0, -2.0, 0.5, 0.5],
        [0.1, 0.2, 0.3, 0.0],  # no negative weight
        [0.0, 0.0, 0.0, 0.0],  # none either
        [-4.0, 1.0, -3.0, 2.0],
    ])
    mask, [(k, none_left)] = _mask_rows(w, [0, 1, 2, 3], rate=0.5)
    assert k.tolist() == [2, 0, 0, 2]
    assert none_left == 2
    assert torch.nonzero(mask).tolist() == [[0, 0], [0, 1], [3, 0], [3, 2]]


def _reference_oracle(row: np.ndarray, taken: np.ndarray, rate: float) -> np.ndarray:
    """The reference code's rule, one row at a time: remaining nonzero weights below their rate-quantile."""
    live = ~taken & (row != 0)
    q = np.quantile(row[live], rate)  # linear interpolation, as torch.quantile
    return live & (row < q)


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.2, 0.5])
def test_the_reference_rule_prunes_below_the_quantile_of_the_remaining_nonzero_weights(rate):
    rng = np.random.default_rng(3)
    w = torch.from_numpy(rng.normal(size=(5, 25)).astype(np.float32))
    w[1] = torch.arange(1.0, 26.0)  # all positive: the reference rule prunes them anyway (signs ignored)
    w[2, :5] = 0.0  # zeros are not remaining weights
    mask = torch.zeros_like(w, dtype=torch.bool)
    rows = torch.tensor([0, 1, 2, 4])
    for _ in range(3):  # later steps: the quantile of what is left
        expected = mask.clone()
        for r in rows.tolist():
            expected[r] |= torch.from_numpy(_reference_oracle(w[r].numpy(), mask[r].numpy(), rate))
        before = mask.clone()
        k, _ = strip_layer(w, mask, rows, rate, rule="reference")
        assert torch.equal(mask, expected)
        assert k.tolist() == (mask[rows] & ~before[rows]).sum(1).tolist()
    assert not mask[3].any()  # not a dead row
    assert mask[1].any()  # positive weights pruned: what the floor rule never does
    floor_mask = torch.zeros_like(w, dtype=torch.bool)
    strip_layer(w, floor_mask, torch.tensor([1]), rate)
    assert not floor_mask.any()


def test_the_reference_rule_prunes_one_more_weight_than_floor_when_the_quantile_falls_between():
    w = -torch.arange(1.0, 26.0).view(1, 25)  # 25 distinct negatives; 0.1-quantile at position 2.4
    ref = torch.zeros_like(w, dtype=torch.bool)
    k_ref, _ = strip_layer(w, ref, torch.tensor([0]), 0.1, rule="reference")
    flo = torch.zeros_like(w, dtype=torch.bool)
    k_floor, _ = strip_layer(w, flo, torch.tensor([0]), 0.1)
    assert (k_ref.tolist(), k_floor.tolist()) == ([3], [2])  # floor(2.5) = 2; below the quantile: -25, -24, -23
    assert torch.nonzero(ref[0]).flatten().tolist() == [22, 23, 24]


def test_only_the_given_rows_are_touched():
    w = -torch.arange(1.0, 13.0).view(3, 4)
    mask, [(k, _)] = _mask_rows(w, [1], rate=0.5)
    assert k.tolist() == [2]
    assert not mask[0].any() and not mask[2].any()
    assert mask[1].tolist() == [False, False, True, True]


def test_empty_rows_prune_nothing():
    w = -torch.ones(3, 4)
    mask = torch.zeros_like(w, dtype=torch.bool)
    k, none_left = strip_layer(w, mask, torch.zeros(0, dtype=torch.long), 0.5)
    assert k.numel() == 0 and none_left == 0
    assert not mask.any()


def test_repeated_steps_prune_rate_of_the_remaining_weights():
    n = 20
    w = -torch.arange(1.0, n + 1).view(1, n)  # column j holds -(j+1): the most negative is the last
    mask = torch.zeros_like(w, dtype=torch.bool)
    remaining, ks = n, []
    for _ in range(6):
        k, _ = strip_layer(w, mask, torch.tensor([0]), 0.25)
        expected = max(1, math.floor(0.25 * remaining))
        assert k.tolist() == [expected]
        ks.append(expected)
        remaining -= expected
        assert int((~mask).sum()) == remaining
        # the pruned ones are always the most negative: a suffix of the row
        pruned = n - remaining
        assert mask[0].tolist() == [False] * remaining + [True] * pruned
    assert ks == [5, 3, 3, 2, 1, 1]  # 20 -> 15 -> 12 -> 9 -> 7 -> 6 -> 5


def test_previously_pruned_weights_are_not_counted_again():
    """A weight that is already masked stays a non-candidate even if it is still negative in the
    tensor (the mask, not the value, says what is pruned)."""
    w = torch.tensor([[-5.0, -4.0, -3.0, -2.0]])
    mask = torch.tensor([[True, False, False, False]])
    k, _ = strip_layer(w, mask, torch.tensor([0]), 0.5)  # 3 remaining -> floor(1.5) = 1
    assert k.tolist() == [1]
    assert mask[0].tolist() == [True, True, False, False]


def test_sign_minus_one_targets_the_most_positive_weights():
    w = torch.tensor([[0.1, 0.5, 0.3, -0.2]])
    mask, [(k, _)] = _mask_rows(w, [0], rate=0.5, sign=torch.tensor([-1.0]))
    assert k.tolist() == [2]
    assert mask[0].tolist() == [False, True, True, False]


def test_strip_uses_the_batchnorm_sign():
    """Linear -> BatchNorm1d(eval, gamma < 0) -> ReLU: positive weights over positive inputs hold the
    neuron down, so they are what stripping prunes; the negative weight stays."""
    torch.manual_seed(0)
    m = _two_layer(4, 2, bn=True)
    with torch.no_grad():
        m.fc1.weight.copy_(torch.tensor([[0.1, 0.5, 0.3, -0.2], [0.2, 0.2, 0.2, 0.2]]))
        m.fc1.bias.copy_(torch.tensor([0.5, 0.5]))
        m.bn.weight.copy_(torch.tensor([-1.0, 1.0]))
        m.bn.bias.zero_()
        m.bn.running_mean.zero_()
        m.bn.running_var.fill_(1.0)
    x = torch.rand(32, 4) * 0.9 + 0.1
    result = scan(m, x, device="cpu")
    r = result["act"]
    assert r.dead.tolist() == [True, False]
    assert r.site.feeding.layer == "fc1" and r.site.feeding.chain == (("bn", "bn"),)
    masks = Masks(m)
    stats = strip(m, result, masks, rate=0.5)
    assert stats.pruned == {"fc1": 2}
    assert stats.dead_targeted == 1 and stats.without_negative == 0
    assert masks.masks["fc1"].tolist() == [[False, True, True, False], [False, False, False, False]]
    assert m.fc1.weight[0].tolist() == pytest.approx([0.1, 0.0, 0.0, -0.2])
    assert m.fc1.weight[0, 1].item() == 0.0 and m.fc1.weight[0, 2].item() == 0.0


# ---------------------------------------------------------------------------------------------
# Masks stay exact through training


def _trained_after_strip(make_opt, steps: int = 100, hooks: bool = True):
    """fc1 neuron 0 is dead on the (non-negative) held-out data but alive on the (signed) training
    data, so without the masks its pruned weights would get gradients and Adam state."""
    g = torch.Generator().manual_seed(0)
    m = _two_layer(6, 4, out=3)
    with torch.no_grad():
        m.fc1.weight.copy_(torch.tensor([
            [-1.0, -0.5, -2.0, 0.3, -0.1, 0.2],
            [0.4, -0.3, 0.2, 0.1, 0.5, -0.2],
            [-0.2, 0.3, 0.4, -0.5, 0.1, 0.3],
            [0.3, 0.2, -0.4, 0.2, -0.3, 0.5],
        ]))
        m.fc1.bias.copy_(torch.tensor([-0.5, 0.1, 0.1, 0.1]))
        m.fc2.weight.copy_(torch.linspace(-1, 1, 12).view(3, 4))
        m.fc2.bias.zero_()
    held_out = torch.rand(64, 6, generator=g)
    x_train = torch.randn(256, 6, generator=g)
    y_train = torch.randint(0, 3, (256,), generator=g)
    opt = make_opt(m.parameters())

    def train(n):
        m.train()
        for i in range(n):
            idx = torch.arange(i * 32, i * 32 + 32) % 256
            loss = nn.functional.cross_entropy(m(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    train(10)  # Adam state exists, non-zero at the weights about to be pruned
    assert (opt.state[m.fc1.weight]["exp_avg"][0] != 0).all()
    result = scan(m, held_out, device="cpu")
    assert result["act"].dead.tolist() == [True, False, False, False]
    masks = Masks(m)
    stats = strip(m, result, masks, rate=0.5, optimizer=opt)  # 6 remaining -> 3: -2.0, -1.0, -0.5
    assert stats.pruned == {"fc1": 3}
    mask = masks.masks["fc1"]
    assert torch.nonzero(mask).tolist() == [[0, 0], [0, 1], [0, 2]]
    if not hooks:
        masks.remove_hooks()
    before = m.fc1.weight.detach().clone()
    train(steps)
    return m, opt, mask, before


ADAM_LIKE = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam-l2": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(ADAM_LIKE))
def test_pruned_weights_stay_exactly_zero_through_adam(name):
    m, opt, mask, before = _trained_after_strip(ADAM_LIKE[name])
    w = m.fc1.weight.detach()
    assert torch.equal(w[mask], torch.zeros(int(mask.sum())))
    assert (w[~mask] != before[~mask]).all()  # every unpruned weight moved
    for key, value in opt.state[m.fc1.weight].items():
        if isinstance(value, torch.Tensor) and value.shape == w.shape:  # exp_avg, exp_avg_sq, max_exp_avg_sq
            assert torch.equal(value[mask], torch.zeros(int(mask.sum()))), key
    assert {"exp_avg", "exp_avg_sq"} <= set(opt.state[m.fc1.weight])


def test_without_the_gradient_hooks_the_pruned_weights_would_move():
    """The control for the test above: the training data does reach the pruned weights."""
    m, _, mask, _ = _trained_after_strip(ADAM_LIKE["adam"], hooks=False)
    assert (m.fc1.weight.detach()[mask] != 0).any()


# ---------------------------------------------------------------------------------------------
# A dead neuron comes back


def _held_down_model() -> tuple[nn.Module, torch.Tensor]:
    """Neuron 0: seven small positive weights and three of -100 over inputs in [0.1, 1]: dead.
    Neuron 1: all positive: alive."""
    m = _two_layer(10, 2)
    with torch.no_grad():
        m.fc1.weight.fill_(0.1)
        m.fc1.weight[0, [2, 5, 8]] = -100.0
        m.fc1.bias.zero_()
        m.fc2.weight.fill_(1.0)
        m.fc2.bias.zero_()
    x = torch.rand(50, 10, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.1
    return m, x


def test_a_held_down_neuron_revives_in_one_step():
    m, x = _held_down_model()
    before = scan(m, x, device="cpu")
    assert before["act"].dead.tolist() == [True, False]
    masks = Masks(m)
    stats = strip(m, before, masks, rate=0.3)  # floor(0.3 * 10) = 3: exactly the three -100s
    assert stats.pruned == {"fc1": 3}
    assert torch.nonzero(masks.masks["fc1"]).tolist() == [[0, 2], [0, 5], [0, 8]]
    after = scan(m, x, device="cpu")
    assert after["act"].dead.tolist() == [False, False]
    assert (after["act"].active == len(x)).all()


def test_a_held_down_neuron_revives_over_several_steps():
    m, x = _held_down_model()
    masks = Masks(m)
    pruned_cols = []
    for step in range(3):
        result = scan(m, x, device="cpu")
        assert result["act"].dead.tolist() == [True, False], step  # still held down by the rest
        strip(m, result, masks, rate=0.1)  # one weight per step: the ties go by index 2, 5, 8
        pruned_cols.append(torch.nonzero(masks.masks["fc1"][0]).flatten().tolist())
    assert pruned_cols == [[2], [2, 5], [2, 5, 8]]
    assert scan(m, x, device="cpu")["act"].dead.tolist() == [False, False]


def test_strip_skips_live_neurons_and_counts_rows_without_negatives():
    m, x = _held_down_model()
    with torch.no_grad():
        m.fc1.weight[0].fill_(0.0)
        m.fc1.bias[0] = -1.0  # dead by its bias alone: nothing to strip
    result = scan(m, x, device="cpu")
    assert result["act"].dead.tolist() == [True, False]
    masks = Masks(m)
    stats = strip(m, result, masks, rate=0.5)
    assert stats.pruned == {"fc1": 0}
    assert stats.dead_targeted == 1
    assert stats.without_negative == 0  # fc1 reads raw inputs: not known non-negative, not counted
    assert masks.pruned() == 0


def test_strip_rejects_bad_arguments():
    m, x = _held_down_model()
    result = scan(m, x, device="cpu")
    for rate in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="rate"):
            strip(m, result, Masks(m), rate=rate)
    with pytest.raises(ValueError, match="criterion"):
        strip(m, result, Masks(m), criterion="magnitude")


# ---------------------------------------------------------------------------------------------
# Stripper: one call per epoch


def _stripper_model() -> tuple[nn.Module, torch.Tensor]:
    """Neuron 0 dead, held down by one -10 weight; neuron 1 alive; inputs in [0.5, 1]."""
    m = _two_layer(4, 2)
    with torch.no_grad():
        m.fc1.weight.copy_(torch.tensor([[1.0, -10.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
        m.fc1.bias.zero_()
        m.fc2.weight.fill_(1.0)
        m.fc2.bias.zero_()
    x = torch.rand(40, 4, generator=torch.Generator().manual_seed(2)) * 0.5 + 0.5
    return m, x


@NO_OPTIMIZER
def test_stripper_revived_and_died_over_two_steps():
    m, x = _stripper_model()
    stripper = Stripper(m, rate=0.25, device="cpu")  # floor(0.25 * 4) = 1 weight per dead neuron
    first = stripper.step(x)
    assert first.epoch == 1
    assert first.dead == 1
    assert first.revived == {} and first.died == {}  # nothing to compare with yet
    assert first.stripped is not None and first.stripped.pruned == {"fc1": 1}
    assert first.pruned_weights == 1
    assert torch.nonzero(stripper.masks.masks["fc1"]).tolist() == [[0, 1]]
    # neuron 1 is killed by hand; neuron 0 woke up because its -10 is gone
    with torch.no_grad():
        m.fc1.weight[1] = torch.tensor([-1.0, -3.0, -2.0, 1.0])
    second = stripper.step(x)
    assert second.epoch == 2
    assert second.scan["act"].dead.tolist() == [False, True]
    assert second.revived == {"act": [0]} and second.revived_count == 1
    assert second.died == {"act": [1]} and second.died_count == 1
    assert second.stripped.pruned == {"fc1": 1}  # neuron 1's -3.0
    assert second.pruned_weights == 2
    assert torch.nonzero(stripper.masks.masks["fc1"]).tolist() == [[0, 1], [1, 1]]
    assert m.fc1.weight[1].tolist() == [-1.0, 0.0, -2.0, 1.0]
    assert 0 < second.active_percent < 100


@NO_OPTIMIZER
def test_stripper_every_k_epochs():
    m, x = _stripper_model()
    stripper = Stripper(m, rate=0.25, every=2, device="cpu")
    first = stripper.step(x)
    assert first.stripped is None and first.pruned_weights == 0
    second = stripper.step(x)
    assert second.stripped is not None and second.pruned_weights == 1


def test_stripper_disabled_never_prunes():
    m, x = _stripper_model()
    weights = {k: v.clone() for k, v in m.state_dict().items()}
    stripper = Stripper(m, rate=1.0, device="cpu", enabled=False)
    for epoch in range(1, 4):
        report = stripper.step(x)
        assert report.epoch == epoch
        assert report.dead == 1
        assert report.stripped is None
        assert report.pruned_weights == 0
    assert stripper.masks.pruned() == 0
    for k, v in m.state_dict().items():
        assert torch.equal(v, weights[k]), k


@NO_OPTIMIZER
def test_stripper_state_dict_round_trip():
    m, x = _stripper_model()
    stripper = Stripper(m, rate=0.25, device="cpu")
    stripper.step(x)
    with torch.no_grad():
        m.fc1.weight[1] = torch.tensor([-1.0, -3.0, -2.0, 1.0])
    stripper.step(x)
    state = stripper.state_dict()

    fresh, _ = _stripper_model()
    with torch.no_grad():
        fresh.fc1.weight[1] = torch.tensor([-1.0, -3.0, -2.0, 1.0])
    restored = Stripper(fresh, rate=0.25, device="cpu")
    restored.load_state_dict(state)
    assert restored.epoch == 2
    assert set(restored.masks.masks) == {"fc1"}
    assert torch.equal(restored.masks.masks["fc1"], stripper.masks.masks["fc1"])
    assert restored.previous.keys() == stripper.previous.keys()
    assert all((restored.previous[k] == stripper.previous[k]).all() for k in stripper.previous)
    # the masks were applied to the fresh model's weights
    assert torch.equal(fresh.fc1.weight, m.fc1.weight)
    # both carry on identically
    a, b = stripper.step(x), restored.step(x)
    assert a.epoch == b.epoch == 3
    assert a.revived == b.revived and a.died == b.died
    assert torch.equal(restored.masks.masks["fc1"], stripper.masks.masks["fc1"])
    # and the restored masks' gradient hooks are live: a gradient step cannot move a pruned weight
    mask = restored.masks.masks["fc1"]
    opt = torch.optim.SGD(fresh.parameters(), lr=1.0)
    fresh(torch.randn(8, 4)).sum().backward()
    assert (fresh.fc1.weight.grad[~mask] != 0).any()
    opt.step()
    assert torch.equal(fresh.fc1.weight[mask], torch.zeros(int(mask.sum())))


# ---------------------------------------------------------------------------------------------
# Vectorised over a large layer


def test_strip_1500_dead_rows_of_a_wide_layer_in_one_call():
    g = torch.Generator().manual_seed(3)
    m = _two_layer(384, 1536, out=2)
    dead_rows = 1500
    with torch.no_grad():
        w = torch.rand(1536, 384, generator=g) + 0.01
        w[:dead_rows] = -w[:dead_rows]  # distinct negative weights: no ties
        m.fc1.weight.copy_(w)
        m.fc1.bias.copy_(torch.where(torch.arange(1536) < dead_rows, -1.0, 1.0))
    x = torch.rand(8, 384, generator=g)
    result = scan(m, x, device="cpu")
    assert result["act"].dead.tolist() == [True] * dead_rows + [False] * 36
    masks = Masks(m)
    stats = strip(m, result, masks, rate=0.1)
    k = math.floor(0.1 * 384)  # 38
    per_row = masks.masks["fc1"].sum(1)
    assert per_row[:dead_rows].tolist() == [k] * dead_rows
    assert per_row[dead_rows:].tolist() == [0] * 36
    assert stats.pruned == {"fc1": k * dead_rows}
    assert stats.dead_targeted == dead_rows
    # exactly the k most negative of every dead row
    expected = torch.zeros(dead_rows, 384, dtype=torch.bool)
    expected.scatter_(1, torch.topk(-w[:dead_rows], k, dim=1).indices, True)
    assert torch.equal(masks.masks["fc1"][:dead_rows], expected)
    assert torch.equal(m.fc1.weight[:dead_rows][expected], torch.zeros(k * dead_rows))
    assert torch.equal(m.fc1.weight[:dead_rows][~expected], w[:dead_rows][~expected])


# ---------------------------------------------------------------------------------------------
# Contribution criterion: w * E[x]


def _contribution_model() -> tuple[nn.Module, torch.Tensor]:
    """Row 0: its most negative weight (-3) reads an input that is always 0; the -1 reads an input
    of 5. Dead either way: pre-activation -5 + 0.5 = -4.5."""
    m = _two_layer(3, 2, out=1)
    with torch.no_grad():
        m.fc1.weight.copy_(torch.tensor([[-3.0, -1.0, 0.5], [1.0, 1.0, 1.0]]))
        m.fc1.bias.zero_()
        m.fc2.weight.fill_(1.0)
        m.fc2.bias.zero_()
    x = torch.zeros(20, 3)
    x[:, 1] = 5.0
    x[:, 2] = torch.linspace(0.5, 1.5, 20)
    return m, x


@pytest.mark.parametrize("criterion, pruned", [("weight", [[0, 0]]), ("contribution", [[0, 1]])])
def test_contribution_criterion(criterion, pruned):
    m, x = _contribution_model()
    result = scan(m, x, device="cpu", input_means=True)
    r = result["act"]
    assert r.dead.tolist() == [True, False]
    assert r.mean_input.tolist() == pytest.approx([0.0, 5.0, 1.0])
    masks = Masks(m)
    stats = strip(m, result, masks, rate=0.1, criterion=criterion)  # k = max(1, floor(0.3)) = 1
    assert stats.pruned == {"fc1": 1}
    assert torch.nonzero(masks.masks["fc1"]).tolist() == pruned


@NO_OPTIMIZER
def test_contribution_criterion_through_the_stripper():
    m, x = _contribution_model()
    stripper = Stripper(m, rate=0.1, criterion="contribution", device="cpu")
    report = stripper.step(x)
    assert report.scan["act"].mean_input is not None
    assert torch.nonzero(stripper.masks.masks["fc1"]).tolist() == [[0, 1]]
    # with the -1 gone the neuron reads -3 * 0 + 0.5 * x2 > 0: revived
    assert stripper.step(x).revived == {"act": [0]}


def test_contribution_criterion_needs_input_means():
    m, x = _contribution_model()
    result = scan(m, x, device="cpu")  # no input_means
    with pytest.raises(ValueError, match="input_means=True"):
        strip(m, result, Masks(m), criterion="contribution")


def _grouped_conv_model() -> tuple[nn.Module, torch.Tensor]:
    """Conv2d(4, 4, 1, groups=2): channels 0-1 read inputs 0-1, channels 2-3 read inputs 2-3.
    Inputs 0 and 3 are about 5, inputs 1 and 2 are 0. Channel 0 has weights [-1, -3] (its -3 reads
    the zero input), channel 3 has [-3, -1] (its -3 reads the zero input 2): both dead. Channels 1
    and 2 have positive weights: alive."""
    m = nn.Sequential(OrderedDict(conv=nn.Conv2d(4, 4, 1, groups=2), act=nn.ReLU(), head=nn.Conv2d(4, 1, 1))).eval()
    with torch.no_grad():
        m.conv.weight.copy_(torch.tensor([[-1.0, -3.0], [1.0, 1.0], [1.0, 1.0], [-3.0, -1.0]]).view(4, 2, 1, 1))
        m.conv.bias.zero_()
    x = torch.zeros(6, 4, 3, 3)
    x[:, 0] = 5.0 + torch.rand(6, 3, 3, generator=torch.Generator().manual_seed(4))
    x[:, 3] = 5.0 + torch.rand(6, 3, 3, generator=torch.Generator().manual_seed(5))
    return m, x


@pytest.mark.parametrize("criterion, pruned", [
    ("weight", [[0, 1, 0, 0], [3, 0, 0, 0]]),  # the -3s
    ("contribution", [[0, 0, 0, 0], [3, 1, 0, 0]]),  # the -1s, which read the inputs of about 5
])
def test_grouped_conv_strip(criterion, pruned):
    m, x = _grouped_conv_model()
    result = scan(m, x, device="cpu", input_means=True)
    assert result["act"].dead_indices == [0, 3]
    masks = Masks(m)
    stats = strip(m, result, masks, rate=0.5, criterion=criterion)  # 2 remaining -> 1 each
    assert stats.pruned == {"conv": 2}
    assert torch.nonzero(masks.masks["conv"]).tolist() == pruned
    after = scan(m, x, device="cpu")["act"]
    if criterion == "weight":  # still held down by the -1 on the large input
        assert (after.pre_max[[0, 3]] < -4).all()
    else:  # what is left reads only the zero input: exactly at the edge of waking
        assert after.pre_max[[0, 3]].tolist() == [0.0, 0.0]


def test_strip_a_frozen_layer():
    """A frozen feeding layer (requires_grad False) is stripped like any other; training the rest
    leaves its pruned weights at zero."""
    m, x = _stripper_model()
    m.fc1.requires_grad_(False)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.1)
    stripper = Stripper(m, opt, rate=0.25, device="cpu")
    report = stripper.step(x)
    assert report.pruned_weights == 1 and m.fc1.weight[0, 1].item() == 0.0
    m.train()
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(8, 4)).sum().backward()
        opt.step()
    assert m.fc1.weight[0, 1].item() == 0.0
    assert stripper.step(x).revived == {"act": [0]}


def test_contribution_criterion_from_merged_shards():
    """Input 1 is 0 on shard a and 10 on shard b: the merged scan must carry the mean over both
    (5), not shard a's (0), so the contribution criterion decides as on the whole data."""
    from deadscan.scan import merge

    def model():
        m, _ = _contribution_model()
        with torch.no_grad():
            m.fc1.bias[0] = -1.0  # dead on both shards: 0.5 * x2 - 1 < 0
        return m

    m, (_, x) = model(), _contribution_model()
    x[10:, 1] = 10.0
    x[:10, 1] = 0.0
    whole = scan(m, x, device="cpu", input_means=True)
    merged = merge(scan(m, x[:10], device="cpu", input_means=True), scan(m, x[10:], device="cpu", input_means=True))
    assert merged["act"].mean_input.tolist() == pytest.approx(whole["act"].mean_input.tolist())
    assert merged["act"].mean_input[1] == pytest.approx(5.0)
    a, b = Masks(m), Masks(m)
    strip(m, whole, a, rate=0.1, criterion="contribution")
    m2 = model()
    strip(m2, merged, b, rate=0.1, criterion="contribution")
    assert torch.equal(a.masks["fc1"], b.masks["fc1"])
    assert torch.nonzero(b.masks["fc1"]).tolist() == [[0, 1]]


def test_stripper_without_optimizer_warns():
    """Without the optimizer its moments cannot be cleared and would move pruned weights."""
    m, x = _stripper_model()
    with pytest.warns(UserWarning, match="no optimizer"):
        Stripper(m, rate=0.25, device="cpu").step(x)
    m, x = _stripper_model()
    opt = torch.optim.Adam(m.parameters())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Stripper(m, opt, rate=0.25, device="cpu").step(x)  # an optimizer: no warning
        Stripper(_stripper_model()[0], enabled=False, device="cpu").step(x)  # detection only: none either


# ---------------------------------------------------------------------------------------------
# ReDo, the comparison baseline


def _redo_model():
    """Linear(4, 5) -> ReLU -> Linear(5, 3): rows 1 and 3 dead on inputs in [0, 1] by construction."""
    torch.manual_seed(0)
    m = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 5), relu=nn.ReLU(), fc2=nn.Linear(5, 3)))
    with torch.no_grad():
        m.fc1.weight.copy_(torch.full((5, 4), 0.5))
        m.fc1.bias.fill_(0.1)
        m.fc1.weight[[1, 3]] = -1.0
        m.fc1.bias[[1, 3]] = -0.5
        m.fc2.weight.fill_(0.3)
    return m.eval()


def test_redo_reinitialises_dead_rows_zeroes_their_outgoing_weights_and_optimizer_state():
    from deadscan.strip import redo

    m = _redo_model()
    x = torch.rand(32, 4)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    m.train()
    nn.functional.mse_loss(m(x), torch.zeros(32, 3)).backward()
    opt.step()  # optimizer state exists everywhere
    m.eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    result = deadscan.scan(m, x, device="cpu")
    assert result["relu"].dead_indices == [1, 3]
    stats = redo(m, result, optimizer=opt, generator=torch.Generator().manual_seed(0))
    assert stats.dead_targeted == 2 and stats.total == 0  # nothing pruned: ReDo re-initialises
    alive = [0, 2, 4]
    assert torch.equal(m.fc1.weight[alive], before["fc1.weight"][alive])  # live rows untouched
    bound = 1 / 4 ** 0.5  # nn.Linear's default init range for fan_in 4
    new_rows = m.fc1.weight[[1, 3]]
    assert not torch.equal(new_rows, before["fc1.weight"][[1, 3]])
    assert bool((new_rows.abs() <= bound).all())
    assert torch.equal(m.fc1.bias[[1, 3]], torch.zeros(2))
    assert torch.equal(m.fc2.weight[:, [1, 3]], torch.zeros(3, 2))  # outgoing weights zeroed
    assert torch.equal(m.fc2.weight[:, alive], before["fc2.weight"][:, alive])
    state = opt.state[m.fc1.weight]
    assert torch.equal(state["exp_avg"][[1, 3]], torch.zeros(2, 4))
    assert torch.equal(state["exp_avg_sq"][[1, 3]], torch.zeros(2, 4))
    assert torch.equal(opt.state[m.fc2.weight]["exp_avg"][:, [1, 3]], torch.zeros(3, 2))


def test_stripper_with_redo_method_prunes_nothing():
    m = _redo_model()
    x = torch.rand(32, 4)
    stripper = Stripper(m, torch.optim.Adam(m.parameters()), method="redo")
    report = stripper.step(x)
    assert report.dead == 2 and report.pruned_weights == 0 and stripper.masks.pruned() == 0
    with pytest.raises(ValueError, match="method must be one of"):
        Stripper(m, method="bogus")


def test_held_by_bias_counts_only_sites_whose_inputs_are_non_negative():
    """A dead neuron with no negative weight left is held by its bias only where its inputs are >= 0 (a
    ReLU's outputs). On raw inputs that can be negative, positive weights hold it down: not counted."""
    m = nn.Sequential(OrderedDict([("fc1", nn.Linear(2, 2)), ("act1", nn.ReLU()), ("fc2", nn.Linear(2, 2)),
                                   ("act2", nn.ReLU()), ("head", nn.Linear(2, 1))])).eval()
    with torch.no_grad():
        m.fc1.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, 0.0]]))  # neuron 0: positive weights
        m.fc1.bias.copy_(torch.tensor([0.0, 1.0]))
        m.fc2.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))  # neuron 0: positive weights, bias -10
        m.fc2.bias.copy_(torch.tensor([-10.0, 0.0]))
    x = -torch.rand(16, 2) - 0.1  # negative inputs: fc1 neuron 0 is dead through its positive weights
    result = scan(m, x, batch_size=8)
    assert [r.dead.tolist() for r in result.sites] == [[True, False], [True, False]]
    assert [r.site.input_nonneg for r in result.sites] == [False, True]
    stats = strip(m, result, Masks(m), rate=0.5)
    assert stats.dead_targeted == 2 and stats.total == 0
    assert stats.without_negative == 1  # act2's neuron only
