"""DeepSeek-V2 / V2-Lite / V2.5 and DeepSeek-Coder-V2 (`deepseek_v2`): DeepSeek-V3's
architecture (see `deepseek_v3`: MLA with YaRN RoPE, shared experts, dense first layers, the
same tensors and the same plan) with DeepSeek-V2's router and RoPE, as transformers'
`DeepseekV2ForCausalLM` computes them:

- softmax scores from fp32 logits; top-k over every expert (`topk_method` "greedy") or over
  the best `topk_group` of `n_group` groups, each ranked by its best expert
  ("group_limited_greedy"); the chosen scores times `routed_scaling_factor`, never
  renormalised; no `e_score_correction_bias`.
- RoPE rotates the interleaved pairs where they lie, as complex numbers in fp32, and casts
  the result back.

V2-Lite has no low-rank query pair (`q_lora_rank` null): one `q_proj`, split by heads under
TP like `q_b_proj`.
"""

from __future__ import annotations

from typing import Any

from reshard.architecture import ModelArgs
from reshard.converters import common as c
from reshard.converters.deepseek_v3 import MLA_PLAN, mla_sizes, moe_sizes
from reshard.converters.spec import ModelSpec

TOPK_METHODS = ("greedy", "group_limited_greedy")


def parse_config(cfg: dict[str, Any]) -> ModelArgs:
    c.refuse(cfg, scoring_func="softmax", mlp_bias=False)
    # transformers ignores norm_topk_prob here, DeepSeek's own code renormalises (and then
    # skips routed_scaling_factor): no V2 release sets it, and we refuse rather than pick one.
    c.refuse(cfg, norm_topk_prob=False)
    method = cfg.get("topk_method", "greedy")
    if method not in TOPK_METHODS:
        raise ValueError(
            f"topk_method is {method!r}; reshard supports {' and '.join(map(repr, TOPK_METHODS))}"
        )
    if method == "group_limited_greedy":
        c.require(cfg, "n_group", "topk_group")
    attention = mla_sizes({**cfg, "rope_interleave": True})  # V3's field; V2 always is
    # Two shared experts when the config does not say: DeepseekV2Config's default.
    moe = moe_sizes({"n_shared_experts": 2, **cfg}, attention["num_layers"])
    if method == "greedy":  # top-k over all experts, whatever n_group says
        moe |= {"n_group": 1, "topk_group": 1}
    return ModelArgs(
        **attention,
        **moe,
        router="softmax",
        router_logits_fp32=True,
        group_score="max",
        rope_interleaved=True,
        rope_fp32=True,
    )


SPEC = ModelSpec(
    model_type="deepseek_v2",
    parse_config=parse_config,
    converters=c.GATE_UP_DOWN_EXPERTS,
    plan={**MLA_PLAN, **c.BASE_PLAN},
    fit=c.BASE_FIT + c.DENSE_FIT + c.SHARED_EXPERT_FIT,
)
