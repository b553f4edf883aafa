"""Geometric median by smoothed Weiszfeld iterations (Weiszfeld 1937; smoothing as in Pillutla et
al.'s RFA): ``z <- sum_i w_i x_i / sum_i w_i`` with ``w_i = 1 / max(eps, |z - x_i|)``.

Every iterate is an affine combination ``z = sum_i b_i x_i`` (``sum b = 1``), so its distances to
the rows follow from the centred Gram matrix ``C``:
``|x_i - z|^2 = C_ii - 2 (C b)_i + b^T C b``. The iterations run in worker space; the ``d``
coordinates are touched once for ``C`` and once for the final combination.
"""

from __future__ import annotations

import torch
from torch import Tensor

from algorithms.aggregation.base import DEFAULT_CHUNK, LinearRule


def weiszfeld_coefficients(c: Tensor, max_iter: int, eps: float, tol: float) -> Tensor:
    """Coefficients ``b`` (summing to 1) of the smoothed geometric median, from the centred Gram."""
    n = c.shape[0]
    b = torch.full((n,), 1.0 / n, dtype=torch.float64)
    diag = torch.diagonal(c)
    prev = float("inf")
    for _ in range(max_iter):
        cb = c @ b
        dist = (diag - 2.0 * cb + b @ cb).clamp_min(0.0).sqrt()
        objective = float(dist.sum())
        if prev - objective <= tol * max(objective, 1e-300):
            break
        prev = objective
        w = 1.0 / dist.clamp_min(eps)
        b = w / w.sum()
    return b


class GeometricMedian(LinearRule):
    name = "geometric_median"
    gram_kind = "centered"

    def __init__(self, f: int = 0, max_iter: int = 100, eps: float = 1e-8, tol: float = 1e-6,
                 chunk: int = DEFAULT_CHUNK) -> None:
        super().__init__(f, chunk)
        self.max_iter, self.eps, self.tol = max_iter, eps, tol

    def check(self, n: int) -> None:
        super().check(n)
        if 2 * self.f >= n:
            raise ValueError(f"geometric_median tolerates f < n/2 (got f={self.f}, n={n})")

    def plan(self, stats: Tensor | None, n: int) -> Tensor:
        assert stats is not None
        return weiszfeld_coefficients(stats.cpu(), self.max_iter, self.eps, self.tol)
