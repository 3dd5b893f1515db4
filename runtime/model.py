"""A single-device Qwen3-MoE causal LM in plain PyTorch.

This file is the textbook model and nothing else: it imports nothing from
``torch.distributed``. How it is split across ranks lives beside it (the
parallelize module swaps weights for local shards, shrinks the head counts on
``Attention`` and wraps or replaces ``Experts``), in the style of gpt-fast's
``model.py`` / ``tp.py``.

Parameter names are exactly those of transformers' ``Qwen3MoeForCausalLM``, so
its ``state_dict()`` loads here with ``strict=True`` and shards written under
those names need no renaming.

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
#   N = query heads, G = kv heads, D = head dim
#   E = experts, I = expert intermediate (gate_up_EIH holds 2I rows: gate, then up)
#   K = top-k, M = routed (token, expert) pairs = T * K

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(kw_only=True)
class ModelArgs:
    """Hyper-parameters of a Qwen3-MoE model, validated once on construction."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    top_k: int
    norm_topk_prob: bool = False
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    mlp_only_layers: list[int] = field(default_factory=list)
    decoder_sparse_step: int = 1
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "moe_intermediate_size",
            "max_position_embeddings",
            "decoder_sparse_step",
        ):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} ({value}) must be at least 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) is not divisible by num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even: RoPE rotates pairs")
        if self.num_experts < 0:
            raise ValueError(f"num_experts ({self.num_experts}) must not be negative")
        if self.num_experts and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k ({self.top_k}) must be in [1, num_experts ({self.num_experts})]"
            )
        bad = sorted(i for i in self.mlp_only_layers if not 0 <= i < self.num_layers)
        if bad:
            raise ValueError(
                f"mlp_only_layers has {bad}, outside [0, num_layers ({self.num_layers}))"
            )
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError(
                f"rms_norm_eps ({self.rms_norm_eps}) and rope_theta ({self.rope_theta}) must be positive"
            )

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` has routed experts (else a dense MLP), as transformers decides."""
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        """Parse a transformers ``config.json`` dict of a ``qwen3_moe`` model.

        Accepts both spellings found in the wild: ``num_experts`` (Qwen's own
        checkpoints) or ``num_local_experts`` (what transformers 5.x saves), and
        ``rope_theta`` or ``rope_parameters["rope_theta"]``. Features this model
        does not implement (sliding window, scaled RoPE, biases, other
        activations) are refused rather than silently ignored.

        Example:
            >>> import json
            >>> args = ModelArgs.from_hf_config(json.load(open("config.json")))  # doctest: +SKIP
        """
        model_type = cfg.get("model_type", "qwen3_moe")
        if model_type != "qwen3_moe":
            raise ValueError(f"model_type is {model_type!r}; this model implements 'qwen3_moe'")
        required = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "moe_intermediate_size",
            "num_experts_per_tok",
        )
        missing = [k for k in required if k not in cfg]
        if "num_experts" not in cfg and "num_local_experts" not in cfg:
            missing.append("num_experts (or num_local_experts)")
        missing.sort()
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")

        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope_type {rope_type!r} is not supported; only 'default' RoPE is")
        unsupported = {
            "hidden_act": (cfg.get("hidden_act", "silu"), "silu"),
            "attention_bias": (cfg.get("attention_bias", False), False),
            "use_sliding_window": (cfg.get("use_sliding_window", False), False),
        }
        for key, (value, expected) in unsupported.items():
            if value != expected:
                raise ValueError(f"{key} is {value!r}; this model supports only {expected!r}")

        num_heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            intermediate_size=cfg["intermediate_size"],
            moe_intermediate_size=cfg["moe_intermediate_size"],
            num_experts=cfg.get("num_experts", cfg.get("num_local_experts")),
            top_k=cfg["num_experts_per_tok"],
            norm_topk_prob=cfg.get("norm_topk_prob", False),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            mlp_only_layers=list(cfg.get("mlp_only_layers") or []),
            decoder_sparse_step=cfg.get("decoder_sparse_step", 1),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the scale, as transformers does,
        # so bf16 runs round at the same place as the reference.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(
    positions_T: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Default RoPE tables for the given positions.

    Computed per call rather than kept in a buffer: it is D/2 x T elements, and
    a buffer would be cast by ``model.to(bfloat16)`` and lost on meta-device init.

    Returns:
        ``(cos_TD, sin_TD)`` in ``dtype``, each half repeated (rotate-half convention).
    """
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions_T.device) / head_dim)
    )
    freqs_TD = positions_T.float()[:, None] * inv_freq[None, :]
    emb_TD = torch.cat((freqs_TD, freqs_TD), dim=-1)
    return emb_TD.cos().to(dtype), emb_TD.sin().to(dtype)


def apply_rope(x_BNTD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    half = x_BNTD.shape[-1] // 2
    rotated = torch.cat((-x_BNTD[..., half:], x_BNTD[..., :half]), dim=-1)
    return x_BNTD * cos_TD + rotated * sin_TD


class KVCache:
    """Per-layer key/value tensors for incremental decoding.

    Storage is allocated lazily on a layer's first update, from the shape of the
    keys it receives, so a parallelizer that shrinks a layer's kv heads needs no
    say here. ``max_seq_len`` bounds the preallocation.

    Example:
        >>> cache = KVCache(max_seq_len=64)
        >>> logits_BTV = model(prompt_BT, start_pos=0, cache=cache)  # doctest: +SKIP
        >>> logits_BTV = model(next_B1, start_pos=prompt_BT.shape[1], cache=cache)  # doctest: +SKIP
    """

    def __init__(self, max_seq_len: int) -> None:
        self.max_seq_len = max_seq_len
        self.k_BGSD: dict[int, torch.Tensor] = {}
        self.v_BGSD: dict[int, torch.Tensor] = {}

    def update(
        self, layer_idx: int, start_pos: int, k_BGTD: torch.Tensor, v_BGTD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values at ``start_pos`` and return all of them so far."""
        end = start_pos + k_BGTD.shape[2]
        if end > self.max_seq_len:
            raise ValueError(
                f"sequence length ({end}) exceeds the KV cache max_seq_len ({self.max_seq_len})"
            )
        if layer_idx not in self.k_BGSD:
            B, G, _, D = k_BGTD.shape
            self.k_BGSD[layer_idx] = k_BGTD.new_zeros(B, G, self.max_seq_len, D)
            self.v_BGSD[layer_idx] = v_BGTD.new_zeros(B, G, self.max_seq_len, D)
        k_cache, v_cache = self.k_BGSD[layer_idx], self.v_BGSD[layer_idx]
        k_cache[:, :, start_pos:end] = k_BGTD
        v_cache[:, :, start_pos:end] = v_BGTD
        return k_cache[:, :, :end], v_cache[:, :, :end]


class Attention(nn.Module):
    """GQA with per-head q/k RMSNorm before RoPE (Qwen3).

    ``n_heads`` and ``n_kv_heads`` are the heads *this module holds*; a tensor
    parallelizer that shards q/k/v column-wise sets them to the local counts.
    """

    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = args.num_heads
        self.n_kv_heads = args.num_kv_heads
        self.head_dim = args.head_dim
        H, D = args.hidden_size, args.head_dim
        self.q_proj = nn.Linear(H, args.num_heads * D, bias=False)
        self.k_proj = nn.Linear(H, args.num_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(H, args.num_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(args.num_heads * D, H, bias=False)
        # Over head_dim only, so they act per head and need no change under TP.
        self.q_norm = RMSNorm(D, args.rms_norm_eps)
        self.k_norm = RMSNorm(D, args.rms_norm_eps)

    def forward(
        self,
        x_BTH: torch.Tensor,
        cos_TD: torch.Tensor,
        sin_TD: torch.Tensor,
        start_pos: int = 0,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x_BTH.shape
        D = self.head_dim
        q_BNTD = self.q_norm(self.q_proj(x_BTH).view(B, T, self.n_heads, D)).transpose(1, 2)
        k_BGTD = self.k_norm(self.k_proj(x_BTH).view(B, T, self.n_kv_heads, D)).transpose(1, 2)
        v_BGTD = self.v_proj(x_BTH).view(B, T, self.n_kv_heads, D).transpose(1, 2)
        q_BNTD = apply_rope(q_BNTD, cos_TD, sin_TD)
        k_BGSD = apply_rope(k_BGTD, cos_TD, sin_TD)
        v_BGSD = v_BGTD
        if cache is not None:
            k_BGSD, v_BGSD = cache.update(self.layer_idx, start_pos, k_BGSD, v_BGSD)
        S = k_BGSD.shape[2]
        if S == T:
            # No past keys: the square causal mask is SDPA's own (and its fast path).
            out_BNTD = F.scaled_dot_product_attention(
                q_BNTD, k_BGSD, v_BGSD, is_causal=True, enable_gqa=True
            )
        else:
            # With a cache, query t sits at absolute position S - T + t and may see
            # keys up to it; SDPA's is_causal aligns top-left, which is wrong here.
            q_pos_T1 = torch.arange(S - T, S, device=x_BTH.device)[:, None]
            mask_TS = torch.arange(S, device=x_BTH.device)[None, :] <= q_pos_T1
            out_BNTD = F.scaled_dot_product_attention(
                q_BNTD, k_BGSD, v_BGSD, attn_mask=mask_TS, enable_gqa=True
            )
        return self.o_proj(out_BNTD.transpose(1, 2).reshape(B, T, self.n_heads * D))


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
    """Top-k softmax router; its weight is ``mlp.gate.weight [E, H]``."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k = args.top_k
        self.norm_topk_prob = args.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(args.num_experts, args.hidden_size))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(topk_ids_TK, topk_weights_TK)``; weights in ``x_TH``'s dtype."""
        # transformers 5.23: logits in the model dtype, softmax and renormalisation
        # in fp32, the chosen weights cast back. Matching it keeps bf16 routing
        # decisions (ties between experts) identical to the reference.
        logits_TE = F.linear(x_TH, self.weight)
        probs_TE = F.softmax(logits_TE, dim=-1, dtype=torch.float32)
        topk_weights_TK, topk_ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.norm_topk_prob:
            topk_weights_TK = topk_weights_TK / topk_weights_TK.sum(dim=-1, keepdim=True)
        return topk_ids_TK, topk_weights_TK.to(logits_TE.dtype)


def _use_grouped_mm(x: torch.Tensor) -> bool:
    # grouped_mm kernels are CUDA bf16 on SM80+; on CPU the kernel exists but its
    # backward fails for experts that got no tokens (torch 2.13), so CPU loops.
    return (
        x.is_cuda
        and x.dtype == torch.bfloat16
        and hasattr(torch, "_grouped_mm")
        and torch.cuda.get_device_capability(x.device) >= (8, 0)
    )


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """``x [M, in]`` row group e times ``weight[e].T`` (``weight [E, out, in]``): a Linear per expert."""
    grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return grouped_mm(x, weight.transpose(-2, -1), offs=offsets_E)


def _looped_linear(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Same as ``_grouped_linear`` with host-side counts, one matmul per expert."""
    return torch.cat([F.linear(x_e, weight[e]) for e, x_e in enumerate(x.split(counts))])


def grouped_expert_mlp(
    x_MH: torch.Tensor,
    counts_E: torch.Tensor,
    gate_up_EIH: torch.Tensor,
    down_EHI: torch.Tensor,
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

    Returns:
        ``[M, H]`` expert outputs, unweighted, in the same row order.

    Example:
        >>> x_MH = torch.randn(5, 4)
        >>> y_MH = grouped_expert_mlp(x_MH, torch.tensor([2, 0, 3]),
        ...                           torch.randn(3, 6, 4), torch.randn(3, 4, 3))
        >>> y_MH.shape
        torch.Size([5, 4])
    """
    if _use_grouped_mm(x_MH):
        offsets_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
        gate_MI, up_MI = _grouped_linear(x_MH, gate_up_EIH, offsets_E).chunk(2, dim=-1)
        return _grouped_linear(F.silu(gate_MI) * up_MI, down_EHI, offsets_E)
    counts = counts_E.tolist()
    gate_MI, up_MI = _looped_linear(x_MH, gate_up_EIH, counts).chunk(2, dim=-1)
    return _looped_linear(F.silu(gate_MI) * up_MI, down_EHI, counts)


class Experts(nn.Module):
    """Routed experts as fused 3-D weights (transformers v5 layout).

    ``forward`` is the whole local computation: sort the (token, expert) pairs
    by expert, run ``grouped_expert_mlp``, weight and sum the top-k outputs. An
    EP dispatcher wraps or replaces it; the expert count is read from the
    weight, so a module holding a slice of the experts works unchanged.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        E, H, inter = args.num_experts, args.hidden_size, args.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * inter, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, inter))
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
        order_M = torch.argsort(ids_M, stable=True)
        counts_E = torch.bincount(ids_M, minlength=self.gate_up_proj.shape[0])
        y_MH = grouped_expert_mlp(x_TH[order_M // K], counts_E, self.gate_up_proj, self.down_proj)
        # Un-sort and sum over k instead of index_add_: same result, but
        # deterministic on CUDA (no atomics) and every token gets exactly K rows.
        y_TKH = y_MH[torch.argsort(order_M)].view(
            T, K, x_TH.shape[-1]
        )  # -1 is ambiguous when T == 0
        return (y_TKH * topk_weights_TK[..., None]).sum(dim=1)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        # Registration order as in transformers, so named_parameters() lists alike.
        self.experts = Experts(args)
        self.gate = Router(args)

    def forward(self, x_BTH: torch.Tensor) -> torch.Tensor:
        x_TH = x_BTH.reshape(-1, x_BTH.shape[-1])
        topk_ids_TK, topk_weights_TK = self.gate(x_TH)
        return self.experts(x_TH, topk_ids_TK, topk_weights_TK).view_as(x_BTH)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(args, layer_idx)
        self.mlp: nn.Module
        if args.is_moe_layer(layer_idx):
            self.mlp = MoE(args)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self,
        x_BTH: torch.Tensor,
        cos_TD: torch.Tensor,
        sin_TD: torch.Tensor,
        start_pos: int = 0,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        h_BTH = x_BTH + self.self_attn(
            self.input_layernorm(x_BTH), cos_TD, sin_TD, start_pos, cache
        )
        return h_BTH + self.mlp(self.post_attention_layernorm(h_BTH))


class Transformer(nn.Module):
    """Embedding, decoder layers and final norm: the ``model.`` prefix of the names."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self, input_ids_BT: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None
    ) -> torch.Tensor:
        h_BTH = self.embed_tokens(input_ids_BT)
        positions_T = torch.arange(
            start_pos, start_pos + input_ids_BT.shape[1], device=h_BTH.device
        )
        cos_TD, sin_TD = rope_cos_sin(
            positions_T, self.args.head_dim, self.args.rope_theta, h_BTH.dtype
        )
        for layer in self.layers:
            h_BTH = layer(h_BTH, cos_TD, sin_TD, start_pos, cache)
        return self.norm(h_BTH)


class CausalLM(nn.Module):
    """Qwen3-MoE causal LM with transformers' ``Qwen3MoeForCausalLM`` parameter names.

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
        self, input_ids_BT: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Logits for ``input_ids_BT`` placed at positions ``start_pos ...``.

        Args:
            input_ids_BT: ``[B, T]`` token ids (no padding).
            start_pos: absolute position of the first token; with a cache, the
                number of tokens already in it.
            cache: keys/values of earlier steps, updated in place.

        Returns:
            ``[B, T, V]`` fp32 logits.
        """
        return self.lm_head(self.model(input_ids_BT, start_pos, cache)).float()


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
    "KVCache",
    "MLP",
    "MoE",
    "ModelArgs",
    "RMSNorm",
    "Router",
    "Transformer",
    "causal_lm_loss",
    "grouped_expert_mlp",
    "rope_cos_sin",
]
