"""Faults: a process killed mid-write leaves the old file or the new one; Ctrl-C / SIGTERM / kill -9
during fine-tuning lose at most one epoch and ``--resume`` continues; running out of memory in a scan
halves the batch without counting a sample twice; the same seed gives the same numbers.

Real processes and signals here (``python -m deadscan.cli``), not mocks: what the user's shell does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import deadscan
from deadscan.cli import main
from deadscan.data import Dataset
from deadscan.errors import DeadscanWarning, TraceError
from deadscan.finetune import STATE_FILE, load_state
from deadscan.outputs import LOCK_FILE
from deadscan.scan import scan
from deadscan.zoo import build

from conftest import MLP_SPEC, _hand_mlp

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}



def _python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def _wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 120) -> list[str]:
    """Read the child's stdout until a line starts with ``prefix``; the lines read so far."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith(prefix):
            return lines
    proc.kill()
    raise AssertionError(f"no line starting {prefix!r}: {lines} {proc.stderr.read()[-2000:]}")


def _no_stray_files(folder: Path, outputs: set[str]) -> None:
    """Only real outputs, plus (after a kill -9) temp files that cannot be mistaken for one."""
    for p in folder.iterdir():
        if p.name not in outputs and p.name != LOCK_FILE:  # a killed run's lock: the next run takes it over
            assert p.name.startswith(".") and p.name.endswith(".tmp"), p.name
            assert not any(p.name == o for o in outputs)


# ---------------------------------------------------------------------------------------------
# Atomic writes: SIGKILL at any moment leaves the old file or the complete new one

WRITER = """
import sys, time
from deadscan.outputs import atomic_path
target, chunks = sys.argv[1], int(sys.argv[2])
block = b"NEW-" * (1 << 18)  # 1 MiB
with atomic_path(target) as tmp:
    with open(tmp, "wb") as f:
        print("started", flush=True)
        for i in range(chunks):
            f.write(block)
            f.flush()
            time.sleep(0.01)
print("done", flush=True)
"""


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.15, 0.3, "after-done"])
def test_killed_writer_leaves_old_or_new_file(tmp_path, delay):
    target = tmp_path / "summary.json"
    old = b"OLD-" * 1000
    target.write_bytes(old)
    chunks = 40
    proc = _python(WRITER, str(target), str(chunks))
    _wait_for_line(proc, "started")
    if delay == "after-done":
        _wait_for_line(proc, "done")
    else:
        time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    data = target.read_bytes()
    new = b"NEW-" * (1 << 18) * chunks
    assert data == old or data == new, f"half-written: {len(data)} bytes"
    if delay == "after-done":
        assert data == new
    elif delay in (0.0, 0.05, 0.15):  # 40 chunks take >= 0.4 s: still writing
        assert data == old
    _no_stray_files(tmp_path, {"summary.json"})


SAVER = """
import sys, torch
from deadscan.checkpoint import save_safetensors
from deadscan.zoo import build
spec = "mlp(depth=2, width=512, in_features=512, classes=10)"
target = sys.argv[1]
models = []
for seed in (1, 2):
    torch.manual_seed(seed)
    models.append(build(spec))
print("ready", flush=True)
i = 0
while True:
    save_safetensors(models[i % 2], target, spec)
    i += 1
"""


def test_killed_safetensors_saver_leaves_a_loadable_file(tmp_path):
    """save_safetensors in a loop, alternating two models, killed at random moments: the target always
    loads and holds one of the two models whole."""
    target = tmp_path / "stripped.safetensors"
    spec = "mlp(depth=2, width=512, in_features=512, classes=10)"
    expected = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        expected.append(build(spec).state_dict())
    rng = np.random.default_rng(0)
    for _ in range(4):
        proc = _python(SAVER, str(target))
        _wait_for_line(proc, "ready")
        time.sleep(0.2 + rng.random() * 0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        if not target.exists():  # killed before the first rename
            continue
        got = deadscan.load_checkpoint(target).model.state_dict()
        assert any(all(torch.equal(got[k], e[k]) for k in e) for e in expected)
        _no_stray_files(tmp_path, {"stripped.safetensors"})


def test_failed_block_keeps_the_old_file_and_removes_its_temp(tmp_path):
    from deadscan.outputs import atomic_path

    target = tmp_path / "report.html"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


# ---------------------------------------------------------------------------------------------
# Fine-tuning: Ctrl-C, SIGTERM and kill -9, then --resume

SPEC = "mlp(depth=2, width=16, in_features=8, classes=3)"
EPOCHS = 12


@pytest.fixture
def strip_inputs(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "m.safetensors"
    deadscan.save_safetensors(build(SPEC), ckpt, SPEC)
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"  # 150 training steps an epoch: a few tenths of a second
    np.savez(data, x=rng.random((3000, 8)).astype(np.float32), y=(np.arange(3000) % 3).astype(np.int64))
    return ckpt, data


def _strip_cmd(ckpt: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "deadscan.cli", "strip", str(ckpt), "--data", str(data), "--finetune", str(EPOCHS),
            "--warmup", "1", "--batch-size", "16", "--device", "cpu", "--out", str(out), *extra]


# The CLI in a process that signals itself right after epoch 1's history row: the signal always arrives
# mid-run, however fast or loaded the machine (waiting for a printed line raced with the run's end).
SIGNAL_AFTER_EPOCH_1 = """
import os, sys
from deadscan import pipeline
from deadscan.cli import main

sig, train = int(sys.argv.pop(1)), pipeline.finetune  # the rest of argv is the command line, as typed


def finetune(*args, on_epoch=None, **kwargs):
    def signalling(row):
        on_epoch(row)
        if row["epoch"] == 1:
            os.kill(os.getpid(), sig)
    return train(*args, on_epoch=signalling, **kwargs)


pipeline.finetune = finetune
main(prog_name="deadscan")
"""


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _epochs_printed(lines: list[str]) -> list[int]:
    return [int(ln.split()[1]) for ln in lines if ln.startswith("epoch ")]


def _finish_with_resume(ckpt, data, out) -> subprocess.CompletedProcess:
    done = subprocess.run(_strip_cmd(ckpt, data, out, "--resume"), capture_output=True, text=True, env=ENV,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    history = json.loads((out / "summary.json").read_text())["history"]
    assert [row["epoch"] for row in history] == list(range(1, EPOCHS + 1))
    return done


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_the_completed_epochs_and_resume_finishes(tmp_path, strip_inputs, sig):
    ckpt, data = strip_inputs
    out = tmp_path / "out"
    cmd = _strip_cmd(ckpt, data, out)
    proc = _start([sys.executable, "-c", SIGNAL_AFTER_EPOCH_1, str(int(sig)), *cmd[3:]])
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stdout + stderr
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: interrupted during epoch 2; 1 epoch(s) saved"), stderr
    saved = load_state(out / STATE_FILE)["epoch"]
    assert saved == 1
    assert not (out / ".deadscan.lock").exists()  # released on the way out
    assert f"{saved} epoch(s) saved in {out / STATE_FILE}" in lines[0]
    resume, finalize = lines[0].split("resume with: ", 1)[1].split("; or write the completed epochs' outputs with: ")
    assert resume.startswith("deadscan strip ") and resume.endswith(" --resume")
    assert finalize == resume[:-len("--resume")] + "--finalize"
    assert not (out / "summary.json").exists() and not (out / "stripped.safetensors").exists()

    if sig == signal.SIGTERM:  # keep what is done: the outputs of the completed epoch, no more training
        kept = subprocess.run(_strip_cmd(ckpt, data, out, "--finalize"), capture_output=True, text=True, env=ENV,
                              timeout=600)
        assert kept.returncode == 0, kept.stdout[-2000:] + kept.stderr[-2000:]
        assert _epochs_printed(kept.stdout.splitlines()) == []  # nothing trained
        summary = json.loads((out / "summary.json").read_text())
        assert [row["epoch"] for row in summary["history"]] == [1]
        assert summary["finalized"] == {"epochs_done": 1, "epochs_planned": EPOCHS}
        assert (out / "stripped.safetensors").exists() and (out / STATE_FILE).exists()
        assert load_state(out / STATE_FILE)["epoch"] == 1  # still resumable
        return
    done = _finish_with_resume(ckpt, data, out)
    assert _epochs_printed(done.stdout.splitlines())[0] == saved + 1  # continued, not restarted


def test_resume_after_kill_9_restarts_from_the_last_completed_epoch(tmp_path, strip_inputs):
    ckpt, data = strip_inputs
    out = tmp_path / "out"
    proc = _start(_strip_cmd(ckpt, data, out))
    _wait_for_line(proc, "epoch   2")
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL
    saved = load_state(out / STATE_FILE)["epoch"]  # atomic: a whole state, never a torn one
    assert 2 <= saved < EPOCHS
    _no_stray_files(out, {STATE_FILE})

    done = _finish_with_resume(ckpt, data, out)
    assert _epochs_printed(done.stdout.splitlines()) == list(range(saved + 1, EPOCHS + 1))
    assert not (out / LOCK_FILE).exists()


# ---------------------------------------------------------------------------------------------
# Out of memory during a scan: halve the batch, start over, count each sample once


def _oom_above(model: torch.nn.Module, limit: int) -> list[int]:
    """Make the head raise torch.OutOfMemoryError (as CUDA would) on batches larger than ``limit``. The head
    runs after both ReLU sites have recorded the batch: a retry that kept those records would count twice."""
    seen = []

    def hook(_module, args):
        seen.append(args[0].shape[0])
        if args[0].shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (faked on CPU)")
    model.head.register_forward_pre_hook(hook)
    return seen


def _same_stats(a, b) -> None:
    assert a.samples == b.samples
    for ra, rb in zip(a.sites, b.sites, strict=True):
        assert ra.elements == rb.elements
        assert np.array_equal(ra.active, rb.active)
        assert np.array_equal(ra.out_sum, rb.out_sum)
        assert np.array_equal(ra.pre_max, rb.pre_max)
        assert np.array_equal(ra.mean_input, rb.mean_input) if ra.mean_input is not None else rb.mean_input is None


@pytest.mark.parametrize("source", ["tensor", "dataset", "list-of-batches"])
def test_out_of_memory_halves_the_batch_without_double_counting(source):
    x = torch.rand(100, 4, generator=torch.Generator().manual_seed(0))
    data = {"tensor": x, "dataset": Dataset("t", "val", x, torch.zeros(100, dtype=torch.long)),
            "list-of-batches": [x[:64], x[64:]]}[source]
    reference = scan(_hand_mlp(), x, batch_size=16, input_means=True)

    model = _hand_mlp()
    seen = _oom_above(model, 20)
    with pytest.warns(DeadscanWarning) as caught:
        result = scan(model, data, batch_size=64, input_means=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, DeadscanWarning)]
    assert messages == ["out of memory on cpu with a batch of 64; scanning again from the start with batches of 32",
                        "out of memory on cpu with a batch of 32; scanning again from the start with batches of 16"]
    assert result.batch_size == 16
    assert max(seen) == 64 and seen[-1] <= 16
    _same_stats(result, reference)  # the partly recorded batches of 64 and 32 left no trace


def test_out_of_memory_with_one_sample_or_a_generator_is_one_line():
    x = torch.rand(10, 4)
    model = _hand_mlp()
    _oom_above(model, 0)
    with pytest.raises(TraceError, match=r"^out of memory on cpu with a batch of 1 sample during the scan; use a "):
        with pytest.warns(DeadscanWarning):
            scan(model, x, batch_size=4)
    model = _hand_mlp()
    _oom_above(model, 2)
    with pytest.raises(TraceError, match=r"a batch of 5 during the scan; the data is a one-pass iterator"):
        scan(model, (x[i:i + 5] for i in range(0, 10, 5)))


def oom_mlp(limit: int) -> torch.nn.Module:
    """--arch test_faults:oom_mlp(limit=N): the paper MLP whose head fakes CUDA running out of memory."""
    m = build(MLP_SPEC)
    _oom_above(m, limit)
    return m


def test_cli_warns_and_reports_the_same_numbers(runner, tmp_path, hand_mlp, npz_data):
    p = tmp_path / "sd.pt"
    torch.save(hand_mlp.state_dict(), p)
    base = ["inspect", str(p), "--data", str(npz_data), "--split", "all", "--batch-size", "64"]
    res = runner.invoke(main, [*base, "--arch", "test_faults:oom_mlp(limit=20)", "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    warns = [ln for ln in res.stderr.splitlines() if ln.startswith("Warning:")]
    assert warns == ["Warning: out of memory on cpu with a batch of 64; scanning again from the start with batches "
                     "of 32", "Warning: out of memory on cpu with a batch of 32; scanning again from the start with "
                     "batches of 16"]
    ref = runner.invoke(main, [*base, "--arch", MLP_SPEC, "--out", str(tmp_path / "b")])
    assert ref.exit_code == 0 and "Warning" not in ref.stderr
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in "ab")
    assert a["totals"] == b["totals"] and a["totals"]["dead"] == 5
    assert a["sites"] == b["sites"]


# ---------------------------------------------------------------------------------------------
# Determinism: the same seed on CPU gives the same summary.json


VOLATILE = {"created", "elapsed_seconds", "command", "outputs"}


def _stable(summary: dict) -> dict:
    s = {k: v for k, v in summary.items() if k not in VOLATILE}
    for key in ("history",):
        if key in s:
            s[key] = [{k: v for k, v in row.items() if k != "seconds"} for row in s[key]]
    return s


def test_two_inspect_runs_give_identical_summaries(runner, tmp_path, npz_data):
    torch.manual_seed(3)
    p = tmp_path / "m.safetensors"
    deadscan.save_safetensors(build(MLP_SPEC), p, MLP_SPEC)
    outs = []
    for name in ("one", "two"):
        res = runner.invoke(main, ["inspect", str(p), "--data", str(npz_data), "--split", "all", "--out",
                                   str(tmp_path / name), "--device", "cpu"])
        assert res.exit_code == 0, res.output
        outs.append(json.loads((tmp_path / name / "summary.json").read_text()))
    assert _stable(outs[0]) == _stable(outs[1])


def test_two_strip_runs_give_identical_summaries(runner, tmp_path, strip_inputs):
    ckpt, data = strip_inputs
    outs = []
    for name in ("one", "two"):
        res = runner.invoke(main, ["strip", str(ckpt), "--data", str(data), "--finetune", "2", "--warmup", "1",
                                   "--batch-size", "64", "--device", "cpu", "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        outs.append(json.loads((tmp_path / name / "summary.json").read_text()))
    a, b = map(_stable, outs)
    assert [row["epoch"] for row in a["history"]] == [1, 2]
    assert a == b
    sa = deadscan.load_checkpoint(tmp_path / "one" / "stripped.safetensors").model.state_dict()
    sb = deadscan.load_checkpoint(tmp_path / "two" / "stripped.safetensors").model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
