"""Data users script against (issue 15): deadscan.read_run's tables, inspect --csv, stats.h5's
/site_names and per-dataset descriptions. The hand-built MLP (conftest) has its dead neurons known by
construction: relu1 (fc1) neurons 0-1 and relu2 (fc2) neurons 0-2."""

from __future__ import annotations

import csv
import json
import math
import sys

import h5py
import pytest

import deadscan
from deadscan.cli import main
from deadscan.errors import DeadscanError
from deadscan.stats_h5 import read_stats

DEAD = {("relu1", 0), ("relu1", 1), ("relu2", 0), ("relu2", 1), ("relu2", 2)}
PROVABLY = {("relu2", 0), ("relu2", 1), ("relu2", 2)}


@pytest.fixture
def run_dir(runner, mlp_file, npz_data, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(main, ["inspect", str(mlp_file), "--data", str(npz_data), "--out", str(out), "--csv"])
    assert res.exit_code == 0, res.output
    assert f"wrote {out / 'sites.csv'}" in res.stdout.splitlines()
    assert f"wrote {out / 'neurons.csv'}" in res.stdout.splitlines()
    return out


def _csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_read_run_neurons_hold_the_dead_by_construction(run_dir):
    pytest.importorskip("pandas")
    run = deadscan.read_run(run_dir)
    n = run.neurons
    assert list(n.columns) == ["site", "neuron", "dead", "provably_dead", "dormant", "frequency", "sum", "max",
                               "pre_max", "score"]
    assert len(n) == 16
    dead = {(r.site, int(r.neuron)) for r in n[n["dead"]].itertuples()}
    assert dead == DEAD
    assert {(r.site, int(r.neuron)) for r in n[n["provably_dead"]].itertuples()} == PROVABLY
    assert (n["dormant"] >= n["dead"]).all()
    assert (n.loc[n["dead"], ["frequency", "sum", "max"]] == 0).all().all()
    assert (n.loc[n["dead"], "pre_max"] <= 0).all()
    assert (n.loc[~n["dead"], "frequency"] > 0).all()
    assert run.history.empty and not run.is_strip
    assert deadscan.read_run(run_dir / "stats.h5").summary == run.summary  # the file itself also reads


def test_read_run_sites_match_summary_json(run_dir):
    pytest.importorskip("pandas")
    summary = json.loads((run_dir / "summary.json").read_text())
    sites = deadscan.read_run(run_dir).sites
    assert list(sites["site"]) == [s["name"] for s in summary["sites"]]
    for row, s in zip(sites.to_dict("records"), summary["sites"]):
        for k in ("feeding_layer", "consumer_layer", "kind", "neurons", "dead", "provably_dead", "dormant",
                  "strippable", "hidden_params", "inactive_params", "active_percent"):
            assert row[k] == s[k], k
        assert row["dead_percent"] == pytest.approx(100 * s["dead"] / s["neurons"])
    assert sites["dead"].sum() == summary["totals"]["dead"]


def test_csv_equals_dataframes(run_dir):
    pd = pytest.importorskip("pandas")
    run = deadscan.read_run(run_dir)
    for name, frame in (("sites.csv", run.sites), ("neurons.csv", run.neurons)):
        rows = _csv(run_dir / name)
        assert list(rows[0]) == list(frame.columns)
        assert len(rows) == len(frame)
        for got, want in zip(rows, frame.to_dict("records")):
            for k, v in want.items():
                if isinstance(v, bool) or (hasattr(v, "dtype") and v.dtype == bool):
                    assert got[k] == str(bool(v)), (name, k)
                elif isinstance(v, float):
                    assert (got[k] == "" and math.isnan(v)) or float(got[k]) == v, (name, k)
                elif v is None:
                    assert got[k] == ""
                else:
                    assert got[k] == str(v), (name, k)
        # pandas reads the files back to the same tables
        back = pd.read_csv(run_dir / name)
        assert list(back.columns) == list(frame.columns)
        assert len(back) == len(frame)


def test_csv_without_pandas(run_dir):
    rows = _csv(run_dir / "neurons.csv")  # the csv module wrote them; read with it alone
    assert {(r["site"], int(r["neuron"])) for r in rows if r["dead"] == "True"} == DEAD


def test_every_dataset_is_described_and_site_names_map_to_groups(run_dir):
    with h5py.File(run_dir / "stats.h5", "r") as f:
        seen = []

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                seen.append(name)
                d = obj.attrs.get("description")
                assert isinstance(d, str) and d.strip(), name

        f.visititems(visit)
        assert {"summary", "site_names", "sites/0000/sum", "sites/0000/frequency", "sites/0001/dormant",
                "sites/0000/score", "sites/0000/pre_max", "sites/0000/mean_input"} <= set(seen)
        assert f["sites/0000/frequency"].attrs["unit"] == "fraction (0-1)"
        assert "dead" in f["sites/0000/dormant"].attrs["description"]
        names = [n.decode() if isinstance(n, bytes) else n for n in f["site_names"][()]]
        assert names == ["relu1", "relu2"]
        for i, name in enumerate(names):
            assert f[f"sites/{i:04d}"].attrs["name"] == name


def test_read_stats_reads_a_file_without_site_names(run_dir, tmp_path):
    old = tmp_path / "old.h5"
    old.write_bytes((run_dir / "stats.h5").read_bytes())
    with h5py.File(old, "a") as f:
        del f["site_names"]
    data = read_stats(old)
    assert [s.name for s in data.sites] == ["relu1", "relu2"]


def test_inspect_refuses_existing_csv(runner, mlp_file, npz_data, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "neurons.csv").write_text("mine\n")
    args = ["inspect", str(mlp_file), "--data", str(npz_data), "--out", str(out), "--csv"]
    res = runner.invoke(main, args)
    assert res.exit_code != 0
    assert "neurons.csv" in res.stderr
    assert (out / "neurons.csv").read_text() == "mine\n"
    res = runner.invoke(main, [*args, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert (out / "neurons.csv").read_text().startswith("site,neuron,dead")


def test_table_glosses_dormant_and_percent_a(runner, mlp_file, npz_data, tmp_path):
    res = runner.invoke(main, ["inspect", str(mlp_file), "--data", str(npz_data), "--out", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    assert "dormant = ReDo score <= tau, dead included" in res.stdout
    assert "%A = percent of the hidden parameters still active" in res.stdout


def test_read_run_without_pandas_is_one_clear_error(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(DeadscanError, match="pip install pandas"):
        deadscan.read_run(run_dir)


def test_strip_csv_and_history(runner, mlp_file, npz_data, tmp_path):
    out = tmp_path / "s"
    res = runner.invoke(main, ["strip", str(mlp_file), "--data", str(npz_data), "--finetune", "1", "--warmup", "0",
                               "--device", "cpu", "--out", str(out), "--csv"])
    assert res.exit_code == 0, res.output
    assert {"sites.csv", "neurons.csv"} <= {p.name for p in out.iterdir()}
    assert f"wrote {out / 'neurons.csv'}" in res.stdout.splitlines()
    with h5py.File(out / "stats.h5", "r") as f:
        assert "percent" in f["history/stripped"].attrs["description"]
    pytest.importorskip("pandas")
    run = deadscan.read_run(out)
    assert run.is_strip
    assert list(run.history["epoch"]) == [1]
    assert len(_csv(out / "neurons.csv")) == len(run.neurons) == 16
