"""A run folder read back: summary.json as a checked value, and what a later run may reuse from it.

A run folder is data, like a checkpoint: people zip and share them. Whatever deadscan reads from
one passes through here and comes back typed and checked, or raises :class:`DataError` in one line:
a regular file of bounded size, JSON without NaN and of bounded nesting, and every field a later
command uses of the type it expects. Nothing read here names code that deadscan imports: an
architecture spec is reused only if :func:`deadscan.zoo.check_file_spec` admits it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .defaults import DEFAULTS
from .errors import ArchError, DataError, one_line
from .files import open_regular
from .options import DataOptions

SUMMARY = "summary.json"


# ---------------------------------------------------------------------------------------------
# A tiny schema language: a type, Opt(t), [t] (list of t), {"key": t, "key?": t} (object), MapOf(t)


class Opt:
    def __init__(self, t):
        self.t = t


class MapOf:
    def __init__(self, t):
        self.t = t


COUNT, INT, NUM, STR, BOOL, ANY = "count", "int", "number", "string", "boolean", "any"

HISTORY_ROW = {
    "epoch": COUNT, "dead": COUNT, "revived?": COUNT, "died?": COUNT, "pruned_weights": COUNT,
    "pruned_this_epoch?": COUNT, "active_percent": Opt(NUM), "active_percent_feeding_weights?": Opt(NUM),
    "train_loss": Opt(NUM), "val_loss": Opt(NUM), "val_acc": Opt(NUM), "test_acc": Opt(NUM),
    "revived_neurons?": MapOf([COUNT]), "died_neurons?": MapOf([COUNT]), "held_by_bias?": COUNT,
    "seconds?": Opt(NUM), "val_acc_percent?": Opt(NUM), "test_acc_percent?": Opt(NUM),
    "dead_by_site?": MapOf(COUNT), "val_perplexity?": Opt(NUM),
}
RESULT = {"loss": Opt(NUM), "acc": Opt(NUM), "acc_percent?": Opt(NUM)}  # acc is a percent too (kept)
SITE = {
    "name": STR, "feeding_layer": Opt(STR), "consumer_layer": Opt(STR), "gate_partner?": Opt(STR), "kind": STR,
    "call?": Opt(STR),
    "layer_kind?": Opt(STR), "neurons": COUNT, "dead": COUNT, "dead_indices": [COUNT], "provably_dead": COUNT,
    "dormant": COUNT, "strippable": BOOL, "hidden_params": COUNT, "inactive_params": COUNT,
    "active_percent": Opt(NUM), "note?": Opt(STR),
}
SUMMARY_SCHEMA = {
    "schema_version?": COUNT, "deadscan_version": STR, "torch_version?": STR, "created?": STR,
    "elapsed_seconds?": Opt(NUM), "command?": STR, "device?": STR, "processes?": COUNT,
    "definitions?": MapOf(STR),
    "device_map?": MapOf(STR),  # inspect --device-map: module -> cuda:N, mps, cpu or disk
    "checkpoint": Opt({"path": STR, "sha256": STR, "format": STR, "arch": Opt(STR), "nonfinite?": [STR],
                             "dtype?": STR}),
    "data": {"name": STR, "split?": STR, "samples?": COUNT, "seed?": INT, "val_fraction?": Opt(NUM),
             "test_fraction?": Opt(NUM), "mean?": Opt([NUM]), "std?": Opt([NUM]), "resize?": Opt(COUNT),
             "channels?": Opt(COUNT), "root?": Opt(STR), "source?": Opt(STR), "classes?": Opt(COUNT),
             "shape?": Opt([COUNT]), "indices_sha256?": Opt(STR),
             # token data (language models)
             "kind?": STR, "sequences?": COUNT, "tokens?": COUNT, "seq_len?": Opt(COUNT), "tokenizer?": Opt(STR),
             "text_field?": Opt(STR)},
    "totals": {"sites": COUNT, "neurons": COUNT, "dead": COUNT, "provably_dead": COUNT, "dormant": COUNT,
               "hidden_params": COUNT, "inactive_params": COUNT, "active_percent": Opt(NUM),
               "active_percent_feeding_weights": Opt(NUM), "pruned_weights": COUNT, "tau": NUM},
    "sites": [SITE],
    "opaque?": [{"module": STR, "reason": STR}],
    "config?": MapOf(ANY),
    "history?": [HISTORY_ROW],
    # a strip run's scan of its input checkpoint, before any training: the "before" of before/after
    "start?": {"dead": COUNT, "neurons": COUNT, "active_percent": Opt(NUM),
               "active_percent_feeding_weights": Opt(NUM), "sites": MapOf({"dead": COUNT, "active_percent": Opt(NUM)})},
    "test?": RESULT,
    "test_corrupted?": {"loss": Opt(NUM), "acc": Opt(NUM), "acc_percent?": Opt(NUM), "name": STR},
    "baseline?": {"history": [HISTORY_ROW], "test": RESULT},
    "compact?": {"path?": STR, "removed": MapOf(COUNT), "skipped": MapOf(ANY), "params_before": COUNT,
                 "params_after": COUNT, "max_abs_diff?": Opt(NUM), "nothing_to_compact?": BOOL,
                 "cpu_latency_ms_before?": Opt(NUM), "cpu_latency_ms_after?": Opt(NUM),
                 "cpu_latency_ms?": MapOf({"median": NUM, "q1": NUM, "q3": NUM, "runs": COUNT})},
    "outputs?": MapOf(STR),
    "warnings?": [STR],
    "scan_dtype?": STR,
    "rare_tokens?": {"sequences": COUNT, "sites": MapOf([{"neuron": COUNT, "frequency": NUM, "fired": COUNT,
                                                          "tokens": [[ANY]]}])},
    "finalized?": {"epochs_done": COUNT, "epochs_planned": COUNT},
}


class _Bad(Exception):
    pass


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(v, t, where: str) -> None:
    if isinstance(t, Opt):
        if v is not None:
            _check(v, t.t, where)
        return
    if isinstance(t, list):
        if not isinstance(v, list):
            raise _Bad(f"{where} must be a list, not {_kind(v)}")
        for i, item in enumerate(v):
            _check(item, t[0], f"{where}[{i}]")
        return
    if isinstance(t, MapOf):
        if not isinstance(v, dict):
            raise _Bad(f"{where} must be an object, not {_kind(v)}")
        for k, item in v.items():
            _check(item, t.t, f"{where}.{k}")
        return
    if isinstance(t, dict):
        if not isinstance(v, dict):
            raise _Bad(f"{where} must be an object, not {_kind(v)}")
        for key, kt in t.items():
            name = key.rstrip("?")
            if name in v:
                _check(v[name], kt, f"{where}.{name}" if where else name)
            elif not key.endswith("?"):
                raise _Bad(f"{where + '.' if where else ''}{name} is missing")
        return
    ok = {COUNT: lambda: _is_int(v) and v >= 0, INT: lambda: _is_int(v), STR: lambda: isinstance(v, str),
          BOOL: lambda: isinstance(v, bool), ANY: lambda: True,
          NUM: lambda: (_is_int(v) or isinstance(v, float)) and math.isfinite(v)}[t]()
    if not ok:
        want = {COUNT: "a count (an integer >= 0)", INT: "an integer", NUM: "a finite number"}.get(t, f"a {t}")
        raise _Bad(f"{where} must be {want}, not {_kind(v)}")


def _kind(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, (bool, int, float)):
        return f"{type(v).__name__} {v!r}"[:40]
    return {str: "a string", list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def _depth(obj) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((c, d + 1) for c in (o.values() if isinstance(o, dict) else o))
    return deepest


def _no_constants(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _finite(obj):
    """A copy with NaN and infinities as None (JSON has no NaN; a diverged loss reads back as null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def summary_json(summary: dict, indent: int | None = None) -> str:
    """summary.json's text: what :func:`parse_summary` reads back (never NaN)."""
    return json.dumps(_finite(summary), indent=indent, allow_nan=False)


def parse_summary(text: str, where: str) -> dict:
    """summary.json's text to a checked dict (the layout in the README), or one DataError line."""
    if len(text) > DEFAULTS.max_json_bytes:
        raise DataError(f"{where}: {len(text)} characters, more than a summary.json holds "
                        f"({DEFAULTS.max_json_bytes}); damaged or crafted")
    try:
        obj = json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise DataError(f"{where}: nested too deeply for a summary.json; damaged or crafted") from None
    except ValueError as e:
        raise DataError(f"{where}: not valid JSON ({one_line(e, 120)})") from None
    if _depth(obj) > DEFAULTS.max_json_depth:
        raise DataError(f"{where}: nested deeper than {DEFAULTS.max_json_depth} levels; not a deadscan summary")
    check_summary(obj, where)
    return obj


def check(obj, schema, where: str, what: str) -> None:
    """``obj`` matches ``schema`` (the language above), or one DataError line naming the first bad field."""
    try:
        _check(obj, schema, "")
    except _Bad as e:
        raise DataError(f"{where}: not {what} ({e}); damaged, edited or from another program") from None


def check_summary(obj, where: str) -> dict:
    try:
        _check(obj, SUMMARY_SCHEMA, "")
        for s in obj["sites"]:
            if any(i >= s["neurons"] for i in s["dead_indices"]):
                raise _Bad(f"site {s['name']!r} lists dead neurons beyond its {s['neurons']} neurons")
    except _Bad as e:
        raise DataError(f"{where}: not a deadscan summary ({e}); damaged, edited or from another program") from None
    return obj


def read_summary(path: str | os.PathLike) -> dict:
    """A run folder's summary.json (or the file itself), checked."""
    path = Path(path)
    if path.is_dir():
        path = path / SUMMARY
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > DEFAULTS.max_json_bytes:
            raise DataError(f"{path}: {size} bytes, more than a summary.json holds ({DEFAULTS.max_json_bytes}); "
                            "damaged or crafted")
        try:
            text = f.read(DEFAULTS.max_json_bytes + 1).decode("utf-8")
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text; not a deadscan summary") from None
    return parse_summary(text, str(path))


def summary_or_empty(folder: str | os.PathLike) -> dict:
    """The checked summary.json an earlier run left in ``folder``; {} if there is none or it is unreadable."""
    try:
        return read_summary(Path(folder) / SUMMARY)
    except DataError:
        return {}


# ---------------------------------------------------------------------------------------------
# What a strip run reuses from an inspect


@dataclass(frozen=True)
class PreviousRun:
    """The checkpoint and data a previous run used, as its summary.json records them."""

    summary_path: Path
    checkpoint: Path  # resolved against the folder's working directory as recorded (see README)
    sha256: str
    format: str
    arch: str | None  # None: the checkpoint's own metadata names it (safetensors written by deadscan)
    data: DataOptions  # the data it read and how (split seed, normalisation, token options)
    is_strip: bool  # the run was a strip run (it has a history)


def previous_run(from_dir: str | os.PathLike) -> PreviousRun:
    """What ``strip`` without a checkpoint reuses from ``from_dir/summary.json``.

    The architecture spec is reused only when it names no code (built-in or registry names); a spec
    the checkpoint's own safetensors metadata carries is left to the loader, which applies the same rule.
    """
    folder = Path(from_dir)
    path = folder / SUMMARY
    if not path.exists() and not path.is_symlink():
        raise DataError(f"no checkpoint given and no previous inspect in {folder}/ (no {SUMMARY}); "
                        "pass CKPT and --data, or run deadscan inspect first")
    s = read_summary(path)
    ck, d = s["checkpoint"], s["data"]
    if ck is None:
        raise DataError(f"{path}: records no checkpoint; pass CKPT and --data")
    # A safetensors file written by deadscan names its own spec (the loader checks it); a Hugging Face folder's
    # class comes from its own config.json, looked up among transformers' classes only.
    arch = None if ck["format"] == "safetensors" or ck["format"].startswith("hf-") else ck["arch"]
    if arch is not None:
        from .zoo import check_file_spec, parse_spec

        try:
            spec = parse_spec(arch)
        except (ArchError, RecursionError, MemoryError, ValueError, SyntaxError) as e:
            raise DataError(f"{path}: its checkpoint.arch is not an architecture spec ({one_line(e, 120)}); "
                            "pass CKPT and --arch yourself") from None
        try:
            check_file_spec(spec, str(path))
        except ArchError as e:
            raise DataError(str(e)) from None
    return PreviousRun(path, Path(ck["path"]), ck["sha256"], ck["format"], arch, DataOptions.from_record(d),
                       "history" in s)
