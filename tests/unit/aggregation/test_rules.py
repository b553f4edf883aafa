"""Every rule against an independent reference (tests/unit/aggregation/refs.py) on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from algorithms.aggregation import config as C
from algorithms.aggregation.registry import RULES, build, known
from tests.unit.aggregation import refs


def random_grads(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    scales = torch.rand(n, 1, generator=g, dtype=torch.float64) * 2 + 0.5
    return mu + scales * torch.randn(n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("n", [7, 8])
def test_median_matches_numpy(n: int) -> None:
    x = random_grads(n, 33, seed=n)
    np.testing.assert_allclose(build("median", f=2)(x).numpy(), np.median(x.numpy(), axis=0), rtol=1e-12)


@pytest.mark.parametrize("n,f", [(7, 0), (7, 2), (8, 3)])
def test_trimmed_mean(n: int, f: int) -> None:
    x = random_grads(n, 29, seed=10 + n + f)
    np.testing.assert_allclose(build("trimmed_mean", f=f)(x).numpy(), refs.trimmed_mean(x.numpy(), f), rtol=1e-12)


def test_mean() -> None:
    x = random_grads(5, 17, seed=3)
    np.testing.assert_allclose(build("mean")(x).numpy(), x.numpy().mean(axis=0), rtol=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n,f", [(7, 1), (11, 3), (9, 0)])
def test_krum_and_multi_krum(seed: int, n: int, f: int) -> None:
    x = random_grads(n, 40, seed=100 * seed + n)
    xn = x.numpy()
    np.testing.assert_array_equal(build("krum", f=f)(x).numpy(), refs.krum(xn, f))
    for m in (None, 1, 3):
        want = refs.multi_krum(xn, f, m if m is not None else n - f)
        np.testing.assert_allclose(build("multi_krum", f=f, m=m)(x).numpy(), want, rtol=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n,f", [(7, 1), (11, 2), (15, 3), (8, 1)])
def test_bulyan(seed: int, n: int, f: int) -> None:
    x = random_grads(n, 25, seed=1000 * seed + n)
    np.testing.assert_allclose(build("bulyan", f=f)(x).numpy(), refs.bulyan(x.numpy(), f), rtol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_geometric_median_minimises_the_objective(seed: int) -> None:
    x = random_grads(9, 6, seed=seed)
    xn = x.numpy()
    ours = build("geometric_median", max_iter=2000, tol=1e-14, eps=1e-12)(x).numpy()
    best = minimize(lambda z: refs.geomed_objective(xn, z), xn.mean(axis=0), method="Nelder-Mead",
                    options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 50_000, "maxfev": 50_000})
    assert refs.geomed_objective(xn, ours) <= best.fun + 1e-9
    np.testing.assert_allclose(ours, best.x, atol=1e-4)
    # Optimality: the sum of unit vectors from the median to the points vanishes.
    units = sum((xi - ours) / np.linalg.norm(xi - ours) for xi in xn)
    assert np.linalg.norm(units) < 1e-6


@pytest.mark.parametrize("r,max_iter,lam", [(1, 1, 0.0), (3, 5, 0.0), (7, 5, 0.0), (3, 3, 0.5), (9, 2, 0.0)])
def test_flag_matches_dense_reference(r: int, max_iter: int, lam: float) -> None:
    x = random_grads(9, 60, seed=r * 10 + max_iter)
    x[2] *= 30.0  # normalisation makes the scale irrelevant
    ours = build("flag", f=2, r=r, max_iter=max_iter, lam=lam)(x).numpy()
    want = refs.flag(x.numpy(), r, max_iter, eps=1e-7, lam=lam)
    np.testing.assert_allclose(ours, want, rtol=1e-8, atol=1e-10)


def test_flag_uniform_start_equals_the_authors_random_start_in_high_dimension() -> None:
    """The authors start IRLS from a random orthonormal d x r matrix: in high dimension it is almost
    orthogonal to every gradient, so the first weights are almost uniform, which we use exactly."""
    n, d, r = 7, 20_000, 3
    x = random_grads(n, d, seed=5)
    rng = np.random.default_rng(1)
    y0 = np.linalg.qr(rng.random((d, r)) - 0.5)[0]
    want = refs.flag(x.numpy(), r, 1, eps=1e-7, y0=y0)
    ours = build("flag", r=r, max_iter=1)(x).numpy()
    cos = ours @ want / np.linalg.norm(ours) / np.linalg.norm(want)
    assert cos > 1 - 1e-6
    np.testing.assert_allclose(ours, want, rtol=0, atol=1e-3 * np.abs(want).max())


@pytest.mark.parametrize("name", ["mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan",
                                  "geometric_median", "flag"])
def test_blocks_give_the_whole_vector_rule(name: str) -> None:
    """The Gram statistic is additive over coordinate blocks: chunked == in one piece."""
    x = random_grads(11, 103, seed=7).float()
    f = 0 if name == "mean" else 2
    whole = build(name, f=f, chunk=1 << 20).aggregate(x, with_mass=True)
    parts = build(name, f=f, chunk=10).aggregate(x, with_mass=True)
    torch.testing.assert_close(parts.value, whole.value, rtol=1e-5, atol=1e-6)
    assert whole.mass is not None and parts.mass is not None
    torch.testing.assert_close(parts.mass, whole.mass, rtol=1e-5, atol=1e-6)


def test_registry_covers_every_config_and_refuses_unknown() -> None:
    assert set(known()) == {"mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan",
                            "geometric_median", "flag"}
    for cfg in (C.MeanConfig(name="mean"), C.MedianConfig(name="median", f=1),
                C.TrimmedMeanConfig(name="trimmed_mean", f=1), C.KrumConfig(name="krum", f=1),
                C.MultiKrumConfig(name="multi_krum", f=1, m=3), C.BulyanConfig(name="bulyan", f=1),
                C.GeometricMedianConfig(name="geometric_median", f=1, max_iter=7),
                C.FlagConfig(name="flag", f=1, r=2, lam=0.1)):
        rule = RULES.build(cfg)
        assert rule.name == cfg.name
        assert rule(random_grads(7, 5, seed=0)).shape == (5,)
    with pytest.raises(ValueError, match="unknown aggregation rule 'vote'"):
        build("vote")


@pytest.mark.parametrize("name,f,n", [("krum", 2, 6), ("multi_krum", 1, 4), ("bulyan", 1, 6),
                                      ("trimmed_mean", 2, 4), ("median", 3, 6), ("flag", 3, 6),
                                      ("geometric_median", 2, 4)])
def test_rules_refuse_an_f_they_cannot_tolerate(name: str, f: int, n: int) -> None:
    with pytest.raises(ValueError, match=name):
        build(name, f=f)(random_grads(n, 4, seed=0))
    cfg_cls = {"krum": C.KrumConfig, "multi_krum": C.MultiKrumConfig, "bulyan": C.BulyanConfig,
               "trimmed_mean": C.TrimmedMeanConfig, "median": C.MedianConfig, "flag": C.FlagConfig,
               "geometric_median": C.GeometricMedianConfig}[name]
    with pytest.raises(ValueError, match="tolerates at most"):
        cfg_cls(name=name, f=f).validate_for(n)  # type: ignore[arg-type]
    cfg_cls(name=name, f=f).validate_for(4 * f + 3)  # type: ignore[arg-type]
