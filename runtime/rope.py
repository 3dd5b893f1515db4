"""YaRN RoPE frequencies (https://arxiv.org/abs/2309.00071), as transformers' `yarn` rope type
computes them, so a YaRN checkpoint runs with the positions it was trained for.

Frequencies that turn more than `beta_fast` times over the original context keep their value
(extrapolation), those turning fewer than `beta_slow` times are divided by `factor`
(interpolation), and the dims between blend linearly from one to the other.

Example:
    >>> from reshard.architecture import YaRN
    >>> yarn = YaRN(factor=4.0, original_max_position_embeddings=256)
    >>> yarn_inv_freq(yarn, rotary_dim=16, theta=10000.0).shape
    torch.Size([8])
"""

# Shape suffixes: F = rotary frequencies (rotary_dim / 2).

from __future__ import annotations

import math

import torch

from reshard.architecture import YaRN


def _turns_dim(turns: float, rotary_dim: int, theta: float, context: int) -> float:
    """The (fractional) frequency index whose wavelength fits `turns` times in `context`."""
    return rotary_dim * math.log(context / (turns * 2 * math.pi)) / (2 * math.log(theta))


def blend_range(yarn: YaRN, rotary_dim: int, theta: float) -> tuple[float, float]:
    """[low, high): frequency indices below low are kept, from high on interpolated."""
    context = yarn.original_max_position_embeddings
    low = _turns_dim(yarn.beta_fast, rotary_dim, theta, context)
    high = _turns_dim(yarn.beta_slow, rotary_dim, theta, context)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, rotary_dim - 1)


def yarn_inv_freq(
    yarn: YaRN, rotary_dim: int, theta: float, device: torch.device | None = None
) -> torch.Tensor:
    """``[R / 2]`` fp32 inverse frequencies of YaRN-scaled RoPE over `rotary_dim` dims."""
    base_F = theta ** (
        torch.arange(0, rotary_dim, 2, dtype=torch.float, device=device) / rotary_dim
    )
    low, high = blend_range(yarn, rotary_dim, theta)
    if low == high:
        high += 0.001  # a one-dim blend: a steep ramp, not a division by zero
    index_F = torch.arange(rotary_dim // 2, dtype=torch.float32, device=device)
    interpolated_share_F = ((index_F - low) / (high - low)).clamp(0, 1)
    kept_share_F = 1 - interpolated_share_F
    # Same association as transformers, so the fp32 tables agree bit for bit.
    return (1.0 / (yarn.factor * base_F)) * (1 - kept_share_F) + (1.0 / base_F) * kept_share_F
