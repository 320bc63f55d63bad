"""Run data through the model with every site instrumented; keep per-neuron statistics.

Statistics stay on the device and are reduced per batch with tensor ops only: the scan loop
never waits on the host. They are sums, counts and maxima, so shards scanned apart merge exactly
(:func:`merge`).
"""

from __future__ import annotations

import contextlib
import operator
import sys
import warnings
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .defaults import DEFAULTS
from . import distributed, layers
from .errors import DataError, DeadscanError, DeadscanWarning, TraceError, one_line
from .neurons import PerNeuron
from .locate import raised_in
from .trace import Site, SiteMap, copy_graph, effective_affine, find_sites


# ---------------------------------------------------------------------------------------------
# Per-site statistics


class ValidPositions:
    """The current batch's real token positions (attention_mask 1), shared by every site's statistics.

    ``idx`` holds the flat (batch-major) indices of the valid positions; ``None``: every position counts
    (images, or token batches without padding information)."""

    def __init__(self):
        self.idx: torch.Tensor | None = None
        self.rows = 0  # positions in the batch (B * T)
        self.count = 0  # valid positions in the batch (host int)
        self._on: dict[torch.device, torch.Tensor] = {}

    def set(self, mask: torch.Tensor | None) -> None:
        self._on = {}  # the indices copied to other devices (a model dispatched over several GPUs)
        if mask is None:
            self.idx, self.rows, self.count = None, 0, 0
            return
        flat = mask.reshape(-1)
        self.rows = flat.numel()
        self.idx = flat.nonzero().squeeze(1)  # one sync per batch (not per site): the count must be known anyway
        self.count = int(self.idx.numel())

    def select(self, x: torch.Tensor, axis: int) -> torch.Tensor | None:
        """``x`` (neurons on ``axis``) as (valid positions, neurons), or None if its positions are not the
        batch's token positions (e.g. a pooled (B, F) activation)."""
        if axis != x.ndim - 1 or x.ndim < 2 or x.numel() // max(x.shape[-1], 1) != self.rows:
            return None
        idx = self.idx
        if idx.device != x.device:  # a layer on another device than the inputs: once per batch and device
            idx = self._on.get(x.device)
            if idx is None:
                idx = self._on[x.device] = self.idx.to(x.device)
        return x.reshape(-1, x.shape[-1]).index_select(0, idx)


class Scratch:
    """One buffer the sites of a scan share for their temporaries (they run one at a time): on CPU a fresh
    activation-sized tensor per call costs its page faults, more than the arithmetic on it. On a GPU the
    caching allocator already reuses memory, so a temporary stays transient there (no memory held between
    calls)."""

    def __init__(self):
        self.bufs: dict[tuple, torch.Tensor] = {}  # (device, dtype) -> the largest buffer asked for there

    def like(self, t: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor of ``t``'s shape, dtype and device, overwritten by the next call."""
        if t.device.type != "cpu":
            return torch.empty(t.shape, dtype=t.dtype, device=t.device)
        key = (t.device, t.dtype)
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < t.numel():
            buf = self.bufs[key] = torch.empty(t.numel(), dtype=t.dtype, device=t.device)
        return buf[: t.numel()].view(t.shape)


class SiteStats:
    """Running per-neuron statistics of one site, on the activation's device."""

    def __init__(self, site: Site, valid: ValidPositions | None = None, scratch: Scratch | None = None):
        self.site = site
        self.scratch = scratch or Scratch()
        self.valid = valid  # padded positions never count (token data)
        self.unmasked = 0  # calls whose activation was not shaped by token positions: every element counted
        self.sum: torch.Tensor | None = None  # sum of outputs (float64)
        self.active: torch.Tensor | None = None  # count of elements > 0 (int64)
        self.pre_max: torch.Tensor | None = None  # max pre-activation (float32)
        self.elements = 0  # elements per neuron seen (host int: known from shapes, no sync)
        self.calls = 0  # calls seen (host int)

    def _axis(self, x: torch.Tensor) -> int:
        if self.site.axis is not None:
            return self.site.axis % x.ndim
        return x.ndim - 1 if x.ndim <= 3 else 1  # unknown: token-last for (B, T, D), channels for images

    def update(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Record pre-activation ``x`` (and its output ``y`` if already computed)."""
        if x.ndim == 1:
            x = x.unsqueeze(0)
            y = None if y is None else y.unsqueeze(0)
        axis = self._axis(x)
        if self.valid is not None and self.valid.idx is not None:
            kept = self.valid.select(x, axis)
            if kept is None:
                self.unmasked += 1
            else:  # only real tokens: a neuron firing on padding alone stays dead
                x, y, axis = kept, None if y is None else self.valid.select(y, axis), 1
        dims = [d for d in range(x.ndim) if d != axis]
        n = x.shape[axis]
        if self.sum is None:
            self.sum = torch.zeros(n, dtype=torch.float64, device=x.device)
            self.active = torch.zeros(n, dtype=torch.int64, device=x.device)
            self.pre_max = torch.full((n,), -torch.inf, dtype=torch.float32, device=x.device)
        elif self.sum.shape[0] != n:
            raise TraceError(
                f"site {self.site.name}: {n} neurons in this call but {self.sum.shape[0]} before; "
                "a module reused with different widths cannot be one site"
            )
        if y is None:
            y = _act(self.site.activation, x, inplace=False)
        per_neuron = x.numel() // n  # known from the shape: no sync
        if per_neuron < 2**24:  # float32 counts are exact below 2**24
            out_sum, positive, pre_max = call_stats(x, y, dims, self.scratch)
            self.active += positive.long()
        else:
            out_sum, pre_max = y.sum(dims, dtype=torch.float32), x.amax(dims)
            self.active += (x > 0).sum(dims, dtype=torch.int64)
        self.sum += out_sum  # a float32 sum per call, added into a float64 total
        torch.maximum(self.pre_max, pre_max.float(), out=self.pre_max)
        self.elements += per_neuron
        self.calls += 1


def call_stats(x: torch.Tensor, y: torch.Tensor, dims: list[int], scratch: Scratch):
    """One call's per-neuron sum of outputs, count of positive outputs and max pre-activation (float32 sums:
    a float64 reduction copies the whole activation on CPU). The count sums sign(y), exactly 0 or 1, in
    float32: several times cheaper on CPU than summing a bool mask, and exact below 2**24 elements per
    neuron. Looked up at each call, so benchmarks/scan_overhead.py --compiled-stats can time a fused kernel
    in its place."""
    return (y.sum(dims, dtype=torch.float32), torch.sign(y, out=scratch.like(y)).sum(dims, dtype=torch.float32),
            x.amax(dims))


def _act(activation: str, x: torch.Tensor, inplace: bool) -> torch.Tensor:
    if activation == "relu6":
        return F.relu6(x, inplace=inplace)
    return torch.relu_(x) if inplace else torch.relu(x)


class InputStats:
    """Running per-input-feature sum of a feeding layer's input (for the contribution criterion)."""

    def __init__(self, axis: int, valid: ValidPositions | None = None):
        self.axis = axis  # the layer kind's feature axis: -1 (Linear, HF Conv1D) or 1 (Conv)
        self.valid = valid
        self.sum: torch.Tensor | None = None
        self.elements = 0

    def update(self, x: torch.Tensor) -> None:
        axis = self.axis % x.ndim
        if self.valid is not None and self.valid.idx is not None:
            kept = self.valid.select(x, axis)
            if kept is not None:
                x, axis = kept, 1
        dims = [d for d in range(x.ndim) if d != axis]
        if self.sum is None:
            self.sum = torch.zeros(x.shape[axis], dtype=torch.float64, device=x.device)
        self.sum += x.sum(dims, dtype=torch.float32)  # float32 per batch, as SiteStats: no float64 copy
        self.elements += x.numel() // x.shape[axis]

    def mean(self) -> np.ndarray | None:
        return None if self.sum is None else (self.sum / max(self.elements, 1)).float().cpu().numpy()


class _Probe(nn.Module):
    """Stands in for one relu call in a traced graph: records, then applies the activation."""

    def __init__(self, stats: SiteStats):
        super().__init__()
        self.stats = stats

    def forward(self, x):
        s = self.stats
        if not s.site.inplace:
            y = _act(s.site.activation, x, inplace=False)
            s.update(x, y)
            return y
        s.update(x)  # stats first: the in-place op overwrites the pre-activation
        return _act(s.site.activation, x, inplace=True)


@contextlib.contextmanager
def instrument(model: nn.Module, sitemap: SiteMap, inputs: dict[str, InputStats] | None = None,
               valid: ValidPositions | None = None) -> Iterator[tuple[nn.Module, list[SiteStats]]]:
    """Yield (runner, stats): calling ``runner`` runs ``model`` with every site recorded.

    ``inputs`` (feeding layer name -> InputStats) also records those layers' mean inputs. ``valid``: the
    token positions that count, set by the caller before each batch (padding never counts).

    Traced parts become GraphModules sharing the model's parameters; untraced parts are swapped
    in place for the duration and restored afterwards. The model's weights are never copied.
    """
    scratch = Scratch()
    stats = [SiteStats(s, valid, scratch) for s in sitemap.sites]
    by_part: dict[int, dict[str, SiteStats]] = {}
    for st in stats:
        if not st.site.hooked:
            by_part.setdefault(st.site.part, {})[st.site.node] = st
    runner: nn.Module = model
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    handles = []
    try:
        for i, part in enumerate(sitemap.parts):
            if i not in by_part:  # nothing to record there: the part runs as written (a graph traced on one
                continue          # control-flow path, e.g. an optional argument left None, may not hold for another)
            gm = _instrumented_graph_module(part.module, part.graph, by_part[i])
            if part.path == "":
                runner = gm
            else:
                parent_name, _, attr = part.path.rpartition(".")
                parent = model.get_submodule(parent_name)
                swapped.append((parent, attr, getattr(parent, attr)))
                setattr(parent, attr, gm)
        for st in stats:
            if st.site.hooked:
                module = model.get_submodule(st.site.name)
                if st.site.inplace:  # the module overwrites its input: record it before
                    hook = module.register_forward_pre_hook(lambda _m, args, st=st: st.update(args[0]))
                else:  # reuse the module's own output rather than computing the activation again
                    hook = module.register_forward_hook(lambda _m, args, out, st=st: st.update(args[0], out))
                handles.append(hook)
        for layer, rec in (inputs or {}).items():
            handles.append(model.get_submodule(layer).register_forward_pre_hook(
                lambda _m, args, rec=rec: rec.update(args[0])))
        yield runner, stats
    finally:
        for h in handles:
            h.remove()
        for parent, attr, original in reversed(swapped):
            setattr(parent, attr, original)


def _instrumented_graph_module(root: nn.Module, graph: fx.Graph, probes: dict[str, SiteStats]) -> fx.GraphModule:
    graph = copy_graph(graph)
    gm = fx.GraphModule(root, graph)
    for node in list(gm.graph.nodes):
        st = probes.get(node.name)
        if st is None:
            continue
        name = f"_deadscan_probe_{len(gm._modules)}"
        gm.add_submodule(name, _Probe(st))
        x = node.args[0] if node.args else node.kwargs["input"]
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (x,))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.recompile()
    # fx's wrapper prints a traceback to stderr when the generated forward raises, then drops the traceback;
    # a plain call keeps the frames, from which _where names the module the failing op came from.
    gm._wrapped_call = _plain_call
    return gm


def _plain_call(module: nn.Module, *args, **kwargs):
    return nn.Module.__call__(module, *args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class SiteResult(PerNeuron):
    """Per-neuron statistics of one site over the scanned data (numpy, on the host)."""

    site: Site
    out_sum: np.ndarray  # float64, sum of outputs
    active: np.ndarray  # int64, elements with output > 0
    elements: int  # elements per neuron scanned (samples x positions)
    pre_max: np.ndarray  # float32, max pre-activation (how far a dead neuron is from waking)
    provably_dead: np.ndarray  # bool, from the weights alone
    tau: float
    mean_input: np.ndarray | None = None  # feeding layer's mean input per input feature (if asked)

    @property
    def activation(self) -> str:
        return self.site.activation

    @property
    def score(self) -> np.ndarray:
        """ReDo score s_i = mean|h_i| / mean_k mean|h_k| (outputs are >= 0, so |h| = h)."""
        mean = self.out_sum / max(self.elements, 1)
        avg = mean.mean() if mean.size else 0.0
        return mean / avg if avg > 0 else np.zeros_like(mean)

    @property
    def dormant(self) -> np.ndarray:
        return self.score <= self.tau

    @property
    def dead_indices(self) -> list[int]:
        return np.flatnonzero(self.dead).tolist()


@dataclass
class ScanResult:
    sites: list[SiteResult]
    sitemap: SiteMap = field(repr=False)
    samples: int
    device: str
    tau: float
    batch_size: int | None = None  # the batch size the scan ended with (halved after running out of memory)
    tokens: int | None = None  # token data: real (unpadded) tokens scanned; None for other data
    processes: int = 1  # torchrun processes whose shards were reduced into this result

    def __getitem__(self, name: str) -> SiteResult:
        for r in self.sites:
            if r.site.name == name:
                return r
        raise KeyError(name)

    @property
    def dead(self) -> int:
        return int(sum(r.dead.sum() for r in self.sites))

    @property
    def neurons(self) -> int:
        return sum(r.neurons for r in self.sites)


# ---------------------------------------------------------------------------------------------
# Scanning


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DataError(f"unknown --device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DataError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DataError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise DataError(f"--device {device}: Apple's MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":  # meta holds no data; xpu, hpu... are not supported
        raise DataError(f"--device {device}: deadscan runs on cpu, cuda, cuda:N or mps")
    return dev


def _input_batches(data, batch_size: int, device: torch.device,
                   group: distributed.Group = distributed.Group()) -> tuple[Iterable, int | None]:
    """Batches of model inputs from a deadscan Dataset or TokenDataset, a tensor, or an iterable of
    batches (tensors, ``(x, y, ...)`` tuples, or token dicts with ``input_ids`` and ``attention_mask``).
    Of several processes' ``group``, this one's share only: a contiguous span of samples (datasets,
    tensors) or every world-th batch (other iterables, whose length is unknown)."""
    if hasattr(data, "batches"):
        data = shard_dataset(data, group)
        return data.batches(batch_size, device), len(data)
    if (isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)
            and data[1].ndim == 1 and not data[1].is_floating_point() and len(data[0]) == len(data[1])):
        data = data[0]  # a whole (inputs, labels) pair, not two batches
    if isinstance(data, torch.Tensor):
        start, stop = group.span(len(data))
        x = data[start:stop].to(device)
        return (x[i:i + batch_size] for i in range(0, len(x), batch_size)), len(x)

    def from_iterable():
        for i, item in enumerate(data):
            if i % group.world != group.rank:
                continue
            if isinstance(item, dict):  # a token batch: ids stay integers
                yield {k: v.to(device, non_blocking=True) for k, v in item.items() if k in TOKEN_KEYS}
                continue
            xb = item[0] if isinstance(item, (tuple, list)) else item
            yield xb.to(device, non_blocking=True)
    return from_iterable(), None


TOKEN_KEYS = ("input_ids", "attention_mask")


def shard_dataset(data, group: distributed.Group):
    """This process's span of a Dataset (``x``, ``y``) or TokenDataset (``input_ids``, ``attention_mask``)."""
    if group.world == 1:
        return data
    start, stop = group.span(len(data))
    indices = None if data.indices is None else data.indices[start:stop]
    if hasattr(data, "input_ids"):
        return replace(data, input_ids=data.input_ids[start:stop], attention_mask=data.attention_mask[start:stop],
                       indices=indices, _device_copy=None)
    return replace(data, x=data.x[start:stop], y=data.y[start:stop], indices=indices)


def _batch_len(xb) -> int:
    return len(xb["input_ids"]) if isinstance(xb, dict) else len(xb)


def _split(xb, chunk: int) -> list:
    if isinstance(xb, dict):
        pieces = {k: v.split(chunk) for k, v in xb.items()}
        return [{k: v[i] for k, v in pieces.items()} for i in range(len(pieces["input_ids"]))]
    return list(xb.split(chunk))


def scan(model: nn.Module, data, *, sitemap: SiteMap | None = None, batch_size: int = DEFAULTS.batch_size,
         device: str | torch.device | None = None, tau: float = DEFAULTS.tau, progress: bool = False,
         input_means: bool = False, group: distributed.Group | None = None) -> ScanResult:
    """Scan ``data`` through ``model`` and return per-site, per-neuron statistics.

    ``data``: a :class:`deadscan.data.Dataset`, a :class:`deadscan.data.TokenDataset`, a tensor of inputs,
    or any iterable of input batches (or ``(x, y, ...)`` tuples, e.g. a DataLoader, or token dicts
    ``{"input_ids", "attention_mask"}``). Token batches are passed as ``model(input_ids=...,
    attention_mask=...)`` (an encoder-decoder also gets the ids shifted right as ``decoder_input_ids``)
    and padded positions (attention_mask 0) are never part of the statistics. The model runs in eval mode under
    ``torch.inference_mode``; its training flag is restored afterwards. ``input_means=True`` also
    records each feeding layer's mean input (for the contribution criterion).

    Out of memory on a batch (CUDA, or any device raising ``torch.OutOfMemoryError``): the statistics
    are discarded and the scan starts over with batches half as large (a :class:`DeadscanWarning`
    says so), down to one sample; ``ScanResult.batch_size`` is the size it ended with. Nothing is
    snapshotted per batch, so the normal path pays nothing for this; an out-of-memory error comes
    on the first batches in practice, so starting over costs little. A one-pass iterator (a
    generator) cannot be started over: its out-of-memory error is one clear line instead.

    ``group``: the processes whose statistics are reduced (each scans its share of ``data``; every one gets
    the whole result); default: deadscan's torchrun group (:func:`deadscan.distributed.setup`), else one.
    """
    dev = resolve_device(device)
    group = distributed.current() if group is None else group
    if not _dispatched(model):  # placed by accelerate (deadscan.devmap): its layers stay where they are
        model.to(dev)
    if sitemap is None:
        sitemap = find_sites(model)
    was_training = model.training
    model.eval()
    chunk = None  # after running out of memory: the most samples run through the model at once
    valid = ValidPositions()
    try:
        while True:
            inputs = {s.feeding.layer: InputStats(_feature_axis(model, s.feeding.layer), valid)
                      for s in sitemap.sites if input_means and s.feeding is not None}
            error = oom = None
            try:
                stats, samples, forwards, tokens = _scan_pass(model, data, sitemap, inputs, batch_size, chunk, dev,
                                                              progress, valid, group)
            except _OutOfMemory as e:
                oom = e.batch
            except DeadscanError as e:
                error = e
            oom = group.check(error, oom)  # every process learns whether any failed or ran out of memory
            if oom is None:
                break
            if oom <= 1:
                raise TraceError(f"out of memory on {dev} with a batch of 1 sample during the scan; "
                                 "use a smaller model or input size, or --device cpu") from None
            if not _restartable(data):
                raise TraceError(f"out of memory on {dev} with a batch of {oom} during the scan; the "
                                 "data is a one-pass iterator, so it cannot be scanned again: use smaller "
                                 "batches") from None
            chunk = oom // 2
            _free_cached(dev)
            warnings.warn(DeadscanWarning(
                f"out of memory on {dev} with a batch of {oom}; scanning again from the start with "
                f"batches of {chunk}"), stacklevel=2)
    finally:
        model.train(was_training)
    if group.active:
        with torch.inference_mode():  # the statistics are inference tensors: updated in place only there
            samples, forwards, tokens = _all_reduce(group, dev, stats, list(inputs.values()), samples, forwards,
                                                    tokens)
    if samples == 0:
        raise DataError("no samples to scan: the data split is empty")
    results = [_result(model, st, tau, forwards) for st in stats]  # one host transfer per site, after the loop
    for r in results:
        if r.site.feeding is not None and r.site.feeding.layer in inputs:
            r.mean_input = inputs[r.site.feeding.layer].mean()
    return ScanResult(results, sitemap, samples, str(dev), tau, batch_size if chunk is None else chunk, tokens,
                      group.world)


# How each statistic combines over data shards: merge() and a distributed scan's all-reduce both follow it.
COMBINE = {"out_sum": "sum", "active": "sum", "elements": "sum", "pre_max": "max"}
_RUNNING = {"out_sum": "sum", "active": "active", "pre_max": "pre_max"}  # SiteResult field -> SiteStats tensor


def _all_reduce(group: distributed.Group, dev: torch.device, stats: list[SiteStats], inputs: list[InputStats],
                samples: int, forwards: int, tokens: int | None) -> tuple[int, int, int | None]:
    """Sum or max every process's statistics into each process's own (the rules of :data:`COMBINE`).

    Every process joins the same collectives in the same order, whichever sites its shard reached: the
    widths are reduced first and a site this process never called gets zeros (and -inf maxima) of that
    width. Returns the reduced (samples, forwards, tokens)."""
    running = stats + inputs
    own = [0 if r.sum is None else r.sum.shape[0] for r in running]
    absent = -(2**62)
    widths = torch.tensor(own + [-w if w else absent for w in own], dtype=torch.int64, device=group.device)
    group.all_reduce(widths, "max")
    widest, narrowest = widths[:len(own)].tolist(), [-w for w in widths[len(own):].tolist()]
    for r, n, m in zip(running, widest, narrowest):
        if n and n != m:
            name = r.site.name if isinstance(r, SiteStats) else "a feeding layer's input"
            raise TraceError(f"site {name}: {m} neurons in one process, {n} in another; "
                             "a module reused with different widths cannot be one site")
        if n and r.sum is None:  # a branch this shard never reached
            r.sum = torch.zeros(n, dtype=torch.float64, device=dev)
            if isinstance(r, SiteStats):
                r.active = torch.zeros(n, dtype=torch.int64, device=dev)
                r.pre_max = torch.full((n,), -torch.inf, dtype=torch.float32, device=dev)
    present = [r for r in running if r.sum is not None]
    sites = [st for st in stats if st.sum is not None]
    for fld, attr in _RUNNING.items():  # a feeding layer's input sum adds like out_sum
        tensors = [getattr(r, attr) for r in (present if fld == "out_sum" else sites)]
        if tensors:
            flat = group.all_reduce(torch.cat([t.to(group.device) for t in tensors]), COMBINE[fld])
            for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
                t.copy_(part)
    # host counts (calls, unmasked, samples, forwards, tokens) add like elements
    counts = [r.elements for r in present] + [st.calls for st in stats] + [st.unmasked for st in stats]
    counts += [samples, forwards, tokens or 0, tokens is not None]
    total = group.all_reduce(torch.tensor(counts, dtype=torch.int64, device=group.device), COMBINE["elements"])
    total = total.tolist()
    k = len(present)
    for r, n in zip(present, total[:k]):
        r.elements = n
    for i, st in enumerate(stats):
        st.calls, st.unmasked = total[k + i], total[k + len(stats) + i]
    samples, forwards, tokens, has_tokens = total[-4:]
    return samples, forwards, tokens if has_tokens else None


def _feature_axis(model: nn.Module, name: str) -> int:
    return layers.entry(model.get_submodule(name), name).feature_axis


class _OutOfMemory(Exception):
    def __init__(self, batch: int):
        super().__init__(batch)
        self.batch = batch


_OOM_TYPES = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, _OOM_TYPES) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def _restartable(data) -> bool:
    if hasattr(data, "batches") or isinstance(data, torch.Tensor):
        return True
    try:
        return iter(data) is not data  # a list or a DataLoader starts over; a generator does not
    except TypeError:
        return False


def _free_cached(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _scan_pass(model: nn.Module, data, sitemap: SiteMap, inputs: dict, batch_size: int, chunk: int | None,
               dev: torch.device, progress: bool, valid: ValidPositions, group: distributed.Group
               ) -> tuple[list[SiteStats], int, int, int | None]:
    """One pass over the data with fresh statistics; ``chunk``: split batches larger than this.
    Returns (stats, samples, forwards, real tokens or None)."""
    samples = forwards = 0
    tokens = None
    request = batch_size if chunk is None else min(batch_size, chunk)
    batches, total = _input_batches(data, request, dev, group)
    with instrument(model, sitemap, inputs, valid) as (runner, stats), torch.inference_mode():
        bar = _progress(total, progress)
        try:
            for xb in batches:
                parts = (xb,) if chunk is None or _batch_len(xb) <= chunk else _split(xb, chunk)
                for part in parts:
                    failed = None
                    try:
                        if isinstance(part, dict):
                            from .data.tokens import model_kwargs

                            valid.set(part.get("attention_mask"))
                            kwargs = model_kwargs(model, part)
                            tokens = (tokens or 0) + (valid.count if valid.idx is not None
                                                      else kwargs["input_ids"].numel())
                            runner(**kwargs)
                        else:
                            runner(part)
                    except DeadscanError:
                        raise
                    except Exception as e:  # the user's model failed: say where, not a traceback
                        if not _is_oom(e):
                            raise TraceError(f"the model raised during the scan{_where(e, model, runner)}") from None
                        failed = len(part)  # handled below, once the exception (and its activations) is freed
                    if failed is not None:
                        raise _OutOfMemory(failed)
                    samples += _batch_len(part)
                    forwards += 1
                    bar.update(_batch_len(part))
        finally:
            bar.close()
            valid.set(None)
    return stats, samples, forwards, tokens


def nothing_to_strip(sitemap: SiteMap, what: str | object = "the model") -> str | None:
    """Why Synaptic Stripping can do nothing for this model (one line), or None if some site is strippable."""
    if any(s.strippable for s in sitemap.sites):
        return None
    if not sitemap.sites:
        return (f"{what}: nothing to strip: the model has no ReLU sites, so no neuron can die the ReLU way "
                "(deadscan inspect reports it)")
    notes = sorted({s.note.split(":")[0] for s in sitemap.sites if s.note})
    why = f" ({'; '.join(notes[:3])})" if notes else ""
    return (f"{what}: nothing to strip: none of its {len(sitemap.sites)} ReLU sites is fed by a Linear or Conv "
            f"through per-feature ops only{why}; deadscan inspect still scans and reports them")


def _where(e: BaseException, model: nn.Module | None = None, runner: nn.Module | None = None) -> str:
    """`` in module NAME (Type): Error: message (at file:line)`` for a scan error (see :func:`raised_in`),
    then the innermost frame outside torch and deadscan."""
    import traceback

    where = raised_in(e, model, runner) if model is not None else ""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "torch/" not in f.filename.replace("\\", "/") and not f.filename.startswith("<eval_with_key")
              and not f.filename.replace("\\", "/").endswith("deadscan/scan.py")]
    at = f" (at {frames[-1].filename}:{frames[-1].lineno}, in {frames[-1].name})" if frames else ""
    return f"{where}: {type(e).__name__}: {one_line(e, 200)}{at}"


def _progress(total: int | None, enabled: bool):
    from tqdm.auto import tqdm

    # Drawn only on a terminal: in logs and pipes a bar leaves carriage-return residue.
    return tqdm(total=total, disable=not (enabled and sys.stderr.isatty()), unit="img", desc="scan", leave=False,
                dynamic_ncols=True)


def _result(model: nn.Module, st: SiteStats, tau: float, forwards: int) -> SiteResult:
    site = st.site
    if st.sum is None:
        site = _with_note(site, "never called on this data")
        empty = np.zeros(0)
        return SiteResult(site, empty, empty.astype(np.int64), 0, empty.astype(np.float32), empty.astype(bool), tau)
    if site.hooked and st.calls != forwards:
        site = _with_note(site, f"called {st.calls / forwards:g} times per forward: calls merged into one site")
    if st.unmasked:
        site = _with_note(site, "its activation is not laid out by token positions: padded positions counted too")
    n = st.sum.shape[0]
    with _onloaded(model, site):
        provable = provably_dead(model, site, n)
    return SiteResult(site, st.sum.cpu().numpy(), st.active.cpu().numpy(), st.elements,
                      st.pre_max.cpu().numpy(), provable, tau)


def _dispatched(model: nn.Module) -> bool:
    """Placed over devices by accelerate's ``dispatch_model`` (its hooks move inputs and offloaded weights)."""
    return any(hasattr(m, "_hf_hook") for m in model.modules())


@contextlib.contextmanager
def _onloaded(model: nn.Module, site: Site):
    """The weights :func:`provably_dead` reads, for the moment on their module's execution device when
    accelerate offloaded them (parameters on the meta device, values on the CPU or disk)."""
    names = [] if site.feeding is None else [site.feeding.layer] + [
        arg if op == "bn" else arg.rpartition(".")[0] for op, arg in site.feeding.chain if op in ("bn", "bias")]
    with contextlib.ExitStack() as stack:
        for name in dict.fromkeys(names):
            module = model.get_submodule(name)
            if hasattr(module, "_hf_hook") and any(t.is_meta for t in module.parameters(recurse=False)):
                from accelerate.utils import align_module_device

                stack.enter_context(align_module_device(module))
        yield


def _with_note(site: Site, note: str) -> Site:
    return replace(site, note=f"{site.note}; {note}" if site.note else note)


def provably_dead(model: nn.Module, site: Site, neurons: int) -> np.ndarray:
    """Dead whatever the data: inputs >= 0 (they come from a ReLU) and every incoming weight and
    the bias, taken with the sign of the per-feature scale after the layer, are <= 0."""
    out = np.zeros(neurons, dtype=bool)
    if site.feeding is None or not site.input_nonneg:
        return out
    name = site.feeding.layer
    w = layers.neuron_rows(model.get_submodule(name), name, neurons).detach()
    with torch.no_grad():
        s, t = effective_affine(model, site.feeding)
        w_eff = w.float().flatten(1) * s[:, None]
        dead = (w_eff <= 0).all(dim=1) & (t <= 0)
    return dead.cpu().numpy()


def merge(a: ScanResult, b: ScanResult) -> ScanResult:
    """Combine scans of two data shards of the same model (sums add, maxima take the max)."""
    if [r.site.name for r in a.sites] != [r.site.name for r in b.sites]:
        raise TraceError("cannot merge scans of different models (site lists differ)")
    sites = [_merge_site(ra, rb) for ra, rb in zip(a.sites, b.sites)]
    tokens = None if a.tokens is None and b.tokens is None else (a.tokens or 0) + (b.tokens or 0)
    return ScanResult(sites, a.sitemap, a.samples + b.samples, a.device, a.tau, tokens=tokens)


def _merge_site(ra: SiteResult, rb: SiteResult) -> SiteResult:
    if ra.elements == 0:  # never called on shard a (e.g. a branch not taken there)
        return replace(rb, tau=ra.tau)
    if rb.elements == 0:
        return ra
    if ra.neurons != rb.neurons:
        raise TraceError(f"cannot merge site {ra.site.name}: {ra.neurons} neurons vs {rb.neurons}")
    mean_input = None  # the feeding layer's mean input: weighted by elements (exact for Linear inputs)
    if ra.mean_input is not None and rb.mean_input is not None:
        total = ra.elements + rb.elements
        mean_input = ((ra.mean_input.astype(np.float64) * ra.elements + rb.mean_input.astype(np.float64) * rb.elements)
                      / total).astype(np.float32)
    how = {"sum": operator.add, "max": np.maximum}
    return replace(ra, **{f: how[op](getattr(ra, f), getattr(rb, f)) for f, op in COMBINE.items()},
                   mean_input=mean_input)
