"""A file's bytes in order, block by block, each read once: from the page cache where they are
there, with direct I/O where they are not.

Reading a file that is not in the page cache through it cost the 2-core VM 4-8 s of system time
per 3.75 GB (filling the cache, and evicting other files' pages to make room), against 0.6 s
read with direct I/O and a few reads in flight (docs/benchmarks.md). Rank files are such files
right after `convert`, which writes them with direct I/O. A file that is cached (a source just
downloaded or copied) is read from the cache: the kernel is asked (`cachestat`, Linux 6.5+) how
much of each block it holds, and only a block it does not hold whole is read direct. (A read
with RWF_NOWAIT is no such question: on a miss it starts the readahead into the cache that
direct I/O is there to avoid.) Where the kernel cannot say, every block is read buffered.

Torch-free, like reshard.hash_cache, which hashes with it before a command imports torch.

    digest = hashlib.sha256()
    for block in file_blocks(path):
        digest.update(block)
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import errno
import mmap
import os
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from reshard.machine import linux_libc

BLOCK = 2 << 20
AHEAD = 4  # reads in flight: with one direct read at a time, the disk idled between them
# Direct I/O wants file offsets, lengths and buffer addresses aligned to the device's logical
# block (512 B or 4 KiB); buffers are page-aligned anonymous maps, BLOCK a multiple of this.
ALIGN = 4096
DIRECT_IO = hasattr(os, "O_DIRECT")  # Linux; tests turn it off to cover the buffered reads


def file_blocks(path: Path, *, block: int = BLOCK, ahead: int = AHEAD) -> Iterator[memoryview]:
    """The bytes of `path`, in order, as views of reused buffers: a view holds until the next
    one is taken. OSError if the file cannot be read, or ends before the size it had at open.

    While the page cache holds the blocks they are read in this thread; from the first it does
    not, `ahead` threads read, so the disk always has reads to do while we use a block."""
    assert block % ALIGN == 0
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    reader = _Reader(fd, path)
    pool: cf.ThreadPoolExecutor | None = None
    pending: deque[cf.Future] = deque()
    try:
        size = os.fstat(fd).st_size
        starts = range(0, size, block)
        # Block k is read into buffer k % (ahead + 1): the block being looked at, and `ahead`
        # being read. The one read next goes into the buffer of the block looked at before.
        buffers = [mmap.mmap(-1, block) for _ in range(min(ahead + 1, len(starts)))]

        def view(k: int) -> memoryview:
            return memoryview(buffers[k % len(buffers)])[: min(block, size - starts[k])]

        k = 0
        while k < len(starts) and reader.cached(starts[k], len(view(k))):
            pread_exactly(fd, view(k), starts[k])
            yield view(k)
            k += 1
        if k == len(starts):
            return
        pool = cf.ThreadPoolExecutor(ahead, thread_name_prefix="reshard-read")
        for j in range(k, min(k + ahead, len(starts))):
            pending.append(pool.submit(reader.read, view(j), starts[j]))
        for j in range(k, len(starts)):
            got = pending.popleft().result()
            if j + ahead < len(starts):
                pending.append(pool.submit(reader.read, view(j + ahead), starts[j + ahead]))
            yield got
    finally:
        for future in pending:
            future.cancel()
        cf.wait(pending)  # no read may land after the descriptors are closed (and reused)
        if pool is not None:
            pool.shutdown()
        reader.close()


def in_page_cache(path: Path) -> bool:
    """Whether the page cache holds all of the file (True where the kernel cannot say)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return _Reader(fd, path).cached(0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


class _Reader:
    """Reads blocks of one file: buffered where the page cache holds them, else direct."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path
        self.direct: int | None = None  # opened at the first block the cache does not hold
        self.lock = threading.Lock()
        self.ask = DIRECT_IO  # False once the kernel cannot say or the file system refuses

    def cached(self, start: int, nbytes: int) -> bool:
        """Whether the page cache holds all of `nbytes` from `start` (True where it cannot say,
        so the block is read buffered, as any file is elsewhere)."""
        if self.ask:
            pages = _cached_pages(self.fd, start, nbytes)
            if pages is not None:
                return pages >= -(-(start + nbytes) // mmap.PAGESIZE) - start // mmap.PAGESIZE
            self.ask = False
        return True

    def read(self, view: memoryview, start: int) -> memoryview:
        """Fill `view` with the file's bytes from `start`."""
        if not self.cached(start, len(view)) and self._direct_fd() is not None:
            try:
                _read_direct(self.direct, view, start)
                return view
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: took O_DIRECT at open, not at read
                    raise
                self.ask = False
        pread_exactly(self.fd, view, start)
        return view

    def _direct_fd(self) -> int | None:
        with self.lock:
            if self.direct is None and self.ask:
                try:
                    self.direct = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                except OSError as e:
                    if e.errno != errno.EINVAL:  # EINVAL: this file system has no direct I/O
                        raise
                    self.ask = False
            return self.direct

    def close(self) -> None:
        os.close(self.fd)
        if self.direct is not None:
            os.close(self.direct)


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")
    ]


_CACHESTAT = 451  # the same number on every Linux architecture (added in 6.5)


_syscall = linux_libc("syscall")
if _syscall is not None:
    _syscall.restype = ctypes.c_long


def _cached_pages(fd: int, start: int, nbytes: int) -> int | None:
    """Pages of the file's bytes [start, start + nbytes) in the page cache (Linux `cachestat`);
    None where the kernel cannot say."""
    if _syscall is None:
        return None
    stat = _Stat()
    rc = _syscall(
        ctypes.c_long(_CACHESTAT),
        ctypes.c_int(fd),
        ctypes.byref(_Range(start, nbytes)),
        ctypes.byref(stat),
        ctypes.c_uint(0),
    )
    return stat.cache if rc == 0 else None


def _read_direct(fd: int, view: memoryview, start: int) -> None:
    """Fill `view` from `start` with direct reads: whole aligned blocks, the file's last one
    read whole into the buffer's slack (views start at a buffer's start, which has room)."""
    want = len(view)
    padded = memoryview(view.obj)[: -(-want // ALIGN) * ALIGN]
    done = 0
    while done < want:
        n = os.preadv(fd, [padded[done:]], start + done)
        if n == 0:
            raise OSError(errno.EIO, f"the file ends at byte {start + done:,}")
        done += n
        if done % ALIGN:  # the end of the file: what is left cannot be asked for aligned
            break
    if done < want:
        raise OSError(errno.EIO, f"the file ends at byte {start + done:,}")


def pread_exactly(fd: int, buffer: memoryview, offset: int) -> None:
    """Fill `buffer` with the bytes of `fd` from `offset`; OSError if the file ends first."""
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"the file ends at byte {offset + done:,}")
        done += n
