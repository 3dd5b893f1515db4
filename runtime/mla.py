"""Multi-head latent attention (MLA) of DeepSeek-V2 / V3 and Kimi-K2, as single-device code.

Queries come from a low-rank pair (``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj``) or one
``q_proj``. Keys and values come from a latent shared by every head: ``kv_a_proj_with_mqa``
gives the latent (normalised by ``kv_a_layernorm``) and one RoPE key for all heads, and
``kv_b_proj`` expands the latent into each head's non-RoPE key and its value. A head's query
and key are ``[nope dims; rope dims]``; its value has ``v_head_dim`` dims.

The KV cache holds the latent and the rotated RoPE key (``kv_lora_rank + qk_rope_head_dim``
numbers per token, for all heads together) and expands them at every step, as transformers
does; decode without that re-expansion (the up-projections absorbed into the query and the
output) would be a further optimisation.

Like ``Attention``, the module holds ``n_heads`` heads: a tensor parallelizer that splits the
per-head up-projections by rows (whole heads) and ``o_proj`` by columns sets it to the local
count; the low-rank projections and their norms stay whole on every rank.

Example:
    >>> from reshard.architecture import MLA, ModelArgs
    >>> args = ModelArgs(vocab_size=128, hidden_size=32, num_layers=1, num_heads=4,
    ...                  num_kv_heads=4, head_dim=12, rotary_dim=4, qk_norm="none",
    ...                  intermediate_size=64, moe_intermediate_size=16, num_experts=8, top_k=2,
    ...                  mla=MLA(q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
    ...                          qk_rope_head_dim=4, v_head_dim=6))
    >>> from reshard.runtime.model import rope_cos_sin
    >>> cos, sin = rope_cos_sin(torch.arange(3), 4, 10000.0, torch.float32)
    >>> MLAttention(args, layer_idx=0)(torch.randn(1, 3, 32), cos, sin).shape
    torch.Size([1, 3, 32])
"""

# Shape suffixes (logical dims, not the local shard):
#   B = batch, T = tokens in this step, S = tokens attended to (cache + this step), H = hidden
#   N = heads, Q = q_lora_rank, C = kv_lora_rank, P = qk_nope_head_dim, R = qk_rope_head_dim,
#   D = P + R (a query / key head), W = v_head_dim

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reshard.architecture import ModelArgs
from reshard.runtime.model import KVCache, Position, RMSNorm, apply_rope, attention_mask

# transformers and DeepSeek's own code build q_a_layernorm / kv_a_layernorm with the RMSNorm
# default eps, not the config's rms_norm_eps.
LATENT_NORM_EPS = 1e-6

__all__ = ["MLAttention", "pairs_to_halves"]


def pairs_to_halves(x: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE pairs ``(x0, x1), (x2, x3), ...`` -> ``[x0, x2, ...; x1, x3, ...]``.

    Rotating the halves then gives transformers' ``apply_rotary_pos_emb_interleave`` bit for
    bit (it writes its output in this order too); q and k move alike, so q . k is unchanged.
    """
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class MLAttention(nn.Module):
    """MLA with the parameter names of transformers' ``DeepseekV3Attention``."""

    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        mla = args.mla
        if mla is None:
            raise ValueError("MLAttention needs args.mla")
        self.layer_idx = layer_idx
        self.n_heads = args.num_heads
        self.nope_dim, self.rope_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim
        self.v_dim, self.latent_dim = mla.v_head_dim, mla.kv_lora_rank
        # DeepSeek's RoPE dims are interleaved pairs. V3 moves them to halves and rotates
        # those in the activations' dtype; V2 (`rope_interleaved`, `rope_fp32`) rotates the
        # pairs where they lie, as complex numbers in fp32, and casts the result back.
        self.to_halves = mla.rope_interleave and not args.rope_interleaved
        self.rotate_pairs = args.rope_interleaved
        self.rope_fp32 = args.rope_fp32
        # DeepSeek scales the softmax by YaRN's mscale twice over (on q and on k), on top of
        # the cos/sin scale; transformers' yarn_apply_mscale.
        self.scale = (self.nope_dim + self.rope_dim) ** -0.5
        if args.yarn is not None and args.yarn.mscale_all_dim:
            mscale = args.yarn.mscale_for(args.yarn.mscale_all_dim)
            self.scale = self.scale * mscale * mscale
        H, N, D = args.hidden_size, args.num_heads, self.nope_dim + self.rope_dim
        # Registration order as transformers', so named_parameters() lists alike.
        self.q_proj = nn.Linear(H, N * D, bias=False) if mla.q_lora_rank is None else None
        self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        if mla.q_lora_rank is not None:
            self.q_a_proj = nn.Linear(H, mla.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, N * D, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, self.latent_dim + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.latent_dim, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.latent_dim, N * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(N * self.v_dim, H, bias=False)

    def _queries(self, x_BTH: torch.Tensor) -> torch.Tensor:
        """``[B, N, T, D]`` queries, before RoPE."""
        B, T, _ = x_BTH.shape
        if self.q_proj is not None:
            q = self.q_proj(x_BTH)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTH)))
        return q.view(B, T, self.n_heads, self.nope_dim + self.rope_dim).transpose(1, 2)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.to_halves:
            x = pairs_to_halves(x)
        if self.rope_fp32:  # the tables are fp32 too (Transformer.forward)
            return apply_rope(x.float(), cos, sin, self.rotate_pairs).to(x.dtype)
        return apply_rope(x, cos, sin, self.rotate_pairs)

    def _keys_values(
        self, latent_B1SC: torch.Tensor, k_rope_B1SR: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent expanded to ``[B, N, S, D]`` keys and ``[B, N, S, W]`` values."""
        B, _, S, _ = latent_B1SC.shape
        kv_BNSX = (
            self.kv_b_proj(latent_B1SC[:, 0])
            .view(B, S, self.n_heads, self.nope_dim + self.v_dim)
            .transpose(1, 2)
        )
        k_nope_BNSP, v_BNSW = kv_BNSX.split([self.nope_dim, self.v_dim], dim=-1)
        k_rope_BNSR = k_rope_B1SR.expand(-1, self.n_heads, -1, -1)
        return torch.cat((k_nope_BNSP, k_rope_BNSR), dim=-1), v_BNSW

    def forward(
        self,
        x_BTH: torch.Tensor,
        cos_TR: torch.Tensor,
        sin_TR: torch.Tensor,
        start_pos: Position = 0,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x_BTH.shape
        q_nope_BNTP, q_rope_BNTR = self._queries(x_BTH).split([self.nope_dim, self.rope_dim], -1)
        latent_BTC, k_rope_BTR = self.kv_a_proj_with_mqa(x_BTH).split(
            [self.latent_dim, self.rope_dim], dim=-1
        )
        # One "head" each, so the cache stores them as it stores a layer's k and v.
        latent_B1SC = self.kv_a_layernorm(latent_BTC)[:, None]
        k_rope_B1SR = self._rope(k_rope_BTR[:, None], cos_TR, sin_TR)
        q_BNTD = torch.cat((q_nope_BNTP, self._rope(q_rope_BNTR, cos_TR, sin_TR)), dim=-1)
        if cache is not None:
            latent_B1SC, k_rope_B1SR = cache.update(
                self.layer_idx, start_pos, latent_B1SC, k_rope_B1SR
            )
        k_BNSD, v_BNSW = self._keys_values(latent_B1SC, k_rope_B1SR)
        S = k_BNSD.shape[2]
        if cache is not None:
            mask = cache.attention_mask(start_pos, T, S, None, None, x_BTH.device)
        else:
            mask = attention_mask(start_pos, T, S, None, None, x_BTH.device)
        # With no mask, a square step is causal (SDPA's own, fast, top-left aligned mask).
        out_BNTW = F.scaled_dot_product_attention(
            q_BNTD,
            k_BNSD,
            v_BNSW,
            attn_mask=mask,
            is_causal=mask is None and S == T > 1,
            scale=self.scale,
        )
        return self.o_proj(out_BNTW.transpose(1, 2).reshape(B, T, self.n_heads * self.v_dim))
