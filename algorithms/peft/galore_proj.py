"""GaLore's low-rank gradient projection (Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training
by Gradient Low-Rank Projection", Algorithm 2), as OwLore uses it.

Kept here, small, because OwLore needs it and the optimizer family's GaLore did not exist when
this was written; the optimizers family may later own a shared version. Two pieces: the
projector (the SVD of the current gradient, on the smaller side, as GaLore's "std" projection
does; tested against ``galore_torch.GaLoreProjector``) and one Adam step in the projected space.

The state of one matrix is a plain dict of tensors and numbers, so that it can live in the
torch optimizer's ``state[p]`` and be checkpointed with it (``owlore_*`` keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Projector:
    """``side == 'left'``: low = P^T G (P: m x r); ``'right'``: low = G P (P: n x r)."""

    P: torch.Tensor
    side: str

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        return self.P.mT @ grad if self.side == "left" else grad @ self.P

    def project_back(self, low: torch.Tensor) -> torch.Tensor:
        return self.P @ low if self.side == "left" else low @ self.P.mT


@torch.no_grad()
def make_projector(grad: torch.Tensor, rank: int) -> Projector:
    """Top-``rank`` singular vectors of ``grad`` on its smaller side (GaLore's "std" type)."""
    g = grad.float()
    U, _, Vh = torch.linalg.svd(g, full_matrices=False)
    if g.shape[0] >= g.shape[1]:
        return Projector(Vh[:rank].mT.contiguous().to(grad.dtype), "right")
    return Projector(U[:, :rank].contiguous().to(grad.dtype), "left")


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
    """One GaLore-Adam update of ``param`` in place; ``state`` (a dict, empty at first) is updated.

    The projector is recomputed every ``update_proj_gap`` steps of this state; when it changes,
    the first moment is carried into the new subspace (m <- P_new^T P_old m), which galore-torch
    omits (NOTES.md); the second moment is kept as is, as in galore-torch.
    """
    k = PREFIX
    step = int(state.get(k + "step", 0))
    if step == 0:
        proj = make_projector(grad, rank)
        low = proj.project(grad)
        state[k + "exp_avg"] = torch.zeros_like(low, dtype=torch.float32)
        state[k + "exp_avg_sq"] = torch.zeros_like(low, dtype=torch.float32)
    else:
        proj = Projector(state[k + "P"], state[k + "side"])
        if step % update_proj_gap == 0:
            new = make_projector(grad, rank)
            if new.side == proj.side:
                rot = (new.P.mT @ proj.P).float()  # r x r change of basis
                m = state[k + "exp_avg"]
                state[k + "exp_avg"] = rot @ m if new.side == "left" else m @ rot.mT
            proj = new
    state[k + "P"], state[k + "side"] = proj.P, proj.side
    low = proj.project(grad).float()
    b1, b2 = betas
    step += 1
    state[k + "step"] = step
    m, v = state[k + "exp_avg"], state[k + "exp_avg_sq"]
    m.mul_(b1).add_(low, alpha=1 - b1)
    v.mul_(b2).addcmul_(low, low, value=1 - b2)
    m_hat = m / (1 - b1**step)
    v_hat = v / (1 - b2**step)
    update = proj.project_back((m_hat / (v_hat.sqrt() + eps)).to(proj.P.dtype)) * scale
    if weight_decay:
        param.mul_(1 - lr * weight_decay)
    param.add_(update.to(param.dtype), alpha=-lr)
