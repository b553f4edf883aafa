"""Adam's moment update and normalised direction on lists of tensors (foreach kernels).

``adam_directions`` updates ``m`` and ``v`` in place and returns ``d = m / (sqrt(v) + eps')`` and the
step factor ``c = sqrt(1 - beta2^t) / (1 - beta1^t)``, so that Adam's step is ``-lr * c * d``.

Two conventions for where ``eps`` sits, both used by the references we match:

- ``eps_scaled=False``: ``eps' = eps`` (galore-torch's and transformers' AdamW);
- ``eps_scaled=True``: ``eps' = eps * sqrt(1 - beta2^t)``, which is exactly torch's AdamW
  ``(m / bc1) / (sqrt(v / bc2) + eps)`` (and DCTAdamW).
"""

import math
from dataclasses import dataclass
from typing import Any

import torch

from algorithms.optimizers.projection import Side


def adam_directions(exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], grads: list[torch.Tensor],
                    *, beta1: float, beta2: float, eps: float, step: int,
                    eps_scaled: bool) -> tuple[list[torch.Tensor], float]:
    if not grads:
        return [], 0.0
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    bc1 = 1.0 - beta1**step
    sqrt_bc2 = math.sqrt(1.0 - beta2**step)
    directions = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(directions, eps * sqrt_bc2 if eps_scaled else eps)
    torch._foreach_reciprocal_(directions)
    torch._foreach_mul_(directions, exp_avgs)
    return list(directions), sqrt_bc2 / bc1


def check_moments_on_change(value: str) -> None:
    """What the projected optimizers do with their moments when the subspace changes."""
    if value not in ("project", "keep"):
        raise ValueError(f"moments_on_change must be 'project' or 'keep', not {value!r}")


def decayed_params(group: dict[str, Any]) -> list[Any]:
    """The group's parameters that have a gradient (``p.grad`` set), after decoupled weight decay."""
    params = [p for p in group["params"] if p.grad is not None]
    lr, wd = group["lr"], group["weight_decay"]
    if wd > 0 and params:
        torch._foreach_mul_(params, 1 - lr * wd)
    return params


def ensure_moments(state: dict[str, Any], like: torch.Tensor) -> None:
    """Zero Adam moments shaped like ``like`` (the gradient in the moments' coordinates), once."""
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(like)
        state["exp_avg_sq"] = torch.zeros_like(like)


@dataclass
class Item:
    """One parameter's share of a step: its gradient in the coordinates its moments live in."""

    param: torch.Tensor
    state: dict[str, Any]
    grad: torch.Tensor
    side: Side | None  # None: a full-rank (plain Adam) parameter


def by_step(items: list[Item]) -> dict[int, list[Item]]:
    """Group items by their (1-based) step so that each group shares one bias correction."""
    out: dict[int, list[Item]] = {}
    for item in items:
        out.setdefault(int(item.state["step"]), []).append(item)
    return out


def run_adam(items: list[Item], *, beta1: float, beta2: float, eps: float,
             eps_scaled: bool) -> list[tuple[Item, torch.Tensor, float]]:
    """Adam on every item (grouped by step); returns ``(item, direction, step factor)``."""
    out: list[tuple[Item, torch.Tensor, float]] = []
    for step, group in by_step(items).items():
        dirs, factor = adam_directions([it.state["exp_avg"] for it in group],
                                       [it.state["exp_avg_sq"] for it in group],
                                       [it.grad for it in group],
                                       beta1=beta1, beta2=beta2, eps=eps, step=step, eps_scaled=eps_scaled)
        out.extend((it, d, factor) for it, d in zip(group, dirs, strict=True))
    return out
