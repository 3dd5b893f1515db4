"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): per-expert HF tensors -> fused v5 experts."""

from __future__ import annotations

from reshard.converters.ops import Concatenate, MergeModulelist
from reshard.converters.spec import ModelSpec, WeightConverter
from reshard.runtime.model import CausalLM, ModelArgs

# HF checkpoints store each expert's gate/up/down Linear; transformers v5 (and
# our runtime) hold them fused: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I].
EXPERT_CONVERTERS = (
    WeightConverter(
        ["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
        "mlp.experts.gate_up_proj",
        [MergeModulelist(dim=0), Concatenate(dim=1)],
    ),
    WeightConverter(
        "mlp.experts.*.down_proj.weight", "mlp.experts.down_proj", [MergeModulelist(dim=0)]
    ),
)

# Param-level plan (transformers PR 46290 style): glob on the target name -> styles.
PLAN = {
    "model.embed_tokens.weight": "embedding",
    "model.layers.*.self_attn.q_proj.weight": "colwise",
    "model.layers.*.self_attn.k_proj.weight": "colwise",
    "model.layers.*.self_attn.v_proj.weight": "colwise",
    "model.layers.*.self_attn.o_proj.weight": "rowwise",
    "model.layers.*.self_attn.q_norm.weight": "replicate",
    "model.layers.*.self_attn.k_norm.weight": "replicate",
    "model.layers.*.mlp.gate.weight": "replicate",
    "model.layers.*.mlp.experts.gate_up_proj": ("grouped_gemm", "moe_tp_gate_up_colwise"),
    "model.layers.*.mlp.experts.down_proj": ("grouped_gemm", "moe_tp_down_rowwise"),
    # dense MLP of `mlp_only_layers`
    "model.layers.*.mlp.gate_proj.weight": "colwise",
    "model.layers.*.mlp.up_proj.weight": "colwise",
    "model.layers.*.mlp.down_proj.weight": "rowwise",
    "model.layers.*.input_layernorm.weight": "replicate",
    "model.layers.*.post_attention_layernorm.weight": "replicate",
    "model.norm.weight": "replicate",
    "lm_head.weight": "colwise_gather_output",
}

SPEC = ModelSpec(
    model_type="qwen3_moe",
    converters=EXPERT_CONVERTERS,
    ignore=("*.rotary_emb.inv_freq",),
    plan=PLAN,
    kv_params=("*.self_attn.k_proj.weight", "*.self_attn.v_proj.weight"),
    model_args=ModelArgs.from_hf_config,
    model=CausalLM,
)
