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
import dataclasses
import fcntl
import fnmatch
import functools
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from reshard.architecture import ModelArgs
from reshard.cluster import Part
from reshard.converters import ModelSpec, fp8, get_spec, mxfp4
from reshard.converters.lazy import (
    CAST_DTYPES,
    Cast,
    Dequant,
    LazyTensor,
    RepeatBlocks,
    Segment,
    read_selection,
    selection_segments,
)
from reshard.engine import CHUNK, FileJob, Written, write_files
from reshard.errors import LayoutError, OutputError, ReshardError, SourceError
from reshard.hash_cache import remember, sha256_file, stamp
from reshard.layout import Layout
from reshard.machine import default_workers
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
from reshard.up_to_date import PROGRESS_DIR
from reshard.writer import (
    TMP_SUFFIX,
    atomic_write_bytes,
    atomic_write_text,
    fsync_dir,
    nbytes,
)


@dataclass(kw_only=True)
class LocalTensor:
    """One tensor of one rank's file: its name, dtype, local shape and where it comes from."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    selection: Selection

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


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
    # The source's FP8 format (converters.fp8), and {weight: scale} of the scales written
    # beside their weights (empty when --dtype dequantized them).
    quant: fp8.BlockFP8 | None = None
    scales: dict[str, str] = field(default_factory=dict)
    # An MXFP4 source's blocks and scales kept, or dequantized (converters.mxfp4).
    mxfp4: mxfp4.MXFP4Plan | None = None

    @property
    def quantization(self) -> dict | None:
        """The manifest's record of the FP8 weights kept, or None (unquantized, dequantized)."""
        if self.mxfp4 is not None:
            return self.mxfp4.record()
        return self.quant.record(self.scales) if self.scales else None

    @property
    def config(self) -> dict:
        """The output's config.json: the source's, without quantization_config once dequantized."""
        dequantized_mxfp4 = self.mxfp4 is not None and not self.mxfp4.packed
        if (self.quant is None or self.scales) and not dequantized_mxfp4:
            return self.source.config
        return {k: v for k, v in self.source.config.items() if k != "quantization_config"}

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
                "source": self.source.file_ids(),
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
    quant = fp8.block_fp8(source.config, list(source.tensors), spec.model_type)
    packed = mxfp4.is_mxfp4(source.config, list(source.tensors), spec.model_type)
    # MXFP4 blocks and scales read as their weight: the family sees bf16 tensors.
    tensors = mxfp4.unpacked(source.tensors) if packed else source.tensors
    targets = spec.to_targets(tensors, args)
    scales = fp8.pair_scales(targets, quant) if quant else {}
    if scales and CAST_DTYPES[dtype] is not None:
        targets = _dequantized(targets, scales, quant, CAST_DTYPES[dtype])
        scales = {}
    weights = {s: w for w, s in scales.items()}  # a scale is placed by its weight's styles
    tp, kv = layout.size("tp"), args.num_kv_heads
    params = {}
    for name, tensor in targets.items():
        head_repeat = 1
        if tp > kv and any(fnmatch.fnmatchcase(name, g) for g in spec.kv_params):
            # Whole kv heads per rank: rank r holds kv head r // (tp / kv), as vLLM does.
            head_repeat = tp // kv
            block = args.head_dim
            if name in weights:  # a head is this many scale rows
                block = fp8.kv_scale_rows(weights[name], args.head_dim, quant)
            tensor = RepeatBlocks(tensor, dim=0, block=block, repeats=head_repeat)
        if (
            CAST_DTYPES[dtype] is not None
            and tensor.dtype.is_floating_point
            and tensor.dtype != CAST_DTYPES[dtype]
        ):
            tensor = Cast(tensor, CAST_DTYPES[dtype])
        targets[name] = tensor
        styles = spec.styles_for(weights.get(name, name))
        p = ParamPlan(
            name=name,
            shape=tuple(tensor.shape),
            dtype=tensor.dtype,
            styles=styles,
            placements=placements_for(styles, tensor.ndim, layout),
            head_repeat=head_repeat,
        )
        if name not in weights:  # a scale is checked after the weights, by its blocks
            check_divisible(p, layout)
        params[name] = p
    if scales:
        _check_fp8_blocks(spec, args, layout, [params[w] for w in scales], quant)
        for scale in weights:  # whole blocks per rank: so the scales split evenly too
            check_divisible(params[scale], layout)
    mx = mxfp4.MXFP4Plan({}, dtype) if packed else None
    if packed and CAST_DTYPES[dtype] is None:  # keep MXFP4: blocks and scales, not the weight
        fits = functools.partial(check_fit, spec, args)
        targets, params, mx = mxfp4.keep_packed(
            targets, params, layout, _nearby_layouts(layout), fits
        )
    return ConversionPlan(
        source=source,
        layout=layout,
        spec=spec,
        args=args,
        targets=targets,
        params=params,
        dtype_name=dtype,
        max_file_bytes=max_file_bytes,
        quant=quant,
        scales=scales,
        mxfp4=mx,
    )


def _dequantized(
    targets: dict[str, LazyTensor], scales: dict[str, str], quant: fp8.BlockFP8, dtype: torch.dtype
) -> dict[str, LazyTensor]:
    """--dtype with an FP8 source: each weight read through its scale (lazy.Dequant, block by
    block: a rank reads its blocks only), and no scales written."""
    dropped = set(scales.values())
    return {
        name: Dequant(t, targets[scales[name]], quant.blocks(t.ndim), dtype)
        if name in scales
        else t
        for name, t in targets.items()
        if name not in dropped
    }


def _check_fp8_blocks(
    spec: ModelSpec, args: ModelArgs, layout: Layout, weights: list[ParamPlan], quant: fp8.BlockFP8
) -> None:
    """Refuse a layout that cuts an FP8 scale block: a scale shares its weight's placements, so
    every local piece of the weight must be whole blocks. The error names the parameter, the
    block size and the layouts near this one that fit every FP8 weight."""
    for p in weights:
        bad = fp8.misaligned(p.shape, p.placements, layout.mesh_shape, quant.blocks(len(p.shape)))
        if bad is None:
            continue
        dim, piece = bad
        fits = [c.name for c in _nearby_layouts(layout) if _fp8_fits(spec, args, c, weights, quant)]
        raise LayoutError(
            f"layout {layout.name}: {p.name} {list(p.shape)} splits dim {dim} into pieces of "
            f"{piece}, not whole FP8 scale blocks (weight_block_size {list(quant.block)}); "
            f"layouts that fit: {', '.join(fits) or 'none near ' + layout.name}, or --dtype bf16"
        )


def _nearby_layouts(layout: Layout) -> list[Layout]:
    """The same world with experts kept whole (-tp2ep), then each smaller tp, largest first."""
    tp = layout.size("tp")
    out = [dataclasses.replace(layout, tp2ep=True)] if tp > 1 and not layout.tp2ep else []
    for t in range(tp - 1, 0, -1):
        if tp % t == 0:
            dims = tuple((n, t if n == "tp" else s) for n, s in layout.dims)
            out.append(
                Layout(
                    dims=tuple(d for d in dims if d[1] > 1),
                    sp=layout.sp and t > 1,
                    tp2ep=layout.tp2ep and t > 1,
                )
            )
    return out


def _fp8_fits(
    spec: ModelSpec, args: ModelArgs, layout: Layout, weights: list[ParamPlan], quant: fp8.BlockFP8
) -> bool:
    """Whether `layout` fits the model and splits every FP8 weight into whole blocks."""
    try:
        check_fit(spec, args, layout)
        tp, kv = layout.size("tp"), args.num_kv_heads
        for p in weights:
            rows = p.shape[0] // p.head_repeat  # k/v heads repeat as this layout's tp says
            if tp > kv and any(fnmatch.fnmatchcase(p.name, g) for g in spec.kv_params):
                rows *= tp // kv
            shape = (rows, *p.shape[1:])
            q = dataclasses.replace(
                p, shape=shape, placements=placements_for(p.styles, len(shape), layout)
            )
            check_divisible(q, layout)
            if fp8.misaligned(shape, q.placements, layout.mesh_shape, quant.blocks(len(shape))):
                return False
    except LayoutError:
        return False
    return True


def read_local(plan: ConversionPlan, t: LocalTensor) -> torch.Tensor:
    """Read one local tensor, touching only its bytes of the source."""
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


def rank_jobs(plan: ConversionPlan, rank: int, out: Path) -> list[FileJob]:
    """The file(s) of rank `rank`, each with its tensors' bytes as segments of the source."""
    parts = plan.rank_parts(rank)
    jobs = []
    for k, (name, tensors) in enumerate(parts, start=1):
        metadata = {"format": "pt", "reshard_layout": plan.layout.name, "reshard_rank": str(rank)}
        if len(parts) > 1:
            metadata["reshard_part"] = f"{k}/{len(parts)}"
        jobs.append(
            FileJob(
                path=out / name,
                entries=[(t.name, t.dtype, t.shape) for t in tensors],
                metadata=metadata,
                segments=functools.partial(_segments, plan, tensors),
            )
        )
    return jobs


def _segments(plan: ConversionPlan, tensors: list[LocalTensor]) -> Iterator[Segment]:
    for t in tensors:
        yield from selection_segments(plan.targets[t.name], t.selection, CHUNK)


def _finish_rank(plan: ConversionPlan, rank: int, out: Path, written: list[Written]) -> RankEntry:
    """Record rank `rank` as finished (its files are renamed into place) and return its entry."""
    parts = plan.rank_parts(rank)
    files = [
        FileEntry(
            file=w.path.name,
            bytes=w.nbytes,
            sha256=w.sha256,
            tensors=[t.name for t in tensors] if len(parts) > 1 else None,
        )
        for w, (_, tensors) in zip(written, parts)
    ]
    record = {
        "fingerprint": plan.fingerprint(rank),
        "files": [asdict(f) for f in files],
        "stamps": {f.file: stamp(out / f.file) for f in files},
    }
    atomic_write_text(_record_path(out, rank), json.dumps(record))
    remember({w.path: w.sha256 for w in written})  # a load right after need not re-read them
    return RankEntry(rank=rank, coords=plan.layout.coords(rank), files=files)


def write_ranks(
    plan: ConversionPlan,
    ranks: list[int],
    out: Path,
    *,
    workers: int,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> Iterator[RankEntry]:
    """Write `ranks`' files with the engine; yield each rank's entry once all its files are in."""
    jobs = {rank: rank_jobs(plan, rank, out) for rank in ranks}
    owner = {job.path: rank for rank, js in jobs.items() for job in js}
    written: dict[int, dict[Path, Written]] = {rank: {} for rank in ranks}
    every = [job for rank in ranks for job in jobs[rank]]
    for job, w in write_files(every, plan.source.reader, workers=workers, on_bytes=on_bytes):
        rank = owner[job.path]
        written[rank][job.path] = w
        if len(written[rank]) == len(jobs[rank]):
            yield _finish_rank(plan, rank, out, [written[rank][j.path] for j in jobs[rank]])


@contextlib.contextmanager
def _locked(out: Path, ranks: list[int] | None = None) -> Iterator[None]:
    """Hold `out/.reshard/lock` for the whole conversion: one writer per output directory.

    A run writing only some ranks (`ranks`: torchrun's processes, `--ranks`) holds it
    shared, beside the runs writing the other ranks, and holds each of its ranks' own
    lock exclusively. flock is released by the kernel when the process dies, however it
    dies, so a killed run never leaves a stale lock behind.
    """
    (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    fds = []
    try:
        fds.append(_flock(out, "lock", shared=ranks is not None))
        for rank in ranks or []:
            fds.append(_flock(out, f"rank-{rank:05d}.lock", shared=False))
        yield
    finally:
        for fd in fds:
            os.close(fd)


def _flock(out: Path, name: str, *, shared: bool) -> int:
    fd = os.open(out / PROGRESS_DIR / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise OutputError(
            f"--out {out}: another reshard convert"
            + (f" (pid {holder})" if holder else "")
            + " is writing there; wait for it to finish"
        ) from None
    if not shared:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _remove_temp_files(out: Path, names: set[str] | None = None) -> None:
    """Temp files of earlier runs that were killed (a finished file is never a temp file);
    with `names`, only those of these files (other processes may be writing the rest)."""
    for directory in (out, out / PROGRESS_DIR):
        for tmp in directory.glob(f".*{TMP_SUFFIX}"):
            if names is None or tmp.name[1:].rsplit(".", 2)[0] in names:
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


def _remove_stale(out: Path, plan: ConversionPlan) -> None:
    """Rank files and records of another world size or split (an earlier run): they would be
    mistaken for ours."""
    world = plan.layout.world_size
    keep = {f for r in range(world) for f, _ in plan.rank_parts(r)}
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


def convert(
    plan: ConversionPlan,
    out: Path,
    *,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    part: Part | None = None,
) -> Converted:
    """Write every rank file, the side files, the model card and, last, the manifest.

    Safe to interrupt at any point: a re-run keeps the rank files that were
    finished and writes the rest; nothing looks finished before the manifest.

    With `part` (reshard.cluster) this process writes only `part.ranks`; the manifest
    comes once every rank is written (in the result of the process that wrote it).
    """
    out = Path(out)
    world = plan.layout.world_size
    if os.path.realpath(out) == os.path.realpath(plan.source.path):
        raise OutputError(f"--out {out}: is the source; write the new layout to another directory")
    _check_out(out, plan.layout, overwrite)
    mine = part.ranks if part else list(range(world))
    names = {f for r in mine for f, _ in plan.rank_parts(r)} | {
        _record_path(out, r).name for r in mine
    }
    exchange = None
    if part and part.torchrun:
        from reshard.cluster import Exchange

        exchange = Exchange()
    try:
        try:
            with _locked(out, mine if part else None):
                try:
                    entries, written = _write_mine(plan, out, mine, names, workers, progress, part)
                finally:
                    _remove_temp_files(out, names if part else None)  # leave no temp files
            error = None
        except Exception as e:
            if exchange is None:
                raise
            entries, written, error = [], [], str(e)  # the peers must hear of it: gather raises
        if exchange is not None:
            done = {e.rank: e for e in exchange.gather(entries, error)}
            manifest = None
            if part.process == 0:
                manifest = write_manifest(plan, out, done)
            exchange.barrier()  # rank 0's manifest is there, on a shared --out
            if part.local == 0 and part.process != 0 and not (out / MANIFEST).exists():
                manifest = write_manifest(plan, out, done)  # a node-local --out
            return Converted(manifest, written)
        if part is None:
            return Converted(write_manifest(plan, out, {e.rank: e for e in entries}), written)
        # A --ranks run: the manifest, if every other rank is finished on disk too.
        done = {r: e for r in range(world) if (e := finished_entry(plan, r, out)) is not None}
        return Converted(write_manifest(plan, out, done) if len(done) == world else None, written)
    finally:
        if exchange is not None:
            exchange.close()


def _write_mine(
    plan: ConversionPlan,
    out: Path,
    mine: list[int],
    names: set[str],
    workers: int | None,
    progress: bool,
    part: Part | None,
) -> tuple[list[RankEntry], list[int]]:
    """Under the lock: write the ranks in `mine` that are not finished already. Every rank's
    entry in `mine`, and the ranks written."""
    from tqdm.auto import tqdm

    _remove_temp_files(out, names if part else None)  # of killed runs
    # Until the new manifest is written, the directory must not look finished.
    (out / MANIFEST).unlink(missing_ok=True)
    if part is None:
        _remove_stale(out, plan)
    if part is None or part.local == 0:
        # The manifest records the source's sha256s; they are computed beside the conversion
        # (resume fingerprints use stat stamps), not before it.
        threading.Thread(target=plan.source.file_hashes, daemon=True).start()
    done = {r: e for r in mine if (e := finished_entry(plan, r, out)) is not None}
    todo = [r for r in mine if r not in done]
    _check_free_space(out, sum(plan.rank_bytes(r) for r in todo))
    if workers is None:
        workers = max(1, default_workers() // _processes_per_node(part))
    bar = tqdm(
        total=sum(plan.rank_bytes(r) for r in mine),
        initial=sum(e.bytes for e in done.values()),
        unit="B",
        unit_scale=True,
        desc=f"convert {plan.layout.name}" + (f" ranks {mine[0]}-{mine[-1]}" if part else ""),
        disable=not progress or not mine,
    )
    with bar:
        for entry in write_ranks(plan, todo, out, workers=workers, on_bytes=bar.update):
            done[entry.rank] = entry
    return [done[r] for r in mine], todo


@dataclass
class Converted:
    """What `convert` did: the manifest, where this process finished the checkpoint (else
    None), and the ranks it wrote (the others were finished already, by an earlier run or
    another process)."""

    manifest: Manifest | None
    written: list[int]


def _processes_per_node(part: Part | None) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if part and part.torchrun else 1


def write_manifest(plan: ConversionPlan, out: Path, done: dict[int, RankEntry]) -> Manifest:
    """The side files, the model card and, last, the manifest: the checkpoint is finished."""
    from reshard.modelcard import model_card

    world = plan.layout.world_size
    _remove_stale(out, plan)
    for f in plan.source.side_files():
        if f.name == "config.json" and plan.config is not plan.source.config:
            atomic_write_text(out / f.name, json.dumps(plan.config, indent=2) + "\n")
        else:
            atomic_write_bytes(out / f.name, f.read_bytes())
    manifest = Manifest(
        layout=plan.layout.name,
        mesh=dict(plan.layout.dims),
        dtype=plan.dtype_name,
        source=plan.source.describe(),  # waits for the source hashes
        model_type=plan.source.model_type,
        config=plan.config,
        params={name: param_plan_to_json(p) for name, p in plan.params.items()},
        ranks=[done[r] for r in range(world)],
        notes=_notes(plan),
        quantization=plan.quantization,
    )
    atomic_write_text(out / "README.md", model_card(manifest))
    fsync_dir(out)  # every rename above is durable before the manifest says "finished"
    atomic_write_text(out / MANIFEST, manifest.to_json())
    return manifest


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
    if plan.quant is not None and not plan.scales:
        notes.append(
            f"dequantized from FP8 (weight_block_size {list(plan.quant.block)}) to "
            f"{plan.dtype_name} while converting; config.json has no quantization_config"
        )
    if plan.mxfp4 is not None and plan.mxfp4.note():
        notes.append(plan.mxfp4.note())
    return notes
