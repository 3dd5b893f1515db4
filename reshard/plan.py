"""The placement table: parallel styles -> placements, per parameter, for a layout.

Both halves read this: `convert` cuts the weights by it and the runtime reads
the result from the manifest to know what it holds. Style names follow
transformers' registry so a plan copied from a transformers config works.

| style                    | param                        | on tp                     | on ep (and tp with -tp2ep) |
| ------------------------ | ---------------------------- | ------------------------- | -------------------------- |
| colwise                  | Linear [out, in], its bias   | Shard(-2); bias Shard(0)  | Replicate                  |
| rowwise                  | Linear [out, in]             | Shard(-1); bias Replicate | Replicate                  |
| embedding                | embed_tokens [V, H]          | Shard(0)                  | Replicate                  |
| colwise_gather_output    | lm_head [V, H]               | Shard(0)                  | Replicate                  |
| moe_tp_gate_up_colwise   | experts.gate_up_proj [E,2I,H]| _StridedShard(-2, sf=2)   | -                          |
| moe_tp_down_rowwise      | experts.down_proj [E, H, I]  | Shard(-1)                 | -                          |
| moe_tp_gate_up_colwise_t | gate_up_proj [E, H, 2I]      | _StridedShard(-1, sf=2)   | -                          |
| moe_tp_down_rowwise_t    | down_proj [E, I, H]          | Shard(-2)                 | -                          |
| moe_tp_gate_up_interleaved_t | gate_up_proj [E, H, 2I], gate/up alternating; its bias | Shard(-1) | - |
| grouped_gemm             | expert tensors               | -                         | Shard(0)                   |
| replicate                | norms, router                | Replicate                 | Replicate                  |

dp always replicates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reshard.errors import LayoutError
from reshard.layout import Layout
from reshard.placements import Placement, Replicate, Shard, StridedShard, normalize

# Style -> placement on the TP mesh dim, given the parameter's ndim.
TP_STYLES = {
    "colwise": lambda ndim: Shard(0) if ndim == 1 else Shard(-2),
    "rowwise": lambda ndim: Replicate() if ndim == 1 else Shard(-1),
    "embedding": lambda ndim: Shard(0),
    "colwise_gather_output": lambda ndim: Shard(0),
    "moe_tp_gate_up_colwise": lambda ndim: StridedShard(-2, 2),
    "moe_tp_down_rowwise": lambda ndim: Shard(-1),
    # Llama 4 stores its experts transposed: the same splits, on the other dims.
    "moe_tp_gate_up_colwise_t": lambda ndim: StridedShard(-1, 2),
    "moe_tp_down_rowwise_t": lambda ndim: Shard(-2),
    # GPT-OSS alternates gate and up columns: contiguous blocks of 2I / tp columns hold whole
    # (gate_j, up_j) pairs, the same j as down_proj's Shard(-2) rows (the bias [E, 2I] alike).
    "moe_tp_gate_up_interleaved_t": lambda ndim: Shard(-1),
    "replicate": lambda ndim: Replicate(),
}
# Styles that split the expert list over the expert-parallel dims.
EP_STYLES = {"grouped_gemm"}

# transformers 5.x names for the same placements.
ALIASES = {
    "packed_colwise": "moe_tp_gate_up_colwise",
    "embedding_rowwise": "embedding",
    "vocab_parallel": "embedding",
    "replicated_with_grad_allreduce": "replicate",
    "replicated": "replicate",
    "local_colwise": "colwise",
    "local_rowwise": "rowwise",
}


def canonical_style(style: str) -> str:
    """The seed name of `style`; raise on an unknown one."""
    style = ALIASES.get(style, style)
    if style not in TP_STYLES and style not in EP_STYLES:
        known = sorted(set(TP_STYLES) | EP_STYLES | set(ALIASES))
        raise LayoutError(f"unknown parallel style {style!r}; known: {', '.join(known)}")
    return style


def placements_for(styles: tuple[str, ...], ndim: int, layout: Layout) -> tuple[Placement, ...]:
    """One placement per mesh dim of `layout` for a parameter with these styles."""
    styles = tuple(canonical_style(s) for s in styles)
    expert = any(s in EP_STYLES for s in styles)
    tp_styles = [s for s in styles if s in TP_STYLES]
    out: list[Placement] = []
    for dim in layout.mesh_dim_names:
        if expert and dim in layout.expert_dims:
            out.append(Shard(0))
        elif dim == "tp" and tp_styles:
            out.append(normalize(TP_STYLES[tp_styles[0]](ndim), ndim))
        else:
            out.append(Replicate())
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class ParamPlan:
    """How one parameter is laid out: global shape, dtype, styles, one placement per mesh dim.

    `head_repeat` > 1 marks k/v projections whose heads were repeated so that
    tp > num_key_value_heads still gives every rank a whole head (as vLLM
    does); the global shape is then the repeated one.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    styles: tuple[str, ...]
    placements: tuple[Placement, ...]
    head_repeat: int = 1


def check_divisible(plan: ParamPlan, layout: Layout) -> None:
    """Every shard must be even: the runtime needs equal local shapes on every rank."""
    sizes = list(plan.shape)
    for dim_name, n, placement in zip(layout.mesh_dim_names, layout.mesh_shape, plan.placements):
        if isinstance(placement, Replicate):
            continue
        d = placement.dim
        parts = n * (placement.split_factor if isinstance(placement, StridedShard) else 1)
        if sizes[d] % parts:
            raise LayoutError(
                f"layout {layout.name}: {plan.name} dim {d} of size {sizes[d]} is not divisible by "
                f"{dim_name}={n}" + (f" x {parts // n} blocks" if parts != n else "")
            )
        sizes[d] //= n
