"""`reshard verify`: re-hash every rank file and, against a source, compare every tensor bit for bit.

Both stream: a rank file is hashed in chunks, and each rank's local tensor is
compared chunk by chunk with the same bytes read from the source through the
lazy tensors' `read` (the simple path, not the file spans `convert` copies),
so memory stays a few chunks per thread whatever the model's size. Rank files
are checked in parallel threads (hashlib, `preadv` and torch release the GIL).
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from reshard.checkpoint import ShardedCheckpoint
from reshard.converters.lazy import DTYPE_NAMES, SliceReader, selection_chunks
from reshard.engine import CHUNK
from reshard.errors import CheckpointError, ReshardError
from reshard.machine import default_workers
from reshard.placements import selection_shape
from reshard.safetensors_header import read_header
from reshard.writer import tensor_bytes


@dataclass
class Finding:
    ok: bool
    what: str


def check_files(ckpt: ShardedCheckpoint, workers: int | None = None) -> Iterator[Finding]:
    """One finding per rank, in rank order: its files' sizes, sha256s and own headers against
    the manifest. Only the tool's own errors are findings; anything else propagates."""

    def check(rank: int) -> Finding:
        try:
            ckpt.check_rank_file(rank)
        except ReshardError as e:
            return Finding(False, str(e))
        return Finding(True, f"{ckpt.rank_path(rank).name}: sha256 ok")

    with cf.ThreadPoolExecutor(workers or default_workers()) as pool:
        yield from pool.map(check, range(ckpt.layout.world_size))


def check_against(ckpt: ShardedCheckpoint, plan, workers: int | None = None) -> Iterator[Finding]:
    """One finding per parameter: every rank's local tensor equals the source's bytes at the
    selection the manifest gives that rank (so replicas agree and the pieces cover the tensor)."""
    world = ckpt.layout.world_size
    offsets = _data_offsets(ckpt)
    reader = SliceReader()
    with cf.ThreadPoolExecutor(workers or default_workers()) as pool:
        for name, p in ckpt.params.items():
            if name not in plan.params:
                yield Finding(False, f"{name}: not a parameter of the source")
                continue
            want = plan.params[name]
            if (p.dtype, p.shape) != (want.dtype, want.shape):
                yield Finding(
                    False,
                    f"{name}: {DTYPE_NAMES[p.dtype]} {list(p.shape)} in the checkpoint, "
                    f"{DTYPE_NAMES[want.dtype]} {list(want.shape)} from the source: "
                    "differs from the source",
                )
                continue
            jobs = [
                pool.submit(_compare_rank, ckpt, plan, name, rank, offsets, reader)
                for rank in range(world)
            ]
            problems = [problem for job in jobs if (problem := job.result())]
            if problems:
                yield Finding(False, problems[0])
            else:
                yield Finding(True, f"{name}: {list(p.shape)} bit-exact")


def _data_offsets(ckpt: ShardedCheckpoint) -> dict[tuple[int, str], tuple[Path, int, tuple]]:
    """(rank, tensor) -> (file, offset of its data, local shape), from each file's own header."""
    out = {}
    for rank in range(ckpt.layout.world_size):
        for path, _ in ckpt.rank_files(rank):
            header = read_header(path, error=CheckpointError)
            for name, info in header.tensors.items():
                out[rank, name] = (path, header.data_start + info.start, info.shape)
    return out


def _compare_rank(
    ckpt: ShardedCheckpoint,
    plan,
    name: str,
    rank: int,
    offsets: dict,
    reader: SliceReader,
) -> str | None:
    """None if rank `rank`'s copy of `name` equals the source at its selection, else why not."""
    selection = ckpt.selection(name, rank)
    path, offset, shape = offsets[rank, name]
    if tuple(shape) != selection_shape(selection):
        want = list(selection_shape(selection))
        return f"{name}: {path.name} holds {list(shape)}, the manifest's selection is {want}"
    for expected in selection_chunks(plan.targets[name], selection, CHUNK):
        flat = expected.contiguous().view(-1).view(torch.uint8)  # bits: NaN == NaN, -0.0 != 0.0
        actual = torch.empty_like(flat)
        reader.read_into(str(path), offset, tensor_bytes(actual), f"tensor {name}")
        if not torch.equal(flat, actual):
            return f"{name}: rank {rank} ({path.name}) differs from the source"
        offset += flat.numel()
    return None
