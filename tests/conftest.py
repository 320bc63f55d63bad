"""Shared fixtures: a tiny hand-built paper MLP whose dead neurons are known by construction."""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import deadscan
from deadscan.zoo import build

MLP_SPEC = "mlp(depth=2, width=8, in_features=4, classes=3)"
CLICK = tuple(int(p) for p in version("click").split(".")[:2])


@pytest.fixture
def runner():
    """click's test runner with stdout and stderr kept apart (the default from click 8.2 on)."""
    return CliRunner() if CLICK >= (8, 2) else CliRunner(mix_stderr=False)


def _hand_mlp() -> torch.nn.Module:
    """mlp(depth=2, width=8, in_features=4, classes=3) with every weight set by hand.

    Inputs are in [0, 1). fc1 rows 0-1: weights -1, bias -5 -> dead on any such input (not provably:
    fc1's inputs do not come from a ReLU). fc2 rows 0-2: weights -1, bias -1 on ReLU outputs -> dead
    and provably dead. All other rows have positive weights and bias, so they are active everywhere.
    """
    m = build(MLP_SPEC)
    with torch.no_grad():
        m.fc1.weight.fill_(0.5)
        m.fc1.bias.fill_(0.1)
        m.fc1.weight[:2] = -1.0
        m.fc1.bias[:2] = -5.0
        m.fc2.weight.fill_(0.25)
        m.fc2.bias.fill_(0.1)
        m.fc2.weight[:3] = -1.0
        m.fc2.bias[:3] = -1.0
        m.head.weight.fill_(0.1)
        m.head.bias.zero_()
    return m.eval()


@pytest.fixture
def mlp_spec() -> str:
    return MLP_SPEC


@pytest.fixture
def hand_mlp() -> torch.nn.Module:
    return _hand_mlp()


@pytest.fixture
def mlp_file(tmp_path, hand_mlp):
    """The hand-built MLP saved by deadscan as safetensors (arch spec in the metadata)."""
    path = tmp_path / "mlp.safetensors"
    deadscan.save_safetensors(hand_mlp, path, MLP_SPEC)
    return path


@pytest.fixture
def npz_data(tmp_path):
    """100 float inputs in [0, 1) with 4 features and labels 0..2."""
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, x=rng.random((100, 4)).astype(np.float32), y=(np.arange(100) % 3).astype(np.int64))
    return path


@pytest.fixture
def gelu_case(tmp_path):
    """A tiny GELU ViT (no ReLU sites) saved as safetensors, and 8x8 one-channel images for it."""
    spec = "vit-gelu(img_size=8, patch_size=4, in_chans=1, classes=3, depth=1, heads=2, dim=8, mlp_dim=16)"
    torch.manual_seed(0)
    ckpt = tmp_path / "gelu.safetensors"
    deadscan.save_safetensors(build(spec), ckpt, spec)
    rng = np.random.default_rng(0)
    data = tmp_path / "img.npz"
    np.savez(data, x=rng.integers(0, 256, (40, 1, 8, 8)).astype(np.uint8), y=(np.arange(40) % 3).astype(np.int64))
    return ckpt, data


def invoke_cli(*args):
    """Run the deadscan command in-process: (result, its Error: lines)."""
    from deadscan.cli import main

    res = CliRunner().invoke(main, [str(a) for a in args])
    err = [line for line in (res.stderr if res.stderr_bytes is not None else res.output).splitlines()
           if line.startswith("Error:")]
    return res, err


def write_token_file(path, *, n: int, t: int, vocab: int, seed: int = 1, low: int = 1, pad_from: int = 6,
                     pad_id: int = 0):
    """tokens.npz of random ids in [low, vocab) with every third sequence right-padded (``pad_id``, attention
    mask 0) from position ``pad_from``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(low, vocab, (n, t))
    mask = np.ones((n, t), np.int64)
    mask[::3, pad_from:] = 0
    ids[mask == 0] = pad_id
    np.savez(path, input_ids=ids, attention_mask=mask)
    return path
