"""Coded training equals uncoded full-batch training (float64, tiny MLP), for every scheme."""

import pytest
import torch
from torch import nn

from algorithms.coding import build, decode_gradient, decode_job
from algorithms.coding.straggler_model import bursty_pattern

N, DIM, CLASSES, LR = 60, 5, 3, 0.3


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, DIM, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, CLASSES, (N,), generator=gen)


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 8), nn.Tanh(), nn.Linear(8, CLASSES)).double()


def flat_grad(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: list[tuple[slice, float]]
) -> torch.Tensor:
    """Gradient of sum_p w_p * (summed loss over part p)."""
    params = list(net.parameters())
    loss = torch.zeros((), dtype=torch.float64)
    for sl, w in weights:
        loss = loss + w * nn.functional.cross_entropy(net(x[sl]), y[sl], reduction="sum")
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def apply(net: nn.Module, grad: torch.Tensor) -> None:
    with torch.no_grad():
        i = 0
        for p in net.parameters():
            p.sub_(LR * grad[i : i + p.numel()].view_as(p))
            i += p.numel()


def split(fractions) -> list[slice]:
    bounds, acc = [0], 0.0
    for f in fractions:
        acc += f
        bounds.append(round(acc * N))
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def reference(seed: int, steps: int) -> nn.Module:
    x, y = data()
    net = model(seed)
    for _ in range(steps):
        apply(net, flat_grad(net, x, y, [(slice(0, N), 1.0)]) / N)
    return net


@pytest.mark.parametrize(("scheme", "n", "s"), [("fractional_repetition", 6, 2), ("cyclic_repetition", 6, 2),
                                               ("cyclic_repetition", 7, 3)])
def test_one_shot_code_trains_like_full_batch(scheme: str, n: int, s: int) -> None:
    x, y = data()
    code = build(scheme, n, s)
    parts = split([1 / code.n_parts] * code.n_parts)
    net, gen, steps = model(1), torch.Generator().manual_seed(3), 5
    biased = model(1)
    for _ in range(steps):
        stragglers = set(torch.randperm(n, generator=gen)[:s].tolist())
        arrived = {
            w: flat_grad(net, x, y, [(parts[j], float(code.B[w, j])) for j in code.parts(w)])
            for w in range(n) if w not in stragglers
        }
        apply(net, decode_gradient(code, arrived) / N)
        # ignore-stragglers baseline: uncoded parts of the survivors only (biased)
        alive = [w for w in range(n) if w not in stragglers]
        g = flat_grad(biased, x, y, [(parts[w], 1.0) for w in alive])
        apply(biased, g / (N * len(alive) / n))
    ref = reference(1, steps)
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-10, rtol=0)
    gap = max(float((b - q).detach().abs().max()) for b, q in zip(biased.parameters(), ref.parameters(), strict=True))
    assert gap > 1e-4  # dropping the stragglers' data is biased: the check above can fail


@pytest.mark.parametrize(("scheme", "burst", "window"), [("sequential_gc", 1, 3), ("multiplexed_sgc", 2, 3)])
def test_sequential_code_trains_like_full_batch(scheme: str, burst: int, window: int) -> None:
    """Like the paper's experiments, T + 1 models are trained round-robin: job j is a step of
    model j mod (T + 1), whose previous job is decoded before job j starts."""
    n, lam, steps = 6, 2, 3
    x, y = data()
    n_models = build(scheme, n, lam, burst=burst, window=window).delay + 1
    n_jobs = steps * n_models
    code = build(scheme, n, lam, burst=burst, window=window, n_jobs=n_jobs)
    parts = split(code.part_fractions)
    nets = [model(10 + m) for m in range(n_models)]
    pattern = bursty_pattern(n, n_jobs + code.delay, burst, window, lam, p_start=0.4, p_continue=0.9, seed=5)
    assert sum(len(p) for p in pattern) >= 5
    results: dict[tuple[int, int, int], torch.Tensor] = {}
    for r in range(n_jobs + code.delay):
        tasks = code.assign(r)
        alive = [w for w in range(n) if w not in pattern[r]]
        for w in alive:
            for slot, task in enumerate(tasks[w]):
                net = nets[task.job % n_models]
                results[(r, w, slot)] = flat_grad(net, x, y, [(parts[p], c) for p, c in task.coeffs])
        for job in code.complete(r, alive):
            assert r <= code.deadline(job)
            apply(nets[job % n_models], decode_job(code, job, results) / N)
    assert code.overdue() == [] and len(code.decoded_at) == n_jobs
    for m in range(n_models):
        for p, q in zip(nets[m].parameters(), reference(10 + m, steps).parameters(), strict=True):
            torch.testing.assert_close(p, q, atol=1e-10, rtol=0)
