"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): qkv bias, no qk-norm, a shared expert
scaled by a sigmoid gate, softmax top-k without renormalisation by default."""

from __future__ import annotations

from typing import Any

from reshard.architecture import ModelArgs
from reshard.converters import common as c
from reshard.converters.spec import ModelSpec


def parse_config(cfg: dict[str, Any]) -> ModelArgs:
    c.require(
        cfg,
        "intermediate_size",
        "moe_intermediate_size",
        "num_experts",
        "num_experts_per_tok",
        "shared_expert_intermediate_size",
    )
    c.refuse(cfg, hidden_act="silu", use_sliding_window=False)
    return ModelArgs(
        **c.attention_sizes(cfg),
        intermediate_size=cfg["intermediate_size"],
        moe_intermediate_size=cfg["moe_intermediate_size"],
        num_experts=cfg["num_experts"],
        top_k=cfg["num_experts_per_tok"],
        norm_topk_prob=cfg.get("norm_topk_prob", False),
        qk_norm="none",
        qkv_bias=cfg.get("qkv_bias", cfg.get("attention_bias", True)),
        shared_expert_intermediate_size=cfg["shared_expert_intermediate_size"],
        shared_expert_name="shared_expert",
        shared_expert_gate=True,
        dense_layers=c.sparse_step_dense_layers(cfg),
    )


SPEC = ModelSpec(
    model_type="qwen2_moe",
    parse_config=parse_config,
    converters=c.GATE_UP_DOWN_EXPERTS,
    plan=c.BASE_PLAN,
    fit=c.BASE_FIT + c.DENSE_FIT + c.SHARED_EXPERT_FIT,
)
