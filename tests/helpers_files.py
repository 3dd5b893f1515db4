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


def count_hashing(monkeypatch, *modules) -> list[str]:
    """Replace `sha256_file` in `modules` by one that records each file name it hashes."""
    import hashlib

    hashed: list[str] = []

    def counting(path, *args, **kwargs) -> str:
        hashed.append(Path(path).name)
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    for module in modules:
        monkeypatch.setattr(module, "sha256_file", counting)
    return hashed
