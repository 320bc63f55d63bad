"""Synaptic Stripping: prune the most negative remaining incoming weights of dead neurons.

Decisions (README "The strip step"):
- Only weights that hold the neuron down are candidates: negative *effective* weights, i.e. the
  weight times the sign of the per-feature scale after the layer (BatchNorm gamma < 0 flips it).
  Where the layer's inputs are non-negative (it reads a ReLU's output), pruning a positive weight
  can only push a dead neuron further down; where they can be negative (normalised data, after a
  LayerNorm), ``criterion="contribution"`` ranks by w * E[x] instead.
- Per dead neuron and step, prune ``max(1, floor(rate * remaining))`` weights, where remaining
  counts its not-yet-pruned incoming weights (the paper: "10% of the remaining weights"), capped
  by how many negative ones are left. Ties go to the lower flat index (stable sort).
  ``rule="reference"`` reproduces the reference code instead: every remaining weight strictly below
  the rate-quantile of the remaining nonzero weights, whatever its sign.
- One vectorised operation per layer; no Python loop over neurons.
- Pruned weights stay exactly zero: a gradient hook zeroes their gradients and their optimizer
  state is cleared when they are pruned, so Adam's moments cannot move them. Masks live beside the
  model (never ``weight_orig``/``weight_mask`` keys in a state dict).
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .layers import entry, neuron_rows, reader
from .scan import ScanResult
from .trace import effective_affine

from .defaults import DEFAULTS
from .options import CRITERIA, METHODS, PRUNE_RULES, TrainConfig  # CRITERIA, METHODS: re-exported

_TRAIN = TrainConfig()  # the defaults, in one place

@dataclass
class StripStats:
    """What one strip step did."""

    pruned: dict[str, int] = field(default_factory=dict)  # layer -> weights pruned this step
    dead_targeted: int = 0  # dead neurons with a feeding layer
    # dead neurons with no negative weight left, at sites whose feeding layer reads non-negative inputs (a
    # ReLU's outputs): only their bias holds them down. Elsewhere a positive weight times a negative input
    # can hold a neuron down too, so they are not counted (criterion="contribution" ranks by w * E[x] there).
    without_negative: int = 0

    @property
    def total(self) -> int:
        return sum(self.pruned.values())


def strip_layer(weight: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, rate: float,
                sign: torch.Tensor | None = None, scores: torch.Tensor | None = None,
                rule: str = "floor") -> tuple[torch.Tensor, int]:
    """Mark the most negative remaining incoming weights of ``rows`` in ``mask`` (in place).

    ``weight`` and ``mask`` are read as rows, (neurons, fan_in, *kernel): ``layers.Kind.rows`` views.
    ``scores`` (same shape as the rows' weights) replaces the weight as the ranking value, e.g.
    w * E[x] for the contribution criterion. Returns (new pruned count per row, rows with no
    negative candidate). ``rule="reference"``: the reference code's rule instead, every remaining weight
    strictly below the ``rate``-quantile of the row's remaining nonzero weights, whatever its sign.
    """
    if rows.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=weight.device), 0
    w = weight.detach()[rows].flatten(1).float() if scores is None else scores.flatten(1).float()
    if sign is not None:
        w = w * sign[rows, None]
    taken = mask[rows].flatten(1)
    remaining = (~taken).sum(1)
    candidate = (w < 0) & ~taken
    n_candidates = candidate.sum(1)
    if rule == "reference":
        new = _below_quantile(w, ~taken & (w != 0), rate)
        mask[rows] |= new.view_as(mask[rows])
        return new.sum(1), int((n_candidates == 0).sum())
    # float64, as Python computes floor(rate * remaining); capped by the negative weights left
    k = torch.minimum(torch.clamp((remaining.double() * rate).floor().long(), min=1), n_candidates)
    # A partial selection instead of a full sort: the k-th most negative value per row (topk up to an
    # upper bound of k known on the host, so no sync), everything below it, and at it the lowest indices.
    cols = w.shape[1]
    kmax = min(cols, max(1, math.floor(rate * cols)))
    vals = torch.where(candidate, w, torch.full_like(w, torch.inf))
    top = torch.topk(vals, kmax, dim=1, largest=False, sorted=True).values
    threshold = top.gather(1, (k - 1).clamp(min=0)[:, None])
    below = vals < threshold
    at = vals == threshold
    need = k[:, None] - below.sum(1, keepdim=True)
    new = (below | (at & (at.cumsum(1) <= need))) & candidate & (k[:, None] > 0)
    mask[rows] |= new.view_as(mask[rows])
    return k, int((n_candidates == 0).sum())


def _below_quantile(w: torch.Tensor, remaining: torch.Tensor, rate: float) -> torch.Tensor:
    """Per row, the remaining entries strictly below the row's ``rate``-quantile of its remaining entries
    (linear interpolation, as torch.quantile): the reference code's selection, vectorised over rows."""
    values = w.masked_fill(~remaining, torch.nan)
    chunk = max(1, (2**24 - 1) // max(w.shape[1], 1))  # torch's quantile takes at most 2**24 elements at once
    q = torch.cat([torch.nanquantile(values[i:i + chunk], rate, dim=1) for i in range(0, len(w), chunk)])
    return remaining & (w < q[:, None])  # a row with nothing left has q nan: nothing is below it


class Masks:
    """Pruning masks (True = pruned) per layer, kept exact through training."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.masks: dict[str, torch.Tensor] = {}
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}

    def get(self, layer: str) -> torch.Tensor:
        if layer not in self.masks:
            w = self.model.get_submodule(layer).weight
            self.masks[layer] = torch.zeros_like(w, dtype=torch.bool)
            keep = self.masks[layer]
            # Zero the gradient of pruned weights before it reaches the optimizer. A frozen weight
            # (requires_grad False) gets no gradient and cannot take a hook: it needs none.
            if w.requires_grad:
                self._hooks[layer] = w.register_hook(lambda g, m=keep: g.masked_fill(m, 0))
        return self.masks[layer]

    def apply(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero pruned weights and their optimizer state (moments, momentum buffers)."""
        with torch.no_grad():
            for layer, mask in self.masks.items():
                w = self.model.get_submodule(layer).weight
                w.masked_fill_(mask, 0)
                if optimizer is not None:
                    for value in optimizer.state.get(w, {}).values():
                        if isinstance(value, torch.Tensor) and value.shape == w.shape:
                            value.masked_fill_(mask, 0)

    def pruned(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.masks.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for layer, mask in state.items():
            self.get(layer).copy_(mask.to(torch.bool))
        self.apply()

    def remove_hooks(self) -> None:
        for h in self._hooks.values():
            h.remove()
        self._hooks.clear()


def strip(model: nn.Module, scan: ScanResult, masks: Masks, *, rate: float = 0.1, criterion: str = "weight",
          optimizer: torch.optim.Optimizer | None = None, rule: str = "floor") -> StripStats:
    """One strip step over every dead neuron that has a feeding layer.

    A gated site (relu(gate(x)) * up(x)) is stripped in its gate, the feeding layer, alone: the gate decides
    dead or alive, and up's weights cannot wake it."""
    if not 0 < rate <= 1:
        raise ValueError(f"rate must be in (0, 1], got {rate}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if rule not in PRUNE_RULES:
        raise ValueError(f"rule must be one of {PRUNE_RULES}, got {rule!r}")
    stats = StripStats()
    for r in scan.sites:
        f = r.site.feeding
        if f is None or r.neurons == 0 or not r.dead.any():
            continue
        layer = model.get_submodule(f.layer)
        weight = neuron_rows(layer, f.layer, r.neurons)  # a view: a neuron's incoming weights are one row
        rows = torch.from_numpy(np.flatnonzero(r.dead)).to(weight.device)
        with torch.no_grad():
            scale, _ = effective_affine(model, f)
            scores = None
            if criterion == "contribution":
                if r.mean_input is None:
                    raise ValueError(f"criterion='contribution' needs the feeding layers' mean inputs: scan with "
                                     f"input_means=True (site {r.site.name} has none)")
                mean_in = torch.as_tensor(r.mean_input, device=weight.device, dtype=torch.float32)
                w = weight.detach()[rows].float()
                groups = getattr(layer, "groups", 1)
                if groups > 1:  # a grouped conv's output channel reads only its group's input channels
                    mean_in = mean_in.view(groups, -1)[rows // (weight.shape[0] // groups)]
                    scores = w * mean_in.view(mean_in.shape + (1,) * (w.ndim - 2))
                else:
                    scores = w * mean_in.view((1, -1) + (1,) * (w.ndim - 2))
            mask = entry(layer).rows(masks.get(f.layer))
            k, none_left = strip_layer(weight, mask, rows, rate, torch.sign(scale), scores, rule)
        stats.pruned[f.layer] = stats.pruned.get(f.layer, 0) + int(k.sum())
        stats.dead_targeted += int(rows.numel())
        if r.site.input_nonneg:
            stats.without_negative += none_left
    masks.apply(optimizer)
    return stats


def redo(model: nn.Module, scan: ScanResult, *, optimizer: torch.optim.Optimizer | None = None,
         generator: torch.Generator | None = None) -> StripStats:
    """ReDo (Sokar et al. 2023), the comparison baseline: re-initialise each dead neuron's incoming
    weights (the layer's default uniform init) and bias, zero its outgoing consumer weights, and
    clear the optimizer state of both."""
    stats = StripStats()
    for r in scan.sites:
        f, c = r.site.feeding, r.site.consumer
        if f is None or r.neurons == 0 or not r.dead.any():
            continue
        layer = model.get_submodule(f.layer)
        kind = entry(layer, f.layer)
        w = neuron_rows(layer, f.layer, r.neurons)  # a view: writes reach the weight
        rows = torch.from_numpy(np.flatnonzero(r.dead)).to(w.device)
        fan_in = w[0].numel()
        bound = 1.0 / fan_in**0.5  # nn.Linear / nn.ConvNd default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        with torch.no_grad():
            fresh = torch.rand((len(rows),) + tuple(w.shape[1:]), generator=generator, device="cpu")
            w[rows] = ((fresh * 2 - 1) * bound).to(w.device, w.dtype)
            if layer.bias is not None:
                layer.bias[rows] = 0
            _clear_state(optimizer, layer.weight, rows, dim=kind.out_dim)
            if layer.bias is not None:
                _clear_state(optimizer, layer.bias, rows, dim=0)
            if c is not None:
                cons = model.get_submodule(c.layer)
                ck = reader(cons, c.layer, r.neurons * c.group)
                cols = c.columns(rows)
                cons.weight.index_fill_(ck.in_dim, cols, 0)
                _clear_state(optimizer, cons.weight, cols, dim=ck.in_dim)
        stats.pruned[f.layer] = 0
        stats.dead_targeted += int(rows.numel())
    return stats


def _clear_state(optimizer, param: torch.Tensor, index: torch.Tensor, dim: int) -> None:
    if optimizer is None:
        return
    for value in optimizer.state.get(param, {}).values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value.index_fill_(dim, index, 0)


# ---------------------------------------------------------------------------------------------
# One call per epoch from any training loop


@dataclass
class StepReport:
    epoch: int
    scan: ScanResult  # the scan this step's decisions came from (before stripping)
    dead: int
    revived: dict[str, list[int]]  # site -> neurons dead at the previous step, alive now
    died: dict[str, list[int]]  # site -> neurons alive at the previous step, dead now
    stripped: StripStats | None  # None on epochs skipped by ``every``
    pruned_weights: int  # total pruned so far
    active_percent: float
    active_percent_feeding_weights: float

    @property
    def revived_count(self) -> int:
        return sum(len(v) for v in self.revived.values())

    @property
    def died_count(self) -> int:
        return sum(len(v) for v in self.died.values())


class Stripper:
    """Synaptic Stripping inside your own training loop: one call per epoch.

    Example::

        stripper = deadscan.Stripper(model, optimizer, rate=0.1)
        for epoch in range(epochs):
            train_one_epoch(model, optimizer)
            report = stripper.step(val_inputs)  # scan held-out data, prune dead neurons' weights
            print(epoch, report.dead, report.revived_count, report.active_percent)

    In a DistributedDataParallel loop pass the unwrapped model (``ddp.module``) and the same held-out data on
    every process: each scans its share, the statistics are reduced over ``group`` (None: deadscan's torchrun
    group, else torch.distributed's default group if initialised; or a ProcessGroup), so every process takes
    the same strip step; the processes then compare mask checksums and all raise if they differ.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 rate: float = _TRAIN.rate, criterion: str = _TRAIN.criterion, every: int = _TRAIN.every,
                 batch_size: int = DEFAULTS.batch_size, device=None, tau: float = DEFAULTS.tau, enabled: bool = True,
                 method: str = _TRAIN.method, seed: int = _TRAIN.train_seed, rule: str = _TRAIN.prune_rule,
                 group=None):
        from .trace import find_sites

        self.model, self.optimizer = model, optimizer
        self.rate, self.criterion, self.every, self.rule = rate, criterion, every, rule
        self.batch_size, self.device, self.tau = batch_size, device, tau
        self.enabled = enabled  # False: detect and report only (the baseline run)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.generator = torch.Generator().manual_seed(seed)  # ReDo's re-initialisation
        self.sitemap = find_sites(model)
        self.masks = Masks(model)
        self.epoch = 0
        self.previous: dict[str, np.ndarray] = {}
        self.group = _group(group)

    def step(self, data) -> StepReport:
        """Scan ``data`` (held-out inputs), strip dead neurons, return what happened."""
        from .capacity import capacity
        from .scan import scan

        self.epoch += 1
        result = scan(self.model, data, sitemap=self.sitemap, batch_size=self.batch_size, device=self.device,
                      tau=self.tau, input_means=self.criterion == "contribution", group=self.group)
        revived, died = {}, {}
        for r in result.sites:
            before = self.previous.get(r.site.name)
            if before is not None and before.shape == r.dead.shape:
                revived[r.site.name] = np.flatnonzero(before & ~r.dead).tolist()
                died[r.site.name] = np.flatnonzero(~before & r.dead).tolist()
            self.previous[r.site.name] = r.dead.copy()
        stripped = None
        if self.enabled and self.epoch % self.every == 0:
            if self.method == "redo":
                stripped = redo(self.model, result, optimizer=self.optimizer, generator=self.generator)
            else:
                stripped = strip(self.model, result, self.masks, rate=self.rate, criterion=self.criterion,
                                 optimizer=self.optimizer, rule=self.rule)
                if stripped.total and self.optimizer is None:
                    import warnings

                    warnings.warn("Stripper has no optimizer: the pruned weights' optimizer state (Adam moments, "
                                  "momentum) is not cleared, so the optimizer can move them off zero; pass it as "
                                  "Stripper(model, optimizer)", stacklevel=2)
        if self.group.active:
            self._check_masks_agree()
        cap = capacity(self.model, result, self.masks.masks)
        return StepReport(self.epoch, result, result.dead, {k: v for k, v in revived.items() if v},
                          {k: v for k, v in died.items() if v}, stripped, self.masks.pruned(),
                          cap.active_percent, cap.active_percent_feeding_weights)

    def _check_masks_agree(self) -> None:
        """Every process must have taken the same strip step (its decisions come from reduced statistics);
        a difference (e.g. a model not identical on every process) would silently train different networks."""
        sums = self.group.gather_ints(mask_checksum(self.masks.masks))
        if len(set(sums)) > 1:
            from .errors import TraceError

            differ = [rank for rank, c in enumerate(sums) if c != sums[0]]
            raise TraceError(f"strip step {self.epoch}: the pruning masks differ between processes (process 0 and "
                             f"process(es) {', '.join(map(str, differ))}); the model or the held-out data is not the "
                             "same on every process")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "masks": self.masks.state_dict(), "generator": self.generator.get_state(),
                "previous": {k: torch.from_numpy(v) for k, v in self.previous.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        if "generator" in state:
            self.generator.set_state(state["generator"])
        self.masks.load_state_dict(state["masks"])
        self.previous = {k: v.numpy().astype(bool) for k, v in state["previous"].items()}


def mask_checksum(masks: dict[str, torch.Tensor]) -> int:
    """A signed 64-bit digest of the masks (layer names, shapes, bits), equal on processes that agree."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(masks):
        m = masks[name]
        h.update(f"{name}:{tuple(m.shape)};".encode())
        h.update(np.packbits(m.detach().cpu().numpy().ravel()).tobytes())
    return int.from_bytes(h.digest()[:8], "little", signed=True)


def _group(group):
    """Whose scan statistics a Stripper reduces: a deadscan Group as it is; a torch ProcessGroup; None:
    deadscan's torchrun group if one is set up, else torch.distributed's default group if initialised."""
    from . import distributed

    if isinstance(group, distributed.Group):
        return group
    if group is None and distributed.current().active:
        return distributed.current()
    return distributed.of(group)
