"""How long `reshard convert` takes against what moving the bytes costs, on one machine.

    python benchmarks/convert.py --layers 2 --rounds 2 --json convert.json

On a `reshard synth --like qwen3-30b-a3b` checkpoint of a few layers (written first, or
given with --src), in one run, in rounds of every row. Each round runs the rows in its own
shuffled order (a conversion's no-op and verify rows right after it): on a VM whose host
caches the disk, a row that follows a big write pays for the host's write-back of it (1-2 s
after a 3.7 GB `cp`), and in a fixed order every first conversion followed one
(docs/benchmarks.md, twelfth session).

| row             | what runs                                                               |
| --------------- | ----------------------------------------------------------------------- |
| cp              | `cp -r SRC` to the same disk, then `sync` (the floor)                   |
| cp x2           | two copies, one after the other, then `sync`: the floor for a layout    |
|                 | that writes twice the source (replicated embeddings, ep4tp4)            |
| reshard LAYOUT  | `reshard convert --src SRC --layout LAYOUT` (fresh --out, fresh          |
|                 | $RESHARD_CACHE: the source is hashed as on a first conversion), `sync`  |
| ... from hf:    | the same from `hf:` (SRC laid out as a Hub cache, offline): as after a  |
|                 | download, the source's sha256s are the blobs' names, not computed       |
| naive LAYOUT    | benchmarks/naive_convert.py (load, fuse, chunk, save_file), then `sync` |
| verify LAYOUT   | `reshard verify OUT --against SRC`                                      |
| no-op LAYOUT    | `reshard convert` again into the finished --out                         |

For each: median wall time, bytes written, GB/s, two ratios to cp, and peak RSS (the
command's own, see convert_memory.py). "x cp same bytes" is the issue's target: the row's time
over cp's for as many bytes, on the line through the cp and cp x2 medians. The VM's disk takes
its first 4 GB or so at 0.45-0.9 GB/s and the rest at about 0.27 GB/s (docs/benchmarks.md,
sixteenth session), so one copy of a 3.7 GB source stays fast and twice as many bytes do not:
per byte of one copy, a row that writes 7.7 GB paid for the disk's slow part. "x cp per byte"
is that older figure, (t / bytes) / (t_cp / bytes_cp). verify counts the bytes of the
checkpoint it reads, a no-op the source's. Every row starts with the source in the page cache
(read, untimed, before it), as in the issue's figures; `--drop-caches` (root) drops the cache
before every command instead. `--rows` runs only the rows it names.

`--sizes 2,4,8 --plot convert.png` instead measures cp, a first conversion to each layout
and the naive script (first layout only, where the machine has the memory it takes: about
twice the checkpoint) on synth checkpoints of 2, 4 and 8 layers, and plots time against
checkpoint size (needs matplotlib: `pip install matplotlib`). It also fits each row's times
to a line, wall = fixed + bytes written / rate, to tell the cost per byte from the cost of
starting (`import torch`, about 1.5 s on the 2-core VM), which a few layers magnify: the
per-byte ratio to cp is the slope's, what it tends to on a whole checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_memory import measure  # noqa: E402 - the same RSS launcher

HERE = Path(__file__).resolve().parent
GB = 1e9


def reshard_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "reshard.cli", *args]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def sync() -> None:
    subprocess.run(["sync"], check=True)


def drop_caches() -> None:
    sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def warm(src: Path) -> None:
    """Read the source into the page cache (untimed). The naive script's 6-12 GB of memory
    evicts part of it, and the row after it would otherwise start colder than the others:
    every first-conversion row followed one, and paid 2-4 s for it on the 2-core VM."""
    buffer = bytearray(16 << 20)
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        with open(f, "rb", buffering=0) as file:
            while file.readinto(buffer):
                pass


def run_row(name: str, cmd: list[str], out: Path | None, drop: bool, src: Path) -> dict:
    if drop:
        drop_caches()
    else:
        warm(src)
        sync()  # the last row's deletions too: this row's sync times its own writes only
    if name.startswith("reshard "):  # a first conversion: no source hash remembered
        cache = Path(os.environ["RESHARD_CACHE"])
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
    m = measure(cmd)
    # Timed: the data is on disk, not only in the page cache. A row that writes with direct I/O
    # has paid for its disk writes already; one that writes through the page cache (cp, the
    # naive script) pays for them here. Every row starts with nothing dirty (the last one synced).
    start = time.perf_counter()
    sync()
    sync_s = time.perf_counter() - start
    return {
        "row": name,
        "wall_s": m.wall_s + sync_s,
        "sync_s": sync_s,
        "peak_rss": m.peak_rss,
        "bytes_written": dir_bytes(out) if out is not None and out.exists() else 0,
    }


def rounds(
    src: Path, work: Path, layouts: list[str], n: int, drop: bool, only: tuple[str, ...] = ()
) -> list[dict]:
    os.environ["RESHARD_CACHE"] = str(work / "cache")  # the hash cache the rows see
    hub = None
    if not only or any(name.endswith(HUB_ROW) for name in only):
        os.environ |= {"HF_HUB_CACHE": str(work / "hub"), "HF_HUB_OFFLINE": "1"}
        hub = hub_cache(src, work / "hub")
    results = []
    for r in range(n):
        groups = list(_groups(src, work, layouts, hub))
        random.Random(r).shuffle(groups)  # seeded: a rerun runs the same orders
        for group in groups:
            made = []
            for name, make in group:
                if only and name not in only:
                    continue
                out, cmd = make()
                print(f"round {r + 1}/{n}: {name}", end="", file=sys.stderr, flush=True)
                results.append(run_row(name, cmd, out, drop, src))
                print(f"  {results[-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
                made += [out] if out is not None else []
            # A conversion's output stays for the no-op and verify rows of its group, no longer:
            # with cp x2's copies, three kept at 8 layers overfilled the host's 64 GB disk.
            for out in made:
                shutil.rmtree(out, ignore_errors=True)
    return results


HUB_REPO = "reshard-bench/synth"
HUB_ROW = " from hf:"


def hub_cache(src: Path, cache: Path) -> str:
    """`src` laid out as a Hugging Face Hub cache holds a downloaded model: blobs named by
    their sha256 (hard links to `src`'s files where the disk allows), snapshot symlinks,
    refs/main. Converting `hf:` from it is `reshard convert --src hf:org/name` after a
    download: the source's sha256s are the blobs' names, not hashed again. Built untimed."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    from reshard.hash_cache import sha256_file

    files = sorted(f for f in src.iterdir() if f.is_file())
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        names = dict(zip(files, pool.map(sha256_file, files)))
    commit = hashlib.sha1("".join(sorted(names.values())).encode()).hexdigest()
    repo = cache / ("models--" + HUB_REPO.replace("/", "--"))
    shutil.rmtree(repo, ignore_errors=True)
    snapshot = repo / "snapshots" / commit
    for d in (repo / "blobs", repo / "refs", snapshot):
        d.mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for f, digest in names.items():
        blob = repo / "blobs" / digest
        try:
            os.link(f, blob)
        except OSError:  # another file system
            shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    return f"hf:{HUB_REPO}"


def _groups(src: Path, work: Path, layouts: list[str], hub: str | None = None):
    """The rows, as groups that run in order: a conversion, then its no-op and verify rows;
    every other row is a group of its own. Each row is (name, make: () -> (out, command))."""

    def fresh(path: Path) -> Path:
        shutil.rmtree(path, ignore_errors=True)
        return path

    def convert(source: str, layout: str, out: Path) -> list[str]:
        return reshard_cmd("convert", "--src", source, "--layout", layout, "--out", str(out), "-q")

    yield [("cp", lambda: (fresh(work / "cp"), ["cp", "-r", str(src), str(work / "cp")]))]
    yield [("cp x2", lambda: (_mkdir(fresh(work / "cp2")), _two_copies(src, work / "cp2")))]
    for layout in layouts:
        out = work / f"reshard-{layout}"
        yield [
            (
                f"reshard {layout}",
                lambda out=out, layout=layout: (fresh(out), convert(str(src), layout, out)),
            ),
            (
                f"no-op {layout}",
                lambda out=out, layout=layout: (None, convert(str(src), layout, out)),
            ),
            (
                f"verify {layout}",
                lambda out=out: (
                    None,
                    reshard_cmd("verify", str(out), "--against", str(src), "-q"),
                ),
            ),
        ]
        # Not between a conversion and its no-op and verify rows (a group runs whole): it
        # empties $RESHARD_CACHE, where they find the rank files' hashes.
        if hub is not None:
            hub_out = work / f"reshard-hub-{layout}"
            yield [
                (
                    f"reshard {layout}{HUB_ROW}",
                    lambda out=hub_out, layout=layout: (fresh(out), convert(hub, layout, out)),
                )
            ]
        naive = work / f"naive-{layout}"
        naive_cmd = [sys.executable, str(HERE / "naive_convert.py"), str(src), str(naive)]
        yield [
            (
                f"naive {layout}",
                lambda naive=naive, cmd=naive_cmd + ["--layout", layout]: (fresh(naive), cmd),
            )
        ]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _two_copies(src: Path, out: Path) -> list[str]:
    return ["sh", "-c", 'cp -r "$0" "$1/a" && cp -r "$0" "$1/b"', str(src), str(out)]


def cp_seconds(rows: dict[str, list[dict]]) -> Callable[[float], float]:
    """cp's time for a number of bytes: the line through the medians of cp and cp x2, or, with
    cp alone (a sweep's rows), cp's time per byte."""
    points = [
        (rows[name][0]["bytes_written"], statistics.median(r["wall_s"] for r in rows[name]))
        for name in ("cp", "cp x2")
        if name in rows
    ]
    if len(points) == 1:
        ((b, t),) = points
        return lambda n: t * n / b
    (b1, t1), (b2, t2) = points
    slope = (t2 - t1) / (b2 - b1)
    return lambda n: t1 + slope * (n - b1)


def summarize(results: list[dict], source_bytes: int) -> list[dict]:
    rows: dict[str, list[dict]] = {}
    for r in results:
        rows.setdefault(r["row"], []).append(r)
    cp = rows["cp"]
    cp_s, cp_bytes = statistics.median(r["wall_s"] for r in cp), cp[0]["bytes_written"]
    cp_for = cp_seconds(rows)
    out = []
    for name, rs in rows.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        written = rs[0]["bytes_written"]
        # verify reads every byte of the checkpoint it checks (what `reshard LAYOUT` wrote);
        # a no-op writes nothing: per source byte
        verified = (
            rows.get(name.replace("verify ", "reshard ", 1)) if name.startswith("verify") else None
        )
        moved = written or (verified[0]["bytes_written"] if verified else source_bytes)
        out.append(
            {
                "row": name,
                "wall_s": wall,
                "bytes_written": written,
                "gb_per_s": moved / wall / GB,
                "vs_cp_same_bytes": wall / cp_for(moved),
                "vs_cp_per_byte": (wall / moved) / (cp_s / cp_bytes),
                "peak_rss_mb": max(r["peak_rss"] for r in rs) / 2**20,
            }
        )
    return out


def print_table(rows: list[dict]) -> None:
    print("| row | wall s | GB written | GB/s | x cp same bytes | x cp per byte | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['row']} | {r['wall_s']:.1f} | {r['bytes_written'] / GB:.2f} | "
            f"{r['gb_per_s']:.2f} | {r['vs_cp_same_bytes']:.2f} | {r['vs_cp_per_byte']:.2f} | "
            f"{r['peak_rss_mb']:,.0f} |"
        )


def torch_start(n: int = 3, module: str = "torch") -> dict:
    """`import torch` in a fresh interpreter (median of `n`), which every reshard and naive row
    pays and `cp` does not, and whether torch's bytecode is cached. Where it is not (a host
    with PYTHONDONTWRITEBYTECODE=1 and a torch installed without .pyc files), every import
    compiles torch's source: 3.7-5 s on the 16-core host against 1.5-1.9 s compiled
    (docs/benchmarks.md, sixteenth session). pip compiles at install, so users have it."""
    import importlib.util

    times = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
        times.append(time.perf_counter() - start)
    origin = importlib.util.find_spec(module).origin
    return {
        "import_torch_s": statistics.median(times),
        "bytecode_cached": Path(importlib.util.cache_from_source(origin)).is_file(),
    }


def print_start(start: dict) -> None:
    print(f"import torch: {start['import_torch_s']:.1f} s (median), in every reshard row")
    if not start["bytecode_cached"]:
        print(
            "  torch's bytecode is not cached here, so every import compiles it; as pip leaves "
            "an install: python -m compileall -q " + str(Path(sysconfig.get_paths()["purelib"]))
        )


def synth(src: Path, layers: int) -> Path:
    if not (src / "config.json").exists():
        shutil.rmtree(src, ignore_errors=True)
        subprocess.run(
            reshard_cmd("synth", "--like", "qwen3-30b-a3b", "--layers", str(layers),
                        "--out", str(src), "-q"),
            check=True,
        )  # fmt: skip
    return src


def sweep(work: Path, sizes: list[int], layouts: list[str], n: int, drop: bool) -> list[dict]:
    """cp, reshard to each layout and naive on synth checkpoints of each size: the points of the
    plot and of the fit."""
    points = []
    for layers in sizes:
        src = synth(work / f"src-{layers}", layers)
        only = ("cp", *(f"reshard {layout}" for layout in layouts))
        if naive_fits(dir_bytes(src)):
            only += (f"naive {layouts[0]}",)
        else:
            print(f"{layers} layers: no naive row (it holds about twice the checkpoint in memory)")
        rows = summarize(rounds(src, work, layouts, n, drop, only=only), dir_bytes(src))
        for row in rows:
            points.append({**row, "layers": layers, "source_bytes": dir_bytes(src)})
        shutil.rmtree(src, ignore_errors=True)
    return points


def naive_fits(source_bytes: int) -> bool:
    """Whether the naive script (the whole checkpoint, and a fused copy of its experts, in
    memory: 11.8 GB of peak RSS for a 6.2 GB source) fits in the memory available."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return True  # not Linux: let it try
    return 2.2 * source_bytes < available


def per_byte(points: list[dict]) -> list[dict]:
    """Each row's times fitted to wall = fixed + bytes written x seconds per byte (least
    squares over the sizes), and that slope as a ratio to cp's."""
    by_row: dict[str, list[dict]] = {}
    for q in points:
        by_row.setdefault(q["row"], []).append(q)
    fits = {}
    for row, qs in by_row.items():
        if len({q["bytes_written"] for q in qs}) < 2:
            continue  # one size: no line through it
        fit = statistics.linear_regression(
            [q["bytes_written"] / GB for q in qs], [q["wall_s"] for q in qs]
        )
        fits[row] = {"row": row, "fixed_s": fit.intercept, "s_per_gb": fit.slope}
    for fit in fits.values():
        fit["vs_cp_per_byte"] = fit["s_per_gb"] / fits["cp"]["s_per_gb"] if "cp" in fits else None
    return list(fits.values())


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = list(dict.fromkeys(p["row"] for p in points))
    styles = {"cp": "k--o", "naive": "C3-s"}
    for k, row in enumerate(rows):
        mine = [p for p in points if p["row"] == row]
        style = styles.get(row.split()[0], f"C{[0, 1, 2, 4, 5][k % 5]}-o")
        ax.plot(
            [p["source_bytes"] / GB for p in mine], [p["wall_s"] for p in mine], style, label=row
        )
    ax.set_xlabel("checkpoint size, GB (synth Qwen3-30B-A3B, 1 layer = 1.2 GB)")
    ax.set_ylabel("wall time, s (median)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--src", type=Path, help="an existing checkpoint (default: synth one)")
    p.add_argument("--layers", type=int, default=2, help="layers of the synth Qwen3-30B-A3B")
    p.add_argument("--layouts", default="tp4-tp2ep,ep4tp4,tp8")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--work",
        type=Path,
        help="parent of the scratch directory (removed at the end), on the disk to measure",
    )
    p.add_argument("--drop-caches", action="store_true", help="cold page cache (needs root)")
    p.add_argument(
        "--rows",
        help="only these rows, by their names as printed: e.g. 'cp,cp x2,reshard tp8,verify tp8'",
    )
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--sizes", help="layer counts to sweep, e.g. 2,4,8 (cp, reshard, naive)")
    p.add_argument("--plot", type=Path, help="with --sizes: write the PNG here")
    args = p.parse_args(argv)
    if args.plot:
        try:
            import matplotlib  # noqa: F401 - checked now, not after the whole sweep
        except ImportError:
            p.error("--plot needs matplotlib: pip install matplotlib")
    if args.rows:
        groups = _groups(Path(), Path(), args.layouts.split(","), HUB_REPO)  # names only
        known = [name for group in groups for name, _ in group]
        if "cp" not in args.rows.split(","):
            p.error("--rows: include cp, the floor every ratio is to")
        if unknown := [name for name in args.rows.split(",") if name not in known]:
            p.error(f"--rows: no row named {', '.join(map(repr, unknown))}; rows: {known}")
    if args.src and not (args.src / "config.json").is_file():
        p.error(f"--src {args.src}: not a checkpoint directory (no config.json)")
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
    # Everything a run writes (copies, conversions, a synth source: tens of GB) goes under a
    # directory of its own, removed at the end, on --work's disk or the temp directory's.
    work = Path(tempfile.mkdtemp(prefix="reshard-bench-", dir=args.work))
    try:
        return _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path) -> int:
    layouts = args.layouts.split(",")
    start = torch_start()
    print_start(start)
    if args.sizes:
        points = sweep(
            work, [int(x) for x in args.sizes.split(",")], layouts, args.rounds, args.drop_caches
        )
        print(f"{os.cpu_count()} CPUs, {args.rounds} rounds")
        print("| layers | source GB | row | wall s | GB written | x cp per byte | peak RSS MB |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for q in points:
            print(
                f"| {q['layers']} | {q['source_bytes'] / GB:.2f} | {q['row']} | {q['wall_s']:.1f} | "
                f"{q['bytes_written'] / GB:.2f} | {q['vs_cp_per_byte']:.2f} | "
                f"{q['peak_rss_mb']:,.0f} |"
            )
        fits = per_byte(points)
        print("\nFitted over the sizes: wall = fixed + GB written x s per GB")
        print("| row | fixed s | s per GB | x cp per byte (slope) |")
        print("| --- | --- | --- | --- |")
        for f in fits:
            ratio = f"{f['vs_cp_per_byte']:.2f}" if f["vs_cp_per_byte"] is not None else "-"
            print(f"| {f['row']} | {f['fixed_s']:.1f} | {f['s_per_gb']:.2f} | {ratio} |")
        if args.json:
            args.json.write_text(
                json.dumps({"points": points, "fits": fits, "start": start}, indent=2)
            )
        if args.plot:
            plot(points, args.plot, f"first conversion against cp, {os.cpu_count()} CPUs")
        return 0
    src = args.src or synth(work / "src", args.layers)
    only = tuple(args.rows.split(",")) if args.rows else ()
    results = rounds(src, work, layouts, args.rounds, args.drop_caches, only=only)
    rows = summarize(results, dir_bytes(src))
    print(
        f"source: {src} ({dir_bytes(src) / GB:.2f} GB), {os.cpu_count()} CPUs, {args.rounds} rounds"
    )
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "raw": results, "start": start}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
