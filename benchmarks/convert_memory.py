"""Peak RSS of `reshard convert` on a synthetic Qwen3-MoE checkpoint, against two baselines.

The claim under test: peak resident memory of a conversion is bounded by the
largest single output tensor shard plus a constant, never by model size. So the
benchmark writes an HF-layout checkpoint many times larger than that bound and
runs `reshard convert` in a subprocess for a few layouts, next to

  - import:  a process that imports reshard + torch and plans the conversion
             (opens the source, reads headers): the constant everything pays;
  - naive:   a process that loads every file with safetensors.torch.load_file
             and fuses the experts (what a rank does without slice pushdown).

Peak RSS is the command's own high-water mark (ru_maxrss from `os.wait4`, taken
by a small launcher process, see LAUNCHER), which counts resident file-backed
mmap pages too; while the command runs the launcher also samples
/proc/<pid>/status to split the peak into anonymous and file-backed pages.
The bound checked per layout: peak - import <= k * largest shard + c.

    python benchmarks/convert_memory.py                       # ~2.1 GB model, 3 layouts
    python benchmarks/convert_memory.py --layers 4 --layouts ep4,tp4 --keep
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20

# The import-only baseline: everything `reshard convert` does before reading tensor data.
IMPORT_ONLY = """
import sys
import tqdm.auto
import reshard.cli, reshard.modelcard
from reshard.convert import make_plan
from reshard.layout import Layout
from reshard.sources import open_source
make_plan(open_source(sys.argv[1]), Layout.parse(sys.argv[2]))
"""

# The naive baseline: load every file whole, then fuse each layer's experts.
NAIVE_LOAD = """
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
src = Path(sys.argv[1])
config = json.loads((src / "config.json").read_text())
state = {}
for f in sorted(src.glob("*.safetensors")):
    state.update(load_file(str(f)))
experts = config.get("num_experts") or config.get("n_routed_experts")
for layer in range(config["num_hidden_layers"]):
    p = f"model.layers.{layer}.mlp.experts"
    if f"{p}.0.gate_proj.weight" not in state:
        continue  # a dense layer
    E = range(experts)
    gate = torch.stack([state.pop(f"{p}.{e}.gate_proj.weight") for e in E])
    up = torch.stack([state.pop(f"{p}.{e}.up_proj.weight") for e in E])
    state[f"{p}.gate_up_proj"] = torch.cat([gate, up], dim=1)
    del gate, up
    state[f"{p}.down_proj"] = torch.stack([state.pop(f"{p}.{e}.down_proj.weight") for e in E])
print(sum(t.nbytes for t in state.values()))
"""


@dataclass(kw_only=True)
class Size:
    """Shape of the synthetic model; every tensor is bf16."""

    hidden: int
    layers: int
    experts: int
    moe_intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int

    def config(self) -> dict:
        from reshard.tiny import TINY_CONFIGS

        return dict(
            TINY_CONFIGS["qwen3_moe"],
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=4 * self.moe_intermediate,
            moe_intermediate_size=self.moe_intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            num_experts=self.experts,
            num_experts_per_tok=min(8, self.experts),
            max_position_embeddings=4096,
            torch_dtype="bfloat16",
        )


def _layer_shapes(s: Size, layer: int) -> dict[str, tuple[int, ...]]:
    """HF names and shapes of one decoder layer (per-expert tensors, as Qwen ships them)."""
    H, I, D = s.hidden, s.moe_intermediate, s.head_dim
    p = f"model.layers.{layer}"
    shapes = {
        f"{p}.input_layernorm.weight": (H,),
        f"{p}.post_attention_layernorm.weight": (H,),
        f"{p}.self_attn.q_proj.weight": (s.heads * D, H),
        f"{p}.self_attn.k_proj.weight": (s.kv_heads * D, H),
        f"{p}.self_attn.v_proj.weight": (s.kv_heads * D, H),
        f"{p}.self_attn.o_proj.weight": (H, s.heads * D),
        f"{p}.self_attn.q_norm.weight": (D,),
        f"{p}.self_attn.k_norm.weight": (D,),
        f"{p}.mlp.gate.weight": (s.experts, H),
    }
    for e in range(s.experts):
        shapes[f"{p}.mlp.experts.{e}.gate_proj.weight"] = (I, H)
        shapes[f"{p}.mlp.experts.{e}.up_proj.weight"] = (I, H)
        shapes[f"{p}.mlp.experts.{e}.down_proj.weight"] = (H, I)
    return shapes


def write_checkpoint(directory: Path, s: Size, seed: int = 0) -> int:
    """Write an HF-layout checkpoint (one file per layer, one for the rest); return its bytes.

    Only one file's tensors are in memory at a time, so the generator stays small.
    """
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    groups = [_layer_shapes(s, layer) for layer in range(s.layers)]
    groups.append(
        {
            "model.embed_tokens.weight": (s.vocab, s.hidden),
            "model.norm.weight": (s.hidden,),
            "lm_head.weight": (s.vocab, s.hidden),
        }
    )
    weight_map, total = {}, 0
    for i, shapes in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        gen = torch.Generator().manual_seed(seed + i)
        tensors = {
            name: torch.randn(shape, generator=gen, dtype=torch.bfloat16)
            for name, shape in shapes.items()
        }
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    (directory / "config.json").write_text(json.dumps(s.config(), indent=2))
    return total


def largest_shard_bytes(src: Path, layout: str, dtype: str = "keep") -> int:
    """Bytes of the largest single tensor any rank's file holds under `layout`."""
    from reshard.convert import make_plan
    from reshard.layout import Layout
    from reshard.sources import open_source

    plan = make_plan(open_source(str(src)), Layout.parse(layout), dtype)
    return max(t.nbytes for r in range(plan.layout.world_size) for t in plan.rank_tensors(r))


@dataclass(kw_only=True)
class Measured:
    peak_rss: int  # bytes, the command's own high-water mark (ru_maxrss)
    peak_anon: int  # bytes, max sampled RssAnon
    peak_file: int  # bytes, max sampled RssFile (resident pages of mmapped files)
    wall_s: float
    output: str


# Runs the command and reports its peak RSS as JSON. Linux carries ru_maxrss across
# exec, so a child spawned by a big parent (this one holds torch and a plan) reports
# at least the parent's RSS; this launcher imports nothing heavy, so the number is the
# command's own. It also samples /proc/<pid>/status to split RSS into anon and file.
LAUNCHER = """
import json, os, subprocess, sys, threading, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=sys.stderr, stderr=sys.stderr)
peaks = {"RssAnon": 0, "RssFile": 0}
done = threading.Event()
def sample():
    while not done.is_set():
        try:
            text = open(f"/proc/{proc.pid}/status").read()
        except OSError:
            return
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key in peaks:
                peaks[key] = max(peaks[key], int(value.split()[0]) * 1024)
        done.wait(0.005)
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - start
done.set()
sampler.join()
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss,
                  "wall_s": wall, "anon": peaks["RssAnon"], "file": peaks["RssFile"]}))
"""


def measure(cmd: list[str]) -> Measured:
    """Run `cmd` under the launcher; return its own peak RSS, not the parent's."""
    done = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *cmd], capture_output=True, text=True, check=True
    )
    report = json.loads(done.stdout)
    if report["rc"]:
        raise RuntimeError(f"{' '.join(cmd)} exited {report['rc']}:\n{done.stderr[-4000:]}")
    return Measured(
        peak_rss=report["maxrss_kib"] * 1024,  # Linux reports KiB
        peak_anon=report["anon"],
        peak_file=report["file"],
        wall_s=report["wall_s"],
        output=done.stderr,
    )


def measure_import(src: Path, layout: str) -> Measured:
    return measure([sys.executable, "-c", IMPORT_ONLY, str(src), layout])


def measure_naive(src: Path) -> Measured:
    return measure([sys.executable, "-c", NAIVE_LOAD, str(src)])


def convert_command(src: Path, layout: str, out: Path, dtype: str = "keep") -> list[str]:
    """`reshard convert`, run with this interpreter (same code as the console script)."""
    cmd = [sys.executable, "-m", "reshard.cli", "convert", "--src", str(src)]
    return cmd + ["--layout", layout, "--out", str(out), "--dtype", dtype, "--quiet"]


def synth_checkpoint(src: Path, like: str, layers: int) -> int:
    """`reshard synth --like LIKE --layers N` into `src`; its bytes."""
    cmd = [sys.executable, "-m", "reshard.cli", "synth", "--like", like, "--layers", str(layers)]
    subprocess.run(cmd + ["--out", str(src), "--quiet"], check=True)
    return sum(f.stat().st_size for f in src.glob("*.safetensors"))


def measure_convert(src: Path, layout: str, out: Path) -> Measured:
    return measure(convert_command(src, layout, out))


def _mb(n: float) -> str:
    return f"{n / MiB:,.1f}"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Peak RSS of `reshard convert` vs the largest output tensor shard and model\n"
        "size, on a synthetic bf16 Qwen3-MoE checkpoint (defaults: ~2.1 GB). Exits 1 when\n"
        "the bound fails for a layout.",
        epilog="examples:\n  python benchmarks/convert_memory.py\n"
        "  python benchmarks/convert_memory.py --layers 20 --layouts ep4,tp4,tp8 --workdir /scratch",
        formatter_class=_HelpFormatter,
    )
    model = parser.add_argument_group("synthetic model (config.json fields)")
    model.add_argument("--hidden", type=int, default=1024, help="hidden_size")
    model.add_argument("--layers", type=int, default=10, help="num_hidden_layers")
    model.add_argument("--experts", type=int, default=64, help="num_experts")
    model.add_argument("--moe-intermediate", type=int, default=512, help="moe_intermediate_size")
    model.add_argument("--vocab", type=int, default=32768, help="vocab_size")
    model.add_argument("--heads", type=int, default=16, help="num_attention_heads")
    model.add_argument("--kv-heads", type=int, default=4, help="num_key_value_heads")
    model.add_argument("--head-dim", type=int, default=64, help="head_dim")
    model.add_argument(
        "--like", help="instead: `reshard synth --like LIKE --layers N` (e.g. deepseek-v3)"
    )
    parser.add_argument("--layouts", default="ep4,ep2tp2,tp4", help="comma-separated layouts")
    parser.add_argument("--dtype", default="keep", help="convert --dtype (e.g. bf16: dequantize)")
    parser.add_argument("--k", type=float, default=4.0, help="bound: peak - import <= k*shard + c")
    parser.add_argument("--constant-mb", type=float, default=64.0, help="c in the bound, MiB")
    parser.add_argument("--workdir", type=Path, help="parent of the scratch directory (tmp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    args = parser.parse_args(argv)

    size = Size(
        hidden=args.hidden,
        layers=args.layers,
        experts=args.experts,
        moe_intermediate=args.moe_intermediate,
        vocab=args.vocab,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
    )
    layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="reshard-mem-", dir=args.workdir))
    try:
        src = work / "src"
        t0 = time.perf_counter()
        if args.like:
            model_bytes = synth_checkpoint(src, args.like, args.layers)
        else:
            model_bytes = write_checkpoint(src, size)
        print(
            f"wrote {_mb(model_bytes)} MiB checkpoint to {src} in {time.perf_counter() - t0:.1f}s",
            flush=True,
        )
        print("measuring: import only, naive load_file + fuse ...", flush=True)
        base = measure_import(src, layouts[0])
        naive = measure_naive(src)
        rows = [
            ["import only", model_bytes, None, base, None],
            ["naive load_file + fuse", model_bytes, None, naive, None],
        ]
        ok = True
        for layout in layouts:
            cmd = convert_command(src, layout, work / f"out-{layout}", args.dtype)
            print(f"measuring: {' '.join(cmd)}", flush=True)
            shard = largest_shard_bytes(src, layout, args.dtype)
            m = measure(cmd)
            holds = m.peak_rss - base.peak_rss <= args.k * shard + args.constant_mb * MiB
            ok &= holds
            rows.append([f"convert {layout}", model_bytes, shard, m, holds])
            if not args.keep:
                shutil.rmtree(work / f"out-{layout}")
        print_table(rows, base.peak_rss, naive.peak_rss, args.k, args.constant_mb)
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def print_table(rows, base_rss: int, naive_rss: int, k: float, constant_mb: float) -> None:
    head = [
        "run",
        "model MiB",
        "largest shard MiB",
        "peak RSS MiB",
        "anon / file MiB",
        "peak - import MiB",
        "/ shard",
        "/ model",
        "/ naive",
        "wall s",
        f"<= {k:g}*shard+{constant_mb:g}MiB",
    ]
    table = [head]
    for name, model_bytes, shard, m, holds in rows:
        extra = m.peak_rss - base_rss
        table.append(
            [
                name,
                _mb(model_bytes),
                _mb(shard) if shard else "-",
                _mb(m.peak_rss),
                f"{_mb(m.peak_anon)} / {_mb(m.peak_file)}",
                _mb(extra),
                f"{extra / shard:.2f}" if shard else "-",
                f"{extra / model_bytes:.3f}",
                f"{m.peak_rss / naive_rss:.3f}",
                f"{m.wall_s:.1f}",
                "-" if holds is None else ("yes" if holds else "NO"),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for j, row in enumerate(table):
        print(
            " | ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths))
            )
        )
        if j == 0:
            print("-|-".join("-" * w for w in widths))


if __name__ == "__main__":
    sys.exit(main())
