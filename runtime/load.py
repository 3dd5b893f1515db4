"""Load one rank of a sharded checkpoint: as plain local tensors, as DTensors, or as a ready model.

For programs that bring their own training loop:

    # under torchrun, with the layout's world size
    from reshard.runtime import load_local_tensors, load_dtensors
    local = load_local_tensors("q3-ep4tp4")                 # {name: this rank's shard}
    mesh = init_device_mesh("cuda", (4, 4), mesh_dim_names=("ep", "tp"))
    params = load_dtensors("q3-ep4tp4", mesh)               # {name: DTensor with the manifest's placements}

Each rank opens only its own rank file and `reshard.json`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from reshard.architecture import ModelArgs
from reshard.checkpoint import ShardedCheckpoint, open_checkpoint
from reshard.converters import get_spec
from reshard.errors import CheckpointError
from reshard.placements import Replicate, to_torch
from reshard.runtime import mxfp4
from reshard.runtime.fp8 import compute_dtype, dequantize_on_access, take_scales
from reshard.runtime.model import meta_model
from reshard.runtime.parallel import ParallelGroups, ParallelModel, parallelize


def _rank(rank: int | None) -> int:
    if rank is not None:
        return rank
    if "RANK" not in os.environ:
        raise CheckpointError(
            "no rank given and RANK is not set (run under torchrun, or pass rank=)"
        )
    return int(os.environ["RANK"])


def _open(directory: str | Path) -> ShardedCheckpoint:
    """A local directory, or `hf:org/name[@rev]` pinned to one commit for every rank."""
    if str(directory).startswith("hf:"):
        from reshard.hub import agree_on_revision

        directory = agree_on_revision(str(directory))
    return open_checkpoint(directory)


def load_local_tensors(
    directory: str | Path, rank: int | None = None, *, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """This rank's local tensors, checked against the manifest (sha256, names, local shapes).

    Args:
        directory: a `reshard convert` output directory.
        rank: the rank to load; defaults to $RANK (torchrun).
    Returns:
        {parameter name: local shard}, e.g. `model.layers.0.mlp.experts.gate_up_proj [E/ep, 2I/tp, H]`.
    """
    return _open(directory).load_rank(_rank(rank), device=device)


def load_dtensors(directory: str | Path, mesh) -> dict[str, torch.Tensor]:
    """This rank's tensors as DTensors on `mesh`, with the manifest's placements and global shapes.

    `mesh` must have the layout's mesh dims, by name and in order (e.g.
    `("ep", "tp")` of shape (4, 4) for ep4tp4). It may be a sub-mesh of a larger
    world mesh, as torchtitan passes `world_mesh["tp"]`: the rank file is chosen
    by this process's coordinates on `mesh`, not by its global rank.
    k/v projections of a layout with tp > num_key_value_heads carry repeated heads
    (the manifest's `head_repeat`); their global shape counts the repeats.

    Example (4 ranks, a (dp=2, tp=2) world and a tp2 checkpoint):
        >>> world = init_device_mesh("cuda", (2, 2), mesh_dim_names=("dp", "tp"))
        >>> params = load_dtensors("q3-tp2", world["tp"])
    """
    from torch.distributed.tensor import DTensor

    ckpt = _open(directory)
    names, shape = tuple(mesh.mesh_dim_names or ()), tuple(mesh.mesh.shape)
    want_names, want_shape = ckpt.layout.mesh_dim_names, ckpt.layout.mesh_shape
    if (names, shape) != (want_names, want_shape) and not (shape == (1,) and not want_names):
        raise CheckpointError(
            f"mesh {dict(zip(names, shape)) or shape} does not match layout {ckpt.layout.name}: "
            f"pass a mesh with dims {dict(zip(want_names, want_shape))}, in that order"
        )
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise CheckpointError("this process is not part of the mesh given to load_dtensors")
    rank = ckpt.layout.rank_of(dict(zip(want_names, coordinate)))
    local = ckpt.load_rank(rank, device=mesh.device_type)
    out = {}
    for name, p in ckpt.params.items():
        stride = torch.empty(p.shape, device="meta").stride()
        out[name] = DTensor.from_local(
            local[name],
            mesh,
            [to_torch(pl) for pl in p.placements] or [to_torch(Replicate())],
            run_check=False,
            shape=torch.Size(p.shape),
            stride=stride,
        )
    return out


def load_parallel_model(
    ckpt: ShardedCheckpoint, rank: int, *, device: torch.device, dtype: torch.dtype | None = None
) -> ParallelModel:
    """Build the model on the meta device, wire it for the layout, and load this rank's shards.

    FP8 weights stay float8 in memory and are dequantized to `dtype` (default: the other
    weights' dtype) each time their layer reads them (reshard.runtime.fp8); MXFP4 ones stay
    blocks and scales, alike (reshard.runtime.mxfp4)."""
    model = meta_model(model_args(ckpt))
    state = ckpt.load_rank(rank, device=device)
    quantization = ckpt.manifest.quantization
    packed = mxfp4.take_packed(state, quantization)  # MXFP4: blocks under their weight's name
    scales = {} if packed else take_scales(state, quantization)
    if dtype is not None:
        state = {
            k: v.to(dtype) if v.is_floating_point() and k not in scales else v
            for k, v in state.items()
        }
    _assign_local(model, state)
    if scales:
        dequantize_on_access(model, scales, quantization, dtype or compute_dtype(state, scales))
    if packed:
        mxfp4.dequantize_on_access(model, packed, dtype or compute_dtype(state, {}))
    head_repeat = max(p.head_repeat for p in ckpt.params.values())
    groups = ParallelGroups.create(ckpt.layout, rank, head_repeat)
    # A scale is placed like its weight: the weight's placements are the ones to run.
    held = set(quantization["scales"].values()) if quantization else set()
    params = {n: p for n, p in ckpt.params.items() if n not in held}
    if packed:  # the weights' placements, read back from their blocks'
        params = mxfp4.weight_params(ckpt.params, quantization)
    return parallelize(model, ckpt.layout, groups, params)


def model_args(ckpt: ShardedCheckpoint) -> ModelArgs:
    """The model's hyper-parameters, parsed from the manifest's config by its family."""
    try:
        return get_spec(ckpt.manifest.model_type).parse_config(ckpt.manifest.config)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{ckpt.directory / 'reshard.json'}: config: {e}") from e


def _assign_local(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Replace every tensor by its local shard (load_state_dict refuses the smaller shapes)."""
    params = {n for n, _ in model.named_parameters()}
    names = params | {n for n, _ in model.named_buffers()}
    if names != set(state):
        missing, extra = sorted(names - set(state)), sorted(set(state) - names)
        raise CheckpointError(
            f"rank file does not match the model: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, tensor in state.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if name in params:
            # Integer tensors (MXFP4 blocks) cannot require gradients.
            trainable = tensor.is_floating_point() or tensor.is_complex()
            setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=trainable))
        else:
            module.register_buffer(attr, tensor)
    if model.args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
