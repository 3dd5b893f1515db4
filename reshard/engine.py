"""The conversion engine: rank files written from segments by a pool of threads.

Every output file's layout is known before a byte is read (the plan gives each
tensor's dtype and local shape), so each segment's place in the file is known
too. That lets the work split three ways and overlap:

- a file is written in aligned blocks of BLOCK bytes. I/O threads fill each
  block from its segments (a file span is read with `preadv` straight into the
  block; a computed segment, a cast or a column slice, is computed by torch and
  copied in) and hand it to one of WRITERS threads that only `pwrite`, so the
  disk has several blocks in flight however few cores fill them;
- blocks go to the disk with direct I/O (`O_DIRECT`) where the file system
  takes it: no copy into the page cache, which on a 2-core VM cost more CPU
  than the copy itself did (docs/benchmarks.md). Elsewhere, or if the file
  system refuses, buffered writes, each handed to the disk at once
  (`sync_file_range`) instead of all at the final fsync;
- one thread per file hashes the blocks in file order as they are filled
  (sha256 cannot be split), so the file's hash comes from the writer, never
  from reading the file back;
- up to MAX_FILES files are written at once, whatever the number of cores: the TP ranks of
  a column slice read the same source rows, and read together they share one read of them
  (converters/lazy.py); two at a time, tp8 read its down_proj rows 7 times over.

Torch ops, `preadv`/`pwrite` and hashlib release the GIL, so the threads run
in parallel. Memory is bounded by WINDOW + 1 blocks per file being written.

    written = write_files(jobs, reader, workers=8, on_bytes=bar.update)
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import errno
import hashlib
import mmap
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from reshard.converters.lazy import Computed, FileSpan, Segment, SliceReader
from reshard.errors import OutputError
from reshard.file_blocks import ALIGN
from reshard.machine import linux_libc
from reshard.writer import nbytes, output_error, safetensors_header, temp_name, tensor_bytes

# Bytes per segment at most (boxes are cut to this size): 4 MB kept the 2-core VM at its
# copy+hash floor. Bytes per block written, and blocks in flight per file: a block also holds
# computed bytes; on the FP8-dequantizing memory test 2 MB blocks peak at 93 MB over the
# baseline, 4 MB ones at 112 MB (the bound), a few tens of MB per file.
CHUNK = 4 << 20
BLOCK = 2 << 20
WINDOW = 4
MAX_FILES = 8  # files written at once at most: each holds WINDOW + 1 blocks
# Threads that only write filled blocks. A direct write waits for the disk, and when the
# `workers` threads that fill blocks also wrote them, a 2-core machine had two writes in
# flight and cores idle while they waited. More fill threads did it too (ninth session), but
# each kept the memory torch had freed in it (glibc's per-thread arenas); a writer allocates
# nothing.
WRITERS = 8
# Bytes of covering reads of column slices the reader keeps while MAX_FILES ranks take their
# slices of them: the files written at once drift apart by tens of experts, and with 16 MB
# tp8 read its down_proj rows 7 times over on the 2-core VM, with 128 MB once.
SHARED_SPANS = 128 << 20
# Blocks are page-aligned anonymous maps, BLOCK a multiple of ALIGN, as direct I/O wants.
DIRECT_IO = hasattr(os, "O_DIRECT")  # Linux; tests turn it off to cover the buffered writes


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

    Up to MAX_FILES files are written at once, each with its own hashing thread; the
    `workers` I/O threads that fill blocks and the WRITERS threads that write them are shared
    between them.
    """
    if not jobs:
        return
    keep_shared_spans(reader)
    stop = threading.Event()
    files_at_once = min(len(jobs), MAX_FILES)
    io = cf.ThreadPoolExecutor(workers, thread_name_prefix="reshard-io")
    writers = cf.ThreadPoolExecutor(WRITERS, thread_name_prefix="reshard-write")
    files = cf.ThreadPoolExecutor(files_at_once, thread_name_prefix="reshard-file")
    lock = threading.Lock()

    def counted(n: int) -> None:
        with lock:
            on_bytes(n)

    try:
        futures = {
            files.submit(_write_file, job, reader, io, writers, stop, counted): job for job in jobs
        }
        for future in cf.as_completed(futures):
            yield futures[future], future.result()
    finally:
        # Whatever stopped us (an error, Ctrl-C, the caller): every file stops at its next
        # segment and waits for its own in-flight writes before closing its descriptor.
        stop.set()
        files.shutdown(wait=True, cancel_futures=True)
        io.shutdown(wait=True, cancel_futures=True)
        writers.shutdown(wait=True, cancel_futures=True)


def keep_shared_spans(reader: SliceReader) -> None:
    """Let `reader` keep SHARED_SPANS of covering reads (at least), for the TP ranks of column
    slices that are read at once: by `write_files`, and by `reshard verify --against`."""
    reader.span_cache = max(reader.span_cache, SHARED_SPANS)


def _write_file(
    job: FileJob,
    reader: SliceReader,
    io: cf.ThreadPoolExecutor,
    writers: cf.ThreadPoolExecutor,
    stop: threading.Event,
    on_bytes: Callable[[int], None],
) -> Written:
    header = safetensors_header(job.entries, job.metadata)
    size = len(header) + sum(nbytes(dtype, shape) for _, dtype, shape in job.entries)
    digest = hashlib.sha256()
    # Block k is filled in buffer k % (WINDOW + 1): by the time a buffer is reused, the block
    # that had it has been hashed (at most WINDOW are being filled) and its write is waited for.
    buffers: list[mmap.mmap | None] = [None] * (WINDOW + 1)
    writes: list[cf.Future | None] = [None] * (WINDOW + 1)
    pending: deque[tuple[int, cf.Future]] = deque()  # (slot, fill) in file order
    out = _Output(job.path, size)
    header_left = len(header)  # the progress counts tensor bytes only

    def hash_next() -> None:
        nonlocal header_left
        slot, fill = pending.popleft()
        data, writes[slot] = fill.result()
        digest.update(data)
        skip = min(len(data), header_left)
        header_left -= skip
        on_bytes(len(data) - skip)

    try:
        offset = 0
        for k, pieces in enumerate(_blocks(header, _until(stop, job.segments()))):
            slot = k % (WINDOW + 1)
            if buffers[slot] is None:
                buffers[slot] = mmap.mmap(-1, BLOCK)
            elif writes[slot] is not None:
                writes[slot].result()
            fill = io.submit(_fill_and_write, pieces, buffers[slot], out, offset, reader, writers)
            pending.append((slot, fill))
            offset += sum(b - a for _, a, b in pieces)
            while len(pending) > WINDOW:
                hash_next()
        while pending:
            hash_next()
        for write in writes:
            if write is not None:
                write.result()
        if offset != size:
            raise ValueError(f"{job.path.name}: segments gave {offset:,} bytes, expected {size:,}")
        out.finish()
    except BaseException:
        for _, fill in pending:
            fill.cancel()
        # No write may land after the descriptor is closed (and reused): a fill that ran has
        # handed its block to a writer.
        cf.wait([fill for _, fill in pending])
        for _, fill in pending:
            if not fill.cancelled() and fill.exception() is None:
                writes.append(fill.result()[1])
        cf.wait([w for w in writes if w is not None])
        out.discard()
        raise
    return Written(path=job.path, nbytes=offset, sha256=digest.hexdigest())


def _until(stop: threading.Event, segments: Iterable[Segment]) -> Iterator[Segment]:
    """The segments, until another file fails or the user interrupts."""
    for segment in segments:
        if stop.is_set():
            raise Stopped
        yield segment


# A block's contents: (bytes, a file span, or a computed segment shared by the blocks it
# straddles; start; stop) byte ranges of them, in file order.
Piece = tuple["bytes | FileSpan | _Once", int, int]


class _Once:
    """A computed segment's bytes, computed by the first block that needs them and dropped once
    the last has copied its piece (`pieces`: how many blocks take a piece of it)."""

    def __init__(self, segment: Computed):
        self.segment, self.lock = segment, threading.Lock()
        self.data: memoryview | None = None
        self.pieces = 0

    def copy(self, start: int, stop: int, into: memoryview) -> None:
        with self.lock:
            if self.data is None:
                self.data = tensor_bytes(self.segment.tensor())
            data = self.data
            self.pieces -= 1
            if self.pieces == 0:
                self.data = None
        into[:] = data[start:stop]


def _blocks(header: bytes, segments: Iterable[Segment]) -> Iterator[list[Piece]]:
    """The file's bytes (header, then segments) cut into blocks of BLOCK bytes (the last may be
    shorter): each block as its pieces."""
    block: list[Piece] = []
    room = BLOCK

    def cut(source, total: int) -> Iterator[list[Piece]]:
        nonlocal block, room
        if isinstance(source, _Once):  # counted before a block that has it can be written
            source.pieces = 1 + max(0, -(-(total - room) // BLOCK))
        start = 0
        while start < total:
            n = min(room, total - start)
            block.append((source, start, start + n))
            start, room = start + n, room - n
            if room == 0:
                yield block
                block, room = [], BLOCK

    yield from cut(header, len(header))
    for segment in segments:
        source = _Once(segment) if isinstance(segment, Computed) else segment
        yield from cut(source, segment.nbytes)
    if block:
        yield block


def _fill_and_write(
    pieces: list[Piece],
    buffer: mmap.mmap,
    out: _Output,
    offset: int,
    reader: SliceReader,
    writers: cf.ThreadPoolExecutor,
) -> tuple[memoryview, cf.Future]:
    """Fill the block at `offset` from its pieces and hand it to a writer; return its bytes
    for hashing, and the write."""
    view = memoryview(buffer)
    at = 0
    for source, start, stop in pieces:
        n = stop - start
        if isinstance(source, FileSpan):
            what = f"bytes at {source.offset + start:,}"
            reader.read_into(source.path, source.offset + start, view[at : at + n], what)
            reader.count(source.path, n)
        elif isinstance(source, _Once):
            source.copy(start, stop, view[at : at + n])
        else:
            view[at : at + n] = source[start:stop]
        at += n
    return view[:at], writers.submit(out.write, view, at, offset)


class _Output:
    """A file being written under its temporary name, with direct I/O where the file system
    takes it; renamed to its own name by `finish` (after an fsync), removed by `discard`."""

    def __init__(self, path: Path, size: int):
        self.path, self.size, self.tmp = path, size, temp_name(path)
        self.lock = threading.Lock()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        self.direct = DIRECT_IO
        try:
            if self.direct:
                try:
                    self.fd = os.open(self.tmp, flags | os.O_DIRECT, 0o644)
                except OSError as e:
                    if e.errno != errno.EINVAL:  # EINVAL: this file system has no direct I/O
                        raise
                    self.direct = False
            if not self.direct:
                self.fd = os.open(self.tmp, flags, 0o644)
        except OSError as e:
            raise output_error(path, e, size) from e

    def write(self, block: memoryview, n: int, offset: int) -> None:
        """Write the block's first `n` bytes at `offset` (a multiple of ALIGN)."""
        if self.direct:
            padded = -(-n // ALIGN) * ALIGN  # the file's last block: cut back in `finish`
            block[n:padded] = bytes(padded - n)
            try:
                _pwrite_all(self.fd, block[:padded], offset, self.path, self.size)
                return
            except OutputError as e:
                if not isinstance(e.__cause__, OSError) or e.__cause__.errno != errno.EINVAL:
                    raise
                self._buffered()  # the file system took O_DIRECT at open, not at write
        _pwrite_all(self.fd, block[:n], offset, self.path, self.size)
        _start_writeback(self.fd, offset, n)

    def _buffered(self) -> None:
        with self.lock:
            if self.direct:
                fd = os.open(self.tmp, os.O_WRONLY | os.O_CLOEXEC)
                os.dup2(fd, self.fd)  # threads writing through the old descriptor now buffer
                os.close(fd)
                self.direct = False

    def finish(self) -> None:
        try:
            os.ftruncate(self.fd, self.size)  # the last block's padding
            os.fsync(self.fd)  # data on disk before the name says "finished"
        except OSError as e:
            raise output_error(self.path, e, 0) from e
        os.close(self.fd)
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        os.close(self.fd)
        self.tmp.unlink(missing_ok=True)


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing these pages to disk now (Linux `sync_file_range`), so the disk works while
    we copy and the fsync at each file's end has little left to wait for. On a 16-core host it
    took a 6.2 GB conversion from 5.5 s to 3.1 s (docs/benchmarks.md). Elsewhere: nothing."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE: start, do not wait


_sync_file_range = linux_libc("sync_file_range")
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int, path: Path, size: int) -> None:
    view = memoryview(data).cast("B")
    try:
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
    except OSError as e:
        raise output_error(path, e, size - offset) from e
