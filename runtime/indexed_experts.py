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

Triton comes with torch's CUDA wheels; on a machine without it (the CPU wheels) nothing
here runs and the experts take the sorted path.
"""

# Shape suffixes: M = routed rows (token-major: row m is token m // K, choice m % K),
# E = experts, N = output features, K_in = input features, R = rows of the input

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # torch's CPU wheels come without Triton
    triton = None

# Above this many routed rows the grouped GEMM is as fast (H200, one Qwen3-30B-A3B layer:
# 2.5x faster at 8 rows, 1.35x at 128, even at 256; `benchmarks/experts_kernel.py`).
MAX_ROWS = 128
# Output features per program and input features per loop step: narrow blocks make many
# programs (8 rows x 384 for the up projection at batch 1), which is what fills the GPU when
# there are few rows; 4 x 1024 was the fastest of sixteen shapes tried at 8, 32 and 64 rows.
BLOCK_N, BLOCK_K, NUM_WARPS = 4, 1024, 4


def indexed_runs(x: torch.Tensor, rows: int) -> bool:
    """Whether ``rows`` routed rows of ``x`` take the indexed kernel: few rows, CUDA, Triton
    present, and no gradient wanted (the kernel has no backward)."""
    return (
        triton is not None
        and x.is_cuda
        and rows <= MAX_ROWS
        and x.dtype in (torch.bfloat16, torch.float16)
        and not torch.is_grad_enabled()
    )


if triton is not None:

    @triton.jit
    def _row_times_its_expert(
        x_ptr,
        w_ptr,
        ids_ptr,
        bias_ptr,
        y_ptr,
        N,
        K_in,
        rows_per_x,
        stride_xr,
        stride_we,
        stride_wn,
        stride_wk,
        stride_be,
        stride_ym,
        HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # y[m, n] = sum_k x[m // rows_per_x, k] * w[ids[m], n, k] (+ bias[ids[m], n]), in fp32,
        # rounded once to y's dtype.
        m = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        expert = tl.load(ids_ptr + m).to(tl.int64)
        x_row = x_ptr + (m // rows_per_x).to(tl.int64) * stride_xr
        w_rows = w_ptr + expert * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K_in, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K_in
            x = tl.load(x_row + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(
                w_rows + offs_k[None, :] * stride_wk,
                mask=n_ok[:, None] & k_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + expert * stride_be + offs_n, mask=n_ok, other=0.0)
            acc += bias.to(tl.float32)
        tl.store(y_ptr + m * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


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
    M, (N, K_in) = ids_M.shape[0], weight_ENK.shape[1:]
    x_RK = x_RK.contiguous()
    y_MN = x_RK.new_empty(M, N)
    if M == 0:
        return y_MN
    bias = bias_EN if bias_EN is not None else y_MN  # a pointer the kernel never reads
    grid = (M, triton.cdiv(N, BLOCK_N))
    _row_times_its_expert[grid](
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
