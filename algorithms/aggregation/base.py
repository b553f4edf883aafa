"""What every aggregation rule shares: the two-phase form, the Gram statistic, the liar weight.

A rule maps the workers' gradients ``X[n, d]`` (one row per worker) to one aggregate ``a[d]``.
Every rule is written in three steps so that it runs unchanged over blocks of coordinates
(chunks on one device, buckets of an all-gather, shards of an all-to-all):

1. ``stats(block)``: an ``n x n`` statistic that is *additive over disjoint coordinate blocks*
   (a Gram matrix of the rows, raw or centred across workers), or ``None`` for the coordinate-wise
   rules, which need nothing global.
2. ``plan(stats, n)``: the small decision made in worker space (which rows Krum picks, the
   Weiszfeld or IRLS weights), in float64 on the CPU; ``n x n`` numbers, never ``d``.
3. ``apply(plan, block)``: the aggregate of that block, batched on the block's device, and
   optionally each worker's *mass* in it (see :func:`liar_weight`).

So the distance- and subspace-based rules (Krum, Multi-Krum, Bulyan, geometric median, Flag)
never need all ``d`` coordinates of all ``n`` workers at once: summing the blocks' Gram
matrices gives the full one exactly, and the same plan is applied block by block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from algorithms.aggregation import row_kernels

DEFAULT_CHUNK = 1 << 22  # coordinates per block when a rule runs over a whole tensor
GRAM_SPLIT = 1 << 14  # coordinates per partial product inside one Gram matrix


@dataclass
class AggResult:
    value: Tensor  # [d] the aggregate
    mass: Tensor | None  # [n] float64: each worker's l1 contribution to it (see liar_weight)


def chunks(d: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, d, size):
        yield start, min(start + size, d)


class _Fp32Matmul:
    """Full fp32 matmuls inside (no TF32): the Gram matrix is the rules' only global statistic."""

    def __enter__(self) -> None:
        self.prev = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")

    def __exit__(self, *exc: object) -> None:
        torch.set_float32_matmul_precision(self.prev)


def gram(block: Tensor, centered: bool) -> Tensor:
    """``block @ block.T`` as float64 (products in fp32, or fp64 for fp64 input; summed over blocks
    in float64).

    ``centered`` subtracts the workers' mean from each coordinate first (the pairwise distances,
    which are all Krum and Weiszfeld need, are unchanged by it, and the cancellation in
    ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j`` is avoided). Per-coordinate centring is additive over blocks.
    A CUDA block takes the Triton kernel of :mod:`algorithms.aggregation.row_kernels` when it can (same
    products in fp32, about twice cuBLAS's speed for this shape; centred, one more pass for the mean
    instead of writing and reading a centred copy); the rest, bmm.
    """
    if row_kernels.available(block):
        center = row_kernels.mean_triton(block) if centered else None
        return row_kernels.gram_triton(block, center=center)
    x = block if block.dtype == torch.float64 else block.float()
    if centered:
        x = x - x.mean(dim=0, keepdim=True)
    n, length = x.shape
    whole = length // GRAM_SPLIT * GRAM_SPLIT
    g = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    with _Fp32Matmul():
        if whole:
            # One n x n product over millions of coordinates gives a GEMM with almost no parallel
            # work (a 16 x 16 output); a batch of products over GRAM_SPLIT-long pieces has plenty
            # (no copy: the pieces are views), and their sum is taken in float64.
            parts = x[:, :whole].reshape(n, whole // GRAM_SPLIT, GRAM_SPLIT).transpose(0, 1)
            g += torch.bmm(parts, parts.transpose(1, 2)).sum(dim=0, dtype=torch.float64)
        if whole < length:
            rest = x[:, whole:]
            g += (rest @ rest.T).double()
    return g


def distances_from_gram(g: Tensor) -> Tensor:
    """Squared pairwise distances from a Gram matrix (float64, clamped at 0, zero diagonal)."""
    diag = torch.diagonal(g)
    d2 = (diag[:, None] + diag[None, :] - 2.0 * g).clamp_min(0.0)
    d2.fill_diagonal_(0.0)
    return d2


class Rule:
    """Base of every rule; subclasses set ``gram_kind`` and override ``plan``/``apply``."""

    name = "rule"
    gram_kind: Literal["raw", "centered"] | None = None
    apply_whole = False  # True: ``apply`` without the mass needs no temporary of the block's size

    def __init__(self, f: int = 0, chunk: int = DEFAULT_CHUNK) -> None:
        if f < 0:
            raise ValueError(f"{self.name}: f must be >= 0 (got {f})")
        self.f = f
        self.chunk = chunk

    # --- the three steps -------------------------------------------------------------------
    def check(self, n: int) -> None:
        """Refuse an ``n`` this rule cannot work with (configs check it earlier, with the spec)."""
        if n < 1:
            raise ValueError(f"{self.name}: needs at least one gradient")

    def stats(self, block: Tensor) -> Tensor | None:
        if self.gram_kind is None:
            return None
        return gram(block, centered=self.gram_kind == "centered")

    def plan(self, stats: Tensor | None, n: int) -> Any:
        return None

    def applies_whole(self, grads: Tensor) -> bool:
        """Whether ``apply`` without the mass takes all of ``grads`` in one call (no temporary of the
        block's size), instead of block by block: ``apply_whole``, or what the rule's GPU path allows."""
        return self.apply_whole

    def apply(self, plan: Any, block: Tensor, with_mass: bool = False) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    # --- whole tensors ---------------------------------------------------------------------
    def aggregate(self, grads: Tensor, with_mass: bool = False) -> AggResult:
        if grads.dim() != 2:
            raise ValueError(f"{self.name}: expected grads of shape [n, d], got {tuple(grads.shape)}")
        n, d = grads.shape
        self.check(n)
        stats = None
        if self.gram_kind is not None:
            for s, e in chunks(d, self.chunk):
                part = self.stats(grads[:, s:e])
                assert part is not None
                stats = part if stats is None else stats + part
        plan = self.plan(stats, n)
        if d <= self.chunk or (not with_mass and self.applies_whole(grads)):
            value, mass = self.apply(plan, grads, with_mass)
            return AggResult(value, mass)
        value = torch.empty(d, dtype=grads.dtype, device=grads.device)
        total = torch.zeros(n, dtype=torch.float64, device=grads.device) if with_mass else None
        for s, e in chunks(d, self.chunk):
            v, m = self.apply(plan, grads[:, s:e], with_mass)
            value[s:e] = v
            if total is not None and m is not None:
                total += m
        return AggResult(value, total)

    def __call__(self, grads: Tensor) -> Tensor:
        return self.aggregate(grads).value

    def __repr__(self) -> str:
        return f"{type(self).__name__}(f={self.f})"


class LinearRule(Rule):
    """Rules whose aggregate is one fixed linear combination ``sum_i c_i x_i`` of the rows."""

    apply_whole = True  # one matrix-vector product over all of ``d``: no block copies

    def apply(self, plan: Any, block: Tensor, with_mass: bool = False) -> tuple[Tensor, Tensor | None]:
        if row_kernels.available(block):
            value = row_kernels.combine_triton(plan, block)  # one wide pass over the rows (GPU)
        else:
            value = plan.to(device=block.device, dtype=block.dtype) @ block
        mass = None
        if with_mass:
            mass = plan.to(block.device).abs() * block.abs().sum(dim=1, dtype=torch.float64)
        return value, mass


def ordered_mean(rows: Tensor | Sequence[Tensor]) -> Tensor:
    """The mean of ``rows`` (``k`` tensors of one shape, or a ``[k, ...]`` tensor) as the order-statistic
    kernels compute it: added one after the other in the given order, in fp32 (float64 for float64
    rows), divided once by ``k`` (true division: a divisor on the device, since torch's CUDA division
    by a Python number multiplies by its reciprocal), rounded to the rows' dtype. torch's ``mean``
    reduces in an order of its own, which differs between CPU and CUDA; this order is the one both
    paths can share, bit for bit."""
    dtype = rows[0].dtype
    acc = rows[0].to(torch.float64 if dtype == torch.float64 else torch.float32, copy=True)
    for row in rows[1:]:
        acc.add_(row)
    count = acc.new_full((), len(rows))  # filled on the device: no copy from the host
    return (acc / count).to(dtype)


def coefficient_mass(block: Tensor, picked_rows: Tensor, weights: Tensor | float, n: int) -> Tensor:
    """Mass for coordinate-wise rules: ``picked_rows[k, j]`` is the row whose value entered
    coordinate ``j`` of the aggregate with weight ``weights`` (a number or ``[k, 1]``)."""
    vals = block.gather(0, picked_rows).abs().double() * weights
    mass = torch.zeros(n, dtype=torch.float64, device=block.device)
    mass.index_add_(0, picked_rows.reshape(-1), vals.reshape(-1))
    return mass


def least_squares_mass(grads: Tensor, agg: Tensor) -> Tensor:
    """Mass when the rule did not report one: ``agg ~ sum_i c_i x_i`` by minimum-norm least squares
    (through the ``n x n`` Gram matrix), mass_i = ``|c_i| * |x_i|_1``."""
    x = grads.float()
    g = gram(x, centered=False)
    with _Fp32Matmul():
        rhs = (x @ agg.float()).double()
    coef = torch.linalg.pinv(g.cpu(), rtol=1e-10) @ rhs.cpu()
    return coef.abs() * x.abs().sum(dim=1, dtype=torch.float64).cpu()


def liar_weight(grads: Tensor, agg: Tensor, byz_idx: Sequence[int], mass: Tensor | None = None) -> float:
    """How much of the aggregate came from the Byzantine rows ``byz_idx``, in [0, 1].

    Every rule here writes each coordinate of the aggregate as a combination of the workers'
    values there: ``a_j = sum_i w_ij x_ij`` (mean: ``w = 1/n``; Krum: 1 for the chosen row;
    median: 1 for the middle row of that coordinate; Flag and the geometric median: one
    coefficient per row for all coordinates). Worker ``i``'s *mass* is ``sum_j |w_ij x_ij|``, its
    l1 share of the aggregate before cancellations, and the liar weight is the liars' share of
    the total mass. The rules report the mass themselves (``aggregate(..., with_mass=True)``);
    without it, the coefficients come from least squares (:func:`least_squares_mass`), which is
    exact for linearly independent rows but only one of many decompositions when the lies are
    combinations of honest rows (sign flip, IPM, ALIE's mean): pass ``mass`` whenever the rule ran
    here (``rule.aggregate(grads, with_mass=True).mass``).
    So: 0 when no liar value entered the aggregate, f/n for the mean of equal-norm rows, and
    close to 1 when scaled lies dominate it.
    """
    if mass is None:
        if not list(byz_idx):
            return 0.0
        mass = least_squares_mass(grads, agg)
    return liar_share(mass, byz_idx)


def liar_share(mass: Tensor, byz_idx: Sequence[int]) -> float:
    """The liars' share of the total mass (see :func:`liar_weight`)."""
    byz = list(byz_idx)
    if not byz:
        return 0.0
    mass = mass.double().cpu()
    total = float(mass.sum())
    if total <= 0.0:
        return 0.0
    return float(mass[byz].sum()) / total
