"""The WeightConverter operations, in transformers v5's vocabulary.

An operation maps groups of lazy tensors to groups of lazy tensors. Groups
start as one list per source pattern (the matched module-list members, in
index order) and end as one list per target pattern. Every op has an inverse,
so a conversion read backwards exports the exact source tensors.

    MergeModulelist(dim=0)  [[g0, g1, ...], [u0, u1, ...]] -> [[G], [U]]   stack each list
    Concatenate(dim=1)      [[G], [U]]                     -> [[GU]]       one tensor
    Chunk(dim=1, chunks=2)  [[GU]]                         -> [[G], [U]]   inverse of Concatenate
    SplitModulelist(dim=0)  [[G], [U]]                     -> [[g0, ...], [u0, ...]]
"""

from __future__ import annotations

from dataclasses import dataclass

from reshard.converters import lazy
from reshard.converters.lazy import LazyTensor
from reshard.errors import ConversionError

Groups = list[list[LazyTensor]]


def _flat(groups: Groups) -> list[LazyTensor]:
    return [t for group in groups for t in group]


def _single(groups: Groups, op: object) -> LazyTensor:
    flat = _flat(groups)
    if len(flat) != 1:
        raise ConversionError(f"{op} takes one tensor, got {len(flat)}")
    return flat[0]


class ConversionOp:
    def apply(self, groups: Groups) -> Groups:
        raise NotImplementedError

    def inverse(self, n_groups: int) -> ConversionOp:
        """The op that undoes this one; `n_groups` is how many groups this op received."""
        raise NotImplementedError

    def out_groups(self, n_groups: int) -> int:
        """How many groups this op yields from `n_groups`."""
        return n_groups


@dataclass(frozen=True)
class MergeModulelist(ConversionOp):
    """Stack each group's module-list members into one tensor along a new `dim`."""

    dim: int = 0

    def apply(self, groups: Groups) -> Groups:
        return [[lazy.Stack(group, self.dim)] for group in groups]

    def inverse(self, n_groups: int) -> ConversionOp:
        return SplitModulelist(self.dim)


@dataclass(frozen=True)
class SplitModulelist(ConversionOp):
    """Unstack each group's one tensor along `dim` into module-list members."""

    dim: int = 0

    def apply(self, groups: Groups) -> Groups:
        out = []
        for group in groups:
            (t,) = group
            out.append(
                [lazy.Narrow(t, self.dim, i, 1, squeeze=True) for i in range(t.shape[self.dim])]
            )
        return out

    def inverse(self, n_groups: int) -> ConversionOp:
        return MergeModulelist(self.dim)


@dataclass(frozen=True)
class Concatenate(ConversionOp):
    """Concatenate all tensors, in group order, along `dim` into one group."""

    dim: int

    def apply(self, groups: Groups) -> Groups:
        parts = _flat(groups)
        sizes = [t.shape[self.dim] for t in parts]
        if len(set(sizes)) > 1:
            # The inverse is an equal Chunk; unequal parts would come back split at the wrong row.
            raise ConversionError(
                f"Concatenate(dim={self.dim}): parts of unequal sizes {sizes} cannot be undone"
            )
        return [[lazy.Cat(parts, self.dim)]]

    def out_groups(self, n_groups: int) -> int:
        return 1

    def inverse(self, n_groups: int) -> ConversionOp:
        return Chunk(self.dim, n_groups)


@dataclass(frozen=True)
class Chunk(ConversionOp):
    """Split the one tensor along `dim` into `chunks` equal groups."""

    dim: int
    chunks: int

    def apply(self, groups: Groups) -> Groups:
        t = _single(groups, self)
        size = t.shape[self.dim]
        if size % self.chunks:
            raise ConversionError(
                f"{self}: dim {self.dim} of {t} is not divisible by {self.chunks}"
            )
        step = size // self.chunks
        return [[lazy.Narrow(t, self.dim, i * step, step)] for i in range(self.chunks)]

    def out_groups(self, n_groups: int) -> int:
        return self.chunks

    def inverse(self, n_groups: int) -> ConversionOp:
        return Concatenate(self.dim)


@dataclass(frozen=True)
class Transpose(ConversionOp):
    """Swap two dims of every tensor (`[E, H, 2I]` <-> `[E, 2I, H]`)."""

    dim0: int
    dim1: int

    def apply(self, groups: Groups) -> Groups:
        return [[lazy.Transpose(t, self.dim0, self.dim1) for t in group] for group in groups]

    def inverse(self, n_groups: int) -> ConversionOp:
        return self


@dataclass(frozen=True)
class Interleave(ConversionOp):
    """Weave all tensors row by row along `dim` into one (gate0, up0, gate1, up1, ...)."""

    dim: int

    def apply(self, groups: Groups) -> Groups:
        return [[lazy.Interleave(_flat(groups), self.dim)]]

    def out_groups(self, n_groups: int) -> int:
        return 1

    def inverse(self, n_groups: int) -> ConversionOp:
        return Deinterleave(self.dim, n_groups)


@dataclass(frozen=True)
class Deinterleave(ConversionOp):
    """Unweave the one tensor along `dim` into `parts` groups (GPT-OSS gate_up -> gate, up)."""

    dim: int
    parts: int = 2

    def apply(self, groups: Groups) -> Groups:
        t = _single(groups, self)
        return [[lazy.Deinterleave(t, self.dim, self.parts, c)] for c in range(self.parts)]

    def out_groups(self, n_groups: int) -> int:
        return self.parts

    def inverse(self, n_groups: int) -> ConversionOp:
        return Interleave(self.dim)
