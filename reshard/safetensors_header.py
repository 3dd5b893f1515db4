"""One strict reader of a safetensors header, for sources and rank files alike.

Reads the 8-byte length and the JSON header only (never tensor data, never
pickle) and checks everything `safetensors` would (so whatever it accepts,
`safe_open` accepts too), and what it reports badly,
so a damaged file is one line that names the file and exactly what is wrong:

    >>> header = read_header(Path("model-00001-of-00002.safetensors"))
    >>> header.tensors["model.norm.weight"]
    TensorInfo(dtype=torch.bfloat16, shape=(2048,), start=0, stop=4096)
    >>> read_header(Path("pointer.safetensors"))
    SourceError: pointer.safetensors: a git-lfs pointer, not the weights (run `git lfs pull`)
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from reshard.converters.lazy import SAFETENSORS_DTYPES
from reshard.errors import ReshardError, SourceError

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_LFS_POINTER = b"version https://git-lfs"
_USIZE_MAX = 2**64 - 1  # safetensors parses shapes and offsets as Rust usize
_INT64_MAX = 2**63 - 1  # torch's sizes are int64


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offsets into the data section, [start, stop)
    stop: int


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]  # in file order
    metadata: dict[str, str]
    data_start: int  # file offset of the data section


class _Bad(Exception):
    """What is wrong, without the file name (added once, by read_header)."""


def shown(text: object, limit: int = 60) -> str:
    """`text` as it can go into a one-line message: escaped if not printable, cut to `limit`.

    >>> shown("model.norm.weight"), shown("a\\nb")
    ('model.norm.weight', "'a\\\\nb'")
    """
    text = str(text)
    if text and text.isprintable() and len(text) <= limit:
        return text
    return ascii(text[:limit]) + ("..." if len(text) > limit else "")


def read_header(path: Path, *, error: type[ReshardError] = SourceError) -> Header:
    """Parse and check the header of safetensors file `path`; raise `error` naming what is wrong.

    Args:
        path: the file.
        error: the tool's error type to raise (SourceError for sources,
            CheckpointError for rank files).

    Returns:
        The tensors (dtype, shape, byte range in the data section) in file order,
        the `__metadata__` strings, and where the data section starts.
    """
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            head = f.read(8)
            if head.startswith(_LFS_POINTER[:8]) and f.read(64).startswith(_LFS_POINTER[8:]):
                raise _Bad("a git-lfs pointer, not the weights (run `git lfs pull`)")
            if len(head) < 8:
                raise _Bad(f"{size} bytes, too short for a safetensors file (truncated?)")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES:
                raise _Bad(f"header length {length:,} is larger than safetensors allows")
            if 8 + length > size:
                raise _Bad(f"header length {length:,} runs past the end of the {size:,}-byte file")
            raw = f.read(length)
        return _parse(raw, 8 + length, size)
    except _Bad as e:
        raise error(f"{path}: {e}") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from e


def _utf8(text: str) -> bool:
    """False for strings with lone surrogates (JSON allows the escape, safetensors does not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_object(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if not _utf8(key):
            raise _Bad(f"header key {shown(key)} is not valid UTF-8")
        if key in seen:
            raise _Bad(f"header names {shown(key)} twice")
        seen[key] = value
    return seen


def _json_int(text: str) -> int | float:
    # serde_json reads -0 and integers past u64 as floats, which safetensors refuses: so do we.
    value = int(text)
    return value if text != "-0" and value <= _USIZE_MAX else float(text)


def _parse(raw: bytes, data_start: int, size: int) -> Header:
    try:
        header = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_json_object, parse_int=_json_int
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _Bad(f"header is not valid JSON ({shown(e, 80)})") from None
    if not isinstance(header, dict):
        raise _Bad(f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(v, str) and _utf8(v) for v in metadata.values()
    ):
        raise _Bad("__metadata__ must map strings to strings")
    tensors = {name: _tensor(name, entry) for name, entry in header.items()}
    _check_extents(tensors, data_start, size)
    return Header(tensors=tensors, metadata=metadata, data_start=data_start)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor(name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _Bad(f"tensor {shown(name)}: entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise _Bad(
            f"tensor {shown(name)} has dtype {shown(dtype, 20)}, which reshard does not support "
            f"(supported: {', '.join(SAFETENSORS_DTYPES)})"
        )
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise _Bad(f"tensor {shown(name)}: shape {shown(shape)} is not a list of non-negative ints")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _Bad(f"tensor {shown(name)}: data_offsets {shown(offsets)} are not [start, stop]")
    if any(s > _INT64_MAX for s in shape):
        # safetensors accepts a zero-size tensor with such a dim, but torch cannot make it.
        raise _Bad(f"tensor {shown(name)}: shape {shown(shape)} has a dim beyond torch's int64")
    nbytes = SAFETENSORS_DTYPES[dtype].itemsize
    for s in shape:  # in order, overflowing as safetensors' checked product does
        nbytes *= s
        if nbytes > _USIZE_MAX:
            raise _Bad(f"tensor {shown(name)}: shape {shown(shape)} overflows 64 bits")
    if offsets[1] - offsets[0] != nbytes:
        raise _Bad(
            f"tensor {shown(name)}: dtype/shape say {nbytes:,} bytes "
            f"({dtype} {shown(shape)}), data_offsets say {offsets[1] - offsets[0]:,}"
        )
    return TensorInfo(SAFETENSORS_DTYPES[dtype], tuple(shape), offsets[0], offsets[1])


def _check_extents(tensors: dict[str, TensorInfo], data_start: int, size: int) -> None:
    """The tensors tile the data section exactly, in offset order, as safetensors requires."""
    needed = data_start + max((t.stop for t in tensors.values()), default=0)
    if needed > size:
        raise _Bad(
            f"the header needs {needed:,} bytes but the file has {size:,} (truncated download?)"
        )
    end, previous = 0, None
    for name, t in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].stop)):
        if t.start < end:
            raise _Bad(f"tensors {shown(previous)} and {shown(name)} overlap")
        if t.start > end:
            raise _Bad(f"{t.start - end:,} bytes before tensor {shown(name)} belong to no tensor")
        end, previous = t.stop, name
    if end != size - data_start:
        raise _Bad(f"{size - data_start - end:,} bytes after the last tensor belong to no tensor")
