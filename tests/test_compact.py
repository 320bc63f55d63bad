"""Compaction: dead neurons physically removed where that is exact, outputs unchanged on the scanned
data, parameter counts down by exactly the removed rows and columns, skipped sites with reasons,
save/load round trips, and ``deadscan strip --compact``. Every model is hand-built."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

import deadscan
from deadscan.cli import main
from deadscan.compact import compact, max_output_diff
from deadscan.scan import scan
from deadscan.zoo import build

MLP_SPEC = "mlp(depth=2, width=8, in_features=4, classes=3)"
VIT_SPEC = "vit-relu(img_size=8, patch_size=4, in_chans=1, classes=3, depth=1, heads=2, dim=8, mlp_dim=16)"
# Specs the tests build through deadscan's ``pkg.module:factory`` path (tests/ is on sys.path).
CONV_BN_SPEC = "test_compact:conv_bn_net"
CONV_POOL_SPEC = "test_compact:conv_pool_net"


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _rand(*shape, seed: int = 0) -> torch.Tensor:
    """Non-negative inputs in [0, 1)."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _check_equivalent(model: nn.Module, x: torch.Tensor, expected_removed: dict, expected_drop: int):
    result = scan(model, x, device="cpu")
    c = compact(model, result)
    assert c.removed == expected_removed
    assert c.params_before == _params(model)
    assert c.params_after == _params(c.model)
    assert c.params_before - c.params_after == expected_drop
    model.eval()
    c.model.eval()
    with torch.inference_mode():
        a, b = model(x), c.model(x)
    assert a.shape == b.shape
    assert torch.allclose(a, b, rtol=0, atol=1e-5), (a - b).abs().max()
    half = len(x) // 2
    assert max_output_diff(model, c.model, [x[:half], x[half:]]) <= 1e-5
    return c


def _round_trip(tmp_path, c, arch: str, x: torch.Tensor, *, pass_arch: bool = False):
    path = tmp_path / "compact.safetensors"
    deadscan.save_safetensors(c.model, path, arch, c.metadata())
    loaded = deadscan.load(path, arch if pass_arch else None)
    assert _params(loaded) == c.params_after
    for name, size in c.shapes.items():
        layer = loaded.get_submodule(name)
        if isinstance(layer, nn.Linear):
            assert (layer.in_features, layer.out_features) == (size["in"], size["out"]), name
        elif isinstance(layer, nn.modules.conv._ConvNd):
            assert (layer.in_channels, layer.out_channels) == (size["in"], size["out"]), name
        else:
            assert layer.num_features == size["out"], name
    with torch.inference_mode():
        assert torch.equal(loaded(x), c.model.eval()(x))
    return loaded


# ---------------------------------------------------------------------------------------------
# Models, weights set by hand


def hand_mlp() -> nn.Module:
    """fc1 rows 0-1 dead (weights -1, bias -5 on inputs in [0, 1)); fc2 rows 0-2 dead (weights -1,
    bias -1 on ReLU outputs); every other row has positive weights and bias."""
    m = build(MLP_SPEC)
    with torch.no_grad():
        m.fc1.weight.copy_(torch.linspace(0.1, 0.9, 32).view(8, 4))
        m.fc1.bias.fill_(0.1)
        m.fc1.weight[:2] = -1.0
        m.fc1.bias[:2] = -5.0
        m.fc2.weight.copy_(torch.linspace(0.05, 0.5, 64).view(8, 8))
        m.fc2.bias.fill_(0.1)
        m.fc2.weight[:3] = -1.0
        m.fc2.bias[:3] = -1.0
        m.head.weight.copy_(torch.linspace(-1, 1, 24).view(3, 8))
        m.head.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return m.eval()


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 4, 3)

    def forward(self, x):
        return self.conv2(self.act(self.bn1(self.conv1(x)))).flatten(1)


def conv_bn_net() -> nn.Module:
    return ConvBN()


def hand_conv_bn() -> nn.Module:
    """Channels 1 and 4: negative weights, bias -1 on non-negative inputs; channel 5: positive
    weights but BatchNorm gamma -2. All three dead; the others alive (positive everything)."""
    torch.manual_seed(0)
    m = conv_bn_net()
    with torch.no_grad():
        m.conv1.weight.abs_().mul_(0.3)
        m.conv1.bias.fill_(1.0)
        m.conv1.weight[[1, 4]] *= -1
        m.conv1.bias[[1, 4]] = -1.0
        m.bn1.running_mean.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.0]))
        m.bn1.running_var.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5, 1.0]))
        m.bn1.weight.copy_(torch.tensor([1.0, 1.5, 2.0, 0.5, 1.0, -2.0]))
        m.bn1.bias.copy_(torch.tensor([0.5, -0.5, 0.25, 0.5, -0.5, 0.0]))
    return m.eval()


def conv_pool_net() -> nn.Module:
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(1, 4, 3), act=nn.ReLU(), pool=nn.AdaptiveAvgPool2d((2, 2)), flat=nn.Flatten(),
        fc=nn.Linear(16, 3),
    ))


def hand_conv_pool() -> nn.Module:
    """Channels 0 and 2 dead (negative weights, bias -1); channels 1 and 3 alive."""
    torch.manual_seed(0)
    m = conv_pool_net()
    with torch.no_grad():
        m.conv.weight.abs_()
        m.conv.bias.fill_(0.5)
        m.conv.weight[[0, 2]] *= -1
        m.conv.bias[[0, 2]] = -1.0
    return m.eval()


VIT_DEAD = [1, 5, 9]


def hand_vit() -> nn.Module:
    """One encoder block; fc1 rows 1, 5, 9 dead (weights 0, bias -1), every other row alive (bias
    10 exceeds any w.x on LayerNorm outputs). fc2 (before the residual add): row 0 dead (weights 0,
    bias -1), the others alive (non-negative weights, bias 0.1, on ReLU outputs)."""
    torch.manual_seed(0)
    m = build(VIT_SPEC)
    fc1, fc2 = m.blocks[0].mlp.fc1, m.blocks[0].mlp.fc2
    with torch.no_grad():
        fc1.bias.fill_(10.0)
        fc1.weight[VIT_DEAD] = 0.0
        fc1.bias[VIT_DEAD] = -1.0
        fc2.weight.abs_()
        fc2.bias.fill_(0.1)
        fc2.weight[0] = 0.0
        fc2.bias[0] = -1.0
    return m.eval()


# ---------------------------------------------------------------------------------------------
# Equivalence and exact parameter counts


def test_compact_mlp(tmp_path):
    m, x = hand_mlp(), _rand(40, 4)
    # relu1: fc1 rows 2*(4+1) + fc2 columns 2*8 = 26; relu2 (fc2 is already 6 wide): rows 3*(6+1) +
    # head columns 3*3 = 30
    c = _check_equivalent(m, x, {"relu1": 2, "relu2": 3}, 26 + 30)
    assert c.skipped == {}
    assert c.shapes == {"fc1": {"in": 4, "out": 6}, "fc2": {"in": 6, "out": 5}, "head": {"in": 5, "out": 3}}
    assert torch.equal(c.model.fc1.weight, m.fc1.weight[2:])
    assert torch.equal(c.model.fc2.weight, m.fc2.weight[3:, 2:])
    assert torch.equal(c.model.head.weight, m.head.weight[:, 3:])
    # the original model is left whole
    assert m.fc1.out_features == 8 and m.fc2.in_features == 8
    _round_trip(tmp_path, c, MLP_SPEC, x)


def test_compact_conv_batchnorm_conv(tmp_path):
    m, x = hand_conv_bn(), _rand(12, 2, 6, 6)
    result = scan(m, x, device="cpu")
    assert result["act"].dead_indices == [1, 4, 5]
    # conv1 3*(2*9+1) = 57, bn1 3*2 = 6, conv2 columns 4*3*9 = 108
    c = _check_equivalent(m, x, {"act": 3}, 57 + 6 + 108)
    keep = [0, 2, 3]
    assert torch.equal(c.model.bn1.running_mean, m.bn1.running_mean[keep])
    assert torch.equal(c.model.bn1.running_var, m.bn1.running_var[keep])
    assert torch.equal(c.model.bn1.weight, m.bn1.weight[keep])
    assert torch.equal(c.model.conv2.weight, m.conv2.weight[:, keep])
    assert c.shapes == {"conv1": {"in": 2, "out": 3}, "bn1": {"out": 3}, "conv2": {"in": 3, "out": 4}}
    _round_trip(tmp_path, c, CONV_BN_SPEC, x, pass_arch=True)


def test_compact_conv_adaptive_pool_flatten_linear(tmp_path):
    m, x = hand_conv_pool(), _rand(10, 1, 7, 7)
    result = scan(m, x, device="cpu")
    assert result["act"].dead_indices == [0, 2]
    assert result["act"].site.consumer.group == 4
    # conv 2*(9+1) = 20; fc columns: 4 per channel, 3 outputs: 2*4*3 = 24
    c = _check_equivalent(m, x, {"act": 2}, 20 + 24)
    assert c.model.fc.in_features == 8
    assert torch.equal(c.model.fc.weight, m.fc.weight[:, [4, 5, 6, 7, 12, 13, 14, 15]])
    _round_trip(tmp_path, c, CONV_POOL_SPEC, x, pass_arch=True)


def test_compact_vit_mlp_block(tmp_path):
    m, x = hand_vit(), torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    result = scan(m, x, device="cpu")
    act1 = result["blocks.0.mlp.act1"]
    assert act1.dead_indices == VIT_DEAD
    assert act1.site.feeding.layer == "blocks.0.mlp.fc1" and act1.site.consumer.layer == "blocks.0.mlp.fc2"
    removed = {"blocks.0.mlp.act1": 3}
    # fc1 rows 3*(8+1) = 27, fc2 columns 8*3 = 24
    c = _check_equivalent(m, x, removed, 27 + 24)
    assert c.model.blocks[0].mlp.fc1.out_features == 13
    assert c.model.blocks[0].mlp.fc2.in_features == 13
    # act2 feeds a residual add: its dead neuron stays, with the reason
    assert result["blocks.0.mlp.act2"].dead_indices == [0]
    assert c.skipped == {"blocks.0.mlp.act2": "no consumer layer (its output is added, concatenated or returned)"}
    _round_trip(tmp_path, c, VIT_SPEC, x)


def test_nothing_dead_nothing_removed():
    m, x = hand_mlp(), _rand(20, 4)
    with torch.no_grad():
        m.fc1.weight.abs_()
        m.fc1.bias.fill_(0.1)
        m.fc2.weight.abs_()
        m.fc2.bias.fill_(0.1)
    c = _check_equivalent(m, x, {}, 0)
    assert c.skipped == {} and c.shapes == {}


# ---------------------------------------------------------------------------------------------
# Sites left whole, with the reason


class AfterResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.relu(x + self.fc1(x)))


def test_skip_site_after_residual_add():
    m = AfterResidual().eval()
    with torch.no_grad():
        m.fc1.weight.fill_(0.5)
        m.fc1.bias.fill_(0.1)
        m.fc1.weight[1] = -1.0
        m.fc1.bias[1] = -5.0
    x = _rand(20, 4)
    result = scan(m, x, device="cpu")
    (r,) = result.sites
    assert r.dead_indices == [1]
    assert r.site.feeding is None
    c = compact(m, result)
    assert c.removed == {}
    assert c.skipped == {r.site.name: "no feeding layer"}
    assert c.params_after == c.params_before
    with torch.inference_mode():
        assert torch.equal(c.model(x), m(x))


def test_skip_batchnorm_after_the_relu():
    m = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 6), act=nn.ReLU(), bn=nn.BatchNorm1d(6), fc2=nn.Linear(6, 2))).eval()
    with torch.no_grad():
        m.fc1.weight.fill_(0.5)
        m.fc1.bias.fill_(0.1)
        m.fc1.weight[[0, 3]] = -1.0
        m.fc1.bias[[0, 3]] = -5.0
        m.bn.running_mean.fill_(0.3)  # a dead neuron reaches fc2 as -0.3 / sqrt(1 + eps), not 0
    x = _rand(20, 4)
    result = scan(m, x, device="cpu")
    assert result["act"].dead_indices == [0, 3]
    assert result["act"].site.consumer.keeps_zero is False
    c = compact(m, result)
    assert c.removed == {}
    assert "BatchNorm after the ReLU" in c.skipped["act"]
    assert c.params_after == c.params_before


def test_skip_site_where_every_neuron_is_dead():
    m = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 3), act=nn.ReLU(), fc2=nn.Linear(3, 2))).eval()
    with torch.no_grad():
        m.fc1.weight.fill_(-1.0)
        m.fc1.bias.fill_(-1.0)
    x = _rand(20, 4)
    result = scan(m, x, device="cpu")
    assert result["act"].dead.all()
    c = compact(m, result)
    assert c.removed == {}
    assert c.skipped == {"act": "every neuron is dead: the site would vanish"}
    assert c.params_after == c.params_before


def test_skipped_and_removed_sites_in_one_model():
    """A residual site is left whole while a plain site in the same model is compacted."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 6)
            self.fc2 = nn.Linear(6, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu(self.fc1(x))
            return self.head(torch.relu(x + self.fc2(h)))

    m = Mixed().eval()
    with torch.no_grad():
        m.fc1.weight.fill_(0.5)
        m.fc1.bias.fill_(0.1)
        m.fc1.weight[2] = -1.0
        m.fc1.bias[2] = -5.0
        m.fc2.weight.fill_(0.1)
        m.fc2.bias.fill_(0.1)
        m.fc2.weight[0] = -1.0
        m.fc2.bias[0] = -10.0
    x = _rand(20, 4)
    result = scan(m, x, device="cpu")
    names = [r.site.name for r in result.sites]
    assert [result[n].dead_indices for n in names] == [[2], [0]]
    c = _check_equivalent(m, x, {names[0]: 1}, (4 + 1) + 4)
    assert c.skipped == {names[1]: "no feeding layer"}


# ---------------------------------------------------------------------------------------------
# deadscan strip --compact



def test_cli_strip_compact(tmp_path, runner):
    ckpt = tmp_path / "mlp.safetensors"
    deadscan.save_safetensors(hand_mlp(), ckpt, MLP_SPEC)
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, x=rng.random((100, 4)).astype(np.float32), y=(np.arange(100) % 3).astype(np.int64))
    out = tmp_path / "out"
    r = runner.invoke(main, ["strip", str(ckpt), "--data", str(data), "--finetune", "0", "--compact",
                             "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "compact.safetensors").exists()
    summary = json.loads((out / "summary.json").read_text())
    comp = summary["compact"]
    assert comp["params_before"] > comp["params_after"]
    # one strip step at rate 0.1 prunes one weight of each dead row and revives none (their biases
    # hold them down): the same 5 neurons go, as in test_compact_mlp
    assert comp["removed"] == {"relu1": 2, "relu2": 3}
    assert comp["params_before"] - comp["params_after"] == 56
    assert comp["max_abs_diff"] <= 1e-4
    assert summary["outputs"]["compact"] == str(out / "compact.safetensors")
    assert "compact: removed 5 dead neurons" in r.stdout
    lat = comp["cpu_latency_ms"]  # interleaved repeats: median within the quartiles, never one timing
    for t in (lat["before"], lat["after"]):
        assert t["runs"] == 30 and 0 < t["q1"] <= t["median"] <= t["q3"]
    assert (comp["cpu_latency_ms_before"], comp["cpu_latency_ms_after"]) == (lat["before"]["median"],
                                                                           lat["after"]["median"])

    stripped = deadscan.load(out / "stripped.safetensors")
    compacted = deadscan.load(out / "compact.safetensors")
    assert compacted.fc1.out_features == 6 and compacted.fc2.out_features == 5
    x = torch.from_numpy(rng.random((30, 4)).astype(np.float32))
    with torch.inference_mode():
        assert torch.allclose(stripped(x), compacted(x), rtol=0, atol=1e-5)


def test_cli_strip_compact_with_nothing_dead_says_so_and_writes_no_file(tmp_path, runner):
    m = hand_mlp()
    with torch.no_grad():  # every hidden neuron alive on inputs in [0, 1): positive weights and biases
        for layer in (m.fc1, m.fc2):
            layer.weight.abs_()
            layer.bias.fill_(0.1)
    ckpt = tmp_path / "alive.safetensors"
    deadscan.save_safetensors(m, ckpt, MLP_SPEC)
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, x=rng.random((100, 4)).astype(np.float32), y=(np.arange(100) % 3).astype(np.int64))
    out = tmp_path / "out"
    r = runner.invoke(main, ["strip", str(ckpt), "--data", str(data), "--finetune", "0", "--compact",
                             "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert ("compact: nothing to compact (no neuron with a feeding layer is dead at the end); no compact file "
            "written") in r.stdout.splitlines()
    assert not (out / "compact.safetensors").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compact"] == {"removed": {}, "skipped": {}, "params_before": summary["compact"]["params_after"],
                                  "params_after": summary["compact"]["params_before"], "nothing_to_compact": True}
    assert "compact" not in summary["outputs"]
    assert "nothing to compact" in (out / "report.html").read_text()


def test_skip_site_fed_by_a_grouped_conv():
    """Depthwise conv -> BatchNorm -> ReLU -> pointwise conv (the MobileNet pattern): a depthwise
    channel cannot go without its input channel, so the site is left whole."""
    m = nn.Sequential(OrderedDict(dw=nn.Conv2d(4, 4, 3, groups=4, padding=1), bn=nn.BatchNorm2d(4), act=nn.ReLU(),
                                  pw=nn.Conv2d(4, 2, 1))).eval()
    with torch.no_grad():
        m.dw.weight.fill_(0.2)
        m.dw.bias.fill_(0.1)
        m.dw.weight[1] = -0.2
        m.dw.bias[1] = -1.0
    x = _rand(5, 4, 6, 6)
    result = scan(m, x, device="cpu")
    assert result["act"].dead_indices == [1]
    c = compact(m, result)
    assert c.removed == {}
    assert "grouped convolution" in c.skipped["act"]
    assert c.params_after == c.params_before
