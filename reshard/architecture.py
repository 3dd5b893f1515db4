"""What every supported model is made of: typed hyper-parameters and the parameter table.

One decoder-only MoE architecture covers every family reshard supports; the
families differ in which variants they switch on (qk-norm per head or over the
whole projection, qkv bias, partial RoPE, softmax or sigmoid router, router
bias, group-limited top-k, shared experts with or without a gate, dense first
layers, GQA or DeepSeek's multi-head latent attention, plain or YaRN RoPE, GPT-OSS's
attention sinks, sliding windows, expert biases and clamped SwiGLU). `ModelArgs`
names those switches; a family's config parser (in
`reshard.converters`) fills them in from config.json.

`param_shapes(args)` is the table of every tensor the model holds: its
transformers parameter name and global shape. The converter reads it to know
its targets and the runtime model builds exactly these parameters (a test
holds the two, and transformers, to the same table), so conversion never needs
to build a model.

>>> args = ModelArgs(vocab_size=128, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
...                  head_dim=8, intermediate_size=64, moe_intermediate_size=16, num_experts=8,
...                  top_k=2)
>>> param_shapes(args)["model.layers.0.mlp.experts.gate_up_proj"]
(8, 32, 32)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

QK_NORMS = ("none", "head", "projection", "l2")
ROUTERS = ("softmax", "sigmoid", "topk_softmax")
GROUP_SCORES = ("top2_sum", "max")


@dataclass(frozen=True, kw_only=True)
class YaRN:
    """YaRN RoPE scaling (`rope_type: yarn`): each frequency is kept (fast rotations, beyond
    `beta_fast` turns over the original context), divided by `factor` (slow ones, under
    `beta_slow` turns), or blended linearly between; cos and sin are scaled by
    `cos_sin_scale`.

    Attributes are config.json's `rope_scaling` / `rope_parameters` fields;
    `attention_factor` is the explicit cos/sin scale, or None to derive it from `mscale` and
    `mscale_all_dim` as transformers does. `truncate` rounds the blend range to whole dims.
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if not self.factor > 0 or not self.original_max_position_embeddings > 0:
            raise ValueError(
                f"rope scaling factor ({self.factor}) and original_max_position_embeddings "
                f"({self.original_max_position_embeddings}) must be positive"
            )

    def mscale_for(self, weight: float) -> float:
        """YaRN's magnitude correction 0.1 * weight * ln(factor) + 1 (1 when not stretched)."""
        return 1.0 if self.factor <= 1 else 0.1 * weight * math.log(self.factor) + 1.0

    @property
    def cos_sin_scale(self) -> float:
        """What cos and sin are multiplied by (transformers' `attention_scaling`)."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return self.mscale_for(self.mscale) / self.mscale_for(self.mscale_all_dim)
        return self.mscale_for(1.0)


@dataclass(frozen=True, kw_only=True)
class MLA:
    """Multi-head latent attention (DeepSeek-V2 / V3, Kimi-K2): the sizes of its projections.

    Queries: `q_a_proj [q_lora_rank, H]` -> `q_a_layernorm` -> `q_b_proj [heads * (nope + rope),
    q_lora_rank]`, or one `q_proj` when `q_lora_rank` is None (DeepSeek-V2-Lite). Keys and
    values: `kv_a_proj_with_mqa [kv_lora_rank + rope, H]` gives a latent (normalised by
    `kv_a_layernorm`) and one RoPE key shared by every head; `kv_b_proj [heads * (nope + v),
    kv_lora_rank]` expands the latent to each head's non-RoPE key and its value.
    `rope_interleave`: the RoPE dims are interleaved pairs (DeepSeek's layout).
    """

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool = True

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        if self.q_lora_rank is not None and not (
            isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0
        ):
            raise ValueError(
                f"q_lora_rank ({self.q_lora_rank!r}) must be a positive integer or null"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even")


@dataclass(frozen=True, kw_only=True)
class ModelArgs:
    """Hyper-parameters of one model, validated once on construction.

    Attributes, beyond the usual sizes:
        qk_norm: "head" normalises q and k per head (Qwen3, weight [head_dim]);
            "projection" over the whole q / k projection (OLMoE, weight [heads * head_dim]);
            "l2": per head, no weight, after RoPE, on RoPE layers only (Llama 4).
        qkv_bias: q/k/v projections have biases (Qwen2-MoE, GLM-4.5); o_bias: o_proj too.
        rope_interleaved: RoPE rotates pairs (2i, 2i+1) (Llama 4), not the two halves. With
            MLA: rotates DeepSeek's interleaved pairs where they lie (DeepSeek-V2), rather than
            moving them to halves first (DeepSeek-V3, `mla.rope_interleave` alone).
        rope_fp32: RoPE as DeepSeek-V2's complex multiplication: fp32 tables (from
            torch.polar), the rotation in fp32, its result cast back; else tables and rotation
            in the activations' dtype.
        nope_layers: layers without RoPE (Llama 4); `attn_temperature` = (floor_scale,
            attn_scale) scales their queries by log1p(floor((pos + 1) / floor_scale)) *
            attn_scale + 1.
        chunked_layers: layers whose tokens attend only within `attention_chunk_size` chunks.
        sliding_layers: layers whose queries see only the last `sliding_window` positions,
            their own included (GPT-OSS's `layer_types` "sliding_attention").
        attention_sinks: each head has a learned logit `self_attn.sinks [N]` in its softmax
            denominator, a share of attention that goes to no token (GPT-OSS).
        clip_qkv: clamp q, k, v to [-clip, clip] after the projections (OLMoE), or None.
        rotary_dim: how many leading dims of each head RoPE rotates (GLM's partial RoPE).
        yarn: YaRN RoPE scaling, or None for plain RoPE.
        mla: multi-head latent attention's sizes (DeepSeek); None for GQA. With MLA,
            head_dim is a query/key head (nope + rope dims), rotary_dim the rope dims, and
            num_kv_heads equals num_heads (every head has its own key from the latent).
        router: "softmax" over all experts, then top-k; or "sigmoid" scores with a
            per-expert `e_score_correction_bias` for the choice only (GLM-4.5, DeepSeek-V3);
            or "topk_softmax": top-k of the logits, softmax over the k chosen (GPT-OSS).
        router_logits_fp32: the softmax router's logits in fp32, input and weight upcast
            (DeepSeek-V2); else in the activations' dtype. The sigmoid router's always are.
        router_logit_bias: the router Linear has a bias (`router.bias [E]`, a trained parameter
            added to the logits; GPT-OSS), unlike `router_bias`'s choice-only buffer.
        n_group / topk_group: group-limited top-k (the best topk_group of n_group groups).
        group_score: what ranks a group: "top2_sum", the sum of its best two experts' scores
            (DeepSeek-V3, GLM-4.5), or "max", its best expert's (DeepSeek-V2).
        routed_scaling_factor: multiplies the routed experts' weights.
        shared_expert_intermediate_size: a dense SwiGLU beside the routed experts (0: none),
            held as `mlp.<shared_expert_name>`; `shared_expert_gate` scales it by
            sigmoid(mlp.shared_expert_gate(x)) (Qwen2-MoE).
        dense_layers: layers with a dense MLP of `intermediate_size` instead of experts.
        expert_input_scaling: routing weights scale the experts' input, not their output
            (Llama 4).
        experts_transposed: expert weights stored [E, H, 2I] and [E, I, H] (Llama 4), not
            transformers v5's [E, 2I, H] and [E, H, I].
        experts_interleaved: the 2I gate/up outputs alternate gate, up, gate, ... (GPT-OSS),
            instead of all gates then all ups.
        expert_bias: experts have biases `gate_up_proj_bias [E, 2I]` and `down_proj_bias
            [E, H]` (GPT-OSS).
        swiglu_limit / swiglu_alpha: GPT-OSS's clamped SwiGLU, (clamp(up, -limit, limit) + 1) *
            g * sigmoid(alpha * g) with g = clamp(gate, max=limit); None: plain SwiGLU.
        mlp_name / router_name: the MLP block's and the router's module names.
        pad_token_id: the embedding row that gets no gradient (transformers' padding_idx).
    """

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
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rotary_dim: int | None = None
    yarn: YaRN | None = None
    mla: MLA | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    qk_norm: str = "head"
    qkv_bias: bool = False
    o_bias: bool = False
    rope_interleaved: bool = False
    rope_fp32: bool = False
    nope_layers: tuple[int, ...] = ()
    attn_temperature: tuple[float, float] | None = None
    chunked_layers: tuple[int, ...] = ()
    attention_chunk_size: int | None = None
    sliding_layers: tuple[int, ...] = ()
    sliding_window: int | None = None
    attention_sinks: bool = False
    clip_qkv: float | None = None
    router: str = "softmax"
    router_logits_fp32: bool = False
    norm_topk_prob: bool = False
    router_bias: bool = False
    router_logit_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "top2_sum"
    routed_scaling_factor: float = 1.0
    shared_expert_intermediate_size: int = 0
    shared_expert_name: str = "shared_expert"
    shared_expert_gate: bool = False
    dense_layers: tuple[int, ...] = field(default=())
    expert_input_scaling: bool = False
    experts_transposed: bool = False
    experts_interleaved: bool = False
    expert_bias: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    mlp_name: str = "mlp"
    router_name: str = "gate"

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
            "n_group",
            "topk_group",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        for name in ("dense_layers", "nope_layers", "chunked_layers", "sliding_layers"):
            object.__setattr__(self, name, tuple(sorted(set(getattr(self, name)))))
        if self.chunked_layers and not (self.attention_chunk_size or 0) > 0:
            raise ValueError("chunked attention layers need a positive attention_chunk_size")
        if self.sliding_layers and not (
            isinstance(self.sliding_window, int) and self.sliding_window > 0
        ):
            raise ValueError(
                f"sliding_window ({self.sliding_window!r}) must be a positive integer for the "
                "sliding-window layers"
            )
        if self.swiglu_limit is not None and not self.swiglu_limit > 0:
            raise ValueError(f"swiglu_limit ({self.swiglu_limit}) must be positive")
        if self.rotary_dim is None:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) is not divisible by num_kv_heads ({self.num_kv_heads})"
            )
        if not 0 < self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise ValueError(
                f"rotary dims ({self.rotary_dim}) must be even and in (0, head_dim ({self.head_dim})]"
            )
        if self.mla is not None:
            self._check_mla(self.mla)
        if self.rope_fp32 and self.mla is None:
            raise ValueError("rope_fp32 is implemented for MLA attention, not GQA")
        if (
            self.qk_norm not in QK_NORMS
            or self.router not in ROUTERS
            or self.group_score not in GROUP_SCORES
        ):
            raise ValueError(
                f"qk_norm {self.qk_norm!r} / router {self.router!r} / group_score "
                f"{self.group_score!r}: unknown"
            )
        if self.num_experts < 0:
            raise ValueError(f"num_experts ({self.num_experts}) must not be negative")
        if self.num_experts and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k ({self.top_k}) must be in [1, num_experts ({self.num_experts})]"
            )
        if self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(
                f"n_group ({self.n_group}) must divide num_experts ({self.num_experts}) and "
                f"topk_group ({self.topk_group}) be in [1, n_group]"
            )
        if self.n_group > 1 and self.router == "topk_softmax":
            raise ValueError(
                "group-limited top-k is implemented for the softmax and sigmoid routers"
            )
        if (
            self.n_group > 1
            and self.group_score == "top2_sum"
            and self.num_experts // self.n_group < 2
        ):
            raise ValueError("group-limited top-k scores each group by its best 2 experts")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id ({self.pad_token_id}) is outside the vocabulary")
        bad = [i for i in self.dense_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dense layers {bad} are outside [0, num_layers ({self.num_layers}))")
        bad = [i for i in self.sliding_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(
                f"sliding-window layers {bad} are outside [0, num_layers ({self.num_layers}))"
            )
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError(
                f"rms_norm_eps ({self.rms_norm_eps}) and rope_theta ({self.rope_theta}) must be positive"
            )
        if any(self.is_moe_layer(i) for i in range(self.num_layers)) and (
            self.moe_intermediate_size < 1
        ):
            raise ValueError(f"moe_intermediate_size ({self.moe_intermediate_size}) must be >= 1")
        if self.dense_layers and self.intermediate_size < 1:
            raise ValueError(f"intermediate_size ({self.intermediate_size}) must be >= 1")

    def _check_mla(self, mla: MLA) -> None:
        """MLA fixes the head sizes and has none of GQA's norms and biases."""
        qk = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        if (self.head_dim, self.rotary_dim, self.num_kv_heads) != (
            qk,
            mla.qk_rope_head_dim,
            self.num_heads,
        ):
            raise ValueError(
                f"MLA needs head_dim = nope + rope ({qk}), rotary_dim = rope "
                f"({mla.qk_rope_head_dim}) and num_kv_heads = num_heads ({self.num_heads}); got "
                f"{self.head_dim}, {self.rotary_dim}, {self.num_kv_heads}"
            )
        if self.qk_norm != "none" or self.qkv_bias or self.o_bias:
            raise ValueError("MLA has no qk norm and no biases")
        if self.rope_interleaved and not mla.rope_interleave:
            raise ValueError(
                "rope_interleaved rotates MLA's interleaved pairs in place; "
                "mla.rope_interleave is off"
            )
        if self.attention_sinks:
            raise ValueError("attention sinks are implemented for GQA attention, not MLA")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer `layer` has routed experts (else a dense MLP)."""
        return self.num_experts > 0 and layer not in self.dense_layers


def _linear(name: str, out: int, inp: int, bias: bool = False) -> dict[str, tuple[int, ...]]:
    shapes = {f"{name}.weight": (out, inp)}
    if bias:
        shapes[f"{name}.bias"] = (out,)
    return shapes


def _swiglu(prefix: str, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    return {
        **_linear(f"{prefix}.gate_proj", inter, hidden),
        **_linear(f"{prefix}.up_proj", inter, hidden),
        **_linear(f"{prefix}.down_proj", hidden, inter),
    }


def _mla_shapes(args: ModelArgs, mla: MLA) -> dict[str, tuple[int, ...]]:
    """MLA's tensors, in transformers' order (DeepseekV3Attention)."""
    H, N = args.hidden_size, args.num_heads
    qk = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    if mla.q_lora_rank is None:
        shapes = _linear("self_attn.q_proj", N * qk, H)
    else:
        shapes = {
            **_linear("self_attn.q_a_proj", mla.q_lora_rank, H),
            "self_attn.q_a_layernorm.weight": (mla.q_lora_rank,),
            **_linear("self_attn.q_b_proj", N * qk, mla.q_lora_rank),
        }
    return shapes | {
        **_linear("self_attn.kv_a_proj_with_mqa", mla.kv_lora_rank + mla.qk_rope_head_dim, H),
        "self_attn.kv_a_layernorm.weight": (mla.kv_lora_rank,),
        **_linear(
            "self_attn.kv_b_proj", N * (mla.qk_nope_head_dim + mla.v_head_dim), mla.kv_lora_rank
        ),
        **_linear("self_attn.o_proj", H, N * mla.v_head_dim),
    }


def _attention_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """GQA's tensors, or MLA's."""
    if args.mla is not None:
        return _mla_shapes(args, args.mla)
    H, D = args.hidden_size, args.head_dim
    q, kv = args.num_heads * D, args.num_kv_heads * D
    shapes = {
        **_linear("self_attn.q_proj", q, H, args.qkv_bias),
        **_linear("self_attn.k_proj", kv, H, args.qkv_bias),
        **_linear("self_attn.v_proj", kv, H, args.qkv_bias),
        **_linear("self_attn.o_proj", H, q, args.o_bias),
    }
    if args.attention_sinks:
        shapes["self_attn.sinks"] = (args.num_heads,)
    if args.qk_norm == "head":
        shapes |= {"self_attn.q_norm.weight": (D,), "self_attn.k_norm.weight": (D,)}
    elif args.qk_norm == "projection":
        shapes |= {"self_attn.q_norm.weight": (q,), "self_attn.k_norm.weight": (kv,)}
    return shapes


def layer_shapes(args: ModelArgs, layer: int) -> dict[str, tuple[int, ...]]:
    """The tensors of decoder layer `layer`, named from inside the layer (`self_attn.q_proj.weight`)."""
    H = args.hidden_size
    shapes = _attention_shapes(args)
    mlp = args.mlp_name
    if args.is_moe_layer(layer):
        E, inter = args.num_experts, args.moe_intermediate_size
        if args.experts_transposed:
            experts = {"gate_up_proj": (E, H, 2 * inter), "down_proj": (E, inter, H)}
        else:  # gate rows, then up rows
            experts = {"gate_up_proj": (E, 2 * inter, H), "down_proj": (E, H, inter)}
        if args.expert_bias:  # in transformers' order: each weight, then its bias
            experts = {
                "gate_up_proj": experts["gate_up_proj"],
                "gate_up_proj_bias": (E, 2 * inter),
                "down_proj": experts["down_proj"],
                "down_proj_bias": (E, H),
            }
        shapes |= {f"{mlp}.experts.{n}": s for n, s in experts.items()}
        shapes[f"{mlp}.{args.router_name}.weight"] = (E, H)
        if args.router_logit_bias:
            shapes[f"{mlp}.{args.router_name}.bias"] = (E,)
        if args.router_bias:
            shapes[f"{mlp}.{args.router_name}.e_score_correction_bias"] = (E,)
        if args.shared_expert_intermediate_size:
            name = f"{mlp}.{args.shared_expert_name}"
            shapes |= _swiglu(name, H, args.shared_expert_intermediate_size)
            if args.shared_expert_gate:
                shapes |= _linear(f"{mlp}.shared_expert_gate", 1, H)
    else:
        shapes |= _swiglu(mlp, H, args.intermediate_size)
    shapes |= {"input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,)}
    return shapes


def param_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model by its transformers name, with its global shape, in model order.

    With tied embeddings there is no `lm_head.weight`: the head reuses the embedding.
    """
    shapes = {"model.embed_tokens.weight": (args.vocab_size, args.hidden_size)}
    for i in range(args.num_layers):
        shapes |= {f"model.layers.{i}.{n}": s for n, s in layer_shapes(args, i).items()}
    shapes["model.norm.weight"] = (args.hidden_size,)
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, args.hidden_size)
    return shapes
