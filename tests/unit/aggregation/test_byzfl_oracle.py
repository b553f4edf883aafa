"""byzfl (EPFL's Byzantine-robust FL library) as an oracle where it implements the same rule.

byzfl is a test-only oracle installed with --no-deps (requirements/oracles.txt): its package
``__init__`` pulls torchvision, so only ``byzfl.aggregators.aggregators`` and
``byzfl.attacks.attacks`` are loaded, under a bare ``byzfl`` package (NOTES.md).

Conventions that differ, mapped here: byzfl's Krum counts ``n - f - 1`` neighbours where the paper
(and we) count ``n - f - 2``, so ours with ``f`` is byzfl's with ``f + 1`` (and Multi-Krum then
averages ``n - f - 1`` rows); byzfl's ALIE sends ``mean + tau * std``, ours ``mean - z * std``
(Baruch et al. and the Flag authors' code), so ``tau = -z``. Numpy inputs: byzfl's torch path of
Multi-Krum keeps one row too many (``topk(k + 1)``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from algorithms.aggregation.attacks import build_attack
from algorithms.aggregation.registry import build


@pytest.fixture(scope="module")
def byzfl() -> Iterator[tuple[Any, Any]]:
    spec = importlib.util.find_spec("byzfl")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("byzfl oracle not installed (requirements/oracles.txt)")
    saved = {k: v for k, v in sys.modules.items() if k == "byzfl" or k.startswith("byzfl.")}
    bare = types.ModuleType("byzfl")
    bare.__path__ = list(spec.submodule_search_locations)
    sys.modules["byzfl"] = bare
    try:
        aggs = importlib.import_module("byzfl.aggregators.aggregators")
        attacks = importlib.import_module("byzfl.attacks.attacks")
        yield aggs, attacks
    finally:
        for k in [k for k in sys.modules if k == "byzfl" or k.startswith("byzfl.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def grads(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=d) + rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=(n, 1))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n,f", [(9, 1), (12, 3), (15, 3)])
def test_coordinate_rules(byzfl: tuple[Any, Any], seed: int, n: int, f: int) -> None:
    aggs, _ = byzfl
    x = grads(n, 64, seed)
    t = torch.from_numpy(x)
    np.testing.assert_allclose(build("median", f=f)(t).numpy(), aggs.Median()(x), rtol=1e-12)
    np.testing.assert_allclose(build("trimmed_mean", f=f)(t).numpy(), aggs.TrMean(f)(x), rtol=1e-12)
    np.testing.assert_allclose(build("mean")(t).numpy(), aggs.Average()(x), rtol=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n,f", [(9, 1), (12, 3), (15, 3)])
def test_krum_and_multi_krum(byzfl: tuple[Any, Any], seed: int, n: int, f: int) -> None:
    aggs, _ = byzfl
    x = grads(n, 64, 10 + seed)
    t = torch.from_numpy(x)
    np.testing.assert_array_equal(build("krum", f=f)(t).numpy(), aggs.Krum(f + 1)(x))
    np.testing.assert_allclose(build("multi_krum", f=f, m=n - f - 1)(t).numpy(), aggs.MultiKrum(f + 1)(x),
                               rtol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_geometric_median(byzfl: tuple[Any, Any], seed: int) -> None:
    aggs, _ = byzfl
    x = grads(11, 32, 20 + seed)
    want = aggs.GeometricMedian(nu=1e-10, T=3000)(x)
    ours = build("geometric_median", max_iter=3000, eps=1e-10, tol=1e-15)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, want, rtol=0, atol=1e-6)
    # A few smoothed iterations from byzfl's start (0) land near the same point as ours from the mean.
    short = build("geometric_median", max_iter=200, eps=0.1, tol=1e-12)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(short, aggs.GeometricMedian(nu=0.1, T=200)(x), rtol=0, atol=1e-5)


def test_attacks(byzfl: tuple[Any, Any]) -> None:
    _, attacks = byzfl
    honest = grads(10, 40, 5)
    t = torch.from_numpy(honest)
    gen = torch.Generator()
    np.testing.assert_allclose(build_attack("sign_flip")(t, 2, gen).numpy()[0], attacks.SignFlipping()(honest))
    np.testing.assert_allclose(build_attack("ipm", epsilon=0.3)(t, 2, gen).numpy()[1],
                               attacks.InnerProductManipulation(tau=0.3)(honest))
    np.testing.assert_allclose(build_attack("alie", z=1.2)(t, 3, gen).numpy()[2],
                               attacks.ALittleIsEnough(tau=-1.2)(honest))
