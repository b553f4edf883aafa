"""TIES-Merging (Yadav et al. 2023, "Resolving interference when merging models", Algorithm 1).

For task vectors tau_t = theta_t - theta_base:
  1. trim: keep the top ``density`` fraction of each tau_t by magnitude, zero the rest
     (over the whole task vector as in the paper, or per tensor as in peft's merge_utils);
  2. elect: gamma = sign(sum_t trimmed tau_t) per entry (the sign with more total mass);
  3. disjoint merge: mean over the t whose trimmed entry is non-zero and has sign gamma;
  4. theta = theta_base + scaling * merged.
"""

import math
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import nn

from algorithms.merging._state import (
    StateDict,
    add_to_base,
    check_compatible,
    module_with_state,
    task_vectors,
)
from algorithms.merging.adapters import unwrap_adapters
from algorithms.merging.base import Batch
from algorithms.merging.config import TiesConfig
from algorithms.merging.task_arithmetic import require_base


def trim_top_magnitude(
    tau: StateDict, density: float, scope: Literal["global", "tensor"] = "global"
) -> StateDict:
    """Keep the ``ceil(density * n)`` entries of largest magnitude (ties broken by torch.topk)."""
    if density >= 1.0:
        return {k: v.clone() for k, v in tau.items()}
    if scope == "tensor":
        return {k: _keep_top(v.flatten(), density).view_as(v) for k, v in tau.items()}
    flat = torch.cat([v.flatten() for v in tau.values()]) if tau else torch.zeros(0)
    kept = _keep_top(flat, density)
    out, i = {}, 0
    for k, v in tau.items():
        out[k] = kept[i : i + v.numel()].view_as(v)
        i += v.numel()
    return out


def _keep_top(flat: torch.Tensor, density: float) -> torch.Tensor:
    k = math.ceil(density * flat.numel())
    if k >= flat.numel():
        return flat.clone()
    out = torch.zeros_like(flat)
    if k > 0:
        idx = flat.abs().topk(k).indices
        out[idx] = flat[idx]
    return out


def ties_merge_vectors(trimmed: Sequence[StateDict]) -> StateDict:
    """Steps 2 and 3 on already trimmed task vectors."""
    out: StateDict = {}
    for k in trimmed[0]:
        stack = torch.stack([t[k] for t in trimmed])
        sign = torch.sign(stack.sum(dim=0))
        agree = (torch.sign(stack) == sign) & (stack != 0)
        count = agree.sum(dim=0)
        total = (stack * agree).sum(dim=0)
        out[k] = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    return out


def ties_state_dicts(
    sds: Sequence[StateDict],
    base_sd: StateDict,
    density: float = 0.2,
    scaling: float = 1.0,
    trim_scope: Literal["global", "tensor"] = "global",
) -> StateDict:
    taus = task_vectors(list(sds), base_sd)
    merged = ties_merge_vectors([trim_top_magnitude(t, density, trim_scope) for t in taus])
    return add_to_base(base_sd, {k: scaling * v for k, v in merged.items()})


class TiesMerger:
    def __init__(self, cfg: TiesConfig) -> None:
        self.density, self.scaling, self.trim_scope = cfg.density, cfg.scaling, cfg.trim_scope

    def merge(
        self, models: Sequence[nn.Module], base: nn.Module | None = None, data: Iterable[Batch] | None = None
    ) -> nn.Module:
        models, base = unwrap_adapters(models, base)
        base = require_base(base, "ties")
        sds = check_compatible(models, base)
        base_sd = {k: v.detach() for k, v in base.state_dict().items()}
        merged = ties_state_dicts(sds, base_sd, self.density, self.scaling, self.trim_scope)
        return module_with_state(base, merged)
