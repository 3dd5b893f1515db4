"""FP8 block-scaled shards at run time: each weight dequantized when its layer reads it.

A rank file of an FP8 checkpoint holds `W` in float8_e4m3fn and its scale `W_scale_inv`
(the manifest's `quantization` names the pairs and the block size). The model code in
model.py is not touched: `dequantize_on_access` registers a
`torch.nn.utils.parametrize` parametrization on every such weight, so the module keeps
the float8 tensor (as `parametrizations.<name>.original`) and its scale (a buffer), and
every read of `module.<name>` returns

    W[..., i, j] = float32(W8[..., i, j]) * scale[..., i // br, j // bc]   (then the compute dtype)

as transformers' `Fp8Dequantize` computes it. The rank holds FP8 bytes; the compute-dtype
copy of one weight lives only while its layer runs (a module that reads its weight twice
in one forward dequantizes it twice: memory over speed). On a GPU, `torch._scaled_mm`
could run the matmul on the FP8 bytes instead; this dequantizing path is the one that
runs everywhere and is held to transformers by the tests.

    scales = take_scales(state, manifest.quantization)   # popped out of the rank's state
    ... assign state to the model ...
    dequantize_on_access(model, scales, manifest.quantization, torch.bfloat16)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

# Rows of the leading dim (experts) dequantized at once: bounds the fp32 temporaries.
CHUNK_ELEMENTS = 1 << 24


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """`weight [..., R, C]` (float8) times `scale [..., ceil(R/br), ceil(C/bc)]`, block by
    block, in fp32, returned in `dtype`.

    >>> dequantize(torch.ones(4, 4).to(torch.float8_e4m3fn), torch.tensor([[2.0]]), (4, 4),
    ...            torch.float32)[0, 0].item()
    2.0
    """
    R, C = weight.shape[-2:]
    if weight.ndim > 2 and weight[0].numel() and weight.numel() > CHUNK_ELEMENTS:
        out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
        step = max(1, CHUNK_ELEMENTS // weight[0].numel())
        for a in range(0, weight.shape[0], step):
            out[a : a + step] = dequantize(weight[a : a + step], scale[a : a + step], block, dtype)
        return out
    s = scale.float().repeat_interleave(block[0], dim=-2)[..., :R, :]
    s = s.repeat_interleave(block[1], dim=-1)[..., :C]
    return (weight.float() * s).to(dtype)


class BlockDequantize(nn.Module):
    """The parametrization: float8 weight -> `dtype`, with this weight's `scale` (a buffer, so
    it moves with the module).

    While its module's forward runs (`hold`), the value is kept: the experts read their
    weights' shape and then the weights, which would dequantize them twice. It is dropped
    when that forward returns, so one layer's weights exist in `dtype` at a time.
    """

    def __init__(self, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype):
        super().__init__()
        self.register_buffer("scale", scale)
        self.block, self.dtype = block, dtype
        self.held: torch.Tensor | None = None
        self.hold = False

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.held is not None:
            return self.held
        value = dequantize(weight, self.scale, self.block, self.dtype)
        if self.hold:
            self.held = value
        return value

    def release(self) -> None:
        self.hold, self.held = False, None


def take_scales(
    state: dict[str, torch.Tensor], quantization: dict | None
) -> dict[str, torch.Tensor]:
    """{float8 weight name: its local scale}, the scales removed from `state`."""
    if not quantization:
        return {}
    return {weight: state.pop(scale) for weight, scale in quantization["scales"].items()}


def compute_dtype(state: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype the rest of the model is in (norms, embeddings): the FP8 weights join it."""
    dtypes = [t.dtype for n, t in state.items() if t.is_floating_point() and n not in scales]
    return max(set(dtypes), key=dtypes.count) if dtypes else torch.bfloat16


def dequantize_on_access(
    model: nn.Module, scales: dict[str, torch.Tensor], quantization: dict, dtype: torch.dtype
) -> None:
    """Make every float8 weight named in `scales` (already assigned to `model`) read as its
    dequantized value in `dtype`."""
    block = tuple(quantization["weight_block_size"])
    owners: dict[str, list[BlockDequantize]] = {}
    for name, scale in scales.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        getattr(module, attr).requires_grad_(False)  # float8 bytes are not trained here
        dequant = BlockDequantize(scale, block, dtype)
        parametrize.register_parametrization(module, attr, dequant, unsafe=True)
        owners.setdefault(owner, []).append(dequant)
    for owner, dequants in owners.items():
        module = model.get_submodule(owner)
        module.register_forward_pre_hook(lambda m, a, ds=dequants: _hold(ds, True))
        module.register_forward_hook(lambda m, a, y, ds=dequants: _hold(ds, False))


def _hold(dequants: list[BlockDequantize], on: bool) -> None:
    for d in dequants:
        if on:
            d.hold = True
        else:
            d.release()
