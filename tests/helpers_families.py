"""Tiny, real Hugging Face MoE checkpoints written by transformers itself, for use as test oracles.

A converter that agrees with our own idea of a family's layout proves little; a checkpoint that
transformers wrote (`save_pretrained`) and can read back (`from_pretrained`) is the ground truth
for tensor names, shapes and the math. Each family here is tiny, but keeps the features that set
it apart (shared experts, biases, dense first layers, grouped routing, whole-projection q/k norm)
and is sized so that every layout up to 8 ranks divides it: 8 query heads, 4 kv heads, 8 experts,
hidden 64.

What transformers 5.24 does with these models (checked by tests/test_helpers_families.py):

* In memory the experts of a layer are fused: `mlp.experts.gate_up_proj` [E, 2*I, H] (gate rows
  first, then up) and `mlp.experts.down_proj` [E, H, I]. `save_pretrained` splits them back into
  the per-expert names the Hub uses, so the file and `state_dict()` disagree on those names:
  `mlp.experts.{e}.{gate,up,down}_proj.weight` for qwen2_moe / qwen3_moe / olmoe / glm4_moe,
  and for mixtral `block_sparse_moe.experts.{e}.w{1,3,2}.weight` with the router at
  `block_sparse_moe.gate.weight` (in memory: `mlp.gate.weight`).
* glm4_moe's `e_score_correction_bias` is a (persistent) buffer, not a parameter, yet it is in the
  checkpoint; rotary `inv_freq` buffers are non-persistent and are not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

VOCAB_SIZE = 256  # the 256 byte symbols of the byte-level tokenizer below, no merges
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2  # inside the vocabulary, so generate() does not warn

# Shared by every family: divisible by tp2/tp4/tp8 on heads (8) and by tp2/tp4 on kv heads (4).
COMMON: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
    "pad_token_id": PAD_ID,
    "eos_token_id": EOS_ID,
    "bos_token_id": BOS_ID,
}


@dataclass(frozen=True)
class FamilyCase:
    """One MoE family: how to build its transformers config, and where its experts live."""

    model_type: str
    config_class: str  # the name of the config class in `transformers`
    kwargs: dict[str, Any] = field(hash=False)  # config kwargs, COMMON included
    experts_key: str  # the checkpoint's name of expert 0's first matrix in layer {layer}
    first_moe_layer: int = 0  # layers before this one are dense (or there are none)

    def config(self) -> Any:
        """A fresh transformers config for this family."""
        import transformers

        return getattr(transformers, self.config_class)(**self.kwargs)


def _case(
    model_type: str,
    config_class: str,
    experts_key: str,
    first_moe_layer: int = 0,
    **kwargs: Any,
) -> FamilyCase:
    return FamilyCase(model_type, config_class, {**COMMON, **kwargs}, experts_key, first_moe_layer)


# deepseek_v3's and deepseek_v2's tiny shape: MLA (nope / rope / v head dims all different, 8
# kv heads as MLA has one key per head), 2 groups of 4 routed experts (1 kept), one dense first
# layer, scaled weights; YaRN stretches RoPE 4x (original context 256: frequencies 0-3 blend,
# 4-7 interpolate), and mscale_all_dim differs from mscale so both the cos/sin scale and the
# softmax scale move.
_TINY_DEEPSEEK = dict(
    num_key_value_heads=8,
    num_hidden_layers=3,
    n_routed_experts=8,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    moe_intermediate_size=32,
    intermediate_size=96,
    routed_scaling_factor=2.5,
    kv_lora_rank=20,
    qk_nope_head_dim=12,
    qk_rope_head_dim=16,
    v_head_dim=10,
    max_position_embeddings=1024,
    rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 256,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 0.8,
    },
)
FAMILIES: dict[str, FamilyCase] = {
    case.model_type: case
    for case in (
        # Qwen3MoeConfig has no head_dim field, but the model reads one (as real Qwen3-MoE configs
        # set it); q/k RMSNorm per head; no dense layers, so intermediate_size is unused.
        _case(
            "qwen3_moe",
            "Qwen3MoeConfig",
            "model.layers.{layer}.mlp.experts.0.gate_proj.weight",
            head_dim=16,
            num_hidden_layers=2,
            num_experts=8,
            moe_intermediate_size=32,
            intermediate_size=96,
            norm_topk_prob=True,
        ),
        # No head_dim: Qwen2MoeConfig has none and real configs don't set it, so 64 / 8 = 8.
        # Layer 0 dense (mlp_only_layers), layers 1-2 MoE with a sigmoid-gated shared expert.
        _case(
            "qwen2_moe",
            "Qwen2MoeConfig",
            "model.layers.{layer}.mlp.experts.0.gate_proj.weight",
            first_moe_layer=1,
            num_hidden_layers=3,
            num_experts=8,
            moe_intermediate_size=32,
            intermediate_size=96,
            shared_expert_intermediate_size=48,
            qkv_bias=True,  # 5.24's spelling; there is no attention_bias on this config
            norm_topk_prob=False,
            mlp_only_layers=[0],
        ),
        # intermediate_size is the expert size; renormalised top-k always; rms_norm_eps default.
        _case(
            "mixtral",
            "MixtralConfig",
            "model.layers.{layer}.block_sparse_moe.experts.0.w1.weight",
            head_dim=16,
            num_hidden_layers=2,
            num_local_experts=8,
            intermediate_size=32,
        ),
        # No head_dim: OLMoE's q_norm / k_norm span the whole projection and are sized from
        # hidden_size (q_norm [hidden], k_norm [hidden / heads * kv_heads]), so head_dim must be
        # hidden / heads = 8. intermediate_size is the expert size.
        _case(
            "olmoe",
            "OlmoeConfig",
            "model.layers.{layer}.mlp.experts.0.gate_proj.weight",
            num_hidden_layers=2,
            num_experts=8,
            intermediate_size=32,
            clip_qkv=None,
            norm_topk_prob=False,
        ),
        # Layer 0 dense, layers 1-2 MoE with sigmoid grouped top-k routing (2 groups, 1 kept),
        # e_score_correction_bias, one shared expert, scaled routing weights and half-rotary
        # RoPE (5.24 keeps partial_rotary_factor inside rope_parameters).
        _case(
            "glm4_moe",
            "Glm4MoeConfig",
            "model.layers.{layer}.mlp.experts.0.gate_proj.weight",
            first_moe_layer=1,
            head_dim=16,
            num_hidden_layers=3,
            n_routed_experts=8,
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            first_k_dense_replace=1,
            moe_intermediate_size=32,
            intermediate_size=96,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            attention_bias=True,
            use_qk_norm=False,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
            },
        ),
        # GLM-4.5's MoE (as above) behind multi-head latent attention (_TINY_DEEPSEEK): q
        # through a low-rank pair, keys and values from a latent, rope dims interleaved.
        _case(
            "deepseek_v3",
            "DeepseekV3Config",
            "model.layers.{layer}.mlp.experts.0.gate_proj.weight",
            first_moe_layer=1,
            **_TINY_DEEPSEEK,
            n_shared_experts=1,
            norm_topk_prob=True,
            q_lora_rank=32,
            rope_interleave=True,
        ),
        # DeepSeek-V2-Lite's shape (one q_proj: q_lora_rank null) with V2.5's grouped routing:
        # softmax scores, the better of 2 groups of 4 experts, each group ranked by its best
        # expert, scaled weights (not renormalised), two shared experts; MLA and YaRN as in
        # deepseek_v3 above, RoPE rotated as complex numbers in fp32.
        _case(
            "deepseek_v2",
            "DeepseekV2Config",
            "model.layers.{layer}.mlp.experts.0.gate_proj.weight",
            first_moe_layer=1,
            **_TINY_DEEPSEEK,
            topk_method="group_limited_greedy",
            n_shared_experts=2,
            q_lora_rank=None,
        ),
        # Already-fused experts stored [E, H, 2I] / [E, I, H], top-1 sigmoid router scaling the
        # experts' input, a shared expert, MoE on layers 1 and 3 (dense 0 and 2), layer 3
        # without RoPE (temperature-tuned queries, floor_scale 4 so it matters at 19 tokens),
        # chunked attention in chunks of 8 (so the prompts here cross chunks).
        _case(
            "llama4_text",
            "Llama4TextConfig",
            "model.layers.{layer}.feed_forward.experts.gate_up_proj",
            first_moe_layer=1,
            head_dim=16,
            num_hidden_layers=4,
            num_local_experts=8,
            num_experts_per_tok=1,
            interleave_moe_layer_step=2,
            intermediate_size=32,
            intermediate_size_mlp=96,
            attention_chunk_size=8,
            floor_scale=4,
        ),
        # Already-fused experts stored [E, H, 2I] / [E, I, H] with gate and up columns
        # alternating, expert biases, a router with a bias (top-k logits, then softmax), the
        # clamped SwiGLU (limit 2: it clips a good share of gate and up values here), attention
        # sinks, q/k/v/o biases, a sliding window of 4 on layers 0 and 2 (the prompts here cross
        # it) and full attention on layer 1, YaRN stretching RoPE 4x (original context 32).
        # intermediate_size 64: two MXFP4 blocks of 32, so an MXFP4 copy splits over expert tp2.
        _case(
            "gpt_oss",
            "GptOssConfig",
            "model.layers.{layer}.mlp.experts.gate_up_proj",
            head_dim=16,
            num_hidden_layers=3,
            num_local_experts=8,
            intermediate_size=64,
            sliding_window=4,
            swiglu_limit=2.0,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 32,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
            },
        ),
    )
}
# The families whose checkpoints hold one tensor per expert (all but Llama 4's fused ones).
PER_EXPERT = [name for name, case in FAMILIES.items() if ".experts.0." in case.experts_key]


def hf_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the checkpoint holds, under transformers' in-memory names, detached copies.

    That is `state_dict()`: parameters plus persistent buffers (glm4_moe's
    `e_score_correction_bias`), without non-persistent ones such as rotary `inv_freq`, which
    are recomputed from the config and never saved. Names are the in-memory ones (fused
    experts), not the file's.
    """
    persistent_buffers = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        for name, _ in module.named_buffers(recurse=False)
        if name not in module._non_persistent_buffers_set
    }
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    state = model.state_dict()
    unknown = set(state) - parameters - persistent_buffers
    assert not unknown, f"state_dict entries that are neither parameters nor buffers: {unknown}"
    return {name: t.detach().clone() for name, t in state.items()}


def _redraw(model: torch.nn.Module, seed: int) -> None:
    """Replace transformers' init, which makes greedy tokens and top-k routing hinge on ties.

    The default init is std 0.02 with norms all ones and biases zero: logits nearly uniform and
    router scores nearly equal, so any reordering of a float sum flips a token or an expert.
    Matrices get N(0, 0.2), norms 1 + N(0, 0.1), biases N(0, 0.1), drawn in `state_dict()`
    order from one seeded generator (buffers that are saved included).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():  # shares storage with the model
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=g, dtype=torch.float32)
            if name.endswith(".bias") or name.endswith("e_score_correction_bias"):
                value = 0.1 * noise
            elif tensor.ndim > 1:
                value = 0.2 * noise
            else:
                value = 1 + 0.1 * noise
            tensor.copy_(value.to(tensor.dtype))


def write_byte_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer.json with the 256 byte symbols and no merges: every id fits."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(["Why is the sky blue?"], trainer=trainer)
    assert tokenizer.get_vocab_size() <= VOCAB_SIZE
    tokenizer.save(str(directory / "tokenizer.json"))


def build_model(
    model_type: str, *, seed: int = 0, overrides: dict[str, Any] | None = None
) -> torch.nn.Module:
    """The in-memory model `write_checkpoint(model_type, seed=seed)` saves, rebuilt bit for bit.

    `AutoModelForCausalLM.from_config` in float32, then every saved tensor redrawn from `seed`
    (see `_redraw`): nothing depends on the global RNG, so tests can compare a reloaded
    checkpoint with the model that was written without keeping that model around.
    `overrides` replaces config kwargs (a variant of the family, e.g. another RoPE).
    """
    import transformers

    case = FAMILIES[model_type]
    if overrides:
        case = dataclasses.replace(case, kwargs={**case.kwargs, **overrides})
    config = case.config()
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _redraw(model, seed)
    return model.eval()


def write_checkpoint(
    model_type: str,
    directory: Path,
    *,
    seed: int = 0,
    max_shard_size: str | None = None,
) -> Path:
    """Write a tiny checkpoint of `model_type` with transformers' own `save_pretrained`.

    The model is `build_model(model_type, seed=seed)`: transformers' own init redrawn from
    `seed`, so the same (model_type, seed) always gives the same tensors. `max_shard_size`
    (e.g. "40KB") is passed through to split the weights over several files plus an index.
    A byte-level tokenizer.json goes alongside, so the directory is a complete model source.
    """
    model = build_model(model_type, seed=seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(directory), **save_kwargs)
    write_byte_tokenizer(directory)
    return directory


def load_hf_model(directory: Path) -> torch.nn.Module:
    """transformers' own model for a checkpoint directory: float32, eval mode (the oracle)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    return model.eval()


def hf_greedy(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy tokens after `prompt_ids` (exactly `max_new_tokens`: no early
    stop hides a difference), asserting that no step hinges on a near tie of its top two
    logits, so a correct implementation must produce exactly these."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            output_logits=True,
            return_dict_in_generate=True,
        )
    for step, logits in enumerate(out.logits):
        top2 = logits[0].float().topk(2).values
        assert top2[0] - top2[1] > 1e-3, f"step {step}: near tie in transformers' own logits"
    return out.sequences[0, len(prompt_ids) :].tolist()
