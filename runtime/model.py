"""A single-device MoE causal LM in plain PyTorch, built from `ModelArgs`.

This file is the textbook model and nothing else: it imports nothing from
``torch.distributed``. How it is split across ranks lives beside it (the
parallelize module swaps weights for local shards, shrinks the head counts on
``Attention`` and wraps the routed experts), in the style of gpt-fast's
``model.py`` / ``tp.py``.

One set of blocks covers every family (see ``reshard.architecture``): attention
with qk-norm per head or over the whole projection, qkv bias, q/k/v clipping and
partial RoPE, sliding windows and attention sinks; MoE with a softmax, sigmoid or
top-k-then-softmax router, router biases, group-limited top-k, routed scaling, expert
biases and GPT-OSS's clamped SwiGLU, shared experts with or without a gate, and dense
layers.
Parameter names are exactly transformers', and the model holds exactly
``param_shapes(args)``, so a transformers ``state_dict()`` loads here with
``strict=True``.

Example:
    >>> args = ModelArgs(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
    ...                  num_kv_heads=2, head_dim=8, intermediate_size=64,
    ...                  moe_intermediate_size=16, num_experts=8, top_k=2)
    >>> model = CausalLM(args)
    >>> model(torch.tensor([[1, 2, 3]])).shape
    torch.Size([1, 3, 128])
"""

# Shape suffixes (logical dims, not the local shard):
#   B = batch, T = tokens in this step, S = tokens attended to (cache + this step)
#   V = vocab, H = hidden, F = dense MLP intermediate
#   N = query heads, G = kv heads, D = head dim, R = rotary dims
#   E = experts, I = expert intermediate (gate_up_EIH holds 2I rows: gate, then up)
#   K = top-k, M = routed (token, expert) pairs = T * K

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from reshard.architecture import ModelArgs, YaRN
from reshard.runtime.indexed_experts import indexed_linear, indexed_runs
from reshard.runtime.rope import yarn_inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def mean_square(self, x32: torch.Tensor) -> torch.Tensor:
        """Mean of squares over the last dim. A tensor parallelizer that splits that dim
        over ranks swaps this for one that sums the statistic across them."""
        return x32.pow(2).mean(-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the scale, as transformers does,
        # so bf16 runs round at the same place as the reference.
        if "mean_square" in vars(self):  # swapped by a parallelizer: the statistic spans ranks
            x32 = x.float()
            normed = (x32 * torch.rsqrt(self.mean_square(x32) + self.eps)).to(x.dtype)
        else:
            # The same math in one kernel: F.rms_norm computes in fp32 and rounds once to x's
            # dtype, so neither the upcast nor the downcast is a pass over memory of its own.
            normed = F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        return self.weight * normed


def rope_cos_sin(
    positions: torch.Tensor,
    rotary_dim: int,
    theta: float,
    dtype: torch.dtype,
    interleaved: bool = False,
    yarn: YaRN | None = None,
    polar: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for the given positions, over the first `rotary_dim` dims of a head
    (YaRN-scaled when `yarn` is given: its frequencies, cos and sin times its scale).

    Computed per call rather than kept in a buffer: it is R/2 x T elements, and
    a buffer would be cast by ``model.to(bfloat16)`` and lost on meta-device init.

    Args:
        positions: ``[T]``, or ``[B, T]`` when rows sit at different positions (left padding).
        polar: cos and sin from ``torch.polar``, as transformers' DeepSeek-V2 takes them (on
            CPU they can differ from ``torch.cos``'s in the last bit).

    Returns:
        ``(cos, sin)`` of shape ``positions.shape + (R,)`` in ``dtype``: each half repeated
        (rotate-half convention), or each frequency twice in a row (``interleaved``: pairs
        (2i, 2i + 1), Llama 4).
    """
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, rotary_dim, 2, dtype=torch.float, device=positions.device) / rotary_dim)
    )
    if yarn is not None:
        inv_freq = yarn_inv_freq(yarn, rotary_dim, theta, positions.device)
    freqs = positions.float()[..., None] * inv_freq
    if interleaved:
        emb = freqs.repeat_interleave(2, dim=-1)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    scale = 1.0 if yarn is None else yarn.cos_sin_scale  # in fp32, before the cast (transformers)
    if polar:
        cis = torch.polar(torch.ones_like(emb), emb)
        return (cis.real * scale).to(dtype), (cis.imag * scale).to(dtype)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(
    x_BNTD: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor, interleaved: bool = False
) -> torch.Tensor:
    """Rotate the first R dims of each head (all of them unless RoPE is partial)."""
    R = cos_TR.shape[-1]
    x_BNTR, x_pass = x_BNTD[..., :R], x_BNTD[..., R:]
    if interleaved:  # pair (2i, 2i + 1) -> (-x[2i + 1], x[2i])
        pairs = x_BNTR.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    else:
        half = R // 2
        rotated = torch.cat((-x_BNTR[..., half:], x_BNTR[..., :half]), dim=-1)
    out_BNTR = x_BNTR * cos_TR + rotated * sin_TR
    return torch.cat((out_BNTR, x_pass), dim=-1) if x_pass.shape[-1] else out_BNTR


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation without a weight, in fp32 (Llama 4's qk norm)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


Position = int | torch.Tensor  # a cache slot: a Python int, or a 0-d device tensor


class KVCache:
    """Per-layer key/value tensors for incremental decoding.

    Storage is allocated lazily on a layer's first update, from the shape of the
    keys it receives, so a parallelizer that shrinks a layer's kv heads needs no
    say here. ``max_seq_len`` bounds the preallocation.

    Rows of a batch may be left-padded to a common length: ``pad_B[b]`` leading slots of
    row b hold no token, so its first real token sits in slot ``pad_B[b]`` at position 0.

    ``start_pos`` (the slot of a step's first token) is an int, or a 0-d device tensor: then
    ``update`` writes with ``index_copy_`` and returns the whole preallocation, so a decode
    step has the same shapes at every position and needs no host round trip (a CUDA graph
    can replay it). Attention masks the slots not written yet (``attention_mask``).

    Example:
        >>> cache = KVCache(max_seq_len=64)
        >>> logits_BTV = model(prompt_BT, start_pos=0, cache=cache)  # doctest: +SKIP
        >>> logits_BTV = model(next_B1, start_pos=prompt_BT.shape[1], cache=cache)  # doctest: +SKIP
    """

    def __init__(self, max_seq_len: int, pad_B: torch.Tensor | None = None) -> None:
        self.max_seq_len = max_seq_len
        self.pad_B = pad_B
        self.k_BGSD: dict[int, torch.Tensor] = {}
        self.v_BGSD: dict[int, torch.Tensor] = {}
        self._masks: dict[tuple, torch.Tensor | None] = {}

    def begin_step(self) -> None:
        """A new forward: the masks of the last one no longer hold."""
        self._masks.clear()

    def attention_mask(
        self,
        start_pos: Position,
        T: int,
        S: int,
        chunk: int | None,
        window: int | None,
        device: torch.device,
    ) -> torch.Tensor | None:
        """``attention_mask`` for this cache's rows, made once per step and shared by the
        layers: in a replayed decode step, a few kernels instead of a few per layer."""
        key = (T, S, chunk, window)
        if key not in self._masks:
            self._masks[key] = attention_mask(start_pos, T, S, self.pad_B, chunk, device, window)
        return self._masks[key]

    def update(
        self, layer_idx: int, start_pos: Position, k_BGTD: torch.Tensor, v_BGTD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values at ``start_pos`` and return all of them so far
        (with a tensor ``start_pos``: all ``max_seq_len`` slots)."""
        T = k_BGTD.shape[2]
        if isinstance(start_pos, int) and start_pos + T > self.max_seq_len:
            raise ValueError(
                f"sequence length ({start_pos + T}) exceeds the KV cache max_seq_len "
                f"({self.max_seq_len})"
            )
        if layer_idx not in self.k_BGSD:
            B, G, _, D = k_BGTD.shape
            self.k_BGSD[layer_idx] = k_BGTD.new_zeros(B, G, self.max_seq_len, D)
            self.v_BGSD[layer_idx] = v_BGTD.new_zeros(B, G, self.max_seq_len, v_BGTD.shape[-1])
        k_cache, v_cache = self.k_BGSD[layer_idx], self.v_BGSD[layer_idx]
        if isinstance(start_pos, torch.Tensor):
            slots_T = start_pos + torch.arange(T, device=k_cache.device)
            k_cache.index_copy_(2, slots_T, k_BGTD)
            v_cache.index_copy_(2, slots_T, v_BGTD)
            return k_cache, v_cache
        end = start_pos + T
        k_cache[:, :, start_pos:end] = k_BGTD
        v_cache[:, :, start_pos:end] = v_BGTD
        return k_cache[:, :, :end], v_cache[:, :, :end]


def token_positions(
    start_pos: Position, T: int, pad_B: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """``[1 or B, T]`` positions of a step's tokens: their slots, less each row's left padding
    (pad slots get 0: their outputs are never used)."""
    slots_1T = (start_pos + torch.arange(T, device=device))[None]
    if pad_B is None:
        return slots_1T
    return (slots_1T - pad_B[:, None]).clamp(min=0)


def attention_mask(
    start_pos: Position,
    T: int,
    S: int,
    pad_B: torch.Tensor | None,
    chunk: int | None,
    device,
    window: int | None = None,
) -> torch.Tensor | None:
    """``[1 or B, 1, T, S]`` bool: which of the S cached slots each of the T queries sees.

    ``chunk``: only keys of the query's own chunk of positions (Llama 4). ``window``: only the
    last ``window`` positions, the query's own included (GPT-OSS's sliding layers).

    None where SDPA needs no explicit mask: no padding, positions known on the host, and
    either a square causal step (``is_causal``) or one decode query that sees every key (an
    all-True mask would keep SDPA off its fast kernels).
    """
    if (
        isinstance(start_pos, int)
        and pad_B is None
        and (chunk is None or S <= chunk)
        and (window is None or S <= window)
    ):
        if S == T or T == 1:
            return None
    q_slot_T1 = (start_pos + torch.arange(T, device=device))[:, None]
    k_slot_S = torch.arange(S, device=device)
    mask_BTS = (k_slot_S <= q_slot_T1)[None]  # causal; also hides slots not written yet
    pad_B11 = 0
    if pad_B is not None:
        pad_B11 = pad_B[:, None, None]
        # Not the other rows' padding; a pad query sees itself, so no row is empty (NaN).
        mask_BTS = (mask_BTS & (k_slot_S >= pad_B11)) | (k_slot_S == q_slot_T1)
    if chunk is not None:  # Llama 4: only keys of the query's own chunk, by position
        mask_BTS = mask_BTS & ((k_slot_S - pad_B11) // chunk == (q_slot_T1 - pad_B11) // chunk)
    if window is not None:  # a row's padding shifts its keys and queries alike: slots will do
        mask_BTS = mask_BTS & (k_slot_S > q_slot_T1 - window)
    return mask_BTS[:, None]


def sink_attention(
    q_BNTD: torch.Tensor,
    k_BGSD: torch.Tensor,
    v_BGSD: torch.Tensor,
    mask: torch.Tensor | None,
    sinks_N: torch.Tensor,
) -> torch.Tensor:
    """Causal softmax attention with a learned logit per head in the denominator (GPT-OSS's
    attention sinks): ``softmax([q.k_s / sqrt(D) for s; sink])`` with the sink's share dropped,
    so a head can attend to nothing.

    SDPA has no such term, so the softmax is computed here, as transformers' eager path does
    (max subtracted, in the scores' dtype). ``mask`` is ``attention_mask``'s (None: causal).

    Returns:
        ``[B, N, T, D]``, like SDPA.
    """
    B, N, T, D = q_BNTD.shape
    S, repeat = k_BGSD.shape[2], N // k_BGSD.shape[1]
    k_BNSD = k_BGSD.repeat_interleave(repeat, dim=1)
    v_BNSD = v_BGSD.repeat_interleave(repeat, dim=1)
    scores_BNTS = (q_BNTD @ k_BNSD.transpose(-2, -1)) * D**-0.5
    if mask is None:  # a square causal step, or one query that sees every key
        mask = torch.ones(T, S, dtype=torch.bool, device=q_BNTD.device).tril(S - T)
    scores_BNTS = scores_BNTS.masked_fill(~mask, float("-inf"))
    sinks_BNT1 = sinks_N.to(scores_BNTS.dtype).view(1, N, 1, 1).expand(B, N, T, 1)
    logits_BNTS = torch.cat([scores_BNTS, sinks_BNT1], dim=-1)
    logits_BNTS = logits_BNTS - logits_BNTS.max(dim=-1, keepdim=True).values
    probs_BNTS = F.softmax(logits_BNTS, dim=-1, dtype=logits_BNTS.dtype)[..., :-1]
    return probs_BNTS.to(v_BNSD.dtype) @ v_BNSD


class Attention(nn.Module):
    """GQA with the variants of ``args``: q/k RMSNorm per head (Qwen3) or over the whole
    projection (OLMoE) or none, qkv bias, q/k/v clipping, partial RoPE, chunked or
    sliding-window layers, attention sinks (GPT-OSS).

    ``n_heads`` and ``n_kv_heads`` are the heads *this module holds*; a tensor
    parallelizer that shards q/k/v column-wise sets them to the local counts.
    """

    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = args.num_heads
        self.n_kv_heads = args.num_kv_heads
        self.head_dim = args.head_dim
        self.clip = args.clip_qkv
        self.norm_per_head = args.qk_norm == "head"
        self.use_rope = layer_idx not in args.nope_layers
        self.rope_interleaved = args.rope_interleaved
        self.l2_eps = args.rms_norm_eps if args.qk_norm == "l2" and self.use_rope else None
        self.temperature = None if self.use_rope else args.attn_temperature
        self.chunk = args.attention_chunk_size if layer_idx in args.chunked_layers else None
        self.window = args.sliding_window if layer_idx in args.sliding_layers else None
        H, D, bias = args.hidden_size, args.head_dim, args.qkv_bias
        self.q_proj = nn.Linear(H, args.num_heads * D, bias=bias)
        self.k_proj = nn.Linear(H, args.num_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(H, args.num_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(args.num_heads * D, H, bias=args.o_bias)
        # One per head: a tensor parallelizer splits it with the heads.
        self.sinks = nn.Parameter(torch.zeros(args.num_heads)) if args.attention_sinks else None
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if args.qk_norm == "head":  # over head_dim: per head, unchanged under TP
            self.q_norm = RMSNorm(D, args.rms_norm_eps)
            self.k_norm = RMSNorm(D, args.rms_norm_eps)
        elif args.qk_norm == "projection":
            self.q_norm = RMSNorm(args.num_heads * D, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.num_kv_heads * D, args.rms_norm_eps)

    def _project(self, x_BTH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as ``[B, T, heads, D]``, normalised and clipped as the family does."""
        B, T, _ = x_BTH.shape
        D = self.head_dim
        q, k, v = self.q_proj(x_BTH), self.k_proj(x_BTH), self.v_proj(x_BTH)
        if self.q_norm is not None and not self.norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q_BTND = q.view(B, T, self.n_heads, D)
        k_BTGD = k.view(B, T, self.n_kv_heads, D)
        if self.q_norm is not None and self.norm_per_head:
            q_BTND, k_BTGD = self.q_norm(q_BTND), self.k_norm(k_BTGD)
        return q_BTND, k_BTGD, v.view(B, T, self.n_kv_heads, D)

    def forward(
        self,
        x_BTH: torch.Tensor,
        cos_TR: torch.Tensor,
        sin_TR: torch.Tensor,
        start_pos: Position = 0,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x_BTH.shape
        q_BTND, k_BTGD, v_BTGD = self._project(x_BTH)
        q_BNTD, k_BGSD, v_BGSD = (
            q_BTND.transpose(1, 2),
            k_BTGD.transpose(1, 2),
            v_BTGD.transpose(1, 2),
        )
        if self.use_rope:
            q_BNTD = apply_rope(q_BNTD, cos_TR, sin_TR, self.rope_interleaved)
            k_BGSD = apply_rope(k_BGSD, cos_TR, sin_TR, self.rope_interleaved)
        if self.l2_eps is not None:
            q_BNTD, k_BGSD = l2_norm(q_BNTD, self.l2_eps), l2_norm(k_BGSD, self.l2_eps)
        pad_B = cache.pad_B if cache is not None else None
        if self.temperature is not None:
            floor_scale, attn_scale = self.temperature
            pos_BT = token_positions(start_pos, T, pad_B, x_BTH.device).float()
            scale_BT = torch.log1p(torch.floor((pos_BT + 1.0) / floor_scale)) * attn_scale + 1.0
            q_BNTD = (q_BNTD * scale_BT[:, None, :, None]).to(q_BNTD.dtype)
        if cache is not None:
            k_BGSD, v_BGSD = cache.update(self.layer_idx, start_pos, k_BGSD, v_BGSD)
        S = k_BGSD.shape[2]
        if cache is not None:
            mask = cache.attention_mask(start_pos, T, S, self.chunk, self.window, x_BTH.device)
        else:
            mask = attention_mask(start_pos, T, S, None, self.chunk, x_BTH.device, self.window)
        if self.sinks is not None:
            out_BNTD = sink_attention(q_BNTD, k_BGSD, v_BGSD, mask, self.sinks)
        else:
            # With no mask, a square step is causal (SDPA's own, fast, top-left aligned mask).
            out_BNTD = F.scaled_dot_product_attention(
                q_BNTD,
                k_BGSD,
                v_BGSD,
                attn_mask=mask,
                is_causal=mask is None and S == T > 1,
                enable_gqa=True,
            )
        return self.o_proj(out_BNTD.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """Dense SwiGLU MLP, used by the layers in ``mlp_only_layers``."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x_BTH: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_BTH)) * self.up_proj(x_BTH))


class Router(nn.Module):
    """Top-k router; its weight is ``mlp.gate.weight [E, H]``.

    "softmax": softmax over all experts, top-k, optionally renormalised (Qwen, Mixtral,
    OLMoE), times ``routed_scaling_factor``; the choice may be limited to the best
    ``topk_group`` of ``n_group`` groups, each ranked by its best expert (DeepSeek-V2).
    "sigmoid": sigmoid scores; the choice adds ``e_score_correction_bias`` and may be
    limited to the best groups, each ranked by its best two experts; the weights are the
    chosen scores, optionally renormalised, times ``routed_scaling_factor`` (GLM-4.5,
    DeepSeek-V3). "topk_softmax": the top-k logits (the router Linear may have a ``bias``),
    softmax over those k (GPT-OSS).
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k = args.top_k
        self.kind = args.router
        self.norm_topk_prob = args.norm_topk_prob
        self.n_group, self.topk_group = args.n_group, args.topk_group
        self.group_score = args.group_score
        self.logits_fp32 = args.router_logits_fp32
        self.scaling = args.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(args.num_experts, args.hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        self.bias = nn.Parameter(torch.zeros(args.num_experts)) if args.router_logit_bias else None
        if args.router_bias:  # a buffer, as in transformers: loaded, never trained
            self.register_buffer("e_score_correction_bias", torch.zeros(args.num_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(topk_ids_TK, topk_weights_TK)``; weights in ``x_TH``'s dtype."""
        if self.kind == "sigmoid":
            ids_TK, weights_TK = self._sigmoid(x_TH)
        elif self.kind == "topk_softmax":
            ids_TK, weights_TK = self._topk_softmax(x_TH)
        else:
            ids_TK, weights_TK = self._softmax(x_TH)
        return ids_TK, weights_TK.to(x_TH.dtype)

    def _topk_softmax(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # transformers (GPT-OSS): logits and the softmax over the chosen in the model dtype.
        logits_TE = F.linear(x_TH, self.weight, self.bias)
        values_TK, ids_TK = torch.topk(logits_TE, self.top_k, dim=-1)
        return ids_TK, F.softmax(values_TK, dim=-1, dtype=values_TK.dtype)

    def _softmax(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # transformers 5.24: logits in the model dtype (DeepSeek-V2: in fp32, from the router
        # weight it keeps in fp32), softmax and renormalisation in fp32. Matching it keeps
        # bf16 routing decisions (ties) identical.
        if self.logits_fp32:
            logits_TE = F.linear(x_TH.float(), self.weight.float())
        else:
            logits_TE = F.linear(x_TH, self.weight)
        probs_TE = F.softmax(logits_TE, dim=-1, dtype=torch.float32)
        if self.n_group > 1:  # DeepSeek-V2 zeroes the other groups and takes the top-k of that
            choice_TE = self._best_groups_only(probs_TE, 0.0)
            weights_TK, ids_TK = torch.topk(choice_TE, self.top_k, dim=-1, sorted=False)
        else:
            weights_TK, ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        if self.scaling != 1.0:
            weights_TK = weights_TK * self.scaling
        return ids_TK, weights_TK

    def _best_groups_only(self, choice_TE: torch.Tensor, fill: float) -> torch.Tensor:
        """``choice_TE`` with every expert outside the best ``topk_group`` of the ``n_group``
        groups set to ``fill``; a group ranks by its best expert ("max") or the sum of its
        best two ("top2_sum")."""
        T, E = choice_TE.shape
        per_group_TGX = choice_TE.view(T, self.n_group, E // self.n_group)
        if self.group_score == "max":
            group_scores_TG = per_group_TGX.max(dim=-1).values
        else:
            group_scores_TG = per_group_TGX.topk(2, dim=-1).values.sum(dim=-1)
        groups_TK = group_scores_TG.topk(self.topk_group, dim=-1, sorted=False).indices
        keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
        keep_TG.scatter_(1, groups_TK, True)
        keep_TE = keep_TG[:, :, None].expand_as(per_group_TGX).reshape(T, E)
        return choice_TE.masked_fill(~keep_TE, fill)

    def _sigmoid(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores_TE = F.linear(x_TH.float(), self.weight.float()).sigmoid()  # fp32, as transformers
        choice_TE = scores_TE
        if self.e_score_correction_bias is not None:
            choice_TE = scores_TE + self.e_score_correction_bias.float()
        if self.n_group > 1:
            choice_TE = self._best_groups_only(choice_TE, float("-inf"))
        ids_TK = choice_TE.topk(self.top_k, dim=-1, sorted=False).indices
        weights_TK = scores_TE.gather(1, ids_TK)
        if self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return ids_TK, weights_TK * self.scaling


def grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether experts run as ``torch._grouped_mm`` with device-side offsets (no host sync),
    rather than a loop over host-side counts."""
    # grouped_mm kernels are CUDA bf16 on SM80+; on CPU the kernel exists but its
    # backward fails for experts that got no tokens (torch 2.13), so CPU loops.
    return (
        device.type == "cuda"
        and dtype == torch.bfloat16
        and hasattr(torch, "_grouped_mm")
        and torch.cuda.get_device_capability(device) >= (8, 0)
    )


def _grouped_linear(
    x: torch.Tensor,
    weight_in_out: torch.Tensor,
    offsets_E: torch.Tensor,
    bias_E: torch.Tensor | None = None,
    expert_M: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [M, in]`` row group e times ``weight_in_out[e]`` (``[E, in, out]``), plus
    ``bias_E[e]`` (``[E, out]``; ``expert_M`` names each row's expert): a Linear per expert."""
    grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    y = grouped_mm(x, weight_in_out, offs=offsets_E)
    return y if bias_E is None else y + bias_E[expert_M]


def _looped_linear(
    x: torch.Tensor,
    weight_in_out: torch.Tensor,
    counts: list[int],
    bias_E: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same as ``_grouped_linear`` with host-side counts, one matmul per expert."""
    if bias_E is None:
        return torch.cat([x_e @ weight_in_out[e] for e, x_e in enumerate(x.split(counts))])
    return torch.cat([x_e @ weight_in_out[e] + bias_E[e] for e, x_e in enumerate(x.split(counts))])


@dataclass(frozen=True)
class GatedActivation:
    """An expert's ``[M, 2I]`` gate/up outputs -> ``[M, I]``.

    ``interleaved``: gate and up alternate column by column (GPT-OSS), else all gates then
    all ups. ``limit``: GPT-OSS's clamped SwiGLU, ``(clamp(up, -limit, limit) + 1) * g *
    sigmoid(alpha * g)`` with ``g = clamp(gate, max=limit)``; None: ``silu(gate) * up``.
    Either way a TP slice of matching gate and up columns maps to the same slice of I.
    """

    interleaved: bool = False
    limit: float | None = None
    alpha: float = 1.702

    def __call__(self, gate_up_MI: torch.Tensor) -> torch.Tensor:
        if self.interleaved:
            gate_MI, up_MI = gate_up_MI[..., 0::2], gate_up_MI[..., 1::2]
        else:
            gate_MI, up_MI = gate_up_MI.chunk(2, dim=-1)
        if self.limit is None:
            return F.silu(gate_MI) * up_MI
        gate_MI = gate_MI.clamp(max=self.limit)
        up_MI = up_MI.clamp(-self.limit, self.limit)
        return (up_MI + 1) * (gate_MI * torch.sigmoid(gate_MI * self.alpha))


SWIGLU = GatedActivation()


def grouped_expert_mlp(
    x_MH: torch.Tensor,
    counts_E: torch.Tensor,
    gate_up_EIH: torch.Tensor,
    down_EHI: torch.Tensor,
    transposed: bool = False,
    *,
    act: GatedActivation = SWIGLU,
    gate_up_bias_EI: torch.Tensor | None = None,
    down_bias_EH: torch.Tensor | None = None,
) -> torch.Tensor:
    """SwiGLU of each expert over its contiguous block of rows.

    Rows must already be sorted by expert: the first ``counts_E[0]`` rows go to
    expert 0, the next ``counts_E[1]`` to expert 1, and so on. Experts are the
    *local* ones (index 0 is the first expert this rank holds), and
    ``gate_up_EIH`` may be a TP slice ``[gate_r; up_r]``: it is split in halves.

    On CUDA bf16 this is two ``torch._grouped_mm`` calls with int32 offsets; else
    a loop over experts (not tokens), one pair of matmuls each.

    Args:
        x_MH: ``[M, H]`` routed rows, grouped by expert.
        counts_E: ``[E]`` integer rows per expert, summing to M.
        gate_up_EIH: ``[E, 2I, H]`` gate rows then up rows.
        down_EHI: ``[E, H, I]``.
        transposed: the weights are stored ``[E, H, 2I]`` and ``[E, I, H]`` instead (Llama 4).
        act: how gate and up combine (``GatedActivation``; plain SwiGLU by default).
        gate_up_bias_EI / down_bias_EH: per-expert biases ``[E, 2I]`` / ``[E, H]`` (GPT-OSS).

    Returns:
        ``[M, H]`` expert outputs, unweighted, in the same row order.

    Example:
        >>> x_MH = torch.randn(5, 4)
        >>> y_MH = grouped_expert_mlp(x_MH, torch.tensor([2, 0, 3]),
        ...                           torch.randn(3, 6, 4), torch.randn(3, 4, 3))
        >>> y_MH.shape
        torch.Size([5, 4])
    """
    gate_up, down = gate_up_EIH, down_EHI
    if not transposed:
        gate_up, down = gate_up.transpose(-2, -1), down.transpose(-2, -1)
    if grouped_mm_runs(x_MH.device, x_MH.dtype):
        offsets_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
        expert_M = None
        if gate_up_bias_EI is not None or down_bias_EH is not None:
            # Each row's expert; output_size keeps repeat_interleave off the host.
            experts_E = torch.arange(len(counts_E), device=x_MH.device)
            expert_M = experts_E.repeat_interleave(counts_E, output_size=x_MH.shape[0])
        h_MI = act(_grouped_linear(x_MH, gate_up, offsets_E, gate_up_bias_EI, expert_M))
        return _grouped_linear(h_MI, down, offsets_E, down_bias_EH, expert_M)
    counts = counts_E.tolist()
    h_MI = act(_looped_linear(x_MH, gate_up, counts, gate_up_bias_EI))
    return _looped_linear(h_MI, down, counts, down_bias_EH)


def inverse_permutation(order_M: torch.Tensor) -> torch.Tensor:
    """``argsort(order_M)`` of a permutation, as one scatter instead of a sort."""
    inverse_M = torch.empty_like(order_M)
    inverse_M[order_M] = torch.arange(len(order_M), device=order_M.device)
    return inverse_M


def expert_counts(ids_M: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[E]`` rows routed to each expert. Not ``bincount``: on CUDA it reads the largest id on
    the host, a sync per MoE layer that also keeps a step out of a CUDA graph."""
    return ids_M.new_zeros(num_experts).index_add_(0, ids_M, torch.ones_like(ids_M))


class Experts(nn.Module):
    """Routed experts as fused 3-D weights (transformers v5 layout).

    ``forward`` is the whole local computation: run each (token, expert) pair through its
    expert (sorted by expert into ``grouped_expert_mlp``, or, for the few rows of a decode
    step on CUDA, each row reading its own expert: ``indexed_experts``), then weight and sum
    the top-k outputs. An
    EP dispatcher wraps or replaces it; the expert count is read from the
    weight, so a module holding a slice of the experts works unchanged.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        E, H, inter = args.num_experts, args.hidden_size, args.moe_intermediate_size
        self.transposed = args.experts_transposed
        self.scale_input = args.expert_input_scaling
        self.act = GatedActivation(args.experts_interleaved, args.swiglu_limit, args.swiglu_alpha)
        bias = args.expert_bias
        # Registered in transformers' order: each weight, then its bias (GPT-OSS).
        if self.transposed:
            self.gate_up_proj = nn.Parameter(torch.empty(E, H, 2 * inter))
        else:
            self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * inter, H))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * inter)) if bias else None
        if self.transposed:
            self.down_proj = nn.Parameter(torch.empty(E, inter, H))
        else:
            self.down_proj = nn.Parameter(torch.empty(E, H, inter))
        self.down_proj_bias = nn.Parameter(torch.zeros(E, H)) if bias else None
        # How much of down_proj_bias this module adds: 1, or 0 on all but one rank of a group
        # whose partial outputs (an I-slice each) are summed, so the bias enters the sum once.
        # 0 * bias rather than no bias: every rank's bias then has a gradient to sum.
        self.down_bias_share = 1.0
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def forward(
        self, x_TH: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor
    ) -> torch.Tensor:
        """Weighted sum over each token's chosen experts.

        Args:
            x_TH: ``[T, H]`` tokens.
            topk_ids_TK: ``[T, K]`` expert indices into this module's experts.
            topk_weights_TK: ``[T, K]`` routing weights.

        Returns:
            ``[T, H]``.
        """
        T, K = topk_ids_TK.shape
        ids_M = topk_ids_TK.reshape(-1)
        # Routed row m is token m // K's choice m % K, and reads x_RH[m // rows_per_x].
        x_RH, rows_per_x = x_TH, K
        if self.scale_input:  # Llama 4 weights the experts' input; its experts have no bias
            x_RH, rows_per_x = (x_TH[:, None, :] * topk_weights_TK[..., None]).flatten(0, 1), 1
            topk_weights_TK = torch.ones_like(topk_weights_TK)
        down_bias_EH = self.down_proj_bias
        if down_bias_EH is not None and self.down_bias_share != 1.0:
            down_bias_EH = down_bias_EH * self.down_bias_share
        if indexed_runs(x_TH, len(ids_M)):  # a few rows (decode): no sort
            y_MH = self._indexed(x_RH, rows_per_x, ids_M, down_bias_EH)
        else:
            y_MH = self._sorted(x_RH, rows_per_x, ids_M, down_bias_EH)
        y_TKH = y_MH.view(T, K, x_TH.shape[-1])  # -1 is ambiguous when T == 0
        # One batched [1, K] x [K, H] product per token: it reads the expert outputs once,
        # where a multiply and a sum would write and read them again.
        return torch.bmm(topk_weights_TK[:, None, :], y_TKH).squeeze(1)

    def _sorted(
        self,
        x_RH: torch.Tensor,
        rows_per_x: int,
        ids_M: torch.Tensor,
        down_bias_EH: torch.Tensor | None,
    ) -> torch.Tensor:
        """Expert outputs of the routed rows, in their order, through rows sorted by expert
        (``grouped_expert_mlp``)."""
        order_M = torch.argsort(ids_M, stable=True)
        counts_E = expert_counts(ids_M, self.gate_up_proj.shape[0])
        y_MH = grouped_expert_mlp(
            x_RH[order_M // rows_per_x],
            counts_E,
            self.gate_up_proj,
            self.down_proj,
            transposed=self.transposed,
            act=self.act,
            gate_up_bias_EI=self.gate_up_proj_bias,
            down_bias_EH=down_bias_EH,
        )
        # Un-sort with a gather instead of index_add_: same result, but deterministic on
        # CUDA (no atomics).
        return y_MH[inverse_permutation(order_M)]

    def _indexed(
        self,
        x_RH: torch.Tensor,
        rows_per_x: int,
        ids_M: torch.Tensor,
        down_bias_EH: torch.Tensor | None,
    ) -> torch.Tensor:
        """The same, each row reading its own expert's weights (``indexed_experts``)."""
        gate_up_ENK, down_ENK = self.gate_up_proj, self.down_proj
        if self.transposed:  # stored [E, in, out]: the kernel takes any strides
            gate_up_ENK, down_ENK = gate_up_ENK.transpose(-2, -1), down_ENK.transpose(-2, -1)
        h_MI = self.act(
            indexed_linear(x_RH, ids_M, gate_up_ENK, self.gate_up_proj_bias, rows_per_x)
        )
        return indexed_linear(h_MI, ids_M, down_ENK, down_bias_EH)


class MoE(nn.Module):
    """Routed experts, plus a shared expert (optionally sigmoid-gated) beside them.

    ``routed`` is the part an expert-parallel wrapper replaces: it sees the tokens,
    routes them and returns the weighted expert outputs. The shared expert is a dense
    MLP on every token, parallelised like any other.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        # Registration order as in transformers, so named_parameters() lists alike.
        self.experts = Experts(args)
        self.router_name = args.router_name  # `gate`, or `router` (Llama 4)
        self.add_module(self.router_name, Router(args))
        # The same module under a fixed name, outside _modules: parameter names stay the family's.
        self.__dict__["router"] = self._modules[self.router_name]
        self.shared_name = None
        if args.shared_expert_intermediate_size:
            self.shared_name = args.shared_expert_name
            shared = MLP(args.hidden_size, args.shared_expert_intermediate_size)
            self.add_module(self.shared_name, shared)
        self.shared_expert_gate = (
            nn.Linear(args.hidden_size, 1, bias=False) if args.shared_expert_gate else None
        )

    def routed(self, x_BTH: torch.Tensor) -> torch.Tensor:
        x_TH = x_BTH.reshape(-1, x_BTH.shape[-1])
        topk_ids_TK, topk_weights_TK = self.router(x_TH)
        return self.experts(x_TH, topk_ids_TK, topk_weights_TK).view_as(x_BTH)

    def forward(self, x_BTH: torch.Tensor) -> torch.Tensor:
        y_BTH = self.routed(x_BTH)
        if self.shared_name is not None:
            shared_BTH = getattr(self, self.shared_name)(x_BTH)
            if self.shared_expert_gate is not None:
                shared_BTH = torch.sigmoid(self.shared_expert_gate(x_BTH)) * shared_BTH
            y_BTH = y_BTH + shared_BTH
        return y_BTH


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        if args.mla is not None:
            from reshard.runtime.mla import MLAttention  # mla.py builds on this module's blocks

            self.self_attn: nn.Module = MLAttention(args, layer_idx)
        else:
            self.self_attn = Attention(args, layer_idx)
        self.mlp_name = args.mlp_name  # `mlp`, or `feed_forward` (Llama 4)
        if args.is_moe_layer(layer_idx):
            self.add_module(self.mlp_name, MoE(args))
        else:
            self.add_module(self.mlp_name, MLP(args.hidden_size, args.intermediate_size))
        # The same module under a fixed name, outside _modules: parameter names stay the family's.
        self.__dict__["mlp"] = self._modules[self.mlp_name]
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self,
        x_BTH: torch.Tensor,
        cos_TR: torch.Tensor,
        sin_TR: torch.Tensor,
        start_pos: Position = 0,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        h_BTH = x_BTH + self.self_attn(
            self.input_layernorm(x_BTH), cos_TR, sin_TR, start_pos, cache
        )
        return h_BTH + self.mlp(self.post_attention_layernorm(h_BTH))


class Transformer(nn.Module):
    """Embedding, decoder layers and final norm: the ``model.`` prefix of the names."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        # padding_idx as transformers: the pad token's row gets no gradient
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, args.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self, input_ids_BT: torch.Tensor, start_pos: Position = 0, cache: KVCache | None = None
    ) -> torch.Tensor:
        h_BTH = self.embed_tokens(input_ids_BT)
        args = self.args
        pad_B = None
        if cache is not None:
            cache.begin_step()
            pad_B = cache.pad_B
        positions_BT = token_positions(start_pos, input_ids_BT.shape[1], pad_B, h_BTH.device)
        cos_BTR, sin_BTR = rope_cos_sin(
            positions_BT,
            args.rotary_dim,
            args.rope_theta,
            torch.float32 if args.rope_fp32 else h_BTH.dtype,  # DeepSeek-V2 rotates in fp32
            args.rope_interleaved,
            yarn=args.yarn,
            polar=args.rope_fp32,
        )
        cos_TR, sin_TR = cos_BTR[:, None], sin_BTR[:, None]  # [B, 1, T, R]: broadcast over heads
        for layer in self.layers:
            h_BTH = layer(h_BTH, cos_TR, sin_TR, start_pos, cache)
        return self.norm(h_BTH)


class CausalLM(nn.Module):
    """The causal LM, with the parameter names of transformers' ``*ForCausalLM``.

    Example:
        >>> model = CausalLM(args)  # doctest: +SKIP
        >>> model.load_state_dict(hf_model.state_dict(), strict=True)  # doctest: +SKIP
        >>> logits_BTV = model(input_ids_BT)  # doctest: +SKIP
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = Transformer(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        start_pos: Position = 0,
        cache: KVCache | None = None,
        *,
        logits_from: int = 0,
    ) -> torch.Tensor:
        """Logits for ``input_ids_BT`` placed at positions ``start_pos ...``.

        Args:
            input_ids_BT: ``[B, T]`` token ids (rows left-padded as ``cache.pad_B`` says).
            start_pos: the cache slot of the first token (the number of tokens already in the
                cache); an int, or a 0-d device tensor for a step of static shapes.
            cache: keys/values of earlier steps, updated in place.
            logits_from: the first of the T tokens to compute logits for: generation
                needs only the last (``T - 1``), which spares the lm_head (and, under TP,
                the all-gather of vocab logits) every other prompt position.

        Returns:
            ``[B, T - logits_from, V]`` fp32 logits.
        """
        h_BTH = self.model(input_ids_BT, start_pos, cache)
        return self.lm_head(h_BTH[:, logits_from:]).float()


@contextmanager
def _skip_init() -> Iterator[None]:
    """No-op the nn.init functions: on meta tensors they do nothing useful, yet cost
    every rank a second or more (they import torch._dynamo)."""
    names = ["normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "zeros_", "ones_"]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def meta_model(args: ModelArgs) -> CausalLM:
    """The model with every tensor on the meta device: structure, no memory."""
    with torch.device("meta"), _skip_init():
        return CausalLM(args)


def causal_lm_loss(
    logits_BTV: torch.Tensor, labels_BT: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Next-token cross entropy, averaged over predicted tokens (transformers' ForCausalLMLoss).

    Position t predicts ``labels_BT[:, t + 1]``; the last position predicts
    nothing, and labels equal to ``ignore_index`` are skipped.

    Example:
        >>> causal_lm_loss(torch.zeros(1, 3, 5), torch.tensor([[1, 2, 3]]))
        tensor(1.6094)
    """
    logits_MV = logits_BTV[:, :-1].reshape(-1, logits_BTV.shape[-1]).float()
    labels_M = labels_BT[:, 1:].reshape(-1)
    return F.cross_entropy(logits_MV, labels_M, ignore_index=ignore_index)


__all__ = [
    "Attention",
    "CausalLM",
    "DecoderLayer",
    "Experts",
    "GatedActivation",
    "KVCache",
    "MLP",
    "MoE",
    "ModelArgs",
    "meta_model",
    "RMSNorm",
    "Router",
    "Transformer",
    "causal_lm_loss",
    "grouped_expert_mlp",
    "rope_cos_sin",
    "sink_attention",
]
