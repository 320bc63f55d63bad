"""A run folder as tables: ``deadscan.read_run(folder)`` and the ``--csv`` outputs (sites.csv, neurons.csv).

Everything is read through :func:`deadscan.stats_h5.read_stats` (the checked reader): no torch, no model.
The tables are pandas DataFrames when pandas is installed; the CSV files need only the csv module.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import DeadscanError

SITE_COLUMNS = ("site", "feeding_layer", "consumer_layer", "kind", "neurons", "elements", "dead", "dead_percent",
                "provably_dead", "dormant", "strippable", "hidden_params", "inactive_params", "active_percent")
NEURON_COLUMNS = ("site", "neuron", "dead", "provably_dead", "dormant", "frequency", "sum", "max", "pre_max",
                  "score")
CSV_FILES = {"sites": "sites.csv", "neurons": "neurons.csv"}


def site_rows(data) -> list[dict]:
    """One dict per site of a :class:`~deadscan.reportdata.ReportData`, in model order."""
    rows = []
    for s in data.sites:
        i = s.info
        n = i["neurons"]
        rows.append({"site": i["name"], "feeding_layer": i.get("feeding_layer"),
                     "consumer_layer": i.get("consumer_layer"), "kind": i.get("kind"), "neurons": n,
                     "elements": s.elements, "dead": i["dead"],
                     "dead_percent": 100.0 * i["dead"] / n if n else 0.0, "provably_dead": i["provably_dead"],
                     "dormant": i["dormant"], "strippable": i["strippable"], "hidden_params": i["hidden_params"],
                     "inactive_params": i["inactive_params"], "active_percent": i.get("active_percent")})
    return rows


def neuron_rows(data) -> list[dict]:
    """One dict per neuron: site name, index within the site, flags and statistics."""
    rows = []
    for s in data.sites:
        dead, prov, dorm = s.dead, s.provably_dead, s.dormant
        freq, total, top, pre, score = s.frequency, s.out_sum, s.out_max, s.pre_max, s.score
        for j in range(s.neurons):
            rows.append({"site": s.name, "neuron": j, "dead": bool(dead[j]), "provably_dead": bool(prov[j]),
                         "dormant": bool(dorm[j]), "frequency": float(freq[j]), "sum": float(total[j]),
                         "max": float(top[j]), "pre_max": float(pre[j]), "score": float(score[j])})
    return rows


def write_csv(data, out_dir: str | Path) -> dict[str, Path]:
    """sites.csv and neurons.csv in ``out_dir`` (each written atomically); returns their paths."""
    from .outputs import atomic_path

    out_dir = Path(out_dir)
    written = {}
    for key, rows, columns in (("sites", site_rows(data), SITE_COLUMNS),
                               ("neurons", neuron_rows(data), NEURON_COLUMNS)):
        path = out_dir / CSV_FILES[key]
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows({k: _cell(v) for k, v in r.items()} for r in rows)
        written[key] = path
    return written


def _cell(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return repr(v)  # round-trips exactly
    return v


@dataclass
class Run:
    """One run folder's data. ``sites``, ``neurons`` and ``history`` are pandas DataFrames."""

    folder: Path
    summary: dict  # summary.json's content, as stats.h5 stores it
    data: object  # the ReportData read from stats.h5

    @property
    def is_strip(self) -> bool:
        return bool(self.summary.get("history"))

    @property
    def sites(self):
        """One row per site, in model order (summary.json's per-site counts, plus elements scanned)."""
        return _pandas().DataFrame(site_rows(self.data), columns=list(SITE_COLUMNS))

    @property
    def neurons(self):
        """One row per neuron: site, neuron (index in the site), dead, provably_dead, dormant (includes the
        dead), frequency, sum, max, pre_max, score."""
        return _pandas().DataFrame(neuron_rows(self.data), columns=list(NEURON_COLUMNS))

    @property
    def history(self):
        """A strip run's per-epoch history (summary.json's ``history``); an empty table for an inspect run."""
        rows = [{k: v for k, v in r.items() if not isinstance(v, (dict, list))}
                for r in self.summary.get("history") or []]
        return _pandas().DataFrame(rows)


def _pandas():
    try:
        import pandas
    except ImportError:
        pandas = None
    if pandas is None:
        raise DeadscanError("deadscan.read_run returns pandas tables and pandas is not installed; "
                            "pip install pandas (or write CSV files with deadscan inspect --csv)")
    return pandas


def read_run(folder: str | Path) -> Run:
    """Read a run folder (or its stats.h5) written by ``deadscan inspect`` or ``strip``.

    ``run.sites``, ``run.neurons`` and ``run.history`` are pandas DataFrames (pandas needed: a clear
    DeadscanError says so); ``run.summary`` is summary.json's content."""
    from .stats_h5 import read_stats

    _pandas()  # fail before reading anything
    path = Path(folder)
    data = read_stats(path)
    return Run(path if path.is_dir() else path.parent, data.summary, data)
