"""`reshard synth`: real models' exact names, shapes and files, with seeded values.

Oracles: the published parameter counts of the three presets, transformers loading a
written checkpoint strictly (every name and shape its own model expects), safetensors
and the index for the files.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers_cli import one_error_line, reshard_cmd
from safetensors import safe_open

from reshard.synth import PRESETS, hf_tensors, preset, synth_bytes, write_synth

transformers = pytest.importorskip("transformers")

# Total parameters as each model card states them.
PUBLISHED = {
    "deepseek-v3": 671e9,  # the main model; the card's 685B adds the MTP module's 14B
    "qwen3-30b-a3b": 30.5e9,
    "qwen3-30b-a3b-fp8": 30.5e9,
    "qwen3-235b-a22b": 235e9,
    "mixtral-8x7b": 46.7e9,
}
# transformers loads FP8 checkpoints only on a GPU (or with accelerate, to dequantize them):
# the FP8 preset is checked in tests/test_fp8.py.
UNQUANTIZED = [like for like in sorted(PRESETS) if "quantization_config" not in PRESETS[like][0]]


@pytest.mark.parametrize("like", sorted(PRESETS))
def test_presets_have_the_published_parameter_count(like):
    config, _ = preset(like)
    total = sum(math.prod(s) for s in hf_tensors(config, torch.bfloat16).values())
    assert abs(total - PUBLISHED[like]) / PUBLISHED[like] < 0.01, total


@pytest.mark.parametrize("like", UNQUANTIZED)
def test_names_are_the_families_checkpoint_names(like):
    config, _ = preset(like, layers=2)
    names = hf_tensors(config, torch.bfloat16)
    experts = config.get("num_experts") or config["num_local_experts"]
    if config["model_type"] == "mixtral":
        assert f"model.layers.1.block_sparse_moe.experts.{experts - 1}.w2.weight" in names
        assert "model.layers.1.block_sparse_moe.gate.weight" in names
    else:
        assert f"model.layers.1.mlp.experts.{experts - 1}.down_proj.weight" in names
        assert "model.layers.1.self_attn.q_norm.weight" in names
    assert not [n for n in names if "layers.2." in n]
    assert synth_bytes(config, torch.bfloat16) == 2 * sum(math.prod(s) for s in names.values())


def _small(like: str) -> dict:
    """The preset with every size cut down (names and structure kept) for a fast write."""
    config, _ = preset(like, layers=2)
    config.update(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    config.update(intermediate_size=96, max_position_embeddings=256)
    if config["model_type"] == "qwen3_moe":
        config.update(head_dim=16, moe_intermediate_size=32, num_experts=8)
    return config


@pytest.mark.parametrize("like", UNQUANTIZED)
def test_transformers_loads_what_synth_writes(like, tmp_path):
    config = _small(like)
    written = write_synth(tmp_path, config, max_shard_size="100KB", seed=3)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == files
    assert index["metadata"]["total_size"] == written
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    assert model.dtype == torch.bfloat16
    with safe_open(str(tmp_path / files[0]), "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name).float()
            if t.ndim == 1:
                assert torch.equal(t, torch.ones_like(t)), name
            elif t.numel() > 1000:
                assert 0.015 < t.std().item() < 0.025, name


def test_same_seed_same_bytes_other_seed_other_values(tmp_path):
    config = _small("qwen3-30b-a3b")
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_synth(tmp_path / name, config, seed=seed)
    a, b, c = ((tmp_path / n / "model.safetensors").read_bytes() for n in "abc")
    assert a == b and a != c


def test_cli_writes_a_real_size_layer_and_convert_plans_it(tmp_path):
    out = tmp_path / "q3"
    result = subprocess.run(
        [*reshard_cmd(), "synth", "--like", "qwen3-30b-a3b", "--layers", "1", "--out", str(out), "-q"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "wrote qwen3-30b-a3b with 1 layers (2.5 GB)" in result.stdout
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert tuple(
            f.get_slice("model.layers.0.mlp.experts.127.gate_proj.weight").get_shape()
        ) == (
            768,
            2048,
        )
        assert (
            len(f.keys()) == 3 * 128 + 12
        )  # q k v o, 2 qk-norms, router, 2 norms; embed, norm, head
    plan = subprocess.run(
        [*reshard_cmd(), "plan", "--src", str(out), "--layout", "ep4tp4"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert plan.returncode == 0, plan.stderr
    shutil.rmtree(out)


@pytest.mark.parametrize(
    "args, what",
    [
        (("--like", "qwen3-30b-a3b", "--layers", "49"), "--layers 49: qwen3-30b-a3b has 1 to 48"),
        (("--like", "qwen3-30b-a3b", "--layers", "1"), "not an empty directory"),
    ],
)
def test_cli_errors_are_one_line(args, what, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    if "not an empty" in what:
        (out / "mine.txt").write_text("keep")
    result = subprocess.run(
        [*reshard_cmd(), "synth", *args, "--out", str(out)], capture_output=True, text=True
    )
    one_error_line(result.returncode, result.stderr, what)
    assert Path(out).is_dir()


def test_cli_offers_every_preset():
    """The CLI lists the presets itself (so `--help` imports no torch): the lists must agree."""
    from reshard.cli import synth

    (like,) = [p for p in synth.params if p.name == "like"]
    assert sorted(like.type.choices) == sorted(PRESETS)
