"""Architectures by spec string: built-ins (the paper's MLP and ViT), torchvision, timm, and
``pkg.module:factory``.

A spec is ``NAME`` or ``NAME(key=value, ...)`` with Python literal values, e.g.
``mlp(depth=4, width=512, in_features=3072, classes=10)``, ``torchvision:resnet18(num_classes=10)``,
``mypkg.models:build(width=64)``. deadscan writes the spec into the metadata of what it saves.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import math
import shlex
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ArchError
from .layers import kind_of


# ---------------------------------------------------------------------------------------------
# Specs


@dataclass(frozen=True)
class ArchSpec:
    name: str  # "mlp", "vit-relu", "torchvision:resnet18", "pkg.mod:fn"
    kwargs: dict = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.kwargs:
            return self.name
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.name}({args})"

    @property
    def runs_user_code(self) -> bool:
        """True for ``pkg.module:factory`` specs: building them imports and calls user code."""
        return ":" in self.name and self.name.split(":", 1)[0] not in REGISTRIES


REGISTRIES = ("torchvision", "timm")  # model registries: a name in them picks a builder, never imports by name
# Keyword arguments a registry builder turns into a file read or a download: never taken from a file.
FILE_KWARGS = ("weights", "pretrained", "checkpoint", "path", "file", "dir", "cfg", "url", "hub")


def check_file_spec(spec: ArchSpec, where: str) -> None:
    """A spec read from a file (a run folder's summary.json, a checkpoint's metadata) may name no code:
    the built-ins, and a registry's model names checked against the registry before anything is built.
    Anything else the user must pass again with ``--arch`` (their own choice, as ``python -c`` is)."""
    again = f"pass --arch {shlex.quote(str(spec))} yourself if you trust it"
    prefix, _, fn = spec.name.partition(":")
    if spec.name not in BUILTINS and prefix not in REGISTRIES:
        raise ArchError(f"{where} names architecture {spec}, which would import code named by a file; deadscan "
                        f"never does that: {again}")
    risky = [k for k in spec.kwargs if any(w in k.lower() for w in FILE_KWARGS)]
    if risky:
        raise ArchError(f"{where} names architecture {spec}, whose argument {risky[0]}= would make the builder "
                        "read a file or download; deadscan loads weights only from your checkpoint: pass --arch "
                        f"without {risky[0]}= yourself")
    if prefix == "torchvision":
        import torchvision

        if fn not in torchvision.models.list_models():
            raise ArchError(f"{where} names architecture {spec}, not a torchvision model; {again}")
    elif prefix == "timm":
        try:
            import timm
        except ImportError:
            raise ArchError(f"{where} names architecture {spec}, which needs timm: pip install timm") from None
        if fn not in timm.list_models():
            raise ArchError(f"{where} names architecture {spec}, not a timm model; {again}")


def parse_spec(text: str) -> ArchSpec:
    """Parse ``NAME`` or ``NAME(k=v, ...)``; values must be Python literals."""
    text = text.strip()
    name, _, rest = text.partition("(")
    name = name.strip()
    if not name or any(c.isspace() for c in name):
        raise ArchError(f"bad --arch spec {text!r}: expected NAME or NAME(key=value, ...)")
    kwargs: dict = {}
    if rest:
        if not rest.endswith(")"):
            raise ArchError(f"bad --arch spec {text!r}: missing closing ')'")
        try:
            call = ast.parse(f"f({rest}", mode="eval").body
            if not isinstance(call, ast.Call) or call.args:
                raise ValueError("positional arguments")
            for kw in call.keywords:
                if kw.arg is None:
                    raise ValueError("**kwargs")
                kwargs[kw.arg] = ast.literal_eval(kw.value)
        except (SyntaxError, ValueError) as e:
            raise ArchError(
                f"bad --arch spec {text!r}: arguments must be key=value with literal values ({e})"
            ) from None
    return ArchSpec(name, kwargs)


# ---------------------------------------------------------------------------------------------
# Built-in models (paper Table I MLP, Table II ViT)


def paper_mlp(depth: int = 2, width: int = 256, in_features: int = 3072, classes: int = 10) -> nn.Module:
    """Table I: ``depth`` hidden Linear+ReLU layers of ``width``, then a Linear head."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    prev = in_features
    for i in range(1, depth + 1):
        layers[f"fc{i}"] = nn.Linear(prev, width)
        layers[f"relu{i}"] = nn.ReLU()
        prev = width
    layers["head"] = nn.Linear(prev, classes)
    return nn.Sequential(layers)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x):
        # (B, T, D) -> (B, H, T, D/H)
        q, k, v = (f(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for f in (self.q, self.k, self.v))
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.o(out.transpose(1, 2).flatten(2))


class EncoderBlock(nn.Module):
    """Pre-norm block; the activation follows BOTH MLP linears, as in the paper's reference code."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float, act: str):
        super().__init__()
        make_act = nn.ReLU if act == "relu" else nn.GELU
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(OrderedDict(
            fc1=nn.Linear(dim, mlp_dim), act1=make_act(), drop1=nn.Dropout(dropout),
            fc2=nn.Linear(mlp_dim, dim), act2=make_act(), drop2=nn.Dropout(dropout),
        ))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PaperViT(nn.Module):
    """Table II ViT: 4x4 patches on 32x32 images give 64 tokens + a class token."""

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 3, classes: int = 10,
                 depth: int = 7, heads: int = 8, dim: int = 384, mlp_dim: int = 1536,
                 dropout: float = 0.0, act: str = "relu"):
        super().__init__()
        if img_size % patch_size:
            raise ArchError(f"vit: img_size {img_size} is not a multiple of patch_size {patch_size}")
        if dim % heads:
            raise ArchError(f"vit: dim {dim} is not a multiple of heads {heads}")
        self.patch_size = patch_size
        tokens = (img_size // patch_size) ** 2 + 1
        self.embed = nn.Linear(in_chans * patch_size**2, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, mlp_dim, dropout, act) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        p = self.patch_size
        # (B, C, H, W) -> (B, H/p * W/p, C*p*p)
        x = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
        x = self.embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.blocks(x)
        return self.head(self.norm(x[:, 0]))


def mlp_kwargs(shapes: dict[str, tuple[int, ...]]) -> dict | None:
    """The ``mlp`` keywords that build exactly these tensors (key -> shape, wrapper prefixes already
    dropped), or None when they are not the built-in mlp's keys with one hidden width."""
    depth = sum(1 for k in shapes if k.startswith("fc") and k.endswith(".weight"))
    keys = {f"{layer}.{t}" for layer in [*(f"fc{i}" for i in range(1, depth + 1)), "head"] for t in ("weight", "bias")}
    if depth < 1 or set(shapes) != keys or len(shapes["fc1.weight"]) != 2:
        return None
    width, in_features = shapes["fc1.weight"]
    classes = shapes["head.weight"][0]
    kw = {"depth": depth, "width": width, "in_features": in_features, "classes": classes}
    built = {k: tuple(v.shape) for k, v in paper_mlp_shapes(**kw).items()}
    return kw if built == {k: tuple(v) for k, v in shapes.items()} else None


def paper_mlp_shapes(**kw) -> dict:
    """``paper_mlp(**kw)``'s state dict on the meta device: shapes only, nothing allocated."""
    with torch.device("meta"):
        return paper_mlp(**kw).state_dict()


def linear_chain(shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, int, int]] | None:
    """``[(layer, in, out), ...]`` when the tensors are only Linear layers (a 2-d weight and its bias) each
    taking the previous one's output, in the file's order or in numeric order of their names; else None."""
    layers: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        layer, _, leaf = key.rpartition(".")
        if leaf == "weight" and len(shape) == 2:
            layers[layer] = shape
        elif not (leaf == "bias" and len(shape) == 1):
            return None
    if len(layers) < 2 or any(shapes.get(f"{n}.bias", (w[0],)) != (w[0],) for n, w in layers.items()) \
            or any(k.rpartition(".")[0] not in layers for k in shapes):
        return None
    natural = sorted(layers, key=lambda n: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in n.split(".")])
    for order in (list(layers), natural):
        if all(layers[a][0] == layers[b][1] for a, b in zip(order, order[1:])):
            return [(n, layers[n][1], layers[n][0]) for n in order]
    return None


def mlp_spec_text(kw: dict) -> str:
    """The --arch text for ``mlp`` keywords, double-quoted for a shell (its values are numbers)."""
    return f'"{ArchSpec("mlp", kw)}"'


BUILTINS = {
    "mlp": paper_mlp,
    "vit-relu": lambda **kw: PaperViT(act="relu", **kw),
    "vit-gelu": lambda **kw: PaperViT(act="gelu", **kw),
}


# ---------------------------------------------------------------------------------------------
# Building


def build(spec: ArchSpec | str, *, allow_user_code: bool = True) -> nn.Module:
    """Build an untrained model from a spec.

    ``allow_user_code=False`` refuses ``pkg.module:factory`` specs; used for specs read from a
    file's metadata, which must never choose what code deadscan imports.
    """
    if isinstance(spec, str):
        spec = parse_spec(spec)
    name, kwargs = spec.name, dict(spec.kwargs)
    try:
        if name in BUILTINS:
            _check_keywords(spec)
            return BUILTINS[name](**kwargs)
        prefix, _, fn = name.partition(":")
        if prefix == "torchvision":
            return _torchvision(fn, kwargs)
        if prefix == "timm":
            return _timm(fn, kwargs)
        if fn:
            if not allow_user_code:
                raise ArchError(
                    f"the checkpoint names architecture {spec} (user code); deadscan does not import "
                    f"code named by a file: pass it yourself with --arch {shlex.quote(str(spec))} if you trust it"
                )
            return _factory(prefix, fn, kwargs)
    except TypeError as e:
        raise ArchError(f"cannot build --arch {spec}: {e}") from None
    raise ArchError(
        f"unknown --arch {name!r}: use one of {', '.join(BUILTINS)}, torchvision:NAME, timm:NAME "
        "or pkg.module:factory"
    )


def builtin_keywords(name: str) -> tuple[str, ...]:
    """The keywords a built-in architecture takes, in its signature's order."""
    fn = PaperViT.__init__ if name.startswith("vit-") else BUILTINS[name]
    return tuple(p for p in inspect.signature(fn).parameters if p not in ("self", "act"))


def _check_keywords(spec: ArchSpec) -> None:
    """A misspelt keyword names the valid ones (Python's TypeError names only the bad one)."""
    name = spec.name
    valid = builtin_keywords(name)
    unknown = [k for k in spec.kwargs if k not in valid]
    if unknown:
        close = difflib.get_close_matches(unknown[0], valid, n=1)
        hint = f" (did you mean {close[0]}=?)" if close else ""
        raise ArchError(f"--arch {spec}: unknown keyword {unknown[0]}={hint}; {name} takes "
                        f"{', '.join(k + '=' for k in valid)}")


def _no_weights(kwargs: dict, what: str) -> None:
    for key in ("weights", "pretrained", "weights_backbone"):
        if kwargs.get(key):
            raise ArchError(f"{what}: {key}= would download weights; deadscan loads weights from your checkpoint")


def _torchvision(fn: str, kwargs: dict) -> nn.Module:
    import torchvision

    _no_weights(kwargs, f"torchvision:{fn}")
    kwargs.pop("weights", None)
    if fn not in torchvision.models.list_models():
        raise ArchError(f"torchvision has no model {fn!r} (see torchvision.models.list_models())")
    return torchvision.models.get_model(fn, weights=None, **kwargs)


def _timm(fn: str, kwargs: dict) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ArchError(f"--arch timm:{fn} needs timm: pip install timm") from None
    _no_weights(kwargs, f"timm:{fn}")
    kwargs.pop("pretrained", None)
    try:
        return timm.create_model(fn, pretrained=False, **kwargs)
    except RuntimeError as e:
        raise ArchError(f"timm cannot build {fn!r}: {e}") from None


def _factory(module: str, fn: str, kwargs: dict) -> nn.Module:
    try:
        factory = getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise ArchError(f"cannot import {module}:{fn} ({e}); is the package on your PYTHONPATH?") from None
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ArchError(f"{module}:{fn} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def count_params(model: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Resized layers (compacted models record their new widths so deadscan can rebuild them)

SHAPES_KEY = "deadscan_shapes"  # safetensors metadata: JSON {module name: {"in": n, "out": n}}


def resized(m: nn.Module, in_features: int | None = None, out_features: int | None = None) -> nn.Module:
    """An empty copy of a layer with a ``layers`` entry, or of a BatchNorm, with other widths (same
    dtype and device)."""
    kind = kind_of(m)
    if kind is not None:
        return kind.resize(m, in_features, out_features)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        w = getattr(m, "weight", None)
        kw = {"device": w.device, "dtype": w.dtype} if w is not None else {}
        return type(m)(out_features or m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, **kw)
    raise ArchError(f"cannot resize a {type(m).__name__}")


def widths(m: nn.Module) -> dict:
    kind = kind_of(m)
    if kind is not None:
        return kind.widths(m)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return {"out": m.num_features}
    raise ArchError(f"no widths for a {type(m).__name__}")


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def apply_shapes(model: nn.Module, shapes: dict) -> None:
    """Swap the named layers for resized ones, so a compacted state dict loads strictly."""
    for name, size in shapes.items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ArchError(f"compacted layer {name} is not in the architecture") from None
        set_submodule(model, name, resized(m, size.get("in"), size.get("out")))
