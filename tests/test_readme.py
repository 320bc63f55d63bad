"""The README's Python examples run as written (from a folder holding sample_models/)."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)


@pytest.mark.parametrize("needle", ["deadscan.scan(model, val)", "deadscan.Stripper(model, opt",
                                    "dispatch(model, spec)"])
def test_readme_example_runs(needle, tmp_path, monkeypatch, capsys):
    block = next(b for b in BLOCKS if needle in b)
    (tmp_path / "sample_models").symlink_to(ROOT / "sample_models")
    (tmp_path / "example.py").write_text(block, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(tmp_path / "example.py"), run_name="__main__")
    printed = capsys.readouterr().out.splitlines()
    assert printed, "the example prints its results"
    if "Stripper" in needle:
        epochs = [line.split() for line in printed]
        assert [int(e[0]) for e in epochs] == list(range(5))
        assert int(epochs[0][1]) == 186  # the sample model's dead neurons before any stripping
        assert int(epochs[-1][1]) < int(epochs[0][1])  # stripping revived some
    else:
        assert printed[0].split()[:3] == ["relu1", "256", "18"]
