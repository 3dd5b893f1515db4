"""DeepSeek-V3 / R1 and Kimi-K2 (`deepseek_v3`): multi-head latent attention (MLA) with YaRN
RoPE, and GLM-4.5's MoE: sigmoid router with `e_score_correction_bias`, group-limited top-k,
`routed_scaling_factor`, shared experts, dense first layers. The multi-token-prediction layer
past `num_hidden_layers` is dropped, as transformers drops it.

MLA under TP splits by heads, as vLLM and SGLang do (transformers replicates it): the
per-head up-projections `q_b_proj` (or `q_proj`) and `kv_b_proj` colwise, `o_proj` rowwise,
and the low-rank down-projections and their norms whole on every rank.
"""

from __future__ import annotations

from typing import Any

from reshard.architecture import MLA, ModelArgs
from reshard.converters import common as c
from reshard.converters.spec import ModelSpec

# In front of BASE_PLAN, whose q_proj (colwise) and o_proj (rowwise) entries MLA shares.
MLA_PLAN: dict[str, str | tuple[str, ...]] = {
    "model.layers.*.self_attn.q_a_proj.weight": "replicate",
    "model.layers.*.self_attn.q_a_layernorm.weight": "replicate",
    "model.layers.*.self_attn.q_b_proj.weight": "colwise",  # rows: whole heads of nope + rope
    "model.layers.*.self_attn.kv_a_proj_with_mqa.weight": "replicate",
    "model.layers.*.self_attn.kv_a_layernorm.weight": "replicate",
    "model.layers.*.self_attn.kv_b_proj.weight": "colwise",  # rows: whole heads of nope + v
}


def mla_sizes(cfg: dict[str, Any]) -> dict[str, Any]:
    """The attention part of ModelArgs for an MLA config (DeepSeek-V2 and V3 spell it alike)."""
    c.require(cfg, "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
    c.refuse(cfg, attention_bias=False)
    sizes = c.attention_sizes(cfg)
    kv_heads = cfg.get("num_key_value_heads") or sizes["num_heads"]
    if kv_heads != sizes["num_heads"]:
        raise ValueError(
            f"num_key_value_heads ({kv_heads}) must equal num_attention_heads "
            f"({sizes['num_heads']}): MLA gives every head its own key"
        )
    mla = MLA(
        q_lora_rank=cfg.get("q_lora_rank"),
        kv_lora_rank=cfg["kv_lora_rank"],
        qk_nope_head_dim=cfg["qk_nope_head_dim"],
        qk_rope_head_dim=cfg["qk_rope_head_dim"],
        v_head_dim=cfg["v_head_dim"],
        rope_interleave=cfg.get("rope_interleave", True),
    )
    # config.json's head_dim (transformers writes qk_rope_head_dim there) is not a head's size.
    return {
        **sizes,
        "head_dim": mla.qk_nope_head_dim + mla.qk_rope_head_dim,
        "rotary_dim": mla.qk_rope_head_dim,
        "qk_norm": "none",
        "mla": mla,
    }


def moe_sizes(cfg: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Experts, shared experts and dense first layers (DeepSeek-V2 and V3 spell them alike)."""
    c.require(
        cfg, "intermediate_size", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok"
    )
    c.refuse(cfg, hidden_act="silu", moe_layer_freq=1)
    return {
        "intermediate_size": cfg["intermediate_size"],
        "moe_intermediate_size": cfg["moe_intermediate_size"],
        "num_experts": cfg["n_routed_experts"],
        "top_k": cfg["num_experts_per_tok"],
        "n_group": cfg.get("n_group") or 1,
        "topk_group": cfg.get("topk_group") or 1,
        "routed_scaling_factor": cfg.get("routed_scaling_factor", 1.0),
        "shared_expert_intermediate_size": cfg["moe_intermediate_size"]
        * cfg.get("n_shared_experts", 1),
        "shared_expert_name": "shared_experts",
        "dense_layers": tuple(range(min(cfg.get("first_k_dense_replace", 0), num_layers))),
    }


def parse_config(cfg: dict[str, Any]) -> ModelArgs:
    c.refuse(cfg, scoring_func="sigmoid", topk_method="noaux_tc")
    attention = mla_sizes(cfg)
    return ModelArgs(
        **attention,
        **moe_sizes(cfg, attention["num_layers"]),
        norm_topk_prob=cfg.get("norm_topk_prob", True),
        router="sigmoid",
        router_bias=True,
    )


SPEC = ModelSpec(
    model_type="deepseek_v3",
    parse_config=parse_config,
    converters=c.GATE_UP_DOWN_EXPERTS,
    plan={**MLA_PLAN, **c.BASE_PLAN},
    fit=c.BASE_FIT + c.DENSE_FIT + c.SHARED_EXPERT_FIT,
    drop_layers_past_config=True,
)
