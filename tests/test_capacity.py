"""%A exactly as DESIGN.md's Definitions state it, with every count worked out by hand.

Hidden parameters P: weights and biases of every feeding layer, plus the consumer layers' weights
that read those neurons. Inactive: pruned weights; a dead neuron's incoming weights and bias;
consumer weights reading a dead neuron; each counted once. %A = 100 (P - inactive) / P.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import deadscan
from deadscan.capacity import SiteCapacity


def set_(param: torch.Tensor, value) -> None:
    with torch.no_grad():
        param.copy_(torch.as_tensor(value, dtype=torch.float32).expand_as(param))


# ---------------------------------------------------------------------------------------------
# Two hidden Linear layers: 4 -> 5 -> 3 -> 2


def mlp() -> nn.Module:
    """fc1 (5x4) -> relu1 -> fc2 (3x5) -> relu2 -> head (2x3).

    On positive inputs: relu1 neurons 1 and 3 are dead (weights -1, bias -1), the others are active
    everywhere (weights 1, bias 1). relu2 neuron 0 is dead (weights -1, bias -1 on relu outputs),
    neurons 1 and 2 active everywhere.
    """
    m = nn.Sequential(OrderedDict(
        fc1=nn.Linear(4, 5), relu1=nn.ReLU(), fc2=nn.Linear(5, 3), relu2=nn.ReLU(), head=nn.Linear(3, 2),
    ))
    set_(m.fc1.weight, 1.0)
    set_(m.fc1.bias, 1.0)
    set_(m.fc2.weight, 1.0)
    set_(m.fc2.bias, 1.0)
    with torch.no_grad():
        m.fc1.weight[[1, 3]] = -1.0
        m.fc1.bias[[1, 3]] = -1.0
        m.fc2.weight[0] = -1.0
        m.fc2.bias[0] = -1.0
    return m.eval()


X = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 1.0, 2.0], [3.0, 1.0, 1.0, 1.0]])


def scan_mlp(model=None):
    model = model or mlp()
    return model, deadscan.scan(model, X, device="cpu")


def test_mlp_dead_neurons_are_as_built():
    _, r = scan_mlp()
    assert r["relu1"].dead_indices == [1, 3]
    assert r["relu2"].dead_indices == [0]


def test_mlp_capacity_by_hand():
    model, r = scan_mlp()
    cap = deadscan.capacity(model, r)

    # P = fc1 weights + bias + fc2 weights + bias (feeding layers) + head weights (consumer only)
    #   = (5*4 + 5) + (3*5 + 3) + 2*3 = 25 + 18 + 6 = 49
    assert cap.hidden_params == 49
    # Inactive, each parameter once:
    #   fc1: dead rows 1, 3: 2 * (4 weights + 1 bias)                          = 10
    #   fc2: dead row 0: 5 weights + 1 bias                                    =  6
    #        dead columns 1, 3 (read dead relu1 neurons): 2 columns * 3 rows  =  6
    #        minus the weights in dead row 0 AND a dead column, (0,1), (0,3)   = -2
    #   head: dead column 0 (reads relu2 neuron 0): 2 rows                     =  2
    #   total                                                                  = 22
    assert cap.inactive_params == 10 + 6 + 6 - 2 + 2 == 22
    assert cap.active_percent == 100.0 * (49 - 22) / 49
    # Feeding-layer weights only (the reference code's figure): 5*4 + 3*5 = 35 weights, of which
    # the dead neurons' incoming weights are inactive: 2*4 + 1*5 = 13.
    assert cap.feeding_weights == 35
    assert cap.inactive_feeding_weights == 13
    assert cap.active_percent_feeding_weights == 100.0 * (35 - 13) / 35
    assert cap.pruned_weights == 0
    # Per site (a layer shared by two sites counts in both):
    #   relu1: fc1 (20 + 5) + fc2's weights (15) = 40 hidden; 2*(4 + 1) + 2 columns * 3 = 16 inactive
    #   relu2: fc2 (15 + 3) + head's weights (6) = 24 hidden; 1*(5 + 1) + 1 column * 2 = 8 inactive
    assert cap.sites == {"relu1": SiteCapacity(40, 16), "relu2": SiteCapacity(24, 8)}
    assert cap.sites["relu1"].active_percent == 100.0 * (40 - 16) / 40
    assert cap.sites["relu2"].active_percent == 100.0 * (24 - 8) / 24


def test_weight_in_a_dead_row_and_a_dead_column_is_counted_once():
    """fc2 with every row and every column dead: all 15 weights and 3 biases, not 15 + 15."""
    model = mlp()
    with torch.no_grad():
        model.fc1.weight.fill_(-1.0)
        model.fc1.bias.fill_(-1.0)
    _, r = scan_mlp(model)
    assert r["relu1"].dead_indices == [0, 1, 2, 3, 4]
    # relu2 reads only zeros: fc2 pre = bias = -1 (row 0) or +1 (rows 1, 2)
    assert r["relu2"].dead_indices == [0]
    cap = deadscan.capacity(model, r)
    # fc1: 5 * (4 + 1) = 25; fc2: all 15 weights (5 dead columns cover every row) + bias of row 0;
    # head: column 0, 2 weights.
    assert cap.inactive_params == 25 + 15 + 1 + 2 == 43
    assert cap.hidden_params == 49


def test_pruned_masks_add_only_weights_outside_dead_rows_and_columns():
    model, r = scan_mlp()
    m1 = torch.zeros(5, 4, dtype=torch.bool)
    m1[1, 0] = True  # in dead row 1: already inactive
    m1[0, 2] = True  # live row: +1
    m1[2, 0] = True  # live row: +1
    m2 = torch.zeros(3, 5, dtype=torch.bool)
    m2[0, 4] = True  # dead row 0: already inactive
    m2[2, 1] = True  # dead column 1: already inactive
    m2[0, 1] = True  # dead row and dead column: already inactive
    m2[1, 0] = True  # live row and column: +1
    m2[2, 4] = True  # live row and column: +1
    cap = deadscan.capacity(model, r, masks={"fc1": m1, "fc2": m2})
    assert cap.pruned_weights == 3 + 5
    assert cap.hidden_params == 49
    assert cap.inactive_params == 22 + 2 + 2
    assert cap.active_percent == 100.0 * (49 - 26) / 49
    # Feeding weights: dead rows (13) plus pruned weights outside dead rows: fc1 (0,2), (2,0);
    # fc2 (2,1), (1,0), (2,4) -> 13 + 5 (a dead column is not part of this figure).
    assert cap.inactive_feeding_weights == 13 + 2 + 3
    # Per site: the feeding layer's pruned weights outside its dead rows.
    assert cap.sites["relu1"] == SiteCapacity(40, 16 + 2)
    assert cap.sites["relu2"] == SiteCapacity(24, 8 + 3)


def test_no_dead_neurons_is_100_percent():
    model = mlp()
    with torch.no_grad():
        model.fc1.weight.fill_(1.0)
        model.fc1.bias.fill_(1.0)
        model.fc2.weight.fill_(1.0)
        model.fc2.bias.fill_(1.0)
    _, r = scan_mlp(model)
    cap = deadscan.capacity(model, r)
    assert cap.inactive_params == 0 and cap.active_percent == 100.0
    assert cap.active_percent_feeding_weights == 100.0


# ---------------------------------------------------------------------------------------------
# conv -> conv with 3x3 kernels


def conv_model() -> nn.Module:
    """conv1 (4 out, 2 in, 3x3) -> relu1 -> conv2 (3 out, 4 in, 3x3) -> relu2.

    Non-negative inputs: conv1 channel 2 dead (weights -1, bias -1), others active; conv2 channel 1
    dead, others active (weights 1, bias 1).
    """
    m = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(2, 4, 3, padding=1), relu1=nn.ReLU(),
        conv2=nn.Conv2d(4, 3, 3, padding=1), relu2=nn.ReLU(),
    ))
    for layer, dead in ((m.conv1, 2), (m.conv2, 1)):
        set_(layer.weight, 1.0)
        set_(layer.bias, 1.0)
        with torch.no_grad():
            layer.weight[dead] = -1.0
            layer.bias[dead] = -1.0
    return m.eval()


def test_conv_to_conv_kernel_3():
    model = conv_model()
    x = torch.rand(2, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    r = deadscan.scan(model, x, device="cpu")
    assert r["relu1"].dead_indices == [2]
    assert r["relu2"].dead_indices == [1]
    assert r.sitemap["relu1"].consumer.layer == "conv2"
    cap = deadscan.capacity(model, r)
    k = 3 * 3
    # P = conv1 (4*2*9 + 4) + conv2 (3*4*9 + 3) = 76 + 111 = 187
    assert cap.hidden_params == 4 * 2 * k + 4 + 3 * 4 * k + 3 == 187
    # conv1: dead channel 2: 2*9 weights + 1 bias                              = 19
    # conv2: dead input column 2: 3 rows * 9                                   = 27
    #        dead output row 1: 4*9 weights + 1 bias                           = 37
    #        overlap: row 1, column 2 (one 3x3 kernel)                         = -9
    assert cap.inactive_params == 19 + 27 + 37 - 9 == 74
    assert cap.active_percent == 100.0 * (187 - 74) / 187
    assert cap.feeding_weights == 4 * 2 * k + 3 * 4 * k == 180
    assert cap.inactive_feeding_weights == 2 * k + 4 * k == 54
    # relu1: conv1 (72 + 4) + conv2 weights (108); inactive 19 + 27
    # relu2: conv2 (108 + 3), no consumer; inactive 37
    assert cap.sites == {"relu1": SiteCapacity(76 + 108, 19 + 27), "relu2": SiteCapacity(111, 37)}

    # A pruned-weight mask on conv2 (shape of its weight): only weights outside dead rows/columns add.
    mask = torch.zeros(3, 4, 3, 3, dtype=torch.bool)
    mask[1, 0, 0, 0] = True  # dead row 1
    mask[0, 2, 1, 1] = True  # dead column 2
    mask[0, 0, 0, 0] = True  # live: +1
    mask[2, 3, 2, 2] = True  # live: +1
    cap = deadscan.capacity(model, r, masks={"conv2": mask})
    assert cap.pruned_weights == 4
    assert cap.inactive_params == 74 + 2
    assert cap.inactive_feeding_weights == 54 + 3  # (0,2) is outside dead rows: counted here


# ---------------------------------------------------------------------------------------------
# conv -> adaptive pool (2x2) -> flatten -> linear: 4 columns per channel


@pytest.mark.parametrize("flatten", ["module", "torch.flatten"])
def test_conv_pool_flatten_linear_group_4(flatten):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3)
            self.act = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2d(2)
            self.flat = nn.Flatten()
            self.fc = nn.Linear(12, 2)

        def forward(self, x):
            h = self.pool(self.act(self.conv(x)))
            return self.fc(self.flat(h) if flatten == "module" else torch.flatten(h, 1))

    model = M().eval()
    set_(model.conv.weight, 1.0)
    set_(model.conv.bias, 1.0)
    with torch.no_grad():
        model.conv.weight[1] = -1.0
        model.conv.bias[1] = -1.0
    x = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    r = deadscan.scan(model, x, device="cpu")
    site = r.sitemap["act"]
    assert site.consumer.layer == "fc" and site.consumer.group == 4
    assert r["act"].dead_indices == [1]
    cap = deadscan.capacity(model, r)
    # P = conv (3*1*9 weights + 3 biases) + fc weights (2*12) = 30 + 24 = 54
    assert cap.hidden_params == 30 + 24
    # conv channel 1: 9 weights + 1 bias = 10; fc columns 4..7 (channel 1's 2x2 cells): 4 * 2 = 8
    assert cap.inactive_params == 10 + 8
    assert cap.active_percent == 100.0 * (54 - 18) / 54
    assert cap.sites == {"act": SiteCapacity(54, 18)}

    # Pruned fc weights: column 5 belongs to dead channel 1 (already inactive), column 0 does not.
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 5] = True
    mask[1, 0] = True
    cap = deadscan.capacity(model, r, masks={"fc": mask})
    assert cap.inactive_params == 18 + 1
    assert cap.pruned_weights == 2
    assert cap.feeding_weights == 27  # fc is only a consumer
