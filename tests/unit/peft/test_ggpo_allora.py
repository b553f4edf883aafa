"""LoRA-GGPO (perturb, restore, step = manual computation) and ALLoRA (step ~ 1/norm)."""

import copy
import math
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from algorithms.peft.config import ALLoRAConfig
from algorithms.peft.lora import lora_pairs
from algorithms.peft.registry import apply
from tests.unit.peft.helpers import TinyMLP, hooked_step, mlp_batch


def _sgd(params: list[torch.nn.Parameter], lr: float) -> None:
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)
                p.grad = None


class ThreeLayer(torch.nn.Module):
    """fc1 and fc2 have the same shape (one GGPO group), fc3 another."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(10, 10), torch.nn.Linear(10, 10), torch.nn.Linear(10, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x[:, :10])))))
        return {"loss": ((out - labels) ** 2).mean()}


def test_ggpo_step_matches_manual_computation() -> None:
    torch.manual_seed(0)
    rho, beta, seed, lr = 0.2, 0.5, 3, 0.1
    handle = apply("lora_ggpo", ThreeLayer(), r=2, alpha=4.0, target_modules=["fc1", "fc2", "fc3"],
                   rho=rho, beta=beta, seed=seed)
    with torch.no_grad():
        for p in handle.pairs:  # type: ignore[attr-defined]
            p.B.normal_(0, 0.3)
    ref = copy.deepcopy(handle.model)
    originals = [p.base_weight.detach().clone() for p in handle.pairs]  # type: ignore[attr-defined]

    opt = torch.optim.SGD(handle.param_groups(handle.model, lr))
    for step in range(3):
        hooked_step(handle, opt, step, mlp_batch(step))

    # independent re-computation of the rule in the module docstring: W' formed explicitly,
    # noise drawn per group of same-shape layers (module order), one call per group
    gen = torch.Generator().manual_seed(seed)
    pairs = lora_pairs(ref)
    groups = [[0, 1], [2]]
    prev: list[Any] = [None] * len(pairs)
    trainable = [p for p in ref.parameters() if p.requires_grad]
    for step in range(3):
        saved = [p.base_weight.clone() for p in pairs]
        with torch.no_grad():
            for grp in groups:
                stds = []
                for i in grp:
                    p, g = pairs[i], prev[i]
                    merged = p.base_weight + p.scaling * p.B @ p.A
                    var = merged.pow(2).sum(1)
                    if g is not None:
                        var = (1 - beta) * var + beta * g.pow(2).sum(1) * merged.pow(2).sum() / g.pow(2).sum()
                    stds.append((var * rho**2 / merged.shape[1]).sqrt())
                m, n = pairs[grp[0]].base_weight.shape
                noise = torch.randn((len(grp), m, n), generator=gen)
                for k, i in enumerate(grp):
                    pairs[i].base_weight.add_(noise[k] * stds[k][:, None])
        ref(**mlp_batch(step))["loss"].backward()
        with torch.no_grad():
            for p, w in zip(pairs, saved, strict=True):
                p.base_weight.copy_(w)
        prev = [p.B.grad.clone() / p.scaling for p in pairs if p.B.grad is not None]
        _sgd(trainable, lr)

    for a, b in zip(handle.model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for p, w0 in zip(handle.pairs, originals, strict=True):  # type: ignore[attr-defined]
        assert torch.equal(p.base_weight, w0)  # perturbation removed exactly


def test_ggpo_perturbation_is_present_during_forward() -> None:
    torch.manual_seed(0)
    handle = apply("lora_ggpo", TinyMLP(), r=2, target_modules=["fc1"], rho=0.5)
    w0 = handle.pairs[0].base_weight.detach().clone()  # type: ignore[attr-defined]
    handle.on_step_start(0, handle.model)
    delta = handle.pairs[0].base_weight - w0  # type: ignore[attr-defined]
    assert float(delta.abs().max()) > 0
    handle.after_backward(0, handle.model)
    assert torch.equal(handle.pairs[0].base_weight, w0)  # type: ignore[attr-defined]


def test_ggpo_hooks_tolerate_closures_and_skipped_restores() -> None:
    """A second after_backward (SAM-style closure) is a no-op; a step that never reached
    after_backward is restored before the next perturbation."""
    torch.manual_seed(0)
    handle = apply("lora_ggpo", TinyMLP(), r=2, target_modules=["fc1"], rho=0.5)
    w0 = handle.pairs[0].base_weight.detach().clone()  # type: ignore[attr-defined]
    handle.on_step_start(0, handle.model)
    handle.on_step_start(1, handle.model)  # no after_backward in between
    handle.after_backward(1, handle.model)
    handle.after_backward(1, handle.model)
    assert torch.equal(handle.pairs[0].base_weight, w0)  # type: ignore[attr-defined]


def _allora_step(handle: Any, opt: torch.optim.Optimizer, tensor: torch.Tensor) -> torch.Tensor:
    handle.on_step_start(0, handle.model)
    before = tensor.detach().clone()
    tensor.grad = torch.ones_like(tensor)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return tensor.detach() - before


def test_allora_step_is_inverse_to_norm() -> None:
    torch.manual_seed(0)
    eta, lr = 2.0, 0.5
    handle = apply("allora", TinyMLP(), r=2, target_modules=["fc1", "fc2"], eta=eta)
    pair = lora_pairs(handle.model)[0]
    assert pair.scaling == 1.0 and isinstance(pair.layer.lora_dropout["default"], torch.nn.Identity)
    groups = handle.param_groups(handle.model, lr)
    opt = torch.optim.SGD(groups)
    steps = {}
    for norm in (5.0, 10.0, 40.0):
        with torch.no_grad():
            pair.A.mul_(norm / pair.A.norm())
        step = _allora_step(handle, opt, pair.A)
        expected = lr / math.sqrt(norm**2 + 1 / eta**2)
        torch.testing.assert_close(step, -expected * torch.ones_like(step))
        steps[norm] = float(step.abs().max())
    assert steps[5.0] / steps[10.0] == pytest.approx(2.0, rel=1e-2)
    assert steps[10.0] / steps[40.0] == pytest.approx(4.0, rel=2e-3)  # 1/norm, up to the 1/eta^2 term
    # a zero tensor (B at init) gets the bounded rate lr * eta
    step_b = _allora_step(handle, opt, pair.B)
    torch.testing.assert_close(step_b, torch.full_like(step_b, -lr * eta))
    # outside the step every group shows the plain lr (what the schedule and the logs see)
    assert all(g["lr"] == lr for g in opt.param_groups)


def test_allora_keeps_the_schedule_and_survives_a_restore() -> None:
    torch.manual_seed(0)
    lr, eta = 0.2, 1.0
    handle = apply("allora", TinyMLP(), r=2, target_modules=["fc1"], eta=eta)
    pair = lora_pairs(handle.model)[0]
    opt = torch.optim.AdamW(handle.param_groups(handle.model, lr), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** t)  # halves every step
    for _ in range(2):
        _allora_step(handle, opt, pair.A)
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(lr / 4)
    # a fresh optimizer restored from a checkpoint: the hooks find its new group dicts
    state = copy.deepcopy(opt.state_dict())
    opt2 = torch.optim.AdamW(handle.param_groups(handle.model, lr), weight_decay=0.0)
    opt2.load_state_dict(state)
    norm = float(pair.A.detach().norm())
    step = _allora_step(handle, opt2, pair.A)
    # Adam's step after a few identical gradients is ~lr_t in size (m_hat / sqrt(v_hat) = 1)
    expected = (lr / 4) / math.sqrt(norm**2 + 1 / eta**2)
    torch.testing.assert_close(step, torch.full_like(step, -expected), rtol=1e-3, atol=1e-7)
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr / 4)


def test_allora_refuses_dropout() -> None:
    with pytest.raises(ValidationError, match="dropout-free"):
        ALLoRAConfig(name="allora", dropout=0.1)
