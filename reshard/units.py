"""Sizes as people read them. Torch- and hub-free, so a command that only reports (a no-op
convert, inspect, plan) does not import huggingface_hub's model card for it (0.2 s)."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """`n` bytes in decimal units: 512 B, 3.7 GB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
