"""ALLoRA (Huang & Balestriero, 2024, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws",
arXiv 2410.09692).

ALLoRA removes LoRA's dropout and its scaling factor (dropout = 0, alpha = r so s = 1) and
instead scales each parameter's step by a coefficient inversely proportional to its l2 norm:

    lr_p = lr / sqrt(||p||^2 + 1 / eta^2)

so lr_p -> lr * eta while ||p|| is ~0 (B at initialisation: a fast escape from 0, the paper's
second flaw) and lr_p ~ lr / ||p|| once the norm is large. The coefficient is recomputed at the
start of every step from the current norms.

Granularity: one coefficient per LoRA tensor (each A and each B is its own optimizer group), so
the rule holds for any optimizer (SGD, Adam, AdamW: the update is linear in lr). Scaling the
gradient instead would be cancelled by Adam's normalisation. The paper states the rule per
parameter vector; per-row coefficients would need a custom optimizer, which the worker loop's
"any torch optimizer" contract rules out: a documented deviation.

Mechanics: the coefficient is applied inside ``optimizer.step()`` through the step hooks of
``optim_hooks.py``: just before the step each ALLoRA group's ``lr`` (whatever the schedule set)
is multiplied by 1 / sqrt(||p||^2 + 1/eta^2) of its tensor as it is now, and restored right after.
So the schedule, the logged lr and a checkpoint restore all see the plain scheduled lr.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from algorithms.peft import optim_hooks
from algorithms.peft.base import PeftHandle
from algorithms.peft.lora import apply_lora, lora_pairs
from algorithms.peft.optim_hooks import groups_holding


def allora_lr(base_lr: float, norm: float, eta: float) -> float:
    """lr / sqrt(norm^2 + 1/eta^2)."""
    return base_lr / math.sqrt(norm * norm + 1.0 / (eta * eta))


class ALLoRAHandle(PeftHandle):
    eta: float = 1.0
    lora_params: list[nn.Parameter]
    _ids: set[int]

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        others = [p for p in self.model.parameters() if p.requires_grad and id(p) not in self._ids]
        groups: list[dict[str, Any]] = [{"params": [p], "lr": lr} for p in self.lora_params]
        if others:
            groups.append({"params": others, "lr": lr})
        self._groups = groups
        return groups

    @torch.no_grad()
    def pre_step(self, optimizer: torch.optim.Optimizer) -> None:
        groups = groups_holding(optimizer, self._ids)
        if not groups:
            return
        # one fused norm kernel and a single host transfer (no per-tensor GPU sync)
        norms = torch.stack(torch._foreach_norm([g["params"][0].detach() for g in groups]))
        for g, norm in zip(groups, norms.float().tolist(), strict=True):
            g["allora_scheduled_lr"] = g["lr"]
            g["lr"] = allora_lr(g["lr"], norm, self.eta)

    def post_step(self, optimizer: torch.optim.Optimizer) -> None:
        for g in groups_holding(optimizer, self._ids):
            if "allora_scheduled_lr" in g:
                g["lr"] = g.pop("allora_scheduled_lr")


def apply_allora(
    model: nn.Module,
    *,
    eta: float = 1.0,
    r: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: list[str] | str | None = None,
    merge_adapter: bool = False,
    task_type: str | None = None,
) -> ALLoRAHandle:
    """``alpha`` is ignored (ALLoRA has no scaling: alpha = r); a dropout other than 0 is refused."""
    if dropout != 0.0:
        raise ValueError("ALLoRA is dropout-free: dropout must be 0")
    base = apply_lora(
        model,
        name="allora",
        r=r,
        alpha=float(r),
        dropout=0.0,
        target_modules=target_modules,
        merge_adapter=merge_adapter,
        task_type=task_type,
    )
    handle = ALLoRAHandle(name="allora", model=base.model, merge_adapter=base.merge_adapter)
    handle.eta = eta
    handle.lora_params = [t for p in lora_pairs(handle.model) for t in (p.A, p.B)]
    handle._ids = {id(t) for t in handle.lora_params}
    optim_hooks.attach(handle)
    return handle
