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


def paper_load(scheme: str, n: int, lam: int, burst: int, window: int) -> float:
    """The papers' normalised loads (Krishnan et al. 2023, as quoted in the schemes' docstrings):
    SR-SGC runs GC for s = ceil(B lambda / (W - 1 + B)) stragglers, (s + 1) / n; M-SGC
    (lambda + 1)(W - 1 + B) / (n (B + (W - 1)(lambda + 1)))."""
    if scheme == "sequential_gc":
        s = -(-burst * lam // (window - 1 + burst))
        return (s + 1) / n
    return (lam + 1) * (window - 1 + burst) / (n * (burst + (window - 1) * (lam + 1)))


def worker_fractions(code, tasks) -> list[float]:
    """Data fraction each worker computes in one round, summed from the tasks themselves."""
    frac = code.part_fractions
    return [sum(frac[p] for task in mine for p in task.parts) for mine in tasks]


def run(scheme: str, n: int, lam: int, burst: int, window: int, pattern, n_jobs: int, loads=None):
    code = build(scheme, n, lam, burst=burst, window=window, n_jobs=n_jobs)
    for r in range(n_jobs + code.delay):
        tasks = code.assign(r)
        if loads is not None:
            loads.append(max(worker_fractions(code, tasks)))
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


# (n, lambda, B, W, rounds with stragglers): small enough to enumerate every conforming pattern,
# chosen so that most use the cyclic code inside (s + 1 does not divide n)
EXHAUSTIVE = {
    "sequential_gc": [(5, 2, 1, 2, 3), (3, 2, 1, 2, 5), (5, 1, 2, 3, 5), (4, 2, 1, 3, 4)],
    "multiplexed_sgc": [(4, 2, 1, 2, 4), (4, 2, 2, 3, 4), (5, 1, 2, 3, 5), (4, 2, 1, 3, 4)],
}


@pytest.mark.parametrize(("scheme", "params"), [(k, p) for k, ps in EXHAUSTIVE.items() for p in ps])
def test_every_conforming_pattern_meets_deadlines_exhaustive(scheme: str, params) -> None:
    """Every pattern of the (B, W, lambda) model over ``rounds`` rounds (then clean rounds until
    the last deadline): every job decodes by its deadline, and no round loads a worker above
    the paper's load, which the busiest rounds reach."""
    n, lam, burst, window, rounds = params
    expected = paper_load(scheme, n, lam, burst, window)
    count, heaviest = 0, 0.0
    for pattern in _all_conforming(n, rounds, burst, window, lam):
        loads: list[float] = []
        assert_on_time(run(scheme, n, lam, burst, window, pattern, rounds, loads), rounds)
        assert max(loads) <= expected + 1e-12
        heaviest = max(heaviest, max(loads))
        count += 1
    assert count > 100
    assert heaviest == pytest.approx(expected)


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


BW_GRID = [(1, 2), (1, 3), (2, 3), (1, 4), (3, 4), (2, 5), (4, 5)]  # all with B | W - 1 (SR-SGC)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(("burst", "window"), BW_GRID)
def test_measured_load_equals_the_papers_formula(scheme: str, burst: int, window: int) -> None:
    """Over n = 2..24 and every lambda < n: ``load`` (measured from the tasks) equals the paper's
    load and stays at or below plain GC's (lambda + 1) / n, M-SGC's strictly below once
    lambda > 0. For lambda = n / 2 at n = 6, 12, 18, 24 (decoding the larger n is what costs), a
    straggler-free run's round T (every job slot busy), counted here from its tasks, loads the
    busiest worker exactly that much."""
    for n in range(2, 25):
        for lam in range(n):
            expected = paper_load(scheme, n, lam, burst, window)
            code = build(scheme, n, lam, burst=burst, window=window)
            assert code.load == pytest.approx(expected, rel=1e-12), (n, lam)
            assert code.load <= (lam + 1) / n + 1e-12
            if scheme == "multiplexed_sgc" and lam > 0:
                assert code.load < (lam + 1) / n
            if n % 6 or lam != n // 2:
                continue
            for r in range(code.delay + 1):
                tasks = code.assign(r)
                code.complete(r, list(range(n)))
            assert max(worker_fractions(code, tasks)) == pytest.approx(expected, rel=1e-12), (n, lam)


def test_pairs_that_once_got_a_wider_code_get_the_optimal_load() -> None:
    """Pairs that were once given a code for s + 1 stragglers (s + 2 parts a worker): M-SGC at
    n = 14, lambda = 4 (B = 1, W = 2) is 5/42, and a D2 coded task is exactly lambda + 1 pieces,
    as large as a D1 piece."""
    code = build("multiplexed_sgc", 14, 4, burst=1, window=2)
    assert code.load == pytest.approx(5 / 42)
    for r in range(code.delay + 1):
        tasks = code.assign(r)
        code.complete(r, list(range(14)))
    frac = code.part_fractions
    sizes = {round(sum(frac[p] for p in t.parts) * 84, 9) for mine in tasks for t in mine}
    assert sizes == {5.0}  # every mini-task is 5 of the 84 smallest pieces (5/84 of a job)
    for n, lam in [(14, 4), (17, 5), (22, 2), (24, 4)]:
        sr = build("sequential_gc", n, 2 * lam, burst=1, window=2)  # s = ceil(2 lam / 2) = lam
        assert sr.s == lam and sr.load == pytest.approx((lam + 1) / n)


def test_load_shows_a_heavier_round() -> None:
    """``load`` is measured: a round whose tasks are heavier than the steady state raises it."""
    from algorithms.coding.base import Task

    code = build("sequential_gc", 6, 2, burst=1, window=3)
    base = code.load
    heavy = [[Task(job=0, coeffs=tuple((p, 1.0) for p in range(6)))] for _ in range(6)]
    code._plan = lambda r: heavy  # type: ignore[method-assign]
    code.assign(0)
    assert base == pytest.approx(1 / 3) and code.load == pytest.approx(1.0)


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
