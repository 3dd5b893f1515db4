"""The conversion engine: rank files written from segments by a pool of threads.

Every output file's layout is known before a byte is read (the plan gives each
tensor's dtype and local shape), so each segment's place in the file is known
too. That lets the work split three ways and overlap:

- I/O threads copy segments: a file span is read with `preadv` into a reused
  buffer and written with `pwrite` at its offset; a computed segment (a cast, a
  column slice) is made contiguous by torch and written the same way;
- one thread per file hashes the segments in file order as they land (sha256
  cannot be split), so the file's hash comes from the writer, never from reading
  the file back;
- several files are written at once (ranks that read the same source regions
  read them while their pages are hot), and each written range is handed to the
  disk at once (`sync_file_range`) instead of all at the final fsync.

Torch ops, `preadv`/`pwrite` and hashlib release the GIL, so the threads run
in parallel. Memory is bounded by `window` segments of at most CHUNK bytes per
file in flight.

    written = write_files(jobs, reader, workers=8, on_bytes=bar.update)
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from reshard.converters.lazy import FileSpan, Segment, SliceReader
from reshard.writer import nbytes, output_error, safetensors_header, temp_name, tensor_bytes

# Bytes per segment at most (boxes are cut to this size) and segments in flight per file:
# 4 MB x 4 kept the 2-core VM at its copy+hash floor, and memory a few tens of MB per file.
CHUNK = 4 << 20
WINDOW = 4
MAX_FILES = 8  # files written at once at most: each holds WINDOW + 1 buffers


@dataclass(kw_only=True)
class FileJob:
    """One safetensors file to write: its tensors, in order, and their bytes as segments."""

    path: Path
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]]
    metadata: dict[str, str]
    segments: Callable[[], Iterable[Segment]]  # called in the file's own thread


@dataclass(frozen=True)
class Written:
    path: Path
    nbytes: int
    sha256: str


class Stopped(Exception):
    """Another file failed, or the user interrupted: this one stops too."""


def write_files(
    jobs: list[FileJob],
    reader: SliceReader,
    *,
    workers: int,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> Iterator[tuple[FileJob, Written]]:
    """Write `jobs`, yielding each as it finishes; the first failure stops every other file.

    Up to `workers` files (at most MAX_FILES) are written at once, each with its own
    hashing thread; the `workers` I/O threads are shared between them.
    """
    if not jobs:
        return
    stop = threading.Event()
    files_at_once = min(len(jobs), workers, MAX_FILES)
    io = cf.ThreadPoolExecutor(workers, thread_name_prefix="reshard-io")
    files = cf.ThreadPoolExecutor(files_at_once, thread_name_prefix="reshard-file")
    lock = threading.Lock()

    def counted(n: int) -> None:
        with lock:
            on_bytes(n)

    try:
        futures = {files.submit(_write_file, job, reader, io, stop, counted): job for job in jobs}
        for future in cf.as_completed(futures):
            yield futures[future], future.result()
    finally:
        # Whatever stopped us (an error, Ctrl-C, the caller): every file stops at its next
        # segment and waits for its own in-flight writes before closing its descriptor.
        stop.set()
        files.shutdown(wait=True, cancel_futures=True)
        io.shutdown(wait=True, cancel_futures=True)


def _write_file(
    job: FileJob,
    reader: SliceReader,
    io: cf.ThreadPoolExecutor,
    stop: threading.Event,
    on_bytes: Callable[[int], None],
) -> Written:
    header = safetensors_header(job.entries, job.metadata)
    size = len(header) + sum(nbytes(dtype, shape) for _, dtype, shape in job.entries)
    tmp = temp_name(job.path)
    digest = hashlib.sha256(header)
    # Buffer k serves segments k, k + WINDOW + 1, ...: by the time one is reused, the
    # segment that had it has been written and hashed (at most WINDOW are in flight).
    buffers: list[bytearray | None] = [None] * (WINDOW + 1)
    pending: deque[cf.Future] = deque()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise output_error(job.path, e, size) from e
    try:
        _pwrite_all(fd, header, 0, job.path, size)
        offset, count = len(header), 0
        for segment in job.segments():
            if stop.is_set():
                raise Stopped
            buffer = None
            if isinstance(segment, FileSpan):
                k = count % (WINDOW + 1)
                if buffers[k] is None or len(buffers[k]) < segment.nbytes:
                    buffers[k] = bytearray(segment.nbytes)  # grows to the largest span, ~CHUNK
                buffer = buffers[k]
            pending.append(io.submit(_copy, segment, fd, offset, buffer, reader, job.path, size))
            offset += _segment_bytes(segment)
            count += 1
            while len(pending) > WINDOW:
                on_bytes(_hash_next(pending, digest))
        while pending:
            on_bytes(_hash_next(pending, digest))
        if offset != size:
            raise ValueError(f"{job.path.name}: segments gave {offset:,} bytes, expected {size:,}")
        try:
            os.fsync(fd)  # data on disk before the name says "finished"
        except OSError as e:
            raise output_error(job.path, e, 0) from e
    except BaseException:
        for future in pending:
            future.cancel()
        cf.wait(pending)  # no write may land after the descriptor is closed (and reused)
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, job.path)
    return Written(path=job.path, nbytes=offset, sha256=digest.hexdigest())


def _hash_next(pending: deque[cf.Future], digest) -> int:
    data = pending.popleft().result()
    digest.update(data)
    return len(data)


def _copy(
    segment: Segment,
    fd: int,
    offset: int,
    buffer: bytearray | None,
    reader: SliceReader,
    path: Path,
    size: int,
) -> memoryview:
    """Put one segment's bytes at `offset` of the file; return them for hashing."""
    if isinstance(segment, FileSpan):
        data = memoryview(buffer)[: segment.nbytes]
        reader.read_into(segment.path, segment.offset, data, f"bytes at {segment.offset:,}")
        reader.count(segment.path, segment.nbytes)
    else:
        data = tensor_bytes(segment)
    _pwrite_all(fd, data, offset, path, size)
    _start_writeback(fd, offset, len(data))
    return data


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing these pages to disk now (Linux `sync_file_range`), so the disk works while
    we copy and the fsync at each file's end has little left to wait for. On a 16-core host it
    took a 6.2 GB conversion from 5.5 s to 3.1 s (docs/benchmarks.md). Elsewhere: nothing."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE: start, do not wait


def _load_sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        f = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return f


_sync_file_range = _load_sync_file_range()


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int, path: Path, size: int) -> None:
    view = memoryview(data).cast("B")
    try:
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
    except OSError as e:
        raise output_error(path, e, size - offset) from e


def _segment_bytes(segment: Segment) -> int:
    if isinstance(segment, FileSpan):
        return segment.nbytes
    return segment.numel() * segment.element_size()
