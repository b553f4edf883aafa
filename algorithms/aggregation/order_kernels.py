"""Triton kernels for the coordinate-wise order statistics on a GPU: the median, the trimmed mean and
Bulyan's coordinate step.

torch sorts ``X[n, d]`` along the workers' dimension (``torch.sort(block, dim=0)``), which is a
general segmented sort: on an H200, n = 16 and d = 100M, the median took 97 ms and Bulyan 250 ms,
against 1.4 ms for a 2-GPU all-reduce of the same size and about 1.5 ms to read the rows once.
Here ``n`` is small (at most ``row_kernels.MAX_ROWS``) and known when the kernel compiles: one
program owns ``BLOCK`` coordinates, loads the ``n`` values of each of its columns once (row after
row, so every load is contiguous along ``d``), and sorts each column in registers with a fixed
sorting network (:func:`network`: Batcher's odd-even merge sort, unrolled; a comparator is one
``min`` and one ``max``). Only the statistic is written. Comparators whose outputs the statistic
never reads are removed by the compiler.

**The definitions**, which the torch paths of :mod:`algorithms.aggregation.coordinate` and
:mod:`algorithms.aggregation.krum` compute too, so that both give the same bits:

- values sort as ``torch.sort`` sorts them, NaN after everything else. The network compares
  with ``min``/``max``, which drop a NaN, so a NaN enters the network as ``+inf``; its column
  counts its NaNs, and as many of the last places of the sorted column are NaN again.
- median: the middle value, or for even ``n`` the two middle values added and halved, each
  operation rounded to the input's dtype (``0.5 * (lo + hi)`` in torch).
- trimmed mean (``f > 0``): the ``n - 2f`` middle values summed in ascending order, one after the
  other, in fp32 (float64 for float64 input, which only torch takes), then divided once by
  ``n - 2f`` (IEEE division) and rounded to the input's dtype. torch's own ``mean`` reduces in an
  order of its own (not the same on CPU and on CUDA), which a kernel cannot reproduce, so the
  torch path sums in this order instead (:func:`algorithms.aggregation.base.ordered_mean`).
- Bulyan's step, over the ``theta`` selected rows: their median ``m`` as above, the distances
  ``|v - m|`` of the sorted values (rounded to the input's dtype), then the ``beta = theta - 2f``
  nearest values as a window of the sorted column: ``2f`` times, the end of the window that is
  farther from ``m`` is dropped, the upper end when the two are as far (and when a distance is
  NaN: NaNs, last in the column, go first). The window is averaged as the trimmed mean is. A NaN
  median gives NaN. The window is the set of the ``beta`` values nearest ``m``; the rule fixes
  which one of two values as far below and above ``m`` stays (the lower), which ``torch.topk``
  would leave to its implementation (not the same on CPU and CUDA).
- ``-0.0`` and ``+0.0`` compare equal, so where both are among the values the sign of a zero in
  the result may differ between the paths (the value does not).

:class:`~algorithms.aggregation.coordinate.Median`, ``TrimmedMean`` and
:class:`~algorithms.aggregation.krum.Bulyan` call these for the fp32/bf16/fp16 CUDA tensors that
:func:`available` accepts (the conditions and the switch ``row_kernels.ENABLED`` of the Gram and
combination kernels), unless they are asked for each worker's mass, which needs the sort's indices;
otherwise they take torch's sort. On CPU tensors the kernels run under Triton's interpreter
(``TRITON_INTERPRET=1`` before the import), which is how the CPU tests check them.

Every ``(rule, n, f, dtype)`` compiles once (Triton keeps it on disk). Compiled for sm_90 on a
2-core machine: about a second at n = 16; 3-10 s at n = 58-64 (543 comparators at 64), most of it in
one of Triton's passes (TritonGPUCoalesce), which grows with the straight-line code. None of the
variants compiled so far spills registers (70-110 a thread at n <= 16, under 100 at n = 64;
tests/unit/aggregation/test_order_kernels.py checks some on any machine).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch import Tensor

from algorithms.aggregation import row_kernels

triton: Any = None
tl: Any = None
try:
    import triton  # type: ignore[no-redef]
    import triton.language as tl  # type: ignore[no-redef]
except ImportError:  # the CPU-only install may lack Triton: the rules use torch's sort
    pass

NUM_WARPS = 4


def available(x: Tensor) -> bool:
    """The kernels take what the Gram and combination kernels take (one switch turns all off)."""
    return row_kernels.available(x)


@functools.cache
def network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort of ``n`` wires as comparators ``(i, j)``, ``i < j``: wire ``i``
    takes the smaller value. It is built for the next power of two and the comparators that touch
    a wire ``>= n`` are left out, which sorts ``n`` values as if ``+inf`` filled the missing wires
    (a comparator against ``+inf`` changes nothing). 63 comparators for 16 wires (60 is the known
    minimum), 543 for 64."""
    size = 1 << max(n - 1, 0).bit_length()
    pairs = []
    merge = 1
    while merge < size:
        k = merge
        while k >= 1:
            for j in range(k % merge, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * merge) == (i + j + k) // (2 * merge):
                        pairs.append((i + j, i + j + k))
            k //= 2
        merge *= 2
    return tuple((i, j) for i, j in pairs if j < n)


def block_for(n: int, num_warps: int = NUM_WARPS) -> int:
    """Coordinates per program: four columns a thread up to 16 rows, two up to 32, then one, so that a
    thread holds about 64 values and its loads are 16 bytes wide where it can (``bench/gpu_aggregation.py
    --order-sweep`` times the other settings)."""
    per_thread = 4 if n <= 16 else 2 if n <= 32 else 1
    return per_thread * 32 * num_warps


def _row(x_ptr, rows_ptr, stride_row, cols, length,  # type: ignore[no-untyped-def]
         I: tl.constexpr, MASK: tl.constexpr, GATHER: tl.constexpr):
    """Row ``I`` (``rows_ptr[I]`` with ``GATHER``) at the columns ``cols``, in fp32."""
    if GATHER:
        row = tl.load(rows_ptr + I).to(tl.int64)
    else:
        row = tl.full((), I, tl.int64)  # 64-bit: n x d may pass 2^31 elements
    ptr = x_ptr + row * stride_row + cols
    if MASK:  # only the ragged last block pays for the mask
        v = tl.load(ptr, mask=cols < length, other=0.0)
    else:
        v = tl.load(ptr)
    return v.to(tl.float32)


def _sorted_columns(x_ptr, rows_ptr, stride_row, cols, length,  # type: ignore[no-untyped-def]
                    N: tl.constexpr, NET: tl.constexpr, MASK: tl.constexpr, GATHER: tl.constexpr):
    """The ``N`` values of every column, sorted as ``torch.sort`` sorts them (NaN last): ``N`` fp32
    ``[BLOCK]`` tensors, a list in this source and a tuple once compiled. ``NET``: the comparators
    (:func:`network`). ``GATHER``: the rows are ``rows_ptr[0:N]``, else the first ``N``.

    The code is unrolled (``N`` and ``NET`` are known when it compiles) and written inline: helper
    functions taking all the wires cost seconds of compilation at n = 64. Each list starts with its
    first element so that mypy knows its type."""
    xs = [_row(x_ptr, rows_ptr, stride_row, cols, length, 0, MASK, GATHER)]
    for i in tl.static_range(1, N):  # all the loads first, each contiguous along d
        xs = xs + [_row(x_ptr, rows_ptr, stride_row, cols, length, i, MASK, GATHER)]
    nans = (xs[0] != xs[0]).to(tl.int32)
    for i in tl.static_range(1, N):
        nans += (xs[i] != xs[i]).to(tl.int32)
    xs = [tl.where(x != x, float("inf"), x) for x in xs]  # min and max would drop a NaN
    for k in tl.static_range(len(NET)):  # comparator (i, j): wire i takes the smaller value
        a = xs[NET[k][0]]
        b = xs[NET[k][1]]
        xs = (xs[:NET[k][0]] + [tl.minimum(a, b)] + xs[NET[k][0] + 1:NET[k][1]] + [tl.maximum(a, b)]
              + xs[NET[k][1] + 1:])
    vals = [tl.where(nans > N - 1, float("nan"), xs[0])]  # the column's NaNs fill its last places
    for p in tl.static_range(1, N):
        vals = vals + [tl.where(nans > N - 1 - p, float("nan"), xs[p])]
    return vals


def _pick(xs, start):  # type: ignore[no-untyped-def]
    """``xs[start]`` for a ``start`` that differs between columns: registers cannot be indexed by it,
    so the value is picked by selects over the few places it can be."""
    v = xs[0]
    for c in tl.static_range(1, len(xs)):
        v = tl.where(start == c, xs[c], v)
    return v


def _rounded(v, out_ptr):  # type: ignore[no-untyped-def]
    """``v`` rounded to the output's dtype and back: torch rounds every operation to the input's dtype."""
    return v.to(out_ptr.dtype.element_ty).to(tl.float32)


def _middle(lo, hi, out_ptr, ODD: tl.constexpr):  # type: ignore[no-untyped-def]
    """The median from the two middle values of a sorted column (the same one for odd ``n``):
    ``0.5 * (lo + hi)`` as torch computes it for even ``n``."""
    if ODD:
        mid = lo
    else:
        mid = _rounded(_rounded(lo + hi, out_ptr) * 0.5, out_ptr)
    return mid


def _median(x_ptr, out_ptr, length, stride_row,  # type: ignore[no-untyped-def]
            N: tl.constexpr, NET: tl.constexpr, BLOCK: tl.constexpr, MASK: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    vals = _sorted_columns(x_ptr, x_ptr, stride_row, cols, length, N, NET, MASK, False)
    value = _middle(vals[(N - 1) // 2], vals[N // 2], out_ptr, N % 2 == 1).to(out_ptr.dtype.element_ty)
    if MASK:
        tl.store(out_ptr + cols, value, mask=cols < length)
    else:
        tl.store(out_ptr + cols, value)


def _trimmed_mean(x_ptr, out_ptr, length, stride_row,  # type: ignore[no-untyped-def]
                  N: tl.constexpr, NET: tl.constexpr, F: tl.constexpr, BLOCK: tl.constexpr,
                  MASK: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    vals = _sorted_columns(x_ptr, x_ptr, stride_row, cols, length, N, NET, MASK, False)
    acc = vals[F]
    for p in tl.static_range(F + 1, N - F):  # ascending, one value after the other
        acc += vals[p]
    # IEEE division: the plain `/` compiles to an approximate one on NVIDIA GPUs
    value = tl.math.div_rn(acc, tl.full((BLOCK,), N - 2 * F, tl.float32)).to(out_ptr.dtype.element_ty)
    if MASK:
        tl.store(out_ptr + cols, value, mask=cols < length)
    else:
        tl.store(out_ptr + cols, value)


def _bulyan(x_ptr, rows_ptr, out_ptr, length, stride_row,  # type: ignore[no-untyped-def]
            N: tl.constexpr, NET: tl.constexpr, F: tl.constexpr, BLOCK: tl.constexpr, MASK: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    vals = _sorted_columns(x_ptr, rows_ptr, stride_row, cols, length, N, NET, MASK, True)
    med = _middle(vals[(N - 1) // 2], vals[N // 2], out_ptr, N % 2 == 1)
    dists = [tl.abs(_rounded(v - med, out_ptr)) for v in vals]
    # The window of the sorted column starts at `start` (0..2F); after t drops it is [start, start + N - t).
    start = tl.zeros((BLOCK,), dtype=tl.int32)
    for t in tl.static_range(2 * F):
        left = _pick(dists[:t + 1], start)
        right = _pick(dists[N - 1 - t:N], start)
        start += (left > right).to(tl.int32)  # a tie, or a NaN: the upper end goes
    acc = _pick(vals[:2 * F + 1], start)
    for k in tl.static_range(1, N - 2 * F):  # ascending, one value after the other
        acc += _pick(vals[k:k + 2 * F + 1], start)
    value = tl.math.div_rn(acc, tl.full((BLOCK,), N - 2 * F, tl.float32))
    value = tl.where(med != med, med, value).to(out_ptr.dtype.element_ty)
    if MASK:
        tl.store(out_ptr + cols, value, mask=cols < length)
    else:
        tl.store(out_ptr + cols, value)


if triton is not None:
    _row = triton.jit(_row)
    _sorted_columns = triton.jit(_sorted_columns)
    _pick = triton.jit(_pick)
    _rounded = triton.jit(_rounded)
    _middle = triton.jit(_middle)
    _median_kernel = triton.jit(_median)
    _trimmed_mean_kernel = triton.jit(_trimmed_mean)
    _bulyan_kernel = triton.jit(_bulyan)


def _on_device(x: Tensor) -> Any:
    """Triton launches on the current CUDA device: make it ``x``'s."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _launch(kernel: Any, x: Tensor, args: tuple[Any, ...], block: int | None, num_warps: int,
            **constexprs: Any) -> Tensor:
    """One value per column of ``x`` (``[rows, d]``, rows of stride ``x.stride(0)``): the whole blocks
    without masks, then the ragged end with them. ``args`` go before the output pointer."""
    assert triton is not None, "Triton is not installed"
    if x.shape[1] and x.stride(1) != 1:
        x = x.contiguous()
    length = x.shape[1]
    n = constexprs["N"]
    block = block or block_for(n, num_warps)
    out = torch.empty(length, dtype=x.dtype, device=x.device)
    full, tail = divmod(length, block)
    with _on_device(x):
        if full:
            kernel[(full,)](x, *args, out, full * block, x.stride(0), NET=network(n), BLOCK=block, MASK=False,
                            num_warps=num_warps, **constexprs)
        if tail:
            kernel[(1,)](x[:, full * block:], *args, out[full * block:], tail, x.stride(0), NET=network(n), BLOCK=block,
                         MASK=True, num_warps=num_warps, **constexprs)
    return out


def _check(x: Tensor) -> None:
    assert x.dim() == 2 and 0 < x.shape[0] <= row_kernels.MAX_ROWS, \
        f"expected [0 < n <= {row_kernels.MAX_ROWS}, d], got {tuple(x.shape)}"
    assert x.dtype in (torch.float32, torch.bfloat16, torch.float16), f"unsupported dtype {x.dtype}"


def median_triton(x: Tensor, block: int | None = None, num_warps: int = NUM_WARPS) -> Tensor:
    """The coordinate-wise median of ``x[n, d]`` (the mean of the two middle values for even ``n``)."""
    _check(x)
    return _launch(_median_kernel, x, (), block, num_warps, N=x.shape[0])


def trimmed_mean_triton(x: Tensor, f: int, block: int | None = None, num_warps: int = NUM_WARPS) -> Tensor:
    """The coordinate-wise mean of the ``n - 2f`` middle values of ``x[n, d]`` (``0 <= 2f < n``)."""
    _check(x)
    assert 0 <= 2 * f < x.shape[0], f"trimmed mean needs n > 2f (got f={f}, n={x.shape[0]})"
    return _launch(_trimmed_mean_kernel, x, (), block, num_warps, N=x.shape[0], F=f)


def bulyan_triton(x: Tensor, rows: Tensor, f: int, block: int | None = None, num_warps: int = NUM_WARPS) -> Tensor:
    """Bulyan's coordinate step over the rows ``rows`` of ``x`` (any order, ``theta`` of them): the mean
    of the ``theta - 2f`` values nearest their median, coordinate by coordinate."""
    _check(x)
    theta = rows.numel()
    assert 0 < theta <= x.shape[0] and 0 <= 2 * f < theta, f"bulyan step: theta={theta}, f={f}, n={x.shape[0]}"
    rows = rows.to(torch.int64)
    if rows.device != x.device:
        # Pinned and asynchronous: a plain copy from pageable memory waits for the GPU's queue, which
        # would stall the host at every block of a chunked aggregate.
        rows = rows.pin_memory().to(x.device, non_blocking=True) if x.is_cuda else rows.to(x.device)
    return _launch(_bulyan_kernel, x, (rows,), block, num_warps, N=theta, F=f)
