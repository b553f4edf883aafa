"""Distance-based selection: Krum, Multi-Krum (Blanchard et al. 2017) and Bulyan (El Mhamdi et al.
2018). The pairwise distances come from the centred Gram matrix, so the selection is made in
worker space (``n x n``) and only the final combination touches the ``d`` coordinates.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from algorithms.aggregation import order_kernels
from algorithms.aggregation.base import (
    DEFAULT_CHUNK,
    LinearRule,
    Rule,
    coefficient_mass,
    distances_from_gram,
    ordered_mean,
)


def krum_scores(d2: np.ndarray, f: int, active: np.ndarray | None = None) -> np.ndarray:
    """Krum score of every active row: the sum of its squared distances to its ``m - f - 2``
    closest other active rows (``m`` active rows; at least one neighbour). Inactive rows: +inf.

    In numpy: the decisions are made on ``n x n`` numbers, where a numpy call costs about a
    microsecond and a torch call several; Bulyan's recursive selection makes about a hundred of them
    while the GPU waits for its plan."""
    n = d2.shape[0]
    if active is None:
        active = np.ones(n, dtype=bool)
    m = int(active.sum())
    k = max(m - f - 2, 1)
    dist = d2.copy()
    dist[:, ~active] = np.inf
    np.fill_diagonal(dist, np.inf)
    scores = np.sort(dist, axis=1)[:, :k].sum(axis=1)
    scores[~active] = np.inf
    return scores


def argmin_tied(scores: np.ndarray, rtol: float = 1e-6) -> int:
    """The first index whose score is within ``rtol`` of the minimum: exact ties are common (the two
    rows of a mutual-nearest pair have the same score when one neighbour counts), and the Gram
    matrix's rounding must not decide them."""
    low = float(scores.min())
    return int(np.flatnonzero(scores <= low + rtol * abs(low))[0])


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
        scores = krum_scores(distances_from_gram(stats.cpu()).numpy(), self.f)
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
        scores = krum_scores(distances_from_gram(stats.cpu()).numpy(), self.f)
        picked = torch.from_numpy(np.argsort(scores, kind="stable")[:m])
        coef = torch.zeros(n, dtype=torch.float64)
        coef[picked] = 1.0 / m
        return coef


def bulyan_selection(d2: np.ndarray, f: int) -> Tensor:
    """Bulyan's first phase: Krum applied recursively, ``n - 2f`` times, each time on the rows not
    yet selected (a loop over selections on an ``n x n`` matrix, not over coordinates)."""
    n = d2.shape[0]
    active = np.ones(n, dtype=bool)
    picked = []
    for _ in range(n - 2 * f):
        best = argmin_tied(krum_scores(d2, f, active))
        picked.append(best)
        active[best] = False
    return torch.tensor(picked, dtype=torch.long)


class Bulyan(Rule):
    """Bulyan over Krum: select theta = n - 2f rows by recursive Krum, then per coordinate average
    the beta = theta - 2f selected values closest to their coordinate-wise median.

    The beta closest values are a window of the sorted column, found by dropping 2f times the end
    farther from the median, the upper one when both are as far (a NaN distance counts as farther:
    NaNs sort last); the window is added in ascending order (``base.ordered_mean``), and a NaN median
    gives NaN. On a GPU this step is the kernel of :mod:`algorithms.aggregation.order_kernels`, which
    computes the same bits, and so is the centred Gram matrix (``row_kernels``)."""

    name = "bulyan"
    gram_kind = "centered"

    def check(self, n: int) -> None:
        super().check(n)
        if n < 4 * self.f + 3:
            raise ValueError(f"bulyan needs n >= 4f + 3 (got f={self.f}, n={n})")

    def plan(self, stats: Tensor | None, n: int) -> Tensor:
        assert stats is not None
        return bulyan_selection(distances_from_gram(stats.cpu()).numpy(), self.f)

    def applies_whole(self, grads: Tensor) -> bool:
        return order_kernels.available(grads)  # the kernel reads the selected rows once: no copies

    def apply(self, plan: Any, block: Tensor, with_mass: bool = False) -> tuple[Tensor, Tensor | None]:
        if not with_mass and order_kernels.available(block):  # the mass needs the sort's indices
            return order_kernels.bulyan_triton(block, plan, self.f), None
        n = block.shape[0]
        sel_ids = plan.to(block.device)
        srt, order = torch.sort(block.index_select(0, sel_ids), dim=0)
        theta = srt.shape[0]
        beta = theta - 2 * self.f
        lo, hi = (theta - 1) // 2, theta // 2
        med = srt[lo] if lo == hi else 0.5 * (srt[lo] + srt[hi])
        dist = (srt - med).abs()
        start = torch.zeros(1, srt.shape[1], dtype=torch.long, device=srt.device)
        for t in range(2 * self.f):  # the window is [start, start + theta - t)
            start += dist.gather(0, start) > dist.gather(0, start + (theta - 1 - t))  # a tie: the upper end goes
        window = start + torch.arange(beta, device=srt.device)[:, None]
        value = ordered_mean(srt.gather(0, window))
        value = torch.where(torch.isnan(med), med, value)
        mass = None
        if with_mass:
            mass = coefficient_mass(block, sel_ids[order.gather(0, window)], 1.0 / beta, n)
        return value, mass
