"""The (B, W, lambda)-bursty straggler model of Krishnan, Ebrahimi and Khisti (ICLR 2023).

A straggler pattern (one set of straggling workers per round) conforms when, in every window of
``W`` consecutive rounds, (i) at most ``lambda`` distinct workers straggle and (ii) the
straggling rounds of each worker lie inside ``B`` consecutive rounds (a burst of length at
most ``B``; rounds inside the burst may be clean). Equivalently: two straggling rounds of one
worker are either less than ``B`` or at least ``W`` rounds apart. Windows that start before
round 0 are truncated.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def conforms(pattern: Sequence[frozenset[int] | set[int]], burst: int, window: int, lam: int) -> bool:
    """Does the whole ``pattern`` conform to the (B=burst, W=window, lambda=lam) model?"""
    return all(
        window_ok(pattern[: r + 1], burst, window, lam) for r in range(len(pattern))
    )


def window_ok(pattern: Sequence[frozenset[int] | set[int]], burst: int, window: int, lam: int) -> bool:
    """Check only the window that ends at the last round of ``pattern`` (incremental check)."""
    if not pattern:
        return True
    r = len(pattern) - 1
    lo = max(0, r - window + 1)
    seen: dict[int, int] = {}  # worker -> first straggling round in the window
    for t in range(lo, r + 1):
        for w in pattern[t]:
            first = seen.setdefault(w, t)
            if t - first >= burst:
                return False
    return len(seen) <= lam


def bursty_pattern(
    n_workers: int,
    rounds: int,
    burst: int,
    window: int,
    lam: int,
    p_start: float = 0.3,
    p_continue: float = 0.8,
    seed: int = 0,
) -> list[frozenset[int]]:
    """A random pattern that conforms to the model: each clean worker starts straggling with
    probability ``p_start``, a straggling one keeps going with ``p_continue``; a choice that
    would leave the model is dropped. Seeded, so benchmarks and tests can replay it."""
    rng = random.Random(seed)
    pattern: list[frozenset[int]] = []
    for _ in range(rounds):
        current: set[int] = set()
        prev = pattern[-1] if pattern else frozenset()
        order = list(range(n_workers))
        rng.shuffle(order)
        for w in order:
            p = p_continue if w in prev else p_start
            if rng.random() < p and window_ok([*pattern, frozenset(current | {w})], burst, window, lam):
                current.add(w)
        pattern.append(frozenset(current))
    return pattern
