"""Reading a sharded checkpoint: the manifest, one rank's file, its selections.

>>> ckpt = ShardedCheckpoint("q3-ep4tp4")
>>> ckpt.layout.world_size, ckpt.rank_path(3).name
(16, 'rank-00003-of-00016.safetensors')
>>> tensors = ckpt.load_rank(3)      # {name: local tensor}; opens only rank 3's file
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from reshard.device_read import read_tensors
from reshard.errors import CheckpointError
from reshard.hash_cache import cached_sha256, sha256_of
from reshard.layout import Layout
from reshard.manifest import FileEntry, Manifest, load_manifest
from reshard.placements import Selection, local_selection, selection_shape
from reshard.plan import ParamPlan
from reshard.safetensors_header import Header, read_header


class ShardedCheckpoint:
    """A finished `reshard convert` output directory, local or a Hub snapshot.

    For a checkpoint on the Hub (`reshard.hub.open_hub_checkpoint`), `directory` is the
    snapshot holding the small files, `fetch(filename)` downloads a rank file on first use,
    and `blobs` is where the Hub cache keeps the bytes its snapshot links point to.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        fetch: Callable[[str], Path] | None = None,
        blobs: Path | None = None,
        spec: str | None = None,
    ):
        self.directory = Path(directory)
        self.manifest: Manifest = load_manifest(self.directory)
        self.layout: Layout = self.manifest.parsed_layout
        self.params: dict[str, ParamPlan] = self.manifest.param_plans()
        self.fetch, self.blobs = fetch, blobs
        self.spec = spec or str(self.directory)  # what to pass to another process to reopen it

    def _path(self, name: str) -> Path:
        """File `name` of the checkpoint (fetched first from the Hub if need be); it must live
        in the directory (or the Hub cache's blobs): a symlink may not lead anywhere else."""
        path = self.directory / name  # schema: a plain file name
        if self.fetch is not None and not path.exists():
            self.fetch(path.name)
        # realpath, unlike Path.resolve, does not raise on a symlink loop (is_file is then False).
        real = Path(os.path.realpath(path))
        allowed = {Path(os.path.realpath(self.directory))}
        if self.blobs is not None:
            allowed.add(Path(os.path.realpath(self.blobs)))
        if real.parent not in allowed:
            raise CheckpointError(f"{path}: a symlink to {real}, outside the checkpoint")
        return path

    def rank_files(self, rank: int) -> list[tuple[Path, FileEntry]]:
        """Rank `rank`'s file, or its parts, with their manifest entries."""
        if not 0 <= rank < self.layout.world_size:
            raise CheckpointError(
                f"rank {rank} out of range: layout {self.layout.name} has {self.layout.world_size} ranks"
            )
        return [(self._path(f.file), f) for f in self.manifest.ranks[rank].files]

    def rank_path(self, rank: int) -> Path:
        """Rank `rank`'s (first) file."""
        return self.rank_files(rank)[0][0]

    def selection(self, name: str, rank: int) -> Selection:
        """Which global indices of parameter `name` rank `rank` holds."""
        p = self.params[name]
        coords = tuple(self.layout.coords(rank).values())
        return local_selection(p.shape, p.placements, self.layout.mesh_shape, coords, what=name)

    def check_rank_file(
        self, rank: int, *, hash: bool = True, recorded: bool = False
    ) -> dict[Path, Header]:
        """Raise CheckpointError unless each of rank `rank`'s files exists, has the manifest's
        size and sha256 (skipped with `hash=False`), and its own header names this rank, layout
        (and part) and holds exactly the manifest's tensors with their dtypes and local shapes.
        Returns those headers, by file.

        `recorded=True` takes the sha256 from reshard.hash_cache while the file is unchanged
        since it was last hashed (or written by `convert`), instead of reading it again."""
        files = self.rank_files(rank)  # range-checked first
        headers = {}
        for k, (path, entry) in enumerate(files, start=1):
            if not path.is_file():
                what = "rank file missing"
                if path.exists():
                    what = "not a regular file"
                elif path.is_symlink():
                    what = "a symlink that leads nowhere (dangling, or a loop)"
                raise CheckpointError(f"{path}: {what}")
            size = path.stat().st_size
            if size != entry.bytes:
                raise CheckpointError(
                    f"{path}: {size} bytes, manifest says {entry.bytes} (truncated?)"
                )
            if hash:
                try:
                    digest = cached_sha256([path])[path] if recorded else sha256_of(path)
                except OSError as e:
                    raise CheckpointError(f"{path}: cannot hash it ({e.strerror})") from e
                if digest != entry.sha256:
                    raise CheckpointError(
                        f"{path}: sha256 does not match the manifest (corrupt or replaced file)"
                    )
            part = f"{k}/{len(files)}" if len(files) > 1 else None
            names = entry.tensors or list(self.params)
            headers[path] = self._check_own_header(rank, path, part, names)
        return headers

    def _check_own_header(
        self, rank: int, path: Path, part: str | None, names: list[str]
    ) -> Header:
        """The file's own header says which rank, layout and part it holds: a swapped or copied
        file, even with the manifest's hashes edited to match, is caught here."""
        header = read_header(path, error=CheckpointError)
        meta = header.metadata
        says = (meta.get("reshard_rank"), meta.get("reshard_layout"), meta.get("reshard_part"))
        if says != (str(rank), self.layout.name, part):
            which = f"rank {rank} of {self.layout.name}" + (f", part {part}" if part else "")
            raise CheckpointError(
                f"{path}: its header says rank {says[0]} of layout {says[1]}"
                + (f", part {says[2]}" if says[2] else "")
                + f", but it is listed as {which} (files swapped or copied?)"
            )
        have = set(header.tensors)
        missing, extra = sorted(set(names) - have), sorted(have - set(names))
        if missing or extra:
            raise CheckpointError(
                f"{path}: lacks tensors {missing[:3]}, holds unlisted tensors {extra[:3]}"
            )
        for name, info in header.tensors.items():
            expected = (self.params[name].dtype, selection_shape(self.selection(name, rank)))
            if (info.dtype, info.shape) != expected:
                raise CheckpointError(
                    f"{path}: {name} is {info.dtype} {list(info.shape)}, the manifest says "
                    f"{expected[0]} {list(expected[1])}"
                )
        return header

    def tensor_file(self, rank: int, name: str) -> Path:
        """The file of rank `rank` that holds tensor `name`."""
        for path, entry in self.rank_files(rank):
            if entry.tensors is None or name in entry.tensors:
                return path
        raise CheckpointError(f"rank {rank} holds no tensor {name}")

    def load_rank(
        self, rank: int, *, device: str | torch.device = "cpu", verify: bool = True
    ) -> dict[str, torch.Tensor]:
        """All local tensors of `rank`, checked against the manifest (hash, rank, names, shapes, dtypes).

        `verify=False` skips only the sha256; the file's own header is always checked.
        """
        headers = self.check_rank_file(rank, hash=verify, recorded=True)
        if torch.device(device).type == "cuda":  # through pinned buffers, several at once
            tensors = {}
            for path, header in headers.items():
                tensors |= read_tensors(path, header, list(header.tensors), torch.device(device))
            return {name: tensors[name] for name in self.params}
        with self.open_rank(rank, device=device) as f:
            return {name: f.get_tensor(name) for name in self.params}

    @contextmanager
    def open_rank(self, rank: int, *, device: str | torch.device = "cpu") -> Iterator:
        """The rank's tensors, read with `safe_open` from whichever file holds each; errors as
        one CheckpointError naming the file. Does not check the files; call `check_rank_file`
        first."""
        handles = {}
        with ExitStack() as stack:
            for path, entry in self.rank_files(rank):
                try:
                    f = safe_open(str(path), framework="pt", device=str(device))
                except (SafetensorError, OSError) as e:
                    raise CheckpointError(f"{path}: cannot read ({str(e)[:200]})") from e
                stack.enter_context(f)
                for name in entry.tensors or self.params:
                    handles[name] = (path, f)
            yield _RankTensors(handles)


class _RankTensors:
    """`get_tensor(name)` across a rank's files."""

    def __init__(self, handles: dict[str, tuple[Path, object]]):
        self.handles = handles

    def keys(self) -> list[str]:
        return list(self.handles)

    def get_tensor(self, name: str) -> torch.Tensor:
        path, f = self.handles[name]
        try:
            return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read {name} ({str(e)[:200]})") from e


def open_checkpoint(spec: str | Path, *, manifest_only: bool = False) -> ShardedCheckpoint:
    """A sharded checkpoint from a local directory or `hf:org/name[@revision]` (see reshard.hub;
    `manifest_only`: of a Hub checkpoint fetch reshard.json and nothing else yet)."""
    text = str(spec)
    if not text.startswith("hf:"):
        return ShardedCheckpoint(spec)
    from reshard.hub import open_hub_checkpoint

    ckpt = open_hub_checkpoint(text, manifest_only=manifest_only)
    if ckpt is None:
        raise CheckpointError(
            f"{text}: holds no reshard.json, so it is not a sharded checkpoint "
            f"(convert it: reshard convert --src {text} --layout L --out DIR)"
        )
    return ckpt
