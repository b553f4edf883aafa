"""Sequential codes (Krishnan et al., ICLR 2023): deadlines under the (B, W, lambda) model,
failure outside it, computational load versus GC."""

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from algorithms.coding import build
from algorithms.coding.straggler_model import bursty_pattern, conforms

SCHEMES = {
    "sequential_gc": [(1, 2), (1, 3), (2, 3), (2, 5)],  # (B, W) pairs; SR-SGC needs B | W - 1
    "multiplexed_sgc": [(1, 2), (1, 3), (2, 3), (2, 4)],
}


def run(scheme: str, n: int, lam: int, burst: int, window: int, pattern, n_jobs: int):
    code = build(scheme, n, lam, burst=burst, window=window, n_jobs=n_jobs)
    for r in range(n_jobs + code.delay):
        code.assign(r)
        stragglers = pattern[r] if r < len(pattern) else frozenset()
        code.complete(r, [w for w in range(n) if w not in stragglers])
    return code


def assert_on_time(code, n_jobs: int) -> None:
    assert code.overdue() == []
    for j in range(n_jobs):
        assert code.decoded_at[j] <= code.deadline(j)


def test_model_checker_by_hand() -> None:
    f = frozenset
    assert conforms([f({0}), f({0}), f(), f()], burst=2, window=3, lam=1)
    assert not conforms([f({0}), f(), f({0})], burst=2, window=3, lam=1)  # two bursts in W=3
    assert conforms([f({0}), f(), f(), f({0})], burst=1, window=3, lam=1)
    assert not conforms([f({0}), f({1})], burst=1, window=2, lam=1)  # 2 distinct in a window


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n", range(2, 13))
def test_any_lambda_stragglers_in_one_round_decode(scheme: str, n: int) -> None:
    """'Every set of n - s survivors': one round with any <= lambda stragglers, all jobs on time."""
    burst, window = 1, 2
    for lam in range(n):
        sets = list(itertools.combinations(range(n), lam))
        if len(sets) > 20:  # n up to 12: keep the biggest layers to a deterministic sample
            sets = sets[:: math.ceil(len(sets) / 20)]
        for missing in sets:
            pattern = [frozenset(), frozenset(missing), frozenset(), frozenset()]
            assert_on_time(run(scheme, n, lam, burst, window, pattern, n_jobs=3), 3)


def _all_conforming(n: int, rounds: int, burst: int, window: int, lam: int):
    subsets = [frozenset(c) for k in range(lam + 1) for c in itertools.combinations(range(n), k)]
    stack: list[list[frozenset[int]]] = [[]]
    while stack:
        p = stack.pop()
        if len(p) == rounds:
            yield p
            continue
        for s in subsets:
            q = [*p, s]
            if conforms(q, burst, window, lam):
                stack.append(q)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_conforming_pattern_meets_deadlines_exhaustive(scheme: str) -> None:
    n, lam, rounds = 3, 2, 5
    for burst, window in [(1, 2), (2, 3)]:
        if scheme == "sequential_gc" and (window - 1) % burst:
            continue
        count = 0
        for pattern in _all_conforming(n, rounds, burst, window, lam):
            assert_on_time(run(scheme, n, lam, burst, window, pattern, n_jobs=rounds), rounds)
            count += 1
        assert count > 100


@settings(max_examples=25, deadline=None)
@given(n=st.integers(4, 12), lam=st.integers(1, 3), bw=st.integers(0, 3), seed=st.integers(0, 10_000),
       scheme=st.sampled_from(sorted(SCHEMES)))
def test_random_bursty_patterns_meet_deadlines(n: int, lam: int, bw: int, seed: int, scheme: str) -> None:
    burst, window = SCHEMES[scheme][bw]
    pattern = bursty_pattern(n, 30, burst, window, lam, p_start=0.4, p_continue=0.9, seed=seed)
    assert conforms(pattern, burst, window, lam)
    assert_on_time(run(scheme, n, lam, burst, window, pattern, n_jobs=24), 24)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fails_outside_the_model(scheme: str) -> None:
    """Bursts longer than B = 1 (three workers straggle two rounds running): a job misses T."""
    n, lam, burst, window = 6, 2, 1, 3
    bad = [frozenset(), frozenset({0, 1, 2}), frozenset({0, 1, 2})] + [frozenset()] * 5
    assert not conforms(bad, burst, window, lam)
    code = run(scheme, n, lam, burst, window, bad, n_jobs=4)
    assert code.overdue() != []


@pytest.mark.parametrize("n", [8, 12, 16])
@pytest.mark.parametrize(("lam", "burst", "window"), [(1, 1, 2), (2, 1, 3), (2, 2, 3), (3, 2, 5)])
def test_load_below_plain_gc(n: int, lam: int, burst: int, window: int) -> None:
    """Paper's claim: for the same (B, W, lambda) both schemes load each worker less than GC,
    which must tolerate lambda stragglers in every round: (lambda + 1) / n."""
    gc_load = (lam + 1) / n
    for scheme in SCHEMES:
        if scheme == "sequential_gc" and (window - 1) % burst:
            continue
        code = build(scheme, n, lam, burst=burst, window=window)
        steady = code.delay + 1
        for r in range(steady + 1):
            code.assign(r)
            code.complete(r, list(range(n)))
        assert code.round_load(steady) == pytest.approx(code.load)  # measured from the tasks
        assert code.load <= gc_load
        if scheme == "multiplexed_sgc":
            assert code.load < gc_load
            expected = (lam + 1) * (window - 1 + burst) / (n * (burst + (window - 1) * (lam + 1)))
            assert code.load == pytest.approx(expected)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_released_jobs_are_forgotten(scheme: str) -> None:
    """A long run keeps only the jobs still inside their deadline window."""
    n, lam, burst, window = 6, 2, 1, 3
    code = build(scheme, n, lam, burst=burst, window=window)
    pattern = bursty_pattern(n, 60, burst, window, lam, seed=1)
    for r in range(60):
        code.assign(r)
        code.complete(r, [w for w in range(n) if w not in pattern[r]])
        due = r - code.delay
        if due >= 0:
            assert code.decodable(due)
            code.release(due)
    assert len(code._received) <= code.delay + 1 and len(code._assigned) <= 1
    with pytest.raises(ValueError, match="before its deadline"):
        code.release(59)
