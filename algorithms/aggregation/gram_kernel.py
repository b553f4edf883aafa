"""One-pass Gram matrix of ``n`` gradient rows on a GPU (Triton), the rules' only global statistic.

``X X^T`` for ``X`` of ``n x d`` with ``n`` of 4-64 workers and ``d`` in the millions is a GEMM with a
tiny output and a huge reduction; cuBLAS picks a small-N SIMT kernel for it that reads ``X`` at a
fraction of the memory bandwidth (profiled on an H200: ~0.9 TB/s, 70% of Flag's time). This kernel
reads every coordinate once: each program loads ``[BLOCK_N, BLOCK_K]`` tiles of ``X`` along its
stretch of ``SPAN`` coordinates (optionally centring each column across the rows, the ``centered``
statistic, without writing a centred copy), accumulates ``tile @ tile^T`` in fp32 (full fp32
products, no TF32: ``input_precision="ieee"``), and writes one ``BLOCK_N x BLOCK_N`` partial.
The partials are summed in float64, as the bmm path sums its ``GRAM_SPLIT``-long pieces, so the
two paths agree to fp32 rounding (``precision="ieee"``: full fp32 products; ``"tf32x3"`` is the
benchmark's alternative, three TF32 tensor-core products that keep about fp32 accuracy).

Used by :func:`algorithms.aggregation.base.gram` for fp32/bf16/fp16 CUDA tensors when Triton
imports; ``ENABLED = False`` (or no Triton, or CPU tensors) falls back to the bmm path.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install has no Triton: base.gram uses its bmm path
    triton = None

ENABLED = True  # the benchmark turns this off to time the bmm path on the same GPU
MAX_ROWS = 64  # above this the tiles outgrow the registers; base.gram uses bmm
SPAN = 2048  # coordinates per program (and per fp32 partial): enough programs to fill the GPU
BLOCK_K = 256  # coordinates per tile
NUM_WARPS = 4


def available(x: Tensor) -> bool:
    return (ENABLED and triton is not None and x.is_cuda and x.dim() == 2 and x.shape[0] <= MAX_ROWS
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16))


def _gram_partials(x_ptr, out_ptr, n, length, stride_row,  # type: ignore[no-untyped-def]
                   CENTER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPAN: tl.constexpr,
                   PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_N)
    row_ok = rows < n
    offs = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    start = pid.to(tl.int64) * SPAN
    for k in range(0, SPAN, BLOCK_K):
        cols = start + k + offs
        mask = row_ok[:, None] & (cols < length)[None, :]
        tile = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_row + cols[None, :], mask=mask,
                       other=0.0).to(tl.float32)
        if CENTER:
            mean = tl.sum(tile, axis=0) / n
            tile = tl.where(mask, tile - mean[None, :], 0.0)
        acc += tl.dot(tile, tl.trans(tile), input_precision=PRECISION)
    out = out_ptr + pid.to(tl.int64) * BLOCK_N * BLOCK_N + rows[:, None] * BLOCK_N + rows[None, :]
    tl.store(out, acc)


_kernel = triton.jit(_gram_partials) if triton is not None else None


def gram_triton(x: Tensor, centered: bool, span: int = SPAN, block_k: int = BLOCK_K, num_warps: int = NUM_WARPS,
                precision: str = "ieee") -> Tensor:
    """``x @ x.T`` (rows centred across workers first if ``centered``) as float64, on ``x``'s device.

    ``available(x)`` says when :func:`base.gram` calls this; it also runs on CPU tensors under
    Triton's interpreter (``TRITON_INTERPRET=1`` before the import), which is how the CPU tests
    check it.
    """
    assert _kernel is not None, "Triton is not installed"
    assert x.dim() == 2 and x.shape[0] <= MAX_ROWS, f"expected [n <= {MAX_ROWS}, d], got {tuple(x.shape)}"
    if x.shape[1] and x.stride(1) != 1:
        x = x.contiguous()
    n, length = x.shape
    block_n = max(16, triton.next_power_of_2(n))
    programs = max(1, triton.cdiv(length, span))
    parts = torch.empty(programs, block_n, block_n, dtype=torch.float32, device=x.device)
    _kernel[(programs,)](x, parts, n, length, x.stride(0), CENTER=centered, BLOCK_N=block_n,
                         BLOCK_K=block_k, SPAN=span, PRECISION=precision, num_warps=num_warps)
    return parts.sum(dim=0, dtype=torch.float64)[:n, :n]
