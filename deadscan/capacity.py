"""%A: the share of hidden parameters still able to learn (DESIGN.md "Definitions").

Hidden parameters P: weight and bias of every feeding layer, plus the weights of consumer layers
that read those neurons. Inactive: pruned weights; a dead neuron's incoming weights and bias; the
consumer weights reading a dead neuron. A gated site (relu(gate(x)) * up(x)) adds its partner layer
(up) to P like a second feeding layer: a dead neuron's partner row and bias are inactive too, since the
product is zero whatever they hold. The reference figure (feeding-layer weights only) leaves it out. Totals count each parameter once; per-site figures count
a layer shared by two sites (consumer of one, feeder of the next) in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .layers import Kind, entry, neuron_rows, reader
from .scan import ScanResult


@dataclass(frozen=True)
class SiteCapacity:
    hidden_params: int
    inactive_params: int

    @property
    def active_percent(self) -> float:
        return percent(self.hidden_params, self.inactive_params)


@dataclass(frozen=True)
class Capacity:
    sites: dict[str, SiteCapacity]  # by site name; sites without a feeding layer are absent
    hidden_params: int
    inactive_params: int
    feeding_weights: int  # feeding-layer weights only (the reference code's denominator)
    inactive_feeding_weights: int
    pruned_weights: int

    @property
    def active_percent(self) -> float:
        return percent(self.hidden_params, self.inactive_params)

    @property
    def active_percent_feeding_weights(self) -> float:
        return percent(self.feeding_weights, self.inactive_feeding_weights)


def percent(total: int, inactive: int) -> float:
    return 100.0 * (total - inactive) / total if total else 100.0


class _Layer:
    """Row (neuron) and column (input) dead marks of one weight, gathered from every site."""

    def __init__(self, module: nn.Module, name: str):
        self.kind: Kind = entry(module, name)
        w = self.kind.rows(module.weight)  # (neurons, fan_in, *kernel) whatever the stored layout
        self.module = module
        self.out, self.inp = w.shape[0], w.shape[1]
        self.kernel = int(np.prod(w.shape[2:])) if w.ndim > 2 else 1
        self.rows = np.zeros(self.out, dtype=bool)  # set when this layer feeds a site
        self.cols = np.zeros(self.inp, dtype=bool)  # set when this layer consumes a site
        self.feeds = self.consumes = False
        self.partner = False  # set when this layer is a gated site's partner (rows like a feeding layer)
        self.bias = module.bias.numel() if getattr(module, "bias", None) is not None else 0

    def mask_rows(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        return None if mask is None else self.kind.rows(mask)


def capacity(model: nn.Module, scan: ScanResult, masks: dict[str, torch.Tensor] | None = None) -> Capacity:
    """Count hidden and inactive parameters. ``masks``: layer name -> bool tensor, True = pruned."""
    masks = masks or {}
    layers: dict[str, _Layer] = {}

    def layer(name: str) -> _Layer:
        if name not in layers:
            layers[name] = _Layer(model.get_submodule(name), name)
        return layers[name]

    per_site: dict[str, SiteCapacity] = {}
    for r in scan.sites:
        f = r.site.feeding
        if f is None or r.neurons == 0:
            continue
        neuron_rows(model.get_submodule(f.layer), f.layer, r.neurons)  # a mismatch fails, never skips
        feed = layer(f.layer)
        feed.feeds = True
        feed.rows |= r.dead
        hidden = feed.out * feed.inp * feed.kernel + feed.bias
        dead = int(r.dead.sum())
        inactive = dead * (feed.inp * feed.kernel + (1 if feed.bias else 0))
        inactive += _pruned_outside(feed.mask_rows(masks.get(f.layer)), r.dead, None)
        c = r.site.consumer
        if c is not None:
            reader(model.get_submodule(c.layer), c.layer, r.neurons * c.group)
            cons = layer(c.layer)
            cons.consumes = True
            cols = np.repeat(r.dead, c.group)
            cons.cols |= cols
            hidden += cons.out * cons.inp * cons.kernel
            inactive += int(cols.sum()) * cons.out * cons.kernel
        g = r.site.gate
        if g is not None:
            neuron_rows(model.get_submodule(g.layer), g.layer, r.neurons)
            up = layer(g.layer)
            up.partner = True
            up.rows |= r.dead
            hidden += up.out * up.inp * up.kernel + up.bias
            inactive += dead * (up.inp * up.kernel + (1 if up.bias else 0))
            inactive += _pruned_outside(up.mask_rows(masks.get(g.layer)), r.dead, None)
        per_site[r.site.name] = SiteCapacity(hidden, inactive)

    hidden = inactive = feeding_w = inactive_fw = pruned = 0
    for name, L in layers.items():
        if not (L.feeds or L.consumes or L.partner):
            continue
        weights = L.out * L.inp * L.kernel
        r, c = int(L.rows.sum()), int(L.cols.sum())
        rows_owner = L.feeds or L.partner  # its bias is hidden and a dead row's bias inactive
        hidden += weights + (L.bias if rows_owner else 0)
        # rows + columns - overlap, plus pruned weights outside them
        inactive += (r * L.inp + c * L.out - r * c) * L.kernel + (r if rows_owner and L.bias else 0)
        mask = L.mask_rows(masks.get(name))
        inactive += _pruned_outside(mask, L.rows, L.cols)
        pruned += int(mask.sum()) if mask is not None else 0
        if L.feeds:
            feeding_w += weights
            inactive_fw += r * L.inp * L.kernel + _pruned_outside(mask, L.rows, None)
    return Capacity(per_site, hidden, inactive, feeding_w, inactive_fw, pruned)


def _pruned_outside(mask: torch.Tensor | None, rows: np.ndarray, cols: np.ndarray | None) -> int:
    """Pruned weights not already counted as a dead row or column (inclusion-exclusion, on the
    mask's device; no copy of the mask)."""
    if mask is None:
        return 0
    m = mask.detach()
    m = m.flatten(2) if m.ndim > 2 else m[..., None]  # (out, in, kernel)
    r = torch.from_numpy(rows).to(m.device)
    outside = m.sum() - m[r].sum()
    if cols is not None:
        c = torch.from_numpy(cols).to(m.device)
        outside = outside - m[:, c].sum() + m[r][:, c].sum()
    return int(outside)
