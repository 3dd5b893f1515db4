"""The Python API for programs with their own training loop: `reshard.runtime.load_local_tensors`
and `load_dtensors`.

Oracles: `safetensors.torch.load_file` for what a rank file holds, and
transformers' Qwen3MoeForCausalLM (conftest's `hf_params`) for the global
parameters that the DTensors gather back to, on real gloo ranks.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers_dist import run_on_ranks
from helpers_files import flip_a_data_byte
from safetensors.torch import load_file, save_file

from reshard.errors import CheckpointError
from reshard.runtime import load_dtensors, load_local_tensors

HEAD_DIM = 16  # tiny:qwen3_moe


def _rank_file(directory: Path, rank: int, world: int) -> Path:
    return directory / f"rank-{rank:05d}-of-{world:05d}.safetensors"


@pytest.fixture
def ep2tp2_copy(convert_tiny, tmp_path) -> Path:
    """A private copy of the ep2tp2 checkpoint that a test may damage."""
    return Path(shutil.copytree(convert_tiny("ep2tp2"), tmp_path / "ep2tp2"))


# --- load_local_tensors ------------------------------------------------------------------------


@pytest.mark.parametrize("layout, world", [("ep2tp2", 4), ("tp4-tp2ep", 4)])
def test_load_local_tensors_returns_exactly_the_rank_file(convert_tiny, layout, world):
    directory = convert_tiny(layout)
    for rank in range(world):
        want = load_file(str(_rank_file(directory, rank, world)))
        got = load_local_tensors(directory, rank)
        assert sorted(got) == sorted(want)
        for name, tensor in want.items():
            assert got[name].dtype == tensor.dtype, name
            assert torch.equal(got[name], tensor), f"rank {rank} {name}"


def test_load_local_tensors_takes_the_rank_from_torchrun(convert_tiny, monkeypatch):
    directory = convert_tiny("ep2tp2")
    monkeypatch.setenv("RANK", "2")
    got = load_local_tensors(directory)
    want = load_file(str(_rank_file(directory, 2, 4)))
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[n], want[n]) for n in want)
    monkeypatch.delenv("RANK")
    with pytest.raises(CheckpointError, match="RANK is not set"):
        load_local_tensors(directory)


def test_tampered_rank_file_is_refused_by_its_hash(ep2tp2_copy):
    path = _rank_file(ep2tp2_copy, 1, 4)
    size = path.stat().st_size
    flip_a_data_byte(path)
    assert path.stat().st_size == size
    with pytest.raises(CheckpointError, match="sha256") as e:
        load_local_tensors(ep2tp2_copy, 1)
    assert path.name in str(e.value)
    load_local_tensors(ep2tp2_copy, 0)  # the other ranks' files are still fine


def test_missing_rank_file_is_refused(ep2tp2_copy):
    path = _rank_file(ep2tp2_copy, 3, 4)
    path.unlink()
    with pytest.raises(CheckpointError, match="rank file missing") as e:
        load_local_tensors(ep2tp2_copy, 3)
    assert path.name in str(e.value)


def test_truncated_rank_file_is_refused(ep2tp2_copy):
    path = _rank_file(ep2tp2_copy, 0, 4)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"truncated"):
        load_local_tensors(ep2tp2_copy, 0)


def test_rank_out_of_range_and_unfinished_directory(ep2tp2_copy):
    for rank in (4, -1):
        with pytest.raises(CheckpointError, match=f"rank {rank} out of range"):
            load_local_tensors(ep2tp2_copy, rank)
    (ep2tp2_copy / "reshard.json").unlink()
    with pytest.raises(CheckpointError, match="not a finished sharded checkpoint"):
        load_local_tensors(ep2tp2_copy, 0)


# --- load_dtensors on real ranks ----------------------------------------------------------------


def _rank_loads_dtensors(
    rank: int,
    world: int,
    directory: str,
    oracle_path: str,
    mesh_names: tuple[str, ...],
    mesh_shape: tuple[int, ...],
    kv_repeat: int,
    wrong_shape: tuple[int, ...],
) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    oracle = load_file(oracle_path)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=mesh_names)
    params = load_dtensors(directory, mesh)
    local = load_local_tensors(directory, rank)
    problems = []
    if sorted(params) != sorted(oracle):
        problems.append(f"names differ: {sorted(set(params) ^ set(oracle))}")
    for name in sorted(oracle):
        dt = params[name]
        want = oracle[name]
        if kv_repeat > 1 and re.search(r"self_attn\.[kv]_proj\.weight$", name):
            # tp > kv heads: every kv head is repeated; rank r holds head r // kv_repeat.
            want = (
                want.view(-1, HEAD_DIM, want.shape[-1])
                .repeat_interleave(kv_repeat, dim=0)
                .reshape(-1, want.shape[-1])
            )
        if not isinstance(dt, DTensor):
            problems.append(f"{name}: {type(dt).__name__}, not a DTensor")
            continue
        if tuple(dt.shape) != tuple(want.shape):
            problems.append(f"{name}: global shape {list(dt.shape)} != {list(want.shape)}")
            continue
        if not torch.equal(dt.to_local(), local[name]):
            problems.append(f"{name}: to_local() is not this rank's file tensor")
        full = dt.full_tensor()  # collective: every rank gathers every parameter, same order
        if not torch.equal(full, want):
            problems.append(f"{name}: full_tensor() != transformers' parameter")
    placements = {n: [repr(p) for p in params[n].placements] for n in params}
    wrong_mesh = None
    try:
        load_dtensors(directory, init_device_mesh("cpu", wrong_shape))
    except CheckpointError as e:
        wrong_mesh = str(e)
    return {"problems": problems, "placements": placements, "wrong_mesh": wrong_mesh}


@pytest.fixture(scope="module")
def oracle_file(tmp_path_factory, hf_params) -> Path:
    path = tmp_path_factory.mktemp("api-oracle") / "hf_params.safetensors"
    save_file({k: v.contiguous() for k, v in hf_params.items()}, str(path))
    return path


@pytest.mark.parametrize(
    "layout, mesh_names, mesh_shape, kv_repeat, wrong_shape",
    [
        ("ep2tp2", ("ep", "tp"), (2, 2), 1, (4,)),
        ("tp8", ("tp",), (8,), 2, (2, 4)),  # 8 query / 4 kv heads: k/v heads replicated
    ],
)
def test_load_dtensors_gather_to_transformers_parameters(
    convert_tiny, oracle_file, layout, mesh_names, mesh_shape, kv_repeat, wrong_shape
):
    directory = convert_tiny(layout)
    world = 1
    for s in mesh_shape:
        world *= s
    results = run_on_ranks(
        _rank_loads_dtensors,
        world,
        str(directory),
        str(oracle_file),
        mesh_names,
        mesh_shape,
        kv_repeat,
        wrong_shape,
        timeout_s=180,
    )
    for rank, result in enumerate(results):
        assert result["problems"] == [], f"rank {rank}: {result['problems']}"
        wrong = result["wrong_mesh"]
        assert wrong is not None, f"rank {rank}: a {wrong_shape} mesh was accepted for {layout}"
        assert f"does not match layout {layout}" in wrong, wrong
    placements = results[0]["placements"]
    if layout == "ep2tp2":
        # Experts: Shard(0) over ep, and the fused gate_up strided over tp ([gate_r; up_r]).
        gate_up = placements["model.layers.0.mlp.experts.gate_up_proj"]
        assert gate_up[0] == "Shard(dim=0)"
        assert re.fullmatch(r"_StridedShard\(dim=(1|-2), sf=2\)", gate_up[1]), gate_up
        assert placements["model.layers.0.mlp.experts.down_proj"][0] == "Shard(dim=0)"
        assert placements["model.layers.0.mlp.gate.weight"] == ["Replicate()", "Replicate()"]


def _rank_loads_from_a_sub_mesh(rank: int, world: int, directory: str, oracle_path: str) -> dict:
    """A (dp=2, tp=2) world and a tp2 checkpoint: each rank loads through world["tp"]."""
    from torch.distributed.device_mesh import init_device_mesh

    oracle = load_file(oracle_path)
    world_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    tp_rank = world_mesh.get_local_rank("tp")
    params = load_dtensors(directory, world_mesh["tp"])
    local = load_local_tensors(directory, tp_rank)
    problems = []
    for name in sorted(oracle):
        dt = params[name]
        if not torch.equal(dt.to_local(), local[name]):
            problems.append(f"{name}: to_local() is not tp rank {tp_rank}'s file tensor")
        if not torch.equal(dt.full_tensor(), oracle[name]):
            problems.append(f"{name}: full_tensor() over world['tp'] != transformers' parameter")
    refusals = []
    swapped = init_device_mesh("cpu", (2, 2), mesh_dim_names=("tp", "ep"))
    for mesh, label in ((swapped, "tp, ep"), (world_mesh, "dp, tp")):
        try:
            load_dtensors(directory.replace("tp2", "ep2tp2"), mesh)
        except CheckpointError as e:
            refusals.append(str(e))
        else:
            refusals.append(f"accepted a ({label}) mesh for ep2tp2")
    return {"tp_rank": tp_rank, "problems": problems, "refusals": refusals}


def test_load_dtensors_takes_the_rank_from_the_mesh_coordinates(
    convert_tiny, oracle_file, tmp_path
):
    """torchtitan passes sub-meshes: global rank 3 is tp rank 1 of world["tp"], not rank file 3."""
    base = tmp_path / "ckpts"
    shutil.copytree(convert_tiny("tp2"), base / "tp2")
    shutil.copytree(convert_tiny("ep2tp2"), base / "ep2tp2")
    results = run_on_ranks(
        _rank_loads_from_a_sub_mesh, 4, str(base / "tp2"), str(oracle_file), timeout_s=180
    )
    assert [r["tp_rank"] for r in results] == [0, 1, 0, 1]
    for rank, result in enumerate(results):
        assert result["problems"] == [], f"rank {rank}: {result['problems']}"
        for refusal in result["refusals"]:
            assert "does not match layout ep2tp2" in refusal, refusal
            assert "{'ep': 2, 'tp': 2}" in refusal, refusal
