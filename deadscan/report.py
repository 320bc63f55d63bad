"""Outputs: ``summary.json`` (stable, documented), the text table printed by the CLI, and the HTML
reports (report.html, compare.html) rendered from a :class:`deadscan.reportdata.ReportData`.

summary.json is what scripts read; its fields are documented in the README and DESIGN.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .defaults import DEFAULTS
from .runfolder import summary_json

if TYPE_CHECKING:  # deadscan report and compare only read: they never import torch
    from .capacity import Capacity
    from .checkpoint import CheckpointInfo
    from .scan import ScanResult

SCHEMA_VERSION = 1

DEFINITIONS = {
    "site": "one call of relu in the traced graph (nn.ReLU, F.relu, torch.relu, Tensor.relu, in-place forms, "
            "ReLU6); a ReLU module called twice is two sites",
    "feeding_layer": "the Linear, Conv or Hugging Face Conv1D whose output reaches the site through per-feature ops only (bias add, "
                     "BatchNorm in eval, Dropout, Identity, scalar mul); none after a residual add, concat or "
                     "LayerNorm: such sites are scanned and reported, never stripped",
    "consumer_layer": "the Linear, Conv or Hugging Face Conv1D reading the site's output through per-feature ops only",
    "neuron": "one output feature of a Linear (over batch and tokens) or one output channel of a Conv "
              "(over batch and space); Hugging Face's transposed Conv1D (GPT-2) stores its weight as "
              "(in, out), so a neuron is a column",
    "gated_site": "relu(gate(x)) * up(x) (Llama/Mistral with hidden_act relu): the feeding layer is the gate, "
                  "whose dead neuron zeroes the product; up is its gate partner and down its consumer",
    "dead": "output exactly zero for every element of the scanned data; with token data, padded positions "
            "(attention_mask 0) are never part of the scanned data",
    "provably_dead": "dead whatever the data: inputs come from a ReLU (non-negative) and all incoming weights and "
                     "the bias, signed by the per-feature scale after the layer, are <= 0",
    "dormant": "ReDo score s_i = mean|h_i| / mean_k mean|h_k| <= tau (dead neurons are dormant too)",
    "hidden_params": "weights and biases of every feeding layer (and of a gated site's partner), plus the "
                     "consumer layers' weights that read those neurons, each counted once",
    "inactive_params": "pruned weights; a dead neuron's incoming weights and bias (and its partner row); "
                       "consumer weights reading a dead neuron; each counted once",
    "active_percent": "100 * (hidden_params - inactive_params) / hidden_params",
    "active_percent_feeding_weights": "the same over feeding-layer weights only (the reference code's figure)",
    "per_site_params": "a layer that consumes one site and feeds the next counts in both sites' figures; "
                       "totals count it once",
}


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 4)


def start_state(scan: ScanResult, cap: Capacity) -> dict:
    """summary.json "start": a strip run's scan of its input checkpoint, before any training."""
    return {"dead": scan.dead, "neurons": scan.neurons, "active_percent": _num(cap.active_percent),
            "active_percent_feeding_weights": _num(cap.active_percent_feeding_weights),
            "sites": {r.site.name: {"dead": int(r.dead.sum()),
                                    "active_percent": _num(cap.sites[r.site.name].active_percent)
                                    if r.site.name in cap.sites else None} for r in scan.sites}}


def build_summary(scan: ScanResult, cap: Capacity, *, command: str, checkpoint: CheckpointInfo | None,
                  data: dict, elapsed: float) -> dict:
    import torch

    sites = []
    for r in scan.sites:
        s = r.site
        c = cap.sites.get(s.name)
        sites.append({
            "name": s.name,
            "feeding_layer": s.feeding.layer if s.feeding else None,
            "consumer_layer": s.consumer.layer if s.consumer else None,
            "gate_partner": s.gate.layer if s.gate else None,  # gated site: the layer multiplied with the ReLU
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
            "nonfinite": list(getattr(checkpoint, "nonfinite", ())),  # layers with NaN/Inf weights (warned about)
            **({"dtype": checkpoint.dtype} if getattr(checkpoint, "dtype", None) else {}),  # the weights' (HF)
        },
        "data": data,
        "device": scan.device,
        "processes": scan.processes,  # torchrun processes that scanned a share of the data each
        "definitions": DEFINITIONS,
        "totals": totals,
        "sites": sites,
        "opaque": [{"module": o.module, "reason": o.reason} for o in scan.sitemap.opaque],
    }


def write_summary(summary: dict, out_dir: str | Path) -> Path:
    from .outputs import write_text_atomic

    path = Path(out_dir) / "summary.json"
    write_text_atomic(path, summary_json(summary, indent=2) + "\n")
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
    if summary["sites"]:
        lines.append("columns: dormant = ReDo score <= tau, dead included (dormant >= dead); %A = percent of the "
                     "hidden parameters still active (not tied to a dead neuron); provable = provably dead")
    for o in summary["opaque"]:
        lines.append(f"opaque (not traced): {o['module']}: {o['reason']}")
    for s in summary["sites"]:
        if s["note"] and not s["strippable"] and "residual" not in s["note"]:
            lines.append(f"note: {s['name']}: {s['note']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# report.html and compare.html: jinja2 templates (top-level templates/, shipped as
# deadscan.templates) rendered from a ReportData; figures come from deadscan.figures.

PLOTLYJS_MODES = ("inline", "cdn", "directory")
PLOTLYJS_FILE = "plotly.min.js"


def templates_dir() -> Path:
    """The folder holding the templates: inside an installed wheel, or the source checkout."""
    from .resources import resource_path
    from .errors import DeadscanError

    template = resource_path("templates", "report.html.j2")
    if not template.is_file():
        raise DeadscanError("deadscan's report templates are missing from this installation; reinstall deadscan")
    return template.parent


def _env():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates_dir())), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["int"] = _fmt_int
    env.filters["pct"] = _fmt_pct
    env.filters["duration"] = _fmt_duration
    return env


def _fmt_int(v) -> str:
    return "\u2013" if v is None else f"{int(v):,}"


def _fmt_pct(v, digits: int = 2) -> str:
    return "\u2013" if v is None else f"{float(v):.{digits}f}"


def _fmt_duration(s) -> str:
    if s is None:
        return "\u2013"
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {sec:02d} s"


def _json_for_script(obj) -> str:
    """JSON safe inside a <script> element: no '<', '>' or '&' survives as itself."""
    from markupsafe import Markup

    text = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    return Markup(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def _plotly_tag(mode: str) -> dict:
    """What the page's <head> needs to load plotly.js once."""
    from markupsafe import Markup
    from plotly.offline import get_plotlyjs, get_plotlyjs_version

    if mode not in PLOTLYJS_MODES:
        raise ValueError(f"plotlyjs must be one of {PLOTLYJS_MODES}, got {mode!r}")
    if mode == "inline":
        return {"inline": Markup(get_plotlyjs().replace("</script", "<\\/script")), "src": None}
    if mode == "cdn":
        return {"inline": None, "src": f"https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js"}
    return {"inline": None, "src": PLOTLYJS_FILE}


def _figures(figs) -> list[dict]:
    return [{"id": f.id, "title": f.title, "caption": f.caption, "wide": f.id in _WIDE,
             "json": _json_for_script(f.spec)} for f in figs]


_WIDE = {"dead-per-site", "frequency-by-site", "pre-max", "compare-sites", "compare-history"}  # full-width figures


def _nonfinite(summary: dict) -> set[str]:
    return set((summary.get("checkpoint") or {}).get("nonfinite") or ())


def _site_nonfinite(site: dict, bad: set[str]) -> list[str]:
    """The layers of a site (feeding, gate partner, consumer) holding NaN or Inf weights."""
    return [x for x in (site.get("feeding_layer"), site.get("gate_partner"), site.get("consumer_layer")) if x in bad]


def warnings_of(summary: dict) -> list[str]:
    """Warnings the run recorded in its summary, as sentences for the page's banner."""
    out = []
    bad = (summary.get("checkpoint") or {}).get("nonfinite") or []
    if bad:
        n = sum(1 for s in summary.get("sites") or [] if _site_nonfinite(s, set(bad)))
        out.append(f"NaN or Inf weights in {len(bad)} layer(s): {', '.join(bad)}. Their neurons output NaN, which "
                   f"counts as dead, so the dead counts and figures of the {n} site(s) marked \u26a0 in the table "
                   "are not meaningful.")
    out += [str(w) for w in summary.get("warnings") or []]
    return out


def _site_rows(data) -> list[dict]:
    rows = []
    bad = _nonfinite(data.summary)
    for i, s in enumerate(data.summary["sites"], 1):
        pct = 100.0 * s["dead"] / s["neurons"] if s["neurons"] else 0.0
        rows.append({**s, "index": i, "dead_pct": pct, "nonfinite": _site_nonfinite(s, bad)})
    return rows


def _header(summary: dict, source: str) -> dict:
    ck = summary.get("checkpoint") or {}
    data = dict(summary.get("data") or {})
    extra = {k: v for k, v in data.items() if k not in ("name", "split", "samples") and v not in (None, "")}
    return {
        "checkpoint": ck, "data": data, "data_extra": extra, "device": summary.get("device"),
        "deadscan_version": summary.get("deadscan_version"), "torch_version": summary.get("torch_version"),
        "created": summary.get("created"), "elapsed": summary.get("elapsed_seconds"),
        "command": summary.get("command") or "", "source": source,
    }


def _strip_info(summary: dict) -> dict | None:
    hist = summary.get("history") or []
    if not hist:
        return None
    base = summary.get("baseline") or {}
    bh = base.get("history") or []
    revived_ever = set()
    for row in hist:
        for name, idx in (row.get("revived_neurons") or {}).items():
            revived_ever.update((name, int(i)) for i in idx)
    cfg = summary.get("config") or {}
    start = summary.get("start")
    t = summary["totals"]
    return {
        "epochs": len([r for r in hist if r.get("train_loss") is not None]) or cfg.get("epochs", 0),
        # the same end everywhere: the run's own scan after the last strip step (totals), not the last detection
        "start_dead": start["dead"] if start else hist[0].get("dead"), "end_dead": t["dead"],
        "start_label": "start" if start else "first detection",
        "before_after": _before_after(summary),
        "revived": len(revived_ever), "test_acc": (summary.get("test") or {}).get("acc"),
        "baseline_test_acc": (base.get("test") or {}).get("acc") if base else None,
        "baseline_dead": bh[-1].get("dead") if bh else None,
        "baseline_active": bh[-1].get("active_percent") if bh else None,
        "config": cfg, "compact": summary.get("compact"),
    }


def _before_after(summary: dict) -> list[dict]:
    """Per site: dead and %A at the start (the input checkpoint) and at the end of a strip run."""
    start = (summary.get("start") or {}).get("sites") or {}
    rows = []
    for s in summary["sites"]:
        b = start.get(s["name"])
        if b is not None:
            rows.append({"name": s["name"], "neurons": s["neurons"], "dead_start": b["dead"], "dead_end": s["dead"],
                         "active_start": b.get("active_percent"), "active_end": s.get("active_percent")})
    return rows


def render_report(data, *, plotlyjs: str = DEFAULTS.plotlyjs) -> str:
    """report.html for one run (a :class:`deadscan.reportdata.ReportData`, live or from stats.h5)."""
    from .figures import report_figures

    s = data.summary
    t = s["totals"]
    ctx = {
        "title": _title(s), "h": _header(s, data.source), "t": t, "sites": _site_rows(data),
        "dead_pct": 100.0 * t["dead"] / t["neurons"] if t["neurons"] else 0.0,
        "no_feeding": [x for x in s["sites"] if not x.get("feeding_layer")], "opaque": s.get("opaque") or [],
        "definitions": s.get("definitions") or DEFINITIONS, "figures": _figures(report_figures(data)),
        "strip": _strip_info(s), "plotly": _plotly_tag(plotlyjs), "rendered": _rendered(data.source),
        "warnings": warnings_of(s), "rare_tokens": s.get("rare_tokens"),
    }
    return _env().get_template("report.html.j2").render(**ctx)


def _title(summary: dict) -> str:
    path = (summary.get("checkpoint") or {}).get("path") or "model"
    return Path(path).name


def _rendered(source: str) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return f"re-rendered from {source} by deadscan {__version__} on {now}" if source else ""


def _write_html(html: str, path: Path, plotlyjs: str) -> Path:
    from .outputs import write_text_atomic

    write_text_atomic(path, html)
    if plotlyjs == "directory":
        from plotly.offline import get_plotlyjs

        write_text_atomic(path.parent / PLOTLYJS_FILE, get_plotlyjs())
    return path


def write_report(data, out_dir: str | Path, *, plotlyjs: str = DEFAULTS.plotlyjs, name: str = "report.html") -> Path:
    return _write_html(render_report(data, plotlyjs=plotlyjs), Path(out_dir) / name, plotlyjs)


def write_outputs(data, out_dir: str | Path, *, plotlyjs: str = DEFAULTS.plotlyjs) -> dict[str, Path]:
    """stats.h5 and report.html for a run (summary.json is written by :func:`write_summary`)."""
    from .stats_h5 import write_stats

    out_dir = Path(out_dir)
    stats = write_stats(data, out_dir / "stats.h5")
    return {"stats": stats, "report": write_report(data, out_dir, plotlyjs=plotlyjs)}


def rerender(stats_path: str | Path, out_dir: str | Path | None = None, *, plotlyjs: str = DEFAULTS.plotlyjs) -> Path:
    """``deadscan report``: report.html from a stats.h5 alone (no model, no data)."""
    from .stats_h5 import read_stats

    stats_path = _stats_file(stats_path)
    out_dir = stats_path.parent if out_dir is None else Path(out_dir)
    _check_not_inputs(out_dir, ["report.html"], plotlyjs, [stats_path])
    data = read_stats(stats_path)
    return write_report(data, out_dir, plotlyjs=plotlyjs)


def _stats_file(path: str | Path) -> Path:
    """A stats.h5, or the run folder holding one."""
    path = Path(path)
    return path / "stats.h5" if path.is_dir() else path


def _check_not_inputs(out_dir: Path, names: list[str], plotlyjs: str, inputs: list[Path]) -> None:
    """Before reading anything: no output may replace one of the command's own inputs."""
    from .outputs import check_out_dir

    outputs = names + ([PLOTLYJS_FILE] if plotlyjs == "directory" else [])
    check_out_dir(out_dir, outputs, overwrite=True, inputs=inputs)  # a report replaces its own earlier render


# ---------------------------------------------------------------------------------------------
# compare.html


def compare_rows(a, b) -> tuple[list[dict], list[str], list[str]]:
    """Per-site rows of sites in both runs (A's order), and names only in A / only in B."""
    from .figures import matched_sites

    rows = []
    for i, (sa, sb) in enumerate(matched_sites(a, b), 1):
        ia, ib = sa.info, sb.info
        pa = 100.0 * ia["dead"] / ia["neurons"] if ia["neurons"] else 0.0
        pb = 100.0 * ib["dead"] / ib["neurons"] if ib["neurons"] else 0.0
        aa, ab = ia.get("active_percent"), ib.get("active_percent")
        rows.append({"index": i, "name": sa.name, "neurons_a": ia["neurons"], "neurons_b": ib["neurons"],
                     "dead_a": ia["dead"], "dead_b": ib["dead"], "dead_delta": ib["dead"] - ia["dead"],
                     "dead_pct_a": pa, "dead_pct_b": pb, "active_a": aa, "active_b": ab,
                     "active_delta": None if aa is None or ab is None else ab - aa})
    na, nb = {s.name for s in a.sites}, {s.name for s in b.sites}
    return rows, [s.name for s in a.sites if s.name not in nb], [s.name for s in b.sites if s.name not in na]


def _totals_rows(a: dict, b: dict) -> list[dict]:
    ta, tb = a["totals"], b["totals"]

    def pct(t):
        return 100.0 * t["dead"] / t["neurons"] if t["neurons"] else 0.0

    rows = [("sites", ta["sites"], tb["sites"], "int"), ("neurons", ta["neurons"], tb["neurons"], "int"),
            ("dead", ta["dead"], tb["dead"], "int"), ("dead %", pct(ta), pct(tb), "pct"),
            ("provably dead", ta["provably_dead"], tb["provably_dead"], "int"),
            ("dormant", ta["dormant"], tb["dormant"], "int"),
            ("%A (hidden params)", ta["active_percent"], tb["active_percent"], "pct"),
            ("%A (feeding weights)", ta["active_percent_feeding_weights"], tb["active_percent_feeding_weights"], "pct"),
            ("pruned weights", ta["pruned_weights"], tb["pruned_weights"], "int")]
    acc_a, acc_b = (a.get("test") or {}).get("acc"), (b.get("test") or {}).get("acc")
    if acc_a is not None or acc_b is not None:
        rows.append(("test accuracy (%)", acc_a, acc_b, "pct"))
    return [{"label": lab, "a": va, "b": vb, "fmt": fmt,
             "delta": None if va is None or vb is None else vb - va} for lab, va, vb, fmt in rows]


def run_name(data) -> str:
    """A run as people name it: its folder, the command that made it and the checkpoint, e.g.
    ``stripped (strip revive.safetensors)``; the checkpoint's file name alone rarely tells runs apart."""
    import shlex

    s = data.summary
    folder = Path(data.source).resolve().parent.name if data.source else ""
    try:
        words = shlex.split(s.get("command") or "")
    except ValueError:
        words = (s.get("command") or "").split()
    verb = words[1] if len(words) > 1 and Path(words[0]).name == "deadscan" else (words[0] if words else "")
    what = " ".join(x for x in (verb, _title(s)) if x)
    return f"{folder} ({what})" if folder else what


def _flat(prefix: str, d) -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(f"{prefix}{k}.", v))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(a: dict, b: dict) -> list[dict]:
    """Settings that differ between two summaries: their ``config`` (fine-tuning) and ``data``, flattened."""
    fa = {**_flat("data.", a.get("data")), **_flat("config.", a.get("config"))}
    fb = {**_flat("data.", b.get("data")), **_flat("config.", b.get("config"))}
    return [{"key": k, "a": fa.get(k), "b": fb.get(k)} for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def compare_warnings(a, b, la: str = "A", lb: str = "B") -> list[str]:
    """Reasons a comparison may mislead: no shared site, the same run twice, and each run's own warnings."""
    out = []
    if a.sites and b.sites and not ({s.name for s in a.sites} & {s.name for s in b.sites}):
        out.append(f"{la} and {lb} share no site: the per-site table and change figure are empty; these are "
                   "probably different models.")
    ca, cb = a.summary.get("checkpoint") or {}, b.summary.get("checkpoint") or {}
    if ca.get("sha256") and ca.get("sha256") == cb.get("sha256") and a.summary.get("data") == b.summary.get("data") \
            and (a.summary.get("config") or {}) == (b.summary.get("config") or {}):
        same = " (the same file)" if a.source and b.source and Path(a.source).resolve() == Path(b.source).resolve() else ""
        out.append(f"{la} and {lb} are the same checkpoint (sha256 {ca['sha256'][:12]}\u2026) scanned on the same "
                   f"data with the same settings{same}: every difference below is zero by construction.")
    for lab, d in ((la, a), (lb, b)):
        out += [f"{lab}: {w}" for w in warnings_of(d.summary)]
    return out


def render_compare(a, b, *, plotlyjs: str = DEFAULTS.plotlyjs, labels: tuple[str, str] = ("A", "B")) -> str:
    from .figures import compare_figures

    rows, only_a, only_b = compare_rows(a, b)
    na, nb = run_name(a), run_name(b)
    ctx = {
        "title": f"{na} vs {nb}", "la": labels[0], "lb": labels[1], "na": na, "nb": nb,
        "warnings": compare_warnings(a, b, *labels), "config_diff": config_diff(a.summary, b.summary),
        "ha": _header(a.summary, a.source), "hb": _header(b.summary, b.source),
        "totals": _totals_rows(a.summary, b.summary), "rows": rows, "only_a": only_a, "only_b": only_b,
        "figures": _figures(compare_figures(a, b, *labels)), "plotly": _plotly_tag(plotlyjs),
        "definitions": a.summary.get("definitions") or DEFINITIONS,
        "rendered": f"rendered by deadscan {__version__} on "
                    f"{_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}",
    }
    return _env().get_template("compare.html.j2").render(**ctx)


def compare(stats_a: str | Path, stats_b: str | Path, out_dir: str | Path, *, plotlyjs: str = DEFAULTS.plotlyjs,
            name: str = "compare.html") -> Path:
    """``deadscan compare``: a side-by-side report of two stats.h5 files."""
    from .stats_h5 import read_stats

    stats_a, stats_b = _stats_file(stats_a), _stats_file(stats_b)
    _check_not_inputs(Path(out_dir), [name], plotlyjs, [stats_a, stats_b])
    a, b = read_stats(stats_a), read_stats(stats_b)
    return _write_html(render_compare(a, b, plotlyjs=plotlyjs), Path(out_dir) / name, plotlyjs)
