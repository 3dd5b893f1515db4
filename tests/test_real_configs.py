"""The Hub's own config.json of the largest MoE releases, parsed and planned at full size.

The fixtures in tests/fixtures are the `config.json` files of the Hub repositories named in
their file names (`owner--name.config.json`), kept as published (FP8 quantization_config,
`auto_map`, Kimi-K2's own `model_type` included). Oracles: the parameter counts the model
cards publish, and the numbers written in each config.

`reshard plan` needs a checkpoint; a sparse one stands in: every tensor of the release,
named and shaped as the family's converters read them back to the Hub's names (as `reshard
synth` does), in one safetensors file whose header is real and whose data is a hole (no
disk blocks). Planning reads headers only, so the plan is the one the real 1.3 TB checkpoint
gets. The FP8 releases' `weight_scale_inv` tensors are not in it, and its config drops
`quantization_config`: FP8 block scales are planned by their own tests (test_fp8.py).
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from reshard.architecture import param_shapes
from reshard.cli import cli
from reshard.convert import make_plan
from reshard.converters import get_spec
from reshard.layout import Layout
from reshard.placements import Replicate, Shard
from reshard.sources import open_source
from reshard.synth import hf_tensors

FIXTURES = Path(__file__).parent / "fixtures"
DEEPSEEK_V3, KIMI_K2 = "deepseek-ai/DeepSeek-V3", "moonshotai/Kimi-K2-Instruct"


def hub_config(repo: str) -> dict:
    return json.loads((FIXTURES / f"{repo.replace('/', '--')}.config.json").read_text())


# From the model cards: total and activated parameters, in billions (the cards round them).
PUBLISHED = {DEEPSEEK_V3: ((670.5, 671.5), (37.0, 38.0)), KIMI_K2: ((1000, 1050), (32.0, 33.0))}


@pytest.mark.parametrize("repo", [DEEPSEEK_V3, KIMI_K2])
def test_hub_config_parses_to_the_published_model(repo):
    cfg = hub_config(repo)
    args = get_spec(cfg["model_type"]).parse_config(cfg)
    mla = args.mla
    assert (mla.q_lora_rank, mla.kv_lora_rank) == (cfg["q_lora_rank"], cfg["kv_lora_rank"])
    assert (mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim) == (128, 64, 128)
    assert mla.rope_interleave  # DeepSeek's layout; the config does not say otherwise
    assert (args.num_heads, args.num_kv_heads, args.head_dim) == (
        cfg["num_attention_heads"],
    ) * 2 + (192,)
    assert args.rotary_dim == 64 and args.rope_theta == cfg["rope_theta"]
    scaling = cfg["rope_scaling"]
    assert args.yarn.factor == scaling["factor"]
    assert args.yarn.original_max_position_embeddings == 4096
    assert (args.yarn.beta_fast, args.yarn.beta_slow) == (
        scaling["beta_fast"],
        scaling["beta_slow"],
    )
    assert args.yarn.cos_sin_scale == 1.0  # mscale == mscale_all_dim: only the softmax scale moves
    assert (args.num_experts, args.top_k) == (cfg["n_routed_experts"], 8)
    assert (args.n_group, args.topk_group) == (cfg["n_group"], cfg["topk_group"])
    assert args.routed_scaling_factor == cfg["routed_scaling_factor"]
    assert args.router == "sigmoid" and args.router_bias and args.norm_topk_prob
    assert args.shared_expert_intermediate_size == 2048
    assert args.dense_layers == tuple(range(cfg["first_k_dense_replace"]))
    assert args.num_layers == 61 and args.vocab_size == cfg["vocab_size"]

    (total_lo, total_hi), (active_lo, active_hi) = PUBLISHED[repo]
    total = active = 0
    for name, shape in param_shapes(args).items():
        total += math.prod(shape)
        active += math.prod(shape) * (args.top_k / args.num_experts if ".experts." in name else 1)
    assert total_lo <= total / 1e9 <= total_hi, total
    assert active_lo <= active / 1e9 <= active_hi, active


@pytest.mark.parametrize(
    "change, match",
    [
        ({"scoring_func": "softmax"}, "scoring_func is 'softmax'; reshard supports only 'sigmoid'"),
        ({"topk_method": "greedy"}, "topk_method is 'greedy'; reshard supports only 'noaux_tc'"),
        ({"num_key_value_heads": 16}, r"num_key_value_heads \(16\) must equal"),
        ({"attention_bias": True}, "attention_bias is True"),
        ({"moe_layer_freq": 2}, "moe_layer_freq is 2"),
        ({"rope_scaling": {"type": "longrope"}}, r"rope_scaling\.rope_type 'longrope'"),
        ({"kv_lora_rank": None}, "lacks kv_lora_rank"),
    ],
)
def test_what_the_runtime_lacks_is_refused_naming_the_field(change, match):
    cfg = {k: v for k, v in {**hub_config(DEEPSEEK_V3), **change}.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        get_spec("deepseek_v3").parse_config(cfg)


def write_sparse_checkpoint(directory: Path, config: dict, extra: dict | None = None) -> int:
    """A one-file bf16 checkpoint of `config` with a real header and a hole for its data;
    `extra` adds tensors by name and shape. Returns the bytes the data would take."""
    shapes = {**hf_tensors(config, torch.bfloat16), **(extra or {})}
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[name] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data to 8 bytes
    directory.mkdir(parents=True)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)  # sparse: the data is a hole
    (directory / "config.json").write_text(json.dumps(config))
    return offset


def mtp_layer(config: dict) -> dict[str, tuple[int, ...]]:
    """The tensors of DeepSeek-V3's multi-token-prediction layer (numbered num_hidden_layers):
    a whole decoder layer plus its projection and norms, as the release ships it."""
    n, hidden = config["num_hidden_layers"], config["hidden_size"]
    deeper = hf_tensors({**config, "num_hidden_layers": n + 1}, torch.bfloat16)
    layer = {k: s for k, s in deeper.items() if k.startswith(f"model.layers.{n}.")}
    prefix = f"model.layers.{n}."
    return {
        **layer,
        prefix + "eh_proj.weight": (hidden, 2 * hidden),
        prefix + "enorm.weight": (hidden,),
        prefix + "hnorm.weight": (hidden,),
        prefix + "shared_head.norm.weight": (hidden,),
    }


def assert_plan_table(src, layout: str, mesh: dict, first: str, last: str) -> None:
    """`reshard plan` of `src` at `layout`: the mesh line, one row per rank, the first and the
    last row as given (rank, coordinates, experts), and the total last."""
    world = math.prod(mesh.values())
    result = CliRunner().invoke(cli, ["plan", "--src", str(src), "--layout", layout])
    assert result.exit_code == 0, result.output
    assert f"{world} ranks, mesh {mesh}" in result.output
    rows = [line for line in result.output.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == world
    assert rows[0].startswith(first), rows[0]
    assert rows[-1].startswith(last), rows[-1]
    assert "total " in result.output.splitlines()[-1]


@pytest.mark.parametrize("repo", [DEEPSEEK_V3, KIMI_K2])
def test_plan_of_the_full_release_at_ep8tp8(repo, tmp_path):
    config = {k: v for k, v in hub_config(repo).items() if k != "quantization_config"}
    extra = mtp_layer(config) if config.get("num_nextn_predict_layers") else None
    src = tmp_path / "src"
    data_bytes = write_sparse_checkpoint(src, config, extra)
    assert data_bytes > 1e12  # 1.3 TB of bf16 (DeepSeek-V3), 2 TB (Kimi-K2)

    plan = make_plan(open_source(str(src)), Layout.parse("ep8tp8"))
    layers = config["num_hidden_layers"]
    assert not [n for n in plan.params if n.startswith(f"model.layers.{layers}.")]  # MTP dropped
    experts = config["n_routed_experts"]
    per_rank = [plan.rank_bytes(r) for r in range(64)]
    assert len(set(per_rank)) == 1  # every rank the same share
    # Routed experts are 1/64 of each rank's file plus what TP and replication leave: well under
    # 1/16 of the model (ep8tp8 on 64 GPUs, each near 1/64 of the weights but the replicas).
    assert data_bytes / 64 < per_rank[0] < data_bytes / 16

    per = experts // 8
    assert_plan_table(
        src,
        "ep8tp8",
        {"ep": 8, "tp": 8},
        f"| 0 | ep=0, tp=0 | 0-{per - 1} |",
        f"| 63 | ep=7, tp=7 | {experts - per}-{experts - 1} |",
    )


# --- DeepSeek-V2-Lite -----------------------------------------------------------------------------

DEEPSEEK_V2_LITE = "deepseek-ai/DeepSeek-V2-Lite"


def test_deepseek_v2_lite_hub_config_parses_to_the_published_model():
    """Oracles: the numbers in the config, and the release's 15,706,484,224 parameters (the sum
    over its safetensors files) with the card's 2.4B active per token (counted, as OpenAI
    counts gpt-oss's, without the input embedding table)."""
    cfg = hub_config(DEEPSEEK_V2_LITE)
    args = get_spec(cfg["model_type"]).parse_config(cfg)
    mla = args.mla
    assert mla.q_lora_rank is None and mla.kv_lora_rank == 512  # one q_proj, no low-rank pair
    assert (mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim) == (128, 64, 128)
    assert (args.hidden_size, args.num_layers, args.num_heads, args.head_dim) == (2048, 27, 16, 192)
    assert args.rope_interleaved and args.rope_fp32  # V2's complex RoPE on DeepSeek's pairs
    assert args.yarn.factor == 40 and args.yarn.original_max_position_embeddings == 4096
    assert args.yarn.cos_sin_scale == 1.0  # mscale == mscale_all_dim: only the softmax scale moves
    assert (args.num_experts, args.top_k, args.moe_intermediate_size) == (64, 6, 1408)
    assert args.router == "softmax" and args.router_logits_fp32 and not args.router_bias
    assert (args.n_group, args.routed_scaling_factor, args.norm_topk_prob) == (1, 1.0, False)
    assert args.shared_expert_intermediate_size == 2 * 1408
    assert args.dense_layers == (0,) and args.intermediate_size == 10944

    shapes = param_shapes(args)
    total = sum(math.prod(s) for s in shapes.values())
    active = sum(
        math.prod(s) * (args.top_k / args.num_experts if ".experts." in n else 1)
        for n, s in shapes.items()
    )
    active -= math.prod(shapes["model.embed_tokens.weight"])
    assert total == 15_706_484_224
    assert round(active / 1e9, 1) == 2.5, active  # the card rounds it down: "2.4B"


def test_deepseek_v2_lite_hub_config_builds_transformers_own_tensors_and_rope():
    """transformers' DeepseekV2ForCausalLM from the same config (on the meta device) has exactly
    our parameter table, our YaRN frequencies and cos/sin scale, and our softmax scale."""
    transformers = pytest.importorskip("transformers")
    from reshard.runtime.mla import MLAttention
    from reshard.runtime.rope import yarn_inv_freq

    cfg = hub_config(DEEPSEEK_V2_LITE)
    hf_config = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    args = get_spec("deepseek_v2").parse_config(cfg)
    assert param_shapes(args) == {n: tuple(t.shape) for n, t in model.state_dict().items()}
    rotary = type(model.model.rotary_emb)(hf_config)  # a real one, on the CPU
    assert torch.equal(yarn_inv_freq(args.yarn, args.rotary_dim, args.rope_theta), rotary.inv_freq)
    assert args.yarn.cos_sin_scale == pytest.approx(rotary.attention_scaling, rel=1e-12)
    with torch.device("meta"):
        ours = MLAttention(args, layer_idx=0)
    assert ours.scale == pytest.approx(model.model.layers[0].self_attn.scaling, rel=1e-12)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"scoring_func": "sigmoid"}, "scoring_func is 'sigmoid'; reshard supports only 'softmax'"),
        ({"topk_method": "noaux_tc"}, "topk_method is 'noaux_tc'; reshard supports 'greedy' and"),
        ({"norm_topk_prob": True}, "norm_topk_prob is True"),
        ({"mlp_bias": True}, "mlp_bias is True"),
        ({"moe_layer_freq": 2}, "moe_layer_freq is 2"),
        ({"attention_bias": True}, "attention_bias is True"),
        ({"topk_method": "group_limited_greedy", "n_group": None}, "lacks n_group"),
    ],
)
def test_deepseek_v2_what_the_runtime_lacks_is_refused_naming_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        get_spec("deepseek_v2").parse_config({**hub_config(DEEPSEEK_V2_LITE), **change})


@pytest.mark.parametrize("method, groups", [("greedy", (1, 1)), ("group_limited_greedy", (8, 3))])
def test_deepseek_v2_groups_limit_the_choice_only_for_group_limited_greedy(method, groups):
    """DeepSeek-V2 and V2.5 (`group_limited_greedy`, 8 groups, 3 kept) limit the choice to the
    best groups; V2-Lite (`greedy`) picks from every expert, whatever n_group says."""
    change = {"n_routed_experts": 160, "n_group": 8, "topk_group": 3, "topk_method": method}
    args = get_spec("deepseek_v2").parse_config({**hub_config(DEEPSEEK_V2_LITE), **change})
    assert (args.n_group, args.topk_group) == groups
    assert args.group_score == "max"  # a group ranks by its best expert


def test_deepseek_v2_lite_plan_at_ep8tp2(tmp_path):
    """The bf16 release on 16 ranks: experts split 8 ways by EP and their I-slices 2 ways,
    the plain q_proj (no low-rank pair) by heads like q_b_proj, the latent whole."""
    config = hub_config(DEEPSEEK_V2_LITE)
    src = tmp_path / "src"
    data_bytes = write_sparse_checkpoint(src, config)
    assert data_bytes == 2 * 15_706_484_224

    plan = make_plan(open_source(str(src)), Layout.parse("ep8tp2"))
    per_rank = [plan.rank_bytes(r) for r in range(16)]
    assert len(set(per_rank)) == 1
    # Experts (92% of the bytes) split 16 ways; attention, dense MLP and vocab 2 ways.
    assert data_bytes / 16 < per_rank[0] < data_bytes / 8
    layer = "model.layers.1."
    assert plan.params[layer + "self_attn.q_proj.weight"].placements == (Replicate(), Shard(0))
    assert plan.params[layer + "self_attn.kv_b_proj.weight"].placements == (Replicate(), Shard(0))
    assert plan.params[layer + "self_attn.o_proj.weight"].placements == (Replicate(), Shard(1))
    latent = layer + "self_attn.kv_a_proj_with_mqa.weight"
    assert plan.params[latent].placements == (Replicate(), Replicate())
    assert plan.params[layer + "mlp.experts.down_proj"].placements == (Shard(0), Shard(2))
    assert plan.params[layer + "mlp.gate.weight"].placements == (Replicate(), Replicate())

    assert_plan_table(
        src, "ep8tp2", {"ep": 8, "tp": 2}, "| 0 | ep=0, tp=0 | 0-7 |", "| 15 | ep=7, tp=1 | 56-63 |"
    )


# --- GPT-OSS ---------------------------------------------------------------------------------------

GPT_OSS_120B = "openai/gpt-oss-120b"


def test_gpt_oss_hub_config_parses_to_the_published_model():
    """Oracles: the numbers in the config, and OpenAI's published 116.83B parameters with 5.13B
    active per token (their count leaves out the input embedding table, not the unembedding)."""
    cfg = hub_config(GPT_OSS_120B)
    args = get_spec(cfg["model_type"]).parse_config(cfg)
    assert (args.hidden_size, args.num_layers, args.num_heads, args.num_kv_heads) == (
        2880,
        36,
        64,
        8,
    )
    assert args.head_dim == 64 and args.vocab_size == 201088
    assert (args.num_experts, args.top_k, args.moe_intermediate_size) == (128, 4, 2880)
    assert args.sliding_layers == tuple(range(0, 36, 2)) and args.sliding_window == 128
    assert args.rope_theta == 150000
    assert args.yarn.factor == 32 and args.yarn.original_max_position_embeddings == 4096
    assert (args.yarn.beta_fast, args.yarn.beta_slow, args.yarn.truncate) == (32, 1, False)
    assert (args.swiglu_limit, args.swiglu_alpha) == (7.0, 1.702)
    assert args.attention_sinks and args.qkv_bias and args.o_bias and args.expert_bias
    assert args.router == "topk_softmax" and args.router_logit_bias
    assert args.experts_transposed and args.experts_interleaved

    total = active = 0
    for name, shape in param_shapes(args).items():
        total += math.prod(shape)
        active += math.prod(shape) * (args.top_k / args.num_experts if ".experts." in name else 1)
    active -= math.prod(param_shapes(args)["model.embed_tokens.weight"])
    assert round(total / 1e9, 2) == 116.83, total
    assert round(active / 1e9, 2) == 5.13, active


def test_gpt_oss_hub_config_builds_transformers_own_tensors_and_rope():
    """transformers' GptOssForCausalLM from the same config (on the meta device: no memory)
    has exactly our parameter table, and its YaRN tables (truncate false) are ours."""
    transformers = pytest.importorskip("transformers")
    from reshard.runtime.rope import yarn_inv_freq

    cfg = hub_config(GPT_OSS_120B)
    hf_config = transformers.AutoConfig.for_model(
        **{k: v for k, v in cfg.items() if k != "quantization_config"}
    )
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    args = get_spec("gpt_oss").parse_config(cfg)
    assert param_shapes(args) == {n: tuple(t.shape) for n, t in model.state_dict().items()}
    rotary = type(model.model.rotary_emb)(hf_config)  # a real one, on the CPU
    ours = yarn_inv_freq(args.yarn, args.rotary_dim, args.rope_theta)
    assert torch.equal(ours, rotary.inv_freq)
    assert args.yarn.cos_sin_scale == pytest.approx(rotary.attention_scaling, rel=1e-12)


def test_gpt_oss_plan_of_the_full_release_at_ep8tp8(tmp_path):
    """The bf16 form of gpt-oss-120b (the MXFP4 release is planned in test_mxfp4.py)."""
    config = {k: v for k, v in hub_config(GPT_OSS_120B).items() if k != "quantization_config"}
    src = tmp_path / "src"
    data_bytes = write_sparse_checkpoint(src, config)
    assert 2 * 116.8e9 < data_bytes < 2 * 116.9e9

    plan = make_plan(open_source(str(src)), Layout.parse("ep8tp8"))
    per_rank = [plan.rank_bytes(r) for r in range(64)]
    assert len(set(per_rank)) == 1
    # Experts (98% of the bytes) split 64 ways; attention and the vocab 8 ways.
    assert data_bytes / 64 < per_rank[0] < data_bytes / 32
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert plan.params[name].placements == (Shard(0), Shard(2))  # whole (gate, up) pairs
    assert plan.params[name + "_bias"].placements == (Shard(0), Shard(1))
    assert plan.params["model.layers.0.mlp.experts.down_proj_bias"].placements == (
        Shard(0),
        Replicate(),
    )
    assert plan.params["model.layers.0.self_attn.sinks"].placements == (Replicate(), Shard(0))

    assert_plan_table(
        src,
        "ep8tp8",
        {"ep": 8, "tp": 8},
        "| 0 | ep=0, tp=0 | 0-15 |",
        "| 63 | ep=7, tp=7 | 112-127 |",
    )
