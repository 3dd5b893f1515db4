"""Export a sharded checkpoint back to the Hugging Face format its family's checkpoints use.

    reshard export q3-ep4tp4 --out Qwen3-30B-A3B-hf

Every target tensor goes back through its converters read in reverse (fused experts split
into per-expert Linears, mixtral's `mlp.` renamed back to `block_sparse_moe.`), lazily, so
each file is written from the rank files' bytes without building the model. Files follow
`save_pretrained`: `model.safetensors`, or `model-0000K-of-0000N.safetensors` plus
`model.safetensors.index.json` above `--max-shard-size` (transformers' default, 50GB),
split by huggingface_hub's own policy. transformers loads the result, and every tensor is
the original's, bit for bit.

The export is written into a temporary directory beside `--out` and renamed into place
last: an interrupted export leaves nothing that looks like a checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from huggingface_hub.serialization import split_state_dict_into_shards_factory
from tqdm import tqdm

from reshard.converters import get_spec
from reshard.converters.lazy import LazyTensor, Segment, SliceReader, selection_segments
from reshard.engine import CHUNK, FileJob, write_files
from reshard.errors import OutputError, SourceError
from reshard.machine import default_workers
from reshard.sources import open_source
from reshard.writer import atomic_write_bytes, atomic_write_text, fsync_dir, nbytes

DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers 5.x save_pretrained


def natural_order(name: str) -> list:
    """Sort key: model.layers.2 before model.layers.10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _nbytes(t: LazyTensor) -> int:
    return nbytes(t.dtype, t.shape)


def _segments(tensors: Mapping[str, LazyTensor], names: list[str]) -> Iterator[Segment]:
    for name in names:
        t = tensors[name]
        yield from selection_segments(t, [[(0, n)] for n in t.shape], CHUNK)


def hf_tensors(directory: str | Path) -> tuple[dict[str, LazyTensor], object]:
    """The checkpoint's tensors under the HF names of its family, lazily; and its source."""
    source = open_source(str(directory))
    if not (source.path / "reshard.json").is_file():
        raise SourceError(f"{directory}: not a sharded checkpoint (no reshard.json)")
    tensors = get_spec(source.model_type).to_sources(source.tensors)
    return {name: tensors[name] for name in sorted(tensors, key=natural_order)}, source


def write_hf_weights(
    out: Path,
    tensors: Mapping[str, LazyTensor],
    max_shard_size: int | str,
    on_bytes: Callable[[int], None] = lambda n: None,
    reader: SliceReader | None = None,
) -> int:
    """Write `tensors` as save_pretrained does: `model.safetensors`, or above
    `max_shard_size` files `model-0000K-of-0000N.safetensors` split by huggingface_hub's
    policy and `model.safetensors.index.json`. Streamed by the conversion engine (a few
    chunks in memory, whatever the tensor sizes); returns the bytes of tensor data."""
    split = split_state_dict_into_shards_factory(
        dict(tensors),
        get_storage_size=_nbytes,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    jobs = [
        FileJob(
            path=out / filename,
            entries=[(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names],
            metadata={"format": "pt"},
            segments=functools.partial(_segments, tensors, names),
        )
        for filename, names in split.filename_to_tensors.items()
    ]
    for _ in write_files(
        jobs, reader or SliceReader(), workers=default_workers(), on_bytes=on_bytes
    ):
        pass
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        atomic_write_text(out / "model.safetensors.index.json", json.dumps(index, indent=2))
    return sum(_nbytes(t) for t in tensors.values())


def export(
    directory: str | Path,
    out: Path,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
) -> list[Path]:
    """Write `directory` (a `reshard convert` output) to `out` in HF format; return the files."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"--out {out}: exists and is not an empty directory")
    tensors, source = hf_tensors(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        bar = tqdm(
            total=sum(_nbytes(t) for t in tensors.values()),
            unit="B",
            unit_scale=True,
            desc="export",
            disable=not progress,
        )
        with bar:
            write_hf_weights(tmp, tensors, max_shard_size, bar.update, source.reader)
        for f in source.side_files():
            atomic_write_bytes(tmp / f.name, f.read_bytes())
        fsync_dir(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(p for p in out.iterdir() if p.suffix == ".safetensors")
