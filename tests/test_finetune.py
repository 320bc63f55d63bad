"""Fine-tuning with per-epoch stripping: the no-training step, history rows, resume after a stop or
Ctrl-C, the exported stripped model, and the ``deadscan strip`` command. Tiny data, CPU, fixed seeds."""

from __future__ import annotations

import copy
import html
import json
import os
import shutil
import socket
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import deadscan
from deadscan import pipeline
from deadscan.checkpoint import ARCH_KEY
from deadscan.cli import main
from deadscan.data import Dataset
from deadscan.finetune import STATE_FILE, Interrupted, TrainConfig, finetune, load_state
from deadscan.options import OutputOptions
from deadscan.zoo import build

SPEC = "mlp(depth=2, width=16, in_features=8, classes=3)"
CPU = torch.device("cpu")
HISTORY_FIELDS = {"epoch", "dead", "revived", "pruned_weights", "active_percent", "train_loss", "val_loss",
                  "val_acc", "test_acc"}


def _model(dropout: bool = False) -> nn.Module:
    """The paper MLP on inputs in [0.1, 1) with exactly fc1 rows 0-2 dead at the start:
    row 0 is held down by one weight of -50 (one strip step at rate 0.1 revives it);
    rows 1 and 2 have only negative weights and a negative bias (they stay dead, losing one weight
    per step). Every other hidden row has positive weights and bias: alive."""
    torch.manual_seed(0)
    m = build(SPEC)
    if dropout:
        items = list(m.named_children())
        items.insert(3, ("drop1", nn.Dropout(0.25)))  # after relu1
        m = nn.Sequential(OrderedDict(items))
    with torch.no_grad():
        for layer in (m.fc1, m.fc2):
            layer.weight.abs_()
            layer.bias.fill_(0.1)
        m.fc1.weight[0] = torch.tensor([0.2, 0.3, -50.0, 0.1, 0.2, 0.3, 0.1, 0.2])
        m.fc1.weight[1:3] = -torch.linspace(0.1, 0.8, 8)
        m.fc1.bias[1:3] = -1.0
    return m.eval()


def _arrays(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 8, generator=g) * 0.9 + 0.1
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def _splits():
    train = Dataset("t", "train", *_arrays(40, 1))
    val = Dataset("t", "val", *_arrays(24, 2))
    test = Dataset("t", "test", *_arrays(24, 3))
    return train, val, test


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=4, warmup=1, batch_size=16, eval_batch_size=10, lr=1e-2, train_seed=0)
    return TrainConfig(**{**base, **kw})


def _without_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def _assert_same_run(a, b, model_a, model_b):
    assert _without_seconds(a.history) == _without_seconds(b.history)
    ma, mb = a.stripper.masks.masks, b.stripper.masks.masks
    assert ma.keys() == mb.keys() and ma
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert a.test == b.test


# ---------------------------------------------------------------------------------------------
# epochs=0: one strip step and a re-scan


def test_zero_epochs_strips_once_and_rescans_without_training():
    train, val, test = _splits()
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res = finetune(m, train, val, _cfg(epochs=0), device=CPU, test=test)
    assert [row["epoch"] for row in res.history] == [0, 1]
    first, second = res.history
    assert first["dead"] == 3  # fc1 rows 0-2
    assert first["train_loss"] is None and second["train_loss"] is None
    masks = res.stripper.masks.masks
    assert torch.nonzero(masks["fc1"]).tolist() == [[0, 2], [1, 7], [2, 7]]  # one weight per dead row
    assert first["pruned_weights"] == second["pruned_weights"] == res.stripper.masks.pruned()
    # the re-scan sees row 0 back (its -5 is gone) and nothing newly dead
    assert second["revived"] == 1 and second["revived_neurons"] == {"relu1": [0]}
    assert second["dead"] == 2
    assert second["died"] == 0
    # no training: every weight but the pruned ones is unchanged
    after = m.state_dict()
    for k, v in after.items():
        layer = k.rpartition(".")[0]
        if k.endswith(".weight") and layer in masks:
            mask = masks[layer]
            assert torch.equal(v[~mask], before[k][~mask]), k
            assert torch.equal(v[mask], torch.zeros(int(mask.sum()))), k
        else:
            assert torch.equal(v, before[k]), k
    assert res.test["acc"] is not None
    assert second["test_acc"] == res.test["acc"]


def test_zero_epochs_strips_whatever_every_says():
    train, val, _ = _splits()
    res = finetune(_model(), train, val, _cfg(epochs=0, every=3), device=CPU)
    assert res.history[0]["pruned_this_epoch"] == 3
    assert res.history[1]["pruned_weights"] == 3


def test_zero_epochs_baseline_prunes_nothing():
    train, val, _ = _splits()
    m = _model()
    before = copy.deepcopy(m.state_dict())
    res = finetune(m, train, val, _cfg(epochs=0, strip=False), device=CPU)
    assert [row["pruned_weights"] for row in res.history] == [0, 0]
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------------------------------------
# History


def test_history_rows_hold_the_documented_fields():
    train, val, test = _splits()
    res = finetune(_model(), train, val, _cfg(epochs=2), device=CPU, test=test)
    assert [row["epoch"] for row in res.history] == [1, 2]
    for row in res.history:
        assert HISTORY_FIELDS <= row.keys()
        assert isinstance(row["dead"], int) and isinstance(row["revived"], int)
        assert isinstance(row["pruned_weights"], int)
        assert 0 <= row["active_percent"] <= 100
        assert np.isfinite(row["train_loss"]) and np.isfinite(row["val_loss"])
        assert 0 <= row["val_acc"] <= 100
    assert res.history[0]["test_acc"] is None
    assert res.history[-1]["test_acc"] == res.test["acc"]
    # one weight per dead fc1 row per epoch; row 0 revives after the first
    assert [row["dead"] for row in res.history] == [3, 2]
    assert res.history[0]["revived"] == 0
    assert res.history[1]["revived_neurons"] == {"relu1": [0]}
    assert [row["pruned_weights"] for row in res.history] == [3, 5]
    assert json.loads(json.dumps(res.history)) == res.history  # plain JSON values only


def test_on_epoch_sees_every_row():
    train, val, _ = _splits()
    seen = []
    res = finetune(_model(), train, val, _cfg(epochs=3), device=CPU, on_epoch=seen.append)
    assert [row["epoch"] for row in seen] == [1, 2, 3]
    assert seen == res.history


# ---------------------------------------------------------------------------------------------
# Resume


def test_a_state_knows_the_torchrun_launch_that_saved_it(tmp_path, monkeypatch):
    """What a torchrun restart reads (tests/test_distributed.py restarts real processes): the launch token
    saved with each state, and whether a state at a path is a given launch's."""
    from deadscan import distributed
    from deadscan.checkpoint import load_torch_file
    from deadscan.errors import CheckpointError
    from deadscan.finetune import saved_by

    train, val, _ = _splits()
    for key in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    assert (distributed.launch_token(), distributed.restarts()) == (None, 0)
    finetune(_model(), train, val, _cfg(epochs=1), device=CPU, state_path=tmp_path / "plain.pt")
    assert load_state(tmp_path / "plain.pt")["launch"] is None  # outside torchrun
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    token = distributed.launch_token()
    assert token == f"{socket.gethostname()}:{os.getppid()}:job-7" and distributed.restarts() == 2
    finetune(_model(), train, val, _cfg(epochs=2), device=CPU, state_path=tmp_path / "ours.pt")
    assert load_state(tmp_path / "ours.pt")["launch"] == token
    assert saved_by(tmp_path / "ours.pt", token) == 2
    assert saved_by(tmp_path / "ours.pt", token.replace("job-7", "job-8")) is None  # another launch's
    assert saved_by(tmp_path / "plain.pt", token) is None
    assert saved_by(tmp_path / "missing.pt", token) is None
    assert saved_by(tmp_path / "ours.pt", None) is None  # not under torchrun: nothing is anyone's
    (tmp_path / "damaged.pt").write_bytes((tmp_path / "ours.pt").read_bytes()[:200])
    assert saved_by(tmp_path / "damaged.pt", token) is None  # the command line decides; resuming it says why
    torch.save([token, 2], tmp_path / "list.pt")
    torch.save({"launch": token, "epoch": True}, tmp_path / "odd.pt")
    assert saved_by(tmp_path / "list.pt", token) is None and saved_by(tmp_path / "odd.pt", token) is None
    shutil.copyfile(tmp_path / "ours.pt", tmp_path / "ours.safetensors")  # torch would read it as safetensors
    with pytest.raises(CheckpointError, match="cannot be mapped"):
        load_torch_file(tmp_path / "ours.safetensors", mmap=True)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "x")
    assert distributed.restarts() == 0


@pytest.mark.parametrize("dropout", [False, True], ids=["mlp", "mlp-dropout"])
def test_resume_after_a_stop_equals_one_run(tmp_path, dropout):
    """Stopped after epoch 2 (from the on_epoch callback) then resumed in a fresh model: the same
    masks, history and weights as 4 epochs in one go (cosine schedule with warm-up)."""
    train, val, test = _splits()
    cfg = _cfg(epochs=4)
    m_full = _model(dropout)
    full = finetune(m_full, train, val, cfg, device=CPU, test=test, state_path=tmp_path / "full.pt")
    assert load_state(tmp_path / "full.pt")["epoch"] == 4

    def stop_after_two(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    state = tmp_path / "part.pt"
    with pytest.raises(Interrupted, match="2 epoch"):
        finetune(_model(dropout), train, val, cfg, device=CPU, test=test, state_path=state, on_epoch=stop_after_two)
    saved = load_state(state)
    assert saved["epoch"] == 2 and len(saved["history"]) == 2
    m_resumed = _model(dropout)
    resumed = finetune(m_resumed, train, val, cfg, device=CPU, test=test, state_path=state, resume=True)
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3, 4]
    _assert_same_run(full, resumed, m_full, m_resumed)
    assert resumed.stripper.epoch == 4


def test_resume_extends_a_finished_run(tmp_path):
    """Constant learning rate: 2 epochs, then the same run continued to 4, equals 4 in one go."""
    train, val, test = _splits()
    cfg = _cfg(epochs=4, warmup=0, schedule="constant")
    m_full = _model()
    full = finetune(m_full, train, val, cfg, device=CPU, test=test)
    state = tmp_path / STATE_FILE
    first = finetune(_model(), train, val, _cfg(epochs=2, warmup=0, schedule="constant"), device=CPU, test=test,
                     state_path=state)
    assert len(first.history) == 2
    m_resumed = _model()
    resumed = finetune(m_resumed, train, val, cfg, device=CPU, test=test, state_path=state, resume=True)
    _assert_same_run(full, resumed, m_full, m_resumed)


def test_ctrl_c_inside_an_epoch_keeps_the_completed_epochs(tmp_path):
    """KeyboardInterrupt from inside a training forward of epoch 3 (3 batches per epoch)."""
    train, val, test = _splits()
    cfg = _cfg(epochs=4)
    m_full = _model()
    full = finetune(m_full, train, val, cfg, device=CPU, test=test)

    m = _model()
    calls = {"train": 0}

    def ctrl_c(module, args):
        if module.training:
            calls["train"] += 1
            if calls["train"] == 8:  # the second batch of epoch 3
                raise KeyboardInterrupt

    handle = m.head.register_forward_pre_hook(ctrl_c)
    state = tmp_path / STATE_FILE
    with pytest.raises(Interrupted) as e:
        finetune(m, train, val, cfg, device=CPU, test=test, state_path=state)
    handle.remove()
    assert "epoch 3" in str(e.value) and "2 epoch(s) saved" in str(e.value) and str(state) in str(e.value)
    saved = load_state(state)
    assert saved["epoch"] == 2
    assert _without_seconds(saved["history"]) == _without_seconds(full.history[:2])

    m_resumed = _model()
    resumed = finetune(m_resumed, train, val, cfg, device=CPU, test=test, state_path=state, resume=True)
    _assert_same_run(full, resumed, m_full, m_resumed)
    assert load_state(state)["epoch"] == 4


def test_resume_without_a_state_file_starts_over(tmp_path):
    train, val, _ = _splits()
    res = finetune(_model(), train, val, _cfg(epochs=1), device=CPU, state_path=tmp_path / "none.pt", resume=True)
    assert [row["epoch"] for row in res.history] == [1]


# ---------------------------------------------------------------------------------------------
# The exported stripped model


def _write_inputs(tmp_path):
    ckpt = tmp_path / "mlp.safetensors"
    deadscan.save_safetensors(_model(), ckpt, SPEC)
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, x=(rng.random((120, 8)) * 0.9 + 0.1).astype(np.float32), y=(np.arange(120) % 3).astype(np.int64))
    return ckpt, data


def test_strip_checkpoint_exports_the_trained_model(tmp_path, monkeypatch):
    ckpt, data = _write_inputs(tmp_path)
    captured = {}
    real = pipeline.finetune

    def capture(model, *args, **kwargs):
        captured["model"] = model
        return real(model, *args, **kwargs)

    monkeypatch.setattr(pipeline, "finetune", capture)
    out = tmp_path / "out"
    run = pipeline.strip_checkpoint(ckpt, str(data), cfg=TrainConfig(epochs=2, warmup=0, batch_size=16),
                                    output=OutputOptions(out), device="cpu")
    model = captured["model"].eval()
    stripped = out / "stripped.safetensors"
    assert run.files["stripped"] == stripped and stripped.exists()
    assert (out / "masks.safetensors").exists() and (out / STATE_FILE).exists()

    with safe_open(str(stripped), framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert not any("weight_orig" in k or "weight_mask" in k for k in keys)
    assert set(keys) == set(build(SPEC).state_dict())
    assert meta[ARCH_KEY] == SPEC

    loaded = deadscan.load(stripped)  # strict, arch from the metadata
    assert type(loaded) is type(model)
    x = torch.rand(30, 8)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))
    state = loaded.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k

    masks = load_file(str(out / "masks.safetensors"))
    assert "fc1" in masks
    assert sum(int(m.sum()) for m in masks.values()) == run.summary["history"][-1]["pruned_weights"] > 0
    for layer, mask in masks.items():
        w = state[f"{layer}.weight"]
        assert mask.dtype == torch.bool and mask.shape == w.shape
        assert torch.equal(w[mask], torch.zeros(int(mask.sum()))), layer

    summary = json.loads((out / "summary.json").read_text())
    assert [row["epoch"] for row in summary["history"]] == [1, 2]
    assert all(HISTORY_FIELDS <= row.keys() for row in summary["history"])
    assert summary["totals"]["pruned_weights"] == summary["history"][-1]["pruned_weights"]
    assert summary["config"]["epochs"] == 2
    assert summary["test"]["acc"] == summary["history"][-1]["test_acc"]


# ---------------------------------------------------------------------------------------------
# CLI



def test_cli_strip_finetune_one_epoch(tmp_path, runner):
    ckpt, data = _write_inputs(tmp_path)
    out = tmp_path / "out"
    r = runner.invoke(main, ["strip", str(ckpt), "--data", str(data), "--finetune", "1", "--warmup", "0",
                             "--batch-size", "16", "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "epoch   1" in r.stdout
    for name in ("stripped.safetensors", "masks.safetensors", "summary.json"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert [row["epoch"] for row in summary["history"]] == [1]
    assert summary["checkpoint"]["path"] == str(ckpt)


def test_cli_strip_reuses_the_last_inspect(tmp_path, runner):
    ckpt, data = _write_inputs(tmp_path)
    inspected = tmp_path / "inspected"
    r = runner.invoke(main, ["inspect", str(ckpt), "--data", str(data), "--device", "cpu", "--out", str(inspected)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out2"
    r = runner.invoke(main, ["strip", "--finetune", "0", "--from", str(inspected), "--device", "cpu",
                             "--out", str(out)])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoint"]["path"] == str(ckpt)
    assert summary["checkpoint"]["arch"] == SPEC
    assert summary["data"]["name"] == str(data)
    assert [row["epoch"] for row in summary["history"]] == [0, 1]
    assert summary["history"][0]["pruned_weights"] == 3
    assert (out / "stripped.safetensors").exists()


def test_cli_strip_keeps_the_split_seed_of_the_inspect_it_reuses(tmp_path, runner):
    """The validation split a strip detects on is the inspect's: its split seed carries over (the training seed
    is another option); a --split-seed given to strip wins."""
    ckpt, data = _write_inputs(tmp_path)
    inspected = tmp_path / "inspected"
    r = runner.invoke(main, ["inspect", str(ckpt), "--data", str(data), "--split-seed", "3", "--out", str(inspected)])
    assert r.exit_code == 0, r.output
    base = json.loads((inspected / "summary.json").read_text())["data"]
    r = runner.invoke(main, ["inspect", str(ckpt), "--data", str(data), "--out", str(tmp_path / "seed0")])
    other = json.loads((tmp_path / "seed0" / "summary.json").read_text())["data"]
    assert base["seed"] == 3 and other["seed"] == 0 and base["indices_sha256"] != other["indices_sha256"]
    for extra, seed, sha in [([], 3, base["indices_sha256"]), (["--split-seed", "0"], 0, other["indices_sha256"])]:
        out = tmp_path / f"strip{seed}"
        r = runner.invoke(main, ["strip", "--finetune", "0", "--from", str(inspected), "--train-seed", "7",
                                 "--out", str(out), *extra])
        assert r.exit_code == 0, r.output
        summary = json.loads((out / "summary.json").read_text())
        assert (summary["data"]["seed"], summary["data"]["indices_sha256"]) == (seed, sha)
        assert summary["config"]["train_seed"] == 7


@pytest.mark.parametrize("args, warning", [
    (["--finetune", "2", "--every", "3", "--warmup", "0"],
     "Warning: --every 3 is more than --finetune 2: no strip step will run"),
    (["--finetune", "2"],
     "Warning: --finetune 2 is not more than --warmup 5: the whole run is learning-rate warm-up (pass a smaller "
     "--warmup, e.g. --warmup 0)"),
])
def test_cli_strip_warns_about_settings_that_cannot_do_what_they_say(tmp_path, runner, args, warning):
    ckpt, data = _write_inputs(tmp_path)
    r = runner.invoke(main, ["strip", str(ckpt), "--data", str(data), "--batch-size", "16", *args,
                             "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines()[0] == warning
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["warnings"] == [warning.removeprefix("Warning: ")]  # and on the report's banner
    assert html.escape(warning.removeprefix("Warning: "), quote=False) in (tmp_path / "out" / "report.html").read_text()


def test_demo_then_strip_keeps_the_inspect_and_compares_with_it(tmp_path, runner, monkeypatch):
    """The README's flow in one folder: the strip goes to deadscan-out/strip/, the inspect it started from stays,
    and compare reads both; the checkpoint path is absolute, so a strip from another directory finds it."""
    ckpt, data = _write_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(main, ["inspect", ckpt.name, "--data", data.name])  # relative paths, default --out
    assert r.exit_code == 0, r.output
    base = (tmp_path / "deadscan-out" / "summary.json").read_text()
    assert json.loads(base)["checkpoint"]["path"] == str(ckpt)  # absolute
    r = runner.invoke(main, ["strip", "--finetune", "1", "--warmup", "0", "--batch-size", "16"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "deadscan-out" / "summary.json").read_text() == base  # the inspect is kept
    strip_dir = tmp_path / "deadscan-out" / "strip"
    s = json.loads((strip_dir / "summary.json").read_text())
    lines = r.stdout.splitlines()
    assert f"start (the input checkpoint): dead {s['start']['dead']} of {s['totals']['neurons']}  " \
           f"%A {s['start']['active_percent']:.2f}" in lines
    assert s["start"]["dead"] == json.loads(base)["totals"]["dead"]  # the same checkpoint, split and data
    assert any(ln.startswith(f"end (after the last strip step): dead {s['totals']['dead']} of ") for ln in lines)
    r = runner.invoke(main, ["compare", "deadscan-out", "deadscan-out/strip", "--out", "cmp"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "cmp" / "compare.html").exists()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = runner.invoke(main, ["strip", "--from", "../deadscan-out", "--finetune", "0", "--out", "again"])
    assert r.exit_code == 0, r.output
    assert json.loads((elsewhere / "again" / "summary.json").read_text())["checkpoint"]["path"] == str(ckpt)


def test_strip_from_a_run_whose_checkpoint_moved_says_where_the_path_came_from(tmp_path, runner):
    ckpt, data = _write_inputs(tmp_path)
    run = tmp_path / "run"
    r = runner.invoke(main, ["inspect", str(ckpt), "--data", str(data), "--out", str(run)])
    assert r.exit_code == 0, r.output
    ckpt.rename(tmp_path / "moved.safetensors")
    r = runner.invoke(main, ["strip", "--from", str(run), "--finetune", "0", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1
    assert r.stderr == (f"Error: {ckpt}: the checkpoint {run / 'summary.json'} records is not there; pass CKPT "
                        "(and --data) yourself\n")


def test_cli_strip_without_checkpoint_or_inspect_fails_in_one_line(tmp_path, runner):
    out = tmp_path / "out"
    r = runner.invoke(main, ["strip", "--from", str(tmp_path / "nothing-here"), "--out", str(out)])
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), r.stderr
    assert "inspect" in lines[0]
    assert "Traceback" not in r.output
    assert not out.exists()


def test_resume_from_a_state_that_does_not_fit_fails_cleanly(tmp_path):
    """A train-state.pt left by another model (or a damaged one) is a clear DeadscanError, not a
    torch traceback."""
    from deadscan.errors import DeadscanError

    train, val, _ = _splits()
    state = tmp_path / STATE_FILE
    finetune(_model(), train, val, _cfg(epochs=1), device=CPU, state_path=state)
    other = build("mlp(depth=2, width=12, in_features=8, classes=3)")
    with pytest.raises(DeadscanError, match="cannot resume"):
        finetune(other, train, val, _cfg(epochs=2), device=CPU, state_path=state, resume=True)
    state.write_bytes(b"not a torch file")
    with pytest.raises(DeadscanError, match="cannot resume"):
        finetune(_model(), train, val, _cfg(epochs=2), device=CPU, state_path=state, resume=True)


def test_resume_refuses_a_changed_configuration(tmp_path):
    train, val, test = _splits()
    state = tmp_path / STATE_FILE
    finetune(_model(), train, val, _cfg(epochs=2), device=CPU, state_path=state, source="abc")
    with pytest.raises(deadscan.DeadscanError, match=r"the saved run used rate=0\.1"):
        finetune(_model(), train, val, _cfg(epochs=2, rate=0.2), device=CPU, state_path=state, resume=True,
                 source="abc")
    with pytest.raises(deadscan.DeadscanError, match="saved from another checkpoint"):
        finetune(_model(), train, val, _cfg(epochs=2), device=CPU, state_path=state, resume=True, source="xyz")
    with pytest.raises(deadscan.DeadscanError, match="epochs=2"):  # cosine: the epoch count shapes the schedule
        finetune(_model(), train, val, _cfg(epochs=3), device=CPU, state_path=state, resume=True, source="abc")


def test_sigterm_stops_like_ctrl_c_and_keeps_completed_epochs(tmp_path):
    import os
    import signal

    train, val, test = _splits()
    state = tmp_path / STATE_FILE

    def stop_after_first(row):
        if row["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="1 epoch"):
        finetune(_model(), train, val, _cfg(epochs=3), device=CPU, state_path=state, on_epoch=stop_after_first)
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored
    assert load_state(state)["epoch"] == 1


def test_history_counts_dead_neurons_held_by_their_bias_alone():
    """Counted where the feeding layer reads a ReLU's outputs (fc2); fc1 reads the raw inputs, which could be
    negative (here they are not, but nothing says so), so its rows are not counted."""
    train, val, test = _splits()
    m = _model()
    with torch.no_grad():
        m.fc2.weight[1:3] = torch.linspace(0.1, 1.6, 16)  # no negative weight left: the bias ...
        m.fc2.bias[1:3] = -1000.0  # ... holds fc2 rows 1 and 2 down
        m.fc1.weight[4] = torch.linspace(0.1, 0.8, 8)  # the same on fc1: not counted
        m.fc1.bias[4] = -100.0
    res = finetune(m, train, val, _cfg(epochs=0), device=CPU, test=test)
    assert res.history[0]["dead_by_site"] == {"relu1": 4, "relu2": 2}
    assert res.history[0]["held_by_bias"] == 2


def test_masks_file_round_trip(tmp_path):
    from deadscan.checkpoint import load_masks, save_masks

    masks = {"fc1": torch.tensor([[True, False], [False, True]]), "blocks.0.fc": torch.zeros(3, 2, 2, dtype=torch.bool)}
    save_masks(masks, tmp_path / "masks.safetensors")
    back = load_masks(tmp_path / "masks.safetensors")
    assert back.keys() == masks.keys() and all(torch.equal(back[k], masks[k]) for k in masks)


class _SpareHead(nn.Module):
    """The test MLP with a second head its forward never uses."""

    def __init__(self):
        super().__init__()
        self.mlp, self.spare = _model(dropout=True), nn.Linear(16, 3)

    def forward(self, x):
        return self.mlp(x)


def test_ddp_looks_for_unused_parameters_only_in_a_model_that_has_them():
    """DDP's find_unused_parameters is decided by one forward: on for a spare head (DDP would stop in its
    reducer), off otherwise (a graph walk per step, and torch warns); training's random draws are untouched."""
    from deadscan.finetune import TASKS, _leaves_parameters_out

    train = Dataset("t", "train", *_arrays(40, 1))
    task, cpu = TASKS["classification"], torch.device("cpu")
    spare = _SpareHead().train()
    state = torch.get_rng_state()
    assert _leaves_parameters_out(spare, task, train, cpu)
    assert torch.equal(torch.get_rng_state(), state) and spare.training  # dropout drew nothing; mode kept
    assert not _leaves_parameters_out(_model(dropout=True), task, train, cpu)
    frozen = _SpareHead()
    frozen.spare.requires_grad_(False)  # no gradient wanted: nothing for DDP to wait for
    assert not _leaves_parameters_out(frozen, task, train, cpu)


CORRUPTED_SPEC = "mlp(depth=1, width=16, in_features=3072, classes=10)"


def write_corrupted_inputs(tmp_path) -> list[str]:
    """strip's arguments for a CIFAR-sized MLP trained on fake images and evaluated at the end on two
    severities of one corruption of a CIFAR-10-C folder (4 images each), with the training's normalisation."""
    from test_data import write_cifar_c

    write_cifar_c(tmp_path / "c")
    torch.manual_seed(0)
    model = build(CORRUPTED_SPEC)
    with torch.no_grad():  # fc1 rows 0-1 dead on any input in [-2, 2]: |w.x| <= 3072 * 0.001 * 2 < 100
        model.fc1.weight[:2] = -0.001
        model.fc1.bias[:2] = -100.0
    deadscan.save_safetensors(model, tmp_path / "cifar_mlp.safetensors", CORRUPTED_SPEC)
    return [str(tmp_path / "cifar_mlp.safetensors"), "--data", "fake:3x32x32:10:64", "--data-root", str(tmp_path / "c"),
            "--mean", "0.5", "--std", "0.25", "--test-corrupted", "cifar10-c", "--corruption", "fog",
            "--severity", "2,3", "--finetune", "1", "--warmup", "0", "--batch-size", "16"]


def test_test_corrupted_evaluates_the_stripped_model_on_the_chosen_blocks(tmp_path):
    """--test-corrupted: the exported model's NLL and accuracy on fog at severities 2 and 3 (rows 4-11 of the
    CIFAR-10-C arrays), normalised as the training data, computed here by hand."""
    from conftest import invoke_cli

    out = tmp_path / "out"
    res, errors = invoke_cli("strip", *write_corrupted_inputs(tmp_path), "--out", out)
    assert res.exit_code == 0 and not errors, res.output
    got = json.loads((out / "summary.json").read_text())["test_corrupted"]
    model = deadscan.load(out / "stripped.safetensors").eval()
    base = tmp_path / "c" / "CIFAR-10-C"
    images, labels = np.load(base / "fog.npy")[4:12], torch.from_numpy(np.load(base / "labels.npy")[4:12])
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        logits = model(x)
    assert got["samples"] == 8 and (got["corruption"], got["severity"]) == (["fog"], [2, 3])
    assert got["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)
    assert got["acc"] == pytest.approx(100.0 * float((logits.argmax(1) == labels).float().mean()))
    assert f"corrupted test (cifar10-c): acc {got['acc']:.2f}" in res.output
