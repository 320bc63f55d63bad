"""``torchrun ... -m deadscan inspect`` and ``strip`` (issue 14): N processes on CPU (gloo) give the one-process
result.

Each test launches torchrun as a subprocess, one thread per process. Summaries must match exactly (dead and
dormant sets, counts); per-neuron float sums and maxima within float tolerance (each process adds its own
batches in float32, and a forward's rounding depends on its batch size)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from deadscan.cli import main
from deadscan.defaults import DEFAULTS
from deadscan.resources import resource_path

MLP = resource_path("sample_models", "mlp_digits.safetensors")
VIT = resource_path("sample_models", "vit_digits.safetensors")
LM, LM_TEXT = resource_path("sample_models", "opt_pydoc"), resource_path("sample_models", "pydoc_val.txt")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# 101 samples: 50/51 in two processes, 33/34/34 in three (uneven shards)
DIGITS = ["--data", "digits", "--limit", "101", "--batch-size", "16"]
LM_ARGS = ["--data", str(LM_TEXT), "--split", "all", "--seq-len", "64", "--batch-size", "32"]


def _env(**extra) -> dict:
    # a short timeout: a regression that hangs a collective fails in seconds, not in torch's 30 minutes
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DEADSCAN_DIST_TIMEOUT": "120", **extra}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a test run under torchrun must not hand its own group to the children
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_process(model, out: Path, *args) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "deadscan", "inspect", str(model), *args, "--out", str(out)],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res


def _torchrun(nproc: int, target: list[str], logs: Path, *, nnodes: int = 1, node_rank: int = 0, port: int,
              env: dict | None = None, wait: bool = True, restarts: int = 0):
    cmd = [*TORCHRUN, "--nproc-per-node", str(nproc), "--nnodes", str(nnodes), "--node-rank", str(node_rank),
           "--master-addr", "127.0.0.1", "--master-port", str(port), "--log-dir", str(logs), "--redirects", "3",
           "--tee", "3", "--max-restarts", str(restarts), *target]
    proc = subprocess.Popen(cmd, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _rank_logs(logs: Path, rank: int, stream: str, attempt: int = 0) -> str:
    files = list(logs.glob(f"*/attempt_{attempt}/{rank}/{stream}.log"))
    assert len(files) == 1, list(logs.rglob("*"))
    return files[0].read_text()


def _assert_same_scan(one: Path, many: Path, processes: int) -> None:
    a, b = (json.loads((p / "summary.json").read_text()) for p in (one, many))
    assert (a["processes"], b["processes"]) == (1, processes)
    assert b["totals"] == a["totals"]
    assert b["sites"] == a["sites"]  # dead_indices, dormant, provably dead, capacity: exactly equal
    assert b["data"] == a["data"]  # samples (and real tokens) of the whole split
    with h5py.File(one / "stats.h5") as fa, h5py.File(many / "stats.h5") as fb:
        assert list(fa["sites"]) == list(fb["sites"])
        for name in fa["sites"]:
            sa, sb = fa["sites"][name], fb["sites"][name]
            for exact in ("active", "dead", "dormant", "provably_dead"):
                np.testing.assert_array_equal(sb[exact][()], sa[exact][()], err_msg=f"{name}/{exact}")
            # pre_max too: a forward's float rounding depends on its batch's size (BLAS blocking)
            for close in ("sum", "score", "mean_input", "pre_max"):
                np.testing.assert_allclose(sb[close][()], sa[close][()], rtol=1e-5, atol=1e-6,
                                           err_msg=f"{name}/{close}")


@pytest.fixture(scope="module")
def digits_reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("one")
    return {m.name: _one_process(m, folder / m.stem, *DIGITS) for m in (MLP, VIT)}, folder


@pytest.mark.slow  # torchrun subprocesses
@pytest.mark.parametrize("model, nproc", [(MLP, 2), (VIT, 3)], ids=["mlp-2", "vit-3"])
def test_inspect_in_n_processes_equals_one_process(digits_reference, tmp_path, model, nproc):
    reference, folder = digits_reference
    out, logs = tmp_path / "out", tmp_path / "logs"
    res = _torchrun(nproc, ["-m", "deadscan", "inspect", str(model), *DIGITS, "--out", str(out)], logs,
                    port=_free_port())
    assert res.returncode == 0, res.stderr
    _assert_same_scan(folder / model.stem, out, nproc)
    # process 0 prints the one-process table (only the out folder differs); the others say nothing
    expected = reference[model.name].stdout.replace(str(folder / model.stem), str(out)).replace(
        "101 samples on cpu\n", f"101 samples on cpu in {nproc} processes (torchrun)\n")
    assert _rank_logs(logs, 0, "stdout") == expected
    for rank in range(1, nproc):
        assert _rank_logs(logs, rank, "stdout") == ""
        assert "Error" not in _rank_logs(logs, rank, "stderr")
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "stats.h5", "summary.json"]


@pytest.mark.slow  # torchrun subprocesses
def test_two_machines_equal_one_process(digits_reference, tmp_path):
    """Two torchrun launches ("machines") on 127.0.0.1 joined through the same master address and port."""
    _, folder = digits_reference
    out, port = tmp_path / "out", _free_port()
    target = ["-m", "deadscan", "inspect", str(MLP), *DIGITS, "--out", str(out)]
    second = _torchrun(1, target, tmp_path / "logs1", nnodes=2, node_rank=1, port=port, wait=False)
    first = _torchrun(1, target, tmp_path / "logs0", nnodes=2, node_rank=0, port=port)
    out1, err1 = second.communicate(timeout=300)
    assert (first.returncode, second.returncode) == (0, 0), first.stderr + err1
    _assert_same_scan(folder / MLP.stem, out, 2)
    assert _rank_logs(tmp_path / "logs0", 0, "stdout").startswith(f"checkpoint {MLP} ")
    assert _rank_logs(tmp_path / "logs1", 0, "stdout") == ""  # global rank 1


@pytest.mark.slow  # torchrun subprocesses
@pytest.mark.parametrize("command", ["report", "compare"])
def test_report_and_compare_under_torchrun_write_once(digits_reference, tmp_path, command):
    """Nothing to share between processes: process 0 writes and prints, the others end at once, quietly."""
    _, folder = digits_reference
    run, out, logs = folder / MLP.stem, tmp_path / "out", tmp_path / "logs"
    runs = [str(run)] if command == "report" else [str(run), str(run)]
    res = _torchrun(2, ["-m", "deadscan", command, *runs, "--out", str(out)], logs, port=_free_port())
    assert res.returncode == 0, res.stderr
    written = out / f"{command}.html"
    assert _rank_logs(logs, 0, "stdout") == f"wrote {written}\n"
    assert _rank_logs(logs, 1, "stdout") == _rank_logs(logs, 1, "stderr") == ""
    assert [p.name for p in out.iterdir()] == [written.name]


@pytest.mark.slow  # torchrun subprocesses
def test_language_model_in_two_processes_equals_one_process(tmp_path):
    """Token data: padded positions (attention_mask 0) never count, in any process's shard."""
    pytest.importorskip("transformers")
    one, out = tmp_path / "one", tmp_path / "out"
    _one_process(LM, one, *LM_ARGS)
    res = _torchrun(2, ["-m", "deadscan", "inspect", str(LM), *LM_ARGS, "--out", str(out)], tmp_path / "logs",
                    port=_free_port())
    assert res.returncode == 0, res.stderr
    _assert_same_scan(one, out, 2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["tokens"] < summary["data"]["samples"] * 64  # the last block is padded


FAULTY = """
import importlib, os, signal
scan = importlib.import_module("deadscan.scan")  # the module: deadscan.scan is also the function
from deadscan.errors import DataError

run = scan._scan_pass
def faulty(*args, **kwargs):
    if os.environ["RANK"] == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") in ("0", None):
        if os.environ["FAULT"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ["FAULT"] == "hang":
            signal.pause()
        raise DataError("shard 1 is unreadable")
    return run(*args, **kwargs)
scan._scan_pass = faulty

from deadscan.cli import main
main(prog_name="deadscan")
"""


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("Error:")]


@pytest.mark.slow  # torchrun subprocesses
def test_an_error_in_another_process_is_process_0s_one_error_line(tmp_path):
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY)
    out, logs = tmp_path / "out", tmp_path / "logs"
    res = _torchrun(2, [str(script), "inspect", str(MLP), *DIGITS, "--out", str(out)], logs, port=_free_port(),
                    env=_env(FAULT="error"))
    assert res.returncode != 0
    assert _errors(_rank_logs(logs, 0, "stderr")) == ["Error: process 1 of 2: shard 1 is unreadable"]
    assert _rank_logs(logs, 1, "stderr") == _rank_logs(logs, 1, "stdout") == ""  # quiet, exit 1
    assert "exitcode  : 1" in res.stderr  # torchrun's summary: rank 1 exited 1
    assert not out.exists() or list(out.iterdir()) == []  # nothing written


@pytest.mark.slow  # torchrun subprocesses
def test_inspect_after_a_torchrun_restart_equals_one_process(digits_reference, tmp_path):
    """Process 1 is killed mid-scan in torchrun's first attempt; the restarted processes join a fresh group,
    take the --out folder over (its lock's holder is dead) and scan it all again."""
    _, folder = digits_reference
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY)
    out, logs = tmp_path / "out", tmp_path / "logs"
    res = _torchrun(2, [str(script), "inspect", str(MLP), *DIGITS, "--out", str(out)], logs, port=_free_port(),
                    env=_env(FAULT="kill"), restarts=1)
    assert res.returncode == 0, res.stderr
    assert not _rank_logs(logs, 0, "stdout")  # killed before process 0 printed anything
    _assert_same_scan(folder / MLP.stem, out, 2)
    assert _rank_logs(logs, 0, "stdout", attempt=1).startswith(f"checkpoint {MLP} ")
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "stats.h5", "summary.json"]


SLOW_WRITES = """
import os, time
from deadscan import pipeline
write = pipeline.write_outputs
def slow(*args, **kwargs):  # process 0 alone writes: a large export, on a slow disk
    time.sleep(float(os.environ["WRITE_SECONDS"]))
    return write(*args, **kwargs)
pipeline.write_outputs = slow
from deadscan.cli import main
main(prog_name="deadscan")
"""


@pytest.mark.slow  # torchrun subprocesses
def test_writes_longer_than_the_collective_timeout_are_waited_for(digits_reference, tmp_path):
    """The other processes wait for process 0's writes on a key of torchrun's store, which no
    DEADSCAN_DIST_TIMEOUT bounds (a barrier would time out after 3 s here and fail the run)."""
    _, folder = digits_reference
    script = tmp_path / "slow.py"
    script.write_text(SLOW_WRITES)
    out, logs = tmp_path / "out", tmp_path / "logs"
    res = _torchrun(2, [str(script), "inspect", str(MLP), *DIGITS, "--out", str(out)], logs, port=_free_port(),
                    env=_env(DEADSCAN_DIST_TIMEOUT="3", WRITE_SECONDS="8"))
    assert res.returncode == 0, res.stderr
    _assert_same_scan(folder / MLP.stem, out, 2)
    assert _errors(_rank_logs(logs, 0, "stderr")) == []
    assert _rank_logs(logs, 1, "stderr") == _rank_logs(logs, 1, "stdout") == ""


@pytest.mark.slow  # torchrun subprocesses
def test_a_usage_error_is_said_once(tmp_path):
    res = _torchrun(2, ["-m", "deadscan", "strip", str(MLP), "--data", "digits", "--limit", "3"], tmp_path / "logs",
                    port=_free_port())
    assert res.returncode != 0
    assert _errors(_rank_logs(tmp_path / "logs", 0, "stderr")) == ["Error: No such option '--limit'."]
    assert _rank_logs(tmp_path / "logs", 1, "stderr") == _rank_logs(tmp_path / "logs", 1, "stdout") == ""


@pytest.mark.slow  # torchrun subprocesses
@pytest.mark.parametrize("download", [[], ["--download"]], ids=["", "download"])
def test_an_existing_out_folder_is_refused_once_and_left_alone(tmp_path, download):
    """Only process 0 claims --out; the others learn that it refused and stop before scanning (with
    --download they wait for process 0 to load first)."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    res = _torchrun(2, ["-m", "deadscan", "inspect", str(MLP), *DIGITS, *download, "--out", str(out)], logs,
                    port=_free_port())
    assert res.returncode != 0
    errors = _errors(_rank_logs(logs, 0, "stderr"))
    assert len(errors) == 1 and errors[0].startswith(f"Error: --out {out}"), errors
    assert _rank_logs(logs, 1, "stderr") == _rank_logs(logs, 1, "stdout") == ""
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"] and (out / "summary.json").read_text() == "{}"


@pytest.mark.slow  # torchrun subprocesses
@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_dead_or_hung_process_makes_the_others_exit_within_the_timeout(tmp_path, fault):
    """Process 1 (the second "machine") is killed, or hangs, mid-scan; process 0 must not wait forever."""
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY)
    out, port = tmp_path / "out", _free_port()
    env = _env(FAULT=fault, DEADSCAN_DIST_TIMEOUT="8")
    target = [str(script), "inspect", str(MLP), *DIGITS, "--out", str(out)]
    second = _torchrun(1, target, tmp_path / "logs1", nnodes=2, node_rank=1, port=port, env=env, wait=False)
    try:
        start = time.monotonic()
        first = _torchrun(1, target, tmp_path / "logs0", nnodes=2, node_rank=0, port=port, env=env)
        elapsed = time.monotonic() - start
    finally:
        if fault == "hang":
            second.terminate()  # torchrun stops its hung worker
        second.communicate(timeout=120)
    assert first.returncode != 0 and second.returncode != 0
    assert elapsed < 8 + 40, elapsed  # the timeout, plus startup on a busy machine
    if fault == "hang":
        assert elapsed > 8, elapsed  # the timeout ended the wait (a killed peer's closed socket ends it sooner)
    errors = _errors(_rank_logs(tmp_path / "logs0", 0, "stderr"))
    assert len(errors) == 1 and errors[0].startswith(
        "Error: another process of the torchrun group failed or stopped answering within 8 s"), errors
    assert not (out / "summary.json").exists()


SCAN_SCRIPT = """
import os, sys, warnings
import numpy as np
from deadscan import distributed
from deadscan.scan import scan
from branchy import Branchy, branch_data  # beside this script

group = distributed.setup("cpu")
model = Branchy(oom_rank=os.environ.get("OOM_RANK"))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    r = scan(model, branch_data(), batch_size=4, input_means=True)
    batches = scan(model, list(branch_data().split(4)), input_means=True)  # an iterable: every world-th batch
for what, res in (("tensor", r), ("batches", batches)):
    np.savez(os.path.join(sys.argv[1], f"{what}{group.rank}.npz"), samples=res.samples, batch_size=res.batch_size,
             processes=res.processes, warnings=len(caught),
             **{f"{s.site.name}/{k}": getattr(s, k) for s in res.sites
                for k in ("out_sum", "active", "elements", "pre_max", "mean_input")})
"""

BRANCHY = """
import os
import torch
from torch import nn


class Branchy(nn.Module):
    \"\"\"Each batch takes one of two branches (a data-dependent `if`: fx traces a and b apart).\"\"\"

    def __init__(self, oom_rank=None):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        self.b = nn.Sequential(nn.Linear(4, 5), nn.ReLU())
        self.oom_rank = oom_rank

    def forward(self, x):
        if self.oom_rank is not None and os.environ.get("RANK") == self.oom_rank and len(x) > 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        if bool(x[0, 0] > 0):
            return self.a(x).sum(1)
        return self.b(x).sum(1)


def branch_data():
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
    x[:20, 0] = x[:20, 0].abs() + 0.1  # the first half (process 0's shard) takes branch a only
    x[20:, 0] = -x[20:, 0].abs() - 0.1  # the second half (process 1's) branch b only
    return x
"""


def _scan_in_processes(tmp_path, **env) -> list[dict]:
    (tmp_path / "branchy.py").write_text(BRANCHY)
    (tmp_path / "scan2.py").write_text(SCAN_SCRIPT)
    res = _torchrun(2, [str(tmp_path / "scan2.py"), str(tmp_path)], tmp_path / "logs", port=_free_port(),
                    env=_env(**env))
    assert res.returncode == 0, res.stderr
    return [dict(np.load(tmp_path / f"{what}{r}.npz")) for what in ("tensor", "batches") for r in range(2)]


@pytest.mark.slow  # torchrun subprocesses
@pytest.mark.parametrize("oom_rank", [None, "1"], ids=["branches", "oom-on-rank-1"])
def test_a_branch_one_process_never_reaches_and_out_of_memory_on_one(tmp_path, monkeypatch, oom_rank):
    """Process 0's shard reaches only site a.1, process 1's only b.1: both still join every collective
    and hold the one-process statistics, from a tensor (contiguous shards) or a list of batches (every
    other batch). With an out-of-memory error on process 1 only, both start over with half batches (they
    agree) and the result is unchanged."""
    env = {} if oom_rank is None else {"OOM_RANK": oom_rank}
    ranks = _scan_in_processes(tmp_path, **env)
    monkeypatch.syspath_prepend(str(tmp_path))
    from branchy import Branchy, branch_data

    from deadscan.scan import scan

    one = scan(Branchy(), branch_data(), batch_size=4, input_means=True)
    assert [r.site.name for r in one.sites] == ["a.1", "b.1"]
    assert [r.elements for r in one.sites] == [20, 20]
    for i, got in enumerate(ranks):  # tensor in process 0, 1; batches in process 0, 1
        assert (int(got["samples"]), int(got["processes"])) == (40, 2)
        assert int(got["batch_size"]) == (2 if oom_rank else 4 if i < 2 else DEFAULTS.batch_size)
        assert int(got["warnings"]) == (0 if oom_rank is None else 2)  # "out of memory ...; scanning again", each scan
        for r in one.sites:
            name = r.site.name
            assert int(got[f"{name}/elements"]) == r.elements
            np.testing.assert_array_equal(got[f"{name}/active"], r.active)
            np.testing.assert_allclose(got[f"{name}/out_sum"], r.out_sum, rtol=1e-6)
            np.testing.assert_allclose(got[f"{name}/pre_max"], r.pre_max, rtol=1e-6)
            np.testing.assert_allclose(got[f"{name}/mean_input"], r.mean_input, rtol=1e-6)


def test_strip_under_torchrun_refuses_a_batch_that_does_not_divide(monkeypatch, tmp_path):
    """What torchrun's environment looks like to each process: the check comes before the group starts."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    args = ["strip", str(MLP), "--data", "digits", "--finetune", "1", "--batch-size", "15", "--out",
            str(tmp_path / "out")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1
    assert res.stdout == ""
    assert res.stderr == BATCH_ERROR + "\n"
    monkeypatch.setenv("RANK", "1")  # the others: the same exit, quietly
    res = CliRunner().invoke(main, args)
    assert (res.exit_code, res.stdout, res.stderr) == (1, "", "")
    assert not (tmp_path / "out").exists()


BATCH_ERROR = ("Error: --batch-size 15 does not divide over 2 torchrun processes: pass a multiple of 2 (the global "
               "batch; each process trains on --batch-size / 2)")


def test_one_process_group_is_a_no_op():
    from deadscan.distributed import Group, launched

    g = Group()
    assert (g.rank, g.world, g.is_main, g.active, g.span(7), g.check(), g.check(oom=8)) == (0, 1, True, False,
                                                                                          (0, 7), None, 8)
    assert launched() == g  # this test process is not under torchrun (or its world is 1)


def test_a_collective_returns_once_gloos_worker_has_dropped_its_tensors(monkeypatch):
    """The guard against torch's exit race (see distributed._await_release): a tensor some other thread still
    holds (as gloo's worker holds a finished collective's) is waited for until released, and at most
    _RELEASE_WAIT seconds when it never is."""
    import threading

    import torch

    from deadscan import distributed

    t = torch.zeros(4)
    count = t._use_count()
    held = [t.view(2, 2)]  # one more reference, dropped later by another thread
    assert t._use_count() == count + 1
    threading.Timer(0.2, held.clear).start()
    distributed._await_release([t, torch.zeros(1)], [count, 1])
    assert t._use_count() == count and not held
    monkeypatch.setattr(distributed, "_RELEASE_WAIT", 0.05)
    kept = t.view(2, 2)  # never released: the wait gives up
    distributed._await_release([t], [count])
    assert t._use_count() == count + 1 and kept is not None


@pytest.mark.parametrize("raw, why", [("soon", "a number of seconds"),
                                      *((v, "a positive number of seconds, at most 31536000 (a year)")
                                        for v in ("0", "-5", "nan", "inf", "1e40"))])
def test_a_bad_dist_timeout_is_one_error_line_before_the_group_starts(monkeypatch, tmp_path, raw, why):
    from deadscan import distributed

    monkeypatch.setattr(distributed, "_current", None)
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "DEADSCAN_DIST_TIMEOUT": raw}.items():
        monkeypatch.setenv(key, value)
    res = CliRunner().invoke(main, ["inspect", str(MLP), "--data", "digits", "--limit", "8", "--device", "cpu",
                                    "--out", str(tmp_path / "out")])
    assert (res.exit_code, res.stdout) == (1, "")
    assert res.stderr == f"Error: DEADSCAN_DIST_TIMEOUT={raw!r}: expected {why}\n"
    assert not (tmp_path / "out").exists()
    assert distributed._current is None


def test_nccl_processes_each_take_their_local_rank_gpu(monkeypatch):
    """The CUDA side of setup() that runs without a GPU: the check before any NCCL call, and the device each
    process scans on and gathers into (NCCL itself needs several GPUs: benchmarks/device_check.sh's note)."""
    import torch

    from deadscan import distributed
    from deadscan.errors import TraceError

    monkeypatch.setattr(distributed, "_current", None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(TraceError) as e:
        distributed.setup(torch.device("cuda"))
    assert str(e.value) == ("torchrun process 1 has LOCAL_RANK 1 but this machine has 1 CUDA device(s): use "
                            "--nproc-per-node 1 or fewer, or --device cpu")
    assert distributed._current is None  # nothing was resolved: no half-made group

    monkeypatch.setattr(distributed, "_current", distributed.Group(3, 4, 1, "nccl"))
    for asked in ("cuda", "cuda:0", torch.device("cuda", 0)):  # "cuda" under torchrun: this process's own GPU
        assert distributed.scan_device(asked) == torch.device("cuda", 1)
    assert distributed.current().device == torch.device("cuda", 1)
    monkeypatch.setattr(distributed, "_current", distributed.Group(3, 4, 1, "gloo"))
    assert distributed.scan_device(torch.device("cpu")) == torch.device("cpu")
    assert distributed.current().device == torch.device("cpu")


def test_shards_are_disjoint_contiguous_and_cover_everything():
    from deadscan.distributed import Group

    for n in (0, 1, 2, 7, 101):
        for world in (1, 2, 3, 8):
            spans = [Group(r, world).span(n) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            sizes = [b - a for a, b in spans]
            assert max(sizes) - min(sizes) <= 1
    assert [Group(r, 3).span(101) for r in range(3)] == [(0, 33), (33, 67), (67, 101)]


# ---------------------------------------------------------------------------------------------
# strip under torchrun (issue 14): DistributedDataParallel gives the one-process run

STRIP_SCRIPT = """
import importlib, os, sys
import torch
from deadscan import pipeline
from deadscan.finetune import Classification
strip_module = importlib.import_module("deadscan.strip")  # the module: deadscan.strip is also the function

real_finetune, real_strip, real_step = pipeline.finetune, strip_module.strip, strip_module.Stripper.step
rank, fault = os.environ.get("RANK", "0"), os.environ.get("FAULT")

seen = {"samples": 0, "x_sum": 0.0}  # what this process trained on
real_loss = Classification.loss

def loss(self, model, batch):
    seen["samples"] += len(batch[1])
    seen["x_sum"] += float(batch[0].double().sum())
    return real_loss(self, model, batch)

def finetune(*args, **kwargs):  # every process's masks at the end, to compare them
    res = real_finetune(*args, **kwargs)
    torch.save({**res.stripper.masks.state_dict(), **{f"seen/{k}": torch.tensor(v) for k, v in seen.items()}},
               os.path.join(os.environ["MASKS_DIR"], f"masks{rank}.pt"))
    return res

def strip(model, scan, masks, **kwargs):
    stats = real_strip(model, scan, masks, **kwargs)
    if fault == "masks" and rank == "1":  # one more pruned weight in process 1 only
        next(iter(masks.masks.values())).view(-1)[-1] = True
    return stats

def step(self, data):
    if fault == "interrupt" and self.epoch == 1:  # Ctrl-C in every process, during epoch 2
        raise KeyboardInterrupt
    if fault == "die" and self.epoch == 1 and rank == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        os._exit(3)  # process 1 dies during epoch 2 of torchrun's first attempt
    return real_step(self, data)

pipeline.finetune, strip_module.strip, strip_module.Stripper.step = finetune, strip, step
Classification.loss = loss
from deadscan.cli import main
main(prog_name="deadscan")
"""
# 121 samples: 97 train (batches of 16: the last has 1 sample, so process 0's share of it is empty), 12 val
STRIP_ARGS = ["--finetune", "2", "--warmup", "0", "--batch-size", "16"]
EXACT = ("epoch", "dead", "revived", "died", "pruned_weights", "pruned_this_epoch", "active_percent",
         "active_percent_feeding_weights", "val_acc", "test_acc", "revived_neurons", "died_neurons", "held_by_bias",
         "dead_by_site")
LOSS_RTOL = 1e-5  # gradients averaged over 2 processes round differently; observed below 1e-6


def _strip_inputs(tmp_path) -> list[str]:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_finetune import _write_inputs

    ckpt, data = _write_inputs(tmp_path)  # the MLP with fc1 rows 0-2 dead by construction
    rng = np.random.default_rng(0)
    np.savez(data, x=(rng.random((121, 8)) * 0.9 + 0.1).astype(np.float32), y=(np.arange(121) % 3).astype(np.int64))
    (tmp_path / "strip_script.py").write_text(STRIP_SCRIPT)
    return [str(ckpt), "--data", str(data), *STRIP_ARGS]


def _strip_torchrun(tmp_path, inputs, out, name, *extra, restarts=0, **env):
    masks = tmp_path / f"masks-{name}"
    masks.mkdir(exist_ok=True)
    logs = tmp_path / f"logs-{name}"
    res = _torchrun(2, [str(tmp_path / "strip_script.py"), "strip", *inputs, "--out", str(out), *extra], logs,
                    port=_free_port(), env=_env(MASKS_DIR=str(masks), **env), restarts=restarts)
    return res, logs, masks


@pytest.fixture(scope="module")
def strip_runs(tmp_path_factory):
    """The one-process run and the uninterrupted two-process run of the same command."""
    tmp = tmp_path_factory.mktemp("strip")
    inputs = _strip_inputs(tmp)
    (tmp / "masks-one").mkdir()
    one = subprocess.run([sys.executable, str(tmp / "strip_script.py"), "strip", *inputs, "--out", str(tmp / "one")],
                         env=_env(MASKS_DIR=str(tmp / "masks-one")), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two, logs, masks = _strip_torchrun(tmp, inputs, tmp / "two", "two")
    assert two.returncode == 0, two.stderr
    return {"tmp": tmp, "inputs": inputs, "one": one, "logs": logs, "masks": masks}


def _load_masks(folder: Path, rank) -> dict:
    import torch

    return {k: v for k, v in torch.load(folder / f"masks{rank}.pt").items() if not k.startswith("seen/")}


def _seen(folder: Path, rank) -> tuple[int, float]:
    """(samples, sum of their inputs) a process trained on over the run."""
    import torch

    saved = torch.load(folder / f"masks{rank}.pt")
    return int(saved["seen/samples"]), float(saved["seen/x_sum"])


def _assert_masks_equal(a: dict, b: dict) -> None:
    import torch

    assert sorted(a) == sorted(b) and a, (sorted(a), sorted(b))
    for layer in a:
        assert torch.equal(a[layer], b[layer]), layer


def _history_close(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in EXACT} == {k: rb[k] for k in EXACT}
        for k in ("train_loss", "val_loss"):
            assert rb[k] == (None if ra[k] is None else pytest.approx(ra[k], rel=LOSS_RTOL)), k  # None: no training


@pytest.mark.slow  # torchrun subprocesses
def test_strip_in_two_processes_equals_one_process(strip_runs):
    tmp = strip_runs["tmp"]
    one, two = (json.loads((tmp / name / "summary.json").read_text()) for name in ("one", "two"))
    # every process ends with the same masks, the one-process run's
    one_masks = _load_masks(tmp / "masks-one", 0)
    assert sum(int(m.sum()) for m in one_masks.values()) == one["totals"]["pruned_weights"] > 0
    for rank in (0, 1):
        _assert_masks_equal(one_masks, _load_masks(strip_runs["masks"], rank))
    # each process trained on its own share of every global batch: 97 samples an epoch, 6 batches of 8 each
    # and the last batch's one sample in process 1 (process 0's share of it is empty)
    (n0, x0), (n1, x1), (n, x) = (_seen(strip_runs["masks"], 0), _seen(strip_runs["masks"], 1),
                                  _seen(tmp / "masks-one", 0))
    assert (n0, n1, n) == (2 * 48, 2 * 49, 2 * 97)
    assert x0 + x1 == pytest.approx(x, rel=1e-6) and x0 != pytest.approx(x1, rel=1e-3)  # float32 inputs
    _history_close(one["history"], two["history"])
    assert [row["dead"] for row in two["history"]] == [3, 2]  # fc1 rows 0-2; row 0 revived by the first step
    assert two["test"]["acc"] == one["test"]["acc"]
    assert two["test"]["loss"] == pytest.approx(one["test"]["loss"], rel=LOSS_RTOL)
    assert (two["processes"], one["processes"]) == (2, 1)
    assert two["totals"] == one["totals"] and two["start"] == one["start"]
    assert two["config"] == one["config"]  # the global batch of 16 recorded, as in one process
    # only process 0 writes and prints: the one-process output, but for the folder and the epoch times
    out = tmp / "two"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp / "one").iterdir())
    expected = strip_runs["one"].stdout.replace(str(tmp / "one"), str(out))
    got = _rank_logs(strip_runs["logs"], 0, "stdout")
    assert _without_losses(got) == _without_losses(expected)
    assert _rank_logs(strip_runs["logs"], 1, "stdout") == ""
    assert "Error" not in _rank_logs(strip_runs["logs"], 1, "stderr")


def _one_and_two_processes(tmp_path, inputs):
    """The same strip in one process and under torchrun with 2: both summaries, with every process's masks
    equal to the one-process run's; returns (one, two, the 2-process masks folder)."""
    (tmp_path / "strip_script.py").write_text(STRIP_SCRIPT)
    (tmp_path / "masks-one").mkdir()
    one = subprocess.run([sys.executable, str(tmp_path / "strip_script.py"), "strip", *inputs, "--out",
                          str(tmp_path / "one")], env=_env(MASKS_DIR=str(tmp_path / "masks-one")),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    res, _, masks = _strip_torchrun(tmp_path, inputs, tmp_path / "two", "two")
    assert res.returncode == 0, res.stderr
    a, b = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two"))
    for rank in (0, 1):
        _assert_masks_equal(_load_masks(tmp_path / "masks-one", 0), _load_masks(masks, rank))
    return a, b, masks


@pytest.mark.slow  # torchrun subprocesses
def test_strip_on_two_machines_equals_one_process(strip_runs, tmp_path):
    """Two torchrun launches ("machines", one process each) joined through one master address and port."""
    tmp, out, port, masks = strip_runs["tmp"], tmp_path / "out", _free_port(), tmp_path / "masks"
    masks.mkdir()
    target = [str(tmp / "strip_script.py"), "strip", *strip_runs["inputs"], "--out", str(out)]
    env = _env(MASKS_DIR=str(masks))
    second = _torchrun(1, target, tmp_path / "logs1", nnodes=2, node_rank=1, port=port, env=env, wait=False)
    first = _torchrun(1, target, tmp_path / "logs0", nnodes=2, node_rank=0, port=port, env=env)
    _, err1 = second.communicate(timeout=300)
    assert (first.returncode, second.returncode) == (0, 0), first.stderr + err1
    one, two = (json.loads((folder / "summary.json").read_text()) for folder in (tmp / "one", out))
    for rank in (0, 1):  # the global ranks
        _assert_masks_equal(_load_masks(tmp / "masks-one", 0), _load_masks(masks, rank))
    _history_close(one["history"], two["history"])
    assert two["totals"] == one["totals"] and (two["processes"], two["test"]["acc"]) == (2, one["test"]["acc"])
    assert _rank_logs(tmp_path / "logs1", 0, "stdout") == ""  # global rank 1 prints nothing


@pytest.mark.slow  # torchrun subprocesses
def test_gradient_accumulation_in_two_processes_equals_one_process(strip_runs, tmp_path):
    """--grad-accum 2 of --batch-size 8: two micro-batches of 4 per process per step (DDP synchronises only
    the second backward), the one-process run's steps."""
    inputs = [*strip_runs["inputs"][:-1], "8", "--grad-accum", "2"]
    a, b, masks = _one_and_two_processes(tmp_path, inputs)
    assert (_seen(masks, 0)[0], _seen(masks, 1)[0]) == (2 * 48, 2 * 49)
    _history_close(a["history"], b["history"])
    assert b["config"]["grad_accum"] == 2 and b["test"]["acc"] == a["test"]["acc"]


@pytest.mark.slow  # torchrun subprocesses
@pytest.mark.parametrize("extra", [["--baseline"], ["--finetune", "0"]], ids=["baseline", "finetune-0"])
def test_baseline_and_no_training_in_two_processes_equal_one_process(strip_runs, tmp_path, extra):
    a, b, _ = _one_and_two_processes(tmp_path, [*strip_runs["inputs"], *extra])
    if "--baseline" in extra:
        _history_close(a["history"], b["history"])
        _history_close(a["baseline"]["history"], b["baseline"]["history"])
        assert [row["pruned_weights"] for row in b["baseline"]["history"]] == [0, 0]
    else:  # no training: the strip step and the re-scan, nothing to round differently but the evaluation
        assert [row["dead"] for row in b["history"]] == [3, 2]
        _history_close(a["history"], b["history"])
    assert b["test"]["acc"] == a["test"]["acc"] and b["totals"] == a["totals"]


@pytest.mark.slow  # torchrun subprocesses
def test_language_model_strip_with_compact_in_two_processes_equals_one_process(tmp_path):
    """The sample OPT on text: DDP over token shares (padding never counts), the same masks in every process
    as in one; process 0 alone compacts and writes Hugging Face folders that transformers loads."""
    transformers = pytest.importorskip("transformers")
    import torch

    inputs = [str(LM), "--data", str(LM_TEXT), "--seq-len", "64", "--batch-size", "8", "--finetune", "2",
              "--warmup", "0", "--compact"]
    a, b, _ = _one_and_two_processes(tmp_path, inputs)
    assert a["data"]["kind"] == b["data"]["kind"] == "tokens" and b["data"] == a["data"]
    _history_close(a["history"], b["history"])
    assert b["history"][0]["dead"] > 0 and b["totals"]["pruned_weights"] > 0  # the sample has dead neurons
    assert b["totals"] == a["totals"] and b["start"] == a["start"]
    assert b["compact"]["removed"] == a["compact"]["removed"] and sum(b["compact"]["removed"].values()) > 0
    assert b["test"]["perplexity"] == pytest.approx(a["test"]["perplexity"], rel=LOSS_RTOL)
    one, two = (transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name / "stripped").eval()
                for name in ("one", "two"))
    for (name, wa), wb in zip(one.state_dict().items(), two.state_dict().values()):
        # a key bias adds the same score to every key: its true gradient is 0, and Adam turns the rounding
        # noise in its place into full-size steps that differ between the runs
        if not name.endswith("k_proj.bias"):
            torch.testing.assert_close(wb, wa, rtol=1e-3, atol=2e-5, msg=lambda m: f"{name}: {m}")  # rounding, after Adam
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


@pytest.mark.slow  # torchrun subprocesses
def test_test_corrupted_in_two_processes_equals_one_process(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_finetune import write_corrupted_inputs

    a, b, _ = _one_and_two_processes(tmp_path, write_corrupted_inputs(tmp_path))  # the same masks everywhere
    assert [row["dead"] for row in b["history"]] == [2] and b["totals"]["pruned_weights"] > 0
    assert b["test_corrupted"]["samples"] == 8 and b["test_corrupted"]["acc"] == a["test_corrupted"]["acc"]
    assert b["test_corrupted"]["loss"] == pytest.approx(a["test_corrupted"]["loss"], rel=LOSS_RTOL)
    assert {k: v for k, v in b["test_corrupted"].items() if k != "loss"} == {
        k: v for k, v in a["test_corrupted"].items() if k != "loss"}


@pytest.mark.slow  # torchrun subprocesses
def test_augmented_image_files_streamed_in_two_processes_equal_one_process(tmp_path, monkeypatch):
    """An image folder decoded batch by batch (DEADSCAN_HOST_BYTES=0) with crops, flips and AutoAugment: each
    process decodes and augments only its share of every batch, with the whole batch's draws, so the run is
    the one-process run (the same masks in every process; the samples each trained on add up to it)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import deadscan
    from deadscan.zoo import build
    from test_data import write_folder

    write_folder(tmp_path / "imgs", per=14, size=8)  # 42 images: 34 train, batches of 8 (the last one of 2)
    spec = "mlp(depth=2, width=16, in_features=192, classes=3)"
    import torch

    torch.manual_seed(0)
    deadscan.save_safetensors(build(spec), tmp_path / "mlp.safetensors", spec)
    inputs = [str(tmp_path / "mlp.safetensors"), "--data", f"imagefolder:{tmp_path / 'imgs'}", "--augment",
              "crop+flip+autoaugment-cifar10", "--finetune", "2", "--warmup", "0", "--batch-size", "8"]
    monkeypatch.setenv("DEADSCAN_HOST_BYTES", "0")  # in the environment _env() gives the subprocesses
    a, b, masks = _one_and_two_processes(tmp_path, inputs)
    (n0, x0), (n1, x1), (n, x) = _seen(masks, 0), _seen(masks, 1), _seen(tmp_path / "masks-one", 0)
    assert (n0, n1, n) == (2 * 17, 2 * 17, 2 * 34)
    assert x0 + x1 == pytest.approx(x, rel=1e-6)  # the same augmented images, split between the processes
    _history_close(a["history"], b["history"])
    assert b["totals"] == a["totals"] and b["test"]["acc"] == a["test"]["acc"] and b["data"] == a["data"]


SPARE_ARCH = """
from torch import nn
from deadscan.zoo import build

class SpareHead(nn.Module):  # the tests' MLP and a second head its forward never uses
    def __init__(self):
        super().__init__()
        self.mlp, self.spare = build("mlp(depth=2, width=16, in_features=8, classes=3)"), nn.Linear(16, 3)

    def forward(self, x):
        return self.mlp(x)

def spare():
    return SpareHead()
"""


@pytest.mark.slow  # torchrun subprocesses
def test_a_model_with_parameters_its_forward_never_uses_trains_in_two_processes(strip_runs, tmp_path, monkeypatch):
    """DDP would stop in its reducer at the second step (a parameter that never gets a gradient): deadscan
    sees the spare head before wrapping and lets DDP look for unused parameters; the one-process result."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).parent))
    from test_finetune import _model

    (tmp_path / "spare_arch.py").write_text(SPARE_ARCH)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    weights = {f"mlp.{k}": v for k, v in _model().state_dict().items()}
    weights.update({"spare.weight": torch.zeros(3, 16), "spare.bias": torch.zeros(3)})
    save_file(weights, tmp_path / "spare.safetensors")
    inputs = [str(tmp_path / "spare.safetensors"), "--arch", "spare_arch:spare", *strip_runs["inputs"][1:]]
    a, b, _ = _one_and_two_processes(tmp_path, inputs)
    _history_close(a["history"], b["history"])
    assert [row["dead"] for row in b["history"]] == [3, 2]  # mlp.fc1 rows 0-2, as in the plain MLP
    assert b["totals"] == a["totals"] and b["test"]["acc"] == a["test"]["acc"]


def _without_losses(text: str) -> str:
    """Printed epoch lines with the train loss cut (its last digit may differ in float rounding)."""
    import re

    return re.sub(r"train loss \S+", "train loss _", text)


@pytest.mark.slow  # torchrun subprocesses
def test_masks_that_differ_between_processes_stop_the_run(strip_runs):
    tmp = strip_runs["tmp"]
    res, logs, _ = _strip_torchrun(tmp, strip_runs["inputs"], tmp / "differ", "differ", FAULT="masks")
    assert res.returncode != 0
    assert _errors(_rank_logs(logs, 0, "stderr")) == [
        "Error: strip step 1: the pruning masks differ between processes (process 0 and process(es) 1); the model "
        "or the held-out data is not the same on every process"]
    assert _rank_logs(logs, 1, "stderr") == _rank_logs(logs, 1, "stdout") == ""
    assert not (tmp / "differ" / "summary.json").exists()


@pytest.mark.slow  # torchrun subprocesses
def test_a_batch_that_does_not_divide_is_one_error_line(strip_runs, tmp_path):
    inputs = [*strip_runs["inputs"][:-1], "15"]  # --batch-size 15 over 2 processes
    (tmp_path / "strip_script.py").write_text(STRIP_SCRIPT)
    res, logs, _ = _strip_torchrun(tmp_path, inputs, tmp_path / "out", "odd")
    assert res.returncode != 0
    assert _errors(_rank_logs(logs, 0, "stderr")) == [BATCH_ERROR]
    assert _rank_logs(logs, 1, "stderr") == _rank_logs(logs, 1, "stdout") == ""
    assert not (tmp_path / "out").exists()


LOAD_TIMES = """
import json, os, sys, time
from deadscan import pipeline

real = pipeline.load_data
def timed(*args, **kwargs):  # when each process's data loads start and end
    t0 = time.time()
    if os.environ["RANK"] == "0":
        time.sleep(0.5)  # a download takes a while
    res = real(*args, **kwargs)
    with open(os.path.join(os.environ["TIMES_DIR"], f"rank{os.environ['RANK']}.jsonl"), "a") as f:
        f.write(json.dumps([t0, time.time()]) + "\\n")
    return res
pipeline.load_data = timed
from deadscan.cli import main
main(prog_name="deadscan")
"""


@pytest.mark.slow  # torchrun subprocesses
@pytest.mark.parametrize("command", ["inspect", "strip"])
def test_download_under_torchrun_loads_in_process_0_first(strip_runs, tmp_path, command):
    """--download: process 0 loads (fetching the files) before any other process starts to read them."""
    (tmp_path / "times.py").write_text(LOAD_TIMES)
    inputs = strip_runs["inputs"] if command == "strip" else strip_runs["inputs"][:3]
    res = _torchrun(2, [str(tmp_path / "times.py"), command, *inputs, "--download", "--out", str(tmp_path / "out")],
                    tmp_path / "logs", port=_free_port(), env=_env(TIMES_DIR=str(tmp_path)))
    assert res.returncode == 0, res.stderr
    first, second = ([json.loads(line) for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()]
                     for r in (0, 1))
    assert len(first) == len(second) == (3 if command == "strip" else 1)  # train, val and test; or the split
    assert max(end for _, end in first) <= min(start for start, _ in second)
    assert (tmp_path / "out" / "summary.json").is_file()


def _assert_ends_as_the_uninterrupted_run(strip_runs, out: Path, masks: Path) -> None:
    """The history (but its timings), test figures and every process's masks of the uninterrupted two-process run."""
    two, done = (json.loads((folder / "summary.json").read_text()) for folder in (strip_runs["tmp"] / "two", out))
    untimed = [{k: v for k, v in row.items() if k != "seconds"} for row in two["history"]]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in done["history"]] == untimed
    assert done["test"] == two["test"]
    for rank in (0, 1):
        _assert_masks_equal(_load_masks(strip_runs["masks"], 0), _load_masks(masks, rank))


@pytest.mark.slow  # torchrun subprocesses
def test_resume_after_an_interrupted_two_process_run_continues(strip_runs):
    """Ctrl-C during epoch 2: process 0 says so in one line and epoch 1 is saved; --resume in two processes
    then ends exactly as the uninterrupted two-process run."""
    tmp = strip_runs["tmp"]
    out = tmp / "resumed"
    res, logs, _ = _strip_torchrun(tmp, strip_runs["inputs"], out, "interrupted", FAULT="interrupt")
    assert res.returncode != 0
    errors = _errors(_rank_logs(logs, 0, "stderr"))
    assert len(errors) == 1 and errors[0].startswith(
        f"Error: interrupted during epoch 2; 1 epoch(s) saved in {out / 'train-state.pt'}; resume with: torchrun "
        f"<the same torchrun options> -m deadscan strip {strip_runs['inputs'][0]} "), errors
    assert errors[0].endswith(" --resume; or write the completed epochs' outputs with: torchrun <the same torchrun "
                              f"options> -m deadscan strip {' '.join(strip_runs['inputs'])} --out {out} --finalize")
    assert _rank_logs(logs, 1, "stderr") == _rank_logs(logs, 1, "stdout") == ""
    import torch

    assert torch.load(out / "train-state.pt", weights_only=True)["epoch"] == 1
    res, logs, masks = _strip_torchrun(tmp, strip_runs["inputs"], out, "resume", "--resume")
    assert res.returncode == 0, res.stderr
    _assert_ends_as_the_uninterrupted_run(strip_runs, out, masks)
    assert _rank_logs(logs, 0, "stdout").startswith("dead: detected after the epoch's training, before its strip step\n"
                                                   "epoch   2  ")  # only the remaining epoch trained


@pytest.mark.slow  # torchrun subprocesses
def test_a_torchrun_restart_continues_from_the_epoch_its_launch_saved(strip_runs):
    """torchrun --max-restarts 1: process 1 dies during epoch 2; torchrun restarts both processes, which join a
    new group and continue from epoch 1 (saved by this launch) without --resume: the uninterrupted run's end."""
    tmp = strip_runs["tmp"]
    out = tmp / "restarted"
    res, logs, masks = _strip_torchrun(tmp, strip_runs["inputs"], out, "restarted", restarts=1, FAULT="die")
    assert res.returncode == 0, res.stderr
    assert "exitcode  : 3" not in res.stderr  # torchrun's failure summary is for a launch that failed
    assert _rank_logs(logs, 0, "stdout").startswith("dead: detected after the epoch's training, before its strip "
                                                   "step\nepoch   1  ")  # attempt 0 completed epoch 1
    assert _errors(_rank_logs(logs, 0, "stderr", attempt=1)) == []
    notes = [line for line in _rank_logs(logs, 0, "stderr", attempt=1).splitlines() if line.startswith("Note:")]
    assert notes == [f"Note: torchrun restarted the processes (restart 1): continuing from epoch 1, saved in "
                     f"{out / 'train-state.pt'} by this launch"]
    assert _rank_logs(logs, 0, "stdout", attempt=1).startswith(
        "dead: detected after the epoch's training, before its strip step\nepoch   2  ")  # only the epoch left
    assert _rank_logs(logs, 1, "stderr", attempt=1) == _rank_logs(logs, 1, "stdout", attempt=1) == ""
    _assert_ends_as_the_uninterrupted_run(strip_runs, out, masks)


@pytest.mark.slow  # torchrun subprocesses
def test_a_torchrun_restart_leaves_another_launchs_state_to_the_command_line(strip_runs):
    """A train-state.pt an earlier torchrun launch saved is not this launch's: without --resume the restarted
    processes refuse it as the first attempt did, and it is left as it was."""
    tmp = strip_runs["tmp"]
    out = tmp / "foreign"
    out.mkdir()
    shutil.copyfile(tmp / "two" / "train-state.pt", out / "train-state.pt")
    before = (out / "train-state.pt").read_bytes()
    res, logs, _ = _strip_torchrun(tmp, strip_runs["inputs"], out, "foreign", restarts=1)
    assert res.returncode != 0
    refused = (f"Error: --out {out} holds train-state.pt from an earlier strip run; pass --resume to continue it, "
               "--overwrite to start over, or choose another --out")
    for attempt in (0, 1):
        assert _errors(_rank_logs(logs, 0, "stderr", attempt)) == [refused]
        assert "Note:" not in _rank_logs(logs, 0, "stderr", attempt)
    assert sorted(p.name for p in out.iterdir()) == ["train-state.pt"] and (out / "train-state.pt").read_bytes() == before


@pytest.mark.slow  # torchrun subprocesses
def test_finalize_in_two_processes_writes_the_completed_epochs(strip_runs):
    """The README's other way out of an interrupted run: --finalize under torchrun trains no further and
    writes the outputs of the epoch the interrupted run completed (the uninterrupted run's first epoch)."""
    tmp = strip_runs["tmp"]
    out = tmp / "finalized"
    res, _, _ = _strip_torchrun(tmp, strip_runs["inputs"], out, "to-finalize", FAULT="interrupt")
    assert res.returncode != 0 and not (out / "summary.json").exists()
    res, logs, _ = _strip_torchrun(tmp, strip_runs["inputs"], out, "finalize", "--finalize")
    assert res.returncode == 0, res.stderr
    two, done = (json.loads((tmp / name / "summary.json").read_text()) for name in ("two", "finalized"))
    assert done["finalized"] == {"epochs_done": 1, "epochs_planned": 2} and done["processes"] == 2
    drop = ("seconds", "test_acc")  # the test figure goes on a run's last row
    assert [{k: v for k, v in row.items() if k not in drop} for row in done["history"]] == [
        {k: v for k, v in two["history"][0].items() if k not in drop}]
    assert done["history"][0]["test_acc"] == done["test"]["acc"]
    assert _rank_logs(logs, 1, "stderr") == _rank_logs(logs, 1, "stdout") == ""


DDP_EXAMPLE = Path(__file__).with_name("ddp_stripper.py")


@pytest.mark.slow  # torchrun subprocesses
def test_the_readme_stripper_example_in_two_processes_equals_one(tmp_path):
    """deadscan.Stripper inside a user's own DDP loop: the README's example, as written, under torchrun with 1
    and 2 processes (the same global batches): the same dead and revived counts every epoch."""
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    assert "```python\n" + DDP_EXAMPLE.read_text() + "```" in readme
    (tmp_path / "sample_models").symlink_to(Path(MLP).parent)
    printed = {}
    for nproc in (1, 2):
        logs = tmp_path / f"logs{nproc}"
        cmd = [*TORCHRUN, "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port",
               str(_free_port()), "--log-dir", str(logs), "--redirects", "3", str(DDP_EXAMPLE)]
        res = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, [_rank_logs(logs, r, "stderr") for r in range(nproc)]
        printed[nproc] = _rank_logs(logs, 0, "stdout").splitlines()
        if nproc == 2:
            assert _rank_logs(logs, 1, "stdout") == ""
    one, two = ([line.split() for line in printed[n]] for n in (1, 2))
    assert [int(e[0]) for e in two] == [0, 1, 2]
    assert int(two[0][1]) <= 186 and int(two[-1][1]) < int(two[0][1])  # stripping revived some
    assert [e[:4] for e in two] == [e[:4] for e in one]  # dead, revived, %A
    assert [e[4] for e in two] == ["2"] * 3 and [e[4] for e in one] == ["1"] * 3  # scans reduced over 2


@pytest.mark.slow  # torchrun subprocesses
def test_sigterm_to_torchrun_leaves_a_resumable_state(tmp_path):
    """A real SIGTERM to torchrun (which passes it to its processes) mid-run: process 0's one Error line, the
    others quiet, the completed epochs in train-state.pt; the same command with --resume finishes the run."""
    import signal

    import torch

    out, logs = tmp_path / "out", tmp_path / "logs"
    target = ["-m", "deadscan", "strip", str(MLP), "--data", "digits", "--finetune", "12", "--warmup", "0",
              "--batch-size", "64", "--out", str(out)]
    proc = _torchrun(2, target, logs, port=_free_port(), wait=False)
    deadline = time.monotonic() + 120
    while not (out / "train-state.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    saved = torch.load(out / "train-state.pt", weights_only=True)["epoch"]
    assert 1 <= saved < 12
    errors = _errors(_rank_logs(logs, 0, "stderr"))
    assert len(errors) == 1 and errors[0].startswith(
        f"Error: interrupted during epoch {saved + 1}; {saved} epoch(s) saved in {out / 'train-state.pt'}; "), errors
    assert _rank_logs(logs, 1, "stderr") == _rank_logs(logs, 1, "stdout") == ""
    res = _torchrun(2, [*target, "--resume"], tmp_path / "logs-resume", port=_free_port())
    assert res.returncode == 0, res.stderr
    history = json.loads((out / "summary.json").read_text())["history"]
    assert [row["epoch"] for row in history] == list(range(1, 13))
    assert _rank_logs(tmp_path / "logs-resume", 0, "stdout").splitlines()[1].startswith(f"epoch {saved + 1:>3}  ")


GROUP_SCRIPT = """
import json, os, sys
import torch, torch.distributed as dist
from deadscan import Stripper, distributed
from deadscan.errors import TraceError
from deadscan.scan import scan
sys.path.insert(0, sys.argv[2])
from test_finetune import _model

dist.init_process_group("gloo")
rank = dist.get_rank()
pg = dist.new_group([0, 1])  # a group of the user's own, not the default
x = torch.rand(24, 8, generator=torch.Generator().manual_seed(2)) * 0.9 + 0.1
model = _model()
report = Stripper(model, group=pg).step(x)
alone = scan(_model(), x[:12] if rank == 0 else x[12:], group=distributed.Group())  # no reduction: own share
other = _model()
if rank == 1:
    with torch.no_grad():
        other.fc1.weight[0, 5] = -60.0  # row 0, dead in both, has another most negative weight in process 1
try:
    Stripper(other, group=pg).step(x)
    error = None
except TraceError as e:
    error = str(e)
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump({"processes": report.scan.processes, "dead": report.dead, "pruned": report.pruned_weights,
               "alone_processes": alone.processes, "alone_dead": alone.dead, "error": error}, f)
dist.barrier()  # every process done before any tears its connections down
dist.destroy_process_group()
"""


@pytest.mark.slow  # torchrun subprocesses
def test_stripper_reduces_over_a_process_group_it_is_given(tmp_path):
    """Stripper(group=a ProcessGroup): each process scans its half of the held-out inputs, the statistics are
    reduced over that group; a model that differs between the processes gives masks that differ: both raise."""
    (tmp_path / "group.py").write_text(GROUP_SCRIPT)
    res = _torchrun(2, [str(tmp_path / "group.py"), str(tmp_path), str(Path(__file__).parent)], tmp_path / "logs",
                    port=_free_port())
    assert res.returncode == 0, res.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    message = ("strip step 1: the pruning masks differ between processes (process 0 and process(es) 1); the "
               "model or the held-out data is not the same on every process")
    for got in ranks:
        # fc1 rows 0-2 dead by construction: one strip step prunes 1 weight of row 0 and 1 of rows 1, 2 each
        assert {k: got[k] for k in ("processes", "dead", "pruned", "alone_processes", "error")} == {
            "processes": 2, "dead": 3, "pruned": 3, "alone_processes": 1, "error": message}
        assert got["alone_dead"] == 3  # its own half alone, unreduced
