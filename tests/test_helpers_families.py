"""The family checkpoints of helpers_families, checked against transformers and safetensors.

These tests are about the oracle itself, not about reshard: that transformers writes what the
helper claims (per-expert names, the distinguishing tensors of each family), that it reads back
bit for bit, and that the redrawn weights are far from degenerate (greedy tokens vary, routing
spreads over the experts), so the tests that use these checkpoints can tell right from wrong.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers_families import (
    BOS_ID,
    EOS_ID,
    FAMILIES,
    PAD_ID,
    PER_EXPERT,
    VOCAB_SIZE,
    FamilyCase,
    build_model,
    hf_state,
    load_hf_model,
    write_checkpoint,
)
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

NUM_EXPERTS = 8
EXPERT_FFN = 32  # moe_intermediate_size, or intermediate_size for mixtral / olmoe
HIDDEN = 64
PROJECTIONS = {  # in-memory fused row block -> file name of one expert's matrix
    "mixtral": {"gate": "w1", "up": "w3", "down": "w2"},
    "default": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
}
# config.json's spelling of the expert count, as transformers 5.24 writes it. Note qwen3_moe:
# Qwen3MoeConfig maps num_experts -> num_local_experts, so the file says num_local_experts where
# Hub Qwen3-MoE configs say num_experts.
EXPERT_COUNT_KEY = {
    "qwen3_moe": "num_local_experts",
    "qwen2_moe": "num_experts",
    "mixtral": "num_local_experts",
    "olmoe": "num_experts",
    "glm4_moe": "n_routed_experts",
    "llama4_text": "num_local_experts",
    "deepseek_v2": "n_routed_experts",
    "deepseek_v3": "n_routed_experts",
    "gpt_oss": "num_local_experts",
}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every family written once (seed 0, one file)."""
    root = tmp_path_factory.mktemp("families")
    return {name: write_checkpoint(name, root / name) for name in FAMILIES}


@pytest.fixture(scope="module")
def loaded(written: dict[str, Path]) -> dict[str, torch.nn.Module]:
    """transformers' model for each written directory."""
    return {name: load_hf_model(directory) for name, directory in written.items()}


def _file_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                assert key not in tensors, f"{key} in two files"
                tensors[key] = f.get_tensor(key)
    return tensors


def _moe_layers(model: torch.nn.Module) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def _expected_file(case: FamilyCase, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the file should hold, derived from the in-memory state by hand.

    Fused experts [E, 2I, H] / [E, H, I] split into per-expert matrices (gate rows first), and
    for mixtral the `mlp.` module renamed `block_sparse_moe.` with w1 / w3 / w2.
    """
    names = PROJECTIONS.get(case.model_type, PROJECTIONS["default"])
    block = "block_sparse_moe" if case.model_type == "mixtral" else "mlp"
    expected: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        m = re.fullmatch(r"(model\.layers\.\d+)\.mlp\.(.*)", name)
        if m is None:
            expected[name] = tensor
            continue
        layer, rest = m.groups()
        if rest == "experts.gate_up_proj":
            gate, up = tensor.chunk(2, dim=1)
            for e in range(tensor.shape[0]):
                expected[f"{layer}.{block}.experts.{e}.{names['gate']}.weight"] = gate[e]
                expected[f"{layer}.{block}.experts.{e}.{names['up']}.weight"] = up[e]
        elif rest == "experts.down_proj":
            for e in range(tensor.shape[0]):
                expected[f"{layer}.{block}.experts.{e}.{names['down']}.weight"] = tensor[e]
        else:
            expected[f"{layer}.{block}.{rest}"] = tensor
    return expected


# --- (a) the directory ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_writes_safetensors_config_and_tokenizer(family: str, written: dict[str, Path]) -> None:
    directory = written[family]
    assert [p.name for p in directory.glob("*.safetensors")] == ["model.safetensors"]
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == family
    assert config["vocab_size"] == VOCAB_SIZE
    assert (config["pad_token_id"], config["eos_token_id"], config["bos_token_id"]) == (
        PAD_ID,
        EOS_ID,
        BOS_ID,
    )
    assert config["tie_word_embeddings"] is False
    assert config[EXPERT_COUNT_KEY[family]] == NUM_EXPERTS
    reread = transformers.AutoConfig.from_pretrained(str(directory))
    for key, value in FAMILIES[family].kwargs.items():  # through attribute_map where needed
        assert getattr(reread, key) == value, key

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    ids = tokenizer.encode("Why is the sky blue?").ids
    assert len(ids) == len("Why is the sky blue?")  # one id per byte, no merges
    assert max(ids) < VOCAB_SIZE
    assert tokenizer.decode(ids) == "Why is the sky blue?"


def test_max_shard_size_splits_files(tmp_path: Path) -> None:
    directory = write_checkpoint("glm4_moe", tmp_path / "sharded", max_shard_size="40KB")
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    assert len(files) > 1, files
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    tensors = _file_tensors(directory)
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == set(files)


# --- (b) bit-identical round trip ----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_reload_is_bit_identical(family: str, loaded: dict[str, torch.nn.Module]) -> None:
    saved = hf_state(build_model(family))  # the model write_checkpoint saved, rebuilt
    reloaded = hf_state(loaded[family])
    assert list(reloaded) == list(saved)
    for name, tensor in saved.items():
        other = reloaded[name]
        assert other.dtype == tensor.dtype == torch.float32, name
        assert torch.equal(other, tensor), name
    assert not any("inv_freq" in name for name in saved)
    buffers = {name for name, _ in loaded[family].named_buffers()}
    saved_buffers = sorted(set(saved) & buffers)
    if family in ("glm4_moe", "deepseek_v3"):
        assert saved_buffers == [
            "model.layers.1.mlp.gate.e_score_correction_bias",
            "model.layers.2.mlp.gate.e_score_correction_bias",
        ]
    else:
        assert saved_buffers == []


# --- (c) per-expert names in the file ------------------------------------------------------------


@pytest.mark.parametrize("family", PER_EXPERT)
def test_file_holds_per_expert_hf_names(family: str, written: dict[str, Path]) -> None:
    case = FAMILIES[family]
    tensors = _file_tensors(written[family])
    expected = _expected_file(case, hf_state(build_model(family)))
    assert set(tensors) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor), name
    assert not any(name.endswith(("gate_up_proj", "experts.down_proj")) for name in tensors)

    layer = case.first_moe_layer
    first = case.experts_key.format(layer=layer)
    assert first in tensors
    prefix = first.rsplit(".experts.", 1)[0]
    names = PROJECTIONS.get(family, PROJECTIONS["default"])
    for e in range(NUM_EXPERTS):
        base = f"{prefix}.experts.{e}"
        assert tensors[f"{base}.{names['gate']}.weight"].shape == (EXPERT_FFN, HIDDEN)
        assert tensors[f"{base}.{names['up']}.weight"].shape == (EXPERT_FFN, HIDDEN)
        assert tensors[f"{base}.{names['down']}.weight"].shape == (HIDDEN, EXPERT_FFN)
    assert tensors[f"{prefix}.gate.weight"].shape == (NUM_EXPERTS, HIDDEN)
    assert f"{prefix}.experts.{NUM_EXPERTS}.{names['gate']}.weight" not in tensors


# --- (d) what sets each family apart -------------------------------------------------------------

PRESENT: dict[str, dict[str, tuple[int, ...]]] = {
    "qwen3_moe": {
        "model.layers.1.self_attn.q_norm.weight": (16,),  # per head
        "model.layers.1.self_attn.k_norm.weight": (16,),
        "model.layers.1.self_attn.q_proj.weight": (8 * 16, HIDDEN),
    },
    "qwen2_moe": {
        "model.layers.1.self_attn.q_proj.bias": (64,),
        "model.layers.1.self_attn.k_proj.bias": (32,),
        "model.layers.1.self_attn.v_proj.bias": (32,),
        "model.layers.1.mlp.shared_expert_gate.weight": (1, HIDDEN),
        "model.layers.1.mlp.shared_expert.gate_proj.weight": (48, HIDDEN),
        "model.layers.1.mlp.shared_expert.down_proj.weight": (HIDDEN, 48),
        "model.layers.0.mlp.gate_proj.weight": (96, HIDDEN),  # layer 0 dense
        "model.layers.0.mlp.down_proj.weight": (HIDDEN, 96),
    },
    "mixtral": {
        "model.layers.0.block_sparse_moe.gate.weight": (NUM_EXPERTS, HIDDEN),
        "model.layers.0.self_attn.q_proj.weight": (8 * 16, HIDDEN),
        "model.layers.0.self_attn.k_proj.weight": (4 * 16, HIDDEN),
    },
    "olmoe": {
        "model.layers.1.self_attn.q_norm.weight": (8 * 8,),  # the whole projection
        "model.layers.1.self_attn.k_norm.weight": (4 * 8,),
    },
    "glm4_moe": {
        "model.layers.1.mlp.gate.e_score_correction_bias": (NUM_EXPERTS,),
        "model.layers.2.mlp.gate.e_score_correction_bias": (NUM_EXPERTS,),
        "model.layers.1.mlp.shared_experts.gate_proj.weight": (EXPERT_FFN, HIDDEN),
        "model.layers.1.self_attn.q_proj.bias": (8 * 16,),
        "model.layers.0.mlp.gate_proj.weight": (96, HIDDEN),  # layer 0 dense
    },
    "deepseek_v3": {  # MLA: q_lora 32, kv_lora 20, nope 12, rope 16, v 10, 8 heads
        "model.layers.0.self_attn.q_a_proj.weight": (32, HIDDEN),
        "model.layers.0.self_attn.q_a_layernorm.weight": (32,),
        "model.layers.0.self_attn.q_b_proj.weight": (8 * (12 + 16), 32),
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": (20 + 16, HIDDEN),
        "model.layers.0.self_attn.kv_a_layernorm.weight": (20,),
        "model.layers.0.self_attn.kv_b_proj.weight": (8 * (12 + 10), 20),
        "model.layers.0.self_attn.o_proj.weight": (HIDDEN, 8 * 10),
        "model.layers.1.mlp.gate.e_score_correction_bias": (NUM_EXPERTS,),
        "model.layers.1.mlp.shared_experts.gate_proj.weight": (EXPERT_FFN, HIDDEN),
        "model.layers.0.mlp.gate_proj.weight": (96, HIDDEN),  # layer 0 dense
    },
    "deepseek_v2": {  # MLA as deepseek_v3's, with one q_proj (q_lora_rank null)
        "model.layers.0.self_attn.q_proj.weight": (8 * (12 + 16), HIDDEN),
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": (20 + 16, HIDDEN),
        "model.layers.0.self_attn.kv_b_proj.weight": (8 * (12 + 10), 20),
        "model.layers.1.mlp.gate.weight": (NUM_EXPERTS, HIDDEN),
        "model.layers.1.mlp.shared_experts.gate_proj.weight": (2 * EXPERT_FFN, HIDDEN),
        "model.layers.0.mlp.gate_proj.weight": (96, HIDDEN),  # layer 0 dense
    },
}
ABSENT: dict[str, tuple[str, ...]] = {
    "qwen3_moe": ("model.layers.1.self_attn.q_proj.bias", "model.layers.0.mlp.gate_proj.weight"),
    "qwen2_moe": ("model.layers.0.mlp.gate.weight", "model.layers.1.self_attn.q_norm.weight"),
    "mixtral": ("model.layers.0.mlp.gate.weight", "model.layers.0.self_attn.q_proj.bias"),
    "olmoe": (
        "model.layers.1.self_attn.q_proj.bias",
        "model.layers.1.mlp.shared_expert_gate.weight",
    ),
    "glm4_moe": ("model.layers.0.mlp.gate.weight", "model.layers.1.self_attn.q_norm.weight"),
    "deepseek_v3": (
        "model.layers.0.mlp.gate.weight",
        "model.layers.1.self_attn.q_proj.weight",  # q_lora_rank is set: q_a / q_b instead
        "model.layers.1.self_attn.k_proj.weight",
    ),
    "deepseek_v2": (
        "model.layers.1.self_attn.q_a_proj.weight",  # q_lora_rank is null: one q_proj
        "model.layers.1.self_attn.q_b_proj.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",  # softmax router: no bias
    ),
}


@pytest.mark.parametrize("family", PER_EXPERT)
def test_distinguishing_features(family: str, written: dict[str, Path], loaded) -> None:
    tensors = _file_tensors(written[family])
    for name, shape in PRESENT[family].items():
        assert name in tensors, name
        assert tuple(tensors[name].shape) == shape, name
        assert tensors[name].abs().sum() > 0, f"{name} is all zeros"
    for name in ABSENT[family]:
        assert name not in tensors, name
    model = loaded[family]
    assert _moe_layers(model) == list(
        range(FAMILIES[family].first_moe_layer, model.config.num_hidden_layers)
    )
    if family == "glm4_moe":
        assert model.config.rope_parameters["partial_rotary_factor"] == 0.5
        assert model.model.rotary_emb.inv_freq.shape == (16 // 2 // 2,)  # half of head_dim rotates
    if family == "olmoe":
        assert model.config.clip_qkv is None
    if family in ("deepseek_v2", "deepseek_v3"):  # YaRN: frequencies kept, blended, divided by 4
        rotary = model.model.rotary_emb
        plain = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
        ratio = rotary.inv_freq / plain
        assert ratio[0] == 1 and torch.allclose(ratio[4:], torch.tensor(0.25))
        assert ((ratio[1:4] > 0.25) & (ratio[1:4] < 1)).all(), ratio
        assert rotary.attention_scaling != 1.0


# --- (e) not degenerate --------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_vary(family: str, loaded: dict[str, torch.nn.Module]) -> None:
    model = loaded[family]
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        prompt = torch.randint(3, VOCAB_SIZE, (1, 5), generator=g)
        outs = [
            model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False
            )
            for _ in range(2)
        ]
        assert torch.equal(outs[0], outs[1])
        new = outs[0][0, 5:].tolist()
        assert len(new) == 8 and EOS_ID not in new, new
        assert len(set(new)) > 1, new


@pytest.mark.parametrize("family", PER_EXPERT)
def test_routing_spreads_over_experts(family: str, loaded: dict[str, torch.nn.Module]) -> None:
    """Routing and logits are spread out, so top-k and argmax do not hinge on near ties.

    Every router (`mlp.gate`, in memory also for mixtral) returns (logits, top-k weights,
    top-k indices) in transformers 5.24; the hook keeps the indices.
    """
    model = loaded[family]
    picked: dict[int, torch.Tensor] = {}
    hooks = []
    for i in _moe_layers(model):

        def record(module, args, output, i=i) -> None:
            picked[i] = output[2]

        hooks.append(model.model.layers[i].mlp.gate.register_forward_hook(record))
    try:
        ids = torch.randint(0, VOCAB_SIZE, (3, 13), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for hook in hooks:
            hook.remove()
    # transformers' own init (std 0.02) gives logits of std ~0.16 here; the redraw ~1.6.
    assert logits.std() > 0.5, "logits nearly uniform: was the init redrawn?"
    assert sorted(picked) == _moe_layers(model)
    for i, indices in picked.items():
        assert indices.shape == (3 * 13, 2), (i, indices.shape)
        used = indices.unique().numel()
        assert used >= NUM_EXPERTS // 2, f"layer {i} routes to only {used} experts"
        if family in ("glm4_moe", "deepseek_v2", "deepseek_v3"):  # 1 of 2 groups of 4 kept
            groups = indices // (NUM_EXPERTS // 2)
            assert torch.equal(groups[:, 0], groups[:, 1]), i
