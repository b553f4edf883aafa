"""Mean and the coordinate-wise rules: median and trimmed mean (each coordinate on its own).

On a GPU the median and the trimmed mean take the sorting-network kernels of
:mod:`algorithms.aggregation.order_kernels` (one read of the rows), elsewhere torch's sort; both
paths give the same bits (the definitions are in that module's docstring)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from algorithms.aggregation import order_kernels
from algorithms.aggregation.base import LinearRule, Rule, coefficient_mass, ordered_mean


class Mean(LinearRule):
    name = "mean"

    def plan(self, stats: Tensor | None, n: int) -> Tensor:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)


class Median(Rule):
    """Coordinate-wise median (the mean of the two middle values when n is even, as numpy's)."""

    name = "median"

    def check(self, n: int) -> None:
        super().check(n)
        if 2 * self.f >= n:
            raise ValueError(f"median tolerates f < n/2 (got f={self.f}, n={n})")

    def applies_whole(self, grads: Tensor) -> bool:
        return order_kernels.available(grads)  # the kernel writes the median only: no blocks, no copies

    def apply(self, plan: Any, block: Tensor, with_mass: bool = False) -> tuple[Tensor, Tensor | None]:
        if not with_mass and order_kernels.available(block):  # the mass needs the sort's indices
            return order_kernels.median_triton(block), None
        n = block.shape[0]
        vals, idx = torch.sort(block, dim=0)
        lo, hi = (n - 1) // 2, n // 2
        value = vals[lo] if lo == hi else 0.5 * (vals[lo] + vals[hi])
        mass = None
        if with_mass:
            weight = 1.0 if lo == hi else 0.5
            mass = coefficient_mass(block, idx[lo:hi + 1], weight, n)
        return value, mass


class TrimmedMean(Rule):
    """Coordinate-wise: drop the f smallest and the f largest values, average the n - 2f others (added
    in ascending order, then divided: :func:`~algorithms.aggregation.base.ordered_mean`). With f = 0,
    the plain mean (torch's own reduction: no sort, already one pass over the rows)."""

    name = "trimmed_mean"

    def check(self, n: int) -> None:
        super().check(n)
        if 2 * self.f >= n:
            raise ValueError(f"trimmed_mean needs n > 2f (got f={self.f}, n={n})")

    def applies_whole(self, grads: Tensor) -> bool:
        return order_kernels.available(grads)  # the kernel (or with f = 0 torch's mean): no copies

    def apply(self, plan: Any, block: Tensor, with_mass: bool = False) -> tuple[Tensor, Tensor | None]:
        n = block.shape[0]
        if self.f == 0:
            value = block.mean(dim=0)
            mass = block.abs().sum(dim=1, dtype=torch.float64) / n if with_mass else None
            return value, mass
        if not with_mass and order_kernels.available(block):
            return order_kernels.trimmed_mean_triton(block, self.f), None
        vals, idx = torch.sort(block, dim=0)
        kept = slice(self.f, n - self.f)
        value = ordered_mean(vals[kept])
        mass = coefficient_mass(block, idx[kept], 1.0 / (n - 2 * self.f), n) if with_mass else None
        return value, mass
