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

import json
import os
from pathlib import Path

from reshard.writer import atomic_write_text, sha256_file


def stamp(path: Path) -> list[int]:
    """What any rewrite of the file changes: device, inode, size, mtime, ctime."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _cache_file() -> Path:
    from reshard.tiny import cache_root

    return cache_root() / "hashes.json"


def _load() -> dict:
    try:
        data = json.loads(_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: hash again


def _save(cache: dict) -> None:
    try:
        _cache_file().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(_cache_file(), json.dumps(cache))
    except OSError:
        pass  # a read-only cache only costs time


def cached_sha256(paths: list[Path]) -> dict[Path, str]:
    """sha256 of each of `paths`, from the cache where the file is unchanged since; the others
    are hashed in parallel threads (hashlib releases the GIL), one file per thread."""
    from concurrent.futures import ThreadPoolExecutor

    cache, out = _load(), {}
    misses = []
    for path in paths:
        key, before = os.path.realpath(path), stamp(path)
        hit = cache.get(key)
        if (
            isinstance(hit, dict)
            and hit.get("stamp") == before
            and isinstance(hit.get("sha256"), str)
        ):
            out[path] = hit["sha256"]
        else:
            misses.append((path, key, before))
    if not misses:
        return out
    from reshard.engine import default_workers

    with ThreadPoolExecutor(min(len(misses), default_workers())) as pool:
        hashed = list(pool.map(lambda m: sha256_file(m[0]), misses))
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
