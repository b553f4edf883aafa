"""AdaZo-SAM: Adam + sharpness-aware minimisation whose ascent direction is a stochastic
zeroth-order estimate (Refael, Arbel, Lindenbaum, Tirer; arXiv 2502.19571, TMLR 2026).

One step (``zeroth_order.ZerothOrderSAM``): Gaussian directions over all parameters, two forward
passes each, ``eps = rho g_zo / ||g_zo||``, one forward-backward at ``theta + eps``, then AdamW on
that gradient (torch's AdamW numerics: bias-corrected moments, ``eps`` after the bias correction,
decoupled weight decay ``p *= 1 - lr wd`` first). ``rho`` and ``mu`` may be set per parameter group
(``zeroth_order`` gives the rule: each group probes with its own ``mu`` and is perturbed by its own
``rho`` over the norm of the whole estimate).

Which text this follows: the paper's abstract (single gradient per iteration, ZO estimate of SAM's
ascent perturbation, Adam). The algorithm boxes of the arXiv/TMLR versions could not be read here
(only their abstracts were reachable); two third-party summaries were, and they agree on the
symmetric two-point estimate with Gaussian probes and on Adam on the perturbed gradient, which is
what this implements. Both write the estimate with a leading minus sign; we use the sign that makes
it estimate the gradient (the ascent direction SAM needs), which is what the tests check.
"""

from collections.abc import Iterable
from typing import Any

from algorithms.optimizers._adam import Item, decayed_params, ensure_moments, run_adam
from algorithms.optimizers.zeroth_order import Target, ZerothOrderSAM, full_space_targets


class AdaZoSAM(ZerothOrderSAM):
    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, rho: float = 0.05, mu: float = 1e-3,
                 n_directions: int = 1, seed: int | None = None) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rho=rho, mu=mu,
                        n_directions=n_directions)
        super().__init__(params, defaults, seed)

    def targets(self) -> list[Target] | None:
        return full_space_targets(self.param_groups)

    def update(self) -> None:
        for group in self.param_groups:
            lr = group["lr"]
            params = decayed_params(group)
            items = []
            for p in params:
                state = self.state[p]
                ensure_moments(state, p)
                state["step"] = int(state.get("step", 0)) + 1
                items.append(Item(p, state, p.grad, None))
            beta1, beta2 = group["betas"]
            for it, direction, factor in run_adam(items, beta1=beta1, beta2=beta2, eps=group["eps"], eps_scaled=True):
                it.param.add_(direction, alpha=-lr * factor)
