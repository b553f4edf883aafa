"""Least-squares decoding shared by every code.

Decoding solves ``M^T a = 1`` where the rows of ``M`` are the coefficient vectors (over the
data parts) of the results that arrived. Tandon et al. (2017, Sec. 3) only need existence of
``a``; we take the minimum-norm least-squares solution (``gelsd``, SVD based, float64), which is
exact when a solution exists, uses all surviving rows when more than ``n - s`` arrive (smaller
weights, hence less amplification of float noise), and lets us *check* decodability by the
residual instead of trusting a combinatorial argument.
"""

from __future__ import annotations

import torch

from algorithms.coding.base import UndecodableError

RESIDUAL_TOL = 1e-8


def solve_decoding(rows: torch.Tensor, tol: float = RESIDUAL_TOL) -> torch.Tensor:
    """Return ``a`` (len = rows.shape[0]) with ``a @ rows == 1``; raise if no such ``a``."""
    m, k = rows.shape
    if m == 0:
        raise UndecodableError("no results arrived")
    mat = rows.to(torch.float64).T  # k x m
    ones = torch.ones(k, 1, dtype=torch.float64)
    sol = torch.linalg.lstsq(mat, ones, driver="gelsd").solution[:, 0]
    residual = float((mat @ sol - ones[:, 0]).abs().max())
    if residual > tol * max(1.0, float(sol.abs().max())):
        raise UndecodableError(f"results do not span the all-ones vector (residual {residual:.2e})")
    return sol


def condition_number(rows: torch.Tensor) -> float:
    """2-norm condition number of ``rows`` restricted to its row space (largest / smallest
    non-zero singular value): what amplifies float noise in :func:`solve_decoding`."""
    sv = torch.linalg.svdvals(rows.to(torch.float64))
    nonzero = sv[sv > sv[0] * 1e-13]
    return float(nonzero[0] / nonzero[-1])
