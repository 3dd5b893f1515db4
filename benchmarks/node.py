"""A whole node in one go: convert a full-depth synth Qwen3-30B-A3B to the node's layouts,
validate each, and time generation beside transformers' own TP and EP plans.

    python benchmarks/node.py --json node.json                 # every GPU of the machine
    python benchmarks/node.py --gpus 1 --layers 8 --json node.json

| GPUs | layouts                         |
| ---- | ------------------------------- |
| 8    | ep8, tp8, ep4tp2, tp8-tp2ep     |
| 4    | ep4, tp4, ep2tp2, tp4-tp2ep     |
| 2    | ep2, tp2, tp2-tp2ep             |
| 1    | tp1                             |

For each layout: `reshard convert` against `cp -r` of the source on the same disk (wall
time, ratio per byte written), `reshard validate --device cuda` (logits, loss and every
gradient shard against the streamed single-process reference), then `benchmarks/runtime.py`'s
figures (prefill, decode at batch 1 and 32, load, command to first token). transformers runs
its own model on the same GPUs: one process with `device_map="auto"` (layers placed across
the GPUs), and under torchrun with `tp_plan="auto"` (its TP plan) and, where the installed
version has it, expert parallelism (`DistributedConfig(enable_expert_parallel=True)`); a plan
it cannot run is reported with its error instead of figures. Needs ~2.2x the checkpoint's
size of free disk (the source, one conversion and the cp copy at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert import dir_bytes, sync  # noqa: E402

import runtime as rt  # noqa: E402 - benchmarks/runtime.py, the generation figures

LAYOUTS = {
    8: ["ep8", "tp8", "ep4tp2", "tp8-tp2ep"],
    4: ["ep4", "tp4", "ep2tp2", "tp4-tp2ep"],
    2: ["ep2", "tp2", "tp2-tp2ep"],
    1: ["tp1"],
}

# transformers under torchrun with one of its parallel plans; rank 0 writes the figures.
HF_PLAN_WORKER = r"""
import json, os, sys, time, torch, transformers
sys.path.insert(0, sys.argv[4])
import runtime as rt
src, plan, out = sys.argv[1], sys.argv[2], sys.argv[3]
local = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(local)
kwargs = {"dtype": torch.bfloat16, "tp_plan": "auto"}
if plan == "ep":
    from transformers.distributed import DistributedConfig
    kwargs["distributed_config"] = DistributedConfig(enable_expert_parallel=True)
start = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(src, **kwargs)
torch.cuda.synchronize()
row = {"load_s": time.perf_counter() - start}
vocab = model.config.vocab_size
with torch.no_grad():
    for batch in (1, 32):
        ids = torch.tensor(rt.random_prompts(vocab, batch, rt.PROMPT_LEN), device="cuda")
        gen = lambda ids=ids: model.generate(ids, attention_mask=torch.ones_like(ids),
            do_sample=False, max_new_tokens=rt.NEW_TOKENS, min_new_tokens=rt.NEW_TOKENS,
            pad_token_id=0)
        row[f"decode_bs{batch}"] = batch * rt.NEW_TOKENS / rt.timed(gen, 2)
    B, T = rt.PREFILL
    ids = torch.tensor(rt.random_prompts(vocab, B, T, seed=1), device="cuda")
    row["prefill_s"] = rt.timed(lambda: model(ids, logits_to_keep=1), 2)
    row["prefill"] = B * T / row["prefill_s"]
if int(os.environ["RANK"]) == 0:
    open(out, "w").write(json.dumps(row))
"""


def timed_command(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    sync()  # on disk, not only in the page cache
    return time.perf_counter() - start


def validate(out: Path, src: Path) -> dict:
    result = subprocess.run(
        rt.reshard_cmd("validate", str(out), "--against", str(src), "--device", "cuda", "--json"),
        capture_output=True,
        text=True,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        return {"ok": False, "error": (result.stderr.strip().splitlines() or ["?"])[-1]}
    figures = json.loads(lines[-1])
    return {"ok": figures["ok"], "max_abs_diff": figures["max_abs_diff"]}


def transformers_plan(src: Path, plan: str, gpus: int) -> dict:
    out = Path(tempfile.mkdtemp()) / "row.json"
    script = out.with_name("hf_plan.py")
    script.write_text(HF_PLAN_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={gpus}", str(script), str(src), plan, str(out),
           str(Path(__file__).resolve().parent)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode or not out.exists():
        errors = [line for line in result.stderr.splitlines() if "Error" in line]
        return {"error": (errors or result.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    p.add_argument("--layers", type=int, default=48, help="of the synth Qwen3-30B-A3B (48: all)")
    p.add_argument("--layouts", help="comma-separated (default: the table above for --gpus)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", type=Path, help="scratch directory on the disk to measure")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or args.gpus < 1:
        sys.exit("benchmarks/node.py needs CUDA GPUs")
    from reshard.layout import Layout

    layouts = args.layouts.split(",") if args.layouts else LAYOUTS[args.gpus]
    work = args.work or Path(tempfile.mkdtemp(prefix="reshard-node-"))
    os.environ["RESHARD_CACHE"] = str(work / "cache")
    src = work / "src"
    subprocess.run(
        rt.reshard_cmd("synth", "--like", "qwen3-30b-a3b", "--layers", str(args.layers),
                       "--out", str(src), "-q"),
        check=True,
    )  # fmt: skip
    source_bytes = dir_bytes(src)
    cp_s = timed_command(["cp", "-r", str(src), str(work / "cp")])
    shutil.rmtree(work / "cp")
    print(f"source {source_bytes / 1e9:.1f} GB, cp -r {cp_s:.1f} s", flush=True)
    rows = []
    for layout in layouts:
        out = work / layout
        convert_s = timed_command(
            rt.reshard_cmd("convert", "--src", str(src), "--layout", layout, "--out", str(out))
        )
        written = dir_bytes(out)
        row = {"name": f"reshard {layout}", "convert_s": convert_s, "bytes": written}
        row["convert_x_cp"] = (convert_s / written) / (cp_s / source_bytes)
        print(f"{layout}: converted in {convert_s:.1f} s", flush=True)
        row["validate"] = validate(out, src)
        print(f"{layout}: validate {row['validate']}", flush=True)
        world = Layout.parse(layout).world_size
        row |= rt.measure_reshard(out, world, args.repeats, None, False)
        rows.append(row)
        shutil.rmtree(out)
        print(json.dumps(row), flush=True)
    hf = {"name": "transformers device_map", **rt.measure_transformers(src, args.repeats)}
    rows.append(hf)
    if args.gpus > 1:
        for plan in ("tp", "ep"):
            row = transformers_plan(src, plan, args.gpus)
            rows.append({"name": f"transformers {plan} plan", **row})
    print(f"{torch.cuda.get_device_name()} x {args.gpus}, {args.layers} layers, "
          f"{source_bytes / 1e9:.1f} GB; cp -r {cp_s:.1f} s")  # fmt: skip
    print("| runtime | convert s (x cp) | validate | prefill tok/s | decode bs1 | decode bs32 "
          "| load s | start s |")  # fmt: skip
    print("|" + "---|" * 8)
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | | | {r['error']} | | | | |")
            continue
        conv = f"{r['convert_s']:.1f} ({r['convert_x_cp']:.2f}x)" if "convert_s" in r else ""
        val = r.get("validate", {})
        val = ("ok " + ", ".join(f"{k} {v:.1e}" for k, v in val["max_abs_diff"].items())
               if val.get("ok") else val.get("error", ""))  # fmt: skip
        print(f"| {r['name']} | {conv} | {val} | {r['prefill']:,.0f} | {r['decode_bs1']:.1f} | "
              f"{r['decode_bs32']:.1f} | {r['load_s']:.1f} | {r.get('start_s', 0):.1f} |")  # fmt: skip
    if args.json:
        meta = {"gpu": torch.cuda.get_device_name(), "gpus": args.gpus, "layers": args.layers,
                "source_bytes": source_bytes, "cp_s": cp_s}  # fmt: skip
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
