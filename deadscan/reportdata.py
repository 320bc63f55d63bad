"""The data a report renders from: one plain object, built from a live run or read from stats.h5.

:class:`ReportData` holds ``summary`` (the summary.json dict), per-site per-neuron arrays (small:
one number per neuron) and weight histograms as bin counts. Weight values themselves never leave
the model: :func:`collect` histograms them where they live (``torch.histc`` on the weights' device)
and keeps only counts, so a report can be re-rendered post hoc (``deadscan report stats.h5``)
without the model or the data. :mod:`deadscan.stats_h5` writes and reads this object;
:mod:`deadscan.figures` turns it into plotly figures; :mod:`deadscan.report` renders HTML.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

import numpy as np

from .neurons import PerNeuron

if TYPE_CHECKING:  # torch is imported by the functions that build from a live model, not by readers
    import torch
    from torch import nn

    from .scan import ScanResult
    from .trace import SiteMap

WEIGHT_BINS = 60


@dataclass
class Hist:
    """Bin counts of one or more series over shared bin ``edges`` (len(edges) == bins + 1)."""

    edges: np.ndarray  # float64
    series: dict[str, np.ndarray]  # name -> int64 counts, e.g. {"dead": ..., "healthy": ...}
    attrs: dict = field(default_factory=dict)  # e.g. {"neurons": 12, "pruned_excluded": 40}

    @property
    def centers(self) -> np.ndarray:
        return (self.edges[:-1] + self.edges[1:]) / 2

    @property
    def widths(self) -> np.ndarray:
        return np.diff(self.edges)

    def total(self, name: str) -> int:
        return int(self.series[name].sum())


@dataclass
class SiteData(PerNeuron):
    """One site: its summary row and its per-neuron statistics (numpy)."""

    info: dict  # the site's row in summary["sites"]
    out_sum: np.ndarray  # float64, sum of outputs over the scanned data
    active: np.ndarray  # int64, elements with output > 0
    elements: int  # elements per neuron scanned
    pre_max: np.ndarray  # float32, max pre-activation
    provably_dead: np.ndarray  # bool
    dormant: np.ndarray  # bool
    score: np.ndarray  # float64, ReDo score
    mean_input: np.ndarray | None = None  # feeding layer's mean input per input feature
    weights: Hist | None = None  # incoming weights of dead vs healthy neurons ("dead", "healthy")
    revived: Hist | None = None  # incoming weights of revived neurons ("before", "after" fine-tuning)

    @property
    def name(self) -> str:
        return self.info["name"]

    @property
    def activation(self) -> str:
        return self.info.get("kind", "relu")


@dataclass
class ReportData:
    summary: dict
    sites: list[SiteData]
    weights_pooled: Hist | None = None  # all sites' incoming weights, dead vs healthy, shared bins
    revived_pooled: Hist | None = None  # all revived neurons' incoming weights, before vs after
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> bool (True = pruned); for stats.h5
    source: str = ""  # "" for a live run, else the stats.h5 path it was read from

    @property
    def is_strip(self) -> bool:
        return bool(self.summary.get("history"))


# ---------------------------------------------------------------------------------------------
# Building from a live run


def capture_weights(model: nn.Module, sitemap: SiteMap) -> dict[str, torch.Tensor]:
    """CPU copies of every feeding layer's incoming weights, rows signed by the effective sign.

    Taken before fine-tuning so :func:`collect` can histogram revived neurons' weights before and
    after (the model is trained in place). Flattened to (neurons, fan_in), float32.
    """
    import torch

    from .layers import entry
    from .trace import effective_affine

    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for s in sitemap.sites:
            f = s.feeding
            if f is None or f.layer in out:
                continue
            layer = model.get_submodule(f.layer)
            w = entry(layer, f.layer).rows(layer.weight).detach()
            sign = torch.sign(effective_affine(model, f)[0])
            out[f.layer] = (w.float().flatten(1) * _nonzero_sign(sign)[:, None]).cpu()
    return out


def _nonzero_sign(sign: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.where(sign == 0, torch.ones_like(sign), sign)


def _signed_rows(model: nn.Module, r) -> torch.Tensor | None:
    """A site's effective incoming weights, (neurons, fan_in) float32; None without a feeding layer."""
    import torch

    from .layers import neuron_rows
    from .trace import effective_affine

    f = r.site.feeding
    if f is None or r.neurons == 0:
        return None
    w = neuron_rows(model.get_submodule(f.layer), f.layer, r.neurons).detach()
    with torch.no_grad():
        sign = _nonzero_sign(torch.sign(effective_affine(model, f)[0]))
        return w.float().flatten(1) * sign[:, None]


def _mask_rows(model: nn.Module, name: str, masks: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Layer ``name``'s mask (shaped like its weight) read as rows, like :func:`_signed_rows`."""
    from .layers import entry

    mask = masks.get(name)
    return None if mask is None else entry(model.get_submodule(name), name).rows(mask)


def _range(*tensors: torch.Tensor) -> tuple[float, float] | None:
    import torch

    vals = [t for t in tensors if t.numel()]
    # NaN/Inf weights (a damaged checkpoint, warned about at load) are left out of the range and the bins
    lows = [float(torch.where(torch.isfinite(t), t, torch.inf).min()) for t in vals]
    highs = [float(torch.where(torch.isfinite(t), t, -torch.inf).max()) for t in vals]
    lows, highs = [v for v in lows if math.isfinite(v)], [v for v in highs if math.isfinite(v)]
    if not lows:
        return None
    lo, hi = min(lows), max(highs)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def _histc(t: torch.Tensor, lo: float, hi: float, bins: int) -> np.ndarray:
    import torch

    if t.numel() == 0:
        return np.zeros(bins, dtype=np.int64)
    t = torch.where(torch.isfinite(t), t.float(), -torch.inf)  # NaN/Inf moved out of the range: histc skips them
    return torch.histc(t, bins=bins, min=lo, max=hi).round().to(torch.int64).cpu().numpy()


def _hist(parts: dict[str, torch.Tensor], bins: int, rng: tuple[float, float] | None = None,
          attrs: dict | None = None) -> Hist | None:
    rng = rng or _range(*parts.values())
    if rng is None:
        return None
    edges = np.linspace(rng[0], rng[1], bins + 1)
    return Hist(edges, {k: _histc(v, *rng, bins) for k, v in parts.items()}, dict(attrs or {}))


def revived_neurons(summary: dict, scan: ScanResult) -> dict[str, np.ndarray]:
    """Site -> indices of neurons dead at some detection during fine-tuning and alive at the end."""
    seen: dict[str, set[int]] = {}
    for row in summary.get("history") or []:
        for name, idx in (row.get("revived_neurons") or {}).items():
            seen.setdefault(name, set()).update(int(i) for i in idx)
    out = {}
    for r in scan.sites:
        idx = np.array(sorted(seen.get(r.site.name, ())), dtype=np.int64)
        idx = idx[idx < r.neurons]
        idx = idx[~r.dead[idx]] if idx.size else idx
        if idx.size:
            out[r.site.name] = idx
    return out


def collect(summary: dict, scan: ScanResult, model: nn.Module, *, masks: dict[str, torch.Tensor] | None = None,
            before: dict[str, torch.Tensor] | None = None, bins: int = WEIGHT_BINS) -> ReportData:
    """Everything a report needs from a live run: per-neuron arrays and weight histograms.

    ``masks``: pruning masks (True = pruned); pruned weights are left out of the histograms.
    ``before``: :func:`capture_weights` taken before fine-tuning, for the revived neurons' histograms.
    Weights are histogrammed one layer at a time on their device (two passes: per site, then over
    the pooled range), so no copy of the model's weights is kept.
    """
    import torch

    masks = masks or {}
    rows = {s["name"]: s for s in summary["sites"]}
    rev_idx = revived_neurons(summary, scan) if before is not None else {}
    sites: list[SiteData] = []
    for r in scan.sites:
        sites.append(SiteData(
            info=rows[r.site.name], out_sum=np.asarray(r.out_sum, dtype=np.float64),
            active=np.asarray(r.active, dtype=np.int64), elements=int(r.elements),
            pre_max=np.asarray(r.pre_max, dtype=np.float32), provably_dead=np.asarray(r.provably_dead, dtype=bool),
            dormant=np.asarray(r.dormant, dtype=bool), score=np.asarray(r.score, dtype=np.float64),
            mean_input=None if r.mean_input is None else np.asarray(r.mean_input, dtype=np.float32)))

    def weight_parts(r) -> dict[str, torch.Tensor] | None:
        w = _signed_rows(model, r)
        if w is None:
            return None
        dead = torch.from_numpy(np.asarray(r.dead)).to(w.device)
        mask = _mask_rows(model, r.site.feeding.layer, masks)
        if mask is None:
            return {"dead": w[dead].flatten(), "healthy": w[~dead].flatten()}
        keep = ~mask.detach().to(w.device, torch.bool).flatten(1)
        return {"dead": w[dead][keep[dead]], "healthy": w[~dead][keep[~dead]]}

    def revived_parts(r) -> tuple[dict[str, torch.Tensor], dict] | None:
        idx = rev_idx.get(r.site.name)
        b = (before or {}).get(r.site.feeding.layer) if r.site.feeding is not None else None
        w = _signed_rows(model, r) if idx is not None and b is not None and b.shape[0] == r.neurons else None
        if w is None:
            return None
        ti = torch.from_numpy(idx).to(w.device)
        after, pruned = w[ti], 0
        mask = _mask_rows(model, r.site.feeding.layer, masks)
        if mask is not None:
            keep = ~mask.detach().to(w.device, torch.bool).flatten(1)[ti]
            pruned = int((~keep).sum())
            after = after[keep]
        return ({"before": b[torch.from_numpy(idx)].flatten(), "after": after.flatten()},
                {"neurons": int(idx.size), "pruned_excluded": pruned})

    by_name = {s.name: s for s in sites}
    w_ranges, r_ranges, rev_attrs = [], [], {"neurons": 0, "pruned_excluded": 0}
    for r in scan.sites:  # pass 1: per-site histograms over the site's own range
        parts = weight_parts(r)
        if parts is not None:
            h = _hist(parts, bins)
            by_name[r.site.name].weights = h
            if h is not None:
                w_ranges.append((h.edges[0], h.edges[-1]))
        got = revived_parts(r)
        if got is not None:
            h = _hist(got[0], bins, attrs=got[1])
            by_name[r.site.name].revived = h
            if h is not None:
                r_ranges.append((h.edges[0], h.edges[-1]))
                for k in rev_attrs:
                    rev_attrs[k] += got[1][k]
    pooled = pooled_rev = None
    if w_ranges:  # pass 2: the same weights over one shared range
        rng = (min(a for a, _ in w_ranges), max(b for _, b in w_ranges))
        pooled = Hist(np.linspace(*rng, bins + 1), {"dead": np.zeros(bins, np.int64), "healthy": np.zeros(bins, np.int64)})
        for r in scan.sites:
            parts = weight_parts(r) if by_name[r.site.name].weights is not None else None
            for k, v in (parts or {}).items():
                pooled.series[k] += _histc(v, *rng, bins)
    if r_ranges:
        rng = (min(a for a, _ in r_ranges), max(b for _, b in r_ranges))
        pooled_rev = Hist(np.linspace(*rng, bins + 1), {"before": np.zeros(bins, np.int64),
                                                        "after": np.zeros(bins, np.int64)}, rev_attrs)
        for r in scan.sites:
            got = revived_parts(r) if by_name[r.site.name].revived is not None else None
            for k, v in (got[0] if got else {}).items():
                pooled_rev.series[k] += _histc(v, *rng, bins)
    np_masks = {k: v.detach().cpu().numpy().astype(bool) for k, v in masks.items()}
    return ReportData(summary, sites, pooled, pooled_rev, np_masks)


