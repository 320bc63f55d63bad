"""report.html of a language-model-sized scan (96 sites x 30,000 neurons) stays small and readable.

The ReportData is synthetic (numpy arrays shaped like a scan of a 96-layer model on 10^6 tokens), so
no model is needed. Sizes are measured with ``plotlyjs="cdn"``: plotly.js itself (about 4.5 MB) is
the same in every report.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from deadscan.figures import MANY_SITES
from deadscan.report import DEFINITIONS, render_report
from deadscan.reportdata import Hist, ReportData, SiteData

SITES, NEURONS, ELEMENTS = 96, 30_000, 1_000_000
MAX_BYTES = 3_000_000


def synthetic_report(sites: int = SITES, neurons: int = NEURONS, seed: int = 0) -> ReportData:
    """An OPT-like scan: frequencies log-uniform over 6 decades, the dead share growing with depth."""
    rng = np.random.default_rng(seed)
    edges = np.linspace(-0.2, 0.2, 61)
    rows, data = [], []
    for i in range(sites):
        active = np.round(10 ** rng.uniform(-6, 0, neurons) * ELEMENTS).astype(np.int64)
        active[rng.random(neurons) < 0.02 + 0.5 * i / max(sites - 1, 1)] = 0
        dead = active == 0
        score = rng.random(neurons)
        dormant = dead | (score < 0.01)
        info = {"name": f"model.decoder.layers.{i}.activation_fn", "feeding_layer": f"model.decoder.layers.{i}.fc1",
                "consumer_layer": f"model.decoder.layers.{i}.fc2", "gate_partner": None, "kind": "relu",
                "call": "activation_fn", "layer_kind": "linear", "neurons": neurons, "dead": int(dead.sum()),
                "dead_indices": np.flatnonzero(dead).tolist(), "provably_dead": 0, "dormant": int(dormant.sum()),
                "strippable": True, "hidden_params": 2 * neurons * 4097, "inactive_params": int(dead.sum()) * 2 * 4097,
                "active_percent": round(100.0 * (1 - dead.mean()), 4), "note": ""}
        rows.append(info)
        pre_max = np.where(dead, -rng.exponential(1.0, neurons), rng.exponential(1.0, neurons)).astype(np.float32)
        data.append(SiteData(
            info=info, out_sum=active * 0.1, active=active, elements=ELEMENTS, pre_max=pre_max,
            provably_dead=np.zeros(neurons, bool), dormant=dormant, score=score,
            weights=Hist(edges, {"dead": rng.integers(0, 10**6, 60), "healthy": rng.integers(0, 10**7, 60)})))
    n, d = sites * neurons, sum(r["dead"] for r in rows)
    summary = {
        "schema_version": 1, "deadscan_version": "test", "torch_version": "test", "created": "2026-01-01T00:00:00+00:00",
        "elapsed_seconds": 600.0, "command": "deadscan inspect opt-big --data corpus.txt --seq-len 512",
        "checkpoint": {"path": "opt-big", "sha256": "0" * 64, "format": "huggingface", "arch": None},
        "data": {"name": "corpus.txt", "split": "all", "samples": 2000, "kind": "tokens", "tokens": ELEMENTS},
        "device": "cuda", "definitions": DEFINITIONS,
        "totals": {"sites": sites, "neurons": n, "dead": d, "provably_dead": 0,
                   "dormant": sum(r["dormant"] for r in rows), "hidden_params": sum(r["hidden_params"] for r in rows),
                   "inactive_params": sum(r["inactive_params"] for r in rows), "active_percent": 100.0 * (1 - d / n),
                   "active_percent_feeding_weights": 100.0 * (1 - d / n), "pruned_weights": 0, "tau": 0.025},
        "sites": rows, "opaque": []}
    pooled = Hist(edges, {"dead": rng.integers(0, 10**8, 60), "healthy": rng.integers(0, 10**9, 60)})
    return ReportData(summary, data, pooled)


def specs_of(html: str) -> dict[str, dict]:
    return {m.group(1): json.loads(m.group(2)) for m in
            re.finditer(r'<script type="application/json" id="spec-([^"]+)">(.*?)</script>', html, re.S)}


def _longest_list(obj) -> int:
    if isinstance(obj, dict):
        return max((_longest_list(v) for v in obj.values()), default=0)
    if isinstance(obj, list):
        return max([len(obj)] + [_longest_list(v) for v in obj])
    return 0


@pytest.fixture(scope="module")
def big():
    data = synthetic_report()
    return data, render_report(data, plotlyjs="cdn")


def test_big_report_is_small(big):
    data, html = big
    size = len(html.encode("utf-8"))
    assert size < MAX_BYTES, size
    # no per-neuron JSON: doubling every site's width leaves the size where it was
    wider = len(render_report(synthetic_report(neurons=2 * NEURONS), plotlyjs="cdn").encode("utf-8"))
    assert wider < 1.1 * size, (size, wider)
    for fid, spec in specs_of(html).items():  # every array is per bin, per site or per menu entry
        assert _longest_list(spec) <= max(SITES, 200), fid
        assert len(spec["data"]) <= 2 * 61, fid


def test_big_report_figures(big):
    data, html = big
    specs = specs_of(html)
    assert list(specs) == ["dead-per-site", "frequency", "frequency-by-site", "weights", "pre-max"]
    rows = data.summary["sites"]
    # dead % across depth: one bar per site, in model order
    bars = specs["dead-per-site"]["data"][0]
    assert bars["x"] == list(range(1, SITES + 1))
    assert bars["y"] == pytest.approx([100.0 * r["dead"] / r["neurons"] for r in rows])
    assert [c[0] for c in bars["customdata"]] == [r["name"] for r in rows]
    # frequency per site: sites x (zero bin + log bins), counts summing to each site's neurons
    hm = specs["frequency-by-site"]["data"][0]
    assert hm["type"] == "heatmap" and hm["y"] == [r["name"] for r in rows]
    counts = np.asarray(hm["customdata"])
    assert counts.shape == (SITES, len(hm["x"])) and hm["x"][0] == "0 (dead)"
    assert counts[:, 0].tolist() == [r["dead"] for r in rows]
    assert counts.sum(axis=1).tolist() == [NEURONS] * SITES
    assert hm["x"][1].startswith("1e-6")  # log bins reach the rarest firing neuron (1 in 10^6 tokens)
    # the pooled frequency histogram: no per-site dropdown with this many sites
    freq = specs["frequency"]
    assert len(freq["data"]) == 2 and "updatemenus" not in freq["layout"]
    assert freq["data"][0]["y"] == [data.summary["totals"]["dead"]]
    assert sum(v or 0 for v in freq["data"][1]["y"]) == SITES * NEURONS - data.summary["totals"]["dead"]
    # the sites table: one row per site
    assert html.count('<tr data-site="') == SITES


def test_few_sites_keep_the_per_site_dropdown():
    data = synthetic_report(sites=MANY_SITES, neurons=500)
    specs = specs_of(render_report(data, plotlyjs="cdn"))
    assert "frequency-by-site" not in specs
    assert len(specs["frequency"]["layout"]["updatemenus"][0]["buttons"]) == MANY_SITES + 1
