"""Lazy tensors with slice pushdown: the engine under every conversion.

A target tensor is an expression over source tensors. Reading a box of it
(one contiguous [start, stop) range per dim) pushes the box back through the
ops to the smallest boxes of the sources, which are read with `os.preadv`.
So a rank reads only its own bytes and no full model or full fused tensor is
ever built.

    >>> t = Stack([a, b], dim=0)          # a, b: SourceTensor [I, H]
    >>> t.read(((1, 2), (0, 4), (0, H)))  # reads rows 0-3 of b only

`segments(box)` is the same pushdown for writing: the box's bytes, in order, as
file spans wherever they are a verbatim copy of the source (stacking experts,
concatenating gate and up, cutting rows) and as deferred reads only where torch
must compute them (a cast, a transpose, a column slice). Spans are copied from
file to file without ever being a tensor: the conversion engine (reshard.engine)
reads each into a reused buffer, writes it and hashes it. A deferred read is
computed by the I/O thread that writes it, so several are computed at once.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reshard.errors import SourceError
from reshard.file_blocks import pread_exactly
from reshard.placements import (
    Selection,
    boxes,
    count_row_major_boxes,
    row_major_boxes,
    selection_shape,
    split_box,
    take_rows,
)

Box = tuple[tuple[int, int], ...]  # one [start, stop) per dim

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
# `convert --dtype` choices: the floating-point dtype every float tensor is cast to ("keep": none).
CAST_DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class LazyTensor:
    """A tensor known by shape and dtype, read box by box."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def read(self, box: Box) -> torch.Tensor:
        raise NotImplementedError

    def children(self) -> Sequence[LazyTensor]:
        return ()

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def full_box(self) -> Box:
        return tuple((0, s) for s in self.shape)

    def segments(self, box: Box) -> Iterator[Segment]:
        """The bytes of `box` in row-major order: by default, the box computed as one tensor."""
        yield deferred_read(self, box)

    def materialize(self) -> torch.Tensor:
        """The whole tensor; for tests and small tensors only."""
        return self.read(self.full_box())

    def leaves(self) -> Iterator[SourceTensor]:
        for child in self.children():
            yield from child.leaves()


@dataclass(frozen=True)
class FileSpan:
    """`nbytes` bytes of a source file from `offset`: output bytes that are copied verbatim."""

    path: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Computed:
    """Output bytes that torch computes (`compute()` gives a tensor of `shape` and `dtype`).

    Left to whoever writes them: in the conversion engine, an I/O thread, so the file's own
    thread only lists segments and hashes, and the reads and copies of several segments run
    at once (torch ops and preadv release the GIL).
    """

    compute: Callable[[], torch.Tensor]
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def tensor(self) -> torch.Tensor:
        """The computed tensor, checked against the promised shape and dtype (the writer has
        already placed the bytes that follow it)."""
        t = self.compute()
        if tuple(t.shape) != self.shape or t.dtype != self.dtype:
            raise ValueError(
                f"a computed segment gave {t.dtype} {list(t.shape)}, "
                f"expected {self.dtype} {list(self.shape)}"
            )
        return t


def deferred_read(tensor: LazyTensor, box: Box) -> Computed:
    """`tensor.read(box)`, to be done by whoever writes the bytes."""
    return Computed(functools.partial(tensor.read, box), tuple(b - a for a, b in box), tensor.dtype)


# What `LazyTensor.segments` yields: bytes to copy from a file, or bytes torch computes.
Segment = FileSpan | Computed

# Covering reads of column slices kept for the other TP ranks (bytes): each is dropped once
# every rank has taken its slice; past this, the least recently used. The conversion engine,
# which reads for many ranks at once, keeps more (reshard.engine.SHARED_SPANS).
SPAN_CACHE = 16 << 20

# A contiguous run of a box shorter than this is read with its neighbours by `read` (one
# covering read, then torch picks the elements) instead of as a FileSpan of its own.
MIN_SPAN = 64 << 10


@dataclass
class SliceReader:
    """Reads byte ranges of safetensors files with `os.preadv` and counts the bytes asked for.

    No file is mapped, so nothing read stays resident after the tensor that holds it is
    dropped, and a file truncated while we read is a short read (a clear error), not a
    SIGBUS. Safe to use from several threads.
    """

    bytes_read: dict[str, int] = field(default_factory=dict)
    span_cache: int = SPAN_CACHE  # bytes of covering reads kept for other ranks
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _offsets: dict[str, dict[str, int]] = field(default_factory=dict, repr=False)
    _spans: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _cached: int = 0

    def locate(self, path: str, name: str) -> int:
        """Where tensor `name`'s data starts in file `path` (its header is read once)."""
        from reshard.safetensors_header import read_header

        with self._lock:
            if path not in self._offsets:
                header = read_header(Path(path))
                self._offsets[path] = {
                    n: header.data_start + info.start for n, info in header.tensors.items()
                }
            if name not in self._offsets[path]:
                raise SourceError(f"{path}: has no tensor {name}")
            return self._offsets[path][name]

    def count(self, path: str, nbytes: int) -> None:
        with self._lock:
            self.bytes_read[path] = self.bytes_read.get(path, 0) + nbytes

    def read_into(self, path: str, offset: int, buffer: memoryview, what: str) -> None:
        """Fill `buffer` with the file's bytes from `offset`."""
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                pread_exactly(fd, buffer, offset)
            finally:
                os.close(fd)
        except OSError as e:
            # Headers were checked when the source was opened: the file changed since.
            raise SourceError(
                f"{path}: cannot read {what} ({e.strerror or e}); "
                "was the file changed while reading?"
            ) from e

    def read(self, path: str, name: str, box: Box, *, tensor: SourceTensor) -> torch.Tensor:
        """Read `box` of stored tensor `tensor`: one read covering it, then the box's elements."""
        strides = row_major_strides(tensor.shape)
        first = sum(a * s for (a, _), s in zip(box, strides))
        last = sum((b - 1) * s for (_, b), s in zip(box, strides))
        shape = [b - a for a, b in box]
        item = tensor.dtype.itemsize
        self.count(path, math.prod(shape) * item)
        if last - first + 1 == math.prod(shape):  # the box is one contiguous run
            span = torch.empty(last - first + 1, dtype=tensor.dtype)
            self.read_into(path, tensor.offset + first * item, _bytes_of(span), f"tensor {name}")
            return span.view(shape)
        # A column slice: the TP ranks written at the same time each need other columns of
        # the same rows. The covering read is widened to whole rows (of the last dim), so it
        # is the same read for every rank, shared through a small cache: as many ranks as
        # there are slices of this width in a row will ask for it.
        row = tensor.shape[-1]
        start, end = first - first % row, last + row - last % row
        takers = max(1, row // shape[-1])
        span = self._covering(
            path, name, tensor.offset + start * item, end - start, tensor.dtype, takers
        )
        return span.as_strided(shape, strides, first - start).contiguous()

    def _covering(
        self, path: str, name: str, offset: int, count: int, dtype: torch.dtype, takers: int
    ) -> torch.Tensor:
        """`count` elements from `offset`, read once for every thread that asks while they are
        cached or being read: a rank asking for rows another rank is reading waits for them.
        Kept until `takers` have asked, or, past `span_cache` bytes, the least recently used
        goes (a rank that asks later reads them again)."""
        key = (path, offset, count)
        nbytes = count * dtype.itemsize
        future: Future | None = None
        with self._lock:
            entry = self._spans.get(key)
            if entry is not None:
                entry[2] -= 1
                if entry[2] == 0:  # the last rank that needs them
                    self._cached -= self._spans.pop(key)[1]
                else:
                    self._spans.move_to_end(key)
            elif takers > 1 and nbytes <= self.span_cache // 4:
                future = Future()
                self._spans[key] = [future, nbytes, takers - 1]
                self._cached += nbytes
                while self._cached > self.span_cache:  # least recently used out
                    _, (_, dropped, _) = self._spans.popitem(last=False)
                    self._cached -= dropped
        if entry is not None:
            return entry[0].result()
        span = torch.empty(count, dtype=dtype)
        try:
            self.read_into(path, offset, _bytes_of(span), f"tensor {name}")
        except BaseException as e:
            if future is not None:
                with self._lock:  # not kept: the next asker reads again
                    if self._spans.get(key, (None,))[0] is future:
                        self._cached -= self._spans.pop(key)[1]
                future.set_exception(e)
            raise
        if future is not None:
            future.set_result(span)
        return span


def row_major_strides(shape: Sequence[int]) -> list[int]:
    """Elements between neighbours along each dim of a contiguous tensor of `shape`."""
    strides, n = [], 1
    for s in reversed(shape):
        strides.append(n)
        n *= s
    return strides[::-1]


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    from reshard.writer import tensor_bytes

    return tensor_bytes(tensor)


@dataclass(eq=False)
class SourceTensor(LazyTensor):
    """A tensor stored in a safetensors file; the leaf of every expression.

    `offset`: where its data starts in the file; read from the file's header when not given.
    """

    path: str
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    reader: SliceReader
    offset: int | None = None

    def _locate(self) -> int:
        if self.offset is None:
            self.offset = self.reader.locate(self.path, self.name)
        return self.offset

    def read(self, box: Box) -> torch.Tensor:
        if any(a >= b for a, b in box):
            return torch.empty([b - a for a, b in box], dtype=self.dtype)
        self._locate()
        return self.reader.read(self.path, self.name, box, tensor=self)

    def segments(self, box: Box) -> Iterator[Segment]:
        """The box as file spans, one per contiguous run, when the runs are long enough."""
        if any(a >= b for a, b in box):
            return
        shape, strides = self.shape, row_major_strides(self.shape)
        item = self.dtype.itemsize
        # k: the last dim the box does not cover whole; a run spans dims k.. in full.
        k = max((d for d, (a, b) in enumerate(box) if (a, b) != (0, shape[d])), default=0)
        run = (box[k][1] - box[k][0]) * strides[k] * item
        outer = box[:k]
        if run < MIN_SPAN and math.prod(b - a for a, b in outer) > 1:
            yield deferred_read(self, box)
            return
        base = self._locate() + box[k][0] * strides[k] * item
        spans: list[FileSpan] = []
        for index in itertools.product(*(range(a, b) for a, b in outer)):
            offset = base + sum(i * s for i, s in zip(index, strides)) * item
            if spans and spans[-1].offset + spans[-1].nbytes == offset:
                spans[-1] = FileSpan(self.path, spans[-1].offset, spans[-1].nbytes + run)
            else:
                spans.append(FileSpan(self.path, offset, run))
        yield from spans

    def leaves(self) -> Iterator[SourceTensor]:
        yield self

    def __repr__(self) -> str:
        return f"SourceTensor({Path(self.path).name}:{self.name}, {list(self.shape)})"


class InMemoryTensor(LazyTensor):
    """A tensor already in memory, as a leaf (tests, freshly trained weights)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.shape, self.dtype = tensor, tuple(tensor.shape), tensor.dtype

    def read(self, box: Box) -> torch.Tensor:
        return self.tensor[tuple(slice(a, b) for a, b in box)]


def _shift(box: Box, dim: int, start: int, stop: int) -> Box:
    return box[:dim] + ((start, stop),) + box[dim + 1 :]


def _per_leading_index(tensor: LazyTensor, box: Box, dim: int) -> Iterator[Segment]:
    """`tensor.segments(box)` when the box is wider than 1 before `dim`: one box per index of
    those dims, in row-major order (each then has the pieces along `dim` one after the other);
    when that would be too many boxes, the box computed as one tensor."""
    if math.prod(b - a for a, b in box[:dim]) > MAX_BOXES:
        yield deferred_read(tensor, box)
        return
    for index in itertools.product(*(range(a, b) for a, b in box[:dim])):
        yield from tensor.segments(tuple((i, i + 1) for i in index) + box[dim:])


def _leading_unit(box: Box, dim: int) -> bool:
    """True when the box has extent 1 in every dim before `dim`: then its row-major bytes are
    its pieces along `dim`, one after the other."""
    return all(b - a == 1 for a, b in box[:dim])


class Stack(LazyTensor):
    """`torch.stack(children, dim)`: equal-shaped tensors along a new dim."""

    def __init__(self, parts: Sequence[LazyTensor], dim: int = 0):
        shapes = {p.shape for p in parts}
        if len(shapes) != 1:
            raise SourceError(f"cannot stack tensors of different shapes {sorted(shapes)}: {parts}")
        self.parts, self.dim = list(parts), dim
        inner = parts[0].shape
        self.shape = inner[:dim] + (len(parts),) + inner[dim:]
        self.dtype = parts[0].dtype

    def children(self) -> Sequence[LazyTensor]:
        return self.parts

    def read(self, box: Box) -> torch.Tensor:
        inner = box[: self.dim] + box[self.dim + 1 :]
        lo, hi = box[self.dim]
        pieces = [self.parts[i].read(inner) for i in range(lo, hi)]
        if not pieces:
            return torch.empty([b - a for a, b in box], dtype=self.dtype)
        return torch.stack(pieces, dim=self.dim)

    def segments(self, box: Box) -> Iterator[Segment]:
        if not _leading_unit(box, self.dim):
            yield from _per_leading_index(self, box, self.dim)
            return
        inner = box[: self.dim] + box[self.dim + 1 :]
        for i in range(*box[self.dim]):
            yield from self.parts[i].segments(inner)


class Cat(LazyTensor):
    """`torch.cat(children, dim)`."""

    def __init__(self, parts: Sequence[LazyTensor], dim: int):
        self.parts, self.dim = list(parts), dim
        first = parts[0].shape
        for p in parts:
            if p.shape[:dim] + p.shape[dim + 1 :] != first[:dim] + first[dim + 1 :]:
                raise SourceError(f"cannot concatenate {parts} along dim {dim}")
        self.shape = first[:dim] + (sum(p.shape[dim] for p in parts),) + first[dim + 1 :]
        self.dtype = parts[0].dtype

    def children(self) -> Sequence[LazyTensor]:
        return self.parts

    def read(self, box: Box) -> torch.Tensor:
        lo, hi = box[self.dim]
        pieces, offset = [], 0
        for part in self.parts:
            size = part.shape[self.dim]
            a, b = max(lo, offset), min(hi, offset + size)
            if a < b:
                pieces.append(part.read(_shift(box, self.dim, a - offset, b - offset)))
            offset += size
        if not pieces:
            return torch.empty([b - a for a, b in box], dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=self.dim)

    def segments(self, box: Box) -> Iterator[Segment]:
        if not _leading_unit(box, self.dim):
            yield from _per_leading_index(self, box, self.dim)
            return
        lo, hi = box[self.dim]
        offset = 0
        for part in self.parts:
            size = part.shape[self.dim]
            a, b = max(lo, offset), min(hi, offset + size)
            if a < b:
                yield from part.segments(_shift(box, self.dim, a - offset, b - offset))
            offset += size


class Narrow(LazyTensor):
    """`child.narrow(dim, start, length)`, optionally dropping a size-1 dim (select)."""

    def __init__(self, child: LazyTensor, dim: int, start: int, length: int, squeeze: bool = False):
        self.child, self.dim, self.start, self.squeeze = child, dim, start, squeeze
        if start + length > child.shape[dim]:
            raise SourceError(f"cannot take [{start}, {start + length}) of dim {dim} of {child}")
        shape = child.shape[:dim] + (length,) + child.shape[dim + 1 :]
        if squeeze:
            shape = shape[:dim] + shape[dim + 1 :]
        self.shape, self.dtype = shape, child.dtype

    def children(self) -> Sequence[LazyTensor]:
        return (self.child,)

    def read(self, box: Box) -> torch.Tensor:
        if self.squeeze:
            inner = box[: self.dim] + ((self.start, self.start + 1),) + box[self.dim :]
            return self.child.read(inner).squeeze(self.dim)
        lo, hi = box[self.dim]
        return self.child.read(_shift(box, self.dim, self.start + lo, self.start + hi))

    def segments(self, box: Box) -> Iterator[Segment]:
        if self.squeeze:  # a size-1 dim does not change the row-major order
            yield from self.child.segments(
                box[: self.dim] + ((self.start, self.start + 1),) + box[self.dim :]
            )
            return
        lo, hi = box[self.dim]
        yield from self.child.segments(_shift(box, self.dim, self.start + lo, self.start + hi))


class Transpose(LazyTensor):
    """`child.transpose(dim0, dim1)`; the box is transposed and pushed down."""

    def __init__(self, child: LazyTensor, dim0: int, dim1: int):
        self.child = child
        self.dim0, self.dim1 = dim0 % child.ndim, dim1 % child.ndim
        shape = list(child.shape)
        shape[self.dim0], shape[self.dim1] = shape[self.dim1], shape[self.dim0]
        self.shape, self.dtype = tuple(shape), child.dtype

    def children(self) -> Sequence[LazyTensor]:
        return (self.child,)

    def read(self, box: Box) -> torch.Tensor:
        inner = list(box)
        inner[self.dim0], inner[self.dim1] = inner[self.dim1], inner[self.dim0]
        return self.child.read(tuple(inner)).transpose(self.dim0, self.dim1).contiguous()


class Interleave(LazyTensor):
    """Alternate the parts along `dim`: out[k*j + c] = parts[c][j] (GPT-OSS gate/up)."""

    def __init__(self, parts: Sequence[LazyTensor], dim: int):
        self.parts, self.dim = list(parts), dim
        k, first = len(parts), parts[0].shape
        if any(p.shape != first for p in parts):
            raise SourceError(f"cannot interleave tensors of different shapes: {parts}")
        self.shape = first[:dim] + (first[dim] * k,) + first[dim + 1 :]
        self.dtype = parts[0].dtype

    def children(self) -> Sequence[LazyTensor]:
        return self.parts

    def read(self, box: Box) -> torch.Tensor:
        k, (lo, hi) = len(self.parts), box[self.dim]
        j0, j1 = lo // k, -(-hi // k)  # the part rows that cover [lo, hi)
        pieces = [p.read(_shift(box, self.dim, j0, j1)) for p in self.parts]
        woven = torch.stack(pieces, dim=self.dim + 1).flatten(self.dim, self.dim + 1)
        return woven.narrow(self.dim, lo - j0 * k, hi - lo)


class Deinterleave(LazyTensor):
    """Every k-th row of `child` along `dim`, starting at `offset` (inverse of Interleave)."""

    def __init__(self, child: LazyTensor, dim: int, k: int, offset: int):
        if child.shape[dim] % k:
            raise SourceError(f"dim {dim} of {child} does not split into {k} interleaved parts")
        self.child, self.dim, self.k, self.offset = child, dim, k, offset
        self.shape = child.shape[:dim] + (child.shape[dim] // k,) + child.shape[dim + 1 :]
        self.dtype = child.dtype

    def children(self) -> Sequence[LazyTensor]:
        return (self.child,)

    def read(self, box: Box) -> torch.Tensor:
        lo, hi = box[self.dim]
        if lo >= hi:
            return torch.empty([b - a for a, b in box], dtype=self.dtype)
        # One contiguous read covering the rows we keep; the others are dropped.
        rows = self.child.read(
            _shift(box, self.dim, lo * self.k + self.offset, (hi - 1) * self.k + self.offset + 1)
        )
        index = torch.arange(0, rows.shape[self.dim], self.k)
        return rows.index_select(self.dim, index)


class RepeatBlocks(LazyTensor):
    """Repeat each block of `block` rows along `dim` `repeats` times (KV heads for tp > kv heads)."""

    def __init__(self, child: LazyTensor, dim: int, block: int, repeats: int):
        self.child, self.dim, self.block, self.repeats = child, dim, block, repeats
        self.shape = child.shape[:dim] + (child.shape[dim] * repeats,) + child.shape[dim + 1 :]
        self.dtype = child.dtype

    def children(self) -> Sequence[LazyTensor]:
        return (self.child,)

    def read(self, box: Box) -> torch.Tensor:
        lo, hi = box[self.dim]
        pieces, i = [], lo
        while i < hi:
            out_block, within = divmod(i, self.block)
            stop = min(hi, (out_block + 1) * self.block)
            src = (out_block // self.repeats) * self.block + within
            pieces.append(self.child.read(_shift(box, self.dim, src, src + stop - i)))
            i = stop
        if not pieces:
            return torch.empty([b - a for a, b in box], dtype=self.dtype)
        return torch.cat(pieces, dim=self.dim)

    def segments(self, box: Box) -> Iterator[Segment]:
        if not _leading_unit(box, self.dim):
            yield from _per_leading_index(self, box, self.dim)
            return
        lo, hi = box[self.dim]
        i = lo
        while i < hi:
            out_block, within = divmod(i, self.block)
            stop = min(hi, (out_block + 1) * self.block)
            src = (out_block // self.repeats) * self.block + within
            yield from self.child.segments(_shift(box, self.dim, src, src + stop - i))
            i = stop


class Assembled(LazyTensor):
    """A global tensor stored as pieces in several files (a sharded checkpoint's rank files).

    `pieces`: (global box, the leaf holding exactly that box). Together they must cover the
    tensor once; a read takes from each piece only the part inside the box asked for.
    """

    def __init__(
        self, shape: tuple[int, ...], dtype: torch.dtype, pieces: Sequence[tuple[Box, LazyTensor]]
    ):
        self.shape, self.dtype, self.pieces = tuple(shape), dtype, list(pieces)
        covered = sum(math.prod(b - a for a, b in box) for box, _ in self.pieces)
        if covered != math.prod(self.shape):
            raise SourceError(
                f"pieces cover {covered:,} of the {math.prod(self.shape):,} elements of a "
                f"{list(self.shape)} tensor"
            )

    def children(self) -> Sequence[LazyTensor]:
        return [leaf for _, leaf in self.pieces]

    def read(self, box: Box) -> torch.Tensor:
        out = torch.empty([b - a for a, b in box], dtype=self.dtype)
        for piece, leaf in self.pieces:
            inside = [(max(a, pa), min(b, pb)) for (a, b), (pa, pb) in zip(box, piece)]
            if any(a >= b for a, b in inside):
                continue
            local = tuple((a - pa, b - pa) for (a, b), (pa, _) in zip(inside, piece))
            into = tuple(slice(a - ba, b - ba) for (a, b), (ba, _) in zip(inside, box))
            out[into] = leaf.read(local)
        return out


class Cast(LazyTensor):
    """`child.to(dtype)`, applied per box so no full copy is made."""

    def __init__(self, child: LazyTensor, dtype: torch.dtype):
        self.child, self.shape, self.dtype = child, child.shape, dtype

    def children(self) -> Sequence[LazyTensor]:
        return (self.child,)

    def read(self, box: Box) -> torch.Tensor:
        return self.child.read(box).to(self.dtype)


class Dequant(LazyTensor):
    """A block-scaled FP8 weight in `dtype`: `weight[i] * scale[i // blocks]`, per dim.

    `blocks[d]` is how many consecutive indices of dim d share one scale entry (1 for
    leading dims such as experts); the scale has `ceil(size / block)` entries per dim, so
    a last, partial block has a scale of its own. A box is pushed down as the same box
    of the weight and the covering box of the scale: a rank reads only its blocks. The
    product is taken in fp32 and then cast, as transformers' `Fp8Dequantize` does, so the
    two agree bit for bit.
    """

    def __init__(
        self, weight: LazyTensor, scale: LazyTensor, blocks: Sequence[int], dtype: torch.dtype
    ):
        want = tuple(-(-s // b) for s, b in zip(weight.shape, blocks))
        if len(blocks) != weight.ndim or tuple(scale.shape) != want:
            raise SourceError(
                f"scale {list(scale.shape)} does not cover weight {list(weight.shape)} in blocks "
                f"{list(blocks)} (expected {list(want)})"
            )
        self.weight, self.scale, self.blocks = weight, scale, tuple(blocks)
        self.shape, self.dtype = weight.shape, dtype

    def children(self) -> Sequence[LazyTensor]:
        return (self.weight, self.scale)

    def read(self, box: Box) -> torch.Tensor:
        w = self.weight.read(box)
        if w.numel() == 0:
            return torch.empty(w.shape, dtype=self.dtype)
        covering = tuple((a // b, -(-e // b)) for (a, e), b in zip(box, self.blocks))
        s = self.scale.read(covering).float()
        # Multiply in place through a view of whole blocks where the box is block-aligned
        # (one scale broadcast over each block), expanding the scale only along dims where
        # it is not: a weight-sized fp32 temporary once, not three times.
        out_view, scale_view = [], []
        for d, ((a, e), b, (c, _)) in enumerate(zip(box, self.blocks, covering)):
            if a % b == 0 and (e - a) % b == 0:
                out_view += [(e - a) // b, b]
                scale_view += [(e - a) // b, 1]
            else:  # one scale per block -> one per index, then the box's own indices
                s = s.repeat_interleave(b, dim=d).narrow(d, a - c * b, e - a)
                out_view += [1, e - a]
                scale_view += [1, e - a]
        out = w.float()
        out.view(out_view).mul_(s.reshape(scale_view))
        return out.to(self.dtype)


def read_selection(tensor: LazyTensor, selection: Selection) -> torch.Tensor:
    """Read the product of per-dim index ranges (a strided shard is several boxes).

    Boxes are read one at a time into the preallocated result, so the peak is
    the shard plus one box, not twice the shard.
    """
    pieces = list(boxes(selection))
    if len(pieces) == 1:
        ((g, _),) = pieces
        return tensor.read(tuple((sl.start, sl.stop) for sl in g))
    out = torch.empty(selection_shape(selection), dtype=tensor.dtype)
    for g, loc in pieces:
        out[loc] = tensor.read(tuple((sl.start, sl.stop) for sl in g))
    return out


def selection_segments(
    tensor: LazyTensor, selection: Selection, chunk_bytes: int = 4 << 20
) -> Iterator[Segment]:
    """The local tensor at `selection`, as segments in its row-major byte order.

    Each segment holds at most about `chunk_bytes`, so whoever consumes them
    holds a bounded amount at a time.
    """
    for piece in _pieces(tensor, selection, chunk_bytes):
        if isinstance(piece, tuple):
            yield from tensor.segments(piece)
        else:
            shape = tuple(selection_shape(piece))
            yield Computed(functools.partial(read_selection, tensor, piece), shape, tensor.dtype)


def selection_chunks(
    tensor: LazyTensor, selection: Selection, chunk_bytes: int = 4 << 20
) -> Iterator[torch.Tensor]:
    """The same bytes as `selection_segments`, each piece computed by `read` (no file spans):
    the simple path, which `reshard verify --against` checks the written files with."""
    for piece in _pieces(tensor, selection, chunk_bytes):
        yield tensor.read(piece) if isinstance(piece, tuple) else read_selection(tensor, piece)


def _pieces(
    tensor: LazyTensor, selection: Selection, chunk_bytes: int
) -> Iterator[Box | Selection]:
    """The selection cut into row-major pieces of about `chunk_bytes`: boxes, or, when a strided
    shard of a late dim would take too many boxes, slabs of whole local rows (sub-selections)
    that torch gathers in one read."""
    item = tensor.dtype.itemsize
    if count_row_major_boxes(selection) <= MAX_BOXES:
        for box in row_major_boxes(selection):
            yield from split_box(box, item, chunk_bytes)
        return
    shape = selection_shape(selection)
    per = max(1, chunk_bytes // max(1, item * math.prod(shape[1:])))
    for start in range(0, shape[0], per):
        yield take_rows(selection, start, min(shape[0], start + per))


MAX_BOXES = 1 << 14
