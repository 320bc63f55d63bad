"""Physically remove dead neurons: the neurons (and bias, BatchNorm entries) of the feeding layer and
the matching input features of the consumer layer (``layers`` knows which weight dimension each is). Outputs are checked equal on the scanned data
before anything is written.

A gated site (relu(gate(x)) * up(x) read by down) also loses its partner's rows: the product of a
dead neuron is exactly zero whatever up computes.

Only where the structure allows: the feeding layer's output reaches nothing but the site, the
per-feature ops between are BatchNorms, dropouts or scalars, and a dead neuron reaches the
consumer as an exact zero (no BatchNorm after the ReLU). Other sites are left whole, with the
reason recorded.
"""

from __future__ import annotations

import copy
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .layers import entry, neuron_rows, reader
from .scan import ScanResult
from .zoo import SHAPES_KEY, resized, set_submodule, widths


def prune_out(layer: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A copy of a feeding layer keeping only neurons ``keep`` (its ``layers`` entry knows the layout)."""
    return entry(layer).prune_out(layer, keep)


def prune_in(layer: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A copy of a consumer layer keeping only input features ``keep`` (the bias is unchanged)."""
    return entry(layer).prune_in(layer, keep)


def prune_bn(bn: nn.Module, keep: torch.Tensor) -> nn.Module:
    new = resized(bn, out_features=len(keep))
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(bn, name)
            if src is not None:
                getattr(new, name).copy_(src.index_select(0, keep))
        if bn.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


@dataclass
class Compacted:
    model: nn.Module
    removed: dict[str, int] = field(default_factory=dict)  # site -> neurons removed
    skipped: dict[str, str] = field(default_factory=dict)  # site -> why its dead neurons stay
    shapes: dict[str, dict] = field(default_factory=dict)  # layer -> new widths (safetensors metadata)
    params_before: int = 0
    params_after: int = 0
    max_abs_diff: float | None = None

    def metadata(self) -> dict[str, str]:
        return {SHAPES_KEY: json.dumps(self.shapes, sort_keys=True)}


def _why_not(model: nn.Module, r, uses: dict[tuple[str, str], int]) -> str | None:
    s = r.site
    if s.feeding is None:
        return "no feeding layer"
    if s.consumer is None:
        return "no consumer layer (its output is added, concatenated or returned)"
    if not s.feeding.exclusive:
        return "the feeding layer's output is also read elsewhere"
    if getattr(model.get_submodule(s.feeding.layer), "groups", 1) != 1:
        return "a grouped convolution feeds the site (its channels are tied to its inputs)"
    if uses[("feeds", s.feeding.layer)] > 1 or uses[("reads", s.consumer.layer)] > 1:
        return "a layer feeds or reads several sites"
    g = s.gate
    if g is not None:
        if not g.exclusive:
            return "the gate partner's output is also read elsewhere"
        if uses[("feeds", g.layer)] > 1:
            return "a layer feeds or reads several sites"
    if any(op == "bias" for op, _ in s.feeding.chain):
        return "a per-feature bias parameter sits between layer and ReLU"
    if not s.consumer.keeps_zero:
        return "a BatchNorm after the ReLU turns dead outputs into a constant"
    if entry(model.get_submodule(s.consumer.layer), s.consumer.layer).feature_axis != -1 and s.consumer.group != 1:
        return "unsupported consumer layout"
    if r.dead.all():
        return "every neuron is dead: the site would vanish"
    return None


def compact(model: nn.Module, scan: ScanResult) -> Compacted:
    """A copy of ``model`` without the dead neurons of every site where that is exact."""
    new = copy.deepcopy(model)
    out = Compacted(new, params_before=_params(model))
    uses: Counter[tuple[str, str]] = Counter()
    for r in scan.sites:
        if r.site.feeding:
            uses["feeds", r.site.feeding.layer] += 1
        if r.site.gate:  # the partner's rows are removed too: it counts as feeding
            uses["feeds", r.site.gate.layer] += 1
        if r.site.consumer:
            uses["reads", r.site.consumer.layer] += 1
    for r in scan.sites:
        if r.neurons == 0 or not r.dead.any():
            continue
        why = _why_not(model, r, uses)
        if why is not None:
            out.skipped[r.site.name] = why
            continue
        f, c = r.site.feeding, r.site.consumer
        layer = new.get_submodule(f.layer)
        neuron_rows(layer, f.layer, r.neurons)  # a layout or width mismatch fails, never skips
        reader(new.get_submodule(c.layer), c.layer, r.neurons * c.group)
        keep = torch.from_numpy(np.flatnonzero(~r.dead)).to(layer.weight.device)
        set_submodule(new, f.layer, prune_out(layer, keep))
        for op, name in f.chain:
            if op == "bn":
                set_submodule(new, name, prune_bn(new.get_submodule(name), keep))
                out.shapes[name] = widths(new.get_submodule(name))
        g = r.site.gate
        if g is not None:
            neuron_rows(new.get_submodule(g.layer), g.layer, r.neurons)
            set_submodule(new, g.layer, prune_out(new.get_submodule(g.layer), keep))
            out.shapes[g.layer] = widths(new.get_submodule(g.layer))
        set_submodule(new, c.layer, prune_in(new.get_submodule(c.layer), c.columns(keep)))
        out.shapes[f.layer] = widths(new.get_submodule(f.layer))
        out.shapes[c.layer] = widths(new.get_submodule(c.layer))
        out.removed[r.site.name] = int(r.dead.sum())
    out.params_after = _params(new)
    return out


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _outputs(model: nn.Module, xb) -> torch.Tensor:
    """What is compared: the output of an image batch; for a token batch (a dict of ``input_ids`` and
    ``attention_mask``) the logits at real positions only (a dead neuron may fire on padding)."""
    if not isinstance(xb, dict):
        return model(xb).float()
    from .data.tokens import model_kwargs
    from .finetune import _logits

    logits = _logits(model(**model_kwargs(model, xb))).float()
    mask = xb.get("attention_mask")
    return logits[mask.bool()] if mask is not None else logits


def compare_outputs(a: nn.Module, b: nn.Module, batches) -> tuple[float, float]:
    """(largest |a(x) - b(x)|, largest |a(x)|) over ``batches`` (tensors, or token batches: logits at real
    positions), in one pass; one sync at the end."""
    diff = scale = torch.zeros(())
    a.eval()
    b.eval()
    with torch.inference_mode():
        for xb in batches:
            ya, yb = _outputs(a, xb), _outputs(b, xb)
            if ya.numel() == 0:
                continue
            diff = torch.maximum(diff.to(ya.device), (ya - yb).abs().max())
            scale = torch.maximum(scale.to(ya.device), ya.abs().max())
    return float(diff), float(scale)


def max_output_diff(a: nn.Module, b: nn.Module, batches) -> float:
    """Largest absolute difference of the two models' outputs over ``batches``."""
    return compare_outputs(a, b, batches)[0]


def cpu_latencies_ms(models: list[nn.Module], example, repeats: int = 30) -> list[dict]:
    """CPU latency of one forward on ``example`` (a tensor, or a token batch dict) per model, in ms: the
    median and the quartiles of ``repeats`` runs, the models timed in turn (a, b, a, b, ...) after a warm-up
    of each, so load on the machine reaches all of them alike instead of skewing the first."""
    runs, modes = [], []
    for model in models:
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        # timed on CPU whatever the training device; a model already there is timed in place (no copy of an LM)
        m = model if on_cpu else copy.deepcopy(model).to("cpu")
        modes.append((m, m.training))
        m.eval()
        if isinstance(example, dict):
            from .data.tokens import model_kwargs

            kwargs = model_kwargs(m, {k: v.to("cpu") for k, v in example.items()})
            runs.append(lambda m=m, kwargs=kwargs: m(**kwargs))
        else:
            x = example.to("cpu")
            runs.append(lambda m=m, x=x: m(x))
    times = [[] for _ in runs]
    with torch.inference_mode():
        for run in runs:
            for _ in range(3):
                run()
        for _ in range(repeats):
            for run, t in zip(runs, times):
                t0 = time.perf_counter()
                run()
                t.append(time.perf_counter() - t0)
    for m, training in modes:
        m.train(training)
    out = []
    for t in times:
        q1, med, q3 = (1000 * float(v) for v in np.percentile(t, [25, 50, 75]))
        out.append({"median": round(med, 4), "q1": round(q1, 4), "q3": round(q3, 4), "runs": repeats})
    return out
