"""LORENZA (and LORENZA+): low-rank, memory-efficient AdaZo-SAM (Refael, Arbel, Lindenbaum, Tirer;
arXiv 2502.19571, TMLR 2026 "Lorenza: Enhancing Generalization in Low-Rank Gradient LLM Training via
Efficient Zeroth-Order Adaptive SAM").

Per 2-D parameter, Adam runs in a rank-``rank`` subspace of the gradient (GaLore's scheme: project
one side, ``std`` side choice), and the subspace comes from a randomized SVD (range finder with
``oversampling`` extra columns and ``power_iters`` power iterations, then the SVD of the small
sketch) every ``update_proj_gap`` steps. The SAM perturbation is found by zeroth-order probes that
live in the same subspace: a direction is ``lift(Z)`` with ``Z`` Gaussian in the projected
coordinates (``P^T``-side shape), so the estimate ``(1/n) sum_j c_j lift(Z_j)`` converges to the
gradient's projection on the subspace, ``lift(project(G))``; 1-D parameters are probed in full.
Then one forward-backward at ``theta + eps``, the gradient is projected, Adam (torch's AdamW
numerics, decoupled weight decay first) and the step lifted back and scaled by ``scale``.

``rho`` and ``mu`` are per parameter group (``zeroth_order`` gives the rule). Exactly one backward
per step. The subspace is refreshed from the gradient of that backward pass (taken at the perturbed
point, the only gradient a step has); the very first step has no subspace to probe in yet, so it
takes an unperturbed gradient (no probes) and builds the subspaces from it.
On a refresh the moments are carried into the new basis (``moments_on_change="project"``, see
``projection.transfer_moments_``) or kept (``"keep"``).

LORENZA+ (``plus=True``): the component of the gradient outside the subspace, ``G - lift(R)``, which
plain LORENZA discards, is added to the step, scaled per matrix by ``||Adam step of R|| / ||R||`` so
that it moves at the adaptive step's rate; this needs no state (it uses the gradient buffer in
place) and one extra matmul.

Which text this follows: the paper's abstracts (arXiv v1 and the TMLR version: ZO estimate of SAM's
ascent, randomized-SVD projection, memory of gradient-low-rank methods; Lorenza+ adds the discarded
orthogonal component at no extra memory). The algorithm boxes themselves could not be read from
here; two third-party summaries could, and they disagree on the probe shape (``Q diag(u) Q^T`` vs
``Q diag(u) R``): we use a full Gaussian in the projected coordinates, which is unbiased for the
projected gradient. How Lorenza+ scales the orthogonal component is our choice (the norm ratio of
Fira, Chen et al. 2024), stated as such.
"""

from collections.abc import Iterable
from typing import Any

import torch

from algorithms.optimizers._adam import Item, check_moments_on_change, decayed_params, ensure_moments, run_adam
from algorithms.optimizers.projection import (
    Side,
    add_back_,
    galore_side,
    project,
    randomized_svd_basis,
    transfer_moments_,
)
from algorithms.optimizers.zeroth_order import Target, ZerothOrderSAM, full_space_target


class Lorenza(ZerothOrderSAM):
    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, rank: int = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, oversampling: int = 8, power_iters: int = 1, plus: bool = False,
                 rho: float = 0.05, mu: float = 1e-3, n_directions: int = 1, moments_on_change: str = "project",
                 low_rank: bool = True, seed: int | None = None) -> None:
        check_moments_on_change(moments_on_change)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale, oversampling=oversampling,
                        power_iters=power_iters, plus=plus, rho=rho, mu=mu, n_directions=n_directions,
                        moments_on_change=moments_on_change, low_rank=low_rank)
        super().__init__(params, defaults, seed)

    @staticmethod
    def side(p: torch.Tensor, group: dict[str, Any]) -> Side | None:
        return galore_side(p.shape, "std") if group["low_rank"] and p.dim() == 2 else None

    def targets(self) -> list[Target] | None:
        out: list[Target] = []
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                side = self.side(p, group)
                if side is None:
                    out.append(full_space_target(p, group))
                    continue
                state = self.state[p]
                if "proj" not in state:
                    return None  # first step: no subspace to probe in yet
                proj = state["proj"]
                low_shape = (p.shape[0], proj.shape[0]) if side == "right" else (proj.shape[1], p.shape[1])
                out.append(Target(p, torch.Size(low_shape), self._lift(p, state, side), group["rho"], group["mu"]))
        return out

    @staticmethod
    def _lift(p: torch.Tensor, state: dict[str, Any], side: Side) -> Any:
        def apply_(d: torch.Tensor, alpha: float) -> None:
            add_back_(p, d, state["proj"], side, alpha)
        return apply_

    def update(self) -> None:
        step_no = int(self.param_groups[0]["zo_step"])
        for group in self.param_groups:
            lr = group["lr"]
            params = decayed_params(group)
            items: list[Item] = []
            for p in params:
                state = self.state[p]
                step = int(state.get("step", 0))
                grad = p.grad
                side = self.side(p, group)
                if side is not None:
                    if "proj" not in state or step % group["update_proj_gap"] == 0:
                        new = randomized_svd_basis(grad, group["rank"], side, oversampling=group["oversampling"],
                                                   power_iters=group["power_iters"],
                                                   generator=self._generator(p, step_no, -1))
                        if "proj" in state and group["moments_on_change"] == "project":
                            transfer_moments_(state["exp_avg"], state["exp_avg_sq"], side, (state["proj"], None), new)
                        state["proj"] = new[0]
                    grad = project(grad, state["proj"], side)
                ensure_moments(state, grad)
                state["step"] = step + 1
                items.append(Item(p, state, grad, side))
            beta1, beta2 = group["betas"]
            for it, direction, factor in run_adam(items, beta1=beta1, beta2=beta2, eps=group["eps"], eps_scaled=True):
                if it.side is None:
                    it.param.add_(direction, alpha=-lr * factor)
                    continue
                alpha = -lr * group["scale"]
                add_back_(it.param, direction, it.state["proj"], it.side, alpha * factor)
                if group["plus"]:
                    self._add_orthogonal_(it, direction, factor, alpha)

    @staticmethod
    def _add_orthogonal_(it: Item, direction: torch.Tensor, factor: float, alpha: float) -> None:
        """LORENZA+: ``p += alpha * phi * (G - lift(R))`` with ``phi = ||factor * direction|| / ||R||``,
        computed in the gradient buffer (no m x n temporary)."""
        grad = it.param.grad
        assert grad is not None
        phi = (direction.norm() * factor / it.grad.norm().clamp_min(1e-30)).to(grad.dtype)
        add_back_(grad, it.grad, it.state["proj"], it.side, -1.0)  # type: ignore[arg-type]
        it.param.addcmul_(grad, phi, value=alpha)
