"""sha256 of large files (reshard.hash_cache): a file the page cache holds is hashed mapped, in a
child process; any other is read (reshard.file_blocks). Both give hashlib's digest, and a file
cut while it is hashed is an error that names it, never short data or a crash."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from helpers_files import evict, kernel_says_what_it_caches

import reshard.hash_cache as hc
from reshard.errors import SourceError

WINDOW = 4096  # the smallest window mmap takes: every size below crosses windows


def _mapped_calls(monkeypatch) -> list[Path]:
    calls, real = [], hc._sha256_mapped

    def counted(path, size, window=hc.MAPPED_WINDOW):
        calls.append(Path(path))
        return real(path, size, WINDOW)

    monkeypatch.setattr(hc, "_sha256_mapped", counted)
    monkeypatch.setattr(hc, "MAPPED_FROM", 0)
    return calls


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 5])
def test_the_mapped_hash_is_the_files_sha256(tmp_path, size):
    data = os.urandom(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert hc._sha256_mapped(path, size, WINDOW) == hashlib.sha256(data).hexdigest()


def test_a_cached_file_is_hashed_mapped_and_an_evicted_one_read(tmp_path, monkeypatch):
    data = os.urandom(7 * 4096 + 3)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    calls = _mapped_calls(monkeypatch)
    with open(path, "rb") as f:
        f.read()  # cached whole
    assert hc.sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert calls == [path]
    calls.clear()
    evict(path)
    assert hc.sha256_file(path) == hashlib.sha256(data).hexdigest()
    # Where the kernel cannot say what it caches, every file counts as cached, as elsewhere.
    assert calls == ([] if kernel_says_what_it_caches(path) else [path])


def test_a_small_file_is_read_not_mapped(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(1000))
    calls = _mapped_calls(monkeypatch)
    monkeypatch.setattr(hc, "MAPPED_FROM", 1001)
    assert hc.sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert calls == []


def test_a_file_cut_before_it_is_mapped_is_an_error_naming_it(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(3 * 4096))
    os.truncate(path, 4096 + 10)
    with pytest.raises(OSError, match="cut short") as e:
        hc._sha256_mapped(path, 3 * 4096, WINDOW)
    assert e.value.filename == str(path)


def _processes_naming(path: Path, proc_file: str) -> list[int]:
    """Pids of the other processes whose /proc/<pid>/<proc_file> (maps: what they have mapped;
    cmdline: their arguments) names `path`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            if str(path).encode() in Path(f"/proc/{pid}/{proc_file}").read_bytes():
                pids.append(int(pid))
        except OSError:
            continue
    return pids


def test_a_file_cut_while_mapped_kills_the_child_not_the_command(tmp_path):
    """The SIGBUS a truncated mapping raises: in this process it would end the command with no
    message; the child takes it, and the command gets an error naming the file."""
    path = tmp_path / "sparse.bin"
    size = 2 << 30  # a hole: hashing its zeros takes a second or more, no disk used
    with open(path, "wb") as f:
        f.truncate(size)
    got: list[BaseException | str] = []

    def hash_it() -> None:
        try:
            got.append(hc._sha256_mapped(path, size, size))  # one window: mapped once
        except BaseException as e:
            got.append(e)

    thread = threading.Thread(target=hash_it)
    thread.start()
    deadline = time.monotonic() + 30
    while not _processes_naming(path, "maps") and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    os.truncate(path, 0)
    thread.join()
    assert len(got) == 1 and isinstance(got[0], OSError), got
    assert got[0].filename == str(path) and "cut short" in got[0].strerror


def test_a_source_cut_while_hashed_is_a_source_error_naming_the_file(
    tiny_dir, tmp_path, monkeypatch
):
    from reshard.sources import open_source

    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    source = open_source(str(src))
    victim = source.files[0]
    _mapped_calls(monkeypatch)

    def cut_then_say_cached(path: Path) -> bool:  # the file changes after its size was taken
        if Path(path) == victim:
            os.truncate(path, 100)
        return True

    monkeypatch.setattr(hc, "in_page_cache", cut_then_say_cached)
    with pytest.raises(SourceError, match=rf"{victim}: cannot hash it \(cut short"):
        source.file_hashes()


@pytest.mark.parametrize("cores", [1, 2, 3])
def test_prefetch_leaves_a_core_to_the_command(tmp_path, monkeypatch, cores):
    """Hashing beside `import torch` on every core slowed the import (and the conversion) on
    two cores: one core is left to the command, but one file is always hashed."""
    files = []
    for k in range(4):
        files.append(tmp_path / f"{k}.bin")
        files[-1].write_bytes(os.urandom(1000 + k))
    running, peak, lock = [0], [0], threading.Lock()
    real = hc.sha256_file

    def counted(path: Path) -> str:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.1)  # long enough for every hashing thread to have started one
        with lock:
            running[0] -= 1
        return real(path)

    monkeypatch.setattr(hc, "sha256_file", counted)
    monkeypatch.setattr(hc, "default_workers", lambda: cores)
    hc.prefetch(files, cached=False)
    # Waited for, not taken: taking a queued one hashes it in this thread instead.
    futures = [hc._started[hc._key(f)] for f in files]
    assert [future.result() for future in futures] == [real(f) for f in files]
    assert peak[0] == max(1, cores - 1)


def test_a_hash_stops_when_the_command_that_asked_has_exited(tmp_path):
    """A command that fails early exits with its prefetched hashes still running: their child
    processes stop at their next window instead of hashing gigabytes for no one."""
    import subprocess
    import sys

    path = tmp_path / "sparse.bin"
    size = 8 << 30  # a hole: seconds of hashing, no disk used
    with open(path, "wb") as f:
        f.truncate(size)
    command = """
import os, sys, threading, time
from pathlib import Path
import reshard.hash_cache as hc
args = (Path(sys.argv[1]), int(sys.argv[2]), 16 << 20)
threading.Thread(target=hc._sha256_mapped, args=args, daemon=True).start()
time.sleep(0.5)
os._exit(0)
"""
    subprocess.run([sys.executable, "-c", command, str(path), str(size)], check=True)
    deadline = time.monotonic() + 2  # hashing all of it takes longer on any machine
    while _processes_naming(path, "cmdline") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _processes_naming(path, "cmdline") == []


def _fsynced(monkeypatch) -> list[str]:
    """The paths of the descriptors given to os.fsync from now on."""
    paths, real = [], os.fsync

    def recorded(fd):
        paths.append(os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recorded)
    return paths


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names descriptors through /proc")
def test_the_cache_is_saved_without_an_fsync_and_outputs_with_one(tmp_path, monkeypatch):
    """An fsync flushes the whole disk's write cache: the hash cache, which may be lost, is not
    synced (mid-conversion it stalled every rank file's writes); a file that must survive is."""
    from reshard.writer import atomic_write_text

    monkeypatch.setenv("RESHARD_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(5000))
    fsynced = _fsynced(monkeypatch)
    hc.remember({data: hashlib.sha256(data.read_bytes()).hexdigest()})
    assert hc.cached_sha256([data]) == {data: hashlib.sha256(data.read_bytes()).hexdigest()}
    assert (tmp_path / "cache" / "hashes.json").exists()
    assert fsynced == []
    atomic_write_text(tmp_path / "manifest.json", "{}")
    assert any(p.endswith(".tmp") for p in fsynced) and str(tmp_path) in fsynced


@pytest.mark.parametrize("damage", [b"\0" * 4096, b'{"truncated": ', b"\xff\xfe"])
def test_a_cache_damaged_by_a_crash_is_taken_as_empty(tmp_path, monkeypatch, damage):
    """What a crash can leave of an unsynced cache (zeros, a cut): the files are hashed again
    and the cache rewritten whole."""
    monkeypatch.setenv("RESHARD_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(5000))
    want = hashlib.sha256(data.read_bytes()).hexdigest()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "hashes.json").write_bytes(damage)
    assert hc.cached_sha256([data]) == {data: want}
    assert hc._cached(hc._load(), data) == want
