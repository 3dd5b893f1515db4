"""Expert matmuls for a handful of routed rows (decode), each row reading its own expert.

A decode step at batch B routes B * K rows (8 at batch 1 of Qwen3-30B-A3B) to at most that
many experts. The grouped GEMM needs its rows sorted by expert: a sort, the counts, their
offsets, a gather and an un-sort, a dozen small kernels per layer. Its tiles are sized for
many rows per expert, and with one row each it ran at 2-4x the time of reading the chosen
experts' weights (H200 profile, `docs/benchmarks.md`). Here each program takes one row
and a block of its expert's output features, and finds that expert's weights from the
row's id, as the fused MoE kernels of vLLM and SGLang index experts: no sort, the rows stay
in token order, and a GEMV reads each weight it needs once per row.

Once per *row* is also the limit: rows that share an expert read it again each, so past
``MAX_ROWS`` rows the grouped GEMM, which reads each expert once, is the faster one.

Only decode steps take it (inside ``decode.decode_steps``): a prefill (and ``validate``, and
training) takes the sorted path whatever its row count, so a prompt's logits do not depend
on which path its length chose, and the first token never waits for ``import triton`` and
the kernel's compilation (about 0.8 s of a one-token run on an H200).

Triton comes with torch's CUDA wheels; on a machine without it (the CPU wheels) nothing
here runs and the experts take the sorted path. The kernel itself is in ``indexed_kernel``.
"""

# Shape suffixes: M = routed rows (token-major: row m is token m // K, choice m % K),
# E = experts, N = output features, K_in = input features, R = rows of the input

from __future__ import annotations

import importlib.util

import torch

from reshard.runtime.decode import decoding

# Whether Triton is installed, without importing it: `import triton` takes seconds on a cold
# start, which a run on the CPU, or one that never decodes, should not pay.
HAS_TRITON = importlib.util.find_spec("triton") is not None
_kernel = None  # `indexed_kernel.row_times_its_expert`, once `load_kernel` has imported it

# Above this many routed rows the grouped GEMM is as fast (H200, one Qwen3-30B-A3B layer:
# 2.5x faster at 8 rows, 1.35x at 128, even at 256; `benchmarks/experts_kernel.py`).
MAX_ROWS = 128
# Output features per program and input features per loop step: narrow blocks make many
# programs (8 rows x 384 for the up projection at batch 1), which is what fills the GPU when
# there are few rows; 4 x 1024 was the fastest of sixteen shapes tried at 8, 32 and 64 rows.
BLOCK_N, BLOCK_K, NUM_WARPS = 4, 1024, 4


def indexed_runs(x: torch.Tensor, rows: int) -> bool:
    """Whether ``rows`` routed rows of ``x`` take the indexed kernel: in a decode step on CUDA,
    Triton present, no gradient wanted (the kernel has no backward), and few rows."""
    return (
        decoding()
        and _kernel is not None
        and x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and not torch.is_grad_enabled()
        and rows <= MAX_ROWS
    )


def load_kernel() -> bool:
    """Import the kernel (and Triton) if it is not yet; whether it is there."""
    global _kernel
    if _kernel is None and HAS_TRITON:
        from reshard.runtime.indexed_kernel import row_times_its_expert

        _kernel = row_times_its_expert
    return _kernel is not None


def indexed_linear(
    x_RK: torch.Tensor,
    ids_M: torch.Tensor,
    weight_ENK: torch.Tensor,
    bias_EN: torch.Tensor | None = None,
    rows_per_x: int = 1,
) -> torch.Tensor:
    """``y[m] = x[m // rows_per_x] @ weight[ids[m]].T (+ bias[ids[m]])`` for every routed row.

    Args:
        x_RK: ``[R, K_in]`` inputs; with ``rows_per_x = K`` these are the tokens and routed
            row m reads token m // K, so nothing is repeated in memory.
        ids_M: ``[M]`` each row's expert.
        weight_ENK: ``[E, N, K_in]``, any strides (a transposed view of a stored weight will do).
        bias_EN: ``[E, N]`` per-expert bias, or None.

    Returns:
        ``[M, N]`` in ``x``'s dtype, rows in the order of ``ids_M``.
    """
    if not load_kernel():
        raise RuntimeError("the indexed expert kernel needs Triton, which is not installed")
    M, (N, K_in) = ids_M.shape[0], weight_ENK.shape[1:]
    x_RK = x_RK.contiguous()
    y_MN = x_RK.new_empty(M, N)
    if M == 0:
        return y_MN
    bias = bias_EN if bias_EN is not None else y_MN  # a pointer the kernel never reads
    grid = (M, -(-N // BLOCK_N))
    _kernel[grid](
        x_RK,
        weight_ENK,
        ids_M,
        bias,
        y_MN,
        N,
        K_in,
        rows_per_x,
        x_RK.stride(0),
        weight_ENK.stride(0),
        weight_ENK.stride(1),
        weight_ENK.stride(2),
        bias.stride(0),
        y_MN.stride(0),
        HAS_BIAS=bias_EN is not None,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        num_warps=NUM_WARPS,
    )
    return y_MN
