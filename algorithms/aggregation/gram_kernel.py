"""One-pass raw Gram matrix ``X X^T`` of ``n`` gradient rows on a GPU (Triton), for Flag.

``X X^T`` for ``X`` of ``n x d`` with ``n`` of 2-64 workers and ``d`` in the millions is a GEMM with
a tiny output and a huge reduction. cuBLAS picks a small-N SIMT kernel for it that reads ``X`` at
about 1 TB/s on an H200 (70% of Flag's time, ``bench/results/gpu/run8-flag_profile.log``); a Triton
kernel built on ``tl.dot`` (tensor-core tiles of 16 rows) did no better (run14, RESULTS.md).

This kernel does no matrix product at all: the rows are split into blocks of ``RB`` rows, and one
program per (pair of row blocks ``a <= b``, stretch of ``SPAN`` coordinates) loads the two blocks'
``[RB, BLOCK]`` tiles and accumulates the elementwise products ``x_i[k] * x_j[k]`` of every row pair
in registers (``RB x RB x BLOCK`` fp32 fused multiply-adds, each thread holding its own columns),
reducing over the coordinates once, at the end of its stretch. The programs of one stretch are
adjacent in the launch order, so the second read of a row block comes from L2, not memory. The
``RB x RB`` fp32 partials are summed in float64, as the bmm path sums its ``GRAM_SPLIT``-long
pieces, so the two agree to fp32 rounding.

Raw Gram only (Flag's statistic): the centred Gram of the distance-based rules keeps the bmm path.
:func:`algorithms.aggregation.base.gram` calls this for fp32/bf16/fp16 CUDA tensors with at most
``MAX_ROWS`` rows when Triton imports; otherwise (no Triton, a CPU tensor, ``ENABLED = False``) it
takes the bmm path. On CPU tensors the kernel runs under Triton's interpreter
(``TRITON_INTERPRET=1`` before the import), which is how the CPU tests check it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

triton: Any = None
tl: Any = None
try:
    import triton  # type: ignore[no-redef]
    import triton.language as tl  # type: ignore[no-redef]
except ImportError:  # the CPU-only install may lack Triton: base.gram uses its bmm path
    pass

ENABLED = True  # the benchmarks turn this off to time the bmm path on the same GPU
MAX_ROWS = 64
# The defaults won `bench/gpu_aggregation.py --gram-sweep` on an H200 (run15-gram_sweep.log): for n = 16,
# 0.98 / 3.57 ms at d = 25M / 100M (1.6-1.8 TB/s; cuBLAS bmm 1.59 / 5.78 ms); n = 2 and 4 read at 2.4-3 TB/s.
# Row blocks of 16 (256 accumulators a thread) spill registers and run 8-30x slower.
ROW_BLOCK = 8  # rows per block: RB x RB x (columns per thread) accumulators per thread
BLOCK = 128  # coordinates per tile (one per thread at 4 warps)
SPAN = 16384  # coordinates per program (and per fp32 partial)
NUM_WARPS = 4


def available(x: Tensor) -> bool:
    return (ENABLED and triton is not None and x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16))


def _gram_pair_partials(x_ptr, out_ptr, block_a_ptr, block_b_ptr, n, length, stride_row, pairs,  # type: ignore[no-untyped-def]
                        RB: tl.constexpr, BLOCK: tl.constexpr, SPAN: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    pair = pid % pairs  # the pairs of one stretch run side by side: the re-read row block hits L2
    stretch = pid // pairs
    rows_a = tl.load(block_a_ptr + pair) * RB + tl.arange(0, RB)
    rows_b = tl.load(block_b_ptr + pair) * RB + tl.arange(0, RB)
    ok_a = rows_a < n
    ok_b = rows_b < n
    base_a = x_ptr + rows_a.to(tl.int64) * stride_row
    base_b = x_ptr + rows_b.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((RB, RB, BLOCK), dtype=tl.float32)
    start = stretch * SPAN
    for k in range(0, SPAN, BLOCK):
        cols = start + k + offs
        in_range = cols < length
        xa = tl.load(base_a[:, None] + cols[None, :], mask=ok_a[:, None] & in_range[None, :], other=0.0)
        xb = tl.load(base_b[:, None] + cols[None, :], mask=ok_b[:, None] & in_range[None, :], other=0.0)
        acc += xa.to(tl.float32)[:, None, :] * xb.to(tl.float32)[None, :, :]
    part = tl.sum(acc, axis=2)
    i = tl.arange(0, RB)
    out = out_ptr + pid * RB * RB + i[:, None] * RB + i[None, :]
    tl.store(out, part)


_kernel = triton.jit(_gram_pair_partials) if triton is not None else None
_pair_tables: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}


def _pairs(blocks: int, device: torch.device) -> tuple[Tensor, Tensor]:
    key = (blocks, str(device))
    if key not in _pair_tables:
        a, b = torch.triu_indices(blocks, blocks)
        _pair_tables[key] = (a.to(torch.int32).to(device), b.to(torch.int32).to(device))
    return _pair_tables[key]


def gram_triton(x: Tensor, row_block: int = ROW_BLOCK, block: int = BLOCK, span: int = SPAN,
                num_warps: int = NUM_WARPS) -> Tensor:
    """``x @ x.T`` as float64 on ``x``'s device (products and per-program sums in fp32)."""
    assert _kernel is not None, "Triton is not installed"
    assert x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS, f"expected [0 < n <= {MAX_ROWS}, d], got {tuple(x.shape)}"
    assert span % block == 0, "span must be a multiple of block"
    if x.shape[1] and x.stride(1) != 1:
        x = x.contiguous()
    n, length = x.shape
    rb = min(row_block, max(2, triton.next_power_of_2(n)))  # a single block when n <= row_block
    blocks = -(-n // rb)
    block_a, block_b = _pairs(blocks, x.device)
    pairs = block_a.numel()
    stretches = max(1, -(-length // span))
    parts = torch.empty(stretches * pairs, rb, rb, dtype=torch.float32, device=x.device)
    _kernel[(stretches * pairs,)](x, parts, block_a, block_b, n, length, x.stride(0), pairs,
                                  RB=rb, BLOCK=block, SPAN=span, num_warps=num_warps)
    summed = parts.view(stretches, pairs, rb, rb).sum(dim=0, dtype=torch.float64)
    full = torch.zeros(blocks, blocks, rb, rb, dtype=torch.float64, device=x.device)
    a, b = block_a.long(), block_b.long()
    full[b, a] = summed.transpose(1, 2)
    full[a, b] = summed  # a diagonal block is its own transpose (the same products, summed in the same order)
    return full.transpose(1, 2).reshape(blocks * rb, blocks * rb)[:n, :n]
