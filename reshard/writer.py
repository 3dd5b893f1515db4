"""A streaming safetensors writer: header first, then tensor by tensor.

All shapes are known from the plan, so the header is written before any data
and a 60 GB rank file never sits in memory. The file is written under a
temporary name, fsynced and renamed when complete, so neither a crash nor a
power loss leaves a file that looks finished.

    >>> with ShardWriter(path, [("w", torch.float32, (2, 3))]) as w:
    ...     w.write("w", torch.zeros(2, 3))
    >>> w.sha256, w.nbytes
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import torch

from reshard.converters.lazy import DTYPE_NAMES
from reshard.errors import OutputError

TMP_SUFFIX = ".tmp"


def nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of this dtype and shape."""
    n = dtype.itemsize
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
        size = nbytes(dtype, shape)
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads with spaces so data is 8-byte aligned
    return struct.pack("<Q", len(blob)) + blob


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, without a copy when it is contiguous.

    A ctypes view of the storage: no numpy needed (torch's `.numpy()` is
    what made a base install fail).
    """
    t = tensor.detach().contiguous()
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    buffer = (ctypes.c_ubyte * n).from_address(t.data_ptr())
    buffer._keep = t  # the view must keep its tensor alive
    return memoryview(buffer).cast("B")


def fsync_dir(directory: Path) -> None:
    """Make renames inside `directory` durable (a rename lives in the directory's data)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """`.name.<pid>.tmp` beside `path`: hidden, never mistaken for a finished file, one per process."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def atomic_write_text(path: Path, text: str, *, durable: bool = True) -> None:
    """Write a small file so that readers see the old content or the new one, never a torn one."""
    atomic_write_bytes(path, text.encode(), durable=durable)


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """`atomic_write_text` for bytes: temp file, fsync, rename, fsync of the directory.

    `durable=False` leaves out both fsyncs, for a cache that may be lost in a crash (its
    reader must take a damaged file as an empty one): an fsync flushes the whole disk's write
    cache, and on a VM whose host caches the disk, one in the middle of a conversion stalled
    every rank file's writes for 1.5 s (docs/benchmarks.md, tenth session).
    """
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise output_error(path, e, len(data)) from e
    if durable:
        fsync_dir(path.parent)


def output_error(path: Path, e: OSError, needed: int) -> OutputError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(path.parent).free
        return OutputError(
            f"{path}: disk full ({needed:,} more bytes needed for this file, {free:,} free)"
        )
    return OutputError(f"{path}: cannot write ({e.strerror or e})")


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
        self.header = safetensors_header(self.entries, metadata or {})
        self.size = len(self.header) + sum(nbytes(d, s) for _, d, s in self.entries)
        self.tmp = temp_name(self.path)
        self.sha256: str | None = None
        self.nbytes = 0
        self._next = 0
        self._hash = hashlib.sha256()
        self._file = None

    def __enter__(self) -> ShardWriter:
        try:
            self._file = open(self.tmp, "wb")
        except OSError as e:
            raise output_error(self.path, e, self.size) from e
        self._emit(self.header)
        return self

    def _emit(self, data: bytes | memoryview) -> None:
        try:
            self._file.write(data)
        except OSError as e:
            raise output_error(self.path, e, self.size - self.nbytes) from e
        self._hash.update(data)
        self.nbytes += len(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, dtype, shape = self.entries[self._next]
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"{self.path.name}: expected {expected} {dtype} {list(shape)}, got {name} {tensor.dtype} {list(tensor.shape)}"
            )
        self._emit(tensor_bytes(tensor))
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if self._next != len(self.entries):
                    raise ValueError(
                        f"{self.path.name}: {len(self.entries) - self._next} tensors were never written"
                    )
                try:
                    self._file.flush()
                    os.fsync(self._file.fileno())  # data on disk before the name says "finished"
                except OSError as e:
                    raise output_error(self.path, e, self.size - self.nbytes) from e
        except BaseException:
            self._file.close()
            self.tmp.unlink(missing_ok=True)
            raise
        self._file.close()
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        self.sha256 = self._hash.hexdigest()
        os.replace(self.tmp, self.path)


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """`safetensors.torch.save_file`, streamed and without numpy: one file, written atomically."""
    entries = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with ShardWriter(Path(path), entries, metadata) as writer:
        for name, t in tensors.items():
            writer.write(name, t)
