"""`reshard verify`: re-hash every rank file and, against a source, compare every tensor bit for bit."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from reshard.checkpoint import ShardedCheckpoint
from reshard.errors import ReshardError
from reshard.placements import Selection, boxes


@dataclass
class Finding:
    ok: bool
    what: str


def _place(
    full: torch.Tensor, seen: torch.Tensor, local: torch.Tensor, selection: Selection
) -> bool:
    """Write `local` into `full` at `selection`, box by box; False if it contradicts an earlier replica."""
    agree = True
    for g, loc in boxes(selection):
        held = seen[g]
        if held.any() and not _bits_equal(full[g][held], local[loc][held]):
            agree = False
        full[g] = local[loc]
        seen[g] = True
    return agree


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaN == NaN, -0.0 != 0.0), as a file comparison would be."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
    )


def check_files(ckpt: ShardedCheckpoint) -> Iterator[Finding]:
    """One finding per rank file: size, sha256 and its own header against the manifest.

    Only the tool's own errors are findings; anything else is a bug and propagates.
    """
    for rank in range(ckpt.layout.world_size):
        try:
            ckpt.check_rank_file(rank)
        except ReshardError as e:
            yield Finding(False, str(e))
        else:
            yield Finding(True, f"{ckpt.rank_path(rank).name}: sha256 ok")


def check_against(ckpt: ShardedCheckpoint, plan) -> Iterator[Finding]:
    """Reassemble each global tensor from every rank file and compare it with the planned source tensor.

    Holds one global tensor at a time. Replicas must agree with each other too:
    every rank's local tensor must equal the global tensor at its selection.
    """
    world = ckpt.layout.world_size
    for name, p in ckpt.params.items():
        if name not in plan.params:
            yield Finding(False, f"{name}: not a parameter of the source")
            continue
        full = torch.zeros(p.shape, dtype=p.dtype)
        seen = torch.zeros(p.shape, dtype=torch.bool)
        replicas_agree = True
        for rank in range(world):
            # Opened per tensor so mapped pages of the rank files are released as we go.
            with ckpt.open_rank(rank) as f:
                local = f.get_tensor(name)
            replicas_agree &= _place(full, seen, local, ckpt.selection(name, rank))
        expected = plan.targets[name].materialize()
        if not seen.all():
            yield Finding(False, f"{name}: {int((~seen).sum())} elements are held by no rank")
        elif not replicas_agree:
            yield Finding(False, f"{name}: replicas on different ranks differ")
        elif not _bits_equal(expected, full):
            yield Finding(False, f"{name}: reassembled tensor differs from the source")
        else:
            yield Finding(True, f"{name}: {list(p.shape)} bit-exact")
