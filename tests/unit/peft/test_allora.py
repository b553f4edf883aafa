"""ALLoRA against a numpy reference written from the rule (module docstring of allora.py):
every row of a LoRA matrix moves with the learning rate lr_row = lr / sqrt(||row||^2 + 1/eta^2),
||row|| taken before the step, for SGD and for Adam(W) (the rate scales the optimizer's update)."""

import copy
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from algorithms.peft.config import ALLoRAConfig
from algorithms.peft.lora import lora_pairs
from algorithms.peft.registry import apply
from tests.unit.peft.helpers import TinyMLP, mlp_batch


def row_rates(p: np.ndarray, lr: float, eta: float) -> np.ndarray:
    """lr / sqrt(||row||^2 + 1/eta^2) for each row, as a column."""
    return lr / np.sqrt((p**2).sum(axis=1, keepdims=True) + 1.0 / eta**2)


def make(eta: float) -> tuple[Any, list[torch.Tensor]]:
    """fc1 adapted (A: 2 x 12, B: 10 x 2) with rows of very different norms, one row of B at 0."""
    torch.manual_seed(0)
    handle = apply("allora", TinyMLP(), r=2, target_modules=["fc1", "fc2"], eta=eta)
    pair = lora_pairs(handle.model)[0]
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        pair.A.copy_(torch.randn(pair.A.shape, generator=g))
        pair.A[0].mul_(5.0 / pair.A[0].norm())
        pair.A[1].mul_(0.2 / pair.A[1].norm())
        pair.B.copy_(torch.randn(pair.B.shape, generator=g) * torch.logspace(-2, 1, pair.B.shape[0])[:, None])
        pair.B[0].zero_()  # B's rows start at 0 in LoRA: rate lr * eta
    return handle, [pair.A, pair.B]


def test_sgd_step_scales_each_row() -> None:
    eta, lr = 2.0, 0.1
    handle, tensors = make(eta)
    pair = lora_pairs(handle.model)[0]
    assert pair.scaling == 1.0 and isinstance(pair.layer.lora_dropout["default"], torch.nn.Identity)
    opt = torch.optim.SGD(handle.param_groups(handle.model, lr))
    before = [t.detach().double().numpy().copy() for t in tensors]
    handle.model(**mlp_batch(0))["loss"].backward()
    grads = [t.grad.double().numpy().copy() for t in tensors]  # type: ignore[union-attr]
    opt.step()
    for t, p0, g in zip(tensors, before, grads, strict=True):
        expected = p0 - row_rates(p0, lr, eta) * g
        np.testing.assert_allclose(t.detach().double().numpy(), expected, rtol=1e-5, atol=1e-8)
    # the zero row of B moved at rate lr * eta (the escape from 0)
    np.testing.assert_allclose(tensors[1].detach()[0].double().numpy(), -lr * eta * grads[1][0], rtol=1e-5)
    # rows of different norms got different rates (one rate per tensor would not)
    rates = row_rates(before[0], lr, eta)
    assert rates[1, 0] / rates[0, 0] > 5
    assert all(g["lr"] == lr for g in opt.param_groups)  # what the schedule and the logs see


def test_adamw_steps_scale_each_row_of_the_update() -> None:
    """Three AdamW steps (decoupled weight decay): each row moves by lr_row times Adam's own
    update direction, written here from Adam's equations."""
    eta, lr, wd, (b1, b2), eps = 1.0, 1e-2, 0.1, (0.9, 0.999), 1e-8
    handle, tensors = make(eta)
    opt = torch.optim.AdamW(handle.param_groups(handle.model, lr), betas=(b1, b2), eps=eps, weight_decay=wd)
    ref = [t.detach().double().numpy().copy() for t in tensors]
    m = [np.zeros_like(p) for p in ref]
    v = [np.zeros_like(p) for p in ref]
    for step in range(1, 4):
        handle.model(**mlp_batch(step))["loss"].backward()
        grads = [t.grad.double().numpy().copy() for t in tensors]  # type: ignore[union-attr]
        opt.step()
        opt.zero_grad(set_to_none=True)
        for k, g in enumerate(grads):
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            direction = (m[k] / (1 - b1**step)) / (np.sqrt(v[k] / (1 - b2**step)) + eps) + wd * ref[k]
            ref[k] = ref[k] - row_rates(ref[k], lr, eta) * direction
            np.testing.assert_allclose(tensors[k].detach().double().numpy(), ref[k], rtol=1e-5, atol=1e-7)


def test_schedule_applies_and_a_restored_optimizer_is_found() -> None:
    lr, eta = 0.2, 1.0
    handle, tensors = make(eta)
    A = tensors[0]
    opt = torch.optim.AdamW(handle.param_groups(handle.model, lr), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** t)  # halves every step

    def unit_step(o: torch.optim.Optimizer) -> np.ndarray:
        before = A.detach().double().numpy().copy()
        for t in tensors:
            t.grad = torch.ones_like(t)
        o.step()
        o.zero_grad(set_to_none=True)
        return A.detach().double().numpy() - before

    for _ in range(2):
        unit_step(opt)
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(lr / 4)
    # a fresh optimizer restored from a checkpoint: the hooks find its new group dicts
    state = copy.deepcopy(opt.state_dict())
    opt2 = torch.optim.AdamW(handle.param_groups(handle.model, lr), weight_decay=0.0)
    opt2.load_state_dict(state)
    p0 = A.detach().double().numpy().copy()
    step = unit_step(opt2)
    # identical gradients every step: Adam's m_hat / sqrt(v_hat) is 1, the step is lr_t * rate
    expected = -row_rates(p0, lr / 4, eta) * np.ones_like(p0)
    np.testing.assert_allclose(step, expected, rtol=1e-4, atol=1e-9)
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr / 4)


def test_allora_refuses_dropout() -> None:
    with pytest.raises(ValidationError, match="dropout-free"):
        ALLoRAConfig(name="allora", dropout=0.1)
