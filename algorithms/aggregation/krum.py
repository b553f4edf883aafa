"""Distance-based selection: Krum, Multi-Krum (Blanchard et al. 2017) and Bulyan (El Mhamdi et al.
2018). The pairwise distances come from the centred Gram matrix, so the selection is made in
worker space (``n x n``) and only the final combination touches the ``d`` coordinates.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from algorithms.aggregation.base import (
    DEFAULT_CHUNK,
    LinearRule,
    Rule,
    coefficient_mass,
    distances_from_gram,
)


def krum_scores(d2: Tensor, f: int, active: Tensor | None = None) -> Tensor:
    """Krum score of every active row: the sum of its squared distances to its ``m - f - 2``
    closest other active rows (``m`` active rows; at least one neighbour). Inactive rows: +inf."""
    n = d2.shape[0]
    if active is None:
        active = torch.ones(n, dtype=torch.bool)
    m = int(active.sum())
    k = max(m - f - 2, 1)
    dist = d2.clone()
    dist[:, ~active] = float("inf")
    dist.fill_diagonal_(float("inf"))
    nearest = torch.sort(dist, dim=1).values[:, :k]
    scores = nearest.sum(dim=1)
    scores[~active] = float("inf")
    return scores


def argmin_tied(scores: Tensor, rtol: float = 1e-6) -> int:
    """The first index whose score is within ``rtol`` of the minimum: exact ties are common (the two
    rows of a mutual-nearest pair have the same score when one neighbour counts), and the Gram
    matrix's rounding must not decide them."""
    low = float(scores.min())
    return int(torch.nonzero(scores <= low + rtol * abs(low))[0])


def _check_krum(name: str, f: int, n: int) -> None:
    if n < 2 * f + 3:
        raise ValueError(f"{name} needs n >= 2f + 3 (got f={f}, n={n})")


class Krum(LinearRule):
    """The row with the smallest Krum score (sum of squared distances to its n - f - 2 nearest)."""

    name = "krum"
    gram_kind = "centered"

    def check(self, n: int) -> None:
        super().check(n)
        _check_krum(self.name, self.f, n)

    def plan(self, stats: Tensor | None, n: int) -> Tensor:
        assert stats is not None
        scores = krum_scores(distances_from_gram(stats.cpu()), self.f)
        coef = torch.zeros(n, dtype=torch.float64)
        coef[argmin_tied(scores)] = 1.0
        return coef

    def apply(self, plan: Any, block: Tensor, with_mass: bool = False) -> tuple[Tensor, Tensor | None]:
        chosen = int(torch.argmax(plan))
        value = block[chosen].clone()
        mass = None
        if with_mass:
            mass = torch.zeros(block.shape[0], dtype=torch.float64, device=block.device)
            mass[chosen] = block[chosen].abs().sum(dtype=torch.float64)
        return value, mass


class MultiKrum(LinearRule):
    """The mean of the ``m`` rows with the smallest Krum scores (default ``m = n - f``)."""

    name = "multi_krum"
    gram_kind = "centered"

    def __init__(self, f: int = 0, m: int | None = None, chunk: int = DEFAULT_CHUNK) -> None:
        super().__init__(f, chunk)
        self.m = m

    def check(self, n: int) -> None:
        super().check(n)
        _check_krum(self.name, self.f, n)
        if self.m is not None and not 1 <= self.m <= n:
            raise ValueError(f"multi_krum m={self.m} must be in [1, n={n}]")

    def plan(self, stats: Tensor | None, n: int) -> Tensor:
        assert stats is not None
        m = self.m if self.m is not None else n - self.f
        scores = krum_scores(distances_from_gram(stats.cpu()), self.f)
        picked = torch.argsort(scores, stable=True)[:m]
        coef = torch.zeros(n, dtype=torch.float64)
        coef[picked] = 1.0 / m
        return coef


def bulyan_selection(d2: Tensor, f: int) -> Tensor:
    """Bulyan's first phase: Krum applied recursively, ``n - 2f`` times, each time on the rows not
    yet selected (a loop over selections on an ``n x n`` matrix, not over coordinates)."""
    n = d2.shape[0]
    active = torch.ones(n, dtype=torch.bool)
    picked = []
    for _ in range(n - 2 * f):
        best = argmin_tied(krum_scores(d2, f, active))
        picked.append(best)
        active[best] = False
    return torch.tensor(picked, dtype=torch.long)


class Bulyan(Rule):
    """Bulyan over Krum: select theta = n - 2f rows by recursive Krum, then per coordinate average
    the beta = theta - 2f selected values closest to their coordinate-wise median."""

    name = "bulyan"
    gram_kind = "centered"

    def check(self, n: int) -> None:
        super().check(n)
        if n < 4 * self.f + 3:
            raise ValueError(f"bulyan needs n >= 4f + 3 (got f={self.f}, n={n})")

    def plan(self, stats: Tensor | None, n: int) -> Tensor:
        assert stats is not None
        return bulyan_selection(distances_from_gram(stats.cpu()), self.f)

    def apply(self, plan: Any, block: Tensor, with_mass: bool = False) -> tuple[Tensor, Tensor | None]:
        n = block.shape[0]
        sel_ids = plan.to(block.device)
        sel = block.index_select(0, sel_ids)
        theta = sel.shape[0]
        beta = theta - 2 * self.f
        srt = torch.sort(sel, dim=0).values
        lo, hi = (theta - 1) // 2, theta // 2
        med = srt[lo] if lo == hi else 0.5 * (srt[lo] + srt[hi])
        closest = torch.topk((sel - med).abs(), beta, dim=0, largest=False, sorted=False).indices
        value = sel.gather(0, closest).mean(dim=0)
        mass = None
        if with_mass:
            rows = sel_ids[closest]
            mass = coefficient_mass(block, rows, 1.0 / beta, n)
        return value, mass
