"""Bursty stragglers (faults.stragglers.bursts): who straggles follows a seeded (B, W, lambda)
pattern that conforms to the model, the same on every worker, round by round."""

import pytest
from pydantic import ValidationError

from algorithms.coding.straggler_model import conforms
from service.spec.faults import FaultsSpec
from workers.faults import Straggler


def faults(**bursts: object) -> FaultsSpec:
    return FaultsSpec.model_validate({"stragglers": {"count": 2, "seed": 3, "delay": {"dist": "fixed", "mean_ms": 50},
                                                     "bursts": {"burst": 2, "window": 4, **bursts}}})


def test_the_workers_replay_one_conforming_pattern() -> None:
    n, rounds = 8, 600  # past the first pattern's length, so that it is regrown
    spec = faults()
    workers = [Straggler(spec, rank, n) for rank in range(n)]
    pattern = [frozenset(w for w, s in enumerate(workers) if s.draw() > 0) for _ in range(rounds)]
    assert conforms(pattern, burst=2, window=4, lam=2)
    assert sum(map(len, pattern)) > rounds // 4  # it does straggle, and not always the same workers
    assert len({w for p in pattern for w in p}) == n
    # named rounds give the same answer as counted ones, in any order
    again = Straggler(spec, 5, n)
    assert [again.draw(r) > 0 for r in (599, 3, 250)] == [5 in pattern[r] for r in (599, 3, 250)]


def test_every_delay_is_the_specs_and_fixed_stragglers_are_unchanged() -> None:
    spec = faults()
    s = Straggler(spec, 0, 4)
    assert {round(s.draw(), 6) for _ in range(50)} <= {0.0, 0.05}
    fixed = FaultsSpec.model_validate({"stragglers": {"ranks": [1], "delay": {"dist": "fixed", "mean_ms": 20}}})
    assert [Straggler(fixed, 1, 4).draw() for _ in range(3)] == [0.02] * 3
    assert Straggler(fixed, 0, 4).draw() == 0.0


def test_bad_bursts_name_the_field() -> None:
    with pytest.raises(ValidationError, match="burst"):
        faults(burst=4, window=4)
    with pytest.raises(ValidationError, match="count"):
        FaultsSpec.model_validate({"stragglers": {"ranks": [0], "delay": {"dist": "fixed"},
                                                  "bursts": {"burst": 1, "window": 2}}})
