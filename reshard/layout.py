"""Parallel layouts: `[dp<N>][ep<N>][tp<N>][-sp][-tp2ep]`.

Mesh dims are written outer to inner and ranks are numbered row-major over
them, so with `ep4tp4` ranks 0-3 form the first TP group (tp innermost keeps a
TP group on one node). A dim of size 1 is dropped from the mesh.

    >>> layout = Layout.parse("ep4tp4")
    >>> layout.world_size, layout.mesh_shape, layout.coords(5)
    (16, (4, 4), {'ep': 1, 'tp': 1})
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from reshard.errors import LayoutError

MESH_DIMS = ("dp", "ep", "tp")
FLAGS = ("sp", "tp2ep")
_GRAMMAR = re.compile(r"^((?:dp|ep|tp)\d+)+((?:-(?:sp|tp2ep))*)$")


@dataclass(frozen=True, kw_only=True)
class Layout:
    """A device mesh (named dims, outer to inner) plus the runtime flags."""

    dims: tuple[tuple[str, int], ...]
    sp: bool = False
    tp2ep: bool = False

    @classmethod
    def parse(cls, text: str) -> Layout:
        """Parse `ep4tp4-sp`-style text; raise LayoutError naming what is wrong."""
        text = text.strip().lower()
        if not _GRAMMAR.match(text):
            raise LayoutError(
                f"layout {text!r} does not parse: expected [dp<N>][ep<N>][tp<N>][-sp][-tp2ep], "
                "e.g. tp4, ep8, ep4tp4, tp4-tp2ep, tp2-sp"
            )
        if re.search(r"\d{7}", text):  # a mesh dim of a million ranks is a typo, not a layout
            raise LayoutError(f"layout {text[:40]!r}: a mesh dim size has too many digits")
        head, *flags = text.split("-")
        dims = [(name, int(size)) for name, size in re.findall(r"(dp|ep|tp)(\d+)", head)]
        names = [name for name, _ in dims]
        if len(set(names)) != len(names):
            raise LayoutError(f"layout {text!r} names a mesh dim twice")
        if names != sorted(names, key=MESH_DIMS.index):
            raise LayoutError(f"layout {text!r}: write mesh dims in the order dp, ep, tp")
        for name, size in dims:
            if size < 1:
                raise LayoutError(f"layout {text!r}: {name} must be >= 1, got {size}")
        if len(set(flags)) != len(flags):
            raise LayoutError(f"layout {text!r} repeats a flag")
        layout = cls(
            dims=tuple((n, s) for n, s in dims if s > 1),
            sp="sp" in flags,
            tp2ep="tp2ep" in flags,
        )
        if (layout.sp or layout.tp2ep) and layout.size("tp") == 1:
            raise LayoutError(f"layout {text!r}: -sp and -tp2ep need a tp dim of size > 1")
        return layout

    @property
    def name(self) -> str:
        """Canonical text form; `Layout.parse(layout.name) == layout`."""
        head = "".join(f"{n}{s}" for n, s in self.dims) or "tp1"
        flags = [f for f in FLAGS if getattr(self, f)]
        return "-".join([head, *flags])

    @property
    def mesh_dim_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.dims)

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        return tuple(s for _, s in self.dims)

    @property
    def world_size(self) -> int:
        size = 1
        for _, s in self.dims:
            size *= s
        return size

    def size(self, dim: str) -> int:
        """Size of mesh dim `dim` (1 when the layout does not have it)."""
        return dict(self.dims).get(dim, 1)

    @property
    def expert_dims(self) -> tuple[str, ...]:
        """Mesh dims that split the expert list (`Shard(0)` on expert tensors)."""
        dims = ["ep"] + (["tp"] if self.tp2ep else [])
        return tuple(d for d in dims if self.size(d) > 1)

    @property
    def expert_parallel_size(self) -> int:
        size = 1
        for d in self.expert_dims:
            size *= self.size(d)
        return size

    def coords(self, rank: int) -> dict[str, int]:
        """Row-major coordinates of `rank` on the mesh, by dim name."""
        if not 0 <= rank < self.world_size:
            raise LayoutError(
                f"rank {rank} out of range for layout {self.name} (world {self.world_size})"
            )
        coords = {}
        for name, size in reversed(self.dims):
            coords[name] = rank % size
            rank //= size
        return dict(reversed(list(coords.items())))

    def rank_of(self, coords: dict[str, int]) -> int:
        """Inverse of `coords`: the row-major rank at `coords` ({dim name: index})."""
        if set(coords) != set(self.mesh_dim_names):
            raise LayoutError(
                f"coordinates over {sorted(coords)} do not match layout {self.name}'s mesh dims "
                f"{list(self.mesh_dim_names)}"
            )
        rank = 0
        for name, size in self.dims:
            if not 0 <= coords[name] < size:
                raise LayoutError(f"{name} coordinate {coords[name]} out of range for size {size}")
            rank = rank * size + coords[name]
        return rank

    def __str__(self) -> str:
        return self.name
