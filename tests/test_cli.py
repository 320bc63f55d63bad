"""The ``deadscan`` command through click's CliRunner: outputs, exit codes, one-line errors."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import click

import numpy as np
import pytest
import torch

import deadscan
from deadscan.cli import _INSPECT_SECTIONS, _STRIP_SECTIONS, SAMPLE_MODEL, main
from deadscan.data import resource_path
from deadscan.defaults import DEFAULTS

from conftest import MLP_SPEC

# click >= 8.2 always keeps stderr apart (result.stdout / result.stderr; result.output mixes both);
# click 8.1 needs mix_stderr=False for that.



# What the hand-built MLP (conftest._hand_mlp) gives by construction on inputs in [0, 1):
#   relu1 (fc1 -> relu1 -> fc2): neurons 0, 1 dead; not provably (fc1 reads raw inputs).
#   relu2 (fc2 -> relu2 -> head): neurons 0, 1, 2 dead and provably dead (weights, bias <= 0 on ReLU inputs).
#   The live neurons are far from zero, so dormant == dead.
# Hidden params: fc1 4*8+8 = 40, fc2 8*8+8 = 72, head weights 8*3 = 24 -> 136.
# Inactive: fc1 rows 2*(4+1) = 10; fc2 rows 3*(8+1) = 27 + columns of dead relu1 2*8 = 16 - overlap 3*2 = 6
#   -> 37; head columns 3*3 = 9 -> 56.  %A = 100 * 80 / 136.
# Feeding weights 32 + 64 = 96, inactive 2*4 + 3*8 = 32 -> 100 * 64 / 96.
EXPECTED_TOTALS = {
    "sites": 2, "neurons": 16, "dead": 5, "provably_dead": 3, "dormant": 5,
    "hidden_params": 136, "inactive_params": 56,
    "active_percent": round(100 * 80 / 136, 4), "active_percent_feeding_weights": round(100 * 64 / 96, 4),
    "pruned_weights": 0, "tau": DEFAULTS.tau,
}
# per site: relu1 = fc1 (40) + fc2 weights (64) = 104, inactive 10 + 2*8 = 26;
#           relu2 = fc2 (72) + head weights (24) = 96, inactive 27 + 3*3 = 36.
EXPECTED_SITES = [
    {"name": "relu1", "feeding_layer": "fc1", "consumer_layer": "fc2", "neurons": 8, "dead": 2,
     "dead_indices": [0, 1], "provably_dead": 0, "dormant": 2, "strippable": True,
     "hidden_params": 104, "inactive_params": 26, "active_percent": 75.0},
    {"name": "relu2", "feeding_layer": "fc2", "consumer_layer": "head", "neurons": 8, "dead": 3,
     "dead_indices": [0, 1, 2], "provably_dead": 3, "dormant": 3, "strippable": True,
     "hidden_params": 96, "inactive_params": 36, "active_percent": 62.5},
]


def _inspect(runner, *args):
    return runner.invoke(main, ["inspect", *map(str, args)])


def test_inspect_prints_table_and_writes_summary(runner, mlp_file, npz_data, tmp_path):
    out = tmp_path / "out"
    res = _inspect(runner, mlp_file, "--data", npz_data, "--out", out)
    assert res.exit_code == 0, res.output
    assert "Error" not in res.stderr

    lines = res.stdout.splitlines()
    assert lines[0] == f"checkpoint {mlp_file} (safetensors, arch {MLP_SPEC})"
    assert lines[1] == f"data {npz_data} split val: 10 samples on cpu"
    rows = [ln.split() for ln in lines]
    assert ["site", "feeding", "layer", "neurons", "dead", "dead%", "provable", "dormant", "%A"] in rows
    assert ["relu1", "fc1", "8", "2", "25.0", "0", "2", "75.0"] in rows
    assert ["relu2", "fc2", "8", "3", "37.5", "3", "3", "62.5"] in rows
    assert "sites 2  neurons 16  dead 5 (31.2%)  provably dead 3  dormant 5 (tau 0.025)" in lines
    assert "%A 58.82 of 136 hidden params (56 inactive); feeding weights only 66.67" in lines
    assert lines[-1] == f"wrote {out / 'summary.json'}"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["totals"] == EXPECTED_TOTALS
    sites = [{k: s[k] for k in EXPECTED_SITES[0]} for s in summary["sites"]]
    assert sites == EXPECTED_SITES
    data = summary["data"]
    assert (data["name"], data["split"], data["samples"], data["seed"]) == (str(npz_data), "val", 10, 0)
    ck = summary["checkpoint"]
    assert (ck["path"], ck["format"], ck["arch"]) == (str(mlp_file), "safetensors", MLP_SPEC)
    assert ck["sha256"] == deadscan.checkpoint.sha256_of(mlp_file)
    assert summary["device"] == "cpu"
    assert set(summary["definitions"]) >= {"site", "dead", "provably_dead", "dormant", "active_percent"}


def test_inspect_json_matches_summary_file(runner, mlp_file, npz_data, tmp_path):
    out = tmp_path / "out"
    res = _inspect(runner, mlp_file, "--data", npz_data, "--out", out, "--json")
    assert res.exit_code == 0, res.output
    assert res.stderr == ""  # no progress bar with --json
    printed = json.loads(res.stdout)
    assert printed == json.loads((out / "summary.json").read_text())
    assert printed["totals"] == EXPECTED_TOTALS


def test_inspect_split_all_counts_every_sample(runner, mlp_file, npz_data, tmp_path):
    res = _inspect(runner, mlp_file, "--data", npz_data, "--out", tmp_path / "o", "--json", "--split", "all")
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["data"]["samples"] == 100
    assert s["totals"] == EXPECTED_TOTALS  # dead by construction on any inputs in [0, 1)


def test_inspect_plain_state_dict_with_arch(runner, hand_mlp, npz_data, tmp_path):
    p = tmp_path / "sd.pt"
    torch.save({"state_dict": {"model." + k: v for k, v in hand_mlp.state_dict().items()}}, p)
    res = _inspect(runner, p, "--data", npz_data, "--out", tmp_path / "o", "--json", "--arch", MLP_SPEC)
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["checkpoint"]["format"] == "torch-zip"
    assert s["totals"] == EXPECTED_TOTALS


def test_trust_pickle_loads_whole_module(runner, hand_mlp, npz_data, tmp_path):
    p = tmp_path / "whole.pt"
    torch.save(hand_mlp, p)
    res = _inspect(runner, p, "--data", npz_data, "--out", tmp_path / "o", "--trust-pickle")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[0] == f"checkpoint {p} (torch-zip, arch pickled module)"
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["totals"] == EXPECTED_TOTALS


# ---------------------------------------------------------------------------------------------
# Bad input: exit 1, exactly one "Error:" line on stderr, nothing on stdout, nothing written


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _case(name, tmp_path, hand_mlp, mlp_file, npz_data):
    """(checkpoint, data, extra args, expected stderr line or (prefix, suffix))."""
    if name == "missing-checkpoint":
        p = tmp_path / "nope.safetensors"
        return p, npz_data, [], f"Error: {p}: no such file"
    if name == "state-dict-without-arch":
        p = tmp_path / "sd.pt"
        torch.save({**hand_mlp.state_dict(), "temperature": torch.ones(1)}, p)  # not only the built-in mlp's
        return p, npz_data, [], (f"Error: {p}: holds only weights; pass --arch (e.g. --arch "
                                 "'mlp(depth=2, width=256, in_features=64)' or --arch torchvision:resnet18)")
    if name == "linear-stack-without-arch":
        p = tmp_path / "stack.pt"
        stack = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        torch.save(stack.state_dict(), p)
        return p, npz_data, [], (
            f"Error: {p}: holds only weights, of 2 Linear layers (4 -> 8 -> 3) named 0, 2, which do not say what "
            "runs between them; if it is a ReLU MLP, rename them fc1, head and pass --arch "
            '"mlp(depth=1, width=8, in_features=4, classes=3)", else pass --arch pkg.module:factory for the code '
            "that built it")
    if name == "sample-mlp-wrong-input-size":
        p = resource_path("sample_models", "mlp_digits.pt")
        return p, "digits", ["--arch", "mlp(depth=4, width=256)"], (
            f"Error: {p}: tensor shapes do not fit the architecture (file vs model): fc1.weight (256, 64) vs "
            '(256, 3072); the file holds an mlp with in_features=64 (not 3072): pass --arch '
            '"mlp(depth=4, width=256, in_features=64, classes=10)"')
    if name == "unknown-arch-keyword":
        p = tmp_path / "sd.pt"
        torch.save(hand_mlp.state_dict(), p)
        return p, npz_data, ["--arch", "mlp(widht=10)"], (
            f"Error: {p}: --arch mlp(widht=10): unknown keyword widht= (did you mean width=?); mlp takes depth=, "
            "width=, in_features=, classes=")
    if name == "unknown-data-name":
        return mlp_file, "cifar11", [], ("Error: unknown --data 'cifar11' (did you mean cifar10 or cifar100?): use "
                                         "digits, cifar10, cifar100, svhn, mnist, fashion-mnist, tiny-imagenet, "
                                         "cifar10-c, cifar100-c, fake[:CxHxW[:CLASSES[:N]]], imagefolder:PATH, or a "
                                         ".npz/.h5 file")
    if name == "misspelt-data-name":
        return mlp_file, "digitz", [], ("Error: unknown --data 'digitz' (did you mean digits?): use digits, cifar10, "
                                        "cifar100, svhn, mnist, fashion-mnist, tiny-imagenet, cifar10-c, cifar100-c, "
                                        "fake[:CxHxW[:CLASSES[:N]]], imagefolder:PATH, or a .npz/.h5 file")
    if name == "npz-missing-keys":
        d = _npz(tmp_path / "bad.npz", a=np.zeros((3, 4), np.float32), b=np.zeros(3, np.int64))
        return mlp_file, d, [], f"Error: {d}: expected arrays 'x' (inputs) and 'y' (labels), found ['a', 'b']"
    if name == "refused-pickle":
        p = tmp_path / "whole.pt"
        torch.save(hand_mlp, p)
        return p, npz_data, [], (
            f"Error: {p}: the pickle needs code to load (global torch.nn.modules.container.Sequential); it may be "
            "a whole pickled module. If you trust the file pass --trust-pickle (runs code from it), or re-save it "
            "as a state dict")
    if name == "wrong-feature-size":
        d = _npz(tmp_path / "wide.npz", x=np.zeros((30, 5), np.float32), y=np.zeros(30, np.int64))
        return mlp_file, d, [], (f"Error: the model cannot take --data {d} inputs of shape (5,) (",
                                 "); check --arch, or the data's shape")
    if name == "labels-beyond-classes":
        d = _npz(tmp_path / "lab.npz", x=np.zeros((30, 4), np.float32), y=np.full(30, 7, np.int64))
        return mlp_file, d, [], f"Error: --data {d} has labels up to 7 but the model outputs 3 classes"
    if name == "x-y-length-mismatch":
        d = _npz(tmp_path / "len.npz", x=np.zeros((30, 4), np.float32), y=np.zeros(29, np.int64))
        return mlp_file, d, [], f"Error: {d}: 'x' has 30 samples but 'y' has 29"
    if name == "float-labels":
        d = _npz(tmp_path / "fl.npz", x=np.zeros((30, 4), np.float32), y=np.zeros(30, np.float32))
        return mlp_file, d, [], f"Error: {d}: 'y' must be integer labels of shape (N,), got float32 (30,)"
    if name == "wrong-arch-width":
        p = tmp_path / "sd.pt"
        torch.save(hand_mlp.state_dict(), p)
        return p, npz_data, ["--arch", "mlp(depth=2, width=8, in_features=5, classes=3)"], (
            f"Error: {p}: tensor shapes do not fit the architecture (file vs model): fc1.weight (8, 4) vs (8, 5); "
            'the file holds an mlp with in_features=4 (not 5): pass --arch '
            '"mlp(depth=2, width=8, in_features=4, classes=3)"')
    raise AssertionError(name)


@pytest.mark.parametrize("name", [
    "missing-checkpoint", "state-dict-without-arch", "unknown-data-name", "npz-missing-keys", "refused-pickle",
    "wrong-feature-size", "labels-beyond-classes", "x-y-length-mismatch", "float-labels", "wrong-arch-width",
    "linear-stack-without-arch", "sample-mlp-wrong-input-size", "unknown-arch-keyword", "misspelt-data-name",
])
def test_bad_input_gives_one_error_line_and_exit_1(runner, tmp_path, hand_mlp, mlp_file, npz_data, name):
    ckpt, data, extra, expected = _case(name, tmp_path, hand_mlp, mlp_file, npz_data)
    out = tmp_path / "out"
    res = _inspect(runner, ckpt, "--data", data, "--out", out, *extra)
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit)  # a handled error, not a traceback
    assert res.stdout == ""
    assert res.stderr.endswith("\n") and res.stderr.count("\n") == 1
    line = res.stderr.rstrip("\n")
    if isinstance(expected, tuple):
        assert line.startswith(expected[0]) and line.endswith(expected[1]), line
    else:
        assert line == expected
    assert not out.exists()  # no half-written output


def test_builtin_mlp_state_dict_loads_without_arch_with_a_note(runner, tmp_path, hand_mlp, npz_data):
    p = tmp_path / "sd.pt"
    torch.save(hand_mlp.state_dict(), p)
    res = _inspect(runner, p, "--data", npz_data, "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines()[0] == (f"Note: {p}: no --arch given; its tensors are exactly the built-in mlp's: "
                                          f"loading it as {MLP_SPEC} (pass --arch to choose another)")
    assert res.stdout.splitlines()[0] == f"checkpoint {p} (torch-zip, arch {MLP_SPEC})"
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["totals"] == EXPECTED_TOTALS


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "No such option '--bogus'"),
    ([], "Missing option '--data'"),
    (["--split", "dev"], "Invalid value for '--split'"),
    (["--batch-size", "0"], "Invalid value for '--batch-size'"),
])
def test_usage_errors_exit_2(runner, mlp_file, npz_data, tmp_path, args, message):
    data = [] if not args else ["--data", str(npz_data)]
    res = runner.invoke(main, ["inspect", str(mlp_file), *data, "--out", str(tmp_path / "out"), *args])
    assert res.exit_code == 2, res.output
    assert res.stdout == ""
    assert message in res.stderr
    assert res.stderr.startswith("Usage: ")
    assert not (tmp_path / "out").exists()


def test_unknown_command_exits_2(runner):
    res = runner.invoke(main, ["inspekt"])
    assert res.exit_code == 2
    assert "No such command 'inspekt'" in res.stderr


def test_version(runner):
    res = runner.invoke(main, ["--version"])
    assert res.exit_code == 0
    assert res.stdout == f"deadscan, version {deadscan.__version__}\n"


# ---------------------------------------------------------------------------------------------
# Models with nothing to scan


def test_gelu_model_reports_no_relu_sites(runner, tmp_path, gelu_case):
    p, d = gelu_case
    out = tmp_path / "out"
    res = _inspect(runner, p, "--data", d, "--out", out)
    assert res.exit_code == 0, res.output
    assert "No ReLU sites found" in res.stdout
    totals = json.loads((out / "summary.json").read_text())["totals"]
    assert (totals["sites"], totals["neurons"], totals["dead"], totals["hidden_params"]) == (0, 0, 0, 0)
    assert totals["active_percent"] == 100.0


# ---------------------------------------------------------------------------------------------
# demo (needs the bundled sample model)

SAMPLE = resource_path("sample_models", SAMPLE_MODEL)


@pytest.mark.skipif(not SAMPLE.exists(), reason=f"{SAMPLE} not generated yet")
def test_demo_runs_on_bundled_model(runner, tmp_path):
    out = tmp_path / "demo"
    res = runner.invoke(main, ["demo", "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(f"deadscan demo: the paper's MLP trained on sklearn's digits ({SAMPLE_MODEL})")
    assert res.stdout.rstrip("\n").endswith(f"outputs in {out}/")
    s = json.loads((out / "summary.json").read_text())
    assert s["data"]["name"] == "digits"
    assert s["checkpoint"]["format"] == "safetensors"
    assert s["checkpoint"]["arch"].startswith("mlp(")
    t = s["totals"]  # the bundled model, as the README's table shows it
    assert (t["sites"], t["neurons"], t["dead"], t["dormant"], t["active_percent"]) == (4, 1024, 186, 187, 67.73)
    assert f"sites {s['totals']['sites']}  neurons {s['totals']['neurons']}  dead {s['totals']['dead']} (" in res.stdout


# ---------------------------------------------------------------------------------------------
# Help: -h, bare deadscan, examples kept whole, metavars and help on every option, strip's sections


def _commands():
    return [(name, cmd) for name, cmd in main.commands.items()]


def test_bare_deadscan_and_h_print_the_help(runner):
    bare, short, long = (runner.invoke(main, args) for args in ([], ["-h"], ["--help"]))
    assert bare.exit_code == short.exit_code == long.exit_code == 0
    assert bare.stdout == short.stdout == long.stdout
    assert bare.stdout.split("\n")[2] == "  Start with `deadscan demo` (a bundled model and data; no download, no GPU)."


@pytest.mark.parametrize("name", list(main.commands))
def test_help_examples_are_not_rewrapped(runner, name):
    cmd = main.commands[name]
    res = runner.invoke(main, [name, "-h"])
    assert res.exit_code == 0, res.output
    examples = [line.strip() for line in cmd.help.split("\n") if line.strip().startswith("deadscan ")]
    assert examples
    printed = [line.strip() for line in res.stdout.split("\n")]
    for example in examples:
        assert example in printed, res.stdout


def test_strip_example_is_one_line(runner):
    res = runner.invoke(main, ["strip", "--help"])
    line = "    deadscan strip sample_models/mlp_digits.safetensors --data digits --finetune 5 --warmup 0"
    assert line + "\n" in res.stdout


def test_every_option_has_help_and_says_what_its_value_is():
    for name, cmd in [("", main), *_commands()]:
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.hidden:  # hidden: an old spelling kept working
                continue
            assert p.help, f"{name} {p.opts[0]} has no help"
            if not p.is_flag and not p.count and not isinstance(p.type, click.Choice):
                assert p.metavar, f"{name} {p.opts[0]} has no metavar"


@pytest.mark.parametrize("name, sections", [("inspect", _INSPECT_SECTIONS), ("strip", _STRIP_SECTIONS)])
def test_long_helps_are_in_sections(runner, name, sections):
    cmd = main.commands[name]
    listed = [n for names in sections.values() for n in names]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(p.name for p in cmd.params
                                    if isinstance(p, click.Option) and p.name != "help" and not p.hidden)
    out = runner.invoke(main, [name, "-h"]).stdout
    heads = [line for line in out.split("\n") if line.endswith(":") and not line.startswith(" ")]
    assert heads == [f"{title}:" for title in sections] + ["Other options:"]


def test_inspect_and_strip_share_the_data_options():
    ins, st = main.commands["inspect"], main.commands["strip"]
    shared = ["data", "arch", "data_root", "download", "split_seed", "val_fraction", "mean", "std", "resize",
              "channels", "corruption", "severity"]
    a = {p.name: p for p in ins.params}
    b = {p.name: p for p in st.params}
    for name in shared:
        assert a[name].opts == b[name].opts and a[name].metavar == b[name].metavar
        assert type(a[name].type) is type(b[name].type)
        if name != "download":  # unset options: defaults (inspect), or the inspect's (strip)
            assert a[name].default in (None, getattr(click.core, "UNSET", None))
            assert b[name].default in (None, getattr(click.core, "UNSET", None))  # click >= 8.3: no default
    assert a["data"].required and not b["data"].required


# ---------------------------------------------------------------------------------------------
# One error boundary


def test_interrupt_outside_strip_says_nothing_was_written(runner, monkeypatch, mlp_file, npz_data, tmp_path):
    from deadscan import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "inspect", interrupted)
    res = _inspect(runner, mlp_file, "--data", npz_data, "--out", tmp_path / "out")
    assert (res.exit_code, res.stdout, res.stderr) == (1, "", "Error: interrupted; nothing was written\n")


def test_library_error_in_report_is_one_line(runner, tmp_path):
    bad = tmp_path / "stats.h5"
    bad.write_bytes(b"not hdf5")
    res = runner.invoke(main, ["report", str(bad)])
    assert res.exit_code == 1 and res.stdout == ""
    assert res.stderr.startswith("Error: ") and res.stderr.count("\n") == 1, res.stderr


def test_closed_stdout_is_a_quiet_exit(mlp_file, npz_data, tmp_path):
    cmd = [sys.executable, "-m", "deadscan", "inspect", str(mlp_file), "--data", str(npz_data), "--json",
           "--out", str(tmp_path / "out")]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # like `| head -0`: the reader is gone before anything is printed
    err = p.stderr.read()
    assert p.wait(timeout=120) == 1
    assert err == b""
    assert (tmp_path / "out" / "summary.json").is_file()  # the run itself completed


# ---------------------------------------------------------------------------------------------
# Every output follows the umask (safetensors' own temp files are 0600)


def test_outputs_follow_the_umask(mlp_file, npz_data, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "deadscan", "strip", str(mlp_file), "--data", str(npz_data), "--finetune", "1",
           "--warmup", "0", "--device", "cpu", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, umask=0o022, timeout=300)
    assert res.returncode == 0, res.stderr
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    for name in ("stripped.safetensors", "masks.safetensors", "summary.json", "stats.h5", "report.html"):
        assert modes.pop(name) == 0o644, name
    assert all(mode == 0o644 for mode in modes.values()), modes
