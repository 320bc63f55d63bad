"""Checkpoint formats, safe loading, refusals, arch mismatches, and arch spec parsing."""

from __future__ import annotations

import hashlib
import pathlib
import pickle
import random
import zipfile

import pytest
import torch
from safetensors.torch import save_file

import deadscan
from deadscan.checkpoint import ARCH_KEY, detect_format, load_checkpoint
from deadscan.errors import ArchError, CheckpointError, DeadscanNote
from deadscan.zoo import ArchSpec, build, parse_spec

from conftest import MLP_SPEC


@pytest.fixture
def rand_mlp():
    """The spec's MLP with seeded random weights: every element differs, so equality is a real check."""
    torch.manual_seed(0)
    return build(MLP_SPEC).eval()


def assert_same_state(model: torch.nn.Module, original: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert list(got) == list(original)
    for k, v in original.items():
        assert got[k].device.type == "cpu", k
        assert torch.equal(got[k], v), k


class TouchOnUnpickle:
    """Unpickling this creates ``marker``: a harmless stand-in for code a malicious file would run."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


# ---------------------------------------------------------------------------------------------
# Format detection: from the bytes, not the extension


def test_safetensors_named_pt_is_detected_and_loads(tmp_path, rand_mlp):
    p = tmp_path / "weights.pt"
    deadscan.save_safetensors(rand_mlp, p, MLP_SPEC)
    assert detect_format(p) == "safetensors"
    ck = load_checkpoint(p)
    assert ck.info.format == "safetensors"
    assert_same_state(ck.model, rand_mlp.state_dict())


def test_torch_zip_named_safetensors_is_detected_and_loads(tmp_path, rand_mlp):
    p = tmp_path / "weights.safetensors"
    torch.save(rand_mlp.state_dict(), p)
    assert detect_format(p) == "torch-zip"
    ck = load_checkpoint(p, MLP_SPEC)
    assert ck.info.format == "torch-zip"
    assert_same_state(ck.model, rand_mlp.state_dict())


def test_legacy_torch_save_is_detected_and_loads(tmp_path, rand_mlp):
    p = tmp_path / "old.pth"
    torch.save(rand_mlp.state_dict(), p, _use_new_zipfile_serialization=False)
    assert p.read_bytes()[:1] == b"\x80"
    assert detect_format(p) == "torch-legacy"
    ck = load_checkpoint(p, MLP_SPEC)
    assert ck.info.format == "torch-legacy"
    assert_same_state(ck.model, rand_mlp.state_dict())


def _random_bytes() -> bytes:
    data = random.Random(1).randbytes(64)
    assert data[:1] != b"\x80" and data[:2] != b"PK"  # really neither a pickle nor a zip
    return data


@pytest.mark.parametrize("case, expected", [
    ("missing", "{p}: no such file"),
    ("folder", "{p}: is a folder, not a checkpoint file"),
    ("empty", "{p}: file is empty"),
    ("random", "{p}: not a checkpoint deadscan can read (first bytes {head}); "
               "expected safetensors or a torch.save file"),
    ("truncated-zip", "{p}: damaged zip archive"),
    ("foreign-zip", "{p}: a zip archive but not a torch.save file (no data.pkl inside)"),
])
def test_unreadable_files_give_one_line_errors(tmp_path, rand_mlp, case, expected):
    p = tmp_path / "model.pt"
    head = ""
    if case == "folder":
        p.mkdir()
    elif case == "empty":
        p.write_bytes(b"")
    elif case == "random":
        data = _random_bytes()
        p.write_bytes(data)
        head = data[:8].hex()
    elif case == "truncated-zip":
        torch.save(rand_mlp.state_dict(), tmp_path / "full.pt")
        p.write_bytes((tmp_path / "full.pt").read_bytes()[:200])
    elif case == "foreign-zip":
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("readme.txt", "not a model")
    with pytest.raises(CheckpointError) as e:
        detect_format(p)
    msg = str(e.value)
    assert "\n" not in msg
    assert expected.format(p=p, head=head) in msg
    # load_checkpoint reports the same thing
    with pytest.raises(CheckpointError) as e2:
        load_checkpoint(p, MLP_SPEC)
    assert str(e2.value) == msg


def test_truncated_safetensors_is_reported_damaged(tmp_path, rand_mlp):
    full = tmp_path / "full.safetensors"
    deadscan.save_safetensors(rand_mlp, full, MLP_SPEC)
    p = tmp_path / "cut.safetensors"
    data = full.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    assert detect_format(p) == "safetensors"  # the header is intact
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: damaged safetensors file \("):
        load_checkpoint(p)


# ---------------------------------------------------------------------------------------------
# Loading


def test_safetensors_with_deadscan_metadata_needs_no_arch(tmp_path, rand_mlp):
    p = tmp_path / "m.safetensors"
    deadscan.save_safetensors(rand_mlp, p, MLP_SPEC)
    ck = load_checkpoint(p)
    assert ck.info.arch == MLP_SPEC
    assert ck.info.format == "safetensors"
    assert ck.info.path == str(p)
    assert ck.info.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    assert not ck.model.training
    assert_same_state(ck.model, rand_mlp.state_dict())
    # the public shortcut gives the same model
    assert_same_state(deadscan.load(p), rand_mlp.state_dict())


def test_plain_safetensors_of_the_builtin_mlp_loads_without_arch_and_says_so(tmp_path, rand_mlp):
    p = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in rand_mlp.state_dict().items()}, str(p))
    with pytest.warns(DeadscanNote) as notes:
        ck = load_checkpoint(p)
    assert [str(n.message) for n in notes] == [
        f"{p}: no --arch given; its tensors are exactly the built-in mlp's: loading it as {MLP_SPEC} "
        "(pass --arch to choose another)"]
    assert ck.info.arch == MLP_SPEC
    assert_same_state(ck.model, rand_mlp.state_dict())
    assert_same_state(load_checkpoint(p, MLP_SPEC).model, rand_mlp.state_dict())


def test_plain_safetensors_not_quite_the_builtin_mlp_needs_arch(tmp_path, rand_mlp):
    state = {k: v.contiguous() for k, v in rand_mlp.state_dict().items()}
    state["fc2.weight"], state["fc2.bias"] = torch.zeros(7, 8), torch.zeros(7)  # two hidden widths
    p = tmp_path / "plain.safetensors"
    save_file(state, str(p))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    assert str(e.value) == (f"{p}: holds only weights; pass --arch (e.g. --arch 'mlp(depth=2, width=256, "
                            "in_features=64)' or --arch torchvision:resnet18)")


def test_plain_state_dict_pt_with_arch(tmp_path, rand_mlp):
    p = tmp_path / "sd.pt"
    torch.save(rand_mlp.state_dict(), p)
    ck = load_checkpoint(p, arch=MLP_SPEC)
    assert ck.info.arch == MLP_SPEC
    assert_same_state(ck.model, rand_mlp.state_dict())


@pytest.mark.parametrize("nest_key, prefix", [
    (None, "module."),                       # DDP
    ("state_dict", "model."),                # Lightning
    ("state_dict", "module."),
    ("model", "_orig_mod."),                 # torch.compile
    ("model_state_dict", "module._orig_mod."),  # DDP around a compiled model
    ("state_dict", "model._orig_mod."),      # Lightning module holding a compiled model
])
def test_nested_and_prefixed_state_dicts(tmp_path, rand_mlp, nest_key, prefix):
    sd = {prefix + k: v for k, v in rand_mlp.state_dict().items()}
    obj = sd if nest_key is None else {
        nest_key: sd, "epoch": 7, "global_step": 70,
        "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 1e-3}]}],
    }
    p = tmp_path / "trainer.ckpt"
    torch.save(obj, p)
    ck = load_checkpoint(p, MLP_SPEC)
    assert_same_state(ck.model, rand_mlp.state_dict())


def test_model_whose_own_keys_start_with_a_wrapper_prefix_is_not_stripped():
    from deadscan.checkpoint import strip_prefixes

    state = {"model.weight": torch.zeros(1), "model.bias": torch.zeros(1)}
    assert strip_prefixes(state, {"model.weight", "model.bias"}) is state


def test_dict_without_a_state_dict_is_refused(tmp_path):
    p = tmp_path / "opt.pt"
    torch.save({"epoch": 3, "opt": {"lr": 0.1}}, p)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p, MLP_SPEC)
    assert str(e.value) == (
        f"{p}: holds a dict with keys ['epoch', 'opt'], not a state dict of tensors "
        "(looked under state_dict, model_state_dict, model, module, net, network)"
    )


# ---------------------------------------------------------------------------------------------
# Pickles that carry code are refused unless trusted


def _save_evil(kind: str, p: pathlib.Path, marker: pathlib.Path) -> None:
    evil = TouchOnUnpickle(marker)
    if kind == "zip":
        torch.save({"fc1.weight": torch.zeros(2), "payload": evil}, p)
    elif kind == "legacy":
        torch.save({"fc1.weight": torch.zeros(2), "payload": evil}, p, _use_new_zipfile_serialization=False)
    elif kind == "bare-pickle-proto2":
        with open(p, "wb") as f:
            pickle.dump({"payload": evil}, f, protocol=2)
    elif kind == "bare-pickle-default":
        with open(p, "wb") as f:
            pickle.dump({"payload": evil}, f)
    elif kind == "nested-in-list":
        torch.save({"state_dict": {"fc1.weight": torch.zeros(2)}, "callbacks": [1, {"x": evil}]}, p)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["zip", "legacy", "bare-pickle-proto2", "bare-pickle-default", "nested-in-list"])
def test_code_carrying_pickle_is_refused_without_running_it(tmp_path, kind):
    marker = tmp_path / "PWNED"
    p = tmp_path / "evil.pt"
    _save_evil(kind, p, marker)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p, MLP_SPEC)
    assert not marker.exists()
    msg = str(e.value)
    assert msg.startswith(f"{p}: the pickle needs code to load (")
    assert "pass --trust-pickle (runs code from it)" in msg
    assert "\n" not in msg


def test_refusal_names_the_global(tmp_path):
    p = tmp_path / "evil.pt"
    _save_evil("zip", p, tmp_path / "PWNED")
    with pytest.raises(CheckpointError, match=r"the pickle needs code to load \(global getattr\)"):
        load_checkpoint(p, MLP_SPEC)


def test_evil_payload_is_live_when_trusted(tmp_path):
    """Control for the refusal tests: the same file DOES run code under trust_pickle=True."""
    marker = tmp_path / "PWNED"
    p = tmp_path / "evil.pt"
    _save_evil("zip", p, marker)
    with pytest.raises(CheckpointError, match="not a state dict of tensors"):
        load_checkpoint(p, MLP_SPEC, trust_pickle=True)
    assert marker.exists()


def test_whole_pickled_module_needs_trust(tmp_path, rand_mlp):
    p = tmp_path / "whole.pt"
    torch.save(rand_mlp, p)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    assert str(e.value) == (
        f"{p}: the pickle needs code to load (global torch.nn.modules.container.Sequential); it may be a whole "
        "pickled module. If you trust the file pass --trust-pickle (runs code from it), or re-save it as a state dict"
    )
    ck = load_checkpoint(p, trust_pickle=True)
    assert ck.info.format == "torch-zip"
    assert ck.info.arch is None
    assert not ck.model.training
    assert_same_state(ck.model, rand_mlp.state_dict())
    with pytest.raises(CheckpointError, match="holds a whole pickled module; drop --arch"):
        load_checkpoint(p, MLP_SPEC, trust_pickle=True)


def test_torchscript_is_refused_unless_trusted(tmp_path, rand_mlp):
    p = tmp_path / "scripted.pt"
    torch.jit.script(rand_mlp).save(str(p))
    assert detect_format(p) == "torchscript"
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    assert str(e.value) == (
        f"{p}: is a TorchScript archive, which carries code; pass --trust-pickle to run it, "
        "or save a state dict / safetensors instead"
    )
    ck = load_checkpoint(p, trust_pickle=True)
    assert ck.info.format == "torchscript"
    x = torch.rand(5, 4)
    assert torch.equal(ck.model(x), rand_mlp(x))


def test_torch_export_archive_is_refused_unless_trusted(tmp_path, rand_mlp):
    p = tmp_path / "exported.pt2"
    torch.export.save(torch.export.export(rand_mlp, (torch.zeros(2, 4),)), str(p))
    assert detect_format(p) == "pt2"
    with pytest.raises(CheckpointError, match=r"is a torch\.export \(\.pt2\) archive, which carries code; "
                                              r"pass --trust-pickle"):
        load_checkpoint(p)


# ---------------------------------------------------------------------------------------------
# Checkpoints that do not fit --arch


def test_wrong_depth_names_missing_and_unexpected_keys(tmp_path, rand_mlp):
    p2 = tmp_path / "depth2.pt"
    torch.save({"module." + k: v for k, v in rand_mlp.state_dict().items()}, p2)
    deeper = "mlp(depth=3, width=8, in_features=4, classes=3)"
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p2, deeper)
    assert str(e.value) == (f"{p2}: does not fit the architecture: missing fc3.weight, fc3.bias; "
                            'the file holds an mlp with depth=2 (not 3): pass --arch '
                            '"mlp(depth=2, width=8, in_features=4, classes=3)"')

    p3 = tmp_path / "depth3.pt"
    torch.save(build(deeper).state_dict(), p3)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p3, MLP_SPEC)
    assert str(e.value) == (f"{p3}: does not fit the architecture: unexpected fc3.weight, fc3.bias; "
                            'the file holds an mlp with depth=3 (not 2): pass --arch '
                            '"mlp(depth=3, width=8, in_features=4, classes=3)"')


def test_wrong_width_names_the_shape_mismatch(tmp_path, rand_mlp):
    p = tmp_path / "w8.pt"
    torch.save(rand_mlp.state_dict(), p)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p, "mlp(depth=2, width=9, in_features=4, classes=3)")
    assert str(e.value) == (
        f"{p}: tensor shapes do not fit the architecture (file vs model): fc1.weight (8, 4) vs (9, 4), "
        "fc1.bias (8,) vs (9,), fc2.weight (8, 8) vs (9, 9), fc2.bias (8,) vs (9,), head.weight (3, 8) vs (3, 9); "
        'the file holds an mlp with width=8 (not 9): pass --arch "mlp(depth=2, width=8, in_features=4, classes=3)"'
    )


def test_mismatch_that_is_not_a_builtin_mlp_says_check_arch(tmp_path, rand_mlp):
    p = tmp_path / "sd.pt"
    state = rand_mlp.state_dict()
    state["fc2.weight"], state["fc2.bias"] = torch.zeros(7, 8), torch.zeros(7)  # no single width fits
    torch.save(state, p)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p, MLP_SPEC)
    assert str(e.value) == (f"{p}: tensor shapes do not fit the architecture (file vs model): fc2.weight (7, 8) vs "
                            "(8, 8), fc2.bias (7,) vs (8,); check --arch sizes")


def test_plain_state_dict_without_arch_says_pass_arch(tmp_path, rand_mlp):
    p = tmp_path / "sd.pt"
    torch.save({**rand_mlp.state_dict(), "scale": torch.ones(1)}, p)  # not only the mlp's tensors
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    assert str(e.value).startswith(f"{p}: holds only weights; pass --arch (e.g. --arch 'mlp(")


def test_state_dict_of_a_linear_stack_without_arch_suggests_the_mlp(tmp_path):
    torch.manual_seed(0)
    stack = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10))
    p = tmp_path / "stack.pt"
    torch.save({"module." + k: v for k, v in stack.state_dict().items()}, p)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    assert str(e.value) == (
        f"{p}: holds only weights, of 3 Linear layers (64 -> 32 -> 32 -> 10) named module.0, module.2, "
        "module.4, which do not say what runs between them; if it is a ReLU MLP, rename them fc1, fc2, head and "
        "pass --arch "
        '"mlp(depth=2, width=32, in_features=64, classes=10)", else pass --arch pkg.module:factory for the code '
        "that built it")
    # the suggestion is right: renamed, the weights load into that spec unchanged
    renamed = dict(zip(["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "head.weight", "head.bias"],
                       stack.state_dict().values()))
    torch.save(renamed, p)
    ck = load_checkpoint(p, "mlp(depth=2, width=32, in_features=64, classes=10)")
    assert_same_state(ck.model, renamed)
    x = torch.rand(5, 64)
    assert torch.equal(ck.model(x), stack(x))


def test_linear_stack_without_biases_gets_no_mlp_suggestion(tmp_path):
    stack = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False), torch.nn.ReLU(), torch.nn.Linear(8, 3, bias=False))
    p = tmp_path / "nobias.pt"
    torch.save(stack.state_dict(), p)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)  # the built-in mlp has biases: it could not load these
    assert str(e.value) == (f"{p}: holds only weights; pass --arch (e.g. --arch 'mlp(depth=2, width=256, "
                            "in_features=64)' or --arch torchvision:resnet18)")


def test_mlp_of_other_sizes_names_the_keywords_and_the_arch_that_fits(tmp_path, rand_mlp):
    p = tmp_path / "sd.pt"
    torch.save(rand_mlp.state_dict(), p)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p, "mlp(depth=3, width=8)")  # in_features and classes left at their defaults
    assert str(e.value) == (
        f"{p}: does not fit the architecture: missing fc3.weight, fc3.bias; the file holds an mlp with depth=2 "
        '(not 3), in_features=4 (not 3072), classes=3 (not 10): pass --arch '
        '"mlp(depth=2, width=8, in_features=4, classes=3)"')


def test_unknown_arch_keyword_lists_the_valid_ones(tmp_path, rand_mlp):
    with pytest.raises(ArchError) as e:
        build("mlp(widht=10)")
    assert str(e.value) == ("--arch mlp(widht=10): unknown keyword widht= (did you mean width=?); mlp takes depth=, "
                            "width=, in_features=, classes=")
    with pytest.raises(ArchError) as e:
        build("vit-relu(depht=2, dim=8)")
    assert str(e.value) == ("--arch vit-relu(depht=2, dim=8): unknown keyword depht= (did you mean depth=?); "
                            "vit-relu takes img_size=, patch_size=, in_chans=, classes=, depth=, heads=, dim=, "
                            "mlp_dim=, dropout=")


def test_unknown_arch_name(tmp_path, rand_mlp):
    p = tmp_path / "sd.pt"
    torch.save(rand_mlp.state_dict(), p)
    with pytest.raises(CheckpointError, match=r"unknown --arch 'resnet9000': use one of mlp, vit-relu, vit-gelu"):
        load_checkpoint(p, "resnet9000")


# ---------------------------------------------------------------------------------------------
# A checkpoint saved on a GPU loads on a CPU-only machine


def test_cuda_saved_state_dict_loads_on_cpu(tmp_path, rand_mlp):
    cpu_file = tmp_path / "weights.pt"
    torch.save(rand_mlp.state_dict(), cpu_file)
    with zipfile.ZipFile(cpu_file) as z:
        infos = z.infolist()
        members = {i.filename: z.read(i) for i in infos}
    pkl = [n for n in members if n.endswith("/data.pkl")]
    assert len(pkl) == 1
    cpu_loc, cuda_loc = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"  # BINUNICODE 'cpu' / 'cuda:0'
    assert cpu_loc in members[pkl[0]]
    members[pkl[0]] = members[pkl[0]].replace(cpu_loc, cuda_loc)

    gpu_file = tmp_path / "gpu.pt"
    with zipfile.ZipFile(gpu_file, "w", compression=zipfile.ZIP_STORED) as z:
        for info in infos:  # same names, order and (stored) compression; only data.pkl changes
            z.writestr(info, members[info.filename])
    with zipfile.ZipFile(gpu_file) as z:
        for info in infos:
            if info.filename != pkl[0]:
                assert z.read(info.filename) == members[info.filename]
            assert z.getinfo(info.filename).compress_type == zipfile.ZIP_STORED

    if not torch.cuda.is_available():
        # the file really says cuda: torch without map_location cannot place it here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(gpu_file, weights_only=True)
    ck = load_checkpoint(gpu_file, MLP_SPEC)
    assert ck.info.format == "torch-zip"
    assert_same_state(ck.model, rand_mlp.state_dict())


# ---------------------------------------------------------------------------------------------
# An arch spec read from a file never picks code to import or weights to download


def test_user_code_spec_in_metadata_is_refused_without_running_it(tmp_path, rand_mlp, monkeypatch):
    import importlib

    marker = tmp_path / "X"
    spec = f"os:system(command='touch {marker}')"
    p = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in rand_mlp.state_dict().items()}, str(p), metadata={ARCH_KEY: spec})

    imported = []
    real_import = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a, **k: imported.append(name) or real_import(name, *a, **k))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    assert not marker.exists()
    assert "os" not in imported
    msg = str(e.value)
    assert msg.startswith(f"{p}: its {ARCH_KEY} metadata names architecture {spec}, which would import code "
                          "named by a file; deadscan never does that: pass --arch ")
    # the suggested command is valid shell: the spec comes back as one argument
    import shlex

    suggestion = msg.split("deadscan never does that: pass ", 1)[1].removesuffix(" yourself if you trust it")
    assert shlex.split(suggestion) == ["--arch", spec]


def test_download_spec_in_metadata_is_refused(tmp_path, rand_mlp):
    p = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in rand_mlp.state_dict().items()}, str(p),
              metadata={ARCH_KEY: "torchvision:resnet18(weights='DEFAULT')"})
    with pytest.raises(CheckpointError, match=r"whose argument weights= would make the builder read a file or "
                                              r"download; deadscan loads weights only from your checkpoint"):
        load_checkpoint(p)


# ---------------------------------------------------------------------------------------------
# Arch spec parsing


def test_parse_spec():
    s = parse_spec("mlp(depth=2, width=8)")
    assert s == ArchSpec("mlp", {"depth": 2, "width": 8})
    assert str(s) == "mlp(depth=2, width=8)"
    assert parse_spec("  vit-relu ") == ArchSpec("vit-relu", {})
    assert parse_spec("torchvision:resnet18(num_classes=10)") == ArchSpec("torchvision:resnet18", {"num_classes": 10})
    t = parse_spec("pkg.models:build(sizes=(1, 2), name='x', act=None)")
    assert t.kwargs == {"sizes": (1, 2), "name": "x", "act": None}
    assert t.runs_user_code and not s.runs_user_code and not parse_spec("timm:vit_tiny").runs_user_code
    assert parse_spec(str(t)) == t


@pytest.mark.parametrize("text", [
    "", "(depth=2)", "my mlp", "mlp(depth=2", "mlp(2)", "mlp(**kw)", "mlp(depth=x)",
    "mlp(depth=__import__('os').system('true'))", "mlp(depth=2,,)",
])
def test_bad_specs_raise_arch_error(text):
    with pytest.raises(ArchError, match=r"bad --arch spec"):
        parse_spec(text)


@pytest.mark.parametrize("spec, key", [
    ("torchvision:resnet18(weights='DEFAULT')", "weights"),
    ("torchvision:resnet18(weights='IMAGENET1K_V1', num_classes=10)", "weights"),
])
def test_torchvision_pretrained_weights_are_refused(spec, key, monkeypatch):
    import torch.hub

    def no_download(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    with pytest.raises(ArchError) as e:
        build(spec)
    assert str(e.value) == (
        f"torchvision:resnet18: {key}= would download weights; deadscan loads weights from your checkpoint"
    )


def test_torchvision_without_weights_builds():
    m = build("torchvision:resnet18(num_classes=10)")
    assert m.fc.out_features == 10


def test_user_code_refused_when_not_allowed():
    with pytest.raises(ArchError, match="deadscan does not import code named by a file"):
        build("os:system(command='true')", allow_user_code=False)


def test_save_and_load_safetensors_are_a_pair(tmp_path, hand_mlp, mlp_spec):
    path = tmp_path / "m.safetensors"
    deadscan.save_safetensors(hand_mlp, path, mlp_spec)
    back = deadscan.load_safetensors(path)
    assert all(torch.equal(a, b) for a, b in zip(hand_mlp.state_dict().values(), back.state_dict().values()))
    assert list(back.state_dict()) == list(hand_mlp.state_dict())
    torch.save(hand_mlp.state_dict(), tmp_path / "m.pt")
    with pytest.raises(deadscan.CheckpointError, match=r"m\.pt: a torch-zip checkpoint, not safetensors; use "
                                                       r"deadscan\.load"):
        deadscan.load_safetensors(tmp_path / "m.pt", mlp_spec)
