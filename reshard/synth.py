"""`reshard synth`: a Hugging Face checkpoint with a real model's exact tensor names and shapes.

    reshard synth --like qwen3-30b-a3b --layers 4 --out q3-4l

Benchmarks need the real shapes (a 128-expert MoE layer of Qwen3-30B-A3B is 1.2 GB of
bf16 in 384 tensors) without downloading 60 GB. The names, shapes and file layout come
from the family's own description (`param_shapes` of its config, read back through its
converters to the checkpoint's per-expert names), so what is written is what the Hub
holds for that model, with N of its layers. No model is built.

A preset released quantized is written quantized, as the Hub holds it: FP8 weights with
their block scales (DeepSeek-V3, Kimi-K2), MXFP4 experts as uint8 blocks and scales
(gpt-oss); the names and shapes of those are the converters' own (converters/fp8.py,
converters/mxfp4.py), read forwards by `reshard convert`.

Values are seeded normal(0, 0.02) for matrices and ones for norms, cut from one pool of
random numbers per seed: the checkpoint is written at disk speed, and runs (its
activations stay finite), though it says nothing sensible.
"""

from __future__ import annotations

import copy
import json
import math
import re
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from reshard.architecture import param_shapes
from reshard.converters import fp8, get_spec, mxfp4
from reshard.converters.lazy import LazyTensor, row_major_strides
from reshard.errors import ReshardError
from reshard.export import natural_order, write_hf_weights
from reshard.writer import atomic_write_text

# From each model's public config.json (the fields reshard reads), and its shard size.
_QWEN3_30B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
}
# Qwen/Qwen3-30B-A3B-FP8: the same model, its Linear weights float8_e4m3fn with a float32
# scale per 128 x 128 block (see `_FP8_WEIGHTS`).
_FP8 = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}
# deepseek-ai/DeepSeek-V3 (and R1, and Kimi-K2's layout with other sizes): MLA, 256 routed
# experts, 3 dense layers, released in FP8 with 128 x 128 block scales. Its multi-token
# prediction layer (model.layers.61) is left out, as reshard and transformers drop it.
_DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "max_position_embeddings": 163840,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "bfloat16",
    "quantization_config": {**_FP8},
}
# moonshotai/Kimi-K2-Instruct: DeepSeek-V3's architecture under its own model_type (reshard
# reads kimi_k2 as deepseek_v3) with 384 experts, 64 heads, one dense layer and no MTP layer.
_KIMI_K2 = {
    **_DEEPSEEK_V3,
    "model_type": "kimi_k2",
    "vocab_size": 163840,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "n_routed_experts": 384,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 2.827,
    "first_k_dense_replace": 1,
    "rope_theta": 50000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "max_position_embeddings": 131072,
    "bos_token_id": 163584,
    "eos_token_id": 163585,
}
# openai/gpt-oss-120b: 128 fused, transposed experts with biases, attention sinks, sliding and
# full layers alternating; released with its experts in MXFP4 (see `_packed`), the rest bf16.
_GPT_OSS_120B = {
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "vocab_size": 201088,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "num_hidden_layers": 36,
    "layer_types": ["sliding_attention", "full_attention"] * 18,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "num_local_experts": 128,
    "num_experts_per_tok": 4,
    "experts_per_token": 4,
    "hidden_act": "silu",
    "swiglu_limit": 7.0,
    "rms_norm_eps": 1e-5,
    "rope_theta": 150000,
    "rope_scaling": {
        "rope_type": "yarn",
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 4096,
    },
    "initial_context_length": 4096,
    "max_position_embeddings": 131072,
    "sliding_window": 128,
    "attention_bias": True,
    "tie_word_embeddings": False,
    "eos_token_id": 200002,
    "pad_token_id": 199999,
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    },
}
PRESETS: dict[str, tuple[dict, str]] = {
    "deepseek-v3": (_DEEPSEEK_V3, "5GB"),
    "kimi-k2": (_KIMI_K2, "5GB"),
    "gpt-oss-120b": (_GPT_OSS_120B, "5GB"),
    # openai/gpt-oss-20b: the same model with 24 layers of 32 experts
    "gpt-oss-20b": (
        {
            **_GPT_OSS_120B,
            "num_hidden_layers": 24,
            "layer_types": ["sliding_attention", "full_attention"] * 12,
            "num_local_experts": 32,
        },
        "5GB",
    ),
    "qwen3-30b-a3b": (_QWEN3_30B, "4GB"),
    "qwen3-30b-a3b-fp8": ({**_QWEN3_30B, "quantization_config": _FP8}, "4GB"),
    "qwen3-235b-a22b": (
        {
            **_QWEN3_30B,
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "moe_intermediate_size": 1536,
            "num_hidden_layers": 94,
            "num_attention_heads": 64,
        },
        "4GB",
    ),
    "mixtral-8x7b": (
        {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 32768,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16",
        },
        "5GB",
    ),
}
POOL_ELEMENTS = 1 << 26  # 64 Mi values (128 MiB of bf16) of random numbers per seed


class _Shape(LazyTensor):
    """A tensor known only by shape: what the converters read backwards to name the files."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype):
        self.shape, self.dtype = tuple(shape), dtype


class _Synthetic(_Shape):
    """A tensor whose values are cut from the random pool (see `_values`).

    FP8 weights hold the pool's values times 2**12 (|x| <= 448 after clamping) and their
    scales 2**-12, so they dequantize to about the pool's values. MXFP4 blocks are cut from
    the pool's low bytes (`_codes`) and their scales are 2**-7, so they dequantize to values
    of about the pool's spread, |x| <= 6 * 2**-7.
    """

    def __init__(self, pool: torch.Tensor, name: str, shape: tuple[int, ...], dtype=None):
        super().__init__(shape, dtype or pool.dtype)
        self.pool, self.name = pool, name

    def read(self, box) -> torch.Tensor:
        if self.name.endswith(fp8.SCALE):
            return torch.full([b - a for a, b in box], FP8_SCALE, dtype=self.dtype)
        if self.name.endswith(mxfp4.SCALES):
            return torch.full([b - a for a, b in box], MXFP4_SCALE, dtype=self.dtype)
        values = _values(self.pool, self.name, self.shape, box)
        if self.dtype in fp8.FP8_DTYPES:
            return (values.float() / FP8_SCALE).clamp_(-448, 448).to(self.dtype)
        return values


FP8_SCALE = 2.0**-12
# 2**-7 as an e8m0 byte: random e2m1 codes (std 2.9) dequantize to std 0.023, near the pool's.
MXFP4_SCALE = mxfp4.SCALE_BIAS - 7
_FUSED_EXPERTS = r"\.experts\.(gate_up|down)_proj"
# The targets an FP8 release quantizes: every Linear of attention, experts and dense MLPs;
# not embeddings, norms, lm_head, the router or Qwen2-MoE's shared_expert_gate.
_FP8_WEIGHTS = re.compile(rf"(_proj(_with_mqa)?\.weight|{_FUSED_EXPERTS})$")
# The checkpoint tensors an MXFP4 release packs: the fused 3-D expert weights (GPT-OSS's, the
# only ones converters.mxfp4 reads), not their biases.
_MXFP4_WEIGHTS = re.compile(rf"{_FUSED_EXPERTS}$")


def _codes(pool: torch.Tensor) -> torch.Tensor:
    """The low byte of each of the pool's values (its last mantissa bits, about uniform): a
    pool of MXFP4 block bytes, whose two e2m1 codes are then about uniform too."""
    ints = {2: torch.int16, 4: torch.int32}[pool.element_size()]
    return (pool.view(ints) & 0xFF).to(torch.uint8)


def _packed(
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]],
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """`tensors` with each MXFP4 weight `X [*L, In, Out]` replaced by its uint8 `X_blocks
    [*L, Out, In / 32, 16]` and `X_scales [*L, Out, In / 32]`: converters.mxfp4's `unpacked`
    read backwards."""
    out = {}
    for name, (shape, dtype) in tensors.items():
        if not (_MXFP4_WEIGHTS.search(name) and len(shape) == 3):
            out[name] = (shape, dtype)
            continue
        *lead, n_in, n_out = shape
        if n_in % mxfp4.BLOCK:
            raise ReshardError(
                f"{name} {list(shape)}: its In dim ({n_in}) is not whole MXFP4 blocks of "
                f"{mxfp4.BLOCK}"
            )
        groups = n_in // mxfp4.BLOCK
        out[name + mxfp4.BLOCKS] = ((*lead, n_out, groups, mxfp4.BLOCK // 2), torch.uint8)
        out[name + mxfp4.SCALES] = ((*lead, n_out, groups), torch.uint8)
    return out


def hf_tensor_dtypes(
    config: dict, dtype: torch.dtype
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The checkpoint's tensor names (the family's HF names), shapes and dtypes for `config`:
    all `dtype`, but as its quantization_config says: FP8, its Linear weights in float8_e4m3fn,
    each with its float32 `weight_scale_inv` (converters.fp8); MXFP4, its fused expert weights
    as uint8 blocks and scales (converters.mxfp4)."""
    spec = get_spec(config["model_type"])
    quantization = config.get("quantization_config") or {}
    block = (
        quantization.get("weight_block_size") if quantization.get("quant_method") == "fp8" else None
    )
    targets: dict[str, LazyTensor] = {}
    for n, s in param_shapes(spec.parse_config(config)).items():
        if block and _FP8_WEIGHTS.search(n):
            targets[n] = _Shape(s, torch.float8_e4m3fn)
            scale = s[:-2] + tuple(-(-x // b) for x, b in zip(s[-2:], block))
            targets[n + fp8.SCALE] = _Shape(scale, torch.float32)
        else:
            targets[n] = _Shape(s, dtype)
    sources = {n: (tuple(t.shape), t.dtype) for n, t in spec.to_sources(targets).items()}
    if quantization.get("quant_method") == "mxfp4":
        sources = _packed(sources)
    return {name: sources[name] for name in sorted(sources, key=natural_order)}


def hf_tensors(config: dict, dtype: torch.dtype) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensor names (the family's HF names) and shapes for `config`."""
    return {name: shape for name, (shape, _) in hf_tensor_dtypes(config, dtype).items()}


def synth_bytes(config: dict, dtype: torch.dtype) -> int:
    """Bytes of tensor data `write_synth` writes for `config`."""
    return sum(d.itemsize * math.prod(s) for s, d in hf_tensor_dtypes(config, dtype).values())


def preset(like: str, layers: int | None = None) -> tuple[dict, str]:
    """(config, max shard size) of a preset, with only its first `layers` layers."""
    if like not in PRESETS:
        raise ReshardError(f"--like {like!r}: choose one of {', '.join(PRESETS)}")
    config, shard = copy.deepcopy(PRESETS[like])
    total = config["num_hidden_layers"]
    if layers is not None:
        if not 1 <= layers <= total:
            raise ReshardError(f"--layers {layers}: {like} has 1 to {total} layers")
        config["num_hidden_layers"] = layers
        if "layer_types" in config:  # one entry a layer (GPT-OSS's sliding and full)
            config["layer_types"] = config["layer_types"][:layers]
    return config, shard


def _values(pool: torch.Tensor, name: str, shape: tuple[int, ...], box) -> torch.Tensor:
    """Box `box` of tensor `name`: normal(0, 0.02) for matrices, ones for norms. A matrix's
    values are the pool from an offset per name onwards (wrapping around its end); only the
    span covering the box is cut, so a chunk of a large tensor costs its own size."""
    extents = [b - a for a, b in box]
    if len(shape) == 1 or 0 in extents:
        return torch.ones(extents, dtype=pool.dtype)
    strides = row_major_strides(shape)
    first = sum(a * s for (a, _), s in zip(box, strides))
    n = sum((b - 1) * s for (_, b), s in zip(box, strides)) + 1 - first
    pieces, at = [], (zlib.crc32(name.encode()) + first) % pool.numel()
    while n > 0:  # no copy unless the span crosses the pool's end
        take = min(n, pool.numel() - at)
        pieces.append(pool[at : at + take])
        n, at = n - take, 0
    span = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return span.as_strided(extents, strides)


def write_synth(
    out: Path,
    config: dict,
    *,
    max_shard_size: str = "4GB",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> int:
    """Write the checkpoint of `config` into `out` (HF layout, index, config, tokenizer); return
    the bytes of tensor data. One tensor is in memory at a time."""
    from reshard.tiny import _tokenizer_json

    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(POOL_ELEMENTS, generator=g).mul_(0.02).to(dtype)  # the only random draw
    shapes = hf_tensor_dtypes(config, dtype)
    codes = _codes(pool) if any(n.endswith(mxfp4.BLOCKS) for n in shapes) else None
    tensors = {
        n: _Synthetic(codes if n.endswith(mxfp4.BLOCKS) else pool, n, s, d)
        for n, (s, d) in shapes.items()
    }
    out.mkdir(parents=True, exist_ok=True)
    written = write_hf_weights(out, tensors, max_shard_size, on_bytes)
    config = {**config, "torch_dtype": str(dtype).removeprefix("torch.")}
    atomic_write_text(out / "config.json", json.dumps(config, indent=2))
    # A small byte-level tokenizer (its ids are a subset of the model's), so `reshard run` works.
    atomic_write_text(out / "tokenizer.json", _tokenizer_json())
    return written
