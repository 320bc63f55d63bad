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

# Known by construction and from the CPU run (the CPU tests pin the same values): dead indices per site.
MLP_DEAD = {"relu1": [0, 1, 2, 3], "relu2": [0, 13, 15]}  # relu2's pre-activations stay below -0.05
CONV_DEAD = {"2": [2]}
# One of the 32 validation samples, in percent: CUDA sums in another order, so a near-tie argmax may flip.
ACC_TOLERANCE = 100 / 32


@pytest.fixture(autouse=True)
def no_tf32():
    """Full float32 on CUDA: cuDNN convolutions default to TF32 (10-bit mantissa), far from CPU's sums.
    Set and restored by hand: torch.backends.cuda.matmul's flags are properties monkeypatch cannot restore."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


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


@pytest.mark.parametrize("make, shape, dead, elements", [(_mlp, (64, 8), MLP_DEAD, 64),
                                                        (_conv, (16, 3, 8, 8), CONV_DEAD, 16 * 8 * 8)])
def test_scan_on_cuda_equals_cpu(make, shape, dead, elements):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    cpu = deadscan.scan(make(), x, batch_size=16, device="cpu")
    gpu = deadscan.scan(make(), x, batch_size=16, device="cuda")
    assert cpu.device == "cpu" and gpu.device.startswith("cuda")
    assert {r.site.name: r.dead_indices for r in cpu.sites} == dead
    assert {r.site.name: r.dead_indices for r in gpu.sites} == dead
    assert gpu.dead == cpu.dead == sum(map(len, dead.values()))
    for a, b in zip(cpu.sites, gpu.sites, strict=True):
        assert np.array_equal(a.active, b.active)
        assert a.elements == b.elements == elements
        np.testing.assert_allclose(b.out_sum, a.out_sum, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b.pre_max, a.pre_max, rtol=1e-6, atol=1e-6)


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


def _finetune(device: str):
    g = torch.Generator().manual_seed(2)
    train = Dataset("t", "train", torch.rand(96, 8, generator=g), torch.randint(0, 3, (96,), generator=g))
    val = Dataset("t", "val", torch.rand(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g))
    # One batch of all 96 samples per epoch: the shuffle (drawn on the device's generator, which differs
    # between CPU and CUDA) cannot change the gradient, so both runs take the same steps.
    cfg = TrainConfig(epochs=3, warmup=0, batch_size=96, augment="none")
    return finetune(_mlp(), train, val, cfg, device=torch.device(device), test=val)


def test_finetune_on_cuda_equals_cpu():
    cpu, gpu = _finetune("cpu"), _finetune("cuda")
    counts = ("epoch", "dead", "revived", "died", "pruned_weights", "pruned_this_epoch", "revived_neurons",
              "died_neurons")
    for a, b in zip(cpu.history, gpu.history, strict=True):
        assert {k: b[k] for k in counts} == {k: a[k] for k in counts}
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
        assert abs(b["val_acc"] - a["val_acc"]) <= ACC_TOLERANCE
    # the CPU run's values (the same on every CPU): 9 dead after epoch 1, 4 revived by stripping in epoch 2
    assert [r["dead"] for r in cpu.history] == [9, 5, 5]
    assert [r["revived"] for r in cpu.history] == [0, 4, 0]
    assert [r["pruned_weights"] for r in cpu.history] == [9, 14, 19]
    assert cpu.test["acc"] == 34.375
    assert abs(gpu.test["acc"] - cpu.test["acc"]) <= ACC_TOLERANCE
    cpu_masks, gpu_masks = cpu.stripper.masks.state_dict(), gpu.stripper.masks.state_dict()
    assert cpu_masks.keys() == gpu_masks.keys() == {"fc1", "fc2"}
    for layer in cpu_masks:  # the same weights pruned
        assert torch.equal(gpu_masks[layer], cpu_masks[layer])
