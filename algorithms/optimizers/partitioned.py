"""Optimizer-state partitioning by whole parameters (ZeRO-1 style, but matrix-preserving).

``PartitionedOptimizer(params, build_inner, group=None)`` lets optimizers that need whole matrices
(GaLore, DCT, LORENZA: their projections act on a full m x n gradient) run with their state spread
over the ranks of a data-parallel ``group`` instead of replicated, the memory saving that DeepSpeed's
ZeRO stages 1/2 give element-wise optimizers but cannot give these (ZeRO flattens and slices
parameters, so no rank sees a whole matrix).

How it works, with pure ``torch.distributed``:

1. Ownership: every parameter is owned by exactly one rank of ``group``. Parameters are assigned
   greedily, largest first, to the rank with the fewest elements so far (ties to the lower rank):
   deterministic, the same on every rank, balanced to within one matrix.
2. Each rank builds the inner optimizer with ``build_inner(groups)`` on the parameter groups
   restricted to the parameters it owns (group hyperparameters kept), so optimizer state (moments,
   projections) exists only for owned parameters: ~1/world of the total per rank.
3. ``step()``: gradients must already be averaged over the group (DDP, a DeepSpeed engine at ZeRO
   stage 0, or the loop's gradient exchange do that). The inner optimizer steps its parameters,
   then every owner broadcasts its updated parameters (one flat broadcast per owner and dtype),
   so all replicas are identical again.
4. Closure optimizers (``needs_closure``: LORENZA, AdaZo-SAM, SAM) get a closure that first
   broadcasts the owners' current (perturbed) parameters, so every forward pass sees the same
   model on every rank; their global reductions (the squared norm of the ascent direction, whether
   to probe this step) are summed / agreed over the group, and their random directions are keyed by
   each parameter's index in the full model, so the result equals the unpartitioned optimizer's.

Hyperparameters live in this wrapper's ``param_groups`` (all parameters, so an LR scheduler sees the
usual groups) and are copied into the inner groups at every step.

Not reproduced: ZeRO-2's gradient partitioning (gradients are whole on every rank until the step).

Checkpoints: ``state_dict()`` returns this rank's shard only (safe to call on one rank);
``gather_state_dict(dst)`` is a collective that returns every shard on ``dst``; ``load_state_dict``
accepts either and takes this rank's shard (same world size required).
"""

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

InnerBuilder = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


def assign_owners(sizes: list[int], world: int) -> list[int]:
    """Greedy largest-first assignment of items (by size) to ``world`` bins; returns each item's bin."""
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


def _as_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    items = list(params)
    if not items:
        raise ValueError("PartitionedOptimizer got an empty parameter list")
    if isinstance(items[0], dict):
        return [{**g, "params": list(g["params"])} for g in items]
    return [{"params": items}]


class PartitionedOptimizer(torch.optim.Optimizer):
    """Whole-parameter optimizer-state partitioning over a process group (see the module docstring).

    Args:
        params: parameters or parameter groups (dicts with ``"params"`` and hyperparameters), the same
            on every rank and in the same order.
        build_inner: builds the real optimizer from a list of parameter groups; it is called with only
            this rank's parameters, e.g. ``lambda groups: OPTIMIZERS.build(cfg, groups)``.
        group: the data-parallel process group (default: the whole world). Without an initialised
            process group this is a thin pass-through (world of one).
    """

    def __init__(self, params: Iterable[Any], build_inner: InnerBuilder, group: Any = None) -> None:
        groups = _as_groups(params)
        self.group = group
        distributed = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size(group) if distributed else 1
        self.rank = dist.get_rank(group) if distributed else 0
        flat: list[torch.Tensor] = []
        seen: set[torch.Tensor] = set()
        for g in groups:
            for p in g["params"]:
                if p not in seen:
                    seen.add(p)
                    flat.append(p)
        self.owner: dict[torch.Tensor, int] = dict(zip(flat, assign_owners([p.numel() for p in flat], self.world),
                                                       strict=True))
        self.index: dict[torch.Tensor, int] = {p: i for i, p in enumerate(flat)}
        self._inner_of: list[int | None] = []
        inner_groups: list[dict[str, Any]] = []
        for g in groups:
            mine = [p for p in g["params"] if self.owner[p] == self.rank]
            if mine:
                self._inner_of.append(len(inner_groups))
                inner_groups.append({**g, "params": mine})
            else:
                self._inner_of.append(None)
        if not inner_groups:  # owns nothing: a placeholder keeps the closure protocol in step with the others
            self._placeholder = torch.zeros(0, dtype=flat[0].dtype, device=flat[0].device, requires_grad=True)
            inner_groups = [{**groups[0], "params": [self._placeholder]}]
        self.inner = build_inner(inner_groups)
        super().__init__(groups, dict(self.inner.defaults))
        self.needs_closure = bool(getattr(self.inner, "needs_closure", False))
        if hasattr(self.inner, "assign_keys"):
            self.inner.assign_keys({p: self.index[p] for g in inner_groups for p in g["params"] if p in self.index})
        if self.world > 1 and hasattr(self.inner, "partitioned"):
            inner: Any = self.inner
            inner.partitioned = True
            inner.partition_group = group
            inner.process_group = group
        self._buckets = self._make_buckets(flat)

    # ---- collectives ------------------------------------------------------------------------------
    def _src(self, r: int) -> int:
        return dist.get_global_rank(self.group, r) if self.group is not None else r

    def _make_buckets(self, flat: list[torch.Tensor]) -> list[tuple[int, list[torch.Tensor]]]:
        buckets: dict[tuple[int, torch.dtype, torch.device], list[torch.Tensor]] = {}
        for p in flat:
            buckets.setdefault((self.owner[p], p.dtype, p.device), []).append(p)
        return [(r, ps) for (r, _, _), ps in sorted(buckets.items(), key=lambda kv: (kv[0][0], str(kv[0][1])))]

    @torch.no_grad()
    def broadcast_parameters(self) -> None:
        """Every owner sends its parameters to all ranks (one flat broadcast per owner and dtype)."""
        if self.world == 1:
            return
        for r, ps in self._buckets:
            if r == self.rank:
                buf = torch.cat([p.detach().reshape(-1) for p in ps])
            else:
                buf = torch.empty(sum(p.numel() for p in ps), dtype=ps[0].dtype, device=ps[0].device)
            dist.broadcast(buf, src=self._src(r), group=self.group)
            if r != self.rank:
                offset = 0
                for p in ps:
                    p.copy_(buf[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()

    # ---- stepping -----------------------------------------------------------------------------------
    def _sync_hyperparameters(self) -> None:
        for g, i in zip(self.param_groups, self._inner_of, strict=True):
            if i is None:
                continue
            inner = self.inner.param_groups[i]
            for k, v in g.items():
                if k != "params" and k in inner:
                    inner[k] = v

    def step(self, closure: Callable[..., Any] | None = None) -> Any:  # type: ignore[override]
        self._sync_hyperparameters()
        if self.needs_closure:
            if closure is None:
                raise RuntimeError(f"{type(self.inner).__name__} needs the closure forward_backward(backward)")
            user_closure = closure

            def synced(*args: Any, **kwargs: Any) -> Any:
                self.broadcast_parameters()
                return user_closure(*args, **kwargs)

            loss = self.inner.step(synced)
        else:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self.inner.step()
        self.broadcast_parameters()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)

    # ---- checkpoints --------------------------------------------------------------------------------
    def _hyper(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"partitioned": True, "world": self.world, "param_groups": self._hyper(),
                "shards": {self.rank: self.inner.state_dict()}}

    def gather_state_dict(self, dst: int = 0) -> dict[str, Any] | None:
        """Collective: every rank calls it; rank ``dst`` of the group gets all shards."""
        shard = self.inner.state_dict()
        if self.world == 1:
            return {"partitioned": True, "world": 1, "param_groups": self._hyper(), "shards": {0: shard}}
        out: list[Any] | None = [None] * self.world if self.rank == dst else None
        dist.gather_object(shard, out, dst=self._src(dst), group=self.group)
        if out is None:
            return None
        return {"partitioned": True, "world": self.world, "param_groups": self._hyper(),
                "shards": dict(enumerate(out))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict.get("partitioned"):
            raise ValueError("not a PartitionedOptimizer state dict")
        if state_dict["world"] != self.world:
            raise ValueError(f"checkpoint was partitioned over {state_dict['world']} ranks, this run has "
                             f"{self.world}: whole-parameter ownership would differ")
        shards = {int(k): v for k, v in state_dict["shards"].items()}
        if self.rank not in shards:
            raise ValueError(f"the checkpoint has no shard for rank {self.rank} (save with gather_state_dict)")
        for g, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
            g.update(saved)
        self.inner.load_state_dict(shards[self.rank])
