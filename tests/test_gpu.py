"""The same results on CUDA as on CPU. Marked ``gpu``: skipped where CUDA is not available."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import deadscan
from deadscan.data import Dataset
from deadscan.finetune import TrainConfig, finetune
from deadscan.strip import Masks, strip

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _mlp() -> nn.Module:
    """fc1 rows 0-3 dead on inputs in [0, 1] (negative weights and bias); the rest alive."""
    torch.manual_seed(0)
    m = deadscan.build("mlp(depth=2, width=16, in_features=8, classes=3)")
    with torch.no_grad():
        m.fc1.weight.abs_()
        m.fc1.weight[:4] = -m.fc1.weight[:4]
        m.fc1.bias.fill_(0.1)
        m.fc1.bias[:4] = -1.0
    return m.eval()


def _conv() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1))
    with torch.no_grad():
        m[0].weight[2] = -m[0].weight[2].abs()
        m[0].bias[2] = -1.0
        m[1].running_mean.zero_()
        m[1].running_var.fill_(1.0)
    return m.eval()


@pytest.mark.parametrize("make, shape", [(_mlp, (64, 8)), (_conv, (16, 3, 8, 8))])
def test_scan_on_cuda_equals_cpu(make, shape):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    cpu = deadscan.scan(make(), x, batch_size=16, device="cpu")
    gpu = deadscan.scan(make(), x, batch_size=16, device="cuda")
    assert gpu.device.startswith("cuda")
    for a, b in zip(cpu.sites, gpu.sites):
        assert np.array_equal(a.dead, b.dead) and np.array_equal(a.active, b.active)
        assert a.elements == b.elements
        np.testing.assert_allclose(a.out_sum, b.out_sum, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.pre_max, b.pre_max, rtol=1e-6, atol=1e-6)
    assert cpu.sites[0].dead.any()  # the construction really has dead neurons to compare


def test_pruned_weights_stay_zero_through_adam_on_cuda():
    m = _mlp().cuda()
    x = torch.rand(64, 8, device="cuda")
    y = torch.randint(0, 3, (64,), device="cuda")
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    masks = Masks(m)
    result = deadscan.scan(m, x, device="cuda")
    strip(m, result, masks, rate=0.5, optimizer=opt)
    pruned = masks.masks["fc1"].clone()
    assert pruned.any()
    m.train()
    for _ in range(50):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(m.fc1.weight[pruned], torch.zeros(int(pruned.sum()), device="cuda"))


def test_finetune_on_cuda_runs_and_records_history():
    g = torch.Generator().manual_seed(2)
    train = Dataset("t", "train", torch.rand(96, 8, generator=g), torch.randint(0, 3, (96,), generator=g))
    val = Dataset("t", "val", torch.rand(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g))
    res = finetune(_mlp(), train, val, TrainConfig(epochs=2, warmup=0, batch_size=16, augment="none"),
                   device=torch.device("cuda"), test=val)
    assert [r["epoch"] for r in res.history] == [1, 2] and res.history[0]["dead"] >= 1
    assert res.test["acc"] is not None
