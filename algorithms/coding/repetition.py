"""Tandon et al., "Gradient Coding: Avoiding Stragglers in Distributed Learning" (ICML 2017).

* :class:`FractionalRepetition` -- Sec. 4.1 (Algorithm 1): ``n/(s+1)`` groups of ``s+1``
  workers; every worker of group ``g`` sends the plain sum of the ``s+1`` parts of block ``g``.
  Decoding picks one survivor per group (weights 0/1): perfectly conditioned.
* :class:`CyclicRepetition` -- Sec. 4.2 (Algorithm 2): worker ``i`` holds parts
  ``i, i+1, ..., i+s (mod n)``. Algorithm 2 picks ``H`` (``s x n``) with ``H 1 = 0`` and makes
  every row of ``B`` (support fixed as above, ``B[i, i] = 1``) lie in ``null(H)``; any ``n - s``
  rows then span ``null(H)``, which contains the all-ones vector.

Why the choice of ``H`` matters: with a Gaussian ``H`` (the paper's suggestion) the decoding
systems of some survivor sets are badly conditioned (we saw worst condition numbers of 1e5-1e8
for ``n = 32..64``), which would wipe out a float32 gradient. We therefore build a few
candidates -- the "polynomial" choice whose null space is spanned by low DFT frequencies
(``B`` circulant, the taps are the coefficients of ``prod (z - w^k)`` over ``s`` consecutive
roots of unity around ``-1``, real when ``n - s`` is odd; cf. Raviv et al., "Gradient coding
from cyclic MDS codes and expander graphs", 2018) and several seeded Gaussian ``H`` -- and keep
the one whose worst condition number over (all, or a sample of) survivor sets is smallest. The
result is deterministic for a given ``seed``. Figures are in ``bench/RESULTS.md``.
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


def _cyclic_from_h(H: torch.Tensor, s: int) -> torch.Tensor | None:
    """Algorithm 2 of Tandon et al.: row ``i`` in ``null(H)``, support ``i..i+s``, ``B[i,i]=1``."""
    n = H.shape[1]
    B = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        rest = [(i + j) % n for j in range(1, s + 1)]
        sub = H[:, rest]
        if float(torch.linalg.svdvals(sub)[-1]) < 1e-10:
            return None
        B[i, i] = 1.0
        B[i, rest] = torch.linalg.solve(sub, -H[:, i])
    return B


def _polynomial_taps(n: int, s: int) -> torch.Tensor | None:
    """Real taps of ``prod_k (z - w^k)`` over ``s`` consecutive ``k`` centred on ``n/2``."""
    if (n - s) % 2 == 0:
        return None
    ks = torch.arange(s, dtype=torch.float64) + (n - s + 1) // 2
    roots = torch.polar(torch.ones(s, dtype=torch.float64), 2 * math.pi * ks / n)
    coeffs = torch.ones(1, dtype=torch.complex128)
    for r in roots:  # multiply by (z - r); coeffs[j] is the coefficient of z^j
        coeffs = torch.cat([-r * coeffs, torch.zeros(1, dtype=torch.complex128)]) + torch.cat(
            [torch.zeros(1, dtype=torch.complex128), coeffs]
        )
    taps = coeffs.real / coeffs.real[0]
    return taps


class CyclicRepetition(LinearGradientCode):
    """Tandon et al. 2017, Algorithm 2 (any ``n > s``), with a conditioning-aware choice of ``H``."""

    def __init__(
        self,
        n_workers: int,
        n_stragglers: int,
        seed: int = 0,
        candidates: int = 6,
        max_condition: float = 1e4,
    ) -> None:
        n, s = n_workers, n_stragglers
        if not 0 <= s < n:
            raise ValueError(f"need 0 <= stragglers < workers, got s={s}, n={n}")
        super().__init__(_cyclic_matrix(n, s, seed, candidates, max_condition).clone(), s)


@functools.lru_cache(maxsize=256)
def _cyclic_matrix(n: int, s: int, seed: int, candidates: int, max_condition: float) -> torch.Tensor:
    """Pick the best-conditioned candidate (cached: the search costs tens of SVDs)."""
    if s == 0:
        return torch.eye(n, dtype=torch.float64)
    if not 0 <= s < n:
        raise ValueError(f"need 0 <= stragglers < workers, got s={s}, n={n}")
    options: list[torch.Tensor] = []
    taps = _polynomial_taps(n, s)
    if taps is not None:
        circ = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for j in range(s + 1):
                circ[i, (i + j) % n] = taps[j]
        options.append(circ)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(candidates):
        H = torch.randn(s, n, generator=gen, dtype=torch.float64)
        H = H - H.mean(dim=1, keepdim=True)  # H @ 1 = 0
        B = _cyclic_from_h(H, s)
        if B is not None:
            options.append(B)
    sets = survivor_sets(n, s, 60, seed)
    best, best_cond = options[0], math.inf
    for B in options:
        worst = max(condition_number(B[a]) for a in sets)
        if worst < best_cond:
            best, best_cond = B, worst
    # Real cyclic codes from consecutive roots exist only for n - s odd. When n - s is even
    # and no candidate is well conditioned, the polynomial code for s + 1 stragglers (one
    # more part per worker) also tolerates s and is usually far better conditioned.
    wider = _polynomial_taps(n, s + 1) if s + 1 < n else None
    if best_cond > max_condition and wider is not None:
        circ = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for j in range(s + 2):
                circ[i, (i + j) % n] = wider[j]
        if max(condition_number(circ[a]) for a in sets) < best_cond:
            best = circ
    return best
