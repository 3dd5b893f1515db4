"""FP8 block-scaled checkpoints (Qwen3-30B-A3B-FP8's layout) converted, verified and run.

The source is a tiny qwen3_moe checkpoint written by transformers and quantized by
transformers' own FineGrainedFP8 code (tests/helpers_fp8.py): attention and expert weights
float8_e4m3fn with float32 scales per [16, 16] block; norms, embeddings, lm_head and the
router unquantized. Oracles: transformers' FP8 model (which tensors, named and shaped how),
its quantizer applied to the fused in-memory tensors (the global tensors), its dequantizer,
`distribute_tensor` on gloo ranks, and transformers' model on the dequantized checkpoint.

- Kept FP8 (the default): every rank's float8 weight and scale equal, byte for byte,
  `distribute_tensor` of transformers' fused tensors, the scale placed like its weight; the
  manifest records the format and every scale; `verify --against` catches a flipped float8
  byte and a changed scale; a layout that cuts a scale block is refused in one line.
- `--dtype bf16`: every rank's tensor equals transformers' dequantization, and each rank
  reads exactly its weight blocks and their scales.
- Run: tp2 / ep2tp2 logits of the FP8 shards equal transformers' on the dequantized
  checkpoint, with the weights held in float8; greedy tokens through `reshard run` too.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers_cli import last_json, one_error_line, run_reshard
from helpers_dist import quantized_rank_logits, run_on_ranks
from helpers_families import FAMILIES, hf_greedy, load_hf_model
from helpers_files import edit_rank_tensor
from helpers_fp8 import (
    BLOCK,
    dequantize,
    fp8_param_table,
    fused_fp8_state,
    write_dequantized_copy,
    write_fp8_checkpoint,
)
from safetensors.torch import load_file, save_file
from test_families import expected_placements
from test_placements import _rank_checks_file, parse_layout

from reshard.checkpoint import ShardedCheckpoint
from reshard.convert import convert, make_plan, read_local
from reshard.converters import fp8
from reshard.converters.lazy import Cat, Dequant, InMemoryTensor, Stack
from reshard.errors import CheckpointError, ConversionError, LayoutError
from reshard.layout import Layout
from reshard.manifest import load_manifest
from reshard.sources import open_source
from reshard.verify import check_against, check_files

pytest.importorskip("transformers")

MODEL = "qwen3_moe"
HEAD_DIM = 16  # tests/helpers_families.py's qwen3_moe
SCALE = "_scale_inv"
# deepseek_v3 gets FP8 with no code of its own. Its tiny MLA sizes (kv_a_proj_with_mqa 36
# rows, kv_b_proj 20 columns, heads of 28 and 22 rows) are multiples of 4 only, and
# transformers' quantizer leaves a weight its block does not divide unquantized.
BLOCKS = {MODEL: BLOCK, "deepseek_v3": (4, 4)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """`sources(model_type)` -> its FP8 checkpoint, written once per module."""
    done: dict[str, Path] = {}

    def make(model_type: str) -> Path:
        if model_type not in done:
            if model_type not in FAMILIES:
                pytest.skip(f"{model_type} is not among the families here yet")
            root = tmp_path_factory.mktemp(f"fp8-{model_type}")
            done[model_type] = write_fp8_checkpoint(
                model_type, root / "src", block=BLOCKS[model_type]
            )
        return done[model_type]

    return make


@pytest.fixture(scope="module")
def src(sources) -> Path:
    return sources(MODEL)


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    """`converted(layout, dtype="keep", model_type=MODEL)` -> a finished directory, converted
    once per module."""
    done: dict[tuple[str, str, str], Path] = {}

    def make(layout: str, dtype: str = "keep", model_type: str = MODEL) -> Path:
        key = (layout, dtype, model_type)
        if key not in done:
            out = tmp_path_factory.mktemp(f"fp8-{model_type}-{layout}-{dtype}")
            plan = make_plan(open_source(str(sources(model_type))), Layout.parse(layout), dtype)
            convert(plan, out, progress=False)
            done[key] = out
        return done[key]

    return make


def _world(layout: str) -> int:
    return math.prod(parse_layout(layout)[1])


# --- what is converted: transformers' FP8 model's own tensors -------------------------------------


@pytest.mark.parametrize("model_type", sorted(BLOCKS))
def test_plan_holds_exactly_transformers_fp8_parameters(model_type, sources):
    """Names, global shapes and dtypes of every target, scales included, are those of the model
    transformers' FineGrainedFP8 integration builds; each scale is recorded with its weight."""
    plan = make_plan(open_source(str(sources(model_type))), Layout.parse("tp2"))
    table = fp8_param_table(model_type, BLOCKS[model_type])
    assert {n: (p.shape, p.dtype) for n, p in plan.params.items()} == table
    scales = {n.removesuffix(SCALE): n for n in table if n.endswith(SCALE)}
    assert plan.scales == scales
    experts = next(n for n in table if n.endswith("mlp.experts.gate_up_proj"))
    assert experts in scales  # fused experts carry scales too: [E, 2I / b, H / b]
    assert table[experts + SCALE][0] == (
        8,
        64 // BLOCKS[model_type][0],
        64 // BLOCKS[model_type][1],
    )


def test_manifest_records_the_fp8_format_and_every_scale(src, converted):
    out = converted("ep2tp2")
    manifest = json.loads((out / "reshard.json").read_text())
    scales = {n.removesuffix(SCALE): n for n in manifest["params"] if n.endswith(SCALE)}
    assert manifest["quantization"] == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
        "scales": scales,
    }
    assert len(scales) == 2 * 6  # per layer: q, k, v, o, experts gate_up and down
    for weight, scale in scales.items():
        assert manifest["params"][weight]["dtype"] == "F8_E4M3"
        assert manifest["params"][scale]["dtype"] == "F32"
        assert manifest["params"][scale]["placements"] == manifest["params"][weight]["placements"]
    # FP8 kept: config.json keeps quantization_config, so transformers and vLLM read it as FP8.
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (src / "config.json").read_text()
    )
    assert load_manifest(out).quantization == manifest["quantization"]


@pytest.mark.parametrize(
    "edit, error",
    [
        (
            lambda m, w, s: m["params"][s].update(placements=["Replicate()", "Replicate()"]),
            "placed like its weight",
        ),
        (lambda m, w, s: m["params"][s].update(shape=[8, 8, 4]), "scale shape"),
        (lambda m, w, s: m["quantization"]["scales"].pop(w), "every float8 parameter"),
        (lambda m, w, s: m["quantization"].update(fmt="e5m2"), "quantization.fmt"),
    ],
    ids=["scale placed apart", "scale shape", "scale missing", "format"],
)
def test_manifest_schema_refuses_a_wrong_fp8_record(converted, tmp_path, edit, error):
    out = Path(shutil.copytree(converted("ep2tp2"), tmp_path / "copy"))
    manifest = json.loads((out / "reshard.json").read_text())
    weight = "model.layers.1.mlp.experts.gate_up_proj"
    edit(manifest, weight, weight + SCALE)
    (out / "reshard.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=error):
        load_manifest(out)


# --- every rank against distribute_tensor ----------------------------------------------------------


def _check_ranks(
    out: Path, oracle: dict[str, torch.Tensor], layout: str, tmp_path: Path, model_type: str = MODEL
) -> None:
    names, shape, _ = parse_layout(layout)
    path = tmp_path / "oracle.safetensors"
    save_file({k: v.contiguous() for k, v in oracle.items()}, str(path))
    # A scale is placed like its weight: the weight's row of DESIGN.md's table.
    expected = {n: expected_placements(n.removesuffix(SCALE), layout, model_type) for n in oracle}
    tp = dict(zip(names, shape)).get("tp", 1)
    kv_repeat = max(1, tp // 4) if model_type == MODEL else 1  # 4 kv heads; MLA repeats none
    results = run_on_ranks(
        _rank_checks_file, _world(layout), str(out), str(path), names, shape,
        expected, kv_repeat, BLOCKS[model_type][0], timeout_s=240,
    )  # fmt: skip
    for rank, result in enumerate(results):
        assert result["problems"] == [], f"rank {rank}"
        assert result["keys"] == sorted(oracle), f"rank {rank}"


@pytest.mark.parametrize(
    "model_type, layout",
    [(MODEL, "tp2"), (MODEL, "ep2tp2"), (MODEL, "tp8-tp2ep"), ("deepseek_v3", "ep2tp2")],
)
def test_every_rank_holds_distribute_tensor_of_fp8_weights_and_scales(
    model_type, layout, converted, tmp_path
):
    """tp8-tp2ep: 4 kv heads over tp8 repeat each head's weight rows and its scale rows.
    deepseek_v3: MLA's q_b/kv_b split by heads, its *_a_* projections replicated, with scales."""
    state = fused_fp8_state(model_type, block=BLOCKS[model_type])
    _check_ranks(converted(layout, model_type=model_type), state, layout, tmp_path, model_type)


@pytest.mark.parametrize(
    "model_type, layout", [(MODEL, "ep2tp2"), (MODEL, "tp4"), ("deepseek_v3", "tp2")]
)
def test_dequantized_ranks_equal_transformers_dequantization(
    model_type, layout, converted, tmp_path
):
    """--dtype bf16: weights dequantized as transformers does, no scales, no quantization_config
    (tp4 cuts scale blocks: fine once there are no scales)."""
    state = fused_fp8_state(model_type, block=BLOCKS[model_type])
    oracle = {
        n: dequantize(t, state[n + SCALE], torch.bfloat16) if n + SCALE in state else t.bfloat16()
        for n, t in state.items()
        if not n.endswith(SCALE)
    }
    out = converted(layout, "bf16", model_type)
    _check_ranks(out, oracle, layout, tmp_path, model_type)
    manifest = json.loads((out / "reshard.json").read_text())
    assert "quantization" not in manifest and "quantization_config" not in manifest["config"]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert any("dequantized from FP8" in note for note in manifest["notes"])


@pytest.mark.parametrize("layout", ["ep2tp2", "tp4"])
def test_dequantizing_rank_reads_only_its_blocks_and_their_scales(layout, src):
    """Slice pushdown through the dequantization: the float8 elements a rank reads are its own
    local elements, once each, and beside each box of a weight it reads only the scales
    covering that box: with whole blocks per rank (ep2tp2) exactly 1 scale per 16 x 16
    elements; tp4's 8-row expert pieces need the scale of the whole 16-row block."""
    from test_converters import _record_reads

    plan = make_plan(open_source(str(src)), Layout.parse(layout), "bf16")
    quantized = {n for n, t in plan.targets.items() if isinstance(t, Dequant)}
    assert len(quantized) == 12
    calls = _record_reads(plan)
    for rank in range(plan.layout.world_size):
        calls.clear()
        local_fp8 = sum(
            read_local(plan, t).numel() for t in plan.rank_tensors(rank) if t.name in quantized
        )
        weights = [(n, box) for n, box in calls if n + SCALE in plan.source.tensors]
        scales = [(n, box) for n, box in calls if n.endswith(SCALE)]
        assert sum(math.prod(b - a for a, b in box) for _, box in weights) == local_fp8, rank
        covering = [
            (
                n + SCALE,
                tuple(
                    (a // 16, -(-b // 16)) if d >= len(box) - 2 else (a, b)
                    for d, (a, b) in enumerate(box)
                ),
            )
            for n, box in weights
        ]
        assert scales == covering, rank
        if layout == "ep2tp2":
            assert sum(math.prod(b - a for a, b in box) for _, box in scales) * 256 == local_fp8


def test_dequant_covers_partial_blocks_as_transformers_does():
    """Dims that are not a multiple of the block (DeepSeek-V3's kv_a_proj_with_mqa: 576 rows in
    128-row blocks): the last block has a scale of its own. Any box agrees with transformers'
    `_dequantize_fp8_weight`."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    from reshard.runtime.fp8 import dequantize as runtime_dequantize

    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(40, 24, generator=g) * 50).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 2, generator=g) + 0.5  # ceil(40 / 16), ceil(24 / 16)
    want = _dequantize_fp8_weight(weight, scale, list(BLOCK), torch.float32)
    lazy = Dequant(InMemoryTensor(weight), InMemoryTensor(scale), BLOCK, torch.float32)
    for box in [((0, 40), (0, 24)), ((5, 37), (3, 24)), ((32, 40), (16, 17)), ((15, 17), (0, 9))]:
        got = lazy.read(box)
        assert torch.equal(got, want[box[0][0] : box[0][1], box[1][0] : box[1][1]]), box
    assert torch.equal(runtime_dequantize(weight, scale, BLOCK, torch.float32), want)


# --- refusals ---------------------------------------------------------------------------------------


def test_a_layout_that_cuts_scale_blocks_is_refused_naming_what_fits(src):
    """tp4 cuts each 32-row expert into 8-row pieces of 16-row blocks (Qwen3-30B-A3B-FP8 at
    tp4: 192-row pieces of 128-row blocks). One line: the parameter, the block size, and
    the layouts near it that fit."""
    fits = "layouts that fit: tp4-tp2ep, tp2, tp1, or --dtype bf16"
    with pytest.raises(LayoutError, match=re.escape(fits)) as e:
        make_plan(open_source(str(src)), Layout.parse("tp4"))
    assert "model.layers.0.mlp.experts.gate_up_proj [8, 64, 64]" in str(e.value)
    assert "weight_block_size [16, 16]" in str(e.value)
    for fit in ("tp4-tp2ep", "tp2"):  # and what it names does fit
        make_plan(open_source(str(src)), Layout.parse(fit))
    result = run_reshard("plan", "--src", str(src), "--layout", "ep2tp4")
    one_error_line(
        result.returncode, result.stderr, "layout ep2tp4", "gate_up_proj",
        "weight_block_size [16, 16]", "layouts that fit: ep2tp4-tp2ep, ep2tp2, ep2",
    )  # fmt: skip


def test_scales_without_an_fp8_config_are_refused(src, tmp_path):
    copy = Path(shutil.copytree(src, tmp_path / "src"))
    config = json.loads((copy / "config.json").read_text())
    del config["quantization_config"]
    (copy / "config.json").write_text(json.dumps(config))
    result = run_reshard("plan", "--src", str(copy), "--layout", "tp2")
    one_error_line(
        result.returncode, result.stderr, "FP8 block scales (weight_scale_inv) need",
        "quantization_config", "this config has none",
    )  # fmt: skip


def test_fused_gate_up_that_ends_mid_block_is_refused():
    """Gate and up of 24 rows in 16-row blocks: the fused scale's rows would not line up."""
    quant = fp8.BlockFP8(block=BLOCK)
    part = InMemoryTensor(torch.zeros(24, 32).to(torch.float8_e4m3fn))
    ok = Stack([Cat([InMemoryTensor(torch.zeros(32, 32).to(torch.float8_e4m3fn))] * 2, 0)], 0)
    assert fp8.target_blocks(ok, quant) == (1, 16, 16)
    with pytest.raises(ConversionError, match="ends mid-way through a 16-wide FP8 scale block"):
        fp8.target_blocks(Stack([Cat([part, part], dim=0)], dim=0), quant)


# --- verify ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, edit",
    [
        # one float8 byte flipped: 0x7f is NaN in e4m3fn, so only a bytewise compare is exact
        (
            "model.layers.1.mlp.experts.down_proj",
            lambda t: t.view(torch.uint8)[5].fill_(0x7F),
        ),
        ("model.layers.1.mlp.experts.down_proj_scale_inv", lambda t: t[3].mul_(2)),
    ],
    ids=["fp8 byte", "scale"],
)
def test_verify_against_checks_fp8_bytes_and_scales_bit_exactly(
    src, converted, tmp_path, name, edit
):
    """Edited and re-hashed into the manifest: the hashes pass, --against does not."""
    out = Path(shutil.copytree(converted("ep2tp2"), tmp_path / "copy"))
    plan = make_plan(open_source(str(src)), Layout.parse("ep2tp2"))
    findings = list(check_against(ShardedCheckpoint(out), plan))
    assert all(f.ok for f in findings) and len(findings) == 4 + len(plan.params) == 4 + 37
    edit_rank_tensor(out, 2, name, edit)
    assert all(f.ok for f in check_files(ShardedCheckpoint(out)))
    failed = [f.what for f in check_against(ShardedCheckpoint(out), plan) if not f.ok]
    assert failed == [f"{name}: rank 2 (rank-00002-of-00004.safetensors) differs from the source"]


# --- resharding and exporting FP8 shards --------------------------------------------------------------


def test_fp8_shards_reshard_and_export_back_exactly(src, converted, tmp_path):
    """tp8-tp2ep shards (k/v heads and their scale rows repeated) as a source: resharded to
    ep2tp2 they are byte for byte the direct conversion; exported, the source's own files."""
    out = tmp_path / "ep2tp2"
    convert(
        make_plan(open_source(str(converted("tp8-tp2ep"))), Layout.parse("ep2tp2")),
        out,
        progress=False,
    )
    direct = converted("ep2tp2")
    for rank in range(4):
        name = f"rank-{rank:05d}-of-00004.safetensors"
        assert (out / name).read_bytes() == (direct / name).read_bytes(), name
    result = run_reshard("export", str(converted("tp8-tp2ep")), "--out", str(tmp_path / "hf"), "-q")
    assert result.returncode == 0, result.stderr
    (original,) = src.glob("*.safetensors")
    want = load_file(str(original))
    got = {
        k: v for f in (tmp_path / "hf").glob("*.safetensors") for k, v in load_file(str(f)).items()
    }
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key].view(torch.uint8), tensor.view(torch.uint8)), key


# --- the runtime ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dequantized(sources, tmp_path_factory):
    """`dequantized(model_type)` -> the FP8 checkpoint dequantized by transformers' function."""
    done: dict[str, Path] = {}

    def make(model_type: str) -> Path:
        if model_type not in done:
            root = tmp_path_factory.mktemp(f"fp8-dequantized-{model_type}")
            done[model_type] = write_dequantized_copy(sources(model_type), root / "src")
        return done[model_type]

    return make


@pytest.fixture(scope="module")
def dequantized_src(dequantized) -> Path:
    return dequantized(MODEL)


@pytest.mark.parametrize(
    "model_type, layout",
    [(MODEL, "tp2"), (MODEL, "ep2tp2"), ("deepseek_v3", "tp2"), ("deepseek_v3", "ep2tp2")],
)
def test_runtime_logits_match_transformers_on_the_dequantized_checkpoint(
    model_type, layout, converted, dequantized
):
    from reshard.runtime.reference import fixed_batch

    hf = load_hf_model(dequantized(model_type))
    ids = fixed_batch(hf.config.vocab_size)
    with torch.no_grad():
        want = hf(input_ids=ids).logits
    out = converted(layout, model_type=model_type)
    results = run_on_ranks(quantized_rank_logits, _world(layout), str(out), ids, timeout_s=240)
    for rank, result in enumerate(results):
        assert result["held"] == torch.float8_e4m3fn and result["reads"] == torch.float32, rank
        diff = (result["logits"] - want).abs().max().item()
        assert diff < 1e-4, (rank, diff)


def test_runtime_dequantizes_each_fp8_weight_once_per_forward_and_keeps_none(
    converted, monkeypatch
):
    """The experts read their weight's shape, then the weight: one dequantization, held only
    while that module runs (so one layer's weights exist in the compute dtype at a time)."""
    import reshard.runtime.fp8 as runtime_fp8
    from reshard.runtime.load import load_parallel_model

    out = converted("tp1")
    pm = load_parallel_model(ShardedCheckpoint(out), 0, device=torch.device("cpu"))
    calls = []
    dequantize = runtime_fp8.dequantize
    monkeypatch.setattr(
        runtime_fp8, "dequantize", lambda w, *a: calls.append(w.shape) or dequantize(w, *a)
    )
    with torch.no_grad():
        pm.model(torch.arange(7)[None])
    assert len(calls) == len(load_manifest(out).quantization["scales"]) == 12
    held = [m.held for m in pm.model.modules() if isinstance(m, runtime_fp8.BlockDequantize)]
    assert len(held) == 12 and all(h is None for h in held)


def test_greedy_generation_of_fp8_shards_matches_transformers(converted, dequantized_src):
    """`reshard run` on tp2 FP8 shards: the tokens transformers generates on the dequantized
    checkpoint (a prompt no tp divides, so prefill pads)."""
    from tokenizers import Tokenizer

    out = converted("tp2")
    prompt = "Why is the sky blue"
    prompt_ids = Tokenizer.from_file(str(out / "tokenizer.json")).encode(prompt).ids
    assert len(prompt_ids) % 2 == 1
    want = hf_greedy(load_hf_model(dequantized_src), prompt_ids, 8)
    result = run_reshard(
        "run", str(out), "--prompt", prompt, "--max-new-tokens", "8", "--json",
        "--device", "cpu", "--timeout", "180",
    )  # fmt: skip
    assert last_json(result)["output_ids"] == want


def test_validate_refuses_fp8_shards_in_one_line(converted, src):
    """validate compares gradients; float8 weights are not trained here, so it says what to do."""
    result = run_reshard(
        "validate", str(converted("tp2")), "--against", str(src), "--device", "cpu"
    )
    one_error_line(result.returncode, result.stderr, "keeps FP8 weights", "--dtype fp32")


# --- reshard synth --like qwen3-30b-a3b-fp8, and the release's real shapes -------------------------


def _sparse_checkpoint(directory: Path, config: dict) -> Path:
    """Every tensor `reshard synth` would write for `config`, in one file whose header is real
    and whose data is a hole: planning reads headers only."""
    from reshard.synth import hf_tensor_dtypes
    from reshard.writer import nbytes, safetensors_header

    directory.mkdir(parents=True)
    entries = [(n, d, s) for n, (s, d) in hf_tensor_dtypes(config, torch.bfloat16).items()]
    header = safetensors_header(entries, {"format": "pt"})
    with open(directory / "model.safetensors", "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(nbytes(d, s) for _, d, s in entries))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_synth_fp8_writes_what_transformers_fp8_model_holds(tmp_path):
    """`synth --like qwen3-30b-a3b-fp8` cut to tiny sizes: after conversion, the parameters
    are exactly those of transformers' FP8 model of that config (float8 where it quantizes,
    a float32 scale of its shape beside each), and they dequantize to the bf16 preset's
    values within float8's precision."""
    import transformers
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear

    from reshard.synth import preset, write_synth

    small = dict(
        vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, moe_intermediate_size=32, num_experts=8, intermediate_size=96,
    )  # fmt: skip
    config, _ = preset("qwen3-30b-a3b-fp8", layers=2)
    config.update(small)
    config["quantization_config"] = {**config["quantization_config"], "weight_block_size": [16, 16]}
    write_synth(tmp_path / "fp8", config, seed=1)
    plan = make_plan(open_source(str(tmp_path / "fp8")), Layout.parse("tp2"))
    hf_config = transformers.Qwen3MoeConfig(
        **{k: v for k, v in config.items() if k != "quantization_config"}
    )
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    fp8_config = transformers.FineGrainedFP8Config(
        weight_block_size=(16, 16), modules_to_not_convert=["lm_head"]
    )
    model = replace_with_fp8_linear(model, ["lm_head"], fp8_config, pre_quantized=True)
    want = {
        n: (tuple(p.shape), p.dtype == torch.float8_e4m3fn) for n, p in model.named_parameters()
    }
    assert {n: (p.shape, p.dtype == torch.float8_e4m3fn) for n, p in plan.params.items()} == want

    bf16, _ = preset("qwen3-30b-a3b", layers=2)
    bf16.update(small)
    write_synth(tmp_path / "bf16", bf16, seed=1)
    reference = make_plan(open_source(str(tmp_path / "bf16")), Layout.parse("tp2"))
    dequantized = make_plan(open_source(str(tmp_path / "fp8")), Layout.parse("tp2"), "bf16")
    for name in plan.scales:
        got = dequantized.targets[name].materialize().float()
        ref = reference.targets[name].materialize().float()
        assert (got - ref).abs().max() <= ref.abs().max() / 8, name  # e4m3: 3 mantissa bits


def test_qwen3_30b_a3b_fp8_at_real_size_plans_where_blocks_fit(tmp_path):
    """The release's own config.json (tests/fixtures; two of its 48 layers): experts of 768 rows
    in 128-row blocks split over tp2 (384 rows, 3 blocks), not tp4 (192 rows); whole experts per
    rank (-tp2ep) fit any tp, and so do 4 k/v heads of 128 rows repeated over tp8. `reshard
    synth --like qwen3-30b-a3b-fp8` writes that config's shapes."""
    from reshard.synth import hf_tensor_dtypes, preset

    fixture = Path(__file__).parent / "fixtures" / "Qwen--Qwen3-30B-A3B-FP8.config.json"
    config = {**json.loads(fixture.read_text()), "num_hidden_layers": 2}
    synth, _ = preset("qwen3-30b-a3b-fp8", layers=2)
    assert hf_tensor_dtypes(synth, torch.bfloat16) == hf_tensor_dtypes(config, torch.bfloat16)
    src = _sparse_checkpoint(tmp_path / "src", config)
    with pytest.raises(LayoutError) as e:
        make_plan(open_source(str(src)), Layout.parse("ep4tp4"))
    assert str(e.value) == (
        "layout ep4tp4: model.layers.0.mlp.experts.gate_up_proj [128, 1536, 2048] splits dim 1 "
        "into pieces of 192, not whole FP8 scale blocks (weight_block_size [128, 128]); "
        "layouts that fit: ep4tp4-tp2ep, ep4tp2, ep4, or --dtype bf16"
    )
    plan = make_plan(open_source(str(src)), Layout.parse("ep8tp2"))
    rank = {t.name: t.shape for t in plan.rank_tensors(0)}
    assert rank["model.layers.1.mlp.experts.gate_up_proj"] == (16, 768, 2048)
    assert rank["model.layers.1.mlp.experts.gate_up_proj_scale_inv"] == (16, 6, 16)
    plan = make_plan(open_source(str(src)), Layout.parse("tp8-tp2ep"))
    assert plan.params["model.layers.0.self_attn.k_proj.weight_scale_inv"].head_repeat == 2


def test_deepseek_v3_fp8_release_plans_at_ep8tp8(tmp_path):
    """No code per family: DeepSeek-V3's published config (FP8, 128 x 128 blocks), four layers
    of its real shapes. MLA's projections carry scales, kv_a_proj_with_mqa's 576 rows in 5
    blocks (the last one partial); q_b/kv_b split by heads in whole blocks."""
    from reshard.converters import supported_model_types

    if "deepseek_v3" not in supported_model_types():
        pytest.skip("deepseek_v3 is not registered")
    fixture = Path(__file__).parent / "fixtures" / "deepseek-ai--DeepSeek-V3.config.json"
    config = json.loads(fixture.read_text())
    config["num_hidden_layers"] = 4  # 3 dense (first_k_dense_replace), 1 MoE
    src = _sparse_checkpoint(tmp_path / "src", config)
    plan = make_plan(open_source(str(src)), Layout.parse("ep8tp8"))
    params = plan.params
    kv_a = "model.layers.3.self_attn.kv_a_proj_with_mqa.weight"
    assert params[kv_a].shape == (576, 7168) and params[kv_a + SCALE].shape == (5, 56)
    experts = "model.layers.3.mlp.experts.gate_up_proj"
    assert params[experts + SCALE].shape == (256, 32, 56)
    assert params[experts + SCALE].placements == params[experts].placements
    # 5 attention projections a layer, then 3 dense MLP ones (layers 0-2), or 2 expert tensors
    # and a shared expert's 3 (layer 3)
    assert len(plan.scales) == 3 * (5 + 3) + 5 + 2 + 3


@pytest.mark.parametrize("layout", ["tp4", "ep4"])
def test_dequantizing_conversion_peak_memory_does_not_grow_with_the_model(layout, tmp_path):
    """`--dtype bf16` from FP8: the peak RSS of `reshard convert` (a subprocess) above the
    import-and-plan baseline is the same for a model twice as large, and far below it: it is
    bounded by the engine's segments in flight, as for a plain cast."""
    from helpers_cli import load_benchmark

    from reshard.synth import preset, write_synth

    bench = load_benchmark("convert_memory")
    extra = {}
    for layers in (8, 16):
        config, _ = preset("qwen3-30b-a3b-fp8", layers=layers)
        config.update(
            vocab_size=8192, hidden_size=512, num_attention_heads=8, num_key_value_heads=4,
            head_dim=64, moe_intermediate_size=256, num_experts=32,
        )  # fmt: skip
        src = tmp_path / f"src-{layers}"
        write_synth(src, config, max_shard_size="50MB")
        plan = make_plan(open_source(str(src)), Layout.parse(layout), "bf16")
        output = sum(plan.rank_bytes(r) for r in range(plan.layout.world_size))
        baseline = bench.measure_import(src, "tp2").peak_rss
        out = tmp_path / f"out-{layers}"
        m = bench.measure(bench.convert_command(src, layout, out, "bf16"))
        assert sum(f.stat().st_size for f in out.glob("*.safetensors")) >= output
        extra[layers] = m.peak_rss - baseline
        shutil.rmtree(out)
        shutil.rmtree(src)
    assert extra[16] < output / 4, (extra, output)  # 440 MB of bf16 written
    assert abs(extra[16] - extra[8]) < 24 << 20, extra  # twice the output, the same peak
