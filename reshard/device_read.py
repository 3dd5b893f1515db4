"""Read a safetensors file's tensors into device memory through pinned host buffers.

`safe_open(path, device="cuda")` hands each tensor to the GPU from pageable memory (the
file's mapping): 2.4 s for an 11.2 GB rank on an H200 host, a quarter of `reshard run`'s
start (docs/benchmarks.md). Here the tensors are allocated on the device first; then
THREADS threads each read CHUNK-byte spans of the data section with `preadv` into a pinned
buffer of their own and copy them on asynchronously, on a stream of their own, so one
thread's read overlaps the others' copies. Neighbouring small tensors share one read.

On the CPU (tests, and where there is no CUDA) the same code runs with plain buffers and
synchronous copies.

    >>> tensors = read_tensors(path, read_header(path), ["w"], torch.device("cuda"))
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from reshard.errors import CheckpointError
from reshard.file_blocks import pread_exactly
from reshard.safetensors_header import Header
from reshard.writer import tensor_bytes

CHUNK = 64 << 20
THREADS = 4


@dataclass(frozen=True)
class _Chunk:
    """One read: `nbytes` from file offset `offset`, and where its bytes go: (destination
    bytes, offset into this read) pairs."""

    offset: int
    nbytes: int
    targets: list[tuple[torch.Tensor, int]]


def read_tensors(
    path: Path, header: Header, names: list[str], device: torch.device
) -> dict[str, torch.Tensor]:
    """Tensors `names` of the safetensors file at `path` (whose parsed header is `header`), on
    `device`. Raise CheckpointError if the file cannot be read to the end of those tensors."""
    tensors = {
        name: torch.empty(
            header.tensors[name].shape, dtype=header.tensors[name].dtype, device=device
        )
        for name in names
    }
    chunks = _chunks(header, tensors)
    errors: list[BaseException] = []
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        threads = [
            threading.Thread(
                target=_read_every,
                args=(fd, path, chunks[k::THREADS], device, errors),
                name=f"reshard-read-{k}",
            )
            for k in range(min(THREADS, len(chunks)))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        os.close(fd)
    if errors:
        raise errors[0]
    return tensors


def _chunks(header: Header, tensors: dict[str, torch.Tensor]) -> list[_Chunk]:
    """The reads that fill `tensors`, in file order: spans of at most CHUNK bytes, each
    covering whole small tensors or a piece of a large one."""
    chunks: list[_Chunk] = []
    pending: list[tuple[torch.Tensor, int]] = []
    start = end = 0  # the pending read's file span, relative to the data section
    for name, tensor in sorted(tensors.items(), key=lambda kv: header.tensors[kv[0]].start):
        if not tensor.numel():
            continue
        info, data = header.tensors[name], tensor.reshape(-1).view(torch.uint8)
        at = info.start
        while at < info.stop:
            if pending and (at != end or end - start >= CHUNK):
                chunks.append(_Chunk(header.data_start + start, end - start, pending))
                pending = []
            if not pending:
                start = end = at
            n = min(info.stop - at, CHUNK - (end - start))
            pending.append((data[at - info.start : at - info.start + n], end - start))
            at, end = at + n, end + n
    if pending:
        chunks.append(_Chunk(header.data_start + start, end - start, pending))
    return chunks


def _read_every(
    fd: int,
    path: Path,
    chunks: list[_Chunk],
    device: torch.device,
    errors: list[BaseException],
) -> None:
    """One thread's reads, through one buffer: read a span, copy it on, and wait for that copy
    only before the buffer is filled again."""
    pinned = device.type == "cuda"  # pinned buffers and async copies; plain ones on the CPU
    try:
        size = max(c.nbytes for c in chunks)
        buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
        stream = torch.cuda.Stream(device) if pinned else None
        copied = torch.cuda.Event() if pinned else None
        view = tensor_bytes(buffer)
        for chunk in chunks:
            if errors:
                return
            if copied is not None:
                copied.synchronize()  # the last copy out of this buffer is done
            _pread_exactly(fd, view[: chunk.nbytes], chunk.offset, path)
            if stream is None:
                for dst, at in chunk.targets:
                    dst.copy_(buffer[at : at + dst.numel()])
                continue
            with torch.cuda.stream(stream):
                for dst, at in chunk.targets:
                    dst.copy_(buffer[at : at + dst.numel()], non_blocking=True)
                copied.record(stream)
        if stream is not None:
            stream.synchronize()
    except BaseException as e:  # the caller raises the first
        errors.append(e)


def _pread_exactly(fd: int, view: memoryview, offset: int, path: Path) -> None:
    try:
        pread_exactly(fd, view, offset)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e
