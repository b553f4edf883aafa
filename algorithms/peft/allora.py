"""ALLoRA (Huang & Balestriero, 2024, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws",
arXiv 2410.09692).

ALLoRA removes LoRA's dropout and its scaling factor (dropout = 0, alpha = r so s = 1) and
instead scales each step by a coefficient inversely proportional to the l2 norm of the weights it
moves:

    lr_row = lr / sqrt(||row||^2 + 1 / eta^2)

so lr_row -> lr * eta while ||row|| is ~0 (B at initialisation: a fast escape from 0, the paper's
second flaw) and lr_row ~ lr / ||row|| once the norm is large. The coefficient is recomputed at the
start of every step from the current norms.

Granularity: one coefficient per row of each LoRA matrix as torch stores it (one per output unit
of lora_A, r x n, and of lora_B, m x r). The abstract says "per parameter"; the row (neuron) is
how the project's algorithm-fidelity issue states the rule (an earlier version of this module used
one coefficient per tensor). It is applied to the update, not to the gradient, so that it holds
for Adam too (scaling the gradient instead would be cancelled by Adam's normalisation).

Mechanics: the coefficient is applied around ``optimizer.step()`` through the step hooks of
``optim_hooks.py``: before the step the LoRA tensors are copied and their row norms taken, after it
each row is moved back to p_old + c_row (p_new - p_old), c_row = 1 / sqrt(||row_old||^2 + 1/eta^2).
For optimizers whose update is linear in lr and elementwise (SGD with or without momentum, Adam,
AdamW with its decoupled weight decay) that is exactly a step with lr_row = c_row * lr; the
parameter groups, the schedule, the logged lr and the optimizer state are untouched (so a
checkpoint restore needs nothing special), and the optimizer keeps one group for all tensors.
Nothing waits on the host: the coefficients stay on the device.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from algorithms.peft import optim_hooks
from algorithms.peft.base import PeftHandle
from algorithms.peft.lora import apply_lora, lora_pairs


class ALLoRAHandle(PeftHandle):
    eta: float = 1.0
    lora_params: list[torch.Tensor]
    _before: list[torch.Tensor] | None = None
    _coef: list[torch.Tensor] | None = None
    _holds: weakref.WeakKeyDictionary[torch.optim.Optimizer, bool]

    def _in(self, optimizer: torch.optim.Optimizer) -> bool:
        held = self._holds.get(optimizer)
        if held is None:
            first = self.lora_params[0]
            held = any(p is first for g in optimizer.param_groups for p in g["params"])
            self._holds[optimizer] = held
        return held

    @torch.no_grad()
    def pre_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._in(optimizer):
            return
        params = self.lora_params
        if self._before is None or self._before[0].device != params[0].device:
            self._before = [torch.empty_like(p) for p in params]
        torch._foreach_copy_(self._before, params)
        inv_eta2 = 1.0 / (self.eta * self.eta)
        norms = [torch.linalg.vector_norm(p, dim=1, keepdim=True, dtype=torch.float32) for p in params]
        self._coef = [torch.rsqrt(n.square_().add_(inv_eta2)).to(p.dtype) for n, p in zip(norms, params, strict=True)]

    @torch.no_grad()
    def post_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._coef is None or self._before is None or not self._in(optimizer):
            return
        # p_old + c (p_new - p_old), row by row (c is (rows, 1))
        for p, old, c in zip(self.lora_params, self._before, self._coef, strict=True):
            p.copy_(old.lerp_(p, c))
        self._coef = None


def apply_allora(
    model: nn.Module,
    *,
    eta: float,
    r: int,
    alpha: float | None,
    dropout: float,
    target_modules: list[str] | str | None,
    merge_adapter: bool,
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
    handle._holds = weakref.WeakKeyDictionary()
    optim_hooks.attach(handle)
    return handle
