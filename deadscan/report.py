"""Outputs: ``summary.json`` (stable, documented) and the text table printed by the CLI.

summary.json is what scripts read; its fields are documented in the README and DESIGN.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path

import torch

from . import __version__
from .capacity import Capacity
from .checkpoint import CheckpointInfo, write_text_atomic
from .scan import ScanResult

SCHEMA_VERSION = 1

DEFINITIONS = {
    "site": "one call of relu in the traced graph (nn.ReLU, F.relu, torch.relu, Tensor.relu, in-place forms, "
            "ReLU6); a ReLU module called twice is two sites",
    "feeding_layer": "the Linear or Conv whose output reaches the site through per-feature ops only (bias add, "
                     "BatchNorm in eval, Dropout, Identity, scalar mul); none after a residual add, concat or "
                     "LayerNorm: such sites are scanned and reported, never stripped",
    "consumer_layer": "the Linear or Conv reading the site's output through per-feature ops only",
    "neuron": "one output feature of a Linear (over batch and tokens) or one output channel of a Conv "
              "(over batch and space)",
    "dead": "output exactly zero for every element of the scanned data",
    "provably_dead": "dead whatever the data: inputs come from a ReLU (non-negative) and all incoming weights and "
                     "the bias, signed by the per-feature scale after the layer, are <= 0",
    "dormant": "ReDo score s_i = mean|h_i| / mean_k mean|h_k| <= tau (dead neurons are dormant too)",
    "hidden_params": "weights and biases of every feeding layer, plus the consumer layers' weights that read "
                     "those neurons, each counted once",
    "inactive_params": "pruned weights; a dead neuron's incoming weights and bias; consumer weights reading a "
                       "dead neuron; each counted once",
    "active_percent": "100 * (hidden_params - inactive_params) / hidden_params",
    "active_percent_feeding_weights": "the same over feeding-layer weights only (the reference code's figure)",
    "per_site_params": "a layer that consumes one site and feeds the next counts in both sites' figures; "
                       "totals count it once",
}


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 4)


def build_summary(scan: ScanResult, cap: Capacity, *, command: str, checkpoint: CheckpointInfo | None,
                  data: dict, elapsed: float) -> dict:
    sites = []
    for r in scan.sites:
        s = r.site
        c = cap.sites.get(s.name)
        sites.append({
            "name": s.name,
            "feeding_layer": s.feeding.layer if s.feeding else None,
            "consumer_layer": s.consumer.layer if s.consumer else None,
            "kind": s.activation,
            "call": s.call,
            "layer_kind": s.feeding.kind if s.feeding else None,
            "neurons": r.neurons,
            "dead": int(r.dead.sum()),
            "dead_indices": r.dead_indices,
            "provably_dead": int(r.provably_dead.sum()),
            "dormant": int(r.dormant.sum()),
            "strippable": s.strippable,
            "hidden_params": c.hidden_params if c else 0,
            "inactive_params": c.inactive_params if c else 0,
            "active_percent": _num(c.active_percent) if c else None,
            "note": s.note,
        })
    totals = {
        "sites": len(scan.sites),
        "neurons": scan.neurons,
        "dead": scan.dead,
        "provably_dead": sum(x["provably_dead"] for x in sites),
        "dormant": sum(x["dormant"] for x in sites),
        "hidden_params": cap.hidden_params,
        "inactive_params": cap.inactive_params,
        "active_percent": _num(cap.active_percent),
        "active_percent_feeding_weights": _num(cap.active_percent_feeding_weights),
        "pruned_weights": cap.pruned_weights,
        "tau": scan.tau,
    }
    return {
        "schema_version": SCHEMA_VERSION,
        "deadscan_version": __version__,
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_seconds": round(elapsed, 3),
        "command": command,
        "checkpoint": None if checkpoint is None else {
            "path": checkpoint.path, "sha256": checkpoint.sha256, "format": checkpoint.format, "arch": checkpoint.arch,
        },
        "data": data,
        "device": scan.device,
        "definitions": DEFINITIONS,
        "totals": totals,
        "sites": sites,
        "opaque": [{"module": o.module, "reason": o.reason} for o in scan.sitemap.opaque],
    }


def write_summary(summary: dict, out_dir: str | Path) -> Path:
    path = Path(out_dir) / "summary.json"
    write_text_atomic(path, json.dumps(summary, indent=2) + "\n")
    return path


def format_table(summary: dict) -> str:
    """The per-site table and totals printed by ``deadscan inspect``."""
    t = summary["totals"]
    lines = []
    if not summary["sites"]:
        lines.append("No ReLU sites found: nothing in this model can die the ReLU way "
                     "(GELU, SiLU, tanh and friends keep a gradient below zero).")
    else:
        head = ("site", "feeding layer", "neurons", "dead", "dead%", "provable", "dormant", "%A")
        rows = [head]
        for s in summary["sites"]:
            pct = 100.0 * s["dead"] / s["neurons"] if s["neurons"] else 0.0
            rows.append((s["name"], s["feeding_layer"] or "-", str(s["neurons"]), str(s["dead"]), f"{pct:.1f}",
                         str(s["provably_dead"]), str(s["dormant"]),
                         "-" if s["active_percent"] is None else f"{s['active_percent']:.1f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
    pct = 100.0 * t["dead"] / t["neurons"] if t["neurons"] else 0.0
    lines.append("")
    lines.append(f"sites {t['sites']}  neurons {t['neurons']}  dead {t['dead']} ({pct:.1f}%)  "
                 f"provably dead {t['provably_dead']}  dormant {t['dormant']} (tau {t['tau']})")
    lines.append(f"%A {t['active_percent']:.2f} of {t['hidden_params']} hidden params "
                 f"({t['inactive_params']} inactive); feeding weights only {t['active_percent_feeding_weights']:.2f}")
    for o in summary["opaque"]:
        lines.append(f"opaque (not traced): {o['module']}: {o['reason']}")
    for s in summary["sites"]:
        if s["note"] and not s["strippable"] and "residual" not in s["note"]:
            lines.append(f"note: {s['name']}: {s['note']}")
    return "\n".join(lines)
