"""GaLore: gradient low-rank projection (Zhao et al., ICML 2024, arXiv 2403.03507).

For each 2-D parameter the gradient ``G`` is projected on its top-``rank`` singular subspace
(recomputed by SVD every ``update_proj_gap`` steps from the current gradient), Adam runs on the
projected gradient ``R``, and the normalised step is projected back and scaled by ``scale``. Other
parameters (and groups with ``low_rank=False``) get plain Adam.

Hyperparameters and numerics follow the ``galore-torch`` 1.0 package (``GaLoreAdamW``), so that it
runs side by side as the oracle: same names (``rank``, ``update_proj_gap``, ``scale``,
``proj_type``), the subspace refreshed at 0-based steps 0, gap, 2 gap, ..., SVD in float32 of the
gradient, ``eps`` added to ``sqrt(v)`` (not bias-corrected), step ``lr * sqrt(1-beta2^t)/(1-beta1^t)``,
decoupled weight decay applied AFTER the update (``p -= lr * wd * p``), for every parameter.

What we do differently from galore-torch:

- Moments on a subspace change: galore-torch keeps ``m`` and ``v`` as they are, so after a refresh
  they are coordinates in a basis that no longer exists (its issue 54). By default
  (``moments_on_change="project"``) we carry them into the new basis: ``m' = T m`` with ``T`` the
  basis-change matrix ``P_new^T P_old`` and ``v' = (T*T) v`` (see ``projection.transfer_moments_``);
  ``moments_on_change="keep"`` reproduces galore-torch.
- State is plain tensors (``proj``, ``proj_right`` for ``full``) and an int step: a checkpoint
  loads with ``torch.load(weights_only=True)`` (galore-torch stores a projector object).
- ``reverse_std`` picks the side from the parameter's shape once, not from the projected gradient's
  shape at back-projection (galore-torch can pick the wrong side there for some shapes).
- The back-projection is accumulated into the weight with ``addmm_`` (no m x n temporary), and the
  elementwise Adam work runs as foreach kernels over all parameters.
- Which parameters are projected: every 2-D parameter of a group (``low_rank`` defaults to True;
  pass ``{"params": [...], "low_rank": False}`` to keep e.g. embeddings full-rank). galore-torch
  projects only the groups given ``rank``.
"""

from collections.abc import Callable, Iterable
from typing import Any

import torch

from algorithms.optimizers._adam import Item, check_moments_on_change, ensure_moments, run_adam
from algorithms.optimizers.projection import add_back_, galore_side, project, svd_basis, transfer_moments_


class GaLore(torch.optim.Optimizer):
    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, rank: int = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, proj_type: str = "std", moments_on_change: str = "project",
                 low_rank: bool = True) -> None:
        check_moments_on_change(moments_on_change)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                        moments_on_change=moments_on_change, low_rank=low_rank)
        super().__init__(params, defaults)

    def _basis(self, grad: torch.Tensor, group: dict[str, Any], side: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        return svd_basis(grad, group["rank"], side)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            items: list[Item] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                step = int(state.get("step", 0))
                grad = p.grad
                side = None
                if group["low_rank"] and p.dim() == 2:
                    side = galore_side(p.shape, group["proj_type"])
                    if "proj" not in state or step % group["update_proj_gap"] == 0:
                        new = self._basis(grad, group, side)
                        if "proj" in state and group["moments_on_change"] == "project":
                            transfer_moments_(state["exp_avg"], state["exp_avg_sq"], side,
                                              (state["proj"], state.get("proj_right")), new)
                        state["proj"] = new[0]
                        if new[1] is not None:
                            state["proj_right"] = new[1]
                    grad = project(grad, state["proj"], side, state.get("proj_right"))
                ensure_moments(state, grad)
                state["step"] = step + 1
                items.append(Item(p, state, grad, side))
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for it, direction, factor in run_adam(items, beta1=beta1, beta2=beta2, eps=group["eps"],
                                                  eps_scaled=False):
                if it.side is None:
                    it.param.add_(direction, alpha=-lr * factor)
                else:
                    add_back_(it.param, direction, it.state["proj"], it.side, -lr * factor * group["scale"],
                              it.state.get("proj_right"))
            if wd > 0:
                params = [it.param for it in items]
                if params:
                    torch._foreach_add_(params, params, alpha=-lr * wd)
        return loss
