"""GLM-4.5 / GLM-4.6 (`glm4_moe`): sigmoid router with `e_score_correction_bias`,
group-limited top-k, `routed_scaling_factor`, shared experts, dense first layers, partial
RoPE, qkv bias. The multi-token-prediction layers past `num_hidden_layers` are dropped, as
transformers drops them."""

from __future__ import annotations

from typing import Any

from reshard.architecture import ModelArgs
from reshard.converters import common as c
from reshard.converters.spec import ModelSpec


def parse_config(cfg: dict[str, Any]) -> ModelArgs:
    c.require(
        cfg, "intermediate_size", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok"
    )
    c.refuse(cfg, hidden_act="silu")
    sizes = c.attention_sizes(cfg)
    return ModelArgs(
        **sizes,
        intermediate_size=cfg["intermediate_size"],
        moe_intermediate_size=cfg["moe_intermediate_size"],
        num_experts=cfg["n_routed_experts"],
        top_k=cfg["num_experts_per_tok"],
        norm_topk_prob=cfg.get("norm_topk_prob", True),
        qk_norm="head" if cfg.get("use_qk_norm", False) else "none",
        qkv_bias=cfg.get("attention_bias", False),
        router="sigmoid",
        router_bias=True,
        n_group=cfg.get("n_group", 1),
        topk_group=cfg.get("topk_group", 1),
        routed_scaling_factor=cfg.get("routed_scaling_factor", 1.0),
        shared_expert_intermediate_size=cfg["moe_intermediate_size"]
        * cfg.get("n_shared_experts", 1),
        shared_expert_name="shared_experts",
        dense_layers=tuple(range(min(cfg.get("first_k_dense_replace", 0), sizes["num_layers"]))),
    )


SPEC = ModelSpec(
    model_type="glm4_moe",
    parse_config=parse_config,
    converters=c.GATE_UP_DOWN_EXPERTS,
    plan={**c.HEAD_QK_NORM_PLAN, **c.BASE_PLAN},
    fit=c.BASE_FIT + c.DENSE_FIT + c.SHARED_EXPERT_FIT,
    drop_layers_past_config=True,
)
