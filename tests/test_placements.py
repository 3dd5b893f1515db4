"""Placements against the oracle: PyTorch DTensor `distribute_tensor` on real gloo process groups.

For every layout, each rank process reads its own rank file and compares every
tensor with `distribute_tensor(full, mesh, placements).to_local()`, where `full`
is the parameter as transformers' Qwen3MoeForCausalLM loads it from the tiny
checkpoint and `placements` come from the table in DESIGN.md section 5 (written
out again here, not read from the product).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers_dist import run_on_ranks
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from reshard.errors import LayoutError
from reshard.placements import (
    Replicate,
    Shard,
    StridedShard,
    local_selection,
    parse_placement,
    selection_shape,
    to_torch,
)

NUM_KV_HEADS, HEAD_DIM = 4, 16  # tiny:qwen3_moe

LAYOUTS = [
    "tp2",
    "tp4",
    "ep2",
    "ep4",
    "ep2tp2",
    "dp2ep2",
    "dp2tp2",
    "tp4-tp2ep",
    "ep2tp2-tp2ep",
    "tp2-sp",
    "tp8",
    "ep4tp4",
]


# --- the expected plan, from DESIGN.md section 5 -------------------------------------------------


def parse_layout(text: str) -> tuple[tuple[str, ...], tuple[int, ...], set[str]]:
    """Mesh dim names, sizes (outer to inner, size-1 dims dropped) and flags of a layout string."""
    head, *flags = text.split("-")
    dims = [(n, int(s)) for n, s in re.findall(r"(dp|ep|tp)(\d+)", head) if int(s) > 1]
    return tuple(n for n, _ in dims), tuple(s for _, s in dims), set(flags)


def tp_placement(name: str, tp2ep: bool) -> tuple:
    """What the tp mesh dim does to parameter `name` (a tiny Qwen3-MoE target name)."""
    if name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H]
        return ("shard", 0) if tp2ep else ("strided", 1, 2)
    if name.endswith("mlp.experts.down_proj"):  # [E, H, I]
        return ("shard", 0) if tp2ep else ("shard", 2)
    if re.search(r"self_attn\.[qkv]_proj\.weight$", name):
        return ("shard", 0)
    if name.endswith("self_attn.o_proj.weight"):
        return ("shard", 1)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return ("shard", 0)
    return ("replicate",)  # norms, q_norm/k_norm, router


def expected_placements(name: str, layout: str) -> list[tuple]:
    names, _, flags = parse_layout(layout)
    out = []
    for dim in names:
        if dim == "tp":
            out.append(tp_placement(name, "tp2ep" in flags))
        elif dim == "ep" and ".mlp.experts." in name:
            out.append(("shard", 0))
        else:
            out.append(("replicate",))
    return out


def placement_text(p: tuple) -> str:
    """The manifest's spelling (DESIGN 4/5): Shard(0), _StridedShard(1, split_factor=2), Replicate()."""
    if p[0] == "shard":
        return f"Shard({p[1]})"
    if p[0] == "strided":
        return f"_StridedShard({p[1]}, split_factor={p[2]})"
    return "Replicate()"


def _torch_placement(p: tuple, TReplicate, TShard, TStrided):
    kind = p[0]
    if kind == "shard":
        return TShard(p[1])
    if kind == "strided":
        return TStrided(p[1], split_factor=p[2])
    return TReplicate()


# --- what each rank does -------------------------------------------------------------------------


def _rank_checks_file(
    rank: int,
    world: int,
    out_dir: str,
    oracle_path: str,
    mesh_names: tuple[str, ...],
    mesh_shape: tuple[int, ...],
    expected: dict[str, list[tuple]],
    kv_repeat: int,
    scale_block_rows: int = 1,
) -> dict:
    """Every tensor of this rank's file against distribute_tensor of the oracle's global one.

    With tp > kv heads, the k/v projections' heads repeat (HEAD_DIM rows each; an FP8 scale's
    head is HEAD_DIM / scale_block_rows rows). gloo has no float8: float8 tensors are
    distributed and compared as their bytes, which is also the bit-exact comparison."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, distribute_tensor
    from torch.distributed.tensor import Replicate as TReplicate
    from torch.distributed.tensor import Shard as TShard
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=mesh_names)
    path = Path(out_dir) / f"rank-{rank:05d}-of-{world:05d}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        local = {k: f.get_tensor(k) for k in f.keys()}
    problems = []
    for name, full in sorted(load_file(oracle_path).items()):
        if kv_repeat > 1 and re.search(r"self_attn\.[kv]_proj\.weight(_scale_inv)?$", name):
            # tp > kv heads: the global k/v tensor has every head repeated tp/kv times.
            rows = HEAD_DIM // scale_block_rows if name.endswith("_scale_inv") else HEAD_DIM
            full = full.view(-1, rows, full.shape[-1]).repeat_interleave(kv_repeat, dim=0)
            full = full.reshape(-1, full.shape[-1])
        placements = [
            _torch_placement(p, TReplicate, TShard, _StridedShard) for p in expected[name]
        ]
        got = local.get(name)
        if got is None or got.dtype != full.dtype:
            problems.append(f"{name}: {None if got is None else got.dtype}, want {full.dtype}")
            continue
        if full.dtype == torch.float8_e4m3fn:
            full, got = full.view(torch.uint8), got.view(torch.uint8)
        # Rank 0's copy is scattered / broadcast over the mesh, as DTensor does by default.
        want = distribute_tensor(full, mesh, placements).to_local()
        if got.shape != want.shape or not torch.equal(got, want):
            problems.append(f"{name}: {list(got.shape)} differs from DTensor's {list(want.shape)}")
            continue
        # And through real collectives: the ranks' file tensors gather back to the global one.
        gathered = DTensor.from_local(got, mesh, placements, run_check=False).full_tensor()
        if not torch.equal(gathered, full):
            problems.append(f"{name}: all-gathering the rank files does not give the global tensor")
    return {"keys": sorted(local), "problems": problems, "coords": list(mesh.get_coordinate())}


# --- the layout table ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle_file(tmp_path_factory, hf_params) -> Path:
    path = tmp_path_factory.mktemp("oracle") / "hf_params.safetensors"
    save_file({k: v.contiguous() for k, v in hf_params.items()}, str(path))
    return path


@pytest.mark.parametrize("layout", LAYOUTS)
def test_manifest_placements_match_design_table(layout, convert_tiny, hf_params):
    out = convert_tiny(layout)
    manifest = json.loads((out / "reshard.json").read_text())
    names, shape, _ = parse_layout(layout)
    assert manifest["mesh"] == dict(zip(names, shape))
    assert sorted(manifest["params"]) == sorted(hf_params)
    tp = dict(zip(names, shape)).get("tp", 1)
    for name, entry in manifest["params"].items():
        assert entry["placements"] == [
            placement_text(p) for p in expected_placements(name, layout)
        ], name
        kv = re.search(r"self_attn\.[kv]_proj\.weight$", name) and tp > NUM_KV_HEADS
        assert entry.get("head_repeat", 1) == (tp // NUM_KV_HEADS if kv else 1), name
        rows = hf_params[name].shape[0] * entry.get("head_repeat", 1)
        assert entry["shape"] == [rows, *hf_params[name].shape[1:]], name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_rank_file_matches_distribute_tensor(layout, convert_tiny, oracle_file, hf_params):
    out = convert_tiny(layout)
    names, shape, _ = parse_layout(layout)
    world = 1
    for s in shape:
        world *= s
    tp = dict(zip(names, shape)).get("tp", 1)
    kv_repeat = tp // NUM_KV_HEADS if tp > NUM_KV_HEADS else 1
    expected = {name: expected_placements(name, layout) for name in hf_params}
    results = run_on_ranks(
        _rank_checks_file,
        world,
        str(out),
        str(oracle_file),
        names,
        shape,
        expected,
        kv_repeat,
        timeout_s=150,
    )
    manifest = json.loads((out / "reshard.json").read_text())
    assert len(manifest["ranks"]) == world
    for rank, result in enumerate(results):
        assert result["problems"] == [], f"rank {rank}"
        assert result["keys"] == sorted(hf_params), f"rank {rank}"
        # Rank numbering is DeviceMesh's: row-major over the dims as written.
        assert result["coords"] == [manifest["ranks"][rank]["coords"][d] for d in names]


def test_tp8_rank_holds_kv_head_rank_div_2(convert_tiny, hf_params):
    """DESIGN 3: with tp > num_kv_heads rank r holds kv head r // (tp / kv), as vLLM does."""
    out = convert_tiny("tp8")
    manifest = json.loads((out / "reshard.json").read_text())
    assert any("replicated 2x" in note for note in manifest["notes"])
    for rank in range(8):
        with safe_open(str(out / f"rank-{rank:05d}-of-00008.safetensors"), "pt") as f:
            for proj in ("k_proj", "v_proj"):
                name = f"model.layers.1.self_attn.{proj}.weight"
                head = rank // 2
                want = hf_params[name][head * HEAD_DIM : (head + 1) * HEAD_DIM]
                assert torch.equal(f.get_tensor(name), want), (rank, proj)


# --- local_selection, unit tests and against DTensor ---------------------------------------------


def take(t: torch.Tensor, selection) -> torch.Tensor:
    """Index `t` by per-dim lists of [start, stop) ranges."""
    for dim, ranges in enumerate(selection):
        index = [torch.arange(a, b) for a, b in ranges]
        t = t.index_select(dim, torch.cat(index) if index else torch.empty(0, dtype=torch.long))
    return t


def test_uneven_shard_is_torch_chunk_3_3_3_1():
    selections = [local_selection((10,), (Shard(0),), (4,), (r,)) for r in range(4)]
    assert selections == [[[(0, 3)]], [[(3, 6)]], [[(6, 9)]], [[(9, 10)]]]
    assert [selection_shape(s) for s in selections] == [(3,), (3,), (3,), (1,)]
    t = torch.arange(10)
    assert [take(t, s).tolist() for s in selections] == [c.tolist() for c in torch.chunk(t, 4)]


def test_shard_may_leave_a_rank_empty():
    # ceil(5 / 4) = 2 -> 2, 2, 1, 0 (torch.chunk returns only 3 chunks; DTensor pads rank 3 empty)
    shapes = [selection_shape(local_selection((5, 3), (Shard(0),), (4,), (r,))) for r in range(4)]
    assert shapes == [(2, 3), (2, 3), (1, 3), (0, 3)]


def test_design_example_experts_then_strided_rows():
    t = torch.arange(32).reshape(4, 8, 1)
    placements = (Shard(0), StridedShard(1, 2))
    sel = local_selection(tuple(t.shape), placements, (2, 2), (0, 0))
    local = take(t, sel)
    assert sel[0] == [(0, 2)] and sel[1] == [(0, 2), (4, 6)]
    assert torch.equal(local, t[0:2][:, [0, 1, 4, 5]])


def test_uneven_strided_shard_is_refused():
    with pytest.raises(LayoutError, match=r"dim 1 of size 6 cannot be split into 2 blocks x 2"):
        local_selection((4, 6, 1), (Shard(0), StridedShard(1, 2)), (2, 2), (0, 1), what="w")


def test_negative_dims_and_placement_text_round_trip():
    for p in (Replicate(), Shard(0), Shard(2), StridedShard(1, 2), StridedShard(-2, 4)):
        assert parse_placement(str(p)) == p
    assert local_selection((2, 6), (Shard(-1),), (3,), (1,)) == [[(0, 2)], [(2, 4)]]
    with pytest.raises(ValueError, match="unknown placement"):
        parse_placement("Shard(x)")


def test_to_torch_gives_dtensor_placements():
    from torch.distributed.tensor import Replicate as TReplicate
    from torch.distributed.tensor import Shard as TShard
    from torch.distributed.tensor.placement_types import _StridedShard

    assert to_torch(Shard(1)) == TShard(1)
    assert to_torch(Replicate()) == TReplicate()
    assert to_torch(StridedShard(1, 2)) == _StridedShard(1, split_factor=2)


# (mesh shape, tensor shape, placements): uneven, empty, composed and strided cases.
SELECTION_CASES = [
    ((4,), (10, 3), (Shard(0),)),
    ((4,), (5, 3), (Shard(0),)),
    ((4,), (3, 7), (Shard(1),)),
    ((4,), (2, 16, 3), (StridedShard(1, 2),)),
    ((4,), (2, 24, 3), (StridedShard(1, 3),)),
    ((4,), (6, 5), (Replicate(),)),
    ((2, 2), (4, 8, 1), (Shard(0), StridedShard(1, 2))),
    ((2, 2), (7, 3), (Shard(0), Shard(0))),
    ((2, 2), (9, 5), (Shard(1), Shard(0))),
    ((2, 2), (5, 7), (Shard(1), Shard(1))),
    ((2, 2), (6, 8, 4), (Shard(0), Shard(2))),
    ((2, 2), (3, 8, 4), (Replicate(), StridedShard(1, 2))),
    ((2, 2), (4, 12, 2), (Shard(0), StridedShard(-2, 2))),
    ((2, 2), (3, 5), (Replicate(), Shard(-1))),
]
UNEVEN_STRIDED = ((2, 2), (4, 6, 1), (Shard(0), StridedShard(1, 2)))


def _rank_distributes_cases(rank: int, world: int, cases: list, uneven: tuple) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    meshes = {
        (4,): init_device_mesh("cpu", (4,), mesh_dim_names=("a",)),
        (2, 2): init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b")),
    }
    locals_ = []
    for mesh_shape, shape, placements in cases:
        t = torch.arange(torch.Size(shape).numel()).reshape(shape)
        torch_placements = [to_torch(p) for p in placements]
        locals_.append(distribute_tensor(t, meshes[mesh_shape], torch_placements).to_local())
    mesh_shape, shape, placements = uneven
    try:
        t = torch.arange(torch.Size(shape).numel()).reshape(shape)
        distribute_tensor(t, meshes[mesh_shape], [to_torch(p) for p in placements])
        refused = None
    except Exception as e:  # DTensor raises its own error types
        refused = f"{type(e).__name__}: {e}"
    coords = {k: m.get_coordinate() for k, m in meshes.items()}
    return {"locals": locals_, "coords": coords, "uneven_refused": refused}


def test_local_selection_matches_distribute_tensor_on_gloo():
    results = run_on_ranks(_rank_distributes_cases, 4, SELECTION_CASES, UNEVEN_STRIDED)
    for rank, result in enumerate(results):
        for (mesh_shape, shape, placements), want in zip(SELECTION_CASES, result["locals"]):
            coords = tuple(result["coords"][mesh_shape])
            sel = local_selection(shape, placements, mesh_shape, coords)
            t = torch.arange(torch.Size(shape).numel()).reshape(shape)
            case = f"rank {rank} {mesh_shape} {shape} {[str(p) for p in placements]}"
            assert selection_shape(sel) == tuple(want.shape), case
            assert torch.equal(take(t, sel), want), case
        # DTensor refuses the uneven strided shard; so must we (DESIGN 4).
        assert result["uneven_refused"] is not None
    mesh_shape, shape, placements = UNEVEN_STRIDED
    with pytest.raises(LayoutError):
        local_selection(shape, placements, mesh_shape, (0, 0))
