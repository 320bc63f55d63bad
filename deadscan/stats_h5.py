"""stats.h5: every number a report needs, readable with h5py alone (layout in the README).

::

    /                       attrs: schema_version, deadscan_version, torch_version, created, kind
                            (inspect | strip), command, config (JSON), checkpoint_sha256
    /summary                scalar string: summary.json's content (JSON)
    /site_names             string (sites,): site i's name; its group is /sites/%04d i (files written before it have none)
    /sites/0000, 0001, ...  one group per site, in model order; attrs: name, feeding_layer,
                            consumer_layer, kind, call, layer_kind, neurons, elements, strippable,
                            note, dead, provably_dead, dormant, hidden_params, inactive_params,
                            active_percent (NaN: none)
        sum                 float64 (neurons,)  sum of outputs over the scanned data
        active              int64   (neurons,)  elements with output > 0
        frequency           float64 (neurons,)  active / elements
        max                 float32 (neurons,)  max output
        pre_max             float32 (neurons,)  max pre-activation (<= 0 for a dead neuron)
        dead, provably_dead, dormant  bool (neurons,)
        score               float64 (neurons,)  ReDo score
        mean_input          float32 (fan_in,)   feeding layer's mean input (when recorded)
        weight_hist/        edges (bins+1,), dead, healthy (bins,): incoming weights' bin counts
        revived_hist/       edges, before, after: revived neurons' incoming weights (strip runs)
    /weight_hist, /revived_hist   the same pooled over all sites (shared edges)
    /masks/0000, ...        bool, the feeding layer's weight shape; attr layer; True = pruned
    /history/stripped       resizable (maxshape None) table, one row per epoch
    /history/baseline       the same for --baseline

Per-neuron datasets are gzip-compressed. Strings are UTF-8. Every dataset carries a ``description``
attribute (what it holds), and a ``unit`` attribute where it has one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from . import __version__
from .defaults import DEFAULTS, MAX_BYTES_ENV
from .errors import DataError, one_line
from .reportdata import Hist, ReportData, SiteData
from .files import open_regular, regular_size
from .runfolder import parse_summary, summary_json

SCHEMA_VERSION = 1
HISTORY_FIELDS = (  # (name, dtype); None in a row is stored as NaN (floats) or -1 (ints)
    ("epoch", "i8"), ("dead", "i8"), ("revived", "i8"), ("died", "i8"), ("pruned_weights", "i8"),
    ("pruned_this_epoch", "i8"), ("active_percent", "f8"), ("active_percent_feeding_weights", "f8"),
    ("train_loss", "f8"), ("val_loss", "f8"), ("val_acc", "f8"), ("test_acc", "f8"), ("held_by_bias", "i8"),
    ("seconds", "f8"),
)
SITE_ATTRS = ("name", "feeding_layer", "consumer_layer", "kind", "call", "layer_kind", "neurons", "dead",
              "provably_dead", "dormant", "strippable", "hidden_params", "inactive_params", "active_percent", "note")
# Every dataset's attrs: (description, unit or None). h5py alone then explains the file.
DESCRIPTIONS = {
    "summary": ("summary.json's content (JSON): per-site counts, totals, data, checkpoint, config", None),
    "site_names": ("site names in model order: entry i is the name of group /sites/%04d i", None),
    "sum": ("per neuron: sum of the ReLU's outputs over every scanned element", "output units"),
    "active": ("per neuron: scanned elements with output > 0", "elements"),
    "frequency": ("per neuron: fraction of scanned elements with output > 0 (active / elements); "
                  "0 for a dead neuron", "fraction (0-1)"),
    "max": ("per neuron: largest output over the scanned data (0 for a dead neuron)", "output units"),
    "pre_max": ("per neuron: largest pre-activation (ReLU input) over the scanned data; <= 0 for a dead neuron",
                "pre-activation units"),
    "dead": ("per neuron: True when the output was never > 0 on the scanned data", None),
    "provably_dead": ("per neuron: True when no input can make it fire (incoming weights and bias <= 0 on "
                      "non-negative inputs); a subset of dead", None),
    "dormant": ("per neuron: True when its ReDo score <= tau (the root attrs' config); includes the dead", None),
    "score": ("per neuron: ReDo score, mean |output| over the site's mean |output| (0 for a dead neuron)",
              "ratio"),
    "mean_input": ("per input feature of the feeding layer: mean input over the scanned data", "input units"),
    "edges": ("histogram bin edges of incoming weight values (bins + 1)", "weight units"),
    "hist_series": ("histogram: number of incoming weights per bin (bins), for the neurons this series names",
                    "weights"),
    "mask": ("the feeding layer's weight shape: True = weight pruned by stripping (attr layer)", None),
    "history": ("one row per epoch of fine-tuning (fields: see the README's summary.json history); "
                "NaN in float columns and -1 in integer columns mean none; acc columns in percent", None),
}
_HIST_SERIES = {"dead": "dead neurons", "healthy": "healthy (not dead) neurons",
                "before": "revived neurons, before fine-tuning", "after": "revived neurons, after fine-tuning"}
_GZ = {"compression": "gzip", "compression_opts": 4, "shuffle": True}


def write_stats(data: ReportData, path: str | Path) -> Path:
    """Write ``data`` to ``path`` atomically."""
    import h5py

    from .outputs import atomic_path

    path = Path(path)
    s = data.summary
    with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=True) as f:  # closed before the rename
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["deadscan_version"] = str(s.get("deadscan_version", __version__))
        f.attrs["torch_version"] = str(s.get("torch_version", ""))
        f.attrs["created"] = str(s.get("created", ""))
        f.attrs["kind"] = "strip" if data.is_strip else "inspect"
        f.attrs["command"] = str(s.get("command") or "")
        f.attrs["config"] = json.dumps(_config(s))
        f.attrs["checkpoint_sha256"] = str((s.get("checkpoint") or {}).get("sha256") or "")
        _describe(f.create_dataset("summary", data=summary_json(s), dtype=h5py.string_dtype()), "summary")
        _describe(f.create_dataset("site_names", data=[str(site.info.get("name")) for site in data.sites],
                                   dtype=h5py.string_dtype()), "site_names")
        sites = f.create_group("sites", track_order=True)
        for i, site in enumerate(data.sites):
            g = sites.create_group(f"{i:04d}")
            for k in SITE_ATTRS:
                g.attrs[k] = _attr(site.info.get(k))
            g.attrs["elements"] = site.elements
            arrays = {"sum": site.out_sum, "active": site.active, "frequency": site.frequency,
                      "max": site.out_max.astype(np.float32), "pre_max": site.pre_max, "dead": site.dead,
                      "provably_dead": site.provably_dead, "dormant": site.dormant, "score": site.score}
            if site.mean_input is not None:
                arrays["mean_input"] = site.mean_input
            for k, v in arrays.items():
                _dataset(g, k, np.asarray(v))
            if site.weights is not None:
                _write_hist(g, "weight_hist", site.weights)
            if site.revived is not None:
                _write_hist(g, "revived_hist", site.revived)
        if data.weights_pooled is not None:
            _write_hist(f, "weight_hist", data.weights_pooled)
        if data.revived_pooled is not None:
            _write_hist(f, "revived_hist", data.revived_pooled)
        if data.masks:
            m = f.create_group("masks", track_order=True)
            for i, (layer, mask) in enumerate(data.masks.items()):
                d = m.create_dataset(f"{i:04d}", data=np.asarray(mask, dtype=bool), chunks=True, **_GZ)
                d.attrs["layer"] = layer
                _describe(d, "mask")
        h = f.create_group("history")
        if s.get("history"):
            _write_history(h, "stripped", s["history"])
        if (s.get("baseline") or {}).get("history"):
            _write_history(h, "baseline", s["baseline"]["history"])
    return path


def _config(s: dict) -> dict:
    if s.get("config"):
        return s["config"]
    t = s.get("totals") or {}
    return {"tau": t.get("tau"), "data": s.get("data")}


def _attr(v):
    if v is None:
        return ""  # HDF5 attributes have no null; the summary JSON keeps the None
    if isinstance(v, float) and math.isnan(v):
        return np.nan
    if isinstance(v, str):
        return str(v)  # plain str: numpy would store a str subclass as fixed-width unicode
    return v


def _describe(d, key: str, description: str | None = None) -> None:
    text, unit = DESCRIPTIONS[key]
    d.attrs["description"] = description or text
    if unit:
        d.attrs["unit"] = unit


def _dataset(g, name: str, v: np.ndarray) -> None:
    if v.size:
        d = g.create_dataset(name, data=v, chunks=True, **_GZ)
    else:
        d = g.create_dataset(name, data=v)
    _describe(d, name)


def _write_hist(parent, name: str, h: Hist) -> None:
    g = parent.create_group(name)
    _describe(g.create_dataset("edges", data=np.asarray(h.edges, dtype=np.float64)), "edges")
    for k, v in h.series.items():
        text = DESCRIPTIONS["hist_series"][0].replace("this series names", _HIST_SERIES.get(k, k))
        _describe(g.create_dataset(k, data=np.asarray(v, dtype=np.int64)), "hist_series", text)
    g.attrs["series"] = json.dumps(list(h.series))
    for k, v in h.attrs.items():
        g.attrs[k] = _attr(v)


def _write_history(parent, name: str, rows: list[dict]) -> None:
    dtype = np.dtype(list(HISTORY_FIELDS))
    table = np.zeros(len(rows), dtype=dtype)
    for i, row in enumerate(rows):
        for k, t in HISTORY_FIELDS:
            v = row.get(k)
            table[i][k] = (np.nan if t == "f8" else -1) if v is None else v
    d = parent.create_dataset(name, data=table, maxshape=(None,), chunks=True)
    d.attrs["none"] = "NaN in float columns, -1 in integer columns"
    _describe(d, "history", DESCRIPTIONS["history"][0] + f" ({name})")


# ---------------------------------------------------------------------------------------------
# Reading


def read_stats(path: str | Path) -> ReportData:
    """Read a stats.h5 written by :func:`write_stats` (masks stay in the file: read them with h5py).

    The file is untrusted: only hard links inside it are followed (an external link could name a pipe
    or another file), every array's type and shape is checked against the summary before it is read,
    and an array may not decode to far more than the file stores (a chunk bomb)."""
    import h5py

    path = Path(path)
    if path.is_dir():  # a run folder
        path = path / "stats.h5"
    size = regular_size(path)
    if size > DEFAULTS.max_decoded_bytes:
        raise DataError(f"{path}: {size} bytes, more than deadscan reads ({DEFAULTS.max_decoded_bytes}; "
                        f"raise it with {MAX_BYTES_ENV})")
    raw = open_regular(path)  # h5py reads through this checked descriptor: no FIFO swapped in after the check
    try:
        f = h5py.File(raw, "r")
    except Exception:  # h5py raises OSError, and others on damaged bytes
        raw.close()
        raise DataError(f"{path}: not an HDF5 file; pass a stats.h5 written by deadscan inspect or strip") from None
    try:
        with raw, f:
            return _read(f, path)
    except DataError:
        raise
    except _Damaged as e:
        raise DataError(f"{path}: damaged stats.h5 ({e}); re-run the command that wrote it") from None
    except Exception as e:  # damaged bytes surface as many h5py and numpy error types: one line for all
        raise DataError(f"{path}: damaged or incomplete stats.h5 ({type(e).__name__}: {one_line(e, 200)})") from None


class _Damaged(Exception):
    pass


def _has(parent, name: str) -> bool:
    """``name in parent`` without resolving the link (``in`` would open an external link's file)."""
    return parent.get(name, getlink=True) is not None


def _member(parent, name: str, kind):
    """``parent[name]`` if it is a hard link to a ``kind`` (h5py.Group or h5py.Dataset); never follows soft or
    external links, virtual datasets or external storage."""
    import h5py

    link = parent.get(name, getlink=True)
    if link is None:
        raise _Damaged(f"{parent.name.rstrip('/')}/{name} is missing")
    if not isinstance(link, h5py.HardLink):
        raise _Damaged(f"{parent.name.rstrip('/')}/{name} is a {type(link).__name__}, which deadscan never follows")
    obj = parent[name]
    if not isinstance(obj, kind):
        raise _Damaged(f"{obj.name} is not a {kind.__name__.lower()}")
    if isinstance(obj, h5py.Dataset) and (obj.is_virtual or obj.external):
        raise _Damaged(f"{obj.name} keeps its data outside the file, which deadscan never reads")
    return obj


def _array(parent, name: str, kinds: str, length: int | None = None) -> np.ndarray:
    """A 1-D numeric dataset of one of the numpy ``kinds`` ('f', 'i', 'u', 'b'), checked before it is read."""
    import h5py

    d = _member(parent, name, h5py.Dataset)
    if d.dtype.kind not in kinds or d.dtype.fields is not None or d.ndim != 1:
        raise _Damaged(f"{d.name} is {d.dtype} {d.shape}, expected a 1-D array of kind {kinds}")
    if length is not None and d.shape[0] != length:
        raise _Damaged(f"{d.name} holds {d.shape[0]} values, expected {length}")
    nbytes = d.shape[0] * d.dtype.itemsize
    stored = d.id.get_storage_size()
    if nbytes > DEFAULTS.max_expand_ratio * stored + 4096:
        raise _Damaged(f"{d.name} declares {nbytes} bytes but stores {stored}")
    return d[()]


def _read(f, path: Path) -> ReportData:
    import h5py

    if not _has(f, "summary") or not _has(f, "sites") or "schema_version" not in f.attrs:
        raise DataError(f"{path}: not a deadscan stats.h5 (no /summary or /sites); "
                        "pass a stats.h5 written by deadscan inspect or strip")
    version = f.attrs["schema_version"]
    if not isinstance(version, (int, np.integer)):
        raise _Damaged(f"schema_version is {type(version).__name__}")
    if int(version) > SCHEMA_VERSION:
        raise DataError(f"{path}: stats.h5 schema {int(version)} is newer than this deadscan reads "
                        f"({SCHEMA_VERSION}); upgrade deadscan")
    d = _member(f, "summary", h5py.Dataset)
    if d.shape != () or d.dtype.kind not in "OS":
        raise _Damaged(f"/summary is {d.dtype} {d.shape}, expected a JSON string")
    raw = d[()]
    summary = parse_summary(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw), f"{path}:/summary")
    rows = {s["name"]: s for s in summary["sites"]}
    groups = _member(f, "sites", h5py.Group)
    keys = list(groups)
    if not all(k.isdigit() for k in keys) or len(keys) != len(rows):
        raise _Damaged(f"/sites holds {len(keys)} groups for the summary's {len(rows)} sites")
    sites = []
    for key in sorted(keys, key=int):  # groups are numbered in model order
        g = _member(groups, key, h5py.Group)
        name = _str(g.attrs.get("name"))
        if name not in rows:
            raise _Damaged(f"{g.name} is site {name!r}, which the summary does not list")
        info = rows[name]
        n = info["neurons"]
        elements = g.attrs.get("elements")
        if not isinstance(elements, (int, np.integer)) or elements < 0:
            raise _Damaged(f"{g.name} has no element count")
        sites.append(SiteData(
            info=info, out_sum=_array(g, "sum", "f", n), active=_array(g, "active", "iu", n),
            elements=int(elements), pre_max=_array(g, "pre_max", "f", n),
            provably_dead=_array(g, "provably_dead", "b", n), dormant=_array(g, "dormant", "b", n),
            score=_array(g, "score", "f", n), mean_input=_array(g, "mean_input", "f") if _has(g, "mean_input") else None,
            weights=_read_hist(g, "weight_hist"), revived=_read_hist(g, "revived_hist")))
    return ReportData(summary, sites, _read_hist(f, "weight_hist"), _read_hist(f, "revived_hist"),
                      source=str(path))


def _str(v):
    return v.decode("utf-8") if isinstance(v, bytes) else v


def _read_hist(parent, name: str) -> Hist | None:
    import h5py

    if not _has(parent, name):
        return None
    g = _member(parent, name, h5py.Group)
    series = json.loads(_str(g.attrs["series"]))
    if not isinstance(series, list) or not all(isinstance(k, str) for k in series):
        raise _Damaged(f"{g.name} lists no series")
    edges = _array(g, "edges", "f")
    if len(edges) < 2:
        raise _Damaged(f"{g.name}/edges holds {len(edges)} values")
    attrs = {k: (v.item() if hasattr(v, "item") else _str(v)) for k, v in g.attrs.items() if k != "series"}
    return Hist(edges, {k: _array(g, k, "iu", len(edges) - 1) for k in series}, attrs)
