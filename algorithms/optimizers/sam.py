"""SAM: sharpness-aware minimisation (Foret, Kleiner, Mobahi, Neyshabur; ICLR 2021), the two-pass
baseline that AdaZo-SAM claims to match at half the cost.

With the loop's closure ``forward_backward(backward: bool) -> loss``: a forward-backward at ``theta``
gives ``g``; the weights move to ``theta + rho g / ||g||`` (norm over all parameters); a second
forward-backward there gives the gradient the base optimizer (``sgd`` with ``momentum``, or
``adamw``) steps with, after the perturbation is removed (subtracted: no copy of the weights).
Two backward passes per step. Returns the loss at ``theta``.

``rho`` is read per parameter group (the optimizer's ``rho`` unless a group sets its own), as torch
optimizers read ``lr``: group ``k`` moves by ``rho_k g_k / ||g||``. The norm stays the global one
over all parameters, as in Foret et al.'s ``e_w = rho g / ||g||``, so with a single ``rho`` this is
exactly their rule; a group's perturbation then has length ``rho_k ||g_k|| / ||g||``, not ``rho_k``.
"""

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

Closure = Callable[..., torch.Tensor]


class SAM(torch.optim.Optimizer):
    needs_closure = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, rho: float = 0.05, base: str = "sgd",
                 momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, rho=rho, weight_decay=weight_decay))
        if base == "sgd":
            self.base: torch.optim.Optimizer = torch.optim.SGD(self.param_groups, lr=lr, momentum=momentum,
                                                               weight_decay=weight_decay)
        elif base == "adamw":
            self.base = torch.optim.AdamW(self.param_groups, lr=lr, weight_decay=weight_decay)
        else:
            raise ValueError(f"SAM base must be 'sgd' or 'adamw', not {base!r}")
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self.partitioned = False  # set by PartitionedOptimizer: sum the gradient norm over ranks
        self.partition_group: Any = None
        self.process_group: Any = None

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict)
        # torch replaces the base's group dicts: share them again, or an LR scheduler (or a per-group
        # rho) set on this optimizer after a resume would no longer reach the base optimizer
        self.param_groups = self.base.param_groups
        self.state = self.base.state

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        if closure is None:
            raise RuntimeError("SAM needs the closure forward_backward(backward: bool) -> loss")
        with torch.enable_grad():
            loss = closure(backward=True)
        pairs = [(p, g["rho"]) for g in self.param_groups for p in g["params"] if p.grad is not None]
        params = [p for p, _ in pairs]
        grads = [p.grad for p in params]
        device = self.param_groups[0]["params"][0].device
        sq = sum((n.double().square() for n in torch._foreach_norm(grads)), torch.zeros((), device=device,
                                                                                        dtype=torch.float64))
        if self.partitioned:
            dist.all_reduce(sq, group=self.partition_group)
        inv_norm = 1.0 / (sq.sqrt() + 1e-12)
        eps = [g * (rho * inv_norm).to(g.dtype) for g, (_, rho) in zip(grads, pairs, strict=True)]
        if params:
            torch._foreach_add_(params, eps)
        with torch.enable_grad():
            closure(backward=True)
        if params:
            torch._foreach_sub_(params, eps)
        self.base.step()
        return loss
