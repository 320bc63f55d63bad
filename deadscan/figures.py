"""Plotly figures (plain figure dicts: ``{"data": [...], "layout": {...}}``) from a ReportData.

Every figure aggregates: per-neuron arrays are histogrammed here with numpy and only bin counts
reach the page, so a report's size does not grow with the model. Text that plotly draws (tick
labels, legends, hovers, dropdowns) goes through :func:`label`, which escapes it: plotly reads
its strings as a small HTML subset, and a layer may be named ``<b>`` or ``<script>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .reportdata import Hist, ReportData, SiteData

DEAD, HEALTHY, REVIVED, BEFORE, BASE, ACCENT = "#c62828", "#1f77b4", "#2e7d32", "#9e9e9e", "#757575", "#ef6c00"
# Site colours (stacked bars by site): a qualitative palette without red, which means "dead" here
SITE_COLORS = ["#1f77b4", "#ff9f1c", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#bcbd22", "#7f7f7f", "#e377c2",
               "#393b79"]
FREQ_BINS = 50
PRE_MAX_BINS = 50
MAX_MENU_SITES = 60  # sites offered in a figure's dropdown (most dead first), beyond "all sites"
MAX_STACKED_SITES = 10  # sites drawn apart in stacked bars; the rest are summed as "other sites"
MANY_SITES = 12  # beyond this, per-site activation frequencies are one heatmap, not a trace per site
FREQ_PER_DECADE = 4  # log-spaced frequency bins of the heatmap
MENU_ROOM = {"height": 400, "margin": {"t": 80}}  # space above the plot for a legend and a dropdown
FONT = {"family": "system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif", "size": 12}


@dataclass
class Figure:
    id: str
    title: str
    caption: str  # one line: how to read it
    spec: dict  # {"data": [...], "layout": {...}}


def label(text) -> str:
    """Escape ``text`` for plotly's HTML-ish labels (it shows entities as their characters)."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def short(text: str, n: int = 36) -> str:
    return text if len(text) <= n else "\u2026" + text[-(n - 1):]


def _layout(**kw) -> dict:
    base = {
        "font": FONT, "margin": {"l": 60, "r": 20, "t": 30, "b": 50}, "height": 360,
        "paper_bgcolor": "white", "plot_bgcolor": "white", "hovermode": "closest",
        "legend": {"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0, "xanchor": "left"},
        "xaxis": {"showline": True, "linecolor": "#444", "ticks": "outside", "gridcolor": "#eee", "zeroline": False,
                  "automargin": True},
        "yaxis": {"showline": True, "linecolor": "#444", "ticks": "outside", "gridcolor": "#eee", "zeroline": False,
                  "automargin": True},
    }
    for k, v in kw.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return base


def _list(a, digits: int | None = None) -> list:
    """JSON-safe list: NaN and inf become None (plotly leaves a gap); ``digits`` significant digits."""
    out = []
    for v in np.asarray(a, dtype=float).tolist():
        if digits is not None and np.isfinite(v):
            v = float(f"{v:.{digits}g}")
        out.append(v if np.isfinite(v) else None)
    return out


def _bar_x(edges: np.ndarray) -> dict:
    """Bar positions and widths from bin edges: x0/dx and one width when the bins are uniform
    (a figure with 60 sites' histograms in its dropdown stays small), else one per bar."""
    edges = np.asarray(edges, dtype=float)
    w = np.diff(edges)
    if w.size and np.allclose(w, w[0], rtol=1e-9, atol=0):
        return {"x0": float((edges[0] + edges[1]) / 2), "dx": float(w[0]), "width": float(w[0])}
    return {"x": _list((edges[:-1] + edges[1:]) / 2), "width": _list(w)}


def _bars(h: Hist, name: str, key: str, color: str, *, density: bool = True, visible=True, opacity=0.6,
          group: str | None = None) -> dict:
    counts = np.asarray(h.series[key], dtype=float)
    total = counts.sum()
    y = counts / total if density and total else counts
    return {"type": "bar", **_bar_x(h.edges), "y": _list(y, 4), "name": label(name),
            "marker": {"color": color, "line": {"width": 0}}, "opacity": opacity, "visible": visible,
            "legendgroup": group or name, "customdata": [int(c) for c in counts],
            "hovertemplate": "%{x:.3g}: %{customdata} weights<extra>" + label(name) + "</extra>"}


def _menu(labels: list[str], visibility: list[list[bool]]) -> list[dict]:
    """A dropdown switching which traces are visible."""
    return [{
        # top left: plotly's modebar sits top right and would cover a dropdown there
        "type": "dropdown", "x": 0, "xanchor": "left", "y": 1.14, "yanchor": "bottom", "showactive": True,
        "pad": {"t": 0, "b": 0},
        "bgcolor": "white", "bordercolor": "#bbb", "font": {"size": 11},
        "buttons": [{"label": label(short(lab, 32)), "method": "restyle", "args": [{"visible": vis}]}
                    for lab, vis in zip(labels, visibility)],
    }]


def _menu_sites(sites: list[SiteData], has) -> list[SiteData]:
    """Sites offered in a dropdown: those with data, most dead first, capped, then in model order."""
    cand = [s for s in sites if has(s)]
    if len(cand) > MAX_MENU_SITES:
        keep = {id(s) for s in sorted(cand, key=lambda s: -int(s.dead.sum()))[:MAX_MENU_SITES]}
        cand = [s for s in cand if id(s) in keep]
    return cand


def _capped(n_all: int, n_shown: int) -> str:
    return f" The dropdown lists the {n_shown} sites with the most dead neurons of {n_all}." if n_shown < n_all else ""


# ---------------------------------------------------------------------------------------------
# One run


def dead_per_site(data: ReportData) -> Figure:
    sites = data.sites
    x = list(range(1, len(sites) + 1))
    pct = [100.0 * int(s.dead.sum()) / s.neurons if s.neurons else 0.0 for s in sites]
    dormant = [100.0 * int(s.dormant.sum()) / s.neurons if s.neurons else 0.0 for s in sites]
    names = [label(s.name) for s in sites]
    custom = [[names[i], int(s.dead.sum()), s.neurons, label(s.info.get("feeding_layer") or "none")]
              for i, s in enumerate(sites)]
    colors = [DEAD if s.info.get("feeding_layer") else "#e8a0a0" for s in sites]
    traces = [
        {"type": "bar", "x": x, "y": _list(pct), "name": "dead %", "marker": {"color": colors},
         "customdata": custom,
         "hovertemplate": "%{customdata[0]}<br>dead %{customdata[1]} of %{customdata[2]} (%{y:.1f}%)"
                          "<br>feeding layer: %{customdata[3]}<extra></extra>"},
        {"type": "scatter", "mode": "markers", "x": x, "y": _list(dormant), "name": "dormant %",
         "marker": {"color": "#333", "symbol": "line-ew-open", "size": 14, "line": {"width": 2}},
         "customdata": custom, "hovertemplate": "%{customdata[0]}<br>dormant %{y:.1f}%<extra></extra>"},
    ]
    if len(sites) > 40:  # names would overlap: number the sites in model order, names on hover
        xaxis = {"title": {"text": "site # in model order (model depth \u2192)"}, "tickmode": "auto"}
    else:
        xaxis = {"title": {"text": "site (model depth \u2192)"}, "tickmode": "array", "tickvals": x,
                 "ticktext": [label(short(s.name, 28)) for s in sites], "tickangle": -45 if len(sites) > 4 else 0}
    layout = _layout(xaxis=xaxis, yaxis={"title": {"text": "% of the site's neurons"}, "rangemode": "tozero"},
                     bargap=0.25, height=400)
    return Figure("dead-per-site", "Dead neurons per site",
                  "Bars: share of each site's neurons that never fired on the scanned data, sites in model order "
                  "(pale bars: no feeding layer, never stripped); dashes: dormant share (ReDo score \u2264 tau).",
                  {"data": traces, "layout": layout})


def _freq_counts(s: SiteData) -> tuple[int, np.ndarray]:
    f = s.frequency
    dead = int((s.active == 0).sum())
    live, _ = np.histogram(f[s.active > 0], bins=FREQ_BINS, range=(0.0, 1.0))
    return dead, live


DEAD_X, DEAD_W = -0.07, 0.04  # where the dead spike sits left of 0% on frequency axes


def _freq_axis() -> dict:
    ticks = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    return {"title": {"text": "activation frequency (share of scanned elements with output > 0)"},
            "range": [DEAD_X - DEAD_W, 1.0 + 0.5 / FREQ_BINS], "tickmode": "array",
            "tickvals": [DEAD_X] + ticks, "ticktext": ["dead"] + [f"{t:.0%}" for t in ticks]}


def _log_axis(top: float) -> dict:
    lo, hi = np.log10(0.7), np.log10(max(top, 1) * 1.6)
    return {"title": {"text": "neurons (log)"}, "type": "log", "range": [lo, hi], "dtick": 1 if hi - lo > 1.5 else "D2"}


def frequency_histogram(data: ReportData) -> Figure:
    edges = np.linspace(0.0, 1.0, FREQ_BINS + 1)
    centers, width = (edges[:-1] + edges[1:]) / 2, 1.0 / FREQ_BINS
    counts = {id(s): _freq_counts(s) for s in data.sites}  # once per site: a site may hold 30k neurons
    pooled = ("all sites", sum(c[0] for c in counts.values()),
              sum((c[1] for c in counts.values()), np.zeros(FREQ_BINS, np.int64)))
    many = len(data.sites) > MANY_SITES
    menu_sites = [] if many else _menu_sites(data.sites, lambda s: s.neurons > 0)
    groups = [pooled] + [(s.name, *counts[id(s)]) for s in menu_sites]
    traces, vis = [], []
    for i, (name, dead, live) in enumerate(groups):
        show = i == 0
        traces.append({"type": "bar", "x": [DEAD_X], "y": [dead if dead else None], "width": [DEAD_W],
                       "name": "dead (never fired)", "marker": {"color": DEAD}, "visible": show,
                       "legendgroup": "dead", "showlegend": True,
                       "hovertemplate": "dead: %{y} neurons<extra>" + label(short(name, 40)) + "</extra>"})
        traces.append({"type": "bar", "x0": float(centers[0]), "dx": width, "y": [int(c) if c else None for c in live],
                       "width": width, "name": "fired", "marker": {"color": HEALTHY}, "visible": show,
                       "legendgroup": "live",
                       "hovertemplate": "fired on %{x:.0%}: %{y} neurons<extra>" + label(short(name, 40)) + "</extra>"})
    for i in range(len(groups)):
        vis.append([j // 2 == i for j in range(len(traces))])
    top = max(max(g[1], int(g[2].max()) if g[2].size else 0) for g in groups)
    extra = {"updatemenus": _menu([g[0] for g in groups], vis), **MENU_ROOM} if not many else {}
    layout = _layout(barmode="overlay", bargap=0, xaxis=_freq_axis(), yaxis=_log_axis(top), **extra)
    if many:
        caption = ("How often each neuron fires over the scanned data, all sites pooled (log count); the red spike at "
                   "'dead' is the neurons that never fired. Per site: the heatmap below.")
    else:
        caption = ("How often each neuron fires over the scanned data (log count); the red spike at 'dead' is the "
                   "neurons that never fired. Pick a site in the dropdown." + _capped(
                       len([s for s in data.sites if s.neurons]), len(menu_sites)))
    return Figure("frequency", "Activation frequency", caption, {"data": traces, "layout": layout})


def _fmt_freq(v: float) -> str:
    return f"{v:.2g}".replace("e-0", "e-")


def frequency_edges(sites: list[SiteData]) -> np.ndarray:
    """Log-spaced frequency bin edges from the decade of the rarest firing neuron (at least 1e-2) to 1;
    the dead (zero) bin is kept apart. A site's bins are then counts, whatever its width."""
    low = min((float(s.frequency[s.active > 0].min()) for s in sites if s.neurons and (s.active > 0).any()),
              default=1.0)
    decades = max(2, int(np.ceil(-np.log10(max(low, 1e-12)) - 1e-9)))
    return np.logspace(-decades, 0, decades * FREQ_PER_DECADE + 1)


def frequency_by_site(data: ReportData) -> Figure | None:
    """Sites x frequency bins (zero bin first), colour = share of the site's neurons: the per-site
    histograms of many layers in one bounded figure (sites x bins cells, never per neuron)."""
    sites = [s for s in data.sites if s.neurons]
    if len(data.sites) <= MANY_SITES or not sites:
        return None
    edges = frequency_edges(sites)
    cols = ["0 (dead)"] + [f"{_fmt_freq(a)}–{_fmt_freq(b)}" for a, b in zip(edges[:-1], edges[1:])]
    counts = []
    for s in sites:
        f = s.frequency[s.active > 0]
        live, _ = np.histogram(np.clip(f, edges[0], 1.0), bins=edges)  # below the first edge: first bin
        counts.append([int((s.active == 0).sum())] + [int(c) for c in live])
    counts = np.asarray(counts, dtype=np.int64)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    z = [[None if c == 0 else float(f"{v:.3g}") for c, v in zip(cr, vr)] for cr, vr in zip(counts, share)]
    names = [label(s.name) for s in sites]
    if len(set(names)) < len(names):  # rows are categories: equal names would share one row
        names = [f"{i}. {n}" for i, n in enumerate(names, 1)]
    step = max(1, int(np.ceil(len(sites) / 40)))  # at most about 40 row labels
    decade_cols = [cols[1 + k] for k in range(0, len(edges) - 1, FREQ_PER_DECADE)]
    trace = {"type": "heatmap", "x": cols, "y": names, "z": z, "customdata": counts.tolist(),
             "colorscale": "YlOrRd", "reversescale": True, "zmin": 0, "xgap": 1, "hoverongaps": False,
             "colorbar": {"title": {"text": "share of<br>the site's<br>neurons"}, "tickformat": ".0%"},
             "hovertemplate": "%{y}<br>frequency %{x}: %{customdata:,} neurons (%{z:.1%} of the site)<extra></extra>"}
    layout = _layout(
        height=min(1200, max(360, 120 + 12 * len(sites))),
        xaxis={"title": {"text": "activation frequency (log bins; share of scanned elements with output > 0)"},
               "type": "category", "tickmode": "array", "tickvals": [cols[0]] + decade_cols,
               "ticktext": ["dead"] + [_fmt_freq(edges[k]) for k in range(0, len(edges) - 1, FREQ_PER_DECADE)],
               "showline": False, "tickangle": 0},
        yaxis={"title": {"text": "site (model depth \u2193)"}, "type": "category", "autorange": "reversed",
               "tickmode": "array", "tickvals": names[::step], "ticktext": [label(short(s.name, 32)) for s in sites][::step],
               "showline": False, "gridcolor": "rgba(0,0,0,0)"},
        hovermode="closest")
    return Figure("frequency-by-site", "Activation frequency per site",
                  "One row per site in model order, one column per frequency bin (log-spaced; the first column is "
                  "the neurons that never fired): colour is the share of the site's neurons in the bin. Hover for "
                  "counts.", {"data": [trace], "layout": layout})


def _hist_menu_figure(fid: str, title: str, caption: str, pooled: Hist, sites: list[tuple[str, Hist]],
                      series: list[tuple[str, str, str]], xtitle: str, legend_counts: bool = True) -> Figure:
    """Density bars of ``series`` [(key, legend, color)] for 'all sites' plus one dropdown entry per site."""
    groups = [("all sites", pooled)] + sites
    traces, vis = [], []
    for i, (name, h) in enumerate(groups):
        for key, legend, color in series:
            n = h.total(key)
            tr = _bars(h, f"{legend} (n={n:,})" if legend_counts else legend, key, color, visible=i == 0,
                       group=key)
            traces.append(tr)
    k = len(series)
    for i in range(len(groups)):
        vis.append([j // k == i for j in range(len(traces))])
    layout = _layout(barmode="overlay", bargap=0, xaxis={"title": {"text": xtitle}}, **MENU_ROOM,
                     yaxis={"title": {"text": "share of the group's weights"}, "tickformat": ".1%"},
                     updatemenus=_menu([g[0] for g in groups], vis))
    return Figure(fid, title, caption, {"data": traces, "layout": layout})


def weights_dead_vs_healthy(data: ReportData) -> Figure | None:
    if data.weights_pooled is None:
        return None
    menu = _menu_sites(data.sites, lambda s: s.weights is not None)
    return _hist_menu_figure(
        "weights", "Incoming weights: dead vs healthy neurons",
        "Distribution of the incoming weights of dead (red) and healthy (blue) neurons, each normalised to "
        "its own total so the shapes compare (pruned weights left out; weights signed by any per-feature scale "
        "after the layer)." + _capped(
            len([s for s in data.sites if s.weights is not None]), len(menu)),
        data.weights_pooled, [(s.name, s.weights) for s in menu],
        [("healthy", "healthy", HEALTHY), ("dead", "dead", DEAD)], "incoming weight")


def revived_weights(data: ReportData) -> Figure | None:
    if data.revived_pooled is None:
        return None
    menu = _menu_sites(data.sites, lambda s: s.revived is not None)
    n = int(data.revived_pooled.attrs.get("neurons", 0))
    pruned = int(data.revived_pooled.attrs.get("pruned_excluded", 0))
    return _hist_menu_figure(
        "revived-weights", "Incoming weights of revived neurons, before and after",
        f"The {n:,} neurons dead at some epoch and alive at the end: their incoming weights before fine-tuning "
        f"(grey) and after (green), normalised; the {pruned:,} weights stripped from them are left out of "
        "'after'." + _capped(len([s for s in data.sites if s.revived is not None]), len(menu)),
        data.revived_pooled, [(s.name, s.revived) for s in menu],
        [("before", "before", BEFORE), ("after", "after", REVIVED)], "incoming weight")


def pre_max_dead(data: ReportData, fid: str = "pre-max") -> Figure | None:
    per_site = [(s.name, s.pre_max[s.dead].astype(np.float64)) for s in data.sites if s.neurons and s.dead.any()]
    per_site = [(n, v[np.isfinite(v)]) for n, v in per_site]
    per_site = [(n, v) for n, v in per_site if v.size]
    if not per_site:
        return None
    lo = min(float(v.min()) for _, v in per_site)
    hi = max(0.0, max(float(v.max()) for _, v in per_site))
    if hi - lo < 1e-9:
        lo = hi - 1.0
    lo -= 0.04 * (hi - lo)
    edges = np.linspace(lo, hi, PRE_MAX_BINS + 1)
    per_site.sort(key=lambda t: -t[1].size)
    shown, rest = per_site[:MAX_STACKED_SITES], per_site[MAX_STACKED_SITES:]
    palette = SITE_COLORS
    traces = []
    for i, (name, v) in enumerate(shown + ([("other sites", np.concatenate([v for _, v in rest]))] if rest else [])):
        counts, _ = np.histogram(v, bins=edges)
        traces.append({"type": "bar", "x": _list((edges[:-1] + edges[1:]) / 2), "y": [int(c) for c in counts],
                       "width": float(edges[1] - edges[0]), "name": label(short(name, 32)),
                       "marker": {"color": palette[i % len(palette)] if name != "other sites" else "#bdbdbd"},
                       "hovertemplate": "%{x:.3g}: %{y} dead neurons<extra>" + label(short(name, 40)) + "</extra>"})
    top = int(np.sum([t["y"] for t in traces], axis=0).max())  # tallest stack
    layout = _layout(barmode="stack", bargap=0, showlegend=True,  # the legend names the site, even if only one
                     xaxis={"title": {"text": "max pre-activation over the scanned data (0 = would fire)"}},
                     yaxis={"title": {"text": "dead neurons"}, "tickformat": "d", "dtick": _nice_step(top),
                            "rangemode": "tozero"},
                     shapes=[{"type": "line", "x0": 0, "x1": 0, "y0": 0, "y1": 1, "yref": "paper",
                              "line": {"color": "#333", "dash": "dot", "width": 1}}],
                     legend={"orientation": "v", "x": 1.01, "xanchor": "left", "y": 1, "yanchor": "top"},
                     margin={"r": 180})
    return Figure(fid, "How far dead neurons are from waking",
                  "Each dead neuron's largest pre-activation on the scanned data, stacked by site: near the "
                  "dotted line a small change would wake it; far left it is deeply dead.",
                  {"data": traces, "layout": layout})


def _nice_step(top: float, ticks: int = 5) -> int:
    """An integer tick step of 1, 2 or 5 times a power of ten giving about ``ticks`` ticks up to ``top``."""
    raw = max(top / ticks, 1.0)
    mag = 10 ** int(np.floor(np.log10(raw)))
    return int(next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw))


def _epochs(rows: list[dict]) -> list:
    return [r.get("epoch") for r in rows]


def _col(rows: list[dict], key: str) -> list:
    return [None if r.get(key) is None else r.get(key) for r in rows]


def _line(rows, key, name, color, dash="solid", width=2, mode="lines+markers", yaxis=None) -> dict:
    t = {"type": "scatter", "mode": mode, "x": _epochs(rows), "y": _list([np.nan if v is None else v
                                                                          for v in _col(rows, key)]),
         "name": label(name), "line": {"color": color, "dash": dash, "width": width}, "marker": {"size": 5},
         "connectgaps": False}
    if yaxis:
        t["yaxis"] = yaxis
    return t


def history_figures(data: ReportData) -> list[Figure]:
    s = data.summary
    rows = s.get("history") or []
    if not rows:
        return []
    base = (s.get("baseline") or {}).get("history") or []
    ep = {"title": {"text": "epoch"}, "dtick": 1 if len(rows) <= 20 else None}
    figs = []

    top = max([1] + [int(r.get(k) or 0) for r in rows + base for k in ("dead", "revived")])
    start, t = s.get("start"), s["totals"]
    last = rows[-1].get("epoch")
    tr = [{"type": "bar", "x": _epochs(rows), "y": _col(rows, "revived"), "name": "revived this epoch",
           "marker": {"color": REVIVED}, "opacity": 0.7},
          _line(rows, "dead", "dead, detected (before the epoch's strip step)", DEAD),
          _ends(start, t, "dead", last, DEAD)]
    if base:
        tr.append(_line(base, "dead", "dead (baseline, no stripping)", BASE, dash="dash"))
    figs.append(Figure("history-dead", "Dead and revived neurons per epoch",
                       "Dead neurons detected after each epoch's training, before its strip step (red line; grey "
                       "dashed: the same training without stripping), neurons revived that epoch (green bars), and "
                       "the run's start (epoch 0: the input checkpoint) and end (after the last strip step: the "
                       "figures at the top of the page) as diamonds, on one axis of neuron counts.",
                       {"data": tr, "layout": _layout(
                           xaxis=ep, yaxis={"title": {"text": "neurons"}, "rangemode": "tozero",
                                            "tickformat": "d", "dtick": _nice_step(top)})}))

    tr = [_line(rows, "active_percent", "%A, hidden params (stripped)", HEALTHY),
          _line(rows, "active_percent_feeding_weights", "%A, feeding weights only (stripped)", HEALTHY, dash="dot"),
          _ends(start, t, "active_percent", last, HEALTHY)]
    if base:
        tr.append(_line(base, "active_percent", "%A, hidden params (baseline)", BASE, dash="dash"))
    figs.append(Figure("history-active", "%A per epoch",
                       "Share of hidden parameters still able to learn (%A) after each epoch's detection: dead "
                       "neurons' and pruned weights count as inactive; diamonds: start and end. Higher is better.",
                       {"data": tr, "layout": _layout(xaxis=ep, yaxis={"title": {"text": "%A"}})}))

    tr = [_line(rows, "train_loss", "train loss (stripped)", ACCENT),
          _line(rows, "val_loss", "val loss (stripped)", HEALTHY)]
    if base:
        tr += [_line(base, "train_loss", "train loss (baseline)", ACCENT, dash="dash", width=1.5),
               _line(base, "val_loss", "val loss (baseline)", HEALTHY, dash="dash", width=1.5)]
    figs.append(Figure("history-loss", "Loss per epoch",
                       "Mean cross-entropy on the training data (during the epoch) and on the validation split "
                       "(after it); dashed: the baseline without stripping.",
                       {"data": tr, "layout": _layout(xaxis=ep, yaxis={"title": {"text": "loss"}})}))

    tr = [_line(rows, "val_acc", "val accuracy (stripped)", HEALTHY)]
    test = (s.get("test") or {}).get("acc")
    if test is not None:
        tr.append({"type": "scatter", "mode": "markers", "x": [last], "y": [test], "name": "test accuracy (stripped)",
                   "marker": {"color": HEALTHY, "symbol": "star", "size": 12}})
    if base:
        tr.append(_line(base, "val_acc", "val accuracy (baseline)", BASE, dash="dash"))
        btest = ((s.get("baseline") or {}).get("test") or {}).get("acc")
        if btest is not None:
            tr.append({"type": "scatter", "mode": "markers", "x": [base[-1].get("epoch")], "y": [btest],
                       "name": "test accuracy (baseline)", "marker": {"color": BASE, "symbol": "star-open",
                                                                       "size": 12}})
    figs.append(Figure("history-acc", "Accuracy per epoch",
                       "Validation accuracy after each epoch (%); stars: test accuracy at the end; dashed: the "
                       "baseline without stripping.",
                       {"data": tr, "layout": _layout(xaxis=ep, yaxis={"title": {"text": "accuracy (%)"}})}))
    return figs


def _ends(start: dict | None, totals: dict, key: str, last, color: str) -> dict:
    """The run's start (epoch 0, the input checkpoint) and end (after the last strip step) as two diamonds."""
    x, y = ([0], [start.get(key)]) if start else ([], [])
    x, y = x + [last], y + [totals.get(key)]
    return {"type": "scatter", "mode": "markers", "x": x, "y": _list([np.nan if v is None else v for v in y]),
            "name": "start and end" if start else "end (after the last strip step)",
            "marker": {"color": color, "symbol": "diamond", "size": 11, "line": {"color": "white", "width": 1}}}


def dead_by_site_and_epoch(data: ReportData) -> Figure | None:
    """Sites x (start, epochs, end), colour = dead neurons: where stripping helped, site by site."""
    s = data.summary
    rows = [r for r in s.get("history") or [] if r.get("dead_by_site") is not None]
    if not rows or not data.sites:
        return None
    start = (s.get("start") or {}).get("sites") or {}
    cols = (["start"] if start else []) + [f"epoch {r['epoch']}" for r in rows] + ["end"]
    end = {x["name"]: x["dead"] for x in s["sites"]}
    sites = [x.name for x in data.sites]
    counts = [([start.get(n, {}).get("dead")] if start else []) + [r["dead_by_site"].get(n) for r in rows]
              + [end.get(n)] for n in sites]
    names = [label(n) for n in sites]
    if len(set(names)) < len(names):  # rows are categories: equal names would share one row
        names = [f"{i}. {n}" for i, n in enumerate(names, 1)]
    step = max(1, int(np.ceil(len(sites) / 40)))
    trace = {"type": "heatmap", "x": cols, "y": names, "z": counts, "colorscale": "Reds", "zmin": 0,
             "xgap": 1, "ygap": 1, "hoverongaps": False, "colorbar": {"title": {"text": "dead<br>neurons"}},
             "hovertemplate": "%{y}<br>%{x}: %{z} dead<extra></extra>"}
    layout = _layout(height=min(1200, max(300, 120 + 14 * len(sites))),
                     xaxis={"type": "category", "showline": False, "tickangle": 0},
                     yaxis={"title": {"text": "site (model depth \u2193)"}, "type": "category", "autorange": "reversed",
                            "tickmode": "array", "tickvals": names[::step], "showline": False,
                            "gridcolor": "rgba(0,0,0,0)"},
                     hovermode="closest")
    return Figure("history-sites", "Dead neurons per site and epoch",
                  "One row per site in model order; columns: the start (the input checkpoint), each epoch's "
                  "detection (before its strip step) and the end (after the last strip step). Colour: dead "
                  "neurons. Rows that pale from left to right are where stripping revived neurons.",
                  {"data": [trace], "layout": layout})


def report_figures(data: ReportData) -> list[Figure]:
    """The figures of one run's report, in page order."""
    figs = []
    if data.sites:  # no ReLU site: per-site figures would be empty axes (the page says why instead)
        figs += [dead_per_site(data), frequency_histogram(data), frequency_by_site(data),
                 weights_dead_vs_healthy(data), pre_max_dead(data)]
    figs += history_figures(data)
    figs.append(dead_by_site_and_epoch(data))
    figs.append(revived_weights(data))
    return [f for f in figs if f is not None]


# ---------------------------------------------------------------------------------------------
# Two runs side by side


def matched_sites(a: ReportData, b: ReportData) -> list[tuple[SiteData, SiteData]]:
    """Sites present in both runs (by name), in A's model order."""
    bs = {s.name: s for s in b.sites}
    return [(s, bs[s.name]) for s in a.sites if s.name in bs]


def _pct(s: SiteData) -> float:
    return 100.0 * int(s.dead.sum()) / s.neurons if s.neurons else 0.0


def compare_figures(a: ReportData, b: ReportData, la: str = "A", lb: str = "B") -> list[Figure]:
    pairs = matched_sites(a, b)
    figs = []
    if pairs:
        x = list(range(1, len(pairs) + 1))
        names = [label(sa.name) for sa, _ in pairs]
        d_dead = [_pct(sb) - _pct(sa) for sa, sb in pairs]
        d_act = [None if sa.info.get("active_percent") is None or sb.info.get("active_percent") is None
                 else sb.info["active_percent"] - sa.info["active_percent"] for sa, sb in pairs]
        many = len(pairs) > 40
        flat = all(v == 0 for v in d_dead) and all(v in (0, None) for v in d_act)
        xaxis = {"title": {"text": "site (model depth \u2192)"}, "tickmode": "array", "tickvals": x,
                 "ticktext": [label(short(sa.name, 28)) for sa, _ in pairs], "tickangle": -45 if len(pairs) > 4 else 0,
                 "showticklabels": not many}
        figs.append(Figure(
            "compare-sites", f"Per-site change, {lb} \u2212 {la}",
            f"Change in each site's dead share (red, percentage points; below 0: fewer dead in {lb}) and in its "
            f"%A (blue; above 0: more capacity in {lb}), sites in model order.",
            {"data": [
                {"type": "bar", "x": x, "y": _list(d_dead), "name": "\u0394 dead % (points)",
                 "marker": {"color": DEAD}, "customdata": names,
                 "hovertemplate": "%{customdata}<br>\u0394 dead %{y:+.2f} points<extra></extra>"},
                {"type": "bar", "x": x, "y": _list([np.nan if v is None else v for v in d_act]),
                 "name": "\u0394 %A (points)", "marker": {"color": HEALTHY}, "customdata": names,
                 "hovertemplate": "%{customdata}<br>\u0394 %A %{y:+.2f} points<extra></extra>"}],
             "layout": _layout(barmode="group", xaxis=xaxis, yaxis={"title": {"text": "percentage points"},
                                                                   "zeroline": True, "zerolinecolor": "#444"},
                               height=420,
                               annotations=[{"text": "no change at any site", "x": 0.5, "y": 0.6, "xref": "paper",
                                             "yref": "paper", "showarrow": False, "font": {"size": 14}}]
                               if flat else [])}))

    # activation frequency, pooled, overlaid
    edges = np.linspace(0.0, 1.0, FREQ_BINS + 1)
    centers, width = (edges[:-1] + edges[1:]) / 2, 1.0 / FREQ_BINS
    tr, top = [], 1
    for d, name, color in ((a, la, BASE), (b, lb, HEALTHY)):
        dead = sum(_freq_counts(s)[0] for s in d.sites)
        live = sum((_freq_counts(s)[1] for s in d.sites), np.zeros(FREQ_BINS, np.int64))
        tr.append({"type": "bar", "x": [DEAD_X] + _list(centers), "width": [DEAD_W] + [width] * FREQ_BINS,
                   "y": [dead or None] + [int(c) if c else None for c in live], "name": label(name),
                   "marker": {"color": color}, "opacity": 0.55,
                   "hovertemplate": "%{x:.0%}: %{y} neurons<extra>" + label(name) + "</extra>"})
        top = max(top, dead, int(live.max()) if live.size else 0)
    figs.append(Figure(
        "compare-frequency", "Activation frequency, overlaid",
        f"How often neurons fire in {la} (grey) and {lb} (blue), all sites pooled (log count); the bars at 'dead' "
        "are the neurons that never fired.",
        {"data": tr, "layout": _layout(barmode="overlay", bargap=0, xaxis=_freq_axis(),
                                       yaxis=_log_axis(top))}))

    # max pre-activation of dead neurons, overlaid
    vals = []
    for d in (a, b):
        v = [s.pre_max[s.dead].astype(np.float64) for s in d.sites if s.neurons and s.dead.any()]
        v = np.concatenate(v) if v else np.zeros(0)
        vals.append(v[np.isfinite(v)])
    if any(v.size for v in vals):
        lo = min(float(v.min()) for v in vals if v.size)
        hi = 0.0
        if hi - lo < 1e-9:
            lo = -1.0
        edges = np.linspace(lo, hi, PRE_MAX_BINS + 1)
        tr = []
        for v, name, color in zip(vals, (la, lb), (BASE, DEAD)):
            counts, _ = np.histogram(v, bins=edges)
            tr.append({"type": "bar", "x": _list((edges[:-1] + edges[1:]) / 2), "y": [int(c) for c in counts],
                       "width": float(edges[1] - edges[0]), "name": label(f"{name} (n={v.size:,})"),
                       "marker": {"color": color}, "opacity": 0.6})
        figs.append(Figure(
            "compare-pre-max", "How far dead neurons are from waking, overlaid",
            f"Max pre-activation of each dead neuron in {la} (grey) and {lb} (red), all sites pooled; 0 = would "
            "fire.", {"data": tr, "layout": _layout(barmode="overlay", bargap=0,
                                                    xaxis={"title": {"text": "max pre-activation"}},
                                                    yaxis={"title": {"text": "dead neurons"}})}))

    # incoming weights, pooled, overlaid
    if a.weights_pooled is not None and b.weights_pooled is not None:
        tr = []
        for d, name, dash in ((a, la, "dash"), (b, lb, "solid")):
            h = d.weights_pooled
            for key, color in (("healthy", HEALTHY), ("dead", DEAD)):
                counts = np.asarray(h.series[key], dtype=float)
                y = counts / counts.sum() if counts.sum() else counts
                tr.append({"type": "scatter", "mode": "lines", "x": _list(h.centers), "y": _list(y),
                           "line": {"shape": "hvh", "color": color, "dash": dash, "width": 2},
                           "name": label(f"{key}, {name}"),
                           "hovertemplate": "%{x:.3g}: %{y:.2%}<extra>" + label(f"{key}, {name}") + "</extra>"})
        figs.append(Figure(
            "compare-weights", "Incoming weights of dead and healthy neurons, overlaid",
            f"Incoming-weight distributions, all sites pooled, each normalised: dashed {la}, solid {lb}; red dead, "
            "blue healthy.", {"data": tr, "layout": _layout(xaxis={"title": {"text": "incoming weight"}},
                                                            yaxis={"title": {"text": "share of the group's weights"},
                                                                   "tickformat": ".1%"})}))

    ha, hb = a.summary.get("history") or [], b.summary.get("history") or []
    if ha or hb:
        tr = []
        for rows, name, color in ((ha, la, BASE), (hb, lb, DEAD)):
            if rows:
                tr.append(_line(rows, "dead", f"dead, {name}", color))
                tr.append(_line(rows, "val_acc", f"val accuracy, {name}", color, dash="dot", yaxis="y2"))
        figs.append(Figure(
            "compare-history", "Fine-tuning, overlaid",
            f"Dead neurons (solid, left axis) and validation accuracy (dotted, right axis) per epoch of {la} "
            f"(grey) and {lb} (red).",
            {"data": tr, "layout": _layout(xaxis={"title": {"text": "epoch"},
                                                  "dtick": 1 if max(len(ha), len(hb)) <= 20 else None},
                                           yaxis={"title": {"text": "dead neurons"}, "rangemode": "tozero"},
                                           yaxis2={"title": {"text": "val accuracy (%)"}, "overlaying": "y",
                                                   "side": "right", "showgrid": False, "tickformat": ".1f",
                                                   "ticksuffix": "%"},
                                           margin={"r": 60})}))
    return figs
