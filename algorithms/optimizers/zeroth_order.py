"""The zeroth-order SAM step shared by AdaZo-SAM and LORENZA (Refael, Arbel, Lindenbaum, Tirer;
arXiv 2502.19571): SAM's ascent direction is estimated from forward passes only, so a step costs
one backward pass instead of SAM's two.

With the loop's closure ``forward_backward(backward: bool) -> loss``:

1. for ``j = 1..n_directions``: draw a random direction ``u_j`` (Gaussian; in LORENZA it lives in
   the current low-rank subspace), evaluate ``f(theta + mu u_j)`` and ``f(theta - mu u_j)``
   (forward only, no graph) and take ``c_j = (f+ - f-) / (2 mu)``, the directional derivative;
2. ``g = (1/n) sum_j c_j u_j`` estimates the gradient (E[u u^T] = I), and the SAM perturbation is
   ``eps = rho g / ||g||`` (norm over all parameters);
3. one forward-backward at ``theta + eps`` gives the gradient used by the update; the perturbation
   is removed (subtracted, so no copy of the weights is kept) and the optimizer steps.

``rho`` and ``mu`` are read per parameter group (the optimizer's values unless a group sets its own),
as torch optimizers read ``lr``, so that they can be tuned per group. The rule above then becomes:
the probe moves group ``k``'s parameters by ``+-mu_k u_jk``; since ``f+ - f-`` is then
``2 sum_k mu_k <u_jk, grad_k>`` to first order, group ``k``'s estimate is
``g_k = (1/n) sum_j (f+ - f-) / (2 mu_k) u_jk``, which is unbiased for ``grad_k`` whatever the other
groups' ``mu`` (and is step 2's rule when all are equal); its perturbation is
``eps_k = rho_k g_k / ||g||`` with the norm still over all parameters, as in SAM with per-group
``rho``. A group with ``rho = 0`` is probed (its estimate counts in the norm) but not perturbed; a
step probes only if some group has ``rho > 0``. ``n_directions`` is optimizer-wide: a direction
perturbs all parameters together. The returned loss is the mean of ``(f+ + f-)/2``, the loss at
``theta`` to O(mu^2).

Random directions come from a generator seeded by (seed, step, parameter key, direction), so they
do not depend on how parameters are grouped or partitioned across ranks (``assign_keys``). Under
data parallelism the probe losses are averaged over ranks (``process_group``) so every replica
applies the same perturbation. When ``partitioned`` (set by ``PartitionedOptimizer``: each rank
steps only the parameters it owns) the squared norm of the estimate is summed over
``partition_group`` and the ranks agree on whether this step probes.
"""

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

Closure = Callable[..., torch.Tensor]


@dataclass
class Target:
    """A parameter the probes move: ``apply_(coords, alpha)`` does ``p += alpha * lift(coords)``;
    ``rho`` and ``mu`` are those of the parameter's group."""

    param: torch.Tensor
    shape: torch.Size
    apply_: Callable[[torch.Tensor, float], None]
    rho: float
    mu: float


class ZerothOrderSAM(torch.optim.Optimizer):
    needs_closure = True

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], seed: int | None = None) -> None:
        super().__init__(params, defaults)
        self.zo_seed = int(torch.initial_seed() if seed is None else seed) % (2**62)
        self.process_group: Any = None
        self.partitioned = False
        self.partition_group: Any = None
        self._keys: dict[torch.Tensor, int] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        for group in self.param_groups:
            for p in group["params"]:
                self._keys.setdefault(p, len(self._keys))

    def assign_keys(self, keys: Mapping[torch.Tensor, int]) -> None:
        """Give parameters stable keys (e.g. their index in the unpartitioned model)."""
        self._keys.update(keys)

    # ---- what subclasses provide -------------------------------------------------------------
    def targets(self) -> list[Target] | None:
        """What the probes perturb, or None for a plain (unperturbed) gradient step."""
        raise NotImplementedError

    def update(self) -> None:
        """The optimizer's own step from ``p.grad`` (the gradient at the perturbed point)."""
        raise NotImplementedError

    # ---- the shared step -------------------------------------------------------------------------
    def _generator(self, p: torch.Tensor, step: int, j: int) -> torch.Generator:
        """One generator per device, reseeded for every (step, parameter, direction): use it at once."""
        seed = (((self.zo_seed * 1_000_003 + step) * 10_007 + j) * 1_000_033 + self._keys[p]) % (2**62)
        gen = self._generators.get(p.device)
        if gen is None:
            gen = self._generators[p.device] = torch.Generator(device=p.device)
        return gen.manual_seed(seed)

    def _mean_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            x = x.clone()
            dist.all_reduce(x, group=self.process_group)
            x /= dist.get_world_size(self.process_group)
        return x

    def _forward(self, closure: Closure) -> torch.Tensor:
        with torch.no_grad():
            return self._mean_over_ranks(closure(backward=False).detach().double())

    @torch.no_grad()
    def zo_ascent(self, closure: Closure, targets: list[Target], step: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Steps 1-2: returns (loss estimate at theta, the perturbation eps in each target's coords),
        with each target's own ``mu`` and ``rho`` (see the module docstring)."""
        n = self.defaults["n_directions"]
        est: list[torch.Tensor] = []
        loss = torch.zeros((), dtype=torch.float64, device=targets[0].param.device)
        for j in range(n):
            dirs = [torch.randn(t.shape, generator=self._generator(t.param, step, j), device=t.param.device,
                                dtype=t.param.dtype) for t in targets]
            for t, d in zip(targets, dirs, strict=True):
                t.apply_(d, t.mu)
            f_plus = self._forward(closure)
            for t, d in zip(targets, dirs, strict=True):
                t.apply_(d, -2 * t.mu)
            f_minus = self._forward(closure)
            for t, d in zip(targets, dirs, strict=True):
                t.apply_(d, t.mu)
            loss = loss + (f_plus + f_minus).to(loss.device) / (2 * n)
            c = (f_plus - f_minus) / (2 * n)  # divided by each target's mu below, once
            if j == 0:
                est = dirs
                torch._foreach_mul_(est, c.to(dirs[0].device))
            else:
                torch._foreach_add_(est, torch._foreach_mul(dirs, c.to(dirs[0].device)))
        torch._foreach_mul_(est, [1.0 / t.mu for t in targets])  # the gradient estimate g
        sq = torch.stack([x.double() for x in torch._foreach_norm(est)]).square().sum()
        if self.partitioned:
            dist.all_reduce(sq, group=self.partition_group)
        torch._foreach_mul_(est, [t.rho for t in targets])
        torch._foreach_mul_(est, (1.0 / (sq.sqrt() + 1e-12)).to(est[0].dtype))
        return loss, est

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        if closure is None:
            raise RuntimeError(f"{type(self).__name__} needs the closure forward_backward(backward: bool) -> loss "
                               "(it probes the loss with forward passes)")
        group0 = self.param_groups[0]
        group0["zo_step"] = step = int(group0.get("zo_step", 0)) + 1
        wanted = any(g["rho"] > 0 for g in self.param_groups)
        targets = self.targets()
        if self.partitioned:  # every rank probes, or none does (the closure runs collectives)
            # one MIN-reduction: every rank has its targets (LORENZA's subspaces), and some rank's
            # groups want a perturbation (a rank sees only the groups of the parameters it owns)
            flags = torch.tensor([1.0 if targets else 0.0, -1.0 if wanted else 0.0],
                                 device=self.param_groups[0]["params"][0].device)
            dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=self.partition_group)
            wanted = float(flags[1]) < 0
            targets = targets if float(flags[0]) > 0 else None
        targets = targets if wanted else None
        if not targets:
            with torch.enable_grad():
                loss = closure(backward=True)
        else:
            loss, eps = self.zo_ascent(closure, targets, step)
            for t, e in zip(targets, eps, strict=True):
                t.apply_(e, 1.0)
            with torch.enable_grad():
                closure(backward=True)
            for t, e in zip(targets, eps, strict=True):
                t.apply_(e, -1.0)
        self.update()
        return loss


def full_space_target(p: torch.Tensor, group: Mapping[str, Any]) -> Target:
    """A parameter perturbed in its full space, with its group's ``rho`` and ``mu``."""
    def apply_(d: torch.Tensor, alpha: float) -> None:
        p.add_(d, alpha=alpha)

    return Target(p, p.shape, apply_, group["rho"], group["mu"])


def full_space_targets(groups: Iterable[Mapping[str, Any]]) -> list[Target]:
    """Every parameter that needs a gradient, perturbed in its full space."""
    return [full_space_target(p, g) for g in groups for p in g["params"] if p.requires_grad]
