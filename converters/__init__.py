"""The WeightConverter DSL and one spec per model family.

>>> from reshard.converters import get_spec
>>> get_spec("qwen3_moe").styles_for("model.layers.0.mlp.experts.down_proj")
('grouped_gemm', 'moe_tp_down_rowwise')
"""

from __future__ import annotations

import difflib

from reshard.converters.ops import (
    Chunk,
    Concatenate,
    ConversionOp,
    Deinterleave,
    Interleave,
    MergeModulelist,
    SplitModulelist,
    Transpose,
)
from reshard.converters.spec import ModelSpec, WeightConverter, WeightRenaming
from reshard.errors import ConversionError

__all__ = [
    "Chunk",
    "Concatenate",
    "ConversionOp",
    "Deinterleave",
    "Interleave",
    "MergeModulelist",
    "ModelSpec",
    "SplitModulelist",
    "Transpose",
    "WeightConverter",
    "WeightRenaming",
    "get_spec",
    "supported_model_types",
]


def _registry() -> dict[str, ModelSpec]:
    from reshard.converters import (
        deepseek_v2,
        deepseek_v3,
        glm4_moe,
        gpt_oss,
        llama4_text,
        mixtral,
        olmoe,
        qwen2_moe,
        qwen3_moe,
    )

    families = (
        qwen3_moe,
        qwen2_moe,
        mixtral,
        olmoe,
        glm4_moe,
        llama4_text,
        deepseek_v2,
        deepseek_v3,
        gpt_oss,
    )
    return {family.SPEC.model_type: family.SPEC for family in families}


# model_types that name a family's architecture under another name. Kimi-K2 is DeepSeek-V3's
# architecture; Moonshot renamed it in config.json so that engines can tell the two apart.
ALIASES = {"kimi_k2": "deepseek_v3"}


def supported_model_types() -> list[str]:
    """The config `model_type`s reshard converts and runs (one per family; see ALIASES)."""
    return sorted(_registry())


def get_spec(model_type: str) -> ModelSpec:
    """The spec for a config's `model_type`; raise ConversionError naming the known ones."""
    specs = _registry()
    model_type = ALIASES.get(model_type, model_type)
    if model_type not in specs:
        nearest = difflib.get_close_matches(model_type, specs, n=1, cutoff=0.5)
        hint = f" (nearest: {nearest[0]})" if nearest else ""
        raise ConversionError(
            f"model_type {model_type!r} is not supported{hint}; supported: {', '.join(sorted(specs))}"
        )
    return specs[model_type]
