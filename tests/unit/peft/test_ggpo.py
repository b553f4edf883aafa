"""LoRA-GGPO (the authors' LoRA-MGPO rule) against a float64 reference written from the rule:

    v    = s (m_B A + B m_A)                     m_*: the optimizer's first moments of A, B
    eps  = -rho * v / (||v|| + 1e-12) * min(10, 1 / (gbar + 1e-12))    (factor 1 before any gbar)
    gbar = beta * gbar + (1 - beta) * ||s (g_B A + B g_A)||   after each backward (first: the norm)

on hand-made layers (known W0, A, B, AdamW state read from the optimizer after real steps).
"""

import warnings
from typing import Any

import pytest
import torch

from algorithms.peft.registry import apply

RHO, BETA, LR = 0.05, 0.9, 1e-2


class TwoLayer(torch.nn.Module):
    """fc1 (5 x 6) and fc2 (4 x 5): two shapes, so two layer groups."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(6, 5), torch.nn.Linear(5, 4)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, scale: float = 1.0) -> dict[str, torch.Tensor]:
        return {"loss": scale * ((self.fc2(torch.tanh(self.fc1(x))) - labels) ** 2).mean()}


def batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {"x": torch.randn(8, 6, generator=g), "labels": torch.randn(8, 4, generator=g)}


def make_handle(**hp: Any) -> Any:
    torch.manual_seed(0)
    handle: Any = apply("lora_ggpo", TwoLayer(), r=2, alpha=4.0, target_modules=["fc1", "fc2"], rho=RHO,
                   beta=BETA, **hp)
    with torch.no_grad():  # known, non-zero A and B (B = 0 would make v = m_B A only)
        g = torch.Generator().manual_seed(1)
        for p in handle.pairs:
            p.A.copy_(torch.randn(p.A.shape, generator=g) * 0.5)
            p.B.copy_(torch.randn(p.B.shape, generator=g) * 0.5)
    return handle


def reference_eps(A: torch.Tensor, B: torch.Tensor, mA: torch.Tensor, mB: torch.Tensor, s: float,
                  gbar: float | None) -> torch.Tensor:
    v = s * (mB @ A + B @ mA)
    factor = 1.0 if gbar is None else min(10.0, 1.0 / (gbar + 1e-12))
    return -RHO * v / (torch.linalg.norm(v) + 1e-12) * factor


def moment(opt: torch.optim.Optimizer, p: torch.Tensor, key: str) -> torch.Tensor | None:
    state = opt.state.get(p, {})
    return state[key].detach().double().clone() if key in state else None


def run(handle: Any, opt: torch.optim.Optimizer, steps: int, scale: float, key: str = "exp_avg") -> dict[str, Any]:
    """Train with the hooks where the worker calls them; record what the rule needs and what the
    base weights were during the forward pass and at the optimizer step."""
    pairs = handle.pairs
    w0 = [p.base_weight.detach().clone() for p in pairs]
    seen_fwd: list[dict[int, torch.Tensor]] = []  # per step: layer -> base weight its forward read
    seen_at_step: list[list[torch.Tensor]] = []

    def recorder(i: int) -> Any:
        def hook(mod: Any, inputs: Any) -> None:
            seen_fwd[-1][i] = mod.weight.detach().clone()
        return hook

    hooks = [p.layer.get_base_layer().register_forward_pre_hook(recorder(i)) for i, p in enumerate(pairs)]
    opt.register_step_pre_hook(lambda o, a, k: seen_at_step.append([p.base_weight.detach().clone() for p in pairs]))
    log: dict[str, Any] = {"w0": w0, "fwd": seen_fwd, "at_step": seen_at_step, "before": [], "grads": [], "gbar": []}
    for step in range(steps):
        log["before"].append([(p.A.detach().double().clone(), p.B.detach().double().clone(),
                               moment(opt, p.A, key), moment(opt, p.B, key)) for p in pairs])
        seen_fwd.append({})
        handle.on_step_start(step, handle.model)
        loss = handle.model(**batch(step), scale=scale)["loss"]
        handle.before_backward(step, handle.model)
        loss.backward()
        handle.after_backward(step, handle.model)
        log["grads"].append([(p.A.grad.double().clone(), p.B.grad.double().clone()) for p in pairs])
        log["gbar"].append(handle.gbar())
        opt.step()
        opt.zero_grad(set_to_none=True)
    for h in hooks:
        h.remove()
    return log


@pytest.mark.parametrize(("scale", "clamped"), [(1e-3, True), (0.1, False)])
def test_perturbation_and_gbar_follow_the_rule(scale: float, clamped: bool) -> None:
    """Small gradients (gbar < 0.1) hit the clamp at 10; large ones give the factor 1 / gbar."""
    handle = make_handle()
    opt = torch.optim.AdamW(handle.param_groups(handle.model, LR), betas=(0.9, 0.999), weight_decay=0.0)
    steps = 4
    log = run(handle, opt, steps, scale)
    pairs = handle.pairs
    gbar_ref: list[float | None] = [None] * len(pairs)
    for step in range(steps):
        for i, p in enumerate(pairs):
            A, B, mA, mB = log["before"][step][i]
            delta = log["fwd"][step][i].double() - log["w0"][i].double()
            if step == 0:  # the optimizer has no moments yet: not perturbed
                assert mA is None and mB is None
                assert torch.equal(log["fwd"][step][i], log["w0"][i])
            else:
                expected = reference_eps(A, B, mA, mB, p.scaling, gbar_ref[i])
                torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-7)
                v = p.scaling * (mB @ A + B @ mA)
                assert float((delta * v).sum()) < 0  # against the momentum
                inv = 1.0 / gbar_ref[i]  # type: ignore[operator]
                assert (inv > 10.0) == clamped
                norm = float(torch.linalg.norm(delta))
                assert norm == pytest.approx(RHO * (10.0 if clamped else inv), rel=1e-4)
            # restored before the optimizer step, exactly
            assert torch.equal(log["at_step"][step][i], log["w0"][i])
            gA, gB = log["grads"][step][i]  # the gradient at the perturbed point
            g_norm = float(torch.linalg.norm(p.scaling * (gB @ A + B @ gA)))
            prev = gbar_ref[i]
            gbar_ref[i] = g_norm if prev is None else BETA * prev + (1 - BETA) * g_norm
            assert log["gbar"][step][i] == pytest.approx(gbar_ref[i], rel=1e-5)
    for p, w0 in zip(pairs, log["w0"], strict=True):
        assert torch.equal(p.base_weight, w0)


@pytest.mark.parametrize("optim", ["adamw", "sgd"])
def test_factor_is_one_before_the_first_average(optim: str) -> None:
    """Moments exist (two steps outside the hooks) but no gradient norm was averaged yet: the
    factor is 1, so ||eps|| = rho; SGD's momentum buffer serves as the first moment."""
    handle = make_handle()
    groups = handle.param_groups(handle.model, LR)
    opt = (torch.optim.AdamW(groups, weight_decay=0.0) if optim == "adamw"
           else torch.optim.SGD(groups, momentum=0.9))
    for step in range(2):
        handle.model(**batch(step))["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    key = "exp_avg" if optim == "adamw" else "momentum_buffer"
    w0 = [p.base_weight.detach().clone() for p in handle.pairs]
    handle.on_step_start(2, handle.model)  # the step hook found the optimizer by itself
    for p, w in zip(handle.pairs, w0, strict=True):
        A, B = p.A.detach().double(), p.B.detach().double()
        expected = reference_eps(A, B, moment(opt, p.A, key), moment(opt, p.B, key), p.scaling, None)  # type: ignore[arg-type]
        delta = p.base_weight.double() - w.double()
        torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-7)
        assert float(torch.linalg.norm(delta)) == pytest.approx(RHO, rel=1e-4)
    handle.after_backward(2, handle.model)
    assert all(torch.equal(p.base_weight, w) for p, w in zip(handle.pairs, w0, strict=True))


def test_an_optimizer_without_momentum_perturbs_nothing_and_says_so() -> None:
    handle = make_handle()
    opt = torch.optim.SGD(handle.param_groups(handle.model, LR), momentum=0.0)
    w0 = [p.base_weight.detach().clone() for p in handle.pairs]
    handle.model(**batch(0))["loss"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    opt.state[handle.pairs[0].A]["other"] = torch.zeros(1)  # some state, but no first moment
    with pytest.warns(UserWarning, match="no first moment"):
        handle.on_step_start(1, handle.model)
    assert all(torch.equal(p.base_weight, w) for p, w in zip(handle.pairs, w0, strict=True))


def test_hooks_tolerate_closures_and_skipped_restores() -> None:
    """A second after_backward (SAM-style closure) is a no-op; a step that never reached
    after_backward is restored before the next perturbation."""
    handle = make_handle()
    opt = torch.optim.AdamW(handle.param_groups(handle.model, LR))
    run(handle, opt, 2, 1.0)
    w0 = [p.base_weight.detach().clone() for p in handle.pairs]
    handle.on_step_start(2, handle.model)
    assert not torch.equal(handle.pairs[0].base_weight, w0[0])  # perturbed
    handle.on_step_start(3, handle.model)  # no after_backward in between
    assert not torch.equal(handle.pairs[0].base_weight, w0[0])
    handle.after_backward(3, handle.model)
    gbar = handle.gbar()
    handle.after_backward(3, handle.model)
    assert handle.gbar() == gbar
    assert all(torch.equal(p.base_weight, w) for p, w in zip(handle.pairs, w0, strict=True))


def test_a_normal_run_does_not_warn() -> None:
    """AdamW keeps exp_avg: no 'no first moment' warning."""
    handle = make_handle()
    opt = torch.optim.AdamW(handle.param_groups(handle.model, LR))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(handle, opt, 3, 1.0)
