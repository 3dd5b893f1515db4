"""Reading a sharded checkpoint: the manifest, one rank's file, its selections.

>>> ckpt = ShardedCheckpoint("q3-ep4tp4")
>>> ckpt.layout.world_size, ckpt.rank_path(3).name
(16, 'rank-00003-of-00016.safetensors')
>>> tensors = ckpt.load_rank(3)      # {name: local tensor}; opens only rank 3's file
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from reshard.errors import CheckpointError
from reshard.layout import Layout
from reshard.manifest import Manifest, load_manifest
from reshard.placements import Selection, local_selection, selection_shape
from reshard.plan import ParamPlan
from reshard.writer import sha256_file


class ShardedCheckpoint:
    """A finished `reshard convert` output directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest: Manifest = load_manifest(self.directory)
        self.layout: Layout = self.manifest.parsed_layout
        self.params: dict[str, ParamPlan] = self.manifest.param_plans()
        if len(self.manifest.ranks) != self.layout.world_size:
            raise CheckpointError(
                f"{self.directory}: manifest lists {len(self.manifest.ranks)} ranks, "
                f"layout {self.layout.name} needs {self.layout.world_size}"
            )

    def rank_path(self, rank: int) -> Path:
        if not 0 <= rank < self.layout.world_size:
            raise CheckpointError(
                f"rank {rank} out of range: layout {self.layout.name} has {self.layout.world_size} ranks"
            )
        return self.directory / self.manifest.ranks[rank].file

    def selection(self, name: str, rank: int) -> Selection:
        """Which global indices of parameter `name` rank `rank` holds."""
        p = self.params[name]
        coords = tuple(self.layout.coords(rank).values())
        return local_selection(p.shape, p.placements, self.layout.mesh_shape, coords, what=name)

    def check_rank_file(self, rank: int, *, hash: bool = True) -> None:
        """Raise CheckpointError unless rank `rank`'s file exists, has the manifest's size and hash."""
        path, entry = self.rank_path(rank), self.manifest.ranks[rank]  # range-checked first
        if not path.is_file():
            raise CheckpointError(f"{path}: rank file missing")
        if path.stat().st_size != entry.bytes:
            raise CheckpointError(
                f"{path}: {path.stat().st_size} bytes, manifest says {entry.bytes} (truncated?)"
            )
        if hash and sha256_file(path) != entry.sha256:
            raise CheckpointError(
                f"{path}: sha256 does not match the manifest (corrupt or replaced file)"
            )

    def load_rank(
        self, rank: int, *, device: str | torch.device = "cpu", verify: bool = True
    ) -> dict[str, torch.Tensor]:
        """All local tensors of `rank`, checked against the manifest's names and local shapes."""
        self.check_rank_file(rank, hash=verify)
        path = self.rank_path(rank)
        out = {}
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            names = set(f.keys())
            missing = sorted(set(self.params) - names)
            if missing:
                raise CheckpointError(f"{path}: lacks tensors {', '.join(missing[:5])}")
            for name in self.params:
                t = f.get_tensor(name)
                expected = selection_shape(self.selection(name, rank))
                if tuple(t.shape) != expected:
                    raise CheckpointError(
                        f"{path}: {name} has shape {list(t.shape)}, expected {list(expected)}"
                    )
                out[name] = t
        return out
