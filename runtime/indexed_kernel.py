"""The Triton kernel of ``indexed_experts``: each routed row times a block of its own expert's
weight. Imported on first use (``indexed_experts.load_kernel``): importing Triton costs
seconds on a cold start."""

import triton
import triton.language as tl


@triton.jit
def row_times_its_expert(
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
