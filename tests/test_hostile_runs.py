"""Hostile run folders: a summary.json, stats.h5 or train-state.pt someone else wrote.

A run folder is data (people zip and share them): nothing in it may name code deadscan imports,
hang it, crash it or make it allocate what the file merely declares. Each case runs the command a
user would type, in its own process with a memory limit and a timeout (tests/hostile.py); the
mutation tests call the readers directly.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deadscan.errors import DataError
from deadscan.runfolder import parse_summary, read_summary
from deadscan.stats_h5 import read_stats

from conftest import MLP_SPEC, _hand_mlp
from hostile import assert_refused, files_under, run_deadscan


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An inspect run folder of the hand-built MLP saved as a plain state dict (arch from --arch), and
    its inputs: the folder every hostile variant below is made from."""
    root = tmp_path_factory.mktemp("base")
    rng = np.random.default_rng(0)
    np.savez(root / "data.npz", x=rng.random((60, 4)).astype(np.float32), y=(np.arange(60) % 3).astype(np.int64))
    torch.save(_hand_mlp().state_dict(), root / "m.pt")
    run = run_deadscan(["inspect", str(root / "m.pt"), "--arch", MLP_SPEC, "--data", str(root / "data.npz"),
                        "--out", str(root / "run")], root)
    assert run.returncode == 0, run.stderr
    return root


def _variant(base, tmp_path, edit=None):
    """A copy of the base run folder (and its inputs) whose summary.json ``edit(summary)`` changed."""
    for name in ("data.npz", "m.pt"):
        shutil.copy(base / name, tmp_path / name)
    shutil.copytree(base / "run", tmp_path / "run")
    path = tmp_path / "run" / "summary.json"
    s = json.loads(path.read_text())
    s["checkpoint"]["path"] = str(tmp_path / "m.pt")
    s["data"]["name"] = str(tmp_path / "data.npz")
    if edit is not None:
        s = edit(s) or s
    path.write_text(json.dumps(s))
    return tmp_path / "run"


def _arch(spec):
    def edit(s):
        s["checkpoint"]["arch"] = spec
    return edit


# ---------------------------------------------------------------------------------------------
# No code named by a run folder runs


@pytest.mark.parametrize("spec", [
    "subprocess:run(args=['touch', 'PWNED'])",
    "os:system(command='touch PWNED')",
    "evilmod:build()",  # a module on PYTHONPATH
    "builtins:exec(source=\"open('PWNED', 'w').close()\")",
])
def test_strip_from_a_folder_never_imports_the_spec_it_names(base, tmp_path, spec):
    run_dir = _variant(base, tmp_path, _arch(spec))
    (tmp_path / "evilmod.py").write_text("open('PWNED', 'w').close()\ndef build():\n    open('PWNED', 'w').close()\n")
    run = run_deadscan(["strip", "--from", str(run_dir), "--finetune", "0", "--out", str(tmp_path / "o")], tmp_path,
                       env={"PYTHONPATH": str(tmp_path)})
    line = assert_refused(run)
    assert not (tmp_path / "PWNED").exists()
    assert line.startswith(f"Error: {run_dir / 'summary.json'} names architecture ")
    assert "pass --arch" in line and "yourself if you trust it" in line
    assert not (tmp_path / "o").exists()


def test_plain_strip_in_the_default_folder_never_imports_the_spec(base, tmp_path):
    """``deadscan strip --finetune N`` reads ./deadscan-out/: the same rule."""
    run_dir = _variant(base, tmp_path, _arch("subprocess:run(args=['touch', 'PWNED'])"))
    run_dir.rename(tmp_path / "deadscan-out")
    before = files_under(tmp_path)
    line = assert_refused(run_deadscan(["strip", "--finetune", "1"], tmp_path))
    assert "would import code named by a file" in line
    assert not (tmp_path / "PWNED").exists()
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("spec, words", [
    ("torchvision:no_such_net", "not a torchvision model"),
    ("torchvision:resnet18(weights='x.pth')", "argument weights= would make the builder read a file or download; "
                                              "deadscan loads weights only from your checkpoint"),
    ("mlp(depth=2, width=10**9)", None),  # not a literal
    ("mlp(depth=2, width=1000000000, in_features=4, classes=3)", "far more"),  # a memory bomb by spec
])
def test_a_spec_from_a_folder_builds_nothing_the_checkpoint_cannot_hold(base, tmp_path, spec, words):
    run_dir = _variant(base, tmp_path, _arch(spec))
    run = run_deadscan(["strip", "--from", str(run_dir), "--finetune", "0", "--out", str(tmp_path / "o")], tmp_path)
    line = assert_refused(run)
    assert str(run_dir / "summary.json") in line or "m.pt" in line
    if words:
        assert words in line or "holds more than" in line


def test_a_builtin_spec_from_a_folder_is_reused_and_the_chain_works(base, tmp_path):
    """The documented flow still works: inspect a plain state dict with --arch, then strip --from reuses the
    spec (a built-in names no code), then report and compare on both folders."""
    run_dir = _variant(base, tmp_path)
    run = run_deadscan(["strip", "--from", str(run_dir), "--finetune", "0", "--out", str(tmp_path / "s")], tmp_path)
    assert run.returncode == 0, run.stderr
    s = read_summary(tmp_path / "s")
    assert s["checkpoint"]["arch"] == MLP_SPEC
    assert s["totals"]["dead"] == 5  # the hand-built MLP: fc1 rows 0-1 and fc2 rows 0-2 stay dead (0 epochs)
    run = run_deadscan(["compare", str(run_dir), str(tmp_path / "s"), "--out", str(tmp_path / "c")], tmp_path)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "c" / "compare.html").stat().st_size > 0


def test_a_checkpoint_changed_since_the_inspect_is_refused(base, tmp_path):
    run_dir = _variant(base, tmp_path)
    m = _hand_mlp()
    with torch.no_grad():
        m.fc1.bias.add_(1.0)
    torch.save(m.state_dict(), tmp_path / "m.pt")
    line = assert_refused(run_deadscan(["strip", "--from", str(run_dir), "--finetune", "0", "--out",
                                        str(tmp_path / "o")], tmp_path))
    assert line == (f"Error: {tmp_path / 'm.pt'}: changed since the run in {run_dir} scanned it (sha256 differs); "
                    "pass the checkpoint and --data yourself")


# ---------------------------------------------------------------------------------------------
# Damaged or crafted summary.json: one line from every command that reads one


SUMMARY_EDITS = {
    "a-list": lambda s: [s],
    "no-totals": lambda s: {k: v for k, v in s.items() if k != "totals"},
    "string-count": lambda s: {**s, "totals": {**s["totals"], "dead": "5"}},
    "nan-percent": lambda s: {**s, "totals": {**s["totals"], "active_percent": float("nan")}},
    "seed-a-string": lambda s: {**s, "data": {**s["data"], "seed": "3"}},
    "path-a-number": lambda s: {**s, "checkpoint": {**s["checkpoint"], "path": 5}},
    "deep": lambda s: s,  # the test appends 100000 nested brackets to the text
    "dead-index-too-big": lambda s: {**s, "sites": [{**s["sites"][0], "dead_indices": [99]}] + s["sites"][1:]},
    # fields this project added later: typed like the rest
    "start-a-string": lambda s: {**s, "start": "186"},
    "start-site-count-negative": lambda s: {**s, "start": {"dead": 1, "neurons": 2, "active_percent": 50.0,
                                                           "active_percent_feeding_weights": 50.0,
                                                           "sites": {"relu1": {"dead": -1, "active_percent": 1.0}}}},
    "rare-tokens-wrong": lambda s: {**s, "rare_tokens": {"sequences": 3, "sites": {"relu1": [{"neuron": "\x1b[2J"}]}}},
    "warnings-not-strings": lambda s: {**s, "warnings": [{"\x1b]0;pwned\x07": 1}]},
    "device-map-a-list": lambda s: {**s, "device_map": ["cpu"]},
    "compact-latency-nan": lambda s: {**s, "compact": {"removed": {}, "skipped": {}, "params_before": 1,
                                                       "params_after": 1, "cpu_latency_ms": {"before": {
                                                           "median": float("nan"), "q1": 0, "q3": 0, "runs": 1}}}},
}


@pytest.mark.parametrize("case", list(SUMMARY_EDITS))
def test_damaged_summary_gives_one_line_to_strip_from(base, tmp_path, case):
    run_dir = _variant(base, tmp_path)
    path = run_dir / "summary.json"
    s = SUMMARY_EDITS[case](json.loads(path.read_text()))
    path.write_text(json.dumps(s) if case != "deep" else json.dumps(s)[:-1] + ', "x": ' + "[" * 100000 + "]" * 100000 + "}")
    line = assert_refused(run_deadscan(["strip", "--from", str(run_dir), "--finetune", "0", "--out",
                                        str(tmp_path / "o")], tmp_path))
    assert line.startswith(f"Error: {path}: ")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["no-totals", "nan-percent", "deep", "start-a-string", "rare-tokens-wrong",
                                  "warnings-not-strings"])
def test_damaged_summary_in_stats_h5_gives_one_line_to_report_and_compare(base, tmp_path, case):
    run_dir = _variant(base, tmp_path)
    s = SUMMARY_EDITS[case](json.loads((run_dir / "summary.json").read_text()))
    text = json.dumps(s) if case != "deep" else json.dumps(s)[:-1] + ', "x": ' + "[" * 100000 + "]" * 100000 + "}"
    with h5py.File(run_dir / "stats.h5", "r+") as f:
        del f["summary"]
        f.create_dataset("summary", data=text, dtype=h5py.string_dtype())
    for args in (["report", str(run_dir / "stats.h5"), "--out", str(tmp_path / "r")],
                 ["compare", str(run_dir), str(base / "run"), "--out", str(tmp_path / "c")]):
        line = assert_refused(run_deadscan(args, tmp_path))
        assert line.startswith(f"Error: {run_dir / 'stats.h5'}:/summary: ")


def test_demo_over_a_crafted_folder_refuses_without_a_traceback(tmp_path):
    (tmp_path / "deadscan-out").mkdir()
    (tmp_path / "deadscan-out" / "summary.json").write_text("[" * 100000)
    line = assert_refused(run_deadscan(["demo"], tmp_path))
    assert "already holds summary.json" in line


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_summaries_are_read_or_refused_in_one_line(base, data):
    """Replace any one value of a real summary by any JSON value: the reader returns a checked summary
    or raises DataError, never anything else."""
    s = json.loads((base / "run" / "summary.json").read_text())
    paths = list(_paths(s))
    path = data.draw(st.sampled_from(paths))
    value = data.draw(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                                   | st.text(max_size=5), lambda c: st.lists(c, max_size=3)
                                   | st.dictionaries(st.text(max_size=3), c, max_size=3), max_leaves=5))
    target = s
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    try:
        out = parse_summary(json.dumps(s), "summary.json")
    except DataError as e:
        assert str(e).startswith("summary.json: ") and "\n" not in str(e)
    else:
        assert isinstance(out["totals"]["dead"], int) and isinstance(out["sites"], list)


def _paths(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:2]):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


# ---------------------------------------------------------------------------------------------
# Damaged or crafted stats.h5


def test_bit_flips_in_stats_h5_are_read_or_refused_in_one_line(base, tmp_path):
    raw = bytearray((base / "run" / "stats.h5").read_bytes())
    rng = np.random.default_rng(0)
    refused = 0
    for i in range(150):
        flipped = bytearray(raw)
        for pos in rng.integers(0, len(raw), size=3):
            flipped[pos] ^= 1 << int(rng.integers(0, 8))
        path = tmp_path / f"f{i}.h5"
        path.write_bytes(bytes(flipped))
        try:
            read_stats(path)
        except DataError as e:
            assert "\n" not in str(e)
            refused += 1
    assert refused > 0  # some flips land in metadata the reader checks


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("where", ["summary", "sites"])
def test_external_link_to_a_fifo_is_never_followed(base, tmp_path, where):
    run_dir = _variant(base, tmp_path)
    os.mkfifo(tmp_path / "pipe.h5")
    with h5py.File(run_dir / "stats.h5", "r+") as f:
        del f[where]
        f[where] = h5py.ExternalLink(str(tmp_path / "pipe.h5"), "/x")
    line = assert_refused(run_deadscan(["report", str(run_dir), "--out", str(tmp_path / "r")], tmp_path, timeout=30))
    assert f"/{where} is a ExternalLink, which deadscan never follows" in line


def test_fifo_as_stats_or_summary_is_refused(base, tmp_path):
    os.mkfifo(tmp_path / "stats.h5")
    line = assert_refused(run_deadscan(["report", str(tmp_path / "stats.h5")], tmp_path, timeout=30))
    assert "not a regular file" in line
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.mkfifo(run_dir / "summary.json")
    line = assert_refused(run_deadscan(["strip", "--from", str(run_dir), "--finetune", "0"], tmp_path, timeout=30))
    assert line == f"Error: {run_dir / 'summary.json'}: not a regular file (a FIFO, device, socket, folder or " \
                   "broken link); give a regular file"


def test_a_per_neuron_array_that_declares_more_than_it_stores_is_refused(base, tmp_path):
    run_dir = _variant(base, tmp_path)
    with h5py.File(run_dir / "stats.h5", "r+") as f:
        g = f["sites/0000"]
        del g["sum"]
        g.create_dataset("sum", shape=(10**9,), dtype="f8", chunks=(1024,), compression="gzip")  # nothing written
    with pytest.raises(DataError, match=r"damaged stats.h5 \(/sites/0000/sum holds 1000000000 values, expected 8\)"):
        read_stats(run_dir / "stats.h5")
    with h5py.File(run_dir / "stats.h5", "r+") as f:
        del f["sites/0000/sum"]
        f["sites/0000"].create_dataset("sum", shape=(8,), dtype="f8", external=[(str(tmp_path / "ext.bin"), 0, 64)])
    with pytest.raises(DataError, match="keeps its data outside the file"):
        read_stats(run_dir / "stats.h5")


def test_report_never_writes_over_its_own_input(base, tmp_path):
    (tmp_path / "d").mkdir()
    shutil.copy(base / "run" / "stats.h5", tmp_path / "d" / "report.html")  # a stats file named report.html
    before = (tmp_path / "d" / "report.html").read_bytes()
    line = assert_refused(run_deadscan(["report", str(tmp_path / "d" / "report.html")], tmp_path))
    assert line == (f"Error: --out {tmp_path / 'd'} would overwrite the input {tmp_path / 'd' / 'report.html'} "
                    "(as report.html); choose another --out")
    assert (tmp_path / "d" / "report.html").read_bytes() == before


def test_report_accepts_a_run_folder_and_writes_beside_its_stats(base, tmp_path):
    shutil.copytree(base / "run", tmp_path / "run")
    (tmp_path / "run" / "report.html").unlink()
    res = run_deadscan(["report", str(tmp_path / "run")], tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"wrote {tmp_path / 'run' / 'report.html'}\n"
    assert not (tmp_path / "report.html").exists()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


# ---------------------------------------------------------------------------------------------
# train-state.pt, concurrent runs, terminal escapes


def test_a_resume_state_with_wrong_history_types_is_one_line(base, tmp_path):
    shutil.copy(base / "m.pt", tmp_path / "m.pt")
    args = ["strip", str(tmp_path / "m.pt"), "--arch", MLP_SPEC, "--data", str(base / "data.npz"), "--warmup", "0",
            "--batch-size", "16", "--out", str(tmp_path / "o")]
    run = run_deadscan(args + ["--finetune", "2"], tmp_path)
    assert run.returncode == 0, run.stderr
    state_path = tmp_path / "o" / "train-state.pt"
    state = torch.load(state_path, weights_only=True)
    state["history"][0]["dead"] = "many"
    torch.save(state, state_path)
    line = assert_refused(run_deadscan(args + ["--finetune", "3", "--resume"], tmp_path))
    assert line == (f"Error: cannot resume: {state_path}: not a deadscan train-state.pt (history[0].dead must be a "
                    "count (an integer >= 0), not a string); damaged, edited or from another program; drop --resume "
                    "or choose another --out")
    state["history"][0]["dead"] = 3
    state["epoch"] = 7  # more epochs done than history rows
    torch.save(state, state_path)
    line = assert_refused(run_deadscan(args + ["--finetune", "9", "--resume"], tmp_path))
    assert "epoch 7 with 2 history rows" in line


def test_two_runs_into_one_folder_at_once_never_both_succeed(base, tmp_path):
    """The second of two simultaneous inspect runs with the same --out fails in one line (the lock, or
    the outputs the first left), never silently replacing the first's outputs."""
    import subprocess

    args = [sys.executable, "-m", "deadscan", "inspect", str(base / "m.pt"), "--arch", MLP_SPEC,
            "--data", str(base / "data.npz"), "--out", str(tmp_path / "o")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(3):
        shutil.rmtree(tmp_path / "o", ignore_errors=True)
        procs = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
        codes = sorted(r[0] for r in results)
        assert codes == [0, 1], results
        err = next(r[2] for r in results if r[0] == 1)
        errors = [ln for ln in err.splitlines() if ln.startswith("Error:")]
        assert len(errors) == 1 and ("is in use by a running deadscan" in errors[0]
                                     or "already holds summary.json" in errors[0]), err
        assert not (tmp_path / "o" / ".deadscan.lock").exists()


def test_a_lock_left_by_a_killed_run_is_taken_over(base, tmp_path):
    import socket

    (tmp_path / "o").mkdir()
    (tmp_path / "o" / ".deadscan.lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))
    run = run_deadscan(["inspect", str(base / "m.pt"), "--arch", MLP_SPEC, "--data", str(base / "data.npz"),
                        "--out", str(tmp_path / "o")], tmp_path)
    assert run.returncode == 0, run.stderr
    assert not (tmp_path / "o" / ".deadscan.lock").exists()
    (tmp_path / "o" / ".deadscan.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                               "command": "inspect \x1b[2J x"}))
    line = assert_refused(run_deadscan(["inspect", str(base / "m.pt"), "--arch", MLP_SPEC, "--data",
                                        str(base / "data.npz"), "--out", str(tmp_path / "o"), "--overwrite"], tmp_path))
    assert line == (f"Error: --out {tmp_path / 'o'} is in use by a running deadscan (pid {os.getpid()}: deadscan "
                    f"inspect \\x1b[2J x); wait for it to finish or choose another --out (a stale lock is "
                    f"{tmp_path / 'o' / '.deadscan.lock'})")


def test_names_from_files_reach_the_terminal_escaped(base, tmp_path):
    """A run folder whose summary names a data path with terminal escapes: printed escaped."""
    run_dir = _variant(base, tmp_path, lambda s: s["data"].update(name=str(tmp_path / "d\x1b]0;owned\x07.npz")))
    line = assert_refused(run_deadscan(["strip", "--from", str(run_dir), "--finetune", "0", "--out",
                                        str(tmp_path / "o")], tmp_path))
    assert "d\\x1b]0;owned\\x07.npz" in line
