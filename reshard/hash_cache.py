"""sha256 of large files, remembered while the file is provably unchanged.

Used for sources (a no-op re-run hashes nothing) and for rank files: `convert` records the
hash its writer computed, so loading a rank right after converting it, or a second time,
checks its integrity without reading it again. `reshard verify` always reads.

Hashing a 60 GB source on every `reshard convert` cost a no-op re-run 75% of a full
one. A hash is kept in `$RESHARD_CACHE/hashes.json` under the file's real path with the
stat fields that any rewrite changes: device, inode, size, mtime and ctime (ctime cannot
be set back by a user, unlike mtime). If any differs, the file is hashed again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from reshard.file_blocks import file_blocks, in_page_cache
from reshard.machine import cache_root, default_workers


def stamp(path: Path) -> list[int]:
    """What any rewrite of the file changes: device, inode, size, mtime, ctime."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _cache_file() -> Path:
    return cache_root() / "hashes.json"


def _load() -> dict:
    try:
        data = json.loads(_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: hash again


def _save(cache: dict) -> None:
    from reshard.writer import atomic_write_text

    try:
        _cache_file().parent.mkdir(parents=True, exist_ok=True)
        # Not durable: a cache lost in a crash is hashed again (`_load` takes a damaged one
        # as empty), and its fsync stalled the rank files' writes mid-conversion.
        atomic_write_text(_cache_file(), json.dumps(cache), durable=False)
    except OSError:
        pass  # a read-only cache only costs time


def sha256_file(path: Path) -> str:
    """sha256 of the file, read once: where the page cache holds it whole, mapped (no copy);
    else through reshard.file_blocks (from the page cache, or direct). OSError naming the file
    if it cannot be read or is cut short while it is read."""
    size = os.stat(path).st_size
    if size >= MAPPED_FROM and sys.executable and in_page_cache(path):
        return _sha256_mapped(path, size)
    digest = hashlib.sha256()
    try:
        for block in file_blocks(path):
            digest.update(block)
    except OSError as e:
        raise OSError(e.errno, e.strerror, e.filename or os.fspath(path)) from e
    return digest.hexdigest()


# A file the page cache holds is hashed where it lies: mapped, a window at a time, so its bytes
# are never copied. On the 2-core VM, hashing a cached 2.2 GB file took 1.3 s of CPU mapped and
# 1.8 s read (0.5 s of it the kernel's copy); a first conversion of a 6.2 GB source, CPU-bound
# there, took 6.9-7.7 s against 7.3-10.0 s (docs/benchmarks.md). It runs in a child process:
# a file cut while it is mapped is a SIGBUS, which would kill the command itself; here it
# kills the child, and the command says which file changed. Below MAPPED_FROM, starting the
# child (about 0.05 s) costs more than the copy saves.
MAPPED_FROM = 64 << 20
MAPPED_WINDOW = 64 << 20  # bytes mapped at a time: what the child holds resident at most
_MAPPED_SHA256 = """
import hashlib, mmap, os, sys
path, size, window, parent = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
fd = os.open(path, os.O_RDONLY)
digest = hashlib.sha256()
for at in range(0, size, window):
    if os.getppid() != parent:
        sys.exit("the command that asked has exited")
    with mmap.mmap(fd, min(window, size - at), prot=mmap.PROT_READ, offset=at) as view:
        digest.update(view)
print(digest.hexdigest())
"""


def _sha256_mapped(path: Path, size: int, window: int = MAPPED_WINDOW) -> str:
    """sha256 of the file's first `size` bytes, computed by a child process that maps them."""
    # -I -S: the standard library only, whatever the environment or the working directory.
    # Our pid: a command that ends first (an error, Ctrl-C) leaves no hash running after it.
    args = [os.fspath(path), str(size), str(window), str(os.getpid())]
    cmd = [sys.executable, "-I", "-S", "-c", _MAPPED_SHA256, *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode == 0:
        return done.stdout.strip()
    if done.returncode == -signal.SIGBUS or "greater than file size" in done.stderr:
        why = f"cut short while it was read (it had {size:,} bytes): changed meanwhile?"
    else:
        lines = done.stderr.strip().splitlines()
        why = lines[-1] if lines else f"the hashing process exited with {done.returncode}"
    raise OSError(errno.EIO, why, os.fspath(path))


# Hashes started by `prefetch`, by real path and stamp at the start; taken by `sha256_of`.
_started: dict[tuple[str, tuple[int, ...]], Future[str]] = {}
_started_lock = threading.Lock()


def _key(path: Path) -> tuple[str, tuple[int, ...]]:
    return os.path.realpath(path), tuple(stamp(path))


def _cached(cache: dict, path: Path) -> str | None:
    hit = cache.get(os.path.realpath(path))
    if isinstance(hit, dict) and hit.get("stamp") == stamp(path):
        return hit.get("sha256") if isinstance(hit.get("sha256"), str) else None
    return None


def prefetch(paths: list[Path], *, cached: bool = True) -> None:
    """Start hashing `paths` in daemon threads and return at once.

    A command calls this before `import torch`, which keeps one core busy for 1.5 - 4.5 s:
    the other cores hash meanwhile, and `sha256_of` (or `cached_sha256`) later takes each
    result instead of reading the file again. With `cached`, files the cache knows unchanged
    are skipped. Daemon threads, so a command that fails early does not wait for them.
    """
    cache = _load() if cached else {}
    todo = [Path(p) for p in paths if not (cached and _cached(cache, Path(p)))]
    jobs = []
    with _started_lock:
        for path in todo:
            key = _key(path)
            if key not in _started:
                _started[key] = Future()
                jobs.append((path, _started[key]))

    def hash_jobs() -> None:
        while True:
            with _started_lock:
                if not jobs:
                    return
                path, future = jobs.pop(0)
            if not future.set_running_or_notify_cancel():
                continue  # claimed by a caller that reads the file itself (`take_prefetched`)
            try:
                future.set_result(sha256_file(path))
            except BaseException as e:  # the caller that takes it re-raises it
                future.set_exception(e)

    for _ in range(min(len(jobs), _hashers())):
        threading.Thread(target=hash_jobs, daemon=True).start()


def _hashers() -> int:
    """Files hashed at once: one per core but one, which is left to the command itself (it
    imports torch, then converts, meanwhile). On the 2-core VM, two hashes beside the import
    of torch slowed it from 1.7 s to 3.6 s, and a first conversion of the 6.2 GB synth took
    7.9-8.5 s against 7.4-7.6 s with one."""
    return max(1, default_workers() - 1)


def take_prefetched(path: Path) -> Future[str] | None:
    """The `prefetch` of `path` as it is now, if it has started (or finished). One still queued
    is dropped, so a caller that reads the file anyway can hash it then, in the same read."""
    with _started_lock:
        future = _started.pop(_key(path), None)
    if future is None or future.cancel():
        return None
    return future


def sha256_of(path: Path) -> str:
    """sha256 of `path`: the result of a `prefetch` of the file as it is now, else read now."""
    future = take_prefetched(path)
    return future.result() if future is not None else sha256_file(path)


def cached_sha256(paths: list[Path]) -> dict[Path, str]:
    """sha256 of each of `paths`, from the cache where the file is unchanged since; the others
    are hashed in parallel threads (hashlib releases the GIL), one file per thread, or taken
    from a `prefetch` of them."""
    cache, out = _load(), {}
    misses = []
    for path in paths:
        if (digest := _cached(cache, path)) is not None:
            out[path] = digest
        else:
            misses.append((path, os.path.realpath(path), stamp(path)))
    if not misses:
        return out
    with ThreadPoolExecutor(min(len(misses), _hashers())) as pool:
        hashed = list(pool.map(lambda m: sha256_of(m[0]), misses))
    for (path, key, before), digest in zip(misses, hashed):
        out[path] = digest
        if stamp(path) == before:  # not rewritten while we read it
            cache[key] = {"stamp": before, "sha256": digest}
    _save(cache)
    return out


def remember(paths: dict[Path, str]) -> None:
    """Record hashes known without reading (a file we just wrote and hashed while writing)."""
    cache = _load()
    for path, digest in paths.items():
        cache[os.path.realpath(path)] = {"stamp": stamp(path), "sha256": digest}
    _save(cache)
