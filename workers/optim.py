"""Build the spec's optimizer from the registry and take one optimizer step.

Optimizers that need extra forward passes (``needs_closure``: AdaZo-SAM, LORENZA, SAM) get the
loop's ``forward_backward(backward: bool)`` closure and call it themselves (gradient clipping is
applied after each of its backward passes).
"""

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from service.spec import ExperimentSpec

Closure = Callable[..., torch.Tensor]


def build_optimizer(spec: ExperimentSpec, model: nn.Module, peft_handle: Any = None) -> torch.optim.Optimizer:
    from algorithms.optimizers.registry import OPTIMIZERS

    assert spec.optimizer is not None
    if peft_handle is not None:
        params: Any = peft_handle.param_groups(model, spec.optimizer.lr)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    return OPTIMIZERS.build(spec.optimizer, params)


def optimizer_step(optimizer: Any, forward_backward: Closure, *, model: nn.Module, scaler: Any,
                   grad_clip: float | None, engine: Any = None) -> torch.Tensor:
    """One optimizer step; returns the (accumulated) loss of the batch."""
    if engine is not None:
        return engine.step(forward_backward)  # type: ignore[no-any-return]
    if getattr(optimizer, "needs_closure", False):  # the spec refuses fp16 (a loss scaler) for these

        def closure(backward: bool = True) -> torch.Tensor:
            loss = forward_backward(backward)
            if backward and grad_clip:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
            return loss

        return optimizer.step(closure)  # type: ignore[no-any-return]
    loss = forward_backward(True)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss
