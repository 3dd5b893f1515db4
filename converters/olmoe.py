"""OLMoE (OLMoE-1B-7B): q/k RMSNorm over the whole projection (not per head), optional
q/k/v clipping, softmax top-k."""

from __future__ import annotations

from typing import Any

from reshard.architecture import ModelArgs
from reshard.converters import common as c
from reshard.converters.spec import ModelSpec


def parse_config(cfg: dict[str, Any]) -> ModelArgs:
    c.require(cfg, "intermediate_size", "num_experts", "num_experts_per_tok")
    c.refuse(cfg, hidden_act="silu", attention_bias=False)
    return ModelArgs(
        **c.attention_sizes(cfg),
        intermediate_size=0,  # no dense layers
        moe_intermediate_size=cfg["intermediate_size"],
        num_experts=cfg["num_experts"],
        top_k=cfg["num_experts_per_tok"],
        norm_topk_prob=cfg.get("norm_topk_prob", False),
        qk_norm="projection",
        clip_qkv=cfg.get("clip_qkv"),
    )


SPEC = ModelSpec(
    model_type="olmoe",
    parse_config=parse_config,
    converters=c.GATE_UP_DOWN_EXPERTS,
    plan={**c.PROJECTION_QK_NORM_PLAN, **c.BASE_PLAN},
    # the k norm's weight follows k's channels, so it repeats with k's heads
    kv_params=(*c.KV_PARAMS, "*.self_attn.k_norm.weight"),
    fit=tuple(r for r in c.BASE_FIT if r.attr != "moe_intermediate_size")
    + (c.FitRule("intermediate_size", "moe_intermediate_size", "expert_tp"),),
)
