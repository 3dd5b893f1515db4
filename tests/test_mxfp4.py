"""MXFP4 checkpoints (GPT-OSS's release format): kept as blocks and scales, or dequantized.

The source is the tiny gpt_oss checkpoint of helpers_families with its expert weights in
MXFP4 (helpers_mxfp4.py), as openai/gpt-oss-120b stores them. Oracles: transformers'
dequantization (`convert_moe_packed_tensors`) and its model loaded dequantized
(`Mxfp4Config(dequantize=True)`), `distribute_tensor` on gloo ranks, and the source's bytes.

- Kept (the default): every rank holds `distribute_tensor` of the blocks and of the scales with
  the expert weight's placements, moved to the dims that hold them; a layout whose split cuts a
  32-value block is refused naming the parameter, the block and what fits; the manifest
  records the format; `verify --against` checks the bytes; resharding and export give the
  source's bytes back.
- `--dtype bf16`: every rank holds transformers' dequantization of its piece, read through a
  rank's own blocks and scales only.
- Run: the parallel model on MXFP4 shards gives transformers' logits on the dequantized
  model, and `reshard run` its greedy tokens.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers_cli import last_json, one_error_line, run_reshard
from helpers_dist import quantized_rank_logits, run_on_ranks
from helpers_families import hf_greedy
from helpers_files import edit_rank_tensor
from helpers_mxfp4 import (
    load_hf_mxfp4_model,
    transformers_dequantize,
    write_mxfp4_checkpoint,
)
from safetensors.torch import load_file, save_file
from test_placements import _rank_checks_file, parse_layout, placement_text

from reshard.checkpoint import ShardedCheckpoint
from reshard.convert import convert, make_plan, read_local
from reshard.converters.mxfp4 import Packed, dequantize
from reshard.errors import ConversionError, LayoutError
from reshard.layout import Layout
from reshard.manifest import load_manifest
from reshard.sources import open_source
from reshard.verify import check_against, check_files

pytest.importorskip("transformers")

LAYOUTS = ["tp2", "ep2tp2", "tp4-tp2ep"]
EXPERT_WEIGHTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _world(layout: str) -> int:
    return math.prod(parse_layout(layout)[1])


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return write_mxfp4_checkpoint(tmp_path_factory.mktemp("mxfp4") / "src")


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory):
    """`converted(layout, dtype="keep")` -> a finished directory, converted once per module."""
    done: dict[tuple[str, str], Path] = {}

    def make(layout: str, dtype: str = "keep") -> Path:
        if (layout, dtype) not in done:
            out = tmp_path_factory.mktemp(f"mxfp4-{layout}-{dtype}")
            convert(
                make_plan(open_source(str(src)), Layout.parse(layout), dtype), out, progress=False
            )
            done[layout, dtype] = out
        return done[layout, dtype]

    return make


@pytest.fixture(scope="module")
def hf_model(src):
    return load_hf_mxfp4_model(src)


# --- the format -----------------------------------------------------------------------------------


def test_dequantization_is_transformers_bit_for_bit(src):
    """The one dequantizer (conversion and runtime share it), whole and box by box, against
    `convert_moe_packed_tensors`, in bf16 and fp32; and the checkpoint is real MXFP4: it is
    near, not equal to, the unquantized weights."""
    from helpers_families import build_model, hf_state

    tensors = load_file(str(src / "model.safetensors"))
    unquantized = hf_state(build_model("gpt_oss"))
    name = "model.layers.1.mlp.experts.down_proj"  # [E, I, H]: blocks [E, H, I / 32, 16]
    blocks, scales = tensors[name + "_blocks"], tensors[name + "_scales"]
    for dtype in (torch.bfloat16, torch.float32):
        want = transformers_dequantize(blocks, scales, dtype)
        assert torch.equal(dequantize(blocks, scales, dtype), want)
    want = transformers_dequantize(blocks, scales, torch.float32)
    assert 0 < (want - unquantized[name]).abs().max() < 0.5 * unquantized[name].abs().max()
    plan = make_plan(open_source(str(src)), Layout.parse("tp1"), "fp32")
    lazy = plan.targets[name].child  # Cast(Packed): bf16 values, exactly fp32's
    assert isinstance(lazy, Packed) and lazy.shape == tuple(want.shape)
    for box in [
        ((0, 8), (0, 64), (0, 64)),
        ((3, 5), (7, 40), (10, 11)),
        ((2, 3), (32, 64), (0, 64)),
    ]:
        window = tuple(slice(a, b) for a, b in box)
        assert torch.equal(lazy.read(box).float(), want[window]), box


def test_mxfp4_blocks_without_the_config_are_refused(src, tmp_path):
    copy = Path(shutil.copytree(src, tmp_path / "src"))
    config = json.loads((copy / "config.json").read_text())
    del config["quantization_config"]
    (copy / "config.json").write_text(json.dumps(config))
    result = run_reshard("plan", "--src", str(copy), "--layout", "tp2")
    one_error_line(
        result.returncode, result.stderr, "layers.0.mlp.experts.down_proj_blocks", "quant_method"
    )


# --- kept MXFP4 -------------------------------------------------------------------------------------


def tp_placement(name: str, tp2ep: bool) -> tuple:
    """What tp does to a kept MXFP4 tensor, written out from the weights' placements: gate_up
    [E, H, 2I] Shard(2) is its blocks' [E, 2I, H/32, 16] dim 1; down [E, I, H] Shard(1) its
    blocks' [E, H, I/32, 16] dim 2 (whole blocks of 32 on each rank)."""
    if tp2ep:
        return ("shard", 0)
    if ".gate_up_proj_" in name:
        return ("shard", 1)
    return ("shard", 2)


def expected_placements(name: str, layout: str) -> list[tuple]:
    from test_families import expected_placements as family_placements

    if not name.endswith(("_blocks", "_scales")):
        return family_placements(name, layout, "gpt_oss")
    names, _, flags = parse_layout(layout)
    return [tp_placement(name, "tp2ep" in flags) if dim == "tp" else ("shard", 0) for dim in names]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_rank_holds_distribute_tensor_of_blocks_and_scales(layout, src, converted):
    out = converted(layout)
    manifest = json.loads((out / "reshard.json").read_text())
    source = load_file(str(src / "model.safetensors"))
    assert sorted(manifest["params"]) == sorted(source)  # the release's own tensors, by name
    for name, entry in manifest["params"].items():
        want = [placement_text(p) for p in expected_placements(name, layout)]
        assert entry["placements"] == want, name
    names, shape, _ = parse_layout(layout)
    expected = {name: expected_placements(name, layout) for name in source}
    results = run_on_ranks(
        _rank_checks_file,
        _world(layout),
        str(out),
        str(src / "model.safetensors"),
        names,
        shape,
        expected,
        1,
        timeout_s=150,
    )
    for rank, result in enumerate(results):
        assert result["problems"] == [], rank
        assert result["keys"] == sorted(source), rank


def test_manifest_records_the_format_and_every_weight(converted):
    out = converted("ep2tp2")
    manifest = json.loads((out / "reshard.json").read_text())
    weights = [f"model.layers.{i}.{w}" for i in range(3) for w in EXPERT_WEIGHTS]
    assert manifest["quantization"] == {
        "quant_method": "mxfp4",
        "block_size": 32,
        "blocks": {w: w + "_blocks" for w in weights},
        "scales": {w: w + "_scales" for w in weights},
    }
    assert manifest["config"]["quantization_config"]["quant_method"] == "mxfp4"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == (
        "mxfp4"
    )
    assert load_manifest(out).quantization == manifest["quantization"]


@pytest.mark.parametrize(
    "edit, error",
    [
        (lambda m: m["quantization"]["scales"].popitem(), "blocks and scales must map"),
        (lambda m: m["quantization"].update(block_size=16), "block_size"),
        (
            lambda m: m["params"]["model.layers.0.mlp.experts.down_proj_scales"].update(
                placements=["Shard(0)", "Shard(1)"]
            ),
            "placed alike",
        ),
    ],
    ids=["scale missing", "block size", "scales placed apart"],
)
def test_manifest_schema_refuses_a_wrong_mxfp4_record(converted, tmp_path, edit, error):
    from reshard.errors import CheckpointError

    out = Path(shutil.copytree(converted("ep2tp2"), tmp_path / "copy"))
    manifest = json.loads((out / "reshard.json").read_text())
    edit(manifest)
    (out / "reshard.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=error):
        load_manifest(out)


def test_a_layout_that_cuts_a_block_is_refused_naming_what_fits(src):
    """tp4 cuts down_proj's In dim (I = 64, two blocks) into pieces of 16: refused, naming the
    parameter, the block and the layouts that fit; --dtype bf16 takes it."""
    with pytest.raises(LayoutError) as e:
        make_plan(open_source(str(src)), Layout.parse("tp4"))
    assert str(e.value) == (
        "layout tp4: model.layers.0.mlp.experts.down_proj [8, 64, 64] splits its In dim (1) into "
        "pieces of 16, not whole MXFP4 blocks of 32; layouts that fit: tp4-tp2ep, tp2, tp1, or "
        "--dtype bf16"
    )
    make_plan(open_source(str(src)), Layout.parse("tp4"), "bf16")


@pytest.mark.parametrize(
    "name, edit",
    [
        ("model.layers.1.mlp.experts.down_proj_blocks", lambda t: t.view(-1)[5].bitwise_xor_(1)),
        ("model.layers.1.mlp.experts.gate_up_proj_scales", lambda t: t.view(-1)[3].add_(1)),
    ],
    ids=["fp4 nibble", "scale"],
)
def test_verify_against_checks_blocks_and_scales_bit_exactly(src, converted, tmp_path, name, edit):
    """Edited and re-hashed into the manifest: the hashes pass, --against does not."""
    out = Path(shutil.copytree(converted("ep2tp2"), tmp_path / "copy"))
    plan = make_plan(open_source(str(src)), Layout.parse("ep2tp2"))
    findings = list(check_against(ShardedCheckpoint(out), plan))
    assert all(f.ok for f in findings) and len(findings) == 4 + len(plan.params)
    edit_rank_tensor(out, 2, name, edit)
    assert all(f.ok for f in check_files(ShardedCheckpoint(out)))
    failed = [f.what for f in check_against(ShardedCheckpoint(out), plan) if not f.ok]
    assert failed == [f"{name}: rank 2 (rank-00002-of-00004.safetensors) differs from the source"]


def test_mxfp4_shards_reshard_and_export_back_exactly(src, converted, tmp_path):
    """ep2tp2 shards as a source: resharded to tp4-tp2ep they are byte for byte the direct
    conversion; exported, the source's own tensors."""
    out = tmp_path / "tp4-tp2ep"
    plan = make_plan(open_source(str(converted("ep2tp2"))), Layout.parse("tp4-tp2ep"))
    convert(plan, out, progress=False)
    direct = converted("tp4-tp2ep")
    for rank in range(4):
        name = f"rank-{rank:05d}-of-00004.safetensors"
        assert (out / name).read_bytes() == (direct / name).read_bytes(), name
    result = run_reshard("export", str(converted("ep2tp2")), "--out", str(tmp_path / "hf"), "-q")
    assert result.returncode == 0, result.stderr
    want = load_file(str(src / "model.safetensors"))
    got = {
        k: v for f in (tmp_path / "hf").glob("*.safetensors") for k, v in load_file(str(f)).items()
    }
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


# --- dequantized while converting --------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["ep2tp2", "tp4"])
def test_dequantized_ranks_equal_transformers_dequantization(
    layout, src, converted, hf_model, tmp_path
):
    """--dtype bf16: each rank holds distribute_tensor of the weights transformers dequantizes
    (tp4 too: a rank reads the blocks covering its piece); no quantization record, no
    quantization_config."""
    out = converted(layout, "bf16")
    manifest = json.loads((out / "reshard.json").read_text())
    assert "quantization" not in manifest and "quantization_config" not in manifest["config"]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert any("dequantized from MXFP4" in note for note in manifest["notes"])
    state = {
        n: t.detach().to(torch.bfloat16).contiguous() for n, t in hf_model.state_dict().items()
    }
    oracle = tmp_path / "oracle.safetensors"
    save_file(state, str(oracle))
    from test_families import expected_placements as family_placements

    names, shape, _ = parse_layout(layout)
    expected = {n: family_placements(n, layout, "gpt_oss") for n in state}
    results = run_on_ranks(
        _rank_checks_file, _world(layout), str(out), str(oracle), names, shape, expected, 1,
        timeout_s=150,
    )  # fmt: skip
    for rank, result in enumerate(results):
        assert result["problems"] == [], rank


def test_dequantizing_rank_reads_only_its_blocks_and_scales(src):
    """Slice pushdown through the dequantization: under ep2tp2 the MXFP4 bytes a rank reads
    are its own share of the blocks and scales, each once."""
    from test_converters import _record_reads

    plan = make_plan(open_source(str(src)), Layout.parse("ep2tp2"), "bf16")
    packed = {n for n, t in plan.targets.items() if isinstance(t, Packed)}
    assert len(packed) == 6
    calls = _record_reads(plan)
    source = load_file(str(src / "model.safetensors"))
    total = sum(t.numel() for n, t in source.items() if n.endswith(("_blocks", "_scales")))
    for rank in range(4):
        calls.clear()
        for t in plan.rank_tensors(rank):
            if t.name in packed:
                read_local(plan, t)
        read = [(n, box) for n, box in calls if n.endswith(("_blocks", "_scales"))]
        assert sum(math.prod(b - a for a, b in box) for _, box in read) * 4 == total, rank
        assert len(set(read)) == len(read), rank


# --- the runtime ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_runtime_logits_match_transformers_dequantized(layout, converted, hf_model):
    from reshard.runtime.reference import fixed_batch

    ids = fixed_batch(hf_model.config.vocab_size)
    with torch.no_grad():
        want = hf_model(input_ids=ids).logits
    results = run_on_ranks(
        quantized_rank_logits, _world(layout), str(converted(layout)), ids, timeout_s=240
    )
    local = {"tp2": (8, 64, 64), "ep2tp2": (4, 64, 64), "tp4-tp2ep": (2, 64, 128)}[layout]
    for rank, result in enumerate(results):
        assert result["held"] == torch.uint8 and result["reads"] == torch.float32, rank
        assert result["shape"] == local, rank
        diff = (result["logits"] - want).abs().max().item()
        assert diff < 1e-4, (rank, diff)


def test_runtime_dequantizes_each_weight_once_per_forward_and_keeps_none(converted, monkeypatch):
    """The experts read their weights' shape, then the weights: one dequantization each, held
    only while their module runs (one layer's experts exist in the compute dtype at a time)."""
    import reshard.runtime.mxfp4 as runtime_mxfp4
    from reshard.runtime.load import load_parallel_model

    pm = load_parallel_model(ShardedCheckpoint(converted("tp1")), 0, device=torch.device("cpu"))
    calls = []
    real = runtime_mxfp4.dequantize
    monkeypatch.setattr(
        runtime_mxfp4, "dequantize", lambda b, *a: calls.append(b.shape) or real(b, *a)
    )
    with torch.no_grad():
        pm.model(torch.arange(7)[None])
    assert len(calls) == 6
    held = [m for m in pm.model.modules() if isinstance(m, runtime_mxfp4.MXFP4Dequantize)]
    assert len(held) == 6 and all(m.held is None for m in held)


def test_greedy_generation_of_mxfp4_shards_matches_transformers(converted, src, hf_model):
    """`reshard run` on ep2tp2 MXFP4 shards: transformers' tokens on the dequantized model."""
    from tokenizers import Tokenizer

    out = converted("ep2tp2")
    prompt = "Why is the sky blue"
    prompt_ids = Tokenizer.from_file(str(out / "tokenizer.json")).encode(prompt).ids
    want = hf_greedy(hf_model, prompt_ids, 8)
    result = run_reshard(
        "run", str(out), "--prompt", prompt, "--max-new-tokens", "8", "--json",
        "--device", "cpu", "--timeout", "180",
    )  # fmt: skip
    assert last_json(result)["output_ids"] == want


def test_validate_refuses_mxfp4_shards_and_checks_a_dequantized_conversion(converted, src):
    """validate compares gradients, which MXFP4 weights have none of here: refused in one line;
    a --dtype fp32 conversion of the same source validates against transformers' model."""
    result = run_reshard(
        "validate", str(converted("tp2")), "--against", str(src), "--device", "cpu"
    )
    one_error_line(result.returncode, result.stderr, "keeps MXFP4 weights", "--dtype fp32")
    result = run_reshard(
        "validate", str(converted("ep2tp2", "fp32")), "--against", str(src),
        "--reference", "transformers", "--json", "--device", "cpu", "--timeout", "180",
    )  # fmt: skip
    report = last_json(result)
    assert report["ok"] is True and max(report["max_abs_diff"].values()) < 1e-4, report


def test_packed_tensors_must_be_3d_expert_weights(src):
    """transformers reads MXFP4 into GPT-OSS's fused experts only; a 2-D pair is refused."""
    from reshard.converters.lazy import InMemoryTensor
    from reshard.converters.mxfp4 import unpacked

    pair = {
        "w_blocks": InMemoryTensor(torch.zeros(4, 2, 16, dtype=torch.uint8)),
        "w_scales": InMemoryTensor(torch.zeros(4, 2, dtype=torch.uint8)),
    }
    with pytest.raises(ConversionError, match="fused 3-D expert weights"):
        unpacked(pair)
    with pytest.raises(ConversionError, match="w_scales: an MXFP4 tensor without its w_blocks"):
        unpacked({"w_scales": pair["w_scales"]})


# --- the release itself: openai/gpt-oss-120b's real shapes ----------------------------------------


def _sparse_release(directory: Path) -> int:
    """gpt-oss-120b as the Hub stores it (its config.json from tests/fixtures; experts as uint8
    blocks and scales, the rest bf16) in one safetensors file whose header is real and whose
    data is a hole: planning reads headers only. Returns the bytes of tensor data."""
    from test_real_configs import hub_config

    from reshard.synth import hf_tensors

    config = hub_config("openai/gpt-oss-120b")
    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    entries = {}
    for name, shape in hf_tensors(plain, torch.bfloat16).items():
        if name.endswith(EXPERT_WEIGHTS):
            *lead, n_in, n_out = shape
            entries[name + "_blocks"] = ("U8", 1, (*lead, n_out, n_in // 32, 16))
            entries[name + "_scales"] = ("U8", 1, (*lead, n_out, n_in // 32))
        else:
            entries[name] = ("BF16", 2, shape)
    header, offset = {}, 0
    for name, (dtype, size, shape) in entries.items():
        nbytes = size * math.prod(shape)
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    directory.mkdir(parents=True)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + offset)
    (directory / "config.json").write_text(json.dumps(config))
    return offset


def test_the_release_keeps_mxfp4_where_blocks_stay_whole(tmp_path):
    """gpt-oss-120b's experts (I = 2880: 90 blocks of 32) split over expert tp8 into 360-row
    pieces, 11.25 blocks: ep8tp8 is refused, naming what fits; ep8tp8-tp2ep (whole experts,
    EP over all 64 ranks) keeps MXFP4, and --dtype bf16 takes ep8tp8 as it is."""
    src = tmp_path / "gpt-oss-120b"
    data_bytes = _sparse_release(src)
    assert 64e9 < data_bytes < 66e9  # the release's 65 GB: 4.25 bits per expert weight

    result = run_reshard("plan", "--src", str(src), "--layout", "ep8tp8")
    one_error_line(
        result.returncode,
        result.stderr,
        "model.layers.0.mlp.experts.down_proj [128, 2880, 2880] splits its In dim (1) into "
        "pieces of 360, not whole MXFP4 blocks of 32",
        "layouts that fit: ep8tp8-tp2ep, ep8tp2, ep8, or --dtype bf16",
    )
    plan = make_plan(open_source(str(src)), Layout.parse("ep8tp8-tp2ep"))
    per_rank = [plan.rank_bytes(r) for r in range(64)]
    assert len(set(per_rank)) == 1 and data_bytes / 64 < per_rank[0] < data_bytes / 16
    assert plan.quantization["quant_method"] == "mxfp4" and len(plan.quantization["blocks"]) == 72
    result = run_reshard("plan", "--src", str(src), "--layout", "ep8tp8-tp2ep")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")][2:]
    assert len(rows) == 64
    assert rows[0].startswith("| 0 | ep=0, tp=0 | 0-1 |")
    assert rows[63].startswith("| 63 | ep=7, tp=7 | 126-127 |")
    dequantized = make_plan(open_source(str(src)), Layout.parse("ep8tp8"), "bf16")
    assert dequantized.quantization is None
