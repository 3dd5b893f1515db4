"""reshard.file_blocks: a file's bytes in order, read from the page cache where it holds them
and with direct I/O where it does not; hashing (reshard.hash_cache) and `verify` read with it."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest
from helpers_files import evict, kernel_says_what_it_caches

import reshard.file_blocks as fb
from reshard.hash_cache import sha256_file

SIZES = [0, 1, 4095, 4096, 4097, 3 * 8192 - 1, 3 * 8192, 3 * 8192 + 1, 11 * 8192 + 12345]


def _direct_reads(monkeypatch) -> list[int]:
    """Count the direct reads file_blocks makes (by offset)."""
    starts, lock, real = [], threading.Lock(), fb._read_direct

    def counted(fd, view, start):
        with lock:
            starts.append(start)
        return real(fd, view, start)

    monkeypatch.setattr(fb, "_read_direct", counted)
    return starts


def _can_tell(path) -> bool:
    """Whether this kernel answers `cachestat` and this file system takes direct I/O."""
    if not kernel_says_what_it_caches(path):
        return False
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("cached", [True, False], ids=["cached", "evicted"])
def test_blocks_are_the_files_bytes_in_order(tmp_path, size, cached):
    data = os.urandom(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    if not cached:
        evict(path)
    got = b"".join(bytes(b) for b in fb.file_blocks(path, block=8192, ahead=2))
    assert got == data
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_an_evicted_file_is_read_direct_and_a_cached_one_from_the_cache(tmp_path, monkeypatch):
    """The point of the module: a file the page cache does not hold (a rank file just written
    with direct I/O) is not read through it; one it holds is not read from the disk. Where the
    kernel cannot tell (no cachestat) or the file system refuses direct I/O, every read is
    buffered, as before."""
    data = os.urandom(9 * 8192 + 100)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    direct = _direct_reads(monkeypatch)
    evict(path)
    assert b"".join(bytes(b) for b in fb.file_blocks(path, block=8192, ahead=3)) == data
    if _can_tell(path):
        assert sorted(direct) == list(range(0, len(data), 8192))  # every block, once
    else:
        assert direct == []
    direct.clear()
    with open(path, "rb") as f:
        f.read()  # now cached
    assert b"".join(bytes(b) for b in fb.file_blocks(path, block=8192, ahead=3)) == data
    assert direct == []


def test_without_direct_io_every_read_is_buffered(tmp_path, monkeypatch):
    monkeypatch.setattr(fb, "DIRECT_IO", False)
    direct = _direct_reads(monkeypatch)
    data = os.urandom(5 * 8192 + 7)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    evict(path)
    assert b"".join(bytes(b) for b in fb.file_blocks(path, block=8192, ahead=2)) == data
    assert direct == []


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "evicted"])
def test_a_file_cut_while_read_is_an_error_not_short_data(tmp_path, cached):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(6 * 8192))
    if not cached:
        evict(path)
    blocks = fb.file_blocks(path, block=8192, ahead=1)
    next(blocks)
    os.truncate(path, 8192 + 100)
    with pytest.raises(OSError, match="ends at byte"):
        for _ in blocks:
            pass


def test_a_reader_stopped_early_leaves_no_descriptor_open(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(20 * 8192))
    evict(path)
    before = len(os.listdir("/proc/self/fd"))
    blocks = fb.file_blocks(path, block=8192, ahead=4)
    next(blocks)
    blocks.close()
    assert len(os.listdir("/proc/self/fd")) == before
