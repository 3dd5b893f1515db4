"""GPT-OSS (`gpt_oss`: openai/gpt-oss-20b and -120b).

The checkpoint already holds transformers' in-memory names, so no converter runs: fused
experts stored transposed, `mlp.experts.gate_up_proj [E, H, 2I]` whose 2I columns alternate
gate, up, gate, up, ... and `down_proj [E, I, H]`, each with a bias (`gate_up_proj_bias [E,
2I]`, `down_proj_bias [E, H]`); a router Linear with a bias, top-k of its logits and a softmax
over the k chosen; the clamped SwiGLU `(clamp(up, +-limit) + 1) * g * sigmoid(1.702 g)`,
`g = clamp(gate, max=limit)`; q/k/v and o_proj biases; one learned attention-sink logit per
head (`self_attn.sinks [N]`); sliding-window and full layers alternating (`layer_types`);
YaRN RoPE.

How the tensors split under TP (transformers 5.24 has only an EP plan for GPT-OSS, so these
are ours):
- Experts: `gate_up_proj` is `Shard(-1)`, contiguous blocks of 2I / tp columns. Gate j and up
  j are adjacent columns (2j, 2j + 1), so every block holds whole pairs, j in
  [r I / tp, (r + 1) I / tp): the same j as `down_proj`'s `Shard(-2)` rows. No de-interleave
  (vLLM and Megatron-Bridge reorder to [gates; ups] at load; we keep the Hub's bytes, so a
  rank reads one contiguous run per row and export gives the file back bit for bit).
  A `_StridedShard(-1, 2)` (the [gate; up] split of the other families) would be wrong here:
  it would hand a rank two separate ranges of pairs, not the rows of `down_proj` it holds.
  `gate_up_proj_bias` splits as its columns.
- Rowwise biases (`o_proj.bias`, `down_proj_bias`) stay whole on every rank and are added
  once: the runtime adds them on tp rank 0 only, before the all-reduce of the partial sums
  (runtime/parallel.py), and sums their gradients over tp.
- `sinks` split with the query heads (colwise); the router and its bias are replicated.
Under EP every expert tensor, biases included, is `Shard(0)` (transformers' `grouped_gemm`).
"""

from __future__ import annotations

from typing import Any

from reshard.architecture import ModelArgs
from reshard.converters import common as c
from reshard.converters.spec import ModelSpec

LAYER_TYPES = ("sliding_attention", "full_attention")

# transformers' GptOssConfig defaults, for a config.json that leaves RoPE out.
DEFAULT_ROPE_THETA = 150000.0
DEFAULT_YARN = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}


def _layer_types(cfg: dict[str, Any], layers: int) -> list[str]:
    """`layer_types`, or transformers' default: sliding on even layers, full on odd."""
    types = cfg.get("layer_types") or [LAYER_TYPES[i % 2] for i in range(layers)]
    if len(types) != layers:
        raise ValueError(f"layer_types has {len(types)} entries for num_hidden_layers ({layers})")
    bad = sorted(set(types) - set(LAYER_TYPES))
    if bad:
        raise ValueError(
            f"layer_types {bad[0]!r} is not supported; supported: {', '.join(LAYER_TYPES)}"
        )
    return types


def parse_config(cfg: dict[str, Any]) -> ModelArgs:
    c.require(
        cfg, "intermediate_size", "num_local_experts", "num_experts_per_tok|experts_per_token"
    )
    c.refuse(cfg, hidden_act="silu")
    if not (cfg.get("rope_parameters") or cfg.get("rope_scaling")):
        cfg = {"rope_theta": DEFAULT_ROPE_THETA, **cfg, "rope_parameters": DEFAULT_YARN}
    sizes = c.attention_sizes(cfg)
    types = _layer_types(cfg, sizes["num_layers"])
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    bias = bool(cfg.get("attention_bias", True))
    return ModelArgs(
        **sizes,
        intermediate_size=0,  # no dense MLP: config.json's intermediate_size is the experts'
        moe_intermediate_size=cfg["intermediate_size"],
        num_experts=cfg["num_local_experts"],
        top_k=c.first(cfg, "num_experts_per_tok", "experts_per_token"),
        qk_norm="none",
        qkv_bias=bias,
        o_bias=bias,
        sliding_layers=sliding,
        sliding_window=cfg.get("sliding_window") if sliding else None,
        attention_sinks=True,
        router="topk_softmax",
        router_logit_bias=True,
        experts_transposed=True,
        experts_interleaved=True,
        expert_bias=True,
        swiglu_limit=float(c.first(cfg, "swiglu_limit", default=7.0)),
        swiglu_alpha=float(c.first(cfg, "swiglu_alpha", default=1.702)),
        router_name="router",
    )


PLAN: dict[str, str | tuple[str, ...]] = {
    "model.layers.*.self_attn.o_proj.bias": "rowwise",  # whole; added once (see above)
    "model.layers.*.self_attn.sinks": "colwise",  # one per query head: split with the heads
    "model.layers.*.mlp.experts.gate_up_proj": ("grouped_gemm", "moe_tp_gate_up_interleaved_t"),
    "model.layers.*.mlp.experts.gate_up_proj_bias": (
        "grouped_gemm",
        "moe_tp_gate_up_interleaved_t",
    ),
    "model.layers.*.mlp.experts.down_proj": ("grouped_gemm", "moe_tp_down_rowwise_t"),
    "model.layers.*.mlp.experts.down_proj_bias": ("grouped_gemm", "replicate"),
    "model.layers.*.mlp.router.*": "replicate",  # weight and bias
    **c.ATTENTION_PLAN,
    **c.DENSE_AND_NORMS_PLAN,
}

SPEC = ModelSpec(
    model_type="gpt_oss",
    parse_config=parse_config,
    plan=PLAN,
    fit=(
        c.FitRule("num_attention_heads", "num_heads", "tp"),
        c.FitRule("vocab_size", "vocab_size", "tp"),
        c.FitRule("num_local_experts", "num_experts", "ep"),
        # whole (gate_j, up_j) pairs per rank: I, not just 2I, divides by tp
        c.FitRule("intermediate_size", "moe_intermediate_size", "expert_tp"),
    ),
)
