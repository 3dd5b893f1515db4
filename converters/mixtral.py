"""Mixtral (8x7B, 8x22B): `block_sparse_moe.experts.N.{w1,w3,w2}`, no qk-norm, softmax top-k
renormalised over the chosen experts."""

from __future__ import annotations

from typing import Any

from reshard.architecture import ModelArgs
from reshard.converters import common as c
from reshard.converters.spec import ModelSpec


def parse_config(cfg: dict[str, Any]) -> ModelArgs:
    c.require(cfg, "intermediate_size", "num_local_experts", "num_experts_per_tok")
    c.refuse(cfg, hidden_act="silu", sliding_window=None)
    return ModelArgs(
        **c.attention_sizes(cfg),
        intermediate_size=0,  # no dense layers
        moe_intermediate_size=cfg["intermediate_size"],
        num_experts=cfg["num_local_experts"],
        top_k=cfg["num_experts_per_tok"],
        norm_topk_prob=True,
        qk_norm="none",
    )


SPEC = ModelSpec(
    model_type="mixtral",
    parse_config=parse_config,
    renamings=c.BLOCK_SPARSE_MOE,
    converters=c.W1_W3_W2_EXPERTS,
    plan=c.BASE_PLAN,
    fit=tuple(r for r in c.BASE_FIT if r.attr != "moe_intermediate_size")
    + (c.FitRule("intermediate_size", "moe_intermediate_size", "expert_tp"),),
)
