"""The routed experts of one MoE layer at decode sizes: sorted grouped GEMM against indexed GEMV.

    python benchmarks/experts_kernel.py --rows 8,16,32,64,128

One Qwen3-30B-A3B MoE layer's experts (128 x [1536, 2048] gate_up and [2048, 768] down, bf16,
random) on one GPU; routed rows as a decode step makes them (8 per token, distinct experts
per token, seeded). For each row count, the median time of `Experts.forward` through its
sorted path (argsort, counts, `torch._grouped_mm`, un-sort) and through the indexed kernel
(`runtime.indexed_experts`), both replayed as CUDA graphs as decode runs them; the bandwidth
bound is the bytes of the distinct experts' weights at the measured read bandwidth. The
largest difference of the two outputs is printed too (bf16 rounding order only).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from reshard.architecture import ModelArgs
from reshard.runtime.model import Experts


def graph_time_us(fn, replays: int = 200) -> float:
    """Median microseconds of a CUDA-graph replay of ``fn`` (warmed up first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return sorted(times)[len(times) // 2]


def read_bandwidth() -> float:
    """Bytes per second of a reduction over 1 GiB: the weights are only read."""
    a = torch.ones(2**29, dtype=torch.bfloat16, device="cuda")
    us = graph_time_us(lambda: a.sum(), replays=20)
    return a.numel() * a.element_size() / (us * 1e-6)


def measure(experts: Experts, M: int, bandwidth: float) -> dict:
    """Both paths on M routed rows: M // 8 tokens, each choosing 8 distinct experts."""
    T = M // 8
    ids_TK = torch.stack([torch.randperm(128, device="cuda")[:8] for _ in range(T)])
    weights_TK = torch.softmax(torch.randn(T, 8, device="cuda"), -1).to(torch.bfloat16)
    x_TH = torch.randn(T, 2048, device="cuda", dtype=torch.bfloat16)
    ids_M = ids_TK.reshape(-1)

    def combine(y_MH: torch.Tensor) -> torch.Tensor:
        return torch.bmm(weights_TK[:, None, :], y_MH.view(T, 8, -1)).squeeze(1)

    def indexed() -> torch.Tensor:
        return combine(experts._indexed(x_TH, 8, ids_M, None))

    def sorted_() -> torch.Tensor:
        return combine(experts._sorted(x_TH, 8, ids_M, None))

    with torch.no_grad():
        diff = (indexed().float() - sorted_().float()).abs().max().item()
        t_indexed, t_sorted = graph_time_us(indexed), graph_time_us(sorted_)
    distinct = ids_TK.unique().numel()
    expert_bytes = 3 * 2048 * 768 * 2
    bound = distinct * expert_bytes / bandwidth * 1e6  # the weights read once
    return dict(
        rows=M,
        experts=distinct,
        sorted_us=t_sorted,
        indexed_us=t_indexed,
        bound_us=bound,
        max_diff=diff,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", default="8,16,32,64,128", help="routed rows (tokens x 8)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    margs = ModelArgs(
        vocab_size=16,
        hidden_size=2048,
        num_layers=1,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        intermediate_size=6144,
        num_experts=128,
        top_k=8,
        moe_intermediate_size=768,
    )
    experts = Experts(margs).to("cuda", torch.bfloat16)
    bandwidth = read_bandwidth()
    rows = []
    print(f"read bandwidth {bandwidth / 1e12:.2f} TB/s")
    print("| rows | experts | sorted us | indexed us | bound us | sorted / indexed | max diff |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for M in (int(r) for r in args.rows.split(",")):
        row = measure(experts, M, bandwidth)
        rows.append(row)
        print(
            f"| {M} | {row['experts']} | {row['sorted_us']:.1f} | {row['indexed_us']:.1f} | "
            f"{row['bound_us']:.1f} | {row['sorted_us'] / row['indexed_us']:.2f}x | "
            f"{row['max_diff']:.3g} |"
        )
    if args.json:
        args.json.write_text(json.dumps(dict(bandwidth=bandwidth, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
