"""Site discovery: every relu call is found, with its feeding and consumer layers.

Models are built so the number of sites and their layers are known by construction; a site that
cannot be traced must be reported (hooked site or opaque part), never silently missing.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadscan
from deadscan.trace import Consumer, Feeding

VIT_SMALL = "(img_size=8, patch_size=4, dim=16, heads=2, mlp_dim=32, depth=2)"


def names(sitemap) -> list[str]:
    return [s.name for s in sitemap.sites]


def feeding_layer(site) -> str | None:
    return site.feeding.layer if site.feeding is not None else None


def consumer_layer(site) -> str | None:
    return site.consumer.layer if site.consumer is not None else None


# ---------------------------------------------------------------------------------------------
# Built-in models


def test_paper_mlp_sites():
    sm = deadscan.find_sites(deadscan.zoo.build("mlp(depth=3, width=8, in_features=4)"))
    assert names(sm) == ["relu1", "relu2", "relu3"]
    assert sm.opaque == []
    assert [feeding_layer(s) for s in sm.sites] == ["fc1", "fc2", "fc3"]
    assert [consumer_layer(s) for s in sm.sites] == ["fc2", "fc3", "head"]
    assert all(s.feeding.kind == "linear" and s.feeding.chain == () for s in sm.sites)
    assert all(s.consumer == Consumer(s.consumer.layer, "linear", 1) for s in sm.sites)
    # fc1 reads the model input (may be negative); fc2 and fc3 read relu outputs.
    assert [s.input_nonneg for s in sm.sites] == [False, True, True]
    assert all(s.call == "nn.ReLU" and s.activation == "relu" and not s.inplace for s in sm.sites)
    assert all(s.strippable and not s.hooked and s.axis == -1 for s in sm.sites)


def test_paper_vit_relu_two_sites_per_block():
    sm = deadscan.find_sites(deadscan.zoo.build("vit-relu" + VIT_SMALL))
    assert sm.opaque == []
    assert names(sm) == ["blocks.0.mlp.act1", "blocks.0.mlp.act2", "blocks.1.mlp.act1", "blocks.1.mlp.act2"]
    for b in range(2):
        act1, act2 = sm[f"blocks.{b}.mlp.act1"], sm[f"blocks.{b}.mlp.act2"]
        assert act1.feeding == Feeding(f"blocks.{b}.mlp.fc1", "linear", (), True)
        # through drop1 (a Dropout) to fc2
        assert act1.consumer == Consumer(f"blocks.{b}.mlp.fc2", "linear", 1)
        assert act1.input_nonneg is False  # fc1 reads a LayerNorm output
        assert act2.feeding == Feeding(f"blocks.{b}.mlp.fc2", "linear", (), True)
        assert act2.consumer is None  # drop2 then the residual add
        assert act2.input_nonneg is True  # fc2 reads act1 through a Dropout
        assert act1.axis == act2.axis == -1


def test_paper_vit_gelu_has_no_sites():
    sm = deadscan.find_sites(deadscan.zoo.build("vit-gelu" + VIT_SMALL))
    assert sm.sites == []
    assert sm.opaque == []


# ---------------------------------------------------------------------------------------------
# torchvision models (weights=None, only traced)


def test_torchvision_vgg11():
    with torch.device("meta"):  # 133M parameters: only traced, so skip allocating and initialising them
        m = deadscan.zoo.build("torchvision:vgg11")
    sm = deadscan.find_sites(m)
    assert sm.opaque == []
    relus = [n for n, mod in m.named_modules() if isinstance(mod, nn.ReLU)]
    assert len(relus) == 10
    assert names(sm) == relus
    convs = [s for s in sm.sites if s.name.startswith("features.")]
    assert len(convs) == 8
    for s in sm.sites:
        idx = int(s.name.rsplit(".", 1)[1])
        prefix = s.name.rsplit(".", 1)[0]
        assert s.feeding.layer == f"{prefix}.{idx - 1}"
        assert s.call == "nn.ReLU" and s.inplace is True
    assert [s.input_nonneg for s in sm.sites] == [False] + [True] * 9
    # Last conv site -> maxpool -> AdaptiveAvgPool2d(7) -> flatten -> classifier.0: 7*7 columns each.
    last = convs[-1]
    assert last.name == "features.19"
    assert last.consumer == Consumer("classifier.0", "linear", 49)
    assert last.axis == 1
    assert sm["features.1"].consumer == Consumer("features.3", "conv2d", 1)  # through a MaxPool2d
    assert sm["classifier.1"].consumer == Consumer("classifier.3", "linear", 1)  # through Dropout
    assert sm["classifier.4"].consumer == Consumer("classifier.6", "linear", 1)


def test_torchvision_resnet18_17_sites_from_9_modules():
    m = deadscan.zoo.build("torchvision:resnet18")
    sm = deadscan.find_sites(m)
    assert sm.opaque == []
    relu_modules = [n for n, mod in m.named_modules() if isinstance(mod, nn.ReLU)]
    assert len(relu_modules) == 9
    assert len(sm.sites) == 17
    expected = ["relu"]
    for layer in range(1, 5):
        for block in range(2):
            expected += [f"layer{layer}.{block}.relu", f"layer{layer}.{block}.relu#2"]
    assert names(sm) == expected
    assert sm["relu"].feeding == Feeding("conv1", "conv2d", (("bn", "bn1"),), True)
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}"
            first, second = sm[f"{p}.relu"], sm[f"{p}.relu#2"]
            assert first.feeding == Feeding(f"{p}.conv1", "conv2d", (("bn", f"{p}.bn1"),), True)
            assert first.consumer == Consumer(f"{p}.conv2", "conv2d", 1)
            assert first.strippable
            # The second call follows the residual add.
            assert second.feeding is None and not second.strippable
            assert "residual add" in second.note
            assert second.axis == 1
    assert sm["layer4.1.relu#2"].consumer == Consumer("fc", "linear", 1)  # AdaptiveAvgPool2d(1) -> flatten


def test_torchvision_googlenet_functional_relu():
    gmod = importlib.import_module("torchvision.models.googlenet")
    m = deadscan.zoo.build("torchvision:googlenet(init_weights=False)")
    sm = deadscan.find_sites(m)
    assert sm.opaque == []
    convs = [n for n, mod in m.named_modules() if isinstance(mod, gmod.BasicConv2d)]
    aux = [n for n in convs if n.startswith("aux")]
    # 59 BasicConv2d modules, each ending in F.relu(x, inplace=True); the 2 in the auxiliary heads
    # are not called in eval mode (the traced inference graph), so 57 sites.
    assert len(convs) == 59 and len(aux) == 2
    assert len(sm.sites) == 57
    assert names(sm) == [f"{n}:relu" for n in convs if not n.startswith("aux")]
    assert all(s.call == "F.relu" and s.inplace is True and s.activation == "relu" for s in sm.sites)
    assert all(s.feeding == Feeding(f"{s.name[:-5]}.conv", "conv2d", (("bn", f"{s.name[:-5]}.bn"),), True)
               for s in sm.sites)
    # Branch ends are concatenated: no consumer layer.
    assert sm["inception3a.branch1:relu"].consumer is None
    assert sm["inception3a.branch2.0:relu"].consumer == Consumer("inception3a.branch2.1.conv", "conv2d", 1)


def test_torchvision_mobilenet_v2_relu6():
    m = deadscan.zoo.build("torchvision:mobilenet_v2")
    sm = deadscan.find_sites(m)
    assert sm.opaque == []
    relu6 = [n for n, mod in m.named_modules() if isinstance(mod, nn.ReLU6)]
    assert len(relu6) == 35
    assert names(sm) == relu6
    assert all(s.activation == "relu6" and s.call == "nn.ReLU6" and s.inplace is True for s in sm.sites)
    assert all(s.feeding is not None and s.feeding.kind == "conv2d" for s in sm.sites)
    assert sm["features.0.2"].feeding == Feeding("features.0.0", "conv2d", (("bn", "features.0.1"),), True)
    # A depthwise conv (groups != 1) is not a consumer; the pointwise conv after it is.
    assert sm["features.0.2"].consumer is None
    assert sm["features.1.conv.0.2"].consumer == Consumer("features.1.conv.1", "conv2d", 1)


# ---------------------------------------------------------------------------------------------
# Every way of writing relu


class AllForms(nn.Module):
    def __init__(self):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(4, 4) for _ in range(11))
        self.relu = nn.ReLU()
        self.relu_ip = nn.ReLU(inplace=True)
        self.relu6 = nn.ReLU6()

    def forward(self, x):
        f = self.fcs
        x = self.relu(f[0](x))
        x = self.relu_ip(f[1](x))
        x = F.relu(f[2](x))
        x = F.relu(f[3](x), inplace=True)
        x = F.relu(f[4](x), True)
        x = torch.relu(f[5](x))
        x = torch.relu_(f[6](x))
        x = f[7](x).relu()
        x = f[8](x).relu_()
        x = self.relu6(f[9](x))
        return F.relu6(f[10](x))


def test_every_way_of_writing_relu():
    sm = deadscan.find_sites(AllForms())
    assert sm.opaque == []
    got = [(s.name, s.call, s.inplace, s.activation, feeding_layer(s)) for s in sm.sites]
    assert got == [
        ("relu", "nn.ReLU", False, "relu", "fcs.0"),
        ("relu_ip", "nn.ReLU", True, "relu", "fcs.1"),
        ("(root):relu", "F.relu", False, "relu", "fcs.2"),
        ("(root):relu#2", "F.relu", True, "relu", "fcs.3"),
        ("(root):relu#3", "F.relu", True, "relu", "fcs.4"),
        ("(root):relu#4", "torch.relu", False, "relu", "fcs.5"),
        ("(root):relu_", "torch.relu_", True, "relu", "fcs.6"),
        ("(root):relu#5", "Tensor.relu", False, "relu", "fcs.7"),
        ("(root):relu_#2", "Tensor.relu_", True, "relu", "fcs.8"),
        ("relu6", "nn.ReLU6", False, "relu6", "fcs.9"),
        ("(root):relu6", "F.relu6", False, "relu6", "fcs.10"),
    ]
    assert [consumer_layer(s) for s in sm.sites] == [f"fcs.{i}" for i in range(1, 11)] + [None]
    assert [s.input_nonneg for s in sm.sites] == [False] + [True] * 10
    assert len({s.name for s in sm.sites}) == len(sm.sites)


class TwiceCalled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 5), nn.Linear(5, 6), nn.Linear(6, 2)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


def test_relu_module_called_twice_is_two_sites():
    sm = deadscan.find_sites(TwiceCalled())
    assert names(sm) == ["act", "act#2"]
    assert [feeding_layer(s) for s in sm.sites] == ["fc1", "fc2"]
    assert [consumer_layer(s) for s in sm.sites] == ["fc2", "fc3"]
    assert [s.input_nonneg for s in sm.sites] == [False, True]


# ---------------------------------------------------------------------------------------------
# Per-feature ops between the layer and the relu


class Between(nn.Module):
    """fc -> <op> -> relu -> head, for one op named by ``kind``."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)
        self.ident = nn.Identity()
        self.norm = nn.LayerNorm(4)
        self.bias = nn.Parameter(torch.zeros(4))
        self.skip = nn.Linear(3, 4)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc(x)
        k = self.kind
        if k == "bn":
            h = self.bn(h)
        elif k == "dropout":
            h = self.drop(h)
        elif k == "identity":
            h = self.ident(h)
        elif k == "scale":
            h = h * 2.0
        elif k == "param":
            h = h + self.bias
        elif k == "all":
            h = self.ident(self.drop(self.bn(h))) * 2.0 + self.bias
        elif k == "layernorm":
            h = self.norm(h)
        elif k == "residual":
            h = h + self.skip(x)
        return self.head(self.act(h))


@pytest.mark.parametrize("kind, chain", [
    ("bn", (("bn", "bn"),)),
    ("dropout", ()),
    ("identity", ()),
    ("scale", (("scale", 2.0),)),
    ("param", (("bias", "bias"),)),
    ("all", (("bn", "bn"), ("scale", 2.0), ("bias", "bias"))),
])
def test_per_feature_ops_keep_the_feeding_layer(kind, chain):
    sm = deadscan.find_sites(Between(kind))
    (site,) = sm.sites
    assert site.feeding == Feeding("fc", "linear", chain, True)
    assert site.consumer == Consumer("head", "linear", 1)
    assert site.strippable and site.note == ""


@pytest.mark.parametrize("kind, note", [
    ("layernorm", "after LayerNorm: scanned, not strippable"),
    ("residual", "after a residual add: scanned, not strippable"),
])
def test_layernorm_or_residual_between_means_no_feeding_layer(kind, note):
    sm = deadscan.find_sites(Between(kind))
    (site,) = sm.sites
    assert site.feeding is None and not site.strippable
    assert site.note == note
    assert site.input_nonneg is False
    assert site.axis == -1  # the nearest layer upstream is a Linear/LayerNorm
    assert site.consumer == Consumer("head", "linear", 1)


def test_scale_by_negative_constant_is_recorded():
    class Neg(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            return F.relu(self.fc(x) / -4.0 - 1.0)

    (site,) = deadscan.find_sites(Neg()).sites
    assert site.feeding == Feeding("fc", "linear", (("scale", -0.25), ("shift", -1.0)), True)


# ---------------------------------------------------------------------------------------------
# Partial tracing: opaque parts are reported, sites inside them still found


class Block(nn.Module):
    """Traceable: fc1 -> act (module) -> fc2 -> F.relu. Two sites."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)
        self.act = nn.ReLU()

    def forward(self, x):
        return F.relu(self.fc2(self.act(self.fc1(x))))


class Branchy(nn.Module):
    """Top-level forward branches on data: the root cannot be traced."""

    def __init__(self):
        super().__init__()
        self.a, self.b = Block(), Block()
        self.relu = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.a(x) if x.sum() > 0 else self.b(x)
        return self.head(self.relu(x))


def test_data_dependent_root_is_opaque_and_sites_inside_are_found():
    m = Branchy()
    sm = deadscan.find_sites(m)
    assert [o.module for o in sm.opaque] == ["(root)"]
    assert "control flow" in sm.opaque[0].reason
    assert "functional relu" in sm.opaque[0].reason  # says what cannot be seen
    # 2 sites in each Block (traced on their own) + the ReLU module called by the root = 5.
    assert names(sm) == ["a.act", "a:relu", "b.act", "b:relu", "relu"]
    for blk in ("a", "b"):
        act, fn = sm[f"{blk}.act"], sm[f"{blk}:relu"]
        assert act.feeding == Feeding(f"{blk}.fc1", "linear", (), True)
        assert act.consumer == Consumer(f"{blk}.fc2", "linear", 1)
        assert fn.feeding == Feeding(f"{blk}.fc2", "linear", (), True)
        assert fn.call == "F.relu" and fn.input_nonneg is True
        assert not act.hooked and not fn.hooked
    hooked = sm["relu"]
    assert hooked.hooked and hooked.feeding is None and hooked.call == "nn.ReLU"
    assert "opaque" in hooked.note
    assert [p.path for p in sm.parts] == ["a", "b"]


class ShapeLoop(nn.Module):
    """Iterates over x.shape: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.inner = Block()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        n = 1
        for s in x.shape:
            n = n * s
        return self.act(self.fc(self.inner(x)))


class ShapeAssert(nn.Module):
    """Asserts on shapes: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.inner = Block()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        assert x.shape[-1] == 4
        return self.act(self.inner(x))


class LateFail(nn.Module):
    """Runs a traceable grandchild, then fails: what the failed attempt emitted must not leak."""

    def __init__(self):
        super().__init__()
        self.inner = Block()
        self.act = nn.ReLU()

    def forward(self, x):
        h = self.inner(x)
        if h.shape[0] > 1:
            h = h * 1.0
        return self.act(h)


class Parent(nn.Module):
    def __init__(self, child: nn.Module):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.pre_act = nn.ReLU()
        self.child = child
        self.post = nn.Linear(4, 4)

    def forward(self, x):
        return F.relu(self.post(self.child(self.pre_act(self.pre(x)))))


@pytest.mark.parametrize("child", [ShapeLoop, ShapeAssert, LateFail])
def test_untraceable_child_inside_traceable_parent(child):
    m = Parent(child())
    sm = deadscan.find_sites(m)
    assert [o.module for o in sm.opaque] == ["child"]
    assert sm.opaque[0].reason  # says why
    # pre_act and the root F.relu in the traced parent, 2 in child.inner (traced on its own),
    # child.act watched by a hook: 5 sites, as many as the model has relu calls.
    assert names(sm) == ["pre_act", "child.inner.act", "child.inner:relu", "child.act", "(root):relu"]
    assert sm["pre_act"].feeding == Feeding("pre", "linear", (), True)
    assert sm["pre_act"].consumer is None  # read by the opaque child
    assert sm["(root):relu"].feeding == Feeding("post", "linear", (), True)
    assert sm["(root):relu"].input_nonneg is False  # post reads the opaque child's output
    assert sm["child.inner.act"].feeding == Feeding("child.inner.fc1", "linear", (), True)
    assert sm["child.inner.act"].consumer == Consumer("child.inner.fc2", "linear", 1)
    assert sm["child.inner:relu"].feeding == Feeding("child.inner.fc2", "linear", (), True)
    assert sm["child.act"].hooked and sm["child.act"].feeding is None
    assert sm["child.act"].inplace is (child is ShapeAssert)
    assert [p.path for p in sm.parts] == ["", "child.inner"]


class OpaqueWithModuleList(nn.Module):
    """Opaque root holding its blocks in a ModuleList (which has no forward of its own)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.acts = nn.ModuleList([nn.ReLU(), nn.ReLU6()])

    def forward(self, x):
        for blk in self.blocks:
            if x.mean() > 0:
                x = blk(x)
        return self.acts[1](self.acts[0](x))


def test_opaque_root_with_module_lists():
    sm = deadscan.find_sites(OpaqueWithModuleList())
    expected = []
    for i in range(3):
        expected += [f"blocks.{i}.act", f"blocks.{i}:relu"]
    expected += ["acts.0", "acts.1"]
    assert names(sm) == expected
    assert sm["acts.0"].hooked and sm["acts.1"].hooked and sm["acts.1"].activation == "relu6"
    # A container has no forward to trace: it is not an opaque part of the model.
    assert [o.module for o in sm.opaque] == ["(root)"]


# ---------------------------------------------------------------------------------------------
# nn.TransformerEncoderLayer


class WithEncoder(nn.Module):
    def __init__(self, activation):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=activation, batch_first=True)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.enc(self.inp(x)).relu())


def test_transformer_encoder_layer_is_reported_opaque():
    """TransformerEncoderLayer's forward tests its inputs (fast-path checks such as
    ``src.dim() != 3``), which fx cannot trace: it is reported as opaque. With
    ``activation="relu"`` it calls F.relu inside that forward, which cannot be seen: the opaque
    entry says so, rather than the relu going silently missing."""
    sm = deadscan.find_sites(WithEncoder("relu"))
    assert [o.module for o in sm.opaque] == ["enc"]
    assert "TraceError" in sm.opaque[0].reason
    assert "functional relu calls in its forward are not seen" in sm.opaque[0].reason
    # The relu written in the traceable parent is still a site.
    assert names(sm) == ["(root):relu"]
    site = sm["(root):relu"]
    assert site.feeding is None and site.note == "after TransformerEncoderLayer: scanned, not strippable"
    assert site.consumer == Consumer("out", "linear", 1)


def test_transformer_encoder_layer_with_relu_module_is_hooked():
    sm = deadscan.find_sites(WithEncoder(nn.ReLU()))
    assert [o.module for o in sm.opaque] == ["enc"]
    assert names(sm) == ["enc.activation", "(root):relu"]
    assert sm["enc.activation"].hooked and sm["enc.activation"].feeding is None


def test_find_sites_restores_training_mode():
    m = deadscan.zoo.build("mlp(depth=2, width=4, in_features=3)").train()
    deadscan.find_sites(m)
    assert m.training
    m.eval()
    deadscan.find_sites(m)
    assert not m.training
