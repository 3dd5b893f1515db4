"""`reshard verify`: re-hash every rank file and, against a source, compare every tensor bit for bit.

Both stream. Against a source, each rank file is read once, in order (reshard.file_blocks:
from the page cache where it is there, else with direct I/O): every byte is hashed, and each
tensor's bytes are compared as they come with the same bytes read from the source through the
lazy tensors' `read` (the simple path, not the file spans `convert` copies). So memory stays
a few blocks and chunks per thread whatever the model's size, and a checkpoint just written
(with direct I/O, so not in the page cache) is read from the disk once, not once to hash and
once to compare. Rank files are checked in parallel threads (hashlib, `preadv` and torch
release the GIL), at least as many as there are TP ranks of a column slice: they then take
their columns of the same source rows at about the same time, and share one read of them
(converters/lazy.py), as they do when `convert` writes them. Checked `workers` at a time, tp8
read its down_proj rows once per rank: 9.6 GB of source for a 3.7 GB checkpoint.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from reshard.checkpoint import ShardedCheckpoint
from reshard.converters.lazy import DTYPE_NAMES, selection_chunks
from reshard.engine import CHUNK, MAX_FILES, keep_shared_spans
from reshard.errors import CheckpointError, ReshardError
from reshard.file_blocks import file_blocks
from reshard.hash_cache import take_prefetched
from reshard.machine import default_workers
from reshard.placements import selection_shape
from reshard.safetensors_header import read_header


@dataclass
class Finding:
    ok: bool
    what: str


def check_files(
    ckpt: ShardedCheckpoint, workers: int | None = None, *, hash: bool = True
) -> Iterator[Finding]:
    """One finding per rank, in rank order: its files' sizes, own headers and (with `hash`)
    sha256s against the manifest. Only the tool's own errors are findings; anything else
    propagates."""

    def check(rank: int) -> Finding:
        try:
            ckpt.check_rank_file(rank, hash=hash)
        except ReshardError as e:
            return Finding(False, str(e))
        return Finding(True, f"{ckpt.rank_path(rank).name}: " + ("sha256 ok" if hash else "found"))

    with cf.ThreadPoolExecutor(workers or default_workers()) as pool:
        yield from pool.map(check, range(ckpt.layout.world_size))


def check_against(ckpt: ShardedCheckpoint, plan, workers: int | None = None) -> Iterator[Finding]:
    """One finding per rank, in rank order, as its files are read: their sha256s against the
    manifest. Then one per parameter: every rank's local tensor equals the source's bytes at the
    selection the manifest gives that rank (so replicas agree and the pieces cover the tensor).
    Then one failure for each parameter of the source the checkpoint lacks.

    Check the files' sizes and own headers first (`check_files(hash=False)`): this reads
    what they say. Every file is queued at once, and the TP ranks of a column slice are checked
    together whatever `workers` says; stopped early (Ctrl-C, a failure), the queued ones are
    dropped."""
    compared = {
        name
        for name, p in ckpt.params.items()
        if name in plan.params
        and (p.dtype, p.shape) == (plan.params[name].dtype, plan.params[name].shape)
    }
    world = ckpt.layout.world_size
    keep_shared_spans(plan.source.reader)
    pool = cf.ThreadPoolExecutor(check_threads(ckpt, workers))
    try:
        jobs = [
            [
                (path, entry, pool.submit(_check_file, ckpt, plan, rank, path, compared))
                for path, entry in ckpt.rank_files(rank)
            ]
            for rank in range(world)
        ]
        differs: dict[str, str] = {}  # the first rank found differing, in rank order
        for rank, files in enumerate(jobs):
            bad = None
            for path, entry, job in files:
                digest, problems = job.result()
                for name, problem in problems.items():
                    differs.setdefault(name, problem)
                if bad is None and digest != entry.sha256:
                    bad = f"{path}: sha256 does not match the manifest (corrupt or replaced file)"
            yield Finding(bad is None, bad or f"{ckpt.rank_path(rank).name}: sha256 ok")
        for name, p in ckpt.params.items():
            if name not in plan.params:
                yield Finding(False, f"{name}: not a parameter of the source")
            elif name not in compared:
                want = plan.params[name]
                yield Finding(
                    False,
                    f"{name}: {DTYPE_NAMES[p.dtype]} {list(p.shape)} in the checkpoint, "
                    f"{DTYPE_NAMES[want.dtype]} {list(want.shape)} from the source: "
                    "differs from the source",
                )
            elif name in differs:
                yield Finding(False, differs[name])
            else:
                yield Finding(True, f"{name}: {list(p.shape)} bit-exact")
        for name in missing_from(ckpt, plan):
            yield Finding(False, f"{name}: in the source, not in the checkpoint")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # stopped early: drop the queued work


def missing_from(ckpt: ShardedCheckpoint, plan) -> list[str]:
    """The source's parameters the checkpoint does not hold (a checkpoint of fewer layers, or a
    manifest that lost some): each is one failure of `check_against`."""
    return [name for name in plan.params if name not in ckpt.params]


def check_threads(ckpt: ShardedCheckpoint, workers: int | None = None) -> int:
    """Rank files checked at once: `workers` (default one per core) up to MAX_FILES, as
    `convert` writes them, but never fewer than a column group (they share one read). Each
    thread keeps memory torch freed in it: 16 threads for ep4tp4 on a 16-core host peaked at
    1.8 GB (8 threads and glibc's arenas capped: 1.3 GB)."""
    wanted = min(workers or default_workers(), MAX_FILES)
    return min(ckpt.layout.world_size, max(wanted, column_group(ckpt)))


def column_group(ckpt: ShardedCheckpoint) -> int:
    """The most ranks that hold different columns of one parameter's rows (its TP ranks, where
    its last dim is sharded): checked at the same time, they share one read of the rows."""
    world = ckpt.layout.world_size
    kinds = {(tuple(p.shape), repr(p.placements)): name for name, p in ckpt.params.items()}
    return max(
        (
            len({tuple(ckpt.selection(name, r)[-1]) for r in range(world)})
            for name in kinds.values()
        ),
        default=1,
    )


def _check_file(
    ckpt: ShardedCheckpoint,
    plan,
    rank: int,
    path: Path,
    compared: set[str],
) -> tuple[str, dict[str, str]]:
    """(sha256 of the file, {tensor: why it differs from the source}), from one read of it (the
    hash from a `prefetch` of the file instead, where one has started)."""
    header = read_header(path, error=CheckpointError)
    problems = {}
    prefetched = take_prefetched(path)
    data = _HashedBytes(path, hash=prefetched is None)
    try:
        for name, info in sorted(header.tensors.items(), key=lambda item: item[1].start):
            if name not in compared:
                continue  # reported by name; its bytes are only hashed
            data.skip_to(header.data_start + info.start)
            if problem := _compare(ckpt, plan, name, rank, path, info.shape, data):
                problems[name] = problem
        return prefetched.result() if prefetched is not None else data.finish(), problems
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e
    finally:
        data.close()


def _compare(
    ckpt: ShardedCheckpoint,
    plan,
    name: str,
    rank: int,
    path: Path,
    shape: tuple[int, ...],
    data: _HashedBytes,
) -> str | None:
    """None if the tensor's bytes, next in `data`, equal the source at the rank's selection."""
    selection = ckpt.selection(name, rank)
    if tuple(shape) != selection_shape(selection):
        want = list(selection_shape(selection))
        return f"{name}: {path.name} holds {list(shape)}, the manifest's selection is {want}"
    for expected in selection_chunks(plan.targets[name], selection, CHUNK):
        flat = expected.contiguous().view(-1).view(torch.uint8)  # bits: NaN == NaN, -0.0 != 0.0
        at = 0
        for piece in data.take(flat.numel()):
            if not same_bytes(
                flat[at : at + len(piece)], torch.frombuffer(piece, dtype=torch.uint8)
            ):
                return f"{name}: rank {rank} ({path.name}) differs from the source"
            at += len(piece)
    return None


class _HashedBytes:
    """A file's bytes, taken in order, each hashed (with `hash`): a block is hashed in a thread
    of its own while the caller compares it, and before the next is taken (file_blocks then
    reuses its buffer)."""

    def __init__(self, path: Path, *, hash: bool = True):
        self.path = path
        self.blocks = file_blocks(path)
        self.digest = hashlib.sha256()
        self.hasher = cf.ThreadPoolExecutor(1, thread_name_prefix="reshard-hash") if hash else None
        self.hashing: cf.Future | None = None
        self.block = memoryview(b"")
        self.at = 0  # in the block
        self.offset = 0  # in the file, of the next byte to take

    def _next_block(self) -> bool:
        if self.hashing is not None:
            self.hashing.result()
        self.block, self.at = next(self.blocks, memoryview(b"")), 0
        if not self.block:
            return False
        if self.hasher is not None:
            self.hashing = self.hasher.submit(self.digest.update, self.block)
        return True

    def take(self, nbytes: int) -> Iterator[memoryview]:
        """The next `nbytes` bytes, as one or more views (valid until the next is taken)."""
        while nbytes:
            if self.at == len(self.block) and not self._next_block():
                raise OSError(f"the file ends at byte {self.offset:,}")
            n = min(nbytes, len(self.block) - self.at)
            piece = self.block[self.at : self.at + n]
            self.at, self.offset, nbytes = self.at + n, self.offset + n, nbytes - n
            yield piece

    def skip_to(self, offset: int) -> None:
        for _ in self.take(offset - self.offset):
            pass

    def finish(self) -> str:
        """The file's sha256, once every byte left is read (and hashed)."""
        while self._next_block():
            pass
        return self.digest.hexdigest()

    def close(self) -> None:
        self.blocks.close()
        if self.hasher is not None:
            self.hasher.shutdown()


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two flat uint8 tensors hold the same bytes: compared 8 at a time where both are
    aligned to it (torch.equal on uint8 ran at 1.1 GB/s on the 2-core VM, on int64 at 9)."""
    whole = a.numel() // 8 * 8
    if whole and a.data_ptr() % 8 == 0 and b.data_ptr() % 8 == 0:
        if not torch.equal(a[:whole].view(torch.int64), b[:whole].view(torch.int64)):
            return False
        a, b = a[whole:], b[whole:]
    return torch.equal(a, b)
