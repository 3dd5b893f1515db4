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
