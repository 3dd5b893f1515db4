"""The record a finished `convert` leaves, so the same command run again needs no `import torch`.

A second `reshard convert` with the same arguments writes nothing, but to know that it plans the
conversion, and planning imports torch: 1.8-3 s on a 2-core VM, 4-6 s on a 16-core GPU host,
most of what such a no-op cost (3.6 s and 7-8 s). So, after a conversion of a local directory,
the command records what it was asked (source, layout, dtype, largest file), the stat stamps of
what it read and wrote (every file in the source directory and in --out) and of the code that
did it (reshard's own files). A run that finds all of that unchanged stops there. Anything else,
even a file touched, goes to the planner, which decides rank by rank what to write again.

Torch-free on purpose: it runs before the import.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from reshard.hash_cache import stamp

PROGRESS_DIR = ".reshard"  # in --out: the rank records, the lock and this record
RECORD = "done.json"


def request(src: str, layout: str, dtype: str, max_file_bytes: int) -> dict | None:
    """What a conversion of `src` depends on, stamped now; None for a source that is not a
    local directory (a Hub or built-in one: only the planner knows what it resolves to)."""
    source = Path(src)
    if not source.is_dir():
        return None
    return {
        "src": os.path.realpath(source),
        "layout": layout,
        "dtype": dtype,
        "max_file_bytes": max_file_bytes,
        "source": _stamps(source, "*"),
        "code": _stamps(Path(__file__).parent, "**/*.py"),
    }


def finished(out: Path, asked: dict) -> dict | None:
    """The summary recorded in `out` if it holds what a conversion `asked` wrote, untouched."""
    try:
        done = json.loads((out / PROGRESS_DIR / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(done, dict) or done.get("request") != asked:
        return None
    summary = done.get("summary")
    if not isinstance(summary, dict) or set(summary) != {"ranks", "bytes", "layout"}:
        return None
    return summary if done.get("out") == _stamps(out, "*") else None


def record(out: Path, asked: dict, summary: dict) -> None:
    """After the manifest, the last write of a conversion: what it was asked and what it left."""
    from reshard.writer import atomic_write_text

    done = {"request": asked, "out": _stamps(out, "*"), "summary": summary}
    atomic_write_text(out / PROGRESS_DIR / RECORD, json.dumps(done))


def _stamps(directory: Path, pattern: str) -> dict[str, list[int]]:
    return {
        str(p.relative_to(directory)): stamp(p)
        for p in sorted(directory.glob(pattern))
        if p.is_file()
    }
