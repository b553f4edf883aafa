"""One GaLore-Adam step on a matrix (Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by
Gradient Low-Rank Projection", Algorithm 2), as OwLore uses it on the sampled layers.

The projection is the optimizer family's (``algorithms/optimizers/projection.py``): GaLore's
"std" side (the longer side is projected away), the top-r singular vectors of the current
gradient, refreshed every ``update_proj_gap`` steps, with Adam's moments carried into the new
basis (galore-torch drops that: NOTES.md). What is here is only the Adam step in the projected
space, on a state that is a plain dict so that it can live in the torch optimizer's ``state[p]``
and be checkpointed with it (``owlore_*`` keys).
"""

from __future__ import annotations

from typing import Any

import torch

from algorithms.optimizers.projection import add_back_, galore_side, project, svd_basis, transfer_moments_

PREFIX = "owlore_"


@torch.no_grad()
def galore_adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, Any],
    *,
    rank: int,
    update_proj_gap: int,
    scale: float,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> None:
    """One GaLore-Adam update of ``param`` in place; ``state`` (a dict, empty at first) is updated:
    W -= lr * (scale * back(m_hat / (sqrt(v_hat) + eps)) + weight_decay * W)."""
    k = PREFIX
    side = galore_side(grad.shape, "std")
    step = int(state.get(k + "step", 0))
    if step == 0:
        P, _ = svd_basis(grad, rank, side)
        low = project(grad, P, side)
        state[k + "exp_avg"] = torch.zeros_like(low, dtype=torch.float32)
        state[k + "exp_avg_sq"] = torch.zeros_like(low, dtype=torch.float32)
    elif step % update_proj_gap == 0:
        old = state[k + "P"]
        P, _ = svd_basis(grad, rank, side)
        transfer_moments_(state[k + "exp_avg"], state[k + "exp_avg_sq"], side, (old.float(), None),
                          (P.float(), None))
    else:
        P = state[k + "P"]
    state[k + "P"] = P
    low = project(grad, P, side).float()
    b1, b2 = betas
    step += 1
    state[k + "step"] = step
    m, v = state[k + "exp_avg"], state[k + "exp_avg_sq"]
    m.mul_(b1).add_(low, alpha=1 - b1)
    v.mul_(b2).addcmul_(low, low, value=1 - b2)
    direction = (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps)
    if weight_decay:
        param.mul_(1 - lr * weight_decay)
    add_back_(param, direction.to(param.dtype), P, side, alpha=-lr * scale)
