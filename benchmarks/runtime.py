"""How fast `reshard run` generates, beside transformers' own model on the same GPUs, one run.

    python benchmarks/runtime.py --layers 8 --layouts tp1 --json runtime.json

On a `reshard synth --like qwen3-30b-a3b` checkpoint of a few layers (bf16, written first, or
given with --src), converted to each layout; random prompts (seeded):

| column            | what is timed                                                          |
| ----------------- | ---------------------------------------------------------------------- |
| prefill tok/s     | one forward of 4 x 2048 tokens, logits of the last position only       |
|                   | (transformers: `logits_to_keep=1`, and also all positions)             |
| prefill MFU       | active-parameter and attention FLOPs of that forward / measured bf16   |
|                   | peak (a large matmul, same run)                                        |
| decode bs1 tok/s  | 64 new tokens after a 128-token prompt, prefill included (as           |
|                   | transformers' `generate` is timed), batch 1                            |
| decode bs32 tok/s | the same at batch 32                                                   |
| load s            | reshard: this rank's files into the parallel model (hash checked);     |
|                   | transformers: `from_pretrained`; both from the page cache              |
| start s           | the command to its first new token: `reshard run CKPT --max-new-tokens |
|                   | 1`, and a `python -c` doing `from_pretrained` + `generate` of 1 token   |
|                   | (median of --repeats runs)                                             |

Every timed call runs once untimed first (CUDA graphs, kernels, allocator), then the median of
--repeats. reshard's figures come from its own runtime (`runtime.worker.Decoder`, the code
`reshard run` uses) under torchrun; transformers runs in this process with `device_map`
(its TP plan for several GPUs: `tp_plan="auto"` under torchrun is not measured here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT_LEN, NEW_TOKENS, PREFILL = 128, 64, (4, 2048)


def reshard_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "reshard.cli", *args]


def read_through(directory: Path) -> None:
    """Read every safetensors file of `directory` once (into the page cache)."""
    for path in sorted(directory.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` after one untimed call; CUDA work finished before each reading."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bf16_peak_flops() -> float:
    """Measured dense bf16 matmul throughput: the MFU denominator."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / timed(lambda: a @ b, 10)


def prefill_flops(config: dict, batch: int, tokens: int) -> float:
    """Forward FLOPs of the active parameters (attention, router, top-k experts) and the causal
    attention matmuls; the lm_head of one position per row is left out."""
    H, L = config["hidden_size"], config["num_hidden_layers"]
    D = config.get("head_dim") or H // config["num_attention_heads"]
    N, G = config["num_attention_heads"], config["num_key_value_heads"]
    experts = config["num_experts_per_tok"] * 3 * H * config["moe_intermediate_size"]
    per_token = 2 * L * (H * D * (2 * N + 2 * G) + H * config["num_experts"] + experts)
    attention = 2 * 2 * L * N * D * tokens * tokens / 2  # QK^T and PV, causal half
    return batch * (tokens * per_token + attention)


def random_prompts(vocab: int, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()


# --- reshard, one rank per GPU under torchrun -------------------------------------------------


def write_profile(fn, path: Path) -> None:
    """torch.profiler's table of one call of `fn`, by CUDA time: what the time went to."""
    from torch.profiler import ProfilerActivity, profile

    path.parent.mkdir(parents=True, exist_ok=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


def reshard_worker(
    ckpt_dir: str, out: str, repeats: int, profile: str | None, compile_decode: bool
) -> None:
    import torch.distributed as dist

    from reshard.checkpoint import open_checkpoint
    from reshard.runtime.load import load_parallel_model
    from reshard.runtime.worker import Decoder

    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    ckpt = open_checkpoint(ckpt_dir)
    start = time.perf_counter()
    pm = load_parallel_model(ckpt, rank, device=device)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    pm.model.eval()
    vocab = ckpt.manifest.config["vocab_size"]
    row = {"load_s": load_s}
    # The default (static decode steps and CUDA graphs where the layout allows), then eager.
    variants = [("", None, False), ("_eager", False, False)]
    variants += [("_compiled", True, True)] * compile_decode
    for suffix, static, compiled in variants:
        # no eos: every row makes all its tokens
        decoder = Decoder(pm, device, [], static_decode=static, compile_decode=compiled)
        with torch.no_grad():
            for batch in (1, 32):
                prompts = random_prompts(vocab, batch, PROMPT_LEN)

                def gen(prompts=prompts, decoder=decoder):
                    decoder.generate(prompts, max_new_tokens=NEW_TOKENS)

                row[f"decode_bs{batch}{suffix}"] = batch * NEW_TOKENS / timed(gen, repeats)
                if profile and batch == 1 and rank == 0:
                    write_profile(gen, Path(profile) / f"decode-bs1{suffix or '_default'}.txt")
    with torch.no_grad():
        B, T = PREFILL
        ids = torch.tensor(random_prompts(vocab, B, T, seed=1), device=device)
        seconds = timed(lambda: pm.model(ids, logits_from=T - 1), repeats)
        if profile and rank == 0:
            write_profile(lambda: pm.model(ids, logits_from=T - 1), Path(profile) / "prefill.txt")
        row["prefill"] = B * T / seconds
        row["prefill_s"] = seconds
    if rank == 0:
        Path(out).write_text(json.dumps(row))
    dist.destroy_process_group()


def measure_reshard(
    ckpt_dir: Path, world: int, repeats: int, profile: Path | None, compile_decode: bool
) -> dict:
    out = Path(tempfile.mkdtemp()) / "row.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(world), __file__, "--worker", str(ckpt_dir), str(out),
        "--repeats", str(repeats), *(["--profile", str(profile)] if profile else []),
        *(["--compile"] if compile_decode else []),
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    row = json.loads(out.read_text())
    first_token = reshard_cmd("run", str(ckpt_dir), "--prompt", "Why is the sky blue?",
                              "--max-new-tokens", "1", "--device", "cuda", "-q")  # fmt: skip
    row["start_s"] = start_time(first_token, repeats)
    return row


def start_time(cmd: list[str], repeats: int) -> float:
    """Median seconds of a command, run `repeats` times (a start moves by seconds between runs
    on a shared host)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- transformers, in this process ------------------------------------------------------------

HF_START = """
import sys, time, torch, transformers
t = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16,
                                                          device_map="cuda")
ids = torch.tensor([[3, 4, 5, 6]], device="cuda")
model.generate(ids, max_new_tokens=1, do_sample=False)
"""


def load_transformers(src: Path):
    import transformers

    kwargs = {"dtype": torch.bfloat16, "device_map": "cuda"}
    try:  # transformers >= 5: the grouped_mm experts kernel, as reshard uses
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(src), experts_implementation="grouped_mm", **kwargs
        ), "grouped_mm"
    except (TypeError, ValueError):
        return transformers.AutoModelForCausalLM.from_pretrained(str(src), **kwargs), "default"


def measure_transformers(src: Path, repeats: int) -> dict:
    import transformers

    start_s = start_time([sys.executable, "-c", HF_START, str(src)], repeats)  # the GPU is free
    start = time.perf_counter()
    model, experts = load_transformers(src)
    torch.cuda.synchronize()
    row = {"load_s": time.perf_counter() - start, "start_s": start_s, "experts": experts}
    row["version"] = transformers.__version__
    vocab = model.config.vocab_size
    with torch.no_grad():
        for batch in (1, 32):
            ids = torch.tensor(random_prompts(vocab, batch, PROMPT_LEN), device="cuda")

            def gen(ids=ids):
                model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS,
                    pad_token_id=0,
                )

            row[f"decode_bs{batch}"] = batch * NEW_TOKENS / timed(gen, repeats)
        B, T = PREFILL
        ids = torch.tensor(random_prompts(vocab, B, T, seed=1), device="cuda")
        row["prefill_s"] = timed(lambda: model(ids, logits_to_keep=1), repeats)
        row["prefill"] = B * T / row["prefill_s"]
        row["prefill_all_logits"] = B * T / timed(lambda: model(ids), repeats)
    return row


# --- the table ----------------------------------------------------------------------------------


def _variants(row: dict, key: str) -> str:
    out = f" (eager {row[key + '_eager']:.1f}" if key + "_eager" in row else ""
    if key + "_compiled" in row:
        out += f", compiled {row[key + '_compiled']:.1f}"
    return out + ")" if out else ""


def print_table(rows: list[dict]) -> None:
    print(
        "| runtime | prefill tok/s | prefill MFU | decode bs1 tok/s | decode bs32 tok/s "
        "| load s | start s |"
    )
    print("|" + "---|" * 7)
    for r in rows:
        print(
            f"| {r['name']} | {r['prefill']:,.0f} | {r['mfu']:.1%} | {r['decode_bs1']:.1f}"
            f"{_variants(r, 'decode_bs1')} | {r['decode_bs32']:.1f}{_variants(r, 'decode_bs32')} | "
            f"{r['load_s']:.1f} | {r['start_s']:.1f} |"
        )
    hf = next((r for r in rows if r["name"] == "transformers"), None)
    for r in rows:
        if hf is not None and r is not hf:
            ratios = {k: r[k] / hf[k] for k in ("prefill", "decode_bs1", "decode_bs32")}
            ratios["start"] = r["start_s"] / hf["start_s"]
            print(
                f"{r['name']} / transformers: "
                + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--src", type=Path, help="an existing bf16 HF checkpoint (default: synth one)")
    p.add_argument("--layers", type=int, default=8, help="layers of the synth Qwen3-30B-A3B")
    p.add_argument("--layouts", default="tp1", help="comma-separated; world size <= GPUs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--profile", type=Path, help="write torch.profiler tables of reshard here")
    p.add_argument(
        "--compile", action="store_true", help="also decode with torch.compile before the graph"
    )
    p.add_argument("--worker", nargs=2, metavar=("CKPT", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        reshard_worker(*args.worker, args.repeats, args.profile, args.compile)
        return 0
    if not torch.cuda.is_available():
        sys.exit("benchmarks/runtime.py needs a CUDA GPU")
    from reshard.layout import Layout

    work = args.work or Path(tempfile.mkdtemp(prefix="reshard-runtime-"))
    src = args.src or work / "src"
    if args.src is None and not (src / "config.json").exists():
        subprocess.run(
            reshard_cmd("synth", "--like", "qwen3-30b-a3b", "--layers", str(args.layers),
                        "--dtype", "bf16", "--out", str(src), "-q"),
            check=True,
        )  # fmt: skip
    config = json.loads((src / "config.json").read_text())
    peak = bf16_peak_flops()
    flops = prefill_flops(config, *PREFILL)
    rows = []
    for layout in args.layouts.split(","):
        out = work / layout
        subprocess.run(
            reshard_cmd("convert", "--src", str(src), "--layout", layout, "--out", str(out), "-q"),
            check=True,
        )
        # `convert` writes past the page cache (direct I/O) and `synth` through it: read the
        # rank files once, so both loads are timed from memory.
        read_through(out)
        world = Layout.parse(layout).world_size
        profile = args.profile / layout if args.profile else None
        row = measure_reshard(out, world, args.repeats, profile, args.compile)
        rows.append({"name": f"reshard {layout}", **row})
    rows.append({"name": "transformers", **measure_transformers(src, args.repeats)})
    for row in rows:
        row["mfu"] = flops / row["prefill_s"] / peak
    print(f"{torch.cuda.get_device_name()}, {config['num_hidden_layers']} layers, bf16 peak "
          f"{peak / 1e12:.0f} TFLOP/s measured")  # fmt: skip
    print_table(rows)
    if args.json:
        meta = {"gpu": torch.cuda.get_device_name(), "peak_flops": peak, "config": config}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
