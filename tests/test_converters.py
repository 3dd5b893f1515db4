"""The WeightConverter DSL: ops and inverses on real safetensors files, totality, aliases, pushdown.

Oracles: torch ops on the same tensors, transformers' Qwen3MoeForCausalLM for the
fused target layout, and safetensors for what is stored.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from reshard.convert import make_plan, read_local
from reshard.converters import (
    Chunk,
    Concatenate,
    Deinterleave,
    Interleave,
    MergeModulelist,
    SplitModulelist,
    Transpose,
    WeightConverter,
    get_spec,
)
from reshard.converters.lazy import (
    SAFETENSORS_DTYPES,
    FileSpan,
    SliceReader,
    SourceTensor,
    read_selection,
)
from reshard.errors import ConversionError, LayoutError
from reshard.layout import Layout
from reshard.plan import TP_STYLES, canonical_style, placements_for
from reshard.sources import open_source


def args_of(source):
    """The source's config parsed by its family."""
    return get_spec(source.model_type).parse_config(source.config)


# --- helpers -------------------------------------------------------------------------------------


def lazy_file(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, SourceTensor]:
    """Write `tensors` to a safetensors file and open every one lazily, as a source does."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    reader = SliceReader()
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            sl = f.get_slice(name)
            out[name] = SourceTensor(
                path=str(path),
                name=name,
                shape=tuple(sl.get_shape()),
                dtype=SAFETENSORS_DTYPES[sl.get_dtype()],
                reader=reader,
            )
    return out


def boxes(shape: tuple[int, ...], n: int = 12, seed: int = 0) -> list[tuple[tuple[int, int], ...]]:
    """The full box, an empty one, the last element and random (possibly empty) sub-boxes."""
    g = torch.Generator().manual_seed(seed)
    out = [
        tuple((0, s) for s in shape),
        ((0, 0),) + tuple((0, s) for s in shape[1:]),
        tuple((s - 1, s) for s in shape),
    ]
    for _ in range(n):
        box = []
        for s in shape:
            a = int(torch.randint(0, s + 1, (), generator=g))
            b = int(torch.randint(a, s + 1, (), generator=g))
            box.append((a, b))
        out.append(tuple(box))
    return out


def crop(t: torch.Tensor, box) -> torch.Tensor:
    return t[tuple(slice(a, b) for a, b in box)]


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(a, b), what


# --- every op and its inverse --------------------------------------------------------------------


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _interleave(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return torch.stack(parts, dim=dim + 1).flatten(dim, dim + 1)


# name -> (op, input groups as torch tensors, reference: torch groups -> torch groups)
OP_CASES = {
    "merge_modulelist": (
        MergeModulelist(dim=0),
        [[_rand(3, 4, seed=i) for i in range(5)], [_rand(3, 4, seed=10 + i) for i in range(5)]],
        lambda g: [[torch.stack(g[0], 0)], [torch.stack(g[1], 0)]],
    ),
    "merge_modulelist_dim1": (
        MergeModulelist(dim=1),
        [[_rand(3, 4, seed=i) for i in range(4)]],
        lambda g: [[torch.stack(g[0], 1)]],
    ),
    "split_modulelist": (
        SplitModulelist(dim=0),
        [[_rand(6, 3, 4, seed=1)], [_rand(6, 4, 3, seed=2)]],
        lambda g: [list(torch.unbind(g[0][0], 0)), list(torch.unbind(g[1][0], 0))],
    ),
    "concatenate": (
        Concatenate(dim=1),
        [[_rand(4, 3, 5, seed=1)], [_rand(4, 3, 5, seed=2)]],
        lambda g: [[torch.cat([g[0][0], g[1][0]], 1)]],
    ),
    "chunk": (
        Chunk(dim=0, chunks=3),
        [[_rand(9, 4, seed=3)]],
        lambda g: [[c] for c in torch.chunk(g[0][0], 3, 0)],
    ),
    "transpose": (
        Transpose(1, 2),
        [[_rand(3, 4, 6, seed=4)], [_rand(2, 5, 7, seed=5)]],
        lambda g: [[g[0][0].transpose(1, 2)], [g[1][0].transpose(1, 2)]],
    ),
    "interleave": (
        Interleave(dim=1),
        [[_rand(3, 5, 4, seed=6)], [_rand(3, 5, 4, seed=7)]],
        lambda g: [[_interleave([g[0][0], g[1][0]], 1)]],
    ),
    "interleave3": (
        Interleave(dim=0),
        [[_rand(4, 3, seed=8)], [_rand(4, 3, seed=9)], [_rand(4, 3, seed=10)]],
        lambda g: [[_interleave([g[0][0], g[1][0], g[2][0]], 0)]],
    ),
    "deinterleave": (
        Deinterleave(dim=1),
        [[_rand(3, 10, 4, seed=11)]],
        lambda g: [[g[0][0][:, 0::2]], [g[0][0][:, 1::2]]],
    ),
    "deinterleave3": (
        Deinterleave(dim=0, parts=3),
        [[_rand(12, 5, seed=12)]],
        lambda g: [[g[0][0][0::3]], [g[0][0][1::3]], [g[0][0][2::3]]],
    ),
}


def _from_segments(t, box) -> torch.Tensor:
    """The box as the engine writes it: every segment's bytes, one after the other."""
    data = _segment_bytes(t.segments(box))
    shape = [b - a for a, b in box]
    return (
        torch.frombuffer(data, dtype=t.dtype).view(shape)
        if data
        else torch.empty(shape, dtype=t.dtype)
    )


def _segment_bytes(segments) -> bytearray:
    """Segments' bytes in order: a file span read with plain file I/O, a tensor as its bytes."""
    data = bytearray()
    for segment in segments:
        if isinstance(segment, FileSpan):
            with open(segment.path, "rb") as f:
                f.seek(segment.offset)
                data += f.read(segment.nbytes)
        else:
            data += segment.tensor().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return data


@pytest.mark.parametrize("min_span", [0, None], ids=["spans", "default"])
@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_op_matches_torch_and_inverse_round_trips(case, min_span, tmp_path, monkeypatch):
    import reshard.converters.lazy as lazy

    if min_span is not None:  # every contiguous run as a file span, however short
        monkeypatch.setattr(lazy, "MIN_SPAN", min_span)
    op, torch_groups, reference = OP_CASES[case]
    names = [[f"g{i}.{j}" for j in range(len(group))] for i, group in enumerate(torch_groups)]
    files = lazy_file(
        tmp_path / "src.safetensors",
        {n: t for ns, ts in zip(names, torch_groups) for n, t in zip(ns, ts)},
    )
    groups = [[files[n] for n in ns] for ns in names]

    out = op.apply(groups)
    want = reference(torch_groups)
    assert [len(g) for g in out] == [len(g) for g in want]
    assert op.out_groups(len(groups)) == len(out)
    for got_group, want_group in zip(out, want):
        for got, expected in zip(got_group, want_group):
            assert tuple(got.shape) == tuple(expected.shape)
            assert_bit_equal(got.materialize(), expected.contiguous(), case)
            # Slice pushdown: any box of the lazy result is that box of the torch result.
            for box in boxes(tuple(got.shape)):
                want_box = crop(expected, box).contiguous()
                assert_bit_equal(got.read(box), want_box, f"{case} {box}")
                # The engine's path: file spans and computed pieces, in row-major order.
                assert_bit_equal(_from_segments(got, box), want_box, f"{case} {box} segments")

    back = op.inverse(len(groups)).apply(out)
    assert [len(g) for g in back] == [len(g) for g in torch_groups]
    for back_group, original_group in zip(back, torch_groups):
        for got, original in zip(back_group, original_group):
            assert_bit_equal(got.materialize(), original, f"{case} inverse")


def test_concatenate_of_unequal_parts_round_trips_or_is_refused(tmp_path):
    q, kv = _rand(8, 4, seed=1), _rand(4, 4, seed=2)
    files = lazy_file(tmp_path / "qkv.safetensors", {"q": q, "k": kv})
    try:
        fused = Concatenate(dim=0).apply([[files["q"]], [files["k"]]])
        back = Concatenate(dim=0).inverse(2).apply(fused)
    except ConversionError:
        return  # refusing is fine too
    assert_bit_equal(back[0][0].materialize(), q)
    assert_bit_equal(back[1][0].materialize(), kv)


def test_strided_selection_reads_the_union_of_boxes(tmp_path):
    files = lazy_file(tmp_path / "s.safetensors", {"a": _rand(2, 8, 3, seed=1)})
    a = files["a"]
    full = a.materialize()
    selection = [[(1, 2)], [(0, 2), (4, 6)], [(0, 3)]]  # expert 1, rows 0,1,4,5
    assert_bit_equal(read_selection(a, selection), full[1:2][:, [0, 1, 4, 5]])


@pytest.mark.parametrize("chunk", [4, 40, 1 << 20])
@pytest.mark.parametrize("max_boxes", [2, 1 << 14])
def test_selection_segments_and_chunks_are_the_local_tensor(
    tmp_path, monkeypatch, chunk, max_boxes
):
    """Every strided / sharded selection of a stacked, concatenated tensor, cut into pieces of
    at most `chunk` bytes (or, past `max_boxes`, into slabs of rows), gives the local tensor
    that read_selection gives, through both the engine's segments and verify's chunks."""
    import reshard.converters.lazy as lazy
    from reshard.converters.lazy import Cat, Stack, selection_chunks, selection_segments

    monkeypatch.setattr(lazy, "MIN_SPAN", 0)
    monkeypatch.setattr(lazy, "MAX_BOXES", max_boxes)
    torch_parts = {
        f"{w}{e}": _rand(8, 6, seed=10 * e + i) for e in range(4) for i, w in enumerate("gu")
    }
    files = lazy_file(tmp_path / "e.safetensors", torch_parts)
    fused = Stack(
        [Cat([files[f"g{e}"], files[f"u{e}"]], dim=0) for e in range(4)], dim=0
    )  # [4, 16, 6]
    gu = Cat(
        [Stack([files[f"{w}{e}"] for e in range(4)], dim=0) for w in "gu"], dim=1
    )  # same values
    for t in (fused, gu):
        for selection in (
            [[(0, 4)], [(0, 16)], [(0, 6)]],
            [[(1, 3)], [(0, 4), (8, 12)], [(0, 6)]],  # _StridedShard(-2, 2) of 2, EP of 2
            [[(0, 4)], [(2, 4), (10, 12)], [(3, 6)]],  # strided rows and a column slice
            [[(0, 2), (3, 4)], [(0, 16)], [(0, 3)]],
        ):
            want = read_selection(t, selection)
            data = _segment_bytes(selection_segments(t, selection, chunk))
            got = torch.frombuffer(data, dtype=t.dtype).view(want.shape)
            assert_bit_equal(got, want, f"segments {selection}")
            chunks = torch.cat([c.reshape(-1) for c in selection_chunks(t, selection, chunk)])
            assert_bit_equal(chunks.view(want.shape), want, f"chunks {selection}")


# --- converters forward and backward on the tiny checkpoint -------------------------------------


@pytest.fixture(scope="module")
def tiny_source(tiny_dir):
    return open_source(str(tiny_dir))


@pytest.fixture(scope="module")
def tiny_tensors(tiny_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(tiny_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def test_qwen3_targets_equal_transformers_parameters(tiny_source, hf_params):
    spec = get_spec("qwen3_moe")
    targets = spec.to_targets(tiny_source.tensors, args_of(tiny_source))
    assert list(targets) == list(hf_params)  # same names, same order as named_parameters()
    for name, lazy_tensor in targets.items():
        assert_bit_equal(lazy_tensor.materialize(), hf_params[name], name)


def test_qwen3_to_sources_of_to_targets_is_the_source(tiny_source, tiny_tensors):
    spec = get_spec("qwen3_moe")
    back = spec.to_sources(spec.to_targets(tiny_source.tensors, args_of(tiny_source)))
    assert sorted(back) == sorted(tiny_tensors)
    for name, lazy_tensor in back.items():
        assert_bit_equal(lazy_tensor.materialize(), tiny_tensors[name], name)


def test_reversed_converter_has_inverse_ops_in_reverse_order():
    conv = get_spec("qwen3_moe").converters[0]
    rev = conv.reversed()
    assert rev.source_patterns == ("mlp.experts.gate_up_proj",)
    assert rev.target_patterns == (
        "mlp.experts.*.gate_proj.weight",
        "mlp.experts.*.up_proj.weight",
    )
    assert rev.operations == (Chunk(dim=1, chunks=2), SplitModulelist(dim=0))
    assert rev.reversed() == conv


# --- a GPT-OSS style checkpoint: fused, transposed, gate/up interleaved ---------------------------

GPT_OSS_CONVERTERS = (
    WeightConverter(
        "mlp.experts.gate_up_proj",  # [E, H, 2I], columns gate0, up0, gate1, up1, ...
        "mlp.experts.gate_up_proj",  # [E, 2I, H], gate rows then up rows
        [Transpose(1, 2), Deinterleave(dim=1), Concatenate(dim=1)],
    ),
    WeightConverter("mlp.experts.down_proj", "mlp.experts.down_proj", [Transpose(1, 2)]),
)


def test_gpt_oss_converter_against_torch(tmp_path):
    E, H, I = 3, 8, 6
    fused = _rand(E, H, 2 * I, seed=3)
    files = lazy_file(
        tmp_path / "m.safetensors", {"model.layers.0.mlp.experts.gate_up_proj": fused}
    )
    out, used = GPT_OSS_CONVERTERS[0].convert(files)
    assert used == {"model.layers.0.mlp.experts.gate_up_proj"}
    target = out["model.layers.0.mlp.experts.gate_up_proj"]
    # transformers' GPT-OSS: gate = gate_up[..., ::2], up = gate_up[..., 1::2]
    want = torch.cat([fused[..., 0::2], fused[..., 1::2]], dim=-1).transpose(1, 2).contiguous()
    assert_bit_equal(target.materialize(), want)
    for box in boxes(tuple(target.shape), n=20):
        assert_bit_equal(target.read(box), crop(want, box).contiguous(), str(box))
    # expert-TP rank 1 of 2: [gate_1; up_1], read through Transpose and Deinterleave
    sel = [[(0, E)], [(3, 6), (9, 12)], [(0, H)]]
    assert_bit_equal(read_selection(target, sel), want[:, [3, 4, 5, 9, 10, 11]])

    back, _ = GPT_OSS_CONVERTERS[0].reversed().convert(out)
    assert_bit_equal(back["model.layers.0.mlp.experts.gate_up_proj"].materialize(), fused)


@pytest.fixture(scope="module")
def gpt_oss_dir(tmp_path_factory, tiny_dir, tiny_tensors, hf_params) -> Path:
    """The tiny model stored GPT-OSS style: fused [E, H, 2I] interleaved gate/up, down [E, I, H]."""
    out = tmp_path_factory.mktemp("gpt-oss-style")
    tensors = {k: v for k, v in tiny_tensors.items() if ".mlp.experts." not in k}
    I = json.loads((tiny_dir / "config.json").read_text())["moe_intermediate_size"]
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts."
        gate_up = hf_params[p + "gate_up_proj"]  # [E, 2I, H]
        woven = _interleave([gate_up[:, :I], gate_up[:, I:]], 1)  # rows gate0, up0, ...
        tensors[p + "gate_up_proj"] = woven.transpose(1, 2).contiguous()
        tensors[p + "down_proj"] = hf_params[p + "down_proj"].transpose(1, 2).contiguous()
    save_file(tensors, str(out / "model.safetensors"))
    shutil.copy(tiny_dir / "config.json", out / "config.json")
    return out


def _gpt_oss_spec():
    return dataclasses.replace(get_spec("qwen3_moe"), converters=GPT_OSS_CONVERTERS)


def test_gpt_oss_style_checkpoint_converts_to_the_transformers_layout(gpt_oss_dir, hf_params):
    src = open_source(str(gpt_oss_dir))
    targets = _gpt_oss_spec().to_targets(src.tensors, args_of(src))
    for name, lazy_tensor in targets.items():
        assert_bit_equal(lazy_tensor.materialize(), hf_params[name], name)
    back = _gpt_oss_spec().to_sources(targets)
    stored = load_file(str(gpt_oss_dir / "model.safetensors"))
    assert sorted(back) == sorted(stored)
    for name, lazy_tensor in back.items():
        assert_bit_equal(lazy_tensor.materialize(), stored[name], name)


def test_gpt_oss_style_rank_tensors_equal_the_unfused_ones(gpt_oss_dir, monkeypatch):
    """Same model, other storage: every rank's tensors are the same as from the HF layout."""
    import reshard.convert

    layout = Layout.parse("ep2tp2")
    reference = make_plan(open_source("tiny:qwen3_moe"), layout)
    monkeypatch.setattr(reshard.convert, "get_spec", lambda model_type: _gpt_oss_spec())
    plan = make_plan(open_source(str(gpt_oss_dir)), layout)
    for rank in range(layout.world_size):
        for t, ref in zip(plan.rank_tensors(rank), reference.rank_tensors(rank)):
            assert t.name == ref.name
            assert_bit_equal(read_local(plan, t), read_local(reference, ref), f"{rank} {t.name}")


# --- totality: every source key mapped, every target present, every shape checked ---------------


def test_unmapped_source_key_is_an_error_naming_it(tiny_source):
    spec = get_spec("qwen3_moe")
    tensors = dict(tiny_source.tensors)
    stray = "model.layers.0.mlp.shared_expert.up_proj.weight"
    tensors[stray] = tensors["model.layers.0.mlp.experts.0.up_proj.weight"]
    with pytest.raises(ConversionError, match=re.escape(stray)):
        spec.to_targets(tensors, args_of(tiny_source))


def test_ignored_source_key_is_dropped_on_purpose(tiny_source, hf_params):
    spec = get_spec("qwen3_moe")
    tensors = dict(tiny_source.tensors)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = tensors["model.norm.weight"]
    assert list(spec.to_targets(tensors, args_of(tiny_source))) == list(hf_params)


def test_missing_target_is_an_error_naming_it(tiny_source):
    tensors = dict(tiny_source.tensors)
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    with pytest.raises(
        ConversionError, match=r"no tensors for: model\.layers\.1\.self_attn\.k_norm"
    ):
        get_spec("qwen3_moe").to_targets(tensors, args_of(tiny_source))


def test_missing_middle_expert_is_a_conversion_error(tiny_source):
    tensors = dict(tiny_source.tensors)
    del tensors["model.layers.1.mlp.experts.7.up_proj.weight"]
    with pytest.raises(
        ConversionError, match=re.escape("model.layers.1.mlp.experts.7.up_proj.weight")
    ):
        get_spec("qwen3_moe").to_targets(tensors, args_of(tiny_source))


@pytest.mark.parametrize(
    "missing",
    [
        "model.layers.1.mlp.experts.7.up_proj.weight",
        "model.layers.1.mlp.experts.15.up_proj.weight",
        "model.layers.0.mlp.experts.15.down_proj.weight",
    ],
)
def test_missing_expert_is_a_conversion_error_naming_the_key(tiny_source, missing):
    tensors = dict(tiny_source.tensors)
    del tensors[missing]
    with pytest.raises(ConversionError, match=re.escape(missing)):
        get_spec("qwen3_moe").to_targets(tensors, args_of(tiny_source))


def test_wrong_shape_is_an_error_naming_the_key(tiny_source):
    tensors = dict(tiny_source.tensors)
    key = "model.layers.0.self_attn.k_proj.weight"
    tensors[key] = dataclasses.replace(tensors[key], shape=(48, 64))
    with pytest.raises(ConversionError, match=re.escape(key) + r".*\[48, 64\].*\[64, 64\]"):
        get_spec("qwen3_moe").to_targets(tensors, args_of(tiny_source))


def test_wrong_expert_shape_is_a_conversion_error_naming_the_key(tiny_source):
    tensors = dict(tiny_source.tensors)
    key = "model.layers.0.mlp.experts.3.gate_proj.weight"
    tensors[key] = dataclasses.replace(tensors[key], shape=(31, 64))
    with pytest.raises(ConversionError, match=re.escape(key)):
        get_spec("qwen3_moe").to_targets(tensors, args_of(tiny_source))


# --- style aliases: transformers' names resolve to the seed names' placements -------------------

ALIAS_LAYOUTS = ["tp4", "ep4", "ep2tp2", "dp2ep2tp2", "tp4-tp2ep", "ep2tp2-tp2ep", "tp2-sp"]


@pytest.mark.parametrize("layout", ALIAS_LAYOUTS)
@pytest.mark.parametrize(
    "alias, seed, ndim",
    [
        (("grouped_gemm", "packed_colwise"), ("grouped_gemm", "moe_tp_gate_up_colwise"), 3),
        (("grouped_gemm", "rowwise"), ("grouped_gemm", "moe_tp_down_rowwise"), 3),
        (("packed_colwise",), ("moe_tp_gate_up_colwise",), 3),
        (("embedding_rowwise",), ("embedding",), 2),
        (("vocab_parallel",), ("embedding",), 2),
        (("replicated_with_grad_allreduce",), ("replicate",), 1),
    ],
)
def test_alias_styles_give_the_seed_placements(layout, alias, seed, ndim):
    layout = Layout.parse(layout)
    assert placements_for(alias, ndim, layout) == placements_for(seed, ndim, layout)


def test_alias_placements_are_the_design_ones():
    from reshard.placements import Replicate, Shard, StridedShard

    ep2tp2 = Layout.parse("ep2tp2")
    assert placements_for(("grouped_gemm", "packed_colwise"), 3, ep2tp2) == (
        Shard(0),
        StridedShard(1, 2),
    )
    assert placements_for(("grouped_gemm", "rowwise"), 3, ep2tp2) == (Shard(0), Shard(2))
    assert placements_for(("embedding_rowwise",), 2, ep2tp2) == (Replicate(), Shard(0))
    assert placements_for(("grouped_gemm",), 3, ep2tp2) == (Shard(0), Replicate())
    assert placements_for(("grouped_gemm",), 3, Layout.parse("ep2tp2-tp2ep")) == (
        Shard(0),
        Shard(0),
    )


def test_aliases_are_transformers_style_names():
    tp = pytest.importorskip("transformers.integrations.tensor_parallel")
    for alias in ("packed_colwise", "rowwise", "embedding_rowwise", "grouped_gemm", "colwise"):
        assert alias in tp.ALL_PARALLEL_STYLES
        canonical_style(alias)  # accepted


def test_plan_copied_from_a_transformers_config_places_like_ours(hf_params):
    """transformers' Qwen3MoeConfig tp/ep plans, per parameter and mesh dim, give our spec's
    placements. transformers 5.25 dropped the experts from its TP plan (their TP inside the
    experts is deprecated for EP): where its plan gives an expert no TP style, the tp dim of a
    layout that does not shard experts over it has nothing of theirs to compare with, and ours
    stays the design's (packed_colwise / rowwise, as transformers up to 5.24 gave them)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3MoeConfig()
    spec = get_spec("qwen3_moe")
    checked = compared = 0
    for name, p in hf_params.items():
        styles = []
        for plan in (config.base_model_ep_plan, config.base_model_tp_plan):
            for glob, style in plan.items():
                regex = re.escape("model." + glob).replace(r"\*", r"\d+") + r"(\.weight)?"
                if re.fullmatch(regex, name):
                    styles.append(style)
        if not styles:
            continue  # embeddings, norms, router: not in transformers' base plan
        checked += 1
        tp_style = any(canonical_style(s) in TP_STYLES for s in styles)
        for layout in ALIAS_LAYOUTS:
            layout = Layout.parse(layout)
            theirs = placements_for(tuple(styles), p.ndim, layout)
            ours = placements_for(spec.styles_for(name), p.ndim, layout)
            for dim, their, our in zip(layout.mesh_dim_names, theirs, ours):
                if dim == "tp" and not tp_style and dim not in layout.expert_dims:
                    continue
                assert their == our, (name, styles, layout.name, dim)
                compared += 1
    assert checked == 2 * 8  # q, k, v, o, q_norm, k_norm, gate_up, down in each layer
    assert compared >= checked * len(ALIAS_LAYOUTS)  # at least one mesh dim of every layout


def test_unknown_style_is_refused():
    with pytest.raises(LayoutError, match=r"unknown parallel style 'colwize'.*known:.*colwise"):
        canonical_style("colwize")


# --- slice pushdown: a rank reads only its bytes -------------------------------------------------


def _expert(name: str) -> bool:
    return ".mlp.experts." in name


@pytest.fixture(scope="module")
def source_bytes(tiny_dir) -> dict[str, int]:
    """Stored size of every source tensor, from the safetensors headers."""
    sizes = {}
    for f in tiny_dir.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                t = h.get_slice(k)
                n = torch.Size(t.get_shape()).numel()
                sizes[k] = n * torch.empty((), dtype=h.get_tensor(k).dtype).element_size()
    return sizes


def _record_reads(plan) -> list[tuple[str, tuple]]:
    calls = []
    reader = plan.source.reader
    original = reader.read

    def read(path, name, box, **kwargs):
        calls.append((name, box))
        return original(path, name, box, **kwargs)

    reader.read = read  # instance attribute: every SourceTensor of this source goes through it
    return calls


def _box_bytes(box, itemsize: int = 4) -> int:
    n = itemsize
    for a, b in box:
        n *= b - a
    return n


TP_SHARDED_DENSE = re.compile(r"(embed_tokens|[qkvo]_proj|lm_head)\.weight$")


@pytest.mark.parametrize("layout", ["ep4", "tp4", "dp2ep2", "ep2tp2"])
def test_each_rank_reads_only_its_bytes(layout, source_bytes):
    layout = Layout.parse(layout)
    tp = layout.size("tp")
    plan = make_plan(open_source("tiny:qwen3_moe"), layout)
    calls = _record_reads(plan)
    total_expert = sum(n for k, n in source_bytes.items() if _expert(k))
    dense_per_rank = sum(
        n // tp if TP_SHARDED_DENSE.search(k) else n
        for k, n in source_bytes.items()
        if not _expert(k)
    )
    expert_split = layout.size("ep") * tp  # experts cut by ep, then each expert by expert-TP
    replicas = layout.world_size // expert_split
    expert_read_sum = 0
    for rank in range(layout.world_size):
        calls.clear()
        plan.source.reader.bytes_read.clear()
        expert_read = dense_read = 0
        for t in plan.rank_tensors(rank):
            start = len(calls)
            local = read_local(plan, t)
            read = sum(_box_bytes(box) for _, box in calls[start:])
            assert read == local.numel() * local.element_size(), (rank, t.name)  # nothing extra
            if _expert(t.name):
                expert_read += read
            else:
                dense_read += read
        assert sum(plan.source.reader.bytes_read.values()) == expert_read + dense_read
        assert expert_read * expert_split == total_expert, rank
        assert dense_read == dense_per_rank, rank
        expert_read_sum += expert_read
        for name, box in calls:
            if _expert(name):  # one expert's [I, H] / [H, I], never a fused or whole tensor
                assert _box_bytes(box) * tp <= source_bytes[name], (rank, name, box)
        if layout.size("ep") > 1:
            held = {int(re.search(r"experts\.(\d+)\.", n)[1]) for n, _ in calls if _expert(n)}
            per = 16 // layout.size("ep")
            first = layout.coords(rank)["ep"] * per
            assert held == set(range(first, first + per)), rank
    # Every expert byte is read once per EP replica (dp copies), no more.
    assert expert_read_sum == total_expert * replicas


def test_column_slices_of_every_tp_rank_share_one_read_of_their_rows(tmp_path, monkeypatch):
    """tp8's down_proj pieces: each rank takes an eighth of the columns of the same rows. Their
    covering reads are the same whole rows, so the file is read once for all eight ranks, not
    once per rank (each of which would read nearly the whole expert)."""
    from safetensors.torch import save_file

    from reshard.converters.lazy import SliceReader, SourceTensor

    w_EHI = torch.randn(4, 16, 64)
    path = tmp_path / "m.safetensors"
    save_file({"w": w_EHI}, str(path))
    reader, reads = SliceReader(), []
    read_into = reader.read_into
    monkeypatch.setattr(reader, "read_into", lambda *a: (reads.append(len(a[2])), read_into(*a))[1])
    tensor = SourceTensor(str(path), "w", (4, 16, 64), torch.float32, reader)
    for rank in range(8):
        cols = (rank * 8, rank * 8 + 8)
        got = tensor.read(((1, 2), (0, 16), cols))
        assert torch.equal(got, w_EHI[1:2, :, cols[0] : cols[1]]), rank
    assert reads == [16 * 64 * 4]  # expert 1's rows, once

    def slow(*args):  # a read that takes a while: the other ranks ask while it is in flight
        time.sleep(0.2)
        return read_into(*args)

    monkeypatch.setattr(reader, "read_into", lambda *a: (reads.append(len(a[2])), slow(*a))[1])
    reads.clear()
    with ThreadPoolExecutor(8) as pool:
        boxes = [((2, 3), (0, 16), (r * 8, r * 8 + 8)) for r in range(8)]
        got = list(pool.map(tensor.read, boxes))
    assert torch.equal(torch.cat(got, dim=-1), w_EHI[2:3])
    assert reads == [16 * 64 * 4]  # the seven others waited for the first one's read


def test_a_covering_read_is_kept_until_every_rank_has_its_slice(tmp_path):
    """Kept for the ranks that still need the rows, dropped after the last one: the cache
    holds what is being shared, not every expert's rows."""
    from safetensors.torch import save_file

    from reshard.converters.lazy import SliceReader, SourceTensor

    w_EHI = torch.randn(4, 16, 64)
    path = tmp_path / "m.safetensors"
    save_file({"w": w_EHI}, str(path))
    reader = SliceReader()
    tensor = SourceTensor(str(path), "w", (4, 16, 64), torch.float32, reader)
    for rank in range(8):
        got = tensor.read(((1, 2), (0, 16), (rank * 8, rank * 8 + 8)))
        assert torch.equal(got, w_EHI[1:2, :, rank * 8 : rank * 8 + 8])
        assert reader._cached == (16 * 64 * 4 if rank < 7 else 0), rank
    # Past span_cache the least recently used goes: a rank asking later reads again.
    w_EHI = torch.randn(8, 16, 64)
    save_file({"w": w_EHI}, str(path))
    rows = 16 * 64 * 4
    reader, reads = SliceReader(span_cache=4 * rows), []
    read_into = reader.read_into
    reader.read_into = lambda *a: (reads.append(a[1]), read_into(*a))[1]
    tensor = SourceTensor(str(path), "w", (8, 16, 64), torch.float32, reader)
    for expert in range(8):  # rank 0's slice of every expert: 7 ranks still to come for each
        tensor.read(((expert, expert + 1), (0, 16), (0, 8)))
        assert reader._cached == min(expert + 1, 4) * rows
    start = tensor._locate()
    for expert in (7, 0):  # rank 1: expert 7's rows are still kept, expert 0's were dropped
        got = tensor.read(((expert, expert + 1), (0, 16), (8, 16)))
        assert torch.equal(got, w_EHI[expert : expert + 1, :, 8:16])
    assert reads[8:] == [start + 0 * rows]
