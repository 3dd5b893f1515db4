"""Llama 4 text (`llama4_text`, the language model of Llama-4-Scout / Maverick).

Already-fused experts stored as transformers keeps them, `feed_forward.experts.gate_up_proj
[E, H, 2I]` and `down_proj [E, I, H]` (transposed against transformers v5's usual layout, so
they split on the other dims); a top-k sigmoid router whose weights scale the experts'
input; a shared expert; dense layers between MoE layers; RoPE on interleaved pairs, skipped
every `no_rope_layer_interval`-th layer, whose queries get temperature tuning instead; a
weightless L2 qk-norm; chunked attention on the RoPE layers.
"""

from __future__ import annotations

from typing import Any

from reshard.architecture import ModelArgs
from reshard.converters import common as c
from reshard.converters.spec import ModelSpec


def _moe_layers(cfg: dict[str, Any], layers: int) -> list[int]:
    if cfg.get("moe_layers") is not None:
        return list(cfg["moe_layers"])
    step = cfg.get("interleave_moe_layer_step", 1)
    return list(range(step - 1, layers, step))


def _rope_layers(cfg: dict[str, Any], layers: int) -> list[bool]:
    if cfg.get("no_rope_layers"):
        return [bool(v) for v in cfg["no_rope_layers"]]
    interval = cfg.get("no_rope_layer_interval", 4)
    return [(i + 1) % interval != 0 for i in range(layers)]


def parse_config(cfg: dict[str, Any]) -> ModelArgs:
    c.require(cfg, "intermediate_size", "intermediate_size_mlp", "num_local_experts")
    c.require(cfg, "num_experts_per_tok")
    # Released Llama 4 checkpoints have no attention biases; a row-parallel o_proj bias would
    # need adding once after the reduction, which the runtime does not do yet.
    c.refuse(cfg, hidden_act="silu", attention_bias=False)
    sizes = c.attention_sizes(cfg)
    layers = sizes["num_layers"]
    rope = _rope_layers(cfg, layers)
    if len(rope) != layers:
        raise ValueError(f"no_rope_layers has {len(rope)} entries for {layers} layers")
    chunk = cfg.get("attention_chunk_size")
    types = cfg.get("layer_types") or [
        "chunked_attention" if r and chunk else "full_attention" for r in rope
    ]
    moe = set(_moe_layers(cfg, layers))
    tuning = cfg.get("attn_temperature_tuning", False)
    return ModelArgs(
        **sizes,
        intermediate_size=cfg["intermediate_size_mlp"],
        moe_intermediate_size=cfg["intermediate_size"],
        num_experts=cfg["num_local_experts"],
        top_k=cfg["num_experts_per_tok"],
        qk_norm="l2" if cfg.get("use_qk_norm", True) else "none",
        rope_interleaved=True,
        nope_layers=tuple(i for i, r in enumerate(rope) if not r),
        attn_temperature=(cfg.get("floor_scale", 8192), cfg.get("attn_scale", 0.1))
        if tuning
        else None,
        chunked_layers=tuple(i for i, t in enumerate(types) if t == "chunked_attention"),
        attention_chunk_size=chunk,
        router="sigmoid",
        shared_expert_intermediate_size=cfg["intermediate_size"],
        shared_expert_name="shared_expert",
        dense_layers=tuple(i for i in range(layers) if i not in moe),
        expert_input_scaling=True,
        experts_transposed=True,
        mlp_name="feed_forward",
        router_name="router",
    )


PLAN = {
    **c.ATTENTION_PLAN,
    "model.layers.*.feed_forward.experts.gate_up_proj": (
        "grouped_gemm",
        "moe_tp_gate_up_colwise_t",
    ),
    "model.layers.*.feed_forward.experts.down_proj": ("grouped_gemm", "moe_tp_down_rowwise_t"),
    "model.layers.*.feed_forward.router.weight": "replicate",
    **c.DENSE_AND_NORMS_PLAN,  # the dense layers' and the shared expert's projections too
}

SPEC = ModelSpec(
    model_type="llama4_text",
    parse_config=parse_config,
    plan=PLAN,
    fit=tuple(r for r in c.BASE_FIT if r.attr != "moe_intermediate_size")
    + (
        c.FitRule("intermediate_size", "moe_intermediate_size", "expert_tp"),
        c.FitRule("intermediate_size_mlp", "intermediate_size", "tp"),
    ),
)
