"""Find every ReLU site with torch.fx, with its feeding and consumer layers.

A *site* is one call of relu in the traced graph. Where fx cannot trace a module (data-dependent
control flow, iteration over shapes, ...), that module is left *opaque*: it runs as written, its
children are traced on their own, ReLU modules directly inside it are watched with hooks, and the
opaque part is reported with the reason. Functional relu calls written in an opaque forward cannot
be seen; the report says so.
"""

from __future__ import annotations

import copy
import keyword
import operator
import unicodedata
from dataclasses import dataclass, field
from numbers import Number

import torch
import torch.utils._pytree
import torch.nn.functional as F
from torch import fx, nn

from . import layers
from .errors import TraceError, one_line, printable

ACT_MODULES = (nn.ReLU, nn.ReLU6)
# call_function targets -> (activation, how it was written, in-place)
ACT_FUNCTIONS = {
    F.relu: ("relu", "F.relu", None),  # None: read the inplace argument
    torch.relu: ("relu", "torch.relu", False),
    torch.relu_: ("relu", "torch.relu_", True),
    F.relu6: ("relu6", "F.relu6", None),
}
ACT_METHODS = {"relu": ("relu", "Tensor.relu", False), "relu_": ("relu", "Tensor.relu_", True)}

PASS_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
ADAPTIVE_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                  nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
# Ops after which a non-negative tensor stays non-negative (for "provably dead").
NONNEG_METHODS = {"flatten", "view", "reshape", "permute", "transpose", "contiguous", "unflatten", "squeeze",
                  "unsqueeze", "__getitem__"}
NONNEG_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
                    operator.getitem, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
                    F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                    F.dropout, torch.cat}
FEATURE_AXIS_LAST = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.MultiheadAttention, nn.RMSNorm)
FEATURE_AXIS_ONE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)


@dataclass(frozen=True)
class Feeding:
    """The layer whose outputs reach the site through per-feature ops only."""

    layer: str  # qualified name in the model
    kind: str  # layers.Kind.name: linear | conv1d | conv2d | conv3d | hf_conv1d
    # Per-feature ops from the layer to the site, in order: ("bn", name) | ("scale", c) |
    # ("shift", c) | ("bias", name of a parameter or buffer added per feature).
    chain: tuple = ()
    exclusive: bool = True  # no other op reads the values between layer and site


@dataclass(frozen=True)
class Consumer:
    """The layer reading the site's outputs through per-feature ops only."""

    layer: str
    kind: str
    group: int = 1  # input columns per neuron (a flatten after an adaptive pool to h x w: h*w)
    keeps_zero: bool = True  # a dead neuron reaches the layer as 0 (False: a BatchNorm shifts it)

    def columns(self, neurons: torch.Tensor) -> torch.Tensor:
        """The consumer's input features that read these neurons (its weight's ``layers`` in_dim)."""
        offsets = torch.arange(self.group, device=neurons.device)
        return (neurons[:, None] * self.group + offsets[None, :]).flatten()


@dataclass(frozen=True)
class GatePartner:
    """The layer whose output multiplies the site's output elementwise (a gated MLP: relu(gate(x)) * up(x),
    Llama/Mistral with hidden_act relu). A dead neuron zeroes the product whatever this layer computes, so
    its row here is inactive too; the gate (the feeding layer) alone decides dead or alive."""

    layer: str
    kind: str
    exclusive: bool = True  # nothing but the product reads its output


@dataclass(frozen=True)
class Site:
    name: str
    activation: str  # relu | relu6
    call: str  # nn.ReLU, F.relu, torch.relu, Tensor.relu_, nn.ReLU6, ...
    inplace: bool
    axis: int | None  # neuron axis of the activation tensor: -1 (Linear) or 1 (Conv); None: by ndim
    feeding: Feeding | None
    consumer: Consumer | None
    input_nonneg: bool  # the feeding layer's input comes from a ReLU (for "provably dead")
    note: str = ""  # why there is no feeding layer, or how the site was watched
    hooked: bool = False  # watched by a module hook inside an opaque forward
    part: int = -1  # index into SiteMap.parts (traced sites)
    node: str = ""  # node name in that part's graph
    gate: GatePartner | None = None  # gated site: the layer multiplied with the ReLU's output

    @property
    def strippable(self) -> bool:
        return self.feeding is not None

    @property
    def form(self) -> str:
        """"gated" (relu(gate(x)) * up(x) read by the consumer) or "plain"."""
        return "gated" if self.gate is not None else "plain"


@dataclass(frozen=True)
class Opaque:
    module: str  # qualified name, "(root)" for the model itself
    reason: str


@dataclass
class TracedPart:
    path: str  # qualified name of the traced module ("" = the model)
    module: nn.Module
    graph: fx.Graph


@dataclass
class SiteMap:
    sites: list[Site]
    opaque: list[Opaque]
    parts: list[TracedPart] = field(default_factory=list, repr=False)

    def __getitem__(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# Tracing with fallback


class _Tracer(fx.Tracer):
    """Traces through every module but torch.nn's atomic ones; a submodule that fails to trace is
    kept as one opaque call instead of failing the whole model."""

    def __init__(self):
        super().__init__()
        self.opaque: dict[str, str] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_leaf(m)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        if qualname in self.opaque:  # a second call of a module that already failed
            return self.create_proxy("call_module", qualname, args, kwargs)
        if is_leaf(m):
            return super().call_module(m, forward, args, kwargs)
        stack, before = len(self.module_stack), len(self.graph.nodes)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:  # fx raises many kinds for untraceable code
            while len(self.module_stack) > stack:
                self.module_stack.popitem(last=True)
            # Drop what the failed attempt emitted; get_attr nodes may be cached by the tracer.
            for node in reversed(list(self.graph.nodes)[before:]):
                if node.op != "get_attr" and not node.users:
                    self.graph.erase_node(node)
            self.opaque[qualname] = _reason(e)
            return self.create_proxy("call_module", qualname, args, kwargs)


def is_leaf(m: nn.Module) -> bool:
    if isinstance(m, nn.MultiheadAttention) or layers.is_hf_conv1d(m):  # Conv1D: one call_module, not addmm
        return True
    return type(m).__module__.startswith("torch.nn") and next(m.children(), None) is None


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {one_line(e, 200)}"


def _unwritable_name(graph: fx.Graph) -> str | None:
    """A submodule or attribute name fx's code generator gets wrong, if any: it writes ``self.NAME`` for an
    identifier (a keyword is a syntax error; Python NFKC-normalises identifiers, so ``\ufb01`` reads ``fi``)
    and ``getattr(self, "NAME")`` otherwise, unescaped (a quote, backslash or line break breaks it)."""
    for node in graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        for atom in str(node.target).split("."):
            if atom.isidentifier():
                ok = not keyword.iskeyword(atom) and unicodedata.normalize("NFKC", atom) == atom
            else:
                ok = atom.isprintable() and '"' not in atom and "\\" not in atom
            if not ok:
                return atom
    return None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path and name else path or name


def find_sites(model: nn.Module, example: dict | None = None) -> SiteMap:
    """Trace ``model`` (eval mode) and return its ReLU sites in execution order.

    Sites of ReLU modules still missing a feeding or consumer layer after tracing (inside a forward fx
    cannot trace, or at the edge of a traced part) are completed by following tensors through one real
    forward on ``example`` (keyword inputs; a language model gets a 4-token example by default): see
    :func:`_follow_tensors`."""
    was_training = model.training
    model.eval()  # trace the inference graph (e.g. no auxiliary heads)
    try:
        finder = _Finder(model)
        finder.discover(model, "")
        sites = finder.sites
        if example is None:
            example = _token_example(model)
        if example is not None and any(_followable(s) for s in sites):
            sites = _follow_tensors(model, sites, example)
    finally:
        model.train(was_training)
    return SiteMap(sites, finder.opaque, finder.parts)


class _Finder:
    def __init__(self, model: nn.Module):
        self.model = model
        self.sites: list[Site] = []
        self.opaque: list[Opaque] = []
        self.parts: list[TracedPart] = []
        self.calls: dict[str, int] = {}

    def discover(self, module: nn.Module, path: str) -> None:
        tracer = _Tracer()
        try:
            graph = tracer.trace(module)
        except Exception as e:
            self.opaque.append(Opaque(path or "(root)", _reason(e) + "; functional relu calls in its forward are not seen"))
            self.discover_inside_opaque(module, path)
            return
        bad = _unwritable_name(graph)
        if bad is not None:  # the graph traced, but its generated code would fail or read another attribute
            self.opaque.append(Opaque(path or "(root)", f"fx cannot write the name {printable(repr(bad))} in its "
                                      "generated code; functional relu calls in its forward are not seen"))
            self.discover_inside_opaque(module, path)
            return
        part = len(self.parts)
        self.parts.append(TracedPart(path, module, graph))
        seen_opaque: set[str] = set()
        for node in graph.nodes:
            act = _activation(node, module)
            if act is not None:
                self.sites.append(self._site(node, module, path, part, *act))
            elif node.op == "call_module" and node.target in tracer.opaque and node.target not in seen_opaque:
                seen_opaque.add(node.target)
                full = _join(path, node.target)
                self.opaque.append(Opaque(full, tracer.opaque[node.target] + "; functional relu calls in its forward are not seen"))
                self.discover_inside_opaque(module.get_submodule(node.target), full)

    def discover_inside_opaque(self, module: nn.Module, path: str) -> None:
        for name, child in module.named_children():
            full = _join(path, name)
            if isinstance(child, ACT_MODULES):
                activation = "relu6" if isinstance(child, nn.ReLU6) else "relu"
                self.sites.append(Site(
                    name=full, activation=activation, call=f"nn.{type(child).__name__}", inplace=child.inplace,
                    axis=None, feeding=None, consumer=None, input_nonneg=False, hooked=True,
                    note="called inside an opaque forward: watched by a hook, no feeding layer known",
                ))
            elif isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                self.discover_inside_opaque(child, full)  # a container has no forward: not opaque itself
            elif not is_leaf(child):
                self.discover(child, full)

    def _name(self, node: fx.Node, path: str, call: str) -> str:
        if node.op == "call_module":
            base = _join(path, node.target)
        else:
            stack = node.meta.get("nn_module_stack") or {}
            owner = list(stack.values())[-1][0] if stack else ""
            base = f"{_join(path, owner) or '(root)'}:{call.split('.')[-1]}"
        n = self.calls.get(base, 0) + 1
        self.calls[base] = n
        return base if n == 1 else f"{base}#{n}"

    def _site(self, node, root, path, part, activation, call, inplace) -> Site:
        x = node.args[0] if node.args else node.kwargs.get("input")
        feeding, axis = _find_feeding(x, root, path)
        layer_node = _layer_node(x, feeding, root, path) if feeding is not None else None
        consumer, gate = (_find_consumer(node, root, path, axis, layer_node) if isinstance(x, fx.Node)
                          else (None, None))
        note = "" if feeding else _why_no_feeding(x, root)
        if gate is not None:
            note = _gated_note(feeding.layer, gate.layer, consumer)
        nonneg = feeding is not None and _input_nonneg(layer_node, root)
        return Site(
            name=self._name(node, path, call), activation=activation, call=call, inplace=inplace,
            axis=axis, feeding=feeding, consumer=consumer, input_nonneg=nonneg, note=note,
            part=part, node=node.name, gate=gate,
        )


def _activation(node: fx.Node, root: nn.Module):
    """(activation, call, inplace) if ``node`` is a relu call, else None."""
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        if isinstance(m, ACT_MODULES):
            return ("relu6" if isinstance(m, nn.ReLU6) else "relu", f"nn.{type(m).__name__}", m.inplace)
    elif node.op == "call_function" and node.target in ACT_FUNCTIONS:
        act, call, inplace = ACT_FUNCTIONS[node.target]
        if inplace is None:
            inplace = bool(node.kwargs.get("inplace", node.args[1] if len(node.args) > 1 else False))
        return act, call, inplace
    elif node.op == "call_method" and node.target in ACT_METHODS:
        return ACT_METHODS[node.target]
    return None


def _scalar(node: fx.Node):
    """(tensor node, scalar) for ``x * c``/``c * x``/``x / c`` style nodes, else (None, None)."""
    a, b = (list(node.args) + [None, None])[:2]
    if isinstance(a, fx.Node) and isinstance(b, Number) and not isinstance(b, bool):
        return a, b
    if isinstance(b, fx.Node) and isinstance(a, Number) and not isinstance(a, bool):
        return b, a
    return None, None


MUL = {operator.mul, torch.mul, "mul"}
DIV = {operator.truediv, torch.div, "div"}
ADD = {operator.add, torch.add, "add"}
SUB = {operator.sub, torch.sub, "sub"}


def _find_feeding(x, root: nn.Module, path: str) -> tuple[Feeding | None, int | None]:
    chain: list[tuple] = []
    exclusive = True
    n = x
    while isinstance(n, fx.Node):
        if n is not x and len(n.users) > 1:
            exclusive = False
        nxt = None
        if n.op == "call_module":
            m = root.get_submodule(n.target)
            kind = layers.kind_of(m)
            if kind is not None:
                if len(n.users) > 1:
                    exclusive = False
                return Feeding(_join(path, n.target), kind.name, tuple(reversed(chain)), exclusive), kind.feature_axis
            if _is_eval_bn(m):
                chain.append(("bn", _join(path, n.target)))
                nxt = n.args[0]
            elif isinstance(m, PASS_MODULES):
                nxt = n.args[0]
        elif n.op in ("call_function", "call_method") and n.target in (F.dropout, "contiguous"):
            nxt = n.args[0]
        elif n.op in ("call_function", "call_method"):
            t, c = _scalar(n)
            if t is not None and n.target in MUL:
                chain.append(("scale", float(c)))
                nxt = t
            elif t is not None and n.target in DIV and n.args[0] is t and c != 0:
                chain.append(("scale", 1.0 / float(c)))
                nxt = t
            elif t is not None and n.target in ADD:
                chain.append(("shift", float(c)))
                nxt = t
            elif t is not None and n.target in SUB and n.args[0] is t:
                chain.append(("shift", -float(c)))
                nxt = t
            elif n.target in ADD and len(n.args) == 2:
                # x + self.bias with a per-feature parameter
                a, b = n.args
                attr, other = (a, b) if _is_attr(a) else (b, a) if _is_attr(b) else (None, None)
                if attr is not None and isinstance(other, fx.Node):
                    chain.append(("bias", _join(path, attr.target)))
                    nxt = other
        if nxt is None:
            break
        n = nxt
    return None, _guess_axis(x, root)


def _is_attr(n) -> bool:
    return isinstance(n, fx.Node) and n.op == "get_attr"


def _is_eval_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_var is not None


def _guess_axis(x, root: nn.Module) -> int | None:
    """Neuron axis when no feeding layer: the convention of the nearest layer upstream."""
    frontier, seen = [x], set()
    while frontier and len(seen) < 200:
        n = frontier.pop(0)
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op == "call_module":
            m = root.get_submodule(n.target)
            kind = layers.kind_of(m)
            if kind is not None:
                return kind.feature_axis
            if isinstance(m, FEATURE_AXIS_LAST):
                return -1
            if isinstance(m, FEATURE_AXIS_ONE):
                return 1
        frontier.extend(a for a in n.all_input_nodes)
    return None


def _why_no_feeding(x, root: nn.Module) -> str:
    if not isinstance(x, fx.Node):
        return "input is not a traced tensor"
    if x.op in ("call_function", "call_method"):
        name = getattr(x.target, "__name__", str(x.target))
        if name in ("add", "iadd", "__add__", "sub"):
            return "after a residual add: scanned, not strippable"
        if name in ("cat", "stack"):
            return "after a concat: scanned, not strippable"
        return f"after {name}: scanned, not strippable"
    if x.op == "call_module":
        return f"after {type(root.get_submodule(x.target)).__name__}: scanned, not strippable"
    return "reads the model input: scanned, not strippable"


def _layer_node(x, feeding: Feeding, root, path) -> fx.Node | None:
    n = x
    while isinstance(n, fx.Node):
        if n.op == "call_module" and _join(path, n.target) == feeding.layer:
            return n
        n = next((a for a in n.all_input_nodes if a.op != "get_attr"), None)
    return None


def _input_nonneg(layer_node: fx.Node | None, root: nn.Module) -> bool:
    """True if the layer's input is a relu output through value-preserving ops only."""
    return layer_node is not None and bool(layer_node.args) and _nonneg(layer_node.args[0], root)


def _nonneg(n, root: nn.Module) -> bool:
    while isinstance(n, fx.Node):
        if _activation(n, root) is not None:
            return True
        if n.op == "call_module":
            m = root.get_submodule(n.target)
            if not isinstance(m, PASS_MODULES + POOLS + ADAPTIVE_POOLS + (nn.Flatten,)):
                return False
        elif n.op == "call_function" and n.target is torch.cat:
            return all(_nonneg(a, root) for a in n.args[0])
        elif not ((n.op == "call_method" and n.target in NONNEG_METHODS)
                  or (n.op == "call_function" and n.target in NONNEG_FUNCTIONS)):
            return False
        n = n.args[0] if n.args else None
    return False


def _find_consumer(node: fx.Node, root: nn.Module, path: str, axis: int | None,
                   layer_node: fx.Node | None = None) -> tuple[Consumer | None, GatePartner | None]:
    """Follow the site's single reader through per-feature ops to a Linear/Conv.

    A conv site may reach a Linear only through an adaptive pool then a flatten; each neuron then
    feeds ``h*w`` consecutive input columns. One elementwise product with a layer reading the feeding
    layer's own input (``relu(gate(x)) * up(x)``) is a gated site: (consumer, that layer).
    """
    n, cells, group = node, None, None  # cells: spatial positions per channel after an adaptive pool
    keeps_zero = True
    gate = None
    while True:
        users = list(n.users)
        if len(users) != 1:
            return None, None
        u = users[0]
        m = root.get_submodule(u.target) if u.op == "call_module" else None
        kind = layers.kind_of(m) if m is not None else None
        if kind is not None:
            if u.args[0] is not n or getattr(m, "groups", 1) != 1:
                return None, None
            if kind.feature_axis == -1:  # Linear-like: reads the last axis
                if axis == 1 and group is None:
                    return None, None  # a conv output reaching a Linear without a known flatten
                return Consumer(_join(path, u.target), kind.name, group or 1, keeps_zero), gate
            if group is None and axis != -1:
                return Consumer(_join(path, u.target), kind.name, 1, keeps_zero), gate
            return None, None
        if m is not None and isinstance(m, PASS_MODULES + POOLS):
            pass
        elif m is not None and _is_eval_bn(m):
            keeps_zero = False
        elif m is not None and isinstance(m, ADAPTIVE_POOLS):
            cells = _adaptive_cells(m)
        elif _is_flatten(u, m):
            if axis != 1 or cells is None:
                return None, None
            group = cells
        elif u.op in ("call_function", "call_method") and u.target in (F.dropout, "contiguous"):
            pass
        elif u.target in MUL and u.op in ("call_function", "call_method"):
            if gate is not None or cells is not None or not keeps_zero:
                return None, None
            gate = _gate_partner(u, n, root, path, layer_node)
            if gate is None:
                return None, None
        else:
            return None, None
        n = u


def _gate_partner(mul: fx.Node, n: fx.Node, root: nn.Module, path: str,
                  layer_node: fx.Node | None) -> GatePartner | None:
    """The partner of ``n`` in ``mul`` if it is a layer's output on the feeding layer's input, as wide as the
    feeding layer and on the same feature axis (so the product is elementwise per neuron), else None."""
    if layer_node is None or len(mul.args) != 2 or mul.kwargs:
        return None
    a, b = mul.args
    other = b if a is n else a if b is n else None
    if not isinstance(other, fx.Node) or other is n or other.op != "call_module" or not other.args:
        return None
    if other.args[0] is not layer_node.args[0] or len(other.args) != 1 or other.kwargs:
        return None
    m, feed = root.get_submodule(other.target), root.get_submodule(layer_node.target)
    k, fk = layers.kind_of(m), layers.kind_of(feed)
    if k is None or fk is None or getattr(m, "groups", 1) != 1 or k.feature_axis != fk.feature_axis:
        return None
    if k.out_features(m) != fk.out_features(feed):
        return None
    return GatePartner(_join(path, other.target), k.name, len(other.users) == 1)


def _gated_note(feeding: str, partner: str, consumer: Consumer | None) -> str:
    read = f", read by {consumer.layer}" if consumer is not None else ""
    return f"gated site: relu({feeding}) * {partner}{read}"


def _is_flatten(u: fx.Node, m: nn.Module | None) -> bool:
    if m is not None:
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    if u.op in ("call_function", "call_method") and u.target in (torch.flatten, "flatten"):
        start = u.args[1] if len(u.args) > 1 else u.kwargs.get("start_dim", 0)
        return start == 1 and len(u.args) <= 2 and "end_dim" not in u.kwargs
    return False


def _adaptive_cells(m: nn.Module) -> int | None:
    dims = int(type(m).__name__[-2])  # AdaptiveAvgPool2d -> 2
    size = m.output_size
    if isinstance(size, int):
        return size**dims
    if any(v is None for v in size):
        return None
    out = 1
    for v in size:
        out *= v
    return out


# ---------------------------------------------------------------------------------------------
# Effective per-feature affine map (for provably dead and stripping)


def effective_affine(model: nn.Module, feeding: Feeding) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale s, shift t), one entry per neuron, such that pre-activation = s * (W x) + t.

    A negative s (e.g. BatchNorm gamma < 0) flips which incoming weights hold a neuron down.
    """
    layer = model.get_submodule(feeding.layer)
    s, t = layers.entry(layer, feeding.layer).affine(layer)
    n = s.shape[0]
    for op, arg in feeding.chain:
        if op == "bn":
            bn = model.get_submodule(arg)
            a = torch.rsqrt(bn.running_var.float() + bn.eps)
            if bn.weight is not None:
                a = a * bn.weight.detach().float()
            b = -bn.running_mean.float() * a
            if bn.bias is not None:
                b = b + bn.bias.detach().float()
            s, t = s * a, t * a + b
        elif op == "scale":
            s, t = s * arg, t * arg
        elif op == "shift":
            t = t + arg
        elif op == "bias":
            p = _get_tensor(model, arg).detach().float().flatten()
            if p.numel() != n:
                raise TraceError(f"per-feature bias {arg} has {p.numel()} entries for {n} neurons")
            t = t + p
    return s, t


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def copy_graph(graph: fx.Graph) -> fx.Graph:
    return copy.deepcopy(graph)


# ---------------------------------------------------------------------------------------------
# Following tensors through one forward (forwards fx cannot trace, edges of traced parts)

HOOKED_NOTE = "called inside an opaque forward: watched by a hook"


def _followable(s: Site) -> bool:
    return s.call.startswith("nn.") and (s.feeding is None or s.consumer is None)


def _token_example(model: nn.Module) -> dict | None:
    """A 4-token input for a language model (a module with an input embedding and a config), else None."""
    from .data.tokens import model_kwargs, vocab_size

    if getattr(model, "config", None) is None or vocab_size(model) is None:
        return None
    # a model dispatched by accelerate (deadscan.devmap): its inputs' device, whichever layers are offloaded
    device = getattr(getattr(model, "_hf_hook", None), "execution_device", None)
    if device is None:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            return None
        if device.type == "meta":
            return None
    ids = torch.arange(1, 5, device=device).remainder(vocab_size(model)).unsqueeze(0)
    return model_kwargs(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})


class _Reads(torch.overrides.TorchFunctionMode):
    """Counts, per tensor, the ops that read its values: an op counts when it returns a tensor that is not
    the argument itself (size(), shape and dim() return no tensor; eval dropout or a no-op .to() returns its
    input). Tensors are kept alive until the pass ends, so ids are never reused."""

    def __init__(self):
        super().__init__()
        self.reads: dict[int, int] = {}
        self.ops: dict[int, list] = {}  # tensor id -> [(func, args, outputs)] of ops reading it
        self.keep: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        if outs:
            self.keep.append((leaves, outs))
            for a in leaves:
                if not any(o is a for o in outs):
                    self.reads[id(a)] = self.reads.get(id(a), 0) + 1
                    self.ops.setdefault(id(a), []).append((func, leaves, outs))
        return out


def _follow_tensors(model: nn.Module, sites: list[Site], example: dict) -> list[Site]:
    """Feeding and consumer layers of ReLU-module sites from one real forward.

    Every Linear/Conv/Conv1D records the tensor it returns and the tensor it reads; every activation module
    the tensors it reads and returns; a torch-function mode counts the ops reading each tensor. A site is
    fed by layer L when its input *is* L's output (exclusive when nothing else reads it), and consumed by
    layer C when its output is read by C alone. A gated site (relu(gate(x)) * up(x) read by down, Llama's
    MLP) gets the partner layer when it reads the very tensor the feeding layer reads, and the layer reading
    the product as its consumer. Exact by construction: only tensor identity is used, no shapes or names."""
    named = {name: m for name, m in model.named_modules()}
    wanted: dict[str, list[int]] = {}
    for i, s in enumerate(sites):
        if _followable(s):
            wanted.setdefault(s.name.split("#")[0], []).append(i)
    produced: dict[int, str] = {}  # tensor id -> layer that returned it
    layer_input: dict[int, int] = {}  # id of a layer's output -> id of the tensor it read
    read_by: dict[int, list[str]] = {}  # tensor id -> layers that read it
    calls: dict[str, list[tuple]] = {}  # activation module -> [(input, output)] per call
    keep: list = []
    handles = []

    def layer_hooks(name):
        def pre(_m, args):
            if args and isinstance(args[0], torch.Tensor):
                keep.append(args[0])
                read_by.setdefault(id(args[0]), []).append(name)

        def post(_m, args, out):
            if isinstance(out, torch.Tensor):
                keep.append(out)
                produced[id(out)] = name
                if args and isinstance(args[0], torch.Tensor):
                    layer_input[id(out)] = id(args[0])
        return pre, post

    try:
        for name, m in named.items():
            if layers.kind_of(m) is not None:
                pre, post = layer_hooks(name)
                handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        for base in wanted:
            m = named.get(base)
            if m is None:
                continue

            def act_hook(_m, args, out, base=base):
                if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                    keep.append((args[0], out))
                    calls.setdefault(base, []).append((args[0], out))
            handles.append(m.register_forward_hook(act_hook))
        mode = _Reads()
        with torch.inference_mode(), mode:
            model(**example)
    except Exception:  # the example does not run this model: sites stay as tracing found them
        return sites
    finally:
        for h in handles:
            h.remove()

    def resolve(x, y):
        feeding = consumer = None
        gated = None
        src = produced.get(id(x))
        if src is not None:
            kind = layers.kind_of(named[src])
            feeding = Feeding(src, kind.name, (), mode.reads.get(id(x), 0) == 1)
        readers = read_by.get(id(y), [])
        if mode.reads.get(id(y), 0) == 1 and len(readers) == 1:
            c = layers.kind_of(named[readers[0]])
            consumer = Consumer(readers[0], c.name, 1, True)
        elif mode.reads.get(id(y), 0) == 1:  # gated: y * up(x), the product read by one layer alone
            func, args, outs = mode.ops[id(y)][0]
            other = [a for a in args if a is not y]
            # the partner must read the feeding layer's own input: relu(gate(x)) * up(x)
            if (getattr(func, "__name__", "") in ("mul", "__mul__", "__rmul__") and len(other) == 1 and len(outs) == 1
                    and id(other[0]) in produced and other[0].shape == y.shape == outs[0].shape
                    and id(x) in layer_input and layer_input.get(id(other[0])) == layer_input[id(x)]
                    and mode.reads.get(id(outs[0]), 0) == 1 and len(read_by.get(id(outs[0]), [])) == 1):
                p = produced[id(other[0])]
                gate = GatePartner(p, layers.kind_of(named[p]).name, mode.reads.get(id(other[0]), 0) == 1)
                gated = (gate, read_by[id(outs[0])][0])
        return feeding, consumer, gated

    out = list(sites)
    for base, idxs in wanted.items():
        found = [resolve(x, y) for x, y in calls.get(base, [])]
        for i in idxs:
            s = sites[i]
            if s.hooked:  # calls merged into one site: use what every call agrees on
                if not found or any(f != found[0] for f in found):
                    continue
                feeding, consumer, gated = found[0]
            else:
                k = int(s.name.split("#")[1]) if "#" in s.name else 1
                if k > len(found):
                    continue
                feeding, consumer, gated = found[k - 1]
            feeding = s.feeding or feeding
            consumer = s.consumer or consumer
            note = s.note
            if s.feeding is None and feeding is not None:
                note = (f"{HOOKED_NOTE}; feeding and consumer layers found by following tensors through one forward"
                        if s.hooked else "")
            gate = s.gate
            if gated is not None and consumer is None and feeding is not None:
                gate = gated[0]
                c = layers.kind_of(named[gated[1]])
                consumer = Consumer(gated[1], c.name, 1, True)
                extra = _gated_note(feeding.layer, gate.layer, consumer)
                note = f"{note}; {extra}" if note else extra
            axis = s.axis if s.feeding is not None else (layers.kind_of(named[feeding.layer]).feature_axis
                                                         if feeding is not None else s.axis)
            out[i] = Site(name=s.name, activation=s.activation, call=s.call, inplace=s.inplace, axis=axis,
                          feeding=feeding, consumer=consumer, input_nonneg=s.input_nonneg, note=note,
                          hooked=s.hooked, part=s.part, node=s.node, gate=gate)
    return out
