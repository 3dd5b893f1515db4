"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): per-head q/k norms, softmax top-k router."""

from __future__ import annotations

from typing import Any

from reshard.architecture import ModelArgs
from reshard.converters import common as c
from reshard.converters.spec import ModelSpec


def parse_config(cfg: dict[str, Any]) -> ModelArgs:
    """config.json -> ModelArgs; `num_experts` (Qwen's spelling) or `num_local_experts`
    (what transformers 5.x saves)."""
    c.require(
        cfg,
        "intermediate_size",
        "moe_intermediate_size",
        "num_experts|num_local_experts",
        "num_experts_per_tok",
    )
    c.refuse(cfg, hidden_act="silu", attention_bias=False, use_sliding_window=False)
    return ModelArgs(
        **c.attention_sizes(cfg),
        intermediate_size=cfg["intermediate_size"],
        moe_intermediate_size=cfg["moe_intermediate_size"],
        num_experts=c.first(cfg, "num_experts", "num_local_experts"),
        top_k=cfg["num_experts_per_tok"],
        norm_topk_prob=cfg.get("norm_topk_prob", False),
        qk_norm="head",
        dense_layers=c.sparse_step_dense_layers(cfg),
    )


SPEC = ModelSpec(
    model_type="qwen3_moe",
    parse_config=parse_config,
    converters=c.GATE_UP_DOWN_EXPERTS,
    plan={**c.HEAD_QK_NORM_PLAN, **c.BASE_PLAN},
    fit=c.BASE_FIT + c.DENSE_FIT,
)
