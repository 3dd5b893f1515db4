"""Damaging files on purpose, for tests of what reads them."""

from __future__ import annotations

from pathlib import Path


def flip_a_data_byte(path: Path) -> None:
    """Corrupt one byte of a safetensors file's tensor data (not its header), keeping its size."""
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    offset = 8 + header_len + (len(data) - 8 - header_len) // 2
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
