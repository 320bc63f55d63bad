"""report.html, stats.h5, `deadscan report` and `deadscan compare`: content checked against summary.json.

The browser checks (rendering, console errors, no network) are in test_browser.py; the helpers
here (runs, HTML parsing) are shared with it.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import deadscan
from deadscan import pipeline
from deadscan.capacity import capacity
from deadscan.cli import main
from deadscan.options import OutputOptions, TrainConfig
from deadscan.report import build_summary, write_outputs
from deadscan.reportdata import collect
from deadscan.stats_h5 import read_stats
from deadscan.zoo import build

from conftest import MLP_SPEC, _hand_mlp

REPO = Path(__file__).resolve().parent.parent
SCRIPT_NAME = "<script>window['__deadscan_pwned']=1</script>"
BOLD_NAME = "<b>bold</b> & <i>co</i>"


# ---------------------------------------------------------------------------------------------
# Runs (shared with test_browser.py)


def make_data(tmp: Path) -> Path:
    """100 inputs in [0, 1) with 4 features, labels 0..2 (same as conftest.npz_data)."""
    rng = np.random.default_rng(0)
    path = tmp / "data.npz"
    np.savez(path, x=rng.random((100, 4)).astype(np.float32), y=(np.arange(100) % 3).astype(np.int64))
    return path


def reviving_mlp() -> nn.Module:
    """The hand-built MLP with fc1 rows 0-1 changed to weights -1, bias +0.3: dead on the data
    (sum of 4 inputs in [0, 1) rarely < 0.3) until stripping removes enough negative weights."""
    m = _hand_mlp()
    with torch.no_grad():
        m.fc1.bias[:2] = 0.3
    return m


def run_inspect(tmp: Path, model: nn.Module | None = None, **kw) -> pipeline.Inspection:
    ckpt = tmp / "mlp.safetensors"
    deadscan.save_safetensors(model if model is not None else _hand_mlp(), ckpt, MLP_SPEC)
    data = tmp / "data.npz" if (tmp / "data.npz").exists() else make_data(tmp)
    return pipeline.inspect(ckpt, str(data), output=OutputOptions(tmp / "inspect"),
                            command=f"deadscan inspect {ckpt} --data {data}", **kw)


def run_strip(tmp: Path, **kw) -> pipeline.StripRun:
    ckpt = tmp / "revive.safetensors"
    deadscan.save_safetensors(reviving_mlp(), ckpt, MLP_SPEC)
    data = tmp / "data.npz" if (tmp / "data.npz").exists() else make_data(tmp)
    cfg = TrainConfig(epochs=4, rate=0.5, lr=1e-6, warmup=0, schedule="constant", batch_size=16)
    return pipeline.strip_checkpoint(ckpt, str(data), cfg=cfg, output=OutputOptions(tmp / "strip"), baseline=True,
                                     command=f"deadscan strip {ckpt} --data {data} --finetune 4", **kw)


class NamedModel(nn.Module):
    """Layer names that are HTML: they must stay text in every output."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({SCRIPT_NAME: nn.Sequential(nn.Linear(4, 8), nn.ReLU()),
                                     BOLD_NAME: nn.Sequential(nn.Linear(8, 8), nn.ReLU())})
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for b in self.blocks.values():
            x = b(x)
        return self.head(x)


def run_named(out: Path) -> dict:
    torch.manual_seed(0)
    model = NamedModel().eval()
    with torch.no_grad():
        model.blocks[SCRIPT_NAME][0].weight[:3] = -1.0  # some dead neurons, so every figure has data
        model.blocks[SCRIPT_NAME][0].bias[:3] = -1.0
    x = torch.rand(64, 4)
    result = deadscan.scan(model, x)
    cap = capacity(model, result)
    summary = build_summary(result, cap, command="python make_named.py", checkpoint=None,
                            data={"name": "random <tensor>", "split": "all", "samples": 64}, elapsed=0.1)
    files = write_outputs(collect(summary, result, model), out)
    return {"summary": summary, **files}


# ---------------------------------------------------------------------------------------------
# Reading the HTML back


class _Page(HTMLParser):
    """Tables (rows of {data-col or index: text}), cards (data-key -> text), script blocks."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[dict]] = {}
        self.cards: dict[str, str] = {}
        self.scripts: list[dict] = []
        self.figures: list[str] = []
        self._table = None
        self._row = None
        self._cell = None
        self._card = None
        self._script = None
        self._in_tbody = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id"):
            self._table = a["id"]
            self.tables[self._table] = []
        elif tag == "tbody":
            self._in_tbody = True
        elif tag == "tr" and self._table and self._in_tbody:
            self._row = {"_attrs": a}
            self.tables[self._table].append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            key = a.get("data-col") or str(len([k for k in self._row if not k.startswith("_")]))
            self._cell = [key, "", a]
        elif a.get("data-key"):
            self._card = [a["data-key"], ""]
        elif tag == "script":
            self._script = [a, ""]
        elif tag == "div" and "ds-plot" in (a.get("class") or ""):
            self.figures.append(a["data-spec"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row[self._cell[0]] = self._cell[1].strip()
            self._row["_v_" + self._cell[0]] = self._cell[2].get("data-v")
            self._cell = None
        elif tag == "tr":
            self._row = None
        elif tag == "tbody":
            self._in_tbody = False
        elif tag == "table":
            self._table = None
        elif tag == "span" and self._card is not None:
            self.cards[self._card[0]] = self._card[1].strip()
            self._card = None
        elif tag == "script" and self._script is not None:
            self.scripts.append({"attrs": self._script[0], "text": self._script[1]})
            self._script = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data
        if self._card is not None:
            self._card[1] += data
        if self._script is not None:
            self._script[1] += data


def parse(path: Path) -> _Page:
    p = _Page()
    p.feed(Path(path).read_text(encoding="utf-8"))
    return p


def figure_specs(page: _Page) -> dict[str, dict]:
    return {s["attrs"]["id"]: json.loads(s["text"]) for s in page.scripts
            if s["attrs"].get("type") == "application/json"}


def _int(text: str) -> int:
    return int(text.replace(",", ""))


def _pct(v, digits=2) -> str:
    return "\u2013" if v is None else f"{v:.{digits}f}"


def check_sites_table(page: _Page, summary: dict) -> None:
    rows = page.tables["sites-table"]
    assert len(rows) == len(summary["sites"])
    for row, s in zip(rows, summary["sites"]):
        assert row["name"] == s["name"]
        assert row["feeding_layer"] == (s["feeding_layer"] or "\u2013")
        assert row["consumer_layer"] == (s["consumer_layer"] or "\u2013")
        assert row["kind"].startswith(s["kind"])
        assert _int(row["neurons"]) == s["neurons"]
        assert _int(row["dead"]) == s["dead"]
        assert row["dead_pct"] == f"{100.0 * s['dead'] / s['neurons']:.1f}"
        assert _int(row["dormant"]) == s["dormant"]
        assert _int(row["provably_dead"]) == s["provably_dead"]
        assert row["active_percent"] == _pct(s["active_percent"])
        assert _int(row["hidden_params"]) == s["hidden_params"]
        assert _int(row["inactive_params"]) == s["inactive_params"]
        assert row["strippable"] == ("yes" if s["strippable"] else "no")
        if s["active_percent"] is not None:  # sort keys are the exact values
            assert float(row["_v_active_percent"]) == s["active_percent"]
        else:
            assert row["_v_active_percent"] == ""


def check_cards(page: _Page, summary: dict) -> None:
    t = summary["totals"]
    for key in ("sites", "neurons", "dead", "provably_dead", "dormant", "pruned_weights"):
        assert _int(page.cards[key]) == t[key], key
    assert page.cards["active_percent"] == _pct(t["active_percent"])
    assert page.cards["active_percent_feeding_weights"] == _pct(t["active_percent_feeding_weights"])
    assert page.cards["dead_percent"] == f"{100.0 * t['dead'] / t['neurons']:.1f}%"


def check_self_contained(html: str) -> None:
    """plotly.js inlined exactly once, nothing loaded from elsewhere."""
    from plotly.offline import get_plotlyjs

    assert html.count(get_plotlyjs()[:2000]) == 1
    assert not re.search(r"""<(script|link|img|iframe)[^>]+(src|href)\s*=""", html, re.I)
    assert "@import" not in html and "url(" not in html.split("<script>", 1)[0]


# ---------------------------------------------------------------------------------------------
# inspect


@pytest.fixture(scope="module")
def inspected(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inspect")
    return run_inspect(tmp)


def test_inspect_writes_report_stats_and_summary(inspected):
    out = inspected.summary_path.parent
    assert inspected.files == {"stats": out / "stats.h5", "report": out / "report.html"}
    summary = json.loads((out / "summary.json").read_text())
    raw = (out / "report.html").read_text(encoding="utf-8")
    page = parse(out / "report.html")
    check_sites_table(page, summary)
    check_cards(page, summary)
    check_self_contained(raw)
    text_of = html.unescape(raw)
    ck = summary["checkpoint"]
    for text in (ck["path"], ck["sha256"], ck["format"], ck["arch"], summary["data"]["name"],
                 f"deadscan {deadscan.__version__}", f"torch {torch.__version__}", summary["created"]):
        assert text in text_of, text
    assert summary["command"] in text_of
    for text in summary["definitions"].values():  # the definitions used, verbatim
        assert text in text_of
    assert page.figures == ["spec-dead-per-site", "spec-frequency", "spec-weights", "spec-pre-max"]
    specs = figure_specs(page)
    assert set(specs) == set(page.figures)
    bars = specs["spec-dead-per-site"]["data"][0]
    assert bars["y"] == pytest.approx([100.0 * s["dead"] / s["neurons"] for s in summary["sites"]])
    # the frequency histogram's dead spike counts the dead neurons
    assert specs["spec-frequency"]["data"][0]["y"] == [summary["totals"]["dead"]]


def test_stats_h5_layout_readable_with_h5py_alone(inspected):
    out = inspected.summary_path.parent
    summary = json.loads((out / "summary.json").read_text())
    with h5py.File(out / "stats.h5", "r") as f:
        assert f.attrs["schema_version"] == 1
        assert f.attrs["deadscan_version"] == deadscan.__version__
        assert f.attrs["kind"] == "inspect"
        assert json.loads(f.attrs["config"])["tau"] == summary["totals"]["tau"]
        assert json.loads(f["summary"][()])["totals"] == summary["totals"]
        groups = [f["sites"][k] for k in f["sites"]]
        assert [g.attrs["name"] for g in groups] == [s["name"] for s in summary["sites"]]  # model order
        for g, s in zip(groups, summary["sites"]):
            n = s["neurons"]
            for name in ("sum", "active", "frequency", "max", "pre_max", "dead", "provably_dead", "dormant", "score"):
                assert g[name].shape == (n,), name
                assert g[name].compression == "gzip"
            assert np.flatnonzero(g["dead"][()]).tolist() == s["dead_indices"]
            assert int(g["provably_dead"][()].sum()) == s["provably_dead"]
            assert g["frequency"][()] == pytest.approx(g["active"][()] / g.attrs["elements"])
            assert (g["pre_max"][()][g["dead"][()]] <= 0).all()
            assert g["mean_input"].shape == ((4,) if s["feeding_layer"] == "fc1" else (8,))
            assert g.attrs["feeding_layer"] == s["feeding_layer"]
            assert g.attrs["hidden_params"] == s["hidden_params"]
            h = g["weight_hist"]
            assert h["dead"][()].sum() == s["dead"] * (4 if s["feeding_layer"] == "fc1" else 8)
            assert h["edges"].shape == (h["dead"].shape[0] + 1,)
        assert "masks" not in f and len(f["history"]) == 0
    with h5py.File(out / "stats.h5", "r") as f:  # the mean input the scan recorded, exactly
        assert f["sites"]["0000"]["mean_input"][()] == pytest.approx(inspected.scan.sites[0].mean_input)


def test_report_command_rerenders_from_stats_alone(inspected, tmp_path):
    out = inspected.summary_path.parent
    stats = tmp_path / "elsewhere" / "stats.h5"
    stats.parent.mkdir()
    shutil.copy(out / "stats.h5", stats)  # no model, data or summary.json beside it
    res = CliRunner().invoke(main, ["report", str(stats), "--out", str(tmp_path / "re")])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == f"wrote {tmp_path / 're' / 'report.html'}"
    live, again = parse(out / "report.html"), parse(tmp_path / "re" / "report.html")
    summary = json.loads((out / "summary.json").read_text())
    check_sites_table(again, summary)
    check_cards(again, summary)
    assert again.tables == live.tables
    assert figure_specs(again) == figure_specs(live)  # one code path: identical figures
    assert f"re-rendered from {stats}" in (tmp_path / "re" / "report.html").read_text()
    # default --out: beside the stats file
    res = CliRunner().invoke(main, ["report", str(stats)])
    assert res.exit_code == 0, res.output
    assert (stats.parent / "report.html").exists()


@pytest.mark.parametrize("content", [b"not hdf5", None])
def test_report_command_bad_input_is_one_line(tmp_path, content):
    path = tmp_path / "stats.h5"
    if content is not None:
        path.write_bytes(content)
    res = CliRunner().invoke(main, ["report", str(path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {path}: ")
    assert not (tmp_path / "o").exists()


def test_report_command_rejects_other_hdf5(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(3)
    res = CliRunner().invoke(main, ["report", str(path)])
    assert res.exit_code == 1
    assert "not a deadscan stats.h5" in res.output


def test_plotlyjs_modes(inspected, tmp_path):
    from plotly.offline import get_plotlyjs, get_plotlyjs_version

    stats = inspected.files["stats"]
    for mode in ("cdn", "directory"):
        res = CliRunner().invoke(main, ["report", str(stats), "--out", str(tmp_path / mode), "--plotlyjs", mode])
        assert res.exit_code == 0, res.output
        html = (tmp_path / mode / "report.html").read_text()
        assert get_plotlyjs()[:2000] not in html
        assert len(html) < 300_000
    assert f'src="https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js"' in (tmp_path / "cdn" / "report.html").read_text()
    assert not (tmp_path / "cdn" / "plotly.min.js").exists()
    assert 'src="plotly.min.js"' in (tmp_path / "directory" / "report.html").read_text()
    assert (tmp_path / "directory" / "plotly.min.js").read_text() == get_plotlyjs()


def test_inspect_cli_writes_report(tmp_path):
    data = make_data(tmp_path)
    ckpt = tmp_path / "m.safetensors"
    deadscan.save_safetensors(_hand_mlp(), ckpt, MLP_SPEC)
    res = CliRunner().invoke(main, ["inspect", str(ckpt), "--data", str(data), "--out", str(tmp_path / "o"),
                                    "--plotlyjs", "cdn"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert f"wrote {tmp_path / 'o' / 'stats.h5'}" in lines
    assert f"wrote {tmp_path / 'o' / 'report.html'}" in lines
    assert lines[-1] == f"wrote {tmp_path / 'o' / 'summary.json'}"
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    check_sites_table(parse(tmp_path / "o" / "report.html"), summary)
    assert "cdn.plot.ly" in (tmp_path / "o" / "report.html").read_text()


# ---------------------------------------------------------------------------------------------
# strip


@pytest.fixture(scope="module")
def stripped(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("strip")
    return run_strip(tmp)


def test_strip_report_has_history_and_revived_weights(stripped):
    s = stripped.summary
    out = stripped.out
    assert stripped.files["stats"] == out / "stats.h5" and stripped.files["report"] == out / "report.html"
    assert json.loads((out / "summary.json").read_text())["totals"] == s["totals"]
    revived = sum(r["revived"] for r in s["history"])
    assert revived >= 1, "the fixture must revive a neuron"
    page = parse(out / "report.html")
    check_sites_table(page, s)
    check_cards(page, s)
    check_self_contained((out / "report.html").read_text())
    assert page.figures == ["spec-dead-per-site", "spec-frequency", "spec-weights", "spec-pre-max",
                            "spec-history-dead", "spec-history-active", "spec-history-loss", "spec-history-acc",
                            "spec-history-sites", "spec-revived-weights"]
    # the start: the input checkpoint as an inspect of it sees it (same data, split, seed)
    ins = pipeline.inspect(stripped.summary["checkpoint"]["path"], s["data"]["name"],
                           output=OutputOptions(out.parent / "start-inspect"))
    start = s["start"]
    assert {k: v["dead"] for k, v in start["sites"].items()} == {x["name"]: x["dead"] for x in ins.summary["sites"]}
    assert (start["dead"], start["active_percent"]) == (ins.summary["totals"]["dead"],
                                                        ins.summary["totals"]["active_percent"])
    last = s["history"][-1]["epoch"]
    specs = figure_specs(page)
    dead = specs["spec-history-dead"]["data"]
    assert dead[0]["y"] == [r["revived"] for r in s["history"]]
    assert dead[1]["y"] == [r["dead"] for r in s["history"]]
    assert (dead[2]["x"], dead[2]["y"]) == ([0, last], [start["dead"], s["totals"]["dead"]])  # start and end
    assert dead[3]["y"] == [r["dead"] for r in s["baseline"]["history"]]  # stripped vs baseline
    active = specs["spec-history-active"]["data"]
    assert active[0]["y"] == pytest.approx([r["active_percent"] for r in s["history"]])
    assert active[2]["y"] == pytest.approx([start["active_percent"], s["totals"]["active_percent"]])
    # one end everywhere: the card says start -> end as the totals do
    assert page.cards["start_end_dead"] == f"{start['dead']} \u2192 {s['totals']['dead']}"
    sites = specs["spec-history-sites"]["data"][0]
    assert sites["x"] == ["start"] + [f"epoch {r['epoch']}" for r in s["history"]] + ["end"]
    assert sites["z"] == [[start["sites"][x["name"]]["dead"]] + [r["dead_by_site"][x["name"]] for r in s["history"]]
                          + [x["dead"]] for x in s["sites"]]
    acc = specs["spec-history-acc"]["data"]
    assert acc[0]["y"] == pytest.approx([r["val_acc"] for r in s["history"]])
    # revived neurons' incoming weights: before = 4 weights each, after = those not stripped
    rev = specs["spec-revived-weights"]["data"]
    with h5py.File(out / "stats.h5", "r") as f:
        h = f["revived_hist"]
        n = int(h.attrs["neurons"])
        assert n >= 1
        assert h["before"][()].sum() == 4 * n
        assert h["after"][()].sum() == 4 * n - int(h.attrs["pruned_excluded"])
    assert [t["customdata"] for t in rev[:2]] == [
        read_stats(out / "stats.h5").revived_pooled.series[k].tolist() for k in ("before", "after")]
    assert "Synaptic Stripping" in (out / "report.html").read_text()


def test_strip_stats_h5_history_masks(stripped):
    s = stripped.summary
    out = stripped.out
    from safetensors.torch import load_file

    masks = load_file(out / "masks.safetensors")
    with h5py.File(out / "stats.h5", "r") as f:
        assert f.attrs["kind"] == "strip"
        assert json.loads(f.attrs["config"])["rate"] == 0.5
        hist = f["history"]["stripped"]
        assert hist.maxshape == (None,)
        assert hist["epoch"].tolist() == [r["epoch"] for r in s["history"]]
        assert hist["dead"].tolist() == [r["dead"] for r in s["history"]]
        assert hist["val_acc"] == pytest.approx([r["val_acc"] for r in s["history"]])
        assert f["history"]["baseline"].shape == (len(s["baseline"]["history"]),)
        got = {f["masks"][k].attrs["layer"]: f["masks"][k][()] for k in f["masks"]}
        assert set(got) == set(masks)
        for k, m in masks.items():
            assert (got[k] == m.numpy()).all()
            assert f["masks"][next(iter(f["masks"]))].compression == "gzip"
        assert int(sum(m.sum() for m in got.values())) == s["totals"]["pruned_weights"]
    with h5py.File(out / "stats.h5", "a") as f:  # the history tables are resizable: append a row
        d = f["history"]["stripped"]
        d.resize((d.shape[0] + 1,))
        assert d.shape[0] == len(s["history"]) + 1


def test_compare_side_by_side(inspected, stripped, tmp_path):
    a, b = inspected.files["stats"], stripped.files["stats"]
    res = CliRunner().invoke(main, ["compare", str(a), str(b), "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    path = tmp_path / "cmp" / "compare.html"
    assert res.output.strip() == f"wrote {path}"
    page = parse(path)
    sa, sb = inspected.summary, stripped.summary
    rows = page.tables["sites-table"]
    assert [r["name"] for r in rows] == [s["name"] for s in sa["sites"]]
    for row, x, y in zip(rows, sa["sites"], sb["sites"]):
        assert _int(row["3"]) == x["dead"] and _int(row["4"]) == y["dead"]
        assert row["5"] == f"{y['dead'] - x['dead']:+d}"
        assert row["8"] == _pct(x["active_percent"]) and row["9"] == _pct(y["active_percent"])
        assert row["10"] == f"{y['active_percent'] - x['active_percent']:+.2f}"
    totals = {r["0"]: r for r in page.tables["totals-table"]}
    assert _int(totals["dead"]["1"]) == sa["totals"]["dead"] and _int(totals["dead"]["2"]) == sb["totals"]["dead"]
    assert totals["pruned weights"]["3"] == f"{sb['totals']['pruned_weights'] - sa['totals']['pruned_weights']:+d}"
    specs = figure_specs(page)
    assert set(specs) == {"spec-compare-sites", "spec-compare-frequency", "spec-compare-pre-max",
                          "spec-compare-weights", "spec-compare-history"}
    d = specs["spec-compare-sites"]["data"]
    assert d[0]["y"] == pytest.approx([100 * (y["dead"] / y["neurons"] - x["dead"] / x["neurons"])
                                       for x, y in zip(sa["sites"], sb["sites"])])
    check_self_contained(path.read_text())
    text = path.read_text()
    # runs named by folder and command, not only the checkpoint file
    heads = re.findall(r'<h2 id="name-(?:a|b)">(.*?)<small>', text)
    assert heads == ["A: inspect (inspect mlp.safetensors) ", "B: strip (strip revive.safetensors) "], heads
    assert "<title>deadscan compare: inspect (inspect mlp.safetensors) vs strip (strip revive.safetensors)</title>" in text
    assert 'id="warnings"' not in text  # different runs with shared sites: no banner
    diff = {r["_attrs"]["data-setting"]: (r["1"], r["2"]) for r in page.tables["config-diff"]}
    assert diff["config.epochs"] == ("\u2013", "4") and diff["config.rate"] == ("\u2013", "0.5")
    assert all(k.startswith(("config.", "data.")) for k in diff)
    assert not any(k.startswith("data.") and sa["data"].get(k[5:]) == sb["data"].get(k[5:]) for k in diff)


def test_compare_warns_about_the_same_run_and_no_shared_site(inspected, tmp_path):
    a = str(inspected.files["stats"])
    res = CliRunner().invoke(main, ["compare", a, a, "--out", str(tmp_path / "same")])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "same" / "compare.html").read_text()
    assert 'class="ds-banner" id="warnings"' in text
    assert "A and B are the same checkpoint" in text and "(the same file)" in text
    assert 'id="config-diff-none"' in text and 'id="config-diff"' not in text
    named = run_named(tmp_path / "named")
    res = CliRunner().invoke(main, ["compare", a, str(named["stats"]), "--out", str(tmp_path / "other")])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "other" / "compare.html").read_text()
    assert "A and B share no site" in text and "same checkpoint" not in text
    diff = {r["_attrs"]["data-setting"] for r in parse(tmp_path / "other" / "compare.html").tables["config-diff"]}
    assert {"data.name", "data.samples"} <= diff


def _reddish(color: str) -> bool:
    import colorsys

    r, g, b = (int(color[i:i + 2], 16) / 255 for i in (1, 3, 5))
    h, light, sat = colorsys.rgb_to_hls(r, g, b)
    return (h < 20 / 360 or h > 340 / 360) and sat > 0.4 and 0.2 < light < 0.8


def test_figure_axes_ticks_legends_and_colours(inspected, stripped, tmp_path):
    from deadscan import figures

    assert not any(_reddish(c) for c in figures.SITE_COLORS) and _reddish(figures.DEAD)
    specs = figure_specs(parse(inspected.files["report"]))
    pre = specs["spec-pre-max"]
    assert pre["layout"]["showlegend"] is True and pre["layout"]["yaxis"]["tickformat"] == "d"
    assert isinstance(pre["layout"]["yaxis"]["dtick"], int) and pre["layout"]["yaxis"]["dtick"] >= 1
    assert not any(_reddish(t["marker"]["color"]) for t in pre["data"])
    for spec in specs.values():  # dropdowns sit top left, away from plotly's modebar (top right)
        for m in spec["layout"].get("updatemenus", []):
            assert m["x"] == 0 and m["xanchor"] == "left"
    hist = figure_specs(parse(stripped.files["report"]))["spec-history-dead"]
    assert "yaxis2" not in hist["layout"] and all("yaxis" not in t for t in hist["data"])  # one axis for both
    assert hist["layout"]["yaxis"]["tickformat"] == "d"
    res = CliRunner().invoke(main, ["compare", str(stripped.files["stats"]), str(stripped.files["stats"]),
                                    "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    cmp = figure_specs(parse(tmp_path / "cmp" / "compare.html"))["spec-compare-history"]["layout"]
    assert cmp["yaxis2"]["tickformat"] == ".1f" and cmp["yaxis2"]["ticksuffix"] == "%"
    page = parse(inspected.files["report"])
    text = inspected.files["report"].read_text()
    for col in ("dead", "dead %"):  # most dead first on the first click
        assert f'data-first="descending" tabindex="0">{col}</th>' in text
    assert 'data-first="ascending" tabindex="0" title="position in the model">#</th>' in text
    assert page.tables


def test_compare_bad_input(inspected, tmp_path):
    res = CliRunner().invoke(main, ["compare", str(inspected.files["stats"]), str(tmp_path / "no.h5")])
    assert res.exit_code == 1
    assert res.output.strip() == f"Error: {tmp_path / 'no.h5'}: no such file"


# ---------------------------------------------------------------------------------------------
# Escaping, size, packaging


def test_html_layer_names_stay_text(tmp_path):
    got = run_named(tmp_path)
    html = got["report"].read_text(encoding="utf-8")
    assert SCRIPT_NAME not in html and "<b>bold" not in html
    assert "&lt;script&gt;window[&#39;__deadscan_pwned&#39;]=1&lt;/script&gt;" in html
    page = parse(got["report"])
    names = [r["name"] for r in page.tables["sites-table"]]
    assert names == [s["name"] for s in got["summary"]["sites"]]
    assert any(SCRIPT_NAME in n for n in names) and any(BOLD_NAME in n for n in names)
    # executable script blocks: plotly.js and deadscan's own; figure data only as JSON blocks
    kinds = [s["attrs"].get("type") for s in page.scripts]
    assert kinds.count(None) == 2 and set(kinds) == {None, "application/json"}
    for spec in figure_specs(page).values():  # plotly's labels get the entity-escaped names
        text = json.dumps(spec)
        assert "<script>" not in text and "<b>" not in text
    hover = [c[0] for c in figure_specs(page)["spec-dead-per-site"]["data"][0]["customdata"]]
    assert hover == [s["name"].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                     for s in got["summary"]["sites"]]
    # and through stats.h5
    again = read_stats(got["stats"])
    assert [s.name for s in again.sites] == names


def test_report_size_does_not_grow_with_the_model(tmp_path):
    """Per-neuron data is binned: a 64x wider model gives (almost) the same report."""
    sizes = {}
    for width in (16, 1024):
        torch.manual_seed(0)
        model = build(f"mlp(depth=3, width={width}, in_features=32, classes=10)").eval()
        x = torch.randn(256, 32)
        r = deadscan.scan(model, x)
        s = build_summary(r, capacity(model, r), command="", checkpoint=None,
                          data={"name": "randn", "split": "all", "samples": 256}, elapsed=0.0)
        files = write_outputs(collect(s, r, model), tmp_path / str(width))
        sizes[width] = files["report"].stat().st_size
    # summary rows hold dead_indices, but they are not in the page; figures are bin counts
    assert abs(sizes[1024] - sizes[16]) < 60_000, sizes
    assert sizes[1024] < 8_000_000


def _copy_source(dst: Path) -> None:
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, dst / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in ("deadscan", "templates", "sample_models"):
        shutil.copytree(REPO / folder, dst / folder, ignore=ignore)


def test_wheel_ships_templates_and_renders_outside_the_source_tree(inspected, tmp_path):
    pytest.importorskip("build", reason="the 'build' package is not installed (pip install build)")
    pytest.importorskip("setuptools", reason="setuptools is needed to build without isolation")
    start = time.perf_counter()
    src = tmp_path / "src"
    src.mkdir()
    _copy_source(src)
    dist = tmp_path / "dist"
    res = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    wheel = next(dist.glob("deadscan-*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    for t in ("report.html.j2", "compare.html.j2", "_base.html.j2", "_macros.html.j2", "report.css", "report.js"):
        assert f"deadscan/templates/{t}" in names, names
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site),
                          str(wheel)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(inspected.files["stats"], run_dir / "stats.h5")
    code = ("import deadscan, deadscan.report as r; print(deadscan.__file__); print(r.templates_dir()); "
            "print(r.rerender('stats.h5', 'out'))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    res = subprocess.run([sys.executable, "-c", code], cwd=run_dir, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    module, templates, report = res.stdout.split()
    assert Path(module).is_relative_to(site) and Path(templates).is_relative_to(site)
    summary = json.loads((inspected.summary_path).read_text())
    check_sites_table(parse(run_dir / report), summary)
    if time.perf_counter() - start > 20:
        print(f"wheel test took {time.perf_counter() - start:.0f} s: consider marking it slow")


def test_nonfinite_weights_are_a_banner_and_marked_sites(tmp_path):
    """A run that warned about NaN/Inf weights says so on the page, and marks the sites they touch."""
    from deadscan.errors import DeadscanWarning

    m = _hand_mlp()
    with torch.no_grad():
        m.fc2.weight[5, 1] = float("nan")
    with pytest.warns(DeadscanWarning, match="NaN or Inf"):
        run = run_inspect(tmp_path, model=m)
    s = run.summary
    assert s["checkpoint"]["nonfinite"] == ["fc2"]
    for path in (run.files["report"], _rerendered(run, tmp_path)):
        text = path.read_text(encoding="utf-8")
        assert 'class="ds-banner" id="warnings" role="alert"' in text
        assert "NaN or Inf weights in 1 layer(s): fc2." in text
        rows = parse(path).tables["sites-table"]
        marked = [r["_attrs"]["data-site"] for r in rows if "ds-nonfinite" in (r["_attrs"].get("class") or "")]
        touched = [x["name"] for x in s["sites"] if "fc2" in (x["feeding_layer"], x["consumer_layer"])]
        assert marked == touched and touched
        for r in rows:
            assert r["name"].endswith("\u26a0 NaN/Inf weights") == (r["_attrs"]["data-site"] in touched)


def _rerendered(run, tmp_path: Path) -> Path:
    res = CliRunner().invoke(main, ["report", str(run.files["stats"]), "--out", str(tmp_path / "re")])
    assert res.exit_code == 0, res.output
    return tmp_path / "re" / "report.html"


def test_finite_run_has_no_banner(inspected):
    text = inspected.files["report"].read_text(encoding="utf-8")
    assert 'id="warnings"' not in text and 'ds-nonfinite"' not in text and "\u26a0" not in text


def test_report_for_a_model_without_relu_sites(tmp_path):
    torch.manual_seed(0)
    model = build("vit-gelu(img_size=8, patch_size=4, depth=1, heads=2, dim=16, mlp_dim=32)").eval()
    x = torch.rand(4, 3, 8, 8)
    r = deadscan.scan(model, x)
    s = build_summary(r, capacity(model, r), command="", checkpoint=None,
                      data={"name": "rand", "split": "all", "samples": 4}, elapsed=0.0)
    files = write_outputs(collect(s, r, model), tmp_path)
    page = parse(files["report"])
    assert "sites-table" not in page.tables  # no empty table header: the note says why
    text = files["report"].read_text()
    assert "No ReLU sites found" in text
    assert page.figures == [] and figure_specs(page) == {}  # no empty axes
    assert 'class="ds-figures"' not in text
    assert read_stats(files["stats"]).sites == []


def test_sites_without_feeding_layer_and_opaque_parts_are_listed(tmp_path):
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.ReLU()

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
                x = self.fc(x)
            return self.act(x)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.inner = Opaque()
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            x = torch.relu(self.norm(self.fc(x)))  # after a LayerNorm: no feeding layer
            return self.head(self.inner(x))

    torch.manual_seed(0)
    model = M().eval()
    r = deadscan.scan(model, torch.rand(8, 4))
    s = build_summary(r, capacity(model, r), command="", checkpoint=None,
                      data={"name": "rand", "split": "all", "samples": 8}, elapsed=0.0)
    assert s["opaque"] and any(not x["feeding_layer"] for x in s["sites"])
    files = write_outputs(collect(s, r, model), tmp_path)
    text = html.unescape(re.sub(r"<[^>]+>", "", files["report"].read_text()))
    page = parse(files["report"])
    check_sites_table(page, s)
    for x in s["sites"]:
        if not x["feeding_layer"]:
            assert f"{x['name']}: {x['note'] or 'no Linear/Conv'}" in text
    for o in s["opaque"]:
        assert f"{o['module']}: {o['reason']}" in text


def test_run_time_counts_from_the_command_start(tmp_path):
    """The header's run time starts when the command does (the CLI passes its start), not when the scan does."""
    import time

    run = run_inspect(tmp_path, started=time.perf_counter() - 100.0)
    assert 100.0 <= run.summary["elapsed_seconds"] < 200.0
