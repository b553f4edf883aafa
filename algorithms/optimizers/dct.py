"""SVD-free low-rank Adam with a DCT basis (Modoranu, Safaryan, Schultheis, Alistarh; arXiv 2505.17967,
"SVD-Free Low-Rank Adaptive Gradient Optimization for LLMs", later "FFT-based Dynamic Subspace
Selection").

Instead of an SVD, every 2-D parameter uses a fixed orthonormal basis: the columns of the n x n
DCT-II matrix ``C`` (``projection.dct_matrix``), built once per size and shared by all parameters of
that size. Every ``update_proj_gap`` steps the gradient's coefficients on all basis vectors are
computed with one matmul (``S = G C`` for a tall or square ``G``, projecting rows; ``S = C^T G``
for a wide one, projecting columns), and the ``rank`` basis vectors whose coefficient vectors have
the largest L1 norm (``selection_norm``) are kept: only their indices are stored. In between, the
gradient is projected on the kept vectors, Adam runs on the low-rank coefficients and the step is
mapped back with the same vectors and scaled by ``scale``. 1-D parameters get plain AdamW.

Matches the authors' ``DCTAdamW`` (``ista-daslab-optimizers`` 1.1.15, ``fft_low_rank/dct_adamw.py``,
``proj="dct"``, ``sim_type="matmul"``, ``ell_norm=1``, ``use_ef=False``): basis orientation, L1
column-norm selection, subspace chosen at steps 1, gap, 2 gap, ... (1-based), Adam with
``u = m / (sqrt(v) + eps sqrt(1-beta2^t))`` and step ``lr sqrt(1-beta2^t)/(1-beta1^t)`` (torch's AdamW),
decoupled weight decay applied first, and DCTAdamW's default ``update_proj_gap=1``: a new selection
every step. A selection costs, per matrix, the full coefficient matmul ``G C`` (n x n, where the
projection alone is n x rank), a top-k and the moment matching, so a larger gap makes steps cheaper
for an older subspace (the timings in bench/RESULTS.md use gaps of 100 and 200). Differences:

- Moments on a subspace change (``moments_on_change="project"``, the default): each moment slot
  follows its basis vector; vectors that stay selected keep their moments, newly selected ones start
  at zero. This is what ``DCTAdamW(rotate_subspace=True)`` computes (its rotation ``Q_old^T Q_new`` is
  this 0/1 matching matrix up to rounding); we apply the matching exactly. ``"keep"`` leaves the
  slots as they are, i.e. slot i's moments continue with whichever vector is now i-th; DCTAdamW's
  default (``rotate_subspace=False``) does that with ``topk(sorted=False)`` order, we store indices
  sorted, so the two "keep" variants are not comparable step for step after a change.
- One DCT matrix per parameter size (DCTAdamW builds one, from the first parameter's size).
- Every 2-D parameter is projected (DCTAdamW keeps parameters with a dimension >= ``max_shape``,
  32000 by default, e.g. embeddings, full-rank); opt a group out with ``low_rank=False``.
- The subspace schedule counts each parameter's own steps (DCTAdamW counts optimizer steps; equal
  when every parameter has a gradient at every step).
"""

from collections.abc import Callable, Iterable
from typing import Any

import torch

from algorithms.optimizers._adam import Item, check_moments_on_change, decayed_params, ensure_moments, run_adam
from algorithms.optimizers.projection import dct_matrix


class DCT(torch.optim.Optimizer):
    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, rank: int = 128, update_proj_gap: int = 1,
                 scale: float = 1.0, moments_on_change: str = "project", selection_norm: float = 1.0,
                 low_rank: bool = True) -> None:
        check_moments_on_change(moments_on_change)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale, moments_on_change=moments_on_change,
                        selection_norm=selection_norm, low_rank=low_rank)
        super().__init__(params, defaults)
        self._bases: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():  # torch casts every state tensor to the parameter's dtype
            if "indices" in state:
                state["indices"] = state["indices"].long()

    def basis(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The shared n x n DCT matrix whose columns are the basis vectors."""
        key = (n, dtype, device)
        if key not in self._bases:
            self._bases[key] = dct_matrix(n, dtype, device)
        return self._bases[key]

    @staticmethod
    def rows_projected(p: torch.Tensor) -> bool:
        """Tall or square matrices have their rows projected (basis of size n), wide ones their columns."""
        return p.shape[0] >= p.shape[1]

    def select(self, grad: torch.Tensor, rank: int, norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Coefficients of ``grad`` on every basis vector, and the sorted indices of the ``rank`` vectors
        with the largest coefficient norms. Returns ``(indices, low-rank coefficients)``."""
        rows = self.rows_projected(grad)
        q = self.basis(grad.shape[1] if rows else grad.shape[0], grad.dtype, grad.device)
        coeffs = grad @ q if rows else q.mT @ grad
        norms = coeffs.norm(p=norm, dim=0 if rows else 1)
        idx = torch.topk(norms, min(rank, norms.numel()), sorted=False).indices.sort().values
        return idx, coeffs.index_select(1 if rows else 0, idx)

    def _vectors(self, p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        rows = self.rows_projected(p)
        q = self.basis(p.shape[1] if rows else p.shape[0], p.dtype, p.device)
        return q.index_select(1, idx)  # size x r

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"]
            params = decayed_params(group)
            items: list[Item] = []
            for p in params:
                state = self.state[p]
                step = int(state.get("step", 0)) + 1
                grad = p.grad
                side = None
                if group["low_rank"] and p.dim() == 2:
                    side = "right" if self.rows_projected(p) else "left"
                    if "indices" not in state or step == 1 or step % group["update_proj_gap"] == 0:
                        idx, grad = self.select(grad, group["rank"], group["selection_norm"])
                        if "indices" in state and group["moments_on_change"] == "project":
                            self._follow(state, idx, side)
                        state["indices"] = idx
                    else:
                        vecs = self._vectors(p, state["indices"])
                        grad = grad @ vecs if side == "right" else vecs.mT @ grad
                ensure_moments(state, grad)
                state["step"] = step
                items.append(Item(p, state, grad, side))  # type: ignore[arg-type]
            beta1, beta2 = group["betas"]
            for it, direction, factor in run_adam(items, beta1=beta1, beta2=beta2, eps=group["eps"],
                                                  eps_scaled=True):
                alpha = -lr * factor
                if it.side is None:
                    it.param.add_(direction, alpha=alpha)
                    continue
                vecs = self._vectors(it.param, it.state["indices"])
                if it.side == "right":
                    it.param.addmm_(direction, vecs.mT, alpha=alpha * group["scale"])
                else:
                    it.param.addmm_(vecs, direction, alpha=alpha * group["scale"])
        return loss

    @staticmethod
    def _follow(state: dict[str, Any], new_idx: torch.Tensor, side: str) -> None:
        """Move each moment slot to where its basis vector now sits; new vectors start at zero."""
        match = (state["indices"][:, None] == new_idx[None, :]).to(state["exp_avg"].dtype)  # old x new
        for key in ("exp_avg", "exp_avg_sq"):
            state[key].copy_(state[key] @ match if side == "right" else match.mT @ state[key])
