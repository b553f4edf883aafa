"""Tandon et al., "Gradient Coding: Avoiding Stragglers in Distributed Learning" (ICML 2017).

* :class:`FractionalRepetition` -- Sec. 4.1 (Algorithm 1): ``n/(s+1)`` groups of ``s+1``
  workers; every worker of group ``g`` sends the plain sum of the ``s+1`` parts of block ``g``.
  Decoding picks one survivor per group (weights 0/1): perfectly conditioned.
* :class:`CyclicRepetition` -- Sec. 4.2: worker ``i`` holds parts ``i, i+1, ..., i+s (mod n)``
  (``s + 1`` parts, the optimal load ``(s+1)/n``) and any ``n - s`` rows of ``B`` span the
  all-ones vector. Tandon's Algorithm 2 fills the support from a random ``H``; we use a
  deterministic real construction on the ``n``-th roots of unity instead (see
  :func:`_cyclic_matrix`), because it exists for every ``n > s`` and is far better conditioned:
  searching for bad survivor sets (exhaustively at ``n = 14, 16``, hill climbing at ``n = 24..40``)
  found worst condition numbers of 3e3 vs 3e7 (Gaussian ``H``) at ``n = 16, s = 8`` and 2e9 vs
  8e9 at ``n = 40, s = 20``. The real cyclic MDS codes of Raviv et al. ("Gradient coding from
  cyclic MDS codes and expander graphs", 2018) are the special case ``n - s`` odd.

Every real code of this kind gets ill-conditioned as ``min(s, n - s)`` grows (the survivors of a
burst of stragglers are nodes on an arc of the circle: a Vandermonde system); decoding is in
float64 (see :func:`algorithms.coding.decode.unit_weights`), which keeps it exact to about
1e-7 relative up to ``n = 40`` (worst burst: condition 2.8e9 at ``n = 40, s = 20``). Float64
runs out beyond that: 6e-6 relative error at ``n = 48, s = 24``, 16% at ``n = 64, s = 32``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import torch

from algorithms.coding.base import UndecodableError
from algorithms.coding.linalg import condition_number, solve_decoding


def _check_alive(alive: Sequence[int], n: int) -> list[int]:
    out = sorted(set(int(w) for w in alive))
    if any(w < 0 or w >= n for w in out):
        raise ValueError(f"worker ids must be in [0, {n}), got {list(alive)}")
    return out


class LinearGradientCode:
    """A code given by its encoding matrix; decoding is least squares on the surviving rows."""

    def __init__(self, B: torch.Tensor, n_stragglers: int) -> None:
        self._B = B.to(torch.float64)
        self.n_workers = int(B.shape[0])
        self.n_stragglers = n_stragglers

    @property
    def B(self) -> torch.Tensor:
        return self._B

    @property
    def n_parts(self) -> int:
        return int(self._B.shape[1])

    def parts(self, worker: int) -> list[int]:
        return [int(j) for j in torch.nonzero(self._B[worker]).flatten()]

    @property
    def load(self) -> float:
        """Measured from the assignment: the most parts a worker computes (the support of its
        row of ``B``) over the number of equal parts."""
        return max(len(self.parts(i)) for i in range(self.n_workers)) / self.n_parts

    def decode(self, alive: Sequence[int]) -> torch.Tensor:
        idx = _check_alive(alive, self.n_workers)
        if not idx:
            raise UndecodableError("no worker alive")
        weights = solve_decoding(self._B[idx])
        a = torch.zeros(self.n_workers, dtype=torch.float64)
        a[idx] = weights
        return a

    def worst_condition(self, max_sets: int = 200, seed: int = 0) -> float:
        """Worst condition number of ``B[alive]`` over survivor sets of size ``n - s`` (all of
        them when there are at most ``max_sets``, else a seeded sample plus the contiguous ones)."""
        return max(condition_number(self._B[a]) for a in survivor_sets(self.n_workers,
                                                                       self.n_stragglers,
                                                                       max_sets, seed))


def survivor_sets(n: int, s: int, max_sets: int, seed: int) -> list[list[int]]:
    """All ``n - s`` subsets of ``range(n)`` if few, else contiguous misses plus a sample."""
    if math.comb(n, s) <= max_sets:
        return [[w for w in range(n) if w not in set(c)] for c in itertools.combinations(range(n), s)]
    gen = torch.Generator().manual_seed(seed)
    missing = [set((start + j) % n for j in range(s)) for start in range(n)]  # bursts
    missing += [set(torch.randperm(n, generator=gen)[:s].tolist()) for _ in range(max_sets)]
    return [[w for w in range(n) if w not in m] for m in missing]


class FractionalRepetition(LinearGradientCode):
    """Tandon et al. 2017, Algorithm 1: ``n`` divisible by ``s + 1``."""

    def __init__(self, n_workers: int, n_stragglers: int) -> None:
        if not 0 <= n_stragglers < n_workers:
            raise ValueError(f"need 0 <= stragglers < workers, got s={n_stragglers}, n={n_workers}")
        if n_workers % (n_stragglers + 1):
            raise ValueError(
                f"fractional_repetition needs n_workers ({n_workers}) divisible by stragglers + 1 "
                f"({n_stragglers + 1}); use cyclic_repetition for any n"
            )
        size = n_stragglers + 1
        B = torch.zeros(n_workers, n_workers, dtype=torch.float64)
        for i in range(n_workers):
            g = i // size
            B[i, g * size : (g + 1) * size] = 1.0
        super().__init__(B, n_stragglers)


def _band_weights(n: int, s: int) -> torch.Tensor:
    """Real ``r`` (length ``n``, no zero entry) with ``sum_j r_j exp(i mu theta_j) = 0`` for the
    ``s`` offsets ``mu = -(s-1)/2, ..., (s-1)/2`` (``theta_j = 2 pi j / n``): what puts the
    all-ones vector in the code (see :func:`_cyclic_matrix`). The functions ``exp(i mu theta_j)``
    for ``n`` consecutive ``mu`` of that half-integer or integer grid are orthogonal, so ``r`` is
    any combination of the other ``n - s`` of them; we take the one closest to ``(-1)^j`` (which
    it equals when ``n - s`` is odd): ``|r_j|`` as even as possible, because ``1 / r_j`` scales
    column ``j`` of ``B`` and uneven scales would worsen the conditioning."""
    j = torch.arange(n, dtype=torch.float64)
    mu = torch.arange(n - s, dtype=torch.float64) + (s + 1) / 2  # (s+1)/2 .. n - (s+1)/2
    basis = torch.exp(2j * math.pi * torch.outer(j, mu) / n)  # orthogonal columns, norm^2 = n
    target = torch.cos(math.pi * j).to(torch.complex128)  # (-1)^j
    r = (basis @ (basis.conj().T @ target) / n).real
    if float(r.abs().min()) < 1e-9 * float(r.abs().max()):
        raise ValueError(f"no usable weights for n={n}, s={s}")  # a guard: not seen for n <= 128
    return r


@functools.lru_cache(maxsize=1024)
def _cyclic_matrix(n: int, s: int) -> torch.Tensor:
    """``B`` with row ``i`` supported on the window ``S_i = {i, ..., i+s} (mod n)``.

    Nodes ``x_j = exp(i theta_j)``, ``theta_j = 2 pi j / n``. On a window ``S`` of ``s + 1``
    nodes the divided difference ``d_j = 1 / prod_{l in S, l != j} (x_j - x_l)`` annihilates
    every polynomial of degree ``< s``; row ``i`` is ``d / w`` on ``S_i`` with weights
    ``w_j = r_j exp(-i (s-1) theta_j / 2)``, so every row lies in
    ``V = {b : sum_j b_j w_j x_j^k = 0, k < s}`` (dimension ``n - s``). Writing
    ``x_j - x_l = 2i exp(i (theta_j + theta_l)/2) sin((theta_j - theta_l)/2)`` shows that
    ``d_j / w_j`` is a common complex factor times the real ``1 / (r_j prod sin(...))``, which
    is what we store (rows scaled so that their largest entry is 1). The all-ones vector is in ``V`` because of
    the choice of ``r`` (:func:`_band_weights`). Any ``n - s`` rows are independent, hence span
    ``V``: ``w * row_i`` is, up to a factor, the GRS-dual codeword of the polynomial
    ``prod_{l not in S_i} (x - x_l)``, and for distinct shifts ``i`` these polynomials have
    coefficient vectors ``c_k omega^{i (n-s-1-k)}`` (``c_k != 0``: Gaussian binomials at a
    primitive root), a scaled Vandermonde matrix. ``r`` only rescales columns, so this holds
    for either parity of ``n - s``; the tests check it on every survivor set for small ``n``.
    """
    if not 0 <= s < n:
        raise ValueError(f"need 0 <= stragglers < workers, got s={s}, n={n}")
    theta = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
    r = _band_weights(n, s)
    B = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        window = torch.tensor([(i + k) % n for k in range(s + 1)])
        half = (theta[window][:, None] - theta[window][None, :]) / 2
        sines = torch.sin(half) + torch.eye(s + 1, dtype=torch.float64)  # 1 on the diagonal
        row = 1.0 / (r[window] * sines.prod(dim=1))
        B[i, window] = row / row[row.abs().argmax()]  # largest entry +1 (s = 0: the identity)
    return B


class CyclicRepetition(LinearGradientCode):
    """Cyclic repetition (Tandon et al. 2017, Sec. 4.2) for any ``n > s``: exactly ``s + 1``
    parts per worker, deterministic (:func:`_cyclic_matrix`)."""

    def __init__(self, n_workers: int, n_stragglers: int) -> None:
        n, s = n_workers, n_stragglers
        if not 0 <= s < n:
            raise ValueError(f"need 0 <= stragglers < workers, got s={s}, n={n}")
        super().__init__(_cyclic_matrix(n, s).clone(), s)
