"""A streaming safetensors writer: header first, then tensor by tensor.

All shapes are known from the plan, so the header is written before any data
and a 60 GB rank file never sits in memory. The file is written under a
temporary name and renamed when complete, so a crash never leaves a file that
looks finished.

    >>> with ShardWriter(path, [("w", torch.float32, (2, 3))]) as w:
    ...     w.write("w", torch.zeros(2, 3))
    >>> w.sha256, w.nbytes
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

from reshard.converters.lazy import DTYPE_NAMES


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for s in shape:
        n *= s
    return n


def safetensors_header(
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
) -> bytes:
    """The length-prefixed JSON header for `entries`, in order, padded to 8 bytes."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        size = _nbytes(dtype, shape)
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads with spaces so data is 8-byte aligned
    return struct.pack("<Q", len(blob)) + blob


class ShardWriter:
    """Writes one safetensors file; tensors must come in the order of `entries`."""

    def __init__(
        self,
        path: Path,
        entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self.entries = list(entries)
        self.metadata = metadata or {}
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.sha256: str | None = None
        self.nbytes = 0
        self._next = 0
        self._hash = hashlib.sha256()
        self._file = None

    def __enter__(self) -> ShardWriter:
        self._file = open(self.tmp, "wb")
        self._emit(safetensors_header(self.entries, self.metadata))
        return self

    def _emit(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._hash.update(data)
        self.nbytes += len(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, dtype, shape = self.entries[self._next]
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"{self.path.name}: expected {expected} {dtype} {list(shape)}, got {name} {tensor.dtype} {list(tensor.shape)}"
            )
        if tensor.numel():
            data = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()
            self._emit(memoryview(data))
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        self._file.close()
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        if self._next != len(self.entries):
            self.tmp.unlink(missing_ok=True)
            raise ValueError(
                f"{self.path.name}: {len(self.entries) - self._next} tensors were never written"
            )
        self.sha256 = self._hash.hexdigest()
        os.replace(self.tmp, self.path)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
