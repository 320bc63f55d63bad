"""Hugging Face model folders: tiny models built from configs (random init, no hub), saved whole and sharded,
loaded by deadscan and compared exactly with transformers' own ``from_pretrained``; bad folders give one
CheckpointError line each."""

from __future__ import annotations

import json
import re
import os
import shutil
import sys

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # never the hub: everything here is built locally
transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

import deadscan  # noqa: E402
from deadscan import hf  # noqa: E402
from deadscan.checkpoint import detect_format, load_checkpoint  # noqa: E402
from deadscan.cli import main  # noqa: E402
from deadscan.errors import CheckpointError  # noqa: E402

IDS = torch.tensor([[3, 7, 11, 20, 41, 5], [9, 4, 33, 12, 60, 2]])

CONFIGS = {
    "OPTForCausalLM": lambda: transformers.OPTConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=64),
    "BertForMaskedLM": lambda: transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, intermediate_size=32, num_attention_heads=2,
        max_position_embeddings=64, hidden_act="relu"),
    "GPT2LMHeadModel": lambda: transformers.GPT2Config(
        vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=64, activation_function="relu",
        bos_token_id=0, eos_token_id=0),
    "LlamaForCausalLM": lambda: transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, intermediate_size=32, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, hidden_act="relu"),
    "T5ForConditionalGeneration": lambda: transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, feed_forward_proj="relu"),
}


def _save(folder, name="OPTForCausalLM", shard=None, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = getattr(transformers, name)(CONFIGS[name]()).to(dtype)
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return folder


def _logits(model, name):
    extra = {"decoder_input_ids": IDS} if name.startswith("T5") else {}
    with torch.no_grad():
        return model(input_ids=IDS, **extra).logits


def _one_error(folder, *words):
    """The one-line CheckpointError loading ``folder`` gives (checked to hold ``words``)."""
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(folder)
    msg = str(e.value)
    assert "\n" not in msg and str(folder) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def _error_of(folder) -> str:
    """That error line with the folder's path written <F>, to compare whole lines."""
    return _one_error(folder).replace(str(folder), "<F>")


@pytest.fixture
def opt_folder(tmp_path):
    return _save(tmp_path / "opt")


@pytest.fixture
def sharded(tmp_path):
    folder = _save(tmp_path / "sharded", shard="20KB")
    assert (folder / hf.SAFETENSORS_INDEX).exists() and len(list(folder.glob("*.safetensors"))) > 1
    return folder


# ---------------------------------------------------------------------------------------------
# Loads equal transformers' own


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single", "sharded"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_load_equals_from_pretrained(tmp_path, name, shard):
    folder = _save(tmp_path / name, name, shard)
    ck = load_checkpoint(folder)
    ref = getattr(transformers, name).from_pretrained(folder).eval()
    assert type(ck.model) is type(ref) and not ck.model.training
    assert ck.info.format == ("hf-sharded" if shard else "hf-safetensors")
    assert ck.info.arch == f"hf:{name}" and ck.info.path == str(folder) and ck.info.dtype == "float32"
    mine, theirs = ck.model.state_dict(), ref.state_dict()
    assert list(mine) == list(theirs)
    for key in mine:
        assert mine[key].dtype == theirs[key].dtype and torch.equal(mine[key], theirs[key]), key
    # non-persistent buffers (rotary inv_freq, position_ids) made as transformers makes them
    bufs, ref_bufs = dict(ck.model.named_buffers()), dict(ref.named_buffers())
    assert bufs.keys() == ref_bufs.keys() and all(torch.equal(bufs[k], ref_bufs[k]) for k in bufs)
    assert not any(t.is_meta for t in [*ck.model.parameters(), *ck.model.buffers()])
    assert torch.equal(_logits(ck.model, name), _logits(ref, name))
    for target, source in ck.model.all_tied_weights_keys.items():  # tied stays tied: one tensor
        assert ck.model.get_parameter(target) is ck.model.get_parameter(source), (target, source)


def test_opt_head_tied_to_embeddings(sharded):
    model = deadscan.load(sharded)
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("name,dtype", [("LlamaForCausalLM", torch.bfloat16), ("OPTForCausalLM", torch.float16)])
def test_half_precision_loads_in_its_dtype(tmp_path, name, dtype):
    folder = _save(tmp_path / "half", name, shard="8KB", dtype=dtype)
    ck = load_checkpoint(folder)
    ref = getattr(transformers, name).from_pretrained(folder).eval()
    assert ck.info.dtype == str(dtype).removeprefix("torch.") and ck.info.format == "hf-sharded"
    assert all(p.dtype == dtype for p in ck.model.parameters())
    assert torch.equal(_logits(ck.model, name), _logits(ref, name))


def test_pytorch_model_bin(tmp_path, opt_folder):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(opt_folder / hf.CONFIG, folder / hf.CONFIG)
    ref = transformers.OPTForCausalLM.from_pretrained(opt_folder).eval()
    torch.save({k: v.clone() for k, v in ref.state_dict().items() if k != "lm_head.weight"}, folder / hf.BIN)
    ck = load_checkpoint(folder)
    assert ck.info.format == "hf-bin"
    assert torch.equal(_logits(ck.model, "OPTForCausalLM"), _logits(ref, "OPTForCausalLM"))
    assert ck.model.lm_head.weight is ck.model.model.decoder.embed_tokens.weight


def test_sharded_pytorch_model_bin(tmp_path, opt_folder):
    folder = tmp_path / "binshards"
    folder.mkdir()
    shutil.copy(opt_folder / hf.CONFIG, folder / hf.CONFIG)
    ref = transformers.OPTForCausalLM.from_pretrained(opt_folder).eval()
    state = {k: v.clone() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: state[k] for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / hf.BIN_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ck = load_checkpoint(folder)
    assert ck.info.format == "hf-bin-sharded"
    assert torch.equal(_logits(ck.model, "OPTForCausalLM"), _logits(ref, "OPTForCausalLM"))


def test_hub_cache_snapshot(tmp_path, sharded):
    """huggingface_hub's cache links snapshots/<rev>/<name> to ../../blobs/<hash>: those links are followed."""
    repo = tmp_path / "models--tiny--opt"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(sharded.iterdir())):
        shutil.copy(f, repo / "blobs" / f"blob{i}")
        (snapshot / f.name).symlink_to(f"../../blobs/blob{i}")
    assert load_checkpoint(snapshot).info.sha256 == load_checkpoint(sharded).info.sha256


def test_weights_saved_from_the_base_model(tmp_path, opt_folder):
    """Keys without the head model's prefix (``decoder.layers...``, saved from OPTModel) load as
    from_pretrained loads them."""
    folder = tmp_path / "base"
    transformers.OPTModel.from_pretrained(opt_folder).save_pretrained(folder)
    config = json.loads((folder / hf.CONFIG).read_text())
    config["architectures"] = ["OPTForCausalLM"]
    (folder / hf.CONFIG).write_text(json.dumps(config))
    ck = load_checkpoint(folder)
    ref = transformers.OPTForCausalLM.from_pretrained(opt_folder).eval()
    assert torch.equal(_logits(ck.model, "OPTForCausalLM"), _logits(ref, "OPTForCausalLM"))


def test_manifest_is_stable_and_tells_saves_apart(tmp_path, opt_folder, sharded):
    single = load_checkpoint(opt_folder).info.sha256
    assert load_checkpoint(opt_folder).info.sha256 == single
    assert load_checkpoint(sharded).info.sha256 == load_checkpoint(sharded).info.sha256
    assert load_checkpoint(sharded).info.sha256 != single  # same weights, other files
    config = json.loads((opt_folder / hf.CONFIG).read_text())
    config["dropout"] = 0.2
    (opt_folder / hf.CONFIG).write_text(json.dumps(config))
    assert load_checkpoint(opt_folder).info.sha256 != single


def test_files_keep_todays_behaviour(tmp_path, mlp_file):
    assert detect_format(mlp_file) == "safetensors"
    empty = tmp_path / "plain"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        load_checkpoint(empty)


def test_arch_must_be_the_folders_own(opt_folder):
    assert load_checkpoint(opt_folder, "hf:OPTForCausalLM").info.arch == "hf:OPTForCausalLM"
    with pytest.raises(CheckpointError, match="drop --arch"):
        load_checkpoint(opt_folder, "torchvision:resnet18")


# ---------------------------------------------------------------------------------------------
# Bad folders: one line each


def test_no_weights(tmp_path, opt_folder):
    for f in opt_folder.glob("*.safetensors"):
        f.unlink()
    assert _error_of(opt_folder) == (
        "<F>: holds config.json but no weights (model.safetensors, model.safetensors.index.json, pytorch_model.bin "
        "or pytorch_model.bin.index.json); download or save the weights into the folder")


def _edit_config(folder, **changes):
    config = json.loads((folder / hf.CONFIG).read_text())
    config.update(changes)
    (folder / hf.CONFIG).write_text(json.dumps(config))


def test_remote_code_refused(opt_folder):
    _edit_config(opt_folder, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"},
                 architectures=["EvilForCausalLM"])
    (opt_folder / "modeling_evil.py").write_text("raise SystemExit('ran code from the folder')\n")
    assert _error_of(opt_folder) == (
        "<F>: config.json has an auto_map for EvilForCausalLM: model code shipped in the folder; deadscan never "
        "runs code from a model folder (no trust_remote_code): use a model whose class ships with transformers")


@pytest.mark.parametrize("name", ["EvilForCausalLM", "OPTConfig", "AutoModel", "os", "__builtins__"])
def test_unknown_architecture(opt_folder, name):
    _edit_config(opt_folder, architectures=[name])
    msg = _one_error(opt_folder, "never runs code from a model folder")
    assert name in msg


def test_index_walking_out_of_the_folder(sharded):
    index = json.loads((sharded / hf.SAFETENSORS_INDEX).read_text())
    first = next(iter(index["weight_map"]))
    for bad in ("../x.safetensors", "/etc/passwd", "sub/x.safetensors"):
        index["weight_map"][first] = bad
        (sharded / hf.SAFETENSORS_INDEX).write_text(json.dumps(index))
        assert _error_of(sharded) == (
            f"<F>: shard of model.safetensors.index.json {bad!r} is not a plain file name in the folder; damaged or "
            "crafted folder: re-save it with save_pretrained")


def test_link_out_of_the_folder(tmp_path, sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    outside = tmp_path / "outside.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    _one_error(sharded, "outside the folder")
    inside = sharded / "kept.bin"  # a link within the folder is fine
    shutil.move(outside, inside)
    shard.unlink()
    shard.symlink_to(inside.name)
    assert load_checkpoint(sharded).info.format == "hf-sharded"


def test_shard_missing(sharded):
    last = sorted(sharded.glob("model-*.safetensors"))[-1]
    last.unlink()
    assert _error_of(sharded) == (f"<F>: shard of model.safetensors.index.json {last.name} is missing; the folder "
                                  "is incomplete: download or save it again")


def test_index_disagrees_with_shards(sharded):
    index = json.loads((sharded / hf.SAFETENSORS_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][key] = shards[1]
    (sharded / hf.SAFETENSORS_INDEX).write_text(json.dumps(index))
    assert _error_of(sharded) == (
        f"<F>/model.safetensors.index.json: does not match its shards: {key} (in {shards[0]}, index says "
        f"{shards[1]}); damaged folder: re-save it")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("target", [hf.CONFIG, hf.SAFETENSORS_INDEX, "shard"])
def test_fifo_refused(sharded, target):
    if target == "shard":
        target = sorted(sharded.glob("model-*.safetensors"))[0].name
    (sharded / target).unlink()
    os.mkfifo(sharded / target)
    assert _error_of(sharded) == (f"<F>/{target}: not a regular file (a folder, pipe, socket or device); a model "
                                  "folder holds plain files")


def test_config_not_json(opt_folder):
    (opt_folder / hf.CONFIG).write_text("{not json")
    assert _error_of(opt_folder) == (
        "<F>/config.json: config.json is not valid JSON (Expecting property name enclosed in double quotes: line 1 "
        "column 2 (char 1)); damaged: re-save the folder")
    (opt_folder / hf.CONFIG).write_text("[1, 2]")
    assert _error_of(opt_folder) == ("<F>/config.json: config.json holds a JSON list, not an object; damaged: "
                                     "re-save the folder")


def test_config_too_big(opt_folder):
    with open(opt_folder / hf.CONFIG, "w") as f:
        f.write('{"pad": "' + "x" * (hf.MAX_CONFIG_BYTES + 1) + '"}')
    size = (opt_folder / hf.CONFIG).stat().st_size
    assert _error_of(opt_folder) == (f"<F>/config.json: config.json is {size} bytes, more than the "
                                     f"{hf.MAX_CONFIG_BYTES} deadscan reads; damaged or not a Hugging Face file")


def test_weights_that_do_not_fit(opt_folder):
    _edit_config(opt_folder, num_hidden_layers=3)
    assert _error_of(opt_folder).startswith("<F>: its weights do not fit OPTForCausalLM from its config.json: "
                                            "missing model.decoder.layers.2.")
    _edit_config(opt_folder, num_hidden_layers=2, ffn_dim=48)
    assert _error_of(opt_folder).startswith(
        "<F>: tensor shapes do not fit OPTForCausalLM from its config.json (file vs model): "
        "model.decoder.layers.0.fc1.bias (32,) vs (48,), model.decoder.layers.0.fc1.weight (32, 16) vs (48, 16)")


def test_config_far_bigger_than_its_weights(opt_folder):
    _edit_config(opt_folder, num_hidden_layers=10**7)  # stopped while built on the meta device
    assert re.fullmatch(r"<F>: config\.json builds a OPTForCausalLM which holds more than \d+ tensors / \d+ "
                        r"elements; the file has \d+ tensors / \d+ elements; damaged or crafted config",
                        _error_of(opt_folder))


def test_without_transformers(opt_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    assert _error_of(opt_folder) == "<F>: a Hugging Face model folder needs transformers: pip install 'deadscan[hf]'"


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_takes_a_folder(tmp_path, opt_folder):
    data = tmp_path / "x.npz"
    np.savez(data, x=np.zeros((4, 6), np.int64), y=np.zeros(4, np.int64))
    runner = CliRunner()
    res = runner.invoke(main, ["inspect", str(opt_folder), "--data", str(data), "--out", str(tmp_path / "out")])
    err = [line for line in (res.stderr or res.output).splitlines() if line.startswith("Error:")]
    assert res.exit_code != 0 or not err
    assert "is a folder, not a checkpoint file" not in (res.stderr + res.output)
    assert len(err) <= 1, res.stderr


def test_nan_check_in_slices(opt_folder):
    from deadscan.checkpoint import _all_finite

    t = torch.zeros(100)
    assert _all_finite(t, chunk=7)
    t[99] = float("nan")
    assert not _all_finite(t, chunk=7) and not _all_finite(t[::2].clone().fill_(float("inf")), chunk=7)
    assert _all_finite(t[:99], chunk=7)
