"""Placements and the exact index math of PyTorch DTensor, without a process group.

A placement says how one mesh dim splits a tensor. The math here reproduces
`distribute_tensor(t, mesh, placements).to_local()` for every rank:

- `Shard(d)`: torch.chunk semantics. chunk = ceil(S / n); rank r gets
  `[r * chunk, min(S, (r + 1) * chunk))`, possibly empty (S=10, n=4 -> 3,3,3,1).
- `StridedShard(d, k)` (DTensor's `_StridedShard(d, split_factor=k)`): view dim d
  as k equal blocks, chunk each block n ways, rank r takes piece r of every block.
  For a fused gate_up `[E, 2I, H]` with k=2 that is `[gate_r; up_r]`.
- Several mesh dims on the same tensor dim compose outer to inner: the inner
  placement splits what the outer one left.

A rank's part of one tensor dim is an ordered list of index ranges (`Ranges`);
the part of the tensor is their product (`Selection`).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

from reshard.errors import LayoutError

Ranges = list[tuple[int, int]]  # ordered, half-open [start, stop) intervals on one dim
Selection = list[Ranges]  # one Ranges per tensor dim


@dataclass(frozen=True)
class Replicate:
    def __str__(self) -> str:
        return "Replicate()"


@dataclass(frozen=True)
class Shard:
    dim: int

    def __str__(self) -> str:
        return f"Shard({self.dim})"


@dataclass(frozen=True)
class StridedShard:
    dim: int
    split_factor: int

    def __str__(self) -> str:
        return f"_StridedShard({self.dim}, split_factor={self.split_factor})"


Placement = Replicate | Shard | StridedShard

_PATTERNS = [
    (re.compile(r"^Replicate\(\)$"), lambda m: Replicate()),
    (re.compile(r"^Shard\((-?\d+)\)$"), lambda m: Shard(int(m[1]))),
    (
        re.compile(r"^_StridedShard\((-?\d+), split_factor=(\d+)\)$"),
        lambda m: StridedShard(int(m[1]), int(m[2])),
    ),
]


def parse_placement(text: str) -> Placement:
    """Inverse of `str(placement)`: `parse_placement("Shard(0)") == Shard(0)`."""
    for pattern, build in _PATTERNS:
        match = pattern.match(text.strip())
        if match:
            return build(match)
    raise ValueError(f"unknown placement {text!r}")


def normalize(placement: Placement, ndim: int) -> Placement:
    """Resolve a negative tensor dim against `ndim` (`Shard(-1)` of a 3-D tensor is `Shard(2)`)."""
    if isinstance(placement, Replicate):
        return placement
    dim = placement.dim + ndim if placement.dim < 0 else placement.dim
    if not 0 <= dim < ndim:
        raise ValueError(f"{placement} does not fit a {ndim}-D tensor")
    if isinstance(placement, Shard):
        return Shard(dim)
    return StridedShard(dim, placement.split_factor)


def to_torch(placement: Placement):
    """The torch.distributed.tensor placement object for `placement`."""
    from torch.distributed.tensor import Replicate as TReplicate
    from torch.distributed.tensor import Shard as TShard
    from torch.distributed.tensor.placement_types import _StridedShard

    if isinstance(placement, Shard):
        return TShard(placement.dim)
    if isinstance(placement, StridedShard):
        return _StridedShard(placement.dim, split_factor=placement.split_factor)
    return TReplicate()


def _take(ranges: Ranges, start: int, stop: int) -> Ranges:
    """Positions [start, stop) of the index list that `ranges` spells out, as ranges."""
    out: Ranges = []
    offset = 0
    for lo, hi in ranges:
        length = hi - lo
        a, b = max(start, offset), min(stop, offset + length)
        if a < b:
            a, b = lo + a - offset, lo + b - offset
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], b)
            else:
                out.append((a, b))
        offset += length
    return out


def _length(ranges: Ranges) -> int:
    return sum(hi - lo for lo, hi in ranges)


def split_ranges(
    ranges: Ranges, placement: Placement, n: int, r: int, *, what: str = "tensor"
) -> Ranges:
    """Rank r's part (of n) of one tensor dim under `placement`."""
    size = _length(ranges)
    if isinstance(placement, Shard):
        chunk = -(-size // n)  # ceil in integers: exact for any size
        return _take(ranges, min(size, r * chunk), min(size, (r + 1) * chunk))
    if isinstance(placement, StridedShard):
        k = placement.split_factor
        if size % (k * n):
            # DTensor refuses uneven strided shards; so do we.
            raise LayoutError(
                f"{what}: dim {placement.dim} of size {size} cannot be split into "
                f"{k} blocks x {n} ranks evenly ({placement})"
            )
        block, piece = size // k, size // (k * n)
        out: Ranges = []
        for b in range(k):
            for lo, hi in _take(ranges, b * block + r * piece, b * block + (r + 1) * piece):
                if out and out[-1][1] == lo:
                    out[-1] = (out[-1][0], hi)
                else:
                    out.append((lo, hi))
        return out
    return ranges


def local_selection(
    shape: tuple[int, ...],
    placements: tuple[Placement, ...],
    mesh_shape: tuple[int, ...],
    coords: tuple[int, ...],
    *,
    what: str = "tensor",
) -> Selection:
    """The index ranges, per tensor dim, that the rank at `coords` holds.

    Args:
        shape: global tensor shape.
        placements: one placement per mesh dim, outer to inner.
        mesh_shape, coords: mesh sizes and this rank's coordinates, same order.
    Returns:
        One ordered list of [start, stop) ranges per tensor dim.

    >>> local_selection((10,), (Shard(0),), (4,), (3,))
    [[(9, 10)]]
    """
    selection: Selection = [[(0, s)] for s in shape]
    for placement, n, r in zip(placements, mesh_shape, coords):
        placement = normalize(placement, len(shape))
        if isinstance(placement, Replicate):
            continue
        selection[placement.dim] = split_ranges(
            selection[placement.dim], placement, n, r, what=what
        )
    return selection


def selection_shape(selection: Selection) -> tuple[int, ...]:
    return tuple(_length(ranges) for ranges in selection)


def boxes(selection: Selection) -> Iterator[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """The contiguous boxes of a selection: (slices into the global tensor, slices into the local one)."""
    per_dim = []
    for ranges in selection:
        pairs, offset = [], 0
        for a, b in ranges:
            pairs.append((slice(a, b), slice(offset, offset + b - a)))
            offset += b - a
        per_dim.append(pairs)
    for combo in itertools.product(*per_dim):
        yield tuple(g for g, _ in combo), tuple(loc for _, loc in combo)


def row_major_boxes(selection: Selection) -> Iterator[tuple[tuple[int, int], ...]]:
    """The selection as global boxes whose contents, one after the other, are the local
    tensor in row-major order.

    The last dim holding several ranges (a strided shard) is walked range by range, and
    every dim before it index by index; the dims after it are one range each.
    """
    split = [d for d, ranges in enumerate(selection) if len(ranges) > 1]
    if not split:
        yield tuple(ranges[0] for ranges in selection)
        return
    k = split[-1]
    outer = [[(i, i + 1) for a, b in ranges for i in range(a, b)] for ranges in selection[:k]]
    inner = tuple(ranges[0] for ranges in selection[k + 1 :])
    for head in itertools.product(*outer):
        for run in selection[k]:
            yield (*head, run, *inner)


def count_row_major_boxes(selection: Selection) -> int:
    """How many boxes `row_major_boxes` yields, without walking them."""
    split = [d for d, ranges in enumerate(selection) if len(ranges) > 1]
    if not split:
        return 1
    k = split[-1]
    return math.prod(_length(ranges) for ranges in selection[:k]) * len(selection[k])


def take_rows(selection: Selection, start: int, stop: int) -> Selection:
    """Local rows [start, stop) of the selection (positions along its first dim)."""
    return [_take(selection[0], start, stop), *selection[1:]]


def split_box(
    box: tuple[tuple[int, int], ...], itemsize: int, limit: int
) -> Iterator[tuple[tuple[int, int], ...]]:
    """`box` cut, in row-major order, into boxes of at most `limit` bytes where possible
    (along its first dim of extent > 1, and recursively when one slice of it is too big)."""
    extents = [b - a for a, b in box]
    d = next((i for i, e in enumerate(extents) if e > 1), None)
    nbytes = itemsize * math.prod(extents)
    if nbytes <= limit or d is None:
        yield box
        return
    step = max(1, nbytes // extents[d])  # bytes per index of dim d
    per = max(1, limit // step)
    a, b = box[d]
    for start in range(a, b, per):
        piece = box[:d] + ((start, min(b, start + per)),) + box[d + 1 :]
        if per == 1 and step > limit:
            yield from split_box(piece, itemsize, limit)
        else:
            yield piece
