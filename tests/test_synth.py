"""`reshard synth`: real models' exact names, shapes and files, with seeded values.

Oracles: the published parameter counts of the presets, transformers loading a
written checkpoint strictly (every name and shape its own model expects), safetensors
and the index for the files, and the converters reading a quantized preset's tensors back
as its weights.
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

from reshard.convert import make_plan
from reshard.converters import fp8, mxfp4
from reshard.layout import Layout
from reshard.sources import open_source
from reshard.synth import PRESETS, hf_tensor_dtypes, hf_tensors, preset, synth_bytes, write_synth

transformers = pytest.importorskip("transformers")

# Total parameters as each model card states them, and how near our count must come.
PUBLISHED = {
    "deepseek-v3": (671e9, 0.01),  # the main model; the card's 685B adds the MTP module's 14B
    "kimi-k2": (1e12, 0.03),  # the card's "1T", rounded (1.026T)
    "gpt-oss-120b": (116.83e9, 0.001),
    "gpt-oss-20b": (20.91e9, 0.001),
    "qwen3-30b-a3b": (30.5e9, 0.01),
    "qwen3-30b-a3b-fp8": (30.5e9, 0.01),
    "qwen3-235b-a22b": (235e9, 0.01),
    "mixtral-8x7b": (46.7e9, 0.01),
}


def _method(like: str) -> str | None:
    return (PRESETS[like][0].get("quantization_config") or {}).get("quant_method")


def _unquantized(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "quantization_config"}


# transformers loads FP8 checkpoints only on a GPU (or with accelerate, to dequantize them):
# the FP8 presets are checked in tests/test_fp8.py. MXFP4 ones it dequantizes on the CPU.
UNQUANTIZED = [like for like in sorted(PRESETS) if _method(like) is None]
MXFP4 = [like for like in sorted(PRESETS) if _method(like) == "mxfp4"]
QUANTIZED = [like for like in sorted(PRESETS) if _method(like) is not None]


@pytest.mark.parametrize("like", sorted(PRESETS))
def test_presets_have_the_published_parameter_count(like):
    config, _ = preset(like)
    # the weights, not their packing (FP8 scales, MXFP4's two values a byte)
    total = sum(math.prod(s) for s in hf_tensors(_unquantized(config), torch.bfloat16).values())
    published, tolerance = PUBLISHED[like]
    assert abs(total - published) / published < tolerance, total


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


@pytest.mark.parametrize("like", QUANTIZED)
def test_quantized_presets_are_the_bf16_names_packed_as_the_converters_read_them(like):
    """FP8: each weight `T` of the bf16 checkpoint is float8 beside a float32 `T_scale_inv`.
    MXFP4: converters.mxfp4 reads the uint8 blocks and scales back as the bf16 checkpoint's
    expert weights (two a layer), leaving no uint8 tensor over."""
    config, _ = preset(like, layers=2)
    packed = hf_tensor_dtypes(config, torch.bfloat16)
    meta = {n: torch.empty(s, dtype=d, device="meta") for n, (s, d) in packed.items()}
    if _method(like) == "fp8":
        float8 = {n for n, t in meta.items() if t.dtype == torch.float8_e4m3fn}
        assert float8 == {n.removesuffix(fp8.SCALE) for n in meta if n.endswith(fp8.SCALE)}
        read = {n: t for n, t in meta.items() if not n.endswith(fp8.SCALE)}
    else:
        read = mxfp4.unpacked(meta)
        assert sum(isinstance(t, mxfp4.Packed) for t in read.values()) == 2 * 2
    assert {n: tuple(t.shape) for n, t in read.items()} == hf_tensors(
        _unquantized(config), torch.bfloat16
    )


def _small(like: str) -> dict:
    """The preset with every size cut down (names and structure kept) for a fast write."""
    config, _ = preset(like, layers=2)
    config.update(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    config.update(intermediate_size=96, max_position_embeddings=256)
    if config["model_type"] == "qwen3_moe":
        config.update(head_dim=16, moe_intermediate_size=32, num_experts=8)
    if config["model_type"] == "gpt_oss":  # experts' In dims: 2 and 4 MXFP4 blocks of 32
        config.update(head_dim=16, intermediate_size=128, num_local_experts=4)
        config.update(pad_token_id=0, eos_token_id=1)
    return config


@pytest.mark.parametrize("like", [*UNQUANTIZED, "gpt-oss-120b"])  # -20b shrinks alike
def test_transformers_loads_what_synth_writes(like, tmp_path):
    config = _small(like)
    written = write_synth(tmp_path, config, max_shard_size="100KB", seed=3)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == files
    assert index["metadata"]["total_size"] == written
    dequantize = {"quantization_config": transformers.Mxfp4Config(dequantize=True)}
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), output_loading_info=True, **(dequantize if like in MXFP4 else {})
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    assert model.dtype == torch.bfloat16
    for name, t in model.state_dict().items():  # as transformers read (and dequantized) them
        t = t.float()
        if t.ndim == 1:
            assert torch.equal(t, torch.ones_like(t)), name
        elif t.numel() > 1000:
            assert 0.015 < t.std().item() < 0.025, name


def test_mxfp4_values_dequantize_small_and_convert_plans_them(tmp_path):
    """synth's MXFP4 experts dequantize to finite values of about the pool's spread (|x| <= 6,
    e2m1's largest, times the scale 2**-7), and `reshard convert` reads its blocks and scales
    as the expert weights and keeps them packed."""
    write_synth(tmp_path, _small("gpt-oss-120b"), seed=1)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for weight in ("gate_up_proj", "down_proj"):
            name = f"model.layers.1.mlp.experts.{weight}"
            blocks, scales = (f.get_tensor(name + s) for s in (mxfp4.BLOCKS, mxfp4.SCALES))
            w = mxfp4.dequantize(blocks, scales, torch.float32)
            assert w.isfinite().all() and w.abs().max() <= 6 * 2**-7, name
            assert 0.015 < w.std().item() < 0.03 and abs(w.mean().item()) < 0.002, name
    plan = make_plan(open_source(str(tmp_path)), Layout.parse("ep2tp2"))
    assert plan.quantization["blocks"] == {
        f"model.layers.{i}.mlp.experts.{w}": f"model.layers.{i}.mlp.experts.{w}{mxfp4.BLOCKS}"
        for i in range(2)
        for w in ("gate_up_proj", "down_proj")
    }


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
