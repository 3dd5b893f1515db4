"""`tiny:qwen3_moe`: a built-in, deterministic tiny Qwen3-MoE checkpoint.

Written in the Hugging Face layout (per-expert tensors, two safetensors files
with an index, config.json, a byte-level BPE tokenizer.json trained with the
`tokenizers` library, a chat template), so every code path of a real
checkpoint runs on a fresh machine with no network. Sized so every layout up
to 16 ranks fits: 16 experts, 8 query / 4 kv heads, vocab 384.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from reshard.machine import cache_root

TINY_VERSION = 2

TINY_CONFIGS = {
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": 384,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 16,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 512,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "bos_token_id": None,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "torch_dtype": "float32",
        "router_aux_loss_coef": 0.001,
        "output_router_logits": False,
    }
}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_end|>", "<|im_start|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = """The sky is blue because air scatters short blue wavelengths of sunlight more than red ones.
Mixture-of-experts models route each token to a few experts chosen by a learned router.
Tensor parallelism splits each weight matrix across ranks; expert parallelism splits the experts.
Why is the sky blue? Rayleigh scattering. Why is the sea blue? It reflects the sky and absorbs red light.
Every rank reads only its own shard, so nobody reads sixty gigabytes to keep four.
"""


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_CONFIGS["qwen3_moe"]["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return tokenizer.to_str()


def _weights(
    config: dict, tokenizer_json: str, steps: int = 200, seed: int = 1
) -> dict[str, torch.Tensor]:
    """HF-named (per-expert) fp32 weights: seeded init, then a few seconds of training on CORPUS.

    Training makes the tiny model confident (greedy tokens never hinge on a
    near tie, so parity tests are robust) and lets `reshard run` print text
    that reads like the corpus.
    """
    from tokenizers import Tokenizer

    from reshard.converters import get_spec
    from reshard.converters.lazy import InMemoryTensor
    from reshard.runtime.model import CausalLM, causal_lm_loss

    threads = torch.get_num_threads()
    # One thread: CPU kernels split float sums by thread, so a multi-threaded run trains a
    # slightly different model each time (and a fresh checkpoint could land on a near tie).
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = CausalLM(get_spec("qwen3_moe").parse_config(config))
            ids = Tokenizer.from_str(tokenizer_json).encode(CORPUS).ids
            data = torch.tensor(ids)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
            window = 64
            for _ in range(steps):
                starts = torch.randint(0, len(data) - window, (8,))
                batch = torch.stack([data[s : s + window] for s in starts.tolist()])
                loss = causal_lm_loss(model(batch), batch)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    # Save in the Hugging Face layout: the spec's converters read backwards unfuse the experts.
    fused = {n: InMemoryTensor(p.detach().contiguous()) for n, p in model.named_parameters()}
    return {
        n: t.materialize().contiguous() for n, t in get_spec("qwen3_moe").to_sources(fused).items()
    }


def write_tiny_checkpoint(family: str, directory: Path) -> None:
    """Write the tiny checkpoint of `family` into `directory` (HF layout, two files + index)."""
    from reshard.writer import save_tensors

    config = TINY_CONFIGS[family]
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_json = _tokenizer_json()
    weights = _weights(config, tokenizer_json)
    names = sorted(weights)
    halves = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    weight_map = {}
    for file, keys in halves.items():
        save_tensors(directory / file, {k: weights[k] for k in keys}, metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    total = sum(t.numel() * t.element_size() for t in weights.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(
        json.dumps(
            {"eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"]},
            indent=2,
        )
    )
    (directory / "tokenizer.json").write_text(tokenizer_json)
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
    )


def tiny_checkpoint(family: str) -> Path:
    """Path of the tiny checkpoint of `family`, written into the cache on first use."""
    if family not in TINY_CONFIGS:
        from reshard.errors import SourceError

        raise SourceError(
            f"tiny:{family}: no such built-in model; built-in: {', '.join('tiny:' + f for f in TINY_CONFIGS)}"
        )
    target = cache_root() / "tiny" / f"{family}-v{TINY_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{family}-"))
    try:
        write_tiny_checkpoint(family, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
