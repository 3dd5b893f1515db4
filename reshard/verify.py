"""`reshard verify`: re-hash every rank file and, against a source, compare every tensor bit for bit."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from safetensors import safe_open

from reshard.checkpoint import ShardedCheckpoint
from reshard.placements import Selection


@dataclass
class Finding:
    ok: bool
    what: str


def _index(selection: Selection) -> tuple[torch.Tensor, ...]:
    """Per-dim index tensors for a selection (for scattering a local tensor into the global one)."""
    return tuple(
        torch.cat([torch.arange(a, b) for a, b in ranges])
        if ranges
        else torch.empty(0, dtype=torch.long)
        for ranges in selection
    )


def _place(global_t: torch.Tensor, local: torch.Tensor, selection: Selection) -> torch.Tensor:
    """Write `local` into `global_t` at `selection`; return what was there (for replica checks)."""
    index = torch.meshgrid(*_index(selection), indexing="ij")
    before = global_t[index].clone()
    global_t[index] = local
    return before


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaN == NaN, -0.0 != 0.0), as a file comparison would be."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
    )


def check_files(ckpt: ShardedCheckpoint) -> Iterator[Finding]:
    for rank in range(ckpt.layout.world_size):
        try:
            ckpt.check_rank_file(rank)
            yield Finding(True, f"{ckpt.rank_path(rank).name}: sha256 ok")
        except Exception as e:
            yield Finding(False, str(e))


def check_against(ckpt: ShardedCheckpoint, plan) -> Iterator[Finding]:
    """Reassemble each global tensor from every rank file and compare it with the planned source tensor.

    Holds one global tensor at a time. Replicas must agree with each other too:
    every rank's local tensor must equal the global tensor at its selection.
    """
    world = ckpt.layout.world_size
    handles = [safe_open(str(ckpt.rank_path(r)), framework="pt") for r in range(world)]
    for name, p in ckpt.params.items():
        if name not in plan.params:
            yield Finding(False, f"{name}: not a parameter of the source")
            continue
        full = torch.zeros(p.shape, dtype=p.dtype)
        seen = torch.zeros(p.shape, dtype=torch.bool)
        replicas_agree = True
        for rank in range(world):
            sel = ckpt.selection(name, rank)
            local = handles[rank].get_tensor(name)
            was_seen = _place(seen, torch.ones_like(local, dtype=torch.bool), sel)
            before = _place(full, local, sel)
            if was_seen.any() and not _bits_equal(before[was_seen], local[was_seen]):
                replicas_agree = False
        expected = plan.targets[name].materialize()
        if not seen.all():
            yield Finding(False, f"{name}: {int((~seen).sum())} elements are held by no rank")
        elif not replicas_agree:
            yield Finding(False, f"{name}: replicas on different ranks differ")
        elif not _bits_equal(expected, full):
            yield Finding(False, f"{name}: reassembled tensor differs from the source")
        else:
            yield Finding(True, f"{name}: {list(p.shape)} bit-exact")
