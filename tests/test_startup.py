"""Commands that need no model start without torch: help, --version, usage errors, report, compare.

Each runs in a fresh interpreter whose ``import torch`` fails (a stand-in torch package first on
PYTHONPATH), so any import of torch on the way is an error, not a slow start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

import deadscan
from deadscan.cli import main


@pytest.fixture
def no_torch(tmp_path):
    """Environment for a subprocess in which ``import torch`` raises ImportError."""
    fake = tmp_path / "no-torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("torch imported by a command that needs no model")\n')
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(fake.parent), env.get("PYTHONPATH")) if p)
    return env


def _deadscan(env, *args):
    return subprocess.run([sys.executable, "-m", "deadscan", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_stand_in_torch_is_what_a_subprocess_imports(no_torch):
    res = subprocess.run([sys.executable, "-c", "import torch"], env=no_torch, capture_output=True, text=True)
    assert res.returncode == 1 and "needs no model" in res.stderr


@pytest.mark.parametrize("args", [["--help"], ["-h"], []])
def test_help_without_torch(no_torch, args):
    res = _deadscan(no_torch, *args)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Usage: deadscan [OPTIONS] [COMMAND] [ARGS]...\n\n  Start with `deadscan demo`")
    assert "Commands:" in res.stdout and res.stderr == ""


@pytest.mark.parametrize("command", ["report", "compare", "demo", "inspect", "strip"])
def test_command_help_without_torch(no_torch, command):
    res = _deadscan(no_torch, command, "-h")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"Usage: deadscan {command} [OPTIONS]")


def test_version_without_torch(no_torch):
    res = _deadscan(no_torch, "--version")
    assert (res.returncode, res.stdout, res.stderr) == (0, f"deadscan, version {deadscan.__version__}\n", "")


@pytest.mark.parametrize("args, message", [(["inspekt"], "No such command 'inspekt'"),
                                           (["--bogus"], "No such option '--bogus'"),
                                           (["report"], "Missing argument 'STATS'")])
def test_usage_errors_without_torch(no_torch, args, message):
    res = _deadscan(no_torch, *args)
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_import_deadscan_does_not_import_torch(no_torch):
    res = subprocess.run([sys.executable, "-c", "import deadscan, deadscan.cli; print(deadscan.__version__)"],
                         env=no_torch, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout == f"{deadscan.__version__}\n", res.stderr


@pytest.fixture
def inspected(tmp_path, mlp_file, npz_data):
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["inspect", str(mlp_file), "--data", str(npz_data), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_report_without_torch(no_torch, inspected, tmp_path):
    res = _deadscan(no_torch, "report", inspected / "stats.h5", "--out", tmp_path / "again")
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"wrote {tmp_path / 'again' / 'report.html'}\n"
    assert (tmp_path / "again" / "report.html").stat().st_size > 0


def test_compare_without_torch(no_torch, inspected, tmp_path):
    res = _deadscan(no_torch, "compare", inspected / "stats.h5", inspected, "--out", tmp_path / "cmp")
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"wrote {tmp_path / 'cmp' / 'compare.html'}\n"


def test_public_names_resolve_on_first_use():
    # A fresh interpreter: importing the submodules first must not leave deadscan.scan etc. as modules.
    code = ("import deadscan, deadscan.scan, deadscan.strip, deadscan.capacity, types\n"
            "assert all(hasattr(deadscan, n) for n in deadscan.__all__)\n"
            "assert not any(isinstance(getattr(deadscan, n), types.ModuleType) for n in deadscan.__all__)\n"
            "from deadscan import scan, strip, capacity, Stripper\n"
            "assert callable(scan) and callable(strip) and callable(capacity)\n"
            "assert deadscan.data.resource_path and not hasattr(deadscan, 'no_such_name')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
