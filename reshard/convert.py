"""Plan and write a sharded checkpoint: one safetensors file per rank.

    plan = make_plan(open_source("tiny:qwen3_moe"), Layout.parse("ep2tp2"))
    convert(plan, Path("out"), workers=2)

`make_plan` validates everything (config, totality of the conversion, layout
fit) before a byte is written. `convert` writes each rank's file by reading
exactly that rank's slices of the source, then the side files, then the
manifest, last.
"""

from __future__ import annotations

import concurrent.futures
import fnmatch
import hashlib
import json
import multiprocessing
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from reshard.converters import ModelSpec, get_spec
from reshard.converters.lazy import Cast, LazyTensor, RepeatBlocks, read_selection
from reshard.errors import LayoutError, ReshardError, SourceError
from reshard.layout import Layout
from reshard.manifest import MANIFEST, Manifest, RankEntry, param_plan_to_json, rank_file_name
from reshard.placements import Selection, local_selection, selection_shape
from reshard.plan import ParamPlan, check_divisible, placements_for
from reshard.sources import Source
from reshard.writer import ShardWriter, sha256_file

DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
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
    args: object
    targets: dict[str, LazyTensor]
    params: dict[str, ParamPlan]
    dtype_name: str = "keep"

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
                "tensors": [
                    (t.name, str(t.dtype), t.shape, t.selection) for t in self.rank_tensors(rank)
                ],
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()


def check_fit(args, layout: Layout) -> None:
    """Refuse a layout that does not divide the model, naming the config field and numbers."""
    tp = layout.size("tp")
    checks = [
        ("num_attention_heads", args.num_heads, "tp", tp),
        ("vocab_size", args.vocab_size, "tp", tp),
    ]
    ep_label = " x ".join(layout.expert_dims) or "ep"
    checks.append(("num_experts", args.num_experts, ep_label, layout.expert_parallel_size))
    if not layout.tp2ep:
        checks.append(("moe_intermediate_size", args.moe_intermediate_size, "tp", tp))
    for field, value, label, n in checks:
        if value % n:
            raise LayoutError(
                f"layout {layout.name}: {field} ({value}) is not divisible by {label} ({n})"
            )
    kv = args.num_kv_heads
    if (tp > kv and tp % kv) or (tp <= kv and kv % tp):
        raise LayoutError(
            f"layout {layout.name}: num_key_value_heads ({kv}) and tp ({tp}) must divide one another"
        )


def make_plan(source: Source, layout: Layout, dtype: str = "keep") -> ConversionPlan:
    """Validate and plan the conversion of `source` to `layout`; reads headers only."""
    if dtype not in DTYPES:
        raise ReshardError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    spec = get_spec(source.model_type)
    try:
        args = spec.model_args(source.config)
    except (KeyError, ValueError, TypeError) as e:
        raise SourceError(f"{source.path / 'config.json'}: {e}") from e
    check_fit(args, layout)
    targets = spec.to_targets(source.tensors, source.config)
    tp, kv = layout.size("tp"), args.num_kv_heads
    params = {}
    for name, tensor in targets.items():
        head_repeat = 1
        if tp > kv and any(fnmatch.fnmatchcase(name, g) for g in spec.kv_params):
            # Whole kv heads per rank: rank r holds kv head r // (tp / kv), as vLLM does.
            head_repeat = tp // kv
            tensor = RepeatBlocks(tensor, dim=0, block=args.head_dim, repeats=head_repeat)
        if (
            DTYPES[dtype] is not None
            and tensor.dtype.is_floating_point
            and tensor.dtype != DTYPES[dtype]
        ):
            tensor = Cast(tensor, DTYPES[dtype])
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
    )


def read_local(plan: ConversionPlan, t: LocalTensor) -> torch.Tensor:
    """Read one local tensor, touching only its bytes of the source."""
    with plan.source.reader.session():
        return read_selection(plan.targets[t.name], t.selection)


def write_rank(
    plan: ConversionPlan, rank: int, out: Path, on_tensor: Callable[[int], None] | None = None
) -> RankEntry:
    """Write (or keep, when a previous run finished it) rank `rank`'s file; return its entry."""
    world = plan.layout.world_size
    path = out / rank_file_name(rank, world)
    record = out / PROGRESS_DIR / f"rank-{rank:05d}.json"
    fingerprint = plan.fingerprint(rank)
    entry = dict(rank=rank, coords=plan.layout.coords(rank), file=path.name)
    if record.is_file() and path.is_file():
        done = json.loads(record.read_text())
        if done.get("fingerprint") == fingerprint and sha256_file(path) == done.get("sha256"):
            if on_tensor:
                on_tensor(done["bytes"])
            return RankEntry(**entry, bytes=done["bytes"], sha256=done["sha256"])
    tensors = plan.rank_tensors(rank)
    metadata = {"format": "pt", "reshard_layout": plan.layout.name, "reshard_rank": str(rank)}
    with ShardWriter(path, [(t.name, t.dtype, t.shape) for t in tensors], metadata) as writer:
        for t in tensors:
            writer.write(t.name, read_local(plan, t))
            if on_tensor:
                on_tensor(t.nbytes)
    record.parent.mkdir(exist_ok=True)
    record.write_text(
        json.dumps({"fingerprint": fingerprint, "sha256": writer.sha256, "bytes": writer.nbytes})
    )
    return RankEntry(**entry, bytes=writer.nbytes, sha256=writer.sha256)


def _prepare_out(out: Path, world: int) -> None:
    if out.exists() and not out.is_dir():
        raise ReshardError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        ours = (out / MANIFEST).exists() or (out / PROGRESS_DIR).is_dir()
        if not ours:
            raise ReshardError(
                f"--out {out}: directory is not empty and is not a reshard checkpoint"
            )
    out.mkdir(parents=True, exist_ok=True)
    # Until the new manifest is written, the directory must not look finished.
    (out / MANIFEST).unlink(missing_ok=True)
    # Rank files of another world size (an earlier layout) would be mistaken for ours.
    keep = {rank_file_name(r, world) for r in range(world)}
    for stale in out.glob("rank-*-of-*.safetensors"):
        if stale.name not in keep:
            stale.unlink()
    for record in (out / PROGRESS_DIR).glob("rank-*.json"):
        if int(record.stem.split("-")[1]) >= world:
            record.unlink()


def _write_rank_in_worker(job: tuple[ConversionPlan, int, Path]) -> RankEntry:
    plan, rank, out = job
    return write_rank(plan, rank, out)


def convert(
    plan: ConversionPlan, out: Path, *, workers: int = 1, progress: bool = True
) -> Manifest:
    """Write every rank file, the side files, the model card and, last, the manifest."""
    from tqdm.auto import tqdm

    from reshard.modelcard import model_card

    out = Path(out)
    world = plan.layout.world_size
    _prepare_out(out, world)
    plan.source.file_hashes()  # once, before workers fork: fingerprints and the manifest use them
    total = sum(plan.rank_bytes(r) for r in range(world))
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=f"convert {plan.layout.name}",
        disable=not progress,
    )
    ranks: list[RankEntry] = []
    with bar:
        if workers <= 1:
            for rank in range(world):
                ranks.append(write_rank(plan, rank, out, on_tensor=bar.update))
        else:
            # fork: workers inherit the plan; each opens its own file handles.
            ctx = multiprocessing.get_context("fork")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                jobs = [(plan, rank, out) for rank in range(world)]
                for entry in pool.map(_write_rank_in_worker, jobs):
                    bar.update(plan.rank_bytes(entry.rank))
                    ranks.append(entry)
    for f in plan.source.side_files():
        shutil.copyfile(f, out / f.name)
    manifest = Manifest(
        layout=plan.layout.name,
        mesh=dict(plan.layout.dims),
        source=plan.source.describe(),
        model_type=plan.source.model_type,
        config=plan.source.config,
        params={name: param_plan_to_json(p) for name, p in plan.params.items()},
        ranks=ranks,
        notes=_notes(plan),
    )
    (out / "README.md").write_text(model_card(manifest, plan))
    manifest.save(out)
    return manifest


def _notes(plan: ConversionPlan) -> list[str]:
    notes = []
    repeats = {p.head_repeat for p in plan.params.values() if p.head_repeat > 1}
    if repeats:
        notes.append(
            f"tp ({plan.layout.size('tp')}) > num_key_value_heads ({plan.args.num_kv_heads}): k/v heads are "
            f"replicated {repeats.pop()}x; k_proj/v_proj global shapes count the repeated heads"
        )
    return notes
