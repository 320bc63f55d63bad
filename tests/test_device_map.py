"""inspect --device-map / --max-memory (issue 14): a model's layers placed over CPU memory and disk by accelerate's
big-model inference, on CPU. A tiny OPT folder with planted dead neurons and the hand-built MLP are scanned
dispatched and plain: summary.json's sites and totals are equal field for field (dead indices, counts, %A),
the device map used is recorded, the offload folder is removed; bad specs give one exact Error line each."""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from click.testing import CliRunner  # noqa: E402

from deadscan.cli import main  # noqa: E402
from deadscan.devmap import (DeviceMap, DeviceMapError, MAP_FORMS, MEMORY_FORMS, SIZE_FORMS,  # noqa: E402
                             check_run, dispatch)
from deadscan.errors import DataError  # noqa: E402
from deadscan.scan import scan  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from conftest import _hand_mlp  # noqa: E402
from test_tokens import PLANTED, _folder, _tokens_file  # noqa: E402

DECODER = "model.decoder"
# the tiny OPT (fp32): embed_tokens 4096 B (tied to lm_head), embed_positions 4224 B, each layer 8896 B
AUTO_20KB = {f"{DECODER}.embed_tokens": "cpu", "lm_head": "cpu", f"{DECODER}.embed_positions": "cpu",
             f"{DECODER}.final_layer_norm": "cpu", f"{DECODER}.layers": "disk"}
EXPLICIT = {f"{DECODER}.embed_tokens": "cpu", f"{DECODER}.embed_positions": "cpu", f"{DECODER}.layers.0": "disk",
            f"{DECODER}.layers.1": "cpu", f"{DECODER}.final_layer_norm": "cpu", "lm_head": "cpu"}
LAYER_TENSORS = sorted(f"{p}.{w}.dat" for p in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj",
                                                 "self_attn.out_proj", "self_attn_layer_norm", "fc1", "fc2",
                                                 "final_layer_norm") for w in ("weight", "bias"))


def _run(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    err = [line for line in (res.stderr if res.stderr_bytes is not None else res.output).splitlines()
           if line.startswith("Error:")]
    return res, err


def _ok(*args, said: str | None = None) -> dict:
    res, err = _run(*args)
    assert res.exit_code == 0 and not err, res.output
    if said is not None:
        assert said in res.output.splitlines(), res.output
    out = args[args.index("--out") + 1]
    return json.loads((out / "summary.json").read_text())


def _one_error(*args) -> str:
    res, err = _run(*args)
    assert res.exit_code == 1 and len(err) == 1, res.output
    assert "Traceback" not in res.output
    return err[0]


@pytest.fixture
def opt(tmp_path):
    return _folder(tmp_path, "OPTForCausalLM", shard="4KB")  # sharded: memory-mapped shards, as big models come


@pytest.fixture
def tokens(tmp_path):
    return _tokens_file(tmp_path)


@pytest.fixture
def offloads(tmp_path, monkeypatch):
    """Every dispatch's offload folder listed right after dispatch_model wrote it; temp files go to tmp/."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    seen = []
    original = accelerate.dispatch_model

    def spy(model, device_map, **kw):
        out = original(model, device_map, **kw)
        folder, index = kw.get("offload_dir"), kw.get("offload_index") or {}
        read = {k: (os.path.basename(v["safetensors_file"]), v["weight_name"]) for k, v in index.items()
                if "safetensors_file" in v}
        seen.append((folder, sorted(os.listdir(folder)) if folder else None, read))
        return out
    monkeypatch.setattr(accelerate, "dispatch_model", spy)
    return tmp, seen


def _layer_keys(*layers) -> list[str]:
    return sorted(f"{DECODER}.layers.{i}.{t.removesuffix('.dat')}" for i in layers for t in LAYER_TENSORS)


def _same_scan(plain: dict, placed: dict) -> None:
    assert placed["sites"] == plain["sites"]  # every field: dead indices, counts, %A, provably dead
    assert placed["totals"] == plain["totals"]
    assert placed["data"] == plain["data"] and placed["checkpoint"] == plain["checkpoint"]


def _plain(tmp_path, checkpoint, data, *extra) -> dict:
    return _ok("inspect", checkpoint, "--data", data, "--out", tmp_path / "plain", *extra)


# ---------------------------------------------------------------------------------------------
# Dispatched scans equal plain ones


def test_max_memory_offloads_layers_to_disk(tmp_path, opt, tokens, offloads):
    tmp, seen = offloads
    plain = _plain(tmp_path, opt, tokens, "--split", "all")
    placed = _ok("inspect", opt, "--data", tokens, "--split", "all", "--out", tmp_path / "auto",
                 "--device-map", "auto", "--max-memory", "cpu=20KB",
                 said="device map: cpu: 4 modules; disk: model.decoder.layers (all in summary.json)")
    _same_scan(plain, placed)
    assert placed["device_map"] == AUTO_20KB and "device_map" not in plain
    for i in (0, 1):
        site = {s["name"]: s for s in placed["sites"]}[f"{DECODER}.layers.{i}.activation_fn"]
        assert site["neurons"] == 32 and set(PLANTED) <= set(site["dead_indices"])
    [(folder, files, read)] = seen  # both decoder layers' tensors read from the folder's shards, none copied...
    assert files == [] and sorted(read) == _layer_keys(0, 1)
    assert {k: n for k, (_, n) in read.items()} == {k: k for k in read}
    assert {shard for shard, _ in read.values()} <= {p.name for p in opt.glob("model-*.safetensors")}
    assert os.path.dirname(folder) == str(tmp) and os.listdir(tmp) == []  # ...and the offload folder is gone


def test_nothing_fits_everything_from_disk(tmp_path, opt, tokens):
    plain = _plain(tmp_path, opt, tokens, "--split", "all")
    placed = _ok("inspect", opt, "--data", tokens, "--split", "all", "--out", tmp_path / "disk",
                 "--device-map", "auto", "--max-memory", "cpu=5KB", said="device map: disk: model, lm_head (all in "
                 "summary.json)")
    _same_scan(plain, placed)
    assert placed["device_map"] == {"model": "disk", "lm_head": "disk"}


@pytest.mark.parametrize("name, share", [("GPT2LMHeadModel", 0.6), ("BertForMaskedLM", 0.3),
                                         ("T5ForConditionalGeneration", 0.6), ("LlamaForCausalLM", 0.6)])
def test_other_families(tmp_path, tokens, name, share):
    """T5's ReLU modules sit in traced parts whose graphs read an offloaded norm weight directly: watched by
    module hooks instead, the scan is the plain one."""
    folder = _folder(tmp_path, name)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    plain = _plain(tmp_path, folder, tokens, "--split", "all")
    placed = _ok("inspect", folder, "--data", tokens, "--split", "all", "--out", tmp_path / "seq",
                 "--device-map", "sequential", "--max-memory", f"cpu={int(size * share)}")
    _same_scan(plain, placed)
    assert "disk" in placed["device_map"].values()
    assert "cpu" in placed["device_map"].values() or name == "BertForMaskedLM"  # BERT: all of it


def test_accelerate_cannot_infer_a_map(tmp_path, opt, tokens, monkeypatch):
    """accelerate 1.16's infer_auto_device_map fails so on BERT's tied decoder within some --max-memory."""
    def fails(*args, **kwargs):
        raise IndexError("list index out of range")
    monkeypatch.setattr(accelerate, "infer_auto_device_map", fails)
    assert _one_error("inspect", opt, "--data", tokens, "--out", tmp_path / "o", "--device-map", "sequential",
                      "--max-memory", "cpu=20KB") == (
        "Error: --device-map sequential: accelerate cannot infer a device map for this model (IndexError: list "
        "index out of range); try another --max-memory or name each module's device in a JSON map")


@pytest.mark.parametrize("mode", ["sequential", "balanced", "balanced_low_0"])
def test_modes_within_max_memory(tmp_path, opt, tokens, mode):
    """Without GPUs the balanced modes balance nothing: the map auto gives (20 KB = 20000 bytes, as JSON)."""
    plain = _plain(tmp_path, opt, tokens, "--split", "all")
    placed = _ok("inspect", opt, "--data", tokens, "--split", "all", "--out", tmp_path / "seq",
                 "--device-map", mode, "--max-memory", '{"cpu": 20000}')
    _same_scan(plain, placed)
    assert placed["device_map"] == AUTO_20KB


def test_json_map_names_layers(tmp_path, opt, tokens, offloads):
    tmp, seen = offloads
    plain = _plain(tmp_path, opt, tokens, "--split", "all")
    placed = _ok("inspect", opt, "--data", tokens, "--split", "all", "--out", tmp_path / "json",
                 "--device-map", json.dumps(EXPLICIT))
    _same_scan(plain, placed)
    assert placed["device_map"] == EXPLICIT
    assert seen[0][1] == [] and sorted(seen[0][2]) == _layer_keys(0)
    path = tmp_path / "map.json"  # the same map from a file
    path.write_text(json.dumps({**EXPLICIT, f"{DECODER}.layers.1": "disk"}))
    placed = _ok("inspect", opt, "--data", tokens, "--split", "all", "--out", tmp_path / "file",
                 "--device-map", path)
    _same_scan(plain, placed)
    assert placed["device_map"] == {**EXPLICIT, f"{DECODER}.layers.1": "disk"} and os.listdir(tmp) == []


@pytest.mark.parametrize("change", [
    {f"{DECODER}.embed_tokens": "disk"},  # the first parameters offloaded: the example forward finding the
    {f"{DECODER}.embed_tokens": "disk", "lm_head": "disk"},  # feeding layers still runs (tied to lm_head too)
    {f"{DECODER}.embed_positions": "disk", f"{DECODER}.final_layer_norm": "disk"},
    {f"{DECODER}.layers.0.fc1": "disk"},  # a feeding layer alone, inside a transformer block
])
def test_maps_offloading_other_modules(tmp_path, opt, tokens, change):
    plain = _plain(tmp_path, opt, tokens, "--split", "all")
    layers = {**EXPLICIT, f"{DECODER}.layers.0": "cpu", **change}
    if f"{DECODER}.layers.0.fc1" in change:
        layers = {k: v for k, v in layers.items() if k != f"{DECODER}.layers.0"}
        layers.update({f"{DECODER}.layers.0.{m}": "cpu" for m in ("self_attn", "self_attn_layer_norm", "fc2",
                                                                    "final_layer_norm", "activation_fn")})
    placed = _ok("inspect", opt, "--data", tokens, "--split", "all", "--out", tmp_path / "o",
                 "--device-map", json.dumps(layers))
    _same_scan(plain, placed)
    assert placed["device_map"] == layers
    site = placed["sites"][0]
    assert site["feeding_layer"] == f"{DECODER}.layers.0.fc1" and site["consumer_layer"] == f"{DECODER}.layers.0.fc2"


def test_plain_module_checkpoint(tmp_path, mlp_file, npz_data, offloads):
    """The hand-built MLP: fc2 (whose rows 0-2 are provably dead, read from its weights) offloaded to disk,
    written to the offload folder (a plain checkpoint is no Hugging Face folder to read it from)."""
    tmp, seen = offloads
    plain = _plain(tmp_path, mlp_file, npz_data)
    layers = {"flatten": "cpu", "fc1": "cpu", "relu1": "cpu", "fc2": "disk", "relu2": "cpu", "head": "cpu"}
    placed = _ok("inspect", mlp_file, "--data", npz_data, "--out", tmp_path / "mlp", "--device-map", json.dumps(layers),
                 said="device map: cpu: 5 modules; disk: fc2 (all in summary.json)")
    _same_scan(plain, placed)
    assert placed["device_map"] == layers
    assert [s["dead_indices"] for s in placed["sites"]] == [[0, 1], [0, 1, 2]]
    assert placed["totals"]["provably_dead"] == 3 and placed["totals"]["active_percent"] == 58.8235
    assert seen[0][1:] == (["fc2.bias.dat", "fc2.weight.dat"], {}) and os.listdir(tmp) == []


def test_library_scan_of_a_dispatched_model():
    """scan() on a dispatched model: inputs to its input device, the model not moved, offloaded weights read for
    provably dead neurons; restore() puts back the very tensors loaded and removes every hook."""
    model = _hand_mlp()
    x = torch.rand(64, 4, generator=torch.Generator().manual_seed(0))
    ref = scan(model, x, device="cpu", input_means=True)
    loaded = {n: p for n, p in model.named_parameters()}
    spec = DeviceMap(None, (("flatten", "cpu"), ("fc1", "disk"), ("relu1", "cpu"), ("fc2", "disk"),
                            ("relu2", "cpu"), ("head", "cpu")))
    with dispatch(model, spec) as placed:
        assert model.fc2.weight.is_meta and placed.input_device == torch.device("cpu")
        got = scan(model, x, device=placed.input_device, input_means=True)
    for a, b in zip(ref.sites, got.sites):
        assert b.dead_indices == a.dead_indices and np.array_equal(b.active, a.active)
        np.testing.assert_allclose(b.out_sum, a.out_sum, rtol=1e-6)
        np.testing.assert_allclose(b.mean_input, a.mean_input, rtol=1e-6)
        assert np.array_equal(b.provably_dead, a.provably_dead)
    assert got.sites[1].provably_dead.tolist() == [True] * 3 + [False] * 5
    assert all(p is loaded[n] for n, p in model.named_parameters())
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())


class _Block(nn.Module):
    """A functional relu on ``fc(x) * scale``: fx traces through, its graph reads ``scale`` directly."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.scale = nn.Parameter(torch.linspace(-1, 1, 8))
        with torch.no_grad():
            self.fc.bias[5:] = -100.0  # neurons 5-7 dead (their scale is positive)

    def forward(self, x):
        return F.relu(self.fc(x) * self.scale)


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = _Block()
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.block(x))


def test_traced_functional_site():
    """A functional relu is recorded in the traced graph: fine while what it reads directly stays in memory,
    refused (one line) when that is offloaded."""
    model = _Outer().eval()
    x = torch.rand(32, 4, generator=torch.Generator().manual_seed(1))
    ref = scan(model, x, device="cpu")
    spec = DeviceMap(None, (("block", "cpu"), ("out", "disk")))
    with dispatch(model, spec) as placed:
        assert [(s.name, s.hooked) for s in placed.sitemap.sites] == [("block:relu", False)]
        got = scan(model, x, sitemap=placed.sitemap, device=placed.input_device)
    assert got.sites[0].dead_indices == ref.sites[0].dead_indices == [5, 6, 7]
    np.testing.assert_allclose(got.sites[0].out_sum, ref.sites[0].out_sum, rtol=1e-6)
    spec = DeviceMap(None, (("block", "disk"), ("out", "cpu")))
    with pytest.raises(DeviceMapError) as e:
        dispatch(model, spec)
    assert not any(hasattr(m, "_hf_hook") for m in model.modules()) and not model.block.scale.is_meta
    assert str(e.value) == ("--device-map a device map of 2 modules: site block:relu is recorded by running the "
                            "model's traced forward in its place, which reads the offloaded tensor block.scale "
                            "directly: keep the module holding it off the disk (and off cpu offload)")


# ---------------------------------------------------------------------------------------------
# One Error line each


@pytest.mark.parametrize("args, message", [
    (["--device-map", "auto", "--max-memory", "cpu=2XB"],
     f"--max-memory 'cpu=2XB': size '2XB' of cpu is not a size; accepted: {SIZE_FORMS}"),
    (["--device-map", "auto", "--max-memory", "cpu"],
     f"--max-memory 'cpu': 'cpu' is not KEY=SIZE; accepted: {MEMORY_FORMS}"),
    (["--device-map", "auto", "--max-memory", "gpu=1GB"],
     f"--max-memory 'gpu=1GB': device 'gpu': 'gpu' is not a device; accepted: {MEMORY_FORMS}"),
    (["--device-map", "auto", "--max-memory", "cpu=1GB,cpu=2GB"],
     "--max-memory 'cpu=1GB,cpu=2GB': device 'cpu' is given twice"),
    (["--device-map", "auto", "--max-memory", '{"0": '],
     f"--max-memory: not valid JSON (Expecting value: line 1 column 6 (char 5)); accepted: {MEMORY_FORMS}"),
    (["--device-map", "auto", "--max-memory", '["cpu"]'],
     f"--max-memory: a JSON list, not an object; accepted: {MEMORY_FORMS}"),
    (["--device-map", "everywhere"], f"--device-map 'everywhere': not a mode or a device map; accepted: {MAP_FORMS}"),
    (["--device-map", '{"lm_head": "tpu"}'],
     f"--device-map: module 'lm_head': 'tpu' is not a device; accepted: {MAP_FORMS}"),
    (["--device-map", "{}"], f"--device-map: an empty device map; accepted: {MAP_FORMS}"),
    (["--max-memory", "cpu=1GB"],
     "--max-memory applies with --device-map: add --device-map auto (or balanced, sequential)"),
    (["--device-map", '{"": "cpu"}', "--max-memory", "cpu=1GB"],
     "--max-memory applies to --device-map auto, balanced, balanced_low_0 or sequential (accelerate fills the "
     "devices within it); a device map naming every module's device takes no --max-memory: drop one of them"),
    (["--device-map", "auto", "--device", "cpu"],
     "--device cpu and --device-map auto: choose one (the device map places the layers; inputs go to the device "
     "of the first layer on an accelerator)"),
])
def test_bad_options(tmp_path, opt, tokens, args, message):
    assert _one_error("inspect", opt, "--data", tokens, "--out", tmp_path / "o", *args) == f"Error: {message}"
    assert not (tmp_path / "o").exists()


def test_bad_maps_for_the_model(tmp_path, opt, tokens):
    def error(*args):
        return _one_error("inspect", opt, "--data", tokens, "--out", tmp_path / "o", "--overwrite", *args)

    assert error("--device-map", json.dumps({**EXPLICIT, f"{DECODER}.layers.9": "cpu"})) == (
        f"Error: --device-map: the model has no module '{DECODER}.layers.9' (its top-level modules: model, lm_head; "
        "\"\" is the whole model)")
    assert error("--device-map", json.dumps({f"{DECODER}.layers": "disk", "lm_head": "cpu"})) == (
        "Error: --device-map: no device for 4 of the model's tensors (e.g. model.decoder.embed_tokens.weight); "
        "name a device for every module holding parameters, or a module above them")
    if not torch.cuda.is_available():
        assert error("--device-map", json.dumps({**EXPLICIT, "lm_head": "cuda:1"})) == (
            "Error: --device-map names GPU 1 but this machine has no CUDA GPU; name only the devices it has (cpu, "
            "disk)")
        assert error("--device-map", "sequential", "--max-memory", "0=1GiB,cpu=1GiB") == (
            "Error: --max-memory names GPU 0 but this machine has no CUDA GPU; name only the devices it has (cpu)")
    if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        assert error("--device-map", "auto", "--max-memory", "mps=1GiB") == (
            "Error: --max-memory names mps but Apple's MPS is not available on this machine")
    assert error("--device-map", str(tmp_path / "missing.json")) == (
        f"Error: --device-map {tmp_path / 'missing.json'}: cannot read the device map file "
        f"({tmp_path / 'missing.json'}: no such file)")


def test_accelerate_missing(tmp_path, opt, tokens, monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate raises ImportError
    assert _one_error("inspect", opt, "--data", tokens, "--out", tmp_path / "o", "--device-map", "auto") == (
        "Error: --device-map needs accelerate, which is not installed: pip install 'deadscan[hf]'")


def test_strip_refuses_a_device_map(tmp_path, opt, tokens):
    assert _one_error("strip", opt, "--data", tokens, "--out", tmp_path / "s", "--device-map", "auto") == (
        "Error: --device-map auto: strip fine-tunes the model on one device; fine-tuning a model dispatched over "
        "several devices is not supported: find its dead neurons with deadscan inspect --device-map")


def test_torchrun_refused():
    with pytest.raises(DeviceMapError) as e:
        check_run(DeviceMap("balanced"), None, 2)
    assert str(e.value) == ("--device-map under torchrun is not supported: run deadscan inspect --device-map in one "
                            "process (it places the layers over every GPU itself)")


def test_help_lists_the_options():
    res = CliRunner().invoke(main, ["inspect", "--help"])
    assert res.exit_code == 0 and "--device-map MAP" in res.output and "--max-memory SPEC" in res.output


def test_summary_with_a_device_map_reads_back(tmp_path, mlp_file, npz_data):
    from deadscan.runfolder import read_summary

    layers = {"": "cpu"}
    _ok("inspect", mlp_file, "--data", npz_data, "--out", tmp_path / "one", "--device-map", json.dumps(layers))
    assert read_summary(tmp_path / "one")["device_map"] == layers
    (tmp_path / "bad").mkdir()
    s = json.loads((tmp_path / "one" / "summary.json").read_text())
    (tmp_path / "bad" / "summary.json").write_text(json.dumps({**s, "device_map": {"fc1": 0}}))
    with pytest.raises(DataError) as e:
        read_summary(tmp_path / "bad")
    assert str(e.value) == (f"{tmp_path / 'bad' / 'summary.json'}: not a deadscan summary (device_map.fc1 must be "
                            "a string, not int 0); damaged, edited or from another program")

