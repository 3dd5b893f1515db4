"""FP8 block-scaled checkpoints (DeepSeek-V3's and Qwen3's `-FP8` releases), for every family.

On disk a quantized Linear keeps `X.weight [R, C]` in float8_e4m3fn and beside it
`X.weight_scale_inv [ceil(R / br), ceil(C / bc)]` (float32; bf16 or fp16 in some Qwen
releases), and config.json says `"quantization_config": {"quant_method": "fp8", "fmt":
"e4m3", "activation_scheme": "dynamic", "weight_block_size": [br, bc]}`:

    W[i, j] = float32(X.weight[i, j]) * X.weight_scale_inv[i // br, j // bc]

Which tensors carry scales is read from the checkpoint, not from the config's
`modules_to_not_convert`: every weight stored in float8 must have its scale and every
scale its float8 weight (Qwen3-FP8 leaves norms, embeddings, lm_head and the router in
bf16; DeepSeek-V3 too, without listing them).

Nothing here is per family:

- Names are transformers' (FineGrainedFP8): the scale of target `T` is `T + "_scale_inv"`
  (`q_proj.weight_scale_inv`, fused `experts.gate_up_proj_scale_inv`), as is the scale of
  source `S`. So every converter of a family has a twin for the scales with the same ops
  (`scale_converters`): the per-expert gate/up scales stack and concatenate exactly like
  their weights.
- Which dims a scale entry spans in a target is traced through those ops
  (`target_blocks`): a stack adds a dim of block 1; a concatenation or a cut must fall on
  block boundaries, or the scale rows would no longer line up with the weight rows (a
  gate of 96 rows in 128-row blocks ends mid-block, and the fused scale would give the
  first up rows the gate's scale).
- A scale takes its weight's placements, which is only exact when every local piece of
  the weight is whole blocks (`misaligned`): then the scale's local shard is exactly the
  scales of the weight's local shard. Else the layout is refused (a Qwen3-30B-A3B expert
  of 768 rows in 128-row blocks splits over tp2, not tp4: 192 rows is 1.5 blocks).
- `convert --dtype bf16` wraps each weight in `lazy.Dequant` instead: a rank reads only
  its weight blocks and their scales, and writes plain bf16 with no scales.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from reshard.converters.lazy import Assembled, Cat, LazyTensor, Narrow, Stack
from reshard.errors import ConversionError

SCALE = "_scale_inv"  # scale of tensor `T` is `T + SCALE`, in sources and targets alike
FP8_DTYPES = (torch.float8_e4m3fn,)


@dataclass(frozen=True)
class BlockFP8:
    """config.json's `quantization_config` for block-scaled FP8 (the only kind reshard reads).

    `block`: `weight_block_size` [rows, cols] of one scale entry.
    """

    block: tuple[int, int]
    fmt: str = "e4m3"
    activation_scheme: str = "dynamic"

    def record(self, scales: Mapping[str, str]) -> dict[str, Any]:
        """The manifest's `quantization` entry: the format and every weight -> scale name."""
        return {
            "quant_method": "fp8",
            "fmt": self.fmt,
            "activation_scheme": self.activation_scheme,
            "weight_block_size": list(self.block),
            "scales": dict(scales),
        }

    def blocks(self, ndim: int) -> tuple[int, ...]:
        """Scale blocks per dim of an `ndim`-D weight: `block` on the last two, 1 before them."""
        return (1,) * (ndim - 2) + self.block


def weight_of(name: str) -> str | None:
    """The weight a scale named `name` scales, or None when `name` is not a scale."""
    return name[: -len(SCALE)] if name.endswith(SCALE) else None


def block_fp8(config: Mapping[str, Any], keys: Sequence[str], model_type: str) -> BlockFP8 | None:
    """The checkpoint's FP8 format, or None for an unquantized one; refuse what reshard cannot
    read (per-tensor or static-activation FP8, ue8m0 scales, scales without a config).

    Another `quant_method` (mxfp4, awq, ...) is left to whatever reads it: None.
    """
    q = config.get("quantization_config")
    scales = sorted(k for k in keys if k.endswith(SCALE))
    if not isinstance(q, Mapping) or q.get("quant_method") != "fp8":
        if scales:
            more = f" (+{len(scales) - 1} more)" if len(scales) > 1 else ""
            has = f"quant_method {q.get('quant_method')!r}" if isinstance(q, Mapping) else "none"
            raise ConversionError(
                f"{model_type}: {scales[0]}{more}: FP8 block scales (weight_scale_inv) need "
                'config.json\'s quantization_config {"quant_method": "fp8", '
                f'"weight_block_size": [rows, cols]}}; this config has {has}'
            )
        return None
    where = "config.json quantization_config"
    block = q.get("weight_block_size")
    if block is None:
        raise ConversionError(
            f"{where}: no weight_block_size (per-tensor FP8 scales) is not supported; "
            "reshard reads block-scaled FP8"
        )
    if (
        not isinstance(block, (list, tuple))
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise ConversionError(f"{where}: weight_block_size {block!r} is not [rows, cols]")
    for key, supported in (
        ("fmt", "e4m3"),
        ("activation_scheme", "dynamic"),
        ("scale_fmt", "float"),
    ):
        value = q.get(key, supported)
        if value != supported:
            raise ConversionError(f"{where}: {key} {value!r} is not supported, only {supported!r}")
    if not scales:
        raise ConversionError(
            f"{where} says fp8, but no tensor has a weight_scale_inv "
            "(a dequantized copy that kept the config? drop quantization_config from config.json)"
        )
    return BlockFP8(block=(block[0], block[1]))


def scale_converters(converters: Sequence[Any]) -> tuple[Any, ...]:
    """The scales' twin of each WeightConverter: same ops, every pattern + `_scale_inv`."""
    return tuple(
        dataclasses.replace(
            c,
            source_patterns=tuple(p + SCALE for p in c.source_patterns),
            target_patterns=tuple(p + SCALE for p in c.target_patterns),
        )
        for c in converters
    )


def target_blocks(t: LazyTensor, fp8: BlockFP8) -> tuple[int, ...]:
    """Per dim of target `t`, how many consecutive indices share one scale entry.

    Traced from the leaves (each a whole stored weight: blocks on its last two dims)
    through the ops that build `t`; raise ConversionError, saying why, where the ops cut
    or join the weight inside a block.
    """
    if isinstance(t, Stack):
        inner = {target_blocks(p, fp8) for p in t.parts}
        if len(inner) != 1:
            raise ConversionError(f"stacked weights have different scale blocks {sorted(inner)}")
        (b,) = inner
        return b[: t.dim] + (1,) + b[t.dim :]
    if isinstance(t, Cat):
        inner = {target_blocks(p, fp8) for p in t.parts}
        if len(inner) != 1:
            raise ConversionError(f"joined weights have different scale blocks {sorted(inner)}")
        (b,) = inner
        sizes = [p.shape[t.dim] for p in t.parts[:-1]]
        if any(s % b[t.dim] for s in sizes):
            raise ConversionError(
                f"joining parts of {sizes[0]} along dim {t.dim} ends mid-way through a "
                f"{b[t.dim]}-wide FP8 scale block"
            )
        return b
    if isinstance(t, Narrow):
        b = target_blocks(t.child, fp8)
        length = 1 if t.squeeze else t.shape[t.dim]
        end = t.start + length
        if t.start % b[t.dim] or (end % b[t.dim] and end != t.child.shape[t.dim]):
            raise ConversionError(
                f"taking [{t.start}, {end}) of dim {t.dim} cuts a {b[t.dim]}-wide FP8 scale block"
            )
        return b[: t.dim] + b[t.dim + 1 :] if t.squeeze else b
    if t.dtype in FP8_DTYPES and (isinstance(t, Assembled) or not t.children()):
        return fp8.blocks(t.ndim)  # a stored weight, or one assembled from rank files
    raise ConversionError(
        f"FP8 scales cannot follow {type(t).__name__} (only stack, concatenate, cut)"
    )


def pair_scales(targets: Mapping[str, LazyTensor], fp8: BlockFP8) -> dict[str, str]:
    """{weight: its scale} for every float8 target, checked: each weight has its scale and each
    scale its weight, in the blocks the ops give, covering the weight exactly."""
    pairs = {}
    for name, t in targets.items():
        weight = weight_of(name)
        if weight is not None:
            if weight not in targets or targets[weight].dtype not in FP8_DTYPES:
                raise ConversionError(f"{name}: an FP8 scale, but {weight} is not a float8 weight")
            if not t.dtype.is_floating_point:
                raise ConversionError(f"{name}: FP8 scales must be floats, not {t.dtype}")
            continue
        if t.dtype not in FP8_DTYPES:
            continue
        scale = name + SCALE
        if scale not in targets:
            raise ConversionError(f"{name}: a float8 weight without its scale {scale}")
        try:
            blocks = target_blocks(t, fp8)
        except ConversionError as e:
            raise ConversionError(f"{name}: {e}") from None
        if blocks != fp8.blocks(t.ndim):
            raise ConversionError(
                f"{name}: its FP8 scale blocks end up {list(blocks)}; reshard records "
                f"weight_block_size {list(fp8.block)} on the last two dims only"
            )
        want = tuple(-(-s // b) for s, b in zip(t.shape, blocks))
        if tuple(targets[scale].shape) != want:
            raise ConversionError(
                f"{scale}: shape {list(targets[scale].shape)}, but weight {list(t.shape)} in "
                f"{list(fp8.block)} blocks needs {list(want)}"
            )
        pairs[name] = scale
    return pairs


def misaligned(
    shape: Sequence[int],
    placements: Sequence[Any],
    mesh_shape: Sequence[int],
    blocks: Sequence[int],
) -> tuple[int, int] | None:
    """(dim, local piece size) of the first split that cuts a scale block, else None.

    Split sizes as `plan.check_divisible` walks them (even shards, outer mesh dims first).
    """
    from reshard.placements import Replicate, StridedShard

    sizes = list(shape)
    for n, placement in zip(mesh_shape, placements):
        if isinstance(placement, Replicate):
            continue
        d = placement.dim
        k = placement.split_factor if isinstance(placement, StridedShard) else 1
        piece = sizes[d] // (n * k)
        if piece % blocks[d]:
            return d, piece
        sizes[d] //= n
    return None


def kv_scale_rows(name: str, head_dim: int, fp8: BlockFP8) -> int:
    """Scale rows per k/v head, for repeating heads when tp > num_key_value_heads."""
    if head_dim % fp8.block[0]:
        raise ConversionError(
            f"{name}: tp > num_key_value_heads repeats k/v heads of {head_dim} rows, but FP8 "
            f"scale blocks are {fp8.block[0]} rows (heads share a scale row); use tp <= "
            "num_key_value_heads or --dtype bf16"
        )
    return head_dim // fp8.block[0]
