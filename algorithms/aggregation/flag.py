"""Flag Aggregator (Almasi et al., "Flag Aggregator: Scalable Distributed Training under Failures
and Augmented Losses using Convex Optimization", ICLR 2024).

The rule, as the authors' reference implementation computes it:

1. normalise every gradient, ``x_i <- x_i / |x_i|``;
2. find the flag median ``Y`` (``d x r``, orthonormal) of the lines ``[x_i]`` by IRLS: each
   iteration takes the top ``r`` left singular vectors of ``[w_1 x_1, ..., w_n x_n]`` with
   ``w_i = (sin^2(x_i, Y) + eps)^(-1/4)``, ``sin^2(x_i, Y) = |1 - |Y^T x_i|^2|``; with ``lam > 0``
   the pairwise differences ``x_i - x_j`` enter too, weighted
   ``(|1 - |Y^T (x_i - x_j)|^2| + eps)^(-1/4) lam / (n (n - 1))``;
3. return ``(1/r) sum_i Y Y^T x_i``.

Here all of it runs in worker space. The normalised rows span at most ``n`` dimensions;
with the Gram matrix ``G = X X^T`` of the raw rows, ``Gh = D^-1 G D^-1`` (``D`` the norms) is the
Gram of the normalised ones, ``Gh = V S^2 V^T``, and ``Z = S V^T`` holds the coordinates of every
normalised row in the orthonormal basis ``U = Xh V S^-1`` of their span. Every IRLS step is then
an eigendecomposition of the ``k x k`` matrix ``Z M Z^T`` (``M`` the weights), ``Y = U E``, and the
aggregate is ``X c`` with ``c = D^-1 V S^-1 E E^T Z 1 / r``: one Gram matrix and one
matrix-vector product over ``d``, against an SVD of the ``d x n`` matrix per iteration.

Where this differs from the reference code (see NOTES.md): the reference starts IRLS from a
random ``Y`` in ``R^d`` (drawn on the CPU, ``d x r`` numbers), which is orthogonal to every gradient
up to ``O(r/d)``, so its first weights are all ``(1 + eps)^(-1/4)``; we start from those weights
exactly. It hard-codes one IRLS iteration; ``max_iter`` is the budget here, and, as in the
reference, the iteration stops when the objective ``sum_i sin(x_i, Y)`` stops decreasing, keeping
the last subspace that decreased it.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.linalg import lapack
from torch import Tensor

from algorithms.aggregation.base import LinearRule

_RANK_TOL = 1e-9  # eigenvalues of the normalised Gram below this (relative) are numerical noise
# Flag's Gram is of the raw rows (no centred copy of a block), so its blocks can be large: on one H200,
# n = 16, 64M-coordinate blocks took 3.4 / 8.9 ms at d = 25M / 100M against 4.0 / 11.0 ms with the
# default 4M (`bench/gpu_aggregation.py --profile flag`, 2026-11-26, before the Triton kernels).
FLAG_CHUNK = 1 << 26


def _weight_matrix(w2: np.ndarray, pair: np.ndarray | None) -> np.ndarray:
    """``M`` with ``X M X^T = sum_i w_i^2 x_i x_i^T + sum_{i != j} p_ij (x_i - x_j)(x_i - x_j)^T``."""
    m = np.diag(w2)
    if pair is not None:
        m = m + 2.0 * (np.diag(pair.sum(axis=1)) - pair)
    return m


def _pair_weights(p: np.ndarray, eps: float, lam: float) -> np.ndarray:
    """Squared pairwise IRLS weights from the projections ``p = E^T Z`` (``r x n``)."""
    n = p.shape[1]
    diff = p[:, :, None] - p[:, None, :]
    sinsq = np.abs(1.0 - (diff * diff).sum(axis=0))
    pair = (sinsq + eps) ** -0.5 * (lam / (n * (n - 1))) ** 2
    np.fill_diagonal(pair, 0.0)
    return pair


def _eigh(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of a small symmetric matrix, from its lower triangle:
    LAPACK's ``dsyevd`` called directly (numpy's ``eigh`` is the same routine behind more checks, and
    this runs up to ``max_iter + 1`` times between Flag's two passes over the gradients)."""
    w, v, info = lapack.dsyevd(a, lower=1)
    if info != 0:
        return np.linalg.eigh(a)  # type: ignore[return-value]
    return w, v


def flag_coefficients(g: Tensor, r: int, max_iter: int, eps: float, lam: float = 0.0) -> Tensor:
    """From the raw Gram matrix ``g`` (``n x n``): ``c`` such that the Flag aggregate is ``sum_i c_i x_i``.

    In float64 numpy on the CPU: ``n x n`` numbers, where torch's per-operator cost on tiny tensors
    would dominate (this sits between the Gram pass and the aggregate pass on the GPU).
    """
    gm = g.detach().to("cpu", torch.float64).numpy()
    n = gm.shape[0]
    norms = np.sqrt(np.clip(np.diagonal(gm), 0.0, None))
    inv = 1.0 / np.maximum(norms, 1e-12)  # as F.normalize: zero rows stay zero
    gh = gm * inv[:, None] * inv[None, :]
    gh = 0.5 * (gh + gh.T)
    evals, evecs = _eigh(gh)
    top = float(evals.max()) if n else 0.0
    keep = evals > _RANK_TOL * top if top > 0 else np.zeros(n, dtype=bool)
    if not bool(keep.any()):
        return torch.zeros(n, dtype=torch.float64)  # every gradient is zero
    sig = np.sqrt(evals[keep])
    v = evecs[:, keep]
    z = sig[:, None] * v.T  # k x n
    k = z.shape[0]
    r_eff = min(r, k)

    w2 = np.full(n, (1.0 + eps) ** -0.5)
    pair = None
    if lam > 0 and n > 1:
        pair = np.full((n, n), (1.0 + eps) ** -0.5 * (lam / (n * (n - 1))) ** 2)
        np.fill_diagonal(pair, 0.0)
    best: np.ndarray | None = None
    prev = float(n)  # the objective at the reference's random start: every sine is ~1
    for _ in range(max_iter):
        a = (z * w2) @ z.T if pair is None else z @ _weight_matrix(w2, pair) @ z.T
        e = _eigh(a)[1][:, k - r_eff:]  # symmetric by construction; one triangle is read
        p = e.T @ z
        sinsq = 1.0 - (p * p).sum(axis=0)
        objective = float(np.sqrt(np.clip(sinsq, 0.0, None)).sum())
        if best is not None and prev - objective <= 1e-10:
            break
        best, prev = e, objective
        if objective <= 1e-10:
            break
        w2 = (np.abs(sinsq) + eps) ** -0.5
        if pair is not None:
            pair = _pair_weights(p, eps, lam)
    assert best is not None
    coef_hat = v @ ((best @ (best.T @ z.sum(axis=1))) / sig) / r
    return torch.from_numpy(coef_hat * inv)


class Flag(LinearRule):
    name = "flag"
    gram_kind = "raw"

    def __init__(self, f: int = 0, r: int | None = None, max_iter: int = 5, eps: float = 1e-7,
                 lam: float = 0.0, chunk: int = FLAG_CHUNK) -> None:
        super().__init__(f, chunk)
        self.r, self.max_iter, self.eps, self.lam = r, max_iter, eps, lam

    def check(self, n: int) -> None:
        super().check(n)
        if 2 * self.f >= n:
            raise ValueError(f"flag tolerates f < n/2 (got f={self.f}, n={n})")
        if self.r is not None and self.r > n:
            raise ValueError(f"flag r={self.r} exceeds n={n}")

    def columns(self, n: int) -> int:
        """``r``; by default ``ceil(n / 2)``, the authors' runs (``r_col`` 8 of 15 workers, 4 of 7)."""
        return self.r if self.r is not None else (n + 1) // 2

    def plan(self, stats: Tensor | None, n: int) -> Tensor:
        assert stats is not None
        return flag_coefficients(stats, self.columns(n), self.max_iter, self.eps, self.lam)
