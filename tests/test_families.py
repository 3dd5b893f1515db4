"""Every supported family against transformers' own model, on tiny checkpoints transformers writes.

- The parameter table (`param_shapes`), the runtime model and transformers agree on every
  tensor's name and shape, and conversion builds no model to learn them.
- The single-device runtime model gives transformers' logits, loss and every gradient.
- Every rank file of tp2, ep2tp2 and tp4-tp2ep equals `distribute_tensor` of the tensor
  transformers loads, with placements written out here from DESIGN.md's table (not read from
  the product), on real gloo ranks.
- The runtime refuses a manifest whose placements it does not run (the manifest is the
  contract between convert and run; there is no second copy of the plan to drift).

The parallel forward and generation are held to transformers in test_runtime_parity.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers_dist import run_on_ranks
from helpers_families import FAMILIES, build_model, hf_state, write_checkpoint
from safetensors.torch import save_file
from test_placements import _rank_checks_file, parse_layout, placement_text

from reshard.architecture import param_shapes
from reshard.convert import convert, make_plan
from reshard.converters import get_spec, supported_model_types
from reshard.errors import CheckpointError
from reshard.layout import Layout
from reshard.manifest import load_manifest
from reshard.placements import Replicate, Shard, StridedShard
from reshard.runtime.model import CausalLM, causal_lm_loss, meta_model
from reshard.runtime.parallel import ParallelGroups, parallelize
from reshard.sources import open_source

pytest.importorskip("transformers")

NEW = [family for family in FAMILIES if family != "qwen3_moe"]  # qwen3_moe came first
LAYOUTS = ["tp2", "ep2tp2", "tp4-tp2ep"]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: write_checkpoint(name, root / name) for name in FAMILIES}


def _args(model_type: str, directory: Path):
    config = json.loads((directory / "config.json").read_text())
    return get_spec(model_type).parse_config(config)


def test_every_family_here_is_supported_and_every_supported_one_is_here():
    assert sorted(FAMILIES) == supported_model_types()


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_param_table_runtime_model_and_transformers_agree(model_type, written):
    args = _args(model_type, written[model_type])
    want = {name: tuple(t.shape) for name, t in hf_state(build_model(model_type)).items()}
    assert param_shapes(args) == want
    ours = {name: tuple(t.shape) for name, t in meta_model(args).state_dict().items()}
    assert ours == want


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_conversion_builds_no_model(model_type, written, monkeypatch):
    import reshard.runtime.model as runtime_model

    def refuse(*args, **kwargs):
        raise AssertionError("conversion built the runtime model")

    monkeypatch.setattr(runtime_model.CausalLM, "__init__", refuse)
    plan = make_plan(open_source(str(written[model_type])), Layout.parse("ep2tp2"))
    assert sorted(plan.params) == sorted(param_shapes(plan.args))


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_single_device_model_matches_transformers(model_type, written):
    hf = build_model(model_type)
    ours = CausalLM(_args(model_type, written[model_type])).eval()
    ours.load_state_dict(hf_state(hf), strict=True)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, hf.config.vocab_size, (2, 11), generator=g)
    out = hf(input_ids=ids, labels=ids)
    logits = ours(ids)
    loss = causal_lm_loss(logits, ids)
    assert (logits - out.logits).abs().max().item() < 1e-5
    assert abs(loss.item() - out.loss.item()) < 1e-5
    out.loss.backward()
    loss.backward()
    mine = dict(ours.named_parameters())
    for name, p in hf.named_parameters():
        assert (mine[name].grad - p.grad).abs().max().item() < 1e-5, name


# YaRN, with its blend range inside the rotary dims (original context 64: some frequencies kept,
# some blended, the rest divided by 4) and its cos/sin scale (0.1 ln 4 + 1) on.
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
}


@pytest.mark.parametrize("model_type", sorted(set(FAMILIES) - {"deepseek_v2", "deepseek_v3"}))
def test_yarn_rope_matches_transformers(model_type):
    """YaRN runs through the RoPE tables every family shares (the DeepSeek cases have it on
    already): each family's logits with YaRN on match transformers', and differ from plain RoPE."""
    rope = {**FAMILIES[model_type].kwargs.get("rope_parameters", {}), **YARN}
    hf = build_model(
        model_type, overrides={"rope_parameters": rope, "max_position_embeddings": 256}
    )
    assert hf.model.rotary_emb.attention_scaling > 1
    args = get_spec(model_type).parse_config(hf.config.to_dict())
    assert args.yarn is not None
    ours = CausalLM(args).eval()
    ours.load_state_dict(hf_state(hf), strict=True)
    ids = torch.randint(
        0, hf.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        assert (ours(ids) - want).abs().max().item() < 1e-5
        plain = CausalLM(dataclasses.replace(args, yarn=None)).eval()
        plain.load_state_dict(hf_state(hf), strict=True)
        assert (plain(ids) - want).abs().max().item() > 1e-2


def test_mla_with_a_plain_q_proj_matches_transformers():
    """q_lora_rank null (DeepSeek-V2-Lite's shape): one q_proj instead of the low-rank pair."""
    hf = build_model("deepseek_v3", overrides={"q_lora_rank": None})
    args = get_spec("deepseek_v3").parse_config(hf.config.to_dict())
    assert "model.layers.0.self_attn.q_proj.weight" in param_shapes(args)
    assert param_shapes(args) == {n: tuple(t.shape) for n, t in hf_state(hf).items()}
    ours = CausalLM(args).eval()
    ours.load_state_dict(hf_state(hf), strict=True)
    ids = torch.randint(
        0, hf.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        assert (ours(ids) - hf(input_ids=ids).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "overrides",
    [
        {"topk_method": "greedy"},  # DeepSeek-V2-Lite's router: top-k over every expert
        {"q_lora_rank": 32},  # DeepSeek-V2's queries: the low-rank pair
    ],
    ids=["greedy", "q_lora"],
)
def test_deepseek_v2_variants_match_transformers(overrides):
    """The variants of the tiny deepseek_v2 case (group-limited routing, one q_proj) that
    DeepSeek-V2 releases differ in."""
    hf = build_model("deepseek_v2", overrides=overrides)
    args = get_spec("deepseek_v2").parse_config(hf.config.to_dict())
    assert param_shapes(args) == {n: tuple(t.shape) for n, t in hf_state(hf).items()}
    ours = CausalLM(args).eval()
    ours.load_state_dict(hf_state(hf), strict=True)
    ids = torch.randint(
        0, hf.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        assert (ours(ids) - hf(input_ids=ids).logits).abs().max().item() < 1e-5


def test_each_deepseek_v2_router_feature_changes_the_logits(written):
    """Each way DeepSeek-V2's router differs from DeepSeek-V3's matters on the tiny case: the
    runtime model with it done the other way misses transformers' logits, so the parity tests
    here and in test_runtime_parity.py would catch it done wrong."""
    hf = build_model("deepseek_v2")
    args = _args("deepseek_v2", written["deepseek_v2"])
    assert (args.router, args.group_score, args.n_group) == ("softmax", "max", 2)
    ids = torch.randint(
        0, hf.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3)
    )

    def error(args) -> float:
        ours = CausalLM(args).eval()
        ours.load_state_dict(hf_state(hf), strict=True)
        with torch.no_grad():
            return (ours(ids) - hf(input_ids=ids).logits).abs().max().item()

    assert error(args) < 1e-5
    variants = {
        "groups ranked by their best two": dataclasses.replace(args, group_score="top2_sum"),
        "no group limit": dataclasses.replace(args, n_group=1, topk_group=1),
        "not scaled": dataclasses.replace(args, routed_scaling_factor=1.0),
        "renormalised": dataclasses.replace(args, norm_topk_prob=True),
        "sigmoid scores": dataclasses.replace(args, router="sigmoid"),
    }
    for what, variant in variants.items():
        assert error(variant) > 1e-2, what


def test_deepseek_v2_rounds_rope_and_router_where_transformers_does():
    """In bf16, DeepSeek-V2's RoPE (complex pairs in fp32, cast back) and router (fp32 logits)
    give transformers' bits: RoPE against its `apply_rotary_emb` on 1000 positions of YaRN, the
    router against `DeepseekV2TopkRouter`. DeepSeek-V3's way (halves rotated in bf16) does not."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import apply_rotary_emb

    from reshard.runtime.mla import MLAttention, pairs_to_halves
    from reshard.runtime.model import Router, rope_cos_sin

    hf = build_model("deepseek_v2")
    args = get_spec("deepseek_v2").parse_config(hf.config.to_dict())
    g = torch.Generator().manual_seed(0)
    positions = torch.arange(1000)[None]
    q = (3 * torch.randn(2, 8, 1000, 16, generator=g)).bfloat16()
    k = (3 * torch.randn(2, 1, 1000, 16, generator=g)).bfloat16()
    want_q, want_k = apply_rotary_emb(q, k, hf.model.rotary_emb(q, positions))

    def rotated(args, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.float32 if args.rope_fp32 else x.dtype  # as Transformer.forward builds them
        tables = rope_cos_sin(
            positions, 16, args.rope_theta, dtype, args.rope_interleaved, args.yarn, args.rope_fp32
        )
        return MLAttention(args, 0)._rope(x, *(t[:, None] for t in tables))

    assert torch.equal(rotated(args, q), want_q)
    assert torch.equal(rotated(args, k), want_k)
    v3_way = dataclasses.replace(args, rope_interleaved=False, rope_fp32=False)
    assert not torch.equal(rotated(v3_way, q), pairs_to_halves(want_q))

    gate = hf.model.layers[1].mlp.gate  # its weight fp32, as transformers keeps it
    router = Router(args)
    with torch.no_grad():
        gate.weight.copy_(gate.weight.bfloat16())  # a bf16 checkpoint's values
        router.weight.copy_(gate.weight)
    x = (2 * torch.randn(500, 64, generator=g)).bfloat16()
    _, want_weights, want_ids = gate(x)
    ids, weights = router(x)
    assert torch.equal(ids, want_ids)
    assert torch.equal(weights, want_weights.bfloat16())  # the runtime hands experts x's dtype


def test_each_gpt_oss_feature_changes_the_logits(written):
    """The tiny gpt_oss case switches each of its variants on where it matters: the runtime
    model with one of them off (or done the other families' way) misses transformers' logits,
    so the parity tests here and in test_runtime_parity.py would catch any done wrong."""
    hf = build_model("gpt_oss")
    args = _args("gpt_oss", written["gpt_oss"])
    state = hf_state(hf)
    ids = torch.randint(
        0, hf.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3)
    )

    def logits(args, state) -> torch.Tensor:
        ours = CausalLM(args).eval()
        ours.load_state_dict(state, strict=True)
        with torch.no_grad():
            return ours(ids)

    def without(suffix: str, value: float) -> dict[str, torch.Tensor]:
        return {n: torch.full_like(t, value) if n.endswith(suffix) else t for n, t in state.items()}

    with torch.no_grad():
        want = hf(input_ids=ids).logits
    assert (logits(args, state) - want).abs().max().item() < 1e-5
    variants = {
        "no sliding window": (dataclasses.replace(args, sliding_layers=()), state),
        "no SwiGLU clamp": (dataclasses.replace(args, swiglu_limit=1e6), state),
        "gate rows, then up rows": (dataclasses.replace(args, experts_interleaved=False), state),
        "no attention sinks": (args, without("self_attn.sinks", -1e4)),  # exp(-1e4) = 0
        "no router bias": (args, without("mlp.router.bias", 0.0)),
    }
    for what, (variant_args, variant_state) in variants.items():
        assert (logits(variant_args, variant_state) - want).abs().max().item() > 1e-2, what


# --- every rank file against distribute_tensor ---------------------------------------------------


def tp_placement(name: str, tp2ep: bool, model_type: str) -> tuple:
    """What the tp mesh dim does to tensor `name`, from DESIGN.md's table of styles."""
    transposed = model_type in ("llama4_text", "gpt_oss")  # experts [E, H, 2I] and [E, I, H]
    if name.endswith("experts.gate_up_proj"):  # [E, 2I, H]
        if tp2ep:
            return ("shard", 0)
        if model_type == "gpt_oss":  # gate and up columns alternate: blocks hold whole pairs
            return ("shard", 2)
        return ("strided", 2 if transposed else 1, 2)
    if name.endswith("experts.down_proj"):  # [E, H, I]
        return ("shard", 0) if tp2ep else ("shard", 1 if transposed else 2)
    if name.endswith("experts.gate_up_proj_bias"):  # [E, 2I]: split as its weight's columns
        return ("shard", 0) if tp2ep else ("shard", 1)
    if name.endswith("experts.down_proj_bias"):  # [E, H]: a rowwise bias, whole over tp
        return ("shard", 0) if tp2ep else ("replicate",)
    if name.endswith("self_attn.sinks"):  # one per query head
        return ("shard", 0)
    if re.search(r"self_attn\.[qkv]_proj\.(weight|bias)$", name):
        return ("shard", 0)  # colwise: weight rows, bias entries
    if re.search(r"self_attn\.(q_b|kv_b)_proj\.weight$", name):
        return ("shard", 0)  # MLA's per-head up-projections: rows are whole heads
    if re.search(r"self_attn\.[qk]_norm\.weight$", name) and model_type == "olmoe":
        return ("shard", 0)  # over the whole projection: split with it
    if re.search(r"(self_attn\.o_proj|down_proj)\.weight$", name):
        return ("shard", 1)  # rowwise: dense and shared-expert down projections too
    if re.search(r"(gate_proj|up_proj)\.weight$", name):
        return ("shard", 0)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return ("shard", 0)
    return ("replicate",)  # norms, router weight and bias, shared_expert_gate, MLA's *_a_*


def expected_placements(name: str, layout: str, model_type: str) -> list[tuple]:
    names, _, flags = parse_layout(layout)
    out = []
    for dim in names:
        if dim == "tp":
            out.append(tp_placement(name, "tp2ep" in flags, model_type))
        elif dim == "ep" and ".experts." in name:
            out.append(("shard", 0))
        else:
            out.append(("replicate",))
    return out


@pytest.fixture(scope="module")
def converted(written, tmp_path_factory) -> dict[tuple[str, str], Path]:
    out = {}
    for model_type in NEW:
        for layout in LAYOUTS:
            directory = tmp_path_factory.mktemp(f"{model_type}-{layout}")
            plan = make_plan(open_source(str(written[model_type])), Layout.parse(layout))
            convert(plan, directory, progress=False)
            out[model_type, layout] = directory
    return out


@pytest.fixture(scope="module")
def oracle_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family-oracles")
    out = {}
    for model_type in NEW:
        out[model_type] = root / f"{model_type}.safetensors"
        state = {k: v.contiguous() for k, v in hf_state(build_model(model_type)).items()}
        save_file(state, str(out[model_type]))
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("model_type", NEW)
def test_manifest_placements_match_design_table(model_type, layout, converted):
    manifest = json.loads((converted[model_type, layout] / "reshard.json").read_text())
    assert manifest["model_type"] == model_type
    for name, entry in manifest["params"].items():
        want = [placement_text(p) for p in expected_placements(name, layout, model_type)]
        assert entry["placements"] == want, name


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("model_type", NEW)
def test_every_rank_file_matches_distribute_tensor(model_type, layout, converted, oracle_files):
    names, shape, _ = parse_layout(layout)
    world = 1
    for s in shape:
        world *= s
    state = hf_state(build_model(model_type))
    expected = {name: expected_placements(name, layout, model_type) for name in state}
    results = run_on_ranks(
        _rank_checks_file,
        world,
        str(converted[model_type, layout]),
        str(oracle_files[model_type]),
        names,
        shape,
        expected,
        1,  # tp <= kv heads in every layout here
        timeout_s=150,
    )
    for rank, result in enumerate(results):
        assert result["problems"] == [], f"rank {rank}"
        assert result["keys"] == sorted(state), f"rank {rank}"


def test_glm4_multi_token_prediction_layers_are_dropped(written, tmp_path):
    """GLM-4.5 ships its MTP layer as layer `num_hidden_layers`; transformers drops it, so do we."""
    from safetensors.torch import load_file

    src = Path(shutil.copytree(written["glm4_moe"], tmp_path / "src"))
    (file,) = src.glob("*.safetensors")
    tensors = load_file(str(file))
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    tensors[f"model.layers.{layers}.eh_proj.weight"] = torch.ones(4, 4)
    save_file(tensors, str(file), metadata={"format": "pt"})
    plan = make_plan(open_source(str(src)), Layout.parse("tp2"))
    assert not [n for n in plan.params if n.startswith(f"model.layers.{layers}.")]
    # ... and only past the configured layers: an unknown tensor inside them is still an error.
    tensors["model.layers.0.eh_proj.weight"] = torch.ones(4, 4)
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(Exception, match=r"no converter maps: model\.layers\.0\.eh_proj\.weight"):
        make_plan(open_source(str(src)), Layout.parse("tp2"))


# --- the manifest is the contract ----------------------------------------------------------------


def _wire(directory: Path, params) -> None:
    """parallelize() a meta model for `directory`'s layout with these placements (no groups:
    only the decisions run, no collective)."""
    manifest = load_manifest(directory)
    args = get_spec(manifest.model_type).parse_config(manifest.config)
    layout = manifest.parsed_layout
    parallelize(meta_model(args), layout, ParallelGroups(layout=layout, rank=0), params)


@pytest.mark.parametrize("model_type", NEW)
def test_runtime_reads_every_placement_the_manifest_records(model_type, converted):
    directory = converted[model_type, "ep2tp2"]
    params = load_manifest(directory).param_plans()
    _wire(directory, params)  # as converted: accepted


@pytest.mark.parametrize(
    "model_type, name, placements, error",
    [
        # the router split over tp: the runtime routes with the whole router on every rank
        (
            "qwen2_moe",
            "model.layers.1.mlp.gate.weight",
            (Replicate(), Shard(0)),
            "cannot run Shard",
        ),
        # only q split: heads would not line up with k and v
        (
            "qwen2_moe",
            "model.layers.0.self_attn.k_proj.weight",
            (Replicate(), Replicate()),
            "splits only some of",
        ),
        # experts kept whole over ep: the runtime would route tokens to experts it lacks
        (
            "qwen2_moe",
            "model.layers.1.mlp.experts.down_proj",
            (Replicate(), Shard(2)),
            "experts split over no dims",
        ),
        # MLA's low-rank latent split over tp: every head needs all of it
        (
            "deepseek_v3",
            "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
            (Replicate(), Shard(0)),
            "Shard",
        ),
        # queries split by heads, keys and values not: heads would not line up
        (
            "deepseek_v3",
            "model.layers.0.self_attn.kv_b_proj.weight",
            (Replicate(), Replicate()),
            "only some of",
        ),
        # gate and up alternate: a [gate; up] strided split gives a rank two ranges of pairs,
        # not the I-slice of its down_proj rows
        (
            "gpt_oss",
            "model.layers.0.mlp.experts.gate_up_proj",
            (Shard(0), StridedShard(2, 2)),
            "does not match down_proj's I-slice",
        ),
        # a rowwise bias split over tp: each rank would add a piece of it to a partial sum
        (
            "gpt_oss",
            "model.layers.0.mlp.experts.down_proj_bias",
            (Shard(0), Shard(1)),
            "cannot run Shard",
        ),
        (
            "gpt_oss",
            "model.layers.0.self_attn.o_proj.bias",
            (Replicate(), Shard(0)),
            "cannot run Shard",
        ),
        # sinks kept whole while the heads split
        ("gpt_oss", "model.layers.0.self_attn.sinks", (Replicate(), Replicate()), "only some of"),
    ],
)
def test_runtime_refuses_placements_it_does_not_run(model_type, name, placements, error, converted):
    directory = converted[model_type, "ep2tp2"]
    params = load_manifest(directory).param_plans()
    params[name] = dataclasses.replace(params[name], placements=placements)
    with pytest.raises(CheckpointError, match=error):
        _wire(directory, params)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "mixtral"])
def test_an_already_fused_checkpoint_passes_through(model_type, written, converted, tmp_path):
    """transformers 5.x's in-memory names (fused experts, mixtral's `mlp.`) saved as they are:
    converted without any op, to the same rank files as the per-expert checkpoint."""
    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(written[model_type] / "config.json", fused / "config.json")
    state = {k: v.contiguous() for k, v in hf_state(build_model(model_type)).items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    convert(make_plan(open_source(str(fused)), Layout.parse("ep2tp2")), out, progress=False)
    for rank in range(4):
        name = f"rank-{rank:05d}-of-00004.safetensors"
        assert (out / name).read_bytes() == (converted[model_type, "ep2tp2"] / name).read_bytes()
