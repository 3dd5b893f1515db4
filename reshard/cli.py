"""The `reshard` command line. The root only wires commands; each lives in a few lines here."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from reshard.errors import ReshardError

SRC_HELP = (
    "Source checkpoint: a local HF directory, hf:org/name[@revision], or tiny:qwen3_moe (built in)."
)
LAYOUT_HELP = (
    "Parallel layout: [dp<N>][ep<N>][tp<N>][-sp][-tp2ep], e.g. tp4, ep8, ep4tp4, tp4-tp2ep, tp2-sp."
)

src_option = click.option("--src", required=True, metavar="SRC", help=SRC_HELP)
layout_option = click.option("--layout", required=True, metavar="LAYOUT", help=LAYOUT_HELP)
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")


def _progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="reshard")
def cli() -> None:
    """Turn Hugging Face MoE checkpoints into per-rank shards for any TP/EP/SP layout, and run them.

    \b
    Examples:
      reshard convert --src tiny:qwen3_moe --layout ep2tp2 --out tiny-ep2tp2
      reshard plan --src hf:Qwen/Qwen3-30B-A3B --layout ep4tp4
      reshard verify tiny-ep2tp2 --against tiny:qwen3_moe
    """


@cli.command()
@src_option
@layout_option
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Output directory (created)."
)
@click.option(
    "--dtype",
    type=click.Choice(["keep", "bf16", "fp16", "fp32"]),
    default="keep",
    show_default=True,
    help="Cast floating-point tensors while writing.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Ranks written in parallel.",
)
@quiet_option
def convert(src: str, layout: str, out: Path, dtype: str, workers: int, quiet: bool) -> None:
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
    """
    from reshard.convert import convert as run_convert
    from reshard.convert import make_plan
    from reshard.layout import Layout
    from reshard.modelcard import human_bytes
    from reshard.sources import open_source

    plan = make_plan(open_source(src), Layout.parse(layout), dtype)
    manifest = run_convert(plan, out, workers=workers, progress=_progress(quiet))
    total = sum(r.bytes for r in manifest.ranks)
    click.echo(
        f"wrote {manifest.world_size} rank files ({human_bytes(total)}) for {manifest.layout} to {out}"
    )


@cli.command()
@src_option
@layout_option
@click.option(
    "--dtype",
    type=click.Choice(["keep", "bf16", "fp16", "fp32"]),
    default="keep",
    show_default=True,
)
def plan(src: str, layout: str, dtype: str) -> None:
    """Print the per-rank table (bytes, tensors, experts held) without writing anything.

    \b
    Examples:
      reshard plan --src tiny:qwen3_moe --layout ep4tp4
      reshard plan --src hf:Qwen/Qwen3-30B-A3B --layout ep8 --dtype bf16
    """
    from reshard.convert import make_plan
    from reshard.layout import Layout
    from reshard.modelcard import human_bytes, rank_table
    from reshard.sources import open_source

    p = make_plan(open_source(src), Layout.parse(layout), dtype)
    click.echo(
        f"{src} -> {p.layout.name}: {p.layout.world_size} ranks, mesh {dict(p.layout.dims) or {'tp': 1}}"
    )
    click.echo(rank_table(p))
    total = sum(p.rank_bytes(r) for r in range(p.layout.world_size))
    click.echo(f"total {human_bytes(total)}")


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(directory: Path, as_json: bool) -> None:
    """Show what a sharded checkpoint holds: layout, ranks, parameters and placements.

    \b
    Examples:
      reshard inspect tiny-ep2tp2
      reshard inspect tiny-ep2tp2 --json | jq .ranks
    """
    from reshard.checkpoint import ShardedCheckpoint
    from reshard.modelcard import human_bytes

    ckpt = ShardedCheckpoint(directory)
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
        click.echo(f"  {r.file}  {coords:<12}  {human_bytes(r.bytes):>9}  sha256 {r.sha256[:12]}")
    click.echo(f"{len(m.params)} parameters:")
    for name, p in m.params.items():
        click.echo(
            f"  {name:<52} {str(p['shape']):<16} {p['dtype']:<5} {' '.join(p['placements'])}"
        )


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option(
    "--against",
    metavar="SRC",
    help="Also reassemble every tensor and compare bit-exactly with SRC.",
)
@quiet_option
def verify(directory: Path, against: str | None, quiet: bool) -> None:
    """Re-hash every rank file; with --against, compare every global tensor with the source.

    Exits 0 only when everything holds.

    \b
    Examples:
      reshard verify tiny-ep2tp2
      reshard verify tiny-ep2tp2 --against tiny:qwen3_moe
    """
    from tqdm.auto import tqdm

    from reshard.checkpoint import ShardedCheckpoint
    from reshard.verify import check_against, check_files

    ckpt = ShardedCheckpoint(directory)
    checks = check_files(ckpt)
    total = ckpt.layout.world_size
    if against:
        from reshard.convert import make_plan
        from reshard.sources import open_source

        plan = make_plan(open_source(against), ckpt.layout, _dtype_name(ckpt))
        first = list(checks)
        checks = iter(
            first + list(check_against(ckpt, plan)) if all(f.ok for f in first) else first
        )
        total += len(ckpt.params)
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


def _dtype_name(ckpt) -> str:
    """The --dtype that reproduces the checkpoint's dtypes from its source."""
    import torch

    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    dtypes = {names.get(p.dtype, "keep") for p in ckpt.params.values()}
    return dtypes.pop() if len(dtypes) == 1 else "keep"


def main() -> None:
    """Entry point: the tool's own errors become one line on stderr and exit code 1."""
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
    except ReshardError as e:
        if os.environ.get("RESHARD_DEBUG"):
            raise
        click.echo(f"error: {e}", err=True)
        click.echo("(set RESHARD_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
