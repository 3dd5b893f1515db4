"""MXFP4 checkpoints (GPT-OSS's release: openai/gpt-oss-20b and -120b).

On disk each quantized expert weight `X` of transformers' shape `[E, In, Out]` (GPT-OSS's
transposed `gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`) is two uint8 tensors, stored
the other way round, out-features first, as the OCP Microscaling format packs them:

    X_blocks [E, Out, In / 32, 16]   two e2m1 (FP4) values per byte, low nibble first
    X_scales [E, Out, In / 32]       one e8m0 exponent per 32 values: 2 ** (s - 127)

    X[e, 32 g + k, o] = FP4_VALUES[nibble k of X_blocks[e, o, g]] * 2 ** (X_scales[e, o, g] - 127)

as transformers' `convert_moe_packed_tensors` dequantizes it, and config.json says
`"quantization_config": {"quant_method": "mxfp4", ...}`. Nothing else is quantized (the
biases, attention, router, embeddings stay bf16).

How reshard reads them, for any family (one mechanism with FP8's, see converters/fp8.py):

- `unpacked` turns each `X_blocks` / `X_scales` pair into one lazy tensor `X` (`Packed`) with
  the weight's own shape, so the family's table, plan and checks see the weight as if bf16.
- `convert --dtype bf16` reads `Packed` box by box: a rank reads only the blocks and scales
  of its own rows and 32-column groups, and writes plain bf16 (slice pushdown through the
  dequantization; `config.json` loses its quantization_config).
- By default the blocks and scales are written, kept MXFP4 (`keep_packed`): both take the
  weight's placements, moved to the dims that hold them (`packed_placement`: the last two
  swap). That is exact only when every rank's piece of the In dim is whole 32-value blocks;
  a layout that cuts a block is refused naming the parameter, the block and the layouts that
  fit (gpt-oss-120b's experts, I = 2880 = 90 blocks, split over expert tp2 but not tp4).
- The manifest records `{"quant_method": "mxfp4", "block_size": 32, "blocks": {X: X_blocks},
  "scales": {X: X_scales}}`; the runtime dequantizes each weight when its layer reads it
  (runtime/mxfp4.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from reshard.converters.lazy import Box, LazyTensor
from reshard.errors import ConversionError, LayoutError, ReshardError
from reshard.layout import Layout
from reshard.placements import Placement, Replicate, Shard, StridedShard, parse_placement
from reshard.plan import ParamPlan, check_divisible, placements_for

BLOCK = 32  # values per e8m0 scale
BLOCKS, SCALES = "_blocks", "_scales"  # X_blocks and X_scales hold weight X
# e2m1 codes 0-15: sign bit, then 2 exponent and 1 mantissa bits (transformers' FP4_VALUES).
FP4_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)
SCALE_BIAS = 127
# Expert rows dequantized at once: bounds the temporaries (a gpt-oss-120b expert is 17M values).
CHUNK_ELEMENTS = 1 << 24


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`blocks [*L, Out, G, 16]` (uint8) and `scales [*L, Out, G]` (e8m0) -> the weight
    `[*L, G * 32, Out]` in `dtype`, bit for bit as transformers' `convert_moe_packed_tensors`
    (a table lookup, then `ldexp`).

    >>> dequantize(torch.full((1, 1, 16), 0x21, dtype=torch.uint8),
    ...            torch.full((1, 1), 128, dtype=torch.uint8), torch.float32)[:2, 0].tolist()
    [1.0, 2.0]
    """
    *lead, out, groups, _ = blocks.shape
    if lead and blocks[0].numel() and blocks.numel() * 2 > CHUNK_ELEMENTS:
        result = torch.empty((*lead, groups * BLOCK, out), dtype=dtype, device=blocks.device)
        step = max(1, CHUNK_ELEMENTS // (2 * blocks[0].numel()))
        for a in range(0, lead[0], step):
            result[a : a + step] = dequantize(blocks[a : a + step], scales[a : a + step], dtype)
        return result
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    values = torch.empty((*lead, out, groups, 2 * 16), dtype=dtype, device=blocks.device)
    values[..., 0::2] = lut[(blocks & 0x0F).int()]
    values[..., 1::2] = lut[(blocks >> 4).int()]
    exponents = scales.to(torch.int32)[..., None] - SCALE_BIAS
    torch.ldexp(values, exponents, out=values)
    return values.view(*lead, out, groups * BLOCK).transpose(-2, -1).contiguous()


class Packed(LazyTensor):
    """An MXFP4 weight `[*L, In, Out]` read as its values, from its blocks and scales.

    A box is pushed down to the blocks and scales of its Out rows and of the 32-value
    groups covering its In range: a rank reads only those.
    """

    def __init__(
        self, blocks: LazyTensor, scales: LazyTensor, name: str, dtype: torch.dtype = torch.bfloat16
    ):
        *lead, out, groups, pair = blocks.shape
        if (
            blocks.dtype != torch.uint8
            or scales.dtype != torch.uint8
            or pair != 16
            or tuple(scales.shape) != tuple(blocks.shape[:-1])
        ):
            raise ConversionError(
                f"{name}: MXFP4 blocks {list(blocks.shape)} {blocks.dtype} and scales "
                f"{list(scales.shape)} {scales.dtype} are not uint8 [..., Out, In/32, 16] and "
                "[..., Out, In/32]"
            )
        self.blocks, self.scales, self.name = blocks, scales, name
        self.shape, self.dtype = (*lead, groups * BLOCK, out), dtype

    def children(self) -> Sequence[LazyTensor]:
        return (self.blocks, self.scales)

    def read(self, box: Box) -> torch.Tensor:
        *lead, (c0, c1), rows = box
        g0, g1 = c0 // BLOCK, -(-c1 // BLOCK)
        b = self.blocks.read((*lead, rows, (g0, g1), (0, 16)))
        s = self.scales.read((*lead, rows, (g0, g1)))
        return dequantize(b, s, self.dtype).narrow(-2, c0 - g0 * BLOCK, c1 - c0)


def is_mxfp4(config: Mapping[str, Any], keys: Sequence[str], model_type: str) -> bool:
    """Whether the checkpoint is MXFP4; refuse blocks without the config, or the reverse."""
    q = config.get("quantization_config")
    packed = sorted(k for k in keys if k.endswith(BLOCKS))
    if not isinstance(q, Mapping) or q.get("quant_method") != "mxfp4":
        if packed:
            has = f"quant_method {q.get('quant_method')!r}" if isinstance(q, Mapping) else "none"
            more = f" (+{len(packed) - 1} more)" if len(packed) > 1 else ""
            raise ConversionError(
                f"{model_type}: {packed[0]}{more}: MXFP4 weights (*_blocks, *_scales) need "
                'config.json\'s quantization_config {"quant_method": "mxfp4"}; this config has '
                f"{has}"
            )
        return False
    if not packed:
        raise ConversionError(
            "config.json quantization_config says mxfp4, but no tensor has _blocks (a "
            "dequantized copy that kept the config? drop quantization_config from config.json)"
        )
    return True


def unpacked(tensors: Mapping[str, LazyTensor]) -> dict[str, LazyTensor]:
    """`tensors` with each `X_blocks` / `X_scales` pair replaced by the weight `X` (`Packed`).

    Only 3-D fused expert weights are read (transformers reads MXFP4 into GPT-OSS's experts
    alone, and dequantizes them transposed, as `Packed` does).
    """
    stems = {k.removesuffix(BLOCKS) for k in tensors if k.endswith(BLOCKS)}
    scaled = {k.removesuffix(SCALES) for k in tensors if k.endswith(SCALES)}
    lone = sorted(stems ^ scaled)
    if lone:
        have, lack = (BLOCKS, SCALES) if lone[0] in stems else (SCALES, BLOCKS)
        raise ConversionError(f"{lone[0]}{have}: an MXFP4 tensor without its {lone[0]}{lack}")
    out: dict[str, LazyTensor] = {}
    for key, tensor in tensors.items():
        stem = key.removesuffix(BLOCKS)
        if key.endswith(BLOCKS) and stem in stems:
            if tensor.ndim != 4:
                raise ConversionError(
                    f"{key}: MXFP4 is read for fused 3-D expert weights [E, Out, In/32, 16] "
                    f"(GPT-OSS), not {list(tensor.shape)}"
                )
            out[stem] = Packed(tensor, tensors[stem + SCALES], stem)
        elif not (key.endswith(SCALES) and key.removesuffix(SCALES) in stems):
            out[key] = tensor
    return out


def packed_placement(placement: Placement, ndim: int) -> Placement:
    """Where a placement of an `ndim`-D weight `[*L, In, Out]` falls on its blocks / scales
    `[*L, Out, In / 32, ...]`: the last two dims swap (and back: the map is its own inverse)."""
    if isinstance(placement, Replicate):
        return placement
    dim = {ndim - 2: ndim - 1, ndim - 1: ndim - 2}.get(placement.dim, placement.dim)
    if isinstance(placement, StridedShard):
        return StridedShard(dim, placement.split_factor)
    return Shard(dim)


def _cut(p: ParamPlan, layout: Layout) -> int | None:
    """The local piece of the weight's In dim when a split cuts a 32-value block, else None."""
    from reshard.converters.fp8 import misaligned

    blocks = (1,) * (len(p.shape) - 2) + (BLOCK, 1)
    bad = misaligned(p.shape, p.placements, layout.mesh_shape, blocks)
    return bad[1] if bad else None


def _fits(weights: list[ParamPlan], layout: Layout, fits_model: Callable[[Layout], None]) -> bool:
    """Whether `layout` fits the model and gives every MXFP4 weight whole blocks."""
    try:
        fits_model(layout)
        for p in weights:
            q = ParamPlan(
                name=p.name,
                shape=p.shape,
                dtype=p.dtype,
                styles=p.styles,
                placements=placements_for(p.styles, len(p.shape), layout),
            )
            check_divisible(q, layout)
            if _cut(q, layout) is not None:
                return False
    except ReshardError:
        return False
    return True


def check_blocks(
    weights: list[ParamPlan],
    layout: Layout,
    nearby: Sequence[Layout],
    fits_model: Callable[[Layout], None],
) -> None:
    """Refuse a layout whose split cuts an MXFP4 block of a weight (its scale could not
    follow it), naming the parameter, the block and the layouts among `nearby` that fit.
    `fits_model` raises for a layout the model itself does not fit."""
    for p in weights:
        piece = _cut(p, layout)
        if piece is None:
            continue
        fits = [c.name for c in nearby if _fits(weights, c, fits_model)]
        raise LayoutError(
            f"layout {layout.name}: {p.name} {list(p.shape)} splits its In dim "
            f"({len(p.shape) - 2}) into pieces of {piece}, not whole MXFP4 blocks of {BLOCK}; "
            f"layouts that fit: {', '.join(fits) or 'none near ' + layout.name}, or --dtype bf16"
        )


@dataclass
class MXFP4Plan:
    """What a conversion does with an MXFP4 source: `packed` {weight: (blocks, scales)} kept
    as they are, or none of them when `--dtype` dequantized every weight."""

    packed: dict[str, tuple[str, str]]
    dtype_name: str = "keep"

    def record(self) -> dict | None:
        """The manifest's `quantization` entry, or None once dequantized."""
        if not self.packed:
            return None
        return {
            "quant_method": "mxfp4",
            "block_size": BLOCK,
            "blocks": {w: b for w, (b, _) in self.packed.items()},
            "scales": {w: s for w, (_, s) in self.packed.items()},
        }

    def note(self) -> str | None:
        if self.packed:
            return None
        return (
            f"dequantized from MXFP4 (blocks of {BLOCK}) to {self.dtype_name} while converting; "
            "config.json has no quantization_config"
        )


def keep_packed(
    targets: dict[str, LazyTensor],
    params: dict[str, ParamPlan],
    layout: Layout,
    nearby: Sequence[Layout],
    fits_model: Callable[[Layout], None],
) -> tuple[dict[str, LazyTensor], dict[str, ParamPlan], MXFP4Plan]:
    """Targets and params with every MXFP4 weight replaced by its blocks and scales, each
    placed as the weight is (on the dims that hold them), in the weight's place."""
    weights = [params[n] for n, t in targets.items() if isinstance(t, Packed)]
    check_blocks(weights, layout, nearby, fits_model)
    new_targets, new_params, packed = {}, {}, {}
    for name, tensor in targets.items():
        p = params[name]
        if not isinstance(tensor, Packed):
            new_targets[name], new_params[name] = tensor, p
            continue
        place = functools.partial(packed_placement, ndim=len(p.shape))
        for suffix, leaf in ((BLOCKS, tensor.blocks), (SCALES, tensor.scales)):
            q = ParamPlan(
                name=name + suffix,
                shape=tuple(leaf.shape),
                dtype=leaf.dtype,
                styles=p.styles,
                placements=tuple(place(pl) for pl in p.placements),
            )
            check_divisible(q, layout)
            new_targets[q.name], new_params[q.name] = leaf, q
        packed[name] = (name + BLOCKS, name + SCALES)
    return new_targets, new_params, MXFP4Plan(packed)


def weight_params(params: Mapping[str, ParamPlan], quantization: Mapping) -> dict[str, ParamPlan]:
    """The manifest's params with each MXFP4 weight's blocks read back as the weight (its
    shape, and the placements it was cut by) and its scales left out: what the runtime runs."""
    weight_of = {b: w for w, b in quantization["blocks"].items()}
    scales = set(quantization["scales"].values())
    out = {}
    for name, p in params.items():
        if name in scales:
            continue
        if name not in weight_of:
            out[name] = p
            continue
        *lead, rows, groups, _ = p.shape
        ndim = len(p.shape) - 1
        out[weight_of[name]] = ParamPlan(
            name=weight_of[name],
            shape=(*lead, groups * BLOCK, rows),
            dtype=torch.bfloat16,
            styles=p.styles,
            placements=tuple(packed_placement(pl, ndim) for pl in p.placements),
        )
    return out


def record_problem(q: Mapping, params: Mapping[str, Mapping]) -> tuple[str, str] | None:
    """(where, what) of the first thing wrong with a manifest's MXFP4 record, else None: every
    uint8 parameter is the blocks or the scales of one weight, shaped as each other, and placed
    alike, never split inside a byte's 16-pair row."""
    where = "quantization"
    if set(q) != {"quant_method", "block_size", "blocks", "scales"}:
        return where, f"keys {sorted(q)}, not block_size, blocks, quant_method, scales"
    if q["block_size"] != BLOCK:
        return f"{where}.block_size", f"{q['block_size']!r}, the only supported is {BLOCK}"
    blocks, scales = q["blocks"], q["scales"]
    if not isinstance(blocks, dict) or not isinstance(scales, dict) or set(blocks) != set(scales):
        return where, "blocks and scales must map the same weights to parameter names"
    named = [*blocks.values(), *scales.values()]
    uint8 = {n for n, e in params.items() if isinstance(e, Mapping) and e.get("dtype") == "U8"}
    if set(named) != uint8 or len(set(named)) != len(named):
        return where, "blocks and scales must name every uint8 parameter, each once"
    for weight, b in blocks.items():
        at = f"{where}.blocks[{weight[:120]!r}]"
        pb, ps = params[b], params[scales[weight]]
        if len(pb["shape"]) != 4 or pb["shape"][-1] != 16 or ps["shape"] != pb["shape"][:-1]:
            return (
                at,
                f"blocks {pb['shape']} and scales {ps['shape']} are not [E, Out, G, 16] / [E, Out, G]",
            )
        if pb["placements"] != ps["placements"] or any(
            getattr(parse_placement(pl), "dim", None) == 3 for pl in pb["placements"]
        ):
            return at, "blocks and scales must be placed alike, never split along a block's bytes"
    return None
