"""Language models on CUDA (issue 14): a bf16 folder scans in bf16 on the GPU, and ``--device-map`` places a
model's layers over the GPU, CPU memory and disk with the plain GPU scan's result. Marked ``gpu``: skipped where
CUDA is not available (the CPU side of both is tests/test_tokens.py and tests/test_device_map.py)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from click.testing import CliRunner  # noqa: E402

import deadscan  # noqa: E402
from deadscan.cli import main  # noqa: E402
from deadscan.data import load_data  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_hf import CONFIGS  # noqa: E402
from test_tokens import PLANTED, _ffn_sites, _folder, _oracle, _plant, _tokens_file  # noqa: E402

DECODER = "model.decoder"
# every kind of place: the GPU, CPU memory (weights moved to the GPU as the layer runs) and disk
MIXED = {f"{DECODER}.embed_tokens": 0, "lm_head": 0, f"{DECODER}.embed_positions": 0, f"{DECODER}.layers.0": 0,
         f"{DECODER}.layers.1": "disk", f"{DECODER}.final_layer_norm": "cpu"}


def _inspect(*args) -> dict:
    res = CliRunner().invoke(main, ["inspect", *map(str, args)])
    assert res.exit_code == 0, res.output
    out = args[list(args).index("--out") + 1]
    return json.loads((out / "summary.json").read_text())


def test_a_bf16_folder_scans_in_bf16_on_cuda(tmp_path):
    torch.manual_seed(0)
    model = _plant(transformers.OPTForCausalLM(CONFIGS["OPTForCausalLM"]()), "OPTForCausalLM").to(torch.bfloat16)
    folder = tmp_path / "opt-bf16"
    model.save_pretrained(folder)
    data = _tokens_file(tmp_path)
    summary = _inspect(folder, "--data", data, "--device", "cuda", "--batch-size", 8, "--out", tmp_path / "run")
    assert (summary["checkpoint"]["dtype"], summary["scan_dtype"]) == ("bfloat16", "bfloat16")
    acts = [a for a, _, _ in _ffn_sites("OPTForCausalLM")]
    loaded = deadscan.load(str(folder)).to("cuda")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    counts = _oracle(loaded, load_data(str(data), "val"), acts, device="cuda")  # hooks, in bf16 on CUDA
    sites = {s["name"]: s for s in summary["sites"]}
    for act in acts:
        assert sites[act]["dead_indices"] == np.flatnonzero(counts[act] == 0).tolist()
        assert set(PLANTED) <= set(sites[act]["dead_indices"])


@pytest.mark.parametrize("device_map, max_memory", [("auto", None), (json.dumps(MIXED), None)],
                         ids=["all-on-the-gpu", "gpu-cpu-disk"])
def test_device_map_with_a_gpu_equals_the_plain_gpu_scan(tmp_path, device_map, max_memory):
    opt, data = _folder(tmp_path, "OPTForCausalLM", shard="4KB"), _tokens_file(tmp_path)
    plain = _inspect(opt, "--data", data, "--split", "all", "--device", "cuda", "--out", tmp_path / "plain")
    placed = _inspect(opt, "--data", data, "--split", "all", "--device-map", device_map, "--out", tmp_path / "map",
                      *(["--max-memory", max_memory] if max_memory else []))
    # every layer runs on the GPU in both (offloaded weights are brought there): the same arithmetic
    assert placed["sites"] == plain["sites"] and placed["totals"] == plain["totals"]
    expected = {"": "cuda:0"} if device_map == "auto" else {k: f"cuda:{v}" if v == 0 else v for k, v in MIXED.items()}
    assert placed["device_map"] == expected
    for site in placed["sites"]:
        assert set(PLANTED) <= set(site["dead_indices"])
