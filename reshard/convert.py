"""Plan and write a sharded checkpoint: one safetensors file per rank.

    plan = make_plan(open_source("tiny:qwen3_moe"), Layout.parse("ep2tp2"))
    convert(plan, Path("out"), workers=2)

`make_plan` validates everything (config, totality of the conversion, layout
fit) before a byte is written. `convert` writes each rank's file by reading
exactly that rank's slices of the source, then the side files, then the
manifest, last.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import fnmatch
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from reshard.architecture import ModelArgs
from reshard.converters import ModelSpec, get_spec
from reshard.converters.lazy import CAST_DTYPES, Cast, LazyTensor, RepeatBlocks, read_selection
from reshard.errors import LayoutError, OutputError, ReshardError, SourceError
from reshard.hash_cache import stamp
from reshard.layout import Layout
from reshard.manifest import (
    MANIFEST,
    FileEntry,
    Manifest,
    RankEntry,
    param_plan_to_json,
    part_file_name,
    rank_file_name,
)
from reshard.placements import Selection, local_selection, selection_shape
from reshard.plan import ParamPlan, check_divisible, placements_for
from reshard.sources import Source
from reshard.writer import (
    TMP_SUFFIX,
    ShardWriter,
    atomic_write_bytes,
    atomic_write_text,
    fsync_dir,
    sha256_file,
)

PROGRESS_DIR = ".reshard"


@dataclass(kw_only=True)
class LocalTensor:
    """One tensor of one rank's file: its name, dtype, local shape and where it comes from."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    selection: Selection

    @property
    def nbytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size() * int(
            torch.Size(self.shape).numel()
        )


@dataclass(kw_only=True)
class ConversionPlan:
    source: Source
    layout: Layout
    spec: ModelSpec
    args: ModelArgs
    targets: dict[str, LazyTensor]
    params: dict[str, ParamPlan]
    dtype_name: str = "keep"
    max_file_bytes: int | None = None  # above it a rank is written as several part files

    def rank_tensors(self, rank: int) -> list[LocalTensor]:
        coords = tuple(self.layout.coords(rank).values())
        out = []
        for name, p in self.params.items():
            sel = local_selection(p.shape, p.placements, self.layout.mesh_shape, coords, what=name)
            out.append(
                LocalTensor(name=name, dtype=p.dtype, shape=selection_shape(sel), selection=sel)
            )
        return out

    def rank_bytes(self, rank: int) -> int:
        return sum(t.nbytes for t in self.rank_tensors(rank))

    def rank_parts(self, rank: int) -> list[tuple[str, list[LocalTensor]]]:
        """Rank `rank`'s files and the tensors each holds, in order: one file, or parts of at
        most `max_file_bytes` of tensor data each (a larger tensor gets a part to itself)."""
        world, parts, size = self.layout.world_size, [[]], 0
        for t in self.rank_tensors(rank):
            if parts[-1] and self.max_file_bytes and size + t.nbytes > self.max_file_bytes:
                parts.append([])
                size = 0
            parts[-1].append(t)
            size += t.nbytes
        if len(parts) == 1:
            return [(rank_file_name(rank, world), parts[0])]
        return [(part_file_name(rank, world, k), p) for k, p in enumerate(parts, start=1)]

    def experts_held(self, rank: int) -> tuple[int, int]:
        """[first, last) expert indices that `rank` holds (all of them without EP)."""
        ep, n = self.layout.expert_parallel_size, self.args.num_experts
        coords = self.layout.coords(rank)
        index = 0
        for d in self.layout.expert_dims:
            index = index * self.layout.size(d) + coords[d]
        per = n // ep
        return index * per, (index + 1) * per

    def fingerprint(self, rank: int) -> str:
        """Changes whenever what `rank`'s file should hold changes (source, layout, dtype, slices)."""
        blob = json.dumps(
            {
                "source": self.source.file_hashes(),
                "layout": self.layout.name,
                "dtype": self.dtype_name,
                "files": [(f, [t.name for t in p]) for f, p in self.rank_parts(rank)],
                "tensors": [
                    (t.name, str(t.dtype), t.shape, t.selection) for t in self.rank_tensors(rank)
                ],
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()


def check_fit(spec: ModelSpec, args: ModelArgs, layout: Layout) -> None:
    """Refuse a layout that does not divide the model, naming the config field and numbers."""
    tp = layout.size("tp")
    groups = {
        "tp": ("tp", tp),
        "ep": (" x ".join(layout.expert_dims) or "ep", layout.expert_parallel_size),
        "expert_tp": ("tp", 1 if layout.tp2ep else tp),
    }
    for rule in spec.fit:
        value = getattr(args, rule.attr)
        label, n = groups[rule.over]
        if value % n:
            raise LayoutError(
                f"layout {layout.name}: {rule.field} ({value}) is not divisible by {label} ({n})"
            )
    kv = args.num_kv_heads
    if (tp > kv and tp % kv) or (tp <= kv and kv % tp):
        raise LayoutError(
            f"layout {layout.name}: num_key_value_heads ({kv}) and tp ({tp}) must divide one another"
        )


def model_args(spec: ModelSpec, source: Source) -> ModelArgs:
    """The source's config.json parsed by its family; a bad config is one line naming the file."""
    try:
        return spec.parse_config(source.config)
    except (KeyError, ValueError, TypeError) as e:
        raise SourceError(f"{source.path / 'config.json'}: {e}") from e


def make_plan(
    source: Source, layout: Layout, dtype: str = "keep", max_file_bytes: int | None = None
) -> ConversionPlan:
    """Validate and plan the conversion of `source` to `layout`; reads headers only."""
    if dtype not in CAST_DTYPES:
        raise ReshardError(f"--dtype {dtype!r}: choose one of {', '.join(CAST_DTYPES)}")
    spec = get_spec(source.model_type)
    args = model_args(spec, source)
    check_fit(spec, args, layout)
    targets = spec.to_targets(source.tensors, args)
    tp, kv = layout.size("tp"), args.num_kv_heads
    params = {}
    for name, tensor in targets.items():
        head_repeat = 1
        if tp > kv and any(fnmatch.fnmatchcase(name, g) for g in spec.kv_params):
            # Whole kv heads per rank: rank r holds kv head r // (tp / kv), as vLLM does.
            head_repeat = tp // kv
            tensor = RepeatBlocks(tensor, dim=0, block=args.head_dim, repeats=head_repeat)
        if (
            CAST_DTYPES[dtype] is not None
            and tensor.dtype.is_floating_point
            and tensor.dtype != CAST_DTYPES[dtype]
        ):
            tensor = Cast(tensor, CAST_DTYPES[dtype])
        targets[name] = tensor
        styles = spec.styles_for(name)
        p = ParamPlan(
            name=name,
            shape=tuple(tensor.shape),
            dtype=tensor.dtype,
            styles=styles,
            placements=placements_for(styles, tensor.ndim, layout),
            head_repeat=head_repeat,
        )
        check_divisible(p, layout)
        params[name] = p
    return ConversionPlan(
        source=source,
        layout=layout,
        spec=spec,
        args=args,
        targets=targets,
        params=params,
        dtype_name=dtype,
        max_file_bytes=max_file_bytes,
    )


def read_local(plan: ConversionPlan, t: LocalTensor) -> torch.Tensor:
    """Read one local tensor, touching only its bytes of the source."""
    with plan.source.reader.session():
        return read_selection(plan.targets[t.name], t.selection)


def _record_path(out: Path, rank: int) -> Path:
    return out / PROGRESS_DIR / f"rank-{rank:05d}.json"


def finished_entry(plan: ConversionPlan, rank: int, out: Path) -> RankEntry | None:
    """Rank `rank`'s entry if an earlier run finished its files for exactly this plan, else None.

    A record that is missing, unreadable or for another plan, or a file whose size
    or hash disagrees with it, means "not finished": the rank is written again.
    """
    try:
        done = json.loads(_record_path(out, rank).read_text())
        fingerprint, stamps = done["fingerprint"], done.get("stamps", {})
        files = [FileEntry(**f) for f in done["files"]]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if fingerprint != plan.fingerprint(rank):
        return None
    if [f.file for f in files] != [name for name, _ in plan.rank_parts(rank)]:
        return None
    for f in files:
        path = out / f.file
        if not path.is_file() or path.stat().st_size != f.bytes:
            return None
        # Untouched since we wrote it (same inode, size, mtime, ctime): its hash is the
        # writer's. Anything else is hashed again.
        if stamps.get(f.file) != stamp(path) and sha256_file(path) != f.sha256:
            return None
    return RankEntry(rank=rank, coords=plan.layout.coords(rank), files=files)


def write_rank(
    plan: ConversionPlan, rank: int, out: Path, on_tensor: Callable[[int], None] | None = None
) -> RankEntry:
    """Write rank `rank`'s file (or parts) and its completion record; return its manifest entry."""
    parts = plan.rank_parts(rank)
    files = []
    for k, (name, tensors) in enumerate(parts, start=1):
        metadata = {"format": "pt", "reshard_layout": plan.layout.name, "reshard_rank": str(rank)}
        if len(parts) > 1:
            metadata["reshard_part"] = f"{k}/{len(parts)}"
        entries = [(t.name, t.dtype, t.shape) for t in tensors]
        with ShardWriter(out / name, entries, metadata) as writer:
            for t in tensors:
                writer.write(t.name, read_local(plan, t))
                if on_tensor:
                    on_tensor(t.nbytes)
        names = [t.name for t in tensors] if len(parts) > 1 else None
        files.append(FileEntry(file=name, bytes=writer.nbytes, sha256=writer.sha256, tensors=names))
    record = {
        "fingerprint": plan.fingerprint(rank),
        "files": [asdict(f) for f in files],
        "stamps": {f.file: stamp(out / f.file) for f in files},
    }
    atomic_write_text(_record_path(out, rank), json.dumps(record))
    return RankEntry(rank=rank, coords=plan.layout.coords(rank), files=files)


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold `out/.reshard/lock` for the whole conversion: one writer per output directory.

    flock is released by the kernel when the process dies, however it dies, so
    a killed run never leaves a stale lock behind.
    """
    (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    fd = os.open(out / PROGRESS_DIR / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise OutputError(
                f"--out {out}: another reshard convert (pid {holder}) is writing there; "
                "wait for it to finish"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def _remove_temp_files(out: Path) -> None:
    """Temp files of earlier runs that were killed (a finished file is never a temp file)."""
    for directory in (out, out / PROGRESS_DIR):
        for tmp in directory.glob(f".*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)


def _check_out(out: Path, layout: Layout, overwrite: bool) -> None:
    """Refuse an --out that is not ours, or that holds a finished checkpoint we would destroy."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / MANIFEST).exists() and not (out / PROGRESS_DIR).is_dir():
        raise OutputError(f"--out {out}: directory is not empty and is not a reshard checkpoint")
    if (out / MANIFEST).exists() and not overwrite:
        try:
            have = json.loads((out / MANIFEST).read_text())["layout"]
            same = Layout.parse(str(have)).name == layout.name
        except (OSError, ValueError, TypeError, KeyError):
            have, same = "an unreadable", False
        if not same:
            raise OutputError(
                f"--out {out}: holds a finished {have} checkpoint; converting to {layout.name} "
                "would delete its rank files (pass --overwrite to replace it)"
            )


def _prepare_out(out: Path, world: int, keep: set[str]) -> None:
    """Under the lock: no temp files of killed runs, nothing that looks finished, no stale ranks."""
    _remove_temp_files(out)
    # Until the new manifest is written, the directory must not look finished.
    (out / MANIFEST).unlink(missing_ok=True)
    # Rank files of another world size or split (an earlier run) would be mistaken for ours.
    for stale in out.glob("rank-*-of-*.safetensors"):
        if stale.name not in keep:
            stale.unlink()
    for record in (out / PROGRESS_DIR).glob("rank-*.json"):
        match = re.fullmatch(r"rank-(\d{5})\.json", record.name)
        if match and int(match[1]) >= world:
            record.unlink()


def _check_free_space(out: Path, needed: int) -> None:
    free = shutil.disk_usage(out).free
    if needed > free:
        raise OutputError(
            f"--out {out}: needs {needed:,} bytes for the rank files, only {free:,} free on its disk"
        )


def _die_with_parent() -> None:
    """Pool workers: exit when the parent dies (even by SIGKILL), so no orphan keeps writing."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # pool.terminate() must kill, not unwind


def _write_rank_in_worker(job: tuple[ConversionPlan, int, Path]) -> RankEntry:
    plan, rank, out = job
    return write_rank(plan, rank, out)


def _write_ranks(
    plan: ConversionPlan, ranks: list[int], out: Path, workers: int, bar
) -> Iterator[RankEntry]:
    """Write `ranks`, `workers` at a time; the first failure stops every other worker at once."""
    if workers <= 1 or len(ranks) <= 1:
        for rank in ranks:
            yield write_rank(plan, rank, out, on_tensor=bar.update)
        return
    # fork: workers inherit the plan; each opens its own file handles.
    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(min(workers, len(ranks)), initializer=_die_with_parent)
    try:
        jobs = [(plan, rank, out) for rank in ranks]
        for entry in pool.imap_unordered(_write_rank_in_worker, jobs):
            bar.update(entry.bytes)
            yield entry
        pool.close()
    finally:
        pool.terminate()  # no-op after close; on an error, kills the ranks still being written
        pool.join()


def convert(
    plan: ConversionPlan,
    out: Path,
    *,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> Manifest:
    """Write every rank file, the side files, the model card and, last, the manifest.

    Safe to interrupt at any point: a re-run keeps the rank files that were
    finished and writes the rest; nothing looks finished before the manifest.
    """
    from tqdm.auto import tqdm

    from reshard.modelcard import model_card

    out = Path(out)
    world = plan.layout.world_size
    if os.path.realpath(out) == os.path.realpath(plan.source.path):
        raise OutputError(f"--out {out}: is the source; write the new layout to another directory")
    _check_out(out, plan.layout, overwrite)
    with _locked(out):
        try:
            _prepare_out(out, world, {f for r in range(world) for f, _ in plan.rank_parts(r)})
            plan.source.file_hashes()  # once, before workers fork: fingerprints and the manifest
            done = {r: e for r in range(world) if (e := finished_entry(plan, r, out)) is not None}
            todo = [r for r in range(world) if r not in done]
            _check_free_space(out, sum(plan.rank_bytes(r) for r in todo))
            bar = tqdm(
                total=sum(plan.rank_bytes(r) for r in range(world)),
                initial=sum(e.bytes for e in done.values()),
                unit="B",
                unit_scale=True,
                desc=f"convert {plan.layout.name}",
                disable=not progress,
            )
            with bar:
                for entry in _write_ranks(plan, todo, out, workers, bar):
                    done[entry.rank] = entry
            for f in plan.source.side_files():
                atomic_write_bytes(out / f.name, f.read_bytes())
            manifest = Manifest(
                layout=plan.layout.name,
                mesh=dict(plan.layout.dims),
                dtype=plan.dtype_name,
                source=plan.source.describe(),
                model_type=plan.source.model_type,
                config=plan.source.config,
                params={name: param_plan_to_json(p) for name, p in plan.params.items()},
                ranks=[done[r] for r in range(world)],
                notes=_notes(plan),
            )
            atomic_write_text(out / "README.md", model_card(manifest))
            fsync_dir(out)  # every rename above is durable before the manifest says "finished"
            atomic_write_text(out / MANIFEST, manifest.to_json())
            return manifest
        finally:
            _remove_temp_files(out)  # whatever stopped us (error, Ctrl-C), leave no temp files


def convert_cached(source: Source, layout: Layout, cache: Path, *, progress: bool = True) -> Path:
    """`source` converted to `layout` under `cache`, converted now unless a finished copy exists.

    The cache entry is named by what the source *is* (the sha256 of every weight
    and side file, and the config), not by what it was called: two directories
    given by the same relative path, a source rewritten in place, or a Hub branch
    that moved all get their own entry. Before reuse the entry's manifest is read
    (schema-checked) and must record exactly these source hashes and this config.
    """
    from reshard.checkpoint import ShardedCheckpoint

    identity = {
        "files": source.file_hashes(),
        "side_files": {f.name: sha256_file(f) for f in source.side_files()},
        "config": source.config,
        "layout": layout.name,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    out = cache / f"{layout.name}-{key}"
    if (out / MANIFEST).is_file():
        m = ShardedCheckpoint(out).manifest
        if (m.source.get("files"), m.config, m.layout) == (
            identity["files"],
            source.config,
            layout.name,
        ):
            return out
    convert(make_plan(source, layout), out, progress=progress, overwrite=True)
    return out


def _notes(plan: ConversionPlan) -> list[str]:
    notes = []
    repeats = {p.head_repeat for p in plan.params.values() if p.head_repeat > 1}
    if repeats:
        notes.append(
            f"tp ({plan.layout.size('tp')}) > num_key_value_heads ({plan.args.num_kv_heads}): k/v heads are "
            f"replicated {repeats.pop()}x; k_proj/v_proj global shapes count the repeated heads"
        )
    return notes
