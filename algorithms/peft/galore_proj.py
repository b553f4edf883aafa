"""GaLore's low-rank gradient projection (Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training
by Gradient Low-Rank Projection", Algorithm 2), as OwLore uses it.

Kept here as two small pieces because OwLore needs it before the optimizer family's GaLore
exists: the projector (the SVD of the current gradient, on the smaller side, as GaLore's "std"
projection does) and one Adam step in the projected space. The optimizers family may later
own a shared version; this one is tested against ``galore_torch.GaLoreProjector``.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class LowRankAdamState:
    projector: Projector
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int = 0


@torch.no_grad()
def galore_adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: LowRankAdamState | None,
    *,
    step: int,
    rank: int,
    update_proj_gap: int,
    scale: float,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> LowRankAdamState:
    """One GaLore-Adam update of ``param`` in place; returns the (new) state.

    The projector is recomputed every ``update_proj_gap`` steps; when it changes, the first
    moment is carried into the new subspace (m <- P_new^T P_old m), which galore-torch omits
    (NOTES.md); the second moment is kept as is, as in galore-torch.
    """
    if state is None:
        proj = make_projector(grad, rank)
        low = proj.project(grad)
        state = LowRankAdamState(proj, torch.zeros_like(low), torch.zeros_like(low))
    elif step % update_proj_gap == 0:
        new = make_projector(grad, rank)
        old = state.projector
        if new.side == old.side:
            rot = new.P.mT @ old.P  # r x r change of basis
            state.exp_avg = rot @ state.exp_avg if new.side == "left" else state.exp_avg @ rot.mT
        state.projector = new
    low = state.projector.project(grad)
    b1, b2 = betas
    state.step += 1
    state.exp_avg.mul_(b1).add_(low, alpha=1 - b1)
    state.exp_avg_sq.mul_(b2).addcmul_(low, low, value=1 - b2)
    m_hat = state.exp_avg / (1 - b1**state.step)
    v_hat = state.exp_avg_sq / (1 - b2**state.step)
    update = state.projector.project_back(m_hat / (v_hat.sqrt() + eps)) * scale
    if weight_decay:
        param.mul_(1 - lr * weight_decay)
    param.add_(update.to(param.dtype), alpha=-lr)
    return state
