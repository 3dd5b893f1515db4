"""MXFP4 shards at run time: each expert weight dequantized when its layer reads it.

A rank file of an MXFP4 checkpoint holds, for each quantized weight `X`, its local blocks
and scales (`X_blocks`, `X_scales`; the manifest's `quantization` names them). As for FP8
(runtime/fp8.py, whose parametrization this one extends), model.py is not touched: the
blocks are assigned to the model as `X` itself, and a `torch.nn.utils.parametrize`
parametrization turns every read of `module.X` into the dequantized weight
(`converters.mxfp4.dequantize`, bit for bit transformers' `convert_moe_packed_tensors`), held
only while its module's forward runs. The rank keeps 4.25 bits per weight in memory.

    scales = take_packed(state, manifest.quantization)   # blocks renamed to X, scales popped
    ... assign state to the model ...
    dequantize_on_access(model, scales, torch.bfloat16)
    parallelize(model, ..., weight_params(manifest params, manifest.quantization))
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from reshard.converters.mxfp4 import BLOCK, dequantize, weight_params
from reshard.runtime.fp8 import BlockDequantize

__all__ = ["MXFP4Dequantize", "dequantize_on_access", "take_packed", "weight_params"]


class MXFP4Dequantize(BlockDequantize):
    """The parametrization: blocks `[*L, Out, In / 32, 16]` -> the weight `[*L, In, Out]` in
    `dtype`, with this weight's scales (the `scale` buffer); held as FP8's while its module's
    forward runs."""

    def __init__(self, scales: torch.Tensor, dtype: torch.dtype):
        super().__init__(scales, (1, BLOCK), dtype)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        if self.held is not None:
            return self.held
        value = dequantize(blocks, self.scale, self.dtype)
        if self.hold:
            self.held = value
        return value


def take_packed(
    state: dict[str, torch.Tensor], quantization: dict | None
) -> dict[str, torch.Tensor]:
    """{weight name: its local scales}, popped from `state`, whose blocks move to the weight's
    name; {} unless the checkpoint is MXFP4."""
    if not quantization or quantization.get("quant_method") != "mxfp4":
        return {}
    scales = {}
    for weight, blocks in quantization["blocks"].items():
        state[weight] = state.pop(blocks)
        scales[weight] = state.pop(quantization["scales"][weight])
    return scales


def dequantize_on_access(
    model: nn.Module, scales: dict[str, torch.Tensor], dtype: torch.dtype
) -> None:
    """Make every weight named in `scales` (its blocks already assigned to `model`) read as its
    dequantized value in `dtype`, computed once per forward of the module that owns it."""
    owners: dict[str, list[MXFP4Dequantize]] = {}
    for name, scale in scales.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        dequant = MXFP4Dequantize(scale, dtype)
        parametrize.register_parametrization(module, attr, dequant, unsafe=True)
        owners.setdefault(owner, []).append(dequant)
    for owner, dequants in owners.items():
        module = model.get_submodule(owner)
        module.register_forward_pre_hook(lambda m, a, ds=dequants: _hold(ds))
        module.register_forward_hook(lambda m, a, y, ds=dequants: _release(ds))


def _hold(dequants: list[MXFP4Dequantize]) -> None:
    for d in dequants:
        d.hold = True


def _release(dequants: list[MXFP4Dequantize]) -> None:
    for d in dequants:
        d.release()
