"""One entry per layer kind that can feed or consume a ReLU site; nothing else assumes a weight layout.

Each entry says which weight dimension holds the neurons (output features) and which the inputs, so
callers read any weight (or a mask or gradient shaped like it) as ``rows``: (neurons, fan_in, *kernel).
nn.Linear and nn.ConvNd keep neurons on dim 0 (rows are the weight itself); Hugging Face's
transposed ``Conv1D`` (GPT-2) stores (in, out), so a neuron is a column and rows are a transposed view.

A module of a kind with no entry raises :class:`~deadscan.errors.TraceError`: a layout deadscan does
not know is never skipped silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import ArchError, TraceError


@dataclass(frozen=True)
class Kind:
    name: str  # linear | conv1d | conv2d | conv3d | hf_conv1d (Feeding.kind, stats.h5 layer_kind)
    out_dim: int  # weight dimension indexing neurons
    in_dim: int  # weight dimension indexing input features
    feature_axis: int  # feature axis of the layer's input and output tensors: -1 (last) or 1 (channels)
    in_features: Callable[[nn.Module], int]
    out_features: Callable[[nn.Module], int]
    build: Callable[[nn.Module, int, int], nn.Module]  # an empty copy with other widths, same dtype and device

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (the weight, or a mask or gradient shaped like it) as (neurons, fan_in, *kernel): a view."""
        return t if self.out_dim == 0 else t.transpose(0, self.out_dim)

    def fan_in(self, layer: nn.Module) -> int:
        """Incoming weights per neuron (a grouped conv's neuron reads only its group)."""
        w = self.rows(layer.weight)
        return w[0].numel() if w.shape[0] else 0

    def widths(self, layer: nn.Module) -> dict:
        return {"in": self.in_features(layer), "out": self.out_features(layer)}

    def resize(self, layer: nn.Module, in_features: int | None = None, out_features: int | None = None) -> nn.Module:
        return self.build(layer, in_features or self.in_features(layer), out_features or self.out_features(layer))

    def prune_out(self, layer: nn.Module, keep: torch.Tensor) -> nn.Module:
        """A copy keeping only neurons ``keep`` (weight and bias); index_select on the weight's device."""
        new = self.resize(layer, out_features=len(keep))
        keep = keep.to(layer.weight.device)
        with torch.no_grad():
            new.weight.copy_(layer.weight.index_select(self.out_dim, keep))
            if layer.bias is not None:
                new.bias.copy_(layer.bias.index_select(0, keep))
        return new

    def prune_in(self, layer: nn.Module, keep: torch.Tensor) -> nn.Module:
        """A copy keeping only input features ``keep``; the bias is unchanged."""
        new = self.resize(layer, in_features=len(keep))
        keep = keep.to(layer.weight.device)
        with torch.no_grad():
            new.weight.copy_(layer.weight.index_select(self.in_dim, keep))
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        return new

    def affine(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) per neuron of the layer itself: output = scale * (W x) + shift, float32.
        Per-feature ops after it (BatchNorm, scalars) are composed by trace.effective_affine."""
        n = self.out_features(layer)
        s = torch.ones(n, dtype=torch.float32, device=layer.weight.device)
        t = layer.bias.detach().float().clone() if layer.bias is not None else torch.zeros_like(s)
        return s, t


# ---------------------------------------------------------------------------------------------
# Builders, one per layer kind


def _kw(m: nn.Module) -> dict:
    return {"device": m.weight.device, "dtype": m.weight.dtype}


def _linear(m: nn.Linear, i: int, o: int) -> nn.Module:
    return nn.Linear(i, o, bias=m.bias is not None, **_kw(m))


def _conv(m: nn.Module, i: int, o: int) -> nn.Module:
    if m.groups != 1:  # a group's channels are tied to its inputs: no width change keeps the layout
        raise ArchError(f"cannot resize grouped convolution {type(m).__name__}(groups={m.groups})")
    return type(m)(i, o, m.kernel_size, m.stride, m.padding, m.dilation, 1, m.bias is not None, m.padding_mode,
                   **_kw(m))


def _hf_conv1d(m: nn.Module, i: int, o: int) -> nn.Module:
    new = type(m)(o, i)  # Hugging Face's signature: Conv1D(nf, nx); it has no device/dtype arguments
    if m.bias is None:
        new.register_parameter("bias", None)
    return new.to(**_kw(m))


LINEAR = Kind("linear", 0, 1, -1, lambda m: m.in_features, lambda m: m.out_features, _linear)
CONV1D = Kind("conv1d", 0, 1, 1, lambda m: m.in_channels, lambda m: m.out_channels, _conv)
CONV2D = Kind("conv2d", 0, 1, 1, lambda m: m.in_channels, lambda m: m.out_channels, _conv)
CONV3D = Kind("conv3d", 0, 1, 1, lambda m: m.in_channels, lambda m: m.out_channels, _conv)
# weight (nx, nf): neurons on dim 1, used as x @ W + b on the last axis
HF_CONV1D = Kind("hf_conv1d", 1, 0, -1, lambda m: m.weight.shape[0], lambda m: m.nf, _hf_conv1d)

# Exact types: a subclass may change forward (LoRA, quantised wrappers), so it is not assumed to match.
_BY_TYPE = {nn.Linear: LINEAR, nn.Conv1d: CONV1D, nn.Conv2d: CONV2D, nn.Conv3d: CONV3D}
KINDS = (LINEAR, CONV1D, CONV2D, CONV3D, HF_CONV1D)


def is_hf_conv1d(m: nn.Module) -> bool:
    """Hugging Face's transposed Conv1D, by duck typing (transformers stays optional): class ``Conv1D``
    with ``nf`` and a 2-d weight (nx, nf)."""
    if type(m).__name__ != "Conv1D" or not isinstance(getattr(m, "nf", None), int):
        return False
    # _parameters, not m.weight: while fx traces, Module.__getattr__ returns a Proxy (and adds a graph node)
    w = m._parameters.get("weight")
    return isinstance(w, torch.Tensor) and w.ndim == 2 and w.shape[1] == m.nf


def kind_of(m: nn.Module) -> Kind | None:
    """The entry for ``m``, or None if no entry fits."""
    k = _BY_TYPE.get(type(m))
    if k is None and is_hf_conv1d(m):
        k = HF_CONV1D
    return k


def entry(m: nn.Module, name: str = "") -> Kind:
    """The entry for ``m``; a clear TraceError if its kind has none."""
    k = kind_of(m)
    if k is None:
        where = f" {name}" if name else ""
        raise TraceError(f"layer{where} is a {type(m).__name__}, whose weight layout deadscan does not know "
                         f"(known: nn.Linear, nn.Conv1d/2d/3d, Hugging Face Conv1D)")
    return k


def neuron_rows(m: nn.Module, name: str, neurons: int, t: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` (default: the weight) of layer ``name`` as rows, checked to hold ``neurons`` neurons."""
    k = entry(m, name)
    if k.out_features(m) != neurons:
        raise TraceError(f"layer {name} has {k.out_features(m)} output features but its ReLU site has {neurons} "
                         "neurons: the scan does not match this model")
    return k.rows(m.weight if t is None else t)


def reader(m: nn.Module, name: str, inputs: int) -> Kind:
    """The entry for consumer layer ``name``, checked to read ``inputs`` input features."""
    k = entry(m, name)
    if k.in_features(m) != inputs:
        raise TraceError(f"layer {name} has {k.in_features(m)} input features but reads {inputs} from its ReLU "
                         "site: the scan does not match this model")
    return k
