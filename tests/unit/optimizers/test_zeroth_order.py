"""AdaZo-SAM, LORENZA(+) and SAM: the zeroth-order estimate, the projected estimate, the update
rule against hand-written references, and the number of backward passes per step."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

from algorithms.optimizers.adazo_sam import AdaZoSAM
from algorithms.optimizers.lorenza import Lorenza
from algorithms.optimizers.projection import randomized_svd_basis, svd_basis
from algorithms.optimizers.registry import build
from algorithms.optimizers.sam import SAM
from tests.unit.optimizers.helpers import CountingClosure, TwoLayer, batches, loss_of


def small(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def data64(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, generator=g).double(), torch.randn(16, 3, generator=g).double()


def true_grad(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
    model.zero_grad()
    loss_of(model, batch).backward()
    return [p.grad.detach().clone() for p in model.parameters()]  # type: ignore[union-attr]


def flat(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in xs])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def perturbation(opt: AdaZoSAM | Lorenza, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                 step: int) -> list[torch.Tensor]:
    """The SAM perturbation eps the optimizer's probes produce, as a change of every parameter."""
    closure = CountingClosure(model, list(model.parameters()), batch)
    targets = opt.targets()
    assert targets is not None
    before = [p.detach().clone() for p in model.parameters()]
    _, eps = opt.zo_ascent(closure, targets, step)
    with torch.no_grad():
        for t, e in zip(targets, eps, strict=True):
            t.apply_(e, 1.0)
    after = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, b in zip(model.parameters(), before, strict=True):
            p.copy_(b)
    assert closure.backwards == 0 and closure.forwards == 2 * opt.defaults["n_directions"]
    return [a - b for a, b in zip(after, before, strict=True)]



def sam_reference_step(ref: nn.Module, ref_opt: torch.optim.Optimizer, batch: Any, eps: list[torch.Tensor]) -> None:
    """SAM's rule by hand: the gradient at w + eps, taken back at w by the base optimizer."""
    with torch.no_grad():
        for p, e in zip(ref.parameters(), eps, strict=True):
            p.add_(e)
    ref_opt.zero_grad()
    loss_of(ref, batch).backward()
    with torch.no_grad():
        for p, e in zip(ref.parameters(), eps, strict=True):
            p.sub_(e)
    ref_opt.step()

def test_adazo_estimate_turns_towards_the_gradient_as_directions_grow() -> None:
    model, batch = small(), data64()
    g = flat(true_grad(model, batch))
    means = []
    for n in (1, 10, 100, 2000):
        cos = []
        for seed in range(4):
            opt = AdaZoSAM(model.parameters(), lr=1e-3, rho=0.05, mu=1e-5, n_directions=n, seed=seed)
            eps = flat(perturbation(opt, model, batch, step=1))
            assert abs(float(eps.norm()) - 0.05) < 1e-9  # ||eps|| = rho
            cos.append(cosine(eps, g))
        means.append(sum(cos) / len(cos))
    assert means == sorted(means), means
    assert means[-1] > 0.98 and means[0] < 0.7, means


def test_lorenza_estimate_converges_to_the_projected_gradient() -> None:
    model, batch = small(), data64()
    opt = Lorenza(model.parameters(), lr=1e-3, rank=2, update_proj_gap=100, rho=0.05, mu=1e-5, seed=0,
                  oversampling=0, power_iters=0)
    closure = CountingClosure(model, list(model.parameters()), batch)
    opt.step(closure)  # first step: no probes, builds the subspaces from the gradient
    assert closure.forwards == 1 and closure.backwards == 1
    grads = true_grad(model, batch)
    projected = []
    for p, g in zip(model.parameters(), grads, strict=True):
        if p.dim() == 2:
            proj = opt.state[p]["proj"]
            side = opt.side(p, opt.param_groups[0])
            projected.append(g @ proj.T @ proj if side == "right" else proj @ proj.T @ g)
        else:
            projected.append(g)
    target = flat(projected)
    assert cosine(target, flat(grads)) < 0.999  # the projection does discard something
    means = []
    for n in (1, 10, 100, 2000):
        opt.defaults["n_directions"] = n
        cos = []
        for seed in range(3):
            opt.zo_seed = seed
            eps = perturbation(opt, model, batch, step=2)
            for p, e in zip(model.parameters(), eps, strict=True):  # exactly inside the subspace
                if p.dim() == 2:
                    proj = opt.state[p]["proj"]
                    inside = e @ proj.T @ proj if opt.side(p, opt.param_groups[0]) == "right" else proj @ proj.T @ e
                    assert torch.allclose(inside, e, atol=1e-12)
            cos.append(cosine(flat(eps), target))
        means.append(sum(cos) / len(cos))
    assert means == sorted(means), means
    assert means[-1] > 0.98 and means[0] < 0.9, means


@pytest.mark.parametrize("name", ["adazo_sam", "lorenza", "sam"])
def test_backward_passes_per_step(name: str) -> None:
    model = TwoLayer()
    hp = {"rank": 4, "update_proj_gap": 2} if name == "lorenza" else {}
    if name != "sam":
        hp["n_directions"] = 3
    opt: Any = build(name, model.parameters(), lr=1e-2, **hp)
    assert getattr(opt, "needs_closure", False)
    for i, batch in enumerate(batches(5)):
        closure = CountingClosure(model, list(model.parameters()), batch)
        loss = opt.step(closure)
        assert torch.isfinite(loss)
        if name == "sam":
            assert (closure.backwards, closure.forwards) == (2, 2)
        elif name == "lorenza" and i == 0:
            assert (closure.backwards, closure.forwards) == (1, 1)  # no subspace to probe in yet
        else:
            assert (closure.backwards, closure.forwards) == (1, 2 * 3 + 1)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_adazo_sam_step_is_adamw_at_the_zo_perturbed_point() -> None:
    """Reference written from the rule: c_j = (f(x+mu u_j) - f(x-mu u_j))/2mu, g = mean c_j u_j,
    eps = rho g/||g||, gradient at x + eps, torch's AdamW step from x."""
    model, batch = small(), data64()
    ref = copy.deepcopy(model)
    rho, mu, n = 0.1, 1e-4, 2
    opt = AdaZoSAM(model.parameters(), lr=1e-2, weight_decay=0.1, rho=rho, mu=mu, n_directions=n, seed=7)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    params = list(ref.parameters())
    for step in range(1, 4):
        opt.step(CountingClosure(model, list(model.parameters()), batch))
        with torch.no_grad():
            est = [torch.zeros_like(p) for p in params]
            for j in range(n):
                us = [torch.randn(p.shape, generator=opt._generator(q, step, j), dtype=p.dtype)
                      for p, q in zip(params, model.parameters(), strict=True)]
                plus, minus = copy.deepcopy(ref), copy.deepcopy(ref)
                for a, b, u in zip(plus.parameters(), minus.parameters(), us, strict=True):
                    a.add_(mu * u)
                    b.sub_(mu * u)
                c = float(loss_of(plus, batch) - loss_of(minus, batch)) / (2 * mu)
                for e, u in zip(est, us, strict=True):
                    e.add_(c * u / n)
            norm = math.sqrt(sum(float((e**2).sum()) for e in est))
            eps = [rho * e / norm for e in est]
            for p, e in zip(params, eps, strict=True):
                p.add_(e)
        ref_opt.zero_grad()
        loss_of(ref, batch).backward()
        with torch.no_grad():
            for p, e in zip(params, eps, strict=True):
                p.sub_(e)
        ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-9)


def test_sam_step_matches_the_two_pass_rule() -> None:
    model, batch = small(), data64()
    ref = copy.deepcopy(model)
    opt = SAM(model.parameters(), lr=0.1, rho=0.05, base="sgd", momentum=0.9, weight_decay=0.01)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(3):
        opt.step(CountingClosure(model, list(model.parameters()), batch))
        g = true_grad(ref, batch)
        norm = flat(g).norm()
        eps = [0.05 * x / norm for x in g]
        sam_reference_step(ref, ref_opt, batch, eps)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_lorenza_plus_adds_the_scaled_orthogonal_component() -> None:
    base, batch = small(), data64()
    runs = {}
    for plus in (False, True):
        model = copy.deepcopy(base)
        opt = Lorenza(model.parameters(), lr=1e-2, rank=2, rho=0.0, plus=plus, seed=0, scale=0.5)
        opt.step(CountingClosure(model, list(model.parameters()), batch))
        runs[plus] = (model, opt)
    (m0, o0), (m1, _) = runs[False], runs[True]
    g = true_grad(copy.deepcopy(base), batch)
    for (name, p0), p1, gp in zip(m0.named_parameters(), m1.parameters(), g, strict=True):
        diff = (p1 - p0).detach()
        if p0.dim() != 2:
            assert diff.abs().max() == 0, name
            continue
        proj = o0.state[p0]["proj"]
        right = o0.side(p0, o0.param_groups[0]) == "right"
        low = gp @ proj.T if right else proj.T @ gp
        orth = gp - (low @ proj if right else proj @ low)
        # Adam's first step is sign-like: |direction| = 1/(1 + eps/|R|) elementwise, step factor 1
        st = o0.state[p0]
        direction = st["exp_avg"] / (st["exp_avg_sq"].sqrt() + 1e-8 * math.sqrt(1 - 0.999))
        phi = float(direction.norm() * math.sqrt(1 - 0.999) / (1 - 0.9) / low.norm())
        assert torch.allclose(diff, -1e-2 * 0.5 * phi * orth, atol=1e-12), name


def test_randomized_svd_finds_the_dominant_subspace() -> None:
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(60, 4))
    v, _ = torch.linalg.qr(torch.randn(40, 4))
    a = u @ torch.diag(torch.tensor([10.0, 8.0, 6.0, 5.0])) @ v.T + 0.01 * torch.randn(60, 40)
    gen = torch.Generator().manual_seed(0)
    for side in ("left", "right"):
        exact, _ = svd_basis(a, 4, side)  # type: ignore[arg-type]
        approx, _ = randomized_svd_basis(a, 4, side, oversampling=4, power_iters=1, generator=gen)  # type: ignore[arg-type]
        overlap = exact.T @ approx if side == "left" else exact @ approx.T
        assert torch.linalg.svdvals(overlap).min() > 0.9999


# ---- per-group rho and mu ------------------------------------------------------------------------
class Recording(CountingClosure):
    """Also keeps the parameters each pass ran at."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.seen: list[list[torch.Tensor]] = []

    def __call__(self, backward: bool = True) -> torch.Tensor:
        self.seen.append([p.detach().clone() for p in self.params])
        return super().__call__(backward)


def two_groups(model: nn.Module, **second: float) -> list[dict[str, Any]]:
    """fc1 with the optimizer's defaults, fc2 with its own hyperparameters."""
    return [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), **second}]  # type: ignore[index]


def test_sam_perturbs_each_group_by_its_rho_over_the_global_norm() -> None:
    """Foret et al.'s e_w = rho g / ||g|| with rho per group: fc1 moves by 0.05 g/||g||, fc2 by
    0.3 g/||g||, ||g|| over all four tensors; then the base SGD step (per-group lr) from theta."""
    model, batch = small(), data64()
    ref = copy.deepcopy(model)
    opt = SAM(two_groups(model, rho=0.3, lr=0.05), lr=0.1, rho=0.05, base="sgd", momentum=0.9)
    ref_opt = torch.optim.SGD(two_groups(ref, lr=0.05), lr=0.1, momentum=0.9)
    rhos = [0.05, 0.05, 0.3, 0.3]  # fc1 weight, bias; fc2 weight, bias
    for _ in range(3):
        closure = Recording(model, list(model.parameters()), batch)
        opt.step(closure)
        at, perturbed = closure.seen
        g = true_grad(ref, batch)
        norm = flat(g).norm()
        eps = [rho * x / norm for rho, x in zip(rhos, g, strict=True)]
        for a, r, p, e in zip(at, ref.parameters(), perturbed, eps, strict=True):
            assert torch.allclose(a, r, rtol=0, atol=1e-12)
            assert torch.allclose(p - a, e, rtol=1e-8, atol=1e-13)  # SAM adds 1e-12 to the norm
        sam_reference_step(ref, ref_opt, batch, eps)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-12)


def test_sam_resumed_shares_its_groups_with_the_base_optimizer() -> None:
    """After load_state_dict, hyperparameters set on SAM's groups (an LR scheduler's lr) still reach
    the base optimizer: with lr 0 a resumed step leaves the weights where they are."""
    model, batch = small(), data64()
    opt = SAM(model.parameters(), lr=0.1, rho=0.05, base="sgd", momentum=0.9)
    opt.step(CountingClosure(model, list(model.parameters()), batch))
    resumed = SAM(model.parameters(), lr=0.1, rho=0.05, base="sgd", momentum=0.9)
    resumed.load_state_dict(opt.state_dict())
    for group in resumed.param_groups:
        group["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    resumed.step(CountingClosure(model, list(model.parameters()), batch))
    for a, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(a, b)


def zo_rule(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], dirs: list[list[torch.Tensor]],
            mus: list[float], rhos: list[float]) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """The per-group rule written out, from full-space directions ``dirs[j][param]``: the probe points
    theta +- mu_k u_jk, and eps_k = rho_k g_k / ||g|| with g_k = mean_j (f+ - f-) / (2 mu_k) u_jk."""
    theta = [p.detach().clone() for p in model.parameters()]
    points: list[list[torch.Tensor]] = []
    est = [torch.zeros_like(t) for t in theta]
    for us in dirs:
        plus = [t + mu * u for t, u, mu in zip(theta, us, mus, strict=True)]
        minus = [t - mu * u for t, u, mu in zip(theta, us, mus, strict=True)]
        points += [plus, minus]
        f = []
        for point in (plus, minus):
            probe = copy.deepcopy(model)
            with torch.no_grad():
                for p, x in zip(probe.parameters(), point, strict=True):
                    p.copy_(x)
                f.append(float(loss_of(probe, batch)))
        for e, u, mu in zip(est, us, mus, strict=True):
            e.add_((f[0] - f[1]) / (2 * mu * len(dirs)) * u)
    norm = math.sqrt(sum(float((e**2).sum()) for e in est))
    return points, [rho * e / norm for e, rho in zip(est, rhos, strict=True)]


@pytest.mark.parametrize("name", ["adazo_sam", "lorenza"])
def test_zo_probes_and_perturbation_use_each_groups_rho_and_mu(name: str) -> None:
    """fc1 keeps the defaults (rho 0.05, mu 1e-4), fc2 sets rho 0.3 and mu 0.1: the probes must move
    fc2 by 0.1 u and its perturbation must be 0.3 g_fc2 / ||g||; LORENZA's directions are lifted
    from its subspaces (Z P on the right, P Z on the left; biases in full)."""
    model, batch = small(), data64()
    groups = two_groups(model, rho=0.3, mu=0.1)
    n = 2
    opt: AdaZoSAM | Lorenza
    if name == "adazo_sam":
        opt, step = AdaZoSAM(groups, lr=1e-2, rho=0.05, mu=1e-4, n_directions=n, seed=5), 1
    else:
        opt = Lorenza(groups, lr=1e-2, rank=2, rho=0.05, mu=1e-4, n_directions=n, seed=5)
        opt.step(CountingClosure(model, list(model.parameters()), batch))  # builds the subspaces
        step = 2
    params = list(model.parameters())
    mus, rhos = [1e-4, 1e-4, 0.1, 0.1], [0.05, 0.05, 0.3, 0.3]

    def direction(p: torch.Tensor, j: int) -> torch.Tensor:
        if name == "adazo_sam" or p.dim() == 1:
            return torch.randn(p.shape, generator=opt._generator(p, step, j), dtype=p.dtype)
        proj = opt.state[p]["proj"]
        if Lorenza.side(p, opt.param_groups[0]) == "right":
            z = torch.randn((p.shape[0], proj.shape[0]), generator=opt._generator(p, step, j), dtype=p.dtype)
            return z @ proj
        z = torch.randn((proj.shape[1], p.shape[1]), generator=opt._generator(p, step, j), dtype=p.dtype)
        return proj @ z

    dirs = [[direction(p, j) for p in params] for j in range(n)]
    points, eps = zo_rule(model, batch, dirs, mus, rhos)
    closure = Recording(model, params, batch)
    targets = opt.targets()
    assert targets is not None
    theta = [p.detach().clone() for p in params]
    _, low = opt.zo_ascent(closure, targets, step)
    assert closure.backwards == 0 and len(closure.seen) == 2 * n
    for seen, expected in zip(closure.seen, points, strict=True):
        for a, b in zip(seen, expected, strict=True):
            assert torch.allclose(a, b, rtol=0, atol=1e-14)
    with torch.no_grad():
        for t, e in zip(targets, low, strict=True):
            t.apply_(e, 1.0)
    for p, before, e in zip(params, theta, eps, strict=True):
        assert torch.allclose(p.detach() - before, e, rtol=0, atol=1e-12)


def test_zo_step_probes_when_some_group_has_a_radius() -> None:
    """The optimizer-wide rho is 0 but fc2's is 0.1: the step probes (2 forwards per direction);
    with every group at 0 it is a plain gradient step."""
    for second, passes in ((0.1, (1, 2 * 3 + 1)), (0.0, (1, 1))):
        model = small()
        opt = AdaZoSAM(two_groups(model, rho=second), lr=1e-2, rho=0.0, n_directions=3, seed=0)
        closure = CountingClosure(model, list(model.parameters()), data64())
        opt.step(closure)
        assert (closure.backwards, closure.forwards) == passes
