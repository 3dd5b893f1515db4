"""Damaging files on purpose, for tests of what reads them."""

from __future__ import annotations

import os
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


def edit_rank_tensor(out: Path, rank: int, name: str, edit) -> None:
    """Edit tensor `name` of a rank file in place with `edit(tensor)` (its header untouched;
    float8 and other dtypes alike, written back as bytes), then re-hash the file into the
    manifest, so only a comparison of the values can tell."""
    import hashlib
    import json

    import torch

    from reshard.safetensors_header import read_header

    manifest = json.loads((out / "reshard.json").read_text())
    path = out / manifest["ranks"][rank]["file"]
    header = read_header(path)
    info = header.tensors[name]
    data = bytearray(path.read_bytes())
    start, stop = header.data_start + info.start, header.data_start + info.stop
    tensor = torch.frombuffer(data[start:stop], dtype=info.dtype).clone()
    before = tensor.clone()
    edit(tensor)
    assert not torch.equal(tensor.view(torch.uint8), before.view(torch.uint8)), (
        "edit changed nothing"
    )
    data[start:stop] = tensor.view(torch.uint8).numpy().tobytes()
    path.write_bytes(bytes(data))
    manifest["ranks"][rank]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (out / "reshard.json").write_text(json.dumps(manifest))


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache, as after `convert` writes it (direct I/O)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def kernel_says_what_it_caches(path: Path) -> bool:
    """Whether this kernel answers `cachestat` for `path` (Linux 6.5+): where it cannot,
    reshard.file_blocks counts every file as cached."""
    from reshard.file_blocks import _cached_pages

    fd = os.open(path, os.O_RDONLY)
    try:
        return _cached_pages(fd, 0, 4096) is not None
    finally:
        os.close(fd)
