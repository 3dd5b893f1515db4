"""The `reshard` command line. The root only wires commands; each lives in a few lines here."""

from __future__ import annotations

import atexit
import gc
import os
import signal
import sys
import warnings
from pathlib import Path

import click

from reshard.errors import ReshardError
from reshard.machine import share_malloc_arenas, torchrun_processes

# torch warns at import when numpy is absent; reshard never needs numpy, so the warning is noise.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

SRC_HELP = (
    "Source checkpoint: a local HF directory, a sharded checkpoint (to reshard), "
    "hf:org/name[@revision], or tiny:qwen3_moe (built in)."
)
LAYOUT_HELP = (
    "Parallel layout: [dp<N>][ep<N>][tp<N>][-sp][-tp2ep], e.g. tp4, ep8, ep4tp4, tp4-tp2ep, tp2-sp."
)

src_option = click.option("--src", required=True, metavar="SRC", help=SRC_HELP)
layout_option = click.option("--layout", required=True, metavar="LAYOUT", help=LAYOUT_HELP)
dtype_option = click.option(
    "--dtype",
    type=click.Choice(["keep", "bf16", "fp16", "fp32"]),  # converters.lazy.CAST_DTYPES
    default="keep",
    show_default=True,
    help="Cast floating-point tensors while writing.",
)
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")


def _progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def _hash_while_importing(location: str, *, rank_files: bool, cached_only: bool = False) -> None:
    """Start hashing a local directory's files before the command imports torch, which keeps
    one core busy for seconds (reshard.hash_cache.prefetch): its rank files (verify reads them
    all), or its Hugging Face weight files (convert records their sha256s; a cached hash is
    not read again). Under torchrun only the first process of a node does it.

    `cached_only`: only files the page cache holds whole. A command that reads the others
    anyway hashes them in that read; reading them twice would take them from the disk twice."""
    path = Path(location)
    if os.environ.get("LOCAL_RANK", "0") != "0" or not path.is_dir():
        return
    from reshard.file_blocks import in_page_cache
    from reshard.hash_cache import prefetch

    files = sorted(path.glob("*.safetensors"))
    ranks = [f for f in files if f.name.startswith("rank-")]
    files = ranks if rank_files else [f for f in files if f not in ranks]
    if cached_only:
        files = [f for f in files if in_page_cache(f)]
    prefetch(files, cached=not rank_files)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="reshard")
def cli() -> None:
    """Turn Hugging Face MoE checkpoints into per-rank shards for any TP/EP/SP layout, and run them.

    \b
    Examples:
      reshard convert --src tiny:qwen3_moe --layout ep2tp2 --out tiny-ep2tp2
      reshard plan --src hf:Qwen/Qwen3-30B-A3B --layout ep4tp4
      reshard verify tiny-ep2tp2 --against tiny:qwen3_moe
      reshard export tiny-ep2tp2 --out tiny-hf
      reshard upload tiny-ep2tp2 --repo me/tiny-ep2tp2
      reshard run hf:me/tiny-ep2tp2 --prompt "Why is the sky blue?"
    """


@cli.command()
@src_option
@layout_option
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Output directory (created)."
)
@dtype_option
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Threads reading and writing (default: one per core). Up to 8 rank files are written "
    "at once whatever this says, each hashed by its own thread, so the TP ranks of a column "
    "slice share one read of its rows.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace a finished checkpoint of another layout in --out (refused without it).",
)
@click.option(
    "--max-file-size",
    default="20GB",
    show_default=True,
    help="Largest rank file; a larger rank is written as parts "
    "rank-NNNNN-of-NNNNN-part-K.safetensors (the Hub recommends files under 20GB).",
)
@click.option(
    "--ranks",
    metavar="A-B",
    help="Write only layout ranks A to B (inclusive), for schedulers that run one job per "
    "block of ranks into a shared --out; the run that finds every rank finished writes "
    "the manifest. Under torchrun the ranks are split between its processes by themselves.",
)
@click.option(
    "--push-to-hub",
    metavar="ORG/NAME",
    help="After a successful convert, upload the result to this Hub repository (see upload).",
)
@quiet_option
def convert(
    src: str,
    layout: str,
    out: Path,
    dtype: str,
    workers: int | None,
    overwrite: bool,
    max_file_size: str,
    ranks: str | None,
    push_to_hub: str | None,
    quiet: bool,
) -> None:
    """Write one safetensors file per rank, a manifest, and the config/tokenizer files.

    Each rank's file is cut from the source by reading only that rank's bytes,
    so memory stays bounded by one output tensor shard. Files are written under
    a temporary name and the manifest last; re-running resumes, keeping rank
    files that are already complete.

    \b
    Examples:
      reshard convert --src tiny:qwen3_moe --layout ep2tp2 --out tiny-ep2tp2
      reshard convert --src hf:Qwen/Qwen3-30B-A3B --layout ep4tp4 --out q3-ep4tp4 --dtype bf16 --workers 8
      reshard convert --src ./Qwen3-30B-A3B --layout tp4-tp2ep --out q3-tp4-tp2ep
      reshard convert --src tiny:qwen3_moe --layout tp4 --out tiny-ep2tp2 --overwrite
      reshard convert --src tiny-ep2tp2 --layout tp2 --out tiny-tp2      # reshard a sharded one
      reshard convert --src hf:Qwen/Qwen3-30B-A3B --layout ep4tp4 --out q3 --push-to-hub me/q3-ep4tp4
      torchrun --nnodes 2 --nproc-per-node 4 ... -m reshard.cli convert --src ... --layout ep8tp8 --out /shared/q3
      reshard convert --src ./Qwen3-235B-A22B --layout ep8tp8 --out /shared/q3 --ranks 0-15

    Interrupting is safe: nothing looks finished before the manifest, and the
    next run keeps every rank file that was complete. Two runs into the same
    --out are refused, as is one that would replace a finished checkpoint of
    another layout (unless --overwrite).
    """
    from reshard import up_to_date
    from reshard.units import human_bytes

    limit = _size(max_file_size, "--max-file-size")
    # The same command again, nothing changed: answered before torch is imported.
    asked = None
    if ranks is None and push_to_hub is None and torchrun_processes() == 1:
        asked = up_to_date.request(src, layout, dtype, limit)
    if asked is not None and (done := up_to_date.finished(out, asked)) is not None:
        click.echo(
            f"up to date: {out} holds {done['ranks']} rank files ({human_bytes(done['bytes'])}) "
            f"for {done['layout']} from {src}; nothing written"
        )
        return
    _hash_while_importing(src, rank_files=False)
    from reshard.cluster import Part, parse_ranks, torchrun_part
    from reshard.convert import convert as run_convert
    from reshard.convert import make_plan
    from reshard.layout import Layout
    from reshard.sources import open_source

    plan = make_plan(open_source(src), Layout.parse(layout), dtype, max_file_bytes=limit)
    world = plan.layout.world_size
    part = torchrun_part(world)
    if ranks is not None:
        if part is not None:
            raise ReshardError("--ranks: under torchrun each process takes its ranks by itself")
        part = Part(ranks=parse_ranks(ranks, world))
    if part is not None and push_to_hub:
        raise ReshardError("--push-to-hub: upload once every rank is written (reshard upload)")
    done = run_convert(
        plan, out, workers=workers, progress=_progress(quiet), overwrite=overwrite, part=part
    )
    if done.manifest is None:
        ranks = f"ranks {part.ranks[0]}-{part.ranks[-1]}" if part.ranks else "no ranks"
        what = f"wrote {ranks}" if done.written else f"{ranks} were finished already, wrote none"
        later = "" if part.torchrun else "; the run that finishes the last rank writes the manifest"
        click.echo(f"{what} of {plan.layout.name} to {out}{later}")
        return
    manifest = done.manifest
    total = sum(r.bytes for r in manifest.ranks)
    if asked is not None:
        summary = {"ranks": manifest.world_size, "bytes": total, "layout": manifest.layout}
        up_to_date.record(out, asked, summary)
    held = f"{manifest.world_size} rank files ({human_bytes(total)}) for {manifest.layout}"
    if len(done.written) == manifest.world_size:
        click.echo(f"wrote {held} to {out}")
    elif not done.written and part is None:  # a Hub or built-in source, or a file touched
        click.echo(f"every rank file was finished: {out} holds {held}; nothing written")
    else:  # the rest by an earlier run, or by other processes of this one
        click.echo(f"wrote {len(done.written)} of {held} to {out}; the others were finished")
    if push_to_hub:
        _upload(out, push_to_hub, private=False, revision=None, commit_message=None, quiet=quiet)


def _size(text: str, option: str) -> int:
    """`20GB`, `200KB`, ... in bytes, as huggingface_hub parses `max_shard_size`."""
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        return parse_size_to_int(text)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=option) from e


def _upload(directory: Path, repo: str, **options) -> None:
    from huggingface_hub.utils import disable_progress_bars

    from reshard.hub import parse_spec, upload

    parse_spec(repo)  # a repo id, refused in one line otherwise
    if options.pop("quiet"):
        disable_progress_bars()
    url, sha = upload(directory, repo, **options)
    click.echo(f"uploaded {directory} to {url} (commit {sha})")


@cli.command("upload")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option(
    "--repo", required=True, metavar="ORG/NAME", help="Hub repository (created if need be)."
)
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--revision", metavar="BRANCH", help="Branch to commit to (created from main).")
@click.option("--commit-message", help="Commit message (default: model type and layout).")
@quiet_option
def upload_command(
    directory: Path,
    repo: str,
    private: bool,
    revision: str | None,
    commit_message: str | None,
    quiet: bool,
) -> None:
    """Publish a sharded checkpoint on the Hugging Face Hub.

    Every rank file is re-hashed against the manifest first; the model card is rebuilt for
    the repository. Rank files, manifest, config/tokenizer files and the card go up in one
    commit; an interrupted upload resumes (files the Hub already has are not sent again).
    Later, each rank of `reshard run hf:ORG/NAME` downloads only its own rank file.
    The token comes from HF_TOKEN or `hf auth login`; reshard never prints or stores it.

    \b
    Examples:
      reshard upload q3-ep4tp4 --repo me/Qwen3-30B-A3B-ep4tp4
      reshard upload q3-ep4tp4 --repo me/Qwen3-30B-A3B-ep4tp4 --private --revision bf16
    """
    _upload(
        directory,
        repo,
        private=private,
        revision=revision,
        commit_message=commit_message,
        quiet=quiet,
    )


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Output directory (created)."
)
@click.option(
    "--max-shard-size",
    default="50GB",
    show_default=True,
    help="Largest weight file, as save_pretrained takes it (e.g. 5GB); above it, an index.",
)
@quiet_option
def export(directory: Path, out: Path, max_shard_size: str, quiet: bool) -> None:
    """Write a sharded checkpoint back to the Hugging Face format of its family.

    Fused experts are split back into per-expert tensors under the names the
    family's checkpoints use, files and index follow save_pretrained, and
    config/tokenizer files are copied: transformers loads the result, and every
    tensor equals the original bit for bit. Rank files are hash-checked first.

    \b
    Examples:
      reshard export tiny-ep2tp2 --out tiny-hf
      reshard export q3-ep4tp4 --out Qwen3-30B-A3B-hf --max-shard-size 5GB
    """
    from reshard.export import export as run_export
    from reshard.units import human_bytes

    limit = _size(max_shard_size, "--max-shard-size")
    files = run_export(directory, out, max_shard_size=limit, progress=_progress(quiet))
    total = sum(f.stat().st_size for f in files)
    click.echo(f"wrote {len(files)} safetensors files ({human_bytes(total)}) to {out}")


@cli.command()
@click.option(
    "--like",
    required=True,
    type=click.Choice(
        [
            "qwen3-30b-a3b",
            "qwen3-30b-a3b-fp8",
            "qwen3-235b-a22b",
            "mixtral-8x7b",
            "deepseek-v3",
            "kimi-k2",
            "gpt-oss-120b",
            "gpt-oss-20b",
        ]
    ),  # synth.PRESETS
    help="The model whose tensor names, shapes, config and shard files to reproduce.",
)
@click.option(
    "--layers", type=click.IntRange(min=1), help="Keep only the first N layers (default: all)."
)
@click.option(
    "--dtype",
    type=click.Choice(["bf16", "fp16", "fp32"]),
    default="bf16",
    show_default=True,
    help="Data type of every tensor the preset's release does not quantize.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Output directory (created)."
)
@quiet_option
def synth(like: str, layers: int | None, dtype: str, seed: int, out: Path, quiet: bool) -> None:
    """Write a checkpoint with a real model's exact tensor names, shapes and files, for
    benchmarks: seeded random values, N of its layers, written at disk speed.

    \b
    Examples:
      reshard synth --like qwen3-30b-a3b --layers 4 --out q3-4l
      reshard synth --like mixtral-8x7b --layers 2 --out mx-2l --dtype fp32
      reshard synth --like deepseek-v3 --layers 4 --out ds3-4l   # FP8, as released
      reshard synth --like gpt-oss-120b --layers 2 --out oss-2l   # MXFP4 experts, as released
    """
    from tqdm.auto import tqdm

    from reshard.converters.lazy import CAST_DTYPES
    from reshard.errors import OutputError
    from reshard.synth import preset, synth_bytes, write_synth
    from reshard.units import human_bytes

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"--out {out}: exists and is not an empty directory")
    config, shard = preset(like, layers)
    torch_dtype = CAST_DTYPES[dtype]
    total = synth_bytes(config, torch_dtype)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="synth", disable=not _progress(quiet))
    with bar:
        written = write_synth(
            out, config, max_shard_size=shard, dtype=torch_dtype, seed=seed, on_bytes=bar.update
        )
    click.echo(
        f"wrote {like} with {config['num_hidden_layers']} layers ({human_bytes(written)}) to {out}"
    )


@cli.command()
@src_option
@layout_option
@dtype_option
def plan(src: str, layout: str, dtype: str) -> None:
    """Print the per-rank table (bytes, tensors, experts held) without writing anything.

    \b
    Examples:
      reshard plan --src tiny:qwen3_moe --layout ep4tp4
      reshard plan --src hf:Qwen/Qwen3-30B-A3B --layout ep8 --dtype bf16
    """
    from reshard.convert import make_plan
    from reshard.layout import Layout
    from reshard.modelcard import plan_table
    from reshard.sources import open_source
    from reshard.units import human_bytes

    p = make_plan(open_source(src), Layout.parse(layout), dtype)
    click.echo(
        f"{src} -> {p.layout.name}: {p.layout.world_size} ranks, mesh {dict(p.layout.dims) or {'tp': 1}}"
    )
    click.echo(plan_table(p))
    total = sum(p.rank_bytes(r) for r in range(p.layout.world_size))
    click.echo(f"total {human_bytes(total)} ({total:,} bytes: the free disk space convert needs)")


@cli.command()
@click.argument("directory", metavar="CHECKPOINT")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(directory: str, as_json: bool) -> None:
    """Show what a sharded checkpoint holds: layout, ranks, parameters and placements.

    CHECKPOINT is a directory or hf:org/name[@revision] (reads reshard.json only).

    \b
    Examples:
      reshard inspect tiny-ep2tp2
      reshard inspect tiny-ep2tp2 --json | jq .ranks
      reshard inspect hf:me/Qwen3-30B-A3B-ep4tp4
    """
    from reshard.checkpoint import open_checkpoint
    from reshard.units import human_bytes

    ckpt = open_checkpoint(directory, manifest_only=True)
    m = ckpt.manifest
    if as_json:
        click.echo(m.to_json())
        return
    click.echo(
        f"{directory}: {m.model_type}, layout {m.layout}, {m.world_size} ranks, from {m.source.get('spec')}"
    )
    for note in m.notes:
        click.echo(f"note: {note}")
    for r in m.ranks:
        coords = ", ".join(f"{k}={v}" for k, v in r.coords.items()) or "-"
        for f in r.files:
            click.echo(
                f"  {f.file}  {coords:<12}  {human_bytes(f.bytes):>9}  sha256 {f.sha256[:12]}"
            )
    click.echo(f"{len(m.params)} parameters:")
    for name, p in m.params.items():
        click.echo(
            f"  {name:<52} {str(p['shape']):<16} {p['dtype']:<5} {' '.join(p['placements'])}"
        )


@cli.command()
@click.argument("directory", metavar="CHECKPOINT")
@click.option(
    "--against",
    metavar="SRC",
    help="Also reassemble every tensor and compare bit-exactly with SRC.",
)
@quiet_option
def verify(directory: str, against: str | None, quiet: bool) -> None:
    """Re-hash every rank file; with --against, compare every global tensor with the source.

    CHECKPOINT is a directory or hf:org/name[@revision] (every rank file is downloaded).
    Exits 0 only when everything holds.

    \b
    Examples:
      reshard verify tiny-ep2tp2
      reshard verify tiny-ep2tp2 --against tiny:qwen3_moe
      reshard verify hf:me/Qwen3-30B-A3B-ep4tp4
    """
    # Against a source, a file is hashed as it is compared, in one read, unless it is in the
    # page cache: then the second read costs little, and the hash is done while torch imports.
    _hash_while_importing(directory, rank_files=True, cached_only=bool(against))
    from tqdm.auto import tqdm

    from reshard.checkpoint import open_checkpoint
    from reshard.verify import check_against, check_files, missing_from

    ckpt = open_checkpoint(directory)
    total = ckpt.layout.world_size
    if against:
        from reshard.convert import make_plan
        from reshard.sources import open_source

        plan = make_plan(open_source(against), ckpt.layout, ckpt.manifest.dtype)
        # Sizes and own headers first: a missing or cut file stops here.
        checks = found = list(check_files(ckpt, hash=False))
        if all(f.ok for f in found):
            checks = check_against(ckpt, plan)
            total += len(ckpt.params) + len(missing_from(ckpt, plan))
    else:
        checks = check_files(ckpt)
    failures = 0
    for finding in tqdm(checks, total=total, desc="verify", disable=not _progress(quiet)):
        if not finding.ok:
            failures += 1
            click.echo(f"FAIL {finding.what}", err=True)
    if failures:
        raise SystemExit(1)
    click.echo(
        f"ok: {directory} ({ckpt.layout.world_size} rank files"
        + (f", {len(ckpt.params)} tensors bit-exact vs {against})" if against else ")")
    )


device_option = click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default=None,
    help="cpu (gloo) or cuda (NCCL); default cuda when available.",
)
timeout_option = click.option(
    "--timeout",
    type=float,
    default=300.0,
    show_default=True,
    help="Collective timeout in seconds: no rank waits longer.",
)


def _nodes_options(f):
    f = click.option(
        "--rdzv-endpoint", metavar="HOST:PORT", help="torchrun rendezvous endpoint (several nodes)."
    )(f)
    f = click.option(
        "--node-rank",
        type=int,
        default=0,
        show_default=True,
        help="This node's rank (several nodes).",
    )(f)
    f = click.option(
        "--nnodes",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Number of nodes.",
    )(f)
    return f


def _checkpoint(src: str | Path, layout: str | None, quiet: bool):
    """SRC as a finished sharded checkpoint: as given (a directory or hf:org/name), or, with
    --layout of another layout or a source that is not sharded, converted into the cache."""
    from reshard.checkpoint import ShardedCheckpoint
    from reshard.layout import Layout
    from reshard.manifest import MANIFEST

    src = str(src)
    wanted = Layout.parse(layout).name if layout else None
    ckpt = None
    if src.startswith("hf:"):
        from reshard.hub import open_hub_checkpoint

        ckpt = open_hub_checkpoint(src)  # manifest and small files only: ranks fetch their own
    elif (Path(src).expanduser() / MANIFEST).is_file() or not layout:
        ckpt = _check_files(ShardedCheckpoint(Path(src).expanduser()))
    if ckpt is not None and wanted in (None, ckpt.layout.name):
        return ckpt
    if not layout:
        raise ReshardError(f"{src}: not a sharded checkpoint; pass --layout to convert it first")
    from reshard.convert import convert_cached
    from reshard.machine import cache_root
    from reshard.sources import open_source

    out = convert_cached(
        open_source(src),
        Layout.parse(layout),
        cache_root() / "converted",
        progress=_progress(quiet),
    )
    return _check_files(ShardedCheckpoint(out))


def _check_files(ckpt):
    """Cheap checks of every rank file before any rank starts (each rank re-hashes its own)."""
    for rank in range(ckpt.layout.world_size):
        ckpt.check_rank_file(rank, hash=False)
    return ckpt


@cli.command()
@click.argument("src")
@click.option("--prompt", help="Text to continue.")
@click.option(
    "--prompt-file",
    type=click.Path(path_type=Path),
    help='Prompts to continue: one per line, or JSONL ({"prompt": ...} per line, when the '
    "name ends in .jsonl). Each completion is printed after the batch.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="With --prompt-file: prompts generated together (left-padded to the longest; each row "
    "stops at its own end-of-sequence token).",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "bf16", "fp16", "fp32"]),
    default="auto",
    show_default=True,
    help="Compute dtype: auto keeps the checkpoint's.",
)
@click.option(
    "--compile",
    "compile_",
    is_flag=True,
    help="torch.compile the decode step before it is captured as a CUDA graph: faster decode "
    "(fused kernels), after tens of seconds of compiling per batch size. CUDA, one rank, bf16.",
)
@click.option(
    "--layout",
    metavar="LAYOUT",
    help="With an HF source, or a sharded one of another layout: convert (or reshard) to this "
    "layout first, cached. " + LAYOUT_HELP,
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Stop after this many generated tokens (earlier at an end-of-sequence token); the "
    "prompt plus these must fit the model's context.",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Softmax temperature for sampling; 0 = greedy (the most likely token, deterministic).",
)
@click.option(
    "--top-p",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=1.0,
    show_default=True,
    help="Nucleus sampling: draw from the smallest set of tokens holding this much probability. "
    "Needs --temperature > 0.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Sampling seed (same on every rank)."
)
@click.option("--chat", is_flag=True, help="Wrap the prompt in the checkpoint's chat template.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object: prompt_ids, output_ids, text (with --prompt-file: outputs, a "
    "list of them per prompt), tokens_per_s (overall), prefill_tokens_per_s (prompt tokens / "
    "time to the first new token) and decode_tokens_per_s (the other new tokens / their time).",
)
@device_option
@timeout_option
@_nodes_options
@quiet_option
def run(
    src,
    prompt,
    prompt_file,
    batch_size,
    dtype,
    compile_,
    layout,
    max_new_tokens,
    temperature,
    top_p,
    seed,
    chat,
    as_json,
    device,
    timeout,
    nnodes,
    node_rank,
    rdzv_endpoint,
    quiet,
) -> None:
    """Generate text with a sharded checkpoint, one process per rank (torchrun).

    SRC is a `reshard convert` output directory, or any source (HF directory,
    hf:org/name, tiny:qwen3_moe) together with --layout, converted on the fly
    into the cache. Rank 0 streams the text as it is generated.

    \b
    Examples:
      reshard run tiny-ep2tp2 --prompt "Why is the sky blue?"
      reshard run tiny:qwen3_moe --layout tp2 --prompt "Hello" --max-new-tokens 16 --json
      reshard run q3-ep4tp4 --prompt "Why is the sky blue?" --chat --device cuda
      reshard run q3-ep4tp4 --prompt-file prompts.jsonl --batch-size 32 --json
      reshard run q3-ep4tp4 --prompt "Hi" --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29500
    """
    from reshard.runtime.launch import Nodes, default_device, launch
    from reshard.runtime.text import TextCodec, read_prompt_file
    from reshard.runtime.worker import context_of

    if (prompt is None) == (prompt_file is None):
        raise ReshardError("give --prompt TEXT or --prompt-file FILE (one of them)")
    if batch_size > 1 and prompt_file is None:
        raise ReshardError("--batch-size needs --prompt-file (a batch of one --prompt is one row)")

    if top_p < 1 and temperature == 0:
        raise ReshardError(
            f"--top-p {top_p}: nucleus sampling needs --temperature > 0 "
            "(with --temperature 0, decoding is greedy and top-p would be ignored)"
        )
    ckpt = _checkpoint(src, layout, quiet)
    # Refused here, in one line, before any rank starts (each rank checks again).
    codec = TextCodec(ckpt.directory)
    for text in read_prompt_file(prompt_file) if prompt_file else [prompt]:
        codec.encode_prompt(
            text, chat=chat, max_new_tokens=max_new_tokens, context=context_of(ckpt)
        )
    worker_args = (
        ["--prompt-file", str(prompt_file.resolve())] if prompt_file else ["--prompt", prompt]
    )
    worker_args += ["--batch-size", str(batch_size), "--dtype", dtype] + ["--compile"] * compile_
    worker_args += [
        "--max-new-tokens",
        str(max_new_tokens),
        "--temperature",
        str(temperature),
    ]
    worker_args += ["--top-p", str(top_p), "--seed", str(seed), "--timeout", str(timeout)]
    worker_args += ["--chat"] * chat + ["--json"] * as_json
    nodes = Nodes(nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint)
    launch(
        "run",
        ckpt.spec,
        ckpt.layout.world_size,
        worker_args,
        device=device or default_device(),
        nodes=nodes,
    )


@cli.command()
@click.argument("directory", metavar="CHECKPOINT")
@click.option(
    "--against",
    required=True,
    metavar="SRC",
    help="The source checkpoint to compare with. " + SRC_HELP,
)
@click.option(
    "--reference",
    type=click.Choice(["streamed", "transformers"]),
    default="streamed",
    show_default=True,
    help="streamed: our model code, unsharded, one layer in memory at a time; transformers: its own model.",
)
@click.option(
    "--tolerance", type=float, default=1e-4, show_default=True, help="Max abs diff allowed (fp32)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
@device_option
@timeout_option
@_nodes_options
def validate(
    directory,
    against,
    reference,
    tolerance,
    as_json,
    device,
    timeout,
    nnodes,
    node_rank,
    rdzv_endpoint,
) -> None:
    """Check a sharded checkpoint numerically: parallel forward+backward vs a single-process reference.

    Runs a fixed batch (3 x 13 tokens) through the parallel model under the
    checkpoint's layout, in fp32, and compares logits, loss and every rank's
    local gradient shard with the reference on SRC. Exits 0 only when every
    max abs diff is within --tolerance.

    \b
    Examples:
      reshard validate tiny-ep2tp2 --against tiny:qwen3_moe
      reshard validate q3-ep4tp4 --against hf:Qwen/Qwen3-30B-A3B --json
    """
    import json as json_lib
    import tempfile

    from reshard.runtime.launch import Nodes, default_device, launch
    from reshard.runtime.reference import fixed_batch, streamed_reference, transformers_reference
    from reshard.sources import open_source

    ckpt = _checkpoint(directory, None, quiet=True)
    if ckpt.manifest.quantization:
        # Its weights stay float8 and are not trained here: there are no gradients to compare.
        kind = ckpt.manifest.quantization["quant_method"].upper()
        raise ReshardError(
            f"{directory}: validate compares fp32 logits and gradients, and this checkpoint keeps "
            f"{kind} weights; validate a conversion of the same source with --dtype fp32"
        )
    source = open_source(against)
    vocab = ckpt.manifest.config["vocab_size"]
    with tempfile.TemporaryDirectory(prefix="reshard-validate-") as tmp:
        ref_file, result_file = Path(tmp) / "reference.safetensors", Path(tmp) / "result.json"
        make_ref = transformers_reference if reference == "transformers" else streamed_reference
        make_ref(source, fixed_batch(vocab), ref_file)
        worker_args = [
            "--reference-file",
            str(ref_file),
            "--result-file",
            str(result_file),
            "--timeout",
            str(timeout),
        ]
        nodes = Nodes(nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint)
        launch(
            "validate",
            ckpt.spec,
            ckpt.layout.world_size,
            worker_args,
            device=device or default_device(),
            nodes=nodes,
        )
        if not result_file.is_file():
            return  # not the node that holds rank 0
        result = json_lib.loads(result_file.read_text())
    result["reference"], result["tolerance"] = reference, tolerance
    result["ok"] = all(v <= tolerance for v in result["max_abs_diff"].values())
    if as_json:
        click.echo(json_lib.dumps(result))
    else:
        d = result["max_abs_diff"]
        click.echo(
            f"{result['layout']} ({result['world_size']} ranks) vs {reference} reference: loss {result['loss']:.6f}; "
            f"max abs diff logits {d['logits']:.2e}, loss {d['loss']:.2e}, grads {d['grad']:.2e} "
            f"({result['params_checked']} params) -> {'OK' if result['ok'] else 'FAIL'} (tolerance {tolerance:g})"
        )
    if not result["ok"]:
        raise SystemExit(1)


@cli.command()
@click.option("--layout", default="ep2tp2", show_default=True, help=LAYOUT_HELP)
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("tiny-ep2tp2"), show_default=True
)
@click.option("--prompt", default="Why is the sky blue?", show_default=True)
@click.pass_context
def quickstart(ctx, layout: str, out: Path, prompt: str) -> None:
    """Convert -> verify -> validate -> run on the built-in tiny:qwen3_moe, on CPU ranks.

    \b
    Example:
      reshard quickstart            # 4 CPU ranks, layout ep2tp2
      reshard quickstart --layout tp4-tp2ep --out tiny-tp4-tp2ep
    """
    steps = [
        (
            convert,
            dict(
                src="tiny:qwen3_moe",
                layout=layout,
                out=out,
                dtype="keep",
                workers=None,
                overwrite=False,
                quiet=True,
            ),
        ),
        (verify, dict(directory=str(out), against="tiny:qwen3_moe", quiet=True)),
        (
            validate,
            dict(
                directory=str(out),
                against="tiny:qwen3_moe",
                reference="streamed",
                tolerance=1e-4,
                as_json=False,
                device="cpu",
                timeout=300.0,
                nnodes=1,
                node_rank=0,
                rdzv_endpoint=None,
            ),
        ),
    ]
    for command, kwargs in steps:
        click.secho(f"$ reshard {command.name} ...", fg="cyan", err=True)
        ctx.invoke(command, **kwargs)
    click.secho(f"$ reshard run {out} --prompt {prompt!r} --max-new-tokens 24", fg="cyan", err=True)
    ctx.invoke(
        run,
        src=str(out),
        prompt=prompt,
        layout=None,
        max_new_tokens=24,
        temperature=0.0,
        top_p=1.0,
        seed=0,
        chat=False,
        as_json=False,
        device="cpu",
        timeout=300.0,
        nnodes=1,
        node_rank=0,
        rdzv_endpoint=None,
        quiet=True,
    )


_stop_signal: int | None = None  # set once SIGINT or SIGTERM arrives


def _on_stop_signal(signum: int, frame: object) -> None:
    global _stop_signal
    _stop_signal = signum
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    sys.exit(128 + signum)


def main() -> None:
    """Entry point: every error becomes one line on stderr and exit code 1 (130 on Ctrl-C)."""
    # SIGTERM unwinds like Ctrl-C, so `finally` blocks remove temp files and stop workers.
    signal.signal(signal.SIGINT, _on_stop_signal)
    signal.signal(signal.SIGTERM, _on_stop_signal)
    share_malloc_arenas()  # before any thread: hashing starts while torch imports
    # At exit the interpreter garbage-collects every object torch made at import: 0.7 s on the
    # 2-core VM after each command, 0.2 s with them frozen out of collection first (the last
    # exit handler to run, as it is the first registered). Other handlers and finalizers run.
    atexit.register(gc.freeze)
    # tqdm starts a daemon "monitor" thread with its first bar, even a disabled one (--quiet),
    # and its exit handler wakes that thread without waiting for it. CPython 3.11 frees a
    # daemon thread's state while finalizing, and one that wakes then crashes the interpreter
    # (SIGSEGV in take_gil): a `convert` that had written and reported every rank file exited
    # -11, once in about 80 commands. The monitor only refreshes bars whose loop stalls; ours
    # advance every few MB.
    from tqdm import tqdm

    tqdm.monitor_interval = 0
    if not os.environ.get("RESHARD_DEBUG"):
        # huggingface_hub logs each retry as a warning; the outcome is our one line.
        from huggingface_hub.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:
        if _stop_signal is not None:
            # A signal raised inside a C extension (safetensors, torch) can come out as some
            # other exception: the user asked to stop, so this is the stop, not an error.
            click.echo("aborted", err=True)
            sys.exit(128 + _stop_signal)
        # Our own errors are the user's to fix; anything else is a bug of ours, still one line.
        if os.environ.get("RESHARD_DEBUG"):
            raise
        message = str(e) if isinstance(e, ReshardError) else f"unexpected {type(e).__name__}: {e}"
        click.echo(f"error: {message}", err=True)
        click.echo("(set RESHARD_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
