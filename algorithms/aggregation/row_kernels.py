"""Triton kernels for the two passes the linear rules make over the gradient rows on a GPU: the raw
Gram matrix ``X X^T`` (Flag's statistic) and the combination ``c^T X`` (every linear rule's aggregate).

**Gram.** ``X X^T`` for ``X`` of ``n x d`` with ``n`` of 2-64 workers and ``d`` in the millions is a
GEMM with a tiny output and a huge reduction. cuBLAS picks a small-N SIMT kernel for it that reads
``X`` at about 1 TB/s on an H200 (70% of Flag's time in ``bench/gpu_aggregation.py --profile flag``); a
Triton kernel built on ``tl.dot`` (tensor-core tiles of 16 rows) did no better (commit ac5c352).
This one does no matrix product at all: the rows are split into blocks of ``RB`` rows, and one
program per (pair of row blocks ``a <= b``, stretch of ``SPAN`` coordinates) loads the two blocks'
``[RB, BLOCK]`` tiles and accumulates the elementwise products ``x_i[k] * x_j[k]`` of every row pair
in registers (``RB x RB`` fp32 fused multiply-adds per column, each thread holding its own
columns), reducing over the coordinates once, at the end of its stretch. The programs of one
stretch are adjacent in the launch order, so the second read of a row block comes from L2, not
memory. The ``RB x RB`` fp32 partials are summed in float64, as the bmm path sums its
``GRAM_SPLIT``-long pieces, so the two agree to fp32 rounding.

The centred Gram of the distance-based rules (Krum, Multi-Krum, Bulyan, the geometric median) is the
same kernel with a centre subtracted from every row as it is loaded: the rows' mean, from one
combination pass (:func:`mean_triton`). The bmm path writes the centred block to memory and reads
it again: the geometric median, whose time is nearly all that, took 4.2 / 17.6 ms at n = 16,
d = 25M / 100M on an H200, against 0.9 / 3.1 ms for the raw Gram kernel (bench/RESULTS.md), and
Bulyan's goal is six 2-GPU all-reduces (2.3 / 8.2 ms) for the whole rule. The centre only
conditions the products (distances, and the affine combinations the rules take, are the same for
any centre), so the mean need not be torch's to the last bit.

**Combination.** ``sum_i c_i x_i`` with the coefficients in fp32: one program per ``BLOCK_C``
columns walks the ``n`` rows (unrolled, ``n`` a compile-time constant) with wide loads; cuBLAS's
gemv reads ``X`` at about 3.1 TB/s here.

:func:`algorithms.aggregation.base.gram` and :class:`algorithms.aggregation.base.LinearRule` call
these for fp32/bf16/fp16 CUDA tensors with at most ``MAX_ROWS`` rows when Triton imports
(:func:`available`); otherwise (no Triton, a CPU tensor, ``ENABLED = False``) they take torch's
bmm and matmul. On CPU tensors the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``
before the import), which is how the CPU tests check them.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

triton: Any = None
tl: Any = None
try:
    import triton  # type: ignore[no-redef]
    import triton.language as tl  # type: ignore[no-redef]
except ImportError:  # the CPU-only install may lack Triton: the rules use torch's bmm and matmul
    pass

ENABLED = True  # False: torch's path on a GPU too (benchmarks and tests compare); order_kernels obeys it too
MAX_ROWS = 64
# The defaults won `bench/gpu_aggregation.py --gram-sweep` on an H200 (2026-11-26): for n = 16 the Gram
# takes 0.89 / 3.12 ms at d = 25M / 100M (1.8-2.0 TB/s; cuBLAS bmm 1.60 / 5.86 ms; bench/RESULTS.md); n = 2 and 4 read
# at 2.3-2.5 TB/s at 100M. Row blocks of 16 (256 accumulators a thread) spill registers and run 2-30x slower.
ROW_BLOCK = 8  # rows per block: RB x RB x (columns per thread) accumulators per thread
BLOCK = 128  # coordinates per tile (one per thread at 4 warps)
SPAN = 16384  # coordinates per program (and per fp32 partial)
NUM_WARPS = 4
BLOCK_C = 2048  # columns per program of the combination (16 per thread at 4 warps)


def available(x: Tensor) -> bool:
    return (ENABLED and triton is not None and x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16))


def _gram_pair_partials(x_ptr, c_ptr, out_ptr, block_a_ptr, block_b_ptr, n, length, stride_row, pairs,  # type: ignore[no-untyped-def]
                        RB: tl.constexpr, BLOCK: tl.constexpr, SPAN: tl.constexpr,
                        MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr, CENTER: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    pair = pid % pairs  # the pairs of one stretch run side by side: the re-read row block hits L2
    stretch = pid // pairs
    rows_a = tl.load(block_a_ptr + pair) * RB + tl.arange(0, RB)
    rows_b = tl.load(block_b_ptr + pair) * RB + tl.arange(0, RB)
    base_a = x_ptr + rows_a.to(tl.int64) * stride_row
    base_b = x_ptr + rows_b.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((RB, RB, BLOCK), dtype=tl.float32)
    start = stretch * SPAN
    for k in range(0, SPAN, BLOCK):
        cols = start + k + offs
        if MASK_ROWS or MASK_COLS:  # only the ragged last stretch and a ragged last row block pay for masks
            ok_a = rows_a < n if MASK_ROWS else rows_a >= 0
            ok_b = rows_b < n if MASK_ROWS else rows_b >= 0
            in_range = cols < length if MASK_COLS else cols >= 0
            xa = tl.load(base_a[:, None] + cols[None, :], mask=ok_a[:, None] & in_range[None, :], other=0.0)
            xb = tl.load(base_b[:, None] + cols[None, :], mask=ok_b[:, None] & in_range[None, :], other=0.0)
        else:
            xa = tl.load(base_a[:, None] + cols[None, :])
            xb = tl.load(base_b[:, None] + cols[None, :])
        xa = xa.to(tl.float32)
        xb = xb.to(tl.float32)
        if CENTER:  # padded rows become -c: their products land in entries that are never read
            if MASK_COLS:
                c = tl.load(c_ptr + cols, mask=cols < length, other=0.0).to(tl.float32)
            else:
                c = tl.load(c_ptr + cols).to(tl.float32)
            xa = xa - c[None, :]
            xb = xb - c[None, :]
        acc += xa[:, None, :] * xb[None, :, :]
    part = tl.sum(acc, axis=2)
    i = tl.arange(0, RB)
    out = out_ptr + pid * RB * RB + i[:, None] * RB + i[None, :]
    tl.store(out, part)


_kernel = triton.jit(_gram_pair_partials) if triton is not None else None
_tables: dict[tuple[int, int, torch.device], tuple[Tensor, Tensor, Tensor]] = {}
last_launch: Any = None  # the last compiled launch (the sweep reads its registers and spills)


def _on_device(x: Tensor) -> Any:
    """Triton launches on the current CUDA device: make it ``x``'s."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def row_block_for(n: int, row_block: int = ROW_BLOCK) -> int:
    """Rows per block for ``n`` rows: ``row_block``, or one block (a power of two, at least 2) when
    ``n`` fits in it."""
    return min(row_block, max(2, 1 << (n - 1).bit_length()))


def _tables_for(n: int, rb: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The row-block pairs ``a <= b`` and, for every entry ``(i, j)`` of the ``n x n`` Gram matrix,
    its place in the summed ``[pairs, rb, rb]`` partials (the transposed place below the diagonal)."""
    key = (n, rb, device)
    if key not in _tables:
        blocks = -(-n // rb)
        a, b = torch.triu_indices(blocks, blocks)
        pair_of = torch.full((blocks, blocks), -1, dtype=torch.long)
        pair_of[a, b] = torch.arange(a.numel())
        i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        lo, hi = torch.minimum(i, j), torch.maximum(i, j)  # (lo, hi) lies in pair (lo // rb, hi // rb)
        where = pair_of[lo // rb, hi // rb] * rb * rb + (lo % rb) * rb + hi % rb
        _tables[key] = (a.to(torch.int32).to(device), b.to(torch.int32).to(device), where.to(device))
    return _tables[key]


def gram_triton(x: Tensor, row_block: int = ROW_BLOCK, block: int = BLOCK, span: int = SPAN,
                num_warps: int = NUM_WARPS, num_stages: int | None = None, center: Tensor | None = None) -> Tensor:
    """``x @ x.T`` as float64 on ``x``'s device (products and per-program sums in fp32); with ``center``
    (``[d]``), the Gram matrix of the rows ``x_i - center``, each subtracted in fp32 as it is loaded."""
    global last_launch
    assert _kernel is not None, "Triton is not installed"
    assert x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS, f"expected [0 < n <= {MAX_ROWS}, d], got {tuple(x.shape)}"
    assert span % block == 0, "span must be a multiple of block"
    if x.shape[1] and x.stride(1) != 1:
        x = x.contiguous()
    n, length = x.shape
    if center is not None:
        assert center.shape == (length,) and center.device == x.device, "center must be [d] on x's device"
        center = center.contiguous()
    rb = row_block_for(n, row_block)
    block_a, block_b, where = _tables_for(n, rb, x.device)
    pairs = block_a.numel()
    full, tail = divmod(length, span)
    parts = torch.empty((full + (1 if tail or not full else 0)) * pairs, rb, rb, dtype=torch.float32,
                        device=x.device)
    extra = {} if num_stages is None else {"num_stages": num_stages}
    masked_rows = n % rb != 0
    c = center if center is not None else x  # not read without CENTER
    with _on_device(x):
        if full:  # whole stretches: no column mask
            last_launch = _kernel[(full * pairs,)](x, c, parts, block_a, block_b, n, full * span, x.stride(0), pairs,
                                                   RB=rb, BLOCK=block, SPAN=span, MASK_ROWS=masked_rows,
                                                   MASK_COLS=False, CENTER=center is not None, num_warps=num_warps,
                                                   **extra)
        if tail or not full:  # the ragged end (or an empty x): one masked stretch
            c_tail = c[full * span:] if center is not None else c
            _kernel[(pairs,)](x[:, full * span:], c_tail, parts[full * pairs:], block_a, block_b, n, tail,
                              x.stride(0), pairs, RB=rb, BLOCK=block, SPAN=span, MASK_ROWS=masked_rows,
                              MASK_COLS=True, CENTER=center is not None, num_warps=num_warps, **extra)
    summed = parts.view(-1, pairs * rb * rb).sum(dim=0, dtype=torch.float64)
    return summed[where]


def _combine(x_ptr, c_ptr, out_ptr, length, stride_row,  # type: ignore[no-untyped-def]
             N: tl.constexpr, BLOCK_C: tl.constexpr, MASK: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in tl.static_range(N):
        ci = tl.load(c_ptr + i)
        row = x_ptr + tl.full((), i, tl.int64) * stride_row  # 64-bit: n x d may pass 2^31 elements
        if MASK:
            xi = tl.load(row + cols, mask=cols < length, other=0.0)
        else:
            xi = tl.load(row + cols)
        acc += ci * xi.to(tl.float32)
    if MASK:
        tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < length)
    else:
        tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty))


_combine_kernel = triton.jit(_combine) if triton is not None else None
_uniform: dict[tuple[int, torch.device], Tensor] = {}


def mean_triton(x: Tensor) -> Tensor:
    """The mean of the rows, ``x``'s dtype (as :func:`combine_triton` with ``1/n``; the coefficients are
    kept on the device, so that no copy from the host waits for the GPU in a loop over blocks)."""
    key = (x.shape[0], x.device)
    if key not in _uniform:
        _uniform[key] = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=torch.float32, device=x.device)
    return combine_triton(_uniform[key], x)


def combine_triton(coef: Tensor, x: Tensor, block: int = BLOCK_C, num_warps: int = NUM_WARPS) -> Tensor:
    """``coef @ x`` (``coef[n]``, ``x[n, d]``) in ``x``'s dtype, products and sums in fp32."""
    assert _combine_kernel is not None, "Triton is not installed"
    assert x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and coef.shape == (x.shape[0],)
    if x.shape[1] and x.stride(1) != 1:
        x = x.contiguous()
    n, length = x.shape
    c = coef.to(device=x.device, dtype=torch.float32).contiguous()
    out = torch.empty(length, dtype=x.dtype, device=x.device)
    full, tail = divmod(length, block)
    with _on_device(x):
        if full:
            _combine_kernel[(full,)](x, c, out, full * block, x.stride(0), N=n, BLOCK_C=block, MASK=False,
                                     num_warps=num_warps)
        if tail:
            _combine_kernel[(1,)](x[:, full * block:], c, out[full * block:], tail, x.stride(0), N=n,
                                  BLOCK_C=block, MASK=True, num_warps=num_warps)
    return out
