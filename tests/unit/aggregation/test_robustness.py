"""The rules under attack, the attacks themselves, and the liar weight."""

from __future__ import annotations

import pytest
import torch

from algorithms.aggregation import config as C
from algorithms.aggregation.attacks import ATTACKS, alie_z, build_attack
from algorithms.aggregation.base import liar_weight
from algorithms.aggregation.registry import build

ROBUST = ["median", "trimmed_mean", "krum", "multi_krum", "bulyan", "geometric_median", "flag"]


def honest_grads(h: int, d: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, generator=g)
    return mu, mu + noise * torch.randn(h, d, generator=g)


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


@pytest.mark.parametrize("n,f", [(15, 3), (7, 1), (11, 2)])
@pytest.mark.parametrize("seed", range(3))
def test_scaled_sign_flip_keeps_the_honest_direction_where_the_mean_loses_it(n: int, f: int, seed: int) -> None:
    mu, honest = honest_grads(n - f, 500, noise=1.0, seed=seed)
    liars = build_attack("sign_flip", scale=10.0)(honest, f, torch.Generator())
    # Liars at the front and in the middle: nothing may depend on where they sit.
    x = torch.cat([liars[:1], honest[: (n - f) // 2], liars[1:], honest[(n - f) // 2:]])
    assert cos(build("mean")(x), mu) < -0.5
    for name in ROBUST:
        agg = build(name, f=f)(x)
        assert cos(agg, mu) > 0.5, name


@pytest.mark.parametrize("name", ["mean", *ROBUST])
def test_identical_gradients_come_back_unchanged_in_direction(name: str) -> None:
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    x = g.repeat(11, 1)
    agg = build(name, f=0 if name == "mean" else 2)(x)
    assert cos(agg, g) > 1 - 1e-6
    if name != "flag":  # flag returns (n / r) * g / |g| by construction
        torch.testing.assert_close(agg, g, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(agg, g / g.norm() * 11 / 6, rtol=1e-5, atol=1e-6)  # r = ceil(11 / 2)


def test_attacks_follow_their_definitions() -> None:
    _, honest = honest_grads(9, 50, noise=0.5, seed=1)
    gen = torch.Generator()
    mean, std = honest.mean(0), honest.std(0)
    torch.testing.assert_close(build_attack("sign_flip", scale=3.0)(honest, 2, gen), (-3 * mean).repeat(2, 1))
    torch.testing.assert_close(build_attack("ipm", epsilon=0.2)(honest, 3, gen), (-0.2 * mean).repeat(3, 1))
    z = alie_z(12, 3)  # s = floor(12/2 + 1) - 3 = 4, z = Phi^-1(8/12)
    assert z == pytest.approx(0.430727, abs=1e-6)
    torch.testing.assert_close(build_attack("alie")(honest, 3, gen), (mean - z * std).repeat(3, 1))
    torch.testing.assert_close(build_attack("alie", z=1.5)(honest, 1, gen), (mean - 1.5 * std)[None])


def test_gaussian_attack_is_seeded() -> None:
    _, honest = honest_grads(5, 20_000, noise=0.5, seed=1)
    atk = ATTACKS.build(C.GaussianAttack(name="gaussian", std=2.0))
    a = atk(honest, 2, torch.Generator().manual_seed(7))
    b = atk(honest, 2, torch.Generator().manual_seed(7))
    c = atk(honest, 2, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.mean()) == pytest.approx(0.0, abs=0.05) and float(a.std()) == pytest.approx(2.0, rel=0.02)
    assert not torch.equal(a[0], a[1])


def test_uniform_attack_draws_the_authors_random_gradients() -> None:
    _, honest = honest_grads(5, 20_000, noise=0.5, seed=1)
    atk = ATTACKS.build(C.UniformAttack(name="uniform"))
    a = atk(honest, 2, torch.Generator().manual_seed(7))
    assert torch.equal(a, atk(honest, 2, torch.Generator().manual_seed(7)))
    assert float(a.min()) >= 0.0 and float(a.max()) < 1.0 and float(a.mean()) == pytest.approx(0.5, abs=0.01)
    assert not torch.equal(a[0], a[1])
    b = build_attack("uniform", low=-2.0, high=-1.0)(honest, 1, torch.Generator().manual_seed(0))
    assert float(b.min()) >= -2.0 and float(b.max()) < -1.0
    with pytest.raises(ValueError, match="high > low"):
        C.UniformAttack(name="uniform", low=1.0, high=1.0)


def test_label_flip_has_no_gradient_function_and_unknown_attacks_are_named() -> None:
    assert ATTACKS.build(C.LabelFlipAttack(name="label_flip")) is None
    with pytest.raises(ValueError, match="unknown attack 'drop'"):
        build_attack("drop")


def test_liar_weight() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 300, generator=g)
    x = x / x.abs().sum(1, keepdim=True)  # equal l1 norms
    res = build("mean").aggregate(x, with_mass=True)
    assert liar_weight(x, res.value, [1, 5], res.mass) == pytest.approx(2 / 8)
    # Without the rule's mass: least squares recovers the coefficients of independent rows.
    assert liar_weight(x, res.value, [1, 5]) == pytest.approx(2 / 8, rel=1e-4)
    assert liar_weight(x, res.value, []) == 0.0
    # Scaled liars dominate the mean; Krum and the median let nothing of them through.
    mu, honest = honest_grads(12, 300, noise=1.0, seed=4)
    x = torch.cat([build_attack("sign_flip", scale=10.0)(honest, 3, g), honest])
    byz = [0, 1, 2]
    mean = build("mean").aggregate(x, with_mass=True)
    lies = 3 * 10 * float(honest.mean(0).abs().sum())
    assert liar_weight(x, mean.value, byz, mean.mass) == pytest.approx(lies / (lies + float(honest.abs().sum())))
    assert liar_weight(x, mean.value, byz, mean.mass) > 0.5
    for name in ("krum", "multi_krum"):
        res = build(name, f=3).aggregate(x, with_mass=True)
        assert liar_weight(x, res.value, byz, res.mass) == 0.0, name
    # Bulyan's recursive Krum ends on few neighbours, where three identical liars score 0 and one
    # is selected; the coordinate-wise phase then keeps few of its values.
    for name in ("median", "bulyan"):
        res = build(name, f=3).aggregate(x, with_mass=True)
        assert liar_weight(x, res.value, byz, res.mass) < 0.05, name
