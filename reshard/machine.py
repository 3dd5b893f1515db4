"""Where the command runs: its cache directory and its cores.

Torch-free on purpose: a command reads these before `import torch` (1.5 - 4.5 s of one
busy core), to start work that does not need torch, such as hashing a source.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def cache_root() -> Path:
    """Where reshard keeps derived files: $RESHARD_CACHE, else $XDG_CACHE_HOME/reshard, else ~/.cache/reshard."""
    if os.environ.get("RESHARD_CACHE"):
        return Path(os.environ["RESHARD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "reshard"


def default_workers() -> int:
    """I/O threads: one per core the process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def linux_libc(name: str):
    """The C library's function `name` (ctypes, errno kept), on Linux; else None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None


def torchrun_processes() -> int:
    """How many processes torchrun started this command as: 1 when it did not."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    return processes if processes > 1 and "RANK" in os.environ else 1


M_ARENA_MAX = -8  # mallopt's parameter (malloc.h)


def share_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas for this process; whether the C library took the cap.

    glibc gives each thread that allocates an arena of its own, up to 8 per core, and keeps
    what torch frees in a thread's arena for that thread: verify's 16 threads on a 16-core host
    held 1.8 GB at their peak. The cap is read when the ninth arena is made, so this runs before
    the command starts its threads."""
    mallopt = linux_libc("mallopt")
    return mallopt is not None and mallopt(M_ARENA_MAX, arenas) == 1
