"""What the families share: the two per-expert checkpoint shapes, the base parallel plan,
the fit rules, and config.json parsing helpers.

transformers groups its ~30 MoE model types into two checkpoint shapes, and so do we:

| shape          | per-expert source tensors                          | families                      |
| -------------- | -------------------------------------------------- | ----------------------------- |
| gate/up/down   | `mlp.experts.N.{gate,up,down}_proj.weight`         | qwen2_moe, qwen3_moe, olmoe, glm4_moe, deepseek_v2, deepseek_v3 |
| w1/w3/w2       | `block_sparse_moe.experts.N.{w1,w3,w2}.weight`     | mixtral                       |

Both become the fused transformers v5 parameters `mlp.experts.gate_up_proj [E, 2I, H]`
(gate rows first) and `mlp.experts.down_proj [E, H, I]`. A checkpoint already in that
fused layout passes through under its own names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from reshard.architecture import YaRN
from reshard.converters.ops import Concatenate, MergeModulelist
from reshard.converters.spec import WeightConverter, WeightRenaming

GATE_UP_DOWN_EXPERTS = (
    WeightConverter(
        ["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
        "mlp.experts.gate_up_proj",
        [MergeModulelist(dim=0), Concatenate(dim=1)],
    ),
    WeightConverter(
        "mlp.experts.*.down_proj.weight", "mlp.experts.down_proj", [MergeModulelist(dim=0)]
    ),
)

# Mixtral names its MoE block `block_sparse_moe` and the expert Linears w1 (gate), w3 (up),
# w2 (down); transformers 5.x renames them on load exactly so.
BLOCK_SPARSE_MOE = (WeightRenaming(r"\.block_sparse_moe\.", ".mlp."),)
W1_W3_W2_EXPERTS = (
    WeightConverter(
        ["mlp.experts.*.w1.weight", "mlp.experts.*.w3.weight"],
        "mlp.experts.gate_up_proj",
        [MergeModulelist(dim=0), Concatenate(dim=1)],
    ),
    WeightConverter("mlp.experts.*.w2.weight", "mlp.experts.down_proj", [MergeModulelist(dim=0)]),
)

# Param-level plan (transformers PR 46290 style): glob on the target name -> styles. A family
# composes its plan from these parts and adds its own entries in front (first match wins).
ATTENTION_PLAN: dict[str, str | tuple[str, ...]] = {
    "model.embed_tokens.weight": "embedding",
    "model.layers.*.self_attn.q_proj.*": "colwise",  # weight and bias
    "model.layers.*.self_attn.k_proj.*": "colwise",
    "model.layers.*.self_attn.v_proj.*": "colwise",
    "model.layers.*.self_attn.o_proj.weight": "rowwise",
}
EXPERTS_PLAN: dict[str, str | tuple[str, ...]] = {
    "model.layers.*.mlp.experts.gate_up_proj": ("grouped_gemm", "moe_tp_gate_up_colwise"),
    "model.layers.*.mlp.experts.down_proj": ("grouped_gemm", "moe_tp_down_rowwise"),
    "model.layers.*.mlp.gate.*": "replicate",  # router weight and correction bias
    "model.layers.*.mlp.shared_expert_gate.weight": "replicate",
}
DENSE_AND_NORMS_PLAN: dict[str, str | tuple[str, ...]] = {
    # dense MLPs: the dense layers' `mlp.*_proj` and the shared experts'
    "model.layers.*.gate_proj.weight": "colwise",
    "model.layers.*.up_proj.weight": "colwise",
    "model.layers.*.down_proj.weight": "rowwise",
    "model.layers.*.input_layernorm.weight": "replicate",
    "model.layers.*.post_attention_layernorm.weight": "replicate",
    "model.norm.weight": "replicate",
    "lm_head.weight": "colwise_gather_output",
}
BASE_PLAN = {**ATTENTION_PLAN, **EXPERTS_PLAN, **DENSE_AND_NORMS_PLAN}
# Per-head q/k norms act inside each head: every rank applies the same weights to its heads.
HEAD_QK_NORM_PLAN = {"model.layers.*.self_attn.*_norm.weight": "replicate"}
# Whole-projection q/k norms split with their projection; the runtime sums the RMS statistic
# over tp (the manifest's Shard(0) on the norm weight is what tells it so).
PROJECTION_QK_NORM_PLAN = {"model.layers.*.self_attn.*_norm.weight": "colwise"}

# k/v tensors whose heads repeat when tp > num_key_value_heads (rows are head_dim blocks).
KV_PARAMS = ("*.self_attn.k_proj.*", "*.self_attn.v_proj.*")


@dataclass(frozen=True)
class FitRule:
    """`args.<attr>` (config field `field`) must divide by the size of mesh group `over`.

    `over`: "tp"; "ep" (the expert-parallel dims, tp included with -tp2ep); or
    "expert_tp" (tp, unless -tp2ep keeps experts whole).
    """

    field: str
    attr: str
    over: str


BASE_FIT = (
    FitRule("num_attention_heads", "num_heads", "tp"),
    FitRule("vocab_size", "vocab_size", "tp"),
    FitRule("num_experts", "num_experts", "ep"),
    FitRule("moe_intermediate_size", "moe_intermediate_size", "expert_tp"),
)
DENSE_FIT = (FitRule("intermediate_size", "intermediate_size", "tp"),)
SHARED_EXPERT_FIT = (
    FitRule("shared_expert_intermediate_size", "shared_expert_intermediate_size", "tp"),
)


# --- config.json ---------------------------------------------------------------------------------


def require(cfg: Mapping[str, Any], *keys: str) -> None:
    """Refuse a config that lacks any of `keys`, naming all of them; "a|b" accepts either."""
    missing = []
    for key in keys:
        spellings = key.split("|")
        if all(cfg.get(k) is None for k in spellings):
            alternates = "".join(f" (or {k})" for k in spellings[1:])
            missing.append(spellings[0] + alternates)
    if missing:
        raise ValueError(f"config.json lacks {', '.join(sorted(missing))}")


def first(cfg: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    """The value of the first of `keys` present (spellings differ between releases)."""
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    if default is None:
        raise ValueError(f"config.json lacks {' (or '.join(keys)}{')' * (len(keys) - 1)}")
    return default


# RoPE types the runtime implements; any other is refused, not ignored.
ROPE_TYPES = ("default", "yarn")


def rope(cfg: Mapping[str, Any], head_dim: int) -> dict[str, Any]:
    """rope_theta, rotary_dim and YaRN scaling; other scaled RoPE variants are refused."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        field = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
        raise ValueError(
            f"{field}.rope_type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    factor = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    return {
        "rope_theta": cfg.get("rope_theta") or params.get("rope_theta", 10000.0),
        "rotary_dim": int(head_dim * factor),
        "yarn": yarn(cfg, params) if kind == "yarn" else None,
    }


def yarn(cfg: Mapping[str, Any], params: Mapping[str, Any]) -> YaRN:
    """YaRN's fields, with transformers' defaults: the original context from the config's top
    level (Phi-3 keeps it there; transformers lets it win), else the params, else
    max_position_embeddings; factor, if absent, the ratio of the two; beta_fast / beta_slow
    32 / 1 when absent or zero."""
    original = (
        cfg.get("original_max_position_embeddings")
        or params.get("original_max_position_embeddings")
        or cfg.get("max_position_embeddings")
    )
    if original is None:
        raise ValueError("YaRN rope scaling lacks original_max_position_embeddings")
    factor = params.get("factor") or cfg.get("max_position_embeddings", original) / original
    return YaRN(
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def refuse(cfg: Mapping[str, Any], **supported: Any) -> None:
    """Refuse features the runtime does not implement: `key=value it must have`."""
    for key, expected in supported.items():
        value = cfg.get(key, expected)
        if value != expected and not (expected is None and value in (0, False)):
            raise ValueError(f"{key} is {value!r}; reshard supports only {expected!r}")


def attention_sizes(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The sizes every family spells alike (vocab, hidden, heads, layers, norms, RoPE)."""
    require(cfg, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return {
        "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"],
        "num_layers": cfg["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": cfg.get("num_key_value_heads") or heads,
        "head_dim": head_dim,
        "rms_norm_eps": cfg.get("rms_norm_eps", 1e-6),
        "max_position_embeddings": cfg.get("max_position_embeddings", 32768),
        "tie_word_embeddings": cfg.get("tie_word_embeddings", False),
        "pad_token_id": cfg.get("pad_token_id"),
        **rope(cfg, head_dim),
    }


def sparse_step_dense_layers(cfg: Mapping[str, Any]) -> tuple[int, ...]:
    """Qwen's rule: layer i is dense if listed in mlp_only_layers or (i + 1) % step != 0."""
    layers = cfg["num_hidden_layers"]
    step = cfg.get("decoder_sparse_step", 1) or 1
    only = set(cfg.get("mlp_only_layers") or [])
    outside = sorted(i for i in only if not 0 <= i < layers)
    if outside:
        raise ValueError(
            f"mlp_only_layers has {outside}, outside [0, num_hidden_layers ({layers}))"
        )
    return tuple(i for i in range(layers) if i in only or (i + 1) % step != 0)
